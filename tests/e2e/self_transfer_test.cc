// Transfers between an engine and itself: host memory is copied without a connection, checked
// against the registrations as a peer's request would be, with the notification after the data
// and in post order.
#include <chrono>
#include <cstring>
#include <gtest/gtest.h>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <tcpx_p2p/tcpx_p2p.h>

#include "common/random.h"
#include "support/forked_peer.h"

namespace tcpx::testing {
namespace {

using namespace std::chrono_literals;

constexpr size_t kGuard = 4096;  // bytes on each side of a destination that must stay untouched
constexpr uint8_t kGuardByte = 0x5C;

class SelfTransferTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto engine = Engine::create(testConfig("self"));
    ASSERT_TRUE(engine.isOk()) << engine.status().toString();
    engine_ = std::move(engine.value());
    // The engine is its own peer, as NIXL's local transfers make it.
    ASSERT_TRUE(engine_->addPeer("self", engine_->connectionInfo()).isOk());
    ASSERT_TRUE(engine_->startConnecting("self").isOk());
  }

  // A host region of `size` bytes between guards; returns its id and, loaded back as a peer's
  // region, its remote handle.
  MemoryId region(HostBuffer& buffer, RemoteMemory* remote) {
    std::memset(buffer.data(), kGuardByte, buffer.size());
    auto id = engine_->registerMemory(buffer.data() + kGuard, buffer.size() - 2 * kGuard);
    EXPECT_TRUE(id.isOk()) << id.status().toString();
    if (!id.isOk()) return 0;
    auto desc = engine_->memoryDescriptor(id.value());
    EXPECT_TRUE(desc.isOk());
    auto loaded = engine_->loadRemoteMemory(desc.value());
    EXPECT_TRUE(loaded.isOk()) << loaded.status().toString();
    if (loaded.isOk()) *remote = loaded.value();
    return id.value();
  }

  static bool guardsHold(const HostBuffer& buffer) {
    for (size_t i = 0; i < kGuard; ++i) {
      if (buffer.data()[i] != kGuardByte || buffer.data()[buffer.size() - 1 - i] != kGuardByte) {
        return false;
      }
    }
    return true;
  }

  Status run(OpKind op, const std::vector<LocalDesc>& local, const std::vector<RemoteDesc>& remote,
             std::optional<std::string> note = std::nullopt) {
    auto h = engine_->prepareTransfer(op, "self", local, remote, std::move(note));
    if (!h.isOk()) return h.status();
    Status st = engine_->postTransfer(h.value());
    if (st.isOk()) st = engine_->waitTransfer(h.value(), 10s);
    EXPECT_TRUE(engine_->releaseTransfer(h.value()).isOk());
    return st;
  }

  std::vector<Notification> notifications(size_t count, std::chrono::milliseconds timeout) {
    std::vector<Notification> got;
    const auto end = std::chrono::steady_clock::now() + timeout;
    while (got.size() < count && std::chrono::steady_clock::now() < end) {
      for (Notification& n : engine_->takeNotifications()) got.push_back(std::move(n));
      if (got.size() < count) std::this_thread::sleep_for(1ms);
    }
    return got;
  }

  std::unique_ptr<Engine> engine_;
};

TEST_F(SelfTransferTest, HostWritesAndReadsToItselfMoveEveryByteWithoutAConnection) {
  uint64_t moved = 0;
  for (size_t size : {size_t{100}, size_t{(3u << 20) + 17}, size_t{48u << 20}}) {
    SCOPED_TRACE(size);
    HostBuffer source(size + 2 * kGuard);
    HostBuffer target(size + 2 * kGuard);
    HostBuffer back(size + 2 * kGuard);
    RemoteMemory source_remote;
    RemoteMemory target_remote;
    RemoteMemory back_remote;
    const MemoryId source_id = region(source, &source_remote);
    const MemoryId target_id = region(target, &target_remote);
    const MemoryId back_id = region(back, &back_remote);
    const uint64_t seed = tools::randomSeed();
    fillPattern(source.data() + kGuard, size, seed);

    // WRITE as three descriptors, with a notification.
    const uint64_t a = size / 3;
    const uint64_t b = size / 2;
    ASSERT_TRUE(run(OpKind::kWrite,
                    {{source_id, 0, a}, {source_id, a, b - a}, {source_id, b, size - b}},
                    {{target_remote.id, 0, a},
                     {target_remote.id, a, b - a},
                     {target_remote.id, b, size - b}},
                    std::string("written"))
                    .isOk());
    EXPECT_EQ(checkPattern(target.data() + kGuard, size, seed), -1);
    EXPECT_TRUE(guardsHold(target));
    const auto got = notifications(1, 5s);
    ASSERT_EQ(got.size(), 1u);
    EXPECT_EQ(got[0].peer, "self");
    EXPECT_EQ(got[0].message, "written");

    // READ it back into a third region.
    ASSERT_TRUE(run(OpKind::kRead, {{back_id, 0, size}}, {{target_remote.id, 0, size}}).isOk());
    EXPECT_EQ(checkPattern(back.data() + kGuard, size, seed), -1);
    EXPECT_TRUE(guardsHold(back));
    moved += size;
    for (MemoryId id : {source_id, target_id, back_id}) {
      ASSERT_TRUE(engine_->deregisterMemory(id).isOk());
    }
  }
  // No connection was opened for any of it, and the counters saw every run.
  EXPECT_EQ(engine_->peerState("self"), PeerState::kIdle);
  auto stats = engine_->peerStats("self");
  ASSERT_TRUE(stats.isOk());
  EXPECT_EQ(stats.value().succeeded, 6u);
  EXPECT_EQ(stats.value().failed, 0u);
  EXPECT_EQ(stats.value().bytes_sent, moved);
  EXPECT_EQ(stats.value().bytes_received, moved);
  EXPECT_TRUE(notifications(1, 100ms).empty());
}

