// Direct copies between the processes of two engines on one host (same_host_copy).
//
// Both engines offer their process in the handshake (control::DirectOffer: its pid and a cookie
// at an address in its memory). A READ or WRITE between host memory on both sides, too large to
// travel inline, then moves its bytes by one copy between the two processes' memory instead of
// through the kernel's TCP stack twice. The process whose memory is written makes the copy,
// reading the other's with process_vm_readv (common/cross_memory.h):
//   - WRITE: WRITE_REQUEST carries the initiator's source ranges; the target validates and pins
//     its destination as for any request, reads the source into it and answers WRITE_DONE (its
//     notification delivered first).
//   - READ: READ_REQUEST asks for it; the target validates and pins its source and answers
//     READ_RESPONSE with the source's ranges; the initiator reads them into its destination and
//     answers READ_DONE, upon which the target unpins.
// Invariants: no process ever writes another's memory, so a late copy can never land in memory
// its owner deregistered or freed; the ranges a peer reads stay pinned (deregistration waits)
// until it says it is done or its connection ends; a WRITE's notification is delivered only
// once its bytes are in place, as over the channels.
//
// The copies run as local runs (local_path.cc): small ones at once on the progress thread, the
// others on the copy thread. Before this process first reads a peer, it reads the peer's cookie
// back: a pid of another pid namespace, or a kernel that does not allow the read (ptrace rules),
// makes it refuse direct copies from that peer with NOT_SUPPORTED (its WRITEs) or not ask for
// them (our READs), and the initiator runs a refused transfer again over the data channels.
// GPU memory on either side always takes the data channels.
#include <unistd.h>

#include <algorithm>
#include <chrono>

#include "common/cross_memory.h"
#include "common/log.h"
#include "common/strings.h"
#include "engine/engine_core.h"

