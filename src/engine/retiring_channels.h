// What a peer's connection leaves behind when it ends while GPU copies of it still run, and the
// thread that frees GPU buffers.
//
// A staged or inline copy waits for the application's earlier GPU work (its fence), so when a
// connection ends its copies may still be waiting for a kernel that runs for seconds. The
// progress thread must not wait for them (peers would miss keepalives), yet nothing the copies
// touch may go before they are done:
//   - the receive comms stay open, since an unpack copy reads the plugin's bounce pool (TCPX's
//     order: copies out of the pool end before the comm closes), and so do the send comms and
//     every registered buffer of both directions;
//   - the peer's requests (TargetOp) stay, with the regions they pinned, so a deregistration waits
//     for the copies (no write after a region is deregistered) and the segment lists a transport
//     request may still walk (the socket transport's threads do) stay valid until the comms close;
//   - the transfers that failed with the connection are held (OpStage::kRetiring) and complete,
//     or finish their release, only once no copy can read or write their memory.
// The progress loop polls the copies (EngineCore::driveRetiring) and closes everything once they
// are done. Engine shutdown waits for them.
//
// Freeing device or pinned host memory (cudaFree, cudaFreeHost) waits for the whole device, the
// application's kernels included, so the progress thread hands what a closed channel allocated to
// the Reclaimer's thread instead of freeing it itself.
#pragma once

#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <tcpx_p2p/status.h>
#include <tcpx_p2p/types.h>

#include "engine/peer.h"
#include "engine/transfer.h"
#include "gpu/gpu.h"

namespace tcpx::engine {

class DataPath;

// GPU queues and buffers of closed channels: freed when this goes.
struct ChannelLeftovers {
  std::vector<std::unique_ptr<gpu::ChannelStaging>> staging;
  std::vector<std::unique_ptr<gpu::CopyQueue>> queues;
  std::vector<std::pair<void*, int>> buffers;  // (buffer, its GPU; -1: host memory of allocHost)

  ChannelLeftovers() = default;
  ~ChannelLeftovers();
  ChannelLeftovers(const ChannelLeftovers&) = delete;
  ChannelLeftovers& operator=(const ChannelLeftovers&) = delete;
  [[nodiscard]] bool empty() const { return staging.empty() && queues.empty() && buffers.empty(); }
};

// One ended connection's channels whose copies were still running (see the file comment).
// Invariants: nothing walks its directions' streams any more (every transfer's and request's
// stream pointer was cleared when the connection ended); its DataPath, like the engine's
// transports, outlives it (the engine empties retiring_ before they go).
struct RetiringChannels {
  DataPath* data_path = nullptr;  // the engine's, of the transport the channels were set up on
  std::string peer_name;          // for the log
  Direction out;
  Direction in;
  std::unique_ptr<gpu::ChannelStaging> inline_staging;
  std::vector<std::unique_ptr<TargetOp>> target_ops;  // the peer's requests, regions pinned
  Clock::time_point since = Clock::now();             // when the connection ended
  bool warned = false;                                // kRetiringWarnAfter passed, said so
  // Transfers that failed with the connection, with their status.
  std::vector<std::pair<std::shared_ptr<Transfer>, Status>> held;

  // Whether none of its copies can still run (never waits).
  [[nodiscard]] bool copiesIdle() const;
};

// Runs the frees handed to it on a thread of its own, in order. The thread starts when there is
// something to free and ends once nothing is left, so an engine whose peers are gone holds no
// extra thread. It works in the engine's GPU's context (never creating one on another GPU).
// Without a GPU nothing waits for a device, and the frees run on the calling thread.
class Reclaimer {
 public:
  Reclaimer() = default;
  // Runs what is still queued, then joins the thread.
  ~Reclaimer();
  Reclaimer(const Reclaimer&) = delete;
  Reclaimer& operator=(const Reclaimer&) = delete;

  // `device`: the engine's GPU (the thread, started by the first call, works in its context).
  void dispose(std::unique_ptr<ChannelLeftovers> leftovers, int device);

 private:
  void run();

  // kIdle: no thread works (thread_ may hold one that has ended and waits to be joined);
  // kRunning: the thread works through queue_ and sets kIdle under mu_ as it ends.
  enum class State { kIdle, kRunning };

  int device_ = 0;  // set before a thread starts
  std::mutex mu_;
  std::deque<std::unique_ptr<ChannelLeftovers>> queue_;
  State state_ = State::kIdle;
  std::thread thread_;
};

}  // namespace tcpx::engine
