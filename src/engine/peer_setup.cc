// Control connections and data-channel set-up.
//
// Handshake: the connector sends HELLO, the acceptor answers HELLO_ACK. When both engines connect
// to each other at once, exactly one connection survives: an engine that already has a live
// control connection to the peer answers DUPLICATE; an engine whose own attempt is still in
// flight accepts the incoming one only if the connector's uuid is the smaller (and drops its own
// attempt), else answers DUPLICATE. Both sides apply the same rule, so they always agree; a
// connector told DUPLICATE waits for the other side's connection and retries only if none comes.
//
// Data channels: once the control connection is up, each side listens on C transport comms and
// sends the handles (CHANNEL_SETUP); each side connects its C send comms to the peer's handles
// and accepts its C receive comms, all non-blocking. The peer is ready when all 2C are up.
#include <algorithm>
#include <cerrno>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#include "common/log.h"
#include "common/strings.h"
#include "control/auth.h"
#include "engine/engine_core.h"
#include "engine/epoll_keys.h"

namespace tcpx::engine {
namespace {

constexpr auto kHelloTimeout = std::chrono::seconds(5);
constexpr auto kRetryDelay = std::chrono::milliseconds(100);
// How long a peer's address may refuse connections before the set-up fails. A peer listens before
// its connection info exists, so a refusal means its process is gone (or the info is stale); the
// retries cover a restarting network stack, not a peer that takes long to answer (a set-up that is
// slow but alive keeps connect_timeout_ms).
constexpr auto kRefusedGiveUp = std::chrono::seconds(2);
constexpr size_t kMaxIncoming = 256;
constexpr uint32_t kMaxHelloPayload = 64 * 1024;

// Frames that start an operation on this side (serve_poll_us): the peer waits for our answer,
// and may send its next request soon after it.
bool isRequest(uint8_t type) {
  switch (static_cast<control::FrameType>(type)) {
    case control::FrameType::kWriteRequest:
    case control::FrameType::kReadRequest:
    case control::FrameType::kSendRts:
      return true;
    default:
      return false;
  }
}

}  // namespace

Peer* EngineCore::peerByName(const std::string& name) {
  auto it = peers_.find(name);
  return it == peers_.end() ? nullptr : it->second.get();
}

Peer* EngineCore::peerByUuid(const std::string& uuid) {
  for (auto& [serial, peer] : peers_by_serial_) {
    if (peer->uuid == uuid) return peer;
  }
  return nullptr;
}

Peer* EngineCore::createPeer(const std::string& name) {
  auto peer = std::make_shared<Peer>();
  peer->serial = next_serial_++;
  peer->copy_lane = next_copy_lane_++;
  peer->name = name;
  Peer* raw = peer.get();
  {
    std::lock_guard<std::mutex> lock(peers_mu_);
    peers_[name] = std::move(peer);
  }
  peers_by_serial_[raw->serial] = raw;
  return raw;
}

void EngineCore::renamePeer(Peer* peer, const std::string& name) {
  std::lock_guard<std::mutex> lock(peers_mu_);
  auto node = peers_.extract(peer->name);
  peer->name = name;
  node.key() = name;
  peers_.insert(std::move(node));
}

void EngineCore::handleAddPeer(Command& cmd) {
  const control::ConnInfo& info = *cmd.info;
  Peer* by_name = peerByName(cmd.peer);
  Peer* by_uuid = peerByUuid(info.uuid);

  if (by_uuid != nullptr && by_uuid != by_name) {
    // The same instance is known under another name (it connected to us first and named
    // itself): the caller's name wins.
    if (by_name != nullptr) {
      failPeer(by_name, Status(StatusCode::kRemoteDisconnected,
                               "peer name '" + cmd.peer + "' now refers to another engine"));
      {
        std::lock_guard<std::mutex> lock(peers_mu_);
        peers_by_serial_.erase(by_name->serial);
        peers_.erase(cmd.peer);
      }
    }
    renamePeer(by_uuid, cmd.peer);
    by_uuid->info = info;
    by_uuid->refused_since.reset();  // refusals of the old address say nothing of the new one
    cmd.waiter->complete(Status());
    return;
  }
  if (by_name != nullptr) {
    if (by_name->uuid != info.uuid) {
      // A restarted peer: new instance, new connection info. The old instance's transfers end
      // (this engine's own, when the name meant itself, never leave kIdle).
      if (by_name->state.load() != PeerState::kIdle || isSelf(*by_name)) {
        failPeer(by_name, Status(StatusCode::kRemoteDisconnected,
                                 "peer '" + cmd.peer + "' was replaced by a new instance"));
      }
      std::lock_guard<std::mutex> lock(peers_mu_);
      by_name->uuid = info.uuid;
      by_name->failure = Status();
      by_name->state.store(PeerState::kIdle);
      by_name->counters = std::make_shared<PeerCounters>();  // the new instance's
    }
    by_name->info = info;
    by_name->refused_since.reset();  // refusals of the old address say nothing of the new one
    cmd.waiter->complete(Status());
    return;
  }
  Peer* peer = createPeer(cmd.peer);
  {
    std::lock_guard<std::mutex> lock(peers_mu_);
    peer->uuid = info.uuid;
  }
  peer->info = info;
  cmd.waiter->complete(Status());
}

void EngineCore::handleRemovePeer(Command& cmd) {
  Peer* peer = peerByName(cmd.peer);
  if (peer == nullptr) {
    cmd.waiter->complete(Status(StatusCode::kNotFound, "unknown peer '" + cmd.peer + "'"));
    return;
  }
  // What this round's commands queued for the peer (a notification sent just before the removal,
  // a post) leaves first, as it would have in the round's pass over the peers.
  if (peer->state.load() == PeerState::kReady && !peer->waiting.empty()) pumpWaiting(peer);
  if (peer->control) {
    control::encodeGoodbye("peer removed", peer->control->out());
    (void)peer->control->flush();
  }
  failPeer(peer, Status(StatusCode::kRemoteDisconnected, "peer '" + cmd.peer + "' was removed"),
           /*orderly=*/true);
  {
    std::lock_guard<std::mutex> lock(peers_mu_);
    peers_by_serial_.erase(peer->serial);
    peers_.erase(cmd.peer);
  }
  cmd.waiter->complete(Status());
}

void EngineCore::handleConnect(Command& cmd) {
  // startConnecting() submits without a waiter.
  Peer* peer = peerByName(cmd.peer);
  if (peer == nullptr) {
    if (cmd.waiter)
      cmd.waiter->complete(Status(StatusCode::kNotFound, "unknown peer '" + cmd.peer + "'"));
    return;
  }
  if (peer->state.load() == PeerState::kReady) {
    if (cmd.waiter) cmd.waiter->complete(Status());
    return;
  }
  // This engine itself needs no connection: transfers to it never touch a transport
  // (local_path.cc).
  if (isSelf(*peer)) {
    if (peer->state.load() == PeerState::kFailed) {
      std::lock_guard<std::mutex> lock(peers_mu_);
      peer->failure = Status();
      peer->state.store(PeerState::kIdle);
    }
    if (cmd.waiter) cmd.waiter->complete(Status());
    return;
  }
  if (peer->state.load() == PeerState::kFailed) {
    std::lock_guard<std::mutex> lock(peers_mu_);
    peer->failure = Status();
    peer->state.store(PeerState::kIdle);
  }
  if (cmd.waiter) peer->connect_waiters.push_back(cmd.waiter);
  ensureConnecting(peer);
}

void EngineCore::ensureConnecting(Peer* peer) {
  if (peer->state.load() != PeerState::kIdle) return;
  peer->state.store(PeerState::kConnecting);
  peer->setup_deadline = Clock::now() + std::chrono::milliseconds(settings_.connect_timeout_ms);
  peer->refused_since.reset();
  startOutgoing(peer);
}

void EngineCore::retryOutgoing(Peer* peer, int err, const std::string& why) {
  const Clock::time_point now = Clock::now();
  if (err != ECONNREFUSED) {
    peer->refused_since.reset();
  } else if (!peer->refused_since) {
    peer->refused_since = now;
  } else if (now - *peer->refused_since >= kRefusedGiveUp) {
    failPeer(
        peer,
        Status(StatusCode::kRemoteDisconnected,
               strfmt("its address %s:%u has refused connections for %lld ms: nothing "
                      "listens there any more (the peer is gone)",
                      peer->info->host.c_str(), static_cast<unsigned>(peer->info->port),
                      static_cast<long long>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                                 now - *peer->refused_since)
                                                 .count()))));
    return;
  }
  LOG_DEBUG("connection attempt to peer '%s': %s; retrying", peer->name.c_str(), why.c_str());
  peer->retry_pending = true;
  peer->retry_at = now + kRetryDelay;
}

