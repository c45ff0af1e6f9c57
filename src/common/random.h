// Random identifiers from the kernel's CSPRNG (getrandom), used for engine instance ids, memory
// ids and connection nonces: unpredictable, so a peer cannot guess another registration's id.
// Without a secret these ids are what keeps a stranger out of registered memory, so there is no
// fallback: when the kernel cannot give random bytes the caller gets an error and fails.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include <tcpx_p2p/status.h>

namespace tcpx {

// Fills `len` bytes from the kernel's CSPRNG; NOT_SUPPORTED (naming errno) if it cannot.
Status secureRandom(void* buf, size_t len);
// A non-zero 64-bit id from the kernel's CSPRNG.
Result<uint64_t> randomId();
// 16 random bytes as 32 hex digits.
Result<std::string> randomUuidHex();

// Fast deterministic generator for test patterns and benchmarks (splitmix64).
class PatternGenerator {
 public:
  explicit PatternGenerator(uint64_t seed) : state_(seed) {}
  uint64_t next() {
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }

 private:
  uint64_t state_;
};

// Fills `len` bytes with the pattern of `seed`; the byte at position p depends only on (seed, p),
// so any sub-range can be regenerated and checked on its own.
void fillPattern(void* dst, size_t len, uint64_t seed, uint64_t start_offset = 0);
// Index of the first byte that differs from the pattern, or -1 when all match.
int64_t checkPattern(const void* src, size_t len, uint64_t seed, uint64_t start_offset = 0);

}  // namespace tcpx
