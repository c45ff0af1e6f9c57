// libnccl-net-tcpxemu.so: an ncclNet v7 plugin that behaves, as seen by its host, like
// GPUDirect-TCPX, over plain TCP sockets. It exists so that the TCPX code path of a host (device
// handle, unpack metadata, bounce pool, request rules) runs and is tested on any machine.
//
// What it reproduces (see TCPX's observable behaviour in the project docs):
//   - device type UNPACK, version 7, with the same device-handle and metadata layout; accept needs
//     the host's device-handle buffer and fills it;
//   - a receive into CUDA memory lands in a bounce pool as fragments of at most 4 KiB at random
//     page positions and in-page offsets, listed in shuffled order with random split points; a
//     receive into host memory lands in the posted buffer and its metadata slot's count is set
//     to 0, as TCPX's plain socket reads do;
//   - at most 16 requests per comm (the 17th fails with InternalError); irecv takes n == 1;
//   - test() on anything but the oldest unfinished request of its comm, and irecvConsumed() out of
//     post order or before test() reported the receive done, are errors (so host bugs surface);
//   - every receive, zero-sized ones included, holds its slot and pool pages until consumed; a
//     full pool holds completions back (test() says not done) instead of failing;
//   - sends leave only while the sender calls test(), so a receive completes only while its
//     sender tests (TCPX's sender test() drives the control messages the receiver waits for);
//   - misuse answers as TCPX's: listen on a missing device, regMr without a comm, test() of a
//     null request and irecvConsumed of n != 1 return InternalError;
//   - regMr of CUDA memory needs a 4 KiB-aligned region; one accept per listen comm;
//   - init runs once per process (a second init fails with InternalError);
//   - data sockets send without MSG_NOSIGNAL: a peer that went away raises SIGPIPE in the
//     sending thread (the emulator's helper threads inherit the mask of the host thread that
//     created the comm).
// Bounce pool: in GPU memory (received bytes are copied in by a kernel, as the NIC's DMA would),
// or in host memory for machines without a GPU. Settings come from the environment:
//   TCPXEMU_BOUNCE   auto | gpu | host (auto: gpu when a CUDA device is usable)
//   TCPXEMU_HOST_RECV  direct | pool: receives into host memory land in the posted buffer, as on
//                    TCPX (default), or go through the bounce pool as fragments too (read when
//                    a comm is accepted). "pool" is not TCPX's behaviour: it lets a host's
//                    unpack path run where there is no GPU
//   TCPXEMU_SEED     seed of the fragment layout (default: random per process)
//   TCPXEMU_POOL_MIB bounce pool per receive comm (default 32)
//   TCPXEMU_SOCKETS  TCP sockets per comm (default 2)
//   TCPXEMU_ADDR     address written into connection handles (default: the primary address)
//   TCPXEMU_DEVICES  comma-separated "name[=sysfs-pci-path]" devices (default "lo")
//   TCPXEMU_DEAD_SOCKET  stall | error: what a comm's requests do once one of its data sockets
//                    failed (reset or broken): stay "not done" forever, as TCPX's (whose helper
//                    thread exits on a socket error), or return the error (default stall). A
//                    peer that closed its end (end-of-stream on a receive) gives 2 either way,
//                    as TCPX's test() does when its control socket closes
// The bytes travel over the project's socket transport; the emulator adds TCPX's rules on top.
#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "common/net.h"
#include "common/strings.h"
#include "gpu/gpu.h"
#include "transport/plugin/net_abi.h"
#include "transport/socket/socket_transport.h"
#include "transport/transport.h"

