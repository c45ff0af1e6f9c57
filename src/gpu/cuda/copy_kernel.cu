#include "gpu/cuda/copy_kernel.h"

namespace tcpx::gpu {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 4096;

// Copies `len` bytes with words of type W once source and destination share W's alignment:
// a byte head up to the alignment, W-wide words, then a byte tail. All threads of the block
// take part.
template <typename W>
__device__ void copyAligned(const char* src, char* dst, uint64_t len) {
  constexpr uint64_t kWidth = sizeof(W);
  const uint64_t misalign = reinterpret_cast<uintptr_t>(src) & (kWidth - 1);
  uint64_t head = misalign == 0 ? 0 : kWidth - misalign;
  if (head > len) head = len;
  for (uint64_t i = threadIdx.x; i < head; i += blockDim.x) dst[i] = src[i];
  const uint64_t words = (len - head) / kWidth;
  const W* ws = reinterpret_cast<const W*>(src + head);
  W* wd = reinterpret_cast<W*>(dst + head);
  for (uint64_t i = threadIdx.x; i < words; i += blockDim.x) wd[i] = ws[i];
  for (uint64_t i = head + words * kWidth + threadIdx.x; i < len; i += blockDim.x) dst[i] = src[i];
}

__device__ void copyTile(const CopyTile& t) {
  const char* src = reinterpret_cast<const char*>(t.src);
  char* dst = reinterpret_cast<char*>(t.dst);
  // The widest word whose alignment source and destination share.
  const uintptr_t diff = reinterpret_cast<uintptr_t>(src) ^ reinterpret_cast<uintptr_t>(dst);
  if ((diff & 15) == 0) {
    copyAligned<uint4>(src, dst, t.len);
  } else if ((diff & 7) == 0) {
    copyAligned<uint2>(src, dst, t.len);
  } else if ((diff & 3) == 0) {
    copyAligned<uint32_t>(src, dst, t.len);
  } else if ((diff & 1) == 0) {
    copyAligned<uint16_t>(src, dst, t.len);
  } else {
    copyAligned<uint8_t>(src, dst, t.len);
  }
}

__global__ void batchedCopyKernel(const CopyTile* tiles, int count) {
  for (int i = blockIdx.x; i < count; i += gridDim.x) {
    const CopyTile t = tiles[i];
    copyTile(t);
  }
}

}  // namespace

cudaError_t launchBatchedCopy(const CopyTile* tiles, int count, cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  const int blocks = count < kMaxBlocks ? count : kMaxBlocks;
  batchedCopyKernel<<<blocks, kThreads, 0, stream>>>(tiles, count);
  return cudaGetLastError();
}

}  // namespace tcpx::gpu