void EngineCore::startOutgoing(Peer* peer) {
  if (!peer->info) {
    failPeer(peer, Status(StatusCode::kNotFound,
                          "no connection info for peer '" + peer->name + "' (call addPeer)"));
    return;
  }
  auto addr = net::resolve(peer->info->host, peer->info->port);
  if (!addr.isOk()) {
    failPeer(peer, addr.status());
    return;
  }
  net::Fd fd(::socket(addr->family(), SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd.valid() || (::connect(fd.get(), addr->raw(), addr->len) != 0 && errno != EINPROGRESS)) {
    const int err = errno;
    retryOutgoing(peer, err, addr->toString() + ": " + errnoString(err));
    return;
  }
  const int raw_fd = fd.get();
  peer->outgoing = std::make_unique<control::ControlConnection>(std::move(fd));
  peer->outgoing_stage = Peer::Outgoing::kTcpConnecting;
  epollAdd(raw_fd, epollKey(KeyKind::kPeerOutgoing, peer->serial), EPOLLOUT | EPOLLIN);
}

void EngineCore::onOutgoingEvent(Peer* peer, uint32_t events) {
  if (!peer->outgoing) return;
  auto drop_and_retry = [&](const std::string& why, int err = 0) {
    epollDel(peer->outgoing->fd());
    peer->outgoing.reset();
    peer->outgoing_stage = Peer::Outgoing::kNone;
    retryOutgoing(peer, err, why);
  };

  if (peer->outgoing_stage == Peer::Outgoing::kTcpConnecting) {
    int err = 0;
    socklen_t len = sizeof(err);
    getsockopt(peer->outgoing->fd(), SOL_SOCKET, SO_ERROR, &err, &len);
    if (err != 0) {
      drop_and_retry(errnoString(err), err);
      return;
    }
    if ((events & EPOLLOUT) == 0) return;
    if (net::isConnectedToItself(peer->outgoing->fd())) {
      // Nothing listens at the address and the kernel chose it as our source port too.
      drop_and_retry(errnoString(ECONNREFUSED) + " (the connection reached itself)", ECONNREFUSED);
      return;
    }
    peer->refused_since.reset();  // something listens there
    auto nonce = control::makeNonce();
    if (!nonce.isOk()) {
      failPeer(peer, nonce.status());
      return;
    }
    control::Hello hello;
    hello.uuid = uuid_;
    hello.name = name_;
    hello.conn_info = connectionInfo();
    peer->hello_path = netPathFor(peer->info ? peer->info->host_id : std::string());
    hello.transport = transportName(peer->hello_path);
    hello.settings = wireSettings();
    peer->hello_nonce = std::move(nonce.value());
    peer->peer_proved = false;
    hello.nonce = peer->hello_nonce;
    hello.direct = directOffer(peer->info ? peer->info->host_id : std::string());
    control::encode(hello, peer->outgoing->out());
    Status st = peer->outgoing->flush();
    if (!st.isOk()) {
      drop_and_retry(st.message());
      return;
    }
    peer->outgoing_stage = Peer::Outgoing::kHelloSent;
    epollMod(peer->outgoing->fd(), epollKey(KeyKind::kPeerOutgoing, peer->serial), EPOLLIN);
    return;
  }

  Status st = peer->outgoing->readAvailable();
  if (!st.isOk()) {
    drop_and_retry(st.message());
    return;
  }
  control::FrameHeader header;
  std::string_view payload;
  auto got = peer->outgoing->nextFrame(kMaxHelloPayload, 0, &header, &payload);
  if (got.isOk() && got.value() &&
      header.type == static_cast<uint8_t>(control::FrameType::kAuthChallenge)) {
    onAuthChallenge(peer, payload);
    return;
  }
  if (!got.isOk() ||
      (got.value() && header.type != static_cast<uint8_t>(control::FrameType::kHelloAck))) {
    failPeer(peer,
             Status(StatusCode::kProtocolError, "peer '" + peer->name +
                                                    "' answered the handshake with something other "
                                                    "than HELLO_ACK"));
    return;
  }
  if (!got.value()) return;
  control::HelloAck ack;
  st = control::decode(payload, &ack);
  if (!st.isOk()) {
    failPeer(peer, st);
    return;
  }
  switch (ack.result) {
    case control::HelloResult::kAccepted: {
      if (ack.uuid != peer->uuid) {
        failPeer(peer,
                 Status(StatusCode::kRemoteDisconnected,
                        strfmt("a different engine instance ('%s', %s) answers at %s:%u: the "
                               "connection info of peer '%s' is stale",
                               ack.name.c_str(), toHex(ack.uuid).c_str(), peer->info->host.c_str(),
                               peer->info->port, peer->name.c_str())));
        return;
      }
      auto agreed = control::agreeSettings(wireSettings(), ack.settings, settings_.keepalive_ms);
      if (!agreed.isOk()) {
        failPeer(peer, Status(StatusCode::kProtocolError,
                              "peer '" + peer->name +
                                  "' accepted with settings this engine cannot use: " +
                                  agreed.status().message()));
        return;
      }
      if (!settings_.auth_secret.empty() && !peer->peer_proved) {
        failPeer(peer, Status(StatusCode::kRemoteRejected,
                              "peer '" + peer->name +
                                  "' accepted the connection without proving the shared secret "
                                  "(it has no auth_secret): not using it"));
        return;
      }
      epollDel(peer->outgoing->fd());
      auto conn = std::move(peer->outgoing);
      peer->outgoing_stage = Peer::Outgoing::kNone;
      adoptDirect(peer, directOffer(peer->info ? peer->info->host_id : std::string()), ack.direct,
                  conn->fd());
      adoptControl(peer, std::move(conn), agreed.value(), peer->hello_path);
      return;
    }
    case control::HelloResult::kDuplicate:
      // The peer's own connection wins; it arrives through our listener. Retry only if it
      // does not (e.g. the peer still holds a connection it has not yet found dead).
      epollDel(peer->outgoing->fd());
      peer->outgoing.reset();
      peer->outgoing_stage = Peer::Outgoing::kNone;
      peer->retry_pending = true;
      peer->retry_at = Clock::now() + 5 * kRetryDelay;
      return;
    case control::HelloResult::kVersionMismatch:
    case control::HelloResult::kRefused:
      failPeer(peer, Status(StatusCode::kRemoteRejected,
                            "peer '" + peer->name + "' refused the connection: " + ack.reason));
      return;
  }
}

void EngineCore::acceptControlConnections() {
  for (;;) {
    const int fd = ::accept4(listener_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
        // Out of descriptors or memory: the pending connection keeps the listener readable, so
        // stop watching it for a moment instead of spinning on it.
        const int err = errno;
        uint64_t suppressed = 0;
        if (listener_log_.allow(Clock::now(), &suppressed)) {
          LOG_ERROR("cannot accept control connections: %s; retrying in %lld ms",
                    errnoString(err).c_str(), static_cast<long long>(kListenerPause.count()));
        }
        epollDel(listener_.get());
        listener_resume_at_ = Clock::now() + kListenerPause;
      }
      return;
    }
    if (incoming_.size() >= kMaxIncoming) {
      LOG_WARN("too many connections waiting for a handshake; closing one from %s",
               net::peerAddressOf(fd).c_str());
      ::close(fd);
      continue;
    }
    const uint64_t id = next_incoming_++;
    Incoming inc;
    inc.conn = std::make_unique<control::ControlConnection>(net::Fd(fd));
    inc.deadline = Clock::now() + kHelloTimeout;
    incoming_.emplace(id, std::move(inc));
    epollAdd(fd, epollKey(KeyKind::kIncoming, id), EPOLLIN);
  }
}

