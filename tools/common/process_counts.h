// What a process holds and uses, read from /proc and getrusage: for tests that check that
// nothing is left behind or that threads do not grow with peers, and for the benchmark's idle
// probe.
#pragma once

#include <unistd.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <sys/resource.h>
#include <system_error>
#include <thread>

namespace tcpx::tools {

// CPU time of the whole process so far (all threads, user and system), in seconds.
inline double processCpuSeconds() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) +
         static_cast<double>(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6;
}

// Sleeps for `interval` and returns the share of one core the process used meanwhile.
inline double cpuShareWhileSleeping(std::chrono::milliseconds interval) {
  const double cpu_before = processCpuSeconds();
  const auto wall_before = std::chrono::steady_clock::now();
  std::this_thread::sleep_for(interval);
  const double cpu = processCpuSeconds() - cpu_before;
  const double wall =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - wall_before).count();
  return cpu / wall;
}

// Entries of a directory (0 when it cannot be read).
inline size_t entriesIn(const std::string& dir) {
  std::error_code ec;
  size_t n = 0;
  for (auto it = std::filesystem::directory_iterator(dir, ec);
       !ec && it != std::filesystem::directory_iterator(); it.increment(ec)) {
    ++n;
  }
  return n;
}

inline size_t threadCount() {
  return entriesIn("/proc/self/task");
}

inline size_t fdCount() {
  return entriesIn("/proc/self/fd");
}

// The names of this process's threads, comma-separated (for messages about leftover threads).
inline std::string threadNames() {
  std::error_code ec;
  std::string names;
  for (auto it = std::filesystem::directory_iterator("/proc/self/task", ec);
       !ec && it != std::filesystem::directory_iterator(); it.increment(ec)) {
    std::ifstream comm(it->path() / "comm");
    std::string line;
    if (!std::getline(comm, line)) continue;
    names += names.empty() ? line : ", " + line;
  }
  return names;
}

// Calls `fn` with the /proc directory of each thread of `tasks` (a /proc/PID/task directory)
// named `name` (as prctl(PR_SET_NAME) set it).
template <typename Fn>
void forEachThreadNamed(const std::filesystem::path& tasks, const std::string& name, Fn&& fn) {
  std::error_code ec;
  for (auto it = std::filesystem::directory_iterator(tasks, ec);
       !ec && it != std::filesystem::directory_iterator(); it.increment(ec)) {
    std::ifstream comm(it->path() / "comm");
    std::string line;
    if (std::getline(comm, line) && line == name) fn(it->path());
  }
}

// CPU time so far (in seconds) of the thread whose /proc directory is `thread`: the scheduler's
// count in nanoseconds (schedstat), or user and system time at a clock tick's resolution where
// the kernel keeps no schedstat.
inline double threadCpuSeconds(const std::filesystem::path& thread) {
  std::ifstream schedstat(thread / "schedstat");
  double on_cpu_ns = 0;
  if (schedstat >> on_cpu_ns) return on_cpu_ns / 1e9;
  std::ifstream stat(thread / "stat");
  std::string all;
  if (!std::getline(stat, all)) return 0;
  // Fields after the parenthesised name: state is field 3, utime 14 and stime 15.
  std::istringstream rest(all.substr(all.rfind(')') + 2));
  std::string field;
  double ticks = 0;
  for (int i = 3; i <= 15 && rest >> field; ++i) {
    if (i == 14 || i == 15) ticks += std::stod(field);
  }
  return ticks / static_cast<double>(sysconf(_SC_CLK_TCK));
}

// CPU time so far (in seconds) of the threads of process `pid` named `name`.
inline double threadsCpuSeconds(int pid, const std::string& name) {
  double seconds = 0;
  forEachThreadNamed(
      "/proc/" + std::to_string(pid) + "/task", name,
      [&](const std::filesystem::path& thread) { seconds += threadCpuSeconds(thread); });
  return seconds;
}

// How often the threads of this process named `name` have blocked so far (their voluntary
// context switches, /proc/self/task/TID/status): a thread that sleeps until an event counts one
// per wake-up.
inline uint64_t threadsBlockedCount(const std::string& name) {
  uint64_t count = 0;
  forEachThreadNamed("/proc/self/task", name, [&](const std::filesystem::path& thread) {
    std::ifstream status(thread / "status");
    const std::string key = "voluntary_ctxt_switches:";
    std::string line;
    while (std::getline(status, line)) {
      if (line.compare(0, key.size(), key) == 0) count += std::stoull(line.substr(key.size()));
    }
  });
  return count;
}

// Threads of this process named `name` (as prctl(PR_SET_NAME) set it).
inline size_t threadsNamed(const std::string& name) {
  size_t n = 0;
  forEachThreadNamed("/proc/self/task", name, [&](const std::filesystem::path&) { ++n; });
  return n;
}

}  // namespace tcpx::tools
