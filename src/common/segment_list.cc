#include "common/segment_list.h"

#include <algorithm>
#include <cstring>

namespace tcpx {

std::pair<size_t, uint64_t> SegmentList::locate(uint64_t offset) const {
  // The last slice whose start is <= offset; zero-sized slices never occur (descriptors of
  // length 0 are rejected before a list is built).
  auto it = std::upper_bound(starts_.begin(), starts_.end(), offset);
  const size_t idx = static_cast<size_t>(it - starts_.begin()) - 1;
  return {idx, starts_[idx]};
}

bool SegmentList::anyDevice(uint64_t begin, uint64_t end) const {
  if (!anyDevice() || begin >= end) return false;
  const size_t first = locate(begin).first;
  const size_t last = locate(end - 1).first;
  return device_before_[last + 1] - device_before_[first] > 0;
}

bool SegmentList::allOnDevice(uint64_t begin, uint64_t end, int device) const {
  bool all = true;
  forEachPiece(begin, end, [&](char*, uint64_t, uint64_t, int d) { all = all && d == device; });
  return all;
}

void SegmentList::gather(uint64_t offset, void* dst, uint64_t len) const {
  auto* out = static_cast<char*>(dst);
  forEachPiece(offset, offset + len, [out](char* piece, uint64_t n, uint64_t at, int) {
    std::memcpy(out + at, piece, n);
  });
}

void SegmentList::scatter(uint64_t offset, const void* src, uint64_t len) const {
  const auto* in = static_cast<const char*>(src);
  forEachPiece(offset, offset + len,
               [in](char* piece, uint64_t n, uint64_t at, int) { std::memcpy(piece, in + at, n); });
}

std::vector<int> SegmentList::distinctDevices() const {
  std::vector<int> out;
  if (!anyDevice()) return out;
  for (int device : devices_) {
    if (device != kHost && std::find(out.begin(), out.end(), device) == out.end()) {
      out.push_back(device);
    }
  }
  return out;
}

}  // namespace tcpx
