// A budget for repeated log lines: a few per second pass, the rest are counted and reported by
// the next one that passes.
#include "common/rate_limit.h"

#include <gtest/gtest.h>

namespace tcpx {
namespace {

TEST(RateLimit, PassesABudgetPerSecondAndCountsWhatItHeldBack) {
  RateLimit limit(3);
  const RateLimit::Clock::time_point t0 = RateLimit::Clock::now();
  uint64_t suppressed = 99;
  for (int i = 0; i < 3; ++i) {
    EXPECT_TRUE(limit.allow(t0, &suppressed));
    EXPECT_EQ(suppressed, 0u);
  }
  for (int i = 0; i < 1000; ++i)
    EXPECT_FALSE(limit.allow(t0 + std::chrono::milliseconds(500), &suppressed));
  // A second later the budget is back, and the first line says how many were not logged.
  EXPECT_TRUE(limit.allow(t0 + std::chrono::milliseconds(1000), &suppressed));
  EXPECT_EQ(suppressed, 1000u);
  EXPECT_TRUE(limit.allow(t0 + std::chrono::milliseconds(1001), &suppressed));
  EXPECT_EQ(suppressed, 0u);
}

}  // namespace
}  // namespace tcpx
