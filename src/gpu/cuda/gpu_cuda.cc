// GPU support with the CUDA runtime (linked statically; the driver is loaded at run time).
#include <cuda.h>  // driver types for the one driver entry point used
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <unordered_map>

#include "common/log.h"
#include "common/strings.h"
#include "gpu/cuda/copy_kernel.h"
#include "gpu/gpu.h"

namespace tcpx::gpu {
namespace {

// Tiles one slot's gather or scatter may use in one launch; more run in several launches.
constexpr size_t kTilesPerSlot = 2048;

Status cudaFailure(const std::string& what, cudaError_t err) {
  return Status(StatusCode::kDeviceError, strfmt("%s: %s (%s)", what.c_str(),
                                                 cudaGetErrorString(err), cudaGetErrorName(err)));
}

// Makes `device` current for a scope and restores the caller's device afterwards: the engine
// runs CUDA calls on the caller's threads too and must not change their state.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    if (previous_ != device) changed_ = cudaSetDevice(device) == cudaSuccess;
  }
  ~DeviceGuard() {
    if (changed_ && previous_ >= 0) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
  bool changed_ = false;
};

struct DeviceInfo {
  int count = 0;
  std::string reason;
};

const DeviceInfo& deviceInfo() {
  static const DeviceInfo info = [] {
    DeviceInfo out;
    const cudaError_t err = cudaGetDeviceCount(&out.count);
    if (err != cudaSuccess) {
      out.count = 0;
      out.reason = strfmt("no usable CUDA device: %s", cudaGetErrorString(err));
      cudaGetLastError();  // not sticky; clear it
    } else if (out.count == 0) {
      out.reason = "no CUDA device";
    }
    return out;
  }();
  return info;
}

// Events without timing, pooled per device and never destroyed while the process runs: there
// are at most as many as copies and fences in flight.
class EventPool {
 public:
  static EventPool& instance() {
    static EventPool pool;
    return pool;
  }
  Result<cudaEvent_t> acquire(int device) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto& list = free_[device];
      if (!list.empty()) {
        cudaEvent_t ev = list.back();
        list.pop_back();
        return ev;
      }
    }
    DeviceGuard guard(device);
    cudaEvent_t ev = nullptr;
    const cudaError_t err = cudaEventCreateWithFlags(&ev, cudaEventDisableTiming);
    if (err != cudaSuccess) return cudaFailure("cudaEventCreateWithFlags", err);
    return ev;
  }
  void release(int device, cudaEvent_t ev) {
    std::lock_guard<std::mutex> lock(mu_);
    free_[device].push_back(ev);
  }

 private:
  std::mutex mu_;
  std::unordered_map<int, std::vector<cudaEvent_t>> free_;
};

using GetAddressRange = CUresult (*)(CUdeviceptr*, size_t*, CUdeviceptr);

GetAddressRange addressRangeFunction() {
  static const GetAddressRange fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &ptr, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return static_cast<GetAddressRange>(nullptr);
    }
    return reinterpret_cast<GetAddressRange>(ptr);
  }();
  return fn;
}

// A piece of a chunk: where its bytes live and where they sit in the chunk.
struct Piece {
  char* ptr;
  uint64_t len;
  uint64_t chunk_offset;
  int device;
};

void piecesOf(const engine::SegmentList& segments, uint64_t begin, uint64_t end,
              std::vector<Piece>* out) {
  out->clear();
  segments.forEachPiece(begin, end, [out](char* ptr, uint64_t len, uint64_t at, int device) {
    out->push_back({ptr, len, at, device});
  });
}

}  // namespace

bool built() {
  return true;
}

int deviceCount() {
  return deviceInfo().count;
}

std::string unavailableReason() {
  return deviceInfo().reason;
}

