// The engine behind the public API.
//
// Threads: API calls run on the caller's thread and hand work to one progress thread through a
// command queue (woken by an eventfd). The progress thread owns every peer, connection, channel
// and stream; it blocks in epoll when nothing is in flight and, with a transport that signals
// completions on a file descriptor (the socket transport), also while transfers run.
//
// Source layout: engine_core.cc (lifecycle, API entry points, progress loop), peer_setup.cc
// (control connections, handshake, data-channel set-up, keepalive, failure), transfer_protocol.cc
// (initiator and target handling of every frame), data_path.cc (chunks over channel windows:
// where chunks are scheduled, tested and receives consumed).
#pragma once

#include <array>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <sys/epoll.h>
#include <thread>
#include <unordered_map>
#include <vector>

#include <tcpx_p2p/config.h>
#include <tcpx_p2p/status.h>
#include <tcpx_p2p/types.h>

#include "common/net.h"
#include "config/settings.h"
#include "control/blobs.h"
#include "control/control_connection.h"
#include "engine/data_path.h"
#include "engine/ipc_exports.h"
#include "engine/local_copier.h"
#include "engine/memory_registry.h"
#include "engine/peer.h"
#include "engine/retiring_channels.h"
#include "engine/setup_drain.h"
#include "engine/transfer.h"
#include "gpu/gpu.h"
#include "transport/plugin/net_abi.h"
#include "transport/socket/io_pool.h"
#include "transport/socket/socket_transport.h"
#include "transport/transport.h"

namespace tcpx::engine {

// The status of a transfer the peer refused (its answer's code and message), naming the peer.
Status refused(const Peer& peer, const char* what, StatusCode code, const std::string& message);

class EngineCore final : private DataPathEvents {
 public:
  static Result<std::unique_ptr<EngineCore>> create(const Config& config);
  ~EngineCore();
  EngineCore(const EngineCore&) = delete;
  EngineCore& operator=(const EngineCore&) = delete;

  // ---- API entry points (any thread) ----
  [[nodiscard]] const std::string& name() const { return name_; }
  [[nodiscard]] const std::string& uuidHex() const { return uuid_hex_; }
  [[nodiscard]] std::string connectionInfo() const;
  Status addPeer(const std::string& name, std::string_view blob);
  Status removePeer(const std::string& name);
  Status connect(const std::string& name);
  Status startConnecting(const std::string& name);
  [[nodiscard]] Result<PeerStats> peerStats(const std::string& name) const;
  [[nodiscard]] std::vector<std::string> peerNames() const;
  [[nodiscard]] PeerState peerState(const std::string& name) const;

  Result<MemoryId> registerMemory(void* addr, size_t length, MemoryKind kind, int device);
  Status deregisterMemory(MemoryId id);
  [[nodiscard]] Result<std::string> memoryDescriptor(MemoryId id) const;
  Result<RemoteMemory> loadRemoteMemory(std::string_view blob);
  Status unloadRemoteMemory(const RemoteMemory& remote);

  Result<TransferHandle> prepareTransfer(OpKind op, const std::string& peer,
                                         std::span<const LocalDesc> local,
                                         std::span<const RemoteDesc> remote,
                                         std::optional<std::string> notification);
  Status postTransfer(TransferHandle handle);
  // An application polling a small host-memory READ or WRITE may take its reply itself
  // (takeRepliesFromCaller), hence not const.
  [[nodiscard]] Status checkTransfer(TransferHandle handle);
  Status waitTransfer(TransferHandle handle, std::chrono::milliseconds timeout);
  Status releaseTransfer(TransferHandle handle);
  Result<TransferHandle> postTwoSided(XferKind kind, const std::string& peer,
                                      const LocalDesc& buffer, uint64_t tag);
  Status sendNotification(const std::string& peer, std::string_view message);
  std::vector<Notification> takeNotifications();

 private:
  struct Command {
    enum class Kind : uint8_t {
      kPost,
      kCancel,
      kAddPeer,
      kRemovePeer,
      kConnect,
      kNotify,
      kUnexport,  // `base`: a GPU allocation is about to be freed (unexportIpc)
    };
    Kind kind = Kind::kPost;
    std::shared_ptr<Transfer> transfer;
    std::string peer;
    std::string text;
    std::optional<control::ConnInfo> info;
    std::shared_ptr<Waiter> waiter;
    uint64_t base = 0;
  };

  struct Incoming {
    std::unique_ptr<control::ControlConnection> conn;
    Clock::time_point deadline;
    // With auth_secret: the HELLO, kept until the connector's AUTH_PROOF checks out, and our nonce.
    std::optional<control::Hello> hello;
    std::string nonce;
  };

  struct RemoteEntry {
    RemoteMemory info;
    std::string owner_raw;  // 16 raw bytes
  };

  explicit EngineCore(config::Settings settings);
  Status start();
  Status createTransport();
  [[nodiscard]] transport::SocketTransportOptions socketOptions() const;
  [[nodiscard]] FollowLimits followLimits() const {
    return {settings_.landed_copy_max, settings_.followed_gather_max};
  }
  // The data path of peers on this host that must not use the configured transport: the socket
  // transport, made when the first such peer connects (progress thread).
  void ensureSameHostSockets();
  // The path a peer on `peer_host` (its connection info's host identity) takes (same_host).
  [[nodiscard]] NetPath netPathFor(const std::string& peer_host) const;
  [[nodiscard]] const char* transportName(NetPath path) const;
  [[nodiscard]] transport::Transport& transportOf(const Peer& peer) const;
  [[nodiscard]] DataPath& dataPathOf(const Peer& peer) const;
  [[nodiscard]] SetupDrain& setupDrainOf(const Peer& peer) const;
  [[nodiscard]] int netDeviceFor(const Peer& peer, uint32_t channel) const;

