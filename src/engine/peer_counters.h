// What happened with one peer, for diagnosing a deployment: runs posted, runs finished by status,
// bytes moved and the latest failure. Posting threads and the progress thread count; any thread
// reads a snapshot. Every transfer prepared for the peer holds the counters (so a re-added peer
// starts again while the old instance's transfers still count against the old one).
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <mutex>

#include <tcpx_p2p/engine.h>

#include "engine/operation.h"

namespace tcpx::engine {

class PeerCounters {
 public:
  void posted() { posted_.fetch_add(1, std::memory_order_relaxed); }
  // A run that succeeded moved its bytes by a direct copy (same_host_copy).
  void directRun() { direct_.fetch_add(1, std::memory_order_relaxed); }
  // ... a direct WRITE that ended on the target's copy signal.
  void signalledWrite() { signalled_.fetch_add(1, std::memory_order_relaxed); }
  void gatedRead() { gated_.fetch_add(1, std::memory_order_relaxed); }
  // A staged receive's copy to the GPU followed it as it landed.
  void landedChunk() { landed_.fetch_add(1, std::memory_order_relaxed); }
  // A staged send followed its gather as the copy put bytes in place.
  void followedChunk() { followed_.fetch_add(1, std::memory_order_relaxed); }
  // A reply that an application thread polling its transfer handled itself (caller_posts).
  void callerReply() { caller_replies_.fetch_add(1, std::memory_order_relaxed); }

  // A run ended: `bytes` moved if it succeeded (WRITE and send: sent; READ and recv: received).
  void finished(XferKind kind, uint64_t bytes, const Status& status) {
    if (status.isOk()) {
      auto& moved = kind == XferKind::kWrite || kind == XferKind::kSend ? sent_ : received_;
      moved.fetch_add(bytes, std::memory_order_relaxed);
      succeeded_.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    const auto code = static_cast<size_t>(status.code());
    failed_[code < kCodes ? code : kCodes - 1].fetch_add(1, std::memory_order_relaxed);
    std::lock_guard<std::mutex> lock(mu_);
    last_error_ = status;
  }

  [[nodiscard]] PeerStats snapshot() const {
    PeerStats s;
    s.posted = posted_.load(std::memory_order_relaxed);
    s.succeeded = succeeded_.load(std::memory_order_relaxed);
    for (size_t code = 0; code < kCodes; ++code) {
      const uint64_t n = failed_[code].load(std::memory_order_relaxed);
      if (n == 0) continue;
      s.failed += n;
      s.failures.emplace_back(static_cast<StatusCode>(code), n);
    }
    // A run is counted as posted before it can finish: the difference never goes below zero
    // for long, but the loads are not one snapshot.
    const uint64_t ended = s.succeeded + s.failed;
    s.in_flight = s.posted > ended ? s.posted - ended : 0;
    s.bytes_sent = sent_.load(std::memory_order_relaxed);
    s.bytes_received = received_.load(std::memory_order_relaxed);
    s.direct_runs = direct_.load(std::memory_order_relaxed);
    s.signalled_writes = signalled_.load(std::memory_order_relaxed);
    s.gated_reads = gated_.load(std::memory_order_relaxed);
    s.landed_chunks = landed_.load(std::memory_order_relaxed);
    s.followed_chunks = followed_.load(std::memory_order_relaxed);
    s.caller_replies = caller_replies_.load(std::memory_order_relaxed);
    std::lock_guard<std::mutex> lock(mu_);
    s.last_error = last_error_;
    return s;
  }

 private:
  static constexpr size_t kCodes = static_cast<size_t>(StatusCode::kDeviceError) + 1;
  std::atomic<uint64_t> posted_{0};
  std::atomic<uint64_t> succeeded_{0};
  std::atomic<uint64_t> sent_{0};
  std::atomic<uint64_t> received_{0};
  std::atomic<uint64_t> direct_{0};
  std::atomic<uint64_t> signalled_{0};
  std::atomic<uint64_t> gated_{0};
  std::atomic<uint64_t> landed_{0};
  std::atomic<uint64_t> followed_{0};
  std::atomic<uint64_t> caller_replies_{0};
  std::array<std::atomic<uint64_t>, kCodes> failed_{};
  mutable std::mutex mu_;
  Status last_error_;  // guarded by mu_
};

}  // namespace tcpx::engine
