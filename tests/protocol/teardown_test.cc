// Teardown over a plugin transport (the emulator, which leaks as TCPX does when a host closes
// things in the wrong order): removing a peer, whether it finished its set-up or stalled in it,
// and destroying an engine leave no file descriptor or thread behind; engines of one process
// share the plugin's one init.
#include <chrono>
#include <gtest/gtest.h>
#include <thread>

#include "common/process_counts.h"
#include "protocol/protocol_fixture.h"

namespace tcpx::testing {
namespace {

using tools::fdCount;
using tools::threadCount;
using tools::threadNames;

struct ProcessCounts {
  size_t fds = fdCount();
  size_t threads = threadCount();
};

// Waits (bounded) until the counts fall back to `baseline`: closes are synchronous, but a
// thread that was told to stop may take a moment to be reaped.
void expectBackTo(const ProcessCounts& baseline, const char* after) {
  ProcessCounts now;
  const auto deadline = std::chrono::steady_clock::now() + 3s;
  while ((now.fds != baseline.fds || now.threads != baseline.threads) &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(10ms);
    now = ProcessCounts{};
  }
  EXPECT_EQ(now.fds, baseline.fds) << "file descriptors left behind " << after;
  EXPECT_EQ(now.threads, baseline.threads)
      << "threads left behind " << after << "; threads now: " << threadNames();
}

std::unique_ptr<Engine> emulatorEngine(const std::string& name) {
  auto engine = Engine::create(testConfig(name, {{"transport", "emulator"}, {"channels", "2"}}));
  EXPECT_TRUE(engine.isOk()) << engine.status().toString();
  return engine.isOk() ? std::move(engine.value()) : nullptr;
}

// WRITEs `size` bytes from `from` into `to`'s memory and checks them there.
void writeAndCheck(Engine& from, Engine& to, const std::string& to_name, size_t size,
                   uint64_t seed) {
  tools::HostBuffer src(size);
  tools::HostBuffer dst(size);
  fillPattern(src.data(), size, seed);
  auto src_id = from.registerMemory(src.data(), size);
  auto dst_id = to.registerMemory(dst.data(), size);
  ASSERT_TRUE(src_id.isOk() && dst_id.isOk());
  auto remote = from.loadRemoteMemory(to.memoryDescriptor(dst_id.value()).value());
  ASSERT_TRUE(remote.isOk()) << remote.status().toString();
  auto h = from.prepareTransfer(OpKind::kWrite, to_name,
                                std::vector<LocalDesc>{{src_id.value(), 0, size}},
                                std::vector<RemoteDesc>{{remote->id, 0, size}});
  ASSERT_TRUE(h.isOk()) << h.status().toString();
  ASSERT_TRUE(from.postTransfer(h.value()).isOk());
  ASSERT_TRUE(from.waitTransfer(h.value(), 30s).isOk());
  (void)from.releaseTransfer(h.value());
  EXPECT_EQ(checkPattern(dst.data(), size, seed), -1);
  EXPECT_TRUE(from.unloadRemoteMemory(remote.value()).isOk());
  EXPECT_TRUE(from.deregisterMemory(src_id.value()).isOk());
  EXPECT_TRUE(to.deregisterMemory(dst_id.value()).isOk());
}

TEST(TeardownTest, TwoEnginesOfOneProcessShareThePluginAndLeaveNothingBehind) {
  // The first engine loads and initialises the plugin (its own threads and sockets stay).
  auto a = emulatorEngine("a");
  ASSERT_NE(a, nullptr);
  const ProcessCounts baseline;
  {
    auto b = emulatorEngine("b");  // a second init would fail: the plugin is shared
    ASSERT_NE(b, nullptr);
    const ProcessCounts engines;
    for (int round = 0; round < 3; ++round) {
      SCOPED_TRACE("round " + std::to_string(round));
      ASSERT_TRUE(a->addPeer("b", b->connectionInfo()).isOk());
      ASSERT_TRUE(b->addPeer("a", a->connectionInfo()).isOk());
      ASSERT_TRUE(a->connect("b").isOk());
      writeAndCheck(*a, *b, "b", 8u << 20, 100 + round);
      writeAndCheck(*b, *a, "a", 8u << 20, 200 + round);
      ASSERT_TRUE(a->removePeer("b").isOk());
      ASSERT_TRUE(b->removePeer("a").isOk());
      expectBackTo(engines, "by removePeer");
    }
  }
  expectBackTo(baseline, "by an engine's destruction");
}

TEST(TeardownTest, APeerStuckInDataSetUpIsRemovedWithoutLeaks) {
  auto engine = emulatorEngine("engine");
  ASSERT_NE(engine, nullptr);
  const ProcessCounts baseline;
  for (int round = 0; round < 2; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    ScriptedPeer::Options options;
    options.transport = "emulator";
    options.set_up_data = false;  // the engine's accepts wait for connections that never come
    auto peer = ScriptedPeer::connect(engine->connectionInfo(), options);
    ASSERT_TRUE(peer.isOk()) << peer.status().toString();
    ASSERT_TRUE(peer.value()->idle(200ms).isOk());  // the engine polls its accepts meanwhile
    EXPECT_EQ(engine->peerState("scripted"), PeerState::kConnecting);
    ASSERT_TRUE(engine->removePeer("scripted").isOk());
    peer.value().reset();
    expectBackTo(baseline, "by removing a peer stuck in set-up");
  }
}

}  // namespace
}  // namespace tcpx::testing
