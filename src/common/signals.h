// Keeping SIGPIPE away from the host process.
//
// A write to a socket whose peer is gone raises SIGPIPE, whose default action ends the process.
// Our own sockets send with MSG_NOSIGNAL, but a plugin's may not (TCPX's do not), and its helper
// threads inherit the signal mask of the thread that creates them. So every thread of ours that
// calls into a transport, and the threads it creates, keep SIGPIPE blocked: the write fails with
// EPIPE instead, and the signal stays pending on that thread, never delivered.
#pragma once

#include <csignal>

namespace tcpx {

// For a thread of our own (the progress thread, a transport's helper): SIGPIPE stays blocked
// for the thread's life.
void blockSigpipeForThisThread();

// For a caller's thread while it calls into a plugin (load, init): blocks SIGPIPE for the scope;
// one raised meanwhile is taken off the thread before its mask is restored.
class ScopedSigpipeBlock {
 public:
  ScopedSigpipeBlock();
  ~ScopedSigpipeBlock();
  ScopedSigpipeBlock(const ScopedSigpipeBlock&) = delete;
  ScopedSigpipeBlock& operator=(const ScopedSigpipeBlock&) = delete;

 private:
  sigset_t previous_{};
  bool was_pending_ = false;
};

}  // namespace tcpx
