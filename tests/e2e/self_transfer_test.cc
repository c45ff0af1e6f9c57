// Transfers between an engine and itself: copied without a connection, checked against the
// registrations as a peer's request would be, with the notification after the data and in post
// order. Small host copies run on the progress thread, large ones and every GPU copy on the
// engine's copy thread: their order, releases and the peer's removal while copies wait. GPU
// memory in every direction, ordered after the caller's GPU work (skipped without a GPU).
#include <chrono>
#include <cstring>
#include <gtest/gtest.h>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <tcpx_p2p/tcpx_p2p.h>

#include "common/pattern_memory.h"
#include "common/process_counts.h"
#include "common/random.h"
#include "support/forked_peer.h"

#if TCPX_P2P_HAVE_CUDA
#include <cuda_runtime.h>

#include "support/delayed_copy.h"
#endif

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

// Two 64 MiB regions and the WRITEs between them that keep the copy thread busy.
class QueuedCopies {
 public:
  static constexpr size_t kBig = size_t{64} << 20;

  explicit QueuedCopies(Engine& engine) : engine_(engine), source_(kBig), target_(kBig) {
    fillPattern(source_.data(), kBig, 5);
    source_id_ = engine.registerMemory(source_.data(), kBig).value();
    target_id_ = engine.registerMemory(target_.data(), kBig).value();
    target_remote_ = engine.loadRemoteMemory(engine.memoryDescriptor(target_id_).value()).value();
  }

  // Posts `count` WRITEs of the whole source over the whole target.
  std::vector<TransferHandle> post(int count) {
    std::vector<TransferHandle> handles;
    for (int i = 0; i < count; ++i) {
      auto h = engine_.prepareTransfer(OpKind::kWrite, "self",
                                       std::vector<LocalDesc>{{source_id_, 0, kBig}},
                                       std::vector<RemoteDesc>{{target_remote_.id, 0, kBig}});
      EXPECT_TRUE(h.isOk());
      if (!h.isOk()) break;
      EXPECT_TRUE(engine_.postTransfer(h.value()).isOk());
      handles.push_back(h.value());
    }
    return handles;
  }

  [[nodiscard]] MemoryId sourceId() const { return source_id_; }
  [[nodiscard]] bool targetComplete() const { return checkPattern(target_.data(), kBig, 5) == -1; }

 private:
  Engine& engine_;
  HostBuffer source_;
  HostBuffer target_;
  MemoryId source_id_ = 0;
  MemoryId target_id_ = 0;
  RemoteMemory target_remote_;
};

TEST_F(SelfTransferTest, LargeHostCopiesRunOnTheCopyThreadAndSmallOnesStayInOrderBehindThem) {
  QueuedCopies queued(*engine_);
  constexpr size_t kSmall = 4096;
  HostBuffer small(kSmall + 2 * kGuard);
  HostBuffer target(QueuedCopies::kBig + 2 * kGuard);
  RemoteMemory unused;
  RemoteMemory target_remote;
  const MemoryId small_id = region(small, &unused);
  region(target, &target_remote);
  fillPattern(small.data() + kGuard, kSmall, 77);
  // A 64 MiB WRITE over the whole target, then a 4 KiB WRITE over its first page, a notification,
  // and a 4 KiB READ of that page: small as they are, each waits for the copy before it.
  auto big = engine_->prepareTransfer(
      OpKind::kWrite, "self", std::vector<LocalDesc>{{queued.sourceId(), 0, QueuedCopies::kBig}},
      std::vector<RemoteDesc>{{target_remote.id, 0, QueuedCopies::kBig}}, std::string("big"));
  auto page = engine_->prepareTransfer(
      OpKind::kWrite, "self", std::vector<LocalDesc>{{small_id, 0, kSmall}},
      std::vector<RemoteDesc>{{target_remote.id, 0, kSmall}}, std::string("page"));
  HostBuffer back(kSmall + 2 * kGuard);
  const MemoryId back_id = region(back, &unused);
  auto read_back = engine_->prepareTransfer(
      OpKind::kRead, "self", std::vector<LocalDesc>{{back_id, 0, kSmall}},
      std::vector<RemoteDesc>{{target_remote.id, 0, kSmall}}, std::string("read"));
  ASSERT_TRUE(big.isOk() && page.isOk() && read_back.isOk());
  ASSERT_TRUE(engine_->postTransfer(big.value()).isOk());
  ASSERT_TRUE(engine_->postTransfer(page.value()).isOk());
  ASSERT_TRUE(engine_->sendNotification("self", "after").isOk());
  ASSERT_TRUE(engine_->postTransfer(read_back.value()).isOk());
  for (TransferHandle h : {big.value(), page.value(), read_back.value()}) {
    EXPECT_TRUE(engine_->waitTransfer(h, 30s).isOk());
    EXPECT_TRUE(engine_->releaseTransfer(h).isOk());
  }
  // The page WRITE landed after the big one, and the READ saw it.
  EXPECT_EQ(checkPattern(target.data() + kGuard, kSmall, 77), -1);
  EXPECT_EQ(checkPattern(back.data() + kGuard, kSmall, 77), -1);
  // The rest is the big WRITE's: source pattern 5 from byte kSmall on.
  HostBuffer expected(QueuedCopies::kBig);
  fillPattern(expected.data(), QueuedCopies::kBig, 5);
  EXPECT_EQ(std::memcmp(target.data() + kGuard + kSmall, expected.data() + kSmall,
                        QueuedCopies::kBig - kSmall),
            0);
  EXPECT_TRUE(guardsHold(target));
  const auto got = notifications(4, 5s);
  ASSERT_EQ(got.size(), 4u);
  EXPECT_EQ(got[0].message, "big");
  EXPECT_EQ(got[1].message, "page");
  EXPECT_EQ(got[2].message, "after");
  EXPECT_EQ(got[3].message, "read");
}

