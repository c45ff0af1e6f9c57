#include "control/blobs.h"

#include "common/byte_io.h"
#include "control/frames.h"

namespace tcpx::control {
namespace {

constexpr uint32_t kConnInfoMagic = 0x49435854;  // "TXCI"
constexpr uint32_t kMemDescMagic = 0x444d5854;   // "TXMD"
// Connection info 2 added the host identity; memory descriptors are still 1.
constexpr uint16_t kConnInfoVersion = 2;
constexpr uint16_t kBlobVersion = 1;

std::string toString(const std::vector<uint8_t>& bytes) {
  return {reinterpret_cast<const char*>(bytes.data()), bytes.size()};
}

}  // namespace

std::string encodeConnInfo(const ConnInfo& info) {
  std::vector<uint8_t> out;
  ByteWriter w(&out);
  w.u32(kConnInfoMagic);
  w.u16(kConnInfoVersion);
  w.u16(kProtocolVersion);
  w.str(info.uuid);
  w.str(info.name);
  w.str(info.host);
  w.u16(info.port);
  w.str(info.transport);
  w.str(info.host_id);
  return toString(out);
}

Result<ConnInfo> decodeConnInfo(std::string_view blob) {
  ByteReader r(blob);
  const uint32_t magic = r.u32();
  const uint16_t version = r.u16();
  const uint16_t protocol = r.u16();
  ConnInfo info;
  info.uuid = r.str(16);
  info.name = r.str(kMaxNameLength);
  info.host = r.str(256);
  info.port = r.u16();
  info.transport = r.str(64);
  info.host_id = r.str(64);
  if (magic != kConnInfoMagic) {
    return Status(StatusCode::kInvalidArgument,
                  "connection info is not a tcpx_p2p connection blob");
  }
  if (version != kConnInfoVersion || protocol != kProtocolVersion) {
    return Status(StatusCode::kInvalidArgument,
                  "connection info comes from an incompatible tcpx_p2p version (blob v" +
                      std::to_string(version) + ", protocol v" + std::to_string(protocol) + ")");
  }
  if (!r.ok() || !r.done() || info.uuid.size() != 16 || info.host.empty() || info.port == 0) {
    return Status(StatusCode::kInvalidArgument, "connection info is truncated or malformed");
  }
  return info;
}

std::string encodeMemoryDescriptor(const MemoryDescriptor& desc) {
  std::vector<uint8_t> out;
  ByteWriter w(&out);
  w.u32(kMemDescMagic);
  w.u16(kBlobVersion);
  w.str(desc.owner_uuid);
  w.u64(desc.id);
  w.u64(desc.base_addr);
  w.u64(desc.length);
  w.u8(static_cast<uint8_t>(desc.kind));
  w.u32(static_cast<uint32_t>(desc.device));
  return toString(out);
}

Result<MemoryDescriptor> decodeMemoryDescriptor(std::string_view blob) {
  ByteReader r(blob);
  const uint32_t magic = r.u32();
  const uint16_t version = r.u16();
  MemoryDescriptor desc;
  desc.owner_uuid = r.str(16);
  desc.id = r.u64();
  desc.base_addr = r.u64();
  desc.length = r.u64();
  const uint8_t kind = r.u8();
  desc.device = static_cast<int32_t>(r.u32());
  if (!r.ok() || magic != kMemDescMagic) {
    return Status(StatusCode::kInvalidArgument, "not a tcpx_p2p memory descriptor");
  }
  if (version != kBlobVersion) {
    return Status(StatusCode::kInvalidArgument,
                  "memory descriptor from an incompatible tcpx_p2p version (v" +
                      std::to_string(version) + ")");
  }
  if (!r.done() || desc.owner_uuid.size() != 16 || desc.id == 0 ||
      kind > static_cast<uint8_t>(MemoryKind::kCuda)) {
    return Status(StatusCode::kInvalidArgument, "memory descriptor is truncated or malformed");
  }
  desc.kind = static_cast<MemoryKind>(kind);
  return desc;
}

}  // namespace tcpx::control