namespace tcpx::emulator {
namespace {

namespace abi = transport::abi;
using transport::IoSlice;
using transport::NetResult;

constexpr int kRing = transport::kMaxRequestsPerComm;

struct Device {
  std::string name;
  std::string pci_path;
};

struct State {
  std::mutex mu;  // set-up and teardown entry points; the hot path locks per comm
  bool initialized = false;
  std::atomic<abi::Logger> logger{nullptr};  // read by every thread, set by init
  bool gpu_bounce = false;
  uint64_t seed = 0;
  uint64_t pool_bytes = 32ULL << 20;
  std::vector<Device> devices;
  std::unique_ptr<transport::Transport> sockets;
  uint64_t comm_serial = 0;
  bool dead_sockets_stall = true;  // TCPXEMU_DEAD_SOCKET
};

State& state() {
  static State s;
  return s;
}

#define EMU_LOG(level, ...)                                                       \
  do {                                                                            \
    if (abi::Logger emu_logger_ = state().logger.load(std::memory_order_relaxed)) \
      emu_logger_(level, abi::kLogSubsysNet, __func__, __LINE__, __VA_ARGS__);    \
  } while (0)

struct MemRegion {
  int type = abi::kPtrHost;
  char* data = nullptr;
  size_t size = 0;
};

struct Comm;

struct EmuRequest {
  Comm* comm = nullptr;
  uint64_t seq = 0;
  bool is_recv = false;
  bool unpack = false;  // receive through the bounce pool
  transport::Request* inner = nullptr;
  size_t size = 0;
  IoSlice slice;
  // kLanded: the bytes are in `landing`, waiting for free pool pages; kDelivering: being copied
  // into the GPU pool.
  // kCopying: a send of GPU memory being copied to `landing` (the NIC's read over PCIe), handed
  // to the socket once the copy is done.
  // kReady: complete, not yet reported by test(); kDone: reported, not yet consumed.
  enum class Phase {
    kFree,
    kCopying,
    kInFlight,
    kLanded,
    kDelivering,
    kReady,
    kDone
  } phase = Phase::kFree;
  int tag = 0;
  uint64_t ticket = 0;  // GPU delivery batch, or the copy of a send (in copy_queue)
  gpu::CopyQueue* copy_queue = nullptr;  // send of GPU memory: the queue of its source GPU
  std::vector<uint32_t> pages;           // pool pages held until consumed
  char* landing = nullptr;               // host copy of the bytes (unpack receives, CUDA sends)
  size_t landing_size = 0;
  char* dev_landing = nullptr;  // GPU pool mode: the bytes on the pool's GPU before placement
  size_t dev_landing_size = 0;
};

struct Comm {
  // Hot-path entry points (isend, irecv, test, irecvConsumed) lock only their comm: engines in
  // one process drive their comms from their own threads, as with TCPX.
  std::mutex mu;
  bool is_recv = false;
  void* inner = nullptr;  // SendComm* or RecvComm* of the socket transport
  EmuRequest ring[kRing];
  uint64_t posted = 0;
  uint64_t tested = 0;    // requests test() reported done
  uint64_t consumed = 0;  // receives consumed
  uint64_t handed = 0;    // sends handed to the socket transport (in post order)
  // Receive side.
  abi::UnpackMeta* meta = nullptr;
  char* pool = nullptr;
  int pool_device = -1;                 // -1: host pool
  abi::UnpackHandle* handle = nullptr;  // where the device handle points
  std::vector<uint32_t> free_pages;
  std::mt19937_64 rng;
  std::unique_ptr<gpu::CopyQueue> queue;  // receive side: deliveries into the GPU pool
  // Send side: one copy queue per source GPU (sends from several GPUs may be in flight).
  std::vector<std::unique_ptr<gpu::CopyQueue>> send_queues;
  bool dead = false;  // a data socket failed and requests stall (TCPXEMU_DEAD_SOCKET=stall)
  bool host_recv_pool = false;  // TCPXEMU_HOST_RECV=pool when the comm was accepted
  // Landing buffers requests outgrew. cudaFreeHost and cudaFree wait for the whole device (the
  // application's kernels included), and TCPX frees nothing on its data path: they are freed
  // with the comm.
  std::vector<char*> outgrown_host;
  std::vector<char*> outgrown_device;

