// A budget for repeated log lines: at most `per_second` pass each second; the rest are counted,
// and the next one that passes says how many were held back. A peer that sends a thousand bad
// requests a second then costs a few lines, not a thousand.
#pragma once

#include <chrono>
#include <cstdint>

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

}  // namespace tcpx
