// What an epoll event belongs to: a kind in the top byte, an id (peer serial, incoming
// connection id) below. Ids are never reused, so a late event for a closed object finds nothing.
#pragma once

#include <cstdint>

namespace tcpx::engine {

enum class KeyKind : uint8_t {
  kWake = 1,          // the command queue's eventfd
  kListener = 2,      // the control listener
  kTransport = 3,     // the transport's completion fd
  kPeerControl = 4,   // an established control connection (id = peer serial)
  kPeerOutgoing = 5,  // our connect attempt to a peer (id = peer serial)
  kIncoming = 6,      // an accepted connection that has not said HELLO yet
};

// Ids of the two kTransport keys: the engine's transport, and the socket transport it keeps for
// peers on this host.
constexpr uint64_t kTransportKeyId = 0;
constexpr uint64_t kHostSocketsKeyId = 1;

inline uint64_t epollKey(KeyKind kind, uint64_t id) {
  return (static_cast<uint64_t>(kind) << 56) | (id & ((1ULL << 56) - 1));
}
inline KeyKind keyKind(uint64_t key) {
  return static_cast<KeyKind>(key >> 56);
}
inline uint64_t keyId(uint64_t key) {
  return key & ((1ULL << 56) - 1);
}

}  // namespace tcpx::engine
