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

TEST(RateLimitPerSite, ANoisyLineDoesNotTakeTheBudgetOfTheOthers) {
  RateLimitPerSite limit(2, /*max_sites=*/2);
  const RateLimit::Clock::time_point t0 = RateLimit::Clock::now();
  const char* noisy = "taskProgress";
  const char* rare = "GpumemImport";
  uint64_t suppressed = 0;
  EXPECT_TRUE(limit.allow(noisy, 161, t0, &suppressed));
  EXPECT_TRUE(limit.allow(noisy, 161, t0, &suppressed));
  for (int i = 0; i < 100000; ++i) EXPECT_FALSE(limit.allow(noisy, 161, t0, &suppressed));
  // Another line (another function, or the same one at another line) still gets through.
  EXPECT_TRUE(limit.allow(rare, 70, t0, &suppressed));
  EXPECT_EQ(suppressed, 0u);
  // Sites past the tracked ones share one budget.
  EXPECT_TRUE(limit.allow(noisy, 162, t0, &suppressed));
  EXPECT_TRUE(limit.allow(rare, 71, t0, &suppressed));
  EXPECT_FALSE(limit.allow(rare, 72, t0, &suppressed));
  // The noisy line's next window says how many it held back.
  EXPECT_TRUE(limit.allow(noisy, 161, t0 + std::chrono::seconds(1), &suppressed));
  EXPECT_EQ(suppressed, 100000u);
}

}  // namespace
}  // namespace tcpx
