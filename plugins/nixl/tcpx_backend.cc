// libplugin_TCPX.so: NIXL backend "TCPX", a thin adapter over the tcpx_p2p engine.
//
// Every NIXL call maps onto one engine call; the engine does all transfer work on its own
// progress thread, so progress does not depend on NIXL's progress-thread setting, and its API is
// safe to call from several threads at once (NIXL's RW sync mode). Mapping:
//   conn info / loadRemoteConnInfo / connect / disconnect -> connectionInfo / addPeer and
//     startConnecting / connect / removePeer, peers named by their NIXL agent names (the engine
//     is named after ours);
//   registerMem / getPublicData / loadRemoteMD / unloadMD -> registerMemory / memoryDescriptor /
//     loadRemoteMemory / unloadRemoteMemory; loadLocalMD loads our own descriptor, so transfers
//     to ourselves are the engine's transfers to itself (host memory copied without a
//     connection; GPU memory still over a connection the engine opens to itself on first use);
//   prepXfer / postXfer / checkXfer / releaseReqH -> prepareTransfer / postTransfer /
//     checkTransfer / releaseTransfer; genNotif / getNotifs -> sendNotification /
//     takeNotifications.
// Backend parameters are the engine's tunables plus transport=auto|tcpx|emulator|socket.
#include <backend/backend_engine.h>
#include <backend/backend_plugin.h>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <tcpx_p2p/config.h>
#include <tcpx_p2p/engine.h>

namespace {

using tcpx::Status;
using tcpx::StatusCode;

constexpr const char* kPluginName = "TCPX";
constexpr const char* kPluginVersion = "0.1.0";

nixl_status_t toNixl(const Status& st) {
  switch (st.code()) {
    case StatusCode::kOk:
      return NIXL_SUCCESS;
    case StatusCode::kInProgress:
      return NIXL_IN_PROG;
    case StatusCode::kNotPosted:
      return NIXL_ERR_NOT_POSTED;
    case StatusCode::kInvalidArgument:
    case StatusCode::kOutOfRange:
      return NIXL_ERR_INVALID_PARAM;
    case StatusCode::kNotFound:
      return NIXL_ERR_NOT_FOUND;
    case StatusCode::kLengthMismatch:
      return NIXL_ERR_MISMATCH;
    case StatusCode::kAlreadyExists:
      return NIXL_ERR_NOT_ALLOWED;
    case StatusCode::kRepostActive:
      return NIXL_ERR_REPOST_ACTIVE;
    case StatusCode::kRemoteDisconnected:
    case StatusCode::kTimeout:
    case StatusCode::kProtocolError:  // the engine closed the connection to that peer
      return NIXL_ERR_REMOTE_DISCONNECT;
    case StatusCode::kCanceled:
      return NIXL_ERR_CANCELED;
    case StatusCode::kNotSupported:
      return NIXL_ERR_NOT_SUPPORTED;
    default:
      return NIXL_ERR_BACKEND;
  }
}

nixl_status_t fail(const std::string& what, const Status& st) {
  if (st.code() != StatusCode::kInProgress) {
    NIXL_ERROR << "TCPX backend: " << what << ": " << st.toString();
  }
  return toNixl(st);
}

// The options NIXL lists for the backend: every engine tunable with its default, except the
// engine name (our agent's name), plus the transport choice.
nixl_b_params_t defaultOptions() {
  nixl_b_params_t out;
  for (const tcpx::TunableInfo& t : tcpx::Config::tunables()) {
    if (t.name == "name") continue;
    out[std::string(t.name)] = std::string(t.default_value);
  }
  out["transport"] = "auto";
  return out;
}

struct LocalMD : nixlBackendMD {
  LocalMD(tcpx::MemoryId memory, uintptr_t start) : nixlBackendMD(true), id(memory), base(start) {}
  tcpx::MemoryId id;
  uintptr_t base;
};

struct RemoteMD : nixlBackendMD {
  explicit RemoteMD(tcpx::RemoteMemory m) : nixlBackendMD(false), remote(std::move(m)) {}
  tcpx::RemoteMemory remote;
};

struct Request : nixlBackendReqH {
  tcpx::TransferHandle handle = 0;
  std::optional<std::string> notification;
};

class TcpxBackend final : public nixlBackendEngine {
 public:
  explicit TcpxBackend(const nixlBackendInitParams* init) : nixlBackendEngine(init) {
    Status st = start(init);
    if (!st.isOk()) {
      NIXL_ERROR << "TCPX backend: " << st.toString();
      initErr = true;
    }
  }
  ~TcpxBackend() override = default;

