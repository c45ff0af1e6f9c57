// The table of IPC exports: one per allocation whatever the number of regions in it, allocations
// after the first exported on first use, and released only when no region uses them.
#include "engine/ipc_exports.h"

#include <algorithm>
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <vector>

namespace tcpx::engine {
namespace {

// A pretend GPU address space: allocations of kPart bytes back to back from kBase, except the
// ones listed as private (CUDA cannot share them). Counts the exports made.
struct FakeAllocations {
  static constexpr uint64_t kBase = 0x7f0000000000;
  static constexpr uint64_t kPart = 2 << 20;
  std::vector<uint64_t> private_parts;
  bool with_descriptors = false;  // exports hold a descriptor, as VMM allocations' do
  int exports = 0;
  int open_descriptors = 0;

  IpcExports::Exporter exporter() {
    return [this](const void* addr, int device) -> Result<gpu::IpcExport> {
      const auto at = reinterpret_cast<uint64_t>(addr);
      const uint64_t part = (at - kBase) / kPart;
      if (std::find(private_parts.begin(), private_parts.end(), part) != private_parts.end()) {
        return Status(StatusCode::kNotSupported, "not memory CUDA IPC can share");
      }
      ++exports;
      gpu::IpcExport out;
      out.handle.assign(gpu::kIpcHandleBytes, static_cast<char>(exports));
      out.base = kBase + part * kPart;
      out.size = kPart;
      out.bus_id = "0000:04:00.0";
      if (with_descriptors) {
        ++open_descriptors;
        out.held = std::shared_ptr<const void>(new int(0), [this](const void* p) {
          delete static_cast<const int*>(p);
          --open_descriptors;
        });
      }
      EXPECT_EQ(device, 0);
      return out;
    };
  }
};

const void* at(uint64_t offset) {
  return reinterpret_cast<const void*>(FakeAllocations::kBase + offset);
}

TEST(IpcExports, ARegionOverSeveralAllocationsExportsEachOnFirstUseAndOnlyOnce) {
  FakeAllocations fake;
  IpcExports table(fake.exporter(), 1024);
  constexpr uint64_t kPart = FakeAllocations::kPart;
  const MemoryId region = 7;
  // Starts in the middle of the first allocation, ends in the third.
  ASSERT_TRUE(table.add(region, at(kPart / 2), 2 * kPart, 0).isOk());
  EXPECT_EQ(fake.exports, 1) << "only the allocation the region starts in, at registration";
  const MemoryId ids[] = {region};
  EXPECT_TRUE(table.shareable(ids));

  auto first = table.covering(ids, FakeAllocations::kBase + kPart - 1);
  ASSERT_NE(first, nullptr);
  EXPECT_EQ(first->base, FakeAllocations::kBase);
  EXPECT_EQ(fake.exports, 1);
  auto second = table.covering(ids, FakeAllocations::kBase + kPart);
  ASSERT_NE(second, nullptr);
  EXPECT_EQ(second->base, FakeAllocations::kBase + kPart);
  EXPECT_EQ(fake.exports, 2);
  EXPECT_EQ(table.covering(ids, FakeAllocations::kBase + 2 * kPart - 1), second);
  EXPECT_EQ(fake.exports, 2) << "a known allocation is not exported again";
  // Outside the region: nothing, even inside an allocation it uses.
  EXPECT_EQ(table.covering(ids, FakeAllocations::kBase + kPart / 2 - 1), nullptr);
  EXPECT_EQ(table.covering(ids, FakeAllocations::kBase + kPart / 2 + 2 * kPart), nullptr);
  const MemoryId other[] = {region + 1};
  EXPECT_EQ(table.covering(other, FakeAllocations::kBase + kPart), nullptr);
  EXPECT_FALSE(table.shareable(other));

  std::vector<uint64_t> released = table.forget(region);
  std::sort(released.begin(), released.end());
  EXPECT_EQ(released,
            (std::vector<uint64_t>{FakeAllocations::kBase, FakeAllocations::kBase + kPart}));
  EXPECT_FALSE(table.shareable(ids));
  EXPECT_TRUE(table.forget(region).empty()) << "forgetting twice releases nothing";
}

TEST(IpcExports, AnAllocationSharedByTwoRegionsIsReleasedWithTheLastOfThem) {
  FakeAllocations fake;
  IpcExports table(fake.exporter(), 1024);
  constexpr uint64_t kPart = FakeAllocations::kPart;
  ASSERT_TRUE(table.add(1, at(0), 4096, 0).isOk());
  ASSERT_TRUE(table.add(2, at(8192), 4096, 0).isOk());
  EXPECT_EQ(fake.exports, 1) << "one export for both regions of one allocation";
  // Region 3 starts in the same allocation and reaches into the next one.
  ASSERT_TRUE(table.add(3, at(kPart - 4096), 8192, 0).isOk());
  const MemoryId three[] = {3};
  ASSERT_NE(table.covering(three, FakeAllocations::kBase + kPart), nullptr);
  EXPECT_EQ(fake.exports, 2);

  EXPECT_TRUE(table.forget(1).empty());
  EXPECT_EQ(table.forget(3), std::vector<uint64_t>{FakeAllocations::kBase + kPart});
  EXPECT_EQ(table.forget(2), std::vector<uint64_t>{FakeAllocations::kBase});
  // The allocation registered again is exported afresh.
  ASSERT_TRUE(table.add(4, at(0), 4096, 0).isOk());
  EXPECT_EQ(fake.exports, 3);
}

TEST(IpcExports, AnAllocationCudaCannotShareIsRefusedWhereItIsNeeded) {
  FakeAllocations fake;
  fake.private_parts = {0, 2};
  IpcExports table(fake.exporter(), 1024);
  constexpr uint64_t kPart = FakeAllocations::kPart;
  EXPECT_EQ(table.add(1, at(0), 4096, 0).code(), StatusCode::kNotSupported);
  const MemoryId one[] = {1};
  EXPECT_FALSE(table.shareable(one)) << "a region starting in private memory is not recorded";
  EXPECT_TRUE(table.forget(1).empty());
  // Starts in shareable memory and runs into a private allocation: what lies there is refused.
  ASSERT_TRUE(table.add(2, at(kPart), 2 * kPart, 0).isOk());
  const MemoryId two[] = {2};
  EXPECT_NE(table.covering(two, FakeAllocations::kBase + kPart), nullptr);
  EXPECT_EQ(table.covering(two, FakeAllocations::kBase + 2 * kPart), nullptr);
  EXPECT_EQ(table.forget(2), std::vector<uint64_t>{FakeAllocations::kBase + kPart});
}

TEST(IpcExports, ExportsHoldingDescriptorsStopAtTheirBoundAndFreeTheirPlaces) {
  FakeAllocations fake;
  fake.with_descriptors = true;
  constexpr uint64_t kPart = FakeAllocations::kPart;
  {
    IpcExports table(fake.exporter(), 2);
    // One region over four allocations: two may be shared, the third is refused and its
    // descriptor closed at once.
    ASSERT_TRUE(table.add(1, at(0), 4 * kPart, 0).isOk());
    const MemoryId one[] = {1};
    EXPECT_NE(table.covering(one, FakeAllocations::kBase + kPart), nullptr);
    EXPECT_EQ(table.covering(one, FakeAllocations::kBase + 2 * kPart), nullptr);
    EXPECT_EQ(fake.open_descriptors, 2);
    // A known allocation is still served at the bound.
    EXPECT_NE(table.covering(one, FakeAllocations::kBase + kPart + 1), nullptr);
    // Another region's registration at the bound: refused with the reason.
    EXPECT_EQ(table.add(2, at(5 * kPart), 4096, 0).code(), StatusCode::kResourceExhausted);
    EXPECT_EQ(fake.open_descriptors, 2);
    // Forgetting frees both places.
    EXPECT_EQ(table.forget(1).size(), 2u);
    EXPECT_EQ(fake.open_descriptors, 0);
    ASSERT_TRUE(table.add(2, at(5 * kPart), 4096, 0).isOk());
    const MemoryId two[] = {2};
    ASSERT_TRUE(table.add(3, at(6 * kPart), 4096, 0).isOk());
    const MemoryId three[] = {3};
    EXPECT_TRUE(table.shareable(two));
    EXPECT_TRUE(table.shareable(three));
    EXPECT_EQ(fake.open_descriptors, 2);
  }
  EXPECT_EQ(fake.open_descriptors, 0) << "the table's descriptors close with it";
}

TEST(IpcExports, TheDefaultBoundIsAQuarterOfTheDescriptorLimit) {
  rlimit limit{};
  ASSERT_EQ(getrlimit(RLIMIT_NOFILE, &limit), 0);
  if (limit.rlim_cur != RLIM_INFINITY && limit.rlim_cur >= 256) {
    EXPECT_EQ(IpcExports::defaultMaxHeld(), limit.rlim_cur / 4);
  }
  EXPECT_GE(IpcExports::defaultMaxHeld(), 64u);
}

}  // namespace
}  // namespace tcpx::engine