  // ---- Command queue (engine_core.cc) ----
  void submit(Command command);
  // The short path of a small host-memory READ or WRITE: while the progress thread waits for
  // events (round_mu_ free), no command is queued ahead and the peer is ready with nothing
  // waiting, the posting thread starts the transfer and writes its request frame itself, so the
  // frame does not wait for the progress thread to wake. False: nothing was done, the post takes
  // the command queue.
  bool postFromCaller(std::shared_ptr<Transfer>& t);
  // The other half of that path, for a caller polling such a transfer (checkTransfer): while the
  // progress thread waits for events, the caller reads the peer's control connection and handles
  // the replies that end small host-memory transfers of ours (WRITE_DONE, an inline
  // READ_RESPONSE), so the reply does not wait for the progress thread to wake. It stops at any
  // other frame and leaves it, with any other work the replies make, to the progress thread,
  // which it wakes then: no peer is failed, no GPU or data-channel work done on its thread.
  void takeRepliesFromCaller(Transfer& t);
  // A thread about to block in waitTransfer for `t`, whose post or poll took its peer's reads,
  // or (`t` null) one taking notifications: the reads (of every peer) go back to the progress
  // thread.
  void giveBackReads(const Transfer* t);
  // Whether a caller polling `t` takes its reply itself (small host-memory READ or WRITE).
  [[nodiscard]] bool callerTakesReply(const Transfer& t) const;
  // Control reads lent to the caller of `t`, which posted or polls it (ControlReader): the
  // socket's input wakes nobody until they come back; lending again renews the lease. Under the
  // round; the progress thread's wait is bounded by the lease (lending wakes it if it was not).
  void lendControlReads(Peer* peer, Transfer& t);
  void reclaimControlReads(Peer* peer);
  // The progress thread's look, each round, at a peer whose reads are lent: they come back when
  // the caller has not polled for kCallerReadLease, when the peer has other than the caller's
  // one transfer of ours in flight or is no longer ready, or on `reclaim_all` (a thread blocks
  // in waitTransfer: no poll of its takes its reply).
  void reviewLentReads(Peer* peer, Clock::time_point now, bool reclaim_all);
  // Registers the control socket for what its reader and its unsent frames need.
  void armControl(Peer* peer);
  // The engine's round for an application thread on those short paths: owned only if the
  // progress thread does not want it, holds nothing, and the engine is not stopping.
  std::unique_lock<std::mutex> roundForCaller();
  // The ready network peer `t` was prepared for (the same instance, connected; not this engine
  // itself), or null. Under the round.
  Peer* readyNetworkPeer(const Transfer& t);
  // Whether the caller may handle this whole buffered frame (see takeRepliesFromCaller): a reply
  // that the handler will take without failing the peer or starting other work.
  bool isCallersReply(Peer* peer, const control::FrameHeader& header, std::string_view payload);
  Status submitAndWait(Command command);
  void processCommands();
  std::shared_ptr<Transfer> findHandle(TransferHandle handle) const;
  // Names the peer of a new transfer: its name, instance and counters (NOT_FOUND if unknown).
  Status bindPeer(const std::string& peer_name, Transfer* t) const;
  std::shared_ptr<Peer> findPeerLocked(const std::string& name) const;
  void notifyDone();

  // ---- Progress loop (engine_core.cc) ----
  void run();
  std::chrono::microseconds computeTimeout(Clock::time_point now);
  // computeTimeout without the lease of lent reads.
  std::chrono::microseconds computeWait(Clock::time_point now);
  // Whether a data channel of any peer has requests in the transport (serve_poll_us yields then).
  [[nodiscard]] bool channelsInTransport() const;
  // Whether copies of this host run for our transfers: ours on a copy lane, or a same-host
  // peer's of our memory (a direct operation waiting for the peer's copy).
  [[nodiscard]] bool hostCopiesRunning() const;
  int waitForEvents(::epoll_event* events, int max_events, std::chrono::microseconds timeout);
  void dispatchEvent(uint64_t key, uint32_t events);

  // ---- Peers and connections (peer_setup.cc) ----
  Peer* peerByName(const std::string& name);
  Peer* peerByUuid(const std::string& uuid);
  Peer* createPeer(const std::string& name);
  void renamePeer(Peer* peer, const std::string& name);
  void handleAddPeer(Command& cmd);
  void handleRemovePeer(Command& cmd);
  void handleConnect(Command& cmd);
  void ensureConnecting(Peer* peer);
  // Schedules the next connection attempt after a failed one (`err`: its errno, 0 if none); a
  // peer whose address has refused connections for kRefusedGiveUp fails instead.
  void retryOutgoing(Peer* peer, int err, const std::string& why);
  void startOutgoing(Peer* peer);
  void onOutgoingEvent(Peer* peer, uint32_t events);
  void acceptControlConnections();
  void onIncomingEvent(uint64_t id, uint32_t events);
  void handleHello(std::unique_ptr<control::ControlConnection> conn, const control::Hello& hello);
  // `path`: the transport both ends agreed on in the handshake.
  void adoptControl(Peer* peer, std::unique_ptr<control::ControlConnection> conn,
                    const control::AgreedSettings& agreed, NetPath path);
  // Our values of the settings the handshake exchanges.
  [[nodiscard]] control::WireSettings wireSettings() const;
  void beginDataSetup(Peer* peer);
  void driveSetup(Peer* peer);
  void onChannelSetup(Peer* peer, std::string_view payload);
  void onControlEvent(Peer* peer, uint32_t events);
  void processFrames(Peer* peer);
  void flushControl(Peer* peer);
  // False (and the peer failed) once more than kMaxControlBacklog waits to be sent to it.
  bool controlBacklogWithinBound(Peer* peer);
  // Ends every transfer with the peer; `orderly` (goodbye, shutdown, removal) logs at info level
  // when nothing was in flight.
  void failPeer(Peer* peer, const Status& why, bool orderly = false);
  // Takes the peer's data channels (and, with `with_inline`, its inline staging) away from it:
  // they close at once when none of their copies still runs; otherwise they wait in retiring_
  // and the record is returned (failPeer then adds what must wait for the copies too).
  RetiringChannels* closeDataChannels(Peer* peer, bool with_inline = false);
  // Closes retiring channels whose copies are done, completing what they held.
  void driveRetiring();
  // Closes the comms of channels whose copies are done, frees their buffers (on the reclaimer's
  // thread), unpins the regions and completes the transfers that waited for them.
  void finishRetiring(RetiringChannels& retiring);
  void handleTimers(Clock::time_point now);
  // The acceptor's half of peer authentication, after a valid HELLO (or its AUTH_PROOF).
  void onIncomingHello(uint64_t id, control::Hello hello);
  void onIncomingProof(uint64_t id, std::string_view payload);
  // The connector's half: check the acceptor's proof and answer with ours.
  void onAuthChallenge(Peer* peer, std::string_view payload);
  void sendHelloAck(control::ControlConnection* conn, control::HelloResult result,
                    const std::string& reason, const control::DirectOffer& direct = {});
  void epollAdd(int fd, uint64_t key, uint32_t events);
  void epollMod(int fd, uint64_t key, uint32_t events);
  void epollDel(int fd);

