// A fixed pool of I/O threads that serve many non-blocking sockets through epoll.
//
// The socket transport attaches every data socket to one loop of the pool, so an engine's
// threads no longer grow with its peers: N loops serve any number of sockets. Each loop is one
// thread blocked in epoll_wait (no CPU while idle). A socket is armed one-shot for the events it
// waits for (EPOLLONESHOT): once it fires, the loop calls its handler and the socket stays quiet
// until someone arms it again, so a socket without work never spins, whatever its state (hang-up
// and error events included).
//
// Invariants:
// - A handler is only ever called on its loop's thread, and never after detach() returned: a loop
//   serves a batch of events while holding its mutex, detach() takes that mutex, and events are
//   looked up by registration id, so an event of a detached socket finds nothing.
// - Handlers must not block and must not attach or detach (they run under the loop's mutex).
// - A loop blocks in epoll_wait only while no handler asked to be polled again (pollAgain): a
//   loop with such a handler spins, serving it once per turn, until the handler stops asking.
// - The pool's threads exist only while at least one socket is attached: an engine without
//   connected peers holds none, and the last detach joins them.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

namespace tcpx::transport {

// Served by a loop when its socket's armed events fire.
class IoHandler {
 public:
  virtual ~IoHandler() = default;
  // `events` are epoll's bits; `scratch` is the loop's kIoScratchSize-byte buffer, usable until
  // the call returns (receives with nowhere to put their bytes discard them into it).
  virtual void onReady(uint32_t events, char* scratch) = 0;
};

constexpr size_t kIoScratchSize = 64ULL * 1024;

// Where an attached socket lives: its loop and its id there.
struct IoRegistration {
  int loop = -1;
  uint64_t id = 0;
  int fd = -1;
  [[nodiscard]] bool attached() const { return loop >= 0; }
};

class IoPool {
 public:
  // `threads` loops (at least 1), started by the first attach.
  explicit IoPool(int threads);
  ~IoPool();
  IoPool(const IoPool&) = delete;
  IoPool& operator=(const IoPool&) = delete;

  // Resolves the `auto` (0) setting: two loops per core, 8 to 32. A peer's channels use 8 sockets
  // per direction by default, and each should have a loop of its own: with fewer loops a large
  // transfer lost about a tenth of its rate even on a 2-core machine (loops take turns on
  // sockets whose buffers wait). With many peers active at once a loop spends most of its time
  // inside the kernel's copies, and more loops than cores kept more sockets moving (8 peers at
  // 64 MiB on 16 cores: 0.74-0.77 of raw with 16 loops, 0.84-0.88 with 32). An idle loop costs
  // nothing but its stack.
  static int autoThreads();

  [[nodiscard]] int threads() const { return static_cast<int>(loops_.size()); }

  // Attaches `fd` (non-blocking) on the least-loaded loop, armed one-shot for `events` (0 =
  // armed for nothing: only a hang-up or error is reported, once). False (nothing attached) when
  // the loops cannot be started or epoll refuses the socket; `*error` says why.
  bool attach(int fd, IoHandler* handler, uint32_t events, IoRegistration* reg, std::string* error);
  // Arms the socket again, one-shot, for `events`. Any thread; a no-op once detached.
  void arm(const IoRegistration& reg, uint32_t events) const;
  // Calls the socket's handler again at its loop's next turn, without an event (events = 0); the
  // loop does not block in epoll_wait meanwhile. For a handler that waits for something no
  // descriptor signals (bytes a GPU copy is still writing). Only from that handler's onReady().
  void pollAgain(const IoRegistration& reg) const;
  // After this returns the handler is not running and will not be called again.
  void detach(IoRegistration* reg);

  // Sockets attached now (for tests and counters).
  [[nodiscard]] size_t attachedCount() const;

 private:
  struct Loop;
  bool startLocked(std::string* error);
  void stopLocked();

  mutable std::mutex mu_;  // attach/detach bookkeeping, start and stop of the loops
  std::vector<std::unique_ptr<Loop>> loops_;
  size_t attached_ = 0;
  bool running_ = false;
  uint64_t next_id_ = 1;
};

}  // namespace tcpx::transport