// A release takes back a copy that has not started (at once, nothing written) and waits for one
// that runs; it never returns while a copy of the transfer may still write.
TEST_F(SelfTransferTest, ReleasingQueuedCopiesTakesThemBackAndNeverReturnsBeforeACopyEnds) {
  QueuedCopies queued(*engine_);
  constexpr size_t kSize = size_t{1} << 20;  // a copy-thread job, since it queues behind others
  HostBuffer victim(kSize + 2 * kGuard);
  RemoteMemory victim_remote;
  region(victim, &victim_remote);
  const std::vector<TransferHandle> ahead = queued.post(6);
  ASSERT_EQ(ahead.size(), 6u);
  auto h = engine_->prepareTransfer(
      OpKind::kWrite, "self", std::vector<LocalDesc>{{queued.sourceId(), 0, kSize}},
      std::vector<RemoteDesc>{{victim_remote.id, 0, kSize}}, std::string("never"));
  ASSERT_TRUE(h.isOk());
  ASSERT_TRUE(engine_->postTransfer(h.value()).isOk());
  ASSERT_TRUE(engine_->releaseTransfer(h.value()).isOk());
  // Taken back before it started (six 64 MiB copies run before it): nothing written, now or
  // later.
  for (size_t i = 0; i < victim.size(); ++i) ASSERT_EQ(victim.data()[i], kGuardByte) << i;
  // Releasing the copies ahead: each returns only once its copy, if it started, has ended.
  for (TransferHandle a : ahead) ASSERT_TRUE(engine_->releaseTransfer(a).isOk());
  std::this_thread::sleep_for(100ms);
  for (size_t i = 0; i < victim.size(); ++i) ASSERT_EQ(victim.data()[i], kGuardByte) << i;
  EXPECT_TRUE(notifications(1, 50ms).empty());
  // The engine goes on: the same WRITE again lands.
  ASSERT_TRUE(
      run(OpKind::kWrite, {{queued.sourceId(), 0, kSize}}, {{victim_remote.id, 0, kSize}}).isOk());
  EXPECT_EQ(checkPattern(victim.data() + kGuard, kSize, 5), -1);
  EXPECT_TRUE(guardsHold(victim));
}

