#include "common/pattern_memory.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <random>

#include "common/random.h"
#include "gpu/gpu.h"

#if TCPX_P2P_HAVE_CUDA
#include <cuda.h>
#include <cuda_runtime.h>
#endif

namespace tcpx::tools {

uint64_t randomSeed() {
  std::random_device device;
  return (static_cast<uint64_t>(device()) << 32) | device();
}

HostBuffer::HostBuffer(size_t size, uint8_t fill) : size_(size) {
  void* p = nullptr;
  if (posix_memalign(&p, 4096, size == 0 ? 1 : size) != 0) std::abort();
  data_ = static_cast<uint8_t*>(p);
  std::memset(data_, fill, size);
}

HostBuffer::~HostBuffer() {
  std::free(data_);
}

void PatternMemory::fill(uint64_t offset, uint64_t length, uint64_t seed, uint64_t start) {
  std::vector<uint8_t> bytes(length);
  fillPattern(bytes.data(), length, seed, start);
  write(offset, bytes.data(), length);
}

int64_t PatternMemory::check(uint64_t offset, uint64_t length, uint64_t seed,
                             uint64_t start) const {
  const std::vector<uint8_t> bytes = read(offset, length);
  return checkPattern(bytes.data(), length, seed, start);
}

void PatternMemory::fillByte(uint64_t offset, uint64_t length, uint8_t value) {
  const std::vector<uint8_t> bytes(length, value);
  write(offset, bytes.data(), length);
}

int64_t PatternMemory::checkByte(uint64_t offset, uint64_t length, uint8_t value) const {
  const std::vector<uint8_t> bytes = read(offset, length);
  for (uint64_t i = 0; i < length; ++i) {
    if (bytes[i] != value) return static_cast<int64_t>(i);
  }
  return -1;
}

namespace {

class HostMemory final : public PatternMemory {
 public:
  HostMemory(size_t size, uint8_t fill) : buffer_(size, fill) {}
  [[nodiscard]] uint8_t* data() const override { return buffer_.data(); }
  [[nodiscard]] size_t size() const override { return buffer_.size(); }
  [[nodiscard]] MemoryKind kind() const override { return MemoryKind::kHost; }
  [[nodiscard]] int device() const override { return -1; }
  std::vector<uint8_t> read(uint64_t offset, uint64_t length) const override {
    return {data() + offset, data() + offset + length};
  }
  void write(uint64_t offset, const void* src, uint64_t length) override {
    std::memcpy(data() + offset, src, length);
  }
  void queueFill(uint64_t offset, uint64_t length, uint8_t value) override {
    std::memset(data() + offset, value, length);
  }

 private:
  HostBuffer buffer_;
};

#if TCPX_P2P_HAVE_CUDA
class GpuMemory final : public PatternMemory {
 public:
  // nullptr data() when the VMM API is not offered.
  GpuMemory(size_t size, int device, uint8_t fill, GpuAllocation how)
      : size_(size), device_(device), how_(how) {
    cudaSetDevice(device);
    if (how == GpuAllocation::kRuntime) {
      if (cudaMalloc(&data_, size == 0 ? 1 : size) != cudaSuccess) std::abort();
    } else if (!vmmAllocate()) {
      return;
    }
    cudaMemset(data_, fill, size);
    cudaDeviceSynchronize();
  }
  ~GpuMemory() override {
    if (data_ != nullptr && !released_) free();
  }
  [[nodiscard]] uint8_t* data() const override { return static_cast<uint8_t*>(data_); }
  [[nodiscard]] size_t size() const override { return size_; }
  [[nodiscard]] MemoryKind kind() const override { return MemoryKind::kCuda; }
  [[nodiscard]] int device() const override { return device_; }
  std::vector<uint8_t> read(uint64_t offset, uint64_t length) const override {
    std::vector<uint8_t> out(length);
    cudaSetDevice(device_);
    if (cudaMemcpy(out.data(), data() + offset, length, cudaMemcpyDeviceToHost) != cudaSuccess) {
      std::abort();
    }
    return out;
  }
  void write(uint64_t offset, const void* src, uint64_t length) override {
    cudaSetDevice(device_);
    if (cudaMemcpy(data() + offset, src, length, cudaMemcpyHostToDevice) != cudaSuccess) {
      std::abort();
    }
  }
  void queueFill(uint64_t offset, uint64_t length, uint8_t value) override {
    cudaSetDevice(device_);
    if (cudaMemsetAsync(data() + offset, value, length, cudaStreamLegacy) != cudaSuccess) {
      std::abort();
    }
  }
  void releaseEarly() override {
    free();
    released_ = true;
  }

 private:
  template <typename Fn>
  static Fn entry(const char* name) {
    return reinterpret_cast<Fn>(gpu::driverFunction(name));
  }

