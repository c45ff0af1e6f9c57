#include "transport/plugin/plugin_transport.h"

#include <dlfcn.h>

#include <atomic>
#include <chrono>
#include <climits>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <sys/stat.h>
#include <unordered_map>

#include "common/log.h"
#include "common/strings.h"
#include "gpu/gpu.h"
#include "transport/plugin/net_abi.h"

namespace tcpx::transport {
namespace {

// ---- The plugin's logger, routed into ours with a rate limit ----

constexpr int kLinesPerSecond = 20;

struct LogLimiter {
  std::mutex mu;
  std::chrono::steady_clock::time_point window{};
  int lines = 0;
  long suppressed = 0;
};

LogLimiter& limiter() {
  static LogLimiter l;
  return l;
}

void pluginLogger(int level, unsigned long /*flags*/, const char* file, int line, const char* fmt,
                  ...) {
  log::Level ours = log::Level::kDebug;
  switch (level) {
    case abi::kLogAbort:
      ours = log::Level::kError;
      break;
    case abi::kLogWarn:
      ours = log::Level::kWarn;
      break;
    case abi::kLogVersion:
      ours = log::Level::kInfo;
      break;
    case abi::kLogTrace:
      ours = log::Level::kTrace;
      break;
    default:
      break;
  }
  if (level == abi::kLogNone || !log::enabled(ours)) return;
  long dropped = 0;
  {
    LogLimiter& l = limiter();
    std::lock_guard<std::mutex> lock(l.mu);
    const auto now = std::chrono::steady_clock::now();
    if (now - l.window > std::chrono::seconds(1)) {
      dropped = l.suppressed;
      l.window = now;
      l.lines = 0;
      l.suppressed = 0;
    }
    if (++l.lines > kLinesPerSecond) {
      ++l.suppressed;
      return;
    }
  }
  if (dropped > 0) LOG_WARN("net plugin: %ld messages suppressed (rate limit)", dropped);
  char text[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(text, sizeof(text), fmt, ap);
  va_end(ap);
  log::write(ours, file != nullptr ? file : "plugin", line, "net plugin: %s", text);
}

// ---- Comm wrappers ----

struct PluginListen {
  void* comm = nullptr;
};

struct PluginSend {
  void* comm = nullptr;
};

struct PluginRecv {
  void* comm = nullptr;
  alignas(abi::kDeviceHandleAlign) abi::DeviceHandle device_handle{};
  abi::DeviceHandle* device_handle_ptr = &device_handle;
  Transport::UnpackSource source;
  bool unpack = false;
};

// The fields v7 and v8 properties share, into ours.
template <typename P>
void copyProperties(const P& p, Properties* out) {
  out->name = p.name != nullptr ? p.name : "";
  out->pci_path = p.pci_path != nullptr ? p.pci_path : "";
  out->guid = p.guid;
  out->ptr_support = p.ptr_support;
  out->speed_mbps = p.speed;
  out->port = p.port;
  out->latency = p.latency;
  out->max_comms = p.max_comms;
  out->max_recvs = p.max_recvs;
  out->device_type =
      p.net_device_type == abi::kDeviceUnpack ? NetDeviceType::kUnpack : NetDeviceType::kHost;
  out->device_version = p.net_device_version;
}

// Our interface passes a plugin's results and pointer types through unchanged.
static_assert(static_cast<int>(NetResult::kSuccess) == abi::kSuccess &&
              static_cast<int>(NetResult::kInternalError) == abi::kInternalError &&
              static_cast<int>(NetResult::kInProgress) == abi::kInProgress);
static_assert(static_cast<int>(kPtrHost) == abi::kPtrHost &&
              static_cast<int>(kPtrCuda) == abi::kPtrCuda);

// One table version behind uniform calls.
struct Table {
  int version = 0;
  const abi::NetV7* v7 = nullptr;
  const abi::NetV8* v8 = nullptr;

#define TCPX_PLUGIN_CALL(fn, ...) (v8 != nullptr ? v8->fn(__VA_ARGS__) : v7->fn(__VA_ARGS__))
  [[nodiscard]] const char* name() const {
    return v8 != nullptr ? v8->name : v7->name;
  }
  int init(abi::Logger logger) const {
    return TCPX_PLUGIN_CALL(init, logger);
  }
  int devices(int* n) const {
    return TCPX_PLUGIN_CALL(devices, n);
  }
  int properties(int dev, Properties* out) const {
    if (v8 != nullptr) {
      abi::PropertiesV8 p{};
      const int rc = v8->get_properties(dev, &p);
      copyProperties(p, out);
      return rc;
    }
    abi::PropertiesV7 p{};
    const int rc = v7->get_properties(dev, &p);
    copyProperties(p, out);
    return rc;
  }
  int listen(int dev, void* handle, void** comm) const {
    return TCPX_PLUGIN_CALL(listen, dev, handle, comm);
  }
  int connect(int dev, void* handle, void** comm, abi::DeviceHandle** dh) const {
    return TCPX_PLUGIN_CALL(connect, dev, handle, comm, dh);
  }
  int accept(void* listen, void** comm, abi::DeviceHandle** dh) const {
    return TCPX_PLUGIN_CALL(accept, listen, comm, dh);
  }
  int regMr(void* comm, void* data, size_t size, int type, void** mh) const {
    if (v8 != nullptr) return v8->reg_mr(comm, data, size, type, mh);
    return v7->reg_mr(comm, data, static_cast<int>(size), type, mh);
  }
  int deregMr(void* comm, void* mh) const {
    return TCPX_PLUGIN_CALL(dereg_mr, comm, mh);
  }
  int isend(void* comm, void* data, int size, int tag, void* mh, void** req) const {
    return TCPX_PLUGIN_CALL(isend, comm, data, size, tag, mh, req);
  }
  int irecv(void* comm, void* data, int size, int tag, void* mh, void** req) const {
    void* datas[1] = {data};
    int sizes[1] = {size};
    int tags[1] = {tag};
    void* mhs[1] = {mh};
    return TCPX_PLUGIN_CALL(irecv, comm, 1, datas, sizes, tags, mhs, req);
  }
  int test(void* req, int* done, int* size) const {
    return TCPX_PLUGIN_CALL(test, req, done, size);
  }
  int irecvConsumed(void* comm, void* req) const {
    return TCPX_PLUGIN_CALL(irecv_consumed, comm, 1, req);
  }
  int closeSend(void* comm) const {
    return TCPX_PLUGIN_CALL(close_send, comm);
  }
  int closeRecv(void* comm) const {
    return TCPX_PLUGIN_CALL(close_recv, comm);
  }
  int closeListen(void* comm) const {
    return TCPX_PLUGIN_CALL(close_listen, comm);
  }
#undef TCPX_PLUGIN_CALL
};

NetResult result(int rc) {
  return rc >= 0 && rc <= 7 ? static_cast<NetResult>(rc) : NetResult::kInternalError;
}

class PluginTransport final : public Transport {
 public:
  PluginTransport(std::string label, void* library, Table table)
      : label_(std::move(label)), library_(library), table_(table) {}
  ~PluginTransport() override {
    // The library stays loaded: plugins keep threads and static state that outlive close calls.
    (void)library_;
  }

  Status start() {
    const int rc = table_.init(&pluginLogger);
    if (rc != abi::kSuccess) {
      return Status(StatusCode::kTransportError, strfmt("net plugin '%s': init failed (%s)",
                                                        table_.name(), netResultName(result(rc))));
    }
    int n = 0;
    if (table_.devices(&n) != abi::kSuccess || n <= 0) {
      return Status(StatusCode::kNotSupported,
                    strfmt("net plugin '%s' reports no devices", table_.name()));
    }
    props_.resize(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) {
      if (table_.properties(i, &props_[static_cast<size_t>(i)]) != abi::kSuccess) {
        return Status(StatusCode::kTransportError,
                      strfmt("net plugin '%s': getProperties(%d) failed", table_.name(), i));
      }
    }
    unpack_ = props_[0].device_type == NetDeviceType::kUnpack;
    device_send_ = (props_[0].ptr_support & kPtrCuda) != 0 && gpu::deviceCount() > 0;
    LOG_INFO("net plugin '%s' (ncclNet v%d): %d device(s), first '%s', %s receive", table_.name(),
             table_.version, n, props_[0].name.c_str(), unpack_ ? "unpack" : "host");
    return {};
  }

  [[nodiscard]] const char* name() const override { return label_.c_str(); }

  NetResult devices(int* ndev) override {
    *ndev = static_cast<int>(props_.size());
    return NetResult::kSuccess;
  }
  NetResult getProperties(int dev, Properties* props) override {
    if (dev < 0 || static_cast<size_t>(dev) >= props_.size()) return NetResult::kInvalidArgument;
    *props = props_[static_cast<size_t>(dev)];
    return NetResult::kSuccess;
  }

  NetResult listen(int dev, ConnectHandle* handle, ListenComm** comm) override {
    auto* l = new PluginListen;
    const int rc = table_.listen(dev, handle->bytes, &l->comm);
    if (rc != abi::kSuccess) {
      delete l;
      return result(rc);
    }
    *comm = reinterpret_cast<ListenComm*>(l);
    return NetResult::kSuccess;
  }

  NetResult connect(int dev, ConnectHandle* handle, SendComm** comm) override {
    *comm = nullptr;
    void* raw = nullptr;
    abi::DeviceHandle* none = nullptr;  // the send side passes a pointer to null
    const int rc = table_.connect(dev, handle->bytes, &raw, &none);
    if (rc != abi::kSuccess) return result(rc);
    if (raw == nullptr) return NetResult::kSuccess;  // not connected yet
    *comm = reinterpret_cast<SendComm*>(new PluginSend{raw});
    return NetResult::kSuccess;
  }

  NetResult accept(ListenComm* listen_comm, RecvComm** comm) override {
    *comm = nullptr;
    auto* l = reinterpret_cast<PluginListen*>(listen_comm);
    auto& pending = pending_[l];
    if (!pending) {
      pending = std::make_unique<PluginRecv>();
      pending->device_handle.net_device_type = unpack_ ? abi::kDeviceUnpack : abi::kDeviceHost;
      pending->device_handle.net_device_version = unpack_ ? abi::kUnpackVersion : 0;
    }
    void* raw = nullptr;
    const int rc = table_.accept(l->comm, &raw, &pending->device_handle_ptr);
    if (rc != abi::kSuccess) {
      pending_.erase(l);
      return result(rc);
    }
    if (raw == nullptr) return NetResult::kSuccess;
    std::unique_ptr<PluginRecv> r = std::move(pending);
    pending_.erase(l);
    r->comm = raw;
    Status st = readUnpackSource(r.get());
    if (!st.isOk()) {
      LOG_ERROR("net plugin '%s': %s", table_.name(), st.message().c_str());
      table_.closeRecv(raw);
      return NetResult::kInternalError;
    }
    *comm = reinterpret_cast<RecvComm*>(r.release());
    return NetResult::kSuccess;
  }

  NetResult regMr(void* comm, void* data, size_t size, int ptr_type, MemHandle** mh) override {
    if (size > static_cast<size_t>(INT_MAX) && table_.v8 == nullptr) {
      return NetResult::kInvalidArgument;
    }
    if (ptr_type == kPtrCuda && reinterpret_cast<uintptr_t>(data) % abi::kUnpackPage != 0) {
      LOG_ERROR("net plugin '%s': CUDA buffer %p must be 4 KiB aligned to be registered",
                table_.name(), data);
      return NetResult::kInvalidArgument;
    }
    void* raw = nullptr;
    const int rc = table_.regMr(inner(comm), data, size, ptr_type, &raw);
    *mh = static_cast<MemHandle*>(raw);
    return result(rc);
  }
  NetResult deregMr(void* comm, MemHandle* mh) override {
    return result(table_.deregMr(inner(comm), mh));
  }

  NetResult isend(SendComm* comm, const IoSlice* slices, int nslices, size_t offset, size_t size,
                  int tag, MemHandle* mh, Request** request) override {
    *request = nullptr;
    if (size > static_cast<size_t>(INT_MAX) || (size > 0 && (slices == nullptr || nslices < 1))) {
      return NetResult::kInvalidUsage;
    }
    char* data = slices != nullptr ? static_cast<char*>(slices[0].data) + offset : nullptr;
    void* req = nullptr;
    const int rc = table_.isend(reinterpret_cast<PluginSend*>(comm)->comm, data,
                                static_cast<int>(size), tag, mh, &req);
    *request = static_cast<Request*>(req);
    return result(rc);
  }
  NetResult irecv(RecvComm* comm, const IoSlice* slices, int nslices, size_t offset, size_t size,
                  int tag, MemHandle* mh, Request** request) override {
    *request = nullptr;
    if (size > static_cast<size_t>(INT_MAX) || (size > 0 && (slices == nullptr || nslices < 1))) {
      return NetResult::kInvalidUsage;
    }
    char* data = slices != nullptr ? static_cast<char*>(slices[0].data) + offset : nullptr;
    void* req = nullptr;
    const int rc = table_.irecv(reinterpret_cast<PluginRecv*>(comm)->comm, data,
                                static_cast<int>(size), tag, mh, &req);
    *request = static_cast<Request*>(req);
    return result(rc);
  }
  NetResult test(Request* request, int* done, size_t* size) override {
    int n = 0;
    const int rc = table_.test(request, done, &n);
    if (size != nullptr) *size = 0;  // TCPX does not report sizes
    return result(rc);
  }
  NetResult irecvConsumed(RecvComm* comm, Request* request) override {
    return result(table_.irecvConsumed(reinterpret_cast<PluginRecv*>(comm)->comm, request));
  }

  NetResult closeSend(SendComm* comm) override {
    auto* s = reinterpret_cast<PluginSend*>(comm);
    const int rc = table_.closeSend(s->comm);
    delete s;
    return result(rc);
  }
  NetResult closeRecv(RecvComm* comm) override {
    auto* r = reinterpret_cast<PluginRecv*>(comm);
    const int rc = table_.closeRecv(r->comm);
    delete r;
    return result(rc);
  }
  NetResult closeListen(ListenComm* comm) override {
    auto* l = reinterpret_cast<PluginListen*>(comm);
    pending_.erase(l);
    const int rc = table_.closeListen(l->comm);
    delete l;
    return result(rc);
  }

  [[nodiscard]] bool needsRegistration() const override { return true; }
  [[nodiscard]] uint64_t maxRequestBytes() const override {
    return unpack_ ? abi::kMaxUnpackRecv : static_cast<uint64_t>(INT_MAX);
  }
  [[nodiscard]] bool sendsFromDevice() const override { return device_send_; }
  [[nodiscard]] const UnpackSource* unpackSource(const RecvComm* comm) const override {
    const auto* r = reinterpret_cast<const PluginRecv*>(comm);
    return r->unpack ? &r->source : nullptr;
  }

 private:
  // regMr/deregMr take either kind of comm: both wrappers start with the plugin's pointer.
  static void* inner(void* comm) { return *static_cast<void**>(comm); }

  Status readUnpackSource(PluginRecv* r) {
    if (!unpack_) return {};
    const abi::DeviceHandle& dh = r->device_handle;
    if (dh.handle == nullptr)
      return Status(StatusCode::kTransportError, "accept left no unpack handle");
    abi::UnpackHandle uh{};
    Status st = gpu::copySync(&uh, dh.handle, sizeof(uh));  // device or host memory
    if (!st.isOk()) return st;
    if (uh.meta == nullptr || uh.bounce_buf == nullptr) {
      return Status(StatusCode::kTransportError, "the unpack handle names no metadata or pool");
    }
    r->unpack = true;
    r->source.meta = uh.meta;
    r->source.pool = static_cast<const char*>(uh.bounce_buf);
    r->source.pool_device = gpu::deviceOf(uh.bounce_buf);
    r->source.pool_size = gpu::deviceBytesAfter(uh.bounce_buf);
    return {};
  }

  std::string label_;
  void* library_;
  Table table_;
  std::vector<Properties> props_;
  bool unpack_ = false;
  bool device_send_ = false;
  std::unordered_map<PluginListen*, std::unique_ptr<PluginRecv>> pending_;
};

bool fileExists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

// What TCPX needs so that it does not call exit(): a usable GPU and RxDM's UNIX sockets.
Status tcpxPreflight() {
  if (gpu::deviceCount() == 0) {
    return Status(StatusCode::kNotSupported,
                  "TCPX is not used: it needs a usable GPU (" + gpu::unavailableReason() + ")");
  }
  const char* prefix = std::getenv("NCCL_GPUDIRECTTCPX_UNIX_CLIENT_PREFIX");
  const std::string dir = prefix != nullptr && *prefix ? prefix : "/run/tcpx";
  if (!fileExists(dir + "/rx_rule_manager")) {
    return Status(StatusCode::kNotSupported,
                  "TCPX is not used: the receive-data-path manager (RxDM) socket " + dir +
                      "/rx_rule_manager does not exist (is the RxDM container running, and "
                      "NCCL_GPUDIRECTTCPX_UNIX_CLIENT_PREFIX set?)");
  }
  // Without a chunk size TCPX livelocks; Google's settings otherwise.
  setenv("NCCL_DYNAMIC_CHUNK_SIZE", "524288", 0);
  setenv("NCCL_NSOCKS_PERTHREAD", "4", 0);
  setenv("NCCL_SOCKET_NTHREADS", "1", 0);
  return {};
}

std::string thisLibraryDir() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&thisLibraryDir), &info) == 0 || info.dli_fname == nullptr) {
    return {};
  }
  std::string path = info.dli_fname;
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? std::string() : path.substr(0, slash);
}

}  // namespace