Status checkDeviceRegion(const void* addr, size_t length, int device) {
  if (deviceCount() == 0) return Status(StatusCode::kNotSupported, unavailableReason());
  if (device < 0 || device >= deviceCount()) {
    return Status(StatusCode::kInvalidArgument,
                  strfmt("GPU %d does not exist (this process sees %d)", device, deviceCount()));
  }
  cudaPointerAttributes attr{};
  cudaError_t err = cudaPointerGetAttributes(&attr, addr);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return Status(StatusCode::kInvalidArgument,
                  strfmt("%p is not memory CUDA knows: %s", addr, cudaGetErrorString(err)));
  }
  if (attr.type != cudaMemoryTypeDevice) {
    return Status(StatusCode::kInvalidArgument,
                  strfmt("%p is not device memory (CUDA memory type %d); register host memory "
                         "as host",
                         addr, static_cast<int>(attr.type)));
  }
  if (attr.device != device) {
    return Status(StatusCode::kInvalidArgument,
                  strfmt("%p belongs to GPU %d, not GPU %d", addr, attr.device, device));
  }
  if (GetAddressRange range = addressRangeFunction()) {
    DeviceGuard guard(device);
    CUdeviceptr base = 0;
    size_t size = 0;
    if (range(&base, &size, reinterpret_cast<CUdeviceptr>(addr)) == CUDA_SUCCESS) {
      const uint64_t start = reinterpret_cast<uintptr_t>(addr);
      if (start + length > base + size) {
        return Status(StatusCode::kOutOfRange,
                      strfmt("%zu bytes at %p run past the end of their %zu-byte allocation",
                             length, addr, size));
      }
    }
  }
  return {};
}

// ---- Fences ----

struct Fences::Entry {
  int device;
  cudaEvent_t event;
};

Fences::Fences() = default;
Fences::~Fences() {
  clear();
}

Status Fences::record(const std::vector<int>& devices) {
  clear();
  for (int device : devices) {
    auto ev = EventPool::instance().acquire(device);
    if (!ev.isOk()) return ev.status();
    DeviceGuard guard(device);
    const cudaError_t err = cudaEventRecord(ev.value(), cudaStreamLegacy);
    entries_.push_back({device, ev.value()});
    if (err != cudaSuccess) return cudaFailure("cudaEventRecord on the default stream", err);
  }
  return {};
}

void Fences::clear() {
  for (const Entry& e : entries_) EventPool::instance().release(e.device, e.event);
  entries_.clear();
}

void* Fences::eventFor(int device) const {
  for (const Entry& e : entries_) {
    if (e.device == device) return e.event;
  }
  return nullptr;
}

// ---- Staging ----

namespace {

// What one channel keeps per device it has moved data for.
struct Lane {
  int device = 0;
  cudaStream_t stream = nullptr;
  char* staging = nullptr;    // device memory: one chunk per slot (gather/scatter target)
  CopyTile* tiles = nullptr;  // pinned, mapped: kTilesPerSlot per slot
  CopyTile* tiles_dev = nullptr;
};

struct SlotState {
  void* host = nullptr;
  std::vector<std::pair<int, cudaEvent_t>> pending;
};

}  // namespace

struct ChannelStaging::Impl {
  size_t slot_bytes;
  std::vector<SlotState> slots;
  std::vector<std::unique_ptr<Lane>> lanes;
  std::vector<Piece> pieces;  // scratch, reused

  ~Impl() {
    for (auto& lane : lanes) {
      DeviceGuard guard(lane->device);
      if (lane->stream != nullptr) {
        cudaStreamSynchronize(lane->stream);  // nothing in flight may outlive the buffers
        cudaStreamDestroy(lane->stream);
      }
      if (lane->staging != nullptr) cudaFree(lane->staging);
      if (lane->tiles != nullptr) cudaFreeHost(lane->tiles);
    }
    for (SlotState& slot : slots) {
      for (auto& [device, ev] : slot.pending) EventPool::instance().release(device, ev);
      if (slot.host != nullptr) cudaFreeHost(slot.host);
    }
    cudaGetLastError();
  }

  Result<Lane*> lane(int device) {
    for (auto& l : lanes) {
      if (l->device == device) return l.get();
    }
    auto l = std::make_unique<Lane>();
    l->device = device;
    DeviceGuard guard(device);
    cudaError_t err = cudaStreamCreateWithFlags(&l->stream, cudaStreamNonBlocking);
    if (err != cudaSuccess) return cudaFailure(strfmt("cudaStreamCreate on GPU %d", device), err);
    err = cudaHostAlloc(reinterpret_cast<void**>(&l->tiles),
                        sizeof(CopyTile) * kTilesPerSlot * slots.size(),
                        cudaHostAllocPortable | cudaHostAllocMapped);
    if (err == cudaSuccess) {
      err = cudaHostGetDevicePointer(reinterpret_cast<void**>(&l->tiles_dev), l->tiles, 0);
    }
    if (err != cudaSuccess) {
      cudaStreamDestroy(l->stream);
      return cudaFailure("cudaHostAlloc of copy descriptors", err);
    }
    lanes.push_back(std::move(l));
    return lanes.back().get();
  }

