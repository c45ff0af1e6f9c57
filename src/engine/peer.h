// Everything the engine keeps about one peer engine. Owned and mutated by the progress thread;
// API threads read only `state` (atomic) and, under the engine's peer-map lock, name and uuid.
//
// What a peer can make this engine hold is bounded, each bound counted where the memory is
// taken (the constants below; README, "Memory bound per peer"): past one, the request is
// refused with RESOURCE_EXHAUSTED, or the peer, which broke a limit it cannot reach by
// following the protocol, is failed.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <sys/types.h>
#include <unordered_map>
#include <unordered_set>
#include <variant>
#include <vector>

#include <tcpx_p2p/types.h>

#include "common/cross_memory.h"
#include "common/rate_limit.h"
#include "control/blobs.h"
#include "control/control_connection.h"
#include "control/negotiation.h"
#include "engine/channel_window.h"
#include "engine/peer_counters.h"
#include "engine/transfer.h"
#include "gpu/gpu.h"
#include "transport/transport.h"

namespace tcpx::engine {

using Clock = std::chrono::steady_clock;

// Operations of the peer served at once (a peer that follows the protocol has at most
// max_inflight_per_peer <= 4096 announced): past it the peer is failed.
constexpr size_t kMaxTargetOpsPerPeer = 8192;
// Descriptors of those operations (about 32 bytes of segment list each): past it a request is
// refused.
constexpr size_t kMaxServedDescriptors = size_t{1} << 20;
// Sends announced that no recv matched yet: past it a send is refused.
constexpr size_t kMaxUnexpectedSends = 1024;
// Frames queued for a peer that does not read its control connection: past it the peer is failed.
constexpr size_t kMaxControlBacklog = size_t{64} << 20;
// Inline WRITE bytes of the peer waiting for a free inline slot: past it a WRITE is refused.
constexpr size_t kMaxHeldInlineBytes = size_t{16} << 20;
// Notifications of the peer the application has not taken yet: past either the peer is failed.
constexpr size_t kMaxPendingNotifications = 65536;
constexpr size_t kMaxPendingNotificationBytes = size_t{64} << 20;

// Small transfers travel inside control frames (inline_threshold). When our side of one is GPU
// memory, its bytes pass through a pinned slot of Peer::inline_staging by asynchronous copies,
// and the step that needs them waits here: the frame that carries them, or the completion.
constexpr int kInlineSlots = 16;
// The largest inline payload a peer may send.
constexpr size_t kInlineSlotBytes = size_t{64} * 1024;
// Above kAlwaysInlineBytes a transfer travels inline only while at most kInlineInFlight requests
// to its peer are in flight (this one included). With more, inline bytes queue behind each other
// on the one control connection and pass through the one progress thread, while the data
// channels carry them side by side: on the H200 box, 16 WRITEs of 64 KiB in flight moved 0.28 of
// raw TCP's rate inline and 0.50 over the channels; one at a time, inline is 2-3 times faster.
// Up to 16 KiB both ways measured the same.
constexpr uint64_t kAlwaysInlineBytes = uint64_t{16} * 1024;
constexpr uint64_t kInlineInFlight = 4;

struct InlineCopy {
  enum class Kind : uint8_t {
    kWriteGather,   // our WRITE's source -> slot; then the WRITE_REQUEST carrying it
    kWriteScatter,  // a peer's inline WRITE: slot -> our memory; then WRITE_DONE
    kReadGather,    // a peer's READ of our memory -> slot; then the READ_RESPONSE carrying it
    kReadScatter,   // the inline READ_RESPONSE: slot -> our READ's destination; then completion
    kSendGather,    // our send's buffer -> slot; then the SEND_DATA carrying it
    kRecvScatter,   // the inline SEND_DATA: slot -> our recv's buffer; then SEND_DONE
  };
  Kind kind = Kind::kWriteGather;
  uint64_t id = 0;       // our wire id (ours: WRITE, READ, send, recv) or the peer's (target side)
  uint64_t peer_id = 0;  // kSendGather: the peer's recv id
  int slot = -1;         // -1: a scatter waiting for a free slot, its bytes in `held`
  std::vector<uint8_t> held;
  Status failure;  // no slot buffer for the bytes (copy failures come from the slot's ready())
  Clock::time_point started;  // polled soon at first, then like staging
};

// Position of a channel in its direction's stream sequence.
struct ChannelCursor {
  static constexpr uint32_t kNotStarted = UINT32_MAX;
  uint64_t stream_seq = 0;       // which stream (see Direction::front_seq)
  uint32_t chunk = kNotStarted;  // next chunk index of that stream for this channel
};

// Where the bytes of a receive channel's requests land.
enum class RecvPath : uint8_t {
  kUnresolved,  // decided when the channel posts its first receive (DataPath::recvPath)
  kPosted,      // in the posted buffer: the user's memory (socket transport) or a registered
                // staging slot, one per outstanding receive (plugin transports)
  kBouncePool,  // in an UNPACK plugin's bounce pool as fragments, unpacked by the engine
};

// One direction of data between us and the peer: send channels (out) or receive channels (in).
struct Direction {
  bool sending = false;
  std::vector<void*> comms;  // transport::SendComm* or RecvComm*, one per channel (null until up)
  std::vector<ChannelWindow> windows;
  std::vector<ChannelCursor> cursors;
  // Staging for chunks that touch GPU memory, per channel, created on first use.
  std::vector<std::unique_ptr<gpu::ChannelStaging>> staging;
  std::vector<uint32_t> staging_free;  // bit i set: staging slot i of that channel is free
  // Plugin transports only: per channel, the handles of registered staging slots, the buffer
  // receives are posted into on an UNPACK transport (its bytes land in the bounce pool), the
  // receives posted so far (metadata slot = count mod 16) and the queue of unpack copies.
  std::vector<std::array<transport::MemHandle*, ChannelWindow::kCapacity>> slot_handles;
  std::vector<std::vector<std::pair<int, transport::MemHandle*>>> device_handles;  // by GPU
  std::vector<void*> anchors;
  std::vector<int> anchor_devices;
  std::vector<transport::MemHandle*> anchor_handles;
  std::vector<uint64_t> recv_posted;
  std::vector<std::unique_ptr<gpu::CopyQueue>> unpack_queues;
  std::vector<RecvPath> recv_paths;             // receive side, per channel
  std::deque<std::unique_ptr<Stream>> streams;  // announcement order
  uint64_t front_seq = 0;                       // sequence number of streams.front()
  uint64_t next_chunk = 0;                      // global index of the next announced chunk