  // ---- Transfers (transfer_protocol.cc) ----
  void handlePost(Command& cmd);
  void handleCancel(Command& cmd);
  void handleNotify(Command& cmd);
  void pumpWaiting(Peer* peer);

  // Makes the loop poll instead of sleeping until at least `span` from now, where polling pays
  // (LocalCopier::pollingPays: cores to spare); a shorter span never cuts a longer one short.
  // For answers and copy completions due within microseconds, which a blocking wait would take
  // only after a wake-up that costs more than they do.
  void pollFor(std::chrono::microseconds span);
  // The window of a copy of ours just queued or just done, or a direct WRITE of ours just
  // answered: the copy's end, or the caller's next post, is due within it.
  static constexpr auto kShortPoll = std::chrono::microseconds(50);

  // ---- Same-engine transfers (local_path.cc) ----
  // A direct operation of `peer_serial` waiting for GPU fences (kFencing): our WRITE or the
  // peer's READ, by wire id.
  struct DirectFence {
    uint64_t peer_serial = 0;
    OpRole role = OpRole::kOurs;
    uint64_t id = 0;
  };
  // Host-only copies up to this size run on the progress thread (a few microseconds): handing
  // them to the copy thread would cost more than the copy.
  static constexpr uint64_t kImmediateCopyBytes = uint64_t{256} * 1024;
  // How a transfer to this engine itself moves its bytes.
  enum class LocalMode : uint8_t {
    kNow,         // host memory only, small: memmove on the progress thread when it starts
    kStream,      // device memory of one GPU only: that GPU's local copy queue, polled
    kCopyThread,  // anything else (host and GPU, several GPUs, large host copies)
  };
  enum class LocalRunState : uint8_t {
    kWaiting,  // behind runs it must not overtake; nothing of it started
    kCopying,  // its copies run on the stream or the copy thread
    kCopied,   // its copies are done (`result`); it completes once it is the oldest run
  };
  // Where the gate of our gated READ stands (LocalRun::Gate).
  enum class GateState : uint8_t {
    kAwaiting,            // request sent, no answer yet; the gate is the target's to open
    kOpenedAwaiting,      // no answer yet, opened here (released, or the peer failed)
    kAnswered,            // the target took it and writes the gate
    kAnsweredOpenedHere,  // ... and we opened it too (released, or the peer failed)
    kRefused,             // the target refused (it writes nothing); opened here
  };
  // A transfer to this engine itself and what completes with it.
  struct LocalRun {
    std::shared_ptr<LocalCopier::Job> job;  // its copies and fences (the copy thread's job)
    LocalMode mode = LocalMode::kNow;
    LocalRunState state = LocalRunState::kWaiting;
    uint64_t ticket = 0;  // kStream: the copy queue's ticket of its last copy
    Clock::time_point started;
    Status result;
    uint64_t peer_serial = 0;
    uint64_t lane = 0;  // its peer's copy_lane when queued: runs of one lane keep their order
    // Completed with the copy: none (a notification behind other runs), one (READ, WRITE) or a
    // matched send and recv.
    std::vector<std::shared_ptr<Transfer>> runs;
    std::vector<MemoryId> target_pins;        // the regions a READ or WRITE names as its target
    gpu::Fences target_fences;                // target GPUs the initiator's fences do not cover
    std::optional<std::string> notification;  // delivered once the bytes are in place
    Status failure;  // set when abandoned (release, peer failure): the run's outcome
    // Whom the run completes: transfers to this engine itself (`runs`), the peer's direct WRITE
    // into our memory (WRITE_DONE for `wire_id`), or our direct READ (`runs`, then READ_DONE).
    enum class Owner : uint8_t { kSelf, kPeerWrite, kOurRead };
    Owner owner = Owner::kSelf;
    uint64_t wire_id = 0;
    bool peer_lost = false;  // the peer failed while the copies ran: no frame, no accounting
    // kPeerWrite that asked for a signal, of a peer in another process: once the copy is on a
    // GPU copy queue, the peer hears WRITE_QUEUED with the queue's signal (signalQueuedWrite).
    bool signal_peer = false;
    std::vector<std::shared_ptr<gpu::IpcMapping>> mappings;  // peer memory its copies read
    // kOurRead queued before the target answered (gated): its copy waits for `gate` (see
    // startGatedRead). It completes once the copy landed and the answer came, or the peer is
    // lost: a READ_DONE must not reach a target that refused, and a refusal is only known from
    // the answer.
    struct Gate {
      gpu::ReadGates::Slot slot;
      GateState state = GateState::kAwaiting;
      Status refusal;  // kRefused: the target's answer
    };
    std::optional<Gate> gate;
  };
  // The fences of every GPU the copies between `from` and `to` touch, from `fences` (an
  // initiator's recorded at post, a target's when the request or run arrived).
  static std::vector<void*> fenceEvents(const SegmentList& from, const SegmentList& to,
                                        std::initializer_list<const gpu::Fences*> fences);
  // Whether `peer` is this engine itself (added with its own connection info).
  [[nodiscard]] bool isSelf(const Peer& peer) const;
  // Runs a transfer to this engine itself without a connection (true), or leaves it to the
  // network path (false: the peer is another engine).
  bool runLocally(Peer* peer, const std::shared_ptr<Transfer>& t);
  // Delivers a notification to this engine itself, after every local run posted before it;
  // false when the peer is another engine.
  bool notifyLocally(Peer* peer, std::string& text);
  // A send or recv to this engine itself: matched with the oldest counterpart of its tag and
  // copied, or left waiting for one (kLocalMatch).
  void postLocalTwoSided(Peer* peer, const std::shared_ptr<Transfer>& t);
  // Takes a waiting send or recv to this engine itself out of its queue (release, failure).
  static void dropLocalTwoSided(Peer* peer, const Transfer& t);
  // Queues `run`, which copies [0, total) of `from` into `to`, behind the local runs before it.
  void queueLocalRun(Peer* peer, std::unique_ptr<LocalRun> run, const SegmentList& from,
                     const SegmentList& to, uint64_t total);
  // `device`'s queue of local copies (made on first use).
  gpu::CopyQueue& localQueue(int device);
  // Pairs the copies of [0, total) of `from` into `to` into `job` (its pieces and device):
  // whether they suit one GPU's copy queue (one GPU, no source meeting a destination).
  static bool pairStreamPieces(const SegmentList& from, const SegmentList& to, uint64_t total,
                               LocalCopier::Job* job);
  // Queues `job`'s copies on `queue` behind its fences (and behind `gate`, if any); stops at the
  // first failure. The caller launches.
  static Status queueCopies(gpu::CopyQueue& queue, const LocalCopier::Job& job,
                            const gpu::ReadGates::Slot* gate);
  // A copy on a GPU stream not done yet: looked at again within microseconds while it is young
  // (kLocalEagerPoll), then at the staging copies' pace (it may wait for GPU work).
  void awaitStreamCopy(Clock::time_point started);
  // Queues `run`, whose job and mode are set, behind the local runs before it.
  void enqueueLocalRun(Peer* peer, std::unique_ptr<LocalRun> run);
  // Moves local runs on: collects finished copies, completes runs oldest first, starts the
  // waiting runs that may start.
  void driveLocalRuns();
  // Where a local run's copies run: its mode, and the GPU of a kStream run (-1 otherwise).
  struct CopyPlace {
    LocalMode mode = LocalMode::kNow;
    int device = -1;
    bool operator==(const CopyPlace&) const = default;
  };
  // Starts the waiting runs that may start without overtaking a run of their peer before them
  // (one pass); true if one of them landed at once (kNow).
  bool startWaitingLocalRuns();
  // Completes the landed runs that no earlier run of their peer precedes.
  void completeLandedLocalRuns();
  void startLocalRun(LocalRun& run);
  // Ends `run` with `status` (peer null once it is gone): pins, notification, transfers.
  void finishLocalRun(Peer* peer, LocalRun& run, Status status);
  // The same for a direct copy's run: the peer's WRITE or our READ.
  void finishDirectRun(Peer* peer, LocalRun& run, const Status& status);
  // Ends the run at `index` with `why`: at once if none of its copies started (they never
  // will), else once they are done.
  void abandonLocalRun(size_t index, const Status& why);
  // A released transfer's run.
  void releaseLocalRun(const Transfer& t, const Status& why);
  // A failed peer's runs.
  void abandonLocalRuns(const Peer& peer, const Status& why);
  // Engine shutdown: waits for every local copy that started, then completes every run.
  void drainLocalRuns();
  // ---- Direct copies with a peer process on this host (direct_path.cc) ----
  // What this engine offers a peer on `peer_host` in the handshake (none: pid 0).
  [[nodiscard]] control::DirectOffer directOffer(const std::string& peer_host) const;
  // Sets the connection's DirectLink from both offers (ours, the peer's) made on the control
  // connection `fd`: only for a peer process of this host running as our user (or another
  // engine of this process), which could read our memory anyway.
  void adoptDirect(Peer* peer, const control::DirectOffer& ours, const control::DirectOffer& theirs,
                   int fd);
  // The engines of this process, by uuid (same-process peers; direct_path.cc).
  void listInProcess(bool listed);
  // Whether every range lies in a registration of the peer, an engine of this process.
  [[nodiscard]] bool inPeerRegistrations(const Peer& peer,
                                         std::span<const control::DirectPiece> pieces) const;
  // Notes that a direct operation with the peer finished (see Peer::direct_progress_at).
  static void directProgress(Peer* peer);
  // How long the loop polls for the answer to a direct request of `bytes` (direct_path.cc).
  static std::chrono::microseconds directAnswerPoll(uint64_t bytes);
  // Whether this process may read the peer's (probes it the first time).
  bool mayReadPeer(Peer* peer);
  // How `t` (READ or WRITE, not yet announced) moves its bytes.
  enum class DirectKind : uint8_t {
    kNone,    // over the data channels
    kHost,    // host memory on both sides: cross-memory attach
    kDevice,  // GPU memory on the reading side's peer: CUDA IPC
  };
  DirectKind directKind(Peer* peer, const Transfer& t);
  // Whether every region of `ids` can be shared by CUDA IPC and none is being deregistered.
  [[nodiscard]] bool shareable(std::span<const MemoryId> ids) const;
  // `segments` (our memory in `regions`) as direct pieces for `peer` to read: host ranges, or
  // GPU ranges each inside one allocation and the handles of those allocations, noted as sent
  // to `peer` (IPC_CLOSE goes to it before they are freed). False where an allocation cannot be
  // shared, a region is being deregistered, or the pieces are more than the peer accepts.
  bool directPieces(Peer* peer, const SegmentList& segments, std::span<const MemoryId> regions,
                    std::vector<control::DirectPiece>* pieces,
                    std::vector<control::IpcHandle>* handles);
  // The peer's GPU memory named by `pieces` as segments of our address space (mapping its
  // allocations once), the mappings held in `run`. NOT_SUPPORTED when one cannot be mapped.
  Status mapPeerPieces(Peer* peer, std::span<const control::DirectPiece> pieces,
                       std::span<const control::IpcHandle> handles, SegmentList* out,
                       LocalRun* run);
  // Unmaps the least recently used of the peer's allocations that no run holds; false if all
  // are held.
  static bool releaseIdleMapping(DirectLink& link);
  // Sends IPC_CLOSED for each mapping the peer asked to close that no run holds any more.
  void closeReleasedMappings(Peer* peer);
  void onIpcClose(Peer* peer, std::string_view payload);
  void onIpcClosed(Peer* peer, std::string_view payload);
  // deregisterMemory of the last region of a GPU allocation: every peer that may have mapped it
  // unmaps it first (IPC_CLOSE, IPC_CLOSED), or is failed.
  Status unexportIpc(uint64_t base);
  void handleUnexport(Command& cmd);
  // A peer that will not answer IPC_CLOSE any more (failed, or past the deadline).
  void dropUnexportsOf(const Peer& peer);
  // Direct copies of GPU memory whose fences are polled (kFencing), and what they do next.
  void driveDirectFences();
  void fencesPassed(Peer* peer, const DirectFence& wait);
  // A direct request from the peer is allowed on this connection; otherwise a protocol error.
  bool directAgreed(Peer* peer, control::FrameType frame);
  // WRITE_REQUEST of a direct WRITE: our source's ranges for the target to read (false: the
  // WRITE ended, failed).
  void encodeDirectWrite(Peer* peer, const std::shared_ptr<Transfer>& t);
  // READ_RESPONSE of the peer's direct READ: our source's ranges.
  void answerDirectRead(Peer* peer, TargetOp* op);
  // The answer that gives them (the op waits for READ_DONE from now on). `deadline`: the op's
  // data_timeout_ms deadline starts now (a gated READ's starts once its gate is written: until
  // then it waits for our application's GPU work, as kFencing does).
  void sendDirectReadAnswer(Peer* peer, TargetOp* op, std::span<const control::DirectPiece> pieces,
                            std::span<const control::IpcHandle> handles, bool deadline);
  // The peer must finish direct operation `id` (role: whose it is) within data_timeout_ms.
  void startDirectDeadline(Peer* peer, OpRole role, uint64_t id);
  // Our READ of a peer's GPU memory that we have mapped already: the request leaves, and the
  // copy is queued behind a gate the target opens (true: sent; false: nothing done, `t` takes
  // the usual path). Only a READ that is the peer's only transfer in flight, and none while
  // another gated READ waits on its GPU.
  bool startGatedRead(Peer* peer, const std::shared_ptr<Transfer>& t);
  // The target's answer to our gated READ.
  void onGatedReadAnswer(Peer* peer, const control::ReadResponse& m);
  // Opens a gated READ's gate here: it is given up (released, its peer failed, its copy
  // failed: `burn`, as the target may still write it) or refused (the target writes nothing).
  static void openGateHere(LocalRun& run, bool burn);
  // Moves our gated READs on: each completes once its copy is done and the target's answer
  // came (or its peer is gone); they complete in any order, outside local_runs_.
  void driveGatedRuns();
  // Gives up gated READs: those of `peer` (its connection ended) or the one of `t` (released).
  // Their gates are opened here; each completes once its copy has run.
  void abandonGatedRuns(const Peer* peer, const Transfer* t, const Status& why);
  // The peer's read-gate area `h`, mapped here once per connection (DirectLink::gate_areas).
  Result<std::shared_ptr<gpu::IpcMapping>> peerGateArea(Peer* peer, const control::IpcHandle& h);
  // The peer's gated READ_REQUEST (op validated): its gate written after our fences, answered.
  void serveGatedRead(Peer* peer, std::unique_ptr<TargetOp> op, const control::ReadRequest& m);
  // A peer's direct WRITE_REQUEST (op validated) or READ_REQUEST (op validated).
  void serveDirectWrite(Peer* peer, std::unique_ptr<TargetOp> op,
                        std::span<const control::DirectPiece> source,
                        std::span<const control::IpcHandle> handles, bool want_signal);
  void serveDirectRead(Peer* peer, std::unique_ptr<TargetOp> op, const control::ReadRequest& m);
  // The target's direct READ_RESPONSE: read its memory into ours.
  void startDirectRead(Peer* peer, const std::shared_ptr<Transfer>& t,
                       std::span<const control::DirectPiece> source,
                       std::span<const control::IpcHandle> handles);
  // Who refused a direct copy: the peer (NOT_SUPPORTED: for a WRITE, later ones take the
  // channels at once; RESOURCE_EXHAUSTED: its mappings all in use, this transfer only) or this
  // side, for this transfer only (its pieces cannot be offered).
  enum class Refusal : uint8_t { kByPeer, kHere };
  // A direct copy was refused: run `t` again over the data channels.
  void retryOverChannels(Peer* peer, const std::shared_ptr<Transfer>& t, const Status& why,
                         Refusal by);
  void onReadDone(Peer* peer, std::string_view payload);
  // The target of a direct WRITE that asked for it (want_signal) queued its copy on a GPU copy
  // queue: WRITE_QUEUED to the initiator with the queue's signal, reached once the copy landed.
  void signalQueuedWrite(const LocalRun& run, gpu::CopyQueue& queue);
  // WRITE_QUEUED: our direct WRITE's signal is polled (driveQueuedWrites) where we can open it;
  // the WRITE then ends when it is reached or when WRITE_DONE comes, whichever is first.
  void onWriteQueued(Peer* peer, std::string_view payload);
  std::shared_ptr<gpu::PeerSignal> peerSignal(Peer* peer, const std::string& handle, int device);
  static void forgetSignal(Peer* peer, const std::shared_ptr<gpu::PeerSignal>& signal);
  void driveQueuedWrites();
  // WRITE_DONE of a direct WRITE that ended on its signal (Peer::landed_writes): true, taken.
  bool landedWriteDone(Peer* peer, const control::Completion& m);
  // Fails the peer if the oldest direct operation it must finish is past its deadline.
  void checkDirectDeadlines(Peer* peer, Clock::time_point now);
  // A read from a peer process's memory (cross-memory attach) waits, in the kernel, for every
  // page it names to be in memory: a page the process never brings in (a userfaultfd nobody
  // serves, a hung file mapping) holds it until that process ends. When `run` is such a read,
  // running on its copy lane for a peer still connected, the time by which it must have moved
  // bytes again (Clock::time_point::max() otherwise: a queued read has not started its clock,
  // and one behind a GPU copy waiting for the application is not held by the peer).
  [[nodiscard]] Clock::time_point copyStallDue(const LocalRun& run) const;
  // Fails, with TIMEOUT, the peers whose read is past copyStallDue.
  void checkCopyStalls(Clock::time_point now);