  bool supportsRemote() const override { return true; }
  bool supportsLocal() const override { return true; }
  bool supportsNotif() const override { return true; }
  nixl_mem_list_t getSupportedMems() const override { return {DRAM_SEG, VRAM_SEG}; }

  nixl_status_t getConnInfo(std::string& str) const override {
    str = engine_->connectionInfo();
    return NIXL_SUCCESS;
  }
  nixl_status_t loadRemoteConnInfo(const std::string& agent, const std::string& info) override {
    Status st = engine_->addPeer(agent, info);
    if (!st.isOk()) return fail("loading the connection info of " + agent, st);
    // Connection set-up starts now, in the background (on TCPX it takes seconds): the first
    // transfer does not pay for it, and a peer that is already gone fails within about 2 s.
    st = engine_->startConnecting(agent);
    return st.isOk() ? NIXL_SUCCESS : fail("connecting to " + agent, st);
  }
  nixl_status_t connect(const std::string& agent) override {
    if (agent == localAgent) {
      // NIXL connects every agent to itself when the backend is created: the engine's own peer
      // needs no connection for host memory, and opens one on first use for GPU memory.
      Status st = engine_->addPeer(agent, engine_->connectionInfo());
      if (!st.isOk() && st.code() != StatusCode::kAlreadyExists) return fail("self peer", st);
      st = engine_->startConnecting(agent);
      return st.isOk() ? NIXL_SUCCESS : fail("self peer", st);
    }
    const Status st = engine_->connect(agent);
    return st.isOk() ? NIXL_SUCCESS : fail("connecting to " + agent, st);
  }
  nixl_status_t disconnect(const std::string& agent) override {
    const Status st = engine_->removePeer(agent);
    return st.isOk() || st.code() == StatusCode::kNotFound ? NIXL_SUCCESS
                                                           : fail("disconnecting", st);
  }

  nixl_status_t registerMem(const nixlBlobDesc& mem, const nixl_mem_t& type,
                            nixlBackendMD*& out) override {
    if (type != DRAM_SEG && type != VRAM_SEG) return NIXL_ERR_NOT_SUPPORTED;
    auto id = engine_->registerMemory(
        reinterpret_cast<void*>(mem.addr), mem.len,
        type == VRAM_SEG ? tcpx::MemoryKind::kCuda : tcpx::MemoryKind::kHost,
        type == VRAM_SEG ? static_cast<int>(mem.devId) : -1);
    if (!id.isOk()) return fail("registering memory", id.status());
    out = new LocalMD(id.value(), mem.addr);
    return NIXL_SUCCESS;
  }
  nixl_status_t deregisterMem(nixlBackendMD* meta) override {
    auto* md = static_cast<LocalMD*>(meta);
    const Status st = engine_->deregisterMemory(md->id);
    delete md;
    return st.isOk() ? NIXL_SUCCESS : fail("deregistering memory", st);
  }
  nixl_status_t getPublicData(const nixlBackendMD* meta, std::string& str) const override {
    auto blob = engine_->memoryDescriptor(static_cast<const LocalMD*>(meta)->id);
    if (!blob.isOk()) return fail("public data", blob.status());
    str = blob.value();
    return NIXL_SUCCESS;
  }
  nixl_status_t loadRemoteMD(const nixlBlobDesc& input, const nixl_mem_t& /*type*/,
                             const std::string& /*agent*/, nixlBackendMD*& output) override {
    auto remote = engine_->loadRemoteMemory(input.metaInfo);
    if (!remote.isOk()) return fail("loading remote metadata", remote.status());
    output = new RemoteMD(remote.value());
    return NIXL_SUCCESS;
  }
  nixl_status_t loadLocalMD(nixlBackendMD* input, nixlBackendMD*& output) override {
    // A remote view of our own registration (a separate object: unloadMD frees it).
    auto blob = engine_->memoryDescriptor(static_cast<LocalMD*>(input)->id);
    if (!blob.isOk()) return fail("local metadata", blob.status());
    auto remote = engine_->loadRemoteMemory(blob.value());
    if (!remote.isOk()) return fail("local metadata", remote.status());
    output = new RemoteMD(remote.value());
    return NIXL_SUCCESS;
  }
  nixl_status_t unloadMD(nixlBackendMD* input) override {
    auto* md = dynamic_cast<RemoteMD*>(input);
    if (md == nullptr) return NIXL_SUCCESS;  // not ours to free (a local registration)
    (void)engine_->unloadRemoteMemory(md->remote);
    delete md;
    return NIXL_SUCCESS;
  }

