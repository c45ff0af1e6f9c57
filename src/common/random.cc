#include "common/random.h"

#include <cerrno>
#include <cstring>
#include <sys/random.h>

#include "common/strings.h"

namespace tcpx {

Status secureRandom(void* buf, size_t len) {
  auto* p = static_cast<uint8_t*>(buf);
  while (len > 0) {
    const ssize_t n = getrandom(p, len, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status(StatusCode::kNotSupported,
                    "the kernel's random generator failed (getrandom: " + errnoString(errno) +
                        "): refusing to use predictable ids");
    }
    p += n;
    len -= static_cast<size_t>(n);
  }
  return {};
}

namespace {

// Pattern word for the 8-byte-aligned position `word_index`: a hash of (seed, index) so that
// any offset can be regenerated independently.
inline uint64_t patternWord(uint64_t seed, uint64_t word_index) {
  uint64_t z = seed + (word_index + 1) * 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

inline uint8_t patternByte(uint64_t seed, uint64_t pos) {
  return static_cast<uint8_t>(patternWord(seed, pos >> 3) >> ((pos & 7) * 8));
}
}  // namespace

Result<uint64_t> randomId() {
  uint64_t v = 0;
  while (v == 0) {
    Status st = secureRandom(&v, sizeof(v));
    if (!st.isOk()) return st;
  }
  return v;
}

Result<std::string> randomUuidHex() {
  char bytes[16];
  Status st = secureRandom(bytes, sizeof(bytes));
  if (!st.isOk()) return st;
  return toHex(std::string_view(bytes, sizeof(bytes)));
}

void fillPattern(void* dst, size_t len, uint64_t seed, uint64_t start_offset) {
  auto* p = static_cast<uint8_t*>(dst);
  uint64_t pos = start_offset;
  size_t i = 0;
  for (; i < len && (pos & 7) != 0; ++i, ++pos) p[i] = patternByte(seed, pos);
  for (; i + 8 <= len; i += 8, pos += 8) {
    const uint64_t w = patternWord(seed, pos >> 3);
    std::memcpy(p + i, &w, 8);
  }
  for (; i < len; ++i, ++pos) p[i] = patternByte(seed, pos);
}

int64_t checkPattern(const void* src, size_t len, uint64_t seed, uint64_t start_offset) {
  const auto* p = static_cast<const uint8_t*>(src);
  uint64_t pos = start_offset;
  size_t i = 0;
  for (; i < len && (pos & 7) != 0; ++i, ++pos) {
    if (p[i] != patternByte(seed, pos)) return static_cast<int64_t>(i);
  }
  for (; i + 8 <= len; i += 8, pos += 8) {
    const uint64_t w = patternWord(seed, pos >> 3);
    if (std::memcmp(p + i, &w, 8) != 0) {
      for (size_t j = 0; j < 8; ++j) {
        if (p[i + j] != patternByte(seed, pos + j)) return static_cast<int64_t>(i + j);
      }
    }
  }
  for (; i < len; ++i, ++pos) {
    if (p[i] != patternByte(seed, pos)) return static_cast<int64_t>(i);
  }
  return -1;
}

}  // namespace tcpx
