// Direct copies of GPU memory between two processes on one host (same_host_copy=auto, CUDA
// IPC, and its shareable-handle route for memory of the CUDA VMM API): every direction with GPU
// memory on the side that is read, byte for byte; the caller's
// GPU work on both sides comes first; the lifecycle of mappings (a deregistration unmaps the
// allocation in the peer before it returns, removing a peer and a killed peer leave nothing
// mapped). Without a GPU every test skips with the reason.
#include <signal.h>

#include <chrono>
#include <filesystem>
#include <functional>
#include <gtest/gtest.h>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "common/pattern_memory.h"
#include "common/strings.h"
#include "e2e/e2e_fixture.h"
#include "gpu/gpu.h"

namespace tcpx::testing {
namespace {

using tools::gpuCount;
using tools::gpuUnavailableReason;

const std::vector<std::pair<std::string, std::string>> kDirect{{"same_host_copy", "auto"}};

// This process's open descriptors and what each points to.
std::map<std::string, std::string> openDescriptors() {
  std::map<std::string, std::string> out;
  std::error_code ec;
  for (auto it = std::filesystem::directory_iterator("/proc/self/fd", ec);
       !ec && it != std::filesystem::directory_iterator(); it.increment(ec)) {
    std::error_code link_ec;
    out[it->path().filename().string()] = std::filesystem::read_symlink(it->path(), link_ec);
  }
  return out;
}

// The descriptors of `now` that `before` did not have, as "fd -> target" lines.
std::string newDescriptors(const std::map<std::string, std::string>& before,
                           const std::map<std::string, std::string>& now) {
  std::string out;
  for (const auto& [fd, target] : now) {
    auto it = before.find(fd);
    if (it == before.end() || it->second != target) {
      out += strfmt("%s -> %s\n", fd.c_str(), target.c_str());
    }
  }
  return out;
}

class DirectGpuTest : public TwoProcessTest {
 protected:
  void SetUp() override {
    if (gpuCount() == 0) GTEST_SKIP() << "GPU test skipped: " << gpuUnavailableReason();
  }
  uint64_t directRuns() {
    auto stats = engine_->peerStats("target");
    EXPECT_TRUE(stats.isOk()) << stats.status().toString();
    return stats.isOk() ? stats->direct_runs : 0;
  }
  int64_t targetMappings() { return std::stoll(target_->call("IPC_MAPPINGS")); }
  // Whether the driver offers the VMM API.
  static bool vmmOffered() {
    return tools::makeGpuMemory(1, 0, 0, tools::GpuAllocation::kVmmSplit) != nullptr;
  }
  // Starts both engines with direct copies and `name`=`value`.
  void startWith(const std::string& name, const std::string& value) {
    const std::vector<std::pair<std::string, std::string>> settings{{"same_host_copy", "auto"},
                                                                    {name, value}};
    ASSERT_NO_FATAL_FAILURE(start(settings, settings));
  }
  // A WRITE of `size` bytes from `local` (registered as `mem`) into the target's memory, then a
  // READ of other bytes back from it, at odd offsets, each checked byte for byte;
  // `after_write` runs between the two.
  void writeThenRead(
      tools::PatternMemory* local, MemoryId mem, const RemoteMemory& remote, uint64_t target_mem,
      size_t size, const std::function<void()>& after_write = [] {}) {
    const uint64_t seed = tools::randomSeed();
    local->fill(17, size, seed);
    ASSERT_TRUE(run(OpKind::kWrite, {{mem, 17, size}}, {{remote.id, 4001, size}}).isOk());
    EXPECT_EQ(target_->check(target_mem, 4001, size, seed), "ok");
    after_write();
    target_->fill(target_mem, 3, size, seed + 1);
    ASSERT_TRUE(run(OpKind::kRead, {{mem, 4095, size}}, {{remote.id, 3, size}}).isOk());
    EXPECT_EQ(local->check(4095, size, seed + 1), -1);
  }
};

TEST_F(DirectGpuTest, GpuMemoryMovesByCudaIpcInEveryDirectionThatReadsIt) {
  ASSERT_NO_FATAL_FAILURE(start(kDirect, kDirect));
  // (ours, the target's): -1 host memory, 0 GPU 0. A WRITE is direct when our source is GPU
  // memory, a READ when the target's is; host memory read into GPU memory takes the channels.
  struct Case {
    int local;
    int target;
    bool write_direct;
    bool read_direct;
  };
  for (const Case c :
       {Case{0, 0, true, true}, Case{0, -1, true, false}, Case{-1, 0, false, true}}) {
    for (size_t size : {size_t{65537}, (size_t{1} << 20) + 3, size_t{64} << 20}) {
      SCOPED_TRACE(strfmt("ours %d, target's %d, %zu bytes", c.local, c.target, size));
      uint64_t target_mem = 0;
      const RemoteMemory remote = targetMemory(c.target, size + 4096, &target_mem);
      auto local = localMemory(c.local, size + 4096);
      const MemoryId mem = registerLocal(*local);
      const uint64_t before = directRuns();
      writeThenRead(local.get(), mem, remote, target_mem, size);
      EXPECT_EQ(directRuns() - before,
                static_cast<uint64_t>(c.write_direct) + static_cast<uint64_t>(c.read_direct));
      ASSERT_TRUE(engine_->deregisterMemory(mem).isOk());
      EXPECT_EQ(target_->call("DEREGISTER " + std::to_string(target_mem)), "OK");
    }
  }
  // Many blocks scattered on both sides (one allocation each).
  constexpr size_t kBlock = 16384;
  constexpr size_t kBlocks = 1024;
  uint64_t target_mem = 0;
  const RemoteMemory remote = targetMemory(0, 2 * kBlock * kBlocks, &target_mem);
  auto local = localMemory(0, kBlock * kBlocks);
  const MemoryId mem = registerLocal(*local);
  const uint64_t seed = tools::randomSeed();
  local->fill(0, kBlock * kBlocks, seed);
  std::vector<LocalDesc> ours;
  std::vector<RemoteDesc> theirs;
  for (size_t i = 0; i < kBlocks; ++i) {
    ours.push_back({mem, i * kBlock, kBlock});
    theirs.push_back({remote.id, (kBlocks - 1 - i) * 2 * kBlock, kBlock});
  }
  const uint64_t before = directRuns();
  ASSERT_TRUE(run(OpKind::kWrite, ours, theirs).isOk());
  EXPECT_EQ(target_->call(strfmt("CHECK_BLOCKS %llu %zu %zu %llu",
                                 static_cast<unsigned long long>(target_mem), kBlock, kBlocks,
                                 static_cast<unsigned long long>(seed))),
            "ok");
  local->fillByte(0, kBlock * kBlocks, 0);
  ASSERT_TRUE(run(OpKind::kRead, ours, theirs).isOk());
  EXPECT_EQ(local->check(0, kBlock * kBlocks, seed), -1);
  EXPECT_EQ(directRuns() - before, 2u);
  EXPECT_TRUE(engine_->deregisterMemory(mem).isOk());  // the target let go of its mapping
}

// Memory of the CUDA VMM API (cuMemCreate, as PyTorch's expandable segments allocate it): with a
// file-descriptor handle type it moves by the shareable route (the reader duplicates the
// exporter's descriptor) in both directions; without it, it cannot be shared and takes the
// channels. A region of two allocations mapped one after the other registers whole and is
// shared allocation by allocation: a transfer over the boundary is direct too, the peer mapping
// both. Every byte lands; deregistrations unmap them in the peer and close the exported
// descriptors.
TEST_F(DirectGpuTest, VmmMemoryMovesByItsShareableHandleAndWithoutOneTakesTheChannels) {
  if (tools::makeGpuMemory(1, 0, 0, tools::GpuAllocation::kVmmShareable) == nullptr) {
    GTEST_SKIP() << "GPU test skipped: the CUDA driver does not offer the VMM API";
  }
  ASSERT_NO_FATAL_FAILURE(start(kDirect, kDirect));
  struct Kind {
    tools::GpuAllocation how;
    const char* peer_how;  // the test peer's name for it
    bool shareable;
  };
  // Descriptors once the first round is over (connections, I/O threads and CUDA's own set
  // up): every later round must end with the same ones.
  std::optional<std::map<std::string, std::string>> settled;
  for (const Kind kind : {Kind{tools::GpuAllocation::kVmmShareable, "vmm", true},
                          Kind{tools::GpuAllocation::kVmmPrivate, "vmm-private", false},
                          Kind{tools::GpuAllocation::kVmmSplit, "vmm-split", true}}) {
    for (size_t size : {size_t{65537}, (size_t{1} << 20) + 3, size_t{64} << 20}) {
      SCOPED_TRACE(strfmt("%s, %zu bytes", kind.peer_how, size));
      // Transfers under 4 MiB stay inside the first allocation of a split region; 64 MiB
      // spans both.
      const bool shared = kind.shareable;
      const bool spans = kind.how == tools::GpuAllocation::kVmmSplit && size >= (size_t{4} << 20);
      const int64_t mapped = shared ? (spans ? 2 : 1) : 0;
      uint64_t target_mem = 0;
      const RemoteMemory remote = targetMemory(0, size + 4096, &target_mem, kind.peer_how);
      auto local = localMemory(0, size + 4096, kind.how);
      const MemoryId mem = registerLocal(*local);
      const uint64_t before = directRuns();
      writeThenRead(local.get(), mem, remote, target_mem, size,
                    [&] { EXPECT_EQ(targetMappings(), mapped) << "the target maps our source"; });
      EXPECT_EQ(gpu::IpcMapping::openCount(), mapped) << "we map the target's source";
      EXPECT_EQ(directRuns() - before, shared ? 2u : 0u);
      ASSERT_TRUE(engine_->deregisterMemory(mem).isOk());
      EXPECT_EQ(targetMappings(), 0) << "still mapped in the target after deregistration";
      EXPECT_EQ(target_->call("DEREGISTER " + std::to_string(target_mem)), "OK");
      EXPECT_EQ(gpu::IpcMapping::openCount(), 0) << "still mapped here after its deregistration";
      const auto fds = openDescriptors();
      if (!settled) {
        settled = fds;
      } else {
        EXPECT_EQ(fds.size(), settled->size()) << "exported or duplicated descriptors left open:\n"
                                               << newDescriptors(*settled, fds);
      }
    }
  }
}

// Ranges cut at allocation boundaries are more pieces than the transfer's descriptors: a peer
// that accepts fewer in one frame (max_descriptors) gets no direct request it would refuse as
// malformed; the transfer takes the channels, lands, and the connection stays up.
TEST_F(DirectGpuTest, VmmRangesCutIntoMorePiecesThanThePeerAcceptsTakeTheChannels) {
  if (!vmmOffered()) GTEST_SKIP() << "GPU test skipped: the CUDA driver does not offer the VMM API";
  ASSERT_NO_FATAL_FAILURE(startWith("max_descriptors", "1"));
  constexpr size_t kSize = size_t{64} << 20;
  uint64_t target_mem = 0;
  const RemoteMemory remote = targetMemory(0, kSize + 4096, &target_mem, "vmm-split");
  auto local = localMemory(0, kSize + 4096, tools::GpuAllocation::kVmmSplit);
  const MemoryId mem = registerLocal(*local);
  writeThenRead(local.get(), mem, remote, target_mem, kSize);
  EXPECT_EQ(directRuns(), 0u) << "two pieces each way, one accepted";
  writeThenRead(local.get(), mem, remote, target_mem, size_t{1} << 20);
  EXPECT_EQ(directRuns(), 2u) << "inside one allocation: direct again";
  ASSERT_TRUE(engine_->deregisterMemory(mem).isOk());
  EXPECT_EQ(target_->call("DEREGISTER " + std::to_string(target_mem)), "OK");
}

// ipc_mappings_per_peer bounds the peer's allocations kept mapped: past it the least recently
// used idle mapping is released, on both sides, and the next transfer still goes direct. A
// transfer needing more mappings at once than the bound takes the channels, and only that one:
// the next goes direct again both ways.
TEST_F(DirectGpuTest, PastTheMappingBoundTheLeastRecentlyUsedIdleMappingIsReleased) {
  if (!vmmOffered()) GTEST_SKIP() << "GPU test skipped: the CUDA driver does not offer the VMM API";
  ASSERT_NO_FATAL_FAILURE(startWith("ipc_mappings_per_peer", "1"));
  constexpr size_t kRegion = (16u << 20) + 4096;  // two allocations of 10 MiB
  constexpr size_t kMiB = size_t{1} << 20;
  uint64_t target_mem = 0;
  const RemoteMemory remote = targetMemory(0, kRegion, &target_mem, "vmm-split");
  auto local = localMemory(0, kRegion, tools::GpuAllocation::kVmmSplit);
  const MemoryId mem = registerLocal(*local);
  // A WRITE and a READ of `size` bytes at `offset` on both sides, each checked.
  auto both = [&](size_t offset, size_t size) {
    SCOPED_TRACE(strfmt("%zu bytes at %zu", size, offset));
    const uint64_t seed = tools::randomSeed();
    local->fill(offset, size, seed);
    ASSERT_TRUE(run(OpKind::kWrite, {{mem, offset, size}}, {{remote.id, offset, size}}).isOk());
    EXPECT_EQ(target_->check(target_mem, offset, size, seed), "ok");
    target_->fill(target_mem, offset, size, seed + 1);
    ASSERT_TRUE(run(OpKind::kRead, {{mem, offset, size}}, {{remote.id, offset, size}}).isOk());
    EXPECT_EQ(local->check(offset, size, seed + 1), -1);
  };
  both(5, kMiB);  // the first allocations
  EXPECT_EQ(targetMappings(), 1);
  EXPECT_EQ(gpu::IpcMapping::openCount(), 1);
  both(11 * kMiB, kMiB);  // the second ones: the first are released
  EXPECT_EQ(targetMappings(), 1);
  EXPECT_EQ(gpu::IpcMapping::openCount(), 1);
  both(7, kMiB);  // back to the first
  EXPECT_EQ(directRuns(), 6u);
  both(9 * kMiB, 3 * kMiB);  // across the boundary: two at once, more than the bound
  EXPECT_EQ(directRuns(), 6u) << "needing two mappings at once, it took the channels";
  both(3, kMiB);
  EXPECT_EQ(directRuns(), 8u) << "a refusal for want of mappings disabled direct copies";
  ASSERT_TRUE(engine_->deregisterMemory(mem).isOk());
  EXPECT_EQ(targetMappings(), 0);
  EXPECT_EQ(target_->call("DEREGISTER " + std::to_string(target_mem)), "OK");
  EXPECT_EQ(gpu::IpcMapping::openCount(), 0);
}

// A WRITE small enough to travel inline from GPU memory into GPU memory is a direct copy: inline,
// it would be copied into a slot on one side and out of one on the other. Small READs, and small
// WRITEs with host memory on one side, stay inline.
TEST_F(DirectGpuTest, SmallGpuToGpuWritesAreDirectCopiesAndOtherSmallTransfersTravelInline) {
  ASSERT_NO_FATAL_FAILURE(start(kDirect, kDirect));
  for (const auto& [local_device, target_device] : {std::pair{0, 0}, {0, -1}, {-1, 0}}) {
    for (size_t size : {size_t{1}, size_t{4096}, size_t{4099}, size_t{64} << 10}) {
      SCOPED_TRACE(strfmt("ours %d, target's %d, %zu bytes", local_device, target_device, size));
      uint64_t target_mem = 0;
      const RemoteMemory remote = targetMemory(target_device, size + 8192, &target_mem);
      auto local = localMemory(local_device, size + 8192);
      const MemoryId mem = registerLocal(*local);
      const uint64_t before = directRuns();
      writeThenRead(local.get(), mem, remote, target_mem, size);
      EXPECT_EQ(directRuns() - before, local_device == 0 && target_device == 0 ? 1u : 0u);
      ASSERT_TRUE(engine_->deregisterMemory(mem).isOk());
      EXPECT_EQ(target_->call("DEREGISTER " + std::to_string(target_mem)), "OK");
    }
  }
}

// Peers configured differently: when either side turns direct copies off, a small GPU-to-GPU
// WRITE (direct between two that both offer them) travels inline, and a large one over the
// channels, every byte in place.
TEST_F(DirectGpuTest, WithDirectCopiesOffOnEitherSideGpuWritesTakeTheConnection) {
  const std::vector<std::pair<std::string, std::string>> off{{"same_host_copy", "off"}};
  for (const bool target_off : {true, false}) {
    SCOPED_TRACE(target_off ? "the target's direct copies off" : "ours off");
    ASSERT_NO_FATAL_FAILURE(start(target_off ? off : kDirect, target_off ? kDirect : off));
    for (size_t size : {size_t{4096}, size_t{4} << 20}) {
      SCOPED_TRACE(strfmt("%zu bytes", size));
      uint64_t target_mem = 0;
      const RemoteMemory remote = targetMemory(0, size + 8192, &target_mem);
      auto local = localMemory(0, size + 8192);
      const MemoryId mem = registerLocal(*local);
      writeThenRead(local.get(), mem, remote, target_mem, size);
      ASSERT_TRUE(engine_->deregisterMemory(mem).isOk());
      EXPECT_EQ(target_->call("DEREGISTER " + std::to_string(target_mem)), "OK");
    }
    EXPECT_EQ(directRuns(), 0u);
    engine_.reset();
    target_.reset();
  }
}

#if TCPX_P2P_HAVE_CUDA
// A direct WRITE waiting for its source's fence has announced nothing and nothing reads its
// memory yet: released, it is dropped at once, the target's memory stays untouched, and the
// next WRITE goes direct.
TEST_F(DirectGpuTest, ADirectWriteReleasedWhileItsFenceWaitsIsDroppedAtOnce) {
  ASSERT_NO_FATAL_FAILURE(start(kDirect, kDirect));
  ASSERT_TRUE(engine_->connect("target").isOk());
  constexpr size_t kSize = 4096;
  const uint64_t before = directRuns();
  const WriteOfPendingBytes w = writeOfPendingBytes(kSize, 1000.0);
  auto h = engine_->prepareTransfer(OpKind::kWrite, "target", w.local, w.there);
  ASSERT_TRUE(h.isOk()) << h.status().toString();
  const auto begin = std::chrono::steady_clock::now();
  ASSERT_TRUE(engine_->postTransfer(h.value()).isOk());
  std::this_thread::sleep_for(100ms);
  EXPECT_EQ(engine_->checkTransfer(h.value()).code(), StatusCode::kInProgress);
  ASSERT_TRUE(engine_->releaseTransfer(h.value()).isOk());
  EXPECT_LT(std::chrono::steady_clock::now() - begin, 600ms) << "the release waited for the kernel";
  cudaDeviceSynchronize();
  EXPECT_EQ(target_->checkByte(w.target_mem, 0, kSize, kPoison), "ok");
  ASSERT_TRUE(run(OpKind::kWrite, w.local, w.there).isOk());
  EXPECT_EQ(target_->check(w.target_mem, 0, kSize, w.seed), "ok");
  EXPECT_EQ(directRuns() - before, 1u) << "the released WRITE counted, or the next was not direct";
  ASSERT_TRUE(engine_->deregisterMemory(w.mem).isOk());
}
#endif

// Transfers start in the progress thread's pass over the peers, after the round polled the
// fences of direct copies. A WRITE whose fence was still to be polled then waited for the loop's
// one-second idle timer before its request left, every time; its fence is looked at at once now,
// and polled from that round on while it has not passed. Twenty 1 MiB copies take milliseconds.
TEST_F(DirectGpuTest, DirectGpuTransfersLeaveWithoutWaitingForTheIdleTimer) {
  ASSERT_NO_FATAL_FAILURE(start(kDirect, kDirect));
  constexpr size_t kSize = size_t{1} << 20;
  constexpr int kRounds = 10;
  uint64_t target_mem = 0;
  const RemoteMemory remote = targetMemory(0, kSize, &target_mem);
  auto local = localMemory(0, kSize);
  const MemoryId mem = registerLocal(*local);
  const uint64_t before = directRuns();
  std::chrono::steady_clock::duration in_transfers{};
  for (int i = 0; i < kRounds; ++i) {
    const uint64_t seed = tools::randomSeed();
    local->fill(0, kSize, seed);
    auto began = std::chrono::steady_clock::now();
    ASSERT_TRUE(run(OpKind::kWrite, {{mem, 0, kSize}}, {{remote.id, 0, kSize}}).isOk());
    in_transfers += std::chrono::steady_clock::now() - began;
    ASSERT_EQ(target_->check(target_mem, 0, kSize, seed), "ok");
    target_->fill(target_mem, 0, kSize, seed + 1);
    began = std::chrono::steady_clock::now();
    ASSERT_TRUE(run(OpKind::kRead, {{mem, 0, kSize}}, {{remote.id, 0, kSize}}).isOk());
    in_transfers += std::chrono::steady_clock::now() - began;
    ASSERT_EQ(local->check(0, kSize, seed + 1), -1);
  }
  EXPECT_EQ(directRuns() - before, 2u * kRounds);
  EXPECT_LT(in_transfers, std::chrono::seconds(4))
      << "the transfers took "
      << std::chrono::duration_cast<std::chrono::milliseconds>(in_transfers).count() << " ms";
  ASSERT_TRUE(engine_->deregisterMemory(mem).isOk());
  EXPECT_EQ(target_->call("DEREGISTER " + std::to_string(target_mem)), "OK");
}

#if TCPX_P2P_HAVE_CUDA
// A fence that has not passed when a direct operation meets it (our WRITE's source, the target's
// READ source) is polled until it passes: the transfer follows the kernel within milliseconds,
// never after the loop's one-second idle timer.
TEST_F(DirectGpuTest, AFenceStillPendingIsPolledAndTheTransferFollowsTheKernelAtOnce) {
  using std::chrono::milliseconds;
  using std::chrono::steady_clock;
  ASSERT_NO_FATAL_FAILURE(start(kDirect, kDirect));
  constexpr size_t kSize = size_t{1} << 20;
  constexpr double kKernelMs = 100.0;
  // A stall behind the idle timer ends about 900 ms after such a kernel.
  constexpr auto kBound = milliseconds(400);
  // Our WRITE of what our kernel is still writing: measured from the kernel's end, which a
  // thread of the test takes from an event recorded after it.
  const WriteOfPendingBytes w = writeOfPendingBytes(kSize, kKernelMs);
  cudaEvent_t kernel_done = nullptr;
  ASSERT_EQ(cudaEventCreateWithFlags(&kernel_done, cudaEventDisableTiming), cudaSuccess);
  ASSERT_EQ(cudaEventRecord(kernel_done, nullptr), cudaSuccess);
  steady_clock::time_point kernel_end;
  std::thread watcher([&] {
    cudaEventSynchronize(kernel_done);
    kernel_end = steady_clock::now();
  });
  const uint64_t before = directRuns();
  const Status wrote = run(OpKind::kWrite, w.local, w.there);
  const auto wrote_at = steady_clock::now();
  watcher.join();
  ASSERT_TRUE(wrote.isOk()) << wrote.toString();
  EXPECT_EQ(target_->check(w.target_mem, 0, kSize, w.seed), "ok");
  EXPECT_LT(wrote_at - kernel_end, kBound)
      << "the WRITE ended "
      << std::chrono::duration_cast<milliseconds>(wrote_at - kernel_end).count()
      << " ms after the kernel";

  // Our READ of what the target's kernel is still writing: its fence is the target's, polled
  // there before it answers. The kernel's end is not seen here: measured from the request.
  const uint64_t kernel_seed = tools::randomSeed();
  ASSERT_EQ(target_->call(strfmt(
                "DELAYED_FILL %llu 0 %zu %llu %d", static_cast<unsigned long long>(w.target_mem),
                kSize, static_cast<unsigned long long>(kernel_seed), static_cast<int>(kKernelMs))),
            "ok");
  const auto asked_at = steady_clock::now();
  ASSERT_TRUE(run(OpKind::kRead, w.local, w.there).isOk());
  const auto read_in = steady_clock::now() - asked_at;
  EXPECT_EQ(w.source->check(0, kSize, kernel_seed), -1);
  EXPECT_LT(read_in, milliseconds(static_cast<int>(kKernelMs)) + kBound)
      << "the READ took " << std::chrono::duration_cast<milliseconds>(read_in).count() << " ms";
  EXPECT_EQ(directRuns() - before, 2u) << "both transfers were direct copies";
  cudaEventDestroy(kernel_done);
  cudaDeviceSynchronize();
  ASSERT_TRUE(engine_->deregisterMemory(w.mem).isOk());
  EXPECT_EQ(target_->call("DEREGISTER " + std::to_string(w.target_mem)), "OK");
}

TEST_F(DirectGpuTest, GpuWorkQueuedBeforeTheTransferOnEitherSideComesFirst) {
  ASSERT_NO_FATAL_FAILURE(start(kDirect, kDirect));
  checkGpuWorkComesFirst(size_t{8} << 20);
  EXPECT_EQ(directRuns(), 4u) << "every one of the four transfers was a direct copy";
}
#endif

TEST_F(DirectGpuTest, ReadsAndWritesOfGpuMemoryBothWaysAtOnceAndNotificationsAfterTheBytes) {
  ASSERT_NO_FATAL_FAILURE(start(kDirect, kDirect));
  checkReadsAndWritesBothWaysAtOnce(0, 0);
  EXPECT_GE(directRuns(), 2u);
  const uint64_t before = directRuns();
  checkNotificationsFollowTheBytes(0, 0, size_t{32} << 20, 3);
  EXPECT_EQ(directRuns() - before, 3u);
}

// A GPU-to-GPU WRITE ends for the initiator when the target's copy signal is reached
// (WRITE_QUEUED), before its WRITE_DONE arrives: the bytes must be in place then. The target
// checks them at once through its legacy default stream, which does not wait for the engine's
// copy stream: a signal reached before the copy landed shows as wrong bytes.
TEST_F(DirectGpuTest, GpuWritesEndOnTheTargetsCopySignalWithEveryByteInPlace) {
  ASSERT_NO_FATAL_FAILURE(start(kDirect, kDirect));
  constexpr size_t kSize = size_t{64} << 20;
  uint64_t target_mem = 0;
  const RemoteMemory remote = targetMemory(0, kSize + 4096, &target_mem);
  auto local = localMemory(0, kSize + 4096);
  const MemoryId mem = registerLocal(*local);
  auto signalled = [&] {
    auto stats = engine_->peerStats("target");
    EXPECT_TRUE(stats.isOk()) << stats.status().toString();
    return stats.isOk() ? stats->signalled_writes : 0;
  };
  constexpr int kRounds = 8;
  for (int round = 0; round < kRounds; ++round) {
    SCOPED_TRACE(strfmt("round %d", round));
    const uint64_t seed = tools::randomSeed();
    local->fill(round, kSize, seed);
    ASSERT_TRUE(run(OpKind::kWrite, {{mem, static_cast<uint64_t>(round), kSize}},
                    {{remote.id, 4096 - static_cast<uint64_t>(round), kSize}})
                    .isOk());
    EXPECT_EQ(target_->check(target_mem, 4096 - round, kSize, seed), "ok");
  }
  EXPECT_EQ(directRuns(), static_cast<uint64_t>(kRounds));
  // The copy takes tens of microseconds after WRITE_QUEUED left; WRITE_DONE comes after it, so
  // the signal is seen first nearly always.
  if (timingAsserted()) {
    EXPECT_GE(signalled(), 1u) << "no WRITE ended on its signal";
  }
  EXPECT_GE(gpu::PeerSignal::openCount(), 1);
  // The signals opened from the peer are closed with its connection.
  ASSERT_TRUE(engine_->removePeer("target").isOk());
  EXPECT_EQ(gpu::PeerSignal::openCount(), 0);
  ASSERT_TRUE(engine_->deregisterMemory(mem).isOk());
}

#if TCPX_P2P_HAVE_CUDA
// A target that dies while its copy of our WRITE still waits (behind its application's kernel):
// the copy's signal is never reached (the event of a killed process stays not ready; the
// initiator stops polling it once the answer's poll window closed and waits for WRITE_DONE), so
// the WRITE fails with the connection instead of completing.
TEST_F(DirectGpuTest, AGpuWriteWhoseTargetDiesBeforeItsCopyLandedFails) {
  ASSERT_NO_FATAL_FAILURE(start(kDirect, kDirect));
  constexpr size_t kSize = size_t{16} << 20;
  uint64_t target_mem = 0;
  const RemoteMemory remote = targetMemory(0, kSize, &target_mem);
  auto local = localMemory(0, kSize);
  const MemoryId mem = registerLocal(*local);
  // The signal is opened on the first WRITE; this one completes.
  ASSERT_TRUE(run(OpKind::kWrite, {{mem, 0, kSize}}, {{remote.id, 0, kSize}}).isOk());
  ASSERT_EQ(target_->call(strfmt("DELAYED_FILL %llu 0 %zu %llu 3000",
                                 static_cast<unsigned long long>(target_mem), kSize,
                                 static_cast<unsigned long long>(tools::randomSeed()))),
            "ok");
  auto h =
      engine_->prepareTransfer(OpKind::kWrite, "target", std::vector<LocalDesc>{{mem, 0, kSize}},
                               std::vector<RemoteDesc>{{remote.id, 0, kSize}}, std::nullopt);
  ASSERT_TRUE(h.isOk());
  ASSERT_TRUE(engine_->postTransfer(h.value()).isOk());
  std::this_thread::sleep_for(300ms);
  EXPECT_EQ(engine_->checkTransfer(h.value()).code(), StatusCode::kInProgress)
      << "the WRITE ended while the target's copy waited for its kernel";
  target_->kill(SIGKILL);
  const Status st = engine_->waitTransfer(h.value(), 10s);
  EXPECT_EQ(st.code(), StatusCode::kRemoteDisconnected) << st.toString();
  EXPECT_TRUE(engine_->releaseTransfer(h.value()).isOk());
  ASSERT_TRUE(engine_->removePeer("target").isOk());
  EXPECT_EQ(gpu::PeerSignal::openCount(), 0);
  EXPECT_EQ(gpu::IpcMapping::openCount(), 0);
  ASSERT_TRUE(engine_->deregisterMemory(mem).isOk());
}
#endif

#if TCPX_P2P_HAVE_CUDA
// A READ of GPU memory whose allocation the initiator mapped before is queued before its request
// leaves, behind a gate the target opens from its GPU once its own work queued before the
// request is done. Every READ after the first is gated; each sees the bytes the target wrote
// before it, also a kernel still writing when the request arrived; and two engines gating
// READs of each other at once do not wait for each other (a target's gate writes never queue
// behind its own gates), over many descriptors too.
TEST_F(DirectGpuTest, GatedReadsWaitForTheTargetsGpuWorkAndEndWithEveryByteInPlace) {
  ASSERT_NO_FATAL_FAILURE(start(kDirect, kDirect));
  constexpr size_t kSize = size_t{16} << 20;
  uint64_t target_mem = 0;
  const RemoteMemory remote = targetMemory(0, 2 * kSize, &target_mem);
  auto local = localMemory(0, 2 * kSize);
  const MemoryId mem = registerLocal(*local);
  auto gated = [&] {
    auto stats = engine_->peerStats("target");
    EXPECT_TRUE(stats.isOk()) << stats.status().toString();
    return stats.isOk() ? stats->gated_reads : 0;
  };
  uint64_t seed = tools::randomSeed();
  target_->fill(target_mem, 0, kSize, seed);
  ASSERT_TRUE(run(OpKind::kRead, {{mem, 0, kSize}}, {{remote.id, 0, kSize}}).isOk());
  EXPECT_EQ(local->check(0, kSize, seed), -1);
  EXPECT_EQ(gated(), 0u) << "the first READ has no mapping to gate";
  constexpr int kRounds = 8;
  for (int round = 0; round < kRounds; ++round) {
    SCOPED_TRACE(strfmt("round %d", round));
    seed = tools::randomSeed();
    const uint64_t there = 4099 * static_cast<uint64_t>(round + 1);
    const uint64_t here = kSize + 17 * static_cast<uint64_t>(round);
    target_->fill(target_mem, there, kSize - 65536, seed);
    ASSERT_TRUE(
        run(OpKind::kRead, {{mem, here, kSize - 65536}}, {{remote.id, there, kSize - 65536}})
            .isOk());
    EXPECT_EQ(local->check(here, kSize - 65536, seed), -1);
  }
  EXPECT_EQ(gated(), static_cast<uint64_t>(kRounds));
  // The target's kernel still writes when the request arrives: the gate opens after it.
  seed = tools::randomSeed();
  ASSERT_EQ(target_->call(strfmt("DELAYED_FILL %llu 0 %zu %llu 100",
                                 static_cast<unsigned long long>(target_mem), kSize,
                                 static_cast<unsigned long long>(seed))),
            "ok");
  ASSERT_TRUE(run(OpKind::kRead, {{mem, 0, kSize}}, {{remote.id, 0, kSize}}).isOk());
  EXPECT_EQ(local->check(0, kSize, seed), -1);
  EXPECT_EQ(gated(), static_cast<uint64_t>(kRounds) + 1);

  // Both ways at once, 16 descriptors each way: the target reads our second half while we read
  // its second half.
  const std::string loaded = target_->loadRemote(engine_->memoryDescriptor(mem).value());
  ASSERT_EQ(loaded.rfind("OK ", 0), 0u) << loaded;
  const std::string ours = loaded.substr(3);
  const std::string half = std::to_string(kSize);
  const std::string tmem = std::to_string(target_mem);
  const std::string blocks = " 1048576 16 -";
  for (int round = 0; round < 4; ++round) {
    SCOPED_TRACE(strfmt("both ways, round %d", round));
    const uint64_t theirs_seed = tools::randomSeed();
    const uint64_t ours_seed = tools::randomSeed();
    target_->fill(target_mem, kSize, kSize, theirs_seed);
    local->fill(0, kSize, ours_seed);
    // The target reads our first half into its first half; we read its second half.
    const std::string command =
        strfmt("XFER_ASYNC R initiator %s 0 %s 0%s", tmem.c_str(), ours.c_str(), blocks.c_str());
    ASSERT_EQ(target_->call(command), "started " + std::to_string(async_++));
    std::vector<LocalDesc> here;
    std::vector<RemoteDesc> there;
    for (uint64_t b = 0; b < 16; ++b) {
      here.push_back({mem, kSize + b * (1U << 20), 1U << 20});
      there.push_back({remote.id, kSize + b * (1U << 20), 1U << 20});
    }
    const Status read = run(OpKind::kRead, here, there);
    EXPECT_EQ(target_->call("WAIT_ASYNC " + std::to_string(async_ - 1)), "OK");
    ASSERT_TRUE(read.isOk()) << read.toString();
    EXPECT_EQ(local->check(kSize, kSize, theirs_seed), -1);
    EXPECT_EQ(target_->check(target_mem, 0, kSize, ours_seed), "ok");
  }
  EXPECT_GE(gated(), static_cast<uint64_t>(kRounds) + 2) << "the READs both ways were not gated";
  // The target's gates we wrote are mapped here until its connection ends.
  EXPECT_EQ(gpu::IpcMapping::gateCount(), 1) << "the target's READs of us were not gated";
  ASSERT_TRUE(engine_->removePeer("target").isOk());
  EXPECT_EQ(gpu::IpcMapping::gateCount(), 0);
  EXPECT_EQ(gpu::IpcMapping::openCount(), 0);
  ASSERT_TRUE(engine_->deregisterMemory(mem).isOk());
}

// A gated READ whose gate the target keeps closed (its kernel runs for seconds): released, it
// ends at once (the gate is opened here and never handed out again) and holds up no other copy
// of ours; the next READ still waits for the kernel and sees its bytes, and the target does not
// time it out for that wait (its READ_DONE deadline, shorter than the kernel here, starts once
// the gate is written); with the target killed, it fails with the connection, never OK, and
// nothing stays mapped.
TEST_F(DirectGpuTest, AGatedReadReleasedOrWhoseTargetDiesWhileItsGateIsClosedEnds) {
  ASSERT_NO_FATAL_FAILURE(startWith("data_timeout_ms", "1000"));
  constexpr size_t kSize = size_t{16} << 20;
  uint64_t target_mem = 0;
  const RemoteMemory remote = targetMemory(0, kSize, &target_mem);
  auto local = localMemory(0, kSize);
  const MemoryId mem = registerLocal(*local);
  ASSERT_TRUE(run(OpKind::kRead, {{mem, 0, kSize}}, {{remote.id, 0, kSize}}).isOk());
  auto postRead = [&] {
    auto h =
        engine_->prepareTransfer(OpKind::kRead, "target", std::vector<LocalDesc>{{mem, 0, kSize}},
                                 std::vector<RemoteDesc>{{remote.id, 0, kSize}}, std::nullopt);
    EXPECT_TRUE(h.isOk()) << h.status().toString();
    EXPECT_TRUE(engine_->postTransfer(h.value()).isOk());
    return h.value();
  };
  auto delayedFill = [&](uint64_t seed, int ms) {
    ASSERT_EQ(target_->call(strfmt("DELAYED_FILL %llu 0 %zu %llu %d",
                                   static_cast<unsigned long long>(target_mem), kSize,
                                   static_cast<unsigned long long>(seed), ms)),
              "ok");
  };
  // The engine as its own peer, its memory made and filled before the target's kernel runs
  // (our own allocations would wait for the GPU that kernel holds).
  ASSERT_TRUE(engine_->addPeer("self", engine_->connectionInfo()).isOk());
  auto own = localMemory(0, size_t{1} << 20);
  const MemoryId own_mem = registerLocal(*own);
  auto own_remote = engine_->loadRemoteMemory(engine_->memoryDescriptor(own_mem).value());
  ASSERT_TRUE(own_remote.isOk()) << own_remote.status().toString();
  const uint64_t own_seed = tools::randomSeed();
  own->fill(0, 4096, own_seed);
  // A WRITE of 4 KiB of our memory into another place of it, the engine to itself.
  auto selfWrite = [&](uint64_t to) {
    auto h =
        engine_->prepareTransfer(OpKind::kWrite, "self", std::vector<LocalDesc>{{own_mem, 0, 4096}},
                                 std::vector<RemoteDesc>{{own_remote->id, to, 4096}}, std::nullopt);
    if (!h.isOk()) return h.status();
    Status st = engine_->postTransfer(h.value());
    if (st.isOk()) st = engine_->waitTransfer(h.value(), 5s);
    EXPECT_TRUE(engine_->releaseTransfer(h.value()).isOk());
    return st;
  };
  ASSERT_TRUE(selfWrite(8192).isOk());
  const uint64_t seed = tools::randomSeed();
  delayedFill(seed, 2000);
  const uint64_t burned = gpu::ReadGates::burnedCount();
  const TransferHandle released = postRead();
  std::this_thread::sleep_for(300ms);
  EXPECT_EQ(engine_->checkTransfer(released).code(), StatusCode::kInProgress)
      << "the READ ended while the target's kernel ran";
  {
    // Meanwhile a GPU copy of the engine to itself is not held up behind the closed gate.
    const auto copy_begin = std::chrono::steady_clock::now();
    EXPECT_TRUE(selfWrite(65536).isOk());
    EXPECT_LT(std::chrono::steady_clock::now() - copy_begin, 500ms)
        << "a copy of our own waited behind the gated READ";
    EXPECT_EQ(engine_->checkTransfer(released).code(), StatusCode::kInProgress);
  }
  const auto begin = std::chrono::steady_clock::now();
  ASSERT_TRUE(engine_->releaseTransfer(released).isOk());
  EXPECT_LT(std::chrono::steady_clock::now() - begin, 600ms) << "the release waited for the kernel";
  EXPECT_EQ(gpu::ReadGates::burnedCount(), burned + 1);
  ASSERT_TRUE(run(OpKind::kRead, {{mem, 0, kSize}}, {{remote.id, 0, kSize}}).isOk());
  EXPECT_EQ(local->check(0, kSize, seed), -1) << "the READ after the release overtook the kernel";
  // Checked only now: reading GPU memory back waits for the GPU that the target's kernel held.
  EXPECT_EQ(own->check(65536, 4096, own_seed), -1);
  ASSERT_TRUE(engine_->removePeer("self").isOk());
  ASSERT_TRUE(engine_->deregisterMemory(own_mem).isOk());

  delayedFill(tools::randomSeed(), 3000);
  const TransferHandle doomed = postRead();
  std::this_thread::sleep_for(300ms);
  EXPECT_EQ(engine_->checkTransfer(doomed).code(), StatusCode::kInProgress);
  target_->kill(SIGKILL);
  const Status st = engine_->waitTransfer(doomed, 10s);
  EXPECT_EQ(st.code(), StatusCode::kRemoteDisconnected) << st.toString();
  EXPECT_TRUE(engine_->releaseTransfer(doomed).isOk());
  ASSERT_TRUE(engine_->removePeer("target").isOk());
  EXPECT_EQ(gpu::IpcMapping::openCount(), 0);
  ASSERT_TRUE(engine_->deregisterMemory(mem).isOk());
}
#endif

TEST_F(DirectGpuTest, DestroyingTheEngineUnmapsWhatItMapped) {
  ASSERT_NO_FATAL_FAILURE(start(kDirect, kDirect));
  constexpr size_t kSize = size_t{16} << 20;
  uint64_t target_mem = 0;
  const RemoteMemory remote = targetMemory(0, kSize, &target_mem);
  auto local = localMemory(0, kSize);
  const MemoryId mem = registerLocal(*local);
  ASSERT_TRUE(run(OpKind::kRead, {{mem, 0, kSize}}, {{remote.id, 0, kSize}}).isOk());
  ASSERT_TRUE(run(OpKind::kWrite, {{mem, 0, kSize}}, {{remote.id, 0, kSize}}).isOk());
  EXPECT_EQ(gpu::IpcMapping::openCount(), 1);
  engine_.reset();
  EXPECT_EQ(gpu::IpcMapping::openCount(), 0);
  EXPECT_EQ(gpu::PeerSignal::openCount(), 0);
}

TEST_F(DirectGpuTest, FreeingSharedGpuMemoryUnmapsItInThePeerFirstAndNothingAccumulates) {
  ASSERT_NO_FATAL_FAILURE(start(kDirect, kDirect));
  constexpr size_t kSize = size_t{64} << 20;
  uint64_t target_mem = 0;
  const RemoteMemory remote = targetMemory(0, kSize, &target_mem);
  // Our memory, mapped by the target for our WRITEs: freed and allocated again many times (a
  // KV cache resized), each deregistration returns once the target unmapped it.
  for (int round = 0; round < 24; ++round) {
    auto local = localMemory(0, kSize);
    const MemoryId mem = registerLocal(*local);
    const uint64_t seed = tools::randomSeed();
    local->fill(0, kSize, seed);
    ASSERT_TRUE(run(OpKind::kWrite, {{mem, 0, kSize}}, {{remote.id, 0, kSize}}).isOk());
    EXPECT_EQ(target_->check(target_mem, 0, kSize, seed), "ok");
    EXPECT_EQ(targetMappings(), 1) << "round " << round;
    ASSERT_TRUE(engine_->deregisterMemory(mem).isOk());
    EXPECT_EQ(targetMappings(), 0) << "round " << round << ": still mapped after deregistration";
  }
  EXPECT_EQ(directRuns(), 24u);
  // The target's memory, mapped here for our READs: its deregistration unmaps it here.
  auto local = localMemory(0, kSize);
  const MemoryId mem = registerLocal(*local);
  for (int round = 0; round < 4; ++round) {
    ASSERT_TRUE(run(OpKind::kRead, {{mem, 0, kSize}}, {{remote.id, 0, kSize}}).isOk());
  }
  EXPECT_EQ(gpu::IpcMapping::openCount(), 1);
  EXPECT_EQ(target_->call("DEREGISTER " + std::to_string(target_mem)), "OK");
  EXPECT_EQ(gpu::IpcMapping::openCount(), 0);
  // Mapped again after a new registration, and unmapped when the peer is removed.
  uint64_t again = 0;
  const RemoteMemory fresh = targetMemory(0, kSize, &again);
  ASSERT_TRUE(run(OpKind::kRead, {{mem, 0, kSize}}, {{fresh.id, 0, kSize}}).isOk());
  EXPECT_EQ(gpu::IpcMapping::openCount(), 1);
  ASSERT_TRUE(engine_->removePeer("target").isOk());
  EXPECT_EQ(gpu::IpcMapping::openCount(), 0);
  ASSERT_TRUE(engine_->deregisterMemory(mem).isOk());
}

TEST_F(DirectGpuTest, AKilledPeerFailsDirectGpuTransfersAndLeavesNothingMapped) {
  ASSERT_NO_FATAL_FAILURE(start(kDirect, kDirect));
  constexpr size_t kSize = size_t{64} << 20;
  uint64_t target_mem = 0;
  const RemoteMemory remote = targetMemory(0, kSize, &target_mem);
  auto local = localMemory(0, kSize);
  const MemoryId mem = registerLocal(*local);
  ASSERT_TRUE(run(OpKind::kRead, {{mem, 0, kSize}}, {{remote.id, 0, kSize}}).isOk());
  std::vector<TransferHandle> handles;
  for (int i = 0; i < 16; ++i) {
    auto h = engine_->prepareTransfer(i % 2 == 0 ? OpKind::kWrite : OpKind::kRead, "target",
                                      std::vector<LocalDesc>{{mem, 0, kSize}},
                                      std::vector<RemoteDesc>{{remote.id, 0, kSize}}, std::nullopt);
    ASSERT_TRUE(h.isOk());
    ASSERT_TRUE(engine_->postTransfer(h.value()).isOk());
    handles.push_back(h.value());
  }
  target_->kill(SIGKILL);
  for (TransferHandle h : handles) {
    const Status st = engine_->waitTransfer(h, 10s);
    if (!st.isOk()) {
      EXPECT_EQ(st.code(), StatusCode::kRemoteDisconnected) << st.toString();
    }
    EXPECT_TRUE(engine_->releaseTransfer(h).isOk());
  }
  ASSERT_TRUE(engine_->removePeer("target").isOk());
  EXPECT_EQ(gpu::IpcMapping::openCount(), 0);
  EXPECT_EQ(gpu::PeerSignal::openCount(), 0);
  // Our memory is ours to free: no peer holds it any more.
  ASSERT_TRUE(engine_->deregisterMemory(mem).isOk());
}

}  // namespace
}  // namespace tcpx::testing
