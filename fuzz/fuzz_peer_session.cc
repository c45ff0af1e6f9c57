// libFuzzer target: a live engine and a scripted peer (tests/support/scripted_peer.h) that says
// whatever the input says, while the engine runs transfers of its own with that peer. The input
// is a program (peer_session_ops.h): the engine's posts and releases, frames the peer sends
// (well-formed with fuzzed fields and ids near the live ones, or raw), data streams, stray data,
// deregistrations. Most sessions agree on direct copies (same_host_copy): the peer then also
// sends direct requests and answers naming ranges of its "memory" (a buffer of this process,
// or any address) and READ_DONE, and some offer a proof that does not read back.
//
// Checked for every input: no crash and no sanitizer report; no hang (libFuzzer's -timeout); no
// byte changed in the guard areas around registered memory or in memory after it was
// deregistered; and once the peer goes away the engine fails it and releases every handle
// within a bound.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <sys/prctl.h>
#include <thread>
#include <utility>
#include <vector>

#include <tcpx_p2p/tcpx_p2p.h>

#include "control/frames.h"
#include "peer_session_ops.h"
#include "support/scripted_peer.h"

using namespace std::chrono_literals;
using tcpx::Engine;
using tcpx::MemoryId;
using tcpx::StatusCode;
using tcpx::TransferHandle;
using tcpx::control::FrameType;
using tcpx::fuzz::SessionOp;
using tcpx::testing::ScriptedPeer;

namespace {

constexpr size_t kGuard = 4096;
constexpr size_t kRegionSize = 256 * 1024;
constexpr int kRegions = 3;
constexpr uint8_t kPoison = 0xA5;
constexpr uint8_t kRetired = 0x3C;

// Page-aligned memory with poisoned guards on both sides of the usable part.
class GuardedBuffer {
 public:
  explicit GuardedBuffer(size_t size) : size_(size) {
    void* p = nullptr;
    if (posix_memalign(&p, 4096, size + 2 * kGuard) != 0) std::abort();
    base_ = static_cast<uint8_t*>(p);
    std::memset(base_, kPoison, size + 2 * kGuard);
  }
  ~GuardedBuffer() { std::free(base_); }
  GuardedBuffer(const GuardedBuffer&) = delete;
  GuardedBuffer& operator=(const GuardedBuffer&) = delete;
  [[nodiscard]] uint8_t* data() const { return base_ + kGuard; }
  [[nodiscard]] size_t size() const { return size_; }
  [[nodiscard]] bool guardsIntact() const {
    return all(base_, kGuard, kPoison) && all(base_ + kGuard + size_, kGuard, kPoison);
  }
  [[nodiscard]] bool allRetired() const { return all(data(), size_, kRetired); }

 private:
  // memcmp against a filled page: the byte loop is too slow under the sanitizers.
  static bool all(const uint8_t* p, size_t n, uint8_t v) {
    static uint8_t poison_page[4096];
    static uint8_t retired_page[4096];
    static const bool filled = [] {
      std::memset(poison_page, kPoison, sizeof(poison_page));
      std::memset(retired_page, kRetired, sizeof(retired_page));
      return true;
    }();
    (void)filled;
    const uint8_t* page = v == kPoison ? poison_page : retired_page;
    for (size_t at = 0; at < n; at += sizeof(poison_page)) {
      if (std::memcmp(p + at, page, std::min(n - at, sizeof(poison_page))) != 0) return false;
    }
    return true;
  }
  uint8_t* base_ = nullptr;
  size_t size_;
};

struct Region {
  std::unique_ptr<GuardedBuffer> buffer;
  MemoryId id = 0;
};

struct Harness {
  std::unique_ptr<Engine> engine;
  Region regions[kRegions];
  std::vector<std::unique_ptr<GuardedBuffer>> retired;  // deregistered: must stay kRetired
};

void registerRegion(Harness& h, Region& r) {
  r.buffer = std::make_unique<GuardedBuffer>(kRegionSize);
  auto id = h.engine->registerMemory(r.buffer->data(), kRegionSize);
  if (!id.isOk()) std::abort();
  r.id = id.value();
}

Harness& harness() {
  static Harness* h = [] {
    auto* made = new Harness;
    auto config = tcpx::Config::make({{"name", "fuzzed-engine"},
                                      {"transport", "socket"},
                                      {"listen_host", "127.0.0.1"},
                                      {"channels", "2"},
                                      {"sockets_per_channel", "1"},
                                      {"chunk_size", "64K"},
                                      // A stalled step ends within a second: the peer pings
                                      // only while the program runs one of its own steps.
                                      {"peer_timeout_ms", "1000"},
                                      {"data_timeout_ms", "1000"},
                                      {"same_host_copy", "auto"},
                                      {"log_level", "error"}});
    if (!config.isOk()) std::abort();
    auto engine = Engine::create(config.value());
    if (!engine.isOk()) std::abort();
    made->engine = std::move(engine.value());
    for (Region& r : made->regions) registerRegion(*made, r);
    return made;
  }();
  return *h;
}

// Reads the program.
class Input {
 public:
  Input(const uint8_t* data, size_t size) : p_(data), left_(size) {}
  [[nodiscard]] bool more() const { return left_ > 0; }
  uint8_t u8() {
    if (left_ == 0) return 0;
    --left_;
    return *p_++;
  }
  uint64_t u64() {
    uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v = (v << 8) | u8();
    return v;
  }
  uint64_t below(uint64_t n) { return n == 0 ? 0 : (static_cast<uint64_t>(u8()) << 8 | u8()) % n; }
  std::string bytes(size_t max) {
    const size_t n = std::min<size_t>(below(max + 1), left_);
    std::string out(reinterpret_cast<const char*>(p_), n);
    p_ += n;
    left_ -= n;
    return out;
  }

