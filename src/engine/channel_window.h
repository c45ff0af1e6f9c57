// The chunks one channel (one transport comm) has in flight, oldest first.
//
// A chunk enters the window when it is scheduled and leaves when its bytes are in their final
// place. On the way it may pass through staging (GPU memory over a host-only transport):
//   send:    [kStaging ->] kReady -> kInTransport -> leaves when the send completes
//            kStaging -> kFollowing -> kInTransport -> leaves (the send followed its gather: posted
//            at once, it takes the bytes as the copy puts them in place)
//   receive: kInTransport [-> kUnpacking -> kUnpacked] [-> kUnstaging] -> kDone -> leaves
//            kLanding -> kLanded [-> kUnstaging] -> leaves (the copy to GPU memory followed the
//            receive; kUnstaging when it gave up waiting and the chunk is copied again)
// (kUnpacking/kUnpacked: an UNPACK transport's fragments are being copied out of its bounce pool;
// the receive is consumed, in post order, when they are.)
// Invariants: entries keep chunk order; at most kCapacity entries; at most `limit` of them in the
// transport at once (send 12 / recv 16 by default, never more than the transport's 16); sends
// are posted and receives tested strictly in chunk order, as TCPX requires.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>

#include "transport/transport.h"

namespace tcpx::engine {

struct Stream;

enum class SlotPhase : uint8_t {
  kStaging,      // send: staging copy from GPU memory in flight
  kReady,        // send: bytes ready, not yet posted
  kFollowing,    // send: posted while its gather still fills the staging slot (the transport
                 // sends what the copy has put in place; follow_words says how far)
  kInTransport,  // posted to the transport
  kLanding,      // receive: posted, and a copy to GPU memory follows its bytes as they land
  kLanded,       // receive: complete, the copy that followed it finishing
  kUnpacking,    // receive: copies out of the transport's bounce pool in flight
  kUnpacked,     // receive: bytes out of the bounce pool, receive not yet consumed
  kUnstaging,    // receive: copy from staging to GPU memory in flight
  kDone,         // receive: bytes in place
};

struct ChannelSlot {
  Stream* stream = nullptr;
  uint32_t chunk = 0;  // index within the stream
  transport::Request* request = nullptr;
  int staging = -1;  // staging slot, or -1 when the chunk moves straight from/to its memory
  // The staging slot's bytes as the transport sees them; lives here because the transport keeps
  // the slice array until the request completes.
  transport::IoSlice staged_slice;
  bool filler = false;     // send filler bytes instead of data (staging failed or canceled)
  int staged_device = -1;  // send: gathered into this GPU's staging (sent from there)
  const uint32_t* follow_words = nullptr;  // send: the counts a followed gather raises, or null
  uint64_t follow_seen = 0;                // send: their sum when the progress thread last looked
  void* device_data = nullptr;             // send: where in that staging
  uint8_t meta_slot = 0;                   // receive on an UNPACK transport: its metadata slot
  uint64_t ticket = 0;                     // receive on an UNPACK transport: its unpack copy batch
  SlotPhase phase = SlotPhase::kReady;
};

class ChannelWindow {
 public:
  static constexpr uint32_t kCapacity = transport::kMaxRequestsPerComm;

  explicit ChannelWindow(uint32_t limit = kCapacity)
      : limit_(limit < kCapacity ? limit : kCapacity) {}

  [[nodiscard]] bool full() const { return count_ == kCapacity; }
  [[nodiscard]] bool empty() const { return count_ == 0; }
  [[nodiscard]] uint32_t size() const { return count_; }
  [[nodiscard]] uint32_t limit() const { return limit_; }
  [[nodiscard]] bool transportFull() const { return in_transport_ >= limit_; }
  [[nodiscard]] uint32_t inTransport() const { return in_transport_; }

  ChannelSlot& push() {
    ChannelSlot& slot = slots_[(head_ + count_) % kCapacity];
    slot = ChannelSlot{};
    ++count_;
    return slot;
  }
  // The i-th oldest entry.
  ChannelSlot& at(uint32_t i) { return slots_[(head_ + i) % kCapacity]; }
  ChannelSlot& oldest() { return slots_[head_]; }
  [[nodiscard]] const ChannelSlot& oldest() const { return slots_[head_]; }
  // Takes back the entry pushed last (its post did not happen).
  void popNewest() {
    --count_;
    slots_[(head_ + count_) % kCapacity] = ChannelSlot{};
  }
  void popOldest() {
    slots_[head_] = ChannelSlot{};
    head_ = (head_ + 1) % kCapacity;
    --count_;
  }
  // The watchdog's clock (DataPath::checkStalls) starts when the first request enters the
  // transport and restarts at every completion.
  void enteredTransport() {
    if (in_transport_++ == 0) progress_at_ = std::chrono::steady_clock::now();
  }
  void leftTransport() {
    --in_transport_;
    progress_at_ = std::chrono::steady_clock::now();
  }
  // Something other than the transport moved the channel on (a followed gather ended): the
  // watchdog's clock restarts.
  void progressed() { progress_at_ = std::chrono::steady_clock::now(); }
  // When a request last completed, or the oldest one entered an idle transport.
  [[nodiscard]] std::chrono::steady_clock::time_point progressAt() const { return progress_at_; }

 private:
  std::array<ChannelSlot, kCapacity> slots_{};
  uint32_t limit_;
  uint32_t head_ = 0;
  uint32_t count_ = 0;
  uint32_t in_transport_ = 0;
  std::chrono::steady_clock::time_point progress_at_{};
};

}  // namespace tcpx::engine
