// READ and WRITE between two processes over loopback: sizes, batches, both directions at once.
#include <cstring>
#include <gtest/gtest.h>
#include <thread>

#include "e2e/e2e_fixture.h"

namespace tcpx::testing {
namespace {

constexpr uint8_t kPoison = 0xA5;  // what ForkedPeer and HostBuffer fill fresh memory with

class TransferTest : public TwoProcessTest {};

TEST_F(TransferTest, WriteAndReadMoveEverySizeFromOneByteTo64MiBExactly) {
  start();
  constexpr size_t kRegion = (64u << 20) + 4096;
  uint64_t target_mem = 0;
  const RemoteMemory remote = targetRegion(kRegion, &target_mem);
  HostBuffer local(kRegion);
  const MemoryId local_mem = localRegion(local);

  const size_t sizes[] = {
      1, 7, 4096, 16384, 16385, 100000, 512 * 1024, 512 * 1024 + 1, 3 * (1u << 20) + 5, 64u << 20};
  uint64_t seed = randomU64();
  for (size_t size : sizes) {
    SCOPED_TRACE("size " + std::to_string(size));
    // Unaligned offsets on both sides; bytes around the destination must stay untouched.
    const uint64_t loff = 3, roff = 5;
    fillPattern(local.data() + loff, size, ++seed);
    ASSERT_TRUE(run(OpKind::kWrite, {{local_mem, loff, size}}, {{remote.id, roff, size}}).isOk());
    EXPECT_EQ(target_->check(target_mem, roff, size, seed), "ok");
    EXPECT_EQ(target_->checkByte(target_mem, 0, roff, kPoison), "ok");
    EXPECT_EQ(target_->checkByte(target_mem, roff + size, 64, kPoison), "ok");

    const uint64_t read_seed = ++seed;
    target_->fill(target_mem, 0, size, read_seed);
    std::memset(local.data(), kPoison, size + 128);
    ASSERT_TRUE(run(OpKind::kRead, {{local_mem, 11, size}}, {{remote.id, 0, size}}).isOk());
    EXPECT_EQ(checkPattern(local.data() + 11, size, read_seed), -1);
    for (size_t i = 0; i < 11; ++i) ASSERT_EQ(local.data()[i], kPoison);
    for (size_t i = 11 + size; i < 11 + size + 64; ++i) ASSERT_EQ(local.data()[i], kPoison);
    // Restore the target's poison for the next size's guard checks.
    target_->call("FILL_BYTE " + std::to_string(target_mem) + " 0 " +
                  std::to_string(size + roff + 128) + " 165");
  }
}

TEST_F(TransferTest, BatchesOfUpTo4096ScatteredDescriptorsLandInTheirOwnPlaces) {
  start();
  for (const auto& [count, block] :
       {std::pair<size_t, size_t>{1, 4096}, {16, 4096}, {1024, 16384}, {4096, 4096}, {300, 1000}}) {
    SCOPED_TRACE(std::to_string(count) + " x " + std::to_string(block));
    const size_t total = count * block;
    uint64_t target_mem = 0;
    const RemoteMemory remote = targetRegion(2 * total, &target_mem);
    HostBuffer local(2 * total);
    const MemoryId local_mem = localRegion(local);
    const uint64_t seed = randomU64();
    fillPattern(local.data(), total, seed);

    // Local block i goes to remote slot (count - 1 - i) of a layout with gaps (stride 2 blocks).
    std::vector<LocalDesc> ldesc;
    std::vector<RemoteDesc> rdesc;
    for (size_t i = 0; i < count; ++i) {
      ldesc.push_back({local_mem, i * block, block});
      rdesc.push_back({remote.id, (count - 1 - i) * 2 * block, block});
    }
    ASSERT_TRUE(run(OpKind::kWrite, ldesc, rdesc).isOk());
    EXPECT_EQ(
        target_->call("CHECK_BLOCKS " + std::to_string(target_mem) + " " + std::to_string(block) +
                      " " + std::to_string(count) + " " + std::to_string(seed)),
        "ok");

    // Read the scattered blocks back into a fresh buffer, in the original order.
    HostBuffer back(total);
    const MemoryId back_mem = localRegion(back);
    for (size_t i = 0; i < count; ++i) ldesc[i].mem = back_mem;
    ASSERT_TRUE(run(OpKind::kRead, ldesc, rdesc).isOk());
    EXPECT_EQ(checkPattern(back.data(), total, seed), -1);
    ASSERT_TRUE(engine_->deregisterMemory(back_mem).isOk());
    ASSERT_TRUE(engine_->deregisterMemory(local_mem).isOk());
  }
}

TEST_F(TransferTest, ReadsAndWritesInBothDirectionsAtOnceStayInStep) {
  start();
  // Four disjoint quarters on each side:
  //   ours:    L0 written by the target, L1 read by the target, L2 our WRITE source, L3 our READ
  //            destination;
  //   target:  T0 its WRITE source, T1 its READ destination, T2 our WRITE destination, T3 our
  //            READ source.
  constexpr size_t kQ = 16u << 20;
  uint64_t target_mem = 0;
  const RemoteMemory remote = targetRegion(4 * kQ, &target_mem);
  HostBuffer local(4 * kQ);
  const MemoryId local_mem = localRegion(local);
  const std::string loaded = target_->loadRemote(engine_->memoryDescriptor(local_mem).value());
  ASSERT_EQ(loaded.rfind("OK ", 0), 0u) << loaded;
  const std::string ours = loaded.substr(3);
  const std::string tmem = std::to_string(target_mem);

  const uint64_t seed_t0 = randomU64(), seed_l1 = randomU64(), seed_l2 = randomU64(),
                 seed_t3 = randomU64();
  target_->fill(target_mem, 0, kQ, seed_t0);
  target_->fill(target_mem, 3 * kQ, kQ, seed_t3);
  fillPattern(local.data() + kQ, kQ, seed_l1);
  fillPattern(local.data() + 2 * kQ, kQ, seed_l2);

  // 1 MiB descriptors: many chunks of all four transfers interleave on every channel.
  const std::string blocks = " 1048576 " + std::to_string(kQ >> 20) + " -";
  ASSERT_EQ(target_->call("XFER_ASYNC W initiator " + tmem + " 0 " + ours + " 0" + blocks),
            "started 0");
  ASSERT_EQ(target_->call("XFER_ASYNC R initiator " + tmem + " " + std::to_string(kQ) + " " + ours +
                          " " + std::to_string(kQ) + blocks),
            "started 1");
  Status write_status, read_status;
  std::thread writer([&] {
    write_status = run(OpKind::kWrite, {{local_mem, 2 * kQ, kQ}}, {{remote.id, 2 * kQ, kQ}});
  });
  std::thread reader([&] {
    read_status = run(OpKind::kRead, {{local_mem, 3 * kQ, kQ}}, {{remote.id, 3 * kQ, kQ}});
  });
  writer.join();
  reader.join();
  ASSERT_TRUE(write_status.isOk()) << write_status.toString();
  ASSERT_TRUE(read_status.isOk()) << read_status.toString();
  EXPECT_EQ(target_->call("WAIT_ASYNC 0"), "OK");
  EXPECT_EQ(target_->call("WAIT_ASYNC 1"), "OK");

  EXPECT_EQ(checkPattern(local.data(), kQ, seed_t0), -1);
  EXPECT_EQ(target_->check(target_mem, kQ, kQ, seed_l1), "ok");
  EXPECT_EQ(target_->check(target_mem, 2 * kQ, kQ, seed_l2), "ok");
  EXPECT_EQ(checkPattern(local.data() + 3 * kQ, kQ, seed_t3), -1);
}

TEST_F(TransferTest, TheSameHandleCanBePostedAgainAfterItCompletes) {
  start();
  uint64_t target_mem = 0;
  const RemoteMemory remote = targetRegion(1 << 20, &target_mem);
  HostBuffer local(1 << 20);
  const MemoryId local_mem = localRegion(local);
  const std::vector<LocalDesc> ldesc{{local_mem, 0, 1 << 20}};
  const std::vector<RemoteDesc> rdesc{{remote.id, 0, 1 << 20}};
  auto h = engine_->prepareTransfer(OpKind::kWrite, "target", ldesc, rdesc);
  ASSERT_TRUE(h.isOk());
  EXPECT_EQ(engine_->checkTransfer(h.value()).code(), StatusCode::kNotPosted);
  for (int round = 0; round < 5; ++round) {
    const uint64_t seed = randomU64();
    fillPattern(local.data(), 1 << 20, seed);
    ASSERT_TRUE(engine_->postTransfer(h.value()).isOk());
    const Status again = engine_->postTransfer(h.value());
    if (!again.isOk()) {
      EXPECT_EQ(again.code(), StatusCode::kRepostActive);
    }
    ASSERT_TRUE(engine_->waitTransfer(h.value(), 30s).isOk());
    EXPECT_EQ(target_->check(target_mem, 0, 1 << 20, seed), "ok");
  }
  EXPECT_TRUE(engine_->releaseTransfer(h.value()).isOk());
}

}  // namespace
}  // namespace tcpx::testing
