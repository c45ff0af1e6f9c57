#include "engine/engine_core.h"

#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <climits>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <system_error>

#include "common/log.h"
#include "common/random.h"
#include "common/signals.h"
#include "common/strings.h"
#include "control/auth.h"
#include "control/negotiation.h"
#include "engine/epoll_keys.h"
#include "engine/local_copier.h"
#include "transport/plugin/nic_select.h"
#include "transport/plugin/plugin_transport.h"
#include "transport/plugin/tcpx_preflight.h"
#include "transport/socket/socket_transport.h"

namespace tcpx::engine {

namespace {
// The largest READ whose reply a polling caller takes itself (checkTransfer).
constexpr uint64_t kCallerReadReplyBytes = uint64_t{32} << 10;
}  // namespace

// ---------------------------------------------------------------------------------------------
// Lifecycle
// ---------------------------------------------------------------------------------------------

EngineCore::EngineCore(config::Settings settings)
    : settings_(std::move(settings)),
      socket_io_(std::make_shared<transport::IoPool>(
          settings_.socket_io_threads > 0 ? static_cast<int>(settings_.socket_io_threads)
                                          : transport::IoPool::autoThreads())) {}

Result<std::unique_ptr<EngineCore>> EngineCore::create(const Config& config) {
  config::Settings settings = config::parse(config);
  if (!settings.log_level.empty()) {
    log::Level level{};
    if (log::parseLevel(settings.log_level.c_str(), &level)) log::setThreshold(level);
  }
  if (settings.gpu != "auto" && !parseSize(settings.gpu, 0, 1023)) {
    return Status(StatusCode::kInvalidArgument,
                  "tunable 'gpu': '" + settings.gpu + "' is neither auto nor a device index");
  }
  std::unique_ptr<EngineCore> core(new EngineCore(std::move(settings)));
  Status st = core->start();
  if (!st.isOk()) return st;
  return core;
}

Status EngineCore::start() {
  if (settings_.name.empty()) {
    char host[HOST_NAME_MAX + 1] = {};
    gethostname(host, sizeof(host) - 1);
    name_ = strfmt("%s-%d", host, static_cast<int>(getpid()));
  } else {
    name_ = settings_.name;
  }
  auto uuid = randomUuidHex();
  if (!uuid.isOk()) return uuid.status();
  uuid_hex_ = std::move(uuid.value());
  uuid_ = *fromHex(uuid_hex_);

  // Advertised address: explicit, else the interface's, else the bound one, else the primary.
  if (!settings_.advertise_host.empty()) {
    advertised_host_ = settings_.advertise_host;
  } else if (!settings_.interface.empty()) {
    auto addr = net::interfaceAddress(settings_.interface);
    if (!addr.isOk()) return addr.status();
    advertised_host_ = addr.value();
  } else if (!settings_.listen_host.empty() && settings_.listen_host != "0.0.0.0" &&
             settings_.listen_host != "::") {
    advertised_host_ = settings_.listen_host;
  } else {
    advertised_host_ = net::primaryAddress();
  }

  auto bind_addr = net::resolve(settings_.listen_host, settings_.listen_port);
  if (!bind_addr.isOk()) return bind_addr.status();
  auto listener = net::listenTcp(&bind_addr.value(), 128);
  if (!listener.isOk()) return listener.status();
  listener_ = std::move(listener.value());
  port_ = bind_addr->port();
  Status st = net::setNonBlocking(listener_.get(), true);
  if (!st.isOk()) return st;

  host_id_ = net::hostIdentity();
  {
    auto cookie = control::makeNonce();
    if (!cookie.isOk()) return cookie.status();
    std::copy(cookie->begin(), cookie->end(), direct_cookie_.begin());
  }
  st = createTransport();
  if (!st.isOk()) return st;
  DataPathEvents& events = *this;
  const RecvPathChoice recv_path = settings_.recv_path == "pool"   ? RecvPathChoice::kPool
                                   : settings_.recv_path == "host" ? RecvPathChoice::kHost
                                                                   : RecvPathChoice::kAuto;
  setup_drain_ = std::make_unique<SetupDrain>(*transport_);
  // On with any core count: even on 2 vCPUs the caller that writes its own request and takes
  // its own reply saves two wake-ups per small transfer (docs/PERFORMANCE.md).
  caller_posts_ = settings_.caller_posts != "off";
  // A peer's next request (a ping-pong of small transfers) comes one turnaround of the peer
  // after our answer: its read of the answer, its application, its post. 100 us covers that
  // for an application that polls and for one that blocks between transfers. With few cores a
  // polling loop takes the core the peer or the caller needs: on 2 vCPUs it made small transfers
  // two to three times faster on an idle box and ten times slower beside one busy thread of
  // another program (docs/PERFORMANCE.md).
  if (settings_.serve_poll_us >= 0) {
    serve_poll_ = std::chrono::microseconds(settings_.serve_poll_us);
  } else {
    serve_poll_ = LocalCopier::pollingPays() ? kServePollAuto : std::chrono::microseconds(0);
  }
  data_path_ = std::make_unique<DataPath>(
      *transport_, settings_.staging_slots, followLimits(), recv_path, gpu_,
      std::chrono::milliseconds(settings_.data_timeout_ms), events, hints_);

  if (!wake_.valid()) {
    return Status(StatusCode::kResourceExhausted, "eventfd: " + errnoString(wake_.error()));
  }
  epoll_ = net::Fd(epoll_create1(EPOLL_CLOEXEC));
  if (!epoll_.valid()) return Status(StatusCode::kInternal, "epoll_create1: " + errnoString(errno));
  epollAdd(wake_.fd(), epollKey(KeyKind::kWake, 0), EPOLLIN);
  epollAdd(listener_.get(), epollKey(KeyKind::kListener, 0), EPOLLIN);
  if (transport_->completionFd() >= 0) {
    epollAdd(transport_->completionFd(), epollKey(KeyKind::kTransport, kTransportKeyId), EPOLLIN);
  }

  LOG_INFO(
      "engine '%s' (%s) listening on %s:%u, advertised as %s, transport %s, %u channels x %u "
      "sockets, chunk %s",
      name_.c_str(), uuid_hex_.c_str(),
      settings_.listen_host.empty() ? "*" : settings_.listen_host.c_str(), port_,
      advertised_host_.c_str(), transport_->name(), settings_.channels,
      settings_.sockets_per_channel, formatBytes(settings_.chunk_size).c_str());
  try {
    thread_ = std::thread([this] { run(); });
  } catch (const std::system_error& e) {
    return Status(StatusCode::kResourceExhausted,
                  std::string("cannot start the engine's progress thread: ") + e.what());
  }
  listInProcess(true);
  return {};
}

transport::SocketTransportOptions EngineCore::socketOptions() const {
  transport::SocketTransportOptions topts;
  topts.bind_host = settings_.listen_host;
  topts.advertise_host = advertised_host_;
  topts.interface = settings_.interface;
  topts.sockets_per_comm = static_cast<int>(settings_.sockets_per_channel);
  topts.min_split = settings_.socket_min_split;
  topts.io_pool = socket_io_;
  return topts;
}

Status EngineCore::createTransport() {
  if (settings_.transport == "socket") {
    transport_ = transport::makeSocketTransport(socketOptions());
    if (settings_.chunk_size == 0) settings_.chunk_size = config::kAutoChunkSocket;
    net_devices_ = {0};
    return {};
  }
  // A plugin transport: TCPX or the emulator.
  gpu_ = settings_.gpu == "auto" ? gpu::currentDevice()
                                 : static_cast<int>(*parseSize(settings_.gpu, 0, 1023));
  if (gpu::deviceCount() > 0 && (gpu_ < 0 || gpu_ >= gpu::deviceCount())) {
    return Status(StatusCode::kInvalidArgument,
                  strfmt("gpu=%d does not exist (this process sees %d)", gpu_, gpu::deviceCount()));
  }
  // The plugin uses the current device of the calling thread (here while it loads, then the
  // progress thread's); the caller's thread gets back exactly the context it had, or none.
  const gpu::DeviceScope plugin_device(gpu_);
  transport::PluginOptions popts;
  popts.label = settings_.transport;
  popts.candidates = settings_.plugin_path.empty()
                         ? transport::defaultPluginCandidates(settings_.transport)
                         : std::vector<std::string>{settings_.plugin_path};
  popts.gpu = gpu_;
  Result<std::unique_ptr<transport::Transport>> loaded = [&] {
    ScopedSigpipeBlock no_sigpipe;  // threads the plugin's init starts inherit the mask
    return transport::loadPlugin(popts);
  }();
  if (!loaded.isOk()) return loaded.status();
  transport_ = std::move(loaded.value());
  if (settings_.chunk_size == 0) settings_.chunk_size = config::kAutoChunkPlugin;
  settings_.chunk_size = std::min(settings_.chunk_size, transport_->maxRequestBytes());

  int ndev = 0;
  transport_->devices(&ndev);
  std::vector<transport::NicInfo> nics;
  for (int i = 0; i < ndev; ++i) {
    transport::Properties props;
    transport_->getProperties(i, &props);
    nics.push_back({props.name, props.pci_path});
  }
  // The GPU's place on the PCI tree, from our CUDA runtime, else (a build without CUDA, a box
  // where only the plugin's driver sees the GPU) from the driver the plugin loads.
  std::string gpu_path;
  if (auto bus = gpu::pciBusId(gpu_); bus.isOk()) {
    gpu_path = transport::pciSysfsPath(bus.value());
  } else if (auto driver_bus = transport::gpuBusIdFromDriver({popts.cuda_driver, gpu_});
             driver_bus.isOk()) {
    gpu_path = transport::pciSysfsPath(driver_bus.value());
  }
  auto chosen = transport::selectNics(nics, gpu_path, settings_.net_device);
  if (!chosen.isOk()) return chosen.status();
  net_devices_ = std::move(chosen.value());
  std::string names;
  for (int d : net_devices_)
    names += (names.empty() ? "" : ", ") + nics[static_cast<size_t>(d)].name;
  LOG_INFO("engine transport %s: GPU %d uses %s", settings_.transport.c_str(), gpu_, names.c_str());
  return {};
}

control::WireSettings EngineCore::wireSettings() const {
  control::WireSettings w;
  w.channels = settings_.channels;
  w.chunk_size = settings_.chunk_size;
  w.max_descriptors = settings_.max_descriptors;
  w.max_notification = settings_.max_notification_size;
  w.peer_timeout_ms = settings_.peer_timeout_ms;
  return w;
}

void EngineCore::ensureSameHostSockets() {
  if (host_sockets_) return;
  host_sockets_ = transport::makeSocketTransport(socketOptions());
  DataPathEvents& events = *this;
  host_data_path_ = std::make_unique<DataPath>(
      *host_sockets_, settings_.staging_slots, followLimits(), RecvPathChoice::kAuto, gpu_,
      std::chrono::milliseconds(settings_.data_timeout_ms), events, hints_);
  host_setup_drain_ = std::make_unique<SetupDrain>(*host_sockets_);
  if (host_sockets_->completionFd() >= 0) {
    epollAdd(host_sockets_->completionFd(), epollKey(KeyKind::kTransport, kHostSocketsKeyId),
             EPOLLIN);
  }
  LOG_INFO("engine '%s': peers on this host use the socket transport (same_host=%s)", name_.c_str(),
           settings_.same_host.c_str());
}

NetPath EngineCore::netPathFor(const std::string& peer_host) const {
  const bool same_host = !host_id_.empty() && peer_host == host_id_;
  if (!same_host || settings_.same_host == "network") return NetPath::kTransport;
  // TCPX needs a NIC between two hosts: over loopback a device-memory receive would reach the
  // plugin without devmem, and the plugin ends the process (TCPX_FACTS.md §4b).
  if (settings_.transport == "tcpx") return NetPath::kSameHostSockets;
  if (settings_.transport == "emulator" && settings_.same_host == "socket") {
    return NetPath::kSameHostSockets;
  }
  return NetPath::kTransport;
}

const char* EngineCore::transportName(NetPath path) const {
  return path == NetPath::kSameHostSockets ? "socket" : transport_->name();
}

transport::Transport& EngineCore::transportOf(const Peer& peer) const {
  return peer.net_path == NetPath::kSameHostSockets ? *host_sockets_ : *transport_;
}

DataPath& EngineCore::dataPathOf(const Peer& peer) const {
  return peer.net_path == NetPath::kSameHostSockets ? *host_data_path_ : *data_path_;
}

SetupDrain& EngineCore::setupDrainOf(const Peer& peer) const {
  return peer.net_path == NetPath::kSameHostSockets ? *host_setup_drain_ : *setup_drain_;
}

int EngineCore::netDeviceFor(const Peer& peer, uint32_t channel) const {
  if (peer.net_path == NetPath::kSameHostSockets) return 0;
  return net_devices_[channel % net_devices_.size()];
}

EngineCore::~EngineCore() {
  listInProcess(false);  // same-process peers stop looking at our registrations
  stop_.store(true);
  wake_.signal();
  if (thread_.joinable()) thread_.join();
}

// ---------------------------------------------------------------------------------------------
// Command queue
// ---------------------------------------------------------------------------------------------

void EngineCore::submit(Command command) {
  bool first = false;
  {
    std::lock_guard<std::mutex> lock(cmd_mu_);
    first = commands_.empty();
    commands_.push_back(std::move(command));
  }
  // Only the command that finds the queue empty wakes the progress thread: the later ones ride
  // its wake-up. That holds because the thread drains the eventfd (dispatchEvent) before it takes
  // the whole queue (processCommands) in the same round, so a queue that holds commands always
  // has a wake-up pending or a take to come. With many transfers posted at once this saves the
  // posting threads an eventfd write each.
  if (first) wake_.signal();
}

Status EngineCore::submitAndWait(Command command) {
  auto waiter = std::make_shared<Waiter>();
  command.waiter = waiter;
  submit(std::move(command));
  return waiter->wait();
}

void EngineCore::processCommands() {
  // The two vectors trade buffers, so neither allocates once both have grown.
  std::vector<Command>& batch = command_batch_;
  {
    std::lock_guard<std::mutex> lock(cmd_mu_);
    batch.swap(commands_);
  }
  for (Command& cmd : batch) {
    switch (cmd.kind) {
      case Command::Kind::kPost:
        handlePost(cmd);
        break;
      case Command::Kind::kCancel:
        handleCancel(cmd);
        break;
      case Command::Kind::kAddPeer:
        handleAddPeer(cmd);
        break;
      case Command::Kind::kRemovePeer:
        handleRemovePeer(cmd);
        break;
      case Command::Kind::kConnect:
        handleConnect(cmd);
        break;
      case Command::Kind::kNotify:
        handleNotify(cmd);
        break;
      case Command::Kind::kUnexport:
        handleUnexport(cmd);
        break;
    }
  }
  batch.clear();  // drop the references, keep the capacity
}

std::shared_ptr<Transfer> EngineCore::findHandle(TransferHandle handle) const {
  std::lock_guard<std::mutex> lock(handles_mu_);
  auto it = handles_.find(handle);
  return it == handles_.end() ? nullptr : it->second;
}

std::shared_ptr<Peer> EngineCore::findPeerLocked(const std::string& name) const {
  std::lock_guard<std::mutex> lock(peers_mu_);
  auto it = peers_.find(name);
  return it == peers_.end() ? nullptr : it->second;
}

void EngineCore::notifyDone() {
  if (done_waiters_.load() > 0) {
    std::lock_guard<std::mutex> lock(done_mu_);
  }
  done_cv_.notify_all();
}

// ---------------------------------------------------------------------------------------------
// Peers
// ---------------------------------------------------------------------------------------------

std::string EngineCore::connectionInfo() const {
  control::ConnInfo info;
  info.uuid = uuid_;
  info.name = name_;
  info.host = advertised_host_;
  info.port = port_;
  info.transport = transport_->name();
  info.host_id = host_id_;
  return control::encodeConnInfo(info);
}

Status EngineCore::addPeer(const std::string& name, std::string_view blob) {
  if (!control::validPeerName(name)) {
    return Status(StatusCode::kInvalidArgument,
                  "peer name must have 1 to 256 printable characters");
  }
  auto info = control::decodeConnInfo(blob);
  if (!info.isOk()) return info.status();
  if (info->transport != transport_->name()) {
    return Status(StatusCode::kInvalidArgument,
                  strfmt("peer '%s' uses transport '%s' but this engine uses '%s'", name.c_str(),
                         info->transport.c_str(), transport_->name()));
  }
  Command cmd;
  cmd.kind = Command::Kind::kAddPeer;
  cmd.peer = name;
  cmd.info = std::move(info.value());
  return submitAndWait(std::move(cmd));
}

Status EngineCore::removePeer(const std::string& name) {
  if (!findPeerLocked(name)) return Status(StatusCode::kNotFound, "unknown peer '" + name + "'");
  Command cmd;
  cmd.kind = Command::Kind::kRemovePeer;
  cmd.peer = name;
  return submitAndWait(std::move(cmd));
}

Status EngineCore::connect(const std::string& name) {
  if (!findPeerLocked(name)) return Status(StatusCode::kNotFound, "unknown peer '" + name + "'");
  Command cmd;
  cmd.kind = Command::Kind::kConnect;
  cmd.peer = name;
  return submitAndWait(std::move(cmd));
}

Status EngineCore::startConnecting(const std::string& name) {
  if (!findPeerLocked(name)) return Status(StatusCode::kNotFound, "unknown peer '" + name + "'");
  Command cmd;
  cmd.kind = Command::Kind::kConnect;  // without a waiter: nobody waits for the outcome
  cmd.peer = name;
  submit(std::move(cmd));
  return {};
}

PeerState EngineCore::peerState(const std::string& name) const {
  auto peer = findPeerLocked(name);
  return peer ? peer->state.load() : PeerState::kUnknown;
}

Result<PeerStats> EngineCore::peerStats(const std::string& name) const {
  std::lock_guard<std::mutex> lock(peers_mu_);  // the counters' own lock never takes this one
  auto it = peers_.find(name);
  if (it == peers_.end()) return Status(StatusCode::kNotFound, "unknown peer '" + name + "'");
  PeerStats stats = it->second->counters->snapshot();
  stats.state = it->second->state.load();
  stats.peer_failure = it->second->failure;
  stats.transport = isSelf(*it->second) ? "local" : it->second->net_transport;
  return stats;
}

std::vector<std::string> EngineCore::peerNames() const {
  std::lock_guard<std::mutex> lock(peers_mu_);
  std::vector<std::string> names;
  names.reserve(peers_.size());
  for (const auto& [name, peer] : peers_) names.push_back(name);
  std::sort(names.begin(), names.end());
  return names;
}

// ---------------------------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------------------------

Result<MemoryId> EngineCore::registerMemory(void* addr, size_t length, MemoryKind kind,
                                            int device) {
  if (kind == MemoryKind::kCuda) {
    Status st = gpu::checkDeviceRegion(addr, length, device);
    if (!st.isOk()) return st;
  } else {
    // GPU memory named host memory would be read and written by the CPU (inline frames, the
    // socket transport, cross-memory attach): refused here rather than crash a transfer.
    // (The message names no device: asking for it through the runtime could make a context.)
    if (gpu::isDeviceMemory(addr)) {
      return Status(StatusCode::kInvalidArgument,
                    strfmt("memory at %p is GPU memory: register it as CUDA memory", addr));
    }
    device = -1;
  }
  auto id = registry_.add(addr, length, kind, device);
  // GPU memory a same-host peer may map: the IPC handle of the allocation it starts in (none
  // where CUDA IPC cannot share it: its transfers then take the data channels). The caller has
  // no id before this returns, so no transfer can miss the export.
  if (id.isOk() && kind == MemoryKind::kCuda && settings_.same_host_copy == "auto") {
    Status st = ipc_exports_.add(id.value(), addr, length, device);
    if (!st.isOk()) {
      LOG_DEBUG("GPU memory at %p: no direct copies with same-host peers (%s)", addr,
                st.message().c_str());
    }
  }
  return id;
}

Status EngineCore::deregisterMemory(MemoryId id) {
  Status st = registry_.remove(id);
  if (!st.isOk()) return st;
  // The caller may free the memory once this returns: peers that may have mapped one of its
  // allocations, which no other region uses, unmap it first (CUDA leaves freeing memory
  // another process still maps undefined).
  for (uint64_t base : ipc_exports_.forget(id)) {
    Status closed = unexportIpc(base);
    if (st.isOk()) st = closed;
  }
  return st;
}

Result<std::string> EngineCore::memoryDescriptor(MemoryId id) const {
  auto region = registry_.find(id);
  if (!region.isOk()) return region.status();
  control::MemoryDescriptor desc;
  desc.owner_uuid = uuid_;
  desc.id = region->id;
  desc.base_addr = reinterpret_cast<uintptr_t>(region->base);
  desc.length = region->length;
  desc.kind = region->kind;
  desc.device = region->device;
  return control::encodeMemoryDescriptor(desc);
}

Result<RemoteMemory> EngineCore::loadRemoteMemory(std::string_view blob) {
  auto desc = control::decodeMemoryDescriptor(blob);
  if (!desc.isOk()) return desc.status();
  RemoteEntry entry;
  entry.owner_raw = desc->owner_uuid;
  entry.info.id = desc->id;
  entry.info.base_addr = desc->base_addr;
  entry.info.length = desc->length;
  entry.info.kind = desc->kind;
  entry.info.device = desc->device;
  entry.info.owner_uuid = toHex(desc->owner_uuid);
  std::lock_guard<std::mutex> lock(remote_mu_);
  remote_[{entry.owner_raw, entry.info.id}] = entry;
  return entry.info;
}

Status EngineCore::unloadRemoteMemory(const RemoteMemory& remote) {
  auto owner = fromHex(remote.owner_uuid);
  std::lock_guard<std::mutex> lock(remote_mu_);
  if (!owner || remote_.erase({*owner, remote.id}) == 0) {
    return Status(StatusCode::kNotFound, "remote memory was not loaded");
  }
  return {};
}

// ---------------------------------------------------------------------------------------------
// Transfers
// ---------------------------------------------------------------------------------------------

Status EngineCore::bindPeer(const std::string& peer_name, Transfer* t) const {
  std::lock_guard<std::mutex> lock(peers_mu_);
  auto it = peers_.find(peer_name);
  if (it == peers_.end()) return Status(StatusCode::kNotFound, "unknown peer '" + peer_name + "'");
  t->peer_name = peer_name;
  t->peer_uuid = it->second->uuid;
  t->counters = it->second->counters;
  return {};
}

Result<TransferHandle> EngineCore::prepareTransfer(OpKind op, const std::string& peer_name,
                                                   std::span<const LocalDesc> local,
                                                   std::span<const RemoteDesc> remote,
                                                   std::optional<std::string> notification) {
  if (local.empty() || remote.empty()) {
    return Status(StatusCode::kInvalidArgument, "a transfer needs at least one descriptor");
  }
  if (local.size() != remote.size()) {
    return Status(
        StatusCode::kLengthMismatch,
        strfmt("%zu local descriptors but %zu remote descriptors", local.size(), remote.size()));
  }
  if (local.size() > settings_.max_descriptors) {
    return Status(StatusCode::kResourceExhausted,
                  strfmt("%zu descriptors exceed max_descriptors (%u)", local.size(),
                         settings_.max_descriptors));
  }
  if (notification && notification->size() > settings_.max_notification_size) {
    return Status(StatusCode::kInvalidArgument,
                  strfmt("notification of %zu bytes exceeds max_notification_size (%llu)",
                         notification->size(),
                         static_cast<unsigned long long>(settings_.max_notification_size)));
  }
  for (size_t i = 0; i < local.size(); ++i) {
    if (local[i].length != remote[i].length) {
      return Status(StatusCode::kLengthMismatch,
                    strfmt("descriptor %zu: local length %llu differs from remote length %llu", i,
                           static_cast<unsigned long long>(local[i].length),
                           static_cast<unsigned long long>(remote[i].length)));
    }
  }
  auto t = std::make_shared<Transfer>();
  t->kind = op == OpKind::kRead ? XferKind::kRead : XferKind::kWrite;
  if (Status found = bindPeer(peer_name, t.get()); !found.isOk()) return found;
  const std::string& peer_uuid = t->peer_uuid;
  t->notification = std::move(notification);
  Status st = registry_.resolveLocal(local, &t->local, &t->regions);
  if (!st.isOk()) return st;
  t->total = t->local.total();
  t->devices = t->local.distinctDevices();

  t->remote.resize(remote.size());
  t->remote_addr.resize(remote.size());
  {
    std::lock_guard<std::mutex> lock(remote_mu_);
    const RemoteEntry* last = nullptr;
    for (size_t i = 0; i < remote.size(); ++i) {
      const RemoteDesc& d = remote[i];
      if (last == nullptr || last->info.id != d.mem) {
        auto it = remote_.find({peer_uuid, d.mem});
        if (it == remote_.end()) {
          return Status(StatusCode::kNotFound,
                        strfmt("remote descriptor %zu: memory %016llx of peer '%s' was not loaded "
                               "(or belongs to an earlier instance of the peer)",
                               i, static_cast<unsigned long long>(d.mem), peer_name.c_str()));
        }
        last = &it->second;
      }
      if (d.offset > last->info.length || d.length > last->info.length - d.offset) {
        return Status(StatusCode::kOutOfRange,
                      strfmt("remote descriptor %zu: offset %llu + length %llu exceeds the "
                             "%llu-byte remote region %016llx",
                             i, static_cast<unsigned long long>(d.offset),
                             static_cast<unsigned long long>(d.length),
                             static_cast<unsigned long long>(last->info.length),
                             static_cast<unsigned long long>(d.mem)));
      }
      t->remote[i] = control::WireDesc{d.mem, d.offset, d.length};
      t->remote_addr[i] = last->info.base_addr + d.offset;
      if (last->info.kind == MemoryKind::kCuda) t->remote_on_device = true;
      if (i == 0) t->remote_all_device = true;
      if (last->info.kind != MemoryKind::kCuda) t->remote_all_device = false;
    }
  }

  std::lock_guard<std::mutex> lock(handles_mu_);
  t->handle = next_handle_++;
  handles_.emplace(t->handle, t);
  return t->handle;
}

Status EngineCore::postTransfer(TransferHandle handle) {
  auto t = findHandle(handle);
  if (!t) return Status(StatusCode::kNotFound, "unknown or released transfer handle");
  RunState s = t->state.load();
  if (s == RunState::kInFlight || !t->state.compare_exchange_strong(s, RunState::kInFlight)) {
    return Status(StatusCode::kRepostActive, "the transfer is still in flight");
  }
  t->counters->posted();  // before anything can finish the run
  auto fail_now = [&](Status st) {
    completeRun(t.get(), st);
    return st;
  };
  {
    std::lock_guard<std::mutex> lock(peers_mu_);
    auto it = peers_.find(t->peer_name);
    if (it == peers_.end()) {
      return fail_now(Status(StatusCode::kNotFound, "unknown peer '" + t->peer_name + "'"));
    }
    const Peer& peer = *it->second;
    if (peer.state.load() == PeerState::kFailed) {
      return fail_now(
          Status(StatusCode::kRemoteDisconnected,
                 "peer '" + t->peer_name + "' is disconnected: " + peer.failure.message()));
    }
    if (peer.uuid != t->peer_uuid) {
      return fail_now(Status(StatusCode::kRemoteDisconnected,
                             "peer '" + t->peer_name +
                                 "' restarted since the transfer was "
                                 "prepared; load its memory descriptors and prepare again"));
    }
  }
  Status st = registry_.pin(t->regions);
  if (!st.isOk()) return fail_now(st);
  if (!t->devices.empty()) {
    // Our copies of this run wait for what the caller queued on its GPUs before posting.
    st = t->fences.record(t->devices);
    if (!st.isOk()) {
      registry_.unpin(t->regions);
      return fail_now(st);
    }
  }
  if (postFromCaller(t)) return {};
  Command cmd;
  cmd.kind = Command::Kind::kPost;
  cmd.transfer = std::move(t);
  submit(std::move(cmd));
  return {};
}

bool EngineCore::postFromCaller(std::shared_ptr<Transfer>& t) {
  // A READ or WRITE of host memory only, small enough to travel inline: its start is the
  // encoding of one frame (no CUDA call, no data channel, no direct copy), which the posting
  // thread may do.
  if (!caller_posts_ || (t->kind != XferKind::kWrite && t->kind != XferKind::kRead) ||
      !t->devices.empty() || t->total > settings_.inline_threshold) {
    return false;
  }
  std::unique_lock<std::mutex> round = roundForCaller();
  if (!round.owns_lock()) return false;  // the progress thread takes it
  {
    // Posts keep their order: one queued before this one is handled first, by the progress
    // thread.
    std::lock_guard<std::mutex> lock(cmd_mu_);
    if (!commands_.empty()) return false;
  }
  // Only a ready network peer with nothing waiting and room for one more request: then this
  // transfer is all that starts, and everything else (a peer to connect or to fail, a transfer
  // to the engine itself, queued transfers and their GPU copies) stays the progress thread's.
  Peer* peer = readyNetworkPeer(*t);
  if (peer == nullptr || !peer->waiting.empty() ||
      peer->announced >= settings_.max_inflight_per_peer ||
      !travelsInline(t->total, peer->announced + 1)) {
    return false;
  }
  LOG_TRACE("peer '%s': transfer of %llu bytes posted from the caller's thread",
            t->peer_name.c_str(), static_cast<unsigned long long>(t->total));
  t->resetRun();
  startTransfer(peer, t);  // encodes its request (or ends the run: over the peer's limits)
  // Lent reads serve one transfer in flight; the replies of more are the progress thread's. The
  // one is lent its reads now, before its request leaves: its reply cannot reach the socket
  // before (a caller that does not poll right away, on a busy machine, still finds it there),
  // and a caller that blocks in waitTransfer instead gives them back.
  if (peer->initiated.size() > 1) {
    reclaimControlReads(peer);
  } else if (peer->initiated.count(t->wire_id) != 0 && callerTakesReply(*t)) {
    lendControlReads(peer, *t);
  }
  // Written now; a failed write is left to the progress thread, whose next flush fails the
  // peer: tearing a peer down is no work for an application's thread.
  if (peer->control->wantsWrite()) (void)peer->control->flush();
  // The progress thread's planned wait still holds: the reply wakes it on the control
  // connection, and a frame that left needs no timer (it also postpones the next keepalive).
  // Only bytes the socket did not take (or a write that failed) need it, and its next round.
  const bool left_over = peer->control->wantsWrite();
  round.unlock();
  if (left_over) wake_.signal();
  return true;
}

std::unique_lock<std::mutex> EngineCore::roundForCaller() {
  // The progress thread goes first when it wants the round: application threads that keep
  // winning the lock must not hold up replies, keepalives and timers. While the engine stops,
  // what is late is answered by the progress thread's shutdown.
  if (round_wanted_.load(std::memory_order_acquire)) return {};
  std::unique_lock<std::mutex> round(round_mu_, std::try_to_lock);
  if (round.owns_lock() && stop_.load()) round.unlock();
  return round;
}

Peer* EngineCore::readyNetworkPeer(const Transfer& t) {
  Peer* peer = peerByName(t.peer_name);
  if (peer == nullptr || peer->uuid != t.peer_uuid || peer->state.load() != PeerState::kReady ||
      !peer->control || isSelf(*peer)) {
    return nullptr;
  }
  return peer;
}

void EngineCore::takeRepliesFromCaller(Transfer& t) {
  std::unique_lock<std::mutex> round = roundForCaller();
  if (!round.owns_lock()) return;
  Peer* peer = readyNetworkPeer(t);
  if (peer == nullptr) return;
  // Only once the transfer's request is out, and while it is the peer's one transfer of ours
  // in flight: with more, the progress thread is awake for their replies anyway, and reads by
  // both threads in turns cost more than they save.
  if (peer->initiated.size() != 1 || peer->initiated.count(t.wire_id) == 0) {
    if (peer->control_reader == ControlReader::kCaller) reclaimControlReads(peer);
    return;
  }
  // This caller reads the replies from now on (the reads are lent until its transfer ends or
  // it stops polling).
  lendControlReads(peer, t);
  // Frames buffered first, then one read of the socket. A connection that fails here fails on
  // the progress thread's read too (EOF and errors stay readable): tearing a peer down is no
  // work for an application's thread. The first frame that is not such a reply stops it (the
  // bytes behind it stay in the socket, read later by the progress thread).
  bool wake = false;
  bool read = false;
  bool handled = false;
  while (!wake) {
    control::FrameHeader header;
    std::string_view payload;
    auto got = peer->control->peekFrame(control::kMaxFramePayload, control::kProtocolVersion,
                                        &header, &payload);
    if (!got.isOk() || (got.value() && !isCallersReply(peer, header, payload))) {
      wake = true;  // a frame the progress thread handles (or a malformed one it fails)
      frames_left_ = true;
      break;
    }
    if (got.value()) {
      peer->control->consume(header);
      dispatchFrame(peer, header, payload);
      peer->counters->callerReply();
      handled = true;
      continue;
    }
    if (read) break;  // no whole frame buffered: the rest arrives as an event
    read = true;
    wake = !peer->control->readAvailable().isOk();
  }
  // Frames the replies queued (a READ's notification) leave now; what the socket does not take,
  // a freed slot that waiting transfers need, and frames left buffered are the progress thread's,
  // and so are the reads from then on.
  if (peer->control->wantsWrite()) (void)peer->control->flush();
  wake = wake || peer->control->wantsWrite() || (handled && !peer->waiting.empty());
  // Once the transfer ended the reads go back too: between transfers every frame is the
  // progress thread's (a notification, a request of the peer, the reply of a transfer that no
  // caller polls).
  if (wake || peer->initiated.count(t.wire_id) == 0) reclaimControlReads(peer);
  round.unlock();
  if (wake) wake_.signal();
}

bool EngineCore::callerTakesReply(const Transfer& t) const {
  // A READ's reply carries its bytes: above kCallerReadReplyBytes it tends to arrive over
  // several reads of the socket, which the caller and the woken progress thread then take in
  // turns (64 KiB READs measured slower so, 32 KiB ones faster).
  return caller_posts_ && t.devices.empty() && t.total <= settings_.inline_threshold &&
         (t.kind == XferKind::kWrite ||
          (t.kind == XferKind::kRead && t.total <= kCallerReadReplyBytes));
}

void EngineCore::giveBackReads(const Transfer* t) {
  std::unique_lock<std::mutex> round = roundForCaller();
  if (round.owns_lock()) {
    // Input is watched again at once: a reply or frame already there wakes the progress thread,
    // as one that comes later does.
    if (t != nullptr) {
      Peer* peer = readyNetworkPeer(*t);
      if (peer != nullptr) reclaimControlReads(peer);
      return;
    }
    for (auto& [serial, peer] : peers_by_serial_) reclaimControlReads(peer);
    return;
  }
  // The progress thread has the round (or wants it): it takes the reads back in it.
  if (reads_lent_.load(std::memory_order_acquire)) {
    reclaim_reads_.store(true, std::memory_order_release);
    wake_.signal();
  }
}

void EngineCore::lendControlReads(Peer* peer, Transfer& t) {
  peer->caller_polled_at = Clock::now();
  t.lent_reads.store(true, std::memory_order_relaxed);
  if (peer->control_reader == ControlReader::kCaller) return;  // a poll renews the lease
  peer->control_reader = ControlReader::kCaller;
  armControl(peer);
  reads_lent_.store(true, std::memory_order_release);
  // The progress thread's planned wait may be longer than the lease (an idle engine sleeps up to
  // a second): then one round puts the lease's end into it.
  if (planned_wake_ > peer->caller_polled_at + kCallerReadLease + kWaitSlack) wake_.signal();
}

void EngineCore::reclaimControlReads(Peer* peer) {
  if (peer->control_reader == ControlReader::kLoop) return;
  peer->control_reader = ControlReader::kLoop;
  // Input is watched again: bytes that arrived meanwhile are reported by the next wait, as the
  // registration is level-triggered.
  if (peer->control) armControl(peer);
}

void EngineCore::reviewLentReads(Peer* peer, Clock::time_point now, bool reclaim_all) {
  if (peer->control_reader != ControlReader::kCaller) return;
  // The lending caller's transfer is the peer's one in flight of ours while the reads are lent
  // (it gives them back when that transfer ends); anything else is the progress thread's.
  if (reclaim_all || !peer->control || peer->state.load() != PeerState::kReady ||
      peer->initiated.size() != 1 || now - peer->caller_polled_at >= kCallerReadLease) {
    reclaimControlReads(peer);
  }
}

void EngineCore::armControl(Peer* peer) {
  // Lent reads still watch for the peer's end of the connection (EPOLLRDHUP: a FIN raises no
  // EPOLLHUP while our side is open), so that a peer that closes is failed at once.
  const uint32_t in = peer->control_reader == ControlReader::kLoop ? EPOLLIN : EPOLLRDHUP;
  epollMod(peer->control->fd(), epollKey(KeyKind::kPeerControl, peer->serial),
           in | (peer->control_wants_out ? EPOLLOUT : 0U));
}

bool EngineCore::isCallersReply(Peer* peer, const control::FrameHeader& header,
                                std::string_view payload) {
  // Ours, in the stage that expects it (the handler's own check), of host memory only, with no
  // direct copy or data channel involved.
  auto ours = [&](uint64_t id, XferKind kind, control::FrameType frame) -> const Transfer* {
    auto it = peer->initiated.find(id);
    if (it == peer->initiated.end()) return nullptr;
    const Transfer& t = *it->second;
    const bool takes = t.kind == kind && peerMaySend(OpRole::kOurs, kind, t.stage, frame) &&
                       !t.direct && t.stream == nullptr && t.devices.empty();
    return takes ? &t : nullptr;
  };
  switch (static_cast<control::FrameType>(header.type)) {
    case control::FrameType::kWriteDone: {
      control::Completion m;
      return control::decodeCompletion(payload, &m).isOk() &&
             ours(m.xfer_id, XferKind::kWrite, control::FrameType::kWriteDone) != nullptr;
    }
    case control::FrameType::kReadResponse: {
      control::ReadResponse m;
      if (!control::decode(payload, decodeLimits(), &m).isOk() || m.direct) return false;
      const Transfer* t = ours(m.xfer_id, XferKind::kRead, control::FrameType::kReadResponse);
      // A refusal ends the READ; inline bytes of its exact size are copied into host memory.
      return t != nullptr &&
             (m.code != StatusCode::kOk || (m.inline_data && m.data.size() == t->total));
    }
    default:
      return false;
  }
}

Status EngineCore::checkTransfer(TransferHandle handle) {
  auto t = findHandle(handle);
  if (!t) return Status(StatusCode::kNotFound, "unknown or released transfer handle");
  // A small host-memory READ or WRITE in flight: its reply may be waiting on the socket while
  // the progress thread sleeps.
  if (callerTakesReply(*t) && t->state.load() == RunState::kInFlight) takeRepliesFromCaller(*t);
  switch (t->state.load()) {
    case RunState::kPrepared:
      return Status(StatusCode::kNotPosted, "the transfer was never posted");
    case RunState::kInFlight:
      return Status(StatusCode::kInProgress, "");
    case RunState::kDone:
      return {};
    case RunState::kFailed: {
      std::lock_guard<std::mutex> lock(t->result_mu);
      return t->result;
    }
  }
  return Status(StatusCode::kInternal, "bad transfer state");
}

Status EngineCore::waitTransfer(TransferHandle handle, std::chrono::milliseconds timeout) {
  auto t = findHandle(handle);
  if (!t) return Status(StatusCode::kNotFound, "unknown or released transfer handle");
  // A blocked caller polls nothing: the reply of a transfer that took the reads must not wait
  // for the lease to end.
  if (t->lent_reads.load(std::memory_order_relaxed) && t->state.load() == RunState::kInFlight) {
    giveBackReads(t.get());
  }
  done_waiters_.fetch_add(1);
  {
    std::unique_lock<std::mutex> lock(done_mu_);
    done_cv_.wait_for(lock, timeout, [&] { return t->state.load() != RunState::kInFlight; });
  }
  done_waiters_.fetch_sub(1);
  return checkTransfer(handle);
}

Status EngineCore::releaseTransfer(TransferHandle handle) {
  std::shared_ptr<Transfer> t;
  {
    std::lock_guard<std::mutex> lock(handles_mu_);
    auto it = handles_.find(handle);
    if (it == handles_.end()) {
      return Status(StatusCode::kNotFound, "unknown or already released transfer handle");
    }
    t = std::move(it->second);
    handles_.erase(it);
  }
  if (t->state.load() != RunState::kInFlight) return {};
  // Cancel the run; returns once no posted chunk reads or writes the transfer's local memory.
  Command cmd;
  cmd.kind = Command::Kind::kCancel;
  cmd.transfer = std::move(t);
  return submitAndWait(std::move(cmd));
}

Result<TransferHandle> EngineCore::postTwoSided(XferKind kind, const std::string& peer_name,
                                                const LocalDesc& buffer, uint64_t tag) {
  auto t = std::make_shared<Transfer>();
  t->kind = kind;
  if (Status found = bindPeer(peer_name, t.get()); !found.isOk()) return found;
  t->tag = tag;
  Status st =
      registry_.resolveLocal(std::span<const LocalDesc>(&buffer, 1), &t->local, &t->regions);
  if (!st.isOk()) return st;
  t->total = t->local.total();
  t->devices = t->local.distinctDevices();
  TransferHandle handle = 0;
  {
    std::lock_guard<std::mutex> lock(handles_mu_);
    t->handle = next_handle_++;
    handle = t->handle;
    handles_.emplace(handle, t);
  }
  st = postTransfer(handle);
  if (!st.isOk()) {
    std::lock_guard<std::mutex> lock(handles_mu_);
    handles_.erase(handle);
    return st;
  }
  return handle;
}

Status EngineCore::sendNotification(const std::string& peer_name, std::string_view message) {
  if (message.size() > settings_.max_notification_size) {
    return Status(
        StatusCode::kInvalidArgument,
        strfmt("notification of %zu bytes exceeds max_notification_size (%llu)", message.size(),
               static_cast<unsigned long long>(settings_.max_notification_size)));
  }
  {
    std::lock_guard<std::mutex> lock(peers_mu_);
    auto it = peers_.find(peer_name);
    if (it == peers_.end())
      return Status(StatusCode::kNotFound, "unknown peer '" + peer_name + "'");
    if (it->second->state.load() == PeerState::kFailed) {
      return Status(StatusCode::kRemoteDisconnected,
                    "peer '" + peer_name + "' is disconnected: " + it->second->failure.message());
    }
    // The peer's own limit, once the handshake told it (one queued earlier is checked when it
    // leaves).
    const uint64_t limit = it->second->notification_limit.load();
    if (limit != 0 && message.size() > limit) {
      return Status(
          StatusCode::kInvalidArgument,
          strfmt("notification of %zu bytes exceeds peer '%s''s max_notification_size "
                 "(%llu)",
                 message.size(), peer_name.c_str(), static_cast<unsigned long long>(limit)));
    }
  }
  Command cmd;
  cmd.kind = Command::Kind::kNotify;
  cmd.peer = peer_name;
  cmd.text.assign(message);
  submit(std::move(cmd));
  return {};
}

std::vector<Notification> EngineCore::takeNotifications() {
  // A thread waiting for notifications may be one that posted a small transfer and does not poll
  // it: the frames of its peer (the reply, the notification itself) are the progress thread's.
  if (reads_lent_.load(std::memory_order_acquire)) giveBackReads(nullptr);
  std::vector<Notification> out;
  std::lock_guard<std::mutex> lock(notif_mu_);
  out.swap(notifications_);
  pending_notifications_.clear();
  return out;
}

// ---------------------------------------------------------------------------------------------
// Progress loop
// ---------------------------------------------------------------------------------------------

void EngineCore::run() {
  // Transport threads this thread creates inherit its mask: TCPX's sockets send without
  // MSG_NOSIGNAL, and a peer that goes away must not end the host process.
  blockSigpipeForThisThread();
  gpu::markEngineThread();
  if (transport_->needsRegistration() && gpu::deviceCount() > 0) (void)gpu::setCurrentDevice(gpu_);
  // The loop's short waits (5 us between polls of a plugin, 20 us while GPU copies run) must not
  // be stretched by the default 50 us timer slack.
  prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);
  prctl(PR_SET_NAME, "tcpx-progress", 0UL, 0UL, 0UL);  // as `top -H` and debuggers show it
  std::array<epoll_event, 64> events{};
  // Released only while the thread waits for events (see postFromCaller).
  std::unique_lock<std::mutex> round(round_mu_);
  while (!stop_.load()) {
    const Clock::time_point before_wait = Clock::now();
    const std::chrono::microseconds timeout = computeTimeout(before_wait);
    planned_wake_ = before_wait + timeout;
    round.unlock();
    const int n = waitForEvents(events.data(), static_cast<int>(events.size()), timeout);
    round_wanted_.store(true, std::memory_order_release);
    round.lock();
    round_wanted_.store(false, std::memory_order_relaxed);
    if (n < 0 && errno != EINTR) {
      LOG_ERROR("epoll_wait: %s", errnoString(errno).c_str());
      break;
    }
    hints_ = WaitHints{};
    const bool reclaim_reads = reclaim_reads_.exchange(false, std::memory_order_acq_rel);
    if (n > 0 && settings_.progress_poll_us > 0) {
      busy_poll_until_ = Clock::now() + std::chrono::microseconds(settings_.progress_poll_us);
    }
    for (int i = 0; i < n; ++i)
      dispatchEvent(events[static_cast<size_t>(i)].data.u64, events[static_cast<size_t>(i)].events);
    // Whole frames an application thread left buffered (takeRepliesFromCaller): no socket event
    // comes for them; taken here, as if read by this round's events.
    if (frames_left_) {
      frames_left_ = false;
      for (auto& [serial, peer] : peers_by_serial_) {
        if (peer->state.load() == PeerState::kReady && peer->control && peer->control->buffered()) {
          processFrames(peer);
        }
      }
    }
    processCommands();
    if (!local_runs_.empty()) driveLocalRuns();
    if (!direct_fences_.empty()) driveDirectFences();
    if (!queued_writes_.empty()) driveQueuedWrites();
    if (!gate_writes_.empty()) driveGateWrites();
    if (!gated_runs_.empty() || !retired_gated_queues_.empty()) driveGatedRuns();
    if (!retiring_.empty()) driveRetiring();
    bool lent = false;
    const Clock::time_point round_start = Clock::now();
    for (auto& [serial, peer] : peers_by_serial_) {
      if (peer->state.load() == PeerState::kConnecting && peer->control) driveSetup(peer);
      if (peer->state.load() == PeerState::kReady && !peer->waiting.empty()) pumpWaiting(peer);
      if (peer->control && !peer->inline_copies.empty()) driveInlineCopies(peer);
      // Frames queued by this round's events leave before the data work, which may take a while
      // (staging copies to issue): a READ_RESPONSE lets the initiator post its receives at once.
      if (peer->control && peer->control->wantsWrite()) flushControl(peer);
      dataPathOf(*peer).drive(peer);
      // Frames queued by the data work (completions, DATA_STATUS) leave together.
      if (peer->control && peer->control->wantsWrite()) flushControl(peer);
      // Last, after everything this round started for the peer.
      reviewLentReads(peer, round_start, reclaim_reads);
      lent = lent || peer->control_reader == ControlReader::kCaller;
    }
    if (!lent) reads_lent_.store(false, std::memory_order_release);
    handleTimers(Clock::now());
    if (!setup_drain_->empty()) setup_drain_->poll(Clock::now());
    if (host_setup_drain_ && !host_setup_drain_->empty()) host_setup_drain_->poll(Clock::now());
  }