// Removing the engine's own peer ends its waiting copies with REMOTE_DISCONNECTED at once (none of
// them writes) and the running one once it is done; destroying the engine with copies queued
// waits for the running one only.
TEST_F(SelfTransferTest, RemovingItselfOrDestroyingTheEngineEndsQueuedCopies) {
  QueuedCopies queued(*engine_);
  constexpr size_t kSize = size_t{1} << 20;
  HostBuffer victim(kSize + 2 * kGuard);
  RemoteMemory victim_remote;
  region(victim, &victim_remote);
  std::vector<TransferHandle> handles = queued.post(6);
  auto last = engine_->prepareTransfer(
      OpKind::kWrite, "self", std::vector<LocalDesc>{{queued.sourceId(), 0, kSize}},
      std::vector<RemoteDesc>{{victim_remote.id, 0, kSize}}, std::string("never"));
  ASSERT_TRUE(last.isOk());
  ASSERT_TRUE(engine_->postTransfer(last.value()).isOk());
  ASSERT_TRUE(engine_->removePeer("self").isOk());
  EXPECT_EQ(engine_->waitTransfer(last.value(), 10s).code(), StatusCode::kRemoteDisconnected);
  for (TransferHandle h : handles) {
    const Status st = engine_->waitTransfer(h, 30s);
    // The first may have been copied before the removal; the others end with the removal.
    EXPECT_TRUE(st.isOk() || st.code() == StatusCode::kRemoteDisconnected) << st.toString();
    EXPECT_TRUE(engine_->releaseTransfer(h).isOk());
  }
  std::this_thread::sleep_for(50ms);
  for (size_t i = 0; i < victim.size(); ++i) ASSERT_EQ(victim.data()[i], kGuardByte) << i;
  EXPECT_TRUE(notifications(1, 50ms).empty());

  // Back as its own peer, six copies queued, and the engine destroyed under them.
  ASSERT_TRUE(engine_->addPeer("self", engine_->connectionInfo()).isOk());
  EXPECT_EQ(queued.post(6).size(), 6u);
  engine_.reset();
}

// A copy too long for the progress thread runs on the engine's copy lane for itself, whose
// thread ends once the lane has been idle for two seconds: copy threads follow the peers that
// copy, not every peer ever connected.
TEST_F(SelfTransferTest, TheCopyThreadOfAnIdleLaneEnds) {
  constexpr size_t kSize = size_t{4} << 20;  // far above what the progress thread copies
  HostBuffer source(kSize + 2 * kGuard);
  HostBuffer target(kSize + 2 * kGuard);
  RemoteMemory unused;
  RemoteMemory target_remote;
  const MemoryId source_id = region(source, &unused);
  region(target, &target_remote);
  ASSERT_EQ(tools::threadsNamed("tcpx-copy"), 0u);
  fillPattern(source.data() + kGuard, kSize, 8);
  ASSERT_TRUE(run(OpKind::kWrite, {{source_id, 0, kSize}}, {{target_remote.id, 0, kSize}}).isOk());
  EXPECT_EQ(checkPattern(target.data() + kGuard, kSize, 8), -1);
  EXPECT_EQ(tools::threadsNamed("tcpx-copy"), 1u) << "the copy ran on no lane of its own";
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (tools::threadsNamed("tcpx-copy") != 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(50ms);
  }
  EXPECT_EQ(tools::threadsNamed("tcpx-copy"), 0u) << "an idle lane kept its thread";
  // A later copy starts the lane's thread again.
  fillPattern(source.data() + kGuard, kSize, 9);
  ASSERT_TRUE(run(OpKind::kWrite, {{source_id, 0, kSize}}, {{target_remote.id, 0, kSize}}).isOk());
  EXPECT_EQ(checkPattern(target.data() + kGuard, kSize, 9), -1);
  EXPECT_TRUE(guardsHold(target));
}