std::vector<std::string> defaultPluginCandidates(const std::string& transport) {
  if (transport == "emulator") {
    std::vector<std::string> out;
    const std::string dir = thisLibraryDir();
    if (!dir.empty()) {
      out.push_back(dir + "/libnccl-net-tcpxemu.so");
      out.push_back(dir + "/../lib/libnccl-net-tcpxemu.so");
    }
    out.emplace_back("libnccl-net-tcpxemu.so");
#ifdef TCPX_P2P_EMULATOR_INSTALL_PATH
    out.emplace_back(TCPX_P2P_EMULATOR_INSTALL_PATH);
#endif
#ifdef TCPX_P2P_EMULATOR_BUILD_PATH
    out.emplace_back(TCPX_P2P_EMULATOR_BUILD_PATH);
#endif
    return out;
  }
  return {"/usr/local/tcpx/lib64/libnccl-net.so", "libnccl-net.so"};
}

Result<std::unique_ptr<Transport>> loadPlugin(const PluginOptions& options) {
  if (options.tcpx_preflight) {
    Status st = tcpxPreflight();
    if (!st.isOk()) return st;
  }
  std::string tried;
  for (const std::string& path : options.candidates) {
    if (path.find('/') != std::string::npos && !fileExists(path)) {
      tried += "\n  " + path + ": no such file";
      continue;
    }
    void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
      const char* err = dlerror();
      tried += "\n  " + path + ": " + (err != nullptr ? err : "dlopen failed");
      continue;
    }
    Table table;
    if (auto* v8 = static_cast<const abi::NetV8*>(dlsym(lib, abi::kSymbolV8))) {
      table.version = 8;
      table.v8 = v8;
    } else if (auto* v7 = static_cast<const abi::NetV7*>(dlsym(lib, abi::kSymbolV7))) {
      table.version = 7;
      table.v7 = v7;
    } else {
      std::string found;
      for (int v = 2; v <= 12; ++v) {
        if (dlsym(lib, strfmt("ncclNetPlugin_v%d", v).c_str()) != nullptr) {
          found += strfmt(" v%d", v);
        }
      }
      dlclose(lib);
      return Status(StatusCode::kNotSupported,
                    strfmt("%s exports no ncclNetPlugin_v7 or _v8 table (found:%s); only ncclNet "
                           "v7 and v8 plugins are supported",
                           path.c_str(), found.empty() ? " none" : found.c_str()));
    }
    auto transport = std::make_unique<PluginTransport>(options.label, lib, table);
    Status st = transport->start();
    if (!st.isOk()) return st;
    LOG_INFO("loaded net plugin %s", path.c_str());
    return std::unique_ptr<Transport>(std::move(transport));
  }
  return Status(StatusCode::kNotSupported,
                "no usable ncclNet plugin for transport '" + options.label + "'; tried:" + tried);
}

}  // namespace tcpx::transport
