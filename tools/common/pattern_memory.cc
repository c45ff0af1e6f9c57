#include "common/pattern_memory.h"

#include <cstdlib>
#include <cstring>
#include <random>

#include "common/random.h"
#include "gpu/gpu.h"

#if TCPX_P2P_HAVE_CUDA
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
  GpuMemory(size_t size, int device, uint8_t fill) : size_(size), device_(device) {
    cudaSetDevice(device);
    if (cudaMalloc(&data_, size == 0 ? 1 : size) != cudaSuccess) std::abort();
    cudaMemset(data_, fill, size);
    cudaDeviceSynchronize();
  }
  ~GpuMemory() override {
    if (data_ != nullptr && !released_) cudaFree(data_);
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
    cudaFree(data_);
    released_ = true;
  }

 private:
  void* data_ = nullptr;
  size_t size_;
  int device_;
  bool released_ = false;
};
#endif

}  // namespace

std::unique_ptr<PatternMemory> makeHostMemory(size_t size, uint8_t fill) {
  return std::make_unique<HostMemory>(size, fill);
}

std::unique_ptr<PatternMemory> makeGpuMemory(size_t size, int device, uint8_t fill) {
#if TCPX_P2P_HAVE_CUDA
  if (device < 0 || device >= gpu::deviceCount()) return nullptr;
  return std::make_unique<GpuMemory>(size, device, fill);
#else
  (void)size;
  (void)device;
  (void)fill;
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