void EngineCore::onIncomingEvent(uint64_t id, uint32_t /*events*/) {
  auto it = incoming_.find(id);
  if (it == incoming_.end()) return;
  control::ControlConnection* conn = it->second.conn.get();
  auto drop = [&](const char* level_warn, const std::string& why) {
    if (level_warn != nullptr) {
      LOG_WARN("rejecting control connection from %s: %s", net::peerAddressOf(conn->fd()).c_str(),
               why.c_str());
    }
    epollDel(conn->fd());
    incoming_.erase(it);
  };
  Status st = conn->readAvailable();
  if (!st.isOk()) {
    // A peer without the secret leaves when it sees our challenge.
    drop(it->second.hello ? "" : nullptr,
         it->second.hello
             ? "'" + it->second.hello->name + "' closed the connection during authentication (" +
                   st.message() + "); it may not have the shared secret"
             : st.message());
    return;
  }
  control::FrameHeader header;
  std::string_view payload;
  auto got = conn->nextFrame(kMaxHelloPayload, 0, &header, &payload);
  if (!got.isOk()) {
    drop("", "not a tcpx_p2p handshake (" + got.status().message() + ")");
    return;
  }
  if (!got.value()) return;
  if (it->second.hello) {
    // Authentication in progress: only the connector's proof may come now.
    if (header.type != static_cast<uint8_t>(control::FrameType::kAuthProof)) {
      drop("", "expected AUTH_PROOF, got frame type " + std::to_string(header.type));
      return;
    }
    onIncomingProof(id, payload);
    return;
  }
  if (header.type != static_cast<uint8_t>(control::FrameType::kHello)) {
    drop("", "expected HELLO, got frame type " + std::to_string(header.type));
    return;
  }
  if (header.version != control::kProtocolVersion) {
    sendHelloAck(conn, control::HelloResult::kVersionMismatch,
                 strfmt("peer speaks protocol version %u; this engine speaks version %u",
                        header.version, control::kProtocolVersion));
    drop("", strfmt("protocol version %u is not supported (this engine speaks %u)", header.version,
                    control::kProtocolVersion));
    return;
  }
  control::Hello hello;
  st = control::decode(payload, &hello);
  if (!st.isOk()) {
    drop("", st.message());
    return;
  }
  // Both ends must be configured with the same transport, and agree on the one that moves this
  // peer's data (a peer on this host may take the socket transport: same_host).
  auto info = control::decodeConnInfo(hello.conn_info);
  const std::string configured = info.isOk() ? info->transport : hello.transport;
  const NetPath path = netPathFor(info.isOk() ? info->host_id : std::string());
  std::string why;
  if (configured != transport_->name()) {
    why = strfmt("peer uses transport '%s' but this engine uses '%s'", configured.c_str(),
                 transport_->name());
  } else if (hello.transport != transportName(path)) {
    why = strfmt(
        "peer on this host moves data over '%s' but this engine would use '%s' for it "
        "(same_host=%s here: set the same same_host on both)",
        hello.transport.c_str(), transportName(path), settings_.same_host.c_str());
  }
  if (!why.empty()) {
    sendHelloAck(conn, control::HelloResult::kRefused, why);
    drop("", why);
    return;
  }
  onIncomingHello(id, std::move(hello));
}