  [[nodiscard]] uint64_t outstanding() const { return posted - (is_recv ? consumed : tested); }
};

struct Listen {
  void* inner = nullptr;
  bool accept_polled = false;  // accept() was called: on TCPX its accept thread now runs
  bool accepted = false;
};

uint64_t envNumber(const char* name, uint64_t fallback) {
  const char* v = std::getenv(name);  // NOLINT(concurrency-mt-unsafe): init, under the state lock
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  const unsigned long long n = std::strtoull(v, &end, 0);
  return end != v ? n : fallback;
}

void freeLanding(EmuRequest& r) {
  gpu::freeHost(r.landing);
  r.landing = nullptr;
  r.landing_size = 0;
}

// A host buffer of at least `size` bytes for the request (kept for the next use of the slot).
bool ensureLanding(EmuRequest& r, size_t size) {
  if (r.landing_size >= size && r.landing != nullptr) return true;
  // At least doubling: the buffers a slot outgrows (kept until the comm closes) add up to less
  // than the one it uses.
  const size_t grown = std::max({size, size_t{4096}, 2 * r.landing_size});
  if (r.landing != nullptr) r.comm->outgrown_host.push_back(r.landing);
  r.landing = nullptr;
  r.landing_size = 0;
  auto got = gpu::allocHost(grown, /*mapped=*/true);
  if (!got.isOk()) {
    EMU_LOG(abi::kLogWarn, "TCPX emulator: %s", got.status().message().c_str());
    return false;
  }
  r.landing = static_cast<char*>(got.value());
  r.landing_size = grown;
  return true;
}

void destroyComm(Comm* c) {
  if (c->queue) (void)c->queue->sync();
  for (auto& q : c->send_queues) (void)q->sync();
  for (EmuRequest& r : c->ring) {
    freeLanding(r);
    if (r.dev_landing != nullptr) gpu::freeDevice(c->pool_device, r.dev_landing);
  }
  for (char* p : c->outgrown_host) gpu::freeHost(p);
  for (char* p : c->outgrown_device) gpu::freeDevice(c->pool_device, p);
  gpu::freeHost(c->meta);
  if (c->pool_device >= 0) {
    gpu::freeDevice(c->pool_device, c->pool);
    gpu::freeDevice(c->pool_device, c->handle);
  } else {
    gpu::freeHost(c->pool);
    gpu::freeHost(c->handle);
  }
  delete c;
}

// Cuts a receive into fragments, places them on free pages, and lists them in shuffled order in
// the slot's metadata. Returns false when the pool has too few free pages (back-pressure).
bool placeFragments(Comm* c, EmuRequest& r, std::vector<abi::LoadMeta>* out) {
  out->clear();
  const uint64_t page = abi::kUnpackPage;
  uint64_t at = 0;
  while (at < r.size) {
    const uint64_t remaining = r.size - at;
    const uint64_t slots_left = abi::kMaxFragments - out->size();
    uint64_t len = page;
    if (c->rng() % 8 == 0) len = 1 + c->rng() % page;  // now and then a random split point
    len = std::min(len, remaining);
    // Keep enough metadata entries for the rest even if every later fragment is a full page.
    if ((remaining - len + page - 1) / page > slots_left - 1) len = std::min(page, remaining);
    out->push_back({0, static_cast<uint32_t>(len), at});
    at += len;
  }
  if (out->size() > c->free_pages.size()) return false;
  for (abi::LoadMeta& f : *out) {
    const size_t pick = c->rng() % c->free_pages.size();
    const uint32_t p = c->free_pages[pick];
    c->free_pages[pick] = c->free_pages.back();
    c->free_pages.pop_back();
    r.pages.push_back(p);
    // Mostly at the start of its page, as a NIC writes payload; now and then anywhere in it.
    const uint64_t in_page = f.len < page && c->rng() % 8 == 0 ? c->rng() % (page - f.len + 1) : 0;
    f.src_off = static_cast<uint32_t>(p * page + in_page);
  }
  for (size_t i = out->size(); i > 1; --i) std::swap((*out)[i - 1], (*out)[c->rng() % i]);
  return true;
}

void publishMeta(Comm* c, const EmuRequest& r, const std::vector<abi::LoadMeta>& frags) {
  const size_t slot = r.seq % abi::kUnpackSlots;
  if (!frags.empty()) {
    std::memcpy(c->meta->mem[slot], frags.data(), frags.size() * sizeof(abi::LoadMeta));
  }
  std::atomic_ref<uint64_t>(c->meta->cnt[slot]).store(frags.size(), std::memory_order_release);
}

// A landed receive takes pool pages and its bytes go to them (on the host at once; on the GPU
// by an asynchronous DMA and kernel). Leaves the request kLanded when the pool is full.
int startDelivery(Comm* c, EmuRequest& r) {
  thread_local std::vector<abi::LoadMeta> frags;
  if (!placeFragments(c, r, &frags)) return abi::kSuccess;  // pool full: wait for consumes
  if (c->pool_device < 0) {
    for (const abi::LoadMeta& f : frags) {
      std::memcpy(c->pool + f.src_off, r.landing + f.dst_off, f.len);
    }
    publishMeta(c, r, frags);
    r.phase = EmuRequest::Phase::kReady;
    return abi::kSuccess;
  }
  // The NIC's DMA: the received bytes go to the GPU in one copy, then to their pages.
  if (r.dev_landing_size < r.size) {
    const size_t grown = std::max(r.size, 2 * r.dev_landing_size);  // as in ensureLanding
    if (r.dev_landing != nullptr) c->outgrown_device.push_back(r.dev_landing);
    r.dev_landing = nullptr;
    r.dev_landing_size = 0;
    auto got = gpu::allocDevice(c->pool_device, grown);
    if (!got.isOk()) {
      EMU_LOG(abi::kLogWarn, "TCPX emulator: %s", got.status().message().c_str());
      return abi::kUnhandledCudaError;
    }
    r.dev_landing = static_cast<char*>(got.value());
    r.dev_landing_size = grown;
  }
  Status st = c->queue->enqueueMemcpy(r.dev_landing, r.landing, r.size);
  for (size_t i = 0; i < frags.size() && st.isOk(); ++i) {
    st = c->queue->add(r.dev_landing + frags[i].dst_off, c->pool + frags[i].src_off, frags[i].len);
  }
  auto ticket = st.isOk() ? c->queue->launch() : Result<uint64_t>(st);
  if (!ticket.isOk()) {
    EMU_LOG(abi::kLogWarn, "TCPX emulator: copy into the bounce pool: %s",
            ticket.status().message().c_str());
    return abi::kUnhandledCudaError;
  }
  r.ticket = ticket.value();
  publishMeta(c, r, frags);  // read by the host only after test() reported the receive done
  r.phase = EmuRequest::Phase::kDelivering;
  return abi::kSuccess;
}

// A data socket of the comm failed. TCPX's helper thread exits on a socket error and the
// comm's requests then stay "not done" forever, so its host needs a watchdog of its own; with
// TCPXEMU_DEAD_SOCKET=error the failure is reported instead. Returns what the entry point
// returns.
int socketFailed(Comm* c, NetResult rc) {
  // The peer closed its end (its comm, or its process ended): TCPX's test() sees its control
  // socket close and returns 2 for a pending receive, whatever TCPXEMU_DEAD_SOCKET says. The
  // socket transport reports that end-of-stream as kSystemError.
  if (c->is_recv && rc == NetResult::kSystemError) return abi::kSystemError;
  if (!state().dead_sockets_stall) {
    return abi::kSystemError;  // TCPX's code for a peer that closed or a connection that broke
  }
  if (!c->dead) {
    c->dead = true;
    // The socket transport's reason; a "stream out of step" with unequal sizes is a receive
    // posted smaller than its send, into which TCPX would have written past the buffer.
    const std::string why = state().sockets->commError(c->inner);
    EMU_LOG(abi::kLogWarn,
            "TCPX emulator: a data socket of a %s comm failed (%s%s%s); like TCPX, its requests "
            "now stay not done",
            c->is_recv ? "receive" : "send", transport::netResultName(rc), why.empty() ? "" : ": ",
            why.c_str());
  }
  return abi::kSuccess;
}

// Moves the comm's receives along, oldest first, whichever one the host tests: finished socket
// receives land, landed ones enter the pool. So deliveries overlap as a NIC's writes would.
int progressRecvs(Comm* c) {
  State& s = state();
  for (uint64_t seq = c->tested; seq < c->posted; ++seq) {
    EmuRequest& r = c->ring[seq % kRing];
    if (r.phase == EmuRequest::Phase::kInFlight) {
      int inner_done = 0;
      size_t inner_size = 0;
      const NetResult rc = s.sockets->test(r.inner, &inner_done, &inner_size);
      if (rc != NetResult::kSuccess) return socketFailed(c, rc);
      if (inner_done == 0) return abi::kSuccess;  // later receives finish after this one
      s.sockets->irecvConsumed(static_cast<transport::RecvComm*>(c->inner), r.inner);
      r.inner = nullptr;
      r.phase = r.unpack ? EmuRequest::Phase::kLanded : EmuRequest::Phase::kReady;
      if (!r.unpack) publishMeta(c, r, {});  // TCPX writes count 0 for a host receive
    }
    if (r.phase == EmuRequest::Phase::kLanded) {
      const int rc = startDelivery(c, r);
      if (rc != abi::kSuccess) return rc;
      if (r.phase == EmuRequest::Phase::kLanded) return abi::kSuccess;  // pages in order
    }
  }
  return abi::kSuccess;
}

// TCPXEMU_HOST_RECV, read when a comm is accepted (so a test may change it between comms):
// 1 = pool, 0 = direct, -1 = not a valid value.
int hostReceiveMode() {
  const char* v = std::getenv("TCPXEMU_HOST_RECV");  // NOLINT(concurrency-mt-unsafe): set-up only
  const std::string mode = v != nullptr && *v != '\0' ? v : "direct";
  if (mode == "direct" || mode == "pool") return mode == "pool" ? 1 : 0;
  EMU_LOG(abi::kLogWarn, "TCPX emulator: TCPXEMU_HOST_RECV must be direct or pool, not '%s'",
          mode.c_str());
  return -1;
}

// ---- Entry points ----

int emuInit(abi::Logger logger) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.initialized) {
    // As TCPX ("gpu lib init twice"): a host initialises a plugin once per process.
    EMU_LOG(abi::kLogWarn, "TCPX emulator: init called twice in one process");
    return abi::kInternalError;
  }
  s.logger = logger;
  const char* bounce =
      std::getenv("TCPXEMU_BOUNCE");  // NOLINT(concurrency-mt-unsafe): init, under the state lock
  const std::string mode = bounce != nullptr ? bounce : "auto";
  if (mode == "gpu") {
    if (gpu::deviceCount() == 0) {
      EMU_LOG(abi::kLogWarn, "TCPX emulator: TCPXEMU_BOUNCE=gpu but %s",
              gpu::unavailableReason().c_str());
      return abi::kSystemError;
    }
    s.gpu_bounce = true;
  } else if (mode == "host") {
    s.gpu_bounce = false;
  } else if (mode == "auto" || mode.empty()) {
    s.gpu_bounce = gpu::deviceCount() > 0;
  } else {
    EMU_LOG(abi::kLogWarn, "TCPX emulator: TCPXEMU_BOUNCE must be auto, gpu or host, not '%s'",
            mode.c_str());
    return abi::kInvalidArgument;
  }
  // NOLINTNEXTLINE(concurrency-mt-unsafe): init, under the state lock
  const char* dead = std::getenv("TCPXEMU_DEAD_SOCKET");
  const std::string dead_mode = dead != nullptr && *dead != '\0' ? dead : "stall";
  if (dead_mode != "stall" && dead_mode != "error") {
    EMU_LOG(abi::kLogWarn, "TCPX emulator: TCPXEMU_DEAD_SOCKET must be stall or error, not '%s'",
            dead_mode.c_str());
    return abi::kInvalidArgument;
  }
  s.dead_sockets_stall = dead_mode == "stall";
  if (hostReceiveMode() < 0) return abi::kInvalidArgument;
  s.seed = envNumber("TCPXEMU_SEED", std::random_device{}());
  s.pool_bytes = std::max<uint64_t>(envNumber("TCPXEMU_POOL_MIB", 32), 5) << 20;
  const char* devices =
      std::getenv("TCPXEMU_DEVICES");  // NOLINT(concurrency-mt-unsafe): init, under the state lock
  for (const std::string& item : split(devices != nullptr && *devices ? devices : "lo", ',')) {
    const size_t eq = item.find('=');
    s.devices.push_back({item.substr(0, eq), eq == std::string::npos ? "" : item.substr(eq + 1)});
  }
  transport::SocketTransportOptions opts;
  const char* addr =
      std::getenv("TCPXEMU_ADDR");  // NOLINT(concurrency-mt-unsafe): init, under the state lock
  opts.advertise_host = addr != nullptr && *addr ? addr : net::primaryAddress();
  opts.sockets_per_comm =
      static_cast<int>(std::clamp<uint64_t>(envNumber("TCPXEMU_SOCKETS", 2), 1, 16));
  opts.interface = "tcpxemu";
  opts.raise_sigpipe = true;  // as TCPX: its host must keep SIGPIPE from its process
  s.sockets = transport::makeSocketTransport(opts);
  s.initialized = true;
  EMU_LOG(abi::kLogInfo,
          "TCPX emulator: bounce pool in %s memory, %llu MiB per comm, host receives %s, seed %llu",
          s.gpu_bounce ? "GPU" : "host", static_cast<unsigned long long>(s.pool_bytes >> 20),
          hostReceiveMode() == 1 ? "through the pool" : "direct",
          static_cast<unsigned long long>(s.seed));
  return abi::kSuccess;
}