namespace tcpx::engine {

namespace {

// The ranges of `segments` (this process's memory), for the peer to read.
std::vector<control::DirectPiece> piecesOf(const SegmentList& segments) {
  std::vector<control::DirectPiece> pieces;
  pieces.reserve(segments.count());
  for (const transport::IoSlice& s : segments.vector()) {
    pieces.push_back({reinterpret_cast<uint64_t>(s.data), s.size});
  }
  return pieces;
}

// Pairs `local` (the destination here) with the peer's `remote` ranges, in order (the caller
// checked that both hold the same number of bytes).
std::vector<CrossPiece> crossPieces(const SegmentList& local,
                                    std::span<const control::DirectPiece> remote) {
  std::vector<CrossPiece> out;
  out.reserve(std::max(local.count(), remote.size()));
  size_t r = 0;
  uint64_t r_offset = 0;
  for (const transport::IoSlice& s : local.vector()) {
    uint64_t done = 0;
    while (done < s.size && r < remote.size()) {
      const uint64_t n = std::min<uint64_t>(s.size - done, remote[r].length - r_offset);
      out.push_back({static_cast<char*>(s.data) + done, remote[r].addr + r_offset, n});
      done += n;
      r_offset += n;
      if (r_offset == remote[r].length) {
        ++r;
        r_offset = 0;
      }
    }
  }
  return out;
}

}  // namespace

control::DirectOffer EngineCore::directOffer(const std::string& peer_host) const {
  control::DirectOffer offer;
  if (settings_.same_host_copy != "auto" || host_id_.empty() || peer_host != host_id_) {
    return offer;
  }
  offer.pid = static_cast<uint32_t>(::getpid());
  offer.cookie_addr = reinterpret_cast<uint64_t>(direct_cookie_.data());
  offer.cookie.assign(direct_cookie_.data(), direct_cookie_.size());
  return offer;
}

void EngineCore::adoptDirect(Peer* peer, const control::DirectOffer& ours,
                             const control::DirectOffer& theirs) {
  peer->direct.reset();
  if (ours.pid == 0 || theirs.pid == 0) return;
  DirectLink link;
  link.pid = static_cast<pid_t>(theirs.pid);
  link.cookie_addr = theirs.cookie_addr;
  link.cookie = theirs.cookie;
  peer->direct = std::move(link);
}

bool EngineCore::mayReadPeer(Peer* peer) {
  if (!peer->direct) return false;
  DirectLink& link = *peer->direct;
  if (link.we_read_peer == DirectLink::Reach::kUnprobed) {
    const Status st = probeProcess(link.pid, link.cookie_addr, link.cookie);
    if (st.isOk()) {
      link.we_read_peer = DirectLink::Reach::kReadable;
      LOG_DEBUG("peer '%s' (process %d): direct copies on this host", peer->name.c_str(),
                static_cast<int>(link.pid));
    } else {
      link.we_read_peer = DirectLink::Reach::kUnreadable;
      link.unreadable_why = st.message();
      LOG_INFO(
          "peer '%s': no direct copies from its memory (%s); its bytes take the data "
          "channels",
          peer->name.c_str(), st.message().c_str());
    }
  }
  return link.we_read_peer == DirectLink::Reach::kReadable;
}

bool EngineCore::goesDirect(Peer* peer, const Transfer& t) {
  if (!peer->direct || t.direct_refused) return false;
  if (t.kind != XferKind::kRead && t.kind != XferKind::kWrite) return false;
  if (t.total <= settings_.inline_threshold || t.local.anyDevice() || t.remote_on_device) {
    return false;
  }
  return t.kind == XferKind::kWrite ? peer->direct->peer_reads_us : mayReadPeer(peer);
}

void EngineCore::encodeDirectWrite(Peer* peer, Transfer* t) {
  const std::vector<control::DirectPiece> pieces = piecesOf(t->local);
  control::WriteRequest m = writeRequestOf(*t);
  m.direct = true;
  m.pieces = pieces;
  control::encode(m, {}, peer->control->out());
  t->direct = true;
  t->stage = OpStage::kAwaitingWriteDone;
  t->data_done = true;  // no stream: WRITE_DONE alone ends it
  peer->direct_deadlines.push_back(
      {Clock::now() + std::chrono::milliseconds(settings_.data_timeout_ms), OpRole::kOurs,
       t->wire_id});
}

bool EngineCore::directAgreed(Peer* peer, control::FrameType frame) {
  if (peer->direct) return true;
  protocolError(peer, Status(StatusCode::kProtocolError,
                             strfmt("a direct %s without direct copies agreed in the handshake",
                                    control::frameTypeName(static_cast<uint8_t>(frame)))));
  return false;
}

void EngineCore::serveDirectWrite(Peer* peer, std::unique_ptr<TargetOp> op,
                                  std::span<const control::DirectPiece> source) {
  if (op->status.isOk() && op->segments.anyDevice()) {
    op->status = Status(StatusCode::kNotSupported,
                        "a direct WRITE into GPU memory (it takes the data channels)");
  }
  if (op->status.isOk() && !mayReadPeer(peer)) {
    op->status = Status(StatusCode::kNotSupported, peer->direct->unreadable_why);
  }
  if (!op->status.isOk()) {
    // Nothing was read: no notification, and the initiator may run it again over the channels.
    registry_.unpin(op->pinned);
    control::encodeWriteDone({op->xfer_id, op->status.code(), op->status.message()},
                             peer->control->out());
    return;
  }
  auto run = std::make_unique<LocalRun>();
  run->owner = LocalRun::Owner::kPeerWrite;
  run->wire_id = op->xfer_id;
  run->peer_serial = peer->serial;
  // The run holds the destination's pins: they go when the copy is done, even if the peer fails
  // (and its op is forgotten) while it runs.
  run->target_pins = std::move(op->pinned);
  op->pinned.clear();
  run->job = std::make_shared<LocalCopier::Job>();
  run->job->read_from = peer->direct->pid;
  run->job->cross = crossPieces(op->segments, source);
  run->mode =
      op->segments.total() <= kImmediateCopyBytes ? LocalMode::kNow : LocalMode::kCopyThread;
  op->stage = OpStage::kLocalCopy;
  addTargetOp(peer, std::move(op));
  enqueueLocalRun(peer, std::move(run));
}

void EngineCore::serveDirectRead(Peer* peer, std::unique_ptr<TargetOp> op) {
  control::ReadResponse resp;
  resp.xfer_id = op->xfer_id;
  if (op->status.isOk() && op->segments.anyDevice()) {
    registry_.unpin(op->pinned);
    op->status = Status(StatusCode::kNotSupported,
                        "a direct READ of GPU memory (it takes the data channels)");
  }
  if (!op->status.isOk()) {
    resp.code = op->status.code();
    resp.message = op->status.message();
    control::encode(resp, {}, peer->control->out());
    return;
  }
  // The source stays pinned until the initiator's READ_DONE (or the end of the connection).
  const std::vector<control::DirectPiece> pieces = piecesOf(op->segments);
  resp.direct = true;
  resp.pieces = pieces;
  control::encode(resp, {}, peer->control->out());
  op->stage = OpStage::kAwaitingReadDone;
  peer->direct_deadlines.push_back(
      {Clock::now() + std::chrono::milliseconds(settings_.data_timeout_ms), OpRole::kPeers,
       op->xfer_id});
  addTargetOp(peer, std::move(op));
}

void EngineCore::startDirectRead(Peer* peer, const std::shared_ptr<Transfer>& t,
                                 std::span<const control::DirectPiece> source) {
  uint64_t sum = 0;
  for (const control::DirectPiece& p : source) sum += p.length;  // the decoder bounds the sum
  if (!t->direct || sum != t->total) {
    return protocolError(
        peer, Status(StatusCode::kProtocolError,
                     strfmt("READ_RESPONSE for READ %llu names %llu bytes to read directly%s",
                            static_cast<unsigned long long>(t->wire_id),
                            static_cast<unsigned long long>(sum),
                            t->direct ? " (not the READ's size)" : ", which it did not ask for")));
  }
  if (t->released()) {
    control::encodeReadDone({t->wire_id, StatusCode::kCanceled, "the READ was released"},
                            peer->control->out());
    return finishTransfer(peer, t, Status(StatusCode::kCanceled, "released"));
  }
  auto run = std::make_unique<LocalRun>();
  run->owner = LocalRun::Owner::kOurRead;
  run->wire_id = t->wire_id;
  run->peer_serial = peer->serial;
  run->runs = {t};
  run->job = std::make_shared<LocalCopier::Job>();
  run->job->read_from = peer->direct->pid;
  run->job->cross = crossPieces(t->local, source);
  run->mode = t->total <= kImmediateCopyBytes ? LocalMode::kNow : LocalMode::kCopyThread;
  // The run owns the READ from here: a peer failure ends it only once its copy into our memory
  // is done (abandonLocalRuns), never while the copy may still write.
  peer->initiated.erase(t->wire_id);
  enqueueLocalRun(peer, std::move(run));
}

void EngineCore::finishDirectRun(Peer* peer, LocalRun& run, const Status& status) {
  const bool connected = peer != nullptr && peer->control && !run.peer_lost;
  if (run.owner == LocalRun::Owner::kPeerWrite) {
    if (!connected) return;  // failPeer forgot the op; its pins went with the run
    auto it = peer->target_ops.find(run.wire_id);
    if (it == peer->target_ops.end()) return;
    TargetOp* op = it->second.get();
    op->data_done = true;
    op->stage = OpStage::kReplied;
    if (!status.isOk() && op->status.isOk()) op->status = status;
    return maybeFinishTargetWrite(peer, op);
  }
  const std::shared_ptr<Transfer> t = run.runs.front();
  if (connected) {
    const Status verdict =
        t->released() ? Status(StatusCode::kCanceled, "the READ was released") : status;
    control::encodeReadDone({run.wire_id, verdict.code(), verdict.message()}, peer->control->out());
    return finishTransfer(peer, t, status);
  }
  // The connection it counted against is gone (and with it the target's pins).
  t->counted = false;
  t->stage = OpStage::kIdle;
  if (t->released()) return completeRelease(t.get());
  endRun(t.get(), status);
}

void EngineCore::retryOverChannels(Peer* peer, const std::shared_ptr<Transfer>& t,
                                   const Status& why) {
  LOG_INFO("peer '%s': direct copy of %s %llu refused (%s); it takes the data channels",
           peer->name.c_str(), xferKindName(t->kind), static_cast<unsigned long long>(t->wire_id),
           why.message().c_str());
  // The peer cannot read us: later WRITEs go over the channels from the start.
  if (t->kind == XferKind::kWrite && peer->direct) peer->direct->peer_reads_us = false;
  peer->initiated.erase(t->wire_id);
  if (t->counted) {
    --peer->announced;
    t->counted = false;
  }
  t->direct = false;
  t->direct_refused = true;
  t->stage = OpStage::kQueued;
  startTransfer(peer, t);
}

void EngineCore::onReadDone(Peer* peer, std::string_view payload) {
  control::Completion m;
  Status st = control::decodeCompletion(payload, &m);
  if (!st.isOk()) return protocolError(peer, st);
  auto it = peer->target_ops.find(m.xfer_id);
  if (it == peer->target_ops.end() ||
      !peerMaySend(OpRole::kPeers, it->second->kind, it->second->stage,
                   control::FrameType::kReadDone)) {
    return protocolError(peer, Status(StatusCode::kProtocolError,
                                      strfmt("READ_DONE out of turn: no direct READ %llu of the "
                                             "peer waits for it",
                                             static_cast<unsigned long long>(m.xfer_id))));
  }
  retireTargetOp(peer, m.xfer_id);
}

void EngineCore::checkDirectDeadlines(Peer* peer, Clock::time_point now) {
  auto& deadlines = peer->direct_deadlines;
  while (!deadlines.empty()) {
    const DirectDeadline d = deadlines.front();
    bool pending = false;
    if (d.role == OpRole::kOurs) {
      auto it = peer->initiated.find(d.id);
      pending = it != peer->initiated.end() && it->second->direct &&
                it->second->stage == OpStage::kAwaitingWriteDone;
    } else {
      auto it = peer->target_ops.find(d.id);
      pending = it != peer->target_ops.end() && it->second->stage == OpStage::kAwaitingReadDone;
    }
    if (!pending) {
      deadlines.pop_front();
      continue;
    }
    if (now < d.due) return;
    return failPeer(
        peer, Status(StatusCode::kTimeout,
                     strfmt("peer '%s' did not finish %s %llu within %u ms (data_timeout_ms): "
                            "it stalled while its control connection lives",
                            peer->name.c_str(),
                            d.role == OpRole::kOurs ? "reading our direct WRITE"
                                                    : "its direct READ of our memory",
                            static_cast<unsigned long long>(d.id), settings_.data_timeout_ms)));
  }
}

}  // namespace tcpx::engine
