#include "control/control_connection.h"

#include <cerrno>
#include <cstring>
#include <sys/socket.h>

#include "common/strings.h"

namespace tcpx::control {
namespace {
constexpr size_t kReadQuantum = 256ULL * 1024;
}

ControlConnection::ControlConnection(net::Fd fd)
    : fd_(std::move(fd)), last_rx_(Clock::now()), last_tx_(Clock::now()) {
  (void)net::setNonBlocking(fd_.get(), true);
  (void)net::setNoDelay(fd_.get());
}

Status ControlConnection::readAvailable() {
  // Compact when the consumed prefix dominates, so the buffer does not grow without bound.
  if (in_start_ > 0 && (in_start_ == in_end_ || in_start_ > in_.size() / 2)) {
    std::memmove(in_.data(), in_.data() + in_start_, in_end_ - in_start_);
    in_end_ -= in_start_;
    in_start_ = 0;
  }
  if (in_.size() - in_end_ < kReadQuantum) in_.resize(in_end_ + kReadQuantum);
  const ssize_t n = ::recv(fd_.get(), in_.data() + in_end_, in_.size() - in_end_, 0);
  if (n > 0) {
    in_end_ += static_cast<size_t>(n);
    last_rx_ = Clock::now();
    return {};
  }
  if (n == 0) return Status(StatusCode::kRemoteDisconnected, "control connection closed by peer");
  if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return {};
  return Status(StatusCode::kRemoteDisconnected, "control connection: recv: " + errnoString(errno));
}

Result<bool> ControlConnection::nextFrame(uint32_t max_payload, uint8_t version,
                                          FrameHeader* header, std::string_view* payload) {
  Result<bool> got = peekFrame(max_payload, version, header, payload);
  if (got.isOk() && got.value()) consume(*header);
  return got;
}

Result<bool> ControlConnection::peekFrame(uint32_t max_payload, uint8_t version,
                                          FrameHeader* header, std::string_view* payload) const {
  if (in_end_ - in_start_ < kFrameHeaderSize) return false;
  Status st = decodeHeader(in_.data() + in_start_, max_payload, header);
  if (!st.isOk()) return st;
  if (version != 0 && header->version != version) {
    return Status(StatusCode::kProtocolError,
                  strfmt("frame of protocol version %u on a version %u connection", header->version,
                         version));
  }
  if (in_end_ - in_start_ < kFrameHeaderSize + header->length) return false;
  *payload = std::string_view(
      reinterpret_cast<const char*>(in_.data() + in_start_ + kFrameHeaderSize), header->length);
  return true;
}

void ControlConnection::consume(const FrameHeader& header) {
  in_start_ += kFrameHeaderSize + header.length;
}

Status ControlConnection::flush() {
  while (out_off_ < out_.size()) {
    const ssize_t n = ::send(fd_.get(), out_.data() + out_off_, out_.size() - out_off_,
                             MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      out_off_ += static_cast<size_t>(n);
      last_tx_ = Clock::now();
      continue;
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    if (n < 0 && errno == EINTR) continue;
    return Status(StatusCode::kRemoteDisconnected,
                  "control connection: send: " + errnoString(errno));
  }
  if (out_off_ == out_.size()) {
    out_.clear();
    out_off_ = 0;
  }
  return {};
}

}  // namespace tcpx::control