int emuDevices(int* ndev) {
  std::lock_guard<std::mutex> lock(state().mu);
  *ndev = static_cast<int>(state().devices.size());
  return abi::kSuccess;
}

int emuGetProperties(int dev, abi::PropertiesV7* props) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  if (dev < 0 || dev >= static_cast<int>(s.devices.size())) return abi::kInvalidArgument;
  Device& d = s.devices[static_cast<size_t>(dev)];
  std::memset(props, 0, sizeof(*props));
  props->name = d.name.data();
  props->pci_path = d.pci_path.empty() ? nullptr : d.pci_path.data();
  props->guid = static_cast<uint64_t>(dev);
  props->ptr_support = abi::kPtrHost | abi::kPtrCuda;
  props->speed = 10000;
  props->max_comms = 65536;
  props->max_recvs = 1;
  props->net_device_type = abi::kDeviceUnpack;
  props->net_device_version = abi::kUnpackVersion;
  return abi::kSuccess;
}

int emuListen(int dev, void* handle, void** listen_comm) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  if (dev < 0 || dev >= static_cast<int>(s.devices.size())) {
    EMU_LOG(abi::kLogWarn, "TCPX emulator: listen on device %d of %zu", dev, s.devices.size());
    return abi::kInternalError;  // as TCPX
  }
  auto* l = new Listen;
  transport::ListenComm* inner = nullptr;
  const NetResult rc = s.sockets->listen(0, static_cast<transport::ConnectHandle*>(handle), &inner);
  if (rc != NetResult::kSuccess) {
    delete l;
    return static_cast<int>(rc);
  }
  l->inner = inner;
  *listen_comm = l;
  return abi::kSuccess;
}

