// Fixture for two-process tests: a forked target peer and an initiator engine in the test
// process, introduced to each other.
#pragma once

#include <chrono>
#include <cstdlib>
#include <gtest/gtest.h>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <tcpx_p2p/tcpx_p2p.h>

#include "common/pattern_memory.h"
#include "common/random.h"
#include "common/strings.h"
#include "support/forked_peer.h"

#if TCPX_P2P_HAVE_CUDA
#include <cuda_runtime.h>

#include "support/delayed_copy.h"
#endif

namespace tcpx::testing {

using namespace std::chrono_literals;

// What ForkedPeer and HostBuffer fill fresh memory with.
constexpr uint8_t kPoison = 0xA5;

// Whether expectations about timing alone hold here (a copy seen within a poll window, a copy
// that follows its bytes before it gives up): not under compute-sanitizer, which slows every
// CUDA call and kernel by orders of magnitude; scripts/test-gpu-load.sh sets TCPX_TEST_TIMING=lax
// for those runs. Checks of bytes, codes and counts that do not depend on speed always hold.
inline bool timingAsserted() {
  const char* timing = std::getenv("TCPX_TEST_TIMING");  // NOLINT(concurrency-mt-unsafe)
  return timing == nullptr || std::string(timing) != "lax";
}

// The transport the suite runs over: TCPX_P2P_TRANSPORT, or the engines' default, "socket".
inline std::string transportUnderTest() {
  const char* transport = std::getenv("TCPX_P2P_TRANSPORT");  // NOLINT(concurrency-mt-unsafe)
  return transport != nullptr ? transport : "socket";
}

class TwoProcessTest : public ::testing::Test {
 protected:
  // Forks the target first (no threads exist yet), then builds the local engine. A failure here
  // is fatal to the test: call it as ASSERT_NO_FATAL_FAILURE(start(...)), so that a test whose
  // engines did not start ends instead of using them.
  void start(const std::vector<std::pair<std::string, std::string>>& target_extra = {},
             const std::vector<std::pair<std::string, std::string>>& local_extra = {}) {
    target_ = std::make_unique<ForkedPeer>("target", target_extra);
    ASSERT_FALSE(target_->connectionInfo().empty())
        << "target engine did not start: " << target_->startError();
    auto engine = Engine::create(testConfig("initiator", local_extra));
    ASSERT_TRUE(engine.isOk()) << engine.status().toString();
    engine_ = std::move(engine.value());
    ASSERT_TRUE(engine_->addPeer("target", target_->connectionInfo()).isOk());
    target_->addPeer("initiator", engine_->connectionInfo());
  }

  void TearDown() override {
    engine_.reset();
    target_.reset();
  }

  // Registers `size` bytes on the target and loads its descriptor here.
  RemoteMemory targetRegion(size_t size, uint64_t* target_id = nullptr) {
    const ForkedPeer::Region region = target_->registerMemory(size);
    auto remote = engine_->loadRemoteMemory(region.descriptor);
    EXPECT_TRUE(remote.isOk()) << remote.status().toString();
    if (target_id != nullptr) *target_id = region.id;
    return remote.isOk() ? remote.value() : RemoteMemory{};
  }

  MemoryId localRegion(const HostBuffer& buffer) {
    auto id = engine_->registerMemory(buffer.data(), buffer.size());
    EXPECT_TRUE(id.isOk()) << id.status().toString();
    return id.isOk() ? id.value() : 0;
  }

  // Prepares, posts and waits for one transfer; releases the handle.
  Status run(OpKind op, const std::vector<LocalDesc>& local, const std::vector<RemoteDesc>& remote,
             std::optional<std::string> notification = std::nullopt,
             std::chrono::milliseconds timeout = 60s) {
    auto h = engine_->prepareTransfer(op, "target", local, remote, std::move(notification));
    if (!h.isOk()) return h.status();
    Status st = engine_->postTransfer(h.value());
    if (st.isOk()) st = engine_->waitTransfer(h.value(), timeout);
    (void)engine_->releaseTransfer(h.value());
    return st;
  }

