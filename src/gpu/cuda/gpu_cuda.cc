// GPU support with the CUDA runtime (linked statically; the driver is loaded at run time).
#include <cuda.h>  // driver types of the driver entry points used
#include <cuda_runtime.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <string_view>
#include <sys/syscall.h>
#include <unordered_map>
#include <utility>

#include "common/log.h"
#include "common/strings.h"
#include "gpu/cuda/copy_kernel.h"
#include "gpu/gpu.h"

namespace tcpx::gpu {

void* driverFunction(const char* name) {
  void* ptr = nullptr;
  cudaDriverEntryPointQueryResult found{};
  if (cudaGetDriverEntryPointByVersion(name, &ptr, 12000, cudaEnableDefault, &found) !=
          cudaSuccess ||
      found != cudaDriverEntryPointSuccess) {
    (void)cudaGetLastError();
    return nullptr;
  }
  return ptr;
}

namespace {

// Tiles a slot's descriptor area holds at first; a chunk that needs more grows it (see Lane).
constexpr size_t kTilesPerSlot = 2048;

// Every failed CUDA call becomes a Status here, and the thread's last error is taken with it:
// a later launch's cudaGetLastError() must not report a failure that belongs to another copy.
Status cudaFailure(const std::string& what, cudaError_t err) {
  (void)cudaGetLastError();
  return Status(StatusCode::kDeviceError, strfmt("%s: %s (%s)", what.c_str(),
                                                 cudaGetErrorString(err), cudaGetErrorName(err)));
}

// Driver entry points for the calling thread's context, found through the runtime (the driver is
// loaded at run time): a device switch is undone by restoring the exact context the thread had,
// including none, since cudaSetDevice(0) on a thread that never chose a device would create a
// context on GPU 0.
struct ContextCalls {
  CUresult (*get)(CUcontext*) = nullptr;
  CUresult (*set)(CUcontext) = nullptr;
  [[nodiscard]] bool usable() const { return get != nullptr && set != nullptr; }
};

template <typename Fn>
Fn driverEntry(const char* name) {
  return reinterpret_cast<Fn>(driverFunction(name));
}

const ContextCalls& contextCalls() {
  static const ContextCalls calls = [] {
    ContextCalls c;
    c.get = driverEntry<decltype(c.get)>("cuCtxGetCurrent");
    c.set = driverEntry<decltype(c.set)>("cuCtxSetCurrent");
    return c;
  }();
  return calls;
}

// failNextAllocations: allocations of each AllocKind still to fail.
std::array<std::atomic<int>, 2> g_failing_allocations{};

// Whether this allocation is one failNextAllocations asked to fail (it is then counted).
bool injectedAllocationFailure(AllocKind kind) {
  std::atomic<int>& left = g_failing_allocations[static_cast<size_t>(kind)];
  int n = left.load();
  while (n > 0 && !left.compare_exchange_weak(n, n - 1)) {
  }
  return n > 0;
}

// The engine's own threads (see markEngineThread).
thread_local bool t_engine_thread = false;

// Each device's primary context, as cudaSetDevice made it current (contexts stay valid while the
// runtime uses the device: it never resets one).
constexpr int kMaxDevices = 64;
std::array<std::atomic<CUcontext>, kMaxDevices> g_primary{};

CUcontext knownPrimary(int device) {
  return device >= 0 && device < kMaxDevices ? g_primary[static_cast<size_t>(device)].load()
                                             : nullptr;
}

void notePrimary(int device, CUcontext ctx) {
  if (device >= 0 && device < kMaxDevices) g_primary[static_cast<size_t>(device)].store(ctx);
}

using DeviceGuard = DeviceScope;

// Whether every command queued on `stream` has finished (never waits). A failed command counts
// as finished: it runs no more, and its error is reported where the copy is checked.
bool streamIdle(cudaStream_t stream, int device) {
  DeviceGuard guard(device);
  const cudaError_t err = cudaStreamQuery(stream);
  if (err == cudaErrorNotReady) return false;
  if (err != cudaSuccess) (void)cudaGetLastError();
  return true;
}

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
  static const auto fn = driverEntry<GetAddressRange>("cuMemGetAddressRange");
  return fn;
}

using PointerAttribute = CUresult (*)(void*, CUpointer_attribute, CUdeviceptr);

PointerAttribute pointerAttributeFunction() {
  static const auto fn = driverEntry<PointerAttribute>("cuPointerGetAttribute");
  return fn;
}

// Unlike cuPointerGetAttribute, answers memory CUDA does not know with zeros, not an error (an
// error would be an API failure for tools such as compute-sanitizer on every host pointer).
using PointerAttributes = CUresult (*)(unsigned int, CUpointer_attribute*, void**, CUdeviceptr);

PointerAttributes pointerAttributesFunction() {
  static const auto fn = driverEntry<PointerAttributes>("cuPointerGetAttributes");
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

// Whether every piece lies in live device memory: one allocation, or (VMM memory, which
// registration accepts as one region) allocations mapped one right after the other. A kernel
// touching memory the application freed behind the engine's back would fault and leave the
// context unusable for every later transfer, where a copy engine's copy fails that copy alone:
// the staging kernels (landed copies, batched gathers and scatters) are queued only for memory
// this finds live. The extents found are kept for the call, so pieces of the same allocations
// cost no further driver call (a chunk's pieces normally come from a few registrations).
bool allAllocated(const std::vector<Piece>& pieces) {
  const GetAddressRange range = addressRangeFunction();
  if (range == nullptr) return false;
  struct Extent {
    CUdeviceptr begin = 0;
    CUdeviceptr end = 0;
  };
  constexpr size_t kKept = 16;
  std::array<Extent, kKept> kept{};
  size_t next = 0;
  for (const Piece& p : pieces) {
    const auto at = reinterpret_cast<CUdeviceptr>(p.ptr);
    const CUdeviceptr end = at + p.len;
    if (std::any_of(kept.begin(), kept.end(),
                    [&](const Extent& e) { return at >= e.begin && end <= e.end; })) {
      continue;
    }
    CUdeviceptr base = 0;
    size_t size = 0;
    if (range(&base, &size, at) != CUDA_SUCCESS) return false;
    Extent found{base, base + size};
    while (end > found.end) {  // the next mapping must start right where this one ends
      if (range(&base, &size, found.end) != CUDA_SUCCESS || base != found.end) return false;
      found.end = base + size;
    }
    kept[next] = found;
    next = (next + 1) % kKept;
  }
  return true;
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
  // The range must be device memory of `device` to its end: one allocation, or (memory of the
  // VMM API, e.g. PyTorch's expandable segments) allocations mapped one right after the other.
  // cudaMalloc blocks that happen to lie side by side are not one region.
  if (GetAddressRange range = addressRangeFunction()) {
    DeviceGuard guard(device);
    PointerAttribute attribute = pointerAttributeFunction();
    auto vmm = [attribute](CUdeviceptr p) {
      int legacy = 1;
      return attribute != nullptr &&
             attribute(&legacy, CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE, p) ==
                 CUDA_SUCCESS &&
             legacy == 0;
    };
    const uint64_t end = reinterpret_cast<uintptr_t>(addr) + length;
    CUdeviceptr at = reinterpret_cast<CUdeviceptr>(addr);
    CUdeviceptr base = 0;
    size_t size = 0;
    if (range(&base, &size, at) != CUDA_SUCCESS) return {};  // attributes said it is device memory
    while (end > base + size) {
      const bool continues = vmm(base);
      at = base + size;
      cudaPointerAttributes next{};
      const bool ours =
          continues &&
          cudaPointerGetAttributes(&next, reinterpret_cast<void*>(at)) == cudaSuccess &&
          next.type == cudaMemoryTypeDevice && next.device == device && vmm(at) &&
          range(&base, &size, at) == CUDA_SUCCESS && base == at;
      if (!ours) {
        (void)cudaGetLastError();
        return Status(StatusCode::kOutOfRange,
                      strfmt("%zu bytes at %p run past the end of their device memory (at %p)",
                             length, addr, reinterpret_cast<void*>(at)));
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

Result<bool> Fences::ready() const {
  for (const Entry& e : entries_) {
    const cudaError_t err = cudaEventQuery(e.event);
    if (err == cudaErrorNotReady) {
      (void)cudaGetLastError();  // not an error: the fence's work still runs
      return false;
    }
    if (err != cudaSuccess) return cudaFailure("cudaEventQuery of a fence", err);
  }
  return true;
}

// ---- CUDA IPC ----

namespace {
std::atomic<int64_t> g_ipc_mappings{0};
std::atomic<int64_t> g_gate_mappings{0};  // of those, peers' read gates (openGate)

// The bytes of a kShareable handle: this tag, then the exporter's descriptor number (4 bytes,
// little-endian), zeros after. A cudaIpcMemHandle_t never starts with it.
constexpr std::string_view kShareableTag = "tcpx.vmm.posixfd";
static_assert(kShareableTag.size() + 4 <= kIpcHandleBytes);

// The CUDA VMM calls of the shareable route, found through the runtime.
struct VmmCalls {
  CUresult (*retain)(CUmemGenericAllocationHandle*, void*) = nullptr;
  CUresult (*release)(CUmemGenericAllocationHandle) = nullptr;
  CUresult (*export_fd)(void*, CUmemGenericAllocationHandle, CUmemAllocationHandleType,
                        unsigned long long) = nullptr;  // NOLINT(google-runtime-int): CUDA's
  CUresult (*import_fd)(CUmemGenericAllocationHandle*, void*, CUmemAllocationHandleType) = nullptr;
  CUresult (*reserve)(CUdeviceptr*, size_t, size_t, CUdeviceptr,
                      unsigned long long) = nullptr;  // NOLINT(google-runtime-int): CUDA's
  CUresult (*free)(CUdeviceptr, size_t) = nullptr;
  CUresult (*map)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle,
                  unsigned long long) = nullptr;  // NOLINT(google-runtime-int): CUDA's
  CUresult (*unmap)(CUdeviceptr, size_t) = nullptr;
  CUresult (*set_access)(CUdeviceptr, size_t, const CUmemAccessDesc*, size_t) = nullptr;
  CUresult (*properties)(CUmemAllocationProp*, CUmemGenericAllocationHandle) = nullptr;
  [[nodiscard]] bool usable() const {
    return retain != nullptr && release != nullptr && export_fd != nullptr &&
           properties != nullptr && import_fd != nullptr && reserve != nullptr && free != nullptr &&
           map != nullptr && unmap != nullptr && set_access != nullptr;
  }
};

const VmmCalls& vmmCalls() {
  static const VmmCalls calls = [] {
    VmmCalls c;
    c.retain = driverEntry<decltype(c.retain)>("cuMemRetainAllocationHandle");
    c.release = driverEntry<decltype(c.release)>("cuMemRelease");
    c.export_fd = driverEntry<decltype(c.export_fd)>("cuMemExportToShareableHandle");
    c.import_fd = driverEntry<decltype(c.import_fd)>("cuMemImportFromShareableHandle");
    c.reserve = driverEntry<decltype(c.reserve)>("cuMemAddressReserve");
    c.free = driverEntry<decltype(c.free)>("cuMemAddressFree");
    c.map = driverEntry<decltype(c.map)>("cuMemMap");
    c.unmap = driverEntry<decltype(c.unmap)>("cuMemUnmap");
    c.set_access = driverEntry<decltype(c.set_access)>("cuMemSetAccess");
    c.properties = driverEntry<decltype(c.properties)>("cuMemGetAllocationPropertiesFromHandle");
    return c;
  }();
  return calls;
}

Status vmmFailure(const char* what, CUresult r) {
  return Status(StatusCode::kNotSupported, strfmt("%s: CUDA driver error %d", what, r));
}

// The shareable route's export of the VMM allocation mapped at [base, base + size): a descriptor
// of it, held open by the export.
Result<IpcExport> exportShareable(CUdeviceptr base, size_t size, const std::string& legacy_why) {
  const VmmCalls& vmm = vmmCalls();
  if (!vmm.usable()) {
    return Status(StatusCode::kNotSupported, legacy_why + "; the driver lacks the VMM calls");
  }
  CUmemGenericAllocationHandle allocation{};
  if (vmm.retain(&allocation, reinterpret_cast<void*>(base)) != CUDA_SUCCESS) {
    return Status(StatusCode::kNotSupported, legacy_why + " and it is no VMM allocation");
  }
  // Asked before exporting, so that memory created without the handle type is refused without
  // a failing call (which compute-sanitizer would report).
  CUmemAllocationProp prop{};
  const bool exportable =
      vmm.properties(&prop, allocation) == CUDA_SUCCESS &&
      (prop.requestedHandleTypes & CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR) != 0;
  int fd = -1;
  const CUresult r =
      exportable ? vmm.export_fd(&fd, allocation, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0)
                 : CUDA_ERROR_NOT_SUPPORTED;
  (void)vmm.release(allocation);  // the retain's reference; the descriptor holds its own
  if (r != CUDA_SUCCESS || fd < 0) {
    return Status(StatusCode::kNotSupported,
                  strfmt("VMM memory not created with CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR "
                         "cannot be shared (cuMemExportToShareableHandle: CUDA driver error %d)",
                         r));
  }
  IpcExport out;
  out.handle.assign(kIpcHandleBytes, '\0');
  std::memcpy(out.handle.data(), kShareableTag.data(), kShareableTag.size());
  const auto number = static_cast<uint32_t>(fd);
  for (size_t i = 0; i < 4; ++i) {
    out.handle[kShareableTag.size() + i] = static_cast<char>((number >> (8 * i)) & 0xFF);
  }
  out.base = base;
  out.size = size;
  // Non-null: the export holds a descriptor (IpcExports bounds how many do).
  out.held = std::shared_ptr<const void>(new int(fd), [](const int* held) {
    ::close(*held);
    delete held;
  });
  return out;
}

// The descriptor number a kShareable handle names, or -1 for a legacy handle.
int shareableFd(const std::string& handle) {
  if (handle.size() != kIpcHandleBytes ||
      handle.compare(0, kShareableTag.size(), kShareableTag) != 0) {
    return -1;
  }
  uint32_t number = 0;
  for (size_t i = 0; i < 4; ++i) {
    number |= static_cast<uint32_t>(static_cast<uint8_t>(handle[kShareableTag.size() + i]))
              << (8 * i);
  }
  return number > static_cast<uint32_t>(INT32_MAX) ? -1 : static_cast<int>(number);
}

// Descriptor `number` of process `pid`, duplicated into this one.
Result<int> duplicateFrom(int pid, int number) {
  const int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  if (pidfd < 0) {
    return Status(StatusCode::kNotSupported,
                  strfmt("pidfd_open of process %d: %s", pid, errnoString(errno).c_str()));
  }
  const int fd = static_cast<int>(::syscall(SYS_pidfd_getfd, pidfd, number, 0));
  const int err = errno;
  ::close(pidfd);
  if (fd < 0) {
    return Status(StatusCode::kNotSupported,
                  strfmt("pidfd_getfd of descriptor %d of process %d: %s (the kernel's ptrace "
                         "rules decide)",
                         number, pid, errnoString(err).c_str()));
  }
  return fd;
}

// A VMM allocation mapped here: its address and the imported handle.
struct ShareableMapping {
  CUdeviceptr va = 0;
  CUmemGenericAllocationHandle allocation{};
};

// Maps the allocation behind the exporter's descriptor `fd_number` at a new address here, for
// reading and writing by `device` (this process's number of its GPU).
Result<ShareableMapping> mapShareable(const IpcExport& from, int owner_pid, int fd_number,
                                      int device) {
  const VmmCalls& vmm = vmmCalls();
  if (!vmm.usable()) return Status(StatusCode::kNotSupported, "the driver lacks the VMM calls");
  if (owner_pid <= 0) {
    return Status(StatusCode::kNotSupported,
                  "a VMM allocation's descriptor, but the peer's process is not verified");
  }
  auto fd = duplicateFrom(owner_pid, fd_number);
  if (!fd.isOk()) return fd.status();
  DeviceGuard guard(device);
  CUmemGenericAllocationHandle allocation{};
  CUresult r =
      vmm.import_fd(&allocation, reinterpret_cast<void*>(static_cast<intptr_t>(fd.value())),
                    CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR);
  ::close(fd.value());  // the imported handle holds the allocation from now on
  if (r != CUDA_SUCCESS) return vmmFailure("cuMemImportFromShareableHandle", r);
  CUdeviceptr va = 0;
  r = vmm.reserve(&va, from.size, 0, 0, 0);
  if (r != CUDA_SUCCESS) {
    (void)vmm.release(allocation);
    return vmmFailure("cuMemAddressReserve", r);
  }
  // Fails where the allocation is shorter than the peer claims: nothing past it is ever read.
  r = vmm.map(va, from.size, 0, allocation, 0);
  if (r != CUDA_SUCCESS) {
    (void)vmm.free(va, from.size);
    (void)vmm.release(allocation);
    return Status(StatusCode::kNotSupported,
                  strfmt("the peer's allocation is not the %llu bytes it claims (cuMemMap: "
                         "CUDA driver error %d)",
                         static_cast<unsigned long long>(from.size), r));
  }
  CUmemAccessDesc access{};
  access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  access.location.id = device;
  access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  r = vmm.set_access(va, from.size, &access, 1);
  if (r != CUDA_SUCCESS) {
    (void)vmm.unmap(va, from.size);
    (void)vmm.free(va, from.size);
    (void)vmm.release(allocation);
    return vmmFailure("cuMemSetAccess", r);
  }
  return ShareableMapping{va, allocation};
}

}  // namespace

Result<IpcExport> exportIpc(const void* addr, int device) {
  if (deviceCount() == 0) return Status(StatusCode::kNotSupported, unavailableReason());
  GetAddressRange range = addressRangeFunction();
  if (range == nullptr) return Status(StatusCode::kNotSupported, "cuMemGetAddressRange missing");
  DeviceGuard guard(device);
  CUdeviceptr base = 0;
  size_t size = 0;
  if (range(&base, &size, reinterpret_cast<CUdeviceptr>(addr)) != CUDA_SUCCESS) {
    return Status(StatusCode::kNotSupported, "not in a device allocation CUDA knows");
  }
  auto bus = pciBusId(device);
  if (!bus.isOk()) return bus.status();
  // The route is chosen by asking, not by a failing cudaIpcGetMemHandle (which
  // compute-sanitizer would report for every registration of VMM memory).
  int legacy_capable = 1;
  if (PointerAttribute attribute = pointerAttributeFunction();
      attribute != nullptr &&
      attribute(&legacy_capable, CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE, base) !=
          CUDA_SUCCESS) {
    legacy_capable = 1;  // unknown: let cudaIpcGetMemHandle decide
  }
  cudaIpcMemHandle_t handle{};
  const cudaError_t err = legacy_capable != 0
                              ? cudaIpcGetMemHandle(&handle, reinterpret_cast<void*>(base))
                              : cudaErrorInvalidValue;
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    auto shareable = exportShareable(
        base, size,
        legacy_capable != 0 ? strfmt("cudaIpcGetMemHandle: %s", cudaGetErrorString(err))
                            : std::string("not memory legacy CUDA IPC can share"));
    if (shareable.isOk()) shareable->bus_id = std::move(bus.value());
    return shareable;
  }
  IpcExport out;
  out.handle.assign(reinterpret_cast<const char*>(&handle), sizeof(handle));
  out.base = base;
  out.size = size;
  out.bus_id = std::move(bus.value());
  return out;
}

Result<std::unique_ptr<IpcMapping>> IpcMapping::open(const IpcExport& from, int owner_pid) {
  static_assert(sizeof(cudaIpcMemHandle_t) == kIpcHandleBytes);
  if (deviceCount() == 0) return Status(StatusCode::kNotSupported, unavailableReason());
  if (from.handle.size() != kIpcHandleBytes) {
    return Status(StatusCode::kInvalidArgument, "an IPC handle of the wrong size");
  }
  int device = -1;
  cudaError_t err = cudaDeviceGetByPCIBusId(&device, from.bus_id.c_str());
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return Status(StatusCode::kNotSupported,
                  strfmt("the peer's GPU %s is not visible to this process", from.bus_id.c_str()));
  }
  const int fd_number = shareableFd(from.handle);
  if (fd_number >= 0) {
    auto mapped = mapShareable(from, owner_pid, fd_number, device);
    if (!mapped.isOk()) return mapped.status();
    g_ipc_mappings.fetch_add(1);
    return std::unique_ptr<IpcMapping>(
        new IpcMapping(IpcRoute::kShareable, reinterpret_cast<char*>(mapped->va), from.size, device,
                       static_cast<uint64_t>(mapped->allocation)));
  }
  cudaIpcMemHandle_t handle{};
  std::memcpy(&handle, from.handle.data(), sizeof(handle));
  DeviceGuard guard(device);
  void* ptr = nullptr;
  err = cudaIpcOpenMemHandle(&ptr, handle, cudaIpcMemLazyEnablePeerAccess);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    // NOT_SUPPORTED: the peer's bytes then take the data channels.
    return Status(StatusCode::kNotSupported,
                  strfmt("cudaIpcOpenMemHandle: %s", cudaGetErrorString(err)));
  }
  g_ipc_mappings.fetch_add(1);
  auto mapping = std::unique_ptr<IpcMapping>(
      new IpcMapping(IpcRoute::kLegacy, static_cast<char*>(ptr), from.size, device, 0));
  // The peer says how long the allocation is: never read past what was really mapped.
  GetAddressRange range = addressRangeFunction();
  CUdeviceptr base = 0;
  size_t size = 0;
  if (range == nullptr || range(&base, &size, reinterpret_cast<CUdeviceptr>(ptr)) != CUDA_SUCCESS ||
      base != reinterpret_cast<CUdeviceptr>(ptr) || size < from.size) {
    return Status(StatusCode::kNotSupported,
                  strfmt("the peer's allocation is not the %llu bytes it claims",
                         static_cast<unsigned long long>(from.size)));
  }
  return mapping;
}

IpcMapping::~IpcMapping() {
  DeviceGuard guard(device_);
  switch (route_) {
    case IpcRoute::kLegacy:
      if (cudaIpcCloseMemHandle(base_) != cudaSuccess) (void)cudaGetLastError();
      break;
    case IpcRoute::kShareable: {
      const VmmCalls& vmm = vmmCalls();
      if (!vmm.usable()) break;  // never: the mapping was made with them
      const auto va = reinterpret_cast<CUdeviceptr>(base_);
      (void)vmm.unmap(va, size_);
      (void)vmm.free(va, size_);
      (void)vmm.release(static_cast<CUmemGenericAllocationHandle>(allocation_));
      break;
    }
  }
  if (gate_) g_gate_mappings.fetch_sub(1);
  g_ipc_mappings.fetch_sub(1);
}

int64_t IpcMapping::openCount() {
  return g_ipc_mappings.load() - g_gate_mappings.load();
}

Result<std::unique_ptr<IpcMapping>> IpcMapping::openGate(const IpcExport& from) {
  // A gate area is cudaMalloc memory: its legacy handle needs no owner pid.
  auto mapping = open(from, 0);
  if (mapping.isOk()) {
    mapping.value()->gate_ = true;
    g_gate_mappings.fetch_add(1);
  }
  return mapping;
}

int64_t IpcMapping::gateCount() {
  return g_gate_mappings.load();
}

namespace {
std::atomic<int64_t> g_peer_signals{0};
}  // namespace

Result<std::unique_ptr<PeerSignal>> PeerSignal::open(std::string_view handle, int device) {
  if (deviceCount() == 0) return Status(StatusCode::kNotSupported, unavailableReason());
  if (handle.size() != kSignalHandleBytes) {
    return Status(StatusCode::kInvalidArgument, "a completion signal's handle of the wrong size");
  }
  cudaIpcEventHandle_t h{};
  std::memcpy(&h, handle.data(), sizeof(h));
  DeviceGuard guard(device);
  cudaEvent_t event = nullptr;
  const cudaError_t err = cudaIpcOpenEventHandle(&event, h);
  if (err != cudaSuccess) return cudaFailure("cudaIpcOpenEventHandle", err);
  g_peer_signals.fetch_add(1);
  return std::unique_ptr<PeerSignal>(new PeerSignal(event, device));
}

PeerSignal::~PeerSignal() {
  DeviceGuard guard(device_);
  if (cudaEventDestroy(static_cast<cudaEvent_t>(event_)) != cudaSuccess) (void)cudaGetLastError();
  g_peer_signals.fetch_sub(1);
}

Result<bool> PeerSignal::reached() const {
  DeviceGuard guard(device_);
  const cudaError_t err = cudaEventQuery(static_cast<cudaEvent_t>(event_));
  if (err == cudaErrorNotReady) return false;
  if (err != cudaSuccess) return cudaFailure("a peer's completion signal", err);
  return true;
}

int64_t PeerSignal::openCount() {
  return g_peer_signals.load();
}

// ---- Staging ----

namespace {

// Pinned, mapped descriptor memory the batched copy kernel reads.
struct TileArea {
  CopyTile* host = nullptr;
  CopyTile* dev = nullptr;
  size_t capacity = 0;
};

// What one channel keeps per device it has moved data for.
struct Lane {
  int device = 0;
  cudaStream_t stream = nullptr;
  char* staging = nullptr;      // device memory: one chunk per slot (gather/scatter target)
  std::vector<TileArea> tiles;  // per slot; grown (never shrunk) when a chunk needs more
  // Per slot, made on first use: the streams of copies that follow a receive as it lands
  // (scatterAsLanded), one per slot so that one chunk still landing holds up no other.
  std::vector<cudaStream_t> landing;
  // Areas a slot outgrew. A slot grows only when it is reused, i.e. after its copies finished,
  // but cudaFreeHost would wait for the whole device: they are freed with the lane.
  std::vector<CopyTile*> outgrown;
};

// Whether a slot's landed copy may still wait for words nobody will write.
enum class Landing : uint8_t {
  kNone,       // no landed copy, or its words were set for good (landed() or abandon())
  kFollowing,  // a kernel follows the slot's words: landed() or abandon() must end it
};

struct SlotState {
  void* host = nullptr;
  Landing landing = Landing::kNone;
  // A followed gather's send (gatherFollowed): its size and parts, 0 parts when none.
  uint64_t follow_size = 0;
  int follow_parts = 0;
  std::vector<std::pair<int, cudaEvent_t>> pending;  // one per device with queued copies
  Status failure;  // first copy that could not be queued or failed, reported by ready()
};

Status allocTiles(size_t count, TileArea* area) {
  CopyTile* host = nullptr;
  CopyTile* dev = nullptr;
  cudaError_t err = injectedAllocationFailure(AllocKind::kPinnedHost)
                        ? cudaErrorMemoryAllocation
                        : cudaHostAlloc(reinterpret_cast<void**>(&host), sizeof(CopyTile) * count,
                                        cudaHostAllocPortable | cudaHostAllocMapped);
  if (err == cudaSuccess) err = cudaHostGetDevicePointer(reinterpret_cast<void**>(&dev), host, 0);
  if (err != cudaSuccess) {
    if (host != nullptr) cudaFreeHost(host);
    return cudaFailure(strfmt("cudaHostAlloc of %zu copy descriptors", count), err);
  }
  *area = {host, dev, count};
  return {};
}

// Tiles the pieces of `device` need (pieces are cut into tiles of at most kMaxTileBytes).
size_t tilesFor(const std::vector<Piece>& pieces, int device) {
  size_t n = 0;
  for (const Piece& p : pieces) {
    if (p.device == device) n += (p.len + kMaxTileBytes - 1) / kMaxTileBytes;
  }
  return n;
}

}  // namespace

static_assert(ChannelStaging::kMaxLandedParts == kMaxLandedParts);

struct ChannelStaging::Impl {
  size_t slot_bytes;
  std::vector<SlotState> slots;
  std::vector<std::unique_ptr<Lane>> lanes;
  std::vector<Piece> pieces;  // scratch, reused
  // kLandedWords per slot (pinned, mapped), made on first use: what a reporting receive has
  // landed, then the engine's stop word (copy_kernel.h).
  uint32_t* words = nullptr;

  ~Impl() {
    // A copy still following its words would wait for good: stopped first.
    for (size_t slot = 0; slot < slots.size(); ++slot) stopLanding(static_cast<int>(slot));
    for (auto& lane : lanes) {
      DeviceGuard guard(lane->device);
      if (lane->stream != nullptr) {
        cudaStreamSynchronize(lane->stream);  // nothing in flight may outlive the buffers
        cudaStreamDestroy(lane->stream);
      }
      for (cudaStream_t stream : lane->landing) {
        if (stream == nullptr) continue;
        cudaStreamSynchronize(stream);
        cudaStreamDestroy(stream);
      }
      if (lane->staging != nullptr) cudaFree(lane->staging);  // allocDevice: plain cudaMalloc
      for (const TileArea& area : lane->tiles) {
        if (area.host != nullptr) cudaFreeHost(area.host);
      }
      for (CopyTile* old : lane->outgrown) cudaFreeHost(old);
    }
    for (SlotState& slot : slots) {
      for (auto& [device, ev] : slot.pending) EventPool::instance().release(device, ev);
      freeHost(slot.host);
    }
    freeHost(words);
    (void)cudaGetLastError();
  }

  [[nodiscard]] uint32_t* wordsOf(int slot) const {
    return words + static_cast<size_t>(slot) * kLandedWords;
  }

  // Sets a following slot's words for good: `stop` (abandon) or every part complete (landed).
  void endLanding(int slot, bool stop) {
    SlotState& state = slots[static_cast<size_t>(slot)];
    if (state.landing != Landing::kFollowing) return;
    uint32_t* w = wordsOf(slot);
    if (stop) {
      std::atomic_ref<uint32_t>(w[kLandedStopWord]).store(1, std::memory_order_release);
    } else {
      for (int k = 0; k < kMaxLandedParts; ++k) {
        std::atomic_ref<uint32_t>(w[k]).store(kLandedAll, std::memory_order_release);
      }
    }
    state.landing = Landing::kNone;
  }
  void stopLanding(int slot) { endLanding(slot, /*stop=*/true); }

  Result<cudaStream_t> landingStream(Lane* lane, int slot) {
    if (lane->landing.empty()) lane->landing.assign(slots.size(), nullptr);
    cudaStream_t& stream = lane->landing[static_cast<size_t>(slot)];
    if (stream == nullptr) {
      const cudaError_t err = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
      if (err != cudaSuccess) {
        stream = nullptr;
        return cudaFailure(strfmt("cudaStreamCreate on GPU %d", lane->device), err);
      }
    }
    return stream;
  }

  // Queues `queue`'s work on `stream` of `device` (current) and records the slot's completion
  // event after it, also when `queue` failed part way: the event is taken before anything is
  // queued, so whatever was queued is covered.
  template <typename Queue>
  Status recorded(int slot, int device, cudaStream_t stream, Queue&& queue) {
    auto ev = EventPool::instance().acquire(device);
    if (!ev.isOk()) return ev.status();  // nothing queued yet
    Status st = queue();
    const cudaError_t err = cudaEventRecord(ev.value(), stream);
    if (err == cudaSuccess) {
      slots[static_cast<size_t>(slot)].pending.emplace_back(device, ev.value());
      return st;
    }
    EventPool::instance().release(device, ev.value());
    const Status record = cudaFailure("cudaEventRecord", err);
    // No event covers what was queued: only possible with a broken context, whose stream fails
    // at once; the slot must not be reused while it could still run.
    cudaStreamSynchronize(stream);
    (void)cudaGetLastError();
    return st.isOk() ? record : st;
  }

  // What queueSlotKernel came to.
  enum class SlotKernel : uint8_t {
    kNotApplicable,  // nothing queued: the copies of gather() or scatter() take the chunk
    kNotLaunched,    // the kernel could not be launched; the failure is kept for ready()
    kLaunched,
  };

  // Queues `launch` (a kernel between the pinned `slot` and the pieces of [begin, end) of
  // `segments`) when one GPU holds every piece, all of it live memory: on `stream_for(lane)`,
  // after that GPU's fence in `fences`, with the slot's tiles (the slot is each tile's source when
  // `slot_is_source`, else its destination) and the slot's completion event after it. Anything
  // else (host memory, several GPUs, freed memory, no stream) queues nothing: the copies of
  // gather() and scatter() then fail such a chunk alone.
  template <typename StreamFor, typename Launch>
  SlotKernel queueSlotKernel(int slot, const SegmentList& segments, uint64_t begin, uint64_t end,
                             const Fences* fences, bool slot_is_source, StreamFor&& stream_for,
                             Launch&& launch) {
    piecesOf(segments, begin, end, &pieces);
    const int device = soleDevice();
    if (device < 0) return SlotKernel::kNotApplicable;
    auto l = lane(device);
    if (!l.isOk()) return SlotKernel::kNotApplicable;
    DeviceGuard guard(device);
    if (!allAllocated(pieces)) return SlotKernel::kNotApplicable;
    Lane* ln = l.value();
    const Result<cudaStream_t> stream = stream_for(ln);
    if (!stream.isOk()) return SlotKernel::kNotApplicable;
    void* fence = fences != nullptr ? fences->eventFor(device) : nullptr;
    SlotState& state = slots[static_cast<size_t>(slot)];
    bool launched = false;
    const Status st = recorded(slot, device, stream.value(), [&]() -> Status {
      auto area = tilesOf(ln, slot, pieces.size());
      if (!area.isOk()) return area.status();
      const char* host = static_cast<const char*>(state.host);
      CopyTile* tiles = area.value()->host;
      for (size_t i = 0; i < pieces.size(); ++i) {
        const Piece& p = pieces[i];
        const auto in_slot = reinterpret_cast<uint64_t>(host + p.chunk_offset);
        const auto there = reinterpret_cast<uint64_t>(p.ptr);
        tiles[i] =
            slot_is_source ? CopyTile{in_slot, there, p.len} : CopyTile{there, in_slot, p.len};
      }
      if (fence != nullptr) {
        const cudaError_t err =
            cudaStreamWaitEvent(stream.value(), static_cast<cudaEvent_t>(fence), 0);
        if (err != cudaSuccess) return cudaFailure("cudaStreamWaitEvent", err);
      }
      Status queued =
          launch(area.value()->dev, static_cast<int>(pieces.size()), host, stream.value());
      launched = queued.isOk();
      return queued;
    });
    if (!st.isOk() && state.failure.isOk()) state.failure = st;
    return launched ? SlotKernel::kLaunched : SlotKernel::kNotLaunched;
  }

  bool scatterAsLanded(int slot, const SegmentList& segments, uint64_t begin, uint64_t end,
                       const Fences* fences, int parts) {
    SlotState& state = slots[static_cast<size_t>(slot)];
    if (words == nullptr || state.host == nullptr || parts < 1 || parts > kMaxLandedParts ||
        (end - begin) / static_cast<uint64_t>(parts) + 1 >= kLandedAll) {
      return false;
    }
    const SlotKernel kernel = queueSlotKernel(
        slot, segments, begin, end, fences, /*slot_is_source=*/true,
        [&](Lane* ln) { return landingStream(ln, slot); },
        [&](const CopyTile* tiles, int count, const char* host, cudaStream_t stream) -> Status {
          const cudaError_t err =
              launchLandedCopy(tiles, count, host, end - begin, parts, wordsOf(slot), stream);
          return err == cudaSuccess ? Status() : cudaFailure("landed copy kernel launch", err);
        });
    if (kernel == SlotKernel::kNotApplicable) return false;
    if (kernel == SlotKernel::kLaunched) state.landing = Landing::kFollowing;
    return true;
  }

  const uint32_t* gatherFollowed(int slot, const SegmentList& segments, uint64_t begin,
                                 uint64_t end, const Fences* fences, int parts) {
    if (parts < 1 || parts > kMaxLandedParts || end - begin >= kLandedAll) return nullptr;
    if (!ensureHost(slot).isOk() || !ensureWords().isOk()) return nullptr;
    // Reset before the kernel can raise them; nothing reads them before the send is posted.
    uint32_t* w = resetWords(slot);
    const SlotKernel kernel = queueSlotKernel(
        slot, segments, begin, end, fences, /*slot_is_source=*/false,
        [](Lane* ln) -> Result<cudaStream_t> { return ln->stream; },
        [&](const CopyTile* tiles, int count, const char* host, cudaStream_t stream) -> Status {
          const cudaError_t err =
              launchFollowedGather(tiles, count, host, end - begin, parts, w, stream);
          return err == cudaSuccess ? Status() : cudaFailure("followed gather kernel launch", err);
        });
    if (kernel == SlotKernel::kNotApplicable) return nullptr;
    SlotState& state = slots[static_cast<size_t>(slot)];
    state.follow_size = end - begin;
    state.follow_parts = parts;
    return w;
  }

  [[nodiscard]] uint64_t followedBytes(int slot) const {
    const SlotState& state = slots[static_cast<size_t>(slot)];
    uint64_t sum = 0;
    for (int k = 0; k < state.follow_parts; ++k) {
      sum += std::atomic_ref<uint32_t>(wordsOf(slot)[k]).load(std::memory_order_relaxed);
    }
    return sum;
  }

  void gathered(int slot, bool failed) {
    SlotState& state = slots[static_cast<size_t>(slot)];
    if (state.follow_parts == 0) return;
    // ready() reported the copy: no kernel writes the slot or its words any more. A socket may
    // be sending what a part's count covers, so only the bytes past it are zeroed.
    uint32_t* w = wordsOf(slot);
    const uint64_t size = state.follow_size;
    const auto parts = static_cast<uint64_t>(state.follow_parts);
    for (uint64_t k = 0; k < parts; ++k) {
      const uint64_t begin = size * k / parts;
      const uint64_t len = size * (k + 1) / parts - begin;
      if (failed) {
        const uint64_t copied = std::min<uint64_t>(
            std::atomic_ref<uint32_t>(w[k]).load(std::memory_order_acquire), len);
        std::memset(static_cast<char*>(state.host) + begin + copied, 0, len - copied);
      }
      std::atomic_ref<uint32_t>(w[k]).store(kLandedAll, std::memory_order_release);
    }
    state.follow_parts = 0;
  }

  Status ensureWords() {
    if (words != nullptr) return {};
    auto area = allocHost(slots.size() * kLandedWords * sizeof(uint32_t), /*mapped=*/true);
    if (!area.isOk()) return area.status();
    words = static_cast<uint32_t*>(area.value());
    return {};
  }

  // The slot's previous copy has ended (a slot is reused only once ready()): no reader left.
  uint32_t* resetWords(int slot) {
    uint32_t* w = wordsOf(slot);
    for (int k = 0; k < kLandedWords; ++k) {
      std::atomic_ref<uint32_t>(w[k]).store(0, std::memory_order_relaxed);
    }
    return w;
  }

  // The GPU holding every one of `pieces`, or -1 (no piece, host memory, several GPUs).
  [[nodiscard]] int soleDevice() const {
    if (pieces.empty()) return -1;
    const int device = pieces.front().device;
    if (device == SegmentList::kHost ||
        !std::all_of(pieces.begin(), pieces.end(),
                     [device](const Piece& p) { return p.device == device; })) {
      return -1;
    }
    return device;
  }

  Result<Lane*> lane(int device) {
    for (auto& l : lanes) {
      if (l->device == device) return l.get();
    }
    auto l = std::make_unique<Lane>();
    l->device = device;
    l->tiles.resize(slots.size());
    DeviceGuard guard(device);
    const cudaError_t err = cudaStreamCreateWithFlags(&l->stream, cudaStreamNonBlocking);
    if (err != cudaSuccess) return cudaFailure(strfmt("cudaStreamCreate on GPU %d", device), err);
    lanes.push_back(std::move(l));
    return lanes.back().get();
  }

  // The slot's descriptor area on `lane`, with room for `count` tiles.
  static Result<TileArea*> tilesOf(Lane* lane, int slot, size_t count) {
    TileArea& area = lane->tiles[static_cast<size_t>(slot)];
    if (area.capacity >= count) return &area;
    TileArea grown;
    Status st = allocTiles(std::max(count, std::max(kTilesPerSlot, 2 * area.capacity)), &grown);
    if (!st.isOk()) return st;
    if (area.host != nullptr) lane->outgrown.push_back(area.host);
    area = grown;
    return &area;
  }

  // Queues the copies of the device pieces of one device between the slot's host buffer and
  // their places, after `fence`. `to_host`: gather (device -> host slot) or scatter (host slot
  // -> device). `device_only`: a gather that stops in the lane's device staging (for transports
  // that send from GPU memory); the chunk's pieces are then all on this device. Whatever was
  // queued is covered by the completion event recorded at the end, also when a later copy could
  // not be queued: the event is taken before the first copy.
  Status moveDevicePieces(int slot, Lane* lane, bool whole_chunk, uint64_t chunk_bytes,
                          bool to_host, void* fence, bool device_only = false) {
    return recorded(slot, lane->device, lane->stream, [&] {
      return queueCopies(slot, lane, whole_chunk, chunk_bytes, to_host, fence, device_only);
    });
  }

  Status queueCopies(int slot, Lane* lane, bool whole_chunk, uint64_t chunk_bytes, bool to_host,
                     void* fence, bool device_only) {
    char* host = static_cast<char*>(slots[static_cast<size_t>(slot)].host);
    cudaStream_t stream = lane->stream;
    size_t count = 0;
    for (const Piece& p : pieces) count += p.device == lane->device ? 1 : 0;
    // A kernel will touch the pieces: checked before anything is allocated or queued (an
    // allocation made after the application's free could take the freed addresses).
    if (count > 1 && whole_chunk && !allAllocated(pieces)) {
      return Status(StatusCode::kDeviceError,
                    strfmt("%s GPU %d: some of the chunk's %zu pieces lie outside live device "
                           "memory (freed before it was deregistered?)",
                           to_host ? "gather from" : "scatter to", lane->device, count));
    }
    cudaError_t err = cudaSuccess;
    if (fence != nullptr) {
      err = cudaStreamWaitEvent(stream, static_cast<cudaEvent_t>(fence), 0);
      if (err != cudaSuccess) return cudaFailure("cudaStreamWaitEvent", err);
    }

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
      return {};
    }
    if (count > 1 && whole_chunk) {
      // Many pieces, all on this device: one batched kernel between the pieces and a contiguous
      // device staging area, and one DMA between that area and the host slot.
      auto area = tilesOf(lane, slot, tilesFor(pieces, lane->device));
      if (!area.isOk()) return area.status();
      if (!to_host) {
        err = cudaMemcpyAsync(staging, host, chunk_bytes, cudaMemcpyHostToDevice, stream);
        if (err != cudaSuccess) return cudaFailure("cudaMemcpyAsync to device staging", err);
      }
      CopyTile* tiles = area.value()->host;
      size_t n = 0;
      for (const Piece& p : pieces) {
        for (uint64_t done = 0; done < p.len; done += kMaxTileBytes) {
          const uint64_t len = std::min(kMaxTileBytes, p.len - done);
          const auto dev_side = reinterpret_cast<uint64_t>(p.ptr + done);
          const auto staged = reinterpret_cast<uint64_t>(staging + p.chunk_offset + done);
          tiles[n++] = to_host ? CopyTile{dev_side, staged, len} : CopyTile{staged, dev_side, len};
        }
      }
      err = launchBatchedCopy(area.value()->dev, static_cast<int>(n), stream);
      if (err != cudaSuccess) return cudaFailure("batched copy kernel launch", err);
      if (to_host && !device_only) {
        err = cudaMemcpyAsync(host, staging, chunk_bytes, cudaMemcpyDeviceToHost, stream);
        if (err != cudaSuccess) return cudaFailure("cudaMemcpyAsync from device staging", err);
      }
      return {};
    }
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
    return {};
  }

  // Moves one chunk; a failure is kept for ready().
  void move(int slot, const SegmentList& segments, uint64_t begin, uint64_t end, bool to_host,
            const Fences* fences) {
    SlotState& state = slots[static_cast<size_t>(slot)];
    Status st = ensureHost(slot);
    if (st.isOk()) st = moveChunk(slot, segments, begin, end, to_host, fences);
    if (!st.isOk() && state.failure.isOk()) state.failure = st;
  }

  Status ensureHost(int slot) {
    SlotState& s = slots[static_cast<size_t>(slot)];
    if (s.host != nullptr) return {};
    // Mapped: a landed copy's kernel reads the slot itself.
    auto buffer = allocHost(slot_bytes, /*mapped=*/true);
    if (!buffer.isOk()) return buffer.status();
    s.host = buffer.value();
    return {};
  }

  Status moveChunk(int slot, const SegmentList& segments, uint64_t begin, uint64_t end,
                   bool to_host, const Fences* fences) {
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
    // Copies already queued on one device when another fails stay covered by their event.
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

bool ChannelStaging::idle() const {
  return std::all_of(impl_->lanes.begin(), impl_->lanes.end(), [](const auto& lane) {
    return (lane->stream == nullptr || streamIdle(lane->stream, lane->device)) &&
           std::all_of(lane->landing.begin(), lane->landing.end(),
                       [&](cudaStream_t s) { return s == nullptr || streamIdle(s, lane->device); });
  });
}

Result<void*> ChannelStaging::slotBuffer(int slot) {
  Status st = impl_->ensureHost(slot);
  if (!st.isOk()) return st;
  return impl_->slots[static_cast<size_t>(slot)].host;
}

void ChannelStaging::gather(int slot, const SegmentList& segments, uint64_t begin, uint64_t end,
                            const Fences* fences) {
  impl_->move(slot, segments, begin, end, /*to_host=*/true, fences);
}

void ChannelStaging::scatter(int slot, const SegmentList& segments, uint64_t begin, uint64_t end,
                             const Fences* fences) {
  impl_->move(slot, segments, begin, end, /*to_host=*/false, fences);
}

void ChannelStaging::gatherOnDevice(int slot, int device, const SegmentList& segments,
                                    uint64_t begin, uint64_t end, const Fences* fences,
                                    void** out) {
  *out = nullptr;
  SlotState& state = impl_->slots[static_cast<size_t>(slot)];
  piecesOf(segments, begin, end, &impl_->pieces);
  auto l = impl_->lane(device);
  Status st = l.status();
  if (st.isOk()) {
    DeviceGuard guard(device);
    st = impl_->moveDevicePieces(slot, l.value(), /*whole_chunk=*/true, end - begin,
                                 /*to_host=*/true,
                                 fences != nullptr ? fences->eventFor(device) : nullptr,
                                 /*device_only=*/true);
    if (l.value()->staging != nullptr) {
      *out = l.value()->staging + static_cast<size_t>(slot) * slot_bytes_;
    }
  }
  if (!st.isOk() && state.failure.isOk()) state.failure = st;
}

Result<std::pair<void*, size_t>> ChannelStaging::deviceArea(int device) {
  for (auto& lane : impl_->lanes) {
    if (lane->device == device && lane->staging != nullptr) {
      return std::pair<void*, size_t>{lane->staging, slot_bytes_ * impl_->slots.size()};
    }
  }
  return Status(StatusCode::kNotFound, strfmt("no device staging on GPU %d", device));
}

Result<uint32_t*> ChannelStaging::landedWords(int slot) {
  Status st = impl_->ensureWords();
  if (!st.isOk()) return st;
  return impl_->resetWords(slot);
}

const uint32_t* ChannelStaging::gatherFollowed(int slot, const SegmentList& segments,
                                               uint64_t begin, uint64_t end, const Fences* fences,
                                               int parts) {
  return impl_->gatherFollowed(slot, segments, begin, end, fences, parts);
}

void ChannelStaging::gathered(int slot, bool failed) {
  impl_->gathered(slot, failed);
}

uint64_t ChannelStaging::followedBytes(int slot) const {
  return impl_->followedBytes(slot);
}

bool ChannelStaging::scatterAsLanded(int slot, const SegmentList& segments, uint64_t begin,
                                     uint64_t end, const Fences* fences, int parts) {
  return impl_->scatterAsLanded(slot, segments, begin, end, fences, parts);
}

void ChannelStaging::landed(int slot) {
  impl_->endLanding(slot, /*stop=*/false);
}

void ChannelStaging::abandon(int slot) {
  impl_->stopLanding(slot);
}

bool ChannelStaging::gaveUp(int slot) const {
  if (impl_->words == nullptr) return false;
  return std::atomic_ref<uint32_t>(impl_->wordsOf(slot)[kLandedGaveUpWord])
             .load(std::memory_order_acquire) != 0;
}

Result<bool> ChannelStaging::ready(int slot) {
  SlotState& state = impl_->slots[static_cast<size_t>(slot)];
  auto& pending = state.pending;
  while (!pending.empty()) {
    const auto [device, ev] = pending.back();
    DeviceGuard guard(device);
    const cudaError_t err = cudaEventQuery(ev);
    if (err == cudaErrorNotReady) return false;
    pending.pop_back();
    EventPool::instance().release(device, ev);
    if (err != cudaSuccess && state.failure.isOk())
      state.failure = cudaFailure("staging copy", err);
  }
  if (!state.failure.isOk()) return std::exchange(state.failure, Status());
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

bool isDeviceMemory(const void* ptr) {
  if (deviceCount() == 0 || ptr == nullptr) return false;
  PointerAttributes attributes = pointerAttributesFunction();
  if (attributes == nullptr) return false;
  unsigned int type = 0;
  unsigned int managed = 0;
  std::array<CUpointer_attribute, 2> which{CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
                                           CU_POINTER_ATTRIBUTE_IS_MANAGED};
  std::array<void*, 2> values{&type, &managed};
  // Host memory (even unknown to CUDA) answers type 0 or CU_MEMORYTYPE_HOST.
  if (attributes(2, which.data(), values.data(), reinterpret_cast<CUdeviceptr>(ptr)) !=
      CUDA_SUCCESS) {
    return false;
  }
  return type == CU_MEMORYTYPE_DEVICE && managed == 0;
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
      injectedAllocationFailure(AllocKind::kPinnedHost)
          ? cudaErrorMemoryAllocation
          : cudaHostAlloc(&ptr, rounded,
                          cudaHostAllocPortable | (mapped ? cudaHostAllocMapped : 0U));
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
      injectedAllocationFailure(AllocKind::kDevice)
          ? cudaErrorMemoryAllocation
          : cudaMalloc(&ptr, (std::max<size_t>(bytes, 1) + kUnit - 1) / kUnit * kUnit);
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

void failNextAllocations(AllocKind kind, int count) {
  g_failing_allocations[static_cast<size_t>(kind)].store(std::max(count, 0));
}

Status copySync(void* dst, const void* src, size_t bytes) {
  if (deviceCount() == 0) {
    std::memcpy(dst, src, bytes);
    return {};
  }
  // Not cudaMemcpy: on the legacy default stream it would wait for the application's kernels
  // (the engine calls this on its progress thread, e.g. to read a plugin's unpack handle). A
  // non-blocking stream of the calling thread's device waits only for this copy.
  struct ThreadStreams {
    std::unordered_map<int, cudaStream_t> by_device;
    ~ThreadStreams() {
      for (auto& [device, stream] : by_device) {
        if (stream != nullptr) cudaStreamDestroy(stream);
      }
    }
  };
  static thread_local ThreadStreams streams;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  cudaStream_t& stream = streams.by_device[device];
  if (err == cudaSuccess && stream == nullptr) {
    err = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
    if (err != cudaSuccess) stream = nullptr;
  }
  if (err == cudaSuccess) err = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream);
  if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
  if (err != cudaSuccess) return cudaFailure(strfmt("copy of %zu bytes", bytes), err);
  return {};
}

// ---- WaitingCopier ----

struct WaitingCopier::Impl {
  std::unordered_map<int, cudaStream_t> streams;  // by device

  ~Impl() {
    for (auto& [device, stream] : streams) {
      DeviceGuard guard(device);
      cudaStreamSynchronize(stream);
      cudaStreamDestroy(stream);
    }
    (void)cudaGetLastError();
  }
};

WaitingCopier::WaitingCopier() : impl_(std::make_unique<Impl>()) {}
WaitingCopier::~WaitingCopier() = default;

Status WaitingCopier::copy(int device, const std::vector<CopyPiece>& pieces,
                           const std::vector<void*>& after) {
  if (deviceCount() == 0) return Status(StatusCode::kNotSupported, unavailableReason());
  DeviceGuard guard(device);
  cudaStream_t& stream = impl_->streams[device];
  if (stream == nullptr) {
    const cudaError_t err = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
    if (err != cudaSuccess) {
      stream = nullptr;
      impl_->streams.erase(device);
      return cudaFailure(strfmt("cudaStreamCreate on GPU %d", device), err);
    }
  }
  Status failure;
  for (void* event : after) {
    if (event == nullptr) continue;
    const cudaError_t err = cudaStreamWaitEvent(stream, static_cast<cudaEvent_t>(event), 0);
    if (err != cudaSuccess) {
      // Copying now could overwrite memory the caller's GPU work still uses: copy nothing.
      failure = cudaFailure("cudaStreamWaitEvent", err);
      break;
    }
  }
  for (size_t i = 0; failure.isOk() && i < pieces.size(); ++i) {
    const CopyPiece& piece = pieces[i];
    const auto dst = reinterpret_cast<uintptr_t>(piece.dst);
    const auto src = reinterpret_cast<uintptr_t>(piece.src);
    cudaError_t err = cudaSuccess;
    if (dst < src + piece.len && src < dst + piece.len) {
      // A piece that overlaps itself (possible only within one allocation, so one GPU's) goes
      // through a stream-ordered temporary: a direct copy of overlapping ranges is undefined.
      void* tmp = nullptr;
      err = cudaMallocAsync(&tmp, piece.len, stream);
      if (err == cudaSuccess) {
        err = cudaMemcpyAsync(tmp, piece.src, piece.len, cudaMemcpyDefault, stream);
        if (err == cudaSuccess) {
          err = cudaMemcpyAsync(piece.dst, tmp, piece.len, cudaMemcpyDefault, stream);
        }
        const cudaError_t freed = cudaFreeAsync(tmp, stream);
        if (err == cudaSuccess) err = freed;
      }
    } else {
      // cudaMemcpyDefault: host memory (pageable included: the call then returns once the
      // bytes are staged or copied) and device memory of any GPU, peer copies included.
      err = cudaMemcpyAsync(piece.dst, piece.src, piece.len, cudaMemcpyDefault, stream);
    }
    if (err != cudaSuccess) {
      failure =
          cudaFailure(strfmt("copy of %llu bytes (piece %zu of %zu)",
                             static_cast<unsigned long long>(piece.len), i + 1, pieces.size()),
                      err);
    }
  }
  // Also after a failure: what was queued lands before the caller hears of it.
  const cudaError_t err = cudaStreamSynchronize(stream);
  if (err != cudaSuccess && failure.isOk()) failure = cudaFailure("cudaStreamSynchronize", err);
  return failure;
}

// ---- CopyQueue ----

struct CopyQueue::Impl {
  struct Batch {
    TileArea tiles;  // allocated when the batch first carries copies
    size_t count = 0;
    uint64_t max_len = 0;
    cudaEvent_t event = nullptr;
    uint64_t ticket = 0;  // 0: not in flight
  };
  cudaStream_t stream = nullptr;
  std::vector<std::unique_ptr<Batch>> batches;  // every batch ever made
  std::deque<Batch*> in_flight;                 // launched, oldest first
  std::vector<Batch*> free;                     // finished, ready for reuse
  Batch* filling = nullptr;                     // receives add()s
  uint64_t next_ticket = 1;
  uint64_t last_done = 0;  // every ticket up to this one finished
  Status broken;           // set-up, a launch or a copy failed: every later call says so
  OnFailure on_failure = OnFailure::kWait;
  bool dma_pending = false;  // a DMA was queued after the last recorded event
  // Signals other processes poll (shareCompletion), by index into `signals`.
  struct Signal {
    cudaEvent_t event = nullptr;
    std::string handle;  // cudaIpcEventHandle_t
  };
  std::vector<Signal> signals;         // every signal ever made
  std::deque<size_t> signals_pending;  // recorded and not seen reached, oldest first
  std::vector<size_t> signals_free;    // seen reached: may be recorded again

  Status ensure(int device) {
    if (stream != nullptr || !broken.isOk()) return broken;
    if (deviceCount() == 0) return broken = Status(StatusCode::kNotSupported, unavailableReason());
    DeviceGuard guard(device);
    const cudaError_t err = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
    if (err != cudaSuccess) {
      stream = nullptr;
      return broken = cudaFailure("cudaStreamCreate", err);
    }
    return {};
  }

  // The batch add() fills: a finished one, or a new one when every batch is in flight.
  Result<Batch*> fillingBatch(int device) {
    if (filling != nullptr) return filling;
    if (!free.empty()) {
      filling = free.back();
      free.pop_back();
      return filling;
    }
    auto b = std::make_unique<Batch>();
    DeviceGuard guard(device);
    const cudaError_t err = cudaEventCreateWithFlags(&b->event, cudaEventDisableTiming);
    if (err != cudaSuccess) return cudaFailure("creating a copy batch's event", err);
    batches.push_back(std::move(b));
    filling = batches.back().get();
    return filling;
  }

  Status launchFilling(int device) {
    if (filling == nullptr || (filling->count == 0 && !dma_pending)) {
      if (!dma_pending) return {};
      auto b = fillingBatch(device);  // a DMA alone still gets an event and a ticket
      if (!b.isOk()) return b.status();
    }
    Batch& b = *filling;
    DeviceGuard guard(device);
    cudaError_t err = cudaSuccess;
    if (b.count > 0) {
      err = launchBatchedCopy(b.tiles.dev, static_cast<int>(b.count), stream, b.max_len);
    }
    if (err == cudaSuccess) err = cudaEventRecord(b.event, stream);
    dma_pending = false;
    if (err != cudaSuccess) {
      // Nothing covers what is on the stream (the kernel may read the batch's tiles, a DMA may
      // still run): wait for it before the batch is reused (a broken context fails at once), and
      // the queue stays broken. kLeave: the stream may wait for a gate only our caller opens;
      // the batch is never reused (the queue stays broken), and the destructor waits.
      const Status failed = cudaFailure("batched copy launch", err);
      if (on_failure == OnFailure::kWait) {
        cudaStreamSynchronize(stream);
        b.count = 0;
        b.max_len = 0;
      }
      return broken = failed;
    }
    b.ticket = next_ticket++;
    in_flight.push_back(&b);
    filling = nullptr;
    return {};
  }

  // Retires finished batches, oldest first (they finish in launch order).
  Status retire(int device) {
    DeviceGuard guard(device);
    while (!in_flight.empty()) {
      Batch* b = in_flight.front();
      const cudaError_t err = cudaEventQuery(b->event);
      if (err == cudaErrorNotReady) break;
      in_flight.pop_front();
      last_done = b->ticket;
      b->ticket = 0;
      b->count = 0;
      b->max_len = 0;
      free.push_back(b);
      // Every later ticket's bytes are in doubt too: each later done() reports the failure.
      if (err != cudaSuccess) return broken = cudaFailure("unpack copy", err);
    }
    return broken;
  }
};

CopyQueue::CopyQueue(int device, OnFailure on_failure)
    : device_(device), impl_(std::make_unique<Impl>()) {
  impl_->on_failure = on_failure;
}

CopyQueue::~CopyQueue() {
  if (impl_->stream != nullptr) {
    DeviceGuard guard(device_);
    cudaStreamSynchronize(impl_->stream);
    cudaStreamDestroy(impl_->stream);
  }
  for (auto& b : impl_->batches) {
    if (b->tiles.host != nullptr) cudaFreeHost(b->tiles.host);
    if (b->event != nullptr) cudaEventDestroy(b->event);
  }
  // A process that still has one open reads an error from it from now on.
  for (auto& signal : impl_->signals) cudaEventDestroy(signal.event);
  (void)cudaGetLastError();
}

Status CopyQueue::add(const void* src, void* dst, uint64_t len) {
  Status st = impl_->ensure(device_);
  if (!st.isOk()) return st;
  for (uint64_t done = 0; done < len; done += kMaxTileBytes) {
    auto b = impl_->fillingBatch(device_);
    if (!b.isOk()) return b.status();
    if (b.value()->count == kTilesPerBatch) {
      st = impl_->launchFilling(device_);
      if (!st.isOk()) return st;
      b = impl_->fillingBatch(device_);
      if (!b.isOk()) return b.status();
    }
    Impl::Batch& batch = *b.value();
    if (batch.tiles.host == nullptr) {
      DeviceGuard guard(device_);
      st = allocTiles(kTilesPerBatch, &batch.tiles);
      if (!st.isOk()) return st;
    }
    const uint64_t n = std::min(kMaxTileBytes, len - done);
    batch.tiles.host[batch.count++] = {reinterpret_cast<uint64_t>(src) + done,
                                       reinterpret_cast<uint64_t>(dst) + done, n};
    batch.max_len = std::max(batch.max_len, n);
  }
  return {};
}

Status CopyQueue::after(void* event) {
  if (event == nullptr) return {};
  Status st = impl_->ensure(device_);
  if (!st.isOk()) return st;
  DeviceGuard guard(device_);
  const cudaError_t err = cudaStreamWaitEvent(impl_->stream, static_cast<cudaEvent_t>(event), 0);
  if (err != cudaSuccess) return cudaFailure("cudaStreamWaitEvent", err);
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

Result<std::string> CopyQueue::shareCompletion() {
  static_assert(sizeof(cudaIpcEventHandle_t) == kSignalHandleBytes);
  Status st = impl_->ensure(device_);
  if (!st.isOk()) return st;
  Impl& q = *impl_;
  DeviceGuard guard(device_);
  // Recorded on one stream, so reached in order. One that reports an error is reused too: the
  // failure is the batches' to report.
  while (!q.signals_pending.empty()) {
    const cudaError_t err = cudaEventQuery(q.signals[q.signals_pending.front()].event);
    if (err == cudaErrorNotReady) break;
    if (err != cudaSuccess) (void)cudaGetLastError();
    q.signals_free.push_back(q.signals_pending.front());
    q.signals_pending.pop_front();
  }
  size_t index = 0;
  if (!q.signals_free.empty()) {
    index = q.signals_free.back();
    q.signals_free.pop_back();
  } else {
    if (q.signals.size() >= kMaxSignals) {
      return Status(StatusCode::kResourceExhausted,
                    strfmt("%zu completion signals pending", q.signals.size()));
    }
    cudaEvent_t event = nullptr;
    cudaError_t err =
        cudaEventCreateWithFlags(&event, cudaEventDisableTiming | cudaEventInterprocess);
    if (err != cudaSuccess) return cudaFailure("creating a completion signal", err);
    cudaIpcEventHandle_t handle{};
    err = cudaIpcGetEventHandle(&handle, event);
    if (err != cudaSuccess) {
      cudaEventDestroy(event);
      return cudaFailure("cudaIpcGetEventHandle", err);
    }
    q.signals.push_back(
        {event, std::string(reinterpret_cast<const char*>(&handle), sizeof(handle))});
    index = q.signals.size() - 1;
  }
  const cudaError_t err = cudaEventRecord(q.signals[index].event, q.stream);
  if (err != cudaSuccess) {
    q.signals_free.push_back(index);
    return cudaFailure("recording a completion signal", err);
  }
  q.signals_pending.push_back(index);
  return q.signals[index].handle;
}

namespace {

// The stream-memory calls of the CUDA 12 driver ABI (cuStreamWaitValue32_v2 and
// cuStreamWriteValue32_v2); null where the driver lacks them.
struct StreamValueCalls {
  CUresult (*wait)(CUstream, CUdeviceptr, cuuint32_t, unsigned int) = nullptr;
  CUresult (*write)(CUstream, CUdeviceptr, cuuint32_t, unsigned int) = nullptr;
  [[nodiscard]] bool usable() const { return wait != nullptr && write != nullptr; }
};

const StreamValueCalls& streamValueCalls() {
  static const StreamValueCalls calls = [] {
    StreamValueCalls c;
    c.wait = driverEntry<decltype(c.wait)>("cuStreamWaitValue32");
    c.write = driverEntry<decltype(c.write)>("cuStreamWriteValue32");
    return c;
  }();
  return calls;
}

Status driverFailure(const char* what, CUresult r) {
  (void)cudaGetLastError();
  return Status(StatusCode::kDeviceError,
                strfmt("%s failed (CUresult %d)", what, static_cast<int>(r)));
}

}  // namespace

Status CopyQueue::waitFor(const void* word, uint32_t value) {
  const StreamValueCalls& calls = streamValueCalls();
  if (!calls.usable()) {
    return Status(StatusCode::kNotSupported, "the CUDA driver lacks cuStreamWaitValue32");
  }
  Status st = impl_->ensure(device_);
  if (!st.isOk()) return st;
  DeviceGuard guard(device_);
  const CUresult r =
      calls.wait(reinterpret_cast<CUstream>(impl_->stream), reinterpret_cast<CUdeviceptr>(word),
                 value, CU_STREAM_WAIT_VALUE_EQ);
  if (r != CUDA_SUCCESS) return driverFailure("cuStreamWaitValue32", r);
  return {};
}

Status Fences::recordAfterWrite(int device, void* word, uint32_t value, bool* queued) {
  clear();
  *queued = false;
  const StreamValueCalls& calls = streamValueCalls();
  if (!calls.usable()) {
    return Status(StatusCode::kNotSupported, "the CUDA driver lacks cuStreamWriteValue32");
  }
  // The event first: once the write is queued, a fence must cover it.
  auto ev = EventPool::instance().acquire(device);
  if (!ev.isOk()) return ev.status();
  DeviceGuard guard(device);
  const CUresult r = calls.write(CU_STREAM_LEGACY, reinterpret_cast<CUdeviceptr>(word), value, 0);
  if (r != CUDA_SUCCESS) {
    EventPool::instance().release(device, ev.value());
    return driverFailure("cuStreamWriteValue32 on the default stream", r);
  }
  *queued = true;
  const cudaError_t err = cudaEventRecord(ev.value(), cudaStreamLegacy);
  if (err != cudaSuccess) {
    // No event covers the write (only with a broken context). Not waited for: the stream may
    // wait for the application's work.
    EventPool::instance().release(device, ev.value());
    return cudaFailure("cudaEventRecord on the default stream", err);
  }
  entries_.push_back({device, ev.value()});
  return {};
}

// ---- Read gates ----

namespace {

enum class GateSlotState : uint8_t { kFree, kTaken, kBurned };

// One GPU's area: its words, their states and the stream openHere() writes on.
struct GateArea {
  uint32_t* words = nullptr;
  IpcExport exported;
  cudaStream_t stream = nullptr;
  std::vector<GateSlotState> states;
  uint32_t next = 0;  // where the search for a free slot starts
  uint32_t free = 0;  // slots in kFree
};

std::mutex g_gates_mu;
uint32_t g_gate_value = 0;  // the last value handed out (never 0)
uint64_t g_gates_burned = 0;

std::unordered_map<int, GateArea>& gateAreas() {
  static auto* areas = new std::unordered_map<int, GateArea>;  // never freed (see ReadGates)
  return *areas;
}

// `device`'s area, made on first use (g_gates_mu held).
Result<GateArea*> gateArea(int device) {
  auto& areas = gateAreas();
  auto it = areas.find(device);
  if (it != areas.end()) return &it->second;
  if (!streamValueCalls().usable()) {
    return Status(StatusCode::kNotSupported, "the CUDA driver lacks the stream-memory calls");
  }
  DeviceGuard guard(device);
  GateArea area;
  constexpr size_t kBytes = ReadGates::kSlots * sizeof(uint32_t);
  cudaError_t err = cudaMalloc(reinterpret_cast<void**>(&area.words), kBytes);
  if (err != cudaSuccess) return cudaFailure("cudaMalloc of the read gates", err);
  err = cudaStreamCreateWithFlags(&area.stream, cudaStreamNonBlocking);
  // Zeroed on the area's own stream: a synchronous memset would wait for the application's work
  // on the legacy default stream.
  if (err == cudaSuccess) err = cudaMemsetAsync(area.words, 0, kBytes, area.stream);
  if (err == cudaSuccess) err = cudaStreamSynchronize(area.stream);
  if (err != cudaSuccess) {
    const Status failed = cudaFailure("setting up the read gates", err);
    if (area.stream != nullptr) cudaStreamDestroy(area.stream);
    cudaFree(area.words);
    return failed;
  }
  auto exported = exportIpc(area.words, device);
  if (!exported.isOk()) {
    cudaStreamDestroy(area.stream);
    cudaFree(area.words);
    return exported.status();
  }
  area.exported = std::move(exported.value());
  area.states.assign(ReadGates::kSlots, GateSlotState::kFree);
  area.free = ReadGates::kSlots;
  return &areas.emplace(device, std::move(area)).first->second;
}

}  // namespace

Result<ReadGates::Slot> ReadGates::take(int device) {
  if (deviceCount() == 0) return Status(StatusCode::kNotSupported, unavailableReason());
  std::lock_guard<std::mutex> lock(g_gates_mu);
  auto area = gateArea(device);
  if (!area.isOk()) return area.status();
  GateArea& a = *area.value();
  for (uint32_t n = 0; a.free > 0 && n < kSlots; ++n) {
    const uint32_t index = (a.next + n) % kSlots;
    if (a.states[index] != GateSlotState::kFree) continue;
    a.states[index] = GateSlotState::kTaken;
    --a.free;
    a.next = (index + 1) % kSlots;
    if (++g_gate_value == 0) g_gate_value = 1;
    Slot slot;
    slot.device = device;
    slot.index = index;
    slot.value = g_gate_value;
    slot.word = a.words + index;
    slot.area = a.exported;
    return slot;
  }
  return Status(StatusCode::kResourceExhausted, "every read gate is taken or burned");
}

void ReadGates::giveBack(const Slot& slot) {
  std::lock_guard<std::mutex> lock(g_gates_mu);
  auto it = gateAreas().find(slot.device);
  if (it == gateAreas().end() || slot.index >= kSlots) return;
  if (it->second.states[slot.index] == GateSlotState::kTaken) {
    it->second.states[slot.index] = GateSlotState::kFree;
    ++it->second.free;
  }
}

Status ReadGates::openHere(const Slot& slot, bool burn) {
  std::lock_guard<std::mutex> lock(g_gates_mu);
  auto it = gateAreas().find(slot.device);
  if (it == gateAreas().end() || slot.index >= kSlots) {
    return Status(StatusCode::kInvalidArgument, "no such read gate");
  }
  GateArea& a = it->second;
  if (burn && a.states[slot.index] != GateSlotState::kBurned) {
    if (a.states[slot.index] == GateSlotState::kFree) --a.free;
    a.states[slot.index] = GateSlotState::kBurned;
    ++g_gates_burned;
  }
  DeviceGuard guard(slot.device);
  const CUresult r =
      streamValueCalls().write(reinterpret_cast<CUstream>(a.stream),
                               reinterpret_cast<CUdeviceptr>(slot.word), slot.value, 0);
  if (r != CUDA_SUCCESS) return driverFailure("cuStreamWriteValue32 (opening a read gate)", r);
  return {};
}

uint64_t ReadGates::burnedCount() {
  std::lock_guard<std::mutex> lock(g_gates_mu);
  return g_gates_burned;
}

Result<uint64_t> CopyQueue::launch() {
  Status st = impl_->ensure(device_);
  if (!st.isOk()) return st;
  st = impl_->launchFilling(device_);
  if (!st.isOk()) return st;
  return impl_->next_ticket - 1;
}

Result<bool> CopyQueue::done(uint64_t ticket) {
  if (!impl_->broken.isOk()) return impl_->broken;
  if (ticket <= impl_->last_done) return true;
  Status st = impl_->retire(device_);
  if (!st.isOk()) return st;
  return ticket <= impl_->last_done;
}

Status CopyQueue::sync() {
  if (impl_->stream == nullptr) return {};
  {
    DeviceGuard guard(device_);
    const cudaError_t err = cudaStreamSynchronize(impl_->stream);
    if (err != cudaSuccess) return cudaFailure("unpack copy", err);
  }
  return impl_->retire(device_);
}

bool CopyQueue::idle() const {
  return impl_->stream == nullptr || streamIdle(impl_->stream, device_);
}

// ---- Device switches ----

DeviceScope::DeviceScope(int device) {
  if (deviceCount() == 0) return;
  const ContextCalls& calls = contextCalls();
  if (!calls.usable()) {
    if (cudaGetDevice(&previous_device_) != cudaSuccess) previous_device_ = -1;
    if (previous_device_ != device && cudaSetDevice(device) == cudaSuccess) {
      restore_ = previous_device_ >= 0;
    }
    return;
  }
  CUcontext current = nullptr;
  if (calls.get(&current) != CUDA_SUCCESS) return;
  // Only the device's primary context will do: the engine's streams, events and allocations
  // live there, and a context the application made itself (cuCtxCreate) on the same device
  // cannot use them.
  if (current != nullptr && current == knownPrimary(device)) return;
  previous_ = current;
  if (cudaSetDevice(device) == cudaSuccess) {
    CUcontext primary = nullptr;
    if (calls.get(&primary) == CUDA_SUCCESS && primary != nullptr) notePrimary(device, primary);
    // An engine thread that had no context keeps this one (every later switch comes back to it
    // instead of to none); one that had a context always gets it back.
    restore_ = current != primary && !(t_engine_thread && current == nullptr);
  } else {
    (void)cudaGetLastError();
  }
}

void markEngineThread() {
  t_engine_thread = true;
}

DeviceScope::~DeviceScope() {
  if (!restore_) return;
  const ContextCalls& calls = contextCalls();
  if (calls.usable()) {
    calls.set(static_cast<CUcontext>(previous_));
  } else {
    cudaSetDevice(previous_device_);
  }
}

}  // namespace tcpx::gpu
