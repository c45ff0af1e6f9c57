// The one table of tunables: name, default, accepted range, meaning, and whether two engines may
// differ in it. The README's table is checked against this one by a test.
#include <algorithm>
#include <cctype>
#include <cstdlib>

#include <tcpx_p2p/config.h>

#include "common/log.h"
#include "common/strings.h"
#include "config/settings.h"

namespace tcpx {
namespace {

// kSizeOrAuto: a number in [min, max] or the word "auto" (parsed as a value the setting's field
// names: 0, or -1 where 0 is a value; resolved by the engine).
enum class Kind { kText, kNumber, kSizeOrAuto, kChoice, kLogLevel };

struct Tunable {
  TunableInfo info;
  Kind kind;
  uint64_t min = 0;
  uint64_t max = 0;
};

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;

// clang-format off
const Tunable kTunables[] = {
  {{"name", "", "text", "Engine name peers and notifications use; empty = <hostname>-<pid>", "per side"}, Kind::kText},
  {{"listen_host", "", "address", "Address the control listener binds to; empty = all interfaces (0.0.0.0)", "per side"}, Kind::kText},
  {{"listen_port", "0", "0..65535", "Control listener port; 0 = ephemeral", "per side"}, Kind::kNumber, 0, 65535},
  {{"interface", "", "interface name", "Network interface whose IPv4 address is advertised and used for data; empty = primary address", "per side"}, Kind::kText},
  {{"advertise_host", "", "address", "Address advertised in the connection info (overrides interface)", "per side"}, Kind::kText},
  {{"transport", "socket", "socket|tcpx|emulator", "Data transport: built-in TCP sockets, Google's GPUDirect-TCPX plugin, or the devmem emulator plugin", "must match: a peer on another transport is refused, naming both"}, Kind::kChoice},
  {{"same_host", "auto", "auto|socket|network", "How data moves to a peer on this host (same kernel boot id): auto = over the socket transport when the transport is tcpx (TCPX needs a NIC between two hosts: over loopback GPU memory would reach the plugin without devmem), else over the transport; socket = over the socket transport for tcpx and the emulator alike; network = over the transport, as for a peer elsewhere (tests over loopback)", "must match on one host: a peer that chose another transport for this host is refused, naming both"}, Kind::kChoice},
  {{"same_host_copy", "auto", "auto|off", "Direct copies with a peer process on this host: auto = READ and WRITE copy between the two processes' memory, made by the process whose memory is written: host memory on both sides by cross-memory attach (process_vm_readv, where the kernel allows it: the right to ptrace the peer), GPU memory of the side that is read by CUDA IPC (cudaMalloc memory), when the peer offers them too; else, and for off, over the data channels. See README, \"Direct copies on the same host\"", "per side: used only when both offer it"}, Kind::kChoice},
  {{"ipc_mappings_per_peer", "4096", "1..65536", "GPU allocations of one same-host peer this engine keeps mapped (CUDA IPC) for direct copies; past it the least recently used idle mapping is released (and mapped again when needed); a transfer needing more at once takes the data channels (that transfer only)", "per side"}, Kind::kNumber, 1, 65536},
  {{"plugin_path", "", "path", "ncclNet plugin library for tcpx/emulator; empty = /usr/local/tcpx/lib64/libnccl-net.so then libnccl-net.so (tcpx), libnccl-net-tcpxemu.so beside the library then on the library path (emulator)", "per side"}, Kind::kText},
  {{"net_device", "auto", "auto|index|name", "Plugin device (NIC) for data: auto = the NICs closest to the GPU by PCI path, channels spread over them", "per side"}, Kind::kText},
  {{"gpu", "auto", "auto|index", "CUDA device the plugin transport runs on (TCPX uses the current device); auto = the current device of the thread creating the engine", "per side"}, Kind::kText},
  {{"channels", "4", "1..32", "Data channels per peer and direction (one transport comm each)", "negotiated: the smaller of both"}, Kind::kNumber, 1, 32},
  {{"sockets_per_channel", "2", "1..16", "TCP sockets per channel", "per connection: the sending side's, carried in each data connection's handshake"}, Kind::kNumber, 1, 16},
  {{"socket_io_threads", "auto", "auto|1..64", "Threads that serve all of the engine's data sockets (epoll), whatever the number of peers; auto = two per core, 8 to 32; none run while no peer is connected", "per side"}, Kind::kSizeOrAuto, 1, 64},
  {{"chunk_size", "auto", "auto|4K..16M", "Bytes per transport request; chunks go round-robin over channels; auto = 512K on sockets, 1M on plugins (tcpx, emulator)", "negotiated: the smaller of both"}, Kind::kSizeOrAuto, 4 * kKiB, 16 * kMiB},
  {{"send_window", "12", "1..16", "Outstanding send requests per channel", "per side"}, Kind::kNumber, 1, 16},
  {{"recv_window", "16", "1..16", "Outstanding receive requests per channel", "per side"}, Kind::kNumber, 1, 16},
  {{"inline_threshold", "64K", "0..64K", "Transfers up to this many bytes travel inside the control frame (one round trip)", "per side (every engine accepts inline data up to 64K)"}, Kind::kNumber, 0, 64 * kKiB},
  {{"socket_min_split", "512K", "4K..16M", "A request is split over a channel's sockets only in parts of at least this size; smaller requests rotate over the sockets whole", "per connection: the sending side's, carried in each data connection's handshake"}, Kind::kNumber, 4 * kKiB, 16 * kMiB},
  {{"staging_slots", "16", "1..16", "Chunks per channel that may be staged through pinned host memory at once (GPU memory over sockets; every receive of a plugin's host receive path)", "per side"}, Kind::kNumber, 1, 16},
  {{"landed_copy_max", "4M", "0..1G", "GPU memory received over sockets: transfers up to this many bytes copy each chunk on to the GPU while it lands (while the receive is posted, a kernel block per part of it polls what has landed); larger ones copy a chunk once all of it has landed; 0 = never", "per side"}, Kind::kNumber, 0, 1024 * kMiB},
  {{"followed_gather_max", "0", "0..1G", "GPU memory sent over sockets: transfers up to this many bytes send each chunk while a kernel copies it out of GPU memory (a block per part of the send raises the count of bytes in place, which the socket follows); larger ones send a chunk once all of it is copied; 0 = never", "per side"}, Kind::kNumber, 0, 1024 * kMiB},
  {{"recv_path", "auto", "auto|pool|host", "How a plugin transport (tcpx, emulator) receives: pool = into the plugin's bounce pool, then unpacked (TCPX devmem receives); host = into registered host buffers, one per outstanding receive; auto = pool when the plugin's pool is GPU memory, else host", "per side"}, Kind::kChoice},
  {{"max_notification_size", "64K", "1..1M", "Largest notification message in bytes", "announced: the peer sends none longer; a longer one fails on the sending side (INVALID_ARGUMENT)"}, Kind::kNumber, 1, 1 * kMiB},
  {{"max_descriptors", "65536", "1..1048576", "Most descriptors in one transfer", "announced: the peer sends no request with more; a larger one fails on the sending side (RESOURCE_EXHAUSTED)"}, Kind::kNumber, 1, 1048576},
  {{"max_inflight_per_peer", "64", "1..4096", "Transfers announced to one peer at a time; later posts wait in a local queue", "per side"}, Kind::kNumber, 1, 4096},
  {{"keepalive_ms", "1000", "10..60000", "Idle time after which a keepalive frame is sent to a peer", "per side, capped at a quarter of the peer's peer_timeout_ms"}, Kind::kNumber, 10, 60000},
  {{"peer_timeout_ms", "4000", "100..600000", "A peer silent for this long is declared disconnected", "announced: the peer sends a frame at least every quarter of it"}, Kind::kNumber, 100, 600000},
  {{"connect_timeout_ms", "20000", "100..600000", "Bound on setting up a peer's control and data connections", "per side"}, Kind::kNumber, 100, 600000},
  {{"progress_poll_us", "0", "0..100000", "After a round with events the progress thread polls, without sleeping, for this long before it blocks again: a small transfer's replies are then taken without a wake-up (lower latency) at the cost of up to one core while transfers keep coming; 0 = block at once (idle CPU near zero)", "per side"}, Kind::kNumber, 0, 100000},
  {{"serve_poll_us", "auto", "auto|0..100000", "After reading a peer's request (READ, WRITE, send) the progress thread polls, without sleeping, for this long before it blocks again, so that a peer's next request (small transfers come back to back) is taken without a wake-up: up to one core while requests keep coming, nothing while none come; auto = 100 with 4 or more cores that the process may run on, else 0; 0 = block at once", "per side"}, Kind::kSizeOrAuto, 0, 100000},
  {{"caller_posts", "auto", "auto|on|off", "A small host-memory READ or WRITE (up to inline_threshold) posted while the progress thread waits for events, to a ready peer with nothing queued, is started by the posting thread, which writes its request frame itself instead of waking the progress thread for it, and a thread polling it with checkTransfer while the progress thread waits takes its reply itself; auto = on, whatever the core count (on 2 vCPUs a polling caller measured 2.4x faster at 4 KiB with it, a blocking one within a tenth)", "per side"}, Kind::kChoice},
  {{"data_timeout_ms", "10000", "100..600000", "A data channel with requests in the transport and no completion for this long fails its peer (TIMEOUT): the data connection is stalled or dead, whatever the control connection says", "per side"}, Kind::kNumber, 100, 600000},
  {{"auth_secret", "", "text", "Shared secret peers must prove they know (HMAC-SHA256 challenge-response in the handshake, never sent); empty = no authentication", "must match: a side that cannot prove it is refused"}, Kind::kText},
  {{"log_level", "", "error|warn|info|debug|trace", "Process-wide log level; empty = TCPX_P2P_LOG_LEVEL or warn", "per process"}, Kind::kLogLevel},
};
// clang-format on

const std::vector<TunableInfo>& infoTable() {
  static const std::vector<TunableInfo> table = [] {
    std::vector<TunableInfo> out;
    for (const Tunable& t : kTunables) out.push_back(t.info);
    return out;
  }();
  return table;
}

const Tunable* findTunable(std::string_view key) {
  for (const Tunable& t : kTunables) {
    if (t.info.name == key) return &t;
  }
  return nullptr;
}

Status validate(const Tunable& t, std::string_view value) {
  switch (t.kind) {
    case Kind::kText:
      return {};
    case Kind::kSizeOrAuto:
    case Kind::kNumber:
      if (!(t.kind == Kind::kSizeOrAuto && value == "auto") && !parseSize(value, t.min, t.max)) {
        return Status(StatusCode::kInvalidArgument,
                      strfmt("tunable '%.*s': value '%.*s' is not a number in %.*s",
                             static_cast<int>(t.info.name.size()), t.info.name.data(),
                             static_cast<int>(value.size()), value.data(),
                             static_cast<int>(t.info.range.size()), t.info.range.data()));
      }
      return {};
    case Kind::kChoice: {
      // The range lists the accepted words separated by '|'.
      std::string_view range = t.info.range;
      while (!range.empty()) {
        const size_t bar = range.find('|');
        if (range.substr(0, bar) == value) return {};
        if (bar == std::string_view::npos) break;
        range.remove_prefix(bar + 1);
      }
      return Status(StatusCode::kInvalidArgument,
                    strfmt("tunable '%.*s': value '%.*s' is not one of %.*s",
                           static_cast<int>(t.info.name.size()), t.info.name.data(),
                           static_cast<int>(value.size()), value.data(),
                           static_cast<int>(t.info.range.size()), t.info.range.data()));
    }
    case Kind::kLogLevel: {
      log::Level level{};
      if (value.empty() || log::parseLevel(std::string(value).c_str(), &level)) return {};
      return Status(StatusCode::kInvalidArgument,
                    strfmt("tunable 'log_level': value '%.*s' is not one of %.*s",
                           static_cast<int>(value.size()), value.data(),
                           static_cast<int>(t.info.range.size()), t.info.range.data()));
    }
  }
  return {};
}

}  // namespace

Config::Config() {
  for (const Tunable& t : kTunables)
    values_.emplace(std::string(t.info.name), std::string(t.info.default_value));
}

std::string Config::environmentName(std::string_view key) {
  std::string out = "TCPX_P2P_";
  for (char c : key) out.push_back(static_cast<char>(std::toupper(static_cast<unsigned char>(c))));
  return out;
}

Config Config::fromEnvironment() {
  Config config;
  for (const Tunable& t : kTunables) {
    const std::string env = environmentName(t.info.name);
    const char* value = std::getenv(env.c_str());  // NOLINT(concurrency-mt-unsafe)
    if (value == nullptr) continue;
    const Status st = config.set(t.info.name, value);
    if (!st.isOk()) LOG_WARN("ignoring %s: %s", env.c_str(), st.message().c_str());
  }
  return config;
}

Result<Config> Config::make(const std::vector<std::pair<std::string, std::string>>& params) {
  Config config = fromEnvironment();
  for (const auto& [key, value] : params) {
    Status st = config.set(key, value);
    if (!st.isOk()) return st;
  }
  return config;
}

Status Config::set(std::string_view key, std::string_view value) {
  const Tunable* t = findTunable(key);
  if (t == nullptr) {
    return Status(StatusCode::kInvalidArgument,
                  strfmt("unknown tunable '%.*s'", static_cast<int>(key.size()), key.data()));
  }
  Status st = validate(*t, value);
  if (!st.isOk()) return st;
  values_.find(key)->second.assign(value);
  return {};
}

Result<std::string> Config::get(std::string_view key) const {
  auto it = values_.find(key);
  if (it == values_.end()) {
    return Status(StatusCode::kInvalidArgument,
                  strfmt("unknown tunable '%.*s'", static_cast<int>(key.size()), key.data()));
  }
  return it->second;
}

std::span<const TunableInfo> Config::tunables() {
  return infoTable();
}

namespace config {

Settings parse(const Config& config) {
  auto text = [&](const char* key) { return config.get(key).value(); };
  auto number = [&](const char* key) {
    // Values were validated on set(), so parsing cannot fail here.
    return *parseSize(config.get(key).value(), 0, UINT64_MAX);
  };
  Settings s;
  s.name = text("name");
  s.listen_host = text("listen_host");
  s.listen_port = static_cast<uint16_t>(number("listen_port"));
  s.interface = text("interface");
  s.advertise_host = text("advertise_host");
  s.transport = text("transport");
  s.plugin_path = text("plugin_path");
  s.net_device = text("net_device");
  s.gpu = text("gpu");
  s.channels = static_cast<uint32_t>(number("channels"));
  s.sockets_per_channel = static_cast<uint32_t>(number("sockets_per_channel"));
  s.socket_io_threads =
      text("socket_io_threads") == "auto" ? 0 : static_cast<uint32_t>(number("socket_io_threads"));
  s.chunk_size = text("chunk_size") == "auto" ? 0 : number("chunk_size");
  s.send_window = static_cast<uint32_t>(number("send_window"));
  s.recv_window = static_cast<uint32_t>(number("recv_window"));
  s.inline_threshold = number("inline_threshold");
  s.socket_min_split = number("socket_min_split");
  s.staging_slots = static_cast<uint32_t>(number("staging_slots"));
  s.landed_copy_max = number("landed_copy_max");
  s.followed_gather_max = number("followed_gather_max");
  s.recv_path = text("recv_path");
  s.same_host = text("same_host");
  s.same_host_copy = text("same_host_copy");
  s.max_notification_size = number("max_notification_size");
  s.max_descriptors = static_cast<uint32_t>(number("max_descriptors"));
  s.ipc_mappings_per_peer = static_cast<uint32_t>(number("ipc_mappings_per_peer"));
  s.max_inflight_per_peer = static_cast<uint32_t>(number("max_inflight_per_peer"));
  s.keepalive_ms = static_cast<uint32_t>(number("keepalive_ms"));
  s.peer_timeout_ms = static_cast<uint32_t>(number("peer_timeout_ms"));
  s.connect_timeout_ms = static_cast<uint32_t>(number("connect_timeout_ms"));
  s.data_timeout_ms = static_cast<uint32_t>(number("data_timeout_ms"));
  s.progress_poll_us = static_cast<uint32_t>(number("progress_poll_us"));
  s.serve_poll_us =
      text("serve_poll_us") == "auto" ? -1 : static_cast<int32_t>(number("serve_poll_us"));
  s.caller_posts = text("caller_posts");
  s.log_level = text("log_level");
  s.auth_secret = text("auth_secret");
  return s;
}

}  // namespace config
}  // namespace tcpx
