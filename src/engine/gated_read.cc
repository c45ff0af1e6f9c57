// Gated READs: a same-host READ of the peer's GPU memory whose copy is queued before the target
// answers.
//
// A direct READ (direct_path.cc) takes two hops before its copy starts: the request, then the
// target's answer once its fences passed, after which the initiator queues the copy. When the
// initiator has the target's allocation mapped already (an earlier direct READ of it), it knows
// where the bytes are, and only the target knows when they may be read. So the initiator sends
// the request with a gate (READ_REQUEST, gated), a word of its own GPU memory (gpu::ReadGates),
// and queues its copy behind the gate while the request travels (the calls overlap its hop; made
// first, they delayed it and the READ was slower than without a gate). The target checks the
// request as any other, checks that the ranges the initiator reads are exactly the source's and lie
// in the allocation it mapped, and then writes the gate's value to the word on the default stream
// of the source's GPU, behind the work its application queued there before; it answers
// READ_RESPONSE (direct) at once. The copy starts as soon as the word is
// written, with no answer's hop and no call of ours in between; READ_DONE follows as for any direct
// READ.
//
// Invariants:
// - The copy waits on a queue of gated copies of its GPU, with at most one gated READ per GPU
//   at a time, and the run stays outside local_runs_' order: nothing else of ours waits behind a
//   gate. A READ is gated only when it is the peer's only transfer in flight.
// - A queue that holds a gate never waits for its stream on a failure (OnFailure::kLeave), and
//   is destroyed only once its gate is open: only the progress thread opens our gates.
// - A gated READ completes only once its copy landed and the target's answer came (or the
//   peer is gone): a target that refused holds nothing and must not receive READ_DONE. The
//   target may write the gate before our wait is queued: the wait then passes at once.
// - A gate the target will not open (it refused), or may never open (the peer failed, or the
//   application released the READ), is opened here: the copy then reads bytes the target did not
//   vouch for into memory the READ is giving up, and the READ ends with the failure. Such a
//   slot is burned (gpu::ReadGates), never handed out again.
// - The target's write runs on the legacy default stream, which waits for no stream of the
//   engine (all are non-blocking), so never for a gate: two engines gating READs of each other
//   cannot wait for each other's writes. The peer's word stays mapped until the write ran.
#include <algorithm>

#include "common/log.h"
#include "common/strings.h"
#include "engine/engine_core.h"

