#include "engine/setup_drain.h"

#include <algorithm>
#include <thread>

#include "common/log.h"

namespace tcpx::engine {

void SetupDrain::addAccept(int dev, transport::ListenComm* listen,
                           const transport::ConnectHandle& listen_handle) {
  LOG_DEBUG("set-up drain: finishing an accept under way (device %d)", dev);
  Entry e;
  e.dev = dev;
  e.listen = listen;
  e.accept = AcceptStage::kWaiting;
  e.handle = listen_handle;
  e.deadline = Clock::now() + kSetupDrainLimit;
  entries_.push_back(e);
}

void SetupDrain::addConnect(int dev, const transport::ConnectHandle& handle) {
  LOG_DEBUG("set-up drain: finishing a connect under way (device %d)", dev);
  Entry e;
  e.dev = dev;
  e.handle = handle;
  e.deadline = Clock::now() + kSetupDrainLimit;
  entries_.push_back(e);
}

void SetupDrain::pollAccept(Entry& e) {
  if (e.accept != AcceptStage::kWaiting) return;
  transport::RecvComm* comm = nullptr;
  const transport::NetResult rc = transport_.accept(e.listen, &comm);
  if (rc == transport::NetResult::kSuccess && comm == nullptr) return;
  LOG_DEBUG("set-up drain: accept ended (%s, %s)", transport::netResultName(rc),
            comm != nullptr ? "connected" : "no comm");
  if (comm != nullptr) transport_.closeRecv(comm);
  // The accept is over: its listen comm may go (a pending connection of ours is refused).
  transport_.closeListen(e.listen);
  e.listen = nullptr;
  e.accept = AcceptStage::kClosed;
}

void SetupDrain::pollConnect(Entry& e) {
  if (e.connect != ConnectStage::kConnecting) return;
  // Polled to its end even when the accept it was meant for took another connection: once the
  // listen comm is closed it fails, and the transport has released what it held.
  transport::SendComm* comm = nullptr;
  const transport::NetResult rc = transport_.connect(e.dev, &e.handle, &comm);
  if (rc == transport::NetResult::kSuccess && comm == nullptr) return;
  LOG_DEBUG("set-up drain: %s ended (%s, %s)",
            e.accept == AcceptStage::kNone ? "connect" : "connection to a waiting accept",
            transport::netResultName(rc), comm != nullptr ? "connected" : "no comm");
  if (comm != nullptr) transport_.closeSend(comm);
  e.connect = ConnectStage::kFinished;
}

void SetupDrain::giveUp(Entry& e, const char* when) {
  // A waiting accept's listen comm is left open, not closed: TCPX's accept thread keeps using
  // it (its socket stays in accept(2)), and closing frees what that thread reads once a
  // connection still arrives. Leaking it is the safe choice.
  LOG_WARN(
      "data-channel set-up left by a failed or removed peer did not finish %s; %s (the "
      "transport keeps its thread and sockets)",
      when,
      e.accept == AcceptStage::kWaiting ? "its listen comm is left open"
                                        : "the connect is given up");
  if (e.connect == ConnectStage::kConnecting) transport_.abandonConnect(&e.handle);
}

void SetupDrain::poll(Clock::time_point now) {
  for (Entry& e : entries_) {
    // Accept first: our own connection (pollConnect) is what lets a waiting accept finish.
    pollAccept(e);
    pollConnect(e);
    pollAccept(e);
    const bool done = e.accept != AcceptStage::kWaiting && e.connect == ConnectStage::kFinished;
    if (!done && now >= e.deadline) {
      giveUp(e, "within the drain limit (90 s)");
      e.accept = AcceptStage::kClosed;
      e.connect = ConnectStage::kFinished;
    }
  }
  std::erase_if(entries_, [](const Entry& e) {
    return e.accept != AcceptStage::kWaiting && e.connect == ConnectStage::kFinished;
  });
}

void SetupDrain::finish(std::chrono::milliseconds limit) {
  const Clock::time_point deadline = Clock::now() + limit;
  while (!entries_.empty() && Clock::now() < deadline) {
    poll(Clock::now());
    if (!entries_.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  for (Entry& e : entries_) giveUp(e, "before the engine shut down");
  entries_.clear();
}

}  // namespace tcpx::engine
