// The CUDA IPC exports of registered GPU memory, one per GPU allocation, shared by every region
// that lies in it.
//
// A region may span several allocations: memory of the CUDA VMM API mapped back to back (PyTorch's
// expandable segments map a growing pool that way). A same-host peer can map an allocation only
// as a whole, by its own handle, so a region's bytes are offered allocation by allocation. Only
// the allocation a region starts in is exported at registration (it tells whether the region can
// be shared at all); the others are exported when a direct transfer first reaches them, so a
// large pool holds descriptors only for the allocations direct transfers reached.
//
// Invariants:
//   - one export per allocation base, whatever the number of regions in it; it lives while a
//     region that used it is registered (a file-descriptor export keeps its descriptor open so
//     long); at most max_held of them hold a descriptor;
//   - forget() names the allocations no registered region uses any more: the caller asks every
//     peer that may have mapped them to unmap them before the memory can be freed.
//
// Thread-safe: registration runs on API threads, direct transfers on the progress thread.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include <tcpx_p2p/status.h>
#include <tcpx_p2p/types.h>

#include "gpu/gpu.h"

namespace tcpx::engine {

class IpcExports {
 public:
  // Exports the allocation holding an address of a GPU (gpu::exportIpc; tests pass their own).
  using Exporter = std::function<Result<gpu::IpcExport>(const void* addr, int device)>;

  // `max_held`: how many exports may hold an open file descriptor at once (VMM allocations).
  // Past it an allocation is not shared (its transfers take the data channels), so that
  // exports never use up the process's descriptors, which its sockets need too.
  IpcExports(Exporter exporter, size_t max_held)
      : exporter_(std::move(exporter)), max_held_(max_held) {}
  // The default bound: a quarter of the soft RLIMIT_NOFILE (at least 64).
  static size_t defaultMaxHeld();

  // A new region [addr, addr + length) of `device`: exports the allocation it starts in.
  // NOT_SUPPORTED (or CUDA's reason) where CUDA cannot share it: the region is not recorded and
  // its transfers with same-host peers take the data channels.
  Status add(MemoryId region, const void* addr, uint64_t length, int device);
  // Whether every region of `ids` was recorded by add().
  [[nodiscard]] bool shareable(std::span<const MemoryId> ids) const;
  // The export of the allocation holding `addr`, which lies in one of the regions `ids`;
  // exported now if no region used it yet. Null where the address is in none of them, or CUDA
  // cannot share that allocation.
  std::shared_ptr<const gpu::IpcExport> covering(std::span<const MemoryId> ids, uint64_t addr);
  // The region is gone: the bases of the allocations no remaining region uses, which are
  // forgotten too.
  std::vector<uint64_t> forget(MemoryId region);

 private:
  struct Region {
    uint64_t begin = 0;
    uint64_t end = 0;
    int device = -1;
    std::unordered_set<uint64_t> bases;  // allocations this region used, each counted once
  };
  struct Allocation {
    std::shared_ptr<const gpu::IpcExport> ipc;
    int users = 0;  // regions whose `bases` hold it
  };

  // The recorded allocation holding `addr`, or null (mu_ held).
  Allocation* holding(uint64_t addr);
  // Records `region` as a user of the allocation holding `addr`, exporting it first if needed
  // (mu_ held). Null where CUDA cannot share it; `why` then says why.
  std::shared_ptr<const gpu::IpcExport> use(Region& region, uint64_t addr, Status* why);

  Exporter exporter_;
  size_t max_held_;
  mutable std::mutex mu_;
  size_t held_ = 0;  // exports of allocations_ that hold a descriptor (IpcExport::held)
  std::unordered_map<MemoryId, Region> regions_;
  std::map<uint64_t, Allocation> allocations_;  // by base
};

}  // namespace tcpx::engine
