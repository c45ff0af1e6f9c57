// Chunk mapping and channel windows: both sides derive the same per-channel order.
#include "engine/chunk_plan.h"

#include <cstring>
#include <gtest/gtest.h>
#include <random>

#include "engine/channel_window.h"

namespace tcpx::engine {
namespace {

TEST(ChunkPlan, ChunkCountRoundsUpAndRangesCoverTheStreamExactly) {
  EXPECT_EQ(ChunkPlan::chunkCount(1, 512), 1u);
  EXPECT_EQ(ChunkPlan::chunkCount(512, 512), 1u);
  EXPECT_EQ(ChunkPlan::chunkCount(513, 512), 2u);
  uint64_t covered = 0;
  for (uint32_t k = 0; k < ChunkPlan::chunkCount(5000, 512); ++k) {
    const auto [b, e] = ChunkPlan::chunkRange(5000, 512, k);
    EXPECT_EQ(b, covered);
    EXPECT_GT(e, b);
    covered = e;
  }
  EXPECT_EQ(covered, 5000u);
}

TEST(ChunkPlan, StreamsSpreadOverAllChannelsBetweenTheMinimumAndMaximumChunk) {
  constexpr uint64_t kMax = 512 * 1024;
  EXPECT_EQ(ChunkPlan::chunkSizeFor(512 * 1024, kMax, 4), 128u * 1024);  // four chunks
  EXPECT_EQ(ChunkPlan::chunkSizeFor(1 << 20, kMax, 8), 128u * 1024);     // eight chunks
  EXPECT_EQ(ChunkPlan::chunkSizeFor(1000, kMax, 4), ChunkPlan::kMinChunk);
  EXPECT_EQ(ChunkPlan::chunkSizeFor(64u << 20, kMax, 4), kMax);
  EXPECT_EQ(ChunkPlan::chunkSizeFor(300001, kMax, 4) % 4096, 0u);
  EXPECT_EQ(ChunkPlan::chunkSizeFor(1 << 20, 32 * 1024, 4), 32u * 1024);  // max below the floor
  for (uint64_t total : {1ull, 4097ull, 100000ull, 1ull << 20, 3ull << 20, 64ull << 20}) {
    const uint64_t chunk = ChunkPlan::chunkSizeFor(total, kMax, 4);
    EXPECT_LE(chunk, kMax);
    EXPECT_GE(static_cast<uint64_t>(ChunkPlan::chunkCount(total, chunk)) * chunk, total);
  }
}

TEST(ChunkPlan, ASenderSpreadsAStreamOverFewerChunksAsMoreStreamsMove) {
  // A stream alone gets every socket; others moving share them; never below one chunk.
  EXPECT_EQ(ChunkPlan::spreadFor(8, 0), 8u);
  EXPECT_EQ(ChunkPlan::spreadFor(8, 1), 4u);
  EXPECT_EQ(ChunkPlan::spreadFor(8, 3), 2u);
  EXPECT_EQ(ChunkPlan::spreadFor(8, 7), 1u);
  EXPECT_EQ(ChunkPlan::spreadFor(8, 1000), 1u);
  EXPECT_EQ(ChunkPlan::spreadFor(2, 0), 2u);
  // 1 MiB over 4 channels of 2 sockets: 8 chunks alone, 2 (of the 512 KiB maximum) among many.
  constexpr uint64_t kMax = 512 * 1024;
  EXPECT_EQ(ChunkPlan::chunkSizeFor(1 << 20, kMax, ChunkPlan::spreadFor(8, 0)), 128u * 1024);
  EXPECT_EQ(ChunkPlan::chunkSizeFor(1 << 20, kMax, ChunkPlan::spreadFor(8, 15)), 512u * 1024);
}

// What the sender posts on each channel, walking streams in order and taking chunk g+k on
// channel (g+k) mod C, must equal what a receiver walking the same announcements posts.
TEST(ChunkPlan, PerChannelSequencesAgreeForAnyMixOfStreams) {
  std::mt19937_64 rng(42);
  for (uint32_t channels : {1u, 2u, 3u, 4u, 8u}) {
    std::vector<std::pair<uint64_t, uint32_t>> streams;  // (first_chunk, nchunks)
    uint64_t next = 0;
    for (int s = 0; s < 50; ++s) {
      const uint32_t n = 1 + static_cast<uint32_t>(rng() % 9);
      streams.emplace_back(next, n);
      next += n;
    }
    // Global order: chunk g goes to channel g mod C.
    std::vector<std::vector<uint64_t>> expected(channels);
    for (uint64_t g = 0; g < next; ++g) expected[g % channels].push_back(g);
    // Per-channel walk using firstChunkOnChannel.
    for (uint32_t c = 0; c < channels; ++c) {
      std::vector<uint64_t> got;
      for (const auto& [first, n] : streams) {
        for (uint32_t k = ChunkPlan::firstChunkOnChannel(first, c, channels); k < n;
             k += channels) {
          EXPECT_EQ(ChunkPlan::channelOf(first + k, channels), c);
          got.push_back(first + k);
        }
      }
      EXPECT_EQ(got, expected[c]) << "channel " << c << " of " << channels;
    }
  }
}

TEST(SegmentList, LocateGatherAndScatterCrossPieceBoundaries) {
  char a[3] = {'a', 'b', 'c'};
  char b[1] = {'d'};
  char c[4] = {'e', 'f', 'g', 'h'};
  SegmentList list;
  list.add(a, 3);
  list.add(b, 1);
  list.add(c, 4);
  EXPECT_EQ(list.total(), 8u);
  EXPECT_EQ(list.locate(0), (std::pair<size_t, uint64_t>{0, 0}));
  EXPECT_EQ(list.locate(2), (std::pair<size_t, uint64_t>{0, 0}));
  EXPECT_EQ(list.locate(3), (std::pair<size_t, uint64_t>{1, 3}));
  EXPECT_EQ(list.locate(7), (std::pair<size_t, uint64_t>{2, 4}));
  char out[6] = {};
  list.gather(1, out, 6);
  EXPECT_EQ(std::string(out, 6), "bcdefg");
  list.scatter(2, "XYZ", 3);
  EXPECT_EQ(std::string(a, 3), "abX");
  EXPECT_EQ(b[0], 'Y');
  EXPECT_EQ(c[0], 'Z');
}

TEST(SegmentList, KnowsWhichByteRangesTouchGpuMemory) {
  char a[100], c[100];
  SegmentList list;
  list.add(a, 100);                                  // host [0, 100)
  list.add(reinterpret_cast<void*>(0x1000), 50, 0);  // GPU 0 [100, 150)
  list.add(c, 100);                                  // host [150, 250)
  EXPECT_TRUE(list.anyDevice());
  EXPECT_FALSE(list.anyDevice(0, 100));
  EXPECT_TRUE(list.anyDevice(99, 101));
  EXPECT_TRUE(list.anyDevice(149, 150));
  EXPECT_FALSE(list.anyDevice(150, 250));
  EXPECT_TRUE(list.anyDevice(0, 250));
  EXPECT_EQ(list.device(1), 0);
  EXPECT_EQ(list.device(2), SegmentList::kHost);
  SegmentList host_only;
  host_only.add(a, 10);
  EXPECT_FALSE(host_only.anyDevice());
  EXPECT_FALSE(host_only.anyDevice(0, 10));
}

TEST(ChannelWindow, KeepsChunkOrderAndCountsWhatIsInTheTransport) {
  ChannelWindow w(3);
  EXPECT_TRUE(w.empty());
  for (uint32_t i = 0; i < 3; ++i) {
    w.push().chunk = i;
    w.enteredTransport();
  }
  EXPECT_TRUE(w.transportFull());
  EXPECT_FALSE(w.full());  // staged chunks may queue behind the transport's window
  EXPECT_EQ(w.oldest().chunk, 0u);
  EXPECT_EQ(w.at(2).chunk, 2u);
  w.leftTransport();
  w.popOldest();
  EXPECT_FALSE(w.transportFull());
  w.push().chunk = 3;
  for (uint32_t i = 1; i <= 3; ++i) {
    EXPECT_EQ(w.oldest().chunk, i);
    w.popOldest();
  }
  EXPECT_TRUE(w.empty());
  for (uint32_t i = 0; i < ChannelWindow::kCapacity; ++i) w.push();
  EXPECT_TRUE(w.full());
  // Never more than the transport's 16 in flight, whatever is asked.
  EXPECT_EQ(ChannelWindow(40).limit(), 16u);
}

}  // namespace
}  // namespace tcpx::engine
