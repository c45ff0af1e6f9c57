// The socket transport honours the ncclNet/TCPX contract the engine relies on, and moves bytes
// exactly: FIFO per comm, equal sizes, <= 16 outstanding, test the oldest, consume in order.
#include "transport/socket/socket_transport.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <ctime>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <string>
#include <sys/socket.h>
#include <thread>
#include <vector>

#include "common/net.h"
#include "common/random.h"

namespace tcpx::transport {
namespace {

using namespace std::chrono_literals;

class SocketTransportTest : public ::testing::Test {
 protected:
  void SetUp() override {
    SocketTransportOptions opts;
    opts.bind_host = "127.0.0.1";
    opts.advertise_host = "127.0.0.1";
    opts.sockets_per_comm = 3;
    opts.min_split = 4096;
    transport_ = makeSocketTransport(opts);
    ASSERT_EQ(transport_->listen(0, &handle_, &listen_), NetResult::kSuccess);
  }

  void TearDown() override {
    closeComms();
    if (listen_ != nullptr) transport_->closeListen(listen_);
  }

  void closeComms() {
    if (send_ != nullptr) transport_->closeSend(send_);
    if (recv_ != nullptr) transport_->closeRecv(recv_);
    send_ = nullptr;
    recv_ = nullptr;
  }

  void connectPair() {
    ConnectHandle h = handle_;
    const auto deadline = std::chrono::steady_clock::now() + 5s;
    while ((send_ == nullptr || recv_ == nullptr) && std::chrono::steady_clock::now() < deadline) {
      if (send_ == nullptr) {
        ASSERT_EQ(transport_->connect(0, &h, &send_), NetResult::kSuccess);
      }
      if (recv_ == nullptr) {
        ASSERT_EQ(transport_->accept(listen_, &recv_), NetResult::kSuccess);
      }
    }
    ASSERT_NE(send_, nullptr);
    ASSERT_NE(recv_, nullptr);
  }

  // Polls test() on a request until done; returns the last result.
  NetResult waitDone(Request* req, size_t* size = nullptr) {
    const auto deadline = std::chrono::steady_clock::now() + 10s;
    int done = 0;
    size_t got = 0;
    NetResult rc = NetResult::kSuccess;
    while (done == 0 && std::chrono::steady_clock::now() < deadline) {
      rc = transport_->test(req, &done, &got);
      if (rc != NetResult::kSuccess) return rc;
      if (done == 0) std::this_thread::sleep_for(100us);
    }
    if (size != nullptr) *size = got;
    return done != 0 ? rc : NetResult::kInProgress;
  }