TEST_F(SelfTransferTest, RequestsOutsideRegisteredMemoryFailWithTheTargetsCodesAndWriteNothing) {
  constexpr size_t kSize = size_t{64} * 1024;
  HostBuffer source(kSize + 2 * kGuard);
  HostBuffer target(kSize + 2 * kGuard);
  RemoteMemory source_remote;
  RemoteMemory target_remote;
  const MemoryId source_id = region(source, &source_remote);
  const MemoryId target_id = region(target, &target_remote);
  fillPattern(source.data() + kGuard, kSize, 7);
  HostBuffer pristine(target.size());
  std::memcpy(pristine.data(), target.data(), target.size());

  // Past the end of the target region: the second descriptor is out of range (refused when the
  // transfer is prepared, against the loaded descriptor), and nothing of the first is written.
  Status st =
      run(OpKind::kWrite, {{source_id, 0, 100}, {source_id, 100, 200}},
          {{target_remote.id, 0, 100}, {target_remote.id, kSize - 100, 200}}, std::string("never"));
  EXPECT_EQ(st.code(), StatusCode::kOutOfRange) << st.toString();
  // A READ of the same range.
  st = run(OpKind::kRead, {{source_id, 0, 200}}, {{target_remote.id, kSize - 100, 200}});
  EXPECT_EQ(st.code(), StatusCode::kOutOfRange) << st.toString();
  EXPECT_EQ(std::memcmp(pristine.data(), target.data(), target.size()), 0);

  // Prepared WRITE into and READ out of a region deregistered since: the target's check at run
  // time gives NOT_FOUND, and neither the region nor the READ's destination is touched.
  auto write = engine_->prepareTransfer(
      OpKind::kWrite, "self", std::vector<LocalDesc>{{source_id, 0, kSize}},
      std::vector<RemoteDesc>{{target_remote.id, 0, kSize}}, std::string("never"));
  auto read =
      engine_->prepareTransfer(OpKind::kRead, "self", std::vector<LocalDesc>{{source_id, 0, kSize}},
                               std::vector<RemoteDesc>{{target_remote.id, 0, kSize}});
  ASSERT_TRUE(write.isOk());
  ASSERT_TRUE(read.isOk());
  HostBuffer source_before(source.size());
  std::memcpy(source_before.data(), source.data(), source.size());
  ASSERT_TRUE(engine_->deregisterMemory(target_id).isOk());
  std::memset(target.data(), 0x11, target.size());  // what a WRITE after deregistration would keep
  std::memcpy(pristine.data(), target.data(), target.size());
  for (TransferHandle h : {write.value(), read.value()}) {
    ASSERT_TRUE(engine_->postTransfer(h).isOk());
    st = engine_->waitTransfer(h, 10s);
    EXPECT_EQ(st.code(), StatusCode::kNotFound) << st.toString();
    ASSERT_TRUE(engine_->releaseTransfer(h).isOk());
  }
  EXPECT_EQ(std::memcmp(pristine.data(), target.data(), target.size()), 0);
  EXPECT_EQ(std::memcmp(source_before.data(), source.data(), source.size()), 0);

  EXPECT_TRUE(notifications(1, 100ms).empty());
  auto stats = engine_->peerStats("self");
  ASSERT_TRUE(stats.isOk());
  EXPECT_EQ(stats.value().failed, 2u);
  EXPECT_EQ(engine_->peerState("self"), PeerState::kIdle);
}