  void startTransfer(Peer* peer, const std::shared_ptr<Transfer>& t);
  // Whether `total` bytes travel inline to `peer` with `in_flight` requests to it in flight,
  // this one included (kInlineInFlight).
  [[nodiscard]] bool travelsInline(uint64_t total, uint64_t in_flight) const {
    return total <= settings_.inline_threshold &&
           (total <= kAlwaysInlineBytes || in_flight <= kInlineInFlight);
  }
  // The limits the peer announced in the handshake, checked before a transfer is announced.
  static Status checkPeerLimits(const Peer& peer, const Transfer& t);
  // Gives `t` the next wire id and files it under that id.
  void assignWireId(Peer* peer, const std::shared_ptr<Transfer>& t);
  void finishTransfer(Peer* peer, const std::shared_ptr<Transfer>& t, const Status& status);
  // Drops the run's pins on its local regions (once; later calls do nothing).
  void unpinRun(Transfer* t);
  // The user's release of `t` took effect: nothing touches its memory any more, so its pins go
  // and releaseTransfer returns, even if the run still waits for the peer's answer.
  void completeRelease(Transfer* t);
  // Ends a run once it is kReplied and its data is complete (a recv answers SEND_DONE first).
  void maybeFinish(Peer* peer, const std::shared_ptr<Transfer>& t);
  void maybeFinishTargetWrite(Peer* peer, TargetOp* op);
  void completeRun(Transfer* t, const Status& status);
  // Ends a run that holds nothing of the peer's (refused, still queued, waiting for or done by
  // the local path): drops its pins, leaves it idle and completes it.
  void endRun(Transfer* t, const Status& status);
  // Ends a run whose connection ended: a release in progress finishes, else the run completes
  // with `status`.
  void endWithConnection(Transfer* t, const Status& status);
  void dispatchFrame(Peer* peer, const control::FrameHeader& header, std::string_view payload);
  void onWriteRequest(Peer* peer, std::string_view payload);
  void onWriteDone(Peer* peer, std::string_view payload);
  void onReadRequest(Peer* peer, std::string_view payload);
  void onReadResponse(Peer* peer, std::string_view payload);
  void onNotification(Peer* peer, std::string_view payload);
  void onCancel(Peer* peer, std::string_view payload);
  void onSendRts(Peer* peer, std::string_view payload);
  void onSendCts(Peer* peer, std::string_view payload);
  void onSendData(Peer* peer, std::string_view payload);
  void onSendDone(Peer* peer, std::string_view payload);
  void onDataStatus(Peer* peer, std::string_view payload);
  void matchSend(Peer* peer, const std::shared_ptr<Transfer>& recv, const UnexpectedSend& send);
  // Queues a notification for takeNotifications; false if the peer overran its bound of pending
  // notifications and was failed.
  [[nodiscard]] bool deliverNotification(Peer* peer, std::string message);
  // Checks a peer's request against our registrations and the peer's descriptor bound; on
  // success the op's regions are pinned and, with `fence`, its GPUs' fences recorded. Refusals
  // are logged at a limited rate.
  void resolveTargetRequest(Peer* peer, std::span<const control::WireDesc> descs, uint64_t total,
                            TargetOp* op, bool fence = true);
  // Files a peer's operation we serve (its descriptors count against kMaxServedDescriptors).
  static void addTargetOp(Peer* peer, std::unique_ptr<TargetOp> op);
  // Ends one: unpins its regions and forgets it.
  void retireTargetOp(Peer* peer, uint64_t id);
  void protocolError(Peer* peer, const Status& why);
  // Our operation `id` of `kind` if its stage admits `frame` from the peer; otherwise a protocol
  // error for the peer and nullptr.
  std::shared_ptr<Transfer> ourOperation(Peer* peer, control::FrameType frame, uint64_t id,
                                         XferKind kind);
  // An id the peer announces a new operation with must exceed every earlier one; otherwise a
  // protocol error and false.
  bool acceptNewPeerId(Peer* peer, control::FrameType frame, uint64_t id);
  // acceptNewPeerId, and the request is non-empty and within the operations served per peer.
  bool acceptTargetRequest(Peer* peer, control::FrameType frame, uint64_t id, uint64_t total);
  bool announcedInStep(Peer* peer, const char* what, uint64_t xfer_id, uint64_t first_chunk);
  [[nodiscard]] control::DecodeLimits decodeLimits() const;

