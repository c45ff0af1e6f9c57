// GPU memory over the socket transport (staged through pinned host memory): every direction,
// sizes, unaligned offsets, batches, mixed descriptors, two-sided transfers, ordering with the
// caller's GPU work, driver checks at registration, and CUDA errors surfacing as transfer errors.
// Small transfers travel inline through pinned inline slots: the same checks, plus releases and
// a dying peer while their copies wait. Without a GPU every test skips with the reason.
#include <signal.h>

#include <gtest/gtest.h>
#include <sstream>
#include <thread>
#include <tuple>

#include "common/pattern_memory.h"
#include "common/strings.h"
#include "e2e/e2e_fixture.h"
#include "gpu/gpu.h"

#if TCPX_P2P_HAVE_CUDA
#include <cuda.h>
#include <cuda_runtime.h>

#include "support/delayed_copy.h"
#endif

namespace tcpx::testing {
namespace {

using tools::gpuCount;
using tools::gpuUnavailableReason;
using tools::makeGpuMemory;
using tools::makeHostMemory;
using tools::PatternMemory;

class GpuTransferTest : public TwoProcessTest {
 protected:
  void SetUp() override {
    if (gpuCount() == 0) GTEST_SKIP() << "GPU test skipped: " << gpuUnavailableReason();
  }
  // The tests of staged copies that overlap the network: fresh engines, connected and moving
  // every byte over their channels (no direct copy between the two processes), with `setting`
  // = `max` on our side, and 9 MiB of GPU memory on each.
  struct Overlap {
    bool follows = false;  // the setting is on, and the socket transport (the only one) runs
    uint64_t target_mem = 0;
    RemoteMemory remote;
    std::unique_ptr<PatternMemory> local;
    MemoryId local_mem{};
  };
  static constexpr size_t kOverlapRegion = 9u << 20;
  void startOverlap(const char* setting, const char* max, Overlap* o) {
    engine_.reset();
    target_.reset();
    ASSERT_NO_FATAL_FAILURE(
        start({{"same_host_copy", "off"}}, {{"same_host_copy", "off"}, {setting, max}}));
    ASSERT_TRUE(engine_->connect("target").isOk());
    auto connected = engine_->peerStats("target");
    ASSERT_TRUE(connected.isOk());
    o->follows = std::string(max) != "0" && connected->transport == "socket";
    o->remote = targetMemory(0, kOverlapRegion, &o->target_mem);
    o->local = localMemory(0, kOverlapRegion);
    o->local_mem = registerLocal(*o->local);
  }
  // One of our counters of the target peer (0 if it is gone).
  uint64_t peerCount(uint64_t PeerStats::*field) {
    auto stats = engine_->peerStats("target");
    return stats.isOk() ? stats.value().*field : 0;
  }
  // The target's check of blocks laid out by reversedBlocks(): "ok" or the first mismatch.
  std::string checkBlocks(uint64_t target_mem, size_t block, size_t count, uint64_t seed) {
    return target_->call(strfmt("CHECK_BLOCKS %llu %zu %zu %llu",
                                static_cast<unsigned long long>(target_mem), block, count,
                                static_cast<unsigned long long>(seed)));
  }
};

const char* where(int device) {
  return device < 0 ? "DRAM" : "VRAM";
}

// `count` blocks of `block` bytes: block i of the local region (at i * block) goes to the remote
// region at (count - 1 - i) * 2 * block, the layout the peer's CHECK_BLOCKS checks.
void reversedBlocks(MemoryId local, uint64_t remote, size_t count, size_t block,
                    std::vector<LocalDesc>* ldesc, std::vector<RemoteDesc>* rdesc) {
  ldesc->clear();
  rdesc->clear();
  for (size_t i = 0; i < count; ++i) {
    ldesc->push_back({local, i * block, block});
    rdesc->push_back({remote, (count - 1 - i) * 2 * block, block});
  }
}

TEST_F(GpuTransferTest, ReadAndWriteMoveEveryByteInAllFourDirections) {
  ASSERT_NO_FATAL_FAILURE(start());
  constexpr size_t kRegion = (64u << 20) + 4096;
  const size_t sizes[] = {1, 4095, 4099, 100003, 512 * 1024 + 7, 3 * (1u << 20) + 5, 64u << 20};
  for (const auto& [local_dev, remote_dev] : {std::pair{-1, 0}, {0, -1}, {0, 0}, {-1, -1}}) {
    SCOPED_TRACE(std::string(where(local_dev)) + " here, " + where(remote_dev) + " there");
    uint64_t target_mem = 0;
    const RemoteMemory remote = targetMemory(remote_dev, kRegion, &target_mem);
    auto local = localMemory(local_dev, kRegion);
    const MemoryId local_mem = registerLocal(*local);
    for (size_t size : sizes) {
      SCOPED_TRACE("size " + std::to_string(size));
      const uint64_t seed = tools::randomSeed();
      local->fill(3, size, seed);
      ASSERT_TRUE(run(OpKind::kWrite, {{local_mem, 3, size}}, {{remote.id, 5, size}}).isOk());
      EXPECT_EQ(target_->check(target_mem, 5, size, seed), "ok");
      EXPECT_EQ(target_->checkByte(target_mem, 0, 5, kPoison), "ok");
      EXPECT_EQ(target_->checkByte(target_mem, 5 + size, 64, kPoison), "ok");

      const uint64_t read_seed = tools::randomSeed();
      target_->fill(target_mem, 7, size, read_seed);
      local->fillByte(0, size + 128, kPoison);
      ASSERT_TRUE(run(OpKind::kRead, {{local_mem, 11, size}}, {{remote.id, 7, size}}).isOk());
      EXPECT_EQ(local->check(11, size, read_seed), -1);
      EXPECT_EQ(local->checkByte(0, 11, kPoison), -1);
      EXPECT_EQ(local->checkByte(11 + size, 64, kPoison), -1);
      // Restore the target's poison for the next size's guard checks.
      target_->call(strfmt("FILL_BYTE %llu 0 %zu %u", static_cast<unsigned long long>(target_mem),
                           size + 128, kPoison));
    }
    ASSERT_TRUE(engine_->deregisterMemory(local_mem).isOk());
  }
}

// Memory of the CUDA VMM API mapped as several allocations one after the other (PyTorch's
// expandable segments) registers as one region on both sides; transfers across the boundary
// land byte for byte in both directions (the copies go through the engine's own staging, which
// is all a transport sees).
TEST_F(GpuTransferTest, VmmRegionsOfSeveralAllocationsMoveAcrossTheirBoundaries) {
  if (tools::makeGpuMemory(1, 0, 0, tools::GpuAllocation::kVmmSplit) == nullptr) {
    GTEST_SKIP() << "GPU test skipped: the CUDA driver does not offer the VMM API";
  }
  ASSERT_NO_FATAL_FAILURE(start());
  constexpr size_t kRegion = (16u << 20) + 4096;  // two allocations of 10 MiB (2 MiB granules)
  uint64_t target_mem = 0;
  const RemoteMemory remote = targetMemory(0, kRegion, &target_mem, "vmm-split");
  auto local = localMemory(0, kRegion, tools::GpuAllocation::kVmmSplit);
  const MemoryId local_mem = registerLocal(*local);
  // Whole regions, and 3 MiB around the middle of each (the boundary lies at 10 MiB).
  for (const auto& [offset, size] :
       {std::pair<size_t, size_t>{0, kRegion}, {(9u << 20) + 13, (3u << 20) + 5}}) {
    SCOPED_TRACE(strfmt("%zu bytes at %zu", size, offset));
    const uint64_t seed = tools::randomSeed();
    local->fill(offset, size, seed);
    ASSERT_TRUE(
        run(OpKind::kWrite, {{local_mem, offset, size}}, {{remote.id, offset, size}}).isOk());
    EXPECT_EQ(target_->check(target_mem, offset, size, seed), "ok");
    target_->fill(target_mem, offset, size, seed + 1);
    ASSERT_TRUE(
        run(OpKind::kRead, {{local_mem, offset, size}}, {{remote.id, offset, size}}).isOk());
    EXPECT_EQ(local->check(offset, size, seed + 1), -1);
  }
  // 64 descriptors of 40000 bytes around the boundary, one of them across it: chunks of many
  // pieces, which a batched kernel copies once the pieces are found in live memory.
  std::vector<LocalDesc> ldesc;
  std::vector<RemoteDesc> rdesc;
  constexpr size_t kPiece = 40000;
  const size_t first = (size_t{10} << 20) - 32 * kPiece - 7;
  for (size_t i = 0; i < 64; ++i) {
    ldesc.push_back({local_mem, first + i * kPiece, kPiece});
    rdesc.push_back({remote.id, first + i * kPiece, kPiece});
  }
  const uint64_t seed = tools::randomSeed();
  local->fill(first, 64 * kPiece, seed);
  ASSERT_TRUE(run(OpKind::kWrite, ldesc, rdesc).isOk());
  EXPECT_EQ(target_->check(target_mem, first, 64 * kPiece, seed), "ok");
  target_->fill(target_mem, first, 64 * kPiece, seed + 1);
  ASSERT_TRUE(run(OpKind::kRead, ldesc, rdesc).isOk());
  EXPECT_EQ(local->check(first, 64 * kPiece, seed + 1), -1);
  ASSERT_TRUE(engine_->deregisterMemory(local_mem).isOk());
}

TEST_F(GpuTransferTest, BatchesOfUpTo4096ScatteredGpuDescriptorsLandInTheirOwnPlaces) {
  ASSERT_NO_FATAL_FAILURE(start());
  for (const auto& [count, block] :
       {std::pair<size_t, size_t>{1024, 16384}, {4096, 4096}, {300, 1000}, {64, 65536 + 3}}) {
    for (int remote_dev : {0, -1}) {
      SCOPED_TRACE(strfmt("%zu x %zu into %s", count, block, where(remote_dev)));
      const size_t total = count * block;
      uint64_t target_mem = 0;
      const RemoteMemory remote = targetMemory(remote_dev, 2 * total, &target_mem);
      auto local = localMemory(0, 2 * total);
      const MemoryId local_mem = registerLocal(*local);
      const uint64_t seed = tools::randomSeed();
      local->fill(0, total, seed);
      std::vector<LocalDesc> ldesc;
      std::vector<RemoteDesc> rdesc;
      reversedBlocks(local_mem, remote.id, count, block, &ldesc, &rdesc);
      ASSERT_TRUE(run(OpKind::kWrite, ldesc, rdesc).isOk());
      EXPECT_EQ(checkBlocks(target_mem, block, count, seed), "ok");
      auto back = localMemory(0, total);
      const MemoryId back_mem = registerLocal(*back);
      for (size_t i = 0; i < count; ++i) ldesc[i].mem = back_mem;
      ASSERT_TRUE(run(OpKind::kRead, ldesc, rdesc).isOk());
      EXPECT_EQ(back->check(0, total, seed), -1);
      ASSERT_TRUE(engine_->deregisterMemory(back_mem).isOk());
      ASSERT_TRUE(engine_->deregisterMemory(local_mem).isOk());
    }
  }
}

// Staged receives into GPU memory of transfers up to landed_copy_max copy their bytes on to the
// GPU while they land (landed_chunks counts them), for one region or many unaligned pieces;
// larger transfers, and every transfer with landed_copy_max=0, copy each chunk once it landed.
// Only the socket transport reports what has landed: over a plugin nothing follows a receive.
// A copy whose bytes do not come gives up, and the chunk is copied once complete. Every byte
// lands in its place either way.
TEST_F(GpuTransferTest, StagedReceivesFollowTheirBytesUpToLandedCopyMax) {
  for (const char* max : {"4M", "0"}) {
    SCOPED_TRACE(std::string("landed_copy_max ") + max);
    Overlap o;
    ASSERT_NO_FATAL_FAILURE(startOverlap("landed_copy_max", max, &o));
    const auto& [follows, target_mem, remote, local, local_mem] = o;
    const auto landed = [&] { return peerCount(&PeerStats::landed_chunks); };
    // A first READ makes both sides' slots, streams and events (which may outlast the copies'
    // patience): the counts below are of READs that find them made.
    ASSERT_TRUE(run(OpKind::kRead, {{local_mem, 0, 1u << 20}}, {{remote.id, 0, 1u << 20}}).isOk());
    for (size_t size :
         {size_t{100003}, size_t{(1u << 20) + 7}, size_t{4u << 20}, size_t{8u << 20}}) {
      SCOPED_TRACE("size " + std::to_string(size));
      const uint64_t seed = tools::randomSeed();
      target_->fill(target_mem, 5, size, seed);
      local->fillByte(0, size + 128, kPoison);
      const uint64_t before = landed();
      ASSERT_TRUE(run(OpKind::kRead, {{local_mem, 11, size}}, {{remote.id, 5, size}}).isOk());
      EXPECT_EQ(local->check(11, size, seed), -1);
      EXPECT_EQ(local->checkByte(0, 11, kPoison), -1);
      EXPECT_EQ(local->checkByte(11 + size, 64, kPoison), -1);
      if (follows && size <= (4u << 20)) {
        if (timingAsserted()) {
          EXPECT_GT(landed(), before);
        }
      } else {
        EXPECT_EQ(landed(), before);
      }
    }
    // The target's own GPU work holds its side back for 300 ms: the copies that follow the
    // receives give up waiting (no byte lands for 5 ms), and each chunk is copied once complete.
    {
      constexpr size_t kHeld = 1u << 20;
      const uint64_t seed = tools::randomSeed();
      ASSERT_EQ(target_->call(strfmt("DELAYED_FILL %llu 0 %zu %llu 300",
                                     static_cast<unsigned long long>(target_mem), kHeld,
                                     static_cast<unsigned long long>(seed))),
                "ok");
      local->fillByte(0, kHeld + 64, kPoison);
      const uint64_t before = landed();
      ASSERT_TRUE(run(OpKind::kRead, {{local_mem, 0, kHeld}}, {{remote.id, 0, kHeld}}).isOk());
      EXPECT_EQ(local->check(0, kHeld, seed), -1);
      EXPECT_EQ(local->checkByte(kHeld, 64, kPoison), -1);
      EXPECT_EQ(landed(), before) << "a copy waited 300 ms for its bytes";
    }
    // 1000 pieces of 1000 bytes, reversed: each chunk's copy follows many destinations.
    constexpr size_t kCount = 1000, kBlock = 1000;
    const uint64_t seed = tools::randomSeed();
    auto source = localMemory(0, kCount * kBlock);
    const MemoryId source_mem = registerLocal(*source);
    source->fill(0, kCount * kBlock, seed);
    std::vector<LocalDesc> ldesc;
    std::vector<RemoteDesc> rdesc;
    reversedBlocks(source_mem, remote.id, kCount, kBlock, &ldesc, &rdesc);
    ASSERT_TRUE(run(OpKind::kWrite, ldesc, rdesc).isOk());
    for (size_t i = 0; i < kCount; ++i) ldesc[i].mem = local_mem;
    // The target's first gather of many pieces also allocates its descriptors and device
    // staging, which may outlast the copies' patience (they then give up, and the chunks are
    // copied once complete), as may a GPU that other processes' work keeps busy: a later round
    // must follow, up to three, and with landed_copy_max 0 none may.
    bool followed = false;
    for (int round = 0; round < 4 && !followed; ++round) {
      local->fillByte(0, kCount * kBlock + 64, kPoison);
      const uint64_t before = landed();
      ASSERT_TRUE(run(OpKind::kRead, ldesc, rdesc).isOk());
      EXPECT_EQ(local->check(0, kCount * kBlock, seed), -1);
      EXPECT_EQ(local->checkByte(kCount * kBlock, 64, kPoison), -1);
      followed = round > 0 && landed() > before;
    }
    if (!follows || timingAsserted()) {
      EXPECT_EQ(followed, follows);
    }
    ASSERT_TRUE(engine_->deregisterMemory(source_mem).isOk());
    ASSERT_TRUE(engine_->deregisterMemory(local_mem).isOk());
  }
}

#if TCPX_P2P_HAVE_CUDA
// Staged sends from GPU memory of transfers up to followed_gather_max leave while their gather
// copies them (followed_chunks counts them), for one region, many unaligned pieces and a gather
// held back by the application's own GPU work (the sockets stop polling and go on once the copy
// ended); larger transfers, and every transfer with followed_gather_max=0, send a chunk once it
// is gathered. Only the socket transport follows a copy. Every byte lands in its place either way.
TEST_F(GpuTransferTest, StagedSendsFollowTheirGatherUpToFollowedGatherMax) {
  for (const char* max : {"4M", "0"}) {
    SCOPED_TRACE(std::string("followed_gather_max ") + max);
    Overlap o;
    ASSERT_NO_FATAL_FAILURE(startOverlap("followed_gather_max", max, &o));
    const auto& [follows, target_mem, remote, local, local_mem] = o;
    const auto followed = [&] { return peerCount(&PeerStats::followed_chunks); };
    for (size_t size :
         {size_t{100003}, size_t{(1u << 20) + 7}, size_t{4u << 20}, size_t{8u << 20}}) {
      SCOPED_TRACE("size " + std::to_string(size));
      const uint64_t seed = tools::randomSeed();
      local->fill(13, size, seed);
      ASSERT_EQ(target_->call(strfmt("FILL_BYTE %llu 0 %zu %u",
                                     static_cast<unsigned long long>(target_mem), size + 64,
                                     static_cast<unsigned>(kPoison))),
                "ok");
      const uint64_t before = followed();
      ASSERT_TRUE(run(OpKind::kWrite, {{local_mem, 13, size}}, {{remote.id, 7, size}}).isOk());
      EXPECT_EQ(target_->check(target_mem, 7, size, seed), "ok");
      EXPECT_EQ(target_->checkByte(target_mem, 0, 7, kPoison), "ok");
      EXPECT_EQ(target_->checkByte(target_mem, 7 + size, 57, kPoison), "ok");
      if (follows && size <= (4u << 20)) {
        EXPECT_GT(followed(), before);
      } else {
        EXPECT_EQ(followed(), before);
      }
    }
    // Our own GPU work writes the source 300 ms after the WRITE is posted: the gather waits for
    // it, the sockets stop polling, and the bytes that leave are the new ones.
    {
      constexpr size_t kHeld = 1u << 20;
      const uint64_t seed = tools::randomSeed();
      auto source = localMemory(0, kHeld);
      source->fill(0, kHeld, seed);
      local->fillByte(0, kHeld, kPoison);
      cudaSetDevice(0);
      ASSERT_TRUE(launchDelayedCopy(source->data(), local->data(), kHeld, 300.0));
      const uint64_t before = followed();
      ASSERT_TRUE(run(OpKind::kWrite, {{local_mem, 0, kHeld}}, {{remote.id, 0, kHeld}}).isOk());
      EXPECT_EQ(target_->check(target_mem, 0, kHeld, seed), "ok");
      EXPECT_EQ(followed() > before, follows);
    }
    // Three unaligned blocks, reversed: a gather of a few pieces, which the parts' bounds cut.
    {
      constexpr size_t kFew = 3, kFewBlock = 333337;
      const uint64_t seed = tools::randomSeed();
      local->fill(0, kFew * kFewBlock, seed);
      ASSERT_EQ(target_->call(strfmt("FILL_BYTE %llu 0 %zu %u",
                                     static_cast<unsigned long long>(target_mem),
                                     2 * kFew * kFewBlock, static_cast<unsigned>(kPoison))),
                "ok");
      std::vector<LocalDesc> ldesc;
      std::vector<RemoteDesc> rdesc;
      reversedBlocks(local_mem, remote.id, kFew, kFewBlock, &ldesc, &rdesc);
      const uint64_t before = followed();
      ASSERT_TRUE(run(OpKind::kWrite, ldesc, rdesc).isOk());
      EXPECT_EQ(checkBlocks(target_mem, kFewBlock, kFew, seed), "ok");
      EXPECT_EQ(followed() > before, follows);
    }
    // 1000 pieces of 1000 bytes, reversed: each chunk's gather reads many sources.
    constexpr size_t kCount = 1000, kBlock = 1000;
    const uint64_t seed = tools::randomSeed();
    local->fill(0, kCount * kBlock, seed);
    std::vector<LocalDesc> ldesc;
    std::vector<RemoteDesc> rdesc;
    reversedBlocks(local_mem, remote.id, kCount, kBlock, &ldesc, &rdesc);
    const uint64_t before = followed();
    ASSERT_TRUE(run(OpKind::kWrite, ldesc, rdesc).isOk());
    EXPECT_EQ(followed() > before, follows);
    auto back = localMemory(0, kCount * kBlock);
    const MemoryId back_mem = registerLocal(*back);
    back->fillByte(0, kCount * kBlock, kPoison);
    for (size_t i = 0; i < kCount; ++i) ldesc[i].mem = back_mem;
    ASSERT_TRUE(run(OpKind::kRead, ldesc, rdesc).isOk());
    EXPECT_EQ(back->check(0, kCount * kBlock, seed), -1);
    ASSERT_TRUE(engine_->deregisterMemory(back_mem).isOk());
    ASSERT_TRUE(engine_->deregisterMemory(local_mem).isOk());
  }
}
#endif  // TCPX_P2P_HAVE_CUDA

TEST_F(GpuTransferTest, OneTransferMixesHostAndGpuDescriptorsOnBothSides) {
  ASSERT_NO_FATAL_FAILURE(start());
  constexpr size_t kBlock = 20000, kCount = 64;
  uint64_t tgpu = 0, thost = 0;
  const RemoteMemory rgpu = targetMemory(0, kBlock * kCount, &tgpu);
  const RemoteMemory rhost = targetMemory(-1, kBlock * kCount, &thost);
  auto lgpu = localMemory(0, kBlock * kCount);
  auto lhost = localMemory(-1, kBlock * kCount);
  const MemoryId mg = registerLocal(*lgpu), mh = registerLocal(*lhost);
  const uint64_t seed = tools::randomSeed();
  std::vector<LocalDesc> ldesc;
  std::vector<RemoteDesc> rdesc;
  for (size_t i = 0; i < kCount; ++i) {
    // Block i: from GPU on even i, host on odd i; to host on i % 3 == 0, else GPU.
    PatternMemory& src = i % 2 == 0 ? *lgpu : *lhost;
    src.fill(i * kBlock, kBlock, seed + i);
    ldesc.push_back({i % 2 == 0 ? mg : mh, i * kBlock, kBlock});
    rdesc.push_back({i % 3 == 0 ? rhost.id : rgpu.id, i * kBlock, kBlock});
  }
  ASSERT_TRUE(run(OpKind::kWrite, ldesc, rdesc).isOk());
  for (size_t i = 0; i < kCount; ++i) {
    EXPECT_EQ(target_->check(i % 3 == 0 ? thost : tgpu, i * kBlock, kBlock, seed + i), "ok")
        << "block " << i;
  }
  lgpu->fillByte(0, kBlock * kCount, kPoison);
  lhost->fillByte(0, kBlock * kCount, kPoison);
  ASSERT_TRUE(run(OpKind::kRead, ldesc, rdesc).isOk());
  for (size_t i = 0; i < kCount; ++i) {
    const PatternMemory& dst = i % 2 == 0 ? *lgpu : *lhost;
    EXPECT_EQ(dst.check(i * kBlock, kBlock, seed + i), -1) << "block " << i;
  }
}

TEST_F(GpuTransferTest, ReadsAndWritesOfGpuMemoryRunBothWaysAtOnce) {
  ASSERT_NO_FATAL_FAILURE(start());
  checkReadsAndWritesBothWaysAtOnce(0, 0);
}

TEST_F(GpuTransferTest, SendAndRecvMoveGpuBuffers) {
  ASSERT_NO_FATAL_FAILURE(start());
  for (int remote_dev : {0, -1}) {
    uint64_t target_mem = 0;
    targetMemory(remote_dev, 8u << 20, &target_mem);
    auto local = localMemory(0, 8u << 20);
    const MemoryId mem = registerLocal(*local);
    for (size_t size : {size_t{100}, size_t{5u << 20}}) {
      SCOPED_TRACE(strfmt("%zu bytes GPU -> %s", size, where(remote_dev)));
      const uint64_t seed = tools::randomSeed();
      local->fill(0, size, seed);
      ASSERT_EQ(target_
                    ->call(strfmt("RECV_ASYNC initiator %llu 0 %zu 4",
                                  static_cast<unsigned long long>(target_mem), size))
                    .rfind("started", 0),
                0u);
      auto h = engine_->postSend("target", {mem, 0, size}, 4);
      ASSERT_TRUE(h.isOk());
      ASSERT_TRUE(engine_->waitTransfer(h.value(), 30s).isOk());
      ASSERT_TRUE(engine_->releaseTransfer(h.value()).isOk());
      EXPECT_EQ(target_->call("WAIT_ASYNC " + std::to_string(async_++)), "OK");
      EXPECT_EQ(target_->check(target_mem, 0, size, seed), "ok");
      // And back into GPU memory.
      target_->fill(target_mem, 0, size, seed + 1);
      auto r = engine_->postRecv("target", {mem, 0, size}, 5);
      ASSERT_TRUE(r.isOk());
      EXPECT_EQ(target_->call(strfmt("SEND initiator %llu 0 %zu 5",
                                     static_cast<unsigned long long>(target_mem), size)),
                "OK");
      ASSERT_TRUE(engine_->waitTransfer(r.value(), 30s).isOk());
      EXPECT_EQ(local->check(0, size, seed + 1), -1);
      ASSERT_TRUE(engine_->releaseTransfer(r.value()).isOk());
    }
  }
}

TEST_F(GpuTransferTest, RegistrationChecksPointersWithTheDriver) {
  ASSERT_NO_FATAL_FAILURE(start());
  auto host = makeHostMemory(4096);
  auto gpu = makeGpuMemory(1 << 20, 0);
  ASSERT_TRUE(gpu != nullptr);
  EXPECT_EQ(engine_->registerMemory(host->data(), 4096, MemoryKind::kCuda, 0).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(
      engine_->registerMemory(gpu->data(), 1 << 20, MemoryKind::kCuda, gpuCount()).status().code(),
      StatusCode::kInvalidArgument);
  EXPECT_EQ(
      engine_->registerMemory(gpu->data(), (1 << 20) + 1, MemoryKind::kCuda, 0).status().code(),
      StatusCode::kOutOfRange);
  if (gpuCount() > 1) {
    EXPECT_EQ(engine_->registerMemory(gpu->data(), 1 << 20, MemoryKind::kCuda, 1).status().code(),
              StatusCode::kInvalidArgument);
  }
  EXPECT_TRUE(engine_->registerMemory(gpu->data() + 4096, 8192, MemoryKind::kCuda, 0).isOk());
  // GPU memory named host memory: the CPU would touch it in transfers.
  EXPECT_EQ(engine_->registerMemory(gpu->data(), 4096, MemoryKind::kHost).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(engine_->registerMemory(gpu->data() + 8192, 4096).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_TRUE(engine_->registerMemory(host->data(), 4096, MemoryKind::kHost).isOk());
}

#if TCPX_P2P_HAVE_CUDA
// The application's GPU work still running on the default stream when a transfer is posted (on
// our side) or when its request arrives (on the target) comes before every copy the engine makes
// of that memory, reads and writes alike: a delayed kernel writes its bytes after 200 ms, and the
// transfer must see (or overwrite) them, never race them: our WRITE and READ, a READ of the
// target and a WRITE into it. 4 KiB travels inline, 256 KiB through the channels.
TEST_F(GpuTransferTest, GpuWorkQueuedBeforeATransferComesBeforeItsCopiesOnBothSides) {
  ASSERT_NO_FATAL_FAILURE(start());
  for (size_t size : {size_t{4096}, size_t{256} * 1024}) {
    SCOPED_TRACE("size " + std::to_string(size));
    checkGpuWorkComesFirst(size);
  }
}

// With one channel, each 512 KiB chunk of 8192 descriptors of 128 bytes needs 4096 copy tiles,
// more than a slot starts with; their copies wait for a 1 s kernel of the user. Meanwhile the
// progress thread serves everything else: a host WRITE to the same peer completes long before
// the kernel ends.
TEST_F(GpuTransferTest, AChunkOfThousandsOfTinyPiecesWaitingForTheUserDoesNotHoldUpTheEngine) {
  ASSERT_NO_FATAL_FAILURE(start({{"channels", "1"}}, {{"channels", "1"}}));
  ASSERT_TRUE(engine_->connect("target").isOk());  // channel set-up before the kernel starts
  constexpr size_t kCount = 8192;
  constexpr size_t kBlock = 128;
  constexpr size_t kTotal = kCount * kBlock;
  uint64_t target_mem = 0;
  const RemoteMemory remote = targetMemory(0, 2 * kTotal, &target_mem);
  auto source = localMemory(0, kTotal);
  auto output = localMemory(0, kTotal);
  const MemoryId mem = registerLocal(*output);
  const uint64_t seed = tools::randomSeed();
  source->fill(0, kTotal, seed);
  std::vector<LocalDesc> ldesc;
  std::vector<RemoteDesc> rdesc;
  reversedBlocks(mem, remote.id, kCount, kBlock, &ldesc, &rdesc);
  uint64_t host_target = 0;
  const RemoteMemory host_remote = targetMemory(-1, 4096, &host_target);
  auto host = localMemory(-1, 4096);
  const MemoryId host_mem = registerLocal(*host);
  const uint64_t host_seed = tools::randomSeed();
  host->fill(0, 4096, host_seed);

  cudaSetDevice(0);
  ASSERT_TRUE(launchDelayedCopy(source->data(), output->data(), kTotal, 1000.0));
  const auto begin = std::chrono::steady_clock::now();
  auto gpu_write = engine_->prepareTransfer(OpKind::kWrite, "target", ldesc, rdesc);
  ASSERT_TRUE(gpu_write.isOk()) << gpu_write.status().toString();
  ASSERT_TRUE(engine_->postTransfer(gpu_write.value()).isOk());
  std::this_thread::sleep_for(20ms);  // its gather is queued behind the kernel
  ASSERT_TRUE(run(OpKind::kWrite, {{host_mem, 0, 4096}}, {{host_remote.id, 0, 4096}}).isOk());
  EXPECT_LT(std::chrono::steady_clock::now() - begin, 500ms)
      << "the host WRITE waited for the user's kernel";
  EXPECT_EQ(target_->check(host_target, 0, 4096, host_seed), "ok");
  ASSERT_TRUE(engine_->waitTransfer(gpu_write.value(), 30s).isOk());
  EXPECT_GE(std::chrono::steady_clock::now() - begin, 900ms) << "the GPU WRITE did not wait";
  ASSERT_TRUE(engine_->releaseTransfer(gpu_write.value()).isOk());
  EXPECT_EQ(checkBlocks(target_mem, kBlock, kCount, seed), "ok");
  // A same-host target may map `output` (direct copies): deregistration waits until it let go.
  EXPECT_TRUE(engine_->deregisterMemory(mem).isOk());
}

// Far more small GPU transfers in flight than a peer has inline slots (16), in both directions
// at once: every one lands in its own place.
TEST_F(GpuTransferTest, ManyMoreSmallGpuTransfersThanInlineSlotsAllLand) {
  ASSERT_NO_FATAL_FAILURE(start());
  constexpr size_t kSize = 4096;
  constexpr size_t kTransfers = 48;
  uint64_t target_mem = 0;
  const RemoteMemory remote = targetMemory(0, 2 * kSize * kTransfers, &target_mem);
  auto local = localMemory(0, 2 * kSize * kTransfers);
  const MemoryId mem = registerLocal(*local);
  const uint64_t write_seed = tools::randomSeed();
  const uint64_t read_seed = tools::randomSeed();
  local->fill(0, kSize * kTransfers, write_seed);
  target_->fill(target_mem, kSize * kTransfers, kSize * kTransfers, read_seed);
  std::vector<TransferHandle> handles;
  for (size_t i = 0; i < kTransfers; ++i) {
    const uint64_t at = i * kSize;
    const uint64_t back = kSize * kTransfers + i * kSize;
    for (auto [op, l, r] : {std::tuple{OpKind::kWrite, at, at}, {OpKind::kRead, back, back}}) {
      const std::vector<LocalDesc> ldesc{{mem, l, kSize}};
      const std::vector<RemoteDesc> rdesc{{remote.id, r, kSize}};
      auto h = engine_->prepareTransfer(op, "target", ldesc, rdesc);
      ASSERT_TRUE(h.isOk()) << h.status().toString();
      ASSERT_TRUE(engine_->postTransfer(h.value()).isOk());
      handles.push_back(h.value());
    }
  }
  for (TransferHandle h : handles) {
    EXPECT_TRUE(engine_->waitTransfer(h, 30s).isOk());
    ASSERT_TRUE(engine_->releaseTransfer(h).isOk());
  }
  EXPECT_EQ(target_->check(target_mem, 0, kSize * kTransfers, write_seed), "ok");
  EXPECT_EQ(local->check(kSize * kTransfers, kSize * kTransfers, read_seed), -1);
}

TEST_F(GpuTransferTest, ReleasingASmallGpuWriteWaitsForItsCopyAndSendsNothing) {
  // The inline gather: between GPU memories a direct WRITE (same_host_copy) copies nothing of
  // ours before it is announced (DirectGpuTest releases one).
  ASSERT_NO_FATAL_FAILURE(start({{"same_host_copy", "off"}}, {{"same_host_copy", "off"}}));
  // Connected first: a transfer posted before the peer is ready waits in a queue, and one
  // released there never starts, which is not what this test is about.
  ASSERT_TRUE(engine_->connect("target").isOk());
  constexpr size_t kSize = 4096;  // inline
  const WriteOfPendingBytes w = writeOfPendingBytes(kSize, 1000.0);
  auto h = engine_->prepareTransfer(OpKind::kWrite, "target", w.local, w.there);
  ASSERT_TRUE(h.isOk()) << h.status().toString();
  const auto begin = std::chrono::steady_clock::now();
  ASSERT_TRUE(engine_->postTransfer(h.value()).isOk());
  // Long enough for the progress thread to start the WRITE (a release before that drops it from
  // the queue) even on a loaded machine, far shorter than the kernel.
  std::this_thread::sleep_for(200ms);
  EXPECT_EQ(engine_->checkTransfer(h.value()).code(), StatusCode::kInProgress);
  // The WRITE's copy out of its source waits for the kernel; the release waits for that copy.
  ASSERT_TRUE(engine_->releaseTransfer(h.value()).isOk());
  EXPECT_GE(std::chrono::steady_clock::now() - begin, 500ms);
  cudaDeviceSynchronize();
  // Released before it was announced: the target's memory is untouched.
  EXPECT_EQ(target_->checkByte(w.target_mem, 0, kSize, kPoison), "ok");
  // The engine goes on with the next WRITE.
  ASSERT_TRUE(run(OpKind::kWrite, w.local, w.there).isOk());
  EXPECT_EQ(target_->check(w.target_mem, 0, kSize, w.seed), "ok");
}

TEST_F(GpuTransferTest, ReleasingASmallGpuSendWaitsForItsCopyAndCancelsTheRecv) {
  ASSERT_NO_FATAL_FAILURE(start());
  // Connected first: a transfer posted before the peer is ready waits in a queue, and one
  // released there never starts, which is not what this test is about.
  ASSERT_TRUE(engine_->connect("target").isOk());
  constexpr size_t kSize = 4096;  // inline
  uint64_t target_mem = 0;
  targetMemory(0, kSize, &target_mem);
  auto source = localMemory(0, kSize);
  auto output = localMemory(0, kSize);
  const MemoryId mem = registerLocal(*output);
  source->fill(0, kSize, tools::randomSeed());
  cudaSetDevice(0);
  ASSERT_EQ(target_
                ->call(strfmt("RECV_ASYNC initiator %llu 0 %zu 6",
                              static_cast<unsigned long long>(target_mem), kSize))
                .rfind("started", 0),
            0u);
  ASSERT_TRUE(launchDelayedCopy(source->data(), output->data(), kSize, 1000.0));
  const auto begin = std::chrono::steady_clock::now();
  auto h = engine_->postSend("target", {mem, 0, kSize}, 6);
  ASSERT_TRUE(h.isOk()) << h.status().toString();
  // Long enough for the rendezvous even on a loaded machine (a send released before the recv
  // matched it is forgotten, and the recv waits on); the send's copy then waits for the kernel.
  std::this_thread::sleep_for(200ms);
  EXPECT_EQ(engine_->checkTransfer(h.value()).code(), StatusCode::kInProgress);
  ASSERT_TRUE(engine_->releaseTransfer(h.value()).isOk());
  EXPECT_GE(std::chrono::steady_clock::now() - begin, 500ms);
  const std::string recv = target_->call("WAIT_ASYNC " + std::to_string(async_++));
  EXPECT_NE(recv.find("CANCELED"), std::string::npos) << recv;
  EXPECT_EQ(target_->checkByte(target_mem, 0, kSize, kPoison), "ok");
  cudaDeviceSynchronize();
}

// The peer dies while copies of its transfers wait for the application's kernel: inline WRITEs
// (gathers into inline slots), a staged WRITE (gathers into channel slots) and a staged READ
// whose bytes arrived (scatters into our memory). The engine goes on serving another peer
// meanwhile: its progress thread waits for no GPU work. The failed transfers complete only once
// the kernel is done, so no copy of theirs can touch their memory afterwards.
TEST_F(GpuTransferTest, AKilledPeerFailsGpuTransfersWaitingForAKernelWithoutHoldingUpOthers) {
  // Staged and inline copies: a direct copy (same_host_copy) of our GPU memory is the peer's.
  ASSERT_NO_FATAL_FAILURE(start({{"same_host_copy", "off"}}, {{"same_host_copy", "off"}}));
  ForkedPeer bystander("bystander");
  ASSERT_FALSE(bystander.connectionInfo().empty()) << "bystander engine did not start";
  ASSERT_TRUE(engine_->addPeer("bystander", bystander.connectionInfo()).isOk());
  bystander.addPeer("initiator", engine_->connectionInfo());
  constexpr size_t kSmall = 4096;  // inline
  constexpr int kSmallWrites = 8;
  constexpr size_t kLarge = 4u << 20;  // through the channels
  constexpr size_t kSpan = kSmall * kSmallWrites + 2 * kLarge;
  uint64_t target_mem = 0;
  const RemoteMemory remote = targetMemory(0, kSpan, &target_mem);
  auto source = localMemory(0, kSpan);
  auto output = localMemory(0, kSpan);
  const MemoryId mem = registerLocal(*output);

  // The bystander's connection is up before the kernel starts.
  const ForkedPeer::Region by_region = bystander.registerMemory(64 << 10);
  auto by_remote = engine_->loadRemoteMemory(by_region.descriptor);
  ASSERT_TRUE(by_remote.isOk()) << by_remote.status().toString();
  auto by_local = localMemory(-1, 64 << 10);
  const MemoryId by_mem = registerLocal(*by_local);
  const auto bystander_round = [&](uint64_t seed) {
    by_local->fill(0, 64 << 10, seed);
    const std::vector<LocalDesc> l{{by_mem, 0, 64 << 10}};
    const std::vector<RemoteDesc> r{{by_remote.value().id, 0, 64 << 10}};
    for (OpKind op : {OpKind::kWrite, OpKind::kRead}) {
      auto h = engine_->prepareTransfer(op, "bystander", l, r);
      ASSERT_TRUE(h.isOk()) << h.status().toString();
      ASSERT_TRUE(engine_->postTransfer(h.value()).isOk());
      ASSERT_TRUE(engine_->waitTransfer(h.value(), 10s).isOk());
      ASSERT_TRUE(engine_->releaseTransfer(h.value()).isOk());
    }
    EXPECT_EQ(by_local->check(0, 64 << 10, seed), -1);
  };
  bystander_round(tools::randomSeed());

  cudaSetDevice(0);
  constexpr double kKernelMs = 1500.0;
  // Every copy of ours waits for this kernel: the peer dies while they wait.
  ASSERT_TRUE(launchDelayedCopy(source->data(), output->data(), kSmall, kKernelMs));
  cudaEvent_t kernel_done = nullptr;
  ASSERT_EQ(cudaEventCreateWithFlags(&kernel_done, cudaEventDisableTiming), cudaSuccess);
  ASSERT_EQ(cudaEventRecord(kernel_done, nullptr), cudaSuccess);
  const auto posted_at = std::chrono::steady_clock::now();
  std::vector<TransferHandle> handles;
  const auto post = [&](OpKind op, uint64_t offset, size_t size) {
    const std::vector<LocalDesc> local{{mem, offset, size}};
    const std::vector<RemoteDesc> there{{remote.id, offset, size}};
    auto h = engine_->prepareTransfer(op, "target", local, there);
    ASSERT_TRUE(h.isOk()) << h.status().toString();
    ASSERT_TRUE(engine_->postTransfer(h.value()).isOk());
    handles.push_back(h.value());
  };
  for (int i = 0; i < kSmallWrites; ++i) post(OpKind::kWrite, i * kSmall, kSmall);
  post(OpKind::kWrite, kSmall * kSmallWrites, kLarge);
  post(OpKind::kRead, kSmall * kSmallWrites + kLarge, kLarge);
  std::this_thread::sleep_for(100ms);  // the READ's bytes arrive; its scatters wait
  target_->kill(SIGKILL);
  std::this_thread::sleep_for(100ms);  // the engine notices the death
  EXPECT_EQ(engine_->peerState("target"), PeerState::kFailed);

  // The engine serves the bystander while the failed peer's copies still wait.
  const auto before = std::chrono::steady_clock::now();
  bystander_round(tools::randomSeed());
  const auto took = std::chrono::steady_clock::now() - before;
  EXPECT_LT(took, 500ms) << "the bystander's transfers waited for the failed peer's copies";
  EXPECT_EQ(cudaEventQuery(kernel_done), cudaErrorNotReady) << "the kernel ended too early";

  for (TransferHandle h : handles) {
    EXPECT_EQ(engine_->waitTransfer(h, 10s).code(), StatusCode::kRemoteDisconnected);
    // Completed only after the kernel: its copies no longer touch memory.
    EXPECT_EQ(cudaEventQuery(kernel_done), cudaSuccess);
    EXPECT_GE(std::chrono::steady_clock::now() - posted_at, 1000ms);
    ASSERT_TRUE(engine_->releaseTransfer(h).isOk());
  }
  cudaEventDestroy(kernel_done);
  ASSERT_TRUE(engine_->deregisterMemory(mem).isOk());  // nothing stays pinned
  bystander_round(tools::randomSeed());
  cudaDeviceSynchronize();
  target_->wait(5s);
}

// A receive posted for a stalled peer has a copy following it on the GPU that sees no byte
// land: it gives up (5 ms without a byte), so nothing of the engine's keeps the GPU busy (a
// device-wide synchronisation returns) and the READ ends with the peer's failure.
TEST_F(GpuTransferTest, ACopyFollowingAReceiveOfAStalledPeerLeavesTheGpuIdle) {
  ASSERT_NO_FATAL_FAILURE(
      start({{"same_host_copy", "off"}}, {{"same_host_copy", "off"}, {"peer_timeout_ms", "1000"}}));
  ASSERT_TRUE(engine_->connect("target").isOk());
  constexpr size_t kSize = 2u << 20;
  uint64_t target_mem = 0;
  const RemoteMemory remote = targetMemory(0, kSize, &target_mem);
  auto local = localMemory(0, kSize);
  const MemoryId mem = registerLocal(*local);
  // The target's own GPU work holds its side of the READ back: its gathers wait.
  ASSERT_EQ(target_->call(strfmt("DELAYED_FILL %llu 0 %zu 7 3000",
                                 static_cast<unsigned long long>(target_mem), kSize)),
            "ok");
  const std::vector<LocalDesc> here{{mem, 0, kSize}};
  const std::vector<RemoteDesc> there{{remote.id, 0, kSize}};
  auto h = engine_->prepareTransfer(OpKind::kRead, "target", here, there);
  ASSERT_TRUE(h.isOk()) << h.status().toString();
  ASSERT_TRUE(engine_->postTransfer(h.value()).isOk());
  std::this_thread::sleep_for(300ms);  // the receives are posted, their copies wait for bytes
  target_->kill(SIGSTOP);
  const auto stopped_at = std::chrono::steady_clock::now();
  const Status st = engine_->waitTransfer(h.value(), 10s);
  EXPECT_TRUE(st.code() == StatusCode::kRemoteDisconnected || st.code() == StatusCode::kTimeout)
      << st.toString();
  EXPECT_LT(std::chrono::steady_clock::now() - stopped_at, 3s);
  auto stats = engine_->peerStats("target");
  ASSERT_TRUE(stats.isOk());
  EXPECT_EQ(stats->landed_chunks, 0U);
  ASSERT_TRUE(engine_->releaseTransfer(h.value()).isOk());
  // Nothing of the engine's runs on the GPU any more.
  cudaSetDevice(0);
  const auto sync_from = std::chrono::steady_clock::now();
  std::thread syncing([] { (void)cudaDeviceSynchronize(); });
  syncing.join();
  EXPECT_LT(std::chrono::steady_clock::now() - sync_from, 1s);
  ASSERT_TRUE(engine_->deregisterMemory(mem).isOk());
  target_->kill(SIGKILL);
  target_->wait(5s);
}

// A release of a transfer whose peer failed while its copies wait returns once they are done.
TEST_F(GpuTransferTest, ReleasingATransferOfAFailedPeerWaitsForItsCopies) {
  // The staged gathers: a direct WRITE (same_host_copy) copies nothing of ours before the peer
  // has its request, so its release need not wait.
  ASSERT_NO_FATAL_FAILURE(start({{"same_host_copy", "off"}}, {{"same_host_copy", "off"}}));
  // Connected first: on a loaded machine, setting the connections up on the first transfer can
  // outlast the 50 ms before the kill, and a transfer failed before its gather was queued has
  // nothing to wait for.
  ASSERT_TRUE(engine_->connect("target").isOk());
  constexpr size_t kSize = 4u << 20;
  uint64_t target_mem = 0;
  const RemoteMemory remote = targetMemory(0, kSize, &target_mem);
  auto source = localMemory(0, kSize);
  auto output = localMemory(0, kSize);
  const MemoryId mem = registerLocal(*output);
  cudaSetDevice(0);
  ASSERT_TRUE(launchDelayedCopy(source->data(), output->data(), 4096, 800.0));
  cudaEvent_t kernel_done = nullptr;
  ASSERT_EQ(cudaEventCreateWithFlags(&kernel_done, cudaEventDisableTiming), cudaSuccess);
  ASSERT_EQ(cudaEventRecord(kernel_done, nullptr), cudaSuccess);
  const std::vector<LocalDesc> local{{mem, 0, kSize}};
  const std::vector<RemoteDesc> there{{remote.id, 0, kSize}};
  auto h = engine_->prepareTransfer(OpKind::kWrite, "target", local, there);
  ASSERT_TRUE(h.isOk()) << h.status().toString();
  ASSERT_TRUE(engine_->postTransfer(h.value()).isOk());
  std::this_thread::sleep_for(50ms);
  target_->kill(SIGKILL);
  std::this_thread::sleep_for(100ms);
  ASSERT_TRUE(engine_->releaseTransfer(h.value()).isOk());
  EXPECT_EQ(cudaEventQuery(kernel_done), cudaSuccess) << "released while its gather could run";
  cudaEventDestroy(kernel_done);
  ASSERT_TRUE(engine_->deregisterMemory(mem).isOk());
  cudaDeviceSynchronize();
  target_->wait(5s);
}
#endif

// 2 MiB goes through the channels (the target stages it); 4 KiB is read inline through the
// target's inline slot. Either way the copy's CUDA error reaches the initiator. The freed region
// is 2 MiB both times, so that the driver unmaps it rather than keeping its page for others.
TEST_F(GpuTransferTest, ACudaErrorOnTheTargetFailsTheTransferOnBothSides) {
  // The staged path's errors: a direct copy (same_host_copy) would read the freed allocation
  // through the initiator's own mapping of it, which CUDA keeps alive (undefined behaviour the
  // engine prevents only for memory deregistered first).
  ASSERT_NO_FATAL_FAILURE(start({{"same_host_copy", "off"}}, {{"same_host_copy", "off"}}));
  constexpr size_t kRegion = 2u << 20;
  for (size_t size : {kRegion, size_t{4096}}) {
    SCOPED_TRACE("size " + std::to_string(size));
    uint64_t target_mem = 0;
    const RemoteMemory remote = targetMemory(0, kRegion, &target_mem);
    auto local = localMemory(0, kRegion);
    const MemoryId mem = registerLocal(*local);
    ASSERT_TRUE(run(OpKind::kRead, {{mem, 0, size}}, {{remote.id, 0, size}}).isOk());
    // The target's application frees the memory behind its engine's back.
    ASSERT_EQ(target_->call("FREE_BEHIND_ENGINE " + std::to_string(target_mem)), "ok");
    const Status st = run(OpKind::kRead, {{mem, 0, size}}, {{remote.id, 0, size}});
    EXPECT_EQ(st.code(), StatusCode::kRemoteRejected) << st.toString();
    EXPECT_NE(st.message().find("DEVICE_ERROR"), std::string::npos) << st.toString();
    // The error stays with that transfer: the next ones on both sides, many-piece chunks through
    // the batched copy kernel included, move their bytes.
    uint64_t fresh_mem = 0;
    const RemoteMemory fresh = targetMemory(0, 2 * kRegion, &fresh_mem);
    const uint64_t seed = tools::randomSeed();
    local->fill(0, kRegion, seed);
    std::vector<LocalDesc> ldesc;
    std::vector<RemoteDesc> rdesc;
    constexpr size_t kBlock = 4096;
    reversedBlocks(mem, fresh.id, kRegion / kBlock, kBlock, &ldesc, &rdesc);
    ASSERT_TRUE(run(OpKind::kWrite, ldesc, rdesc).isOk());
    EXPECT_EQ(checkBlocks(fresh_mem, kBlock, kRegion / kBlock, seed), "ok");
    local->fillByte(0, kRegion, kPoison);
    ASSERT_TRUE(run(OpKind::kRead, ldesc, rdesc).isOk());
    EXPECT_EQ(local->check(0, kRegion, seed), -1);
    ASSERT_TRUE(engine_->deregisterMemory(mem).isOk());
  }
}

// Our own application frees GPU memory behind the engine's back, then READs into it and WRITEs
// from it: a kernel (a copy that follows the receive as it lands, a batched copy of many pieces)
// would fault there and leave the context unusable, so the pieces are checked first: one region
// is left to a copy engine's copy, whose error fails that transfer alone, many pieces fail at
// once (DEVICE_ERROR either way); later transfers of this process move their bytes. Over sockets
// only: a plugin's receives into its GPU bounce pool are unpacked by a kernel that does not check
// the destination (a known limitation, docs/RELIABILITY.md).
TEST_F(GpuTransferTest, TransfersOfGpuMemoryFreedBehindTheEngineFailAloneAndTheContextLives) {
  if (transportUnderTest() != "socket") {
    GTEST_SKIP() << "covers the socket transport's copies; an unpack kernel does not check for "
                    "freed destinations";
  }
  ASSERT_NO_FATAL_FAILURE(start({{"same_host_copy", "off"}}, {{"same_host_copy", "off"}}));
  constexpr size_t kRegion = 2u << 20;
  constexpr size_t kSize = 1u << 20;  // below landed_copy_max
  uint64_t target_mem = 0;
  const RemoteMemory remote = targetMemory(0, kRegion, &target_mem);
  const uint64_t seed = tools::randomSeed();
  target_->fill(target_mem, 0, kSize, seed);
  auto freed = localMemory(0, kRegion);
  const MemoryId freed_mem = registerLocal(*freed);
  // One region (a copy engine's copy), and 256 pieces (a batched kernel), each way.
  std::vector<LocalDesc> blocks_l;
  std::vector<RemoteDesc> blocks_r;
  reversedBlocks(freed_mem, remote.id, 256, 4096, &blocks_l, &blocks_r);
  const std::vector<LocalDesc> one_l{{freed_mem, 0, kSize}};
  const std::vector<RemoteDesc> one_r{{remote.id, 0, kSize}};
  // Each once while the memory lives, so that the engine's own GPU allocations for them are made
  // before the free: one made after it could take the freed addresses, which would then be live
  // again (the failing transfers below check their pieces before they allocate anything).
  for (const OpKind op : {OpKind::kRead, OpKind::kWrite}) {
    ASSERT_TRUE(run(op, one_l, one_r).isOk());
    ASSERT_TRUE(run(op, blocks_l, blocks_r).isOk());
  }
  freed->releaseEarly();
  for (const OpKind op : {OpKind::kRead, OpKind::kWrite}) {
    for (const bool pieces : {false, true}) {
      SCOPED_TRACE(std::string(op == OpKind::kRead ? "READ" : "WRITE") +
                   (pieces ? ", 256 pieces" : ", one region"));
      const Status st = pieces ? run(op, blocks_l, blocks_r) : run(op, one_l, one_r);
      EXPECT_EQ(st.code(), StatusCode::kDeviceError) << st.toString();
      EXPECT_EQ(engine_->peerState("target"), PeerState::kReady);
    }
  }
#if TCPX_P2P_HAVE_CUDA
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  // The failing transfers allocated nothing that took the freed addresses (they would then be
  // live again, and a later failure here would be the check's to prove, not the free's).
  cudaPointerAttributes attr{};
  const cudaError_t asked = cudaPointerGetAttributes(&attr, freed->data());
  EXPECT_TRUE(asked != cudaSuccess || attr.type != cudaMemoryTypeDevice)
      << "the freed addresses belong to a live allocation again";
  (void)cudaGetLastError();
#endif
  target_->fill(target_mem, 0, kSize, seed);
  // The context still works: READs and WRITEs of live memory move every byte.
  auto live = localMemory(0, kRegion);
  const MemoryId live_mem = registerLocal(*live);
  live->fillByte(0, kRegion, kPoison);
  ASSERT_TRUE(run(OpKind::kRead, {{live_mem, 0, kSize}}, {{remote.id, 0, kSize}}).isOk());
  EXPECT_EQ(live->check(0, kSize, seed), -1);
  const uint64_t back = tools::randomSeed();
  live->fill(0, kSize, back);
  ASSERT_TRUE(run(OpKind::kWrite, {{live_mem, 0, kSize}}, {{remote.id, kSize, kSize}}).isOk());
  EXPECT_EQ(target_->check(target_mem, kSize, kSize, back), "ok");
  ASSERT_TRUE(engine_->deregisterMemory(live_mem).isOk());
  ASSERT_TRUE(engine_->deregisterMemory(freed_mem).isOk());
}

// Pinned and device allocations that fail (injected with gpu::failNextAllocations here and
// FAIL_ALLOC on the target) fail the transfer that needed them, on either side, with CUDA's
// reason; the peer stays up and, once memory is there again, the same transfers move every byte.
// Each allocation is the first of its kind on a fresh pair of engines: the inline slot, the
// channel slots, the device staging of many-piece chunks, on the initiator and on the target.
// Sends do not follow their gathers here (followed_gather_max 0, whatever the environment says):
// a followed gather takes its copy descriptors from pinned memory, not the device staging.
TEST_F(GpuTransferTest, AllocationsThatFailOnEitherSideFailOnlyTheTransfersThatNeededThem) {
  if (transportUnderTest() != "socket") {
    GTEST_SKIP() << "covers the socket transport's staging; a plugin transport allocates its "
                    "receive buffers at channel set-up";
  }
  ASSERT_NO_FATAL_FAILURE(start({{"same_host_copy", "off"}, {"followed_gather_max", "0"}},
                                {{"same_host_copy", "off"}, {"followed_gather_max", "0"}}));
  constexpr size_t kRegion = 1u << 20;
  constexpr size_t kBlock = 4096;
  uint64_t target_mem = 0;
  const RemoteMemory remote = targetMemory(0, 2 * kRegion, &target_mem);
  auto local = localMemory(0, kRegion);
  const MemoryId mem = registerLocal(*local);
  std::vector<LocalDesc> blocks_l;
  std::vector<RemoteDesc> blocks_r;
  reversedBlocks(mem, remote.id, kRegion / kBlock, kBlock, &blocks_l, &blocks_r);
  const std::vector<LocalDesc> small_l{{mem, 0, 4096}};
  const std::vector<RemoteDesc> small_r{{remote.id, 0, 4096}};
  const std::vector<LocalDesc> whole_l{{mem, 0, kRegion}};
  const std::vector<RemoteDesc> whole_r{{remote.id, 0, kRegion}};
  struct Case {
    const char* what;
    bool on_target;
    gpu::AllocKind kind;
    OpKind op;
    const std::vector<LocalDesc>* l;
    const std::vector<RemoteDesc>* r;
    const char* reason;
  };
  const Case cases[] = {
      {"inline slot, initiator", false, gpu::AllocKind::kPinnedHost, OpKind::kWrite, &small_l,
       &small_r, "cudaHostAlloc"},
      {"channel slots, initiator", false, gpu::AllocKind::kPinnedHost, OpKind::kWrite, &whole_l,
       &whole_r, "cudaHostAlloc"},
      {"device staging, initiator", false, gpu::AllocKind::kDevice, OpKind::kWrite, &blocks_l,
       &blocks_r, "cudaMalloc"},
      {"channel slots, target", true, gpu::AllocKind::kPinnedHost, OpKind::kRead, &whole_l,
       &whole_r, "cudaHostAlloc"},
      {"device staging, target", true, gpu::AllocKind::kDevice, OpKind::kRead, &blocks_l, &blocks_r,
       "cudaMalloc"},
  };
  const auto inject = [&](const Case& c, int count) {
    if (c.on_target) {
      ASSERT_EQ(
          target_->call(strfmt("FAIL_ALLOC %s %d",
                               c.kind == gpu::AllocKind::kDevice ? "device" : "pinned", count)),
          "ok");
    } else {
      gpu::failNextAllocations(c.kind, count);
    }
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    inject(c, 1000);
    const Status failed = run(c.op, *c.l, *c.r);
    inject(c, 0);
    EXPECT_FALSE(failed.isOk());
    EXPECT_NE(failed.message().find(c.reason), std::string::npos) << failed.toString();
    if (c.on_target) {
      EXPECT_EQ(failed.code(), StatusCode::kRemoteRejected) << failed.toString();
    }
    EXPECT_EQ(engine_->peerState("target"), PeerState::kReady);
    // The same transfer, with memory there again.
    const uint64_t seed = tools::randomSeed();
    const size_t bytes = c.l->size() == 1 ? c.l->front().length : kRegion;
    if (c.op == OpKind::kWrite) {
      local->fill(0, kRegion, seed);
    } else if (c.l == &blocks_l) {
      // The target's blocks, laid out as CHECK_BLOCKS expects them, come back in order.
      local->fill(0, kRegion, seed);
      ASSERT_TRUE(run(OpKind::kWrite, *c.l, *c.r).isOk());
      local->fillByte(0, kRegion, kPoison);
    } else {
      target_->fill(target_mem, 0, bytes, seed);
      local->fillByte(0, kRegion, kPoison);
    }
    const Status again = run(c.op, *c.l, *c.r);
    ASSERT_TRUE(again.isOk()) << again.toString();
    if (c.l == &blocks_l) {
      if (c.op == OpKind::kWrite) {
        EXPECT_EQ(checkBlocks(target_mem, kBlock, kRegion / kBlock, seed), "ok");
      } else {
        EXPECT_EQ(local->check(0, kRegion, seed), -1);
      }
    } else if (c.op == OpKind::kWrite) {
      EXPECT_EQ(target_->check(target_mem, 0, bytes, seed), "ok");
    } else {
      EXPECT_EQ(local->check(0, bytes, seed), -1);
    }
  }
  ASSERT_TRUE(engine_->deregisterMemory(mem).isOk());
}

#if TCPX_P2P_HAVE_CUDA
// The driver calls an application makes to own a context (found through the runtime, as the
// engine does: the test binary does not link the driver).
struct OwnContextCalls {
  // cuCtxCreate as of CUDA 12.0 (its _v3): no execution-affinity parameters are passed.
  CUresult (*create)(CUcontext*, CUexecAffinityParam*, int, unsigned int, CUdevice) = nullptr;
  CUresult (*destroy)(CUcontext) = nullptr;
  CUresult (*get)(CUcontext*) = nullptr;
  CUresult (*set)(CUcontext) = nullptr;
};

template <typename Fn>
void findDriverCall(const char* name, Fn* fn) {
  void* ptr = nullptr;
  cudaDriverEntryPointQueryResult found{};
  if (cudaGetDriverEntryPointByVersion(name, &ptr, 12000, cudaEnableDefault, &found) ==
          cudaSuccess &&
      found == cudaDriverEntryPointSuccess) {
    *fn = reinterpret_cast<Fn>(ptr);
  }
}

// An application thread that made a context of its own on the engine's GPU (cuCtxCreate) and
// calls the engine with it current: the engine works in the GPU's primary context, where its
// streams and events live, and gives the thread its own context back after every call.
TEST_F(GpuTransferTest, CallsFromAThreadWithAContextOfItsOwnWorkAndGiveItBack) {
  OwnContextCalls calls;
  findDriverCall("cuCtxCreate", &calls.create);
  findDriverCall("cuCtxDestroy", &calls.destroy);
  findDriverCall("cuCtxGetCurrent", &calls.get);
  findDriverCall("cuCtxSetCurrent", &calls.set);
  ASSERT_TRUE(calls.create && calls.destroy && calls.get && calls.set);
  ASSERT_NO_FATAL_FAILURE(start());
  for (size_t size : {size_t{4096}, size_t{3u << 20}}) {
    SCOPED_TRACE("size " + std::to_string(size));
    uint64_t target_mem = 0;
    const RemoteMemory remote = targetMemory(0, size, &target_mem);
    auto local = localMemory(0, size);  // the primary context's, as frameworks allocate
    const uint64_t seed = tools::randomSeed();
    local->fill(0, size, seed);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);

    CUcontext own = nullptr;
    ASSERT_EQ(calls.create(&own, nullptr, 0, 0, 0), CUDA_SUCCESS);  // now current here
    const auto still_own = [&] {
      CUcontext now = nullptr;
      return calls.get(&now) == CUDA_SUCCESS && now == own;
    };
    auto id = engine_->registerMemory(local->data(), size, local->kind(), local->device());
    ASSERT_TRUE(id.isOk()) << id.status().toString();
    EXPECT_TRUE(still_own());
    const std::vector<LocalDesc> ldesc{{id.value(), 0, size}};
    const std::vector<RemoteDesc> rdesc{{remote.id, 0, size}};
    for (OpKind op : {OpKind::kWrite, OpKind::kRead}) {
      auto h = engine_->prepareTransfer(op, "target", ldesc, rdesc);
      ASSERT_TRUE(h.isOk()) << h.status().toString();
      EXPECT_TRUE(still_own());
      const Status posted = engine_->postTransfer(h.value());
      EXPECT_TRUE(still_own());
      ASSERT_TRUE(posted.isOk()) << posted.toString();
      const Status done = engine_->waitTransfer(h.value(), 30s);
      EXPECT_TRUE(done.isOk()) << done.toString();
      ASSERT_TRUE(engine_->releaseTransfer(h.value()).isOk());
      EXPECT_TRUE(still_own());
      if (op == OpKind::kWrite) {
        EXPECT_EQ(target_->check(target_mem, 0, size, seed), "ok");
        target_->fill(target_mem, 0, size, seed + 1);  // what the READ brings back
      }
    }
    ASSERT_TRUE(engine_->deregisterMemory(id.value()).isOk());
    EXPECT_TRUE(still_own());
    ASSERT_EQ(calls.destroy(own), CUDA_SUCCESS);
    ASSERT_EQ(calls.set(nullptr), CUDA_SUCCESS);
    ASSERT_EQ(cudaSetDevice(0), cudaSuccess);
    EXPECT_EQ(local->check(0, size, seed + 1), -1);  // the READ brought the target's bytes
  }
}
#endif

TEST_F(GpuTransferTest, TwoGpusInOneProcessAndAcrossProcesses) {
  if (gpuCount() < 2) GTEST_SKIP() << "needs two GPUs, this machine has " << gpuCount();
  ASSERT_NO_FATAL_FAILURE(start());
  constexpr size_t kSize = 8u << 20;
  uint64_t t1 = 0;
  const RemoteMemory remote = targetMemory(1, 2 * kSize, &t1);
  auto g0 = localMemory(0, kSize);
  auto g1 = localMemory(1, kSize);
  const MemoryId m0 = registerLocal(*g0), m1 = registerLocal(*g1);
  // 8 MiB per GPU goes through the channels; 2 KiB per GPU travels inline, one inline slot
  // gathering from both GPUs.
  constexpr size_t kSmall = 2048;
  for (size_t size : {kSize, kSmall}) {
    SCOPED_TRACE("size " + std::to_string(size));
    const uint64_t seed = tools::randomSeed();
    g0->fill(0, size, seed);
    g1->fill(0, size, seed + 1);
    ASSERT_TRUE(run(OpKind::kWrite, {{m0, 0, size}, {m1, 0, size}},
                    {{remote.id, 0, size}, {remote.id, size, size}})
                    .isOk());
    EXPECT_EQ(target_->check(t1, 0, size, seed), "ok");
    EXPECT_EQ(target_->check(t1, size, size, seed + 1), "ok");
  }
  // A small READ scatters into both GPUs.
  const uint64_t small_seed = tools::randomSeed();
  target_->fill(t1, 0, 2 * kSmall, small_seed);
  g0->fillByte(0, kSmall + 64, kPoison);
  g1->fillByte(0, kSmall + 64, kPoison);
  ASSERT_TRUE(run(OpKind::kRead, {{m1, 0, kSmall}, {m0, 0, kSmall}},
                  {{remote.id, 0, kSmall}, {remote.id, kSmall, kSmall}})
                  .isOk());
  EXPECT_EQ(g1->check(0, kSmall, small_seed), -1);
  EXPECT_EQ(g0->check(0, kSmall, small_seed, /*start=*/kSmall), -1);
  EXPECT_EQ(g0->checkByte(kSmall, 64, kPoison), -1);
  EXPECT_EQ(g1->checkByte(kSmall, 64, kPoison), -1);
}

}  // namespace
}  // namespace tcpx::testing
