// Memory on the host or on a GPU with pattern helpers that work for both (GPU memory is read and
// written through host copies). Shared by the tests and the benchmark.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <tcpx_p2p/types.h>

namespace tcpx::tools {

// Page-aligned host memory filled with `fill`, freed on destruction.
class HostBuffer {
 public:
  explicit HostBuffer(size_t size, uint8_t fill = 0xA5);
  ~HostBuffer();
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;
  [[nodiscard]] uint8_t* data() const { return data_; }
  [[nodiscard]] size_t size() const { return size_; }

 private:
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

class PatternMemory {
 public:
  virtual ~PatternMemory() = default;
  [[nodiscard]] virtual uint8_t* data() const = 0;  // the address to register
  [[nodiscard]] virtual size_t size() const = 0;
  [[nodiscard]] virtual MemoryKind kind() const = 0;
  [[nodiscard]] virtual int device() const = 0;  // -1 for host memory
  virtual std::vector<uint8_t> read(uint64_t offset, uint64_t length) const = 0;
  virtual void write(uint64_t offset, const void* src, uint64_t length) = 0;
  // Gives the memory back behind the engine's back (to provoke a CUDA error).
  virtual void releaseEarly() {}

  // Byte p of [offset, offset + length) gets pattern byte (start + p) of `seed`.
  void fill(uint64_t offset, uint64_t length, uint64_t seed, uint64_t start = 0);
  // First differing byte, or -1.
  [[nodiscard]] int64_t check(uint64_t offset, uint64_t length, uint64_t seed,
                              uint64_t start = 0) const;
  void fillByte(uint64_t offset, uint64_t length, uint8_t value);
  // Sets [offset, offset + length) to `value` as an application's asynchronous work would: GPU
  // memory by a memset queued on the legacy default stream without waiting for it (work the
  // engine must order its copies after), host memory at once.
  virtual void queueFill(uint64_t offset, uint64_t length, uint8_t value) = 0;
  [[nodiscard]] int64_t checkByte(uint64_t offset, uint64_t length, uint8_t value) const;
};

// Page-aligned host memory filled with `fill`.
std::unique_ptr<PatternMemory> makeHostMemory(size_t size, uint8_t fill = 0xA5);
// How GPU memory is allocated: cudaMalloc, or the CUDA VMM API (cuMemCreate, mapped at an
// address reserved for it, as PyTorch's expandable segments do) with or without a POSIX
// file-descriptor handle type (without one, no other process can map it); kVmmSplit: shareable,
// in two allocations mapped one after the other (expandable segments grow that way).
enum class GpuAllocation : uint8_t { kRuntime, kVmmShareable, kVmmPrivate, kVmmSplit };

// GPU memory on `device` filled with `fill`; nullptr when there is no GPU (or, for the VMM API,
// when the driver does not offer it).
std::unique_ptr<PatternMemory> makeGpuMemory(size_t size, int device, uint8_t fill = 0xA5,
                                             GpuAllocation how = GpuAllocation::kRuntime);

// Copies `length` bytes between any host or GPU memory of this process (cudaMemcpy when built
// with CUDA, else memcpy) and returns once they landed; false on a CUDA error.
bool copyBytes(void* dst, const void* src, size_t length);

int gpuCount();
std::string gpuUnavailableReason();

// A seed for test patterns, different every run.
uint64_t randomSeed();

}  // namespace tcpx::tools
