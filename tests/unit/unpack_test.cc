// Unpack metadata from a plugin is checked before anything is copied.
#include "engine/unpack.h"

#include <unistd.h>

#include <gtest/gtest.h>
#include <sys/mman.h>
#include <vector>

#include "common/memory_map.h"

namespace tcpx::engine {
namespace {

using transport::abi::LoadMeta;

Status check(const std::vector<LoadMeta>& frags, uint64_t size, uint64_t pool = 1 << 20) {
  std::vector<LoadMeta> scratch;
  return checkFragments(frags.data(), frags.size(), size, pool, &scratch);
}

TEST(CheckFragments, AcceptsShuffledFragmentsThatCoverTheReceiveOnce) {
  EXPECT_TRUE(check({{8192, 100, 4096}, {0, 4096, 0}, {4096 + 3, 1, 4196}}, 4197).isOk());
  EXPECT_TRUE(check({}, 0).isOk()) << "a zero-byte receive has no fragments";
}

TEST(CheckFragments, RejectsFragmentsOutsideThePoolOrTheReceive) {
  EXPECT_EQ(check({{(1 << 20) - 10, 11, 0}}, 11).code(), StatusCode::kProtocolError);
  EXPECT_EQ(check({{0, 4096, 4096}}, 4096).code(), StatusCode::kProtocolError);
  EXPECT_EQ(check({{0, 16, ~0ULL - 8}}, 4096).code(), StatusCode::kProtocolError)
      << "dst_off + len wraps around";
  EXPECT_EQ(check({{~0U - 4, 16, 0}}, 16, 0).code(), StatusCode::kProtocolError)
      << "past the 32-bit pool range when the pool size is unknown";
}

TEST(CheckFragments, RejectsBadLengthsGapsOverlapsAndTooManyEntries) {
  EXPECT_EQ(check({{0, 0, 0}, {0, 10, 0}}, 10).code(), StatusCode::kProtocolError);
  EXPECT_EQ(check({{0, 4097, 0}}, 4097).code(), StatusCode::kProtocolError);
  EXPECT_EQ(check({{0, 10, 0}, {100, 10, 20}}, 30).code(), StatusCode::kProtocolError) << "gap";
  EXPECT_EQ(check({{0, 10, 0}, {100, 10, 5}}, 15).code(), StatusCode::kProtocolError) << "overlap";
  EXPECT_EQ(check({{0, 10, 0}}, 20).code(), StatusCode::kProtocolError) << "missing tail";
  std::vector<LoadMeta> many;
  for (uint64_t i = 0; i < 2049; ++i) many.push_back({0, 1, i});
  EXPECT_EQ(check(many, 2049).code(), StatusCode::kProtocolError);
}

TEST(UnpackOnHost, CopiesFragmentsIntoScatteredPieces) {
  std::vector<char> pool(3 * 4096);
  for (size_t i = 0; i < pool.size(); ++i) pool[i] = static_cast<char>(i * 7);
  std::vector<char> a(5, 0);
  std::vector<char> b(20, 0);
  SegmentList segments;
  segments.add(a.data(), a.size());
  segments.add(b.data(), b.size());
  // Bytes 0..25 of the receive come from pool offsets 100.. and 4096+7..
  const std::vector<LoadMeta> frags = {{4096 + 7, 15, 10}, {100, 10, 0}};
  unpackOnHost(frags.data(), frags.size(), pool.data(), segments, 0);
  for (size_t i = 0; i < 5; ++i) EXPECT_EQ(a[i], pool[100 + i]);
  for (size_t i = 0; i < 5; ++i) EXPECT_EQ(b[i], pool[105 + i]);
  for (size_t i = 0; i < 15; ++i) EXPECT_EQ(b[5 + i], pool[4096 + 7 + i]);
}

// A bounce pool in host memory has no allocation size to ask CUDA for: its unpack bound is where
// the readable memory mapped at the pool ends.
TEST(MappedBytesAfter, EndsAtTheFirstUnreadablePageOrGap) {
  const auto page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* map = mmap(nullptr, 4 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(map, MAP_FAILED);
  auto* base = static_cast<char*>(map);
  ASSERT_EQ(mprotect(base + 3 * page, page, PROT_NONE), 0);
  EXPECT_EQ(mappedBytesAfter(base + 100), 3 * page - 100);
  EXPECT_EQ(mappedBytesAfter(base + 3 * page - 1), 1u);
  EXPECT_EQ(mappedBytesAfter(base + 3 * page), 0u) << "an unreadable page";
  ASSERT_EQ(munmap(base + 3 * page, page), 0);
  EXPECT_EQ(mappedBytesAfter(base + 3 * page), 0u) << "no mapping";
  EXPECT_EQ(mappedBytesAfter(nullptr), 0u);
  ASSERT_EQ(munmap(base, 3 * page), 0);
}

}  // namespace
}  // namespace tcpx::engine
