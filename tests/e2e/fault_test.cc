// Faults: a peer that dies, stalls or restarts; releases in flight; both sides connecting at
// once; and transfers within one engine.
#include <signal.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <gtest/gtest.h>
#include <thread>
#include <tuple>

#include "common/net.h"
#include "common/strings.h"
#include "control/blobs.h"
#include "e2e/e2e_fixture.h"

namespace tcpx::testing {
namespace {

class FaultTest : public TwoProcessTest {};

// Posts `count` transfers of `size` bytes to `peer` from one buffer.
std::vector<TransferHandle> postMany(Engine& engine, const std::string& peer, OpKind op,
                                     MemoryId local, const RemoteMemory& remote, size_t size,
                                     int count) {
  std::vector<TransferHandle> handles;
  for (int i = 0; i < count; ++i) {
    auto h = engine.prepareTransfer(op, peer, std::vector<LocalDesc>{{local, 0, size}},
                                    std::vector<RemoteDesc>{{remote.id, 0, size}});
    EXPECT_TRUE(h.isOk());
    EXPECT_TRUE(engine.postTransfer(h.value()).isOk());
    handles.push_back(h.value());
  }
  return handles;
}

TEST_F(FaultTest, AKilledPeerFailsEveryTransferWithRemoteDisconnectedWithinTwoSeconds) {
  for (OpKind op : {OpKind::kWrite, OpKind::kRead}) {
    SCOPED_TRACE(op == OpKind::kWrite ? "WRITE" : "READ");
    ASSERT_NO_FATAL_FAILURE(start());
    constexpr size_t kSize = 64u << 20;
    const RemoteMemory remote = targetRegion(kSize);
    HostBuffer local(kSize);
    const MemoryId mem = localRegion(local);
    const auto handles = postMany(*engine_, "target", op, mem, remote, kSize, 16);
    std::this_thread::sleep_for(20ms);
    target_->kill(SIGKILL);
    const auto killed_at = std::chrono::steady_clock::now();
    int disconnected = 0;
    for (TransferHandle h : handles) {
      const Status st = engine_->waitTransfer(h, 5s);
      if (!st.isOk()) {
        EXPECT_EQ(st.code(), StatusCode::kRemoteDisconnected) << st.toString();
        ++disconnected;
      }
      ASSERT_TRUE(engine_->releaseTransfer(h).isOk());
    }
    EXPECT_LT(std::chrono::steady_clock::now() - killed_at, 2s);
    EXPECT_GT(disconnected, 0);
    EXPECT_EQ(engine_->peerState("target"), PeerState::kFailed);
    // Later posts to the dead peer fail at once.
    auto h = engine_->prepareTransfer(op, "target", std::vector<LocalDesc>{{mem, 0, 64}},
                                      std::vector<RemoteDesc>{{remote.id, 0, 64}});
    ASSERT_TRUE(h.isOk());
    EXPECT_EQ(engine_->postTransfer(h.value()).code(), StatusCode::kRemoteDisconnected);
    (void)engine_->releaseTransfer(h.value());
    ASSERT_TRUE(engine_->deregisterMemory(mem).isOk());  // nothing stays pinned
    target_->wait(5s);
    TearDown();
  }
}

// startConnecting() sets a peer up without a transfer and without blocking the caller.
TEST_F(FaultTest, StartConnectingSetsThePeerUpInTheBackground) {
  ASSERT_NO_FATAL_FAILURE(start());
  EXPECT_EQ(engine_->startConnecting("nobody").code(), StatusCode::kNotFound);
  ASSERT_TRUE(engine_->startConnecting("target").isOk());
  const auto deadline = std::chrono::steady_clock::now() + 20s;
  while (engine_->peerState("target") != PeerState::kReady &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(5ms);
  }
  ASSERT_EQ(engine_->peerState("target"), PeerState::kReady);
  const RemoteMemory remote = targetRegion(4096);
  HostBuffer local(4096);
  EXPECT_TRUE(run(OpKind::kWrite, {{localRegion(local), 0, 4096}}, {{remote.id, 0, 4096}}).isOk());
}

// A target with a region loaded here and then killed, its listening port taken by the test.
struct GoneTarget {
  RemoteMemory remote;
  net::SockAddr addr;  // where it listened
  bool taken = false;  // the test holds that port now
};

class GonePeerTest : public FaultTest {
 protected:
  // Starts a target, loads a region of it, kills it, and has `take` occupy its freed port. A
  // process running beside the test may get the port first (between the kill and `take`): then
  // it starts over, at most three times.
  GoneTarget startKillAndTakePort(const std::function<bool(const net::SockAddr&)>& take) {
    GoneTarget gone;
    for (int attempt = 0; attempt < 3 && !gone.taken; ++attempt) {
      if (attempt > 0) TearDown();
      start();
      if (HasFatalFailure()) return gone;
      gone.remote = targetRegion(4096);
      auto info = control::decodeConnInfo(target_->connectionInfo());
      if (!info.isOk()) {
        ADD_FAILURE() << info.status().toString();
        return gone;
      }
      auto addr = net::resolve(info->host, info->port);
      if (!addr.isOk()) {
        ADD_FAILURE() << addr.status().toString();
        return gone;
      }
      gone.addr = addr.value();
      target_->kill(SIGKILL);
      target_->wait(5s);
      gone.taken = take(gone.addr);
    }
    return gone;
  }

