// The outstanding requests of one channel (one transport comm), oldest first.
//
// A window never holds more than its size (send 12 / recv 16 by default, at most the transport's
// 16 per comm), and requests leave it strictly in post order: the engine tests only the oldest,
// as TCPX requires, and consumes receives in the same order.
#pragma once

#include <array>
#include <cstdint>

#include "transport/transport.h"

namespace tcpx::engine {

struct Stream;

struct ChannelSlot {
  Stream* stream = nullptr;
  uint32_t chunk = 0;  // index within the stream
  transport::Request* request = nullptr;
};

class ChannelWindow {
 public:
  explicit ChannelWindow(uint32_t limit = transport::kMaxRequestsPerComm)
      : limit_(limit < kCapacity ? limit : kCapacity) {}

  [[nodiscard]] bool full() const { return count_ >= limit_; }
  [[nodiscard]] bool empty() const { return count_ == 0; }
  [[nodiscard]] uint32_t size() const { return count_; }
  [[nodiscard]] uint32_t limit() const { return limit_; }

  ChannelSlot& push() {
    ChannelSlot& slot = slots_[(head_ + count_) % kCapacity];
    ++count_;
    return slot;
  }
  ChannelSlot& oldest() { return slots_[head_]; }
  void popOldest() {
    slots_[head_] = ChannelSlot{};
    head_ = (head_ + 1) % kCapacity;
    --count_;
  }

 private:
  static constexpr uint32_t kCapacity = transport::kMaxRequestsPerComm;
  std::array<ChannelSlot, kCapacity> slots_{};
  uint32_t limit_;
  uint32_t head_ = 0;
  uint32_t count_ = 0;
};

}  // namespace tcpx::engine
