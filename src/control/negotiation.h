// What two engines agree on in the handshake, and the one rule for each setting.
//
// Every setting that changes what goes on the wire or what one side may send the other is
// exchanged in HELLO / HELLO_ACK (WireSettings) and turned into the connection's values here, the
// same way on both sides:
//   channels, chunk_size      the smaller of both (both sides then cut and spread every stream
//                             identically; see engine/chunk_plan.h)
//   max_descriptors,          each side's own limit on what it accepts: a side sends the other
//   max_notification_size     no more than the other's limit, and refuses a transfer or
//                             notification over it locally with a typed error
//   peer_timeout_ms           each side keeps its own; the other sends keepalives at least
//                             every quarter of it (keepalive_ms caps the interval from above)
// How a request is split over one channel's sockets (socket_min_split, sockets_per_channel) is
// the sending side's rule, carried by each data connection's own handshake (the socket
// transport's). A value out of range is a refusal naming the setting and the value.
#pragma once

#include <cstdint>
#include <string_view>

#include <tcpx_p2p/status.h>

#include "control/frames.h"

namespace tcpx::control {

// What one connection uses, derived from both sides' WireSettings.
struct AgreedSettings {
  uint32_t channels = 0;
  uint64_t chunk_size = 0;
  uint32_t peer_max_descriptors = 0;   // requests we send carry at most this many descriptors
  uint64_t peer_max_notification = 0;  // notifications we send are at most this long
  uint32_t keepalive_ms = 0;           // we send a frame at least this often
};

// Ranges a peer's WireSettings must respect (the tunables' own ranges).
constexpr uint32_t kMaxChannels = 32;
// A stream alone is announced with two chunks per channel; the spread travels in one byte.
static_assert(2 * kMaxChannels <= kMaxSpread && kMaxSpread <= UINT8_MAX);
constexpr uint64_t kMinChunkSize = 4096;
constexpr uint64_t kMaxChunkSize = 16ULL << 20;
constexpr uint32_t kMaxDescriptorsLimit = 1U << 20;
constexpr uint64_t kMaxNotificationLimit = 1ULL << 20;
constexpr uint32_t kMinPeerTimeoutMs = 100;
constexpr uint32_t kMaxPeerTimeoutMs = 600000;

// Checks the peer's values and derives the connection's. INVALID_ARGUMENT names the setting and
// the peer's value when one is out of range.
Result<AgreedSettings> agreeSettings(const WireSettings& ours, const WireSettings& theirs,
                                     uint32_t keepalive_ms);

// A peer name is 1 to kMaxNameLength printable bytes (no control characters).
bool validPeerName(std::string_view name);

}  // namespace tcpx::control