  // As run, but polling checkTransfer as an application's event loop would (a polling caller
  // may take the reply of a small host transfer itself: EngineCore::takeRepliesFromCaller).
  Status runPolled(OpKind op, const std::vector<LocalDesc>& local,
                   const std::vector<RemoteDesc>& remote,
                   std::optional<std::string> notification = std::nullopt,
                   std::chrono::milliseconds timeout = 60s) {
    auto h = engine_->prepareTransfer(op, "target", local, remote, std::move(notification));
    if (!h.isOk()) return h.status();
    Status st = engine_->postTransfer(h.value());
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (st.isOk()) {
      st = engine_->checkTransfer(h.value());
      if (st.code() != StatusCode::kInProgress) break;
      st = std::chrono::steady_clock::now() > deadline
               ? Status(StatusCode::kTimeout, "still in progress after the test's timeout")
               : Status();
    }
    (void)engine_->releaseTransfer(h.value());
    return st;
  }

  // A WRITE of `size` bytes to the target and a READ of other bytes back, every byte checked.
  void roundTrip(size_t size) {
    uint64_t target_mem = 0;
    const RemoteMemory remote = targetRegion(size, &target_mem);
    HostBuffer local(size);
    const MemoryId local_mem = localRegion(local);
    const uint64_t seed = tools::randomSeed();
    fillPattern(local.data(), size, seed);
    ASSERT_TRUE(run(OpKind::kWrite, {{local_mem, 0, size}}, {{remote.id, 0, size}}).isOk());
    EXPECT_EQ(target_->check(target_mem, 0, size, seed), "ok");
    target_->fill(target_mem, 0, size, seed + 1);
    ASSERT_TRUE(run(OpKind::kRead, {{local_mem, 0, size}}, {{remote.id, 0, size}}).isOk());
    EXPECT_EQ(checkPattern(local.data(), size, seed + 1), -1);
  }

  // Registers `size` bytes on the target (GPU `device`, or host memory when device < 0) and
  // loads the descriptor here.
  // `how` (GPU memory): "" cudaMalloc, "vmm" or "vmm-private" (the peer's REGISTER_GPU).
  RemoteMemory targetMemory(int device, size_t size, uint64_t* id, const std::string& how = "") {
    const std::string answer =
        device < 0 ? target_->call("REGISTER " + std::to_string(size))
                   : target_->call(strfmt("REGISTER_GPU %zu %d %s", size, device, how.c_str()));
    std::istringstream in(answer);
    std::string desc;
    in >> *id >> desc;
    auto remote =
        engine_->loadRemoteMemory(fromHex(desc.substr(desc.empty() ? 0 : 1)).value_or(""));
    EXPECT_TRUE(remote.isOk()) << answer;
    return remote.isOk() ? remote.value() : RemoteMemory{};
  }

  static std::unique_ptr<tools::PatternMemory> localMemory(
      int device, size_t size, tools::GpuAllocation how = tools::GpuAllocation::kRuntime) {
    auto m =
        device < 0 ? tools::makeHostMemory(size) : tools::makeGpuMemory(size, device, 0xA5, how);
    EXPECT_TRUE(m != nullptr);
    return m;
  }

  MemoryId registerLocal(const tools::PatternMemory& m) {
    auto id = engine_->registerMemory(m.data(), m.size(), m.kind(), m.device());
    EXPECT_TRUE(id.isOk()) << id.status().toString();
    return id.isOk() ? id.value() : 0;
  }