  // Orderly shutdown: tell every peer, then fail what is left so that waiters return.
  std::vector<Peer*> all;
  for (auto& [serial, peer] : peers_by_serial_) all.push_back(peer);
  for (Peer* peer : all) {
    if (peer->control) {
      control::encodeGoodbye("engine shut down", peer->control->out());
      (void)peer->control->flush();
    }
    failPeer(peer, Status(StatusCode::kRemoteDisconnected, "engine shut down"), /*orderly=*/true);
  }
  setup_drain_->finish(kShutdownDrainLimit);
  if (host_setup_drain_) host_setup_drain_->finish(kShutdownDrainLimit);
  drainLocalRuns();
  // Channels whose copies wait for the application's GPU work, and gate writes queued behind it
  // (they keep the peer's word mapped until they ran: unmapped first, the word would fault the
  // write): at shutdown the wait is the point.
  if (!retiring_.empty() || !gate_writes_.empty()) {
    LOG_INFO(
        "shutdown waits for the GPU copies of %zu ended connections and %zu gate writes of "
        "peers' READs (they wait for the application's GPU work)",
        retiring_.size(), gate_writes_.size());
  }
  while (!retiring_.empty() || !gate_writes_.empty()) {
    driveRetiring();
    driveGateWrites();
    if (!retiring_.empty() || !gate_writes_.empty()) std::this_thread::sleep_for(kRetiringPoll);
  }
  // Commands that arrived too late are answered rather than left hanging.
  std::vector<Command> late;
  {
    std::lock_guard<std::mutex> lock(cmd_mu_);
    late.swap(commands_);
  }
  for (Command& cmd : late) {
    if (cmd.transfer && cmd.kind == Command::Kind::kPost) {
      registry_.unpin(cmd.transfer->regions);
      completeRun(cmd.transfer.get(), Status(StatusCode::kRemoteDisconnected, "engine shut down"));
    }
    if (cmd.waiter) cmd.waiter->complete(Status(StatusCode::kCanceled, "engine shut down"));
  }
}

