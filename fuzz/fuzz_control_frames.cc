// libFuzzer target: a byte stream as a peer would send it on the control connection. Every
// frame header is decoded and each payload handed to the decoder of its type, with tight
// limits; notifications (NOTIFICATION frames) and writes' inline data are among them.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "control/frames.h"

using namespace tcpx::control;  // NOLINT(google-build-using-namespace): a fuzz entry point

namespace {

// An accepted announcement carries a spread the chunk rule can use exactly when its data takes
// the channels.
void checkSpread(uint32_t spread, bool on_channels) {
  if (on_channels ? spread < 1 || spread > kMaxSpread : spread != 0) __builtin_trap();
}

void decodePayload(uint8_t type, std::string_view payload) {
  DecodeLimits limits;
  limits.max_descriptors = 256;
  limits.max_notification = 4096;
  limits.max_inline = 4096;
  limits.max_channels = 8;
  switch (static_cast<FrameType>(type)) {
    case FrameType::kHello: {
      Hello m;
      (void)decode(payload, &m);
      break;
    }
    case FrameType::kHelloAck: {
      HelloAck m;
      (void)decode(payload, &m);
      break;
    }
    case FrameType::kChannelSetup: {
      ChannelSetup m;
      (void)decode(payload, limits, &m);
      break;
    }
    case FrameType::kWriteRequest: {
      WriteRequest m;
      if (!decode(payload, limits, &m).isOk()) break;
      checkSpread(m.spread, !m.inline_data && !m.direct);
      if (m.inline_data) {
        // Views must stay inside the payload.
        volatile char sink = m.data.empty() ? 0 : m.data.back();
        (void)sink;
      }
      if (m.direct) {
        // A direct WRITE's ranges add up to its size, none empty or wrapping.
        uint64_t sum = 0;
        for (const DirectPiece& p : m.decoded_pieces) {
          if (p.length == 0 || p.addr + p.length < p.addr) __builtin_trap();
          sum += p.length;
        }
        if (sum != m.total) __builtin_trap();
      }
      break;
    }
    case FrameType::kAuthChallenge: {
      AuthChallenge m;
      (void)decode(payload, &m);
      break;
    }
    case FrameType::kAuthProof: {
      std::string proof;
      (void)decodeAuthProof(payload, &proof);
      break;
    }
    case FrameType::kWriteDone:
    case FrameType::kSendDone:
    case FrameType::kReadDone: {
      Completion m;
      (void)decodeCompletion(payload, &m);
      break;
    }
    case FrameType::kDataStatus: {
      Completion m;
      (void)decodeDataStatus(payload, &m);
      break;
    }
    case FrameType::kReadRequest: {
      ReadRequest m;
      (void)decode(payload, limits, &m);
      break;
    }
    case FrameType::kReadResponse: {
      ReadResponse m;
      if (decode(payload, limits, &m).isOk()) {
        checkSpread(m.spread, m.code == tcpx::StatusCode::kOk && !m.inline_data && !m.direct);
      }
      break;
    }
    case FrameType::kNotification: {
      std::string_view message;
      if (decodeNotification(payload, limits, &message).isOk() && !message.empty()) {
        volatile char sink = message.back();
        (void)sink;
      }
      break;
    }
    case FrameType::kGoodbye: {
      std::string_view reason;
      (void)decodeGoodbye(payload, &reason);
      break;
    }
    case FrameType::kCancel: {
      Cancel m;
      (void)decode(payload, &m);
      break;
    }
    case FrameType::kSendRts: {
      SendRts m;
      (void)decode(payload, &m);
      break;
    }
    case FrameType::kSendCts: {
      SendCts m;
      (void)decode(payload, &m);
      break;
    }
    case FrameType::kSendData: {
      SendData m;
      if (decode(payload, limits, &m).isOk()) {
        checkSpread(m.spread, m.code == tcpx::StatusCode::kOk && !m.inline_data);
      }
      break;
    }
    case FrameType::kIpcClose:
    case FrameType::kIpcClosed: {
      uint64_t base = 0;
      (void)decodeIpc(payload, &base);
      break;
    }
    case FrameType::kWriteQueued: {
      WriteQueued m;
      if (decode(payload, &m).isOk() && m.signal.size() != kSignalHandleSize) __builtin_trap();
      break;
    }
    case FrameType::kPing:
      break;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  size_t at = 0;
  while (size - at >= kFrameHeaderSize) {
    FrameHeader header;
    if (!decodeHeader(data + at, 1 << 20, &header).isOk()) break;
    at += kFrameHeaderSize;
    const size_t length = header.length < size - at ? header.length : size - at;
    decodePayload(header.type, std::string_view(reinterpret_cast<const char*>(data + at), length));
    at += length;
  }
  return 0;
}