namespace tcpx::engine {

namespace {

// Whether `a` and `b` name the same bytes in the same order (however each cuts them).
bool sameRanges(std::span<const control::DirectPiece> a, std::span<const control::DirectPiece> b) {
  size_t i = 0;
  size_t j = 0;
  uint64_t ai = 0;  // bytes of a[i] behind us
  uint64_t bj = 0;
  while (i < a.size() && j < b.size()) {
    if (a[i].addr + ai != b[j].addr + bj) return false;
    const uint64_t n = std::min(a[i].length - ai, b[j].length - bj);
    ai += n;
    bj += n;
    if (ai == a[i].length) {
      ++i;
      ai = 0;
    }
    if (bj == b[j].length) {
      ++j;
      bj = 0;
    }
  }
  return i == a.size() && j == b.size();
}

}  // namespace

bool EngineCore::startGatedRead(Peer* peer, const std::shared_ptr<Transfer>& t) {
  if (!peer->direct || peer->direct->same_process || !peer->direct->gates_ok) return false;
  if (t->devices.size() != 1 || !t->local.allOnDevice(0, t->total, t->devices.front())) {
    return false;
  }
  if (peer->initiated.size() != 1 || t->released()) return false;
  if (directKind(peer, *t) != DirectKind::kDevice) return false;
  const int device = t->devices.front();
  // One gated copy per GPU at a time: none waits behind another's gate.
  if (std::any_of(gated_runs_.begin(), gated_runs_.end(),
                  [device](const auto& run) { return run->job->device == device; })) {
    return false;
  }
  DirectLink& link = *peer->direct;
  uint64_t lo = UINT64_MAX;
  uint64_t hi = 0;
  for (size_t i = 0; i < t->remote.size(); ++i) {
    lo = std::min(lo, t->remote_addr[i]);
    hi = std::max(hi, t->remote_addr[i] + t->remote[i].length);
  }
  // The peer's allocation holding every range, mapped here by an earlier READ.
  const auto mapped = std::find_if(link.mappings.begin(), link.mappings.end(), [&](auto& e) {
    return lo >= e.first && hi <= e.first + e.second.mapping->size();
  });
  if (mapped == link.mappings.end() || mapped->second.mapping->device() != device) return false;
  const std::shared_ptr<gpu::IpcMapping>& mapping = mapped->second.mapping;

  SegmentList from;
  std::vector<control::DirectPiece> source;
  source.reserve(t->remote.size());
  for (size_t i = 0; i < t->remote.size(); ++i) {
    from.add(mapping->base() + (t->remote_addr[i] - mapped->first), t->remote[i].length, device);
    source.push_back({t->remote_addr[i], t->remote[i].length, 0});
  }
  auto run = std::make_unique<LocalRun>();
  run->job = std::make_shared<LocalCopier::Job>();
  if (!pairStreamPieces(from, t->local, t->total, run->job.get())) return false;
  auto slot = gpu::ReadGates::take(device);
  if (!slot.isOk()) {
    if (slot.status().code() != StatusCode::kResourceExhausted) {
      link.gates_ok = false;
      LOG_INFO("peer '%s': no gated READs (%s)", peer->name.c_str(),
               slot.status().toString().c_str());
    }
    return false;
  }
  run->job->after = fenceEvents(from, t->local, {&t->fences});
  run->owner = LocalRun::Owner::kOurRead;
  run->wire_id = t->wire_id;
  run->runs = {t};
  run->peer_serial = peer->serial;
  run->mode = LocalMode::kStream;
  run->state = LocalRunState::kCopying;
  run->mappings = {mapping};
  run->job->state.store(LocalCopier::JobState::kRunning);
  run->gate = LocalRun::Gate{slot.value(), GateState::kAwaiting, {}};
  mapped->second.last_use = ++link.uses;

  // The request leaves first: our calls below overlap its hop and the target's.
  control::ReadRequest m;
  m.xfer_id = t->wire_id;
  m.total = t->total;
  m.accept_inline = false;
  m.direct = true;
  m.descs = t->remote;
  m.gated = true;
  m.gate_value = slot->value;
  m.gate_source = source;
  m.gate_source_area = {mapped->second.handle, mapped->first, mapping->size(), {}};
  m.gate_word = {reinterpret_cast<uint64_t>(slot->word), sizeof(uint32_t), 0};
  m.gate_area = {slot->area.handle, slot->area.base, slot->area.size, slot->area.bus_id};
  control::encode(m, peer->control->out());
  // A failure is the round's flush to report (it fails the peer, and with it this run).
  (void)peer->control->flush();
  peer->gated_reads.insert(t->wire_id);
  // The run owns the READ from here (as startDirectRead's does once the answer came).
  peer->initiated.erase(t->wire_id);
  t->direct = true;
  t->stage = OpStage::kLocalCopy;

  auto& gated = gated_queues_[device];
  if (!gated) gated = std::make_unique<gpu::CopyQueue>(device, gpu::CopyQueue::OnFailure::kLeave);
  gpu::CopyQueue& queue = *gated;
  Status st = queueCopies(queue, *run->job, &slot.value());
  auto ticket = queue.launch();
  if (!ticket.isOk() && st.isOk()) st = ticket.status();
  run->started = Clock::now();
  run->ticket = ticket.isOk() ? ticket.value() : 0;
  run->result = st;
  if (!st.isOk()) {
    // The READ fails with the error once the target answered; what was queued runs now (the
    // target may still write the gate: the slot is burned).
    LOG_WARN("peer '%s': gated READ %llu could not be queued: %s", peer->name.c_str(),
             static_cast<unsigned long long>(t->wire_id), st.toString().c_str());
    openGateHere(*run, /*burn=*/true);
  }
  LOG_TRACE("peer '%s': gated READ %llu: %llu bytes queued behind gate %u", peer->name.c_str(),
            static_cast<unsigned long long>(t->wire_id), static_cast<unsigned long long>(t->total),
            slot->index);
  gated_runs_.push_back(std::move(run));
  hints_.inline_pending = true;
  pollFor(directAnswerPoll(t->total));
  return true;
}

void EngineCore::onGatedReadAnswer(Peer* peer, const control::ReadResponse& m) {
  directProgress(peer);
  auto it = std::find_if(gated_runs_.begin(), gated_runs_.end(), [&](const auto& run) {
    return run->peer_serial == peer->serial && run->wire_id == m.xfer_id;
  });
  if (it == gated_runs_.end()) return;  // cannot be: the run waits for this answer
  LocalRun& run = **it;
  LocalRun::Gate& gate = *run.gate;
  const bool awaiting =
      gate.state == GateState::kAwaiting || gate.state == GateState::kOpenedAwaiting;
  if (!awaiting) return;
  if (m.code == StatusCode::kOk && !m.direct) {
    return protocolError(peer, Status(StatusCode::kProtocolError,
                                      strfmt("READ_RESPONSE to gated READ %llu takes the "
                                             "channels or travels inline",
                                             static_cast<unsigned long long>(m.xfer_id))));
  }
  if (m.code == StatusCode::kOk) {
    gate.state =
        gate.state == GateState::kAwaiting ? GateState::kAnswered : GateState::kAnsweredOpenedHere;
  } else {
    // It writes nothing: our copy waits for us.
    if (gate.state == GateState::kAwaiting) openGateHere(run, /*burn=*/false);
    gate.state = GateState::kRefused;
    gate.refusal = Status(m.code, m.message);
    if (m.code == StatusCode::kNotSupported && peer->direct) peer->direct->gates_ok = false;
    LOG_DEBUG("peer '%s': gated READ %llu refused: %s", peer->name.c_str(),
              static_cast<unsigned long long>(m.xfer_id), m.message.c_str());
  }
  driveGatedRuns();
}

void EngineCore::openGateHere(LocalRun& run, bool burn) {
  LocalRun::Gate& gate = *run.gate;
  switch (gate.state) {
    case GateState::kAwaiting:
    case GateState::kAnswered:
      break;
    case GateState::kOpenedAwaiting:
    case GateState::kAnsweredOpenedHere:
    case GateState::kRefused:
      return;  // open already
  }
  const Status st = gpu::ReadGates::openHere(gate.slot, burn);
  if (!st.isOk()) {
    // Only with a broken CUDA context (the write is on a stream of our own, to our own
    // memory): its queries then fail too, and the run ends with the failure.
    LOG_ERROR("gated READ %llu: its gate cannot be opened here: %s",
              static_cast<unsigned long long>(run.wire_id), st.toString().c_str());
    if (run.result.isOk()) run.result = st;
  }
  if (gate.state == GateState::kAwaiting) gate.state = GateState::kOpenedAwaiting;
  if (gate.state == GateState::kAnswered) gate.state = GateState::kAnsweredOpenedHere;
}

void EngineCore::serveGatedRead(Peer* peer, std::unique_ptr<TargetOp> op,
                                const control::ReadRequest& m) {
  std::vector<control::DirectPiece> pieces;
  std::vector<control::IpcHandle> handles;
  Status refusal;
  if (!directPieces(peer, op->segments, op->pinned, &pieces, &handles)) {
    refusal = Status(StatusCode::kNotSupported,
                     "no direct pieces of the READ's source the initiator can take");
  } else if (handles.size() != 1 || handles[0].base != m.gate_source_area.base ||
             handles[0].size != m.gate_source_area.size ||
             handles[0].handle != m.gate_source_area.handle ||
             !sameRanges(pieces, m.decoded_gate_source)) {
    refusal = Status(StatusCode::kNotSupported,
                     "the gated READ reads other ranges or another allocation than its "
                     "descriptors name here");
  }
  std::shared_ptr<gpu::IpcMapping> word;
  if (refusal.isOk()) {
    auto area = peerGateArea(peer, m.gate_area);
    if (area.isOk()) {
      word = std::move(area.value());
      // An initiator gates only a READ into the GPU that holds the source, where its gates lie.
      if (!op->segments.allOnDevice(0, op->segments.total(), word->device())) {
        refusal = Status(StatusCode::kNotSupported,
                         "the READ's gate lies on another GPU than its source");
      }
    } else {
      refusal =
          Status(StatusCode::kNotSupported,
                 "the initiator's read gates cannot be mapped here: " + area.status().message());
    }
  }
  if (!refusal.isOk()) {
    registry_.unpin(op->pinned);
    control::ReadResponse resp;
    resp.xfer_id = op->xfer_id;
    resp.code = refusal.code();
    resp.message = refusal.message();
    control::encode(resp, {}, peer->control->out());
    return;
  }
  // On the source's default stream: behind the work our application queued there, with no
  // stream of ours and no event wait between (a few microseconds less than a write on a stream
  // of ours behind a fence; none was recorded at the request's arrival).
  GateWrite write{peer->serial, op->xfer_id, word, std::make_unique<gpu::Fences>()};
  // The decoder checked that the word lies inside the area (and is a word).
  char* at = word->base() + (m.gate_word.addr - m.gate_area.base);
  bool queued = false;
  const Status st = write.written->recordAfterWrite(word->device(), at, m.gate_value, &queued);
  if (!st.isOk()) {
    // The peer's copy would wait for the gate forever: failing the peer makes the initiator
    // open it itself. A write queued all the same keeps the word mapped.
    if (queued) unconfirmed_gate_words_.push_back(std::move(write.word));
    registry_.unpin(op->pinned);
    return failPeer(peer, Status(StatusCode::kDeviceError,
                                 "the gate of the peer's READ " + std::to_string(op->xfer_id) +
                                     " cannot be opened: " + st.message()));
  }
  gate_writes_.push_back(std::move(write));
  TargetOp& served = *op;
  addTargetOp(peer, std::move(op));
  LOG_TRACE("peer '%s': gated READ %llu answered", peer->name.c_str(),
            static_cast<unsigned long long>(served.xfer_id));
  // Its deadline starts once the gate is written (driveGateWrites).
  sendDirectReadAnswer(peer, &served, pieces, handles, /*deadline=*/false);
}

Result<std::shared_ptr<gpu::IpcMapping>> EngineCore::peerGateArea(Peer* peer,
                                                                  const control::IpcHandle& h) {
  DirectLink& link = *peer->direct;
  auto it = link.gate_areas.find(h.base);
  if (it != link.gate_areas.end() && it->second.handle == h.handle &&
      it->second.mapping->size() == h.size) {
    return it->second.mapping;
  }
  if (it != link.gate_areas.end()) {
    link.gate_areas.erase(it);  // another area at that address (a write still running holds it)
  } else if (link.gate_areas.size() >= DirectLink::kMaxGateAreas) {
    return Status(
        StatusCode::kResourceExhausted,
        strfmt("the peer named more than %zu read-gate areas", DirectLink::kMaxGateAreas));
  }
  auto opened = gpu::IpcMapping::openGate({h.handle, h.base, h.size, h.bus_id, nullptr});
  if (!opened.isOk()) return opened.status();
  std::shared_ptr<gpu::IpcMapping> mapping = std::move(opened.value());
  link.gate_areas[h.base] = {h.handle, mapping};
  return mapping;
}

void EngineCore::driveGateWrites() {
  for (size_t i = 0; i < gate_writes_.size();) {
    const Result<bool> done = gate_writes_[i].written->ready();
    if (done.isOk() && !done.value()) {
      ++i;
      continue;
    }
    const GateWrite write = std::move(gate_writes_[i]);
    gate_writes_.erase(gate_writes_.begin() + static_cast<std::ptrdiff_t>(i));
    auto found = peers_by_serial_.find(write.peer_serial);
    if (found == peers_by_serial_.end() || !found->second->control) continue;
    Peer* peer = found->second;
    if (!done.isOk()) {
      // Only a dead context fails the query of a recorded event (the pool never destroys one in
      // use), and it runs nothing more: the word may go. Whether the write ran is not known,
      // and an initiator whose gate stays closed would wait forever.
      failPeer(peer, Status(StatusCode::kDeviceError,
                            strfmt("the gate of the peer's READ %llu may not have been written: %s",
                                   static_cast<unsigned long long>(write.read_id),
                                   done.status().message().c_str())));
      continue;
    }
    // Written: the peer's copy runs, and its READ_DONE is due within the data timeout.
    auto op = peer->target_ops.find(write.read_id);
    if (op != peer->target_ops.end() && op->second->stage == OpStage::kAwaitingReadDone) {
      startDirectDeadline(peer, OpRole::kPeers, write.read_id);
    }
  }
}

void EngineCore::driveGatedRuns() {
  std::erase_if(retired_gated_queues_, [](const auto& queue) { return queue->idle(); });
  for (size_t i = 0; i < gated_runs_.size();) {
    LocalRun& run = *gated_runs_[i];
    const int device = run.job->device;
    auto queue = gated_queues_.find(device);
    Result<bool> done(true);
    if (run.ticket != 0 && queue != gated_queues_.end()) done = queue->second->done(run.ticket);
    if (done.isOk() && !done.value()) {
      awaitStreamCopy(run.started);  // it may wait for the target's GPU work
      ++i;
      continue;
    }
    const GateState gate = run.gate->state;
    if (!run.peer_lost && (gate == GateState::kAwaiting || gate == GateState::kOpenedAwaiting)) {
      ++i;  // the answer decides how it ends (onGatedReadAnswer)
      continue;
    }
    if (!done.isOk() && run.result.isOk()) run.result = done.status();
    if (!run.result.isOk()) {
      // A failed copy may have left the stream waiting for a gate the target has not written
      // yet (it answered, but its write waits for its fences): opened here, burned. What it
      // queued may still run into our memory: the run ends once the stream is idle.
      openGateHere(run, /*burn=*/true);
      if (queue != gated_queues_.end() && !queue->second->idle()) {
        awaitStreamCopy(run.started);
        ++i;
        continue;
      }
    }
    std::unique_ptr<LocalRun> taken = std::move(gated_runs_[i]);
    gated_runs_.erase(gated_runs_.begin() + static_cast<std::ptrdiff_t>(i));
    if (!taken->result.isOk() && queue != gated_queues_.end()) {
      // Broken: replaced, and destroyed once idle (its stream may still wait for the fences of
      // the one gated READ it held, whose gate is open).
      retired_gated_queues_.push_back(std::move(queue->second));
      gated_queues_.erase(queue);
    }
    auto peer = peers_by_serial_.find(taken->peer_serial);
    const Status status = !taken->failure.isOk() ? taken->failure : taken->result;
    finishLocalRun(peer == peers_by_serial_.end() ? nullptr : peer->second, *taken, status);
    pollFor(kShortPoll);
  }
}

void EngineCore::abandonGatedRuns(const Peer* peer, const Transfer* t, const Status& why) {
  for (auto& run : gated_runs_) {
    if (peer != nullptr && run->peer_serial != peer->serial) continue;
    if (t != nullptr && run->runs.front().get() != t) continue;
    if (run->failure.isOk()) run->failure = why;
    if (peer != nullptr) run->peer_lost = true;
    openGateHere(*run, /*burn=*/true);
  }
}

}  // namespace tcpx::engine
