// libFuzzer target: the unpack metadata a plugin writes for one receive (src_off, len, dst_off
// per fragment). Fragments that pass the check are copied out of a pool and into destinations
// allocated to their exact sizes, so AddressSanitizer reports any byte read outside the pool or
// written outside the destination.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "engine/unpack.h"

using tcpx::engine::LoadMeta;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 8) return 0;
  uint32_t recv_size = 0;
  uint32_t pool_size = 0;
  std::memcpy(&recv_size, data, 4);
  std::memcpy(&pool_size, data + 4, 4);
  recv_size %= (1U << 20) + 1;
  pool_size = pool_size % (1U << 20) + 1;
  const size_t count = (size - 8) / sizeof(LoadMeta);
  std::vector<LoadMeta> frags(count);
  if (count > 0) std::memcpy(frags.data(), data + 8, count * sizeof(LoadMeta));

  std::vector<LoadMeta> checked;
  if (!tcpx::engine::checkFragments(frags.data(), count, recv_size, pool_size, &checked).isOk()) {
    return 0;
  }
  auto pool = std::make_unique<char[]>(pool_size);
  std::memset(pool.get(), 0x5A, pool_size);
  // Contiguous destination, then the same bytes over three pieces.
  auto linear = std::make_unique<char[]>(recv_size + 1);
  tcpx::engine::unpackOnHost(checked.data(), checked.size(), pool.get(), linear.get());
  const uint32_t a = recv_size / 3;
  const uint32_t b = recv_size / 2 - a / 2;
  const uint32_t c = recv_size - a - b;
  auto p1 = std::make_unique<char[]>(a + 1);
  auto p2 = std::make_unique<char[]>(b + 1);
  auto p3 = std::make_unique<char[]>(c + 1);
  tcpx::SegmentList segments;
  segments.add(p1.get(), a);
  segments.add(p2.get(), b);
  segments.add(p3.get(), c);
  tcpx::engine::unpackOnHost(checked.data(), checked.size(), pool.get(), segments, 0);
  return 0;
}