void EngineCore::onIncomingHello(uint64_t id, control::Hello hello) {
  auto it = incoming_.find(id);
  control::ControlConnection* conn = it->second.conn.get();
  if (!settings_.auth_secret.empty()) {
    // Nothing about this peer is looked at before it proves the secret: send our challenge.
    Incoming& inc = it->second;
    auto nonce = control::makeNonce();
    if (!nonce.isOk()) {
      LOG_ERROR("closing control connection from %s: %s", net::peerAddressOf(conn->fd()).c_str(),
                nonce.status().message().c_str());
      epollDel(conn->fd());
      incoming_.erase(it);
      return;
    }
    inc.nonce = std::move(nonce.value());
    control::AuthChallenge challenge;
    challenge.nonce = inc.nonce;
    challenge.proof =
        control::acceptorProof(settings_.auth_secret, hello.nonce, inc.nonce, hello.uuid);
    control::encode(challenge, conn->out());
    (void)conn->flush();
    inc.hello = std::move(hello);
    return;
  }
  epollDel(conn->fd());
  auto owned = std::move(it->second.conn);
  incoming_.erase(it);
  handleHello(std::move(owned), hello);
}

void EngineCore::onIncomingProof(uint64_t id, std::string_view payload) {
  auto it = incoming_.find(id);
  Incoming& inc = it->second;
  control::ControlConnection* conn = inc.conn.get();
  std::string proof;
  const bool valid =
      control::decodeAuthProof(payload, &proof).isOk() &&
      control::proofsMatch(proof, control::connectorProof(settings_.auth_secret, inc.hello->nonce,
                                                          inc.nonce, inc.hello->uuid));
  if (!valid) {
    LOG_WARN(
        "rejecting control connection from %s (calling itself '%s'): authentication failed "
        "(it does not know the shared secret)",
        net::peerAddressOf(conn->fd()).c_str(), inc.hello->name.c_str());
    sendHelloAck(conn, control::HelloResult::kRefused, "authentication failed");
    epollDel(conn->fd());
    incoming_.erase(it);
    return;
  }
  control::Hello hello = std::move(*inc.hello);
  epollDel(conn->fd());
  auto owned = std::move(inc.conn);
  incoming_.erase(it);
  handleHello(std::move(owned), hello);
}

void EngineCore::onAuthChallenge(Peer* peer, std::string_view payload) {
  if (settings_.auth_secret.empty()) {
    failPeer(peer, Status(StatusCode::kRemoteRejected,
                          "peer '" + peer->name +
                              "' requires authentication: set auth_secret (TCPX_P2P_AUTH_SECRET) "
                              "to the shared secret"));
    return;
  }
  control::AuthChallenge challenge;
  const bool valid =
      control::decode(payload, &challenge).isOk() &&
      control::proofsMatch(
          challenge.proof,
          control::acceptorProof(settings_.auth_secret, peer->hello_nonce, challenge.nonce, uuid_));
  if (!valid) {
    LOG_WARN("peer '%s' at %s failed authentication (it does not know the shared secret)",
             peer->name.c_str(), net::peerAddressOf(peer->outgoing->fd()).c_str());
    failPeer(peer, Status(StatusCode::kRemoteRejected,
                          "peer '" + peer->name +
                              "' failed authentication: it does not know the shared secret"));
    return;
  }
  peer->peer_proved = true;
  control::encodeAuthProof(
      control::connectorProof(settings_.auth_secret, peer->hello_nonce, challenge.nonce, uuid_),
      peer->outgoing->out());
  Status st = peer->outgoing->flush();
  if (!st.isOk()) {
    failPeer(peer, Status(StatusCode::kRemoteDisconnected,
                          "control connection to peer '" + peer->name + "' lost: " + st.message()));
  }
}

void EngineCore::sendHelloAck(control::ControlConnection* conn, control::HelloResult result,
                              const std::string& reason, const control::DirectOffer& direct) {
  control::HelloAck ack;
  ack.result = result;
  ack.uuid = uuid_;
  ack.name = name_;
  ack.settings = wireSettings();
  ack.reason = reason;
  ack.direct = direct;
  control::encode(ack, conn->out());
  (void)conn->flush();
}