bool EngineCore::channelsInTransport() const {
  return std::any_of(peers_by_serial_.begin(), peers_by_serial_.end(), [](const auto& entry) {
    return entry.second->out.anyInTransport() || entry.second->in.anyInTransport();
  });
}

bool EngineCore::hostCopiesRunning() const {
  // A copy held by a peer that failed (peer_lost: a page that never came in) is nobody's work.
  const bool ours = std::any_of(local_runs_.begin(), local_runs_.end(), [](const auto& run) {
    return run->mode == LocalMode::kCopyThread && run->state == LocalRunState::kCopying &&
           !run->peer_lost;
  });
  return ours ||
         std::any_of(peers_by_serial_.begin(), peers_by_serial_.end(),
                     [](const auto& entry) { return !entry.second->direct_deadlines.empty(); });
}

void EngineCore::pollFor(std::chrono::microseconds span) {
  if (LocalCopier::pollingPays()) poll_until_ = std::max(poll_until_, Clock::now() + span);
}

std::chrono::microseconds EngineCore::computeTimeout(Clock::time_point now) {
  // Whatever else is due, lent reads come back when their lease ends (reviewLentReads). While a
  // caller polls the peer's transfers one after another, the reads go back at the end of each
  // and are lent again at the next: the wait stays bounded by the lease between them too, so that
  // a lend needs no wake-up (lendControlReads) and the loop wakes about once per lease.
  Clock::time_point lease_end = Clock::time_point::max();
  for (auto& [serial, peer] : peers_by_serial_) {
    if (peer->control_reader == ControlReader::kCaller ||
        now - peer->caller_polled_at < kCallerReadLease) {
      lease_end = std::min(lease_end, peer->caller_polled_at + kCallerReadLease);
    }
  }
  const std::chrono::microseconds wait = computeWait(now);
  if (lease_end == Clock::time_point::max()) return wait;
  if (lease_end <= now) return std::chrono::microseconds(0);
  return std::min(
      wait, std::chrono::duration_cast<std::chrono::microseconds>(lease_end - now) + kWaitSlack);
}

