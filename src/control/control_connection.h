// Framed, non-blocking I/O on one control-plane TCP connection.
//
// Driven by one thread at a time: the one holding the engine's round (its progress thread, or
// an application thread on the engine's short paths). Incoming bytes accumulate until whole
// frames are available; outgoing frames are appended to a buffer and flushed as the socket
// accepts them, so no caller ever blocks on a slow peer.
#pragma once

#include <chrono>
#include <cstdint>
#include <string_view>
#include <vector>

#include <tcpx_p2p/status.h>

#include "common/net.h"
#include "control/frames.h"

namespace tcpx::control {

using Clock = std::chrono::steady_clock;

class ControlConnection {
 public:
  explicit ControlConnection(net::Fd fd);

  [[nodiscard]] int fd() const { return fd_.get(); }

  // Reads what the socket has now. EOF or a socket error returns REMOTE_DISCONNECTED.
  Status readAvailable();

  // Extracts the next whole frame, if one is buffered: returns true and fills `header` and
  // `payload` (a view valid until the next readAvailable()). A header whose length exceeds
  // `max_payload` or whose version differs from `version` (when non-zero) is a protocol error.
  Result<bool> nextFrame(uint32_t max_payload, uint8_t version, FrameHeader* header,
                         std::string_view* payload);
  // As nextFrame, but the frame stays buffered until consume(header) takes it (the payload view
  // stays valid until the next readAvailable()).
  Result<bool> peekFrame(uint32_t max_payload, uint8_t version, FrameHeader* header,
                         std::string_view* payload) const;
  void consume(const FrameHeader& header);
  // Bytes received and not yet taken as frames.
  [[nodiscard]] bool buffered() const { return in_end_ > in_start_; }

  // Frames are encoded straight into this buffer; call flush() afterwards.
  std::vector<uint8_t>* out() { return &out_; }

  // Writes as much buffered output as the socket takes.
  Status flush();
  [[nodiscard]] bool wantsWrite() const { return out_off_ < out_.size(); }
  [[nodiscard]] size_t pendingOutput() const { return out_.size() - out_off_; }

  [[nodiscard]] Clock::time_point lastReceive() const { return last_rx_; }
  [[nodiscard]] Clock::time_point lastSend() const { return last_tx_; }

 private:
  net::Fd fd_;
  std::vector<uint8_t> in_;
  size_t in_start_ = 0;  // first unconsumed byte
  size_t in_end_ = 0;    // one past the last received byte
  std::vector<uint8_t> out_;
  size_t out_off_ = 0;
  Clock::time_point last_rx_;
  Clock::time_point last_tx_;
};

}  // namespace tcpx::control