void EngineCore::handleHello(std::unique_ptr<control::ControlConnection> conn,
                             const control::Hello& hello) {
  auto refuse = [&](const std::string& why) {
    LOG_WARN("refusing control connection from %s: %s", net::peerAddressOf(conn->fd()).c_str(),
             why.c_str());
    sendHelloAck(conn.get(), control::HelloResult::kRefused, why);
  };
  if (!control::validPeerName(hello.name)) {
    return refuse("the engine name must be 1 to 256 printable characters");
  }
  auto agreed = control::agreeSettings(wireSettings(), hello.settings, settings_.keepalive_ms);
  if (!agreed.isOk()) return refuse(agreed.status().message());

  // This engine never connects to itself (local_path.cc): a connector claiming its identity is
  // someone else.
  if (hello.uuid == uuid_) return refuse("the connector claims this engine's own identity");
  Peer* peer = peerByUuid(hello.uuid);
  if (peer == nullptr) {
    peer = peerByName(hello.name);
    if (peer != nullptr) {
      // A new instance under a known name: the old one is gone.
      if (peer->state.load() != PeerState::kIdle && peer->state.load() != PeerState::kFailed) {
        failPeer(peer,
                 Status(StatusCode::kRemoteDisconnected, "peer '" + peer->name + "' restarted"));
      }
      std::lock_guard<std::mutex> lock(peers_mu_);
      peer->uuid = hello.uuid;
      peer->failure = Status();
      peer->state.store(PeerState::kIdle);
    } else {
      peer = createPeer(hello.name);
      std::lock_guard<std::mutex> lock(peers_mu_);
      peer->uuid = hello.uuid;
    }
  }
  auto info = control::decodeConnInfo(hello.conn_info);
  if (info.isOk() && info->uuid == hello.uuid) peer->info = info.value();

  if (peer->control) {
    sendHelloAck(conn.get(), control::HelloResult::kDuplicate, "already connected");
    return;
  }
  if (peer->outgoing) {
    if (hello.uuid < uuid_) {
      epollDel(peer->outgoing->fd());
      peer->outgoing.reset();
      peer->outgoing_stage = Peer::Outgoing::kNone;
    } else {
      sendHelloAck(conn.get(), control::HelloResult::kDuplicate, "own connection in progress");
      return;
    }
  }
  const std::string peer_host = info.isOk() ? info->host_id : std::string();
  // Direct copies: offered back only to a connector on this host that offered them.
  const control::DirectOffer offer =
      hello.direct.pid != 0 ? directOffer(peer_host) : control::DirectOffer{};
  sendHelloAck(conn.get(), control::HelloResult::kAccepted, "", offer);
  adoptDirect(peer, offer, hello.direct, conn->fd());
  // The path was checked against the HELLO before (onIncomingEvent).
  adoptControl(peer, std::move(conn), agreed.value(), netPathFor(peer_host));
}

void EngineCore::adoptControl(Peer* peer, std::unique_ptr<control::ControlConnection> conn,
                              const control::AgreedSettings& agreed, NetPath path) {
  if (peer->state.load() != PeerState::kConnecting) {
    std::lock_guard<std::mutex> lock(peers_mu_);
    peer->failure = Status();
    peer->state.store(PeerState::kConnecting);
    peer->setup_deadline = Clock::now() + std::chrono::milliseconds(settings_.connect_timeout_ms);
  }
  peer->retry_pending = false;
  peer->last_peer_id = 0;  // a new connection: the peer may be a new instance counting afresh
  peer->control = std::move(conn);
  peer->control_wants_out = false;
  peer->control_reader = ControlReader::kLoop;
  peer->agreed = agreed;
  peer->notification_limit.store(agreed.peer_max_notification);
  // Channels of an earlier connection close on the path they were set up on.
  closeDataChannels(peer);
  if (path == NetPath::kSameHostSockets) ensureSameHostSockets();
  {
    std::lock_guard<std::mutex> lock(peers_mu_);
    peer->net_path = path;
    peer->net_transport = transportName(path);
  }
  epollAdd(peer->control->fd(), epollKey(KeyKind::kPeerControl, peer->serial), EPOLLIN);
  LOG_INFO("control connection to peer '%s' up (%u channels, chunk %s)", peer->name.c_str(),
           agreed.channels, formatBytes(agreed.chunk_size).c_str());
  beginDataSetup(peer);
  flushControl(peer);
  // Frames that arrived right behind the handshake are already buffered: no event will announce
  // them.
  processFrames(peer);
}

void EngineCore::beginDataSetup(Peer* peer) {
  closeDataChannels(peer);
  peer->out.reset(true, peer->agreed.channels, settings_.send_window);
  peer->in.reset(false, peer->agreed.channels, settings_.recv_window);
  peer->listens.assign(peer->agreed.channels, nullptr);
  peer->listen_handles.assign(peer->agreed.channels, transport::ConnectHandle{});
  peer->accept_stages.assign(peer->agreed.channels, Peer::SetupStage::kNotAsked);
  peer->connect_stages.assign(peer->agreed.channels, Peer::SetupStage::kNotAsked);
  for (uint32_t i = 0; i < peer->agreed.channels; ++i) {
    const transport::NetResult rc = transportOf(*peer).listen(
        netDeviceFor(*peer, i), &peer->listen_handles[i], &peer->listens[i]);
    if (rc != transport::NetResult::kSuccess) {
      failPeer(peer, Status(StatusCode::kTransportError,
                            strfmt("listening for data channel %u of peer '%s' failed (%s)", i,
                                   peer->name.c_str(), transport::netResultName(rc))));
      return;
    }
  }
  control::ChannelSetup setup;
  setup.handles = peer->listen_handles;
  control::encode(setup, peer->control->out());
}

void EngineCore::onChannelSetup(Peer* peer, std::string_view payload) {
  control::ChannelSetup setup;
  Status st = control::decode(payload, decodeLimits(), &setup);
  if (!st.isOk()) {
    protocolError(peer, st);
    return;
  }
  if (setup.handles.size() != peer->agreed.channels || peer->have_remote_handles) {
    protocolError(peer, Status(StatusCode::kProtocolError,
                               strfmt("CHANNEL_SETUP with %zu handles, expected %u once",
                                      setup.handles.size(), peer->agreed.channels)));
    return;
  }
  peer->remote_handles = std::move(setup.handles);
  peer->have_remote_handles = true;
}

