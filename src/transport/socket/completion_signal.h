#pragma once

#include <atomic>

#include "common/net.h"

namespace tcpx::transport {

// Wakes the engine's progress thread when requests complete. A burst of completions costs one
// wake-up, not one per request: a helper writes the fd only when it is the first to claim the
// signal since the progress thread last drained it.
//
// Invariants: `claimed_` is true only if a helper has written the fd or is about to; the progress
// thread reads the fd in every round where epoll reports it readable (whatever `claimed_` says)
// and clears `claimed_` only after such a read. So a readable fd never outlives the round that
// sees it (a helper stalled between its claim and its write cannot make the loop spin on a
// readable fd it leaves alone), and a completion is never left without a wake-up: either its
// helper claimed after the clear and writes, or the clear (an acquire) already sees it.
class CompletionSignal {
 public:
  void notify() {
    if (!claimed_.exchange(true, std::memory_order_acq_rel)) fd_.signal();
  }
  // The fd was reported readable: consume it, then let the next completion signal again. The
  // caller tests requests after this. Returns whether the fd held a signal (false only if called
  // without the fd being readable).
  bool drainAndArm() {
    const bool held = fd_.drain();
    claimed_.exchange(false, std::memory_order_acq_rel);
    return held;
  }
  [[nodiscard]] int fd() const { return fd_.fd(); }
  [[nodiscard]] bool valid() const { return fd_.valid(); }

 private:
  net::EventFd fd_;
  std::atomic<bool> claimed_{false};
};

}  // namespace tcpx::transport