// The engine's own peer fails like any other when the application leaves more notifications
// untaken than the bound; connect() to itself then makes it usable again, as for a peer.
TEST_F(SelfTransferTest, ConnectBringsBackItsOwnPeerAfterItFailed) {
  const std::string note(size_t{64} * 1024, 'n');
  for (int i = 0; i < 2000 && engine_->peerState("self") != PeerState::kFailed; ++i) {
    (void)engine_->sendNotification("self", note);
    if (i % 64 == 63) std::this_thread::sleep_for(1ms);
  }
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (engine_->peerState("self") != PeerState::kFailed &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(1ms);
  }
  ASSERT_EQ(engine_->peerState("self"), PeerState::kFailed);
  auto stats = engine_->peerStats("self");
  ASSERT_TRUE(stats.isOk());
  EXPECT_EQ(stats.value().peer_failure.code(), StatusCode::kResourceExhausted);
  (void)engine_->takeNotifications();
  ASSERT_TRUE(engine_->connect("self").isOk());
  EXPECT_NE(engine_->peerState("self"), PeerState::kFailed);
  HostBuffer source(4096 + 2 * kGuard);
  HostBuffer target(4096 + 2 * kGuard);
  RemoteMemory unused;
  RemoteMemory target_remote;
  const MemoryId source_id = region(source, &unused);
  region(target, &target_remote);
  fillPattern(source.data() + kGuard, 4096, 3);
  ASSERT_TRUE(
      run(OpKind::kWrite, {{source_id, 0, 4096}}, {{target_remote.id, 0, 4096}}, "again").isOk());
  EXPECT_EQ(checkPattern(target.data() + kGuard, 4096, 3), -1);
  const auto got = notifications(1, 5s);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].message, "again");
}

#if TCPX_P2P_HAVE_CUDA
// GPU memory to itself: every copy on the engine's copy thread, after the caller's GPU work.
class SelfGpuTransferTest : public SelfTransferTest {
 protected:
  // Registered memory of `size` bytes between guards, on `device` (-1: host memory).
  struct Guarded {
    std::unique_ptr<tools::PatternMemory> mem;
    size_t size = 0;
    MemoryId id = 0;
    RemoteMemory remote;
    [[nodiscard]] bool guardsHold() const {
      return mem->checkByte(0, kGuard, kGuardByte) == -1 &&
             mem->checkByte(kGuard + size, kGuard, kGuardByte) == -1;
    }
    [[nodiscard]] int64_t check(uint64_t offset, uint64_t length, uint64_t seed) const {
      return mem->check(kGuard + offset, length, seed);
    }
  };

  void SetUp() override {
    if (tools::gpuCount() == 0)
      GTEST_SKIP() << "GPU test skipped: " << tools::gpuUnavailableReason();
    SelfTransferTest::SetUp();
  }

  Guarded guarded(int device, size_t size) {
    Guarded g;
    g.size = size;
    g.mem = device < 0 ? tools::makeHostMemory(size + 2 * kGuard, kGuardByte)
                       : tools::makeGpuMemory(size + 2 * kGuard, device, kGuardByte);
    auto id = engine_->registerMemory(g.mem->data() + kGuard, size, g.mem->kind(), device);
    EXPECT_TRUE(id.isOk()) << id.status().toString();
    if (!id.isOk()) return g;
    g.id = id.value();
    auto loaded = engine_->loadRemoteMemory(engine_->memoryDescriptor(g.id).value());
    EXPECT_TRUE(loaded.isOk()) << loaded.status().toString();
    if (loaded.isOk()) g.remote = loaded.value();
    return g;
  }

  TransferHandle post(OpKind op, const Guarded& local, const Guarded& target, size_t size,
                      std::optional<std::string> note = std::nullopt) {
    auto h = engine_->prepareTransfer(op, "self", std::vector<LocalDesc>{{local.id, 0, size}},
                                      std::vector<RemoteDesc>{{target.remote.id, 0, size}},
                                      std::move(note));
    EXPECT_TRUE(h.isOk()) << h.status().toString();
    if (!h.isOk()) return 0;
    EXPECT_TRUE(engine_->postTransfer(h.value()).isOk());
    return h.value();
  }

  // A 256 KiB GPU-to-GPU WRITE whose copy waits for a kernel of `delay_ms` still writing its
  // source, and a GPU-to-host WRITE posted behind it (it cannot start before the first landed).
  static constexpr size_t kHeld = size_t{256} * 1024;
  struct HeldWrites {
    Guarded source, input, first, second;
    TransferHandle waiting = 0;
    TransferHandle queued = 0;
    uint64_t seed = 0;
  };
  HeldWrites postBehindKernel(double delay_ms) {
    HeldWrites held{guarded(0, kHeld), guarded(0, kHeld), guarded(0, kHeld), guarded(-1, kHeld)};
    held.seed = tools::randomSeed();
    held.input.mem->fill(kGuard, kHeld, held.seed);
    cudaSetDevice(0);
    EXPECT_TRUE(launchDelayedCopy(held.input.mem->data() + kGuard, held.source.mem->data() + kGuard,
                                  kHeld, delay_ms));
    held.waiting = post(OpKind::kWrite, held.source, held.first, kHeld, std::string("first"));
    held.queued = post(OpKind::kWrite, held.source, held.second, kHeld, std::string("second"));
    return held;
  }
};