  std::unique_ptr<Transport> transport_;
  ConnectHandle handle_{};
  ListenComm* listen_ = nullptr;
  SendComm* send_ = nullptr;
  RecvComm* recv_ = nullptr;
};

TEST_F(SocketTransportTest, ReportsOneHostDeviceWithTcpxLikeProperties) {
  int ndev = 0;
  ASSERT_EQ(transport_->devices(&ndev), NetResult::kSuccess);
  EXPECT_EQ(ndev, 1);
  Properties props;
  ASSERT_EQ(transport_->getProperties(0, &props), NetResult::kSuccess);
  EXPECT_EQ(props.max_recvs, 1);
  EXPECT_EQ(props.ptr_support, kPtrHost);
  EXPECT_EQ(transport_->getProperties(1, &props), NetResult::kInvalidArgument);
}

TEST_F(SocketTransportTest, MovesScatterGatherRequestsExactlyAndInOrder) {
  connectPair();
  // Source: three slices; destination: two differently cut slices. Offsets start mid-slice.
  std::vector<uint8_t> s1(70000), s2(5), s3(300000), d1(123457), d2(300000);
  fillPattern(s1.data(), s1.size(), 1);
  fillPattern(s2.data(), s2.size(), 2);
  fillPattern(s3.data(), s3.size(), 3);
  const IoSlice src[] = {{s1.data(), s1.size()}, {s2.data(), s2.size()}, {s3.data(), s3.size()}};
  const IoSlice dst[] = {{d1.data(), d1.size()}, {d2.data(), d2.size()}};
  const size_t size = 300000;  // from offset 10 of the source, to offset 7 of the destination
  Request* rs = nullptr;
  Request* rr = nullptr;
  ASSERT_EQ(transport_->irecv(recv_, dst, 2, 7, size, 0, nullptr, &rr), NetResult::kSuccess);
  ASSERT_EQ(transport_->isend(send_, src, 3, 10, size, 0, nullptr, &rs), NetResult::kSuccess);
  ASSERT_EQ(waitDone(rs), NetResult::kSuccess);
  size_t got = 0;
  ASSERT_EQ(waitDone(rr, &got), NetResult::kSuccess);
  EXPECT_EQ(got, size);
  ASSERT_EQ(transport_->irecvConsumed(recv_, rr), NetResult::kSuccess);

  std::vector<uint8_t> sent, received;
  for (const auto& s : src)
    sent.insert(sent.end(), static_cast<uint8_t*>(s.data), static_cast<uint8_t*>(s.data) + s.size);
  for (const auto& d : dst)
    received.insert(received.end(), static_cast<uint8_t*>(d.data),
                    static_cast<uint8_t*>(d.data) + d.size);
  EXPECT_TRUE(std::equal(sent.begin() + 10, sent.begin() + 10 + size, received.begin() + 7));
  EXPECT_TRUE(
      std::all_of(received.begin(), received.begin() + 7, [](uint8_t b) { return b == 0; }));
  EXPECT_TRUE(
      std::all_of(received.begin() + 7 + size, received.end(), [](uint8_t b) { return b == 0; }));
}

TEST_F(SocketTransportTest, SixteenRequestsMayBeOutstandingButNotSeventeen) {
  connectPair();
  // Every request gets its own bytes: requests of one comm run in parallel on its sockets.
  std::vector<uint8_t> src(17 * 1024), dst(17 * 1024);
  std::vector<IoSlice> send_slices, recv_slices;
  for (int i = 0; i < 17; ++i) {
    send_slices.push_back({src.data() + i * 1024, 1024});
    recv_slices.push_back({dst.data() + i * 1024, 1024});
  }
  std::vector<Request*> recvs;
  for (int i = 0; i < kMaxRequestsPerComm; ++i) {
    Request* r = nullptr;
    ASSERT_EQ(transport_->irecv(recv_, &recv_slices[i], 1, 0, 1024, 0, nullptr, &r),
              NetResult::kSuccess);
    recvs.push_back(r);
  }
  Request* extra = nullptr;
  EXPECT_EQ(transport_->irecv(recv_, &recv_slices[16], 1, 0, 1024, 0, nullptr, &extra),
            NetResult::kInternalError);
  // Receives hold their slot until consumed, even when done.
  std::vector<Request*> sends;
  for (int i = 0; i < kMaxRequestsPerComm; ++i) {
    Request* s = nullptr;
    ASSERT_EQ(transport_->isend(send_, &send_slices[i], 1, 0, 1024, 0, nullptr, &s),
              NetResult::kSuccess);
    sends.push_back(s);
  }
  for (Request* s : sends) ASSERT_EQ(waitDone(s), NetResult::kSuccess);
  ASSERT_EQ(waitDone(recvs[0]), NetResult::kSuccess);
  EXPECT_EQ(transport_->irecv(recv_, &recv_slices[16], 1, 0, 1024, 0, nullptr, &extra),
            NetResult::kInternalError);
  ASSERT_EQ(transport_->irecvConsumed(recv_, recvs[0]), NetResult::kSuccess);
  EXPECT_EQ(transport_->irecv(recv_, &recv_slices[16], 1, 0, 1024, 0, nullptr, &extra),
            NetResult::kSuccess);
  // Receives are still posted into `dst`: close (which joins the helpers) before it goes away.
  closeComms();
}

TEST_F(SocketTransportTest, TestingANewerRequestOrConsumingOutOfOrderIsAnError) {
  connectPair();
  std::vector<uint8_t> src(200), dst(200);
  const IoSlice s0{src.data(), 100}, s1{src.data() + 100, 100};
  const IoSlice d0{dst.data(), 100}, d1{dst.data() + 100, 100};
  Request* r0 = nullptr;
  Request* r1 = nullptr;
  ASSERT_EQ(transport_->irecv(recv_, &d0, 1, 0, 100, 0, nullptr, &r0), NetResult::kSuccess);
  ASSERT_EQ(transport_->irecv(recv_, &d1, 1, 0, 100, 0, nullptr, &r1), NetResult::kSuccess);
  int done = 0;
  size_t size = 0;
  EXPECT_EQ(transport_->test(r1, &done, &size), NetResult::kInternalError);    // not the oldest
  EXPECT_EQ(transport_->irecvConsumed(recv_, r0), NetResult::kInternalError);  // not done yet
  Request* w0 = nullptr;
  Request* w1 = nullptr;
  ASSERT_EQ(transport_->isend(send_, &s0, 1, 0, 100, 0, nullptr, &w0), NetResult::kSuccess);
  ASSERT_EQ(transport_->isend(send_, &s1, 1, 0, 100, 0, nullptr, &w1), NetResult::kSuccess);
  ASSERT_EQ(waitDone(r0), NetResult::kSuccess);
  ASSERT_EQ(waitDone(r1), NetResult::kSuccess);
  EXPECT_EQ(transport_->irecvConsumed(recv_, r1), NetResult::kInternalError);  // r0 first
  EXPECT_EQ(transport_->irecvConsumed(recv_, r0), NetResult::kSuccess);
  EXPECT_EQ(transport_->irecvConsumed(recv_, r1), NetResult::kSuccess);
  ASSERT_EQ(waitDone(w0), NetResult::kSuccess);
  ASSERT_EQ(waitDone(w1), NetResult::kSuccess);
}

TEST_F(SocketTransportTest, ZeroByteAndNullDataRequestsKeepTheStreamInStep) {
  connectPair();
  std::vector<uint8_t> src(200000), dst(200000);
  fillPattern(src.data(), src.size(), 9);
  const IoSlice s{src.data(), src.size()};
  const IoSlice d{dst.data(), dst.size()};
  Request* r[4] = {};
  Request* w[4] = {};
  // zero bytes, filler (null send) into discard (null recv), filler into a real buffer, data.
  ASSERT_EQ(transport_->irecv(recv_, &d, 1, 0, 0, 0, nullptr, &r[0]), NetResult::kSuccess);
  ASSERT_EQ(transport_->irecv(recv_, nullptr, 0, 0, 150000, 0, nullptr, &r[1]),
            NetResult::kSuccess);
  ASSERT_EQ(transport_->irecv(recv_, &d, 1, 0, 1000, 0, nullptr, &r[2]), NetResult::kSuccess);
  ASSERT_EQ(transport_->irecv(recv_, &d, 1, 1000, 199000, 0, nullptr, &r[3]), NetResult::kSuccess);
  ASSERT_EQ(transport_->isend(send_, &s, 1, 0, 0, 0, nullptr, &w[0]), NetResult::kSuccess);
  ASSERT_EQ(transport_->isend(send_, &s, 1, 0, 150000, 0, nullptr, &w[1]), NetResult::kSuccess);
  ASSERT_EQ(transport_->isend(send_, nullptr, 0, 0, 1000, 0, nullptr, &w[2]), NetResult::kSuccess);
  ASSERT_EQ(transport_->isend(send_, &s, 1, 1000, 199000, 0, nullptr, &w[3]), NetResult::kSuccess);
  for (Request* x : w) ASSERT_EQ(waitDone(x), NetResult::kSuccess);
  for (Request* x : r) {
    ASSERT_EQ(waitDone(x), NetResult::kSuccess);
    ASSERT_EQ(transport_->irecvConsumed(recv_, x), NetResult::kSuccess);
  }
  EXPECT_TRUE(std::all_of(dst.begin(), dst.begin() + 1000, [](uint8_t b) { return b == 0; }));
  EXPECT_EQ(checkPattern(dst.data() + 1000, 199000, 9, 1000), -1);
}

// A reporting receive stores, per part, how many bytes have landed: a reader that sees a count
// finds that prefix of the part in place (what a GPU kernel copying the part on relies on), the
// counts never go back nor past the part, and they end at the part's length.
TEST_F(SocketTransportTest, AReportingReceiveCountsEachPartsLandedPrefix) {
  connectPair();
  // 3 sockets, parts of at least 4 KiB: the split both ends compute from the size.
  EXPECT_EQ(transport_->receiveParts(recv_, 1000), 1);
  EXPECT_EQ(transport_->receiveParts(recv_, 8192), 2);
  EXPECT_EQ(transport_->receiveParts(recv_, 1 << 20), 3);
  const size_t size = (24U << 20) + 5;
  const int parts = transport_->receiveParts(recv_, size);
  ASSERT_EQ(parts, 3);
  std::vector<uint8_t> src(size), dst(size);
  fillPattern(src.data(), src.size(), 11);
  const IoSlice from{src.data(), src.size()};
  const IoSlice into{dst.data(), dst.size()};
  std::vector<uint32_t> words(parts, 0);
  Request* bad = nullptr;
  EXPECT_EQ(transport_->irecvReporting(recv_, &into, 1, 0, size, nullptr, &bad),
            NetResult::kInvalidArgument);
  EXPECT_EQ(bad, nullptr);
  Request* r = nullptr;
  ASSERT_EQ(transport_->irecvReporting(recv_, &into, 1, 0, size, words.data(), &r),
            NetResult::kSuccess);

  // The reader: checks every count it sees against the bytes in place.
  std::atomic<bool> stop{false};
  std::vector<std::string> problems;
  int partial_views = 0;
  std::thread reader([&] {
    std::vector<uint32_t> last(parts, 0);
    while (!stop.load()) {
      for (int k = 0; k < parts; ++k) {
        const size_t begin = size * k / parts;
        const size_t len = size * (k + 1) / parts - begin;
        const uint32_t n = std::atomic_ref<uint32_t>(words[k]).load(std::memory_order_acquire);
        if (n < last[k] || n > len) {
          problems.push_back("part " + std::to_string(k) + " count " + std::to_string(n));
        } else if (n > last[k]) {
          if (n < len) ++partial_views;
          // The newly counted bytes are the sender's (checking only those keeps up with it).
          if (std::memcmp(dst.data() + begin + last[k], src.data() + begin + last[k],
                          n - last[k]) != 0) {
            problems.push_back("part " + std::to_string(k) + " bytes before " + std::to_string(n));
          }
          last[k] = n;
        }
      }
    }
  });
  Request* w = nullptr;
  // No ASSERT until the reader is joined.
  const NetResult sent = transport_->isend(send_, &from, 1, 0, size, 0, nullptr, &w);
  EXPECT_EQ(sent, NetResult::kSuccess);
  if (sent == NetResult::kSuccess) {
    EXPECT_EQ(waitDone(w), NetResult::kSuccess);
  }
  const NetResult received = sent == NetResult::kSuccess ? waitDone(r) : NetResult::kInProgress;
  stop = true;
  reader.join();
  ASSERT_EQ(received, NetResult::kSuccess);
  ASSERT_EQ(transport_->irecvConsumed(recv_, r), NetResult::kSuccess);
  EXPECT_TRUE(problems.empty()) << problems.front();
  for (int k = 0; k < parts; ++k) {
    EXPECT_EQ(words[k], size * (k + 1) / parts - size * k / parts) << "part " << k;
  }
  EXPECT_EQ(std::memcmp(dst.data(), src.data(), size), 0);
  RecordProperty("partial_views", partial_views);
}

// A following send leaves only the bytes its copy has put in place: a copier fills the buffer
// unit by unit and raises each part's count after the unit, with pauses shorter than the
// sockets' polling and one longer; bytes sent before they were written would arrive as the
// buffer's old 0xEE. The send completes only once every count reached its part's end.
TEST_F(SocketTransportTest, AFollowingSendLeavesOnlyTheBytesItsCopyPutInPlace) {
  connectPair();
  const size_t size = (3U << 20) + 7;
  const int parts = transport_->sendParts(send_, size);
  ASSERT_EQ(parts, 3);
  EXPECT_EQ(transport_->sendParts(send_, 1000), 1);
  std::vector<uint8_t> want(size), buffer(size, 0xEE), dst(size, 0);
  fillPattern(want.data(), want.size(), 21);
  const IoSlice from{buffer.data(), buffer.size()};
  const IoSlice into{dst.data(), dst.size()};
  std::vector<uint32_t> words(parts, 0);
  Request* bad = nullptr;
  EXPECT_EQ(transport_->isendFollowing(send_, &from, 1, 0, size, nullptr, &bad),
            NetResult::kInvalidArgument);
  EXPECT_EQ(bad, nullptr);
  // A part too long for its word's count (refused before any byte of the slices is read).
  const size_t huge = size_t{UINT32_MAX} + 1;
  EXPECT_EQ(transport_->isendFollowing(send_, &from, 1, 0, huge, words.data(), &bad),
            NetResult::kInvalidArgument);
  EXPECT_EQ(bad, nullptr);
  Request* r = nullptr;
  Request* w = nullptr;
  ASSERT_EQ(transport_->irecv(recv_, &into, 1, 0, size, 0, nullptr, &r), NetResult::kSuccess);
  ASSERT_EQ(transport_->isendFollowing(send_, &from, 1, 0, size, words.data(), &w),
            NetResult::kSuccess);

  constexpr size_t kUnit = size_t{64} * 1024;
  std::atomic<int> units_done{0};
  std::atomic<bool> looked{false};  // the main thread tested the send half way
  std::thread copier([&] {
    int unit = 0;
    for (size_t at = 0; at < size; at += kUnit, ++unit) {
      const size_t end = std::min(size, at + kUnit);
      std::memcpy(buffer.data() + at, want.data() + at, end - at);
      for (int p = 0; p < parts; ++p) {
        const size_t begin = size * p / parts;
        const size_t stop = size * (p + 1) / parts;
        if (end <= begin || at >= stop) continue;
        const size_t count = std::min(end, stop) - begin;
        std::atomic_ref<uint32_t>(words[p]).store(static_cast<uint32_t>(count),
                                                  std::memory_order_release);
      }
      units_done.store(unit + 1);
      while (unit == 19 && !looked.load()) std::this_thread::sleep_for(50us);
      // One pause longer than the sockets poll: they stop, and the rest goes on the recheck that
      // follows the copy's end (as the engine's, once the copy's event is reached).
      std::this_thread::sleep_for(unit == 40 ? 2ms : 20us);
    }
    transport_->recheckFollowing(w);
  });
  // Half way, the send cannot be complete.
  while (units_done.load() < 20) std::this_thread::sleep_for(50us);
  int done = 0;
  size_t got = 0;
  const NetResult mid = transport_->test(w, &done, &got);
  looked = true;
  copier.join();
  EXPECT_EQ(mid, NetResult::kSuccess);
  EXPECT_EQ(done, 0) << "the send completed before its copy did";
  ASSERT_EQ(waitDone(w), NetResult::kSuccess);
  ASSERT_EQ(waitDone(r), NetResult::kSuccess);
  ASSERT_EQ(transport_->irecvConsumed(recv_, r), NetResult::kSuccess);
  EXPECT_EQ(std::memcmp(dst.data(), want.data(), size), 0);
}

// A following send whose copy does not move stops polling (the process is idle) and leaves
// nothing more until recheckFollowing(); the bytes then go. Closing a comm whose send still
// waits returns at once.
TEST_F(SocketTransportTest, AFollowingSendWaitsIdleForItsCopyAndGoesOnARecheck) {
  connectPair();
  const size_t size = size_t{256} * 1024;
  const int parts = transport_->sendParts(send_, size);
  std::vector<uint8_t> buffer(size), dst(size, 0);
  fillPattern(buffer.data(), buffer.size(), 22);
  const IoSlice from{buffer.data(), buffer.size()};
  const IoSlice into{dst.data(), dst.size()};
  std::vector<uint32_t> words(parts, 0);
  Request* r = nullptr;
  Request* w = nullptr;
  ASSERT_EQ(transport_->irecv(recv_, &into, 1, 0, size, 0, nullptr, &r), NetResult::kSuccess);
  ASSERT_EQ(transport_->isendFollowing(send_, &from, 1, 0, size, words.data(), &w),
            NetResult::kSuccess);
  std::this_thread::sleep_for(20ms);  // past the polling
  const auto cpu = [] {
    timespec ts{};
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return std::chrono::seconds(ts.tv_sec) + std::chrono::nanoseconds(ts.tv_nsec);
  };
  const auto cpu_before = cpu();
  std::this_thread::sleep_for(200ms);
  const auto spent = cpu() - cpu_before;
  EXPECT_LT(spent, 40ms) << "the sockets kept polling a copy that did not move";
  int done = 0;
  size_t got = 0;
  ASSERT_EQ(transport_->test(w, &done, &got), NetResult::kSuccess);
  EXPECT_EQ(done, 0);
  // Raised without a recheck: nothing polls, so the bytes stay (the receive cannot complete).
  for (int k = 0; k < parts; ++k) {
    std::atomic_ref<uint32_t>(words[k]).store(0xFFFFFFFEU, std::memory_order_release);
  }
  std::this_thread::sleep_for(20ms);
  ASSERT_EQ(transport_->test(r, &done, &got), NetResult::kSuccess);
  EXPECT_EQ(done, 0) << "a socket sent bytes nobody told it were there";
  transport_->recheckFollowing(w);
  ASSERT_EQ(waitDone(w), NetResult::kSuccess);
  ASSERT_EQ(waitDone(r), NetResult::kSuccess);
  ASSERT_EQ(transport_->irecvConsumed(recv_, r), NetResult::kSuccess);
  EXPECT_EQ(std::memcmp(dst.data(), buffer.data(), size), 0);

  // A second one that never gets its bytes: the comms close at once.
  std::fill(words.begin(), words.end(), 0);
  ASSERT_EQ(transport_->isendFollowing(send_, &from, 1, 0, size, words.data(), &w),
            NetResult::kSuccess);
  std::this_thread::sleep_for(5ms);
  const auto t0 = std::chrono::steady_clock::now();
  closeComms();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 1s);
}

TEST_F(SocketTransportTest, ASizeMismatchBetweenSenderAndReceiverFailsTheComm) {
  connectPair();
  std::vector<uint8_t> src(4096), dst(4096);
  const IoSlice from{src.data(), src.size()};
  const IoSlice into{dst.data(), dst.size()};
  Request* r = nullptr;
  Request* s = nullptr;
  ASSERT_EQ(transport_->irecv(recv_, &into, 1, 0, 100, 0, nullptr, &r), NetResult::kSuccess);
  ASSERT_EQ(transport_->isend(send_, &from, 1, 0, 200, 0, nullptr, &s), NetResult::kSuccess);
  EXPECT_EQ(waitDone(r), NetResult::kRemoteError);
  EXPECT_NE(transport_->commError(recv_).find("out of step"), std::string::npos);
  closeComms();  // the send may still be in flight: its buffer must outlive the comms
}

TEST_F(SocketTransportTest, AClosedPeerFailsPendingReceivesInsteadOfHanging) {
  connectPair();
  std::vector<uint8_t> buf(1 << 20);
  const IoSlice slice{buf.data(), buf.size()};
  Request* r = nullptr;
  ASSERT_EQ(transport_->irecv(recv_, &slice, 1, 0, buf.size(), 0, nullptr, &r),
            NetResult::kSuccess);
  transport_->closeSend(send_);
  send_ = nullptr;
  // End of stream: the peer closed its end, reported as TCPX reports a closed peer (a reset or
  // broken connection, or a peer out of step, gives kRemoteError).
  EXPECT_EQ(waitDone(r), NetResult::kSystemError);
  EXPECT_NE(transport_->commError(recv_).find("closed by peer"), std::string::npos)
      << transport_->commError(recv_);
}

TEST_F(SocketTransportTest, StrangersOnTheDataPortAreDroppedAndTheRealPeerStillGetsIn) {
  // A raw connection that sends garbage instead of the transport's hello.
  net::Fd stranger(::socket(AF_INET, SOCK_STREAM, 0));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  uint16_t port = 0;
  std::memcpy(&port, handle_.bytes + 6, 2);
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::connect(stranger.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  const char junk[64] = "GET / HTTP/1.0\r\n\r\n";
  ASSERT_EQ(::send(stranger.get(), junk, sizeof(junk), 0), static_cast<ssize_t>(sizeof(junk)));
  connectPair();
  // The stranger's connection is closed by the listener (FIN, or RST since it sent unread bytes).
  char byte = 0;
  EXPECT_LE(::recv(stranger.get(), &byte, 1, 0), 0);
}

TEST_F(SocketTransportTest, IdleConnectionsToADataListenerDoNotLockTheRealPeerOut) {
  // More idle connections than the listener keeps while waiting for hellos: the oldest make
  // room, so the real connector still gets in.
  std::vector<net::Fd> idle;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  uint16_t port = 0;
  std::memcpy(&port, handle_.bytes + 6, 2);
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  for (int i = 0; i < 80; ++i) {
    net::Fd fd(::socket(AF_INET, SOCK_STREAM, 0));
    ASSERT_EQ(::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    idle.push_back(std::move(fd));
    // The listener takes them in as they come (its accept queue holds only so many).
    RecvComm* none = nullptr;
    ASSERT_EQ(transport_->accept(listen_, &none), NetResult::kSuccess);
    EXPECT_EQ(none, nullptr);
  }
  connectPair();
}

TEST_F(SocketTransportTest, AConnectThatReachedAnotherListenerFailsItsFirstSend) {
  // The handle names this listener's address but another listen's nonce: the listener refuses
  // the hello and never acknowledges it, so the first send fails instead of reporting bytes
  // delivered that nobody took.
  ConnectHandle wrong = handle_;
  uint64_t nonce = 0;
  std::memcpy(&nonce, wrong.bytes + 24, sizeof(nonce));
  nonce ^= 1;
  std::memcpy(wrong.bytes + 24, &nonce, sizeof(nonce));
  SendComm* comm = nullptr;
  const auto deadline = std::chrono::steady_clock::now() + 5s;
  while (comm == nullptr && std::chrono::steady_clock::now() < deadline) {
    ASSERT_EQ(transport_->connect(0, &wrong, &comm), NetResult::kSuccess);
    RecvComm* none = nullptr;
    ASSERT_EQ(transport_->accept(listen_, &none), NetResult::kSuccess);  // reads the hello
    EXPECT_EQ(none, nullptr);
  }
  ASSERT_NE(comm, nullptr);
  std::vector<uint8_t> src(4096);
  const IoSlice from{src.data(), src.size()};
  Request* s = nullptr;
  NetResult rc = NetResult::kSuccess;
  int done = 0;
  size_t size = 0;
  while (rc == NetResult::kSuccess && done == 0 && std::chrono::steady_clock::now() < deadline) {
    if (s == nullptr) {
      rc = transport_->isend(comm, &from, 1, 0, src.size(), 0, nullptr, &s);
      continue;
    }
    RecvComm* none = nullptr;
    ASSERT_EQ(transport_->accept(listen_, &none), NetResult::kSuccess);
    rc = transport_->test(s, &done, &size);
  }
  EXPECT_EQ(done, 0);
  EXPECT_EQ(rc, NetResult::kRemoteError);
  EXPECT_NE(transport_->commError(comm).find("did not acknowledge"), std::string::npos)
      << transport_->commError(comm);
  transport_->closeSend(comm);
  connectPair();  // the right handle still works
}

TEST_F(SocketTransportTest, ARequestWhoseMemoryIsShorterThanItsSizeFailsTheCommInsteadOfSpinning) {
  connectPair();
  std::vector<uint8_t> src(1000), dst(4096);
  const IoSlice from{src.data(), src.size()};
  const IoSlice into{dst.data(), dst.size()};
  Request* r = nullptr;
  Request* s = nullptr;
  ASSERT_EQ(transport_->irecv(recv_, &into, 1, 0, 4096, 0, nullptr, &r), NetResult::kSuccess);
  ASSERT_EQ(transport_->isend(send_, &from, 1, 0, 4096, 0, nullptr, &s), NetResult::kSuccess);
  EXPECT_EQ(waitDone(s), NetResult::kRemoteError);
  EXPECT_NE(transport_->commError(send_).find("fewer bytes"), std::string::npos)
      << transport_->commError(send_);
  closeComms();
}

}  // namespace
}  // namespace tcpx::transport