std::chrono::microseconds EngineCore::computeWait(Clock::time_point now) {
  using std::chrono::microseconds;
  if (hints_.poll_needed) {
    // A transport without a completion fd (a plugin) is polled: at once while work moves, with
    // short pauses while it waits, so that the loop does not take a core from the transport's
    // own threads.
    const bool spin = hints_.data_progress || transport_->completionFd() >= 0;
    return microseconds(spin ? 0 : 5);
  }
  // CUDA completions have no fd: while staging copies run, look again soon (a copy of a chunk
  // takes some 10 us) without spinning a core. An inline copy (at most 64 KiB, a few
  // microseconds) holds up a whole small transfer: look again sooner.
  // pollFor: a young copy of a transfer to this engine itself or just after one completed, or
  // the answer to a direct request due soon: poll without sleeping (only with cores to spare).
  if (now < poll_until_) return microseconds(0);
  // progress_poll_us: events came recently; the next (a reply, the caller's next post) is
  // taken without the wake-up a blocking wait would cost.
  if (now < busy_poll_until_) return microseconds(0);
  // serve_poll_us: a peer's request came recently; its next is taken without a wake-up. Not
  // while data channels carry bytes, nor while copies of this host run for our transfers: their
  // completions wake the loop, and a polling thread would take a core from the socket threads or
  // from the copying threads (on 2 vCPUs polling made a same-host 1 MiB READ half as fast).
  // Asked only while the window is open, so rounds without one pay nothing for it.
  if (now < serve_poll_until_ && !channelsInTransport() && !hostCopiesRunning()) {
    return microseconds(0);
  }
  if (hints_.inline_pending || hints_.copy_tail) return microseconds(2);
  // Fences of direct copies are polled as long as any is waited for: whether one was added this
  // round before or after driveDirectFences, the loop looks again within the interval.
  if (hints_.gpu_pending || !direct_fences_.empty() || !queued_writes_.empty() ||
      !gate_writes_.empty() || !retired_gated_queues_.empty()) {
    return microseconds(20);
  }
  // Set-up left by removed peers is polled like connection set-up.
  if (!setup_drain_->empty() || (host_setup_drain_ && !host_setup_drain_->empty())) {
    return microseconds(1000);
  }
  // Copies of ended connections wait for the application's GPU work, which may take long: poll
  // them without spinning (set-up drains above poll more slowly; the two are not combined).
  if (!retiring_.empty()) return kRetiringPoll;
  Clock::time_point next = now + std::chrono::seconds(1);
  const auto timeout = std::chrono::milliseconds(settings_.peer_timeout_ms);
  for (auto& [serial, peer] : peers_by_serial_) {
    const PeerState state = peer->state.load();
    if (state == PeerState::kConnecting) {
      // Connection set-up polls the transport's non-blocking connect/accept.
      if (peer->control) return microseconds(1000);
      next = std::min(next, peer->setup_deadline);
      if (peer->retry_pending) next = std::min(next, peer->retry_at);
    }
    if (peer->control) {
      next = std::min(next, peer->stall_check_at);
      if (!peer->direct_deadlines.empty())
        next = std::min(next, peer->direct_deadlines.front().due);
      // With unsent frames none is due: the socket's writability wakes the loop.
      if (const auto due = peer->keepaliveDue()) next = std::min(next, *due);
      next = std::min(next, peer->control->lastReceive() + timeout);
    }
  }
  for (auto& [id, inc] : incoming_) next = std::min(next, inc.deadline);
  for (const auto& run : local_runs_) next = std::min(next, copyStallDue(*run));
  for (auto& [base, pending] : unexports_) next = std::min(next, pending.due);
  if (listener_resume_at_) next = std::min(next, *listener_resume_at_);
  if (next <= now) return microseconds(0);
  return std::chrono::duration_cast<microseconds>(next - now) + kWaitSlack;
}

