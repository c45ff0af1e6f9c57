// The transport interface: the calls and rules of an ncclNet v7 plugin, in C++.
//
// Every transport the engine drives (the built-in socket transport, an external ncclNet plugin
// loaded with dlopen, the devmem emulator) sits behind this one interface, so the engine has a
// single code path. The rules are TCPX's:
//   - a comm is a FIFO: sender and receiver post requests in the same order and with equal sizes;
//   - at most kMaxRequestsPerComm requests are outstanding per comm (send or recv);
//   - test() is called on the oldest outstanding request of a comm only;
//   - every receive, zero-sized ones included, is released with irecvConsumed() in post order,
//     only after test() reported it done and the engine finished copying out of it;
//   - connect() and accept() are non-blocking: they return kSuccess with a null comm until the
//     connection is up and are called again with the same handle;
//   - a null *request with kSuccess from isend()/irecv() means "not now, try again".
// Comms are not thread-safe: one thread (the engine's progress thread) drives each comm.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "common/io_slice.h"

namespace tcpx::transport {

// ncclResult_t values, so a plugin's result passes through unchanged.
enum class NetResult : int {
  kSuccess = 0,
  kUnhandledCudaError = 1,
  kSystemError = 2,
  kInternalError = 3,
  kInvalidArgument = 4,
  kInvalidUsage = 5,
  kRemoteError = 6,
  kInProgress = 7,
};
const char* netResultName(NetResult result);

constexpr int kMaxRequestsPerComm = 16;
constexpr size_t kConnectHandleSize = 128;  // NCCL_NET_HANDLE_MAXSIZE

// Out-of-band connection handle: filled by listen(), read (and used as scratch) by connect().
struct ConnectHandle {
  alignas(8) unsigned char bytes[kConnectHandleSize];
};
static_assert(sizeof(ConnectHandle) == kConnectHandleSize);

// regMr pointer types (NCCL_PTR_*).
enum PtrType : int { kPtrHost = 0x1, kPtrCuda = 0x2, kPtrDmaBuf = 0x4 };

// How received data reaches its destination: directly (HOST) or through an unpack step (UNPACK).
enum class NetDeviceType : int { kHost = 0, kUnpack = 1 };

struct Properties {
  std::string name;      // interface name, e.g. "eth1"
  std::string pci_path;  // sysfs path of the NIC, empty when unknown
  uint64_t guid = 0;
  int ptr_support = kPtrHost;
  int speed_mbps = 0;
  int port = 0;
  float latency = 0;
  int max_comms = 0;
  int max_recvs = 1;
  NetDeviceType device_type = NetDeviceType::kHost;
  int device_version = 0;
};

// One contiguous piece of a message. A request moves the concatenation of its slices.
using IoSlice = tcpx::IoSlice;

// Opaque objects owned by the transport.
struct ListenComm;
struct SendComm;
struct RecvComm;
struct Request;
struct MemHandle;

class Transport {
 public:
  virtual ~Transport() = default;

  [[nodiscard]] virtual const char* name() const = 0;
  virtual NetResult devices(int* ndev) = 0;
  virtual NetResult getProperties(int dev, Properties* props) = 0;

  virtual NetResult listen(int dev, ConnectHandle* handle, ListenComm** comm) = 0;
  virtual NetResult connect(int dev, ConnectHandle* handle, SendComm** comm) = 0;
  virtual NetResult accept(ListenComm* listen_comm, RecvComm** comm) = 0;

  // `comm` is a SendComm* or RecvComm*.
  virtual NetResult regMr(void* comm, void* data, size_t size, int ptr_type, MemHandle** mh) = 0;
  // `comm` may be null: a buffer is deregistered after the comm it served was closed, since only
  // a closed comm (its threads joined) is sure to leave the buffer alone. TCPX's deregMr reads
  // the handle alone.
  virtual NetResult deregMr(void* comm, MemHandle* mh) = 0;

  // Sends the `size` bytes that start `offset` bytes into the concatenation of `slices` (at
  // most maxSlices() slices). `slices` == nullptr with size > 0 sends filler bytes (see
  // supportsNullData()). The slice array and the memory it names stay valid and unchanged until
  // test() reports the request done or, once test() reported the comm failed, until the comm is
  // closed (the request's other parts may still be in the transport's threads).
  virtual NetResult isend(SendComm* comm, const IoSlice* slices, int nslices, size_t offset,
                          size_t size, int tag, MemHandle* mh, Request** request) = 0;
  // Receives exactly `size` bytes into the concatenation of `slices` from `offset` on; nullptr
  // with size > 0 discards them.
  virtual NetResult irecv(RecvComm* comm, const IoSlice* slices, int nslices, size_t offset,
                          size_t size, int tag, MemHandle* mh, Request** request) = 0;
  virtual NetResult test(Request* request, int* done, size_t* size) = 0;
  virtual NetResult irecvConsumed(RecvComm* comm, Request* request) = 0;

  virtual NetResult closeSend(SendComm* comm) = 0;
  virtual NetResult closeRecv(RecvComm* comm) = 0;
  virtual NetResult closeListen(ListenComm* comm) = 0;