int emuConnect(int /*dev*/, void* handle, void** send_comm, abi::DeviceHandle** send_dev) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  if (send_dev != nullptr) *send_dev = nullptr;
  transport::SendComm* inner = nullptr;
  const NetResult rc =
      s.sockets->connect(0, static_cast<transport::ConnectHandle*>(handle), &inner);
  *send_comm = nullptr;
  if (rc != NetResult::kSuccess) return static_cast<int>(rc);
  if (inner == nullptr) return abi::kSuccess;  // not connected yet: call again
  auto* c = new Comm;
  c->inner = inner;
  *send_comm = c;
  return abi::kSuccess;
}

int emuAccept(void* listen_comm, void** recv_comm, abi::DeviceHandle** recv_dev) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  auto* l = static_cast<Listen*>(listen_comm);
  *recv_comm = nullptr;
  if (recv_dev == nullptr || *recv_dev == nullptr) {
    EMU_LOG(abi::kLogWarn,
            "TCPX emulator: accept without a device-handle buffer (TCPX would crash)");
    return abi::kInvalidArgument;
  }
  abi::DeviceHandle* dh = *recv_dev;
  if (reinterpret_cast<uintptr_t>(dh) % abi::kDeviceHandleAlign != 0 ||
      dh->net_device_type != abi::kDeviceUnpack || dh->net_device_version != abi::kUnpackVersion) {
    EMU_LOG(abi::kLogWarn,
            "TCPX emulator: device handle %p must be 16-byte aligned and pre-filled with type "
            "UNPACK, version 0x7 (got type %d, version 0x%x)",
            static_cast<void*>(dh), dh->net_device_type, dh->net_device_version);
    return abi::kInvalidArgument;
  }
  if (l->accepted) {
    EMU_LOG(abi::kLogWarn, "TCPX emulator: second accept on one listen comm");
    return abi::kInternalError;
  }
  l->accept_polled = true;
  transport::RecvComm* inner = nullptr;
  const NetResult rc = s.sockets->accept(static_cast<transport::ListenComm*>(l->inner), &inner);
  if (rc != NetResult::kSuccess) {
    l->accept_polled = false;  // a failed accept has no thread left on TCPX either
    return static_cast<int>(rc);
  }
  if (inner == nullptr) return abi::kSuccess;
  l->accepted = true;

  auto* c = new Comm;
  c->is_recv = true;
  c->inner = inner;
  c->host_recv_pool = hostReceiveMode() == 1;
  c->rng.seed(s.seed + 7919 * ++s.comm_serial);
  auto fail = [&](const Status& why) {
    EMU_LOG(abi::kLogWarn, "TCPX emulator: accept: %s",  // NOLINT(bugprone-lambda-function-name)
            why.message().c_str());
    s.sockets->closeRecv(inner);
    c->inner = nullptr;
    destroyComm(c);
    return abi::kSystemError;
  };
  auto meta = gpu::allocHost(sizeof(abi::UnpackMeta), /*mapped=*/true);
  if (!meta.isOk()) return fail(meta.status());
  c->meta = static_cast<abi::UnpackMeta*>(meta.value());
  std::memset(c->meta, 0, sizeof(abi::UnpackMeta));
  abi::UnpackHandle handle{c->meta, nullptr, ~0ULL};
  if (s.gpu_bounce) {
    c->pool_device = gpu::currentDevice();
    auto pool = gpu::allocDevice(c->pool_device, s.pool_bytes);
    if (!pool.isOk()) return fail(pool.status());
    c->pool = static_cast<char*>(pool.value());
    auto dev_handle = gpu::allocDevice(c->pool_device, sizeof(abi::UnpackHandle));
    if (!dev_handle.isOk()) return fail(dev_handle.status());
    c->handle = static_cast<abi::UnpackHandle*>(dev_handle.value());
    handle.bounce_buf = c->pool;
    Status st = gpu::copySync(c->handle, &handle, sizeof(handle));
    if (!st.isOk()) return fail(st);
    c->queue = std::make_unique<gpu::CopyQueue>(c->pool_device);
  } else {
    auto pool = gpu::allocHost(s.pool_bytes);
    if (!pool.isOk()) return fail(pool.status());
    c->pool = static_cast<char*>(pool.value());
    auto host_handle = gpu::allocHost(sizeof(abi::UnpackHandle));
    if (!host_handle.isOk()) return fail(host_handle.status());
    c->handle = static_cast<abi::UnpackHandle*>(host_handle.value());
    handle.bounce_buf = c->pool;
    *c->handle = handle;
  }
  const auto pages = static_cast<uint32_t>(s.pool_bytes / abi::kUnpackPage);
  c->free_pages.reserve(pages);
  for (uint32_t p = 0; p < pages; ++p) c->free_pages.push_back(p);
  dh->handle = c->handle;
  dh->size = sizeof(abi::UnpackHandle);
  dh->needs_proxy_progress = 1;
  *recv_comm = c;
  return abi::kSuccess;
}

