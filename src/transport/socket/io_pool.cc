#include "transport/socket/io_pool.h"

#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <string>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <system_error>
#include <thread>
#include <unordered_map>

#include "common/cores.h"
#include "common/log.h"
#include "common/net.h"
#include "common/strings.h"

namespace tcpx::transport {
namespace {

// The id of a loop's own wake-up eventfd; sockets get ids from 1.
constexpr uint64_t kWakeId = 0;
constexpr int kEventBatch = 64;
constexpr int kMaxAutoThreads = 32;
constexpr int kMinAutoThreads = 8;
constexpr int kAutoThreadsPerCore = 2;

}  // namespace

struct IoPool::Loop {
  int index = 0;
  net::Fd epfd;
  net::Fd wake;  // eventfd: stop() writes it so that epoll_wait returns
  std::thread thread;
  // Held while a batch of events is served and by attach/detach: a handler is never called
  // while or after it is detached.
  std::mutex mu;
  std::unordered_map<uint64_t, IoHandler*> handlers;
  bool stop = false;
  size_t sockets = 0;  // attached here; guarded by the pool's mutex
  std::vector<char> scratch;
  // Handlers to call at the next turn without an event (pollAgain); the loop's thread alone
  // touches it (pollAgain is called from its handlers).
  std::vector<uint64_t> again;
  std::vector<uint64_t> polling;  // the turn's copy of `again`, reused

