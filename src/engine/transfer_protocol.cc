// The transfer protocol on the control connection, initiator and target side.
//
// Order rule: whoever sends data on a direction announces it first (WRITE_REQUEST for a WRITE,
// READ_RESPONSE for a READ, SEND_DATA for a send), and the announcement carries the global index
// of its first chunk. The announcer appends the stream to its send direction in announcement
// order; the receiver appends the matching receive stream in the order the announcements arrive
// on the one control connection. Both sides therefore post the same chunks in the same order on
// every channel, whatever mix of READs, WRITEs and sends runs in both directions.
//
// Completion: a WRITE completes at the initiator when its own sends are done and WRITE_DONE says
// the target has every byte in place (the target sends WRITE_DONE after its receives completed
// and, if asked, after queueing the notification). A READ completes when its receives are done;
// its notification is sent to the target after that. A refused request (validation on the
// target) fails on both sides; a refused WRITE's data is still drained so the channels stay in
// step.
#include <algorithm>

#include "common/log.h"
#include "common/strings.h"
#include "engine/engine_core.h"

namespace tcpx::engine {

Status refused(const Peer& peer, const char* what, StatusCode code, const std::string& message) {
  if (code == StatusCode::kCanceled) {
    return Status(StatusCode::kCanceled,
                  "peer '" + peer.name + "' canceled the " + what + ": " + message);
  }
  return Status(StatusCode::kRemoteRejected,
                strfmt("peer '%s' refused the %s: %s: %s", peer.name.c_str(), what,
                       statusCodeName(code), message.c_str()));
}

control::DecodeLimits EngineCore::decodeLimits() const {
  control::DecodeLimits limits;
  limits.max_descriptors = settings_.max_descriptors;
  limits.max_notification = settings_.max_notification_size;
  limits.max_inline = kInlineSlotBytes;  // the largest inline_threshold any peer may use
  limits.max_channels = 32;
  return limits;
}

bool EngineCore::announcedInStep(Peer* peer, const char* what, uint64_t xfer_id,
                                 uint64_t first_chunk) {
  // The order rule's check: data announced by the peer must start where our receive direction
  // stands, or the two sides would post different chunks on the same channels.
  if (first_chunk == peer->in.next_chunk) return true;
  protocolError(peer, Status(StatusCode::kProtocolError,
                             strfmt("%s %llu announces data from chunk %llu, expected %llu", what,
                                    static_cast<unsigned long long>(xfer_id),
                                    static_cast<unsigned long long>(first_chunk),
                                    static_cast<unsigned long long>(peer->in.next_chunk))));
  return false;
}

void EngineCore::protocolError(Peer* peer, const Status& why) {
  LOG_ERROR("peer '%s' broke the protocol: %s; closing the connection", peer->name.c_str(),
            why.message().c_str());
  failPeer(peer, Status(StatusCode::kProtocolError, why.message()));
}

std::shared_ptr<Transfer> EngineCore::ourOperation(Peer* peer, control::FrameType frame,
                                                   uint64_t id, XferKind kind) {
  auto it = peer->initiated.find(id);
  if (it != peer->initiated.end() && it->second->kind == kind &&
      peerMaySend(OpRole::kOurs, kind, it->second->stage, frame)) {
    return it->second;
  }
  const std::string what =
      it == peer->initiated.end()
          ? strfmt("no %s %llu of ours is running", xferKindName(kind),
                   static_cast<unsigned long long>(id))
          : strfmt("our %s %llu is %s", xferKindName(it->second->kind),
                   static_cast<unsigned long long>(id), opStageName(it->second->stage));
  protocolError(
      peer, Status(StatusCode::kProtocolError,
                   strfmt("%s out of turn: %s", control::frameTypeName(static_cast<uint8_t>(frame)),
                          what.c_str())));
  return nullptr;
}

bool EngineCore::acceptNewPeerId(Peer* peer, control::FrameType frame, uint64_t id) {
  if (id > peer->last_peer_id) {
    peer->last_peer_id = id;
    return true;
  }
  protocolError(peer, Status(StatusCode::kProtocolError,
                             strfmt("%s reuses id %llu (the peer's ids only increase; the last "
                                    "was %llu)",
                                    control::frameTypeName(static_cast<uint8_t>(frame)),
                                    static_cast<unsigned long long>(id),
                                    static_cast<unsigned long long>(peer->last_peer_id))));
  return false;
}

void EngineCore::completeRun(Transfer* t, const Status& status) {
  LOG_TRACE("peer '%s': transfer %llu completes: %s", t->peer_name.c_str(),
            static_cast<unsigned long long>(t->wire_id),
            status.isOk() ? "ok" : status.message().c_str());
  if (t->counters) t->counters->finished(t->kind, t->total, status);
  {
    std::lock_guard<std::mutex> lock(t->result_mu);
    t->result = status;
  }
  t->state.store(status.isOk() ? RunState::kDone : RunState::kFailed);
  notifyDone();
}

// ---------------------------------------------------------------------------------------------
// Posting, queueing and canceling (initiator)
// ---------------------------------------------------------------------------------------------

void EngineCore::handlePost(Command& cmd) {
  std::shared_ptr<Transfer>& t = cmd.transfer;
  t->resetRun();
  LOG_TRACE("peer '%s': transfer of %llu bytes posted", t->peer_name.c_str(),
            static_cast<unsigned long long>(t->total));
  Peer* peer = peerByName(t->peer_name);
  Status fail;
  if (peer == nullptr) {
    fail = Status(StatusCode::kNotFound, "unknown peer '" + t->peer_name + "'");
  } else if (peer->uuid != t->peer_uuid) {
    fail = Status(StatusCode::kRemoteDisconnected,
                  "peer '" + t->peer_name + "' restarted since the transfer was prepared");
  } else if (peer->state.load() == PeerState::kFailed) {
    fail = Status(StatusCode::kRemoteDisconnected,
                  "peer '" + t->peer_name + "' is disconnected: " + peer->failure.message());
  }
  if (!fail.isOk()) {
    endRun(t.get(), fail);
    return;
  }
  if (runLocally(peer, t)) return;
  t->stage = OpStage::kQueued;
  peer->waiting.emplace_back(t);
  // A ready peer's queue is started by the round's pass over the peers (EngineCore::run), after
  // every command of the round: the requests of all transfers posted together leave in one write.
  if (peer->state.load() != PeerState::kReady) ensureConnecting(peer);
}

void EngineCore::handleNotify(Command& cmd) {
  Peer* peer = peerByName(cmd.peer);
  if (peer == nullptr || peer->state.load() == PeerState::kFailed) {
    LOG_WARN("notification to peer '%s' dropped: the peer is %s", cmd.peer.c_str(),
             peer == nullptr ? "unknown" : "disconnected");
    return;
  }
  if (notifyLocally(peer, cmd.text)) return;
  peer->waiting.emplace_back(std::move(cmd.text));
  if (peer->state.load() != PeerState::kReady) ensureConnecting(peer);  // else as handlePost
}

void EngineCore::pumpWaiting(Peer* peer) {
  while (peer->state.load() == PeerState::kReady && !peer->waiting.empty()) {
    WaitingItem& item = peer->waiting.front();
    if (auto* text = std::get_if<std::string>(&item)) {
      if (text->size() > peer->agreed.peer_max_notification) {
        // Queued before the peer's limit was known (sendNotification refuses it afterwards).
        LOG_ERROR("notification of %zu bytes to peer '%s' dropped: the peer accepts at most %llu",
                  text->size(), peer->name.c_str(),
                  static_cast<unsigned long long>(peer->agreed.peer_max_notification));
      } else {
        control::encodeNotification(*text, peer->control->out());
      }
      peer->waiting.pop_front();
      continue;
    }
    auto t = std::get<std::shared_ptr<Transfer>>(item);
    if (t->kind != XferKind::kRecv && peer->announced >= settings_.max_inflight_per_peer) break;
    peer->waiting.pop_front();
    startTransfer(peer, t);
  }
  flushControl(peer);
}

Status EngineCore::checkPeerLimits(const Peer& peer, const Transfer& t) {
  // The limits the peer announced in the handshake: a request over them would be a malformed
  // frame there, so the transfer fails here instead.
  if (t.remote.size() > peer.agreed.peer_max_descriptors) {
    return Status(StatusCode::kResourceExhausted,
                  strfmt("the transfer has %zu descriptors; peer '%s' accepts at most %u (its "
                         "max_descriptors)",
                         t.remote.size(), peer.name.c_str(), peer.agreed.peer_max_descriptors));
  }
  if (t.notification && t.notification->size() > peer.agreed.peer_max_notification) {
    return Status(StatusCode::kInvalidArgument,
                  strfmt("the notification has %zu bytes; peer '%s' accepts at most %llu (its "
                         "max_notification_size)",
                         t.notification->size(), peer.name.c_str(),
                         static_cast<unsigned long long>(peer.agreed.peer_max_notification)));
  }
  return {};
}

void EngineCore::assignWireId(Peer* peer, const std::shared_ptr<Transfer>& t) {
  t->wire_id = next_wire_id_++;
  peer->initiated[t->wire_id] = t;
}

void EngineCore::startTransfer(Peer* peer, const std::shared_ptr<Transfer>& t) {
  if (const Status limits = checkPeerLimits(*peer, *t); !limits.isOk()) {
    endRun(t.get(), limits);
    return;
  }
  if (t->kind != XferKind::kRecv) {
    t->counted = true;
    ++peer->announced;
  }
  // Every id is assigned right before the frame that announces it is encoded (see
  // control/frames.h), except an inline WRITE from GPU memory, whose announcement waits for its
  // copy, and a direct WRITE whose announcement waits for its fences: each runs under an id the
  // peer never sees and takes a fresh one when announced.
  assignWireId(peer, t);
  std::vector<uint8_t>* out = peer->control->out();
  switch (t->kind) {
    case XferKind::kWrite: {
      if (const DirectKind direct = directKind(peer, *t); direct != DirectKind::kNone) {
        t->direct = true;
        // The target reads our GPU memory once our application's earlier work on it is done:
        // at once when it already is (a failed query is the polling's to report).
        if (direct == DirectKind::kDevice && !t->fences.empty()) {
          const Result<bool> passed = t->fences.ready();
          if (!passed.isOk() || !passed.value()) {
            t->stage = OpStage::kFencing;
            direct_fences_.push_back({peer->serial, OpRole::kOurs, t->wire_id});
            break;
          }
        }
        encodeDirectWrite(peer, t);
        break;
      }
      if (travelsInline(t->total, peer->announced)) {
        if (!t->local.anyDevice()) {
          encodeWriteRequest(peer, t.get(), /*inline_data=*/true, t->local.vector());
          break;
        }
        // The frame leaves once the bytes are in an inline slot (or through the channels when
        // every slot is busy).
        if (startInlineGather(peer, InlineCopy::Kind::kWriteGather, t->wire_id, t->local,
                              &t->fences)) {
          t->stage = OpStage::kGathering;
          break;
        }
      }
      encodeWriteRequest(peer, t.get(), /*inline_data=*/false, {});
      break;
    }
    case XferKind::kRead: {
      if (startGatedRead(peer, t)) break;
      control::ReadRequest m;
      m.xfer_id = t->wire_id;
      m.total = t->total;
      // Into GPU memory too, through an inline slot.
      m.accept_inline = travelsInline(t->total, peer->announced);
      m.direct = directKind(peer, *t) != DirectKind::kNone;
      t->direct = m.direct;
      m.descs = t->remote;
      control::encode(m, out);
      t->stage = OpStage::kAwaitingReadResponse;
      // The target's READ_RESPONSE comes within a hop (after its fences); our copy's end is
      // polled from then on (local_path.cc).
      if (m.direct) pollFor(directAnswerPoll(0));
      break;
    }
    case XferKind::kSend: {
      control::encode(control::SendRts{t->wire_id, t->tag, t->total}, out);
      t->stage = OpStage::kAwaitingSendCts;
      break;
    }
    case XferKind::kRecv: {
      t->stage = OpStage::kRecvPosted;
      auto it = peer->unexpected.find(t->tag);
      if (it != peer->unexpected.end() && !it->second.empty()) {
        const UnexpectedSend send = it->second.front();
        it->second.pop_front();
        if (it->second.empty()) peer->unexpected.erase(it);
        --peer->unexpected_count;
        matchSend(peer, t, send);
      } else {
        peer->posted_recvs[t->tag].push_back(t);
      }
      break;
    }
  }
}

control::WriteRequest EngineCore::writeRequestOf(const Transfer& t) {
  control::WriteRequest m;
  m.xfer_id = t.wire_id;
  m.total = t.total;
  m.has_notification = t.notification.has_value();
  if (m.has_notification) m.notification = *t.notification;
  m.descs = t.remote;
  return m;
}

void EngineCore::encodeWriteRequest(Peer* peer, Transfer* t, bool inline_data,
                                    std::span<const transport::IoSlice> bytes) {
  control::WriteRequest m = writeRequestOf(*t);
  m.inline_data = inline_data;
  std::vector<uint8_t>* out = peer->control->out();
  t->stage = OpStage::kAwaitingWriteDone;
  if (inline_data) {
    control::encode(m, bytes, out);
    t->data_done = true;
    return;
  }
  m.first_chunk = peer->out.next_chunk;
  m.spread = DataPath::spreadFor(*peer);
  m.status_follows = t->local.anyDevice();
  control::encode(m, {}, out);
  t->stream =
      dataPathOf(*peer).addStream(peer, peer->out, m.first_chunk, t->total, m.spread, &t->local,
                                  &t->fences, StreamOwner::kInitiatorWrite, t->wire_id);
}

void EngineCore::finishTransfer(Peer* peer, const std::shared_ptr<Transfer>& t,
                                const Status& status) {
  // The map may hold the last reference: keep the transfer alive until this function returns.
  const std::shared_ptr<Transfer> keep = t;  // NOLINT(performance-unnecessary-copy-initialization)
  peer->initiated.erase(t->wire_id);
  if (t->kind == XferKind::kRecv) {
    auto matched = peer->matched_sends.find(t->peer_send_id);
    if (matched != peer->matched_sends.end() && matched->second == t) {
      peer->matched_sends.erase(matched);
    }
  }
  if (t->counted) --peer->announced;
  t->stage = OpStage::kIdle;
  if (t->released()) return completeRelease(t.get());
  unpinRun(t.get());
  if (status.isOk() && t->direct) t->counters->directRun();
  // A READ's notification goes to the target once every byte is in our memory.
  if (t->kind == XferKind::kRead && status.isOk() && t->notification) {
    control::encodeNotification(*t->notification, peer->control->out());
  }
  completeRun(t.get(), status);
}

void EngineCore::maybeFinish(Peer* peer, const std::shared_ptr<Transfer>& t) {
  if (t->stage != OpStage::kReplied || !t->data_done) return;
  Status status = !t->local_status.isOk() ? t->local_status : t->remote_status;
  if (t->kind == XferKind::kRecv) {
    // The sender waits for our verdict on its bytes.
    if (status.isOk() && t->disposition != Disposition::kActive) {
      status = Status(StatusCode::kCanceled, "the send or the recv was released");
    }
    control::encodeSendDone({t->peer_send_id, status.code(), status.message()},
                            peer->control->out());
  }
  finishTransfer(peer, t, status);
}

void EngineCore::maybeFinishTargetWrite(Peer* peer, TargetOp* op) {
  if (op->stage != OpStage::kReplied || !op->data_done) return;
  const Status st = op->disposition == Disposition::kPeerCanceled
                        ? Status(StatusCode::kCanceled, "the initiator released the transfer")
                        : op->status;
  // The notification is queued before WRITE_DONE leaves: the initiator's completion implies the
  // target can already see it.
  if (st.isOk() && op->has_notification &&
      !deliverNotification(peer, std::move(op->notification))) {
    return;  // the peer overran its notification bound and was failed
  }
  control::encodeWriteDone({op->xfer_id, st.code(), st.message()}, peer->control->out());
  retireTargetOp(peer, op->xfer_id);
}

void EngineCore::resolveTargetRequest(Peer* peer, std::span<const control::WireDesc> descs,
                                      uint64_t total, TargetOp* op, bool fence) {
  if (peer->served_descriptors + descs.size() > kMaxServedDescriptors) {
    op->status = Status(
        StatusCode::kResourceExhausted,
        strfmt("this engine holds %zu descriptors of peer '%s' in operations it "
               "serves; %zu more exceed the bound of %zu",
               peer->served_descriptors, peer->name.c_str(), descs.size(), kMaxServedDescriptors));
  } else {
    op->status = registry_.resolveRemoteRequest(descs, total, &op->segments, &op->pinned);
  }
  if (op->status.isOk() && fence && op->segments.anyDevice()) {
    // Every copy of this request into or out of our GPU memory comes after the work our
    // application queued before the request arrived (see gpu::Fences).
    op->status = op->fences.record(op->segments.distinctDevices());
    if (!op->status.isOk()) {
      registry_.unpin(op->pinned);
      op->pinned.clear();
    }
  }
  if (op->status.isOk()) return;
  uint64_t suppressed = 0;
  if (peer->refusal_log.allow(Clock::now(), &suppressed)) {
    LOG_WARN("peer '%s': refusing %s %llu: %s%s", peer->name.c_str(), xferKindName(op->kind),
             static_cast<unsigned long long>(op->xfer_id), op->status.message().c_str(),
             suppressed == 0 ? ""
                             : strfmt(" (%llu more refusals not logged)",
                                      static_cast<unsigned long long>(suppressed))
                                   .c_str());
  }
}

void EngineCore::addTargetOp(Peer* peer, std::unique_ptr<TargetOp> op) {
  peer->served_descriptors += op->segments.count();
  const uint64_t id = op->xfer_id;
  peer->target_ops.emplace(id, std::move(op));
}

void EngineCore::retireTargetOp(Peer* peer, uint64_t id) {
  auto it = peer->target_ops.find(id);
  if (it == peer->target_ops.end()) return;
  registry_.unpin(it->second->pinned);
  peer->served_descriptors -= it->second->segments.count();
  peer->target_ops.erase(it);
}

void EngineCore::handleCancel(Command& cmd) {
  std::shared_ptr<Transfer>& t = cmd.transfer;
  if (t->state.load() == RunState::kInFlight && t->stage == OpStage::kLocalCopy) {
    // A transfer to this engine itself (its peer may be gone already): released at once if its
    // copies had not started, else once they are done.
    t->disposition = Disposition::kReleased;
    t->release_waiter = cmd.waiter;
    releaseLocalRun(*t, Status(StatusCode::kCanceled, "the transfer was released"));
    return;
  }
  if (t->state.load() == RunState::kInFlight && t->stage == OpStage::kRetiring) {
    // Its connection failed while copies of it could still touch its memory: released once
    // they are done (finishRetiring).
    t->disposition = Disposition::kReleased;
    t->release_waiter = cmd.waiter;
    return;
  }
  Peer* peer = peerByName(t->peer_name);
  if (peer == nullptr || t->state.load() != RunState::kInFlight || t->stage == OpStage::kIdle) {
    cmd.waiter->complete(Status());
    return;
  }
  if (t->stage == OpStage::kLocalMatch) {
    // A send or recv to this engine itself that never met its counterpart.
    dropLocalTwoSided(peer, *t);
    endRun(t.get(), Status(StatusCode::kCanceled, "released before it was matched"));
    cmd.waiter->complete(Status());
    return;
  }
  if (t->stage == OpStage::kFencing) {
    // A direct WRITE not announced yet (its fence entry is dropped when next polled).
    peer->initiated.erase(t->wire_id);
    if (t->counted) {
      --peer->announced;
      t->counted = false;
    }
    endRun(t.get(), Status(StatusCode::kCanceled, "released before it started"));
    cmd.waiter->complete(Status());
    return;
  }
  if (t->stage == OpStage::kQueued) {
    // Not announced yet: drop it from the queue.
    auto it = std::find_if(peer->waiting.begin(), peer->waiting.end(), [&](const WaitingItem& w) {
      const auto* queued = std::get_if<std::shared_ptr<Transfer>>(&w);
      return queued != nullptr && queued->get() == t.get();
    });
    if (it != peer->waiting.end()) peer->waiting.erase(it);
    endRun(t.get(), Status(StatusCode::kCanceled, "released before it started"));
    cmd.waiter->complete(Status());
    return;
  }
  t->disposition = Disposition::kReleased;
  t->release_waiter = cmd.waiter;
  // An inline copy still reads or writes local memory: released when it finished (a WRITE
  // waiting for its copy was never announced, so the target hears nothing of it).
  if (t->stage == OpStage::kGathering || t->stage == OpStage::kScattering) return;
  if (t->stream != nullptr) t->stream->detached = true;
  switch (t->kind) {
    case XferKind::kWrite:
    case XferKind::kSend:
      // Lets the target discard what has not landed yet and skip the notification.
      control::encode(control::Cancel{t->wire_id}, peer->control->out());
      flushControl(peer);
      // A direct WRITE's source is read by the target itself: released once it answered (or
      // the connection ended), not before.
      if (t->direct) return;
      break;
    case XferKind::kRecv:
      if (t->stage == OpStage::kRecvPosted) {
        // Never matched: nothing will arrive for it.
        auto posted = peer->posted_recvs.find(t->tag);
        if (posted != peer->posted_recvs.end()) {
          auto& queue = posted->second;
          queue.erase(std::remove(queue.begin(), queue.end(), t), queue.end());
          if (queue.empty()) peer->posted_recvs.erase(posted);
        }
        finishTransfer(peer, t, Status(StatusCode::kCanceled, "released"));
        return;
      }
      break;
    case XferKind::kRead:
      break;  // the data still arrives and is discarded (the stream is detached or will be)
  }
  // No posted chunk reads or writes local memory any more (later ones use null data): the
  // release is complete even though the run still waits for the peer's answer.
  if (t->stream == nullptr || t->stream->in_transport == 0) completeRelease(t.get());
}

void EngineCore::endRun(Transfer* t, const Status& status) {
  unpinRun(t);
  t->stage = OpStage::kIdle;
  completeRun(t, status);
}

void EngineCore::endWithConnection(Transfer* t, const Status& status) {
  t->stage = OpStage::kIdle;
  if (t->released()) {
    completeRelease(t);
  } else {
    unpinRun(t);
    completeRun(t, status);
  }
}

void EngineCore::unpinRun(Transfer* t) {
  if (!t->holds_pins) return;
  t->holds_pins = false;
  registry_.unpin(t->regions);
}

void EngineCore::completeRelease(Transfer* t) {
  unpinRun(t);
  if (t->release_waiter) t->release_waiter->complete(Status());
}

// ---------------------------------------------------------------------------------------------
// Frame dispatch
// ---------------------------------------------------------------------------------------------

void EngineCore::dispatchFrame(Peer* peer, const control::FrameHeader& header,
                               std::string_view payload) {
  LOG_TRACE("peer '%s': %s frame of %zu bytes", peer->name.c_str(),
            control::frameTypeName(header.type), payload.size());
  switch (static_cast<control::FrameType>(header.type)) {
    case control::FrameType::kPing:
      return;
    case control::FrameType::kChannelSetup:
      onChannelSetup(peer, payload);
      return;
    case control::FrameType::kWriteRequest:
      onWriteRequest(peer, payload);
      return;
    case control::FrameType::kWriteDone:
      onWriteDone(peer, payload);
      return;
    case control::FrameType::kReadRequest:
      onReadRequest(peer, payload);
      return;
    case control::FrameType::kReadResponse:
      onReadResponse(peer, payload);
      return;
    case control::FrameType::kNotification:
      onNotification(peer, payload);
      return;
    case control::FrameType::kCancel:
      onCancel(peer, payload);
      return;
    case control::FrameType::kSendRts:
      onSendRts(peer, payload);
      return;
    case control::FrameType::kSendCts:
      onSendCts(peer, payload);
      return;
    case control::FrameType::kSendData:
      onSendData(peer, payload);
      return;
    case control::FrameType::kSendDone:
      onSendDone(peer, payload);
      return;
    case control::FrameType::kDataStatus:
      onDataStatus(peer, payload);
      return;
    case control::FrameType::kReadDone:
      onReadDone(peer, payload);
      return;
    case control::FrameType::kIpcClose:
      onIpcClose(peer, payload);
      return;
    case control::FrameType::kIpcClosed:
      onIpcClosed(peer, payload);
      return;
    case control::FrameType::kWriteQueued:
      onWriteQueued(peer, payload);
      return;
    case control::FrameType::kGoodbye: {
      std::string_view reason;
      (void)control::decodeGoodbye(payload, &reason);
      failPeer(peer,
               Status(StatusCode::kRemoteDisconnected,
                      "peer closed the connection (" + std::string(reason) + ")"),
               /*orderly=*/true);
      return;
    }
    case control::FrameType::kHello:
    case control::FrameType::kHelloAck:
    case control::FrameType::kAuthChallenge:
    case control::FrameType::kAuthProof:
      break;  // handshake frames: never on an established connection
  }
  protocolError(peer, Status(StatusCode::kProtocolError,
                             strfmt("unexpected frame type %u (%s) on an established connection",
                                    header.type, control::frameTypeName(header.type))));
}

// ---------------------------------------------------------------------------------------------
// WRITE
// ---------------------------------------------------------------------------------------------

bool EngineCore::acceptTargetRequest(Peer* peer, control::FrameType frame, uint64_t id,
                                     uint64_t total) {
  if (!acceptNewPeerId(peer, frame, id)) return false;
  if (total != 0 && peer->target_ops.size() < kMaxTargetOpsPerPeer) return true;
  protocolError(peer,
                Status(StatusCode::kProtocolError,
                       strfmt("%s %llu is %s", control::frameTypeName(static_cast<uint8_t>(frame)),
                              static_cast<unsigned long long>(id),
                              total == 0 ? "empty" : "over the limit of operations served")));
  return false;
}

void EngineCore::onWriteRequest(Peer* peer, std::string_view payload) {
  control::WriteRequest m;
  Status st = control::decode(payload, decodeLimits(), &m);
  if (!st.isOk()) return protocolError(peer, st);
  if (!acceptTargetRequest(peer, control::FrameType::kWriteRequest, m.xfer_id, m.total)) return;
  auto op = std::make_unique<TargetOp>();
  op->xfer_id = m.xfer_id;
  op->kind = XferKind::kWrite;
  if (m.direct && !directAgreed(peer, control::FrameType::kWriteRequest)) return;
  resolveTargetRequest(peer, m.decoded, m.total, op.get());
  op->has_notification = m.has_notification;
  op->notification.assign(m.notification);
  if (m.direct) {
    return serveDirectWrite(peer, std::move(op), m.decoded_pieces, m.decoded_handles,
                            m.want_signal);
  }

  if (m.inline_data) {
    if (op->status.isOk() && op->segments.anyDevice()) {
      if (peer->inline_free != 0 ||
          peer->held_inline_bytes + m.data.size() <= kMaxHeldInlineBytes) {
        // GPU memory: WRITE_DONE (and the notification) once the copies finished.
        op->stage = OpStage::kScattering;
        addTargetOp(peer, std::move(op));
        startInlineScatter(peer, InlineCopy::Kind::kWriteScatter, m.xfer_id, m.data);
        return;
      }
      registry_.unpin(op->pinned);
      op->pinned.clear();
      op->status = Status(StatusCode::kResourceExhausted,
                          strfmt("every inline slot is busy and %zu bytes of the peer's inline "
                                 "WRITEs already wait for one (the bound is %zu)",
                                 peer->held_inline_bytes, kMaxHeldInlineBytes));
    }
    if (op->status.isOk()) {
      op->segments.scatter(0, m.data.data(), m.total);
      if (op->has_notification && !deliverNotification(peer, std::move(op->notification))) {
        registry_.unpin(op->pinned);
        return;  // the peer overran its notification bound and was failed
      }
    }
    registry_.unpin(op->pinned);
    control::encodeWriteDone({m.xfer_id, op->status.code(), op->status.message()},
                             peer->control->out());
    return;
  }
  if (!announcedInStep(peer, "WRITE", m.xfer_id, m.first_chunk)) {
    registry_.unpin(op->pinned);
    return;
  }
  // An initiator staging from GPU memory sends its verdict on the bytes when it has read them
  // all. A refused WRITE still receives (and discards) its data: the sender has already sent it.
  op->stage = m.status_follows ? OpStage::kAwaitingDataStatus : OpStage::kReplied;
  op->stream = dataPathOf(*peer).addStream(peer, peer->in, m.first_chunk, m.total, m.spread,
                                           op->status.isOk() ? &op->segments : nullptr, &op->fences,
                                           StreamOwner::kTargetWrite, m.xfer_id);
  addTargetOp(peer, std::move(op));
}

void EngineCore::onWriteDone(Peer* peer, std::string_view payload) {
  control::Completion m;
  Status st = control::decodeCompletion(payload, &m);
  if (!st.isOk()) return protocolError(peer, st);
  if (landedWriteDone(peer, m)) return;
  std::shared_ptr<Transfer> t =
      ourOperation(peer, control::FrameType::kWriteDone, m.xfer_id, XferKind::kWrite);
  if (t == nullptr) return;
  // A direct WRITE the target did not read (it cannot map or read our memory, or not now) runs
  // again over the channels; nothing of it was written.
  const bool unread =
      m.code == StatusCode::kNotSupported || m.code == StatusCode::kResourceExhausted;
  if (unread && t->direct && !t->released()) {
    return retryOverChannels(peer, t, Status(m.code, m.message), Refusal::kByPeer);
  }
  if (t->direct) {
    directProgress(peer);
    // The caller's next transfer (they come back to back) is taken without a wake-up, as after
    // a copy of our own (local_path.cc).
    pollFor(kShortPoll);
  }
  t->stage = OpStage::kReplied;
  if (m.code != StatusCode::kOk) t->remote_status = refused(*peer, "WRITE", m.code, m.message);
  maybeFinish(peer, t);
}

// ---------------------------------------------------------------------------------------------
// READ
// ---------------------------------------------------------------------------------------------

void EngineCore::onReadRequest(Peer* peer, std::string_view payload) {
  control::ReadRequest m;
  Status st = control::decode(payload, decodeLimits(), &m);
  if (!st.isOk()) return protocolError(peer, st);
  if (!acceptTargetRequest(peer, control::FrameType::kReadRequest, m.xfer_id, m.total)) return;
  auto op = std::make_unique<TargetOp>();
  op->xfer_id = m.xfer_id;
  op->kind = XferKind::kRead;
  if (m.direct && !directAgreed(peer, control::FrameType::kReadRequest)) return;
  // A gated READ needs no fence: its gate is written on the default stream itself, after all
  // that a fence recorded now would cover (serveGatedRead, in this same call).
  resolveTargetRequest(peer, m.decoded, m.total, op.get(), /*fence=*/!(m.direct && m.gated));
  if (m.direct) return serveDirectRead(peer, std::move(op), m);
  std::vector<uint8_t>* out = peer->control->out();
  control::ReadResponse resp;
  resp.xfer_id = m.xfer_id;
  if (!op->status.isOk()) {
    resp.code = op->status.code();
    resp.message = op->status.message();
    control::encode(resp, {}, out);
    return;
  }
  if (m.total <= settings_.inline_threshold && m.accept_inline) {
    if (!op->segments.anyDevice()) {
      resp.inline_data = true;
      control::encode(resp, op->segments.vector(), out);
      registry_.unpin(op->pinned);
      return;
    }
    // GPU memory: READ_RESPONSE once the bytes are in an inline slot (or through the channels
    // when every slot is busy).
    if (startInlineGather(peer, InlineCopy::Kind::kReadGather, m.xfer_id, op->segments,
                          &op->fences)) {
      op->stage = OpStage::kGathering;
      addTargetOp(peer, std::move(op));
      return;
    }
  }
  resp.first_chunk = peer->out.next_chunk;
  resp.spread = DataPath::spreadFor(*peer);
  resp.status_follows = op->segments.anyDevice();
  control::encode(resp, {}, out);
  op->stage = OpStage::kReplied;
  op->stream =
      dataPathOf(*peer).addStream(peer, peer->out, resp.first_chunk, m.total, resp.spread,
                                  &op->segments, &op->fences, StreamOwner::kTargetRead, m.xfer_id);
  addTargetOp(peer, std::move(op));
}

void EngineCore::onReadResponse(Peer* peer, std::string_view payload) {
  control::ReadResponse m;
  Status st = control::decode(payload, decodeLimits(), &m);
  if (!st.isOk()) return protocolError(peer, st);
  if (peer->gated_reads.erase(m.xfer_id) != 0) return onGatedReadAnswer(peer, m);
  std::shared_ptr<Transfer> t =
      ourOperation(peer, control::FrameType::kReadResponse, m.xfer_id, XferKind::kRead);
  if (t == nullptr) return;
  if (m.code == StatusCode::kNotSupported && t->direct && !t->released()) {
    return retryOverChannels(peer, t, Status(m.code, m.message), Refusal::kByPeer);
  }
  if (m.direct) return startDirectRead(peer, t, m.decoded_pieces, m.decoded_handles);
  t->direct = false;  // the target may answer a direct READ_REQUEST over the channels
  if (m.code != StatusCode::kOk) {
    t->stage = OpStage::kReplied;
    t->data_done = true;
    t->remote_status = refused(*peer, "READ", m.code, m.message);
    return maybeFinish(peer, t);
  }
  if (m.inline_data) {
    if (m.data.size() != t->total) {
      return protocolError(peer, Status(StatusCode::kProtocolError,
                                        "READ_RESPONSE carries inline data the READ cannot take"));
    }
    if (!t->released() && t->local.anyDevice()) {
      t->stage = OpStage::kScattering;  // completes once the bytes are in GPU memory
      startInlineScatter(peer, InlineCopy::Kind::kReadScatter, t->wire_id, m.data);
      return;
    }
    if (!t->released()) t->local.scatter(0, m.data.data(), t->total);
    t->stage = OpStage::kReplied;
    t->data_done = true;
    return maybeFinish(peer, t);
  }
  if (!announcedInStep(peer, "READ", m.xfer_id, m.first_chunk)) return;
  // A target staging from GPU memory sends its verdict on the bytes when it has read them all.
  t->stage = m.status_follows ? OpStage::kAwaitingDataStatus : OpStage::kReplied;
  t->stream = dataPathOf(*peer).addStream(peer, peer->in, m.first_chunk, t->total, m.spread,
                                          t->released() ? nullptr : &t->local, &t->fences,
                                          StreamOwner::kInitiatorRead, t->wire_id);
  t->stream->detached = t->released();
}

// ---------------------------------------------------------------------------------------------
// Notifications and cancel
// ---------------------------------------------------------------------------------------------

bool EngineCore::deliverNotification(Peer* peer, std::string message) {
  {
    std::lock_guard<std::mutex> lock(notif_mu_);
    PendingNotifications& pending = pending_notifications_[peer->serial];
    if (pending.count < kMaxPendingNotifications &&
        pending.bytes + message.size() <= kMaxPendingNotificationBytes) {
      ++pending.count;
      pending.bytes += message.size();
      notifications_.push_back(Notification{peer->name, std::move(message)});
      return true;
    }
  }
  failPeer(peer, Status(StatusCode::kResourceExhausted,
                        strfmt("peer '%s' sent more notifications than the application has "
                               "taken: at most %zu (%zu bytes) may wait per peer",
                               peer->name.c_str(), kMaxPendingNotifications,
                               kMaxPendingNotificationBytes)));
  return false;
}

void EngineCore::onNotification(Peer* peer, std::string_view payload) {
  std::string_view message;
  Status st = control::decodeNotification(payload, decodeLimits(), &message);
  if (!st.isOk()) return protocolError(peer, st);
  (void)deliverNotification(peer, std::string(message));
}

void EngineCore::onCancel(Peer* peer, std::string_view payload) {
  control::Cancel m;
  Status st = control::decode(payload, &m);
  if (!st.isOk()) return protocolError(peer, st);
  auto refuse = [&](const char* why) {
    protocolError(peer, Status(StatusCode::kProtocolError,
                               strfmt("CANCEL of %llu: %s",
                                      static_cast<unsigned long long>(m.xfer_id), why)));
  };
  if (m.xfer_id > peer->last_peer_id) return refuse("the peer never announced that id");
  // A WRITE we are receiving: stop writing the destination; WRITE_DONE will say CANCELED.
  auto op = peer->target_ops.find(m.xfer_id);
  if (op != peer->target_ops.end()) {
    TargetOp& target = *op->second;
    if (!peerMaySend(OpRole::kPeers, target.kind, target.stage, control::FrameType::kCancel)) {
      return refuse("only a WRITE the target has not answered can be canceled");
    }
    target.disposition = Disposition::kPeerCanceled;
    if (target.stream != nullptr) target.stream->detached = true;
    if (target.stage == OpStage::kLocalCopy) {
      // A direct WRITE we read: skipped if its copy has not started (WRITE_DONE says CANCELED).
      for (size_t i = 0; i < local_runs_.size(); ++i) {
        const LocalRun& run = *local_runs_[i];
        if (run.owner == LocalRun::Owner::kPeerWrite && run.peer_serial == peer->serial &&
            !run.peer_lost && run.wire_id == m.xfer_id) {
          abandonLocalRun(i, Status(StatusCode::kCanceled, "the initiator released the transfer"));
          break;
        }
      }
    }
    return;
  }
  // A send that no recv matched yet: forget it and tell the sender.
  for (auto it = peer->unexpected.begin(); it != peer->unexpected.end(); ++it) {
    auto& queue = it->second;
    auto pos = std::find_if(queue.begin(), queue.end(),
                            [&](const UnexpectedSend& s) { return s.send_id == m.xfer_id; });
    if (pos != queue.end()) {
      queue.erase(pos);
      if (queue.empty()) peer->unexpected.erase(it);
      --peer->unexpected_count;
      control::encode(control::SendCts{m.xfer_id, 0, true, StatusCode::kCanceled, "send released"},
                      peer->control->out());
      return;
    }
  }
  // A send matched by one of our recvs: the recv fails with CANCELED.
  auto matched = peer->matched_sends.find(m.xfer_id);
  if (matched != peer->matched_sends.end()) {
    Transfer& recv = *matched->second;
    if (!peerMaySend(OpRole::kOurs, recv.kind, recv.stage, control::FrameType::kCancel)) {
      return refuse("the recv it matched is not receiving");
    }
    if (recv.disposition == Disposition::kActive) recv.disposition = Disposition::kPeerCanceled;
    if (recv.stream != nullptr) recv.stream->detached = true;
    return;
  }
  // The operation ended while the CANCEL was on its way (the answer crossed it): nothing to do.
}

// ---------------------------------------------------------------------------------------------
// Two-sided send/recv (rendezvous: RTS -> CTS -> DATA -> DONE)
// ---------------------------------------------------------------------------------------------

void EngineCore::matchSend(Peer* peer, const std::shared_ptr<Transfer>& recv,
                           const UnexpectedSend& send) {
  std::vector<uint8_t>* out = peer->control->out();
  if (send.size != recv->total) {
    const std::string msg = strfmt(
        "send of %llu bytes does not match recv of %llu bytes (tag %llu)",
        static_cast<unsigned long long>(send.size), static_cast<unsigned long long>(recv->total),
        static_cast<unsigned long long>(recv->tag));
    control::encode(
        control::SendCts{send.send_id, recv->wire_id, true, StatusCode::kLengthMismatch, msg}, out);
    finishTransfer(peer, recv, Status(StatusCode::kLengthMismatch, msg));
    return;
  }
  recv->peer_send_id = send.send_id;
  recv->stage = OpStage::kAwaitingSendData;
  peer->matched_sends[send.send_id] = recv;
  // Inline bytes into a GPU receive buffer go through an inline slot (inline_copy.cc).
  control::encode(control::SendCts{send.send_id, recv->wire_id, true, StatusCode::kOk, ""}, out);
}

void EngineCore::onSendRts(Peer* peer, std::string_view payload) {
  control::SendRts m;
  Status st = control::decode(payload, &m);
  if (!st.isOk()) return protocolError(peer, st);
  if (!acceptNewPeerId(peer, control::FrameType::kSendRts, m.send_id)) return;
  if (m.size == 0) {
    return protocolError(peer, Status(StatusCode::kProtocolError, "SEND_RTS of zero bytes"));
  }
  auto posted = peer->posted_recvs.find(m.tag);
  if (posted != peer->posted_recvs.end() && !posted->second.empty()) {
    std::shared_ptr<Transfer> recv = posted->second.front();
    posted->second.pop_front();
    if (posted->second.empty()) peer->posted_recvs.erase(posted);
    matchSend(peer, recv, UnexpectedSend{m.send_id, m.size});
    return;
  }
  if (peer->unexpected_count >= kMaxUnexpectedSends) {
    control::encode(control::SendCts{m.send_id, 0, true, StatusCode::kResourceExhausted,
                                     "receiver holds too many unmatched sends"},
                    peer->control->out());
    return;
  }
  peer->unexpected[m.tag].push_back(UnexpectedSend{m.send_id, m.size});
  ++peer->unexpected_count;
}

void EngineCore::onSendCts(Peer* peer, std::string_view payload) {
  control::SendCts m;
  Status st = control::decode(payload, &m);
  if (!st.isOk()) return protocolError(peer, st);
  std::shared_ptr<Transfer> t =
      ourOperation(peer, control::FrameType::kSendCts, m.send_id, XferKind::kSend);
  if (t == nullptr) return;
  if (m.code != StatusCode::kOk) {
    t->stage = OpStage::kReplied;
    t->data_done = true;
    t->remote_status = refused(*peer, "send", m.code, m.message);
    return maybeFinish(peer, t);
  }
  control::SendData data;
  data.send_id = t->wire_id;
  data.recv_id = m.recv_id;
  std::vector<uint8_t>* out = peer->control->out();
  if (t->released()) {
    data.code = StatusCode::kCanceled;
    control::encode(data, {}, out);
    return finishTransfer(peer, t, Status(StatusCode::kCanceled, "released"));
  }
  if (m.accept_inline && travelsInline(t->total, peer->announced)) {
    if (!t->local.anyDevice()) {
      data.inline_data = true;
      control::encode(data, t->local.vector(), out);
      t->stage = OpStage::kAwaitingSendDone;
      t->data_done = true;
      return;
    }
    // SEND_DATA leaves once the bytes are in an inline slot (or through the channels when every
    // slot is busy).
    if (startInlineGather(peer, InlineCopy::Kind::kSendGather, t->wire_id, t->local, &t->fences,
                          m.recv_id)) {
      t->stage = OpStage::kGathering;
      return;
    }
  }
  data.first_chunk = peer->out.next_chunk;
  data.spread = DataPath::spreadFor(*peer);
  data.status_follows = t->local.anyDevice();
  control::encode(data, {}, out);
  t->stage = OpStage::kAwaitingSendDone;
  t->stream = dataPathOf(*peer).addStream(peer, peer->out, data.first_chunk, t->total, data.spread,
                                          &t->local, &t->fences, StreamOwner::kSend, t->wire_id);
}

void EngineCore::onSendData(Peer* peer, std::string_view payload) {
  control::SendData m;
  Status st = control::decode(payload, decodeLimits(), &m);
  if (!st.isOk()) return protocolError(peer, st);
  std::shared_ptr<Transfer> t =
      ourOperation(peer, control::FrameType::kSendData, m.recv_id, XferKind::kRecv);
  if (t == nullptr) return;
  if (t->peer_send_id != m.send_id) {
    return protocolError(peer, Status(StatusCode::kProtocolError,
                                      strfmt("SEND_DATA for recv %llu names send %llu; it matched "
                                             "send %llu",
                                             static_cast<unsigned long long>(m.recv_id),
                                             static_cast<unsigned long long>(m.send_id),
                                             static_cast<unsigned long long>(t->peer_send_id))));
  }
  if (m.code != StatusCode::kOk) {
    // kCanceled: released; otherwise the sender's copy out of its GPU memory failed.
    return finishTransfer(
        peer, t,
        refused(*peer, "send", m.code,
                m.code == StatusCode::kCanceled ? "the sender released it"
                                                : "the sender could not read its buffer"));
  }
  const bool keep = t->disposition == Disposition::kActive;
  if (m.inline_data) {
    if (m.data.size() != t->total) {
      return protocolError(peer, Status(StatusCode::kProtocolError,
                                        "SEND_DATA carries inline data the recv cannot take"));
    }
    if (keep && t->local.anyDevice()) {
      t->stage = OpStage::kScattering;  // SEND_DONE once the bytes are in GPU memory
      startInlineScatter(peer, InlineCopy::Kind::kRecvScatter, t->wire_id, m.data);
      return;
    }
    if (keep) t->local.scatter(0, m.data.data(), t->total);
    t->stage = OpStage::kReplied;
    t->data_done = true;
    return maybeFinish(peer, t);
  }
  if (!announcedInStep(peer, "send", m.send_id, m.first_chunk)) return;
  t->stage = m.status_follows ? OpStage::kAwaitingDataStatus : OpStage::kReplied;
  t->stream = dataPathOf(*peer).addStream(peer, peer->in, m.first_chunk, t->total, m.spread,
                                          t->released() ? nullptr : &t->local, &t->fences,
                                          StreamOwner::kRecv, t->wire_id);
  t->stream->detached = !keep;
}

void EngineCore::onSendDone(Peer* peer, std::string_view payload) {
  control::Completion m;
  Status st = control::decodeCompletion(payload, &m);
  if (!st.isOk()) return protocolError(peer, st);
  std::shared_ptr<Transfer> t =
      ourOperation(peer, control::FrameType::kSendDone, m.xfer_id, XferKind::kSend);
  if (t == nullptr) return;
  t->stage = OpStage::kReplied;
  if (m.code != StatusCode::kOk) t->remote_status = refused(*peer, "send", m.code, m.message);
  maybeFinish(peer, t);
}

void EngineCore::onDataStatus(Peer* peer, std::string_view payload) {
  control::Completion m;
  Status st = control::decodeDataStatus(payload, &m);
  if (!st.isOk()) return protocolError(peer, st);
  const Status verdict =
      m.code == StatusCode::kOk ? Status() : refused(*peer, "transfer's data", m.code, m.message);
  if (m.id_space == control::IdSpace::kReceiver) {
    // The target of our READ staged what it sent us.
    std::shared_ptr<Transfer> t =
        ourOperation(peer, control::FrameType::kDataStatus, m.xfer_id, XferKind::kRead);
    if (t == nullptr) return;
    t->stage = OpStage::kReplied;
    if (!verdict.isOk()) t->remote_status = verdict;
    return maybeFinish(peer, t);
  }
  // The peer's own WRITE into our memory, or its send matched by our recv.
  auto op = peer->target_ops.find(m.xfer_id);
  if (op != peer->target_ops.end() &&
      peerMaySend(OpRole::kPeers, op->second->kind, op->second->stage,
                  control::FrameType::kDataStatus)) {
    TargetOp& target = *op->second;
    if (!verdict.isOk() && target.status.isOk()) target.status = verdict;
    target.stage = OpStage::kReplied;
    return maybeFinishTargetWrite(peer, &target);
  }
  auto matched = peer->matched_sends.find(m.xfer_id);
  if (op == peer->target_ops.end() && matched != peer->matched_sends.end() &&
      peerMaySend(OpRole::kOurs, XferKind::kRecv, matched->second->stage,
                  control::FrameType::kDataStatus)) {
    std::shared_ptr<Transfer> recv = matched->second;
    recv->stage = OpStage::kReplied;
    if (!verdict.isOk()) recv->remote_status = verdict;
    return maybeFinish(peer, recv);
  }
  protocolError(peer, Status(StatusCode::kProtocolError,
                             strfmt("DATA_STATUS out of turn: none of the peer's operations %llu "
                                    "awaits one",
                                    static_cast<unsigned long long>(m.xfer_id))));
}

// ---------------------------------------------------------------------------------------------
// What the data path reports
// ---------------------------------------------------------------------------------------------

void EngineCore::onStreamStaged(Peer* peer, Stream* stream) {
  // Our WRITE's or send's stream carries our id; a READ we serve carries the initiator's.
  const control::IdSpace space = stream->owner == StreamOwner::kTargetRead
                                     ? control::IdSpace::kReceiver
                                     : control::IdSpace::kSender;
  control::encodeDataStatus(
      {stream->owner_id, stream->error.code(), stream->error.message(), space},
      peer->control->out());
}

void EngineCore::onDataPathFailed(Peer* peer, const Status& why) {
  failPeer(peer, why);
}

void EngineCore::onStreamReleased(Peer* peer, Stream* stream) {
  // A released transfer waits until none of its chunks can touch its memory any more.
  switch (stream->owner) {
    case StreamOwner::kInitiatorWrite:
    case StreamOwner::kInitiatorRead:
    case StreamOwner::kSend:
    case StreamOwner::kRecv: {
      auto it = peer->initiated.find(stream->owner_id);
      if (it != peer->initiated.end() && it->second->released()) {
        completeRelease(it->second.get());
      }
      break;
    }
    case StreamOwner::kTargetWrite:
    case StreamOwner::kTargetRead:
      break;
  }
}

void EngineCore::onStreamDone(Peer* peer, Stream* stream) {
  switch (stream->owner) {
    case StreamOwner::kInitiatorWrite:
    case StreamOwner::kSend:
    case StreamOwner::kInitiatorRead:
    case StreamOwner::kRecv: {
      auto it = peer->initiated.find(stream->owner_id);
      if (it == peer->initiated.end()) return;
      std::shared_ptr<Transfer> t = it->second;
      t->stream = nullptr;
      t->data_done = true;
      if (!stream->error.isOk() && t->local_status.isOk()) t->local_status = stream->error;
      maybeFinish(peer, t);
      return;
    }
    case StreamOwner::kTargetWrite: {
      auto it = peer->target_ops.find(stream->owner_id);
      if (it == peer->target_ops.end()) return;
      TargetOp& op = *it->second;
      op.stream = nullptr;
      op.data_done = true;
      if (!stream->error.isOk() && op.status.isOk()) op.status = stream->error;
      maybeFinishTargetWrite(peer, it->second.get());
      return;
    }
    case StreamOwner::kTargetRead:
      retireTargetOp(peer, stream->owner_id);
      return;
  }
}

}  // namespace tcpx::engine
