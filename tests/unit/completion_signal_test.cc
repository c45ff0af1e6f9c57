// The socket transport's completion signal: one write per burst of completions, a readable fd
// always cleared by the round that sees it, and no completion left without a wake-up.
#include "transport/socket/completion_signal.h"

#include <poll.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <gtest/gtest.h>
#include <thread>
#include <vector>

namespace tcpx::transport {
namespace {

bool readable(const CompletionSignal& signal, int timeout_ms) {
  pollfd pfd{signal.fd(), POLLIN, 0};
  return ::poll(&pfd, 1, timeout_ms) == 1 && (pfd.revents & POLLIN) != 0;
}

TEST(CompletionSignal, ABurstOfCompletionsWritesTheFdOnce) {
  CompletionSignal signal;
  ASSERT_TRUE(signal.valid());
  EXPECT_FALSE(readable(signal, 0));
  signal.notify();
  signal.notify();
  signal.notify();
  ASSERT_TRUE(readable(signal, 0));
  uint64_t count = 0;
  ASSERT_EQ(::read(signal.fd(), &count, sizeof(count)), static_cast<ssize_t>(sizeof(count)));
  EXPECT_EQ(count, 1U);  // the later two found the signal claimed
}

TEST(CompletionSignal, DrainingClearsTheFdAndTheNextCompletionSignalsAgain) {
  CompletionSignal signal;
  signal.notify();
  ASSERT_TRUE(readable(signal, 0));
  EXPECT_TRUE(signal.drainAndArm());
  EXPECT_FALSE(readable(signal, 0));
  signal.notify();
  EXPECT_TRUE(readable(signal, 0));
  EXPECT_TRUE(signal.drainAndArm());
  EXPECT_FALSE(readable(signal, 0));
}

// Helpers complete work while a loop waits on the fd and drains it, as the progress thread
// does. Every wake-up must consume a write (a readable fd left alone would make the loop spin,
// which on a busy machine starves the very helper it waits for), and once the helpers stop, the
// loop must have been woken after the last completion (none lost).
TEST(CompletionSignal, ConcurrentCompletionsNeverSpinTheLoopNorLoseAWakeUp) {
  CompletionSignal signal;
  constexpr int kHelpers = 4;
  constexpr uint64_t kPerHelper = 50000;
  std::atomic<uint64_t> completed{0};
  std::atomic<bool> helpers_done{false};
  uint64_t wakes = 0;
  uint64_t empty_drains = 0;  // wake-ups that found the fd without a signal: a spinning loop
  uint64_t seen = 0;          // completions the loop had observed after its last drain
  std::thread loop([&] {
    for (;;) {
      const bool done = helpers_done.load();
      if (readable(signal, done ? 200 : 20)) {
        ++wakes;
        if (!signal.drainAndArm()) ++empty_drains;
        seen = completed.load();  // what a round would test after draining
      } else if (done) {
        return;  // quiet for 200 ms after the helpers stopped
      }
    }
  });
  std::vector<std::thread> helpers;
  helpers.reserve(kHelpers);
  for (int h = 0; h < kHelpers; ++h) {
    helpers.emplace_back([&] {
      for (uint64_t i = 0; i < kPerHelper; ++i) {
        completed.fetch_add(1);
        signal.notify();
        if (i % 64 == 0) std::this_thread::yield();
      }
    });
  }
  for (auto& t : helpers) t.join();
  helpers_done.store(true);
  loop.join();
  EXPECT_GT(wakes, 0U);
  EXPECT_LE(wakes, kHelpers * kPerHelper);
  EXPECT_EQ(empty_drains, 0U);
  EXPECT_EQ(seen, kHelpers * kPerHelper) << "a completion after the last drain woke nobody";
  EXPECT_FALSE(readable(signal, 0));
}

}  // namespace
}  // namespace tcpx::transport