void EngineCore::driveSetup(Peer* peer) {
  if (!peer->have_remote_handles) return;
  bool all_up = true;
  for (uint32_t i = 0; i < peer->agreed.channels; ++i) {
    if (peer->out.comms[i] != nullptr) continue;
    transport::SendComm* comm = nullptr;
    const transport::NetResult rc =
        transportOf(*peer).connect(netDeviceFor(*peer, i), &peer->remote_handles[i], &comm);
    if (rc != transport::NetResult::kSuccess) {
      peer->connect_stages[i] = Peer::SetupStage::kNotAsked;  // nothing left in the transport
      failPeer(peer, Status(StatusCode::kTransportError,
                            strfmt("connecting data channel %u to peer '%s' failed (%s)", i,
                                   peer->name.c_str(), transport::netResultName(rc))));
      return;
    }
    peer->connect_stages[i] =
        comm != nullptr ? Peer::SetupStage::kDone : Peer::SetupStage::kPending;
    peer->out.comms[i] = comm;
    all_up = all_up && comm != nullptr;
  }
  for (uint32_t i = 0; i < peer->agreed.channels; ++i) {
    if (peer->in.comms[i] != nullptr) continue;
    transport::RecvComm* comm = nullptr;
    const transport::NetResult rc = transportOf(*peer).accept(peer->listens[i], &comm);
    if (rc != transport::NetResult::kSuccess) {
      peer->accept_stages[i] = Peer::SetupStage::kNotAsked;  // the accept is over
      failPeer(peer, Status(StatusCode::kTransportError,
                            strfmt("accepting data channel %u from peer '%s' failed (%s)", i,
                                   peer->name.c_str(), transport::netResultName(rc))));
      return;
    }
    peer->accept_stages[i] = Peer::SetupStage::kPending;
    if (comm != nullptr) {
      peer->in.comms[i] = comm;
      // TCPX allows one accept per listen comm: close it as soon as it has served.
      transportOf(*peer).closeListen(peer->listens[i]);
      peer->listens[i] = nullptr;
      peer->accept_stages[i] = Peer::SetupStage::kDone;
    }
    all_up = all_up && comm != nullptr;
  }
  if (!all_up) return;
  peer->state.store(PeerState::kReady);
  LOG_INFO("peer '%s' ready: %u channels each way", peer->name.c_str(), peer->agreed.channels);
  for (auto& waiter : peer->connect_waiters) waiter->complete(Status());
  peer->connect_waiters.clear();
}

void EngineCore::onControlEvent(Peer* peer, uint32_t events) {
  if ((events & EPOLLOUT) != 0) flushControl(peer);
  if (!peer->control || (events & (EPOLLIN | EPOLLRDHUP | EPOLLERR | EPOLLHUP)) == 0) return;
  Status st = peer->control->readAvailable();
  if (!st.isOk()) {
    failPeer(peer, Status(StatusCode::kRemoteDisconnected,
                          "control connection to peer '" + peer->name + "' lost: " + st.message()));
    return;
  }
  processFrames(peer);
}

void EngineCore::processFrames(Peer* peer) {
  bool requested = false;  // a request was read in this call
  while (peer->control) {
    control::FrameHeader header;
    std::string_view payload;
    auto got = peer->control->nextFrame(control::kMaxFramePayload, control::kProtocolVersion,
                                        &header, &payload);
    if (!got.isOk()) {
      protocolError(peer, got.status());
      return;
    }
    if (!got.value()) break;
    requested = requested || isRequest(header.type);
    dispatchFrame(peer, header, payload);
    // Answers to a burst of requests pile up while the peer does not read them.
    if (peer->control && !controlBacklogWithinBound(peer)) return;
  }
  // serve_poll_us: a peer that waits for each answer before its next request (a ping-pong of
  // small transfers) has its next read without a wake-up.
  if (requested && serve_poll_.count() > 0) serve_poll_until_ = Clock::now() + serve_poll_;
}

bool EngineCore::controlBacklogWithinBound(Peer* peer) {
  const size_t backlog = peer->control->pendingOutput();
  if (backlog <= kMaxControlBacklog) return true;
  failPeer(peer, Status(StatusCode::kResourceExhausted,
                        strfmt("peer '%s' does not read its control connection: %s of frames "
                               "queued for it (the bound is %s)",
                               peer->name.c_str(), formatBytes(backlog).c_str(),
                               formatBytes(kMaxControlBacklog).c_str())));
  return false;
}

void EngineCore::flushControl(Peer* peer) {
  if (!peer->control) return;
  Status st = peer->control->flush();
  if (!st.isOk()) {
    failPeer(peer, Status(StatusCode::kRemoteDisconnected,
                          "control connection to peer '" + peer->name + "' lost: " + st.message()));
    return;
  }
  if (!controlBacklogWithinBound(peer)) return;
  const bool want = peer->control->wantsWrite();
  if (want != peer->control_wants_out) {
    peer->control_wants_out = want;
    armControl(peer);
  }
}