 private:
  const uint8_t* p_;
  size_t left_;
};

// What the peer learned from the engine's frames, so fuzzed frames can name live things.
struct Session {
  std::vector<uint64_t> engine_ids;  // ids the engine announced or answered with
  std::vector<uint64_t> peer_ids;    // ids this peer announced
  // Streams the engine announced on the channels, in order: their sizes and spreads.
  std::deque<std::pair<uint64_t, uint32_t>> engine_streams;
  std::map<uint64_t, uint64_t> read_totals;  // our READ_REQUEST id -> total
  std::map<uint64_t, uint64_t> send_sizes;   // the engine's SEND_RTS id -> size
  std::vector<TransferHandle> handles;
  uint64_t remote_id = 0;  // the peer's "memory" loaded into the engine
};

uint64_t pickId(Input& in, ScriptedPeer& peer, Session& s) {
  switch (in.u8() % 5) {
    case 0:
      return s.engine_ids.empty() ? 1 : s.engine_ids[in.below(s.engine_ids.size())];
    case 1:
      return s.peer_ids.empty() ? 1 : s.peer_ids[in.below(s.peer_ids.size())];
    case 2: {
      const uint64_t id = peer.nextId();
      s.peer_ids.push_back(id);
      return id;
    }
    case 3:
      return in.below(16);
    default:
      return in.u64();
  }
}

std::vector<tcpx::control::WireDesc> pickDescs(Input& in, Harness& h, uint64_t* total) {
  std::vector<tcpx::control::WireDesc> descs(1 + in.below(3));
  *total = 0;
  for (auto& d : descs) {
    const uint8_t which = in.u8();
    d.mem = which < 240 ? h.regions[which % kRegions].id : in.u64();
    // Mostly inside, sometimes past the end or wrapping.
    d.offset = in.u8() < 230 ? in.below(kRegionSize) : in.u64();
    d.length = in.u8() < 230 ? 1 + in.below(128 * 1024) : in.u64();
    *total += d.length;
  }
  if (in.u8() > 240) *total = in.u64();
  return descs;
}

// What a direct request or answer of the peer names: ranges of peer_source() (the peer's
// "memory", in this process), sometimes anywhere, adding up to `total` or not.
const std::string& peerSource() {
  static const std::string* source = new std::string(512 * 1024, '\x5e');
  return *source;
}

// Sometimes the ranges are GPU memory: inside one fuzzed IPC handle (`handles` gets it).
std::vector<tcpx::control::DirectPiece> pickPieces(Input& in, uint64_t total,
                                                   std::vector<tcpx::control::IpcHandle>* handles) {
  std::vector<tcpx::control::DirectPiece> pieces(1 + in.below(3));
  const bool device = in.u8() < 60;
  if (device) {
    handles->push_back({in.bytes(64) + std::string(64, 'h'), 0, 0, "0000:00:00.0"});
    handles->back().handle.resize(tcpx::control::kIpcHandleSize);
  }
  const std::string& source = peerSource();
  uint64_t left = total;
  for (size_t i = 0; i < pieces.size(); ++i) {
    auto& p = pieces[i];
    p.length = i + 1 == pieces.size() ? left : std::min<uint64_t>(left, 1 + in.below(64 * 1024));
    left -= p.length;
    if (in.u8() < 230 && p.length <= source.size()) {
      p.addr = reinterpret_cast<uint64_t>(source.data()) + in.below(source.size() - p.length + 1);
    } else {
      p.addr = in.u64();
    }
  }
  if (in.u8() > 240) pieces.back().length += 1 + in.below(4096);
  if (device) {
    // The handle's allocation spans the pieces (or not quite).
    uint64_t lo = UINT64_MAX;
    uint64_t hi = 0;
    for (auto& p : pieces) {
      p.handle = in.u8() < 250 ? 0 : in.below(3);
      lo = std::min(lo, p.addr);
      hi = std::max(hi, p.addr + p.length);
    }
    handles->back().base = lo;
    handles->back().size = hi - lo - (in.u8() > 245 ? 1 : 0);
  }
  return pieces;
}

StatusCode pickCode(Input& in) {
  return in.u8() < 200 ? StatusCode::kOk : static_cast<StatusCode>(in.below(19));
}

std::vector<uint8_t> buildFrame(Input& in, ScriptedPeer& peer, Session& s, Harness& h) {
  namespace c = tcpx::control;
  std::vector<uint8_t> out;
  const std::string data = in.bytes(4096);
  const tcpx::transport::IoSlice slice{const_cast<char*>(data.data()), data.size()};
  const std::span<const tcpx::transport::IoSlice> inline_slices(&slice, 1);
  const uint64_t first_chunk = in.u8() < 230 ? peer.outNextChunk() : in.below(64);
  // Mostly the spread the peer's own streams are cut by, sometimes another one the rule allows,
  // rarely one it does not (0, or past kMaxSpread).
  const uint8_t spread_pick = in.u8();
  const uint32_t spread = spread_pick < 200   ? peer.outSpread()
                          : spread_pick < 250 ? 1 + static_cast<uint32_t>(in.below(c::kMaxSpread))
                                              : in.u8();
  switch (in.below(17)) {
    case 0: {
      c::WriteRequest m;
      m.xfer_id = pickId(in, peer, s);
      const auto descs = pickDescs(in, h, &m.total);
      m.descs = descs;
      m.first_chunk = first_chunk;
      m.inline_data = in.u8() < 128;
      if (m.inline_data) m.total = data.size();
      m.status_follows = !m.inline_data && in.u8() < 100;
      m.has_notification = in.u8() < 60;
      m.notification = "fuzzed";
      std::vector<c::DirectPiece> pieces;
      std::vector<c::IpcHandle> handles;
      if (!m.inline_data && in.u8() < 80) {
        m.direct = true;
        m.status_follows = false;
        pieces = pickPieces(in, m.total, &handles);
        m.pieces = pieces;
        m.handles = handles;
      }
      m.spread = !m.inline_data && !m.direct ? spread : 0;
      c::encode(m, m.inline_data ? inline_slices : std::span<const tcpx::transport::IoSlice>(),
                &out);
      break;
    }
    case 1:
      c::encodeWriteDone({pickId(in, peer, s), pickCode(in), "fuzzed"}, &out);
      break;
    case 2: {
      c::ReadRequest m;
      m.xfer_id = pickId(in, peer, s);
      const auto descs = pickDescs(in, h, &m.total);
      m.descs = descs;
      m.accept_inline = in.u8() < 200;
      m.direct = in.u8() < 80;
      // Sometimes gated: the source as one range of a made-up allocation, the gate a word of
      // another (the engine maps neither: host memory, or a handle CUDA refuses).
      const c::DirectPiece source{0x10000, m.total, 0};
      m.gated = m.direct && m.total > 0 && in.u8() < 128;
      m.gate_value = in.u8() | 1U;
      m.gate_source = std::span<const c::DirectPiece>(&source, 1);
      m.gate_source_area = {std::string(c::kIpcHandleSize, 's'), 0x10000, m.total, {}};
      m.gate_word = {0x20000, sizeof(uint32_t), 0};
      m.gate_area = {std::string(c::kIpcHandleSize, 'g'), 0x20000, 4096, {}};
      s.read_totals[m.xfer_id] = m.total;
      c::encode(m, &out);
      break;
    }
    case 3: {
      c::ReadResponse m;
      m.xfer_id = pickId(in, peer, s);
      m.code = pickCode(in);
      m.first_chunk = first_chunk;
      m.inline_data = in.u8() < 128;
      m.status_follows = !m.inline_data && in.u8() < 100;
      std::vector<c::DirectPiece> pieces;
      std::vector<c::IpcHandle> handles;
      if (!m.inline_data && !m.status_follows && m.code == StatusCode::kOk && in.u8() < 80) {
        m.direct = true;
        auto total = s.read_totals.find(m.xfer_id);
        pieces = pickPieces(in, total != s.read_totals.end() ? total->second : 1 + in.below(4096),
                            &handles);
        m.pieces = pieces;
        m.handles = handles;
      }
      m.spread = m.code == StatusCode::kOk && !m.inline_data && !m.direct ? spread : 0;
      c::encode(m, m.inline_data ? inline_slices : std::span<const tcpx::transport::IoSlice>(),
                &out);
      break;
    }
    case 4:
      c::encodeNotification(data, &out);
      break;
    case 5:
      c::encode(c::Cancel{pickId(in, peer, s)}, &out);
      break;
    case 6:
      c::encode(c::SendRts{pickId(in, peer, s), in.below(4), 1 + in.below(256 * 1024)}, &out);
      break;
    case 7:
      c::encode(c::SendCts{pickId(in, peer, s), pickId(in, peer, s), in.u8() < 200, pickCode(in),
                           "fuzzed"},
                &out);
      break;
    case 8: {
      c::SendData m;
      m.send_id = pickId(in, peer, s);
      m.recv_id = pickId(in, peer, s);
      m.code = pickCode(in);
      m.first_chunk = first_chunk;
      m.inline_data = in.u8() < 128;
      m.status_follows = !m.inline_data && in.u8() < 100;
      m.spread = m.code == StatusCode::kOk && !m.inline_data ? spread : 0;
      c::encode(m, m.inline_data ? inline_slices : std::span<const tcpx::transport::IoSlice>(),
                &out);
      break;
    }
    case 9:
      c::encodeSendDone({pickId(in, peer, s), pickCode(in), "fuzzed"}, &out);
      break;
    case 10:
      c::encodeDataStatus({pickId(in, peer, s), pickCode(in), "fuzzed",
                           in.u8() < 128 ? c::IdSpace::kSender : c::IdSpace::kReceiver},
                          &out);
      break;
    case 11:
      c::encodePing(&out);
      break;
    case 12:
      c::encodeGoodbye("fuzzed", &out);
      break;
    case 13:
      c::encodeReadDone({pickId(in, peer, s), pickCode(in), "fuzzed"}, &out);
      break;
    case 14:
      c::encodeIpc(in.u8() < 128 ? FrameType::kIpcClose : FrameType::kIpcClosed,
                   in.u8() < 128 ? reinterpret_cast<uint64_t>(peerSource().data()) : in.u64(),
                   &out);
      break;
    case 15:
      c::encode(c::WriteQueued{pickId(in, peer, s), std::string(c::kSignalHandleSize, 'f')}, &out);
      break;
    default: {
      c::ChannelSetup m;
      m.handles.resize(1 + in.below(4));
      c::encode(m, &out);
      break;
    }
  }
  return out;
}

// Reads what the engine sent for a moment and learns its ids and announced streams.
void drain(ScriptedPeer& peer, Session& s, std::chrono::milliseconds wait) {
  namespace c = tcpx::control;
  for (;;) {
    auto frame = peer.next(wait);
    if (!frame.isOk()) return;
    const std::string_view p = frame->payload;
    switch (frame->type) {
      case FrameType::kWriteRequest: {
        c::WriteRequest m;
        if (!c::decode(p, c::DecodeLimits{}, &m).isOk()) break;
        s.engine_ids.push_back(m.xfer_id);
        if (!m.inline_data && !m.direct) s.engine_streams.emplace_back(m.total, m.spread);
        break;
      }
      case FrameType::kReadRequest: {
        c::ReadRequest m;
        if (!c::decode(p, c::DecodeLimits{}, &m).isOk()) break;
        s.engine_ids.push_back(m.xfer_id);
        s.read_totals[m.xfer_id] = m.total;  // a direct answer names ranges adding up to it
        break;
      }
      case FrameType::kReadResponse: {
        c::ReadResponse m;
        if (!c::decode(p, c::DecodeLimits{}, &m).isOk()) break;
        auto total = s.read_totals.find(m.xfer_id);
        if (m.code == StatusCode::kOk && !m.inline_data && !m.direct &&
            total != s.read_totals.end()) {
          s.engine_streams.emplace_back(total->second, m.spread);
        }
        break;
      }
      case FrameType::kSendRts: {
        c::SendRts m;
        if (!c::decode(p, &m).isOk()) break;
        s.engine_ids.push_back(m.send_id);
        s.send_sizes[m.send_id] = m.size;
        break;
      }
      case FrameType::kSendCts: {
        c::SendCts m;
        if (c::decode(p, &m).isOk()) s.engine_ids.push_back(m.recv_id);
        break;
      }
      case FrameType::kSendData: {
        c::SendData m;
        if (!c::decode(p, c::DecodeLimits{}, &m).isOk()) break;
        auto size = s.send_sizes.find(m.send_id);
        if (m.code == StatusCode::kOk && !m.inline_data && size != s.send_sizes.end()) {
          s.engine_streams.emplace_back(size->second, m.spread);
        }
        break;
      }
      default:
        break;
    }
  }
}

void enginePost(Input& in, Harness& h, Session& s, SessionOp op) {
  Region& r = h.regions[in.below(kRegions)];
  const uint64_t off = in.below(kRegionSize);
  const uint64_t len = 1 + in.below(kRegionSize - off);
  const uint64_t tag = in.below(4);
  tcpx::Result<TransferHandle> handle = tcpx::Status();
  if (op == SessionOp::kEngineRecv) {
    handle = h.engine->postRecv("fuzz", {r.id, off, len}, tag);
  } else if (op == SessionOp::kEngineSend) {
    handle = h.engine->postSend("fuzz", {r.id, off, len}, tag);
  } else {
    auto prepared = h.engine->prepareTransfer(
        op == SessionOp::kEngineWrite ? tcpx::OpKind::kWrite : tcpx::OpKind::kRead, "fuzz",
        std::vector<tcpx::LocalDesc>{{r.id, off, len}},
        std::vector<tcpx::RemoteDesc>{{s.remote_id, off, len}},
        in.u8() < 60 ? std::optional<std::string>("note") : std::nullopt);
    if (!prepared.isOk()) return;
    (void)h.engine->postTransfer(prepared.value());
    handle = prepared.value();
  }
  if (handle.isOk()) s.handles.push_back(handle.value());
}

void runStep(Input& in, ScriptedPeer& peer, Session& s, Harness& h) {
  const auto op = static_cast<SessionOp>(in.u8() % static_cast<uint8_t>(SessionOp::kCount));
  switch (op) {
    case SessionOp::kEngineWrite:
    case SessionOp::kEngineRead:
    case SessionOp::kEngineRecv:
    case SessionOp::kEngineSend:
      enginePost(in, h, s, op);
      break;
    case SessionOp::kEngineRelease:
      if (!s.handles.empty()) {
        const size_t i = in.below(s.handles.size());
        // A release waits for chunks in the transport: bounded while the peer lives (the
        // peer's own data keeps moving or its connection fails).
        (void)h.engine->releaseTransfer(s.handles[i]);
        s.handles.erase(s.handles.begin() + static_cast<std::ptrdiff_t>(i));
      }
      break;
    case SessionOp::kPeerFrame:
      (void)peer.send(buildFrame(in, peer, s, h));
      break;
    case SessionOp::kPeerRawFrame: {
      std::vector<uint8_t> frame(tcpx::control::kFrameHeaderSize);
      const std::string payload = in.bytes(512);
      const uint32_t len = static_cast<uint32_t>(payload.size());
      std::memcpy(frame.data(), &len, 4);
      frame[4] = tcpx::control::kProtocolVersion;
      frame[5] = in.u8();
      frame.insert(frame.end(), payload.begin(), payload.end());
      (void)peer.send(frame);
      break;
    }
    case SessionOp::kPeerStream:
      (void)peer.sendStream(std::string(1 + in.below(256 * 1024), '\x77'), 20ms);
      break;
    case SessionOp::kPeerUnannounced:
      (void)peer.sendUnannounced(0, 1 + in.below(64 * 1024), 20ms);
      break;
    case SessionOp::kPeerReceive:
      drain(peer, s, 2ms);
      if (!s.engine_streams.empty()) {
        const auto [total, spread] = s.engine_streams.front();
        s.engine_streams.pop_front();
        if (total > 0 && total <= (8u << 20)) (void)peer.receiveStream(total, spread, 50ms);
      }
      break;
    case SessionOp::kDrain:
      drain(peer, s, std::chrono::milliseconds(1 + in.below(5)));
      break;
    case SessionOp::kReregister: {
      Region& r = h.regions[in.below(kRegions)];
      // Deregistration waits for transfers that pin the region: bounded as for a release.
      if (!h.engine->deregisterMemory(r.id).isOk()) std::abort();
      std::memset(r.buffer->data(), kRetired, r.buffer->size());
      h.retired.push_back(std::move(r.buffer));
      registerRegion(h, r);
      break;
    }
    case SessionOp::kCount:
      break;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Harness& h = harness();
  Input in(data, size);
  ScriptedPeer::Options options;
  options.name = "fuzz";
  options.settings.channels = 2;
  options.settings.chunk_size = 64 * 1024;
  options.settings.max_descriptors = 64;
  options.settings.max_notification = 4096;
  // Direct copies in two sessions of three, one in five of those with a proof that does not
  // read back (the engine must then never read this "peer").
  // The offer names a child forked once, holding a copy of this process's memory (the cookie
  // and peerSource() at the same addresses): an offer of this process's own pid is refused, the
  // scripted peer being no engine of it (one session in seven tries that).
  static const std::string cookie(tcpx::control::kNonceSize, 'c');
  static const pid_t holder = [] {
    (void)peerSource();
    const pid_t child = fork();
    if (child == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      for (;;) pause();
    }
    return child;
  }();
  if (size % 3 != 0) {
    const pid_t pid = size % 7 == 0 ? getpid() : holder;
    options.direct = {static_cast<uint32_t>(pid), reinterpret_cast<uint64_t>(cookie.data()),
                      size % 5 == 0 ? std::string(tcpx::control::kNonceSize, 'x') : cookie};
  }
  auto connected = ScriptedPeer::connect(h.engine->connectionInfo(), options);
  if (!connected.isOk()) {  // the engine must accept a well-behaved peer
    std::fprintf(stderr, "the engine refused a well-behaved peer: %s\n",
                 connected.status().toString().c_str());
    std::abort();
  }
  std::unique_ptr<ScriptedPeer> peer = std::move(connected.value());
  Session s;
  auto remote = h.engine->loadRemoteMemory(peer->memoryDescriptor(1, 1 << 20));
  if (!remote.isOk()) std::abort();
  s.remote_id = remote->id;

  for (int step = 0; step < 48 && in.more(); ++step) runStep(in, *peer, s, h);

  // The peer goes away: the engine must notice, end every transfer and let go of the handles.
  peer.reset();
  const auto deadline = std::chrono::steady_clock::now() + 5s;
  while (h.engine->peerState("fuzz") != tcpx::PeerState::kFailed) {
    if (std::chrono::steady_clock::now() > deadline) std::abort();
    std::this_thread::sleep_for(1ms);
  }
  // removePeer runs on the progress thread after the failure's cleanup (the comms' helper
  // threads joined): nothing of this input still runs when libFuzzer looks for leaks.
  if (!h.engine->removePeer("fuzz").isOk()) std::abort();
  for (TransferHandle handle : s.handles) {
    const tcpx::Status st = h.engine->waitTransfer(handle, 5s);
    if (st.code() == StatusCode::kInProgress) std::abort();
    (void)h.engine->releaseTransfer(handle);
  }
  (void)h.engine->unloadRemoteMemory(remote.value());
  (void)h.engine->takeNotifications();
  for (const Region& r : h.regions) {
    if (!r.buffer->guardsIntact()) std::abort();
  }
  for (const auto& b : h.retired) {
    if (!b->guardsIntact() || !b->allRetired()) std::abort();
  }
  // Each input checks the memory deregistered during it and the few before.
  if (h.retired.size() > 8) h.retired.erase(h.retired.begin(), h.retired.end() - 4);
  return 0;
}