  // ---- Capabilities beyond ncclNet v7 (a plugin adapter reports the conservative values) ----
  // Most slices one request may carry.
  [[nodiscard]] virtual int maxSlices() const { return 1; }
  // Whether null slices (filler send / discarding receive) are supported.
  [[nodiscard]] virtual bool supportsNullData() const { return false; }
  // A file descriptor that becomes readable when some request may have completed, so the
  // progress loop can block instead of polling; -1 when the transport offers none.
  [[nodiscard]] virtual int completionFd() const { return -1; }
  // Clears the completion fd's readiness and re-arms it. Call in every round where the fd is
  // reported readable, before testing requests: a completion after this call makes it readable
  // again.
  virtual void drainCompletionFd() {}
  // Gives up an unfinished connect() on `handle`, releasing what it holds.
  virtual void abandonConnect(ConnectHandle* /*handle*/) {}
  // Whether an accept() or connect() under way runs in a thread of the transport's own, which a
  // close does not stop (TCPX, and the emulator that behaves like it): such set-up is finished
  // before its comms are closed (engine/setup_drain.h). False: it can be dropped at any time.
  [[nodiscard]] virtual bool setupRunsInThreads() const { return false; }
  // Why a comm failed (peer address, socket, errno), empty when it has not.
  [[nodiscard]] virtual std::string commError(const void* /*comm*/) const { return {}; }

  // ---- Receives that report what has landed (the socket transport) ----
  // How many parts a receive of `size` bytes on `comm` lands in, each on its own: part k covers
  // bytes [k*size/parts, (k+1)*size/parts) of the request. 0: the transport does not report
  // (irecvReporting is not offered).
  [[nodiscard]] virtual int receiveParts(const RecvComm* /*comm*/, size_t /*size*/) const {
    return 0;
  }
  // irecv() into host memory that also stores, after each read, how many bytes of part k have
  // landed into landed[k] (a release store; never more than the part's length), so that a
  // reader of the words (a GPU kernel copying them on) may take that prefix of the part while
  // the rest arrives. The words stay valid until test() reports the request done, or until the
  // comm is closed.
  virtual NetResult irecvReporting(RecvComm* /*comm*/, const IoSlice* /*slices*/, int /*nslices*/,
                                   size_t /*offset*/, size_t /*size*/, uint32_t* /*landed*/,
                                   Request** request) {
    *request = nullptr;
    return NetResult::kInvalidUsage;
  }

  // ---- Sends that follow a copy still filling their memory (the socket transport) ----
  // How many parts a send of `size` bytes on `comm` leaves in, each on its own socket: part k
  // covers bytes [k*size/parts, (k+1)*size/parts) of the request. 0: the transport does not
  // offer isendFollowing.
  [[nodiscard]] virtual int sendParts(const SendComm* /*comm*/, size_t /*size*/) const { return 0; }
  // isend() from host memory that a copy (a GPU kernel) is still writing: part k's bytes leave
  // only as far as ready[k] says, read with an acquire load: the count of the part's first bytes
  // in place, which never goes back; the part's length or more means all of it. The request's
  // header leaves at once. The words stay valid until test() reports the request done, or until
  // the comm is closed. A sending socket polls the words for a while after they last moved, then
  // waits for recheckFollowing(). A request of more than UINT32_MAX bytes is refused
  // (kInvalidArgument): a count could not reach its part's length.
  virtual NetResult isendFollowing(SendComm* /*comm*/, const IoSlice* /*slices*/, int /*nslices*/,
                                   size_t /*offset*/, size_t /*size*/, const uint32_t* /*ready*/,
                                   Request** request) {
    *request = nullptr;
    return NetResult::kInvalidUsage;
  }
  // The words of a following send moved without the copy (set complete by the engine once the
  // copy ended or failed): the transport looks at them again now. Any thread.
  virtual void recheckFollowing(Request* /*request*/) {}

  // ---- Plugin transports (TCPX, the emulator) ----
  // Whether isend()/irecv() need a memory handle from regMr() on their comm. The socket transport
  // takes any host memory; plugins want registered buffers, which the engine keeps per channel.
  [[nodiscard]] virtual bool needsRegistration() const { return false; }
  // Largest request in bytes (an UNPACK receive covers at most 4 MiB).
  [[nodiscard]] virtual uint64_t maxRequestBytes() const { return UINT64_MAX; }
  // Whether sends may read CUDA memory directly (so chunks of device memory are gathered on the
  // GPU instead of through host memory).
  [[nodiscard]] virtual bool sendsFromDevice() const { return false; }
  // Where a recv comm of an UNPACK transport puts received bytes; null when receives land
  // directly in the posted buffer.
  struct UnpackSource {
    const void* meta = nullptr;  // the comm's abi::UnpackMeta (host-visible)
    const char* pool = nullptr;  // bounce pool base
    uint64_t pool_size = 0;      // 0 when unknown
    int pool_device = -1;        // CUDA device of the pool, -1 for host memory
  };
  [[nodiscard]] virtual const UnpackSource* unpackSource(const RecvComm* /*comm*/) const {
    return nullptr;
  }
};

}  // namespace tcpx::transport