  // Copies device pieces of one device between the slot's host buffer and their places.
  // `to_host`: gather (device -> host slot) or scatter (host slot -> device).
  Status moveDevicePieces(int slot, Lane* lane, bool whole_chunk, uint64_t chunk_bytes,
                          bool to_host, void* fence) {
    char* host = static_cast<char*>(slots[static_cast<size_t>(slot)].host);
    cudaStream_t stream = lane->stream;
    cudaError_t err = cudaSuccess;
    if (fence != nullptr) {
      err = cudaStreamWaitEvent(stream, static_cast<cudaEvent_t>(fence), 0);
      if (err != cudaSuccess) return cudaFailure("cudaStreamWaitEvent", err);
    }
    size_t count = 0;
    for (const Piece& p : pieces) count += p.device == lane->device ? 1 : 0;

    if (count > 1 && whole_chunk && lane->staging == nullptr) {
      // Device staging serves gathers and scatters only: allocate it on first use.
      err = cudaMalloc(&lane->staging, slot_bytes * slots.size());
      if (err != cudaSuccess) {
        lane->staging = nullptr;
        return cudaFailure(strfmt("cudaMalloc of %zu staging bytes on GPU %d",
                                  slot_bytes * slots.size(), lane->device),
                           err);
      }
    }
    char* staging = lane->staging + static_cast<size_t>(slot) * slot_bytes;
    if (count > 1 && whole_chunk) {
      // Many pieces, all on this device: one batched kernel between the pieces and a contiguous
      // device staging area, and one DMA between that area and the host slot.
      if (!to_host) {
        err = cudaMemcpyAsync(staging, host, chunk_bytes, cudaMemcpyHostToDevice, stream);
        if (err != cudaSuccess) return cudaFailure("cudaMemcpyAsync to device staging", err);
      }
      CopyTile* tiles = lane->tiles + static_cast<size_t>(slot) * kTilesPerSlot;
      CopyTile* tiles_dev = lane->tiles_dev + static_cast<size_t>(slot) * kTilesPerSlot;
      size_t n = 0;
      for (const Piece& p : pieces) {
        for (uint64_t done = 0; done < p.len; done += kMaxTileBytes) {
          if (n == kTilesPerSlot) {
            // The descriptor area is full: run what it holds before reusing it.
            err = launchBatchedCopy(tiles_dev, static_cast<int>(n), stream);
            if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
            if (err != cudaSuccess) return cudaFailure("batched copy kernel", err);
            n = 0;
          }
          const uint64_t len = std::min(kMaxTileBytes, p.len - done);
          char* dev_side = p.ptr + done;
          char* staged = staging + p.chunk_offset + done;
          tiles[n++] = to_host ? CopyTile{reinterpret_cast<uint64_t>(dev_side),
                                          reinterpret_cast<uint64_t>(staged), len}
                               : CopyTile{reinterpret_cast<uint64_t>(staged),
                                          reinterpret_cast<uint64_t>(dev_side), len};
        }
      }
      err = launchBatchedCopy(tiles_dev, static_cast<int>(n), stream);
      if (err != cudaSuccess) return cudaFailure("batched copy kernel launch", err);
      if (to_host) {
        err = cudaMemcpyAsync(host, staging, chunk_bytes, cudaMemcpyDeviceToHost, stream);
        if (err != cudaSuccess) return cudaFailure("cudaMemcpyAsync from device staging", err);
      }
    } else {
      for (const Piece& p : pieces) {
        if (p.device != lane->device) continue;
        err = to_host ? cudaMemcpyAsync(host + p.chunk_offset, p.ptr, p.len, cudaMemcpyDeviceToHost,
                                        stream)
                      : cudaMemcpyAsync(p.ptr, host + p.chunk_offset, p.len, cudaMemcpyHostToDevice,
                                        stream);
        if (err != cudaSuccess) {
          return cudaFailure(strfmt("cudaMemcpyAsync of %llu bytes %s GPU %d at %p",
                                    static_cast<unsigned long long>(p.len), to_host ? "from" : "to",
                                    lane->device, p.ptr),
                             err);
        }
      }
    }
    auto ev = EventPool::instance().acquire(lane->device);
    if (!ev.isOk()) return ev.status();
    err = cudaEventRecord(ev.value(), stream);
    slots[static_cast<size_t>(slot)].pending.emplace_back(lane->device, ev.value());
    if (err != cudaSuccess) return cudaFailure("cudaEventRecord", err);
    return {};
  }

