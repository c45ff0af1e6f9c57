// The two receive paths of a plugin transport, over the emulator whatever the suite's transport:
// host receives (the plugin writes the bytes into a registered buffer, one per outstanding
// receive, as TCPX does for host memory) and bounce-pool receives (fragments unpacked by the
// engine), and a receive whose outcome contradicts its path failing the peer with a clear error.
#include <cstdlib>
#include <gtest/gtest.h>

#include "e2e/e2e_fixture.h"

namespace tcpx::testing {
namespace {

using Settings = std::vector<std::pair<std::string, std::string>>;

class RecvPathTest : public TwoProcessTest {
 protected:
  // `host_recv`: how the emulator lands receives into host memory (TCPXEMU_HOST_RECV, read when
  // a comm is accepted; both processes inherit it). Its pool is host memory even on a machine
  // with a GPU, so that auto means host receives everywhere.
  void startWith(const char* host_recv, const Settings& target, const Settings& local) {
    // NOLINTBEGIN(concurrency-mt-unsafe): no threads yet
    setenv("TCPXEMU_HOST_RECV", host_recv, 1);
    setenv("TCPXEMU_BOUNCE", "host", 1);
    // NOLINTEND(concurrency-mt-unsafe)
    Settings t{{"transport", "emulator"}, {"chunk_size", "64K"}};
    Settings l = t;
    t.insert(t.end(), target.begin(), target.end());
    l.insert(l.end(), local.begin(), local.end());
    ASSERT_NO_FATAL_FAILURE(start(t, l));
  }

  // The target READs 1 MiB of ours with a receive path that contradicts how the plugin lands
  // it: the READ fails with NOT_SUPPORTED and the message says what to set. (The target is a
  // fresh process, so its emulator runs with this test's settings whatever ran before here.)
  void expectTargetReadFails(const char* advice) {
    constexpr size_t kSize = 1 << 20;
    uint64_t target_mem = 0;
    targetRegion(kSize, &target_mem);
    HostBuffer local(kSize);
    const MemoryId local_mem = localRegion(local);
    const std::string loaded = target_->loadRemote(engine_->memoryDescriptor(local_mem).value());
    ASSERT_EQ(loaded.rfind("OK ", 0), 0u) << loaded;
    const std::string answer = target_->call(strfmt("XFER R initiator %llu 0 %s 0 %zu 1 -",
                                                    static_cast<unsigned long long>(target_mem),
                                                    loaded.substr(3).c_str(), kSize));
    EXPECT_EQ(answer.rfind("NOT_SUPPORTED", 0), 0u) << answer;
    EXPECT_NE(answer.find(advice), std::string::npos) << answer;
    // The target gave up on its READ, but this engine may still be reading `local` for it until
    // it sees the peer fail: the deregistration waits for that, so `local` goes only once
    // nothing reads it.
    EXPECT_TRUE(engine_->deregisterMemory(local_mem).isOk());
  }

  void TearDown() override {
    TwoProcessTest::TearDown();
    // Later tests of this process see the emulator's defaults again.
    // NOLINTBEGIN(concurrency-mt-unsafe): the engines are gone
    unsetenv("TCPXEMU_HOST_RECV");
    unsetenv("TCPXEMU_BOUNCE");
    // NOLINTEND(concurrency-mt-unsafe)
  }
};

TEST_F(RecvPathTest, HostReceivesUseOneBufferPerOutstandingReceive) {
  // 64 KiB chunks, 16 receives in flight per channel: receives sharing a buffer would mix bytes.
  ASSERT_NO_FATAL_FAILURE(startWith("direct", {{"recv_path", "host"}}, {{"recv_path", "host"}}));
  roundTrip(32u << 20);
}

TEST_F(RecvPathTest, AutoPicksHostReceivesWhenThePluginPoolIsNotGpuMemory) {
  ASSERT_NO_FATAL_FAILURE(startWith("direct", {}, {}));
  roundTrip(8u << 20);
}

TEST_F(RecvPathTest, BouncePoolReceivesUnpackFragmentsIntoHostMemory) {
  ASSERT_NO_FATAL_FAILURE(startWith("pool", {{"recv_path", "pool"}}, {{"recv_path", "pool"}}));
  roundTrip(32u << 20);
}

TEST_F(RecvPathTest, APoolReceiveThatLandsInThePostedBufferFailsThePeer) {
  // The plugin writes host receives in place (as TCPX does): nothing arrives in its pool.
  ASSERT_NO_FATAL_FAILURE(startWith("direct", {{"recv_path", "pool"}}, {}));
  expectTargetReadFails("use recv_path=auto or host");
}

TEST_F(RecvPathTest, AHostReceiveThatLandsInThePoolFailsThePeer) {
  ASSERT_NO_FATAL_FAILURE(startWith("pool", {{"recv_path", "host"}}, {}));
  expectTargetReadFails("needs recv_path=pool");
}

}  // namespace
}  // namespace tcpx::testing