int emuRegMr(void* comm, void* data, int size, int type, void** mhandle) {
  std::lock_guard<std::mutex> lock(state().mu);
  if (comm == nullptr) {
    EMU_LOG(abi::kLogWarn, "TCPX emulator: regMr called with a NULL comm");
    return abi::kInternalError;  // as TCPX
  }
  if (type == abi::kPtrCuda) {
    if (gpu::deviceOf(data) < 0) {
      EMU_LOG(abi::kLogWarn, "TCPX emulator: regMr: %p is not CUDA memory", data);
      return abi::kInternalError;
    }
    if (reinterpret_cast<uintptr_t>(data) % abi::kUnpackPage != 0) {
      EMU_LOG(abi::kLogWarn,
              "TCPX emulator: regMr: CUDA region %p is not 4 KiB aligned (ioctl get dma_buf frags)",
              data);
      return abi::kInternalError;
    }
  } else if (type != abi::kPtrHost) {
    return abi::kInvalidArgument;
  }
  *mhandle = new MemRegion{type, static_cast<char*>(data), static_cast<size_t>(size)};
  return abi::kSuccess;
}

int emuDeregMr(void* /*comm*/, void* mhandle) {
  std::lock_guard<std::mutex> lock(state().mu);
  delete static_cast<MemRegion*>(mhandle);
  return abi::kSuccess;
}

// A free request of the comm, or null with *rc set when the comm has 16 outstanding.
EmuRequest* takeRequest(Comm* c, int* rc) {
  if (c->outstanding() >= static_cast<uint64_t>(kRing)) {
    EMU_LOG(abi::kLogWarn, "TCPX emulator: unable to allocate requests (16 outstanding)");
    *rc = abi::kInternalError;
    return nullptr;
  }
  EmuRequest& r = c->ring[c->posted % kRing];
  r.comm = c;
  r.seq = c->posted;
  r.inner = nullptr;
  r.ticket = 0;
  r.copy_queue = nullptr;
  r.pages.clear();
  return &r;
}

// Hands sends to the socket transport in post order once their bytes are on the host. Returns
// false on a transport or copy failure (rc set).
bool pumpSends(Comm* c, int* rc) {
  State& s = state();
  while (c->handed < c->posted) {
    EmuRequest& r = c->ring[c->handed % kRing];
    if (r.phase == EmuRequest::Phase::kCopying) {
      auto ready = r.copy_queue->done(r.ticket);
      if (!ready.isOk()) {
        EMU_LOG(abi::kLogWarn, "TCPX emulator: copy of a send failed: %s",
                ready.status().message().c_str());
        *rc = abi::kUnhandledCudaError;
        return false;
      }
      if (!ready.value()) return true;
    }
    if (c->dead) return true;  // requests stay where they are
    const NetResult inner_rc = s.sockets->isend(static_cast<transport::SendComm*>(c->inner),
                                                &r.slice, 1, 0, r.size, r.tag, nullptr, &r.inner);
    if (inner_rc != NetResult::kSuccess) {
      *rc = socketFailed(c, inner_rc);
      return false;
    }
    if (r.inner == nullptr) return true;  // the socket transport is busy: later
    r.phase = EmuRequest::Phase::kInFlight;
    ++c->handed;
  }
  return true;
}

