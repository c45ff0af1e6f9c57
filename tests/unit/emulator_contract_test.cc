// The devmem emulator plugin, driven through its raw ncclNet v7 table: it must behave like TCPX
// where a host can see it, and report every rule a host breaks.
#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <gtest/gtest.h>
#include <vector>

#include "common/random.h"
#include "engine/unpack.h"
#include "gpu/gpu.h"
#include "support/plugin_pair.h"
#include "transport/plugin/net_abi.h"

namespace tcpx::transport::abi {
namespace {

constexpr size_t kChunk = size_t{512} * 1024;

void quietLogger(int /*level*/, unsigned long /*flags*/, const char* /*file*/, int /*line*/,
                 const char* /*fmt*/, ...) {}

// The emulator built with this test; TCPX_EMULATOR_PATH overrides it (a build tree moved
// elsewhere).
const char* emulatorPath() {
  const char* env = std::getenv("TCPX_EMULATOR_PATH");  // NOLINT(concurrency-mt-unsafe): read once
  return env != nullptr && *env != '\0' ? env : TCPX_EMULATOR_PATH;
}

const NetV7* table() {
  static const NetV7* net = [] {
    // Host bounce pool, a small pool (back-pressure shows up) and a fixed seed. The test's
    // thread sets them before any emulator thread exists.
    setenv("TCPXEMU_BOUNCE", "host", 1);     // NOLINT(concurrency-mt-unsafe)
    setenv("TCPXEMU_POOL_MIB", "6", 1);      // NOLINT(concurrency-mt-unsafe)
    setenv("TCPXEMU_SEED", "1234", 1);       // NOLINT(concurrency-mt-unsafe)
    setenv("TCPXEMU_ADDR", "127.0.0.1", 1);  // NOLINT(concurrency-mt-unsafe)
    // A private copy: other tests of the process load the emulator through the engine.
    std::string error;
    const NetV7* t = tcpx::testing::loadPrivateCopy(emulatorPath(), "emulator-contract", &error);
    if (t != nullptr && t->init(&quietLogger) != kSuccess)
      return static_cast<const NetV7*>(nullptr);
    return t;
  }();
  return net;
}

// A pair whose sender holds 16 chunks and whose receiver posts into one 4 MiB buffer. `pool`:
// receives into host memory go through the bounce pool (TCPXEMU_HOST_RECV=pool, not TCPX's
// behaviour), so the fragment layout can be checked without a GPU.
struct Pair : tcpx::testing::PluginPair {
  explicit Pair(bool pool = false) : PluginPair(init(pool), 16 * kChunk, 4 << 20) {}
  static const NetV7* init(bool pool) {
    // Read when a comm is accepted; set on the test's thread between comms.
    setenv("TCPXEMU_HOST_RECV", pool ? "pool" : "direct", 1);  // NOLINT(concurrency-mt-unsafe)
    return table();
  }
  void* isendOk(size_t offset, size_t size) { return post(true, offset, size); }
  void* irecvOk(size_t size) { return post(false, 0, size); }
};

class EmulatorContract : public ::testing::Test {
 protected:
  void SetUp() override {
    if (table() == nullptr) GTEST_FAIL() << "cannot load the emulator " << emulatorPath();
  }
};

TEST_F(EmulatorContract, PropertiesAndDeviceHandleMatchTcpx) {
  const NetV7* net = table();
  EXPECT_STREQ(net->name, "TCPXEmulator_v7");
  EXPECT_EQ(net->reg_mr_dma_buf, nullptr);
  int n = 0;
  ASSERT_EQ(net->devices(&n), kSuccess);
  ASSERT_GE(n, 1);
  PropertiesV7 props{};
  ASSERT_EQ(net->get_properties(0, &props), kSuccess);
  EXPECT_EQ(props.ptr_support, kPtrHost | kPtrCuda);
  EXPECT_EQ(props.max_recvs, 1);
  EXPECT_EQ(props.net_device_type, kDeviceUnpack);
  EXPECT_EQ(props.net_device_version, kUnpackVersion);
  Pair pair;
  ASSERT_TRUE(pair.connected());
  EXPECT_EQ(pair.dh.size, sizeof(UnpackHandle));
  EXPECT_EQ(pair.dh.needs_proxy_progress, 1);
  EXPECT_EQ(pair.unpack().head, ~0ULL);
  EXPECT_NE(pair.unpack().meta, nullptr);
  EXPECT_NE(pair.unpack().bounce_buf, nullptr);
}

TEST_F(EmulatorContract, AcceptWithoutADeviceHandleBufferIsRefused) {
  const NetV7* net = table();
  unsigned char handle[kHandleSize] = {};
  void* listen = nullptr;
  ASSERT_EQ(net->listen(0, handle, &listen), kSuccess);
  void* recv = nullptr;
  EXPECT_EQ(net->accept(listen, &recv, nullptr), kInvalidArgument);
  DeviceHandle* null_handle = nullptr;
  EXPECT_EQ(net->accept(listen, &recv, &null_handle), kInvalidArgument);
  alignas(16) DeviceHandle wrong{kDeviceHost, 0, nullptr, 0, 0};
  DeviceHandle* wrong_ptr = &wrong;
  EXPECT_EQ(net->accept(listen, &recv, &wrong_ptr), kInvalidArgument);
  EXPECT_EQ(recv, nullptr);
  net->close_listen(listen);
}

TEST_F(EmulatorContract, FragmentsAreShuffledPagesThatCoverTheReceiveExactly) {
  Pair pair(/*pool=*/true);
  ASSERT_TRUE(pair.connected());
  fillPattern(pair.send_buf.data(), kChunk, 99, 0);
  void* r = pair.irecvOk(kChunk);
  void* s = pair.isendOk(0, kChunk);
  ASSERT_TRUE(pair.waitDone(s));
  ASSERT_TRUE(pair.waitDone(r));
  const UnpackMeta& meta = *pair.unpack().meta;
  const uint64_t count = meta.cnt[0];
  ASSERT_GT(count, kChunk / kUnpackPage - 1);
  std::vector<LoadMeta> frags(meta.mem[0], meta.mem[0] + count);
  std::vector<LoadMeta> checked;
  EXPECT_TRUE(engine::checkFragments(frags.data(), count, kChunk, 6ULL << 20, &checked).isOk());
  EXPECT_FALSE(std::is_sorted(frags.begin(), frags.end(), [](const LoadMeta& a, const LoadMeta& b) {
    return a.dst_off < b.dst_off;
  })) << "fragments arrive in shuffled order";
  EXPECT_TRUE(std::any_of(frags.begin(), frags.end(), [](const LoadMeta& f) {
    return f.len < kUnpackPage;
  })) << "random split points";
  std::vector<char> out(kChunk);
  engine::unpackOnHost(frags.data(), count, static_cast<const char*>(pair.unpack().bounce_buf),
                       out.data());
  EXPECT_EQ(checkPattern(out.data(), kChunk, 99, 0), -1);
  EXPECT_EQ(pair.net->irecv_consumed(pair.recv, 1, r), kSuccess);
}

TEST_F(EmulatorContract, ReceivesTakeOneBufferAndAtMostFourMiB) {
  Pair pair(/*pool=*/true);
  ASSERT_TRUE(pair.connected());
  void* data[2] = {pair.recv_buf.data(), pair.recv_buf.data()};
  int sizes[2] = {4096, 4096};
  int tags[2] = {0, 0};
  void* mhs[2] = {pair.recv_mh, pair.recv_mh};
  void* req = nullptr;
  EXPECT_EQ(pair.net->irecv(pair.recv, 2, data, sizes, tags, mhs, &req), kInternalError);
  EXPECT_EQ(pair.irecv(0, (4 << 20) + 1, &req), kInvalidArgument);
  EXPECT_EQ(req, nullptr);
}

TEST_F(EmulatorContract, AFullBouncePoolHoldsCompletionsBackUntilReceivesAreConsumed) {
  // 16 receives of 512 KiB need more pages than the 6 MiB pool has once split into fragments:
  // some complete only after earlier ones are consumed, and none fails.
  Pair pair(/*pool=*/true);
  ASSERT_TRUE(pair.connected());
  fillPattern(pair.send_buf.data(), pair.send_buf.size(), 7, 0);
  std::vector<void*> recvs(16);
  std::vector<void*> sends(16);
  for (void*& r : recvs) r = pair.irecvOk(kChunk);
  for (size_t i = 0; i < sends.size(); ++i) sends[i] = pair.isendOk(i * kChunk, kChunk);
  for (void* s : sends) ASSERT_TRUE(pair.waitDone(s));
  size_t held_back = 0;
  size_t completed = 0;
  size_t consumed = 0;
  std::vector<char> out(kChunk);
  while (consumed < recvs.size()) {
    // Complete what the pool allows without consuming anything.
    while (completed < recvs.size() &&
           pair.waitDone(recvs[completed], nullptr, std::chrono::milliseconds(200))) {
      const UnpackMeta& meta = *pair.unpack().meta;
      const size_t slot = completed % kUnpackSlots;
      std::vector<LoadMeta> checked;
      ASSERT_TRUE(
          engine::checkFragments(meta.mem[slot], meta.cnt[slot], kChunk, 6ULL << 20, &checked)
              .isOk());
      engine::unpackOnHost(checked.data(), checked.size(),
                           static_cast<const char*>(pair.unpack().bounce_buf), out.data());
      EXPECT_EQ(checkPattern(out.data(), kChunk, 7, completed * kChunk), -1)
          << "receive " << completed;
      ++completed;
    }
    if (completed < recvs.size()) ++held_back;
    ASSERT_LT(consumed, completed) << "receive " << completed << " never completed";
    EXPECT_EQ(pair.net->irecv_consumed(pair.recv, 1, recvs[consumed]), kSuccess);
    ++consumed;
  }
  EXPECT_GT(held_back, 0U) << "the pool never ran full";
}

TEST_F(EmulatorContract, CudaRegistrationsMustBeDeviceMemoryAlignedToFourKiB) {
  Pair pair;
  ASSERT_TRUE(pair.connected());
  void* mh = nullptr;
  EXPECT_EQ(pair.net->reg_mr(pair.recv, pair.recv_buf.data(), 4096, kPtrCuda, &mh), kInternalError)
      << "host memory registered as CUDA";
  if (gpu::deviceCount() == 0) GTEST_SKIP() << "no GPU: " << gpu::unavailableReason();
  auto dev = gpu::allocDevice(0, 1 << 20);
  ASSERT_TRUE(dev.isOk());
  EXPECT_EQ(pair.net->reg_mr(pair.recv, static_cast<char*>(dev.value()) + 16, 4096, kPtrCuda, &mh),
            kInternalError);
  ASSERT_EQ(pair.net->reg_mr(pair.recv, dev.value(), 1 << 20, kPtrCuda, &mh), kSuccess);
  pair.net->dereg_mr(pair.recv, mh);
  gpu::freeDevice(0, dev.value());
}

}  // namespace
}  // namespace tcpx::transport::abi
