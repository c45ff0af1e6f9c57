// The registry of local memory regions, and the one place where requests are checked against it.
//
// Invariants:
//   - ids are random, non-zero and never reused, so a stale id is NOT_FOUND, never another region;
//   - a region stays mapped while any in-flight transfer (local or remote-initiated) pins it:
//     remove() waits for the pins to drain, so the engine never touches memory after its owner
//     deregistered it;
//   - every remote request is validated here against the target's own registrations before a
//     single byte moves (region exists, kind allowed, offset + length inside, no overflow).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include <tcpx_p2p/status.h>
#include <tcpx_p2p/types.h>

#include "common/segment_list.h"
#include "control/frames.h"
#include "gpu/gpu.h"

namespace tcpx::engine {

struct RegionInfo {
  MemoryId id = 0;
  char* base = nullptr;
  uint64_t length = 0;
  MemoryKind kind = MemoryKind::kHost;
  int device = -1;
};

class MemoryRegistry {
 public:
  Result<MemoryId> add(void* addr, uint64_t length, MemoryKind kind, int device);
  // Forgets the region once no transfer pins it.
  Status remove(MemoryId id);
  [[nodiscard]] Result<RegionInfo> find(MemoryId id) const;

  // Resolves local descriptors to addresses; collects the distinct regions they use.
  Status resolveLocal(std::span<const LocalDesc> descs, SegmentList* out,
                      std::vector<MemoryId>* regions) const;

  // Target side: checks a peer's descriptors and resolves them; on success the regions are
  // pinned (release with unpin).
  Status resolveRemoteRequest(std::span<const control::WireDesc> descs, uint64_t total,
                              SegmentList* out, std::vector<MemoryId>* pinned);

  // Pins every region of `ids` or none (NOT_FOUND if one was deregistered).
  Status pin(std::span<const MemoryId> ids);
  void unpin(std::span<const MemoryId> ids);

  [[nodiscard]] size_t size() const;
  // Whether [addr, addr + length) lies inside one registered region (one being deregistered
  // included: it stays mapped while pinned).
  [[nodiscard]] bool covers(uint64_t addr, uint64_t length) const;

 private:
  Status resolveAndPin(std::span<const control::WireDesc> descs, uint64_t total, SegmentList* out,
                       std::vector<MemoryId>* pinned);

  struct Region {
    RegionInfo info;
    int pins = 0;
    bool closing = false;
  };

  mutable std::mutex mu_;
  std::condition_variable unpinned_;
  std::unordered_map<MemoryId, Region> regions_;
};

}  // namespace tcpx::engine