  HostBuffer local_{4096};
};

// A peer loaded and then gone before the first transfer: its address refuses connections, and
// the set-up (started at load time, as the NIXL backend does) fails its transfers within about
// 2 s, not after connect_timeout_ms (20 s by default).
TEST_F(GonePeerTest, APeerGoneBeforeTheFirstTransferFailsItWithinTwoSeconds) {
  // Hold the freed port, bound and not listening, so that it keeps refusing connections: left
  // free, a process running beside this test may listen there, or the engine's own connect may
  // reach itself (see net::isConnectedToItself), both of which the engine handles otherwise.
  net::Fd hold;
  const GoneTarget gone = startKillAndTakePort([&](const net::SockAddr& addr) {
    hold = net::Fd(::socket(addr.family(), SOCK_STREAM | SOCK_CLOEXEC, 0));
    return ::bind(hold.get(), addr.raw(), addr.len) == 0;
  });
  if (HasFatalFailure()) return;  // the target did not start
  ASSERT_TRUE(gone.taken) << "another process took the dead target's port, three times";
  const MemoryId mem = localRegion(local_);
  const auto gone_at = std::chrono::steady_clock::now();
  ASSERT_TRUE(engine_->startConnecting("target").isOk());
  auto h =
      engine_->prepareTransfer(OpKind::kWrite, "target", std::vector<LocalDesc>{{mem, 0, 4096}},
                               std::vector<RemoteDesc>{{gone.remote.id, 0, 4096}});
  ASSERT_TRUE(h.isOk());
  const Status post = engine_->postTransfer(h.value());
  const Status st = post.isOk() ? engine_->waitTransfer(h.value(), 30s) : post;
  EXPECT_EQ(st.code(), StatusCode::kRemoteDisconnected) << st.toString();
  EXPECT_NE(st.message().find("refused connections"), std::string::npos) << st.toString();
  const auto took = std::chrono::steady_clock::now() - gone_at;
  EXPECT_GE(took, 1900ms);  // a few quick retries first
  EXPECT_LT(took, 4s);
  EXPECT_EQ(engine_->peerState("target"), PeerState::kFailed);
  (void)engine_->releaseTransfer(h.value());
}

// A peer gone whose port another engine now listens on (a restarted process, or any engine that
// happened to get that port): the set-up fails at the first handshake, naming the stale
// connection info, rather than talking to the wrong engine or retrying (a refused address is
// retried for 2 s).
TEST_F(GonePeerTest, APeerWhosePortAnotherEngineNowHoldsFailsAtOnceAsStale) {
  std::unique_ptr<Engine> other;
  const GoneTarget gone = startKillAndTakePort([&](const net::SockAddr& addr) {
    auto made = Engine::create(testConfig(
        "newcomer", {{"listen_host", addr.host()}, {"listen_port", std::to_string(addr.port())}}));
    if (made.isOk()) other = std::move(made.value());
    return made.isOk();
  });
  if (HasFatalFailure()) return;  // the target did not start
  ASSERT_TRUE(gone.taken) << "another process took the dead target's port, three times";
  const MemoryId mem = localRegion(local_);
  const auto start_at = std::chrono::steady_clock::now();
  const Status st = run(OpKind::kWrite, {{mem, 0, 4096}}, {{gone.remote.id, 0, 4096}});
  EXPECT_EQ(st.code(), StatusCode::kRemoteDisconnected) << st.toString();
  EXPECT_NE(st.message().find("a different engine instance ('newcomer'"), std::string::npos)
      << st.toString();
  EXPECT_NE(st.message().find("stale"), std::string::npos) << st.toString();
  EXPECT_LT(std::chrono::steady_clock::now() - start_at, 1500ms);
  EXPECT_EQ(engine_->peerState("target"), PeerState::kFailed);
}

// The counters a user reads to diagnose a deployment: runs, bytes, failures by status, the
// latest error and why the peer failed.
TEST_F(FaultTest, PeerStatsCountRunsBytesAndFailuresByStatus) {
  ASSERT_NO_FATAL_FAILURE(start());
  EXPECT_EQ(engine_->peerStats("nobody").status().code(), StatusCode::kNotFound);
  const std::vector<std::string> names = engine_->peerNames();
  EXPECT_NE(std::find(names.begin(), names.end(), "target"), names.end());
  constexpr size_t kSize = 1 << 20;
  const RemoteMemory remote = targetRegion(kSize);
  HostBuffer local(kSize);
  const MemoryId mem = localRegion(local);
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(run(OpKind::kWrite, {{mem, 0, kSize}}, {{remote.id, 0, kSize}}).isOk());
  }
  ASSERT_TRUE(run(OpKind::kRead, {{mem, 0, 4096}}, {{remote.id, 0, 4096}}).isOk());
  // (posted, in flight, succeeded, failed, bytes sent, bytes received)
  const auto counts = [](const PeerStats& s) {
    return std::tuple{s.posted, s.in_flight, s.succeeded, s.failed, s.bytes_sent, s.bytes_received};
  };
  using Counts = std::tuple<uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t>;
  auto healthy = engine_->peerStats("target");
  ASSERT_TRUE(healthy.isOk());
  EXPECT_EQ(healthy->state, PeerState::kReady);
  EXPECT_EQ(counts(*healthy), (Counts{4, 0, 4, 0, 3 * kSize, 4096}));
  EXPECT_TRUE(healthy->last_error.isOk());