  // Allocations of the VMM API (whole numbers of its granules; two for kVmmSplit, one after the
  // other in one reserved range) mapped for this GPU.
  bool vmmAllocate() {
    auto granularity =
        entry<decltype(&cuMemGetAllocationGranularity)>("cuMemGetAllocationGranularity");
    auto create = entry<decltype(&cuMemCreate)>("cuMemCreate");
    auto reserve = entry<decltype(&cuMemAddressReserve)>("cuMemAddressReserve");
    auto map = entry<decltype(&cuMemMap)>("cuMemMap");
    auto access = entry<decltype(&cuMemSetAccess)>("cuMemSetAccess");
    if (granularity == nullptr || create == nullptr || reserve == nullptr || map == nullptr ||
        access == nullptr) {
      return false;
    }
    CUmemAllocationProp prop{};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = device_;
    prop.requestedHandleTypes = how_ == GpuAllocation::kVmmPrivate
                                    ? CU_MEM_HANDLE_TYPE_NONE
                                    : CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
    size_t granule = 0;
    if (granularity(&granule, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM) != CUDA_SUCCESS)
      std::abort();
    const size_t parts = how_ == GpuAllocation::kVmmSplit ? 2 : 1;
    const size_t part =
        (std::max<size_t>(size_, 1) + parts * granule - 1) / (parts * granule) * granule;
    mapped_ = part * parts;
    CUdeviceptr va = 0;
    if (reserve(&va, mapped_, 0, 0, 0) != CUDA_SUCCESS) std::abort();
    allocations_.resize(parts);
    for (size_t i = 0; i < parts; ++i) {
      if (create(&allocations_[i], part, &prop, 0) != CUDA_SUCCESS ||
          map(va + i * part, part, 0, allocations_[i], 0) != CUDA_SUCCESS) {
        std::abort();
      }
    }
    CUmemAccessDesc desc{};
    desc.location = prop.location;
    desc.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    if (access(va, mapped_, &desc, 1) != CUDA_SUCCESS) std::abort();
    data_ = reinterpret_cast<void*>(va);
    return true;
  }

  void free() {
    if (how_ == GpuAllocation::kRuntime) {
      cudaFree(data_);
      return;
    }
    cudaDeviceSynchronize();  // nothing may still use the mapping
    const auto va = reinterpret_cast<CUdeviceptr>(data_);
    auto unmap = entry<decltype(&cuMemUnmap)>("cuMemUnmap");
    auto release = entry<decltype(&cuMemRelease)>("cuMemRelease");
    auto address_free = entry<decltype(&cuMemAddressFree)>("cuMemAddressFree");
    if (unmap(va, mapped_) != CUDA_SUCCESS) std::abort();
    for (CUmemGenericAllocationHandle allocation : allocations_) {
      if (release(allocation) != CUDA_SUCCESS) std::abort();
    }
    if (address_free(va, mapped_) != CUDA_SUCCESS) std::abort();
  }

  void* data_ = nullptr;
  size_t size_;
  int device_;
  GpuAllocation how_;
  std::vector<CUmemGenericAllocationHandle> allocations_;  // the VMM API's
  size_t mapped_ = 0;  // the VMM API's: size_ rounded up to granules (per allocation)
  bool released_ = false;
};
#endif

}  // namespace

std::unique_ptr<PatternMemory> makeHostMemory(size_t size, uint8_t fill) {
  return std::make_unique<HostMemory>(size, fill);
}

std::unique_ptr<PatternMemory> makeGpuMemory(size_t size, int device, uint8_t fill,
                                             GpuAllocation how) {
#if TCPX_P2P_HAVE_CUDA
  if (device < 0 || device >= gpu::deviceCount()) return nullptr;
  auto memory = std::make_unique<GpuMemory>(size, device, fill, how);
  if (memory->data() == nullptr) return nullptr;
  return memory;
#else
  (void)size;
  (void)device;
  (void)fill;
  (void)how;
  return nullptr;
#endif
}

bool copyBytes(void* dst, const void* src, size_t length) {
#if TCPX_P2P_HAVE_CUDA
  if (gpu::deviceCount() > 0) {
    // cudaMemcpy returns before a copy between two GPU buffers has landed: wait for it.
    return cudaMemcpy(dst, src, length, cudaMemcpyDefault) == cudaSuccess &&
           cudaStreamSynchronize(cudaStreamLegacy) == cudaSuccess;
  }
#endif
  std::memcpy(dst, src, length);
  return true;
}

int gpuCount() {
  return gpu::deviceCount();
}

std::string gpuUnavailableReason() {
  return gpu::unavailableReason();
}

}  // namespace tcpx::tools
