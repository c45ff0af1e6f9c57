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

// Tiles up to this size are copied one warp per tile (unpack fragments), larger ones one block
// per tile.
constexpr uint64_t kSmallTileBytes = 8192;

// Copies every tile of `tiles[0..count)` (a device-accessible array) on `stream`. `max_len` is
// the longest tile, which picks the kernel.
cudaError_t launchBatchedCopy(const CopyTile* tiles, int count, cudaStream_t stream,
                              uint64_t max_len = kMaxTileBytes);

}  // namespace tcpx::gpu
