#include <tcpx_p2p/status.h>

namespace tcpx {

const char* statusCodeName(StatusCode code) {
  switch (code) {
    case StatusCode::kOk:
      return "OK";
    case StatusCode::kInProgress:
      return "IN_PROGRESS";
    case StatusCode::kInvalidArgument:
      return "INVALID_ARGUMENT";
    case StatusCode::kNotFound:
      return "NOT_FOUND";
    case StatusCode::kOutOfRange:
      return "OUT_OF_RANGE";
    case StatusCode::kLengthMismatch:
      return "LENGTH_MISMATCH";
    case StatusCode::kAlreadyExists:
      return "ALREADY_EXISTS";
    case StatusCode::kRepostActive:
      return "REPOST_ACTIVE";
    case StatusCode::kRemoteDisconnected:
      return "REMOTE_DISCONNECTED";
    case StatusCode::kRemoteRejected:
      return "REMOTE_REJECTED";
    case StatusCode::kCanceled:
      return "CANCELED";
    case StatusCode::kTimeout:
      return "TIMEOUT";
    case StatusCode::kProtocolError:
      return "PROTOCOL_ERROR";
    case StatusCode::kNotSupported:
      return "NOT_SUPPORTED";
    case StatusCode::kResourceExhausted:
      return "RESOURCE_EXHAUSTED";
    case StatusCode::kTransportError:
      return "TRANSPORT_ERROR";
    case StatusCode::kInternal:
      return "INTERNAL";
    case StatusCode::kNotPosted:
      return "NOT_POSTED";
    case StatusCode::kDeviceError:
      return "DEVICE_ERROR";
  }
  return "UNKNOWN";
}

std::string Status::toString() const {
  if (message_.empty()) return statusCodeName(code_);
  return std::string(statusCodeName(code_)) + ": " + message_;
}

}  // namespace tcpx
