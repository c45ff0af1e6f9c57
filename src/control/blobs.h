// Opaque blobs users pass between processes: an engine's connection info and the public
// descriptor of a memory registration. Both are versioned binary records; the parsers reject
// anything malformed (they read bytes that came from elsewhere).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include <tcpx_p2p/status.h>
#include <tcpx_p2p/types.h>

namespace tcpx::control {

struct ConnInfo {
  std::string uuid;  // 16 raw bytes
  std::string name;
  std::string host;  // numeric address the control listener is reachable at
  uint16_t port = 0;
  std::string transport;
  std::string host_id;  // hostIdentity() of the engine's host; empty when unknown
};

std::string encodeConnInfo(const ConnInfo& info);
Result<ConnInfo> decodeConnInfo(std::string_view blob);

struct MemoryDescriptor {
  std::string owner_uuid;  // 16 raw bytes
  uint64_t id = 0;
  uint64_t base_addr = 0;
  uint64_t length = 0;
  MemoryKind kind = MemoryKind::kHost;
  int32_t device = -1;
};

std::string encodeMemoryDescriptor(const MemoryDescriptor& desc);
Result<MemoryDescriptor> decodeMemoryDescriptor(std::string_view blob);

}  // namespace tcpx::control