  // Four disjoint quarters on each side, all moving at once in 1 MiB descriptors so that chunks
  // of four transfers interleave on every channel:
  //   ours:   L0 written by the target, L1 read by the target, L2 our WRITE source, L3 our READ
  //           destination;
  //   target: T0 its WRITE source, T1 its READ destination, T2 our WRITE destination, T3 our
  //           READ source.
  void checkReadsAndWritesBothWaysAtOnce(int local_device, int target_device) {
    constexpr size_t kQ = 16u << 20;
    uint64_t target_mem = 0;
    const RemoteMemory remote = targetMemory(target_device, 4 * kQ, &target_mem);
    auto local = localMemory(local_device, 4 * kQ);
    const MemoryId local_mem = registerLocal(*local);
    const std::string loaded = target_->loadRemote(engine_->memoryDescriptor(local_mem).value());
    ASSERT_EQ(loaded.rfind("OK ", 0), 0u) << loaded;
    const std::string ours = loaded.substr(3);
    const std::string tmem = std::to_string(target_mem);
    const uint64_t s0 = tools::randomSeed(), s1 = tools::randomSeed(), s2 = tools::randomSeed(),
                   s3 = tools::randomSeed();
    target_->fill(target_mem, 0, kQ, s0);
    target_->fill(target_mem, 3 * kQ, kQ, s3);
    local->fill(kQ, kQ, s1);
    local->fill(2 * kQ, kQ, s2);
    const std::string blocks = " 1048576 " + std::to_string(kQ >> 20) + " -";
    ASSERT_EQ(target_->call("XFER_ASYNC W initiator " + tmem + " 0 " + ours + " 0" + blocks),
              "started " + std::to_string(async_++));
    ASSERT_EQ(target_->call("XFER_ASYNC R initiator " + tmem + " " + std::to_string(kQ) + " " +
                            ours + " " + std::to_string(kQ) + blocks),
              "started " + std::to_string(async_++));
    Status w, r;
    std::thread writer([&] {
      w = run(OpKind::kWrite, {{local_mem, 2 * kQ, kQ}}, {{remote.id, 2 * kQ, kQ}});
    });
    std::thread reader([&] {
      r = run(OpKind::kRead, {{local_mem, 3 * kQ, kQ}}, {{remote.id, 3 * kQ, kQ}});
    });
    writer.join();
    reader.join();
    EXPECT_TRUE(w.isOk()) << w.toString();
    EXPECT_TRUE(r.isOk()) << r.toString();
    // The target's transfers end before `local` may go, failed or not.
    EXPECT_EQ(target_->call("WAIT_ASYNC " + std::to_string(async_ - 2)), "OK");
    EXPECT_EQ(target_->call("WAIT_ASYNC " + std::to_string(async_ - 1)), "OK");
    EXPECT_EQ(local->check(0, kQ, s0), -1);
    EXPECT_EQ(target_->check(target_mem, kQ, kQ, s1), "ok");
    EXPECT_EQ(target_->check(target_mem, 2 * kQ, kQ, s2), "ok");
    EXPECT_EQ(local->check(3 * kQ, kQ, s3), -1);
    // A same-host target may map GPU memory: deregistration waits until it let go.
    EXPECT_TRUE(engine_->deregisterMemory(local_mem).isOk());
  }

  // `rounds` WRITEs of `size` bytes of memory on `local_device` (-1: host) into the target's
  // memory on `target_device`, each with a notification: the target looks at its memory as soon
  // as it sees the notification, and finds the bytes in place.
  void checkNotificationsFollowTheBytes(int local_device, int target_device, size_t size,
                                        int rounds) {
    uint64_t target_mem = 0;
    const RemoteMemory remote = targetMemory(target_device, size, &target_mem);
    auto local = localMemory(local_device, size);
    const MemoryId mem = registerLocal(*local);
    for (int round = 0; round < rounds; ++round) {
      const uint64_t seed = tools::randomSeed();
      local->fill(0, size, seed);
      const std::string note = "kv-ready-" + std::to_string(round);
      auto h =
          engine_->prepareTransfer(OpKind::kWrite, "target", std::vector<LocalDesc>{{mem, 0, size}},
                                   std::vector<RemoteDesc>{{remote.id, 0, size}}, note);
      ASSERT_TRUE(h.isOk());
      ASSERT_TRUE(engine_->postTransfer(h.value()).isOk());
      const auto notes = target_->notifications(1, 30s);
      ASSERT_EQ(notes.size(), 1u);
      EXPECT_EQ(notes[0].message, note);
      EXPECT_EQ(target_->check(target_mem, 0, size, seed), "ok");
      EXPECT_TRUE(engine_->waitTransfer(h.value(), 30s).isOk());
      (void)engine_->releaseTransfer(h.value());
    }
    ASSERT_TRUE(engine_->deregisterMemory(mem).isOk());
  }

#if TCPX_P2P_HAVE_CUDA
  // A WRITE of `size` bytes of our GPU memory that a kernel on the default stream still writes
  // (the pattern of `seed`, after `kernel_ms`) into `size` bytes of the target's GPU memory.
  struct WriteOfPendingBytes {
    uint64_t target_mem = 0;
    RemoteMemory remote;
    std::unique_ptr<tools::PatternMemory> kernel_input;
    std::unique_ptr<tools::PatternMemory> source;  // registered as `mem`; the kernel writes it
    MemoryId mem{};
    uint64_t seed = 0;
    std::vector<LocalDesc> local;
    std::vector<RemoteDesc> there;
  };
  WriteOfPendingBytes writeOfPendingBytes(size_t size, double kernel_ms) {
    WriteOfPendingBytes w;
    w.remote = targetMemory(0, size, &w.target_mem);
    w.kernel_input = localMemory(0, size);
    w.source = localMemory(0, size);
    w.mem = registerLocal(*w.source);
    w.seed = tools::randomSeed();
    w.kernel_input->fill(0, size, w.seed);
    cudaSetDevice(0);
    EXPECT_TRUE(launchDelayedCopy(w.kernel_input->data(), w.source->data(), size, kernel_ms));
    w.local = {{w.mem, 0, size}};
    w.there = {{w.remote.id, 0, size}};
    return w;
  }

