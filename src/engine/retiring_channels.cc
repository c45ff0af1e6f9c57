#include "engine/retiring_channels.h"

#include <sys/prctl.h>
#include <system_error>

#include "common/log.h"
#include "engine/data_path.h"

namespace tcpx::engine {

ChannelLeftovers::~ChannelLeftovers() {
  // The queues and staging first: their copies read and write the buffers (they are idle by now,
  // so their destructors' waits return at once).
  queues.clear();
  staging.clear();
  for (const auto& [buffer, device] : buffers) {
    if (device >= 0) {
      gpu::freeDevice(device, buffer);
    } else {
      gpu::freeHost(buffer);
    }
  }
}

bool RetiringChannels::copiesIdle() const {
  return DataPath::copiesIdle(out) && DataPath::copiesIdle(in) &&
         (!inline_staging || inline_staging->idle());
}

Reclaimer::~Reclaimer() {
  // A running thread works through what is queued, then ends by itself.
  if (thread_.joinable()) thread_.join();
}

void Reclaimer::dispose(std::unique_ptr<ChannelLeftovers> leftovers, int device) {
  if (!leftovers || leftovers->empty()) return;
  if (gpu::deviceCount() == 0) return;  // plain memory: freed here, as `leftovers` goes
  std::lock_guard<std::mutex> lock(mu_);
  queue_.push_back(std::move(leftovers));
  if (state_ == State::kRunning) return;  // the working thread takes it before it ends
  // The last thread set kIdle as its final step under mu_: joining it waits for no free.
  if (thread_.joinable()) thread_.join();
  device_ = device;
  try {
    thread_ = std::thread([this] { run(); });
    state_ = State::kRunning;
  } catch (const std::system_error& e) {
    // Freed here then: the progress thread may wait for the device this once.
    LOG_WARN("cannot start the engine's reclaim thread (%s): freeing on the progress thread",
             e.what());
    queue_.clear();
  }
}

void Reclaimer::run() {
  prctl(PR_SET_NAME, "tcpx-reclaim", 0UL, 0UL, 0UL);
  // Every free of this thread runs in the engine's GPU's context, also one of pinned host
  // memory, which would otherwise make a context on GPU 0 for a thread that has none.
  gpu::markEngineThread();
  const gpu::DeviceScope on_engine_gpu(device_);
  std::unique_lock<std::mutex> lock(mu_);
  while (!queue_.empty()) {
    std::unique_ptr<ChannelLeftovers> next = std::move(queue_.front());
    queue_.pop_front();
    lock.unlock();
    next.reset();
    lock.lock();
  }
  state_ = State::kIdle;
}

}  // namespace tcpx::engine
