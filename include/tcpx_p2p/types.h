// Plain value types of the public API.
#pragma once

#include <cstdint>
#include <string>

namespace tcpx {

// Where a registered region lives. The registry carries the kind and device of every region so
// that transports and staging can pick the right copy path.
enum class MemoryKind : uint8_t {
  kHost = 0,  // ordinary or pinned host memory
  kCuda = 1,  // CUDA device memory (needs a build with CUDA)
};

// Identifies a local registration. Ids are random 64-bit values, never reused within an engine,
// so a stale id is detected instead of aliasing a newer region, and a peer cannot guess them.
using MemoryId = uint64_t;

// A byte range inside a local registration.
struct LocalDesc {
  MemoryId mem = 0;
  uint64_t offset = 0;
  uint64_t length = 0;
};

// What a peer's public memory descriptor says about one of its registrations, once loaded.
struct RemoteMemory {
  MemoryId id = 0;         // the peer's id; use it in RemoteDesc::mem
  uint64_t base_addr = 0;  // the region's address in the peer's process (for address-based users)
  uint64_t length = 0;
  MemoryKind kind = MemoryKind::kHost;
  int device = -1;
  std::string owner_uuid;  // the peer engine instance that registered it (hex)
};

// A byte range inside a peer's registration, addressed by the peer's memory id.
struct RemoteDesc {
  MemoryId mem = 0;
  uint64_t offset = 0;
  uint64_t length = 0;
};

enum class OpKind : uint8_t {
  kRead = 0,   // remote -> local
  kWrite = 1,  // local -> remote
};

// Handle of a prepared transfer, send or recv. Valid until released.
using TransferHandle = uint64_t;

// A notification taken from the engine: who sent it and what it says.
struct Notification {
  std::string peer;
  std::string message;
};

enum class PeerState : uint8_t {
  kUnknown = 0,     // no such peer
  kIdle = 1,        // known, not connected yet
  kConnecting = 2,  // control or data connections being set up
  kReady = 3,       // transfers flow
  kFailed = 4,      // disconnected; transfers fail with REMOTE_DISCONNECTED until reconnected
};

}  // namespace tcpx
