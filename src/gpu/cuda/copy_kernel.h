// A batched copy kernel: many (source, destination, length) tiles in one launch, any alignment.
//
// Used to gather many small device pieces into a contiguous staging area (and to scatter them
// back) so that a chunk of a thousand KV blocks costs one launch and one DMA, not a thousand.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace tcpx::gpu {

// One copy; tiles of one launch may point anywhere in device or mapped host memory.
struct CopyTile {
  uint64_t src;
  uint64_t dst;
  uint64_t len;
};
static_assert(sizeof(CopyTile) == 24);

// Largest tile the launcher expects; longer pieces are cut by the caller so that blocks share
// the work of a large piece.
constexpr uint64_t kMaxTileBytes = 64ULL * 1024;

// Copies every tile of `tiles[0..count)` (a device-accessible array) on `stream`.
cudaError_t launchBatchedCopy(const CopyTile* tiles, int count, cudaStream_t stream);

}  // namespace tcpx::gpu
