// Data-channel set-up that a torn-down peer left inside the transport, driven to an end before
// its comms are closed.
//
// TCPX runs each accept and each connect in a thread of its own. Closing a listen comm while its
// accept thread still waits for a connection leaves that thread, its half-built comm and its
// sockets behind (the thread blocks in accept(2), which a close does not wake); a connect given
// up keeps its thread and comm until it finishes on its own. So a peer's teardown hands such
// leftovers here, and the progress loop finishes them: an accept is completed by a connection of
// our own to its listen handle (both comms are then closed, after which the listen comm is), a
// connect is polled until it yields a comm (closed at once) or fails. TCPX retries a refused
// connection for 20 s (a timed-out one three times as long) before its connect thread ends, so
// leftovers are polled for up to kSetupDrainLimit while the engine runs, and for
// kShutdownDrainLimit when it shuts down; what is unfinished then is given up with a warning: a
// connect is abandoned, a waiting accept's listen comm left open (closing it under TCPX's accept
// thread would free memory that thread still reads). Only transports whose set-up runs in
// threads of their own use this (Transport::setupRunsInThreads). Progress thread only.
#pragma once

#include <chrono>
#include <vector>

#include "transport/transport.h"

namespace tcpx::engine {

inline constexpr std::chrono::seconds kSetupDrainLimit{90};
inline constexpr std::chrono::seconds kShutdownDrainLimit{5};

class SetupDrain {
 public:
  using Clock = std::chrono::steady_clock;

  explicit SetupDrain(transport::Transport& transport) : transport_(transport) {}
  ~SetupDrain() { finish(kShutdownDrainLimit); }
  SetupDrain(const SetupDrain&) = delete;
  SetupDrain& operator=(const SetupDrain&) = delete;

  // A listen comm whose accept() was called and has not produced a comm; `listen_handle` is
  // what listen() wrote (our own connection goes there).
  void addAccept(int dev, transport::ListenComm* listen,
                 const transport::ConnectHandle& listen_handle);
  // A connect() that was called with `handle` (the very bytes, which the transport may have
  // written its state into) and has not produced a comm.
  void addConnect(int dev, const transport::ConnectHandle& handle);

  [[nodiscard]] bool empty() const { return entries_.empty(); }
  // One pass over the leftovers; the loop calls it while some remain (poll, no event).
  void poll(Clock::time_point now);
  // At engine shutdown: polls until nothing is left or `limit` passed, then gives up the rest.
  void finish(std::chrono::milliseconds limit);

 private:
  // The accept side of an entry (kNone for a connect entry).
  enum class AcceptStage : uint8_t {
    kNone,
    kWaiting,  // accept() polled, no comm yet
    kClosed,   // accepted (comm closed) or failed; the listen comm is closed
  };
  // The connect side: our own connection to an accept, or the abandoned connect.
  enum class ConnectStage : uint8_t {
    kConnecting,  // connect() polled, no comm yet
    kFinished,    // connected (comm closed) or failed
  };
  struct Entry {
    int dev = 0;
    transport::ListenComm* listen = nullptr;
    AcceptStage accept = AcceptStage::kNone;
    transport::ConnectHandle handle{};
    ConnectStage connect = ConnectStage::kConnecting;
    Clock::time_point deadline;
  };

  void pollAccept(Entry& e);
  void pollConnect(Entry& e);
  void giveUp(Entry& e, const char* when);

  transport::Transport& transport_;
  std::vector<Entry> entries_;
};

}  // namespace tcpx::engine
