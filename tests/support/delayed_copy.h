// A kernel that waits, then copies: stands for user GPU work still running when a transfer of its
// output is posted.
#pragma once

#include <cstddef>

namespace tcpx::testing {

// Launches on the legacy default stream a kernel that spins for about `delay_ms`, then copies
// `length` bytes from `src` to `dst` (both device memory of the current device). Returns false
// if the launch failed.
bool launchDelayedCopy(const void* src, void* dst, size_t length, double delay_ms);

}  // namespace tcpx::testing