  Status move(int slot, const engine::SegmentList& segments, uint64_t begin, uint64_t end,
              bool to_host, const std::function<void*(int)>* fence_for) {
    piecesOf(segments, begin, end, &pieces);
    char* host = static_cast<char*>(slots[static_cast<size_t>(slot)].host);
    std::vector<int> devices;
    for (const Piece& p : pieces) {
      if (p.device == engine::SegmentList::kHost) {
        // Host pieces are copied right away by this thread.
        if (to_host) {
          std::memcpy(host + p.chunk_offset, p.ptr, p.len);
        } else {
          std::memcpy(p.ptr, host + p.chunk_offset, p.len);
        }
      } else if (std::find(devices.begin(), devices.end(), p.device) == devices.end()) {
        devices.push_back(p.device);
      }
    }
    const bool single_device =
        devices.size() == 1 && std::all_of(pieces.begin(), pieces.end(),
                                           [&](const Piece& p) { return p.device == devices[0]; });
    for (int device : devices) {
      auto l = lane(device);
      if (!l.isOk()) return l.status();
      DeviceGuard guard(device);
      void* fence = fence_for != nullptr ? (*fence_for)(device) : nullptr;
      Status st = moveDevicePieces(slot, l.value(), single_device, end - begin, to_host, fence);
      if (!st.isOk()) return st;
    }
    return {};
  }
};

ChannelStaging::ChannelStaging(int slots, size_t slot_bytes)
    : slots_(slots), impl_(std::make_unique<Impl>()) {
  impl_->slot_bytes = slot_bytes;
  impl_->slots.resize(static_cast<size_t>(slots));
}

ChannelStaging::~ChannelStaging() = default;

Result<void*> ChannelStaging::slotBuffer(int slot) {
  SlotState& s = impl_->slots[static_cast<size_t>(slot)];
  if (s.host == nullptr) {
    const cudaError_t err = cudaHostAlloc(&s.host, impl_->slot_bytes, cudaHostAllocPortable);
    if (err != cudaSuccess) {
      s.host = nullptr;
      return cudaFailure(strfmt("cudaHostAlloc of a %zu-byte staging slot", impl_->slot_bytes),
                         err);
    }
  }
  return s.host;
}

Status ChannelStaging::gather(int slot, const engine::SegmentList& segments, uint64_t begin,
                              uint64_t end, const std::function<void*(int)>& fence_for) {
  auto buffer = slotBuffer(slot);
  if (!buffer.isOk()) return buffer.status();
  return impl_->move(slot, segments, begin, end, /*to_host=*/true, &fence_for);
}

Status ChannelStaging::scatter(int slot, const engine::SegmentList& segments, uint64_t begin,
                               uint64_t end) {
  auto buffer = slotBuffer(slot);
  if (!buffer.isOk()) return buffer.status();
  return impl_->move(slot, segments, begin, end, /*to_host=*/false, nullptr);
}

Result<bool> ChannelStaging::ready(int slot) {
  auto& pending = impl_->slots[static_cast<size_t>(slot)].pending;
  Status failure;
  while (!pending.empty()) {
    const auto [device, ev] = pending.back();
    DeviceGuard guard(device);
    const cudaError_t err = cudaEventQuery(ev);
    if (err == cudaErrorNotReady) return false;
    pending.pop_back();
    EventPool::instance().release(device, ev);
    if (err != cudaSuccess && failure.isOk()) failure = cudaFailure("staging copy", err);
  }
  if (!failure.isOk()) return failure;
  return true;
}

}  // namespace tcpx::gpu
