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

// Copies words first, first + step, ... below `words`, with four independent loads in flight per
// thread.
template <typename W>
__device__ void copyStrided(const W* __restrict__ ws, W* __restrict__ wd, uint64_t words,
                            uint64_t first, uint64_t step) {
  uint64_t i = first;
  for (; i + 3 * step < words; i += 4 * step) {
    const W a = ws[i];
    const W b = ws[i + step];
    const W c = ws[i + 2 * step];
    const W d = ws[i + 3 * step];
    wd[i] = a;
    wd[i + step] = b;
    wd[i + 2 * step] = c;
    wd[i + 3 * step] = d;
  }
  for (; i < words; i += step) wd[i] = ws[i];
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
  copyStrided(reinterpret_cast<const W*>(src + head), reinterpret_cast<W*>(dst + head), words,
              static_cast<uint64_t>(lane), kWarp);
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

// ---- Copies following a receive (launchLandedCopy) ----

constexpr int kLandedThreads = 512;

// Copies `len` bytes with the whole block, 16-byte words four at a time when source and
// destination share that alignment (the source is host memory read over PCIe: loads in flight
// make the bandwidth), the generic per-tile copy otherwise.
__device__ void copyRange(const char* src, char* dst, uint64_t len) {
  const uintptr_t diff = reinterpret_cast<uintptr_t>(src) ^ reinterpret_cast<uintptr_t>(dst);
  if ((diff & 15) != 0) {
    copyTile(CopyTile{reinterpret_cast<uint64_t>(src), reinterpret_cast<uint64_t>(dst), len});
    return;
  }
  uint64_t head = (16 - (reinterpret_cast<uintptr_t>(src) & 15)) & 15;
  if (head > len) head = len;
  for (uint64_t i = threadIdx.x; i < head; i += blockDim.x) dst[i] = src[i];
  const uint64_t words = (len - head) / 16;
  copyStrided(reinterpret_cast<const uint4*>(src + head), reinterpret_cast<uint4*>(dst + head),
              words, threadIdx.x, blockDim.x);
  for (uint64_t t = head + words * 16 + threadIdx.x; t < len; t += blockDim.x) dst[t] = src[t];
}

__device__ uint32_t loadAcquireSystem(const uint32_t* word) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(word) : "memory");
  return v;
}

__device__ void storeReleaseSystem(uint32_t* word, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(word), "r"(v) : "memory");
}

__device__ uint64_t globalTimerNs() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Copies, with the whole block, the bytes of `pieces` that lie in [lo, hi) of a pinned slot:
// each piece's slot side is its source when `kSlotIsSource` (a copy out of the slot), else its
// destination. Pieces are in slot order; *cursor is the first that may hold bytes at or after
// `lo`, and is moved past those that end by `hi`.
template <bool kSlotIsSource>
__device__ void copySlotRange(const CopyTile* pieces, int count, const char* slot, uint64_t lo,
                              uint64_t hi, int* cursor) {
  while (*cursor < count) {
    const CopyTile t = pieces[*cursor];
    const uint64_t ts = (kSlotIsSource ? t.src : t.dst) - reinterpret_cast<uint64_t>(slot);
    const uint64_t te = ts + t.len;
    if (te <= lo) {
      ++*cursor;
      continue;
    }
    if (ts >= hi) break;
    const uint64_t a = ts > lo ? ts : lo;
    const uint64_t b = te < hi ? te : hi;
    copyRange(reinterpret_cast<const char*>(t.src) + (a - ts),
              reinterpret_cast<char*>(t.dst) + (a - ts), b - a);
    if (te > hi) break;
    ++*cursor;
  }
}

// What a block's wait ended on, besides a count (counts stay below kLandedAll - 1).
constexpr uint32_t kLandedGaveUp = kLandedAll - 1;

