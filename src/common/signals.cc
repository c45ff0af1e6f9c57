#include "common/signals.h"

#include <pthread.h>

#include <ctime>

namespace tcpx {
namespace {

sigset_t sigpipeSet() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGPIPE);
  return set;
}

bool sigpipePending() {
  sigset_t pending;
  sigemptyset(&pending);
  return sigpending(&pending) == 0 && sigismember(&pending, SIGPIPE) == 1;
}

}  // namespace

void blockSigpipeForThisThread() {
  const sigset_t set = sigpipeSet();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

ScopedSigpipeBlock::ScopedSigpipeBlock() {
  const sigset_t set = sigpipeSet();
  pthread_sigmask(SIG_BLOCK, &set, &previous_);
  was_pending_ = sigpipePending();
}

ScopedSigpipeBlock::~ScopedSigpipeBlock() {
  // A SIGPIPE raised while blocked would be delivered the moment the mask is restored: take it.
  if (!was_pending_ && sigismember(&previous_, SIGPIPE) == 0 && sigpipePending()) {
    const sigset_t set = sigpipeSet();
    const timespec none{0, 0};
    (void)sigtimedwait(&set, nullptr, &none);
  }
  pthread_sigmask(SIG_SETMASK, &previous_, nullptr);
}

}  // namespace tcpx