  target_->kill(SIGKILL);
  target_->wait(5s);
  const Status st =
      run(OpKind::kWrite, {{mem, 0, kSize}}, {{remote.id, 0, kSize}}, std::nullopt, 10s);
  ASSERT_EQ(st.code(), StatusCode::kRemoteDisconnected) << st.toString();
  auto failed = engine_->peerStats("target");
  ASSERT_TRUE(failed.isOk());
  EXPECT_EQ(failed->state, PeerState::kFailed);
  EXPECT_EQ(counts(*failed), (Counts{5, 0, 4, 1, 3 * kSize, 4096}));
  ASSERT_EQ(failed->failures.size(), 1u);
  EXPECT_EQ(failed->failures[0].first, StatusCode::kRemoteDisconnected);
  EXPECT_EQ(failed->failures[0].second, 1u);
  EXPECT_EQ(failed->last_error.code(), StatusCode::kRemoteDisconnected);
  EXPECT_FALSE(failed->peer_failure.isOk());
}

TEST_F(FaultTest, OtherPeersKeepWorkingAndARestartedPeerCanBeAddedAgain) {
  ASSERT_NO_FATAL_FAILURE(start());
  auto second = std::make_unique<ForkedPeer>("second");
  ASSERT_TRUE(engine_->addPeer("second", second->connectionInfo()).isOk());
  const ForkedPeer::Region second_region = second->registerMemory(1 << 20);
  auto second_remote = engine_->loadRemoteMemory(second_region.descriptor);
  ASSERT_TRUE(second_remote.isOk());
  const RemoteMemory remote = targetRegion(1 << 20);
  HostBuffer local(1 << 20);
  const MemoryId mem = localRegion(local);
  fillPattern(local.data(), 1 << 20, 11);
  ASSERT_TRUE(run(OpKind::kWrite, {{mem, 0, 1 << 20}}, {{remote.id, 0, 1 << 20}}).isOk());

  target_->kill(SIGKILL);
  target_->wait(5s);
  // The survivor still serves the second peer.
  auto h =
      engine_->prepareTransfer(OpKind::kWrite, "second", std::vector<LocalDesc>{{mem, 0, 1 << 20}},
                               std::vector<RemoteDesc>{{second_remote->id, 0, 1 << 20}});
  ASSERT_TRUE(h.isOk());
  ASSERT_TRUE(engine_->postTransfer(h.value()).isOk());
  ASSERT_TRUE(engine_->waitTransfer(h.value(), 30s).isOk());
  EXPECT_EQ(second->check(second_region.id, 0, 1 << 20, 11), "ok");

  // A new process under the old name, with new connection info.
  target_ = std::make_unique<ForkedPeer>("target");
  ASSERT_TRUE(engine_->addPeer("target", target_->connectionInfo()).isOk());
  target_->addPeer("initiator", engine_->connectionInfo());
  uint64_t new_mem = 0;
  const RemoteMemory fresh = targetRegion(1 << 20, &new_mem);
  // Descriptors of the dead instance are refused; the new ones work.
  EXPECT_EQ(run(OpKind::kWrite, {{mem, 0, 64}}, {{remote.id, 0, 64}}).code(),
            StatusCode::kNotFound);
  ASSERT_TRUE(run(OpKind::kWrite, {{mem, 0, 1 << 20}}, {{fresh.id, 0, 1 << 20}}).isOk());
  EXPECT_EQ(target_->check(new_mem, 0, 1 << 20, 11), "ok");
}

TEST_F(FaultTest, ASilentPeerIsDeclaredDisconnectedAfterThePeerTimeout) {
  ASSERT_NO_FATAL_FAILURE(start({}, {{"peer_timeout_ms", "800"}, {"keepalive_ms", "200"}}));
  const RemoteMemory remote = targetRegion(1 << 20);
  HostBuffer local(1 << 20);
  const MemoryId mem = localRegion(local);
  ASSERT_TRUE(run(OpKind::kWrite, {{mem, 0, 1 << 20}}, {{remote.id, 0, 1 << 20}}).isOk());
  target_->stop();  // alive, connections open, but silent
  const auto stopped_at = std::chrono::steady_clock::now();
  const Status st =
      run(OpKind::kRead, {{mem, 0, 1 << 20}}, {{remote.id, 0, 1 << 20}}, std::nullopt, 10s);
  const auto elapsed = std::chrono::steady_clock::now() - stopped_at;
  EXPECT_EQ(st.code(), StatusCode::kRemoteDisconnected) << st.toString();
  // Declared dead peer_timeout_ms after the last frame it sent, which may precede the stop by up
  // to one keepalive interval.
  EXPECT_LT(elapsed, 2500ms);
  EXPECT_GE(elapsed, 550ms);
  target_->kill(SIGKILL);
  target_->wait(5s);
}

TEST_F(FaultTest, ReleasingTransfersInFlightCancelsThemAndLaterTransfersStillWork) {
  ASSERT_NO_FATAL_FAILURE(start());
  constexpr size_t kSize = 32u << 20;
  uint64_t target_mem = 0;
  const RemoteMemory remote = targetRegion(kSize, &target_mem);
  for (OpKind op : {OpKind::kWrite, OpKind::kRead}) {
    HostBuffer local(kSize);
    const MemoryId mem = localRegion(local);
    const auto handles = postMany(*engine_, "target", op, mem, remote, kSize, 4);
    for (TransferHandle h : handles) EXPECT_TRUE(engine_->releaseTransfer(h).isOk());
    // Once released, the engine no longer touches the buffer: it can be deregistered and freed.
    ASSERT_TRUE(engine_->deregisterMemory(mem).isOk());
  }
  HostBuffer local(kSize);
  const MemoryId mem = localRegion(local);
  fillPattern(local.data(), kSize, 3);
  ASSERT_TRUE(run(OpKind::kWrite, {{mem, 0, kSize}}, {{remote.id, 0, kSize}}).isOk());
  EXPECT_EQ(target_->check(target_mem, 0, kSize, 3), "ok");
  std::memset(local.data(), 0, kSize);
  ASSERT_TRUE(run(OpKind::kRead, {{mem, 0, kSize}}, {{remote.id, 0, kSize}}).isOk());
  EXPECT_EQ(checkPattern(local.data(), kSize, 3), -1);
}

TEST_F(FaultTest, BothSidesConnectingAtOnceEndUpWithOneWorkingConnection) {
  for (int round = 0; round < 5; ++round) {
    SCOPED_TRACE(round);
    ASSERT_NO_FATAL_FAILURE(start());
    Status ours;
    std::thread connector([&] { ours = engine_->connect("target"); });
    EXPECT_EQ(target_->call("CONNECT initiator"), "OK");
    connector.join();
    EXPECT_TRUE(ours.isOk()) << ours.toString();
    EXPECT_EQ(engine_->peerState("target"), PeerState::kReady);
    uint64_t target_mem = 0;
    const RemoteMemory remote = targetRegion(1 << 20, &target_mem);
    HostBuffer local(1 << 20);
    const MemoryId mem = localRegion(local);
    fillPattern(local.data(), 1 << 20, 5);
    ASSERT_TRUE(run(OpKind::kWrite, {{mem, 0, 1 << 20}}, {{remote.id, 0, 1 << 20}}).isOk());
    EXPECT_EQ(target_->check(target_mem, 0, 1 << 20, 5), "ok");
    TearDown();
  }
}

TEST(LocalTransfer, AnEngineMovesDataBetweenItsOwnRegionsThroughItself) {
  auto engine = Engine::create(testConfig("solo"));
  ASSERT_TRUE(engine.isOk());
  Engine& e = *engine.value();
  ASSERT_TRUE(e.addPeer("solo", e.connectionInfo()).isOk());
  ASSERT_TRUE(e.connect("solo").isOk());
  constexpr size_t kSize = 4u << 20;
  HostBuffer a(kSize), b(kSize);
  const MemoryId ma = e.registerMemory(a.data(), kSize).value();
  const MemoryId mb = e.registerMemory(b.data(), kSize).value();
  const RemoteMemory rb = e.loadRemoteMemory(e.memoryDescriptor(mb).value()).value();
  fillPattern(a.data(), kSize, 21);
  auto h = e.prepareTransfer(OpKind::kWrite, "solo", std::vector<LocalDesc>{{ma, 0, kSize}},
                             std::vector<RemoteDesc>{{rb.id, 0, kSize}}, std::string("self"));
  ASSERT_TRUE(h.isOk());
  ASSERT_TRUE(e.postTransfer(h.value()).isOk());
  ASSERT_TRUE(e.waitTransfer(h.value(), 30s).isOk());
  EXPECT_EQ(checkPattern(b.data(), kSize, 21), -1);
  std::vector<Notification> got;
  for (int i = 0; i < 1000 && got.empty(); ++i) {
    got = e.takeNotifications();
    std::this_thread::sleep_for(1ms);
  }
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].message, "self");
  EXPECT_EQ(got[0].peer, "solo");
  std::memset(a.data(), 0, kSize);
  auto r = e.prepareTransfer(OpKind::kRead, "solo", std::vector<LocalDesc>{{ma, 0, kSize}},
                             std::vector<RemoteDesc>{{rb.id, 0, kSize}});
  ASSERT_TRUE(e.postTransfer(r.value()).isOk());
  ASSERT_TRUE(e.waitTransfer(r.value(), 30s).isOk());
  EXPECT_EQ(checkPattern(a.data(), kSize, 21), -1);
}

}  // namespace
}  // namespace tcpx::testing
