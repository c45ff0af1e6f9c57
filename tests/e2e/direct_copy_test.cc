// Direct copies between two engines' processes on one host (same_host_copy=auto): READ and WRITE
// of host memory move by cross-memory attach, every byte checked, with notifications after the
// bytes, both directions at once, releases and a killed peer; small transfers, GPU memory and a
// peer that does not offer them keep the data channels. PeerStats::direct_runs says which way
// each run went.
#include <signal.h>

#include <chrono>
#include <cstring>
#include <gtest/gtest.h>
#include <string>
#include <vector>

#include "e2e/e2e_fixture.h"

namespace tcpx::testing {
namespace {

const std::vector<std::pair<std::string, std::string>> kDirect{{"same_host_copy", "auto"}};

class DirectCopyTest : public TwoProcessTest {
 protected:
  uint64_t directRuns() {
    auto stats = engine_->peerStats("target");
    EXPECT_TRUE(stats.isOk()) << stats.status().toString();
    return stats.isOk() ? stats->direct_runs : 0;
  }
};

TEST_F(DirectCopyTest, ReadsAndWritesOfHostMemoryAreCopiedDirectlyByteForByte) {
  ASSERT_NO_FATAL_FAILURE(start(kDirect, kDirect));
  uint64_t expected = 0;
  // Past the inline threshold; around the size copied on the progress thread (256 KiB); long
  // copies on the copy thread, with odd sizes and offsets.
  for (size_t size : {size_t{65537}, size_t{256} << 10, (size_t{256} << 10) + 1,
                      (size_t{4} << 20) + 3, (size_t{17} << 20) + 5}) {
    SCOPED_TRACE("size " + std::to_string(size));
    constexpr size_t kOff = 4093;
    uint64_t target_mem = 0;
    const RemoteMemory remote = targetRegion(size + 2 * kOff, &target_mem);
    HostBuffer local(size + kOff);
    const MemoryId local_mem = localRegion(local);
    const uint64_t seed = tools::randomSeed();
    fillPattern(local.data() + kOff, size, seed);
    ASSERT_TRUE(run(OpKind::kWrite, {{local_mem, kOff, size}}, {{remote.id, kOff, size}}).isOk());
    EXPECT_EQ(target_->check(target_mem, kOff, size, seed), "ok");
    target_->fill(target_mem, kOff, size, seed + 1);
    ASSERT_TRUE(run(OpKind::kRead, {{local_mem, kOff, size}}, {{remote.id, kOff, size}}).isOk());
    EXPECT_EQ(checkPattern(local.data() + kOff, size, seed + 1), -1);
    expected += 2;
    EXPECT_EQ(directRuns(), expected);
    ASSERT_TRUE(engine_->deregisterMemory(local_mem).isOk());
  }

  // 512 blocks of 8 KiB, the remote ones in reverse order with a gap after each.
  constexpr size_t kBlock = 8192;
  constexpr size_t kBlocks = 512;
  uint64_t target_mem = 0;
  const RemoteMemory remote = targetRegion(2 * kBlock * kBlocks, &target_mem);
  HostBuffer local(kBlock * kBlocks);
  const MemoryId local_mem = localRegion(local);
  const uint64_t seed = tools::randomSeed();
  fillPattern(local.data(), local.size(), seed);
  std::vector<LocalDesc> ours;
  std::vector<RemoteDesc> theirs;
  for (size_t i = 0; i < kBlocks; ++i) {
    ours.push_back({local_mem, i * kBlock, kBlock});
    theirs.push_back({remote.id, (kBlocks - 1 - i) * 2 * kBlock, kBlock});
  }
  ASSERT_TRUE(run(OpKind::kWrite, ours, theirs).isOk());
  EXPECT_EQ(target_->call(strfmt("CHECK_BLOCKS %llu %zu %zu %llu",
                                 static_cast<unsigned long long>(target_mem), kBlock, kBlocks,
                                 static_cast<unsigned long long>(seed))),
            "ok");
  std::memset(local.data(), 0, local.size());
  ASSERT_TRUE(run(OpKind::kRead, ours, theirs).isOk());
  EXPECT_EQ(checkPattern(local.data(), local.size(), seed), -1);
  EXPECT_EQ(directRuns(), expected + 2);
}

TEST_F(DirectCopyTest, AWritesNotificationIsDeliveredOnlyOnceItsBytesAreInPlace) {
  ASSERT_NO_FATAL_FAILURE(start(kDirect, kDirect));
  checkNotificationsFollowTheBytes(-1, -1, size_t{32} << 20, 3);
  EXPECT_EQ(directRuns(), 3u);
}

TEST_F(DirectCopyTest, SmallTransfersAndPeersWithoutDirectCopiesTakeTheDataChannels) {
  // The target does not offer direct copies: everything takes the channels.
  ASSERT_NO_FATAL_FAILURE(start({{"same_host_copy", "off"}}, kDirect));
  roundTrip(size_t{1} << 20);
  EXPECT_EQ(directRuns(), 0u);
  // Both offer them: a transfer that travels inline still does.
  engine_.reset();
  target_.reset();
  ASSERT_NO_FATAL_FAILURE(start(kDirect, kDirect));
  roundTrip(4096);
  EXPECT_EQ(directRuns(), 0u);
  roundTrip(size_t{1} << 20);
  EXPECT_EQ(directRuns(), 2u);
}

TEST_F(DirectCopyTest, ReadsAndWritesBothWaysAtOnce) {
  ASSERT_NO_FATAL_FAILURE(start(kDirect, kDirect));
  checkReadsAndWritesBothWaysAtOnce(-1, -1);
  EXPECT_GE(directRuns(), 2u);
}

TEST_F(DirectCopyTest, AReleasedDirectReadFreesTheTargetsRegion) {
  ASSERT_NO_FATAL_FAILURE(start(kDirect, kDirect));
  constexpr size_t kSize = size_t{64} << 20;
  uint64_t target_mem = 0;
  const RemoteMemory remote = targetRegion(kSize, &target_mem);
  HostBuffer local(kSize);
  const MemoryId local_mem = localRegion(local);
  for (int round = 0; round < 5; ++round) {
    auto h = engine_->prepareTransfer(OpKind::kRead, "target",
                                      std::vector<LocalDesc>{{local_mem, 0, kSize}},
                                      std::vector<RemoteDesc>{{remote.id, 0, kSize}}, std::nullopt);
    ASSERT_TRUE(h.isOk());
    ASSERT_TRUE(engine_->postTransfer(h.value()).isOk());
    if (round > 0) std::this_thread::sleep_for(std::chrono::milliseconds(round));
    ASSERT_TRUE(engine_->releaseTransfer(h.value()).isOk());
  }
  // Released: nothing may write our memory any more, and the target's pins are gone (READ_DONE),
  // so it deregisters without waiting for anything.
  std::memset(local.data(), 0x5A, kSize);
  const auto before = std::chrono::steady_clock::now();
  EXPECT_EQ(target_->call("DEREGISTER " + std::to_string(target_mem)), "OK");
  EXPECT_LT(std::chrono::steady_clock::now() - before, 5s);
  std::this_thread::sleep_for(50ms);
  for (size_t i = 0; i < kSize; ++i) ASSERT_EQ(local.data()[i], 0x5A) << "byte " << i;
  ASSERT_TRUE(engine_->deregisterMemory(local_mem).isOk());
  roundTrip(size_t{1} << 20);  // and the peer still works
}

TEST_F(DirectCopyTest, AKilledTargetFailsDirectTransfersAtOnceAndReleasesEverything) {
  ASSERT_NO_FATAL_FAILURE(start(kDirect, kDirect));
  constexpr size_t kSize = size_t{16} << 20;
  uint64_t target_mem = 0;
  const RemoteMemory remote = targetRegion(kSize, &target_mem);
  HostBuffer local(kSize);
  const MemoryId local_mem = localRegion(local);
  roundTrip(size_t{1} << 20);  // direct copies are under way with this peer
  std::vector<TransferHandle> handles;
  for (int i = 0; i < 16; ++i) {
    auto h = engine_->prepareTransfer(i % 2 == 0 ? OpKind::kWrite : OpKind::kRead, "target",
                                      std::vector<LocalDesc>{{local_mem, 0, kSize}},
                                      std::vector<RemoteDesc>{{remote.id, 0, kSize}}, std::nullopt);
    ASSERT_TRUE(h.isOk());
    ASSERT_TRUE(engine_->postTransfer(h.value()).isOk());
    handles.push_back(h.value());
  }
  target_->kill(SIGKILL);
  const auto killed_at = std::chrono::steady_clock::now();
  for (TransferHandle h : handles) {
    const Status st = engine_->waitTransfer(h, 10s);
    if (!st.isOk()) {
      EXPECT_EQ(st.code(), StatusCode::kRemoteDisconnected) << st.toString();
    }
    EXPECT_TRUE(engine_->releaseTransfer(h).isOk());
  }
  EXPECT_LT(std::chrono::steady_clock::now() - killed_at, 4s);
  EXPECT_EQ(engine_->peerState("target"), PeerState::kFailed);
  ASSERT_TRUE(engine_->removePeer("target").isOk());
  ASSERT_TRUE(engine_->deregisterMemory(local_mem).isOk());
}

}  // namespace
}  // namespace tcpx::testing