  // ---- Inline transfers with GPU memory on our side (inline_copy.cc) ----
  // A free inline slot (the staging is created on first use), or -1 when all are busy.
  int takeInlineSlot(Peer* peer);
  // Starts copying `segments` into a slot (kWriteGather, kReadGather, kSendGather with the
  // peer's recv id); finishInlineCopy runs when the bytes are there. False if no slot is free:
  // the caller uses the channels instead.
  bool startInlineGather(Peer* peer, InlineCopy::Kind kind, uint64_t id,
                         const SegmentList& segments, const gpu::Fences* fences,
                         uint64_t peer_id = 0);
  // Starts copying inline bytes out to their destination (kWriteScatter, kReadScatter,
  // kRecvScatter), or holds them until a slot is free; finishInlineCopy runs when they are in
  // place.
  void startInlineScatter(Peer* peer, InlineCopy::Kind kind, uint64_t id, std::string_view bytes);
  void beginInlineScatter(Peer* peer, InlineCopy& copy, std::string_view bytes);
  // The destination of a scatter: the target op's or our READ's memory (null if it is gone).
  std::pair<const SegmentList*, const gpu::Fences*> scatterTarget(Peer* peer,
                                                                  const InlineCopy& copy);
  // Finished copies move their transfers on; held scatters take the freed slots.
  void driveInlineCopies(Peer* peer);
  void noteInlinePending(const InlineCopy& copy);
  void finishInlineCopy(Peer* peer, const InlineCopy& copy, const Status& status);
  // Our transfer whose inline copy finished, or null if it is gone.
  static std::shared_ptr<Transfer> inlineCopyDone(Peer* peer, uint64_t id);
  // A failed peer's inline copies are forgotten (their staging went with its channels, see
  // closeDataChannels).
  static void dropInlineCopies(Peer* peer);
  // The fields of `t`'s WRITE_REQUEST every form shares (id, size, notification, descriptors).
  static control::WriteRequest writeRequestOf(const Transfer& t);
  // WRITE_REQUEST of `t`: with its bytes inline, or announcing a stream of chunks.
  void encodeWriteRequest(Peer* peer, Transfer* t, bool inline_data,
                          std::span<const transport::IoSlice> bytes);

