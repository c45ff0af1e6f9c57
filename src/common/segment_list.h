// The memory of one side of a transfer as an ordered list of pieces (host or GPU memory), and
// the walk over any byte range of it. Below both the engine (which cuts transfers into chunks)
// and the GPU layer (which copies pieces): it knows addresses, lengths and devices, nothing of
// peers or transports.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "common/io_slice.h"

namespace tcpx {

// An ordered list of pieces, with their start offsets so that a chunk's first byte is found by
// binary search, and the device of each piece (-1 = host) so that a chunk touching GPU memory is
// recognised in constant time.
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
  [[nodiscard]] const IoSlice* slices() const { return slices_.data(); }
  [[nodiscard]] const std::vector<IoSlice>& vector() const { return slices_; }
  [[nodiscard]] int device(size_t index) const { return devices_[index]; }
  [[nodiscard]] uint64_t start(size_t index) const { return starts_[index]; }
  // Whether any piece lives in GPU memory, overall or within bytes [begin, end).
  [[nodiscard]] bool anyDevice() const {
    return !device_before_.empty() && device_before_.back() > 0;
  }
  [[nodiscard]] bool anyDevice(uint64_t begin, uint64_t end) const;
  // The GPUs the pieces live on, each once, in order of first appearance.
  [[nodiscard]] std::vector<int> distinctDevices() const;
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
  std::vector<IoSlice> slices_;
  std::vector<uint64_t> starts_;
  std::vector<int> devices_;
  std::vector<uint32_t> device_before_;  // device pieces among the first i
  uint64_t total_ = 0;
};

}  // namespace tcpx
