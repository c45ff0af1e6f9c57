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
#include "common/memory_map.h"
#include "common/rate_limit.h"
#include "common/strings.h"
#include "gpu/gpu.h"
#include "transport/plugin/net_abi.h"
#include "transport/plugin/tcpx_preflight.h"

namespace tcpx::transport {
namespace {

// ---- The plugin's logger, routed into ours with a rate limit per call site ----

// TCPX logs a warning per host receive attempt (hundreds of thousands of lines), and the warning
// that explains its exit(1) must still get through: each call site (file, which TCPX fills with
// its function name, and line) has its own budget of lines per second.
RateLimitPerSite& limiter() {
  static RateLimitPerSite l(/*per_second=*/20, /*max_sites=*/64);
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
  uint64_t dropped = 0;
  if (!limiter().allow(file, line, RateLimitPerSite::Clock::now(), &dropped)) return;
  const char* where = file != nullptr ? file : "plugin";
  if (dropped > 0) {
    log::write(ours, where, line, "net plugin: %llu more lines from here suppressed (rate limit)",
               static_cast<unsigned long long>(dropped));
  }
  char text[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(text, sizeof(text), fmt, ap);
  va_end(ap);
  log::write(ours, where, line, "net plugin: %s", text);
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

// A plugin library, loaded and initialised once per process and shared by every engine that
// uses it: ncclNet has no finalize, and TCPX refuses a second init ("gpu lib init twice"). It
// stays loaded and initialised until the process exits (its threads and static state outlive
// close calls, so unloading it is not safe); what an engine opened in it, the engine closes.
struct SharedPlugin {
  void* library = nullptr;
  std::string path;
  Table table;
  Status init_status;  // of the one init (a failed init is not retried either)
  std::vector<Properties> props;
};

struct PluginRegistry {
  std::mutex mu;  // held while a plugin is looked up, loaded and initialised
  std::vector<std::shared_ptr<SharedPlugin>> loaded;
};

PluginRegistry& registry() {
  static PluginRegistry r;
  return r;
}

// init, then the devices and their properties, once per process.
Status initialise(SharedPlugin* p) {
  const int rc = p->table.init(&pluginLogger);
  if (rc != abi::kSuccess) {
    return Status(StatusCode::kTransportError,
                  strfmt("net plugin '%s' (%s): init failed (%s)", p->table.name(), p->path.c_str(),
                         netResultName(result(rc))));
  }
  int n = 0;
  if (p->table.devices(&n) != abi::kSuccess || n <= 0) {
    return Status(StatusCode::kNotSupported,
                  strfmt("net plugin '%s' reports no devices", p->table.name()));
  }
  p->props.resize(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) {
    if (p->table.properties(i, &p->props[static_cast<size_t>(i)]) != abi::kSuccess) {
      return Status(StatusCode::kTransportError,
                    strfmt("net plugin '%s': getProperties(%d) failed", p->table.name(), i));
    }
  }
  LOG_INFO("net plugin '%s' (ncclNet v%d) from %s: %d device(s), first '%s'", p->table.name(),
           p->table.version, p->path.c_str(), n, p->props[0].name.c_str());
  return {};
}

class PluginTransport final : public Transport {
 public:
  PluginTransport(std::string label, std::shared_ptr<const SharedPlugin> plugin)
      : label_(std::move(label)),
        plugin_(std::move(plugin)),
        table_(plugin_->table),
        props_(plugin_->props) {
    unpack_ = props_[0].device_type == NetDeviceType::kUnpack;
    device_send_ = (props_[0].ptr_support & kPtrCuda) != 0 && gpu::deviceCount() > 0;
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
  [[nodiscard]] bool setupRunsInThreads() const override { return true; }
  [[nodiscard]] uint64_t maxRequestBytes() const override {
    return unpack_ ? abi::kMaxUnpackRecv : static_cast<uint64_t>(INT_MAX);
  }
  [[nodiscard]] bool sendsFromDevice() const override { return device_send_; }
  [[nodiscard]] const UnpackSource* unpackSource(const RecvComm* comm) const override {
    const auto* r = reinterpret_cast<const PluginRecv*>(comm);
    return r->unpack ? &r->source : nullptr;
  }

 private:
  // regMr/deregMr take either kind of comm: both wrappers start with the plugin's pointer. A
  // null comm (deregMr after close) stays null.
  static void* inner(void* comm) { return comm != nullptr ? *static_cast<void**>(comm) : nullptr; }

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
    // The unpack bound: the end of the pool's GPU allocation, or for a pool in host memory (the
    // emulator without a GPU) the end of the memory mapped there, beyond which no fragment may
    // point.
    r->source.pool_size = r->source.pool_device >= 0 ? gpu::deviceBytesAfter(uh.bounce_buf)
                                                     : mappedBytesAfter(uh.bounce_buf);
    return {};
  }

  std::string label_;
  std::shared_ptr<const SharedPlugin> plugin_;
  const Table& table_;
  const std::vector<Properties>& props_;
  bool unpack_ = false;
  bool device_send_ = false;
  std::unordered_map<PluginListen*, std::unique_ptr<PluginRecv>> pending_;
};

bool fileExists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

// The table a library exports, or why it has none we can use.
std::string findTable(void* lib, Table* table) {
  if (auto* v8 = static_cast<const abi::NetV8*>(dlsym(lib, abi::kSymbolV8))) {
    table->version = 8;
    table->v8 = v8;
    return {};
  }
  if (auto* v7 = static_cast<const abi::NetV7*>(dlsym(lib, abi::kSymbolV7))) {
    table->version = 7;
    table->v7 = v7;
    return {};
  }
  std::string found;
  for (int v = 2; v <= 12; ++v) {
    if (dlsym(lib, strfmt("ncclNetPlugin_v%d", v).c_str()) != nullptr) found += strfmt(" v%d", v);
  }
  return strfmt(
      "exports no ncclNetPlugin_v7 or _v8 table (found:%s); only ncclNet v7 and v8 "
      "plugins are supported",
      found.empty() ? " none" : found.c_str());
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
  PluginRegistry& reg = registry();
  std::lock_guard<std::mutex> lock(reg.mu);
  std::string tried;
  for (const std::string& path : options.candidates) {
    if (path.find('/') != std::string::npos && !fileExists(path)) {
      tried += "\n  " + path + ": no such file";
      continue;
    }
    void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
      const char* err = dlerror();  // NOLINT(concurrency-mt-unsafe): per thread in glibc
      tried += "\n  " + path + ": " + (err != nullptr ? err : "dlopen failed");
      continue;
    }
    // dlopen hands out one handle per library, however it was named.
    std::shared_ptr<SharedPlugin> plugin;
    for (const auto& p : reg.loaded) {
      if (p->library == lib) plugin = p;
    }
    if (plugin != nullptr) {
      dlclose(lib);  // the registry's reference keeps it loaded
    } else {
      plugin = std::make_shared<SharedPlugin>();
      plugin->library = lib;
      plugin->path = path;
      const std::string why = findTable(lib, &plugin->table);
      if (!why.empty()) {
        dlclose(lib);
        tried += strfmt("\n  %s: %s", path.c_str(), why.c_str());
        continue;
      }
    }
    const bool registered = plugin.use_count() > 1;
    const bool tcpx = isTcpxTable(plugin->table.name());
    if (options.label == "tcpx" && !tcpx) {
      tried += strfmt("\n  %s: its table is '%s', not GPUDirect-TCPX's (%s...)", path.c_str(),
                      plugin->table.name(), kTcpxTableName);
      if (!registered) dlclose(lib);
      continue;
    }
    if (tcpx) {
      // Every engine checks its own GPU: TCPX exits when that GPU's receive pool is missing.
      Status st = checkTcpxPreconditions({options.cuda_driver, options.gpu});
      if (!st.isOk()) {
        if (!registered) dlclose(lib);
        return st;
      }
    }
    if (!registered) {
      if (tcpx) applyTcpxDefaults();
      plugin->init_status = initialise(plugin.get());
      reg.loaded.push_back(plugin);  // even after a failed init: it never runs twice
    } else if (plugin->init_status.isOk()) {
      LOG_INFO("net plugin '%s' from %s: already loaded and initialised in this process, shared",
               plugin->table.name(), plugin->path.c_str());
    }
    if (!plugin->init_status.isOk()) return plugin->init_status;
    return std::unique_ptr<Transport>(std::make_unique<PluginTransport>(options.label, plugin));
  }
  return Status(StatusCode::kNotSupported,
                "no usable ncclNet plugin for transport '" + options.label + "'; tried:" + tried);
}

}  // namespace tcpx::transport
