// The same ncclNet call sequences against the devmem emulator and, when TCPX_REAL_PLUGIN names
// it, Google's GPUDirect-TCPX plugin (built from source; scripts/test-real-tcpx.sh runs this with
// the fake CUDA driver and RxDM it needs on a machine without A3 hardware). Each expectation is
// what the real plugin was seen to do; the emulator must do the same, so that a host bug the
// real plugin would expose also fails the suite over the emulator.
#include <dlfcn.h>
#include <unistd.h>

#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <gtest/gtest.h>
#include <string>
#include <vector>

#include "common/random.h"
#include "support/plugin_pair.h"
#include "transport/plugin/net_abi.h"

namespace tcpx::transport::abi {
namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

// Warnings are printed (a failed expectation is easier to read next to the plugin's reason);
// TCPX's warning per host receive attempt is dropped.
void quietLogger(int level, unsigned long /*flags*/, const char* file, int line, const char* fmt,
                 ...) {
  if (level != kLogWarn || std::strstr(fmt, "host mem") != nullptr) return;
  std::fprintf(stderr, "plugin warning (%s:%d): ", file != nullptr ? file : "?", line);
  va_list ap;
  va_start(ap, fmt);
  std::vfprintf(stderr, fmt, ap);  // NOLINT(clang-analyzer-valist.Uninitialized): started above
  std::fprintf(stderr, "\n");
  va_end(ap);
}

std::string envOr(const char* name, const char* fallback) {
  const char* v = std::getenv(name);  // NOLINT(concurrency-mt-unsafe): test set-up
  return v != nullptr && *v != '\0' ? v : fallback;
}

// The plugin under test, loaded and initialised once per process (the emulator from a private
// copy: other tests of the process load it through the engine).
struct Loaded {
  const NetV7* net = nullptr;
  std::string error;
};

Loaded load(const std::string& which) {
  Loaded out;
  const NetV7* net = nullptr;
  if (which == "emulator") {
    setenv("TCPXEMU_ADDR", "127.0.0.1", 1);  // NOLINT(concurrency-mt-unsafe): before init
    net = tcpx::testing::loadPrivateCopy(envOr("TCPX_EMULATOR_PATH", TCPX_EMULATOR_PATH),
                                         "contract-emulator", &out.error);
  } else {
    // The real plugin is loaded by nothing else in the process.
    const std::string path = envOr("TCPX_REAL_PLUGIN", "");
    void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    net = lib != nullptr ? static_cast<const NetV7*>(dlsym(lib, kSymbolV7)) : nullptr;
    if (net == nullptr) out.error = "cannot load " + path + " or its ncclNetPlugin_v7";
  }
  if (net == nullptr) return out;
  if (const int rc = net->init(&quietLogger); rc != kSuccess) {
    out.error = "init of the " + which + " plugin returned " + std::to_string(rc);
    return out;
  }
  out.net = net;
  return out;
}

const Loaded& plugin(const std::string& which) {
  static const Loaded emulator = load("emulator");
  if (which == "emulator") return emulator;
  static const Loaded real = load("tcpx");
  return real;
}

// Both buffers hold 1 MiB.
struct Pair : tcpx::testing::PluginPair {
  explicit Pair(const NetV7* n) : PluginPair(n, 1 << 20, 1 << 20) {}
  [[nodiscard]] UnpackMeta* meta() const { return unpack().meta; }
};

class PluginContract : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (GetParam() == "tcpx" && envOr("TCPX_REAL_PLUGIN", "").empty()) {
      GTEST_SKIP() << "the real TCPX plugin is not given (TCPX_REAL_PLUGIN, see "
                      "scripts/test-real-tcpx.sh): only the emulator is checked";
    }
    const Loaded& p = plugin(GetParam());
    if (p.net == nullptr) GTEST_FAIL() << p.error;
    net_ = p.net;
  }
  const NetV7* net_ = nullptr;
};

TEST_P(PluginContract, PropertiesAreTcpxs) {
  EXPECT_EQ(net_->reg_mr_dma_buf, nullptr);
  int n = 0;
  ASSERT_EQ(net_->devices(&n), kSuccess);
  ASSERT_GE(n, 1);
  PropertiesV7 props{};
  ASSERT_EQ(net_->get_properties(0, &props), kSuccess);
  EXPECT_EQ(props.ptr_support, kPtrHost | kPtrCuda);
  EXPECT_EQ(props.max_comms, 65536);
  EXPECT_EQ(props.max_recvs, 1);
  EXPECT_EQ(props.net_device_type, kDeviceUnpack);
  EXPECT_EQ(props.net_device_version, kUnpackVersion);
}

TEST_P(PluginContract, ResultCodesOfMisuse) {
  EXPECT_EQ(net_->init(&quietLogger), kInternalError) << "a second init";
  int n = 0;
  ASSERT_EQ(net_->devices(&n), kSuccess);
  unsigned char handle[kHandleSize] = {};
  void* listen = nullptr;
  EXPECT_EQ(net_->listen(n, handle, &listen), kInternalError) << "listen on a missing device";
  char buf[4096];
  void* mh = nullptr;
  EXPECT_EQ(net_->reg_mr(nullptr, buf, sizeof(buf), kPtrHost, &mh), kInternalError)
      << "regMr without a comm";
  int done = 0;
  int sizes = 0;
  EXPECT_EQ(net_->test(nullptr, &done, &sizes), kInternalError) << "test of no request";
  Pair pair(net_);
  ASSERT_TRUE(pair.connected());
  void* r = pair.post(false, 0, 4096);
  EXPECT_EQ(net_->irecv_consumed(pair.recv, 2, r), kInternalError) << "irecvConsumed of n = 2";
  void* s = pair.post(true, 0, 4096);
  ASSERT_TRUE(pair.waitDone(r, s));
  EXPECT_EQ(net_->irecv_consumed(pair.recv, 1, r), kSuccess);
  // A handle is deregistered without its comm (the engine does so after closing the comm).
  void* extra = nullptr;
  ASSERT_EQ(net_->reg_mr(pair.recv, buf, sizeof(buf), kPtrHost, &extra), kSuccess);
  EXPECT_EQ(net_->dereg_mr(nullptr, extra), kSuccess);
}