int EngineCore::waitForEvents(epoll_event* events, int max_events,
                              std::chrono::microseconds timeout) {
  // epoll_pwait2 takes a sub-millisecond timeout; kernels before 5.11 lack it.
  static bool have_pwait2 = true;
  if (have_pwait2) {
    timespec ts{};
    ts.tv_sec = static_cast<time_t>(timeout.count() / 1000000);
    ts.tv_nsec = static_cast<long>(timeout.count() % 1000000) * 1000;
    const int n = epoll_pwait2(epoll_.get(), events, max_events, &ts, nullptr);
    if (n >= 0 || errno != ENOSYS) return n;
    have_pwait2 = false;
  }
  const auto ms = (timeout.count() + 999) / 1000;
  return epoll_wait(epoll_.get(), events, max_events, static_cast<int>(ms));
}

void EngineCore::dispatchEvent(uint64_t key, uint32_t events) {
  const KeyKind kind = keyKind(key);
  const uint64_t id = keyId(key);
  switch (kind) {
    case KeyKind::kWake:
      wake_.drain();
      break;
    case KeyKind::kListener:
      acceptControlConnections();
      break;
    case KeyKind::kTransport:
      // Drained here, before this round's data path tests its requests (which handles them).
      if (id == kHostSocketsKeyId && host_sockets_) {
        host_sockets_->drainCompletionFd();
      } else {
        transport_->drainCompletionFd();
      }
      break;
    case KeyKind::kPeerControl: {
      auto it = peers_by_serial_.find(id);
      if (it != peers_by_serial_.end()) onControlEvent(it->second, events);
      break;
    }
    case KeyKind::kPeerOutgoing: {
      auto it = peers_by_serial_.find(id);
      if (it != peers_by_serial_.end()) onOutgoingEvent(it->second, events);
      break;
    }
    case KeyKind::kIncoming:
      onIncomingEvent(id, events);
      break;
  }
}

void EngineCore::epollAdd(int fd, uint64_t key, uint32_t events) {
  epoll_event ev{};
  ev.events = events;
  ev.data.u64 = key;
  if (epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) != 0) {
    LOG_ERROR("epoll_ctl(ADD, fd %d): %s", fd, errnoString(errno).c_str());
  }
}

void EngineCore::epollMod(int fd, uint64_t key, uint32_t events) {
  epoll_event ev{};
  ev.events = events;
  ev.data.u64 = key;
  if (epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, fd, &ev) != 0) {
    LOG_ERROR("epoll_ctl(MOD, fd %d): %s", fd, errnoString(errno).c_str());
  }
}

void EngineCore::epollDel(int fd) {
  epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, fd, nullptr);
}

}  // namespace tcpx::engine
