// The registry: bounds, unknown ids, and pins that keep memory alive while transfers use it.
#include "engine/memory_registry.h"

#include <atomic>
#include <gtest/gtest.h>
#include <thread>
#include <vector>

namespace tcpx::engine {
namespace {

TEST(MemoryRegistry, RejectsNullZeroLengthAndWrappingRegistrations) {
  MemoryRegistry reg;
  char buf[16];
  EXPECT_EQ(reg.add(nullptr, 16, MemoryKind::kHost, -1).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(reg.add(buf, 0, MemoryKind::kHost, -1).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(
      reg.add(reinterpret_cast<void*>(UINTPTR_MAX - 4), 16, MemoryKind::kHost, -1).status().code(),
      StatusCode::kInvalidArgument);
  EXPECT_TRUE(reg.add(buf, 16, MemoryKind::kHost, -1).isOk());
}

TEST(MemoryRegistry, LocalDescriptorsAreCheckedForIdLengthAndBounds) {
  MemoryRegistry reg;
  std::vector<char> buf(100);
  const MemoryId id = reg.add(buf.data(), buf.size(), MemoryKind::kHost, -1).value();
  SegmentList segs;
  std::vector<MemoryId> regions;
  const LocalDesc ok[] = {{id, 0, 100}, {id, 99, 1}};
  ASSERT_TRUE(reg.resolveLocal(ok, &segs, &regions).isOk());
  EXPECT_EQ(segs.total(), 101u);
  EXPECT_EQ(regions, std::vector<MemoryId>{id});
  EXPECT_EQ(segs.slices()[1].data, buf.data() + 99);

  const LocalDesc unknown[] = {{id + 1, 0, 1}};
  EXPECT_EQ(reg.resolveLocal(unknown, &segs, &regions).code(), StatusCode::kNotFound);
  const LocalDesc zero[] = {{id, 0, 0}};
  EXPECT_EQ(reg.resolveLocal(zero, &segs, &regions).code(), StatusCode::kInvalidArgument);
  const LocalDesc past_end[] = {{id, 50, 51}};
  EXPECT_EQ(reg.resolveLocal(past_end, &segs, &regions).code(), StatusCode::kOutOfRange);
  const LocalDesc overflow[] = {{id, UINT64_MAX - 1, 4}};
  EXPECT_EQ(reg.resolveLocal(overflow, &segs, &regions).code(), StatusCode::kOutOfRange);
}

TEST(MemoryRegistry, RemoteRequestsAreValidatedAgainstRegistrationsAndTheirTotal) {
  MemoryRegistry reg;
  std::vector<char> buf(4096);
  const MemoryId id = reg.add(buf.data(), buf.size(), MemoryKind::kHost, -1).value();
  SegmentList segs;
  std::vector<MemoryId> pinned;
  const control::WireDesc good[] = {{id, 0, 10}, {id, 4000, 96}};
  ASSERT_TRUE(reg.resolveRemoteRequest(good, 106, &segs, &pinned).isOk());
  EXPECT_EQ(pinned, std::vector<MemoryId>{id});
  reg.unpin(pinned);

  EXPECT_EQ(reg.resolveRemoteRequest(good, 107, &segs, &pinned).code(),
            StatusCode::kLengthMismatch);
  const control::WireDesc outside[] = {{id, 4000, 97}};
  EXPECT_EQ(reg.resolveRemoteRequest(outside, 97, &segs, &pinned).code(), StatusCode::kOutOfRange);
  const control::WireDesc wrap[] = {{id, UINT64_MAX, 2}};
  EXPECT_EQ(reg.resolveRemoteRequest(wrap, 2, &segs, &pinned).code(), StatusCode::kOutOfRange);
  const control::WireDesc unknown[] = {{id ^ 1, 0, 1}};
  EXPECT_EQ(reg.resolveRemoteRequest(unknown, 1, &segs, &pinned).code(), StatusCode::kNotFound);
  EXPECT_EQ(reg.resolveRemoteRequest({}, 0, &segs, &pinned).code(), StatusCode::kInvalidArgument);
  // A refused request pins nothing: removal does not wait.
  EXPECT_TRUE(reg.remove(id).isOk());
}

TEST(MemoryRegistry, RemovalWaitsUntilInFlightTransfersUnpin) {
  MemoryRegistry reg;
  std::vector<char> buf(64);
  const MemoryId id = reg.add(buf.data(), buf.size(), MemoryKind::kHost, -1).value();
  const MemoryId ids[] = {id};
  ASSERT_TRUE(reg.pin(ids).isOk());
  std::atomic<bool> removed{false};
  std::thread remover([&] {
    EXPECT_TRUE(reg.remove(id).isOk());
    removed = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_FALSE(removed.load());
  // While removal is pending, new users are refused.
  EXPECT_EQ(reg.pin(ids).code(), StatusCode::kNotFound);
  EXPECT_EQ(reg.find(id).status().code(), StatusCode::kNotFound);
  reg.unpin(ids);
  remover.join();
  EXPECT_TRUE(removed.load());
  EXPECT_EQ(reg.size(), 0u);
  EXPECT_EQ(reg.remove(id).code(), StatusCode::kNotFound);
}

TEST(MemoryRegistry, IdsAreUniqueAndNeverZero) {
  MemoryRegistry reg;
  char buf[1];
  std::vector<MemoryId> ids;
  for (int i = 0; i < 1000; ++i) ids.push_back(reg.add(buf, 1, MemoryKind::kHost, -1).value());
  std::sort(ids.begin(), ids.end());
  EXPECT_EQ(std::adjacent_find(ids.begin(), ids.end()), ids.end());
  EXPECT_NE(ids.front(), 0u);
}

}  // namespace
}  // namespace tcpx::engine