// Block k follows part k. Thread 0 waits for the part's word to move past what was copied;
// its acquire load, then the barrier, order every thread's loads of the landed bytes after the
// transport's stores of them (nothing past the count is read). Copies stop at a 16-byte boundary
// until the part is complete, so that each round after the first moves whole 16-byte words.
__global__ void landedCopyKernel(const CopyTile* pieces, int count, const char* slot, uint64_t size,
                                 int parts, uint32_t* words) {
  const int part = static_cast<int>(blockIdx.x);
  const uint64_t part_begin = size * part / parts;
  const uint64_t part_len = size * (part + 1) / parts - part_begin;
  __shared__ uint32_t seen;
  uint64_t done = 0;
  int cursor = 0;  // the first piece that may hold bytes at or after part_begin + done
  uint64_t since = globalTimerNs();  // thread 0: when the part last made progress
  while (done < part_len) {
    if (threadIdx.x == 0) {
      uint32_t v = 0;
      for (;;) {
        if (loadAcquireSystem(words + kLandedStopWord) != 0) {
          v = kLandedAbort;
          break;
        }
        v = loadAcquireSystem(words + part);
        if (v >= part_len) break;
        if ((static_cast<uint64_t>(v) & ~15ULL) > done) break;
        if (globalTimerNs() - since > kLandedPatienceNs) {
          storeReleaseSystem(words + kLandedGaveUpWord, 1);
          v = kLandedGaveUp;
          break;
        }
        __nanosleep(128);
      }
      seen = v;
      since = globalTimerNs();
    }
    __syncthreads();
    const uint32_t v = seen;
    __syncthreads();  // `seen` is written again next round
    if (v == kLandedAbort || v == kLandedGaveUp) return;
    const uint64_t upto = v >= part_len ? part_len : (static_cast<uint64_t>(v) & ~15ULL);
    copySlotRange<true>(pieces, count, slot, part_begin + done, part_begin + upto, &cursor);
    done = upto;
  }
}

// ---- Gathers a send follows (launchFollowedGather) ----

// Block k copies part k unit by unit. Each thread fences its own writes to the slot at system
// scope before the barrier, so that once thread 0's release store of the count is seen, every
// byte below it is in host memory.
__global__ void followedGatherKernel(const CopyTile* pieces, int count, const char* slot,
                                     uint64_t size, int parts, uint32_t* words) {
  const int part = static_cast<int>(blockIdx.x);
  const uint64_t part_begin = size * part / parts;
  const uint64_t part_len = size * (part + 1) / parts - part_begin;
  int cursor = 0;  // the first piece that may hold bytes at or after part_begin + done
  for (uint64_t done = 0; done < part_len;) {
    const uint64_t upto = done + kFollowUnit < part_len ? done + kFollowUnit : part_len;
    copySlotRange<false>(pieces, count, slot, part_begin + done, part_begin + upto, &cursor);
    __threadfence_system();
    __syncthreads();
    if (threadIdx.x == 0) storeReleaseSystem(words + part, static_cast<uint32_t>(upto));
    done = upto;
  }
}

}  // namespace

cudaError_t launchFollowedGather(const CopyTile* pieces, int count, const char* slot, uint64_t size,
                                 int parts, uint32_t* words, cudaStream_t stream) {
  if (parts <= 0 || parts > kMaxLandedParts || count <= 0) return cudaErrorInvalidValue;
  followedGatherKernel<<<parts, kLandedThreads, 0, stream>>>(pieces, count, slot, size, parts,
                                                             words);
  return cudaGetLastError();
}

cudaError_t launchLandedCopy(const CopyTile* pieces, int count, const char* slot, uint64_t size,
                             int parts, uint32_t* words, cudaStream_t stream) {
  if (parts <= 0 || parts > kMaxLandedParts || count <= 0) return cudaErrorInvalidValue;
  landedCopyKernel<<<parts, kLandedThreads, 0, stream>>>(pieces, count, slot, size, parts, words);
  return cudaGetLastError();
}

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