  [[nodiscard]] uint32_t channels() const { return static_cast<uint32_t>(comms.size()); }
  // Whether a channel has requests in the transport (they complete with an event). Every chunk
  // in a window belongs to a stream that has not retired, so a direction without streams has
  // none.
  [[nodiscard]] bool anyInTransport() const {
    return !streams.empty() && std::any_of(windows.begin(), windows.end(),
                                           [](const auto& w) { return w.inTransport() > 0; });
  }
  void reset(bool is_send, uint32_t nchannels, uint32_t window) {
    sending = is_send;
    comms.assign(nchannels, nullptr);
    windows.assign(nchannels, ChannelWindow(window));
    cursors.assign(nchannels, ChannelCursor{});
    staging.clear();
    staging.resize(nchannels);
    staging_free.assign(nchannels, 0);
    slot_handles.assign(nchannels, {});
    device_handles.assign(nchannels, {});
    anchors.assign(nchannels, nullptr);
    anchor_devices.assign(nchannels, -1);
    anchor_handles.assign(nchannels, nullptr);
    recv_posted.assign(nchannels, 0);
    unpack_queues.clear();
    unpack_queues.resize(nchannels);
    recv_paths.assign(nchannels, RecvPath::kUnresolved);
    streams.clear();
    front_seq = 0;
    next_chunk = 0;
  }
};

// Which transport moves a peer's data (EngineCore::netPathFor): chosen for each control
// connection in the handshake, which both ends must agree on.
enum class NetPath : uint8_t {
  kTransport,        // the engine's configured transport
  kSameHostSockets,  // the socket transport: a peer on this host of a tcpx engine (same_host)
};

// Direct copies with a peer process on this host (same_host_copy), agreed in the handshake of the
// current control connection (both engines offered). The process whose memory a transfer writes
// reads the other's (common/cross_memory.h): our READ reads the peer, its WRITE is read by it.
struct DirectLink {
  enum class Reach : uint8_t {
    kUnprobed,    // not tried yet: the first read checks the peer's cookie
    kReadable,    // the cookie read back: the pid is the peer and the kernel lets us read it
    kUnreadable,  // the kernel refused, or the pid is another process: data channels only
  };
  // The offered process, pinned down when the offer was checked (set whenever the link exists):
  // reads check through it that its pid still names that process.
  std::optional<ReadableProcess> process;
  uint64_t cookie_addr = 0;
  std::string cookie;
  // The peer is another engine of this process (found in the process's list of engines): its
  // ranges are checked against its registrations before they are read.
  bool same_process = false;
  Reach we_read_peer = Reach::kUnprobed;
  std::string unreadable_why;  // kUnreadable: what the probe said
  // False once the peer answered a direct WRITE with NOT_SUPPORTED (it cannot read our host
  // memory, or cannot map our GPU memory): later such WRITEs take the data channels.
  bool peer_reads_us = true;
  bool peer_maps_us = true;
  // False once a GPU allocation of the peer could not be mapped here: later READs of its GPU
  // memory take the data channels.
  bool we_map_peer = true;
  // The peer's GPU allocations mapped here (CUDA IPC), by their base in the peer's process; a
  // run copying from one holds it too. `closing`: mappings to let go while a run still holds
  // them: those the peer asked us to unmap (IPC_CLOSE; IPC_CLOSED goes once the last run let go,
  // `answer`), and those an allocation at the same address replaced. At most
  // ipc_mappings_per_peer are kept: past it the least recently used one no run holds goes (the
  // peer's export stays, so it is mapped again when named again).
  struct Mapped {
    std::string handle;
    std::shared_ptr<gpu::IpcMapping> mapping;
    uint64_t last_use = 0;  // `uses` when a request last named it
  };
  uint64_t uses = 0;  // requests that named mappings, counted
  struct Closing {
    uint64_t base = 0;
    std::shared_ptr<gpu::IpcMapping> mapping;
    bool answer = false;
  };
  std::unordered_map<uint64_t, Mapped> mappings;
  std::vector<Closing> closing;
  // The peer's completion signals (WRITE_QUEUED) opened here, by handle: the peer reuses a few,
  // so each is opened once. At most kMaxSignals (past it those no WRITE polls go); one that
  // cannot be read is dropped; `signals_open` false once one could not be opened: from then on
  // our direct WRITEs ask for none and end with WRITE_DONE alone.
  static constexpr size_t kMaxSignals = 256;
  std::unordered_map<std::string, std::shared_ptr<gpu::PeerSignal>> signals;
  bool signals_open = true;
  // False once a gated READ could not be set up here or the peer refused one with
  // NOT_SUPPORTED: later READs wait for its answer before they copy.
  bool gates_ok = true;
  // The peer's read-gate areas mapped here (one per GPU it reads into), by their base there:
  // kept apart from `mappings` (not the application's memory, never closed by the peer, not
  // under ipc_mappings_per_peer), at most kMaxGateAreas.
  static constexpr size_t kMaxGateAreas = 16;
  struct GateArea {
    std::string handle;
    std::shared_ptr<gpu::IpcMapping> mapping;
  };
  std::unordered_map<uint64_t, GateArea> gate_areas;
};

// A direct operation the peer must finish within data_timeout_ms (direct_path.cc): our direct
// WRITE waiting for WRITE_DONE (role kOurs), or its direct READ of our memory waiting for
// READ_DONE (kPeers). A peer past it stalled while its control connection lives, as a data
// channel can: it is failed with TIMEOUT instead of holding our memory forever.
struct DirectDeadline {
  Clock::time_point due;
  OpRole role = OpRole::kOurs;
  uint64_t id = 0;
};

// Items waiting for the peer to be ready (or for room under max_inflight_per_peer), kept in post
// order so that a notification posted after a transfer is not sent before it.
using WaitingItem = std::variant<std::shared_ptr<Transfer>, std::string>;

// Who reads a ready peer's control connection. The progress thread does, its epoll set watching
// the socket for input, except while an application thread polls a small transfer of ours to the
// peer (EngineCore::takeRepliesFromCaller): the reads are then lent to that thread and the
// socket's input wakes nobody, so a reply the caller takes itself costs no wake-up of the
// progress thread (on a box with few cores that wake-up takes a core from the polling caller or
// from the peer). Errors of the socket and the peer's end of it (EPOLLRDHUP) wake the progress
// thread either way. Moves: kLoop -> kCaller (a small transfer, the peer's one in flight of ours,
// is posted from the caller's thread or polled); kCaller -> kLoop (that transfer ended, a frame or
// a failure the caller leaves to the progress thread, another transfer to the peer, the caller
// blocks in waitTransfer, no poll for kCallerReadLease, a new control connection). Changed under
// the engine's round (EngineCore::round_mu_).
enum class ControlReader : uint8_t {
  kLoop,    // the progress thread: input registered with epoll
  kCaller,  // a polling application thread: only the peer's hang-up registered
};

struct Peer {
  uint64_t serial = 0;  // epoll key; never reused
  std::string name;
  std::string uuid;  // raw 16 bytes; empty until known
  std::optional<control::ConnInfo> info;
  std::atomic<PeerState> state{PeerState::kIdle};
  Status failure;  // why the peer is in kFailed
  // Read by API threads under peers_mu_; transfers prepared for this instance hold them too.
  std::shared_ptr<PeerCounters> counters = std::make_shared<PeerCounters>();

