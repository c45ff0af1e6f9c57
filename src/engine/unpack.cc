#include "engine/unpack.h"

#include <algorithm>
#include <cstring>

#include "common/strings.h"

namespace tcpx::engine {

using transport::abi::kMaxFragments;
using transport::abi::kUnpackPage;

Status checkFragments(const LoadMeta* frags, uint64_t count, uint64_t size, uint64_t pool_size,
                      std::vector<LoadMeta>* scratch) {
  auto bad = [](const std::string& why) {
    return Status(StatusCode::kProtocolError, "unpack metadata rejected: " + why);
  };
  if (count > static_cast<uint64_t>(kMaxFragments)) {
    return bad(strfmt("%llu fragments, at most %d", static_cast<unsigned long long>(count),
                      kMaxFragments));
  }
  const uint64_t pool_end = pool_size != 0 ? pool_size : (1ULL << 32);
  scratch->assign(frags, frags + count);
  for (const LoadMeta& f : *scratch) {
    if (f.len == 0 || f.len > kUnpackPage) return bad(strfmt("fragment of %u bytes", f.len));
    if (static_cast<uint64_t>(f.src_off) + f.len > pool_end) {
      return bad(strfmt("fragment at pool offset %u (+%u) outside the %llu-byte pool", f.src_off,
                        f.len, static_cast<unsigned long long>(pool_end)));
    }
    if (f.dst_off > size || f.len > size - f.dst_off) {
      return bad(strfmt("fragment for bytes %llu..%llu of a %llu-byte receive",
                        static_cast<unsigned long long>(f.dst_off),
                        static_cast<unsigned long long>(f.dst_off + f.len),
                        static_cast<unsigned long long>(size)));
    }
  }
  // Exactly once: sorted by destination, each fragment starts where the previous one ended.
  std::sort(scratch->begin(), scratch->end(),
            [](const LoadMeta& a, const LoadMeta& b) { return a.dst_off < b.dst_off; });
  uint64_t covered = 0;
  for (const LoadMeta& f : *scratch) {
    if (f.dst_off != covered) {
      return bad(strfmt("bytes %llu..%llu %s",
                        static_cast<unsigned long long>(std::min(covered, f.dst_off)),
                        static_cast<unsigned long long>(std::max(covered, f.dst_off)),
                        f.dst_off > covered ? "are missing" : "arrive twice"));
    }
    covered += f.len;
  }
  if (covered != size) {
    return bad(strfmt("fragments cover %llu of %llu bytes",
                      static_cast<unsigned long long>(covered),
                      static_cast<unsigned long long>(size)));
  }
  return {};
}

void unpackOnHost(const LoadMeta* frags, uint64_t count, const char* pool,
                  const SegmentList& segments, uint64_t begin) {
  for (uint64_t i = 0; i < count; ++i) {
    const LoadMeta& f = frags[i];
    const char* src = pool + f.src_off;
    segments.forEachPiece(begin + f.dst_off, begin + f.dst_off + f.len,
                          [src](char* dst, uint64_t n, uint64_t at, int /*device*/) {
                            std::memcpy(dst, src + at, n);
                          });
  }
}

void unpackOnHost(const LoadMeta* frags, uint64_t count, const char* pool, char* dst) {
  for (uint64_t i = 0; i < count; ++i) {
    std::memcpy(dst + frags[i].dst_off, pool + frags[i].src_off, frags[i].len);
  }
}

Status unpackOnDevice(const LoadMeta* frags, uint64_t count, const char* pool,
                      const SegmentList* segments, uint64_t begin, char* linear,
                      gpu::CopyQueue* queue) {
  Status st;
  for (uint64_t i = 0; i < count && st.isOk(); ++i) {
    const LoadMeta& f = frags[i];
    const char* src = pool + f.src_off;
    if (linear != nullptr) {
      st = queue->add(src, linear + f.dst_off, f.len);
      continue;
    }
    segments->forEachPiece(begin + f.dst_off, begin + f.dst_off + f.len,
                           [&](char* dst, uint64_t n, uint64_t at, int /*device*/) {
                             if (st.isOk()) st = queue->add(src + at, dst, n);
                           });
  }
  return st;
}

}  // namespace tcpx::engine
