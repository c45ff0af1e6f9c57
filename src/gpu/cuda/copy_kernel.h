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

// Copies that follow a receive as it lands. A host-only transport receives a chunk into a pinned
// slot in `parts` parts, part k covering bytes [k*size/parts, (k+1)*size/parts) of the slot,
// and stores after each read how many bytes of part k have landed into words[k] (a release
// store). One block per part polls its word and copies the landed prefix on to the pieces
// (`pieces`: src inside the slot, dst in device memory, in slot order), so the copy to the GPU
// runs while the rest still arrives. A word holding kLandedAll says the whole part is in (the
// receive completed). words[kMaxLandedParts], written by the engine alone (a transport still
// storing a count cannot overwrite it), stops every block at its next look once it is not 0:
// nothing more is copied. A block that sees no byte land for kLandedPatienceNs gives up: it sets
// words[kMaxLandedParts + 1] and ends, and the chunk is copied again once complete. So a copy
// never waits long for bytes: a stalled peer holds no SM, and a device-wide synchronisation
// (a cudaFree, on any thread) waits for at most the patience, not for the network.
constexpr uint32_t kLandedAll = 0xFFFFFFFEU;
constexpr uint32_t kLandedAbort = 0xFFFFFFFFU;
constexpr int kMaxLandedParts = 16;
constexpr int kLandedStopWord = kMaxLandedParts;
constexpr int kLandedGaveUpWord = kMaxLandedParts + 1;
constexpr int kLandedWords = kMaxLandedParts + 2;  // the parts' words, stop, gave up
constexpr uint64_t kLandedPatienceNs = 5ULL * 1000 * 1000;

// `slot` is the device address of the slot's first byte; parts of fewer than kLandedAll bytes.
cudaError_t launchLandedCopy(const CopyTile* pieces, int count, const char* slot, uint64_t size,
                             int parts, uint32_t* words, cudaStream_t stream);

// Gathers that a send follows. A host-only transport sends a chunk out of a pinned slot in
// `parts` parts, part k covering bytes [k*size/parts, (k+1)*size/parts) of the slot, each on
// its own socket, and sends of part k only as many bytes as words[k] says are in place. One block
// per part copies the part's bytes from the pieces (`pieces`: src in device memory, dst inside
// the slot, in slot order) in order, kFollowUnit bytes at a time, and after each unit raises
// words[k] to the count in place (every thread's writes fenced at system scope, then a release
// store), so the part's first bytes leave while the rest is copied. The kernel waits for nothing:
// it ends once every part is copied.
constexpr uint64_t kFollowUnit = 32ULL * 1024;

cudaError_t launchFollowedGather(const CopyTile* pieces, int count, const char* slot, uint64_t size,
                                 int parts, uint32_t* words, cudaStream_t stream);

}  // namespace tcpx::gpu
