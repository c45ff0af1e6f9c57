// GPU support with the CUDA runtime (linked statically; the driver is loaded at run time).
#include <cuda.h>  // driver types for the one driver entry point used
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cstdlib>
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

void piecesOf(const SegmentList& segments, uint64_t begin, uint64_t end, std::vector<Piece>* out) {
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
      if (lane->staging != nullptr) cudaFree(lane->staging);  // allocDevice: plain cudaMalloc
      if (lane->tiles != nullptr) cudaFreeHost(lane->tiles);
    }
    for (SlotState& slot : slots) {
      for (auto& [device, ev] : slot.pending) EventPool::instance().release(device, ev);
      freeHost(slot.host);
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
  // `device_only`: a gather that stops in the lane's device staging (for transports that send
  // from GPU memory); the chunk's pieces are then all on this device.
  Status moveDevicePieces(int slot, Lane* lane, bool whole_chunk, uint64_t chunk_bytes,
                          bool to_host, void* fence, bool device_only = false) {
    char* host = static_cast<char*>(slots[static_cast<size_t>(slot)].host);
    cudaStream_t stream = lane->stream;
    cudaError_t err = cudaSuccess;
    if (fence != nullptr) {
      err = cudaStreamWaitEvent(stream, static_cast<cudaEvent_t>(fence), 0);
      if (err != cudaSuccess) return cudaFailure("cudaStreamWaitEvent", err);
    }
    size_t count = 0;
    for (const Piece& p : pieces) count += p.device == lane->device ? 1 : 0;

    if (((count > 1 && whole_chunk) || device_only) && lane->staging == nullptr) {
      // Device staging serves gathers and scatters only: allocate it on first use.
      auto area = allocDevice(lane->device, slot_bytes * slots.size());
      if (!area.isOk()) return area.status();
      lane->staging = static_cast<char*>(area.value());
    }
    char* staging = lane->staging + static_cast<size_t>(slot) * slot_bytes;
    if (device_only && count == 1) {
      const Piece& p = pieces.front();
      err = cudaMemcpyAsync(staging, p.ptr, p.len, cudaMemcpyDeviceToDevice, stream);
      if (err != cudaSuccess) return cudaFailure("cudaMemcpyAsync to device staging", err);
    } else if (count > 1 && whole_chunk) {
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
      if (to_host && !device_only) {
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

  Status move(int slot, const SegmentList& segments, uint64_t begin, uint64_t end, bool to_host,
              const Fences* fences) {
    piecesOf(segments, begin, end, &pieces);
    char* host = static_cast<char*>(slots[static_cast<size_t>(slot)].host);
    std::vector<int> devices;
    for (const Piece& p : pieces) {
      if (p.device == SegmentList::kHost) {
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
      void* fence = fences != nullptr ? fences->eventFor(device) : nullptr;
      Status st = moveDevicePieces(slot, l.value(), single_device, end - begin, to_host, fence);
      if (!st.isOk()) return st;
    }
    return {};
  }
};

ChannelStaging::ChannelStaging(int slots, size_t slot_bytes)
    : slots_(slots), slot_bytes_(slot_bytes), impl_(std::make_unique<Impl>()) {
  impl_->slot_bytes = slot_bytes;
  impl_->slots.resize(static_cast<size_t>(slots));
}

ChannelStaging::~ChannelStaging() = default;

Result<void*> ChannelStaging::slotBuffer(int slot) {
  SlotState& s = impl_->slots[static_cast<size_t>(slot)];
  if (s.host == nullptr) {
    auto buffer = allocHost(impl_->slot_bytes);
    if (!buffer.isOk()) return buffer.status();
    s.host = buffer.value();
  }
  return s.host;
}

Status ChannelStaging::gather(int slot, const SegmentList& segments, uint64_t begin, uint64_t end,
                              const Fences* fences) {
  auto buffer = slotBuffer(slot);
  if (!buffer.isOk()) return buffer.status();
  return impl_->move(slot, segments, begin, end, /*to_host=*/true, fences);
}

Status ChannelStaging::scatter(int slot, const SegmentList& segments, uint64_t begin,
                               uint64_t end) {
  auto buffer = slotBuffer(slot);
  if (!buffer.isOk()) return buffer.status();
  return impl_->move(slot, segments, begin, end, /*to_host=*/false, nullptr);
}

Status ChannelStaging::gatherOnDevice(int slot, int device, const SegmentList& segments,
                                      uint64_t begin, uint64_t end, const Fences* fences,
                                      void** out) {
  piecesOf(segments, begin, end, &impl_->pieces);
  auto l = impl_->lane(device);
  if (!l.isOk()) return l.status();
  DeviceGuard guard(device);
  Status st = impl_->moveDevicePieces(slot, l.value(), /*whole_chunk=*/true, end - begin,
                                      /*to_host=*/true,
                                      fences != nullptr ? fences->eventFor(device) : nullptr,
                                      /*device_only=*/true);
  if (!st.isOk()) return st;
  *out = l.value()->staging + static_cast<size_t>(slot) * slot_bytes_;
  return {};
}

Result<std::pair<void*, size_t>> ChannelStaging::deviceArea(int device) {
  for (auto& lane : impl_->lanes) {
    if (lane->device == device && lane->staging != nullptr) {
      return std::pair<void*, size_t>{lane->staging, slot_bytes_ * impl_->slots.size()};
    }
  }
  return Status(StatusCode::kNotFound, strfmt("no device staging on GPU %d", device));
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

// ---- Memory and devices ----

int deviceOf(const void* ptr) {
  if (deviceCount() == 0 || ptr == nullptr) return -1;
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, ptr) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  return attr.type == cudaMemoryTypeDevice ? attr.device : -1;
}

uint64_t deviceBytesAfter(const void* ptr) {
  const int device = deviceOf(ptr);
  GetAddressRange range = addressRangeFunction();
  if (device < 0 || range == nullptr) return 0;
  DeviceGuard guard(device);
  CUdeviceptr base = 0;
  size_t size = 0;
  if (range(&base, &size, reinterpret_cast<CUdeviceptr>(ptr)) != CUDA_SUCCESS) return 0;
  return base + size - reinterpret_cast<uintptr_t>(ptr);
}

int currentDevice() {
  int device = 0;
  if (deviceCount() == 0 || cudaGetDevice(&device) != cudaSuccess) return 0;
  return device;
}

Status setCurrentDevice(int device) {
  if (deviceCount() == 0) return Status(StatusCode::kNotSupported, unavailableReason());
  const cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return cudaFailure(strfmt("cudaSetDevice(%d)", device), err);
  return {};
}

Result<std::string> pciBusId(int device) {
  if (deviceCount() == 0) return Status(StatusCode::kNotSupported, unavailableReason());
  char id[32] = {};
  const cudaError_t err = cudaDeviceGetPCIBusId(id, sizeof(id), device);
  if (err != cudaSuccess) return cudaFailure("cudaDeviceGetPCIBusId", err);
  std::string out(id);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

Result<void*> allocHost(size_t bytes, bool mapped) {
  const size_t rounded = (std::max<size_t>(bytes, 1) + 4095) / 4096 * 4096;
  if (deviceCount() == 0) {
    void* ptr = std::aligned_alloc(4096, rounded);
    if (ptr == nullptr) {
      return Status(StatusCode::kResourceExhausted, strfmt("out of memory (%zu bytes)", bytes));
    }
    return ptr;
  }
  void* ptr = nullptr;
  const cudaError_t err =
      cudaHostAlloc(&ptr, rounded, cudaHostAllocPortable | (mapped ? cudaHostAllocMapped : 0U));
  if (err != cudaSuccess) return cudaFailure(strfmt("cudaHostAlloc of %zu bytes", bytes), err);
  return ptr;
}

void freeHost(void* ptr) {
  if (ptr == nullptr) return;
  if (deviceCount() == 0) {
    std::free(ptr);
  } else {
    cudaFreeHost(ptr);
  }
}

Result<void*> allocDevice(int device, size_t bytes) {
  if (deviceCount() == 0) return Status(StatusCode::kNotSupported, unavailableReason());
  DeviceGuard guard(device);
  void* ptr = nullptr;
  // Small cudaMalloc blocks are only 512-byte aligned; whole 2 MiB units are 2 MiB aligned, and
  // plugins such as TCPX register only page-aligned device memory.
  constexpr size_t kUnit = 2ULL << 20;
  const cudaError_t err =
      cudaMalloc(&ptr, (std::max<size_t>(bytes, 1) + kUnit - 1) / kUnit * kUnit);
  if (err != cudaSuccess) {
    return cudaFailure(strfmt("cudaMalloc of %zu bytes on GPU %d", bytes, device), err);
  }
  return ptr;
}

void freeDevice(int device, void* ptr) {
  if (ptr == nullptr) return;
  DeviceGuard guard(device);
  cudaFree(ptr);
}

Status copySync(void* dst, const void* src, size_t bytes) {
  if (deviceCount() == 0) {
    std::memcpy(dst, src, bytes);
    return {};
  }
  const cudaError_t err = cudaMemcpy(dst, src, bytes, cudaMemcpyDefault);
  if (err != cudaSuccess) return cudaFailure(strfmt("cudaMemcpy of %zu bytes", bytes), err);
  return {};
}

// ---- CopyQueue ----

struct CopyQueue::Impl {
  struct Batch {
    CopyTile* tiles = nullptr;  // mapped pinned memory
    CopyTile* tiles_dev = nullptr;
    size_t count = 0;
    uint64_t max_len = 0;
    cudaEvent_t event = nullptr;
    uint64_t ticket = 0;  // 0: not in flight
  };
  cudaStream_t stream = nullptr;
  std::array<Batch, kBatches> batches{};
  int filling = 0;  // batch receiving add()s
  uint64_t next_ticket = 1;
  uint64_t last_done = 0;    // every ticket up to this one finished
  Status broken;             // set once setup failed
  bool dma_pending = false;  // a DMA was queued after the last recorded event

  Status ensure(int device) {
    if (stream != nullptr || !broken.isOk()) return broken;
    if (deviceCount() == 0) return broken = Status(StatusCode::kNotSupported, unavailableReason());
    DeviceGuard guard(device);
    cudaError_t err = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
    if (err != cudaSuccess) {
      stream = nullptr;
      return broken = cudaFailure("cudaStreamCreate", err);
    }
    for (Batch& b : batches) {
      err = cudaEventCreateWithFlags(&b.event, cudaEventDisableTiming);
      if (err != cudaSuccess) return broken = cudaFailure("copy queue set-up", err);
    }
    return {};
  }

  // Descriptor memory of a batch, allocated when a batch first carries copies: batches that only
  // mark a DMA never need it.
  static Status ensureTiles(Batch& b, int device) {
    if (b.tiles != nullptr) return {};
    DeviceGuard guard(device);
    cudaError_t err =
        cudaHostAlloc(reinterpret_cast<void**>(&b.tiles), sizeof(CopyTile) * kTilesPerBatch,
                      cudaHostAllocPortable | cudaHostAllocMapped);
    if (err == cudaSuccess) {
      err = cudaHostGetDevicePointer(reinterpret_cast<void**>(&b.tiles_dev), b.tiles, 0);
    }
    if (err != cudaSuccess) {
      if (b.tiles != nullptr) cudaFreeHost(b.tiles);
      b.tiles = nullptr;
      return cudaFailure("cudaHostAlloc of copy descriptors", err);
    }
    return {};
  }

  // Waits until batch `b` is free again.
  Status reclaim(Batch& b) {
    if (b.ticket == 0) return {};
    const cudaError_t err = cudaEventSynchronize(b.event);
    if (b.ticket > last_done) last_done = b.ticket;
    b.ticket = 0;
    b.count = 0;
    b.max_len = 0;
    if (err != cudaSuccess) return cudaFailure("unpack copy", err);
    return {};
  }

  Status launchFilling(int device) {
    Batch& b = batches[static_cast<size_t>(filling)];
    if (b.count == 0 && !dma_pending) return {};
    if (b.ticket != 0) {
      Status st = reclaim(b);  // a DMA-only batch reuses a slot still in flight
      if (!st.isOk()) return st;
    }
    DeviceGuard guard(device);
    cudaError_t err = launchBatchedCopy(b.tiles_dev, static_cast<int>(b.count), stream, b.max_len);
    if (err == cudaSuccess) err = cudaEventRecord(b.event, stream);
    dma_pending = false;
    if (err != cudaSuccess) return cudaFailure("batched copy launch", err);
    b.ticket = next_ticket++;
    filling = (filling + 1) % kBatches;
    return {};
  }
};

CopyQueue::CopyQueue(int device) : device_(device), impl_(std::make_unique<Impl>()) {}

CopyQueue::~CopyQueue() {
  if (impl_->stream != nullptr) {
    DeviceGuard guard(device_);
    cudaStreamSynchronize(impl_->stream);
    cudaStreamDestroy(impl_->stream);
  }
  for (Impl::Batch& b : impl_->batches) {
    if (b.tiles != nullptr) cudaFreeHost(b.tiles);
    if (b.event != nullptr) cudaEventDestroy(b.event);
  }
  cudaGetLastError();
}

Status CopyQueue::add(const void* src, void* dst, uint64_t len) {
  Status st = impl_->ensure(device_);
  if (!st.isOk()) return st;
  for (uint64_t done = 0; done < len; done += kMaxTileBytes) {
    Impl::Batch* b = &impl_->batches[static_cast<size_t>(impl_->filling)];
    if (b->count == kTilesPerBatch) {
      st = impl_->launchFilling(device_);
      if (!st.isOk()) return st;
      b = &impl_->batches[static_cast<size_t>(impl_->filling)];
    }
    if (b->ticket != 0) {
      st = impl_->reclaim(*b);  // every batch in flight: wait for the oldest
      if (!st.isOk()) return st;
    }
    st = Impl::ensureTiles(*b, device_);
    if (!st.isOk()) return st;
    const uint64_t n = std::min(kMaxTileBytes, len - done);
    b->tiles[b->count++] = {reinterpret_cast<uint64_t>(src) + done,
                            reinterpret_cast<uint64_t>(dst) + done, n};
    b->max_len = std::max(b->max_len, n);
  }
  return {};
}

Status CopyQueue::enqueueMemcpy(void* dst, const void* src, uint64_t len) {
  Status st = impl_->ensure(device_);
  if (!st.isOk()) return st;
  st = impl_->launchFilling(device_);  // copies added before go first
  if (!st.isOk()) return st;
  DeviceGuard guard(device_);
  const cudaError_t err = cudaMemcpyAsync(dst, src, len, cudaMemcpyDefault, impl_->stream);
  if (err != cudaSuccess) return cudaFailure("cudaMemcpyAsync", err);
  impl_->dma_pending = true;
  return {};
}

Result<uint64_t> CopyQueue::launch() {
  Status st = impl_->ensure(device_);
  if (!st.isOk()) return st;
  st = impl_->launchFilling(device_);
  if (!st.isOk()) return st;
  return impl_->next_ticket - 1;
}

Result<bool> CopyQueue::done(uint64_t ticket) {
  if (ticket <= impl_->last_done) return true;
  DeviceGuard guard(device_);
  // Batches finish in launch order: retire them oldest first.
  for (int i = 0; i < kBatches; ++i) {
    Impl::Batch* oldest = nullptr;
    for (Impl::Batch& b : impl_->batches) {
      if (b.ticket != 0 && (oldest == nullptr || b.ticket < oldest->ticket)) oldest = &b;
    }
    if (oldest == nullptr) break;
    const cudaError_t err = cudaEventQuery(oldest->event);
    if (err == cudaErrorNotReady) break;
    impl_->last_done = oldest->ticket;
    oldest->ticket = 0;
    oldest->count = 0;
    oldest->max_len = 0;
    if (err != cudaSuccess) return cudaFailure("unpack copy", err);
  }
  return ticket <= impl_->last_done;
}

Status CopyQueue::sync() {
  for (Impl::Batch& b : impl_->batches) {
    Status st = impl_->reclaim(b);
    if (!st.isOk()) return st;
  }
  return {};
}

}  // namespace tcpx::gpu
