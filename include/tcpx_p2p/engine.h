// The transfer engine: moves registered memory between processes on different machines.
//
// Model (NIXL's): each engine has a name and an opaque connection-info blob. A peer is added by
// name and blob; connections are set up on first use or by connect(), from either side. Memory is
// registered locally and described to peers by an opaque public descriptor; a peer loads it and
// addresses the region by id + offset. One-sided READ and WRITE move lists of descriptors and may
// carry a notification that reaches the target after the data. Two-sided send/recv match by tag.
//
// Every method is thread-safe. No method blocks on the network except connect(), waitTransfer(),
// and releaseTransfer()/deregisterMemory()/removePeer() while they wait for in-flight transport
// operations on the affected memory to drain (bounded by the peer timeout).
#pragma once

#include <chrono>
#include <cstddef>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <tcpx_p2p/config.h>
#include <tcpx_p2p/export.h>
#include <tcpx_p2p/status.h>
#include <tcpx_p2p/types.h>

namespace tcpx {

namespace engine {
class EngineCore;
}

// What happened with one peer since it was added, or since a new instance of it replaced the old
// one: for telling a stuck or failing deployment from a healthy one.
struct PeerStats {
  PeerState state = PeerState::kUnknown;
  uint64_t posted = 0;     // transfer runs posted to it (READ, WRITE, send, recv)
  uint64_t in_flight = 0;  // posted and not finished
  uint64_t succeeded = 0;
  uint64_t failed = 0;                                    // finished otherwise (canceled included)
  std::vector<std::pair<StatusCode, uint64_t>> failures;  // `failed` by status, nonzero only
  uint64_t bytes_sent = 0;                                // by succeeded WRITE and send runs
  uint64_t bytes_received = 0;                            // by succeeded READ and recv runs
  // Succeeded READ and WRITE runs whose bytes this process or the peer's copied directly between
  // the two processes' memory (same host: the same_host_copy tunable), not over data channels.
  uint64_t direct_runs = 0;
  // Of those, direct WRITEs of GPU memory that ended when the target's copy signal (an
  // interprocess CUDA event) was seen reached, before the target's answer arrived.
  uint64_t signalled_writes = 0;
  // Of those, direct READs of GPU memory whose copy was queued before the target answered,
  // behind a gate the target opened from its GPU (gated READs).
  uint64_t gated_reads = 0;
  // Chunks received into GPU memory over sockets whose copy to the GPU followed the receive as
  // its bytes landed (landed_copy_max), rather than starting once all of them had.
  uint64_t landed_chunks = 0;
  // Replies to small host-memory READs and WRITEs that the application's thread polling them
  // with checkTransfer handled itself while the progress thread slept (caller_posts).
  uint64_t caller_replies = 0;
  // Chunks sent from GPU memory over sockets whose send followed their copy out of GPU memory,
  // leaving as the copy put bytes in place (followed_gather_max), rather than once all of it had.
  uint64_t followed_chunks = 0;
  Status last_error;    // the latest failed run's status; OK if none failed
  Status peer_failure;  // why the peer is FAILED; OK otherwise
  // What moves its data: "socket", "tcpx" or "emulator" since its first connection (a peer on
  // this host may use "socket" under a plugin transport: the same_host tunable), "local" for the
  // engine itself; empty before.
  std::string transport;
};

class TCPX_P2P_API Engine {
 public:
  static Result<std::unique_ptr<Engine>> create(const Config& config);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // This engine's name (the `name` tunable, or "<hostname>-<pid>").
  [[nodiscard]] const std::string& name() const;
  // Unique id of this engine instance (hex); a restarted process gets a new one.
  [[nodiscard]] const std::string& uuid() const;

