// Status codes and results returned by every public call.
//
// The library does not throw across its API: each call returns a Status (or a Result<T> holding a
// value or a Status). Codes are stable and meant to be switched on; messages are for people and
// carry the context needed to act (peer, transfer, channel, errno).
#pragma once

#include <string>
#include <string_view>
#include <utility>
#include <variant>

#include <tcpx_p2p/export.h>

namespace tcpx {

enum class StatusCode : int {
  kOk = 0,
  kInProgress = 1,          // a transfer is posted and not finished yet
  kInvalidArgument = 2,     // malformed input from the caller (empty list, zero length, bad key)
  kNotFound = 3,            // unknown peer, memory id, remote memory or transfer handle
  kOutOfRange = 4,          // a descriptor reaches outside its registration
  kLengthMismatch = 5,      // local and remote lengths differ, or send and recv sizes differ
  kAlreadyExists = 6,       // duplicate registration or peer
  kRepostActive = 7,        // the handle is still in flight
  kRemoteDisconnected = 8,  // the peer died, closed, restarted or stopped answering
  kRemoteRejected = 9,      // the peer refused the request (its own validation failed)
  kCanceled = 10,           // the transfer was released while in flight, or the peer canceled
  kTimeout = 11,            // a bounded wait ran out (connection set-up)
  kProtocolError = 12,      // the peer sent bytes that do not follow the protocol
  kNotSupported = 13,       // feature not built in or not offered by the transport
  kResourceExhausted = 14,  // a documented limit was reached
  kTransportError = 15,     // the transport reported a local failure
  kInternal = 16,           // a bug: please report with the log
  kNotPosted = 17,          // the transfer handle was prepared but never posted
  kDeviceError = 18,        // a CUDA call failed (message names the call and the error)
};

// Stable, short name of a code ("REMOTE_DISCONNECTED", ...).
TCPX_P2P_API const char* statusCodeName(StatusCode code);

class TCPX_P2P_API Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status ok() { return {}; }

  [[nodiscard]] bool isOk() const { return code_ == StatusCode::kOk; }
  [[nodiscard]] StatusCode code() const { return code_; }
  [[nodiscard]] const std::string& message() const { return message_; }
  // "CODE_NAME: message"
  [[nodiscard]] std::string toString() const;

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

// Either a value or a non-OK Status.
template <typename T>
class Result {
 public:
  Result(T value) : v_(std::move(value)) {}         // NOLINT(google-explicit-constructor)
  Result(Status status) : v_(std::move(status)) {}  // NOLINT(google-explicit-constructor)

  [[nodiscard]] bool isOk() const { return std::holds_alternative<T>(v_); }
  [[nodiscard]] const Status& status() const {
    static const Status kOkStatus;
    return isOk() ? kOkStatus : std::get<Status>(v_);
  }
  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace tcpx