  // ---- What the data path reports (transfer_protocol.cc) ----
  void onStreamStaged(Peer* peer, Stream* stream) override;
  void onStreamDone(Peer* peer, Stream* stream) override;
  void onStreamReleased(Peer* peer, Stream* stream) override;
  void onDataPathFailed(Peer* peer, const Status& why) override;

  // ---- Configuration and identity ----
  config::Settings settings_;
  std::string name_;
  std::string uuid_;  // raw 16 bytes
  std::string uuid_hex_;
  std::string advertised_host_;
  uint16_t port_ = 0;

  // The I/O threads of every socket transport of the engine (transport_ and host_sockets_).
  std::shared_ptr<transport::IoPool> socket_io_;
  std::unique_ptr<transport::Transport> transport_;
  std::vector<int> net_devices_;  // plugin device of channel i: net_devices_[i % size]
  int gpu_ = 0;                   // CUDA device a plugin transport runs on
  MemoryRegistry registry_;

  net::Fd epoll_;
  net::EventFd wake_;
  net::Fd listener_;
  // Set while the listener is out of epoll after accept ran out of descriptors (progress
  // thread).
  std::optional<Clock::time_point> listener_resume_at_;
  static constexpr auto kListenerPause = std::chrono::milliseconds(100);
  // How often the loop looks at the copies of retiring channels, and when it warns that they
  // still wait.
  static constexpr auto kRetiringPoll = std::chrono::microseconds(500);
  static constexpr auto kRetiringWarnAfter = std::chrono::seconds(10);
  RateLimit listener_log_{1};
  std::thread thread_;
  std::atomic<bool> stop_{false};
  WaitHints hints_;                      // progress thread: reset every round
  std::unique_ptr<DataPath> data_path_;  // progress thread, once the transport exists
  // Transfers to this engine itself and direct copies with processes of this host, in post
  // order (each peer's runs complete in it); progress thread.
  std::deque<std::unique_ptr<LocalRun>> local_runs_;
  std::unique_ptr<LocalCopier> copier_;  // made with the first kCopyThread run; a lane per peer
  // Channels of ended connections whose GPU copies still run (progress thread; emptied before
  // the loop ends), and the thread that frees what closed channels allocated.
  std::deque<std::unique_ptr<RetiringChannels>> retiring_;
  Reclaimer reclaimer_;
  // kStream runs' copy queues, by GPU (made on first use; one that failed is replaced once no
  // run waits on it).
  std::unordered_map<int, std::unique_ptr<gpu::CopyQueue>> local_queues_;
  Clock::time_point poll_until_;        // the loop polls until then (pollFor)
  Clock::time_point busy_poll_until_;   // progress_poll_us after the last round with events
  Clock::time_point serve_poll_until_;  // serve_poll_ after the last request read
  // Set-up of removed peers still under way in the transport (progress thread; emptied before
  // the transport goes).
  std::unique_ptr<SetupDrain> setup_drain_;
  // NetPath::kSameHostSockets: its transport, data path and set-up drain (progress thread; made
  // on first use, then kept).
  std::unique_ptr<transport::Transport> host_sockets_;
  std::unique_ptr<DataPath> host_data_path_;
  std::unique_ptr<SetupDrain> host_setup_drain_;
  std::string host_id_;  // net::hostIdentity()
  // GPU allocations shared by CUDA IPC (registration on API threads, exports on first use by
  // the progress thread), and those being freed, waiting for peers' IPC_CLOSED (progress
  // thread).
  IpcExports ipc_exports_{gpu::exportIpc, IpcExports::defaultMaxHeld()};
  struct Unexport {
    std::vector<std::shared_ptr<Waiter>> waiters;
    std::vector<uint64_t> peers;  // serials still to answer
    Clock::time_point due;
  };
  std::unordered_map<uint64_t, Unexport> unexports_;
  // Waits of direct operations in kFencing. computeTimeout polls while it holds any, so a wait
  // added in any part of a round is looked at again soon (entries of gone operations leave at the
  // next driveDirectFences).
  std::vector<DirectFence> direct_fences_;
  // Our direct WRITEs in kWriteQueued whose target's signal is polled; computeTimeout polls
  // while any is held (entries of ended WRITEs leave at the next driveQueuedWrites).
  struct QueuedWrite {
    uint64_t peer_serial = 0;
    uint64_t wire_id = 0;
    std::shared_ptr<gpu::PeerSignal> signal;
    Clock::time_point until;  // polled until then; later WRITE_DONE ends the WRITE
  };
  std::vector<QueuedWrite> queued_writes_;
  // Writes that open the gates of peers' gated READs, each on the default stream of the READ's
  // source GPU (gpu::Fences::recordAfterWrite): after the work our application queued there
  // before, and never behind a gate of ours, since every stream of the engine is non-blocking
  // (two engines reading each other cannot wait for each other's writes). Each holds the peer's
  // gate mapped until its fence shows that the write ran (unmapped before, the word would fault
  // the write); one whose fence fails fails its peer, whose copy may wait for it forever.
  struct GateWrite {
    uint64_t peer_serial = 0;
    uint64_t read_id = 0;
    std::shared_ptr<gpu::IpcMapping> word;
    std::unique_ptr<gpu::Fences> written;  // after the write
  };
  std::vector<GateWrite> gate_writes_;
  // Peers' gate words whose write was queued but no fence covers (only with a broken context):
  // kept mapped for the life of the engine, since the write could still run.
  std::vector<std::shared_ptr<gpu::IpcMapping>> unconfirmed_gate_words_;
  void driveGateWrites();
  // Our gated READs (LocalRun::gate), each on its GPU's queue of gated copies: at most one per
  // GPU at a time, so that no gated copy waits behind another's gate. A failed queue is
  // replaced once no gated READ uses it (their gates are open by then).
  std::vector<std::unique_ptr<LocalRun>> gated_runs_;
  std::unordered_map<int, std::unique_ptr<gpu::CopyQueue>> gated_queues_;
  // Failed queues of gated copies, destroyed once idle (their streams may still wait for the
  // application's GPU work, which the progress thread never waits for).
  std::vector<std::unique_ptr<gpu::CopyQueue>> retired_gated_queues_;
  // What proves this process to a same-host peer (DirectOffer): random, at a fixed address.
  std::array<char, control::kNonceSize> direct_cookie_{};