  // ---- Peers ----
  // The blob a peer needs to reach this engine (advertised address, port, identity).
  [[nodiscard]] std::string connectionInfo() const;
  // Adds (or, for a restarted peer with new connection info, replaces) a peer.
  Status addPeer(const std::string& name, std::string_view connection_info);
  // Disconnects and forgets a peer; its in-flight transfers end with REMOTE_DISCONNECTED.
  Status removePeer(const std::string& name);
  // Sets up the control and data connections now; returns when ready or failed (bounded by the
  // connect_timeout_ms tunable). Reconnects a peer in the failed state.
  Status connect(const std::string& name);
  // Starts the same set-up in the background and returns at once (NOT_FOUND for an unknown
  // peer): transfers posted meanwhile wait for it, and fail if it fails; peerState() tells.
  // A peer whose address refuses connections (nothing listens there any more: the process is
  // gone) fails within 2 s; a set-up that is slow but alive keeps connect_timeout_ms.
  Status startConnecting(const std::string& name);
  [[nodiscard]] PeerState peerState(const std::string& name) const;
  // The counters of a peer (NOT_FOUND for an unknown one), and the names of every peer.
  [[nodiscard]] Result<PeerStats> peerStats(const std::string& name) const;
  [[nodiscard]] std::vector<std::string> peerNames() const;

  // ---- Memory ----
  Result<MemoryId> registerMemory(void* addr, size_t length, MemoryKind kind = MemoryKind::kHost,
                                  int device = -1);
  // Waits for in-flight transfers that use the region, then forgets it.
  Status deregisterMemory(MemoryId id);
  // Public descriptor of a registration, for peers to load.
  [[nodiscard]] Result<std::string> memoryDescriptor(MemoryId id) const;
  // Loads a peer's public descriptor so that transfers can address that region.
  Result<RemoteMemory> loadRemoteMemory(std::string_view descriptor);
  Status unloadRemoteMemory(const RemoteMemory& remote);

  // ---- One-sided transfers ----
  // Validates and records a transfer; local[i] pairs with remote[i] and both must have the same
  // length. The handle can be posted any number of times, one run at a time.
  Result<TransferHandle> prepareTransfer(OpKind op, const std::string& peer,
                                         std::span<const LocalDesc> local,
                                         std::span<const RemoteDesc> remote,
                                         std::optional<std::string> notification = std::nullopt);
  // Starts a run; never blocks. REPOST_ACTIVE if the previous run has not finished.
  Status postTransfer(TransferHandle handle);
  // OK when done, IN_PROGRESS while running, NOT_POSTED before the first post, else the error.
  // Never blocks. With caller_posts on, a call on a small host-memory READ or WRITE in flight
  // may read its reply from the peer's connection and copy a READ's bytes (at most 32 KiB).
  [[nodiscard]] Status checkTransfer(TransferHandle handle) const;
  // Waits until the transfer is no longer in progress or `timeout` passes; returns checkTransfer.
  Status waitTransfer(TransferHandle handle, std::chrono::milliseconds timeout);
  // Forgets the handle. A run in flight is canceled: once this returns the engine no longer
  // touches the transfer's local memory (a canceled WRITE leaves the target range unspecified).
  Status releaseTransfer(TransferHandle handle);

  // ---- Two-sided transfers ----
  // A send matches the oldest recv posted by the peer with the same tag; sizes must be equal.
  // Both return a handle to check, wait for and release like a one-sided transfer.
  Result<TransferHandle> postSend(const std::string& peer, const LocalDesc& buffer, uint64_t tag);
  Result<TransferHandle> postRecv(const std::string& peer, const LocalDesc& buffer, uint64_t tag);

  // ---- Notifications ----
  // Sends a standalone notification; notifications between two engines arrive in send order.
  Status sendNotification(const std::string& peer, std::string_view message);
  // Takes every notification received so far.
  std::vector<Notification> takeNotifications();

 private:
  explicit Engine(std::unique_ptr<engine::EngineCore> core);
  std::unique_ptr<engine::EngineCore> core_;
};

}  // namespace tcpx
