// The public Engine: a thin shell over EngineCore.
#include <tcpx_p2p/engine.h>

#include "engine/engine_core.h"

namespace tcpx {

Result<std::unique_ptr<Engine>> Engine::create(const Config& config) {
  auto core = engine::EngineCore::create(config);
  if (!core.isOk()) return core.status();
  return std::unique_ptr<Engine>(new Engine(std::move(core.value())));
}

Engine::Engine(std::unique_ptr<engine::EngineCore> core) : core_(std::move(core)) {}
Engine::~Engine() = default;

const std::string& Engine::name() const {
  return core_->name();
}
const std::string& Engine::uuid() const {
  return core_->uuidHex();
}
std::string Engine::connectionInfo() const {
  return core_->connectionInfo();
}
Status Engine::addPeer(const std::string& name, std::string_view connection_info) {
  return core_->addPeer(name, connection_info);
}
Status Engine::removePeer(const std::string& name) {
  return core_->removePeer(name);
}
Status Engine::connect(const std::string& name) {
  return core_->connect(name);
}
Status Engine::startConnecting(const std::string& name) {
  return core_->startConnecting(name);
}
Result<PeerStats> Engine::peerStats(const std::string& name) const {
  return core_->peerStats(name);
}
std::vector<std::string> Engine::peerNames() const {
  return core_->peerNames();
}
PeerState Engine::peerState(const std::string& name) const {
  return core_->peerState(name);
}

Result<MemoryId> Engine::registerMemory(void* addr, size_t length, MemoryKind kind, int device) {
  return core_->registerMemory(addr, length, kind, device);
}
Status Engine::deregisterMemory(MemoryId id) {
  return core_->deregisterMemory(id);
}
Result<std::string> Engine::memoryDescriptor(MemoryId id) const {
  return core_->memoryDescriptor(id);
}
Result<RemoteMemory> Engine::loadRemoteMemory(std::string_view descriptor) {
  return core_->loadRemoteMemory(descriptor);
}
Status Engine::unloadRemoteMemory(const RemoteMemory& remote) {
  return core_->unloadRemoteMemory(remote);
}

Result<TransferHandle> Engine::prepareTransfer(OpKind op, const std::string& peer,
                                               std::span<const LocalDesc> local,
                                               std::span<const RemoteDesc> remote,
                                               std::optional<std::string> notification) {
  return core_->prepareTransfer(op, peer, local, remote, std::move(notification));
}
Status Engine::postTransfer(TransferHandle handle) {
  return core_->postTransfer(handle);
}
Status Engine::checkTransfer(TransferHandle handle) const {
  return core_->checkTransfer(handle);
}
Status Engine::waitTransfer(TransferHandle handle, std::chrono::milliseconds timeout) {
  return core_->waitTransfer(handle, timeout);
}
Status Engine::releaseTransfer(TransferHandle handle) {
  return core_->releaseTransfer(handle);
}

Result<TransferHandle> Engine::postSend(const std::string& peer, const LocalDesc& buffer,
                                        uint64_t tag) {
  return core_->postTwoSided(engine::XferKind::kSend, peer, buffer, tag);
}
Result<TransferHandle> Engine::postRecv(const std::string& peer, const LocalDesc& buffer,
                                        uint64_t tag) {
  return core_->postTwoSided(engine::XferKind::kRecv, peer, buffer, tag);
}

Status Engine::sendNotification(const std::string& peer, std::string_view message) {
  return core_->sendNotification(peer, message);
}
std::vector<Notification> Engine::takeNotifications() {
  return core_->takeNotifications();
}

}  // namespace tcpx
