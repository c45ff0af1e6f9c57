// An engine connected to many peers over the socket transport: its threads do not grow with the
// peers (the data sockets share a fixed pool of I/O threads), each peer costs a bounded number
// of file descriptors, and connected idle peers cost no measurable CPU.
#include <chrono>
#include <cstring>
#include <gtest/gtest.h>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <tcpx_p2p/tcpx_p2p.h>

#include "common/process_counts.h"
#include "common/random.h"
#include "support/forked_peer.h"

namespace tcpx::testing {
namespace {

using tools::cpuShareWhileSleeping;
using tools::fdCount;
using tools::threadCount;
using tools::threadsNamed;

using namespace std::chrono_literals;

TEST(PeerScaleTest, AnEnginesThreadsDoNotGrowWithItsPeersAndIdlePeersCostNoCpu) {
  constexpr int kPeers = 8;
  constexpr int kIoThreads = 3;
  constexpr size_t kSize = 1ULL << 20;  // above the inline threshold: through the data sockets
  const std::vector<std::pair<std::string, std::string>> sockets = {{"transport", "socket"}};
  std::vector<std::unique_ptr<ForkedPeer>> peers;
  for (int i = 0; i < kPeers; ++i) {
    peers.push_back(std::make_unique<ForkedPeer>("peer-" + std::to_string(i), sockets));
    ASSERT_FALSE(peers.back()->connectionInfo().empty()) << "peer " << i << " did not start";
  }
  auto created = Engine::create(testConfig(
      "hub", {{"transport", "socket"}, {"socket_io_threads", std::to_string(kIoThreads)}}));
  ASSERT_TRUE(created.isOk()) << created.status().toString();
  std::unique_ptr<Engine> hub = std::move(created.value());
  const size_t threads_without_peers = threadCount();
  EXPECT_EQ(threadsNamed("tcpx-sock-io"), 0U) << "I/O threads run before any peer is connected";

  HostBuffer src(kSize);
  auto src_id = hub->registerMemory(src.data(), kSize);
  ASSERT_TRUE(src_id.isOk());
  size_t threads_one_peer = 0;
  size_t fds_one_peer = 0;
  for (int i = 0; i < kPeers; ++i) {
    ForkedPeer& peer = *peers[static_cast<size_t>(i)];
    ASSERT_TRUE(hub->addPeer(peer.name(), peer.connectionInfo()).isOk());
    peer.addPeer("hub", hub->connectionInfo());
    // A WRITE to every peer, checked there: each peer's data sockets carry bytes.
    const ForkedPeer::Region region = peer.registerMemory(kSize);
    auto remote = hub->loadRemoteMemory(region.descriptor);
    ASSERT_TRUE(remote.isOk()) << remote.status().toString();
    const uint64_t seed = 500 + static_cast<uint64_t>(i);
    fillPattern(src.data(), kSize, seed);
    auto h = hub->prepareTransfer(OpKind::kWrite, peer.name(),
                                  std::vector<LocalDesc>{{src_id.value(), 0, kSize}},
                                  std::vector<RemoteDesc>{{remote->id, 0, kSize}});
    ASSERT_TRUE(h.isOk()) << h.status().toString();
    ASSERT_TRUE(hub->postTransfer(h.value()).isOk());
    ASSERT_TRUE(hub->waitTransfer(h.value(), 30s).isOk());
    (void)hub->releaseTransfer(h.value());
    EXPECT_EQ(peer.check(region.id, 0, kSize, seed), "ok") << "peer " << i;
    if (i == 0) {
      threads_one_peer = threadCount();
      fds_one_peer = fdCount();
    }
  }
  const size_t threads_all = threadCount();
  const size_t fds_all = fdCount();
  EXPECT_EQ(threadsNamed("tcpx-sock-io"), static_cast<size_t>(kIoThreads));
  EXPECT_EQ(threads_one_peer, threads_without_peers + kIoThreads);
  EXPECT_EQ(threads_all, threads_one_peer) << "threads grew with the peers";
  // Per peer: the control connection and 4 channels x 2 sockets in each direction.
  const double fds_per_peer =
      static_cast<double>(fds_all - fds_one_peer) / static_cast<double>(kPeers - 1);
  std::printf("per connected peer: %.1f file descriptors; %zu threads in all with %d peers\n",
              fds_per_peer, threads_all, kPeers);
  EXPECT_LE(fds_per_peer, 17.0);

  // Idle: connected peers exchange keepalives (one a second each way), nothing else.
  const double share = cpuShareWhileSleeping(3s);
  std::printf("idle with %d peers: %.2f%% of a core\n", kPeers, 100.0 * share);
  EXPECT_LT(share, 0.01) << "an idle engine with connected peers used " << 100 * share
                         << "% of a core";
  EXPECT_TRUE(hub->deregisterMemory(src_id.value()).isOk());
}

}  // namespace
}  // namespace tcpx::testing
