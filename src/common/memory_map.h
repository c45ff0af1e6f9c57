// What the process's own address space says about a pointer (from /proc/self/maps).
#pragma once

#include <cstdint>

namespace tcpx {

// Bytes from `ptr` to the end of the run of adjacent readable mappings that holds it: an upper
// bound on how far memory starting at `ptr` may be read without leaving mapped memory. 0 when
// `ptr` is in no readable mapping or the map cannot be read.
uint64_t mappedBytesAfter(const void* ptr);

}  // namespace tcpx