  // The application's GPU work still running on the default stream when a transfer is posted
  // (on our side) or when its request arrives (on the target) comes before every copy the engine
  // makes of that memory, reads and writes alike: a delayed kernel writes its bytes after 200 ms,
  // and the transfer must see (or overwrite) them, never race them: our WRITE and READ of
  // `size` bytes of GPU memory, a READ of the target's GPU memory and a WRITE into it.
  void checkGpuWorkComesFirst(size_t size) {
    uint64_t target_mem = 0;
    const RemoteMemory remote = targetMemory(0, size, &target_mem);
    const std::string tmem = std::to_string(target_mem);
    auto local = localMemory(0, size);
    auto kernel_input = localMemory(0, size);  // what our own kernel copies into `local`
    const MemoryId mem = registerLocal(*local);
    const std::vector<LocalDesc> here{{mem, 0, size}};
    const std::vector<RemoteDesc> there{{remote.id, 0, size}};
    cudaSetDevice(0);

    // Our WRITE of memory our kernel is still writing: the WRITE sends the kernel's bytes.
    const uint64_t ours = tools::randomSeed();
    kernel_input->fill(0, size, ours);
    ASSERT_TRUE(launchDelayedCopy(kernel_input->data(), local->data(), size, 200.0));
    ASSERT_TRUE(run(OpKind::kWrite, here, there).isOk());
    EXPECT_EQ(target_->check(target_mem, 0, size, ours), "ok") << "our WRITE";

    // Our READ into memory our kernel is still writing: the READ's bytes land after it.
    const uint64_t read_seed = tools::randomSeed();
    target_->fill(target_mem, 0, size, read_seed);
    kernel_input->fill(0, size, tools::randomSeed());
    ASSERT_TRUE(launchDelayedCopy(kernel_input->data(), local->data(), size, 200.0));
    ASSERT_TRUE(run(OpKind::kRead, here, there).isOk());
    EXPECT_EQ(local->check(0, size, read_seed), -1) << "our READ";

    // A READ of target memory the target's kernel is still writing: we get the kernel's bytes.
    const uint64_t kernel_seed = tools::randomSeed();
    ASSERT_EQ(target_->call(strfmt("DELAYED_FILL %s 0 %zu %llu 200", tmem.c_str(), size,
                                   static_cast<unsigned long long>(kernel_seed))),
              "ok");
    ASSERT_TRUE(run(OpKind::kRead, here, there).isOk());
    EXPECT_EQ(local->check(0, size, kernel_seed), -1) << "READ of the target's kernel output";

    // A WRITE into target memory the target's kernel is still writing: the WRITE lands after it.
    const uint64_t write_seed = tools::randomSeed();
    local->fill(0, size, write_seed);
    ASSERT_EQ(target_->call(strfmt("DELAYED_FILL %s 0 %zu %llu 200", tmem.c_str(), size,
                                   static_cast<unsigned long long>(tools::randomSeed()))),
              "ok");
    ASSERT_TRUE(run(OpKind::kWrite, here, there).isOk());
    EXPECT_EQ(target_->check(target_mem, 0, size, write_seed), "ok") << "WRITE into the target";
    cudaDeviceSynchronize();
    ASSERT_TRUE(engine_->deregisterMemory(mem).isOk());
  }
#endif

  std::unique_ptr<ForkedPeer> target_;
  std::unique_ptr<Engine> engine_;
  size_t async_ = 0;  // next async token the target will hand out
};

}  // namespace tcpx::testing
