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
#include "transport/plugin/net_abi.h"

namespace tcpx::transport::abi {
namespace {

constexpr size_t kChunk = 512 * 1024;

void quietLogger(int /*level*/, unsigned long /*flags*/, const char* /*file*/, int /*line*/,
                 const char* /*fmt*/, ...) {}

// The emulator built with this test; TCPX_EMULATOR_PATH overrides it (a build tree moved
// elsewhere).
const char* emulatorPath() {
  const char* env = std::getenv("TCPX_EMULATOR_PATH");
  return env != nullptr && *env != '\0' ? env : TCPX_EMULATOR_PATH;
}

const NetV7* table() {
  static const NetV7* net = [] {
    // Host bounce pool, a small pool (back-pressure shows up) and a fixed seed.
    setenv("TCPXEMU_BOUNCE", "host", 1);
    setenv("TCPXEMU_POOL_MIB", "6", 1);
    setenv("TCPXEMU_SEED", "1234", 1);
    setenv("TCPXEMU_ADDR", "127.0.0.1", 1);
    void* lib = dlopen(emulatorPath(), RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) return static_cast<const NetV7*>(nullptr);
    const auto* t = static_cast<const NetV7*>(dlsym(lib, kSymbolV7));
    if (t != nullptr && t->init(&quietLogger) != kSuccess)
      return static_cast<const NetV7*>(nullptr);
    return t;
  }();
  return net;
}

// A connected send/recv comm pair over loopback.
struct Pair {
  const NetV7* net = table();
  void* send = nullptr;
  void* recv = nullptr;
  alignas(16) DeviceHandle dh{kDeviceUnpack, kUnpackVersion, nullptr, 0, 0};
  DeviceHandle* dh_ptr = &dh;
  std::vector<char> send_buf = std::vector<char>(16 * kChunk);
  std::vector<char> anchor = std::vector<char>(4 << 20);
  void* send_mh = nullptr;
  void* recv_mh = nullptr;

