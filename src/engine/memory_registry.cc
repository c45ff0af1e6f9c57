#include "engine/memory_registry.h"

#include <algorithm>

#include "common/random.h"
#include "common/strings.h"

namespace tcpx::engine {
namespace {

// offset + length inside [0, region_length), without overflow.
bool inside(uint64_t offset, uint64_t length, uint64_t region_length) {
  return offset <= region_length && length <= region_length - offset;
}

void addDistinct(std::vector<MemoryId>* ids, MemoryId id) {
  if (std::find(ids->begin(), ids->end(), id) == ids->end()) ids->push_back(id);
}

}  // namespace

Result<MemoryId> MemoryRegistry::add(void* addr, uint64_t length, MemoryKind kind, int device) {
  if (addr == nullptr)
    return Status(StatusCode::kInvalidArgument, "cannot register a null address");
  if (length == 0) return Status(StatusCode::kInvalidArgument, "cannot register zero bytes");
  if (reinterpret_cast<uintptr_t>(addr) > UINTPTR_MAX - length) {
    return Status(StatusCode::kInvalidArgument, "registration wraps around the address space");
  }
  std::lock_guard<std::mutex> lock(mu_);
  MemoryId id = 0;
  do {
    auto fresh = randomId();
    if (!fresh.isOk()) return fresh.status();
    id = fresh.value();
  } while (regions_.count(id) != 0);
  Region region;
  region.info = RegionInfo{id, static_cast<char*>(addr), length, kind, device};
  regions_.emplace(id, region);
  return id;
}

Status MemoryRegistry::remove(MemoryId id) {
  std::unique_lock<std::mutex> lock(mu_);
  auto it = regions_.find(id);
  if (it == regions_.end() || it->second.closing) {
    return Status(StatusCode::kNotFound, strfmt("memory id %016llx is not registered",
                                                static_cast<unsigned long long>(id)));
  }
  // New requests fail from now on; in-flight ones finish (or fail) and unpin.
  it->second.closing = true;
  unpinned_.wait(lock, [&] { return regions_.at(id).pins == 0; });
  regions_.erase(id);
  return {};
}

Result<RegionInfo> MemoryRegistry::find(MemoryId id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = regions_.find(id);
  if (it == regions_.end() || it->second.closing) {
    return Status(StatusCode::kNotFound, strfmt("memory id %016llx is not registered",
                                                static_cast<unsigned long long>(id)));
  }
  return it->second.info;
}

Status MemoryRegistry::resolveLocal(std::span<const LocalDesc> descs, SegmentList* out,
                                    std::vector<MemoryId>* regions) const {
  out->clear();
  out->reserve(descs.size());
  std::lock_guard<std::mutex> lock(mu_);
  for (size_t i = 0; i < descs.size(); ++i) {
    const LocalDesc& d = descs[i];
    auto it = regions_.find(d.mem);
    if (it == regions_.end() || it->second.closing) {
      return Status(StatusCode::kNotFound,
                    strfmt("local descriptor %zu: memory id %016llx is not registered", i,
                           static_cast<unsigned long long>(d.mem)));
    }
    const RegionInfo& r = it->second.info;
    if (d.length == 0) {
      return Status(StatusCode::kInvalidArgument, strfmt("local descriptor %zu has length 0", i));
    }
    if (!inside(d.offset, d.length, r.length)) {
      return Status(StatusCode::kOutOfRange,
                    strfmt("local descriptor %zu: offset %llu + length %llu exceeds the %llu-byte "
                           "region %016llx",
                           i, static_cast<unsigned long long>(d.offset),
                           static_cast<unsigned long long>(d.length),
                           static_cast<unsigned long long>(r.length),
                           static_cast<unsigned long long>(d.mem)));
    }
    // GPU regions were checked with the driver when they were registered.
    out->add(r.base + d.offset, d.length,
             r.kind == MemoryKind::kCuda ? r.device : SegmentList::kHost);
    addDistinct(regions, d.mem);
  }
  return {};
}

Status MemoryRegistry::resolveRemoteRequest(std::span<const control::WireDesc> descs,
                                            uint64_t total, SegmentList* out,
                                            std::vector<MemoryId>* pinned) {
  // A refused request pins nothing: callers unpin whatever `pinned` holds.
  Status st = resolveAndPin(descs, total, out, pinned);
  if (!st.isOk()) {
    out->clear();
    pinned->clear();
  }
  return st;
}

Status MemoryRegistry::resolveAndPin(std::span<const control::WireDesc> descs, uint64_t total,
                                     SegmentList* out, std::vector<MemoryId>* pinned) {
  out->clear();
  pinned->clear();
  if (descs.empty()) return Status(StatusCode::kInvalidArgument, "request has no descriptors");
  out->reserve(descs.size());
  std::lock_guard<std::mutex> lock(mu_);
  uint64_t sum = 0;
  for (size_t i = 0; i < descs.size(); ++i) {
    const control::WireDesc& d = descs[i];
    auto it = regions_.find(d.mem);
    if (it == regions_.end() || it->second.closing) {
      return Status(StatusCode::kNotFound,
                    strfmt("remote descriptor %zu: memory id %016llx is not registered here", i,
                           static_cast<unsigned long long>(d.mem)));
    }
    const RegionInfo& r = it->second.info;
    if (d.length == 0 || !inside(d.offset, d.length, r.length)) {
      return Status(StatusCode::kOutOfRange,
                    strfmt("remote descriptor %zu: offset %llu + length %llu is outside the "
                           "%llu-byte region %016llx",
                           i, static_cast<unsigned long long>(d.offset),
                           static_cast<unsigned long long>(d.length),
                           static_cast<unsigned long long>(r.length),
                           static_cast<unsigned long long>(d.mem)));
    }
    if (d.length > UINT64_MAX - sum) {
      return Status(StatusCode::kOutOfRange, "request total overflows");
    }
    sum += d.length;
    out->add(r.base + d.offset, d.length,
             r.kind == MemoryKind::kCuda ? r.device : SegmentList::kHost);
    addDistinct(pinned, d.mem);
  }
  if (sum != total) {
    return Status(
        StatusCode::kLengthMismatch,
        strfmt("descriptors add up to %llu bytes but the request announces %llu",
               static_cast<unsigned long long>(sum), static_cast<unsigned long long>(total)));
  }
  for (MemoryId id : *pinned) ++regions_.at(id).pins;
  return {};
}

Status MemoryRegistry::pin(std::span<const MemoryId> ids) {
  std::lock_guard<std::mutex> lock(mu_);
  for (MemoryId id : ids) {
    auto it = regions_.find(id);
    if (it == regions_.end() || it->second.closing) {
      return Status(StatusCode::kNotFound,
                    strfmt("memory id %016llx was deregistered after the transfer was prepared",
                           static_cast<unsigned long long>(id)));
    }
  }
  for (MemoryId id : ids) ++regions_.at(id).pins;
  return {};
}

void MemoryRegistry::unpin(std::span<const MemoryId> ids) {
  if (ids.empty()) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (MemoryId id : ids) {
      auto it = regions_.find(id);
      if (it != regions_.end()) --it->second.pins;
    }
  }
  unpinned_.notify_all();
}

size_t MemoryRegistry::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return regions_.size();
}

bool MemoryRegistry::covers(uint64_t addr, uint64_t length) const {
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& [id, region] : regions_) {
    const auto base = reinterpret_cast<uint64_t>(region.info.base);
    if (addr >= base && inside(addr - base, length, region.info.length)) return true;
  }
  return false;
}

}  // namespace tcpx::engine