const char* where(int device) {
  return device < 0 ? "DRAM" : "VRAM";
}

TEST_F(SelfGpuTransferTest, GpuMemoryMovesEveryByteInAllDirectionsWithoutAConnection) {
  constexpr size_t kRegion = (3u << 20) + 64;
  uint64_t moved = 0;
  for (const auto& [local_dev, target_dev] : {std::pair{0, 0}, {0, -1}, {-1, 0}}) {
    SCOPED_TRACE(std::string(where(local_dev)) + " here, " + where(target_dev) + " as target");
    Guarded local = guarded(local_dev, kRegion);
    Guarded target = guarded(target_dev, kRegion);
    for (size_t size : {size_t{1}, size_t{4095}, size_t{65536 + 3}, size_t{(3u << 20) + 5}}) {
      SCOPED_TRACE("size " + std::to_string(size));
      const uint64_t seed = tools::randomSeed();
      local.mem->fill(kGuard, size, seed);
      // WRITE as two descriptors (one for a single byte), with a notification.
      const size_t half = size / 2;
      std::vector<LocalDesc> from{{local.id, half, size - half}};
      std::vector<RemoteDesc> to{{target.remote.id, half, size - half}};
      if (half > 0) {
        from.insert(from.begin(), {local.id, 0, half});
        to.insert(to.begin(), {target.remote.id, 0, half});
      }
      ASSERT_TRUE(run(OpKind::kWrite, from, to, std::string("w")).isOk());
      EXPECT_EQ(target.check(0, size, seed), -1);
      const auto got = notifications(1, 5s);
      ASSERT_EQ(got.size(), 1u);
      EXPECT_EQ(got[0].message, "w");
      // READ back other bytes.
      const uint64_t read_seed = tools::randomSeed();
      target.mem->fill(kGuard, size, read_seed);
      ASSERT_TRUE(run(OpKind::kRead, {{local.id, 0, size}}, {{target.remote.id, 0, size}}).isOk());
      EXPECT_EQ(local.check(0, size, read_seed), -1);
      EXPECT_TRUE(local.guardsHold());
      EXPECT_TRUE(target.guardsHold());
      moved += 2 * size;
    }
    // Send and recv between the two.
    const uint64_t seed = tools::randomSeed();
    local.mem->fill(kGuard, kRegion, seed);
    auto recv = engine_->postRecv("self", {target.id, 0, kRegion}, 3);
    auto send = engine_->postSend("self", {local.id, 0, kRegion}, 3);
    ASSERT_TRUE(recv.isOk() && send.isOk());
    for (TransferHandle h : {recv.value(), send.value()}) {
      EXPECT_TRUE(engine_->waitTransfer(h, 10s).isOk());
      EXPECT_TRUE(engine_->releaseTransfer(h).isOk());
    }
    EXPECT_EQ(target.check(0, kRegion, seed), -1);
    EXPECT_TRUE(target.guardsHold());
    ASSERT_TRUE(engine_->deregisterMemory(local.id).isOk());
    ASSERT_TRUE(engine_->deregisterMemory(target.id).isOk());
  }
  EXPECT_EQ(engine_->peerState("self"), PeerState::kIdle);  // no connection was opened
  auto stats = engine_->peerStats("self");
  ASSERT_TRUE(stats.isOk());
  EXPECT_EQ(stats.value().failed, 0u);
}

