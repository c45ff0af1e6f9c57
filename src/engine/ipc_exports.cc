#include "engine/ipc_exports.h"

#include <algorithm>
#include <sys/resource.h>

#include "common/log.h"
#include "common/strings.h"

namespace tcpx::engine {

Status IpcExports::add(MemoryId region, const void* addr, uint64_t length, int device) {
  std::lock_guard<std::mutex> lock(mu_);
  Region r;
  r.begin = reinterpret_cast<uintptr_t>(addr);
  r.end = r.begin + length;
  r.device = device;
  Status why;
  if (use(r, r.begin, &why) == nullptr) return why;
  regions_.emplace(region, std::move(r));
  return {};
}

bool IpcExports::shareable(std::span<const MemoryId> ids) const {
  std::lock_guard<std::mutex> lock(mu_);
  return std::all_of(ids.begin(), ids.end(), [this](MemoryId id) { return regions_.count(id); });
}

std::shared_ptr<const gpu::IpcExport> IpcExports::covering(std::span<const MemoryId> ids,
                                                           uint64_t addr) {
  std::lock_guard<std::mutex> lock(mu_);
  for (MemoryId id : ids) {
    auto it = regions_.find(id);
    if (it == regions_.end() || addr < it->second.begin || addr >= it->second.end) continue;
    Status why;
    auto ipc = use(it->second, addr, &why);
    if (ipc == nullptr) {
      LOG_DEBUG("GPU memory at %#llx: no direct copies with same-host peers (%s)",
                static_cast<unsigned long long>(addr), why.message().c_str());
    }
    return ipc;
  }
  return nullptr;
}

size_t IpcExports::defaultMaxHeld() {
  rlimit limit{};
  if (getrlimit(RLIMIT_NOFILE, &limit) != 0 || limit.rlim_cur == RLIM_INFINITY) return 1024;
  return std::max<size_t>(64, static_cast<size_t>(limit.rlim_cur) / 4);
}

std::vector<uint64_t> IpcExports::forget(MemoryId region) {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<uint64_t> unused;
  auto it = regions_.find(region);
  if (it == regions_.end()) return unused;
  for (uint64_t base : it->second.bases) {
    auto a = allocations_.find(base);
    if (a == allocations_.end() || --a->second.users > 0) continue;
    if (a->second.ipc->held != nullptr) --held_;
    allocations_.erase(a);
    unused.push_back(base);
  }
  regions_.erase(it);
  return unused;
}

IpcExports::Allocation* IpcExports::holding(uint64_t addr) {
  auto it = allocations_.upper_bound(addr);
  if (it == allocations_.begin()) return nullptr;
  --it;
  const gpu::IpcExport& ipc = *it->second.ipc;
  return addr - ipc.base < ipc.size ? &it->second : nullptr;
}

std::shared_ptr<const gpu::IpcExport> IpcExports::use(Region& region, uint64_t addr, Status* why) {
  Allocation* known = holding(addr);
  if (known == nullptr) {
    auto exported = exporter_(reinterpret_cast<const void*>(addr), region.device);
    if (!exported.isOk()) {
      *why = exported.status();
      return nullptr;
    }
    const uint64_t base = exported->base;
    if (exported->size == 0 || addr < base || addr - base >= exported->size) {
      *why = Status(StatusCode::kInternal, "the allocation CUDA named does not hold the address");
      return nullptr;
    }
    const bool holds = exported->held != nullptr;
    if (holds && held_ >= max_held_) {
      // The export goes again here, closing its descriptor.
      *why = Status(StatusCode::kResourceExhausted,
                    strfmt("%zu exported allocations hold a file descriptor already (a quarter "
                           "of the process's limit)",
                           held_));
      return nullptr;
    }
    // An entry at that base not holding `addr` is of an allocation freed while registered:
    // the new export replaces it, its users stay counted.
    known = &allocations_[base];
    if (known->ipc != nullptr && known->ipc->held != nullptr) --held_;
    known->ipc = std::make_shared<const gpu::IpcExport>(std::move(exported.value()));
    if (holds) ++held_;
  }
  const uint64_t base = known->ipc->base;
  // Looked up per piece of a direct transfer: a set, as a pool's region may use thousands.
  if (region.bases.insert(base).second) ++known->users;
  return known->ipc;
}

}  // namespace tcpx::engine
