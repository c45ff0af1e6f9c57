// How many cores this process may run on: its CPU affinity (taskset, cpusets), not the
// machine's count, so that a process confined to two cores of a large host sizes its threads and
// decides on polling as a two-core machine would.
#pragma once

#include <sched.h>

#include <thread>

namespace tcpx {

inline int usableCores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return CPU_COUNT(&set);
  return static_cast<int>(std::thread::hardware_concurrency());
}

}  // namespace tcpx
