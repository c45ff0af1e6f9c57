// A budget for repeated log lines: at most `per_second` pass each second; the rest are counted,
// and the next one that passes says how many were held back. A peer that sends a thousand bad
// requests a second then costs a few lines, not a thousand.
#pragma once

#include <chrono>
#include <cstdint>
#include <mutex>
#include <vector>

namespace tcpx {

class RateLimit {
 public:
  using Clock = std::chrono::steady_clock;

  explicit RateLimit(uint32_t per_second) : per_second_(per_second) {}

  // Whether this event may be logged now; if so, *suppressed is how many were held back since
  // the last one that passed.
  bool allow(Clock::time_point now, uint64_t* suppressed) {
    if (now - window_start_ >= std::chrono::seconds(1)) {
      window_start_ = now;
      passed_ = 0;
    }
    if (passed_ >= per_second_) {
      ++held_back_;
      return false;
    }
    ++passed_;
    *suppressed = held_back_;
    held_back_ = 0;
    return true;
  }

 private:
  uint32_t per_second_;
  Clock::time_point window_start_{};
  uint32_t passed_ = 0;
  uint64_t held_back_ = 0;
};

// One RateLimit per call site (a file or function name pointer and a line), so that one noisy
// line cannot take the budget of the others: TCPX logs a warning per host receive attempt, and
// the warning that explains its exit(1) must still get through. Sites past `max_sites` share one
// budget. Thread-safe.
class RateLimitPerSite {
 public:
  using Clock = RateLimit::Clock;

  RateLimitPerSite(uint32_t per_second, size_t max_sites)
      : per_second_(per_second), max_sites_(max_sites), overflow_(per_second) {}

  bool allow(const void* file, int line, Clock::time_point now, uint64_t* suppressed) {
    std::lock_guard<std::mutex> lock(mu_);
    for (Site& s : sites_) {
      if (s.file == file && s.line == line) return s.limit.allow(now, suppressed);
    }
    if (sites_.size() < max_sites_) {
      sites_.push_back({file, line, RateLimit(per_second_)});
      return sites_.back().limit.allow(now, suppressed);
    }
    return overflow_.allow(now, suppressed);
  }

 private:
  struct Site {
    const void* file;
    int line;
    RateLimit limit;
  };
  std::mutex mu_;
  uint32_t per_second_;
  size_t max_sites_;
  std::vector<Site> sites_;
  RateLimit overflow_;
};

}  // namespace tcpx
