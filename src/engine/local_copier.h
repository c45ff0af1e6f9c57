// The engine's copy threads, for transfers to the engine itself and direct copies from a peer
// process on this host.
//
// Copies that may take a while run here, off the progress thread, which must never wait for the
// GPU (a GPU copy first waits for the caller's earlier GPU work) nor for a long memcpy: every
// copy that touches GPU memory, and host copies above a size. Jobs run in lanes: the engine
// gives each peer (the engine itself included) its own, and a lane runs its jobs one at a time
// in submission order, so a transfer or notification to the engine itself that is submitted
// behind another completes after it, as over a connection. Lanes run independently, each on its
// own thread: a copy that waits on a peer's memory (a page its process never serves) holds that
// peer's later copies only, not another peer's nor the engine's own.
//
// A lane's thread starts with its first job and ends once the lane has been idle for a while,
// so threads follow the peers that copy, not every peer ever connected.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>
#include <vector>

#include <tcpx_p2p/status.h>

#include "common/cross_memory.h"
#include "gpu/gpu.h"

namespace tcpx::engine {

class LocalCopier {
 public:
  // Where a job is. kQueued -> kRunning (the copy thread took it) or kQueued -> kSkipped (the
  // progress thread took it back: it never runs). One compare-and-swap decides, so a job is
  // either copied whole or not at all.
  enum class JobState : uint8_t { kQueued, kRunning, kSkipped };

  // What the copy thread runs. Filled by the progress thread before submit(); `result` is
  // written by the copy thread before the job is reported done, and read only after.
  struct Job {
    int device = -1;  // a GPU the copies touch (its stream runs them); -1: host memory only
    std::vector<gpu::CopyPiece> pieces;
    // A direct copy from a peer process on this host instead: `cross` read from process
    // `read_from` (none: not such a copy).
    std::optional<ReadableProcess> read_from;
    std::vector<CrossPiece> cross;
    std::vector<void*> after;  // events (opaque cudaEvent_t) GPU copies wait for
    std::atomic<JobState> state{JobState::kQueued};
    // When the job started, then (a read from a peer process) when it last moved bytes: for the
    // engine's watchdog. 0 before it starts.
    ReadProgress progress{0};
    Status result;
  };

  // A lane's name: the engine uses its peers' serials.
  using LaneId = uint64_t;

  // `on_done` is called on a copy thread after each job is done (it wakes the progress loop).
  explicit LocalCopier(std::function<void()> on_done);
  // Skips the jobs not started, lets the running ones finish and joins the threads.
  ~LocalCopier();
  LocalCopier(const LocalCopier&) = delete;
  LocalCopier& operator=(const LocalCopier&) = delete;

  // Queues `job` on `lane`, behind its earlier jobs. False (and nothing queued) when the lane's
  // thread could not be started.
  [[nodiscard]] bool submit(LaneId lane, std::shared_ptr<Job> job);
  // Whether a thread of the engine may poll briefly instead of sleeping: only with cores to spare
  // (4 or more that this process may run on), where a poll costs less than a wake-up; on fewer
  // it would take the core the copy, the caller or the peer needs.
  static bool pollingPays();
  // Takes a job back if it has not started: true when it will never run (it is not reported).
  static bool trySkip(Job& job);
  // Jobs run since the last call, each lane's in submission order. Also joins the threads of
  // lanes that ended.
  std::vector<std::shared_ptr<Job>> takeDone();
  // Waits until every submitted job is done (engine shutdown: their memory must be left alone
  // before their transfers complete).
  void waitIdle();

 private:
  // Where a lane's thread is. kNone -> kRunning (a job came) -> kEnded (idle for kLaneIdleEnd,
  // or stop) -> kNone (joined by the next submit or takeDone). Changed under mu_.
  enum class ThreadState : uint8_t { kNone, kRunning, kEnded };
  struct Lane {
    std::deque<std::shared_ptr<Job>> queue;
    std::condition_variable cv;  // a job queued, or stop
    // queue.size(), read without the lock while the thread spins after a job.
    std::atomic<size_t> queued{0};
    ThreadState thread_state = ThreadState::kNone;
    std::thread thread;
  };

  void run(Lane& lane);
  // Runs the lane's jobs until it has been idle for kLaneIdleEnd (or stop): true if it ended
  // with nothing queued. Its CUDA streams go when it returns, before the lane is marked ended.
  bool serve(Lane& lane);
  // Takes the lanes whose thread ended with nothing queued out of lanes_ (under mu_): their
  // threads, to join once mu_ is released (they only return).
  std::vector<std::thread> takeEndedLanes();
  static void join(std::vector<std::thread>& threads);
  static void execute(gpu::WaitingCopier& gpu_copier, Job& job);

  std::function<void()> on_done_;
  std::mutex mu_;
  std::condition_variable idle_cv_;  // a job is done
  // Lanes by id; a Lane stays at its address while its thread runs (node-based map).
  std::unordered_map<LaneId, std::unique_ptr<Lane>> lanes_;
  std::vector<std::shared_ptr<Job>> done_;
  size_t outstanding_ = 0;  // submitted and not done
  bool stop_ = false;
};

}  // namespace tcpx::engine
