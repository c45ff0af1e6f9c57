// The socket transport's sockets are served by a fixed pool of I/O threads: threads do not grow
// with comms, a comm whose reader stalls does not hold up the others on the same thread, and the
// threads go when the last comm closes.
#include <pthread.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <gtest/gtest.h>
#include <memory>
#include <string>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <thread>
#include <vector>

#include "common/net.h"
#include "common/process_counts.h"
#include "common/random.h"
#include "transport/socket/socket_transport.h"

namespace tcpx::transport {
namespace {

using namespace std::chrono_literals;
using tools::fdCount;

size_t ioThreads() {
  return tools::threadsNamed("tcpx-sock-io");
}

// Waits (bounded) until no I/O thread is left; returns how many there are then.
size_t settleIoThreads() {
  const auto deadline = std::chrono::steady_clock::now() + 3s;
  size_t now = ioThreads();
  while (now != 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(10ms);
    now = ioThreads();
  }
  return now;
}

// A connected comm pair of one transport: both ends live in this process.
struct CommPair {
  ListenComm* listen = nullptr;
  SendComm* send = nullptr;
  RecvComm* recv = nullptr;
};

std::unique_ptr<Transport> makeTransport(int io_threads, int sockets, bool raise_sigpipe = false) {
  SocketTransportOptions opts;
  opts.raise_sigpipe = raise_sigpipe;
  opts.bind_host = "127.0.0.1";
  opts.advertise_host = "127.0.0.1";
  opts.sockets_per_comm = sockets;
  opts.min_split = 4096;
  opts.io_threads = io_threads;
  return makeSocketTransport(opts);
}

::testing::AssertionResult connect(Transport& t, CommPair* pair) {
  ConnectHandle handle{};
  if (t.listen(0, &handle, &pair->listen) != NetResult::kSuccess) {
    return ::testing::AssertionFailure() << "listen failed";
  }
  const auto deadline = std::chrono::steady_clock::now() + 5s;
  while ((pair->send == nullptr || pair->recv == nullptr) &&
         std::chrono::steady_clock::now() < deadline) {
    if (pair->send == nullptr && t.connect(0, &handle, &pair->send) != NetResult::kSuccess) {
      return ::testing::AssertionFailure() << "connect failed";
    }
    if (pair->recv == nullptr && t.accept(pair->listen, &pair->recv) != NetResult::kSuccess) {
      return ::testing::AssertionFailure() << "accept failed";
    }
  }
  if (pair->send == nullptr || pair->recv == nullptr) {
    return ::testing::AssertionFailure() << "not connected within 5 s";
  }
  return ::testing::AssertionSuccess();
}

void close(Transport& t, CommPair* pair) {
  if (pair->send != nullptr) t.closeSend(pair->send);
  if (pair->recv != nullptr) t.closeRecv(pair->recv);
  if (pair->listen != nullptr) t.closeListen(pair->listen);
  *pair = CommPair{};
}

// Polls test() until the request is done; kInProgress when `bound` passes first.
NetResult waitDone(Transport& t, Request* req, std::chrono::milliseconds bound = 20s) {
  const auto deadline = std::chrono::steady_clock::now() + bound;
  int done = 0;
  while (std::chrono::steady_clock::now() < deadline) {
    const NetResult rc = t.test(req, &done, nullptr);
    if (rc != NetResult::kSuccess || done != 0) return rc;
    std::this_thread::sleep_for(50us);
  }
  return NetResult::kInProgress;
}

// Sends `size` bytes of pattern `seed` over the pair and checks them on arrival.
::testing::AssertionResult roundTrip(Transport& t, const CommPair& pair, size_t size, uint64_t seed,
                                     std::chrono::milliseconds bound = 20s) {
  std::vector<uint8_t> src(size), dst(size);
  fillPattern(src.data(), size, seed);
  const IoSlice s{src.data(), size};
  const IoSlice d{dst.data(), size};
  Request* r = nullptr;
  Request* w = nullptr;
  if (t.irecv(pair.recv, &d, 1, 0, size, 0, nullptr, &r) != NetResult::kSuccess ||
      t.isend(pair.send, &s, 1, 0, size, 0, nullptr, &w) != NetResult::kSuccess) {
    return ::testing::AssertionFailure() << "posting failed";
  }
  if (waitDone(t, w, bound) != NetResult::kSuccess ||
      waitDone(t, r, bound) != NetResult::kSuccess) {
    return ::testing::AssertionFailure() << "not done within the bound";
  }
  if (t.irecvConsumed(pair.recv, r) != NetResult::kSuccess) {
    return ::testing::AssertionFailure() << "irecvConsumed failed";
  }
  const int64_t bad = checkPattern(dst.data(), size, seed);
  if (bad >= 0) return ::testing::AssertionFailure() << "byte " << bad << " differs";
  return ::testing::AssertionSuccess();
}

TEST(SocketIoPoolTest, CommsOfManyPeersShareAFixedNumberOfThreads) {
  constexpr int kIoThreads = 2;
  constexpr size_t kPairs = 16;
  constexpr int kSockets = 4;
  // Counted by name: a sanitizer's own threads come and go beside them.
  auto t = makeTransport(kIoThreads, kSockets);
  EXPECT_EQ(ioThreads(), 0U) << "a transport without comms runs no I/O thread";
  const size_t fds_before = fdCount();

  std::vector<CommPair> pairs(kPairs);
  for (CommPair& p : pairs) ASSERT_TRUE(connect(*t, &p));
  // 16 pairs x 2 ends x 4 sockets = 128 sockets on 2 threads.
  EXPECT_EQ(ioThreads(), static_cast<size_t>(kIoThreads));

  // Every pair moves its own bytes at once, in requests split over all 4 sockets and in
  // requests too small to split.
  constexpr size_t kBig = (3ULL << 20) + 5;
  constexpr size_t kSmall = 1000;
  std::vector<std::vector<uint8_t>> src(kPairs), dst(kPairs);
  std::vector<IoSlice> send_slices(kPairs * 2), recv_slices(kPairs * 2);
  std::vector<Request*> sends, recvs;
  for (size_t i = 0; i < kPairs; ++i) {
    src[i].resize(kBig + kSmall);
    dst[i].assign(kBig + kSmall, 0);
    fillPattern(src[i].data(), src[i].size(), 100 + i);
    send_slices[2 * i] = {src[i].data(), kBig};
    send_slices[2 * i + 1] = {src[i].data() + kBig, kSmall};
    recv_slices[2 * i] = {dst[i].data(), kBig};
    recv_slices[2 * i + 1] = {dst[i].data() + kBig, kSmall};
    for (size_t k = 0; k < 2; ++k) {
      Request* r = nullptr;
      Request* s = nullptr;
      const size_t size = k == 0 ? kBig : kSmall;
      ASSERT_EQ(t->irecv(pairs[i].recv, &recv_slices[2 * i + k], 1, 0, size, 0, nullptr, &r),
                NetResult::kSuccess);
      ASSERT_EQ(t->isend(pairs[i].send, &send_slices[2 * i + k], 1, 0, size, 0, nullptr, &s),
                NetResult::kSuccess);
      recvs.push_back(r);
      sends.push_back(s);
    }
  }
  for (Request* s : sends) ASSERT_EQ(waitDone(*t, s), NetResult::kSuccess);
  for (size_t i = 0; i < kPairs; ++i) {
    for (size_t k = 0; k < 2; ++k) {
      ASSERT_EQ(waitDone(*t, recvs[2 * i + k]), NetResult::kSuccess);
      ASSERT_EQ(t->irecvConsumed(pairs[i].recv, recvs[2 * i + k]), NetResult::kSuccess);
    }
    EXPECT_EQ(checkPattern(dst[i].data(), dst[i].size(), 100 + i), -1) << "pair " << i;
  }
  EXPECT_EQ(ioThreads(), static_cast<size_t>(kIoThreads));

  for (CommPair& p : pairs) close(*t, &p);
  EXPECT_EQ(settleIoThreads(), 0U) << "the I/O threads outlived the comms";
  EXPECT_EQ(fdCount(), fds_before);
}

TEST(SocketIoPoolTest, ACommWhoseReaderStallsDoesNotHoldUpAnotherOnTheSameThread) {
  auto t = makeTransport(1, 1);
  CommPair stalled;
  CommPair live;
  ASSERT_TRUE(connect(*t, &stalled) && connect(*t, &live));

  // 64 MiB with no receive posted: far more than the socket buffers hold, so its socket blocks.
  constexpr size_t kStalledSize = 64ULL << 20;
  std::vector<uint8_t> big_src(kStalledSize), big_dst(kStalledSize, 0);
  fillPattern(big_src.data(), big_src.size(), 7);
  const IoSlice big_send{big_src.data(), big_src.size()};
  const IoSlice big_recv{big_dst.data(), big_dst.size()};
  Request* stalled_send = nullptr;
  ASSERT_EQ(t->isend(stalled.send, &big_send, 1, 0, kStalledSize, 0, nullptr, &stalled_send),
            NetResult::kSuccess);

  // Meanwhile the same single thread serves 50 round trips of the other comm.
  for (int i = 0; i < 50; ++i) {
    ASSERT_TRUE(roundTrip(*t, live, 256ULL * 1024, 1000 + i, 5s)) << "round trip " << i;
  }
  int done = 0;
  ASSERT_EQ(t->test(stalled_send, &done, nullptr), NetResult::kSuccess);
  EXPECT_EQ(done, 0) << "64 MiB cannot have left without a reader";

  // The reader comes back: every byte arrives.
  Request* late_recv = nullptr;
  ASSERT_EQ(t->irecv(stalled.recv, &big_recv, 1, 0, kStalledSize, 0, nullptr, &late_recv),
            NetResult::kSuccess);
  ASSERT_EQ(waitDone(*t, stalled_send), NetResult::kSuccess);
  ASSERT_EQ(waitDone(*t, late_recv), NetResult::kSuccess);
  EXPECT_EQ(checkPattern(big_dst.data(), big_dst.size(), 7), -1);
  close(*t, &stalled);
  close(*t, &live);
}

TEST(SocketIoPoolTest, AFailedCommEndsItsRequestsWhileOthersOnItsThreadGoOn) {
  auto t = makeTransport(1, 2);
  CommPair doomed;
  CommPair live;
  ASSERT_TRUE(connect(*t, &doomed) && connect(*t, &live));
  std::vector<uint8_t> buf(4 << 20);
  const IoSlice slice{buf.data(), buf.size()};
  Request* pending = nullptr;
  ASSERT_EQ(t->irecv(doomed.recv, &slice, 1, 0, buf.size(), 0, nullptr, &pending),
            NetResult::kSuccess);
  t->closeSend(doomed.send);
  doomed.send = nullptr;
  EXPECT_EQ(waitDone(*t, pending), NetResult::kSystemError);

  EXPECT_TRUE(roundTrip(*t, live, 1 << 20, 5));
  close(*t, &doomed);
  close(*t, &live);
}

// Counts its calls and records whether its registration was complete when it ran.
class ProbeHandler final : public IoHandler {
 public:
  explicit ProbeHandler(const IoRegistration* reg) : reg_(reg) {}
  void onReady(uint32_t /*events*/, char* /*scratch*/) override {
    saw_unregistered_ = saw_unregistered_ || !reg_->attached();
    calls_.fetch_add(1);
  }
  [[nodiscard]] int calls() const { return calls_.load(); }
  [[nodiscard]] bool sawUnregistered() const { return saw_unregistered_; }