  // Held by the progress thread for each round, everything but its wait for events: whoever
  // holds it may touch the state the progress thread owns (postFromCaller). Taken before cmd_mu_.
  std::mutex round_mu_;
  std::atomic<bool> round_wanted_{false};  // the progress thread waits for round_mu_
  // An application thread left whole frames in a control connection's buffer (under round_mu_).
  bool frames_left_ = false;
  bool caller_posts_ = false;  // caller_posts, resolved at start
  // Some peer's control reads are lent (ControlReader::kCaller), as last seen; a thread about to
  // block in waitTransfer asks for them back through reclaim_reads_.
  std::atomic<bool> reads_lent_{false};
  std::atomic<bool> reclaim_reads_{false};
  // When the progress thread's wait for events ends at the latest (under the round).
  Clock::time_point planned_wake_{};
  // How long reads stay lent without a poll: it bounds how long a frame for the progress thread
  // waits while the lending caller does not poll, and the progress thread wakes about once per
  // lease while the caller polls on.
  static constexpr auto kCallerReadLease = std::chrono::microseconds(500);
  // Added to every timed wait of the loop (computeTimeout), so that it wakes after what is due
  // rather than just before.
  static constexpr auto kWaitSlack = std::chrono::microseconds(100);
  std::chrono::microseconds serve_poll_{0};  // serve_poll_us, resolved at start
  // serve_poll_us=auto with cores to spare (engine_core.cc says why this long).
  static constexpr auto kServePollAuto = std::chrono::microseconds(100);
  std::mutex cmd_mu_;
  std::vector<Command> commands_;
  std::vector<Command> command_batch_;  // progress thread: the commands being handled

