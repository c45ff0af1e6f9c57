#include "control/negotiation.h"

#include <algorithm>

#include "common/strings.h"

namespace tcpx::control {
namespace {

Status outOfRange(const char* setting, uint64_t value, uint64_t lo, uint64_t hi) {
  return Status(StatusCode::kInvalidArgument,
                strfmt("peer's %s is %llu, outside %llu..%llu", setting,
                       static_cast<unsigned long long>(value), static_cast<unsigned long long>(lo),
                       static_cast<unsigned long long>(hi)));
}

}  // namespace

Result<AgreedSettings> agreeSettings(const WireSettings& ours, const WireSettings& theirs,
                                     uint32_t keepalive_ms) {
  if (theirs.channels < 1 || theirs.channels > kMaxChannels) {
    return outOfRange("channels", theirs.channels, 1, kMaxChannels);
  }
  if (theirs.chunk_size < kMinChunkSize || theirs.chunk_size > kMaxChunkSize) {
    return outOfRange("chunk_size", theirs.chunk_size, kMinChunkSize, kMaxChunkSize);
  }
  if (theirs.max_descriptors < 1 || theirs.max_descriptors > kMaxDescriptorsLimit) {
    return outOfRange("max_descriptors", theirs.max_descriptors, 1, kMaxDescriptorsLimit);
  }
  if (theirs.max_notification < 1 || theirs.max_notification > kMaxNotificationLimit) {
    return outOfRange("max_notification_size", theirs.max_notification, 1, kMaxNotificationLimit);
  }
  if (theirs.peer_timeout_ms < kMinPeerTimeoutMs || theirs.peer_timeout_ms > kMaxPeerTimeoutMs) {
    return outOfRange("peer_timeout_ms", theirs.peer_timeout_ms, kMinPeerTimeoutMs,
                      kMaxPeerTimeoutMs);
  }
  AgreedSettings agreed;
  agreed.channels = std::min(ours.channels, theirs.channels);
  agreed.chunk_size = std::min(ours.chunk_size, theirs.chunk_size);
  agreed.peer_max_descriptors = theirs.max_descriptors;
  agreed.peer_max_notification = theirs.max_notification;
  // Four keepalives per peer timeout: one lost or late frame never makes a live peer look dead.
  agreed.keepalive_ms = std::max<uint32_t>(1, std::min(keepalive_ms, theirs.peer_timeout_ms / 4));
  return agreed;
}

bool validPeerName(std::string_view name) {
  if (name.empty() || name.size() > kMaxNameLength) return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    const auto u = static_cast<unsigned char>(c);
    return u >= 0x20 && u != 0x7f;
  });
}

}  // namespace tcpx::control
