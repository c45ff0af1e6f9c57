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

#include "control/frames.h"
#include "engine/chunk_plan.h"
#include "gpu/gpu.h"

namespace tcpx::engine {

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

enum class XferKind : uint8_t { kRead, kWrite, kSend, kRecv };
const char* xferKindName(XferKind kind);

// Run state of a handle, readable by any thread.
enum class RunState : int { kPrepared = 0, kInFlight = 1, kDone = 2, kFailed = 3 };

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
  uint64_t total = 0;
  std::optional<std::string> notification;
  uint64_t tag = 0;
  std::vector<int> devices;  // GPUs of the local memory

  // ---- Shared with API threads ----
  std::atomic<RunState> state{RunState::kPrepared};
  mutable std::mutex result_mu;
  Status result;  // outcome of the last finished run

  // ---- Progress thread only; reset at each post ----
  uint64_t wire_id = 0;
  bool local_done = false;
  bool remote_done = false;
  Status local_status;
  Status remote_status;
  bool canceled = false;         // released by the user while in flight
  bool peer_canceled = false;    // two-sided: the other side released its half
  bool counted = false;          // counts against max_inflight_per_peer
  bool awaiting_status = false;  // the peer stages our incoming data: wait for its DATA_STATUS
  bool inline_copy = false;      // an InlineCopy of this run reads or writes local GPU memory
  Stream* stream = nullptr;
  std::shared_ptr<Waiter> release_waiter;  // completed once no chunk touches local memory
  uint64_t peer_send_id = 0;               // recv: the matched send's id on the peer
  gpu::Fences fences;  // recorded at each post on the legacy default stream of each local GPU

  void resetRun() {
    wire_id = 0;
    local_done = false;
    remote_done = false;
    local_status = Status();
    remote_status = Status();
    canceled = false;
    peer_canceled = false;
    counted = false;
    awaiting_status = false;
    inline_copy = false;
    stream = nullptr;
    release_waiter.reset();
    peer_send_id = 0;
  }
};

// The target side of a peer's WRITE or READ (or the data of a peer's send, kept by the recv).
struct TargetOp {
  uint64_t xfer_id = 0;  // the initiator's wire id
  bool is_write = true;
  SegmentList segments;
  std::vector<MemoryId> pinned;
  Status status;  // validation outcome; a refused WRITE still drains its data
  bool canceled = false;
  bool awaiting_status = false;  // the initiator stages from GPU memory: wait for DATA_STATUS
  bool data_done = false;        // every chunk has landed
  bool has_notification = false;
  std::string notification;
  Stream* stream = nullptr;
};

// A send announced by a peer that no recv matched yet.
struct UnexpectedSend {
  uint64_t send_id = 0;
  uint64_t size = 0;
};

}  // namespace tcpx::engine