  // Peers: mutated by the progress thread under peers_mu_; read by it without the lock and by
  // API threads with it.
  mutable std::mutex peers_mu_;
  std::unordered_map<std::string, std::shared_ptr<Peer>> peers_;
  std::unordered_map<uint64_t, Peer*> peers_by_serial_;
  uint64_t next_serial_ = 1;
  uint64_t next_copy_lane_ = 1;  // Peer::copy_lane

  std::unordered_map<uint64_t, Incoming> incoming_;
  uint64_t next_incoming_ = 1;
  uint64_t next_wire_id_ = 1;

  mutable std::mutex handles_mu_;
  std::unordered_map<TransferHandle, std::shared_ptr<Transfer>> handles_;
  TransferHandle next_handle_ = 1;

  mutable std::mutex remote_mu_;
  std::map<std::pair<std::string, MemoryId>, RemoteEntry> remote_;

  std::mutex notif_mu_;
  std::vector<Notification> notifications_;
  struct PendingNotifications {
    size_t count = 0;
    size_t bytes = 0;
  };
  // Per peer (by serial): what of notifications_ it sent (kMaxPendingNotifications).
  std::unordered_map<uint64_t, PendingNotifications> pending_notifications_;

  std::mutex done_mu_;
  std::condition_variable done_cv_;
  std::atomic<int> done_waiters_{0};
};

}  // namespace tcpx::engine