TEST_P(PluginContract, AHostReceiveLandsInItsBufferWithNoFragments) {
  Pair pair(net_);
  ASSERT_TRUE(pair.connected());
  const uint64_t seed = 0x5eed;
  for (int i = 0; i < 4; ++i) {
    SCOPED_TRACE(i);
    const size_t size = static_cast<size_t>(i + 1) * 100000;
    fillPattern(pair.send_buf.data(), size, seed + i);
    std::memset(pair.recv_buf.data(), 0, pair.recv_buf.size());
    pair.meta()->cnt[i] = 77;  // a stale count: the plugin must overwrite it
    void* r = pair.post(false, 0, size);
    void* s = pair.post(true, 0, size);
    ASSERT_TRUE(pair.waitDone(r, s));
    EXPECT_EQ(pair.meta()->cnt[i], 0U) << "a host receive publishes no fragments";
    EXPECT_EQ(checkPattern(pair.recv_buf.data(), size, seed + i), -1);
    ASSERT_EQ(net_->irecv_consumed(pair.recv, 1, r), kSuccess);
  }
}

TEST_P(PluginContract, AtMostSixteenRequestsPerComm) {
  Pair pair(net_);
  ASSERT_TRUE(pair.connected());
  std::vector<void*> recvs(16);
  for (void*& r : recvs) r = pair.post(false, 0, 0);
  void* extra = nullptr;
  EXPECT_EQ(pair.irecv(0, 0, &extra), kInternalError) << "the 17th receive";
  std::vector<void*> sends(16);
  for (void*& s : sends) s = pair.post(true, 0, 0);
  EXPECT_EQ(pair.isend(0, 0, &extra), kInternalError) << "the 17th send";
  for (size_t i = 0; i < 16; ++i) ASSERT_TRUE(pair.waitDone(recvs[i], sends[i]));
  for (void* r : recvs) EXPECT_EQ(net_->irecv_consumed(pair.recv, 1, r), kSuccess);
}

TEST_P(PluginContract, OnlyTheOldestRequestIsTestedAndReceivesAreConsumedInOrder) {
  Pair pair(net_);
  ASSERT_TRUE(pair.connected());
  void* r0 = pair.post(false, 0, 4096);
  void* r1 = pair.post(false, 4096, 4096);
  void* s0 = pair.post(true, 0, 4096);
  void* s1 = pair.post(true, 4096, 4096);
  // A request that is not its comm's oldest is never reported done: TCPX answers 3 once the
  // oldest is under way, "not done" before.
  for (void* later : {r1, s1}) {
    int done = 0;
    int sizes = 0;
    const int rc = net_->test(later, &done, &sizes);
    EXPECT_TRUE(rc == kInternalError || (rc == kSuccess && done == 0)) << rc;
  }
  // The state is intact: the oldest requests complete normally.
  ASSERT_TRUE(pair.waitDone(r0, s0));
  ASSERT_TRUE(pair.waitDone(r1, s1));
  EXPECT_EQ(net_->irecv_consumed(pair.recv, 1, r1), kInternalError) << "out of order";
  EXPECT_EQ(net_->irecv_consumed(pair.recv, 1, r0), kSuccess);
  EXPECT_EQ(net_->irecv_consumed(pair.recv, 1, r1), kSuccess);
}

TEST_P(PluginContract, AReceiveCompletesOnlyWhileTheSenderTestsItsSend) {
  Pair pair(net_);
  ASSERT_TRUE(pair.connected());
  fillPattern(pair.send_buf.data(), 65536, 5);
  void* r = pair.post(false, 0, 65536);
  void* s = pair.post(true, 0, 65536);
  EXPECT_FALSE(pair.waitDone(r, nullptr, 500ms)) << "nothing moves before the sender tests";
  ASSERT_TRUE(pair.waitDone(r, s));
  EXPECT_EQ(checkPattern(pair.recv_buf.data(), 65536, 5), -1);
  EXPECT_EQ(net_->irecv_consumed(pair.recv, 1, r), kSuccess);
}

TEST_P(PluginContract, AReceiveWhoseSenderClosedItsCommEnds) {
  Pair pair(net_);
  ASSERT_TRUE(pair.connected());
  void* r = pair.post(false, 0, 65536);
  net_->close_send(pair.send);
  pair.send = nullptr;
  int done = 0;
  int rc = kSuccess;
  const auto deadline = Clock::now() + 3s;
  while (rc == kSuccess && done == 0 && Clock::now() < deadline) {
    int sizes = 0;
    rc = net_->test(r, &done, &sizes);
  }
  EXPECT_EQ(done, 0);
  // TCPX's test() sees its control socket close; the emulator, which has none, sees the end of
  // its data streams and answers the same.
  EXPECT_EQ(rc, kSystemError);
}

INSTANTIATE_TEST_SUITE_P(Plugins, PluginContract, ::testing::Values("emulator", "tcpx"),
                         [](const ::testing::TestParamInfo<std::string>& param) {
                           return param.param == "emulator" ? std::string("Emulator")
                                                            : std::string("RealTcpx");
                         });

}  // namespace
}  // namespace tcpx::transport::abi
