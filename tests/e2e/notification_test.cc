// Notifications: standalone ones arrive in order and once; a transfer's arrives after its data.
#include <gtest/gtest.h>
#include <thread>

#include "common/strings.h"
#include "e2e/e2e_fixture.h"

namespace tcpx::testing {
namespace {

class NotificationTest : public TwoProcessTest {};

TEST_F(NotificationTest, StandaloneNotificationsArriveInSendOrderExactlyOnce) {
  ASSERT_NO_FATAL_FAILURE(start());
  // Right after the peers were introduced, before any transfer: the connection is set up on use.
  constexpr int kCount = 500;
  for (int i = 0; i < kCount; ++i) {
    ASSERT_TRUE(engine_->sendNotification("target", "msg-" + std::to_string(i)).isOk());
  }
  ASSERT_TRUE(engine_->sendNotification("target", "").isOk());  // empty messages are allowed
  const auto got = target_->notifications(kCount + 1, 20s);
  ASSERT_EQ(got.size(), static_cast<size_t>(kCount + 1));
  for (int i = 0; i < kCount; ++i) {
    EXPECT_EQ(got[static_cast<size_t>(i)].peer, "initiator");
    EXPECT_EQ(got[static_cast<size_t>(i)].message, "msg-" + std::to_string(i));
  }
  EXPECT_EQ(got.back().message, "");
  // Nothing more arrives later.
  EXPECT_TRUE(target_->notifications(1, 300ms).empty());
}

TEST_F(NotificationTest, AWritesNotificationArrivesAfterItsDataAndOnlyOnce) {
  ASSERT_NO_FATAL_FAILURE(start());
  for (size_t size : {size_t{100}, size_t{48u << 20}}) {  // inline and chunked
    SCOPED_TRACE(size);
    uint64_t target_mem = 0;
    const RemoteMemory remote = targetRegion(size, &target_mem);
    HostBuffer local(size);
    const MemoryId local_mem = localRegion(local);
    const uint64_t seed = tools::randomSeed();
    fillPattern(local.data(), size, seed);
    auto h = engine_->prepareTransfer(
        OpKind::kWrite, "target", std::vector<LocalDesc>{{local_mem, 0, size}},
        std::vector<RemoteDesc>{{remote.id, 0, size}}, std::string("layer-7-ready"));
    ASSERT_TRUE(h.isOk());
    ASSERT_TRUE(engine_->postTransfer(h.value()).isOk());
    // The target looks at its memory the moment the notification shows up.
    const auto got = target_->notifications(1, 30s);
    ASSERT_EQ(got.size(), 1u);
    EXPECT_EQ(got[0].message, "layer-7-ready");
    EXPECT_EQ(got[0].peer, "initiator");
    EXPECT_EQ(target_->check(target_mem, 0, size, seed), "ok");
    ASSERT_TRUE(engine_->waitTransfer(h.value(), 30s).isOk());
    EXPECT_TRUE(target_->notifications(1, 300ms).empty());
    ASSERT_TRUE(engine_->releaseTransfer(h.value()).isOk());
  }
}

TEST_F(NotificationTest, AReadsNotificationReachesTheTargetOnceTheDataWasRead) {
  ASSERT_NO_FATAL_FAILURE(start());
  constexpr size_t kSize = 8u << 20;
  uint64_t target_mem = 0;
  const RemoteMemory remote = targetRegion(kSize, &target_mem);
  const uint64_t seed = tools::randomSeed();
  target_->fill(target_mem, 0, kSize, seed);
  HostBuffer local(kSize);
  const MemoryId local_mem = localRegion(local);
  ASSERT_TRUE(
      run(OpKind::kRead, {{local_mem, 0, kSize}}, {{remote.id, 0, kSize}}, std::string("read-done"))
          .isOk());
  EXPECT_EQ(checkPattern(local.data(), kSize, seed), -1);
  const auto got = target_->notifications(1, 10s);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].message, "read-done");
  EXPECT_TRUE(target_->notifications(1, 300ms).empty());
}

// Notifications sent just before the peer is removed leave ahead of the GOODBYE: sendNotification
// returned OK for them (NIXL's genNotif followed by a disconnect does this).
TEST_F(NotificationTest, NotificationsSentJustBeforeRemovingThePeerStillArrive) {
  ASSERT_NO_FATAL_FAILURE(start());
  ASSERT_TRUE(engine_->connect("target").isOk());
  constexpr int kCount = 20;
  for (int i = 0; i < kCount; ++i) {
    ASSERT_TRUE(engine_->sendNotification("target", "last-" + std::to_string(i)).isOk());
  }
  ASSERT_TRUE(engine_->removePeer("target").isOk());
  const auto got = target_->notifications(kCount, 10s);
  ASSERT_EQ(got.size(), static_cast<size_t>(kCount));
  for (int i = 0; i < kCount; ++i) {
    EXPECT_EQ(got[static_cast<size_t>(i)].message, "last-" + std::to_string(i));
  }
}

TEST_F(NotificationTest, NotificationsFlowBothWays) {
  ASSERT_NO_FATAL_FAILURE(start());
  ASSERT_EQ(target_->call("SEND_NOTIF initiator x" + toHex("from-target")), "OK");
  std::vector<Notification> got;
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (got.empty() && std::chrono::steady_clock::now() < deadline) {
    got = engine_->takeNotifications();
    std::this_thread::sleep_for(1ms);
  }
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].peer, "target");
  EXPECT_EQ(got[0].message, "from-target");
}

}  // namespace
}  // namespace tcpx::testing