  // ---- Control connection ----
  std::unique_ptr<control::ControlConnection> control;  // established (after HELLO/HELLO_ACK)
  bool control_wants_out = false;                       // EPOLLOUT registered
  ControlReader control_reader = ControlReader::kLoop;
  Clock::time_point caller_polled_at{};  // kCaller: the lending caller's latest poll
  enum class Outgoing : uint8_t { kNone, kTcpConnecting, kHelloSent };
  std::unique_ptr<control::ControlConnection> outgoing;  // our connect attempt
  Outgoing outgoing_stage = Outgoing::kNone;
  std::string hello_nonce;   // our HELLO's nonce (peer authentication)
  bool peer_proved = false;  // the acceptor answered our HELLO with a valid AUTH_CHALLENGE
  Clock::time_point setup_deadline{};
  Clock::time_point retry_at{};  // after a DUPLICATE answer, when to try again
  bool retry_pending = false;
  std::optional<Clock::time_point> refused_since;  // connection attempts refused since then

  // ---- Agreed in the handshake (control/negotiation.h) ----
  control::AgreedSettings agreed;
  NetPath hello_path = NetPath::kTransport;  // the path our HELLO offered (connector)
  // The path of the current data channels (set when they are set up; written under peers_mu_,
  // read by API threads for PeerStats), and its transport's name (empty before a connection).
  NetPath net_path = NetPath::kTransport;
  std::string net_transport;
  std::optional<DirectLink> direct;  // set for the connection when both offered direct copies
  std::deque<DirectDeadline> direct_deadlines;  // oldest first (deadlines only grow)
  // When a direct operation of the peer last finished (or the first of a quiet spell began): a
  // deadline passes only if none finished for data_timeout_ms, as the channels' watchdog counts
  // progress, not the age of one request that may wait behind others.
  Clock::time_point direct_progress_at{};
  // Our copy lane for the peer (LocalCopier) and the order of its local runs: a new one after
  // each failure of the peer, so that a copy still held by a connection that failed (a page of
  // the peer's that never comes in) holds nothing of the next connection's.
  uint64_t copy_lane = 0;
  // Our GPU allocations (by base) whose IPC handle went to the peer on this connection: it may
  // have mapped them, so freeing one waits for its IPC_CLOSED (EngineCore::unexportIpc).
  std::unordered_set<uint64_t> ipc_sent;
  // agreed.peer_max_notification for API threads (0 until the first handshake).
  std::atomic<uint64_t> notification_limit{0};