 private:
  const IoRegistration* reg_;
  std::atomic<int> calls_{0};
  bool saw_unregistered_ = false;  // written on the loop thread, read after detach
};

bool waitForCalls(const ProbeHandler& h, int n) {
  const auto deadline = std::chrono::steady_clock::now() + 5s;
  while (h.calls() < n && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(1ms);
  }
  return h.calls() >= n;
}

TEST(SocketIoPoolTest, ASocketReadyAtOnceIsServedWithItsRegistrationComplete) {
  // Sockets readable before they are attached, attached back to back while the loops are busy
  // serving the ones before: each handler runs at once, and must find its registration (a
  // handler that would block re-arms itself through it).
  constexpr int kSockets = 200;  // 400 descriptors: under a 1024 limit
  IoPool pool(2);
  std::vector<net::Fd> ends;
  std::vector<std::unique_ptr<IoRegistration>> regs;
  std::vector<std::unique_ptr<ProbeHandler>> handlers;
  for (int i = 0; i < kSockets; ++i) {
    int sv[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
    ends.emplace_back(sv[0]);
    ends.emplace_back(sv[1]);
    ASSERT_EQ(::write(sv[1], "x", 1), 1);
    regs.push_back(std::make_unique<IoRegistration>());
    handlers.push_back(std::make_unique<ProbeHandler>(regs.back().get()));
    std::string error;
    ASSERT_TRUE(pool.attach(sv[0], handlers.back().get(), EPOLLIN, regs.back().get(), &error))
        << error;
  }
  for (int i = 0; i < kSockets; ++i) {
    ASSERT_TRUE(waitForCalls(*handlers[static_cast<size_t>(i)], 1)) << "socket " << i;
  }
  for (auto& reg : regs) pool.detach(reg.get());
  for (int i = 0; i < kSockets; ++i) {
    EXPECT_FALSE(handlers[static_cast<size_t>(i)]->sawUnregistered()) << "socket " << i;
  }
}

TEST(SocketIoPoolTest, AnAttachThatEpollRefusesFailsAndThePoolStillServes) {
  IoPool pool(2);
  // epoll refuses regular files (EPERM): the first attach starts the loops, fails, and must
  // stop them again without waiting on itself.
  std::FILE* file = std::tmpfile();
  ASSERT_NE(file, nullptr);
  IoRegistration reg;
  ProbeHandler handler(&reg);
  std::string error;
  auto attached = std::async(std::launch::async, [&] {
    return pool.attach(fileno(file), &handler, EPOLLIN, &reg, &error);
  });
  if (attached.wait_for(10s) != std::future_status::ready) {
    std::fprintf(stderr, "IoPool::attach still blocked after 10 s: it waits on itself\n");
    std::abort();  // the stuck thread cannot be ended any other way
  }
  EXPECT_FALSE(attached.get());
  std::fclose(file);
  EXPECT_NE(error.find("epoll_ctl"), std::string::npos) << error;
  EXPECT_FALSE(reg.attached());
  EXPECT_EQ(pool.attachedCount(), 0U);

  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
  net::Fd a(sv[0]);
  net::Fd b(sv[1]);
  ASSERT_TRUE(pool.attach(a.get(), &handler, EPOLLIN, &reg, &error)) << error;
  ASSERT_EQ(::write(b.get(), "x", 1), 1);
  EXPECT_TRUE(waitForCalls(handler, 1));
  pool.detach(&reg);
}

// Closes the pair's receiving end, then sends into the broken connection until a send fails;
// returns that failure (kSuccess if none did).
NetResult sendUntilBroken(Transport& t, CommPair* pair) {
  t.closeRecv(pair->recv);
  pair->recv = nullptr;
  // Both kept for the process's life, the bytes and the slice array naming them: a failed
  // request's other parts may still be read by the I/O threads until the comm is closed
  // (Transport::isend), which the callers do after this returns, or never (a death test's child
  // exits).
  static std::vector<uint8_t> buf(1 << 20);
  static const IoSlice slice{buf.data(), buf.size()};
  for (int i = 0; i < 1000; ++i) {
    Request* r = nullptr;
    NetResult rc = t.isend(pair->send, &slice, 1, 0, buf.size(), 0, nullptr, &r);
    if (rc == NetResult::kSuccess) rc = waitDone(t, r, 5s);
    if (rc != NetResult::kSuccess) return rc;
  }
  return NetResult::kSuccess;
}

TEST(SocketIoPoolDeathTest, ATcpxLikeCommRaisesSigpipeOnlyWhereItsCreatingThreadLetsIt) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  {
    // Created on a thread that blocks SIGPIPE (as the engine's progress thread does): the
    // failure comes back and the process lives, although the I/O threads serve it.
    sigset_t pipe;
    sigemptyset(&pipe);
    sigaddset(&pipe, SIGPIPE);
    sigset_t old;
    ASSERT_EQ(pthread_sigmask(SIG_BLOCK, &pipe, &old), 0);
    auto t = makeTransport(2, 2, /*raise_sigpipe=*/true);
    CommPair pair;
    ASSERT_TRUE(connect(*t, &pair));
    ASSERT_EQ(pthread_sigmask(SIG_SETMASK, &old, nullptr), 0);
    const NetResult rc = sendUntilBroken(*t, &pair);
    EXPECT_TRUE(rc == NetResult::kRemoteError || rc == NetResult::kSystemError)
        << netResultName(rc);
    close(*t, &pair);
  }
  // Created on a thread that lets SIGPIPE through: TCPX's helper threads would take it.
  EXPECT_EXIT(
      {
        auto t = makeTransport(2, 2, /*raise_sigpipe=*/true);
        CommPair pair;
        if (connect(*t, &pair)) (void)sendUntilBroken(*t, &pair);
        std::_Exit(0);
      },
      ::testing::KilledBySignal(SIGPIPE), "");
}

}  // namespace
}  // namespace tcpx::transport
