#include "engine/local_copier.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <optional>
#include <sys/prctl.h>
#include <system_error>

#include "common/cores.h"
#include "common/log.h"

namespace tcpx::engine {

namespace {
// After a job the thread looks for the next one this long before it sleeps: a transfer that
// follows another at once (the usual pattern of small transfers) is not held up by a wake-up.
constexpr auto kSpinAfterJob = std::chrono::microseconds(50);
// From this size a copy from a peer process is split over several threads (thread start-up,
// some 50 us, is then small against the copy).
constexpr uint64_t kParallelReadBytes = uint64_t{8} << 20;
// A lane's thread ends after this long without a job (a new job starts another).
constexpr auto kLaneIdleEnd = std::chrono::seconds(2);
}  // namespace

LocalCopier::LocalCopier(std::function<void()> on_done) : on_done_(std::move(on_done)) {}

LocalCopier::~LocalCopier() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    for (auto& [id, lane] : lanes_) {
      for (auto& job : lane->queue) (void)trySkip(*job);
      lane->cv.notify_all();
    }
  }
  // A thread still copying is waited for: its job's memory must not be touched after the
  // engine is gone (a copy from a peer's page that never faults in ends with the peer's
  // process).
  for (auto& [id, lane] : lanes_) {
    if (lane->thread.joinable()) lane->thread.join();
  }
}

bool LocalCopier::submit(LaneId lane_id, std::shared_ptr<Job> job) {
  std::vector<std::thread> ended;
  std::unique_lock<std::mutex> lock(mu_);
  ended = takeEndedLanes();
  std::unique_ptr<Lane>& slot = lanes_[lane_id];
  if (!slot) slot = std::make_unique<Lane>();
  Lane& lane = *slot;
  if (lane.thread_state == ThreadState::kNone) {
    try {
      lane.thread = std::thread([this, &lane] { run(lane); });
    } catch (const std::system_error& e) {
      LOG_ERROR("cannot start a copy thread of the engine: %s", e.what());
      if (lane.queue.empty()) lanes_.erase(lane_id);
      lock.unlock();
      join(ended);
      return false;
    }
    lane.thread_state = ThreadState::kRunning;
  }
  lane.queue.push_back(std::move(job));
  lane.queued.store(lane.queue.size());
  ++outstanding_;
  lane.cv.notify_one();
  lock.unlock();
  join(ended);
  return true;
}

std::vector<std::thread> LocalCopier::takeEndedLanes() {
  std::vector<std::thread> ended;
  for (auto it = lanes_.begin(); it != lanes_.end();) {
    Lane& lane = *it->second;
    if (lane.thread_state == ThreadState::kEnded && lane.queue.empty()) {
      ended.push_back(std::move(lane.thread));
      it = lanes_.erase(it);
    } else {
      ++it;
    }
  }
  return ended;
}

void LocalCopier::join(std::vector<std::thread>& threads) {
  // Each marked its lane ended as its last step under the lock: it only returns now.
  for (std::thread& t : threads) t.join();
}

std::vector<std::shared_ptr<LocalCopier::Job>> LocalCopier::takeDone() {
  std::vector<std::shared_ptr<Job>> out;
  std::vector<std::thread> ended;
  {
    std::lock_guard<std::mutex> lock(mu_);
    out.swap(done_);
    ended = takeEndedLanes();
  }
  join(ended);
  return out;
}

void LocalCopier::waitIdle() {
  std::unique_lock<std::mutex> lock(mu_);
  idle_cv_.wait(lock, [this] { return outstanding_ == 0; });
}

bool LocalCopier::pollingPays() {
  static const bool pays = usableCores() >= 4;
  return pays;
}

bool LocalCopier::trySkip(Job& job) {
  JobState expected = JobState::kQueued;
  return job.state.compare_exchange_strong(expected, JobState::kSkipped);
}

void LocalCopier::execute(gpu::WaitingCopier& gpu_copier, Job& job) {
  if (job.read_from) {
    // A long copy from a peer process is read by several threads at once (see
    // readProcessMemoryParallel); the initiator waits meanwhile, so the cores are free.
    uint64_t total = 0;
    for (const CrossPiece& p : job.cross) total += p.len;
    const int threads =
        total < kParallelReadBytes
            ? 1
            : static_cast<int>(std::clamp<unsigned>(std::thread::hardware_concurrency(), 1, 4));
    job.result = readProcessMemory(*job.read_from, job.cross, threads, &job.progress);
    return;
  }
  if (job.device >= 0) {
    job.result = gpu_copier.copy(job.device, job.pieces, job.after);
    return;
  }
  // memmove: a transfer between overlapping ranges of one region leaves the bytes of one of the
  // two orders, never a torn copy.
  for (const gpu::CopyPiece& piece : job.pieces) std::memmove(piece.dst, piece.src, piece.len);
}

void LocalCopier::run(Lane& lane) {
  prctl(PR_SET_NAME, "tcpx-copy", 0UL, 0UL, 0UL);
  while (!serve(lane)) {
    // A job came while the lane's streams were being destroyed: serve it with new ones.
  }
}

bool LocalCopier::serve(Lane& lane) {
  std::optional<gpu::WaitingCopier> gpu_copier(std::in_place);
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    if (lane.queue.empty() && !stop_ && pollingPays()) {
      lock.unlock();
      const auto until = std::chrono::steady_clock::now() + kSpinAfterJob;
      while (lane.queued.load(std::memory_order_relaxed) == 0 &&
             std::chrono::steady_clock::now() < until) {
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
      }
      lock.lock();
    }
    (void)lane.cv.wait_for(lock, kLaneIdleEnd,
                           [this, &lane] { return !lane.queue.empty() || stop_; });
    if (lane.queue.empty()) break;  // stop_, or idle for kLaneIdleEnd
    std::shared_ptr<Job> job = std::move(lane.queue.front());
    lane.queue.pop_front();
    lane.queued.store(lane.queue.size());
    lock.unlock();
    JobState expected = JobState::kQueued;
    const bool ran = job->state.compare_exchange_strong(expected, JobState::kRunning);
    if (ran) {
      markProgress(job->progress);
      execute(*gpu_copier, *job);
    }
    lock.lock();
    if (ran) done_.push_back(std::move(job));
    --outstanding_;
    idle_cv_.notify_all();
    if (!ran) continue;
    lock.unlock();
    on_done_();
    lock.lock();
  }
  lock.unlock();
  // The streams go now, outside the lock: a thread joining this one waits for nothing else.
  gpu_copier.reset();
  lock.lock();
  if (!lane.queue.empty() && !stop_) return false;
  lane.thread_state = ThreadState::kEnded;
  return true;
}

}  // namespace tcpx::engine