RetiringChannels* EngineCore::closeDataChannels(Peer* peer, bool with_inline) {
  auto retiring = std::make_unique<RetiringChannels>();
  retiring->data_path = &dataPathOf(*peer);
  retiring->peer_name = peer->name;
  retiring->out = std::move(peer->out);
  retiring->in = std::move(peer->in);
  if (with_inline) retiring->inline_staging = std::move(peer->inline_staging);
  peer->out.reset(true, 0, 1);
  peer->in.reset(false, 0, 1);
  // Receives may never complete now: copies still following them stop.
  DataPath::stopLandedCopies(retiring->in);
  RetiringChannels* kept = nullptr;
  if (retiring->copiesIdle()) {
    finishRetiring(*retiring);
  } else {
    LOG_INFO(
        "peer '%s': its channels close once their GPU copies, which wait for the "
        "application's earlier GPU work, are done",
        peer->name.c_str());
    retiring_.push_back(std::move(retiring));
    kept = retiring_.back().get();
  }
  transport::Transport& transport = transportOf(*peer);
  // Set-up still under way in a transport's own threads is finished before its comms close
  // (SetupDrain); other transports drop it at once.
  const bool drain = transport.setupRunsInThreads();
  for (size_t i = 0; i < peer->listens.size(); ++i) {
    transport::ListenComm* listen = peer->listens[i];
    if (listen == nullptr) continue;
    if (drain && peer->accept_stages[i] == Peer::SetupStage::kPending) {
      setupDrainOf(*peer).addAccept(netDeviceFor(*peer, static_cast<uint32_t>(i)), listen,
                                    peer->listen_handles[i]);
    } else {
      transport.closeListen(listen);
    }
  }
  for (size_t i = 0; i < peer->remote_handles.size() && i < peer->connect_stages.size(); ++i) {
    if (peer->connect_stages[i] != Peer::SetupStage::kPending) continue;
    if (drain) {
      setupDrainOf(*peer).addConnect(netDeviceFor(*peer, static_cast<uint32_t>(i)),
                                     peer->remote_handles[i]);
    } else {
      transport.abandonConnect(&peer->remote_handles[i]);
    }
  }
  peer->listens.clear();
  peer->listen_handles.clear();
  peer->accept_stages.clear();
  peer->connect_stages.clear();
  peer->remote_handles.clear();
  peer->have_remote_handles = false;
  return kept;
}

void EngineCore::driveRetiring() {
  for (size_t i = 0; i < retiring_.size();) {
    RetiringChannels& r = *retiring_[i];
    if (!r.warned && Clock::now() - r.since > kRetiringWarnAfter) {
      r.warned = true;
      LOG_WARN(
          "peer '%s': its channels still wait, %lld s after the connection ended, for GPU "
          "copies queued behind the application's GPU work (%zu transfers wait with them)",
          r.peer_name.c_str(),
          static_cast<long long>(
              std::chrono::duration_cast<std::chrono::seconds>(Clock::now() - r.since).count()),
          r.held.size());
    }
    if (r.copiesIdle()) {
      std::unique_ptr<RetiringChannels> done = std::move(retiring_[i]);
      retiring_.erase(retiring_.begin() + static_cast<std::ptrdiff_t>(i));
      finishRetiring(*done);
    } else {
      ++i;
    }
  }
}

void EngineCore::finishRetiring(RetiringChannels& retiring) {
  // The plugin's order: our copies out of its bounce pool are done; the comms close, which joins
  // the transport's threads, so nothing touches our buffers any more; only then are the buffers
  // deregistered and freed.
  DataPath& data_path = *retiring.data_path;
  data_path.closeComms(retiring.out);
  data_path.closeComms(retiring.in);
  auto leftovers = std::make_unique<ChannelLeftovers>();
  data_path.releaseBuffers(retiring.out, leftovers.get());
  data_path.releaseBuffers(retiring.in, leftovers.get());
  if (retiring.inline_staging) leftovers->staging.push_back(std::move(retiring.inline_staging));
  reclaimer_.dispose(std::move(leftovers), gpu_);
  for (const auto& op : retiring.target_ops) registry_.unpin(op->pinned);
  for (auto& [t, status] : retiring.held) endWithConnection(t.get(), status);
  if (!retiring.held.empty() || !retiring.target_ops.empty()) {
    LOG_DEBUG("peer '%s': channels closed after their GPU copies; %zu transfers complete",
              retiring.peer_name.c_str(), retiring.held.size());
  }
}

