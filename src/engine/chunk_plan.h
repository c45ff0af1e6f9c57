// How a stream of bytes is cut into chunks and spread over channels, identically on both sides.
//
// Each direction between two engines carries a sequence of streams (one per announced data
// transfer). Chunks are numbered globally per direction: a stream announced with first_chunk g
// and n chunks owns chunks g .. g+n-1, and chunk g+k travels on channel (g+k) mod C. Both sides
// derive n and the chunk size from what the announcement carries (g, the total and the spread the
// sender chose) and the negotiated chunk size, so they post the same requests in the same order
// on every channel without further coordination.
#pragma once

#include <cstdint>
#include <utility>

#include "common/segment_list.h"

namespace tcpx::engine {

struct ChunkPlan {
  static constexpr uint64_t kMinChunk = 64ULL * 1024;

  // Chunk size of a stream of `total` bytes: at least `spread` (>= 1) chunks when the stream is
  // small enough (a 1 MiB transfer over 4 channels of 2 sockets becomes 8 chunks that run on
  // every socket at once, not 2 chunks on 2 sockets), in multiples of 4 KiB, at least kMinChunk
  // and at most `max_chunk`.
  static uint64_t chunkSizeFor(uint64_t total, uint64_t max_chunk, uint32_t spread) {
    uint64_t per_channel = (total + spread - 1) / spread;
    per_channel = (per_channel + 4095) / 4096 * 4096;
    const uint64_t floor = kMinChunk < max_chunk ? kMinChunk : max_chunk;
    if (per_channel < floor) return floor;
    return per_channel < max_chunk ? per_channel : max_chunk;
  }
  // The spread a sender announces for a new stream when `others` streams it sends over the same
  // sockets are still moving: every socket of the peer's channels (`sockets`) for a stream
  // alone, fewer as more streams share them. Each chunk costs both sides a post, a completion and
  // hand-offs between threads; streams that already keep every socket busy together gain nothing
  // from being cut finer (measured: 1 MiB transfers with 16 in flight moved about a fifth faster
  // in 2 chunks each than in 8).
  static uint32_t spreadFor(uint32_t sockets, uint32_t others) {
    const uint32_t spread = sockets / (others + 1);
    return spread < 1 ? 1 : spread;
  }
  static uint32_t chunkCount(uint64_t total, uint64_t chunk_size) {
    return static_cast<uint32_t>((total + chunk_size - 1) / chunk_size);
  }
  static uint32_t channelOf(uint64_t global_chunk, uint32_t channels) {
    return static_cast<uint32_t>(global_chunk % channels);
  }
  // Index (within its stream) of the first chunk of a stream that lands on `channel`.
  static uint32_t firstChunkOnChannel(uint64_t first_chunk, uint32_t channel, uint32_t channels) {
    const uint32_t base = static_cast<uint32_t>(first_chunk % channels);
    return (channel + channels - base) % channels;
  }
  // Byte range [begin, end) of chunk k of a stream of `total` bytes.
  static std::pair<uint64_t, uint64_t> chunkRange(uint64_t total, uint64_t chunk_size, uint32_t k) {
    const uint64_t begin = static_cast<uint64_t>(k) * chunk_size;
    const uint64_t end = begin + chunk_size < total ? begin + chunk_size : total;
    return {begin, end};
  }
};

}  // namespace tcpx::engine