  // `pool`: receives into host memory go through the bounce pool (TCPXEMU_HOST_RECV=pool, not
  // TCPX's behaviour), so the fragment layout can be checked without a GPU.
  explicit Pair(bool pool = false) {
    setenv("TCPXEMU_HOST_RECV", pool ? "pool" : "direct", 1);
    unsigned char handle[kHandleSize] = {};
    void* listen = nullptr;
    EXPECT_EQ(net->listen(0, handle, &listen), kSuccess);
    DeviceHandle* none = nullptr;
    for (int i = 0; i < 100000 && (send == nullptr || recv == nullptr); ++i) {
      if (send == nullptr) {
        EXPECT_EQ(net->connect(0, handle, &send, &none), kSuccess);
      }
      if (recv == nullptr) {
        EXPECT_EQ(net->accept(listen, &recv, &dh_ptr), kSuccess);
      }
    }
    EXPECT_NE(send, nullptr);
    EXPECT_NE(recv, nullptr);
    // One accept per listen comm, as on TCPX.
    void* again = nullptr;
    EXPECT_EQ(net->accept(listen, &again, &dh_ptr), kInternalError);
    net->close_listen(listen);
    EXPECT_EQ(
        net->reg_mr(send, send_buf.data(), static_cast<int>(send_buf.size()), kPtrHost, &send_mh),
        kSuccess);
    EXPECT_EQ(net->reg_mr(recv, anchor.data(), static_cast<int>(anchor.size()), kPtrHost, &recv_mh),
              kSuccess);
  }
  ~Pair() {
    net->dereg_mr(send, send_mh);
    net->dereg_mr(recv, recv_mh);
    net->close_send(send);
    net->close_recv(recv);
  }
  [[nodiscard]] const UnpackHandle& unpack() const {
    return *static_cast<const UnpackHandle*>(dh.handle);
  }
  void* isend(size_t offset, size_t size) {
    void* req = nullptr;
    for (int i = 0; i < 1000 && req == nullptr; ++i) {
      EXPECT_EQ(
          net->isend(send, send_buf.data() + offset, static_cast<int>(size), 0, send_mh, &req),
          kSuccess);
    }
    return req;
  }
  int irecv(size_t size, void** req) {
    void* data = anchor.data();
    int sz = static_cast<int>(size);
    int tag = 0;
    return net->irecv(recv, 1, &data, &sz, &tag, &recv_mh, req);
  }
  void* irecvOk(size_t size) {
    void* req = nullptr;
    for (int i = 0; i < 1000 && req == nullptr; ++i) {
      EXPECT_EQ(irecv(size, &req), kSuccess);
    }
    return req;
  }
  // Tests until done, for at most `bound` (the request must be the oldest unfinished one of
  // its comm).
  bool waitDone(void* req, std::chrono::milliseconds bound = std::chrono::seconds(20)) {
    const auto deadline = std::chrono::steady_clock::now() + bound;
    int done = 0;
    while (done == 0 && std::chrono::steady_clock::now() < deadline) {
      int sizes = -1;
      if (net->test(req, &done, &sizes) != kSuccess) return false;
      EXPECT_EQ(sizes, -1) << "TCPX never writes sizes";
    }
    return done != 0;
  }
};

class EmulatorContract : public ::testing::Test {
 protected:
  void SetUp() override {
    if (table() == nullptr)
      GTEST_FAIL() << "cannot load " << TCPX_EMULATOR_PATH << ": " << dlerror();
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
  fillPattern(pair.send_buf.data(), kChunk, 99, 0);
  void* r = pair.irecvOk(kChunk);
  void* s = pair.isend(0, kChunk);
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

TEST_F(EmulatorContract, AtMostSixteenRequestsPerCommAndZeroSizedReceivesHoldSlots) {
  Pair pair;
  std::vector<void*> recvs;
  for (int i = 0; i < 16; ++i) recvs.push_back(pair.irecvOk(0));
  void* extra = nullptr;
  EXPECT_EQ(pair.irecv(0, &extra), kInternalError) << "the 17th receive";
  std::vector<void*> sends;
  for (int i = 0; i < 16; ++i) sends.push_back(pair.isend(0, 0));
  void* extra_send = nullptr;
  EXPECT_EQ(pair.net->isend(pair.send, pair.send_buf.data(), 0, 0, pair.send_mh, &extra_send),
            kInternalError)
      << "the 17th send";
  for (void* s : sends) ASSERT_TRUE(pair.waitDone(s));
  for (void* r : recvs) ASSERT_TRUE(pair.waitDone(r));
  // Done but not consumed: the slots are still held.
  EXPECT_EQ(pair.irecv(0, &extra), kInternalError);
  EXPECT_EQ(pair.net->irecv_consumed(pair.recv, 1, recvs[0]), kSuccess);
  EXPECT_NE(pair.irecvOk(0), nullptr);
  for (size_t i = 1; i < recvs.size(); ++i) {
    EXPECT_EQ(pair.net->irecv_consumed(pair.recv, 1, recvs[i]), kSuccess);
  }
}

TEST_F(EmulatorContract, TestingAnythingButTheOldestRequestIsAnError) {
  Pair pair;
  void* r0 = pair.irecvOk(4096);
  void* r1 = pair.irecvOk(4096);
  int done = 0;
  int sizes = 0;
  EXPECT_EQ(pair.net->test(r1, &done, &sizes), kInternalError);
  void* s0 = pair.isend(0, 4096);
  void* s1 = pair.isend(4096, 4096);
  EXPECT_EQ(pair.net->test(s1, &done, &sizes), kInternalError);
  // The state is intact: the oldest requests complete normally.
  ASSERT_TRUE(pair.waitDone(s0));
  ASSERT_TRUE(pair.waitDone(s1));
  ASSERT_TRUE(pair.waitDone(r0));
  ASSERT_TRUE(pair.waitDone(r1));
  // A finished request may not be tested again.
  EXPECT_EQ(pair.net->test(r0, &done, &sizes), kInternalError);
  EXPECT_EQ(pair.net->irecv_consumed(pair.recv, 1, r0), kSuccess);
  EXPECT_EQ(pair.net->irecv_consumed(pair.recv, 1, r1), kSuccess);
}

TEST_F(EmulatorContract, ConsumingOutOfOrderOrBeforeCompletionIsAnError) {
  Pair pair;
  void* r0 = pair.irecvOk(4096);
  void* r1 = pair.irecvOk(4096);
  EXPECT_EQ(pair.net->irecv_consumed(pair.recv, 1, r0), kInternalError) << "not done yet";
  void* s0 = pair.isend(0, 4096);
  void* s1 = pair.isend(0, 4096);
  ASSERT_TRUE(pair.waitDone(s0));
  ASSERT_TRUE(pair.waitDone(s1));
  ASSERT_TRUE(pair.waitDone(r0));
  ASSERT_TRUE(pair.waitDone(r1));
  EXPECT_EQ(pair.net->irecv_consumed(pair.recv, 1, r1), kInternalError) << "out of order";
  EXPECT_EQ(pair.net->irecv_consumed(pair.recv, 1, r0), kSuccess);
  EXPECT_EQ(pair.net->irecv_consumed(pair.recv, 1, r1), kSuccess);
}

TEST_F(EmulatorContract, ReceivesTakeOneBufferAndAtMostFourMiB) {
  Pair pair(/*pool=*/true);
  void* data[2] = {pair.anchor.data(), pair.anchor.data()};
  int sizes[2] = {4096, 4096};
  int tags[2] = {0, 0};
  void* mhs[2] = {pair.recv_mh, pair.recv_mh};
  void* req = nullptr;
  EXPECT_EQ(pair.net->irecv(pair.recv, 2, data, sizes, tags, mhs, &req), kInvalidArgument);
  EXPECT_EQ(pair.irecv((4 << 20) + 1, &req), kInvalidArgument);
  EXPECT_EQ(req, nullptr);
}

TEST_F(EmulatorContract, AFullBouncePoolHoldsCompletionsBackUntilReceivesAreConsumed) {
  // 16 receives of 512 KiB need more pages than the 6 MiB pool has once split into fragments:
  // some complete only after earlier ones are consumed, and none fails.
  Pair pair(/*pool=*/true);
  fillPattern(pair.send_buf.data(), pair.send_buf.size(), 7, 0);
  std::vector<void*> recvs;
  std::vector<void*> sends;
  for (int i = 0; i < 16; ++i) recvs.push_back(pair.irecvOk(kChunk));
  for (int i = 0; i < 16; ++i) sends.push_back(pair.isend(i * kChunk, kChunk));
  for (void* s : sends) ASSERT_TRUE(pair.waitDone(s));
  size_t held_back = 0;
  size_t completed = 0;
  size_t consumed = 0;
  std::vector<char> out(kChunk);
  while (consumed < recvs.size()) {
    // Complete what the pool allows without consuming anything.
    while (completed < recvs.size() &&
           pair.waitDone(recvs[completed], std::chrono::milliseconds(200))) {
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
  void* mh = nullptr;
  EXPECT_EQ(pair.net->reg_mr(pair.recv, pair.anchor.data(), 4096, kPtrCuda, &mh), kInternalError)
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