  nixl_status_t prepXfer(const nixl_xfer_op_t& op, const nixl_meta_dlist_t& local,
                         const nixl_meta_dlist_t& remote, const std::string& agent,
                         nixlBackendReqH*& handle, const nixl_opt_b_args_t* opt) const override {
    auto req = std::make_unique<Request>();
    if (opt != nullptr && opt->hasNotif) req->notification = opt->notifMsg;
    const nixl_status_t rc = prepare(op, local, remote, agent, req.get());
    if (rc == NIXL_SUCCESS) handle = req.release();
    return rc;
  }
  nixl_status_t postXfer(const nixl_xfer_op_t& op, const nixl_meta_dlist_t& local,
                         const nixl_meta_dlist_t& remote, const std::string& agent,
                         nixlBackendReqH*& handle, const nixl_opt_b_args_t* opt) const override {
    auto* req = static_cast<Request*>(handle);
    std::optional<std::string> note;
    if (opt != nullptr && opt->hasNotif) note = opt->notifMsg;
    if (note != req->notification) {
      // A different notification for this run: the engine binds it at prepare time.
      if (engine_->checkTransfer(req->handle).code() == StatusCode::kInProgress) {
        return NIXL_ERR_REPOST_ACTIVE;
      }
      (void)engine_->releaseTransfer(req->handle);
      req->notification = std::move(note);
      const nixl_status_t rc = prepare(op, local, remote, agent, req);
      if (rc != NIXL_SUCCESS) return rc;
    }
    const Status st = engine_->postTransfer(req->handle);
    if (!st.isOk()) return fail("posting a transfer", st);
    const Status now = engine_->checkTransfer(req->handle);
    return now.isOk()                              ? NIXL_SUCCESS
           : now.code() == StatusCode::kInProgress ? NIXL_IN_PROG
                                                   : fail("transfer", now);
  }
  nixl_status_t checkXfer(nixlBackendReqH* handle) const override {
    const Status st = engine_->checkTransfer(static_cast<Request*>(handle)->handle);
    return st.isOk() ? NIXL_SUCCESS : fail("transfer", st);
  }
  nixl_status_t releaseReqH(nixlBackendReqH* handle) const override {
    auto* req = static_cast<Request*>(handle);
    const Status st = engine_->releaseTransfer(req->handle);
    delete req;
    return st.isOk() || st.code() == StatusCode::kNotFound ? NIXL_SUCCESS
                                                           : fail("releasing a transfer", st);
  }

  nixl_status_t genNotif(const std::string& agent, const std::string& msg) const override {
    const Status st = engine_->sendNotification(agent, msg);
    return st.isOk() ? NIXL_SUCCESS : fail("sending a notification", st);
  }
  nixl_status_t getNotifs(notif_list_t& list) override {
    for (tcpx::Notification& n : engine_->takeNotifications()) {
      list.emplace_back(std::move(n.peer), std::move(n.message));
    }
    return NIXL_SUCCESS;
  }