  bool open(std::string* error) {
    epfd = net::Fd(::epoll_create1(EPOLL_CLOEXEC));
    if (!epfd.valid()) {
      *error = strfmt("epoll_create1: %s", errnoString(errno).c_str());
      return false;
    }
    wake = net::Fd(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
    if (!wake.valid()) {
      *error = strfmt("eventfd: %s", errnoString(errno).c_str());
      epfd.reset();
      return false;
    }
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = kWakeId;
    if (::epoll_ctl(epfd.get(), EPOLL_CTL_ADD, wake.get(), &ev) != 0) {
      *error = strfmt("epoll_ctl(eventfd): %s", errnoString(errno).c_str());
      close();
      return false;
    }
    scratch.resize(kIoScratchSize);
    stop = false;
    return true;
  }

  void close() {
    again.clear();
    wake.reset();
    epfd.reset();
    std::vector<char>().swap(scratch);
  }

  void run() {
    // A broken connection never raises SIGPIPE here: the loops serve comms of every thread, so
    // the mask of whichever thread started them says nothing (a comm that must raise it, as
    // TCPX's sockets do, does so itself: SocketTransportOptions::raise_sigpipe).
    sigset_t pipe;
    sigemptyset(&pipe);
    sigaddset(&pipe, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe, nullptr);
    epoll_event events[kEventBatch];
    for (;;) {
      const int n = ::epoll_wait(epfd.get(), events, kEventBatch, again.empty() ? -1 : 0);
      if (n < 0 && errno != EINTR) {
        // Not expected with a valid epoll fd; keep serving rather than strand the sockets.
        LOG_ERROR("socket I/O loop %d: epoll_wait: %s", index, errnoString(errno).c_str());
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
      std::lock_guard<std::mutex> lock(mu);
      if (stop) return;
      for (int i = 0; i < n; ++i) {
        const uint64_t id = events[i].data.u64;
        if (id == kWakeId) {
          uint64_t count = 0;
          (void)::read(wake.get(), &count, sizeof(count));
          continue;
        }
        auto it = handlers.find(id);
        if (it == handlers.end()) continue;  // detached after epoll_wait returned it
        it->second->onReady(events[i].events, scratch.data());
      }
      polling.swap(again);
      for (const uint64_t id : polling) {
        auto it = handlers.find(id);
        if (it != handlers.end()) it->second->onReady(0, scratch.data());
      }
      polling.clear();
    }
  }

  void requestStop() {
    {
      std::lock_guard<std::mutex> lock(mu);
      stop = true;
    }
    const uint64_t one = 1;
    (void)::write(wake.get(), &one, sizeof(one));
  }
};

IoPool::IoPool(int threads) {
  const int n = std::max(1, threads);
  for (int i = 0; i < n; ++i) {
    auto loop = std::make_unique<Loop>();
    loop->index = i;
    loops_.push_back(std::move(loop));
  }
}

IoPool::~IoPool() {
  std::lock_guard<std::mutex> lock(mu_);
  if (attached_ != 0) {
    LOG_WARN("socket I/O pool destroyed with %zu sockets still attached", attached_);
  }
  stopLocked();
}

int IoPool::autoThreads() {
  return std::clamp(usableCores() * kAutoThreadsPerCore, kMinAutoThreads, kMaxAutoThreads);
}

bool IoPool::startLocked(std::string* error) {
  for (auto& loop : loops_) {
    if (!loop->open(error)) {
      stopLocked();
      return false;
    }
  }
  try {
    for (auto& loop : loops_) {
      Loop* raw = loop.get();
      raw->thread = std::thread([raw] { raw->run(); });
      // Named here, not by the thread itself: the name is there once attach() returns (as
      // `top -H`, debuggers and the tests see it).
      pthread_setname_np(raw->thread.native_handle(), "tcpx-sock-io");
    }
  } catch (const std::system_error& e) {
    *error = strfmt("cannot start a socket I/O thread: %s", e.what());
    stopLocked();
    return false;
  }
  running_ = true;
  return true;
}

void IoPool::stopLocked() {
  for (auto& loop : loops_) {
    if (loop->thread.joinable()) {
      loop->requestStop();
      loop->thread.join();
    }
  }
  for (auto& loop : loops_) {
    loop->handlers.clear();
    loop->sockets = 0;
    loop->close();
  }
  running_ = false;
}

bool IoPool::attach(int fd, IoHandler* handler, uint32_t events, IoRegistration* reg,
                    std::string* error) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!running_ && !startLocked(error)) return false;
  Loop* loop = loops_.front().get();
  for (auto& candidate : loops_) {
    if (candidate->sockets < loop->sockets) loop = candidate.get();
  }
  const uint64_t id = next_id_++;
  bool added = false;
  {
    // The handler and its registration are complete before the socket can fire: a socket that
    // is ready at once is served at once, and may re-arm itself through `reg`.
    std::lock_guard<std::mutex> loop_lock(loop->mu);
    loop->handlers.emplace(id, handler);
    *reg = IoRegistration{loop->index, id, fd};
    epoll_event ev{};
    ev.events = events | EPOLLONESHOT;
    ev.data.u64 = id;
    added = ::epoll_ctl(loop->epfd.get(), EPOLL_CTL_ADD, fd, &ev) == 0;
    if (!added) {
      *error = strfmt("epoll_ctl(ADD): %s", errnoString(errno).c_str());
      loop->handlers.erase(id);
      *reg = IoRegistration{};
    }
  }
  if (!added) {
    // Outside the loop's mutex: stopping takes it.
    if (attached_ == 0) stopLocked();
    return false;
  }
  ++loop->sockets;
  ++attached_;
  return true;
}

void IoPool::arm(const IoRegistration& reg, uint32_t events) const {
  if (!reg.attached()) return;
  epoll_event ev{};
  ev.events = events | EPOLLONESHOT;
  ev.data.u64 = reg.id;
  if (::epoll_ctl(loops_[static_cast<size_t>(reg.loop)]->epfd.get(), EPOLL_CTL_MOD, reg.fd, &ev) !=
      0) {
    LOG_ERROR("socket I/O loop %d: re-arming fd %d: %s", reg.loop, reg.fd,
              errnoString(errno).c_str());
  }
}

void IoPool::pollAgain(const IoRegistration& reg) const {
  if (!reg.attached()) return;
  // The handler runs on this loop's thread, under its mutex: `again` is that thread's alone.
  loops_[static_cast<size_t>(reg.loop)]->again.push_back(reg.id);
}

void IoPool::detach(IoRegistration* reg) {
  if (!reg->attached()) return;
  std::lock_guard<std::mutex> lock(mu_);
  Loop* loop = loops_[static_cast<size_t>(reg->loop)].get();
  {
    std::lock_guard<std::mutex> loop_lock(loop->mu);
    (void)::epoll_ctl(loop->epfd.get(), EPOLL_CTL_DEL, reg->fd, nullptr);
    loop->handlers.erase(reg->id);
  }
  --loop->sockets;
  --attached_;
  *reg = IoRegistration{};
  if (attached_ == 0) stopLocked();
}

size_t IoPool::attachedCount() const {
  std::lock_guard<std::mutex> lock(mu_);
  return attached_;
}

}  // namespace tcpx::transport
