// Transfers as the engine tracks them: the user's handle (Transfer), the target side of a
// peer's request (TargetOp), and the data stream that either one moves over the channels.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <tcpx_p2p/status.h>
#include <tcpx_p2p/types.h>

#include "common/segment_list.h"
#include "control/frames.h"
#include "engine/operation.h"
#include "gpu/gpu.h"

namespace tcpx::engine {

class PeerCounters;  // engine/peer_counters.h

// A one-shot rendezvous between an API thread and the progress thread.
class Waiter {
 public:
  void complete(Status status) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (done_) return;
      done_ = true;
      status_ = std::move(status);
    }
    cv_.notify_all();
  }
  Status wait() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return done_; });
    return status_;
  }
  // False if `timeout` passed first.
  template <typename Duration>
  bool waitFor(Duration timeout, Status* out) {
    std::unique_lock<std::mutex> lock(mu_);
    if (!cv_.wait_for(lock, timeout, [this] { return done_; })) return false;
    *out = status_;
    return true;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  Status status_;
};

// Run state of a handle, readable by any thread.
enum class RunState : int { kPrepared = 0, kInFlight = 1, kDone = 2, kFailed = 3 };

// Whether someone gave up an operation while it ran.
enum class Disposition : uint8_t {
  kActive,
  kReleased,      // our user released the handle in flight: the run ends quietly, its memory
                  // untouched once the release returned
  kPeerCanceled,  // the peer released its half (its WRITE, or the send our recv matched)
};

// Who a stream belongs to, so its completion reaches the right handler.
enum class StreamOwner : uint8_t {
  kInitiatorWrite,  // our WRITE's data, sent
  kInitiatorRead,   // our READ's data, received
  kTargetWrite,     // a peer's WRITE into our memory, received
  kTargetRead,      // a peer's READ of our memory, sent
  kSend,            // our two-sided send, sent
  kRecv,            // our two-sided recv, received
};

// One announced unit of data on one direction of a peer pair.
struct Stream {
  uint64_t first_chunk = 0;  // global chunk index of chunk 0 (see ChunkPlan)
  uint32_t nchunks = 0;
  uint64_t total = 0;
  uint64_t chunk_size = 0;
  const SegmentList* segments = nullptr;  // null: discard (recv) or filler (send)
  const gpu::Fences* fences = nullptr;    // what GPU copies of local memory wait for
  bool detached = false;                  // canceled: chunks not yet posted use null data
  uint32_t done = 0;                      // chunks completed
  int in_transport = 0;  // chunks scheduled and not yet completed (may touch local memory)
  Status error;          // first staging failure; the stream still runs to keep channels in step
  bool sends_status = false;  // we send DATA_STATUS once every chunk passed staging
  uint32_t staged = 0;        // chunks past staging (ready, filler, or straight from memory)
  StreamOwner owner = StreamOwner::kInitiatorWrite;
  uint64_t owner_id = 0;  // wire id of the owning transfer or target op

  [[nodiscard]] bool complete() const { return done == nchunks; }
  // Whether its chunks move the bytes of user memory: false for filler or discard, and once the
  // stream was released (chunks posted after that must not touch the memory).
  [[nodiscard]] bool hasMemory() const { return segments != nullptr && !detached; }
};

// A handle created by prepareTransfer/postSend/postRecv.
struct Transfer {
  // ---- Immutable after creation ----
  TransferHandle handle = 0;
  XferKind kind = XferKind::kWrite;
  std::string peer_name;
  std::string peer_uuid;  // the peer instance the remote descriptors belong to (raw bytes)
  SegmentList local;
  std::vector<MemoryId> regions;  // distinct local regions, pinned for each run
  std::vector<control::WireDesc> remote;
  // Where each remote descriptor starts in the peer's process (its loaded descriptor's address):
  // a gated READ reads there through its mapping of the peer's allocation.
  std::vector<uint64_t> remote_addr;
  uint64_t total = 0;
  std::optional<std::string> notification;
  uint64_t tag = 0;
  std::vector<int> devices;                // GPUs of the local memory
  bool remote_on_device = false;           // a remote descriptor names the peer's GPU memory
  bool remote_all_device = false;          // every remote descriptor does
  std::shared_ptr<PeerCounters> counters;  // of the peer instance it was prepared for

  // ---- Shared with API threads ----
  std::atomic<RunState> state{RunState::kPrepared};
  // A poll of this run took its peer's control reads (ControlReader::kCaller): a wait for it
  // asks for them back (EngineCore::waitTransfer).
  std::atomic<bool> lent_reads{false};
  mutable std::mutex result_mu;
  Status result;  // outcome of the last finished run

  // ---- The thread holding the engine's round only (the progress thread, or an application
  // thread on its short paths: EngineCore::postFromCaller, takeRepliesFromCaller); reset at
  // each post ----
  uint64_t wire_id = 0;  // our id for the peer (see control/frames.h); 0 before the start
  OpStage stage = OpStage::kIdle;
  bool data_done = false;  // our side's bytes are all sent or in place (or the run has none)
  Disposition disposition = Disposition::kActive;
  Status local_status;
  Status remote_status;
  bool counted = false;     // counts against max_inflight_per_peer
  bool holds_pins = false;  // `regions` are pinned for this run (postTransfer pins them)
  Stream* stream = nullptr;
  std::shared_ptr<Waiter> release_waiter;  // completed once no chunk touches local memory
  uint64_t peer_send_id = 0;               // recv: the matched send's id on the peer
  // READ and WRITE with a same-host peer: this run asked for a direct copy (DirectLink), and
  // the peer refused one (NOT_SUPPORTED), so the retry takes the data channels.
  bool direct = false;
  bool direct_refused = false;
  // A direct WRITE of GPU memory that asked the target for its copy's signal (WRITE_QUEUED).
  bool signal_asked = false;
  gpu::Fences fences;  // recorded at each post on the legacy default stream of each local GPU

  [[nodiscard]] bool released() const { return disposition == Disposition::kReleased; }

  void resetRun() {
    wire_id = 0;
    stage = OpStage::kIdle;
    data_done = false;
    disposition = Disposition::kActive;
    local_status = Status();
    remote_status = Status();
    counted = false;
    holds_pins = true;
    stream = nullptr;
    release_waiter.reset();
    peer_send_id = 0;
    direct = false;
    direct_refused = false;
    signal_asked = false;
    lent_reads.store(false, std::memory_order_relaxed);
  }
};

// The target side of a peer's WRITE or READ.
struct TargetOp {
  uint64_t xfer_id = 0;              // the initiator's wire id
  XferKind kind = XferKind::kWrite;  // kWrite or kRead
  OpStage stage = OpStage::kReplied;
  bool data_done = false;                          // every chunk has landed (WRITE) or left (READ)
  Disposition disposition = Disposition::kActive;  // kPeerCanceled: the initiator released it
  SegmentList segments;
  std::vector<MemoryId> pinned;
  Status status;  // validation outcome; a refused WRITE still drains its data
  bool has_notification = false;
  std::string notification;
  Stream* stream = nullptr;
  gpu::Fences fences;  // recorded at arrival on the legacy default stream of each GPU it touches
};

// A send announced by a peer that no recv matched yet.
struct UnexpectedSend {
  uint64_t send_id = 0;
  uint64_t size = 0;
};

}  // namespace tcpx::engine