void EngineCore::failPeer(Peer* peer, const Status& why, bool orderly) {
  const bool was_live = peer->control || peer->outgoing || peer->state.load() != PeerState::kFailed;
  if (!was_live) return;
  const size_t in_flight = peer->initiated.size() + peer->waiting.size() + peer->target_ops.size();
  if (orderly && in_flight == 0) {
    LOG_INFO("peer '%s': %s", peer->name.c_str(), why.message().c_str());
  } else {
    LOG_WARN("peer '%s': %s (failing %zu transfers in flight)", peer->name.c_str(),
             why.message().c_str(), in_flight);
  }
  // A protocol violation says so, and so do the data-path watchdog (TIMEOUT of a peer that was
  // ready: its data connections stalled) and a plugin that cannot receive the way this engine
  // was set up to (NOT_SUPPORTED, see recv_path); every other end of a connection, a set-up that
  // failed or timed out included, is a disconnect for the transfers that waited on it.
  const bool stalled =
      why.code() == StatusCode::kTimeout && peer->state.load() == PeerState::kReady;
  const StatusCode code = why.code() == StatusCode::kCanceled ||
                                  why.code() == StatusCode::kProtocolError ||
                                  why.code() == StatusCode::kNotSupported || stalled
                              ? why.code()
                              : StatusCode::kRemoteDisconnected;
  {
    std::lock_guard<std::mutex> lock(peers_mu_);
    peer->failure = why;
    peer->state.store(PeerState::kFailed);
  }
  const Status transfer_status(code, "peer '" + peer->name + "': " + why.message());
  // First of all, the gates the peer will never open are opened here: closing its channels may
  // free GPU memory (a plugin's bounce pool), and a free waits for every stream of the process,
  // a gated copy's included.
  abandonGatedRuns(peer, nullptr, transfer_status);
  // The same for copies following its receives (they would give up by themselves, later).
  DataPath::stopLandedCopies(peer->in);
  if (peer->control) epollDel(peer->control->fd());
  peer->control.reset();
  if (peer->outgoing) epollDel(peer->outgoing->fd());
  peer->outgoing.reset();
  peer->outgoing_stage = Peer::Outgoing::kNone;
  peer->retry_pending = false;

  for (auto& [id, t] : peer->initiated) t->stream = nullptr;
  for (auto& [id, op] : peer->target_ops) op->stream = nullptr;
  peer->direct_deadlines.clear();
  peer->landed_writes.clear();  // `announced` starts again below
  peer->gated_reads.clear();    // their runs end once their copies are done (abandonLocalRuns)
  // The peer's signals close with its link, now rather than at the next poll.
  std::erase_if(queued_writes_,
                [&](const QueuedWrite& q) { return q.peer_serial == peer->serial; });
  // Frees no longer wait for it: its mappings of our GPU memory go once it notices the end and
  // its runs let go (a stalled peer may still read them: README, "Direct copies on the same
  // host"). Ours of its memory go once our runs let go of them.
  peer->ipc_sent.clear();
  dropUnexportsOf(*peer);
  peer->direct.reset();
  RetiringChannels* retiring = closeDataChannels(peer, /*with_inline=*/true);
  dropInlineCopies(peer);

  // Local runs not started end now; the others once their copies are done (driveLocalRuns).
  abandonLocalRuns(*peer, transfer_status);
  // The runs still copying are no longer the peer's (peer_lost): the next connection's runs take
  // a lane and an order of their own.
  peer->copy_lane = next_copy_lane_++;
  auto initiated = std::move(peer->initiated);
  peer->initiated.clear();
  peer->matched_sends.clear();
  for (auto& [id, t] : initiated) {
    if (retiring != nullptr) {
      // A copy of the connection may still read or write its memory.
      t->stage = OpStage::kRetiring;
      retiring->held.emplace_back(t, transfer_status);
      continue;
    }
    endWithConnection(t.get(), transfer_status);
  }
  auto waiting = std::move(peer->waiting);
  peer->waiting.clear();
  for (auto& item : waiting) {
    if (auto* t = std::get_if<std::shared_ptr<Transfer>>(&item)) endRun(t->get(), transfer_status);
  }
  peer->announced = 0;
  for (auto& [id, op] : peer->target_ops) {
    if (retiring != nullptr) {
      // Its copies may still run, and a transport request may still walk its segments.
      retiring->target_ops.push_back(std::move(op));
    } else {
      registry_.unpin(op->pinned);
    }
  }
  peer->target_ops.clear();
  peer->served_descriptors = 0;
  peer->posted_recvs.clear();
  peer->unexpected.clear();
  peer->unexpected_count = 0;
  for (auto* queues : {&peer->local_sends, &peer->local_recvs}) {
    auto local = std::move(*queues);
    queues->clear();
    for (auto& [tag, queue] : local) {
      for (auto& t : queue) endRun(t.get(), transfer_status);
    }
  }
  for (auto& waiter : peer->connect_waiters) waiter->complete(why);
  peer->connect_waiters.clear();
}

void EngineCore::handleTimers(Clock::time_point now) {
  if (!local_runs_.empty()) checkCopyStalls(now);
  const auto timeout = std::chrono::milliseconds(settings_.peer_timeout_ms);
  // Keepalives leave together: in a round where one peer's is due, every peer in the last
  // quarter of its interval sends its own too, so an idle engine with many peers wakes about once
  // per interval to send them rather than once per peer. Early is safe: the interval is a
  // quarter of the peer's timeout at most (negotiation.cc), and any frame counts as life.
  const bool keepalive_round =
      std::any_of(peers_by_serial_.begin(), peers_by_serial_.end(), [&](const auto& entry) {
        const auto due = entry.second->keepaliveDue();
        return due && now >= *due;
      });
  for (auto& [serial, peer] : peers_by_serial_) {
    const PeerState state = peer->state.load();
    if (state == PeerState::kConnecting && now > peer->setup_deadline) {
      failPeer(peer, Status(StatusCode::kTimeout,
                            strfmt("could not connect to peer '%s' within %u ms",
                                   peer->name.c_str(), settings_.connect_timeout_ms)));
      continue;
    }
    if (state == PeerState::kConnecting && !peer->control && !peer->outgoing &&
        peer->retry_pending && now >= peer->retry_at) {
      peer->retry_pending = false;
      startOutgoing(peer);
    }
    if (!peer->control) continue;
    if (now - peer->control->lastReceive() > timeout) {
      failPeer(peer, Status(StatusCode::kRemoteDisconnected,
                            strfmt("no frame from peer '%s' for %u ms", peer->name.c_str(),
                                   settings_.peer_timeout_ms)));
      continue;
    }
    const auto keepalive_due = peer->keepaliveDue();
    if (keepalive_round && keepalive_due &&
        now >= *keepalive_due - std::chrono::milliseconds(peer->agreed.keepalive_ms) / 4) {
      control::encodePing(peer->control->out());
      flushControl(peer);
    }
    if (state == PeerState::kReady) {
      peer->stall_check_at = dataPathOf(*peer).checkStalls(peer, now);
      if (!peer->direct_deadlines.empty()) checkDirectDeadlines(peer, now);
    }
    for (const auto& [base, pending] : unexports_) {
      if (now < pending.due ||
          std::find(pending.peers.begin(), pending.peers.end(), serial) == pending.peers.end()) {
        continue;
      }
      failPeer(peer, Status(StatusCode::kTimeout,
                            strfmt("peer '%s' did not unmap GPU memory being freed within %u ms "
                                   "(data_timeout_ms)",
                                   peer->name.c_str(), settings_.data_timeout_ms)));
      break;  // failPeer changed unexports_
    }
  }
  if (listener_resume_at_ && now >= *listener_resume_at_) {
    listener_resume_at_.reset();
    epollAdd(listener_.get(), epollKey(KeyKind::kListener, 0), EPOLLIN);
  }
  for (auto it = incoming_.begin(); it != incoming_.end();) {
    if (now > it->second.deadline) {
      LOG_WARN("closing control connection from %s: no handshake within %lld s",
               net::peerAddressOf(it->second.conn->fd()).c_str(),
               static_cast<long long>(
                   std::chrono::duration_cast<std::chrono::seconds>(kHelloTimeout).count()));
      epollDel(it->second.conn->fd());
      it = incoming_.erase(it);
    } else {
      ++it;
    }
  }
}

}  // namespace tcpx::engine