// Thousands of small descriptors between two regions of one GPU: batched copies, every block in
// its own place, in one transfer each way.
TEST_F(SelfGpuTransferTest, ThousandsOfScatteredGpuDescriptorsLandInTheirOwnPlaces) {
  constexpr size_t kBlock = 4097;
  constexpr size_t kCount = 2048;
  Guarded local = guarded(0, kBlock * kCount);
  Guarded target = guarded(0, 2 * kBlock * kCount);
  const uint64_t seed = tools::randomSeed();
  local.mem->fill(kGuard, kBlock * kCount, seed);
  std::vector<LocalDesc> from;
  std::vector<RemoteDesc> to;
  for (size_t i = 0; i < kCount; ++i) {  // block i to slot kCount - 1 - i, every other block
    from.push_back({local.id, i * kBlock, kBlock});
    to.push_back({target.remote.id, (kCount - 1 - i) * 2 * kBlock, kBlock});
  }
  ASSERT_TRUE(run(OpKind::kWrite, from, to).isOk());
  for (size_t i = 0; i < kCount; ++i) {
    const uint64_t at = kGuard + (kCount - 1 - i) * 2 * kBlock;
    ASSERT_EQ(target.mem->check(at, kBlock, seed, i * kBlock), -1) << "block " << i;
    ASSERT_EQ(target.mem->checkByte(at + kBlock, kBlock, kGuardByte), -1) << "gap after " << i;
  }
  // And back: READ the blocks into a cleared local region.
  local.mem->fillByte(kGuard, kBlock * kCount, 0);
  ASSERT_TRUE(run(OpKind::kRead, from, to).isOk());
  EXPECT_EQ(local.check(0, kBlock * kCount, seed), -1);
  EXPECT_TRUE(local.guardsHold());
  EXPECT_TRUE(target.guardsHold());
}

// The caller's GPU work queued on the default stream before a post comes before the copies, on
// the initiator's memory and on the target's: a delayed kernel writes its bytes after 200 ms.
TEST_F(SelfGpuTransferTest, GpuWorkQueuedBeforeALocalTransferComesBeforeItsCopies) {
  constexpr size_t kSize = size_t{1} << 20;
  Guarded local = guarded(0, kSize);
  Guarded target = guarded(0, kSize);
  Guarded input = guarded(0, kSize);  // what the kernels copy
  cudaSetDevice(0);
  // A WRITE of memory the kernel is still writing sends the kernel's bytes.
  const uint64_t seed = tools::randomSeed();
  input.mem->fill(kGuard, kSize, seed);
  ASSERT_TRUE(
      launchDelayedCopy(input.mem->data() + kGuard, local.mem->data() + kGuard, kSize, 200));
  ASSERT_TRUE(run(OpKind::kWrite, {{local.id, 0, kSize}}, {{target.remote.id, 0, kSize}}).isOk());
  EXPECT_EQ(target.check(0, kSize, seed), -1) << "WRITE of the kernel's output";
  // A WRITE into target memory a kernel is still writing lands after it.
  const uint64_t write_seed = tools::randomSeed();
  local.mem->fill(kGuard, kSize, write_seed);
  input.mem->fill(kGuard, kSize, tools::randomSeed());
  ASSERT_TRUE(
      launchDelayedCopy(input.mem->data() + kGuard, target.mem->data() + kGuard, kSize, 200));
  ASSERT_TRUE(run(OpKind::kWrite, {{local.id, 0, kSize}}, {{target.remote.id, 0, kSize}}).isOk());
  EXPECT_EQ(target.check(0, kSize, write_seed), -1) << "WRITE over the kernel's output";
  // A READ of target memory a kernel is still writing gets the kernel's bytes.
  const uint64_t kernel_seed = tools::randomSeed();
  input.mem->fill(kGuard, kSize, kernel_seed);
  ASSERT_TRUE(
      launchDelayedCopy(input.mem->data() + kGuard, target.mem->data() + kGuard, kSize, 200));
  ASSERT_TRUE(run(OpKind::kRead, {{local.id, 0, kSize}}, {{target.remote.id, 0, kSize}}).isOk());
  EXPECT_EQ(local.check(0, kSize, kernel_seed), -1) << "READ of the kernel's output";
  cudaDeviceSynchronize();
}