 private:
  Status start(const nixlBackendInitParams* init) {
    tcpx::Config config = tcpx::Config::fromEnvironment();
    Status st = config.set("name", init->localAgent);
    if (!st.isOk()) return st;
    // transport=auto is ours; every other key and value, transport included, is the engine's
    // tunable and is checked by it (an unknown key or a bad value is an error naming it).
    // NIXL hands back every option the plugin advertised, with its advertised default, when the
    // user set nothing: such a value is not an explicit choice and must not override the
    // environment (TCPX_P2P_AUTH_SECRET, LISTEN_HOST, INTERFACE, ...). So a parameter equal to
    // its advertised default leaves the environment (or the default) in force.
    static const nixl_b_params_t advertised = defaultOptions();
    // transport=auto unless a parameter or TCPX_P2P_TRANSPORT names one.
    bool automatic = std::getenv(tcpx::Config::environmentName("transport").c_str()) == nullptr;
    for (const auto& [key, value] : getCustomParams()) {
      auto default_value = advertised.find(key);
      if (default_value != advertised.end() && default_value->second == value) continue;
      if (key == "transport") automatic = false;
      st = config.set(key, value);
      if (!st.isOk()) {
        return Status(st.code(), "backend parameter: " + st.message() +
                                     (key == "transport" ? " (or auto)" : ""));
      }
    }
    auto create = [&config](const char* transport) {
      if (transport != nullptr) (void)config.set("transport", transport);
      return tcpx::Engine::create(config);
    };
    // auto: TCPX when its plugin loads and has devices, else the socket transport.
    auto engine = create(automatic ? "tcpx" : nullptr);
    if (!engine.isOk() && automatic) {
      NIXL_INFO << "TCPX backend: TCPX transport not used (" << engine.status().message()
                << "); using the socket transport";
      engine = create("socket");
    }
    if (!engine.isOk()) return engine.status();
    engine_ = std::move(engine.value());
    NIXL_INFO << "TCPX backend for agent '" << init->localAgent
              << "' up: " << config.get("transport").value();
    return {};
  }

  nixl_status_t prepare(const nixl_xfer_op_t& op, const nixl_meta_dlist_t& local,
                        const nixl_meta_dlist_t& remote, const std::string& agent,
                        Request* req) const {
    const int n = local.descCount();
    if (n != remote.descCount()) return NIXL_ERR_MISMATCH;
    std::vector<tcpx::LocalDesc> l(static_cast<size_t>(n));
    std::vector<tcpx::RemoteDesc> r(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) {
      const auto* lmd = static_cast<const LocalMD*>(local[i].metadataP);
      const auto* rmd = dynamic_cast<const RemoteMD*>(remote[i].metadataP);
      if (lmd == nullptr || rmd == nullptr || local[i].addr < lmd->base ||
          remote[i].addr < rmd->remote.base_addr) {
        return NIXL_ERR_INVALID_PARAM;
      }
      l[static_cast<size_t>(i)] = {lmd->id, local[i].addr - lmd->base, local[i].len};
      r[static_cast<size_t>(i)] = {rmd->remote.id, remote[i].addr - rmd->remote.base_addr,
                                   remote[i].len};
    }
    auto h = engine_->prepareTransfer(op == NIXL_WRITE ? tcpx::OpKind::kWrite : tcpx::OpKind::kRead,
                                      agent, l, r, req->notification);
    if (!h.isOk()) return fail("preparing a transfer", h.status());
    req->handle = h.value();
    return NIXL_SUCCESS;
  }

  std::unique_ptr<tcpx::Engine> engine_;
};

}  // namespace

extern "C" NIXL_PLUGIN_EXPORT nixlBackendPlugin* nixl_plugin_init() {
  static const nixl_b_params_t options = defaultOptions();
  return nixlBackendPluginCreator<TcpxBackend>::create(
      NIXL_PLUGIN_API_VERSION, kPluginName, kPluginVersion, options, {DRAM_SEG, VRAM_SEG});
}

extern "C" NIXL_PLUGIN_EXPORT void nixl_plugin_fini() {}
