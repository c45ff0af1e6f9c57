#include "transport/socket/socket_transport.h"

#include <poll.h>
#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <arpa/inet.h>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstddef>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <netinet/in.h>
#include <set>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <system_error>
#include <vector>

#include "common/log.h"
#include "common/net.h"
#include "common/random.h"
#include "common/rate_limit.h"
#include "common/strings.h"
#include "transport/socket/completion_signal.h"
#include "transport/socket/io_pool.h"

namespace tcpx::transport {

const char* netResultName(NetResult result) {
  switch (result) {
    case NetResult::kSuccess:
      return "ncclSuccess";
    case NetResult::kUnhandledCudaError:
      return "ncclUnhandledCudaError";
    case NetResult::kSystemError:
      return "ncclSystemError";
    case NetResult::kInternalError:
      return "ncclInternalError";
    case NetResult::kInvalidArgument:
      return "ncclInvalidArgument";
    case NetResult::kInvalidUsage:
      return "ncclInvalidUsage";
    case NetResult::kRemoteError:
      return "ncclRemoteError";
    case NetResult::kInProgress:
      return "ncclInProgress";
  }
  return "ncclUnknownResult";
}

namespace {

using net::Fd;

constexpr uint32_t kHandleMagic = 0x314b5354;          // "TSK1"
constexpr uint32_t kHelloMagic = 0x484b5354;           // "TSKH"
constexpr uint32_t kDataMagic = 0x444b5354;            // "TSKD"
constexpr uint64_t kAckMagic = 0x41434b5f4b535454ULL;  // "TTSK_KCA": xored with the comm nonce
// Version 2 added Hello::min_split; version 3 the listener's acknowledgement of each hello.
constexpr uint32_t kWireVersion = 3;
constexpr int kMaxSockets = 16;
// socket_min_split's range (a peer's hello outside it is not one of ours).
constexpr uint64_t kMinSplit = 4096;
constexpr uint64_t kMaxSplit = 16ULL << 20;
constexpr size_t kMaxPendingAccepts = 64;
// A connection to a data listener that has not introduced itself by then is dropped: a real
// connector sends its hello right after the TCP handshake.
constexpr auto kPendingAcceptTimeout = std::chrono::seconds(5);
constexpr int kIovBatch = 64;

// This transport's use of the 128-byte connection handle.
struct HandleLayout {
  uint32_t magic;
  uint16_t family;
  uint16_t port;  // host order
  uint8_t addr[16];
  uint64_t listen_nonce;  // the listener rejects sockets that do not echo it
  uint8_t reserved[64];
  uint64_t connect_state;  // process-local: the in-progress connect, owned by the transport
  uint8_t tail[24];
};
static_assert(sizeof(HandleLayout) == kConnectHandleSize);
static_assert(offsetof(HandleLayout, listen_nonce) == 24);
static_assert(offsetof(HandleLayout, connect_state) == 96);

// First bytes on every data socket, connector to acceptor. A comm's sender decides how its
// requests are cut over the sockets (nsocks, min_split); the receiver adopts what the hello says,
// so two ends configured differently still agree on every part's bytes. The listen nonce comes
// from the connection handle, which travels over the (authenticated) control connection: a hello
// that carries it is a data connection of the peer. The listener answers each accepted hello with
// an acknowledgement (kAckMagic ^ comm_nonce), which each sending socket's helper reads before
// its first request: a connection that reached the wrong listener fails its first send instead
// of reporting bytes delivered that nobody took.
struct Hello {
  uint32_t magic;
  uint32_t version;
  uint64_t listen_nonce;
  uint64_t comm_nonce;  // groups the sockets of one comm
  uint32_t index;
  uint32_t nsocks;
  uint64_t min_split;  // the sender's socket_min_split
};
static_assert(sizeof(Hello) == 40);

// Leads the first part of every request on the wire.
struct DataHeader {
  uint32_t magic;
  uint32_t flags;
  uint64_t size;
  uint64_t seq;
};
static_assert(sizeof(DataHeader) == 24);

const std::array<char, kIoScratchSize>& zeroPage() {
  static const std::array<char, kIoScratchSize> zeros{};
  return zeros;
}

struct SocketComm;

struct SocketRequest {
  SocketComm* comm = nullptr;
  uint64_t seq = 0;
  size_t size = 0;
  const IoSlice* slices = nullptr;
  int nslices = 0;
  size_t offset = 0;           // where the request starts inside the slices
  uint32_t* landed = nullptr;  // receive: per part, the bytes landed (irecvReporting), or null
  // Send: per part, the bytes a copy has put in place so far (isendFollowing), or null.
  const uint32_t* ready = nullptr;
  std::atomic<int> parts_left{0};
  bool done = false;  // test() has reported it done
};

// One part of a request for one socket.
struct Task {
  SocketRequest* req = nullptr;
  size_t offset = 0;
  size_t len = 0;
  int part = 0;
  bool lead = false;
};

// Walks the byte range [offset, offset + len) of a request's slices as iovec batches.
class IoCursor {
 public:
  IoCursor() = default;
  IoCursor(const IoSlice* slices, int nslices, size_t offset, size_t len, char* scratch)
      : slices_(slices), nslices_(nslices), remaining_(len), scratch_(scratch) {
    if (slices_ == nullptr) return;
    while (idx_ < nslices_ && offset >= slices_[idx_].size) {
      offset -= slices_[idx_].size;
      ++idx_;
    }
    off_ = offset;
  }
  [[nodiscard]] size_t remaining() const { return remaining_; }

  // Fills up to `max` iovecs covering the next bytes, at most `cap` of them; returns how many.
  int fill(iovec* iov, int max, size_t cap = SIZE_MAX) const {
    if (slices_ == nullptr) {
      // Null data: filler bytes for a send, a throw-away buffer for a receive.
      iov[0].iov_base = scratch_;
      iov[0].iov_len = std::min({remaining_, kIoScratchSize, cap});
      return iov[0].iov_len > 0 ? 1 : 0;
    }
    int n = 0;
    size_t left = std::min(remaining_, cap);
    int idx = idx_;
    size_t off = off_;
    while (n < max && left > 0 && idx < nslices_) {
      const size_t take = std::min(left, slices_[idx].size - off);
      if (take > 0) {
        iov[n].iov_base = static_cast<char*>(slices_[idx].data) + off;
        iov[n].iov_len = take;
        ++n;
        left -= take;
      }
      ++idx;
      off = 0;
    }
    return n;
  }