int emuIsend(void* send_comm, void* data, int size, int tag, void* mhandle, void** request) {
  auto* c = static_cast<Comm*>(send_comm);
  std::lock_guard<std::mutex> lock(c->mu);
  auto* mr = static_cast<MemRegion*>(mhandle);
  *request = nullptr;
  if (mr == nullptr || size < 0) return abi::kInvalidArgument;
  int rc = abi::kSuccess;
  EmuRequest* r = takeRequest(c, &rc);
  if (r == nullptr) return rc;
  r->is_recv = false;
  r->size = static_cast<size_t>(size);
  r->slice = {data, r->size};
  r->tag = tag;
  r->phase = EmuRequest::Phase::kInFlight;
  if (mr->type == abi::kPtrCuda && size > 0) {
    // Device memory leaves through a host copy, as the NIC would read it over PCIe; the copy
    // runs asynchronously and the send goes to the socket when it is done.
    if (!ensureLanding(*r, r->size)) return abi::kSystemError;
    const int device = gpu::deviceOf(data);
    gpu::CopyQueue* queue = nullptr;
    for (auto& q : c->send_queues) {
      if (q->device() == device) queue = q.get();
    }
    if (queue == nullptr) {
      c->send_queues.push_back(std::make_unique<gpu::CopyQueue>(device));
      queue = c->send_queues.back().get();
    }
    Status st = queue->enqueueMemcpy(r->landing, data, r->size);
    auto ticket = st.isOk() ? queue->launch() : Result<uint64_t>(st);
    if (!ticket.isOk()) {
      EMU_LOG(abi::kLogWarn, "TCPX emulator: isend: %s", ticket.status().message().c_str());
      return abi::kUnhandledCudaError;
    }
    r->ticket = ticket.value();
    r->copy_queue = queue;
    r->slice.data = r->landing;
    r->phase = EmuRequest::Phase::kCopying;
  }
  ++c->posted;
  *request = r;
  // As on TCPX, nothing leaves before the sender tests: its test() sends the control messages
  // the receiver waits for.
  return abi::kSuccess;
}

int emuIrecv(void* recv_comm, int n, void** data, int* sizes, int* tags, void** mhandles,
             void** request) {
  State& s = state();
  auto* c = static_cast<Comm*>(recv_comm);
  std::lock_guard<std::mutex> lock(c->mu);
  *request = nullptr;
  if (n != 1) {
    EMU_LOG(abi::kLogWarn, "TCPX emulator: irecv with n = %d; TCPX takes n == 1", n);
    return abi::kInternalError;  // as TCPX
  }
  auto* mr = static_cast<MemRegion*>(mhandles[0]);
  if (mr == nullptr || sizes[0] < 0) return abi::kInvalidArgument;
  const auto size = static_cast<size_t>(sizes[0]);
  // Receives into CUDA memory go through the pool; receives into host memory land directly, as
  // on TCPX, unless TCPXEMU_HOST_RECV=pool.
  const bool unpack = mr->type == abi::kPtrCuda || c->host_recv_pool;
  if (unpack && size > abi::kMaxUnpackRecv) {
    EMU_LOG(abi::kLogWarn, "TCPX emulator: irecv of %zu bytes; at most 4 MiB per receive", size);
    return abi::kInvalidArgument;
  }
  int rc = abi::kSuccess;
  EmuRequest* r = takeRequest(c, &rc);
  if (r == nullptr) return rc;
  r->is_recv = true;
  r->unpack = unpack;
  r->size = size;
  r->slice = {data[0], size};
  if (unpack) {
    if (!ensureLanding(*r, size)) return abi::kSystemError;
    r->slice.data = r->landing;
  }
  NetResult inner_rc = NetResult::kSuccess;
  if (!c->dead) {
    inner_rc = s.sockets->irecv(static_cast<transport::RecvComm*>(c->inner), &r->slice, 1, 0, size,
                                tags[0], nullptr, &r->inner);
  }
  if (inner_rc != NetResult::kSuccess) {
    const int failed = socketFailed(c, inner_rc);
    if (failed != abi::kSuccess) return failed;
  } else if (r->inner == nullptr && !c->dead) {
    return abi::kSuccess;  // the socket transport is busy: post again
  }
  r->phase = EmuRequest::Phase::kInFlight;
  ++c->posted;
  *request = r;
  return abi::kSuccess;
}

int emuTest(void* request, int* done, int* /*sizes: TCPX never writes them*/) {
  State& s = state();
  auto* r = static_cast<EmuRequest*>(request);
  *done = 0;
  if (r == nullptr) {
    EMU_LOG(abi::kLogWarn, "TCPX emulator: test called with a NULL request");
    return abi::kInternalError;  // as TCPX
  }
  Comm* c = r->comm;
  std::lock_guard<std::mutex> lock(c->mu);
  using Phase = EmuRequest::Phase;
  const bool live = r->phase == Phase::kCopying || r->phase == Phase::kInFlight ||
                    r->phase == Phase::kLanded || r->phase == Phase::kDelivering ||
                    r->phase == Phase::kReady;
  if (!live || r->seq != c->tested) {
    EMU_LOG(abi::kLogWarn,
            "TCPX emulator: test() on request %llu of a comm whose oldest unfinished request is "
            "%llu (not your turn)",
            static_cast<unsigned long long>(r->seq), static_cast<unsigned long long>(c->tested));
    return abi::kInternalError;
  }
  if (c->dead) return abi::kSuccess;  // not done, ever
  if (!r->is_recv) {
    int rc = abi::kSuccess;
    if (!pumpSends(c, &rc)) return rc;
    if (r->phase == Phase::kCopying || r->inner == nullptr) return abi::kSuccess;
    int inner_done = 0;
    size_t inner_size = 0;
    const NetResult inner_rc = s.sockets->test(r->inner, &inner_done, &inner_size);
    if (inner_rc != NetResult::kSuccess) return socketFailed(c, inner_rc);
    if (inner_done == 0) return abi::kSuccess;
    r->inner = nullptr;
    r->phase = Phase::kFree;  // a finished send releases itself
    ++c->tested;
    *done = 1;
    return abi::kSuccess;
  }
  const int rc = progressRecvs(c);
  if (rc != abi::kSuccess || c->dead) return rc;
  if (r->phase == Phase::kDelivering) {
    auto ready = c->queue->done(r->ticket);
    if (!ready.isOk()) {
      EMU_LOG(abi::kLogWarn, "TCPX emulator: copy into the bounce pool failed: %s",
              ready.status().message().c_str());
      return abi::kUnhandledCudaError;
    }
    if (ready.value()) r->phase = Phase::kReady;
  }
  if (r->phase != Phase::kReady) return abi::kSuccess;
  r->phase = Phase::kDone;
  ++c->tested;
  *done = 1;
  return abi::kSuccess;
}