  // ---- Data channel set-up ----
  // Where one side of a channel's set-up stands in the transport: what teardown must finish
  // (SetupDrain) before it closes anything.
  enum class SetupStage : uint8_t {
    kNotAsked,  // accept()/connect() not called yet
    kPending,   // called, no comm yet: the transport is working on it
    kDone,      // the comm is up (an accepted channel's listen comm is closed)
  };
  std::vector<transport::ListenComm*> listens;
  std::vector<transport::ConnectHandle> listen_handles;  // what listen() wrote, per channel
  std::vector<SetupStage> accept_stages;
  std::vector<transport::ConnectHandle> remote_handles;
  std::vector<SetupStage> connect_stages;
  bool have_remote_handles = false;
  Direction out;
  Direction in;
  // When the data-path watchdog must look at this peer's channels next (DataPath::checkStalls).
  Clock::time_point stall_check_at = Clock::time_point::max();

  // ---- Transfers ----
  std::unordered_map<uint64_t, std::shared_ptr<Transfer>> initiated;  // ours, by wire id
  std::deque<WaitingItem> waiting;
  uint32_t announced = 0;  // our transfers announced and not finished (<= max_inflight_per_peer)
  // Our direct WRITEs that ended when the target's copy signal was reached: WRITE_DONE is still
  // due for each, and each stays counted in `announced` until it comes (the target holds the
  // operation until then).
  std::unordered_set<uint64_t> landed_writes;
  // Our gated READs (direct_path.cc) whose READ_RESPONSE has not come: their local runs own
  // them, so the answer is matched here instead of among `initiated`.
  std::unordered_set<uint64_t> gated_reads;
  std::unordered_map<uint64_t, std::unique_ptr<TargetOp>> target_ops;  // theirs, by their id
  size_t served_descriptors = 0;  // descriptors of target_ops (kMaxServedDescriptors)
  size_t held_inline_bytes = 0;   // held scatter bytes (kMaxHeldInlineBytes)
  RateLimit refusal_log{5};       // warnings about the peer's refused requests, per second
  // Our recvs matched to the peer's sends, by the peer's send id (the frames about a matched
  // send name it by that id).
  std::unordered_map<uint64_t, std::shared_ptr<Transfer>> matched_sends;
  // The highest id the peer announced an operation with (WRITE_REQUEST, READ_REQUEST,
  // SEND_RTS) on this connection: announcements must go above it, and a CANCEL above it names
  // nothing the peer ever started.
  uint64_t last_peer_id = 0;
  std::unordered_map<uint64_t, std::deque<std::shared_ptr<Transfer>>> posted_recvs;  // by tag
  std::unordered_map<uint64_t, std::deque<UnexpectedSend>> unexpected;               // by tag
  size_t unexpected_count = 0;
  // This engine's own peer only (local_path.cc): sends and recvs to itself waiting for their
  // counterpart, by tag, oldest first. Never in `initiated`: no frame concerns them.
  std::unordered_map<uint64_t, std::deque<std::shared_ptr<Transfer>>> local_sends;
  std::unordered_map<uint64_t, std::deque<std::shared_ptr<Transfer>>> local_recvs;
  std::vector<std::shared_ptr<Waiter>> connect_waiters;

  // ---- Inline transfers with GPU memory on our side ----
  std::unique_ptr<gpu::ChannelStaging> inline_staging;  // kInlineSlots slots, allocated on use
  uint32_t inline_free = 0;                             // bit i set: slot i is free
  std::deque<InlineCopy> inline_copies;                 // started (or waiting for a slot)

  // Whether either direction carries a stream: without one, every channel window is empty and
  // the data path has nothing to drive or watch.
  [[nodiscard]] bool hasStreams() const { return !out.streams.empty() || !in.streams.empty(); }
  // When the control connection owes the peer a keepalive: agreed.keepalive_ms after the last
  // bytes left. None while it holds unsent frames: those are its sign of life once the peer
  // reads again, and a keepalive queued behind them would leave no sooner.
  [[nodiscard]] std::optional<Clock::time_point> keepaliveDue() const {
    if (!control || control->wantsWrite()) return std::nullopt;
    return control->lastSend() + std::chrono::milliseconds(agreed.keepalive_ms);
  }
};

}  // namespace tcpx::engine
