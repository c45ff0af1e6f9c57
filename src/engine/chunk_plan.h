// How a stream of bytes is cut into chunks and spread over channels, identically on both sides.
//
// Each direction between two engines carries a sequence of streams (one per announced data
// transfer). Chunks are numbered globally per direction: a stream announced with first_chunk g
// and n chunks owns chunks g .. g+n-1, and chunk g+k travels on channel (g+k) mod C. Both sides
// learn g, n and the chunk size from the announcement, so they post the same requests in the same
// order on every channel without further coordination.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "transport/transport.h"

namespace tcpx::engine {

struct ChunkPlan {
  static constexpr uint64_t kMinChunk = 64ULL * 1024;

  // Chunk size of a stream of `total` bytes: at least `spread` chunks when the stream is small
  // enough (a 1 MiB transfer over 4 channels of 2 sockets becomes 8 chunks that run on every
  // socket at once, not 2 chunks on 2 sockets), in multiples of 4 KiB, at least kMinChunk and at
  // most `max_chunk`. Both sides derive it from the announced total and the negotiated channel
  // count, so they agree without sending it.
  static uint64_t chunkSizeFor(uint64_t total, uint64_t max_chunk, uint32_t spread) {
    uint64_t per_channel = (total + spread - 1) / spread;
    per_channel = (per_channel + 4095) / 4096 * 4096;
    const uint64_t floor = kMinChunk < max_chunk ? kMinChunk : max_chunk;
    if (per_channel < floor) return floor;
    return per_channel < max_chunk ? per_channel : max_chunk;
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

// The memory of one side of a transfer as an ordered list of pieces, with their start offsets so
// that a chunk's first byte is found by binary search, and the device of each piece (-1 = host)
// so that a chunk touching GPU memory is recognised in constant time.
class SegmentList {
 public:
  static constexpr int kHost = -1;

  void reserve(size_t n) {
    slices_.reserve(n);
    starts_.reserve(n);
    devices_.reserve(n);
    device_before_.reserve(n + 1);
  }
  void add(void* data, uint64_t size, int device = kHost) {
    if (device_before_.empty()) device_before_.push_back(0);
    slices_.push_back({data, size});
    starts_.push_back(total_);
    devices_.push_back(device);
    device_before_.push_back(device_before_.back() + (device == kHost ? 0 : 1));
    total_ += size;
  }
  void clear() {
    slices_.clear();
    starts_.clear();
    devices_.clear();
    device_before_.clear();
    total_ = 0;
  }
  [[nodiscard]] uint64_t total() const { return total_; }
  [[nodiscard]] size_t count() const { return slices_.size(); }
  [[nodiscard]] const transport::IoSlice* slices() const { return slices_.data(); }
  [[nodiscard]] const std::vector<transport::IoSlice>& vector() const { return slices_; }
  [[nodiscard]] int device(size_t index) const { return devices_[index]; }
  [[nodiscard]] uint64_t start(size_t index) const { return starts_[index]; }
  // Whether any piece lives in GPU memory, overall or within bytes [begin, end).
  [[nodiscard]] bool anyDevice() const {
    return !device_before_.empty() && device_before_.back() > 0;
  }
  [[nodiscard]] bool anyDevice(uint64_t begin, uint64_t end) const;
  // Whether every piece of bytes [begin, end) lives on `device`.
  [[nodiscard]] bool allOnDevice(uint64_t begin, uint64_t end, int device) const;

  // (index of the slice holding byte `offset`, offset of that slice's first byte).
  [[nodiscard]] std::pair<size_t, uint64_t> locate(uint64_t offset) const;

  // Calls fn(ptr, length, offset_in_range, device) for each piece of bytes [begin, end), in order.
  template <typename Fn>
  void forEachPiece(uint64_t begin, uint64_t end, Fn&& fn) const {
    if (begin >= end) return;
    for (size_t index = locate(begin).first; index < slices_.size() && starts_[index] < end;
         ++index) {
      const uint64_t lo = begin > starts_[index] ? begin : starts_[index];
      const uint64_t piece_end = starts_[index] + slices_[index].size;
      const uint64_t hi = end < piece_end ? end : piece_end;
      fn(static_cast<char*>(slices_[index].data) + (lo - starts_[index]), hi - lo, lo - begin,
         devices_[index]);
    }
  }

  // Copies `len` bytes starting at stream offset `offset` out of / into the pieces. Host pieces
  // only: callers route anything touching device memory through staging.
  void gather(uint64_t offset, void* dst, uint64_t len) const;
  void scatter(uint64_t offset, const void* src, uint64_t len) const;

 private:
  std::vector<transport::IoSlice> slices_;
  std::vector<uint64_t> starts_;
  std::vector<int> devices_;
  std::vector<uint32_t> device_before_;  // device pieces among the first i
  uint64_t total_ = 0;
};

}  // namespace tcpx::engine