  void advance(size_t bytes) {
    remaining_ -= bytes;
    if (slices_ == nullptr) return;
    while (bytes > 0 && idx_ < nslices_) {
      const size_t take = std::min(bytes, slices_[idx_].size - off_);
      bytes -= take;
      off_ += take;
      if (off_ == slices_[idx_].size) {
        ++idx_;
        off_ = 0;
      }
    }
  }

 private:
  const IoSlice* slices_ = nullptr;
  int nslices_ = 0;
  int idx_ = 0;
  size_t off_ = 0;
  size_t remaining_ = 0;
  char* scratch_ = nullptr;
};

// Where a data socket stands. Moves: kAwaitingAck -> kIdle/kArmed (a sending socket once the
// listener's acknowledgement is read); kIdle <-> kArmed (a task is posted / the last one is done);
// kArmed <-> kAwaitingBytes (a following send's copy stopped moving / recheckFollowing() or a
// failure); any -> kStopped (its comm failed). Changed under the socket's mutex.
enum class LaneStage {
  kAwaitingAck,    // sending socket before the acknowledgement: armed for input
  kIdle,           // no task; not armed, so its loop never serves it
  kArmed,          // has tasks: armed for its direction, polled, or being served by its loop
  kAwaitingBytes,  // its front task follows a copy that stopped moving: not armed, its loop does
                   // not poll it; recheckFollowing() or a failure of the comm arms it again
  kStopped,        // its comm failed: tasks are dropped and it is never armed again
};

// What one attempt at a task's bytes came to.
enum class IoStep {
  kDone,     // the task's bytes have all moved
  kBlocked,  // the socket would block: wait for readiness
  kYield,    // this turn's byte budget is spent: let the loop's other sockets go first
  kWaiting,  // a following send has sent every byte its copy has put in place so far
  kFailed,   // the comm failed (fail() was called)
};

// Reads buf[*got, size) without blocking: kDone once it is full, kBlocked when the socket has
// nothing more for now, kFailed at end of stream (*last = 0) or an error (*last < 0, errno set).
// For small fixed records (a header, the listener's acknowledgement), which may arrive in pieces.
IoStep recvSmall(int fd, char* buf, size_t size, size_t* got, ssize_t* last) {
  while (*got < size) {
    const ssize_t n = ::recv(fd, buf + *got, size - *got, MSG_DONTWAIT);
    *last = n;
    if (n > 0) {
      *got += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return IoStep::kBlocked;
    return IoStep::kFailed;
  }
  return IoStep::kDone;
}

// A loop serves one socket for at most this many bytes per readiness event before it moves on to
// its other sockets (a loopback peer can keep a socket ready indefinitely).
constexpr size_t kTurnBudget = 4ULL << 20;

// How long a loop keeps polling a following send whose copy has not put a new byte in place: a
// GPU copy running fills a part's next unit within a few microseconds; one queued behind the
// application's GPU work may wait for far longer, and then the socket waits for
// recheckFollowing() without holding a core.
constexpr auto kFollowSpin = std::chrono::microseconds(200);

// One data socket of a comm, attached to a loop of the pool. Its tasks (one part of a request
// each) are done in posting order; the front task's progress lives here between turns.
struct SocketLane final : IoHandler {
  SocketComm* comm = nullptr;
  int index = 0;
  Fd fd;
  IoRegistration reg;

  std::mutex mu;  // ring and stage: the poster and the loop
  std::array<Task, kMaxRequestsPerComm> ring{};
  size_t head = 0;
  size_t count = 0;
  LaneStage stage = LaneStage::kIdle;

  // Loop thread only: progress of ring[head] (started = false: not begun).
  bool started = false;
  DataHeader header{};
  size_t header_done = 0;
  IoCursor cursor;
  uint64_t ack = 0;
  size_t ack_got = 0;
  // A following send (SocketRequest::ready): the part's count last seen, and when it last moved.
  uint32_t follow_seen = 0;
  std::chrono::steady_clock::time_point follow_moved{};

  void onReady(uint32_t events, char* scratch) override;
};

struct SocketComm {
  bool is_recv = false;
  uint64_t expected_ack = 0;  // send side: what the listener answers each hello with
  std::string peer;           // remote address, for messages
  size_t min_split = 0;
  // SocketTransportOptions::raise_sigpipe, and the thread that created this comm did not block
  // SIGPIPE: a send into a broken connection raises it in the process, as a TCPX helper thread
  // (which inherits its creator's mask and sends without MSG_NOSIGNAL) would.
  bool raise_sigpipe = false;
  CompletionSignal* completion = nullptr;
  std::shared_ptr<IoPool> pool;
  std::vector<std::unique_ptr<SocketLane>> lanes;
  std::array<SocketRequest, kMaxRequestsPerComm> slots;
  uint64_t next_seq = 0;  // requests posted so far
  uint64_t oldest = 0;    // first request test() has not reported done
  uint64_t consumed = 0;  // receives: first request not yet consumed
  std::atomic<bool> failed{false};
  // What test() and later posts return once `failed`: kSystemError when the peer closed its end
  // (a receive saw end-of-stream: the peer closed its comm or its process ended), kRemoteError
  // for every other failure (a reset or broken connection, a peer out of step). Written before
  // `failed` is set.
  NetResult failure = NetResult::kRemoteError;
  mutable std::mutex error_mu;
  std::string error;

  // Every socket leaves its loop before any is closed: a loop failing the comm shuts the
  // sockets down, so none of their descriptors may be reused meanwhile.
  ~SocketComm() {
    for (auto& lane : lanes) {
      std::lock_guard<std::mutex> lock(lane->mu);
      lane->stage = LaneStage::kStopped;
    }
    for (auto& lane : lanes) pool->detach(&lane->reg);
    // A sending socket whose loop had not yet read the listener's acknowledgement still holds it:
    // closed with unread bytes, the socket would send a reset instead of an end of stream, and
    // the receiver would report a broken connection rather than a peer that closed its comm.
    if (!is_recv) {
      for (auto& lane : lanes) {
        uint64_t unread = 0;
        for (int i = 0; i < 4 && ::recv(lane->fd.get(), &unread, sizeof(unread), MSG_DONTWAIT) > 0;
             ++i) {
        }
      }
    }
  }

  [[nodiscard]] uint64_t outstanding() const { return next_seq - (is_recv ? consumed : oldest); }
  [[nodiscard]] uint32_t readyEvents() const { return is_recv ? EPOLLIN : EPOLLOUT; }

  void fail(const std::string& why, NetResult code = NetResult::kRemoteError) {
    {
      std::lock_guard<std::mutex> lock(error_mu);
      if (!error.empty()) return;
      error = why;
      failure = code;
      // Under the mutex: a second failure that returns above sees the comm failed already, so
      // its loop drops its tasks instead of retrying a shut-down socket.
      failed.store(true, std::memory_order_release);
    }
    LOG_WARN("socket comm %s %s: %s", is_recv ? "from" : "to", peer.c_str(), why.c_str());
    // Tells the peer at once, and wakes every armed socket of the comm (a hang-up), whose loop
    // then drops its tasks; a socket waiting for a copy's bytes is armed first.
    for (auto& lane : lanes) ::shutdown(lane->fd.get(), SHUT_RDWR);
    wakeAwaiting();
    completion->notify();
  }

  // Serves again every socket (or `lane`) waiting for a following send's bytes (kAwaitingBytes).
  // Armed under the socket's mutex: the destructor stops every socket under it before detaching
  // any, so a loop failing the comm never arms one being detached.
  void wakeAwaiting() {
    for (auto& lane : lanes) wakeAwaiting(lane.get());
  }
  void wakeAwaiting(SocketLane* lane) {
    std::lock_guard<std::mutex> lock(lane->mu);
    if (lane->stage == LaneStage::kAwaitingBytes) {
      lane->stage = LaneStage::kArmed;
      pool->arm(lane->reg, readyEvents());
    }
  }

  [[nodiscard]] std::string errorText() const {
    std::lock_guard<std::mutex> lock(error_mu);
    return error;
  }

  // Attaches every socket to the pool: a sending socket first waits for the listener's
  // acknowledgement, a receiving one for its first task. False (nothing left attached) when the
  // pool cannot take them.
  bool start() {
    for (auto& lane : lanes) {
      lane->comm = this;
      {
        // A socket attached before this one may already fail the comm, whose wakeAwaiting
        // visits every socket.
        std::lock_guard<std::mutex> lock(lane->mu);
        lane->stage = is_recv ? LaneStage::kIdle : LaneStage::kAwaitingAck;
      }
      std::string why;
      if (!pool->attach(lane->fd.get(), lane.get(), is_recv ? 0U : EPOLLIN, &lane->reg, &why)) {
        LOG_ERROR("socket transport: cannot serve a comm %s %s: %s", is_recv ? "from" : "to",
                  peer.c_str(), why.c_str());
        for (auto& attached : lanes) pool->detach(&attached->reg);
        return false;
      }
    }
    return true;
  }

  // How many parts a request of `size` bytes is cut into.
  [[nodiscard]] int partsFor(size_t size) const {
    const size_t by_size = std::max<size_t>(1, size / std::max<size_t>(1, min_split));
    return static_cast<int>(std::min<size_t>(lanes.size(), by_size));
  }

  // The socket that carries part k of `req`.
  [[nodiscard]] SocketLane* partLane(const SocketRequest* req, int k) const {
    return lanes[(req->seq + static_cast<uint64_t>(k)) % lanes.size()].get();
  }

  void post(SocketRequest* req) {
    const int parts = partsFor(req->size);
    req->parts_left.store(parts, std::memory_order_relaxed);
    // Part k covers [k*size/parts, (k+1)*size/parts) and goes to socket (seq + k) mod nsocks:
    // both ends compute the same split from the size, so no per-part metadata is needed, and
    // the rotation spreads small requests over all sockets.
    for (int k = 0; k < parts; ++k) {
      Task task;
      task.req = req;
      task.offset = req->size * static_cast<size_t>(k) / static_cast<size_t>(parts);
      task.len = req->size * static_cast<size_t>(k + 1) / static_cast<size_t>(parts) - task.offset;
      task.part = k;
      task.lead = (k == 0);
      SocketLane* lane = partLane(req, k);
      bool arm = false;
      {
        std::lock_guard<std::mutex> lock(lane->mu);
        lane->ring[(lane->head + lane->count) % lane->ring.size()] = task;
        ++lane->count;
        if (lane->stage == LaneStage::kIdle) {
          lane->stage = LaneStage::kArmed;
          arm = true;
        }
      }
      if (arm) pool->arm(lane->reg, readyEvents());
    }
  }

  // A loop's turn on one socket: the acknowledgement, then tasks in order until the socket would
  // block, the turn's budget is spent, or no task is left.
  void serve(SocketLane* lane, char* scratch) {
    LaneStage stage;
    {
      std::lock_guard<std::mutex> lock(lane->mu);
      stage = lane->stage;
    }
    // A quiet socket reports a hang-up once (the one-shot registration); nothing to do.
    if (stage == LaneStage::kIdle || stage == LaneStage::kStopped) return;
    if (stage == LaneStage::kAwaitingAck && !readAck(lane)) return;
    size_t moved = 0;
    for (;;) {
      Task task;
      {
        std::lock_guard<std::mutex> lock(lane->mu);
        if (failed.load(std::memory_order_acquire)) {
          dropTasksLocked(lane);
          return;
        }
        if (lane->count == 0) {
          lane->stage = LaneStage::kIdle;
          return;
        }
        task = lane->ring[lane->head];
      }
      const IoStep step =
          is_recv ? receivePart(lane, task, scratch, &moved) : sendPart(lane, task, &moved);
      if (step == IoStep::kBlocked || step == IoStep::kYield) {
        pool->arm(lane->reg, readyEvents());
        return;
      }
      if (step == IoStep::kWaiting) {
        if (awaitBytes(lane, task)) return;
        continue;  // the copy moved meanwhile
      }
      if (step == IoStep::kFailed) continue;  // the next round drops what is left
      lane->started = false;
      SocketRequest* req = task.req;
      {
        std::lock_guard<std::mutex> lock(lane->mu);
        lane->head = (lane->head + 1) % lane->ring.size();
        --lane->count;
      }
      // After this decrement the request may be reused by the poster: do not touch it again.
      if (req->parts_left.fetch_sub(1, std::memory_order_acq_rel) == 1) completion->notify();
    }
  }

  // The comm failed: its parts end without moving bytes (test() reports the failure first).
  void dropTasksLocked(SocketLane* lane) {
    lane->stage = LaneStage::kStopped;
    lane->started = false;
    while (lane->count > 0) {
      SocketRequest* req = lane->ring[lane->head].req;
      lane->head = (lane->head + 1) % lane->ring.size();
      --lane->count;
      if (req->parts_left.fetch_sub(1, std::memory_order_acq_rel) == 1) completion->notify();
    }
  }

  // A following send sent what its copy has put in place. Polled again at the next turn while the
  // copy moved within kFollowSpin, else left unarmed (kAwaitingBytes) until recheckFollowing() or
  // a failure arms it. False: the count moved after all (checked under the mutex that
  // recheckFollowing takes, so that a raise is never missed), serve on.
  bool awaitBytes(SocketLane* lane, const Task& task) {
    if (std::chrono::steady_clock::now() - lane->follow_moved < kFollowSpin) {
      pool->pollAgain(lane->reg);
      return true;
    }
    std::lock_guard<std::mutex> lock(lane->mu);
    // The comm is being closed: its destructor stopped the socket under this mutex and will
    // detach it. Left kStopped, so that a failure on another socket never arms it meanwhile.
    if (lane->stage == LaneStage::kStopped) return true;
    // A failure after fail()'s wakeAwaiting visited this socket: serve on, and drop the tasks.
    if (failed.load(std::memory_order_acquire) ||
        std::atomic_ref<const uint32_t>(task.req->ready[task.part])
                .load(std::memory_order_acquire) != lane->follow_seen) {
      return false;
    }
    lane->stage = LaneStage::kAwaitingBytes;
    return true;
  }

  std::string socketLabel(const SocketLane* lane) const {
    return strfmt("socket %d/%zu %s %s", lane->index, lanes.size(), is_recv ? "from" : "to",
                  peer.c_str());
  }

  IoStep sendPart(SocketLane* lane, const Task& task, size_t* moved) {
    const SocketRequest* req = task.req;
    if (!lane->started) {
      lane->header = DataHeader{kDataMagic, req->slices == nullptr ? 1U : 0U, req->size, req->seq};
      lane->header_done = task.lead ? 0 : sizeof(DataHeader);
      lane->cursor = IoCursor(req->slices, req->nslices, req->offset + task.offset, task.len,
                              const_cast<char*>(zeroPage().data()));
      lane->started = true;
      lane->follow_seen = 0;
      lane->follow_moved = std::chrono::steady_clock::now();
    }
    while (lane->header_done < sizeof(DataHeader) || lane->cursor.remaining() > 0) {
      if (*moved >= kTurnBudget) return IoStep::kYield;
      // A following send: only the bytes its copy has put in place (the acquire load orders
      // the reads of them after the copy's writes).
      size_t cap = SIZE_MAX;
      if (req->ready != nullptr) {
        const uint32_t seen =
            std::atomic_ref<const uint32_t>(req->ready[task.part]).load(std::memory_order_acquire);
        if (seen != lane->follow_seen) {
          lane->follow_seen = seen;
          lane->follow_moved = std::chrono::steady_clock::now();
        }
        const size_t sent = task.len - lane->cursor.remaining();
        cap = std::min<size_t>(seen, task.len) - std::min<size_t>(sent, seen);
        if (cap == 0 && lane->header_done == sizeof(DataHeader)) return IoStep::kWaiting;
      }
      iovec iov[kIovBatch];
      int n = 0;
      if (lane->header_done < sizeof(DataHeader)) {
        iov[n].iov_base = reinterpret_cast<char*>(&lane->header) + lane->header_done;
        iov[n].iov_len = sizeof(DataHeader) - lane->header_done;
        ++n;
      }
      if (cap > 0) n += lane->cursor.fill(iov + n, kIovBatch - n, cap);
      if (n == 0) {  // the slices end before the request does: nothing left to send from
        fail(strfmt("%s: request %llu's memory covers fewer bytes than its size",
                    socketLabel(lane).c_str(), static_cast<unsigned long long>(req->seq)));
        return IoStep::kFailed;
      }
      msghdr msg{};
      msg.msg_iov = iov;
      msg.msg_iovlen = static_cast<size_t>(n);
      const ssize_t sent = ::sendmsg(lane->fd.get(), &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (sent < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return IoStep::kBlocked;
        // TCPX keeps sending into a connection the peer broke, and its next send after a reset
        // raises SIGPIPE; this comm stops at the first error, so it raises it then.
        if (raise_sigpipe && (errno == EPIPE || errno == ECONNRESET)) ::kill(::getpid(), SIGPIPE);
        fail(strfmt("%s: send of request %llu failed: %s", socketLabel(lane).c_str(),
                    static_cast<unsigned long long>(req->seq), errnoString(errno).c_str()));
        return IoStep::kFailed;
      }
      size_t left = static_cast<size_t>(sent);
      *moved += left;
      const size_t from_header = std::min(left, sizeof(DataHeader) - lane->header_done);
      lane->header_done += from_header;
      left -= from_header;
      lane->cursor.advance(left);
    }
    return IoStep::kDone;
  }

  // The listener acknowledges the hello before anything else; no acknowledgement (the
  // connection reached another listener, which closed it) fails the comm. True once it is read
  // and a task waits.
  bool readAck(SocketLane* lane) {
    ssize_t last = 0;
    if (recvSmall(lane->fd.get(), reinterpret_cast<char*>(&lane->ack), sizeof(lane->ack),
                  &lane->ack_got, &last) == IoStep::kBlocked) {
      pool->arm(lane->reg, EPOLLIN);
      return false;
    }
    if (lane->ack_got == sizeof(lane->ack) && lane->ack == expected_ack) {
      std::lock_guard<std::mutex> lock(lane->mu);
      lane->stage = lane->count > 0 ? LaneStage::kArmed : LaneStage::kIdle;
      return lane->stage == LaneStage::kArmed;
    }
    fail(strfmt(
        "%s: the listener did not acknowledge this data connection (%s): it is not the "
        "listener the connection handle named",
        socketLabel(lane).c_str(),
        lane->ack_got == sizeof(lane->ack) ? "wrong acknowledgement" : "closed before answering"));
    std::lock_guard<std::mutex> lock(lane->mu);
    dropTasksLocked(lane);
    return false;
  }

  void reportRecvError(SocketLane* lane, ssize_t n, uint64_t seq) {
    if (n == 0) {
      fail(strfmt("%s: connection closed by peer during request %llu", socketLabel(lane).c_str(),
                  static_cast<unsigned long long>(seq)),
           NetResult::kSystemError);
    } else {
      fail(strfmt("%s: recv of request %llu failed: %s", socketLabel(lane).c_str(),
                  static_cast<unsigned long long>(seq), errnoString(errno).c_str()));
    }
  }

  IoStep receivePart(SocketLane* lane, const Task& task, char* scratch, size_t* moved) {
    const SocketRequest* req = task.req;
    if (!lane->started) {
      lane->header_done = task.lead ? 0 : sizeof(DataHeader);
      lane->cursor =
          IoCursor(req->slices, req->nslices, req->offset + task.offset, task.len, scratch);
      lane->started = true;
    }
    // The header is read and checked before any byte lands in the request's memory.
    ssize_t last = 0;
    const IoStep header_step = recvSmall(lane->fd.get(), reinterpret_cast<char*>(&lane->header),
                                         sizeof(DataHeader), &lane->header_done, &last);
    if (header_step == IoStep::kBlocked) return IoStep::kBlocked;
    if (header_step == IoStep::kFailed) {
      reportRecvError(lane, last, req->seq);
      return IoStep::kFailed;
    }
    if (task.lead && lane->cursor.remaining() == task.len) {
      const DataHeader& header = lane->header;
      if (header.magic != kDataMagic || header.seq != req->seq || header.size != req->size) {
        fail(
            strfmt("%s: stream out of step: peer sent request %llu of %llu bytes, receiver "
                   "posted request %llu of %zu bytes",
                   socketLabel(lane).c_str(), static_cast<unsigned long long>(header.seq),
                   static_cast<unsigned long long>(header.size),
                   static_cast<unsigned long long>(req->seq), req->size));
        return IoStep::kFailed;
      }
    }
    while (lane->cursor.remaining() > 0) {
      if (*moved >= kTurnBudget) return IoStep::kYield;
      iovec iov[kIovBatch];
      const int n = lane->cursor.fill(iov, kIovBatch);
      if (n == 0) {  // the slices end before the request does: nowhere to put the rest
        fail(strfmt("%s: request %llu's memory covers fewer bytes than its size",
                    socketLabel(lane).c_str(), static_cast<unsigned long long>(req->seq)));
        return IoStep::kFailed;
      }
      msghdr msg{};
      msg.msg_iov = iov;
      msg.msg_iovlen = static_cast<size_t>(n);
      const ssize_t got = ::recvmsg(lane->fd.get(), &msg, MSG_DONTWAIT);
      if (got > 0) {
        lane->cursor.advance(static_cast<size_t>(got));
        *moved += static_cast<size_t>(got);
        if (req->landed != nullptr) {
          // Before the part's completion is counted: the words are not touched after it.
          std::atomic_ref<uint32_t>(req->landed[task.part])
              .store(static_cast<uint32_t>(task.len - lane->cursor.remaining()),
                     std::memory_order_release);
        }
        continue;
      }
      if (got < 0 && errno == EINTR) continue;
      if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return IoStep::kBlocked;
      reportRecvError(lane, got, req->seq);
      return IoStep::kFailed;
    }
    return IoStep::kDone;
  }
};

void SocketLane::onReady(uint32_t /*events*/, char* scratch) {
  comm->serve(this, scratch);
}

struct PendingAccept {
  Fd fd;
  Hello hello{};
  size_t got = 0;
  std::chrono::steady_clock::time_point since;
};

struct AcceptGroup {
  uint32_t nsocks = 0;
  uint64_t min_split = 0;
  std::vector<Fd> socks;
  uint32_t have = 0;
};

struct SocketListen {
  Fd fd;
  RateLimit stray_log{2};  // warnings about connections that are not the peer's, per second
  uint64_t nonce = 0;
  bool accepted = false;
  std::vector<PendingAccept> pending;
  std::map<uint64_t, AcceptGroup> groups;
};

struct ConnectState {
  net::SockAddr addr;
  uint64_t listen_nonce = 0;
  uint64_t comm_nonce = 0;
  std::vector<Fd> socks;
  std::vector<bool> connected;  // hello sent
};

// Whether the calling thread blocks SIGPIPE.
bool sigpipeBlockedHere() {
  sigset_t mask;
  sigemptyset(&mask);
  pthread_sigmask(SIG_BLOCK, nullptr, &mask);
  return sigismember(&mask, SIGPIPE) == 1;
}

SocketComm* asComm(void* p) {
  return static_cast<SocketComm*>(p);
}

class SocketTransport final : public Transport {
 public:
  explicit SocketTransport(SocketTransportOptions options)
      : options_(std::move(options)),
        pool_(options_.io_pool != nullptr
                  ? options_.io_pool
                  : std::make_shared<IoPool>(options_.io_threads > 0 ? options_.io_threads
                                                                     : IoPool::autoThreads())) {
    options_.sockets_per_comm = std::clamp(options_.sockets_per_comm, 1, kMaxSockets);
  }

  ~SocketTransport() override {
    for (ConnectState* state : connects_) delete state;
  }

  [[nodiscard]] const char* name() const override { return "socket"; }

  NetResult devices(int* ndev) override {
    *ndev = 1;
    return NetResult::kSuccess;
  }

  NetResult getProperties(int dev, Properties* props) override {
    if (dev != 0) return NetResult::kInvalidArgument;
    props->name = options_.interface.empty() ? "socket" : options_.interface;
    props->pci_path.clear();
    props->guid = 0;
    props->ptr_support = kPtrHost;
    props->speed_mbps = interfaceSpeed();
    props->port = 0;
    props->latency = 0;
    props->max_comms = 65536;
    props->max_recvs = 1;
    props->device_type = NetDeviceType::kHost;
    props->device_version = 0;
    return NetResult::kSuccess;
  }

  NetResult listen(int dev, ConnectHandle* handle, ListenComm** comm) override {
    *comm = nullptr;
    if (dev != 0) return NetResult::kInvalidArgument;
    auto bind_addr = net::resolve(options_.bind_host, 0);
    if (!bind_addr.isOk()) {
      LOG_ERROR("socket transport: %s", bind_addr.status().message().c_str());
      return NetResult::kSystemError;
    }
    auto fd = net::listenTcp(&bind_addr.value(), 64);
    if (!fd.isOk()) {
      LOG_ERROR("socket transport: %s", fd.status().message().c_str());
      return NetResult::kSystemError;
    }
    (void)net::setNonBlocking(fd->get(), true);
    auto advertised = net::resolve(options_.advertise_host, bind_addr->port());
    if (!advertised.isOk()) {
      LOG_ERROR("socket transport: %s", advertised.status().message().c_str());
      return NetResult::kSystemError;
    }
    auto nonce = randomId();
    if (!nonce.isOk()) {
      LOG_ERROR("socket transport: %s", nonce.status().message().c_str());
      return NetResult::kSystemError;
    }
    auto listen_state = std::make_unique<SocketListen>();
    listen_state->fd = std::move(fd.value());
    listen_state->nonce = nonce.value();

    HandleLayout layout{};
    layout.magic = kHandleMagic;
    layout.family = static_cast<uint16_t>(advertised->family());
    layout.port = advertised->port();
    if (advertised->family() == AF_INET) {
      std::memcpy(layout.addr, &reinterpret_cast<const sockaddr_in*>(advertised->raw())->sin_addr,
                  4);
    } else {
      std::memcpy(layout.addr, &reinterpret_cast<const sockaddr_in6*>(advertised->raw())->sin6_addr,
                  16);
    }
    layout.listen_nonce = listen_state->nonce;
    std::memcpy(handle->bytes, &layout, sizeof(layout));
    *comm = reinterpret_cast<ListenComm*>(listen_state.release());
    return NetResult::kSuccess;
  }

  NetResult connect(int dev, ConnectHandle* handle, SendComm** comm) override {
    *comm = nullptr;
    if (dev != 0) return NetResult::kInvalidArgument;
    HandleLayout layout{};
    std::memcpy(&layout, handle->bytes, sizeof(layout));
    if (layout.magic != kHandleMagic || (layout.family != AF_INET && layout.family != AF_INET6)) {
      LOG_ERROR("socket transport: connect handle is not a socket-transport handle");
      return NetResult::kInvalidArgument;
    }
    auto* state = reinterpret_cast<ConnectState*>(static_cast<uintptr_t>(layout.connect_state));
    if (state == nullptr || connects_.count(state) == 0) {
      state = startConnect(layout);
      if (state == nullptr) return NetResult::kSystemError;
      layout.connect_state = reinterpret_cast<uintptr_t>(state);
      std::memcpy(handle->bytes, &layout, sizeof(layout));
    }
    const NetResult rc = advanceConnect(state);
    if (rc != NetResult::kSuccess) {
      dropConnect(handle, state);
      return rc;
    }
    if (std::all_of(state->connected.begin(), state->connected.end(), [](bool b) { return b; })) {
      auto send_comm = std::make_unique<SocketComm>();
      send_comm->is_recv = false;
      send_comm->peer = state->addr.toString();
      send_comm->min_split = options_.min_split;
      send_comm->raise_sigpipe = options_.raise_sigpipe && !sigpipeBlockedHere();
      send_comm->expected_ack = kAckMagic ^ state->comm_nonce;
      send_comm->completion = &completion_;
      send_comm->pool = pool_;
      for (size_t i = 0; i < state->socks.size(); ++i) {
        auto lane = std::make_unique<SocketLane>();
        lane->index = static_cast<int>(i);
        lane->fd = std::move(state->socks[i]);
        send_comm->lanes.push_back(std::move(lane));
      }
      dropConnect(handle, state);
      if (!send_comm->start()) return NetResult::kSystemError;
      *comm = reinterpret_cast<SendComm*>(send_comm.release());
    }
    return NetResult::kSuccess;
  }

  NetResult accept(ListenComm* listen_comm, RecvComm** comm) override {
    *comm = nullptr;
    auto* ls = reinterpret_cast<SocketListen*>(listen_comm);
    if (ls->accepted) {
      LOG_ERROR("socket transport: a listen comm accepts one connection only");
      return NetResult::kInternalError;
    }
    acceptPending(ls);
    readHellos(ls);
    for (auto it = ls->groups.begin(); it != ls->groups.end(); ++it) {
      AcceptGroup& group = it->second;
      if (group.have != group.nsocks) continue;
      auto recv_comm = std::make_unique<SocketComm>();
      recv_comm->is_recv = true;
      recv_comm->peer = net::peerAddressOf(group.socks[0].get());
      recv_comm->min_split = group.min_split;
      recv_comm->completion = &completion_;
      recv_comm->pool = pool_;
      for (uint32_t i = 0; i < group.nsocks; ++i) {
        auto lane = std::make_unique<SocketLane>();
        lane->index = static_cast<int>(i);
        lane->fd = std::move(group.socks[i]);  // non-blocking since accept4
        (void)net::setNoDelay(lane->fd.get());
        recv_comm->lanes.push_back(std::move(lane));
      }
      ls->groups.erase(it);
      ls->accepted = true;
      if (!recv_comm->start()) return NetResult::kSystemError;
      *comm = reinterpret_cast<RecvComm*>(recv_comm.release());
      break;
    }
    return NetResult::kSuccess;
  }

  NetResult regMr(void* /*comm*/, void* /*data*/, size_t /*size*/, int ptr_type,
                  MemHandle** mh) override {
    if (ptr_type != kPtrHost) return NetResult::kInvalidArgument;
    // Host memory needs no registration for sockets; hand back a non-null token.
    static int token;
    *mh = reinterpret_cast<MemHandle*>(&token);
    return NetResult::kSuccess;
  }

  NetResult deregMr(void* /*comm*/, MemHandle* /*mh*/) override { return NetResult::kSuccess; }

  NetResult isend(SendComm* comm, const IoSlice* slices, int nslices, size_t offset, size_t size,
                  int /*tag*/, MemHandle* /*mh*/, Request** request) override {
    return postRequest(asComm(comm), false, slices, nslices, offset, size, request);
  }

  NetResult irecv(RecvComm* comm, const IoSlice* slices, int nslices, size_t offset, size_t size,
                  int /*tag*/, MemHandle* /*mh*/, Request** request) override {
    return postRequest(asComm(comm), true, slices, nslices, offset, size, request);
  }

  [[nodiscard]] int sendParts(const SendComm* comm, size_t size) const override {
    return reinterpret_cast<const SocketComm*>(comm)->partsFor(size);
  }

  NetResult isendFollowing(SendComm* comm, const IoSlice* slices, int nslices, size_t offset,
                           size_t size, const uint32_t* ready, Request** request) override {
    *request = nullptr;
    // A part's count must be able to reach its length in its word.
    if (ready == nullptr || slices == nullptr || size > UINT32_MAX) {
      return NetResult::kInvalidArgument;
    }
    return postRequest(asComm(comm), false, slices, nslices, offset, size, request, nullptr, ready);
  }

  void recheckFollowing(Request* request) override {
    const auto* req = reinterpret_cast<SocketRequest*>(request);
    SocketComm* c = req->comm;
    for (int k = 0; k < c->partsFor(req->size); ++k) c->wakeAwaiting(c->partLane(req, k));
  }

  [[nodiscard]] int receiveParts(const RecvComm* comm, size_t size) const override {
    return reinterpret_cast<const SocketComm*>(comm)->partsFor(size);
  }

  NetResult irecvReporting(RecvComm* comm, const IoSlice* slices, int nslices, size_t offset,
                           size_t size, uint32_t* landed, Request** request) override {
    *request = nullptr;
    // A part's count must fit its word.
    if (landed == nullptr || size > UINT32_MAX || slices == nullptr) {
      return NetResult::kInvalidArgument;
    }
    return postRequest(asComm(comm), true, slices, nslices, offset, size, request, landed);
  }

  NetResult test(Request* request, int* done, size_t* size) override {
    auto* req = reinterpret_cast<SocketRequest*>(request);
    SocketComm* c = req->comm;
    *done = 0;
    if (req->done || req->seq != c->oldest) {
      LOG_ERROR("socket transport: test() on request %llu, but the oldest outstanding is %llu",
                static_cast<unsigned long long>(req->seq),
                static_cast<unsigned long long>(c->oldest));
      return NetResult::kInternalError;
    }
    if (c->failed.load(std::memory_order_acquire)) return c->failure;
    if (req->parts_left.load(std::memory_order_acquire) != 0) return NetResult::kSuccess;
    *done = 1;
    if (size != nullptr) *size = req->size;
    req->done = true;
    ++c->oldest;
    return NetResult::kSuccess;
  }

  NetResult irecvConsumed(RecvComm* comm, Request* request) override {
    SocketComm* c = asComm(comm);
    auto* req = reinterpret_cast<SocketRequest*>(request);
    if (!c->is_recv || req->comm != c || req->seq != c->consumed || !req->done) {
      LOG_ERROR("socket transport: irecvConsumed out of order (request %llu, next to consume %llu)",
                static_cast<unsigned long long>(req->seq),
                static_cast<unsigned long long>(c->consumed));
      return NetResult::kInternalError;
    }
    ++c->consumed;
    return NetResult::kSuccess;
  }

  NetResult closeSend(SendComm* comm) override {
    delete asComm(comm);
    return NetResult::kSuccess;
  }
  NetResult closeRecv(RecvComm* comm) override {
    delete asComm(comm);
    return NetResult::kSuccess;
  }
  NetResult closeListen(ListenComm* comm) override {
    delete reinterpret_cast<SocketListen*>(comm);
    return NetResult::kSuccess;
  }

  [[nodiscard]] int maxSlices() const override { return 1 << 20; }
  [[nodiscard]] bool supportsNullData() const override { return true; }
  [[nodiscard]] int completionFd() const override { return completion_.fd(); }
  void drainCompletionFd() override { (void)completion_.drainAndArm(); }

  void abandonConnect(ConnectHandle* handle) override {
    HandleLayout layout{};
    std::memcpy(&layout, handle->bytes, sizeof(layout));
    auto* state = reinterpret_cast<ConnectState*>(static_cast<uintptr_t>(layout.connect_state));
    if (state != nullptr && connects_.count(state) != 0) dropConnect(handle, state);
  }

  [[nodiscard]] std::string commError(const void* comm) const override {
    return static_cast<const SocketComm*>(comm)->errorText();
  }

 private:
  int interfaceSpeed() const {
    if (options_.interface.empty()) return 10000;
    std::ifstream in("/sys/class/net/" + options_.interface + "/speed");
    int speed = 0;
    if (in >> speed && speed > 0) return speed;
    return 10000;
  }

  NetResult postRequest(SocketComm* c, bool is_recv, const IoSlice* slices, int nslices,
                        size_t offset, size_t size, Request** request, uint32_t* landed = nullptr,
                        const uint32_t* ready = nullptr) {
    *request = nullptr;
    if (c->is_recv != is_recv) return NetResult::kInvalidUsage;
    if (c->failed.load(std::memory_order_acquire)) return c->failure;
    if (c->outstanding() >= kMaxRequestsPerComm) {
      LOG_ERROR("socket transport: more than %d outstanding requests on a comm to %s",
                kMaxRequestsPerComm, c->peer.c_str());
      return NetResult::kInternalError;
    }
    if (slices == nullptr && nslices != 0) return NetResult::kInvalidArgument;
    SocketRequest* req = &c->slots[c->next_seq % kMaxRequestsPerComm];
    req->comm = c;
    req->seq = c->next_seq++;
    req->size = size;
    req->slices = slices;
    req->nslices = nslices;
    req->offset = offset;
    req->landed = landed;
    req->ready = ready;
    req->done = false;
    c->post(req);
    *request = reinterpret_cast<Request*>(req);
    return NetResult::kSuccess;
  }

  ConnectState* startConnect(const HandleLayout& layout) {
    auto state = std::make_unique<ConnectState>();
    if (layout.family == AF_INET) {
      auto* in = reinterpret_cast<sockaddr_in*>(&state->addr.storage);
      in->sin_family = AF_INET;
      std::memcpy(&in->sin_addr, layout.addr, 4);
      state->addr.len = sizeof(sockaddr_in);
    } else {
      auto* in6 = reinterpret_cast<sockaddr_in6*>(&state->addr.storage);
      in6->sin6_family = AF_INET6;
      std::memcpy(&in6->sin6_addr, layout.addr, 16);
      state->addr.len = sizeof(sockaddr_in6);
    }
    state->addr.setPort(layout.port);
    state->listen_nonce = layout.listen_nonce;
    auto comm_nonce = randomId();
    if (!comm_nonce.isOk()) {
      LOG_ERROR("socket transport: %s", comm_nonce.status().message().c_str());
      return nullptr;
    }
    state->comm_nonce = comm_nonce.value();
    const int nsocks = options_.sockets_per_comm;
    for (int i = 0; i < nsocks; ++i) {
      Fd fd(::socket(state->addr.family(), SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
      if (!fd.valid()) {
        LOG_ERROR("socket transport: socket(): %s", errnoString(errno).c_str());
        return nullptr;
      }
      if (::connect(fd.get(), state->addr.raw(), state->addr.len) != 0 && errno != EINPROGRESS) {
        LOG_ERROR("socket transport: connect to %s: %s", state->addr.toString().c_str(),
                  errnoString(errno).c_str());
        return nullptr;
      }
      state->socks.push_back(std::move(fd));
      state->connected.push_back(false);
    }
    ConnectState* raw = state.release();
    connects_.insert(raw);
    return raw;
  }

  NetResult advanceConnect(ConnectState* state) {
    for (size_t i = 0; i < state->socks.size(); ++i) {
      if (state->connected[i]) continue;
      const int fd = state->socks[i].get();
      pollfd pfd{fd, POLLOUT, 0};
      if (::poll(&pfd, 1, 0) <= 0) continue;
      int err = 0;
      socklen_t len = sizeof(err);
      getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
      if (err == 0 && net::isConnectedToItself(fd)) err = ECONNREFUSED;  // see net.h
      if (err != 0) {
        LOG_ERROR("socket transport: connect to %s: %s", state->addr.toString().c_str(),
                  errnoString(err).c_str());
        return NetResult::kSystemError;
      }
      // The hello is written blocking (40 bytes into an empty socket); data moves non-blocking.
      (void)net::setNonBlocking(fd, false);
      (void)net::setNoDelay(fd);
      const Hello hello{kHelloMagic,
                        kWireVersion,
                        state->listen_nonce,
                        state->comm_nonce,
                        static_cast<uint32_t>(i),
                        static_cast<uint32_t>(state->socks.size()),
                        options_.min_split};
      const Status st = net::writeAll(fd, &hello, sizeof(hello));
      if (!st.isOk()) {
        LOG_ERROR("socket transport: hello to %s: %s", state->addr.toString().c_str(),
                  st.message().c_str());
        return NetResult::kSystemError;
      }
      (void)net::setNonBlocking(fd, true);
      state->connected[i] = true;
    }
    return NetResult::kSuccess;
  }

  void dropConnect(ConnectHandle* handle, ConnectState* state) {
    connects_.erase(state);
    delete state;
    HandleLayout layout{};
    std::memcpy(&layout, handle->bytes, sizeof(layout));
    layout.connect_state = 0;
    std::memcpy(handle->bytes, &layout, sizeof(layout));
  }

  // Logs about a connection that is not the peer's, a few a second per listener.
  static void strayWarning(SocketListen* ls, int fd, const char* what) {
    uint64_t suppressed = 0;
    if (!ls->stray_log.allow(std::chrono::steady_clock::now(), &suppressed)) return;
    LOG_WARN("socket transport: connection from %s to a data listener %s%s",
             net::peerAddressOf(fd).c_str(), what,
             suppressed == 0
                 ? ""
                 : strfmt(" (%llu more not logged)", static_cast<unsigned long long>(suppressed))
                       .c_str());
  }

  static void acceptPending(SocketListen* ls) {
    const auto now = std::chrono::steady_clock::now();
    // Strays that never introduced themselves go first.
    std::erase_if(ls->pending, [&](const PendingAccept& p) {
      if (now - p.since < kPendingAcceptTimeout) return false;
      strayWarning(ls, p.fd.get(), "closed: no hello within 5 s");
      return true;
    });
    for (;;) {
      const int fd = ::accept4(ls->fd.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) break;
      if (ls->pending.size() >= kMaxPendingAccepts) {
        // The oldest makes room: idle connections cannot lock the real connector out.
        strayWarning(ls, ls->pending.front().fd.get(),
                     "dropped: the oldest of too many that did not introduce themselves");
        ls->pending.erase(ls->pending.begin());
      }
      PendingAccept p;
      p.fd = Fd(fd);
      p.since = now;
      ls->pending.push_back(std::move(p));
    }
  }

  static void readHellos(SocketListen* ls) {
    for (size_t i = 0; i < ls->pending.size();) {
      PendingAccept& p = ls->pending[i];
      const ssize_t n = ::recv(p.fd.get(), reinterpret_cast<char*>(&p.hello) + p.got,
                               sizeof(Hello) - p.got, MSG_DONTWAIT);
      bool drop = false;
      if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
        drop = true;
      } else if (n > 0) {
        p.got += static_cast<size_t>(n);
      }
      if (!drop && p.got == sizeof(Hello)) {
        const Hello& h = p.hello;
        if (h.magic != kHelloMagic || h.version != kWireVersion || h.listen_nonce != ls->nonce ||
            h.nsocks == 0 || h.nsocks > kMaxSockets || h.index >= h.nsocks ||
            h.min_split < kMinSplit || h.min_split > kMaxSplit) {
          strayWarning(ls, p.fd.get(), "rejected: not one of this listener's data sockets");
          drop = true;
        } else {
          AcceptGroup& group = ls->groups[h.comm_nonce];
          if (group.nsocks == 0) {
            group.nsocks = h.nsocks;
            group.min_split = h.min_split;
            group.socks.resize(h.nsocks);
          }
          const uint64_t ack = kAckMagic ^ h.comm_nonce;
          if (group.nsocks != h.nsocks || group.min_split != h.min_split ||
              group.socks[h.index].valid() ||
              ::send(p.fd.get(), &ack, sizeof(ack), MSG_DONTWAIT | MSG_NOSIGNAL) !=
                  static_cast<ssize_t>(sizeof(ack))) {
            drop = true;
          } else {
            group.socks[h.index] = std::move(p.fd);
            ++group.have;
            ls->pending.erase(ls->pending.begin() + static_cast<std::ptrdiff_t>(i));
            continue;
          }
        }
      }
      if (drop) {
        ls->pending.erase(ls->pending.begin() + static_cast<std::ptrdiff_t>(i));
        continue;
      }
      ++i;
    }
  }

  SocketTransportOptions options_;
  std::shared_ptr<IoPool> pool_;
  CompletionSignal completion_;
  std::set<ConnectState*> connects_;
};

}  // namespace

std::unique_ptr<Transport> makeSocketTransport(const SocketTransportOptions& options) {
  return std::make_unique<SocketTransport>(options);
}

}  // namespace tcpx::transport
