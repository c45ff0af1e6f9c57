// Typed view of a Config, parsed once when an engine is created.
#pragma once

#include <cstdint>
#include <string>

#include <tcpx_p2p/config.h>

namespace tcpx::config {

// chunk_size = auto: the socket transport moves 512 KiB per request; plugin transports 1 MiB,
// which halves their per-request costs (completion test, unpack launch, irecvConsumed) and which
// TCPX still spreads over its sockets in NCCL_DYNAMIC_CHUNK_SIZE (512 KiB) pieces.
inline constexpr uint64_t kAutoChunkSocket = 512ULL * 1024;
inline constexpr uint64_t kAutoChunkPlugin = 1024ULL * 1024;

struct Settings {
  std::string name;            // engine name; "" -> "<hostname>-<pid>"
  std::string listen_host;     // address the control listener binds to; "" = all interfaces
  uint16_t listen_port = 0;    // 0 = ephemeral
  std::string interface;       // interface whose address is advertised and used for data
  std::string advertise_host;  // explicit advertised address (overrides interface)
  std::string transport;       // "socket", "tcpx" or "emulator"
  std::string plugin_path;     // "" = default locations
  std::string net_device;      // "auto", index or interface name
  std::string gpu;             // "auto" or a CUDA device index
  uint32_t channels = 4;
  uint32_t sockets_per_channel = 2;
  uint32_t socket_io_threads = 0;  // 0 = auto: transport::IoPool::autoThreads()
  uint64_t chunk_size = 0;         // 0 = auto: the engine picks per transport (kAutoChunk*)
  uint32_t send_window = 12;
  uint32_t recv_window = 16;
  uint64_t inline_threshold = 64ULL * 1024;
  uint64_t socket_min_split = 512ULL * 1024;
  uint32_t staging_slots = 16;
  uint64_t landed_copy_max = 4ULL * 1024 * 1024;
  uint64_t followed_gather_max = 0;
  std::string recv_path = "auto";       // "auto", "pool" or "host" (plugin transports)
  std::string same_host = "auto";       // "auto", "socket" or "network": see EngineCore::netPathFor
  std::string same_host_copy = "auto";  // "auto" or "off": direct copies (engine/direct_path.cc)
  uint64_t max_notification_size = 64ULL * 1024;
  uint32_t max_descriptors = 65536;
  uint32_t ipc_mappings_per_peer = 4096;  // direct_path.cc: mapPeerPieces
  uint32_t max_inflight_per_peer = 64;
  uint32_t keepalive_ms = 1000;
  uint32_t peer_timeout_ms = 4000;
  uint32_t connect_timeout_ms = 20000;
  uint32_t data_timeout_ms = 10000;
  uint32_t progress_poll_us = 0;      // 0 = the progress thread blocks as soon as it is idle
  int32_t serve_poll_us = -1;         // -1 = auto: EngineCore resolves it by the core count
  std::string caller_posts = "auto";  // "auto", "on" or "off": EngineCore::postFromCaller
  std::string log_level;              // "" = leave the process-wide level alone
  std::string auth_secret;            // "" = peers are not authenticated
};

// Parses every tunable of `config` (values were validated when set).
Settings parse(const Config& config);

}  // namespace tcpx::config