TEST_F(SelfTransferTest, NotificationsToItselfKeepTheirPostOrder) {
  constexpr size_t kSize = size_t{256} * 1024;
  HostBuffer source(kSize + 2 * kGuard);
  HostBuffer target(kSize + 2 * kGuard);
  RemoteMemory source_remote;
  RemoteMemory target_remote;
  const MemoryId source_id = region(source, &source_remote);
  region(target, &target_remote);
  std::vector<TransferHandle> handles;
  for (int i = 0; i < 20; ++i) {
    ASSERT_TRUE(engine_->sendNotification("self", "note-" + std::to_string(i)).isOk());
    auto h = engine_->prepareTransfer(
        OpKind::kWrite, "self", std::vector<LocalDesc>{{source_id, 0, kSize}},
        std::vector<RemoteDesc>{{target_remote.id, 0, kSize}}, "write-" + std::to_string(i));
    ASSERT_TRUE(h.isOk());
    ASSERT_TRUE(engine_->postTransfer(h.value()).isOk());
    handles.push_back(h.value());
  }
  for (TransferHandle h : handles) {
    EXPECT_TRUE(engine_->waitTransfer(h, 10s).isOk());
    EXPECT_TRUE(engine_->releaseTransfer(h).isOk());
  }
  const auto got = notifications(40, 5s);
  ASSERT_EQ(got.size(), 40u);
  for (int i = 0; i < 20; ++i) {
    EXPECT_EQ(got[static_cast<size_t>(2 * i)].message, "note-" + std::to_string(i));
    EXPECT_EQ(got[static_cast<size_t>(2 * i + 1)].message, "write-" + std::to_string(i));
  }
}

TEST_F(SelfTransferTest, SendsAndRecvsToItselfMatchByTagOldestFirst) {
  // Over a connection to itself a send would reach the connection's other half, where no recv can
  // be posted: they are matched in the engine, like a peer's, without a connection.
  constexpr size_t kSize = (2u << 20) + 3;
  HostBuffer source(kSize + 2 * kGuard);
  HostBuffer first(kSize + 2 * kGuard);
  HostBuffer second(kSize + 2 * kGuard);
  RemoteMemory unused;
  const MemoryId source_id = region(source, &unused);
  const MemoryId first_id = region(first, &unused);
  const MemoryId second_id = region(second, &unused);
  fillPattern(source.data() + kGuard, kSize, 99);
  auto recv1 = engine_->postRecv("self", {first_id, 0, kSize}, 7);
  auto recv2 = engine_->postRecv("self", {second_id, 0, kSize / 2}, 7);
  ASSERT_TRUE(recv1.isOk()) << recv1.status().toString();
  ASSERT_TRUE(recv2.isOk()) << recv2.status().toString();
  EXPECT_EQ(engine_->checkTransfer(recv1.value()).code(), StatusCode::kInProgress);
  auto send1 = engine_->postSend("self", {source_id, 0, kSize}, 7);
  auto send2 = engine_->postSend("self", {source_id, 0, kSize / 2}, 7);
  ASSERT_TRUE(send1.isOk() && send2.isOk());
  for (TransferHandle h : {recv1.value(), send1.value(), recv2.value(), send2.value()}) {
    EXPECT_TRUE(engine_->waitTransfer(h, 10s).isOk());
    EXPECT_TRUE(engine_->releaseTransfer(h).isOk());
  }
  EXPECT_EQ(checkPattern(first.data() + kGuard, kSize, 99), -1);
  EXPECT_EQ(checkPattern(second.data() + kGuard, kSize / 2, 99), -1);
  EXPECT_TRUE(guardsHold(first));
  for (size_t i = kGuard + kSize / 2; i < second.size(); ++i) {
    ASSERT_EQ(second.data()[i], kGuardByte) << i;  // past the recv's length
  }

  // Sizes that differ fail both halves, as over the network; nothing is written.
  std::memset(first.data(), kGuardByte, first.size());
  auto short_recv = engine_->postRecv("self", {first_id, 0, 100}, 9);
  auto long_send = engine_->postSend("self", {source_id, 0, 200}, 9);
  ASSERT_TRUE(short_recv.isOk() && long_send.isOk());
  for (TransferHandle h : {short_recv.value(), long_send.value()}) {
    EXPECT_EQ(engine_->waitTransfer(h, 10s).code(), StatusCode::kLengthMismatch);
    EXPECT_TRUE(engine_->releaseTransfer(h).isOk());
  }
  for (size_t i = 0; i < first.size(); ++i) ASSERT_EQ(first.data()[i], kGuardByte) << i;

  // A recv released before any send came is canceled, and a later send does not reach it.
  auto lonely = engine_->postRecv("self", {first_id, 0, kSize}, 11);
  ASSERT_TRUE(lonely.isOk());
  ASSERT_TRUE(engine_->releaseTransfer(lonely.value()).isOk());
  auto late = engine_->postSend("self", {source_id, 0, kSize}, 11);
  ASSERT_TRUE(late.isOk());
  EXPECT_EQ(engine_->waitTransfer(late.value(), 200ms).code(), StatusCode::kInProgress);
  for (size_t i = 0; i < first.size(); ++i) ASSERT_EQ(first.data()[i], kGuardByte) << i;
  // Removing the peer fails the send still waiting for its match.
  ASSERT_TRUE(engine_->removePeer("self").isOk());
  EXPECT_EQ(engine_->waitTransfer(late.value(), 10s).code(), StatusCode::kRemoteDisconnected);
  EXPECT_TRUE(engine_->releaseTransfer(late.value()).isOk());
}

}  // namespace
}  // namespace tcpx::testing
