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

// Small tiles (unpack fragments of at most a page): one warp per tile, so that a block works on
// eight fragments at once, with four independent loads in flight per lane.
constexpr int kWarp = 32;

template <typename W>
__device__ void warpCopyAligned(const char* __restrict__ src, char* __restrict__ dst, uint64_t len,
                                int lane) {
  constexpr uint64_t kWidth = sizeof(W);
  uint64_t head = (kWidth - (reinterpret_cast<uintptr_t>(src) & (kWidth - 1))) & (kWidth - 1);
  if (head > len) head = len;
  if (static_cast<uint64_t>(lane) < head) dst[lane] = src[lane];  // head < 16 <= 32 lanes
  const uint64_t words = (len - head) / kWidth;
  const W* ws = reinterpret_cast<const W*>(src + head);
  W* wd = reinterpret_cast<W*>(dst + head);
  uint64_t i = static_cast<uint64_t>(lane);
  for (; i + 3 * kWarp < words; i += 4 * kWarp) {
    const W a = ws[i];
    const W b = ws[i + kWarp];
    const W c = ws[i + 2 * kWarp];
    const W d = ws[i + 3 * kWarp];
    wd[i] = a;
    wd[i + kWarp] = b;
    wd[i + 2 * kWarp] = c;
    wd[i + 3 * kWarp] = d;
  }
  for (; i < words; i += kWarp) wd[i] = ws[i];
  for (uint64_t t = head + words * kWidth + lane; t < len; t += kWarp) dst[t] = src[t];
}

__global__ void batchedSmallCopyKernel(const CopyTile* tiles, int count) {
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int warps = static_cast<int>(gridDim.x * blockDim.x) / kWarp;
  for (int i = static_cast<int>((blockIdx.x * blockDim.x + threadIdx.x) / kWarp); i < count;
       i += warps) {
    const CopyTile t = tiles[i];
    const char* src = reinterpret_cast<const char*>(t.src);
    char* dst = reinterpret_cast<char*>(t.dst);
    const uintptr_t diff = reinterpret_cast<uintptr_t>(src) ^ reinterpret_cast<uintptr_t>(dst);
    if ((diff & 15) == 0) {
      warpCopyAligned<uint4>(src, dst, t.len, lane);
    } else if ((diff & 7) == 0) {
      warpCopyAligned<uint2>(src, dst, t.len, lane);
    } else if ((diff & 3) == 0) {
      warpCopyAligned<uint32_t>(src, dst, t.len, lane);
    } else if ((diff & 1) == 0) {
      warpCopyAligned<uint16_t>(src, dst, t.len, lane);
    } else {
      warpCopyAligned<uint8_t>(src, dst, t.len, lane);
    }
  }
}

}  // namespace

cudaError_t launchBatchedCopy(const CopyTile* tiles, int count, cudaStream_t stream,
                              uint64_t max_len) {
  if (count <= 0) return cudaSuccess;
  if (max_len <= kSmallTileBytes) {
    const int per_block = kThreads / kWarp;
    const int needed = (count + per_block - 1) / per_block;
    const int blocks = needed < kMaxBlocks ? needed : kMaxBlocks;
    batchedSmallCopyKernel<<<blocks, kThreads, 0, stream>>>(tiles, count);
  } else {
    const int blocks = count < kMaxBlocks ? count : kMaxBlocks;
    batchedCopyKernel<<<blocks, kThreads, 0, stream>>>(tiles, count);
  }
  return cudaGetLastError();
}

}  // namespace tcpx::gpu