// While a copy waits for a 1 s kernel of the caller, a copy queued behind it is taken back at once
// by its release and never writes, and the release of the waiting one returns only after it
// landed.
TEST_F(SelfGpuTransferTest, ReleasesOfCopiesWaitingForTheCallersKernelTakeBackOrWait) {
  const auto begin = std::chrono::steady_clock::now();
  HeldWrites held = postBehindKernel(1000);
  ASSERT_NE(held.waiting, 0u);
  ASSERT_NE(held.queued, 0u);
  std::this_thread::sleep_for(100ms);
  EXPECT_EQ(engine_->checkTransfer(held.waiting).code(), StatusCode::kInProgress);
  // The queued one is taken back long before the kernel ends, and never writes.
  ASSERT_TRUE(engine_->releaseTransfer(held.queued).isOk());
  EXPECT_LT(std::chrono::steady_clock::now() - begin, 700ms);
  // The waiting one: its release returns once its copy (after the kernel) is done.
  ASSERT_TRUE(engine_->releaseTransfer(held.waiting).isOk());
  EXPECT_GE(std::chrono::steady_clock::now() - begin, 800ms);
  EXPECT_EQ(held.first.check(0, kHeld, held.seed), -1);
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(held.second.mem->checkByte(0, kHeld + 2 * kGuard, kGuardByte), -1);
  // Released runs deliver no notification.
  EXPECT_TRUE(notifications(1, 50ms).empty());
  cudaDeviceSynchronize();
}

// Removing the engine's own peer while a copy waits for the caller's kernel: a run that has not
// started ends at once with REMOTE_DISCONNECTED and writes nothing, the waiting one ends with it
// once landed.
TEST_F(SelfGpuTransferTest, RemovingItselfWhileACopyWaitsForAKernelEndsEveryRun) {
  HeldWrites held = postBehindKernel(500);
  std::this_thread::sleep_for(50ms);
  const auto begin = std::chrono::steady_clock::now();
  ASSERT_TRUE(engine_->removePeer("self").isOk());
  EXPECT_EQ(engine_->waitTransfer(held.queued, 10s).code(), StatusCode::kRemoteDisconnected);
  EXPECT_LT(std::chrono::steady_clock::now() - begin, 300ms);
  EXPECT_EQ(engine_->waitTransfer(held.waiting, 10s).code(), StatusCode::kRemoteDisconnected);
  for (TransferHandle h : {held.waiting, held.queued}) {
    EXPECT_TRUE(engine_->releaseTransfer(h).isOk());
  }
  cudaDeviceSynchronize();
  EXPECT_EQ(held.second.mem->checkByte(0, kHeld + 2 * kGuard, kGuardByte), -1);
  EXPECT_TRUE(held.first.guardsHold());
  EXPECT_TRUE(notifications(1, 50ms).empty());
}

// With its peer removed, a transfer whose copy still waits for the caller's kernel is released
// only once that copy has landed: the application may then reuse the memory.
TEST_F(SelfGpuTransferTest, ReleasingAfterItsPeerWasRemovedStillWaitsForTheCopy) {
  const auto launched = std::chrono::steady_clock::now();
  HeldWrites held = postBehindKernel(500);
  std::this_thread::sleep_for(50ms);
  ASSERT_TRUE(engine_->removePeer("self").isOk());
  ASSERT_TRUE(engine_->releaseTransfer(held.waiting).isOk());
  EXPECT_GE(std::chrono::steady_clock::now() - launched, 400ms);
  EXPECT_EQ(held.first.check(0, kHeld, held.seed), -1) << "the copy had landed";
  EXPECT_TRUE(engine_->releaseTransfer(held.queued).isOk());
  cudaDeviceSynchronize();
}

// A WRITE between overlapping ranges of one GPU region leaves the source's bytes in the
// destination (as memmove would), whichever way the ranges overlap.
TEST_F(SelfGpuTransferTest, OverlappingRangesOfOneGpuRegionCopyAsMemmoveWould) {
  constexpr size_t kSize = size_t{1} << 20;
  Guarded region = guarded(0, 2 * kSize);
  for (const auto& [from, to] : {std::pair<size_t, size_t>{0, kSize / 2}, {kSize / 2, 0}}) {
    SCOPED_TRACE("from " + std::to_string(from) + " to " + std::to_string(to));
    const uint64_t seed = tools::randomSeed();
    region.mem->fill(kGuard + from, kSize, seed);
    ASSERT_TRUE(
        run(OpKind::kWrite, {{region.id, from, kSize}}, {{region.remote.id, to, kSize}}).isOk());
    EXPECT_EQ(region.check(to, kSize, seed), -1);
    EXPECT_TRUE(region.guardsHold());
  }
}
#endif  // TCPX_P2P_HAVE_CUDA

}  // namespace
}  // namespace tcpx::testing