int emuIrecvConsumed(void* recv_comm, int n, void* request) {
  auto* c = static_cast<Comm*>(recv_comm);
  std::lock_guard<std::mutex> lock(c->mu);
  auto* r = static_cast<EmuRequest*>(request);
  // As TCPX for n != 1 and a null request; stricter than TCPX (which logs and returns success
  // for a send request, and consumes a zero-sized receive without checking its turn).
  if (n != 1 || r == nullptr || r->comm != c || !r->is_recv) return abi::kInternalError;
  if (r->phase != EmuRequest::Phase::kDone || r->seq != c->consumed) {
    EMU_LOG(abi::kLogWarn,
            "TCPX emulator: irecvConsumed of receive %llu, but the next to consume is %llu%s",
            static_cast<unsigned long long>(r->seq), static_cast<unsigned long long>(c->consumed),
            r->phase == EmuRequest::Phase::kDone ? "" : " (and it is not done)");
    return abi::kInternalError;
  }
  for (uint32_t p : r->pages) c->free_pages.push_back(p);
  r->pages.clear();
  r->phase = EmuRequest::Phase::kFree;
  ++c->consumed;
  return abi::kSuccess;
}

int emuIflush(void* /*comm*/, int /*n*/, void** /*data*/, int* /*sizes*/, void** /*mh*/,
              void** request) {
  *request = nullptr;  // a stub, as on TCPX
  return abi::kSuccess;
}

int emuCloseSend(void* send_comm) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  auto* c = static_cast<Comm*>(send_comm);
  if (c->inner != nullptr) s.sockets->closeSend(static_cast<transport::SendComm*>(c->inner));
  c->inner = nullptr;
  destroyComm(c);
  return abi::kSuccess;
}

int emuCloseRecv(void* recv_comm) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  auto* c = static_cast<Comm*>(recv_comm);
  if (c->inner != nullptr) s.sockets->closeRecv(static_cast<transport::RecvComm*>(c->inner));
  c->inner = nullptr;
  destroyComm(c);
  return abi::kSuccess;
}

int emuCloseListen(void* listen_comm) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  auto* l = static_cast<Listen*>(listen_comm);
  if (l->accept_polled && !l->accepted) {
    // TCPX's accept thread blocks in accept(2), which closing the socket does not wake: the
    // thread, its half-built comm and its sockets stay. Kept here as a listening socket that is
    // never closed, so that a host which does this leaks a descriptor, as it would on TCPX.
    EMU_LOG(abi::kLogWarn,
            "TCPX emulator: closeListen while an accept is under way; TCPX would leave its "
            "accept thread and sockets behind (so does the emulator: one socket)");
    delete l;
    return abi::kSuccess;
  }
  if (l->inner != nullptr) s.sockets->closeListen(static_cast<transport::ListenComm*>(l->inner));
  delete l;
  return abi::kSuccess;
}

int emuGetDeviceMr(void* /*comm*/, void* /*mhandle*/, void** dptr_mhandle) {
  *dptr_mhandle = nullptr;
  return abi::kSuccess;
}

}  // namespace
}  // namespace tcpx::emulator

extern "C" __attribute__((visibility("default")))
const tcpx::transport::abi::NetV7 ncclNetPlugin_v7 = {
    "TCPXEmulator_v7",
    tcpx::emulator::emuInit,
    tcpx::emulator::emuDevices,
    tcpx::emulator::emuGetProperties,
    tcpx::emulator::emuListen,
    tcpx::emulator::emuConnect,
    tcpx::emulator::emuAccept,
    tcpx::emulator::emuRegMr,
    nullptr,  // regMrDmaBuf: none, as on TCPX
    tcpx::emulator::emuDeregMr,
    tcpx::emulator::emuIsend,
    tcpx::emulator::emuIrecv,
    tcpx::emulator::emuIflush,
    tcpx::emulator::emuTest,
    tcpx::emulator::emuCloseSend,
    tcpx::emulator::emuCloseRecv,
    tcpx::emulator::emuCloseListen,
    tcpx::emulator::emuGetDeviceMr,
    tcpx::emulator::emuIrecvConsumed,
};
