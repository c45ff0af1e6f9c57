// Same-engine transfers: READ and WRITE between this engine's own host regions, without a
// connection.
//
// A peer whose uuid is this engine's own is this engine (an application, or NIXL's local
// transfers, adding the engine as its own peer). Such a transfer is validated against the
// registrations exactly as a peer's request would be (the "remote" descriptors name our own
// regions), copied by the progress thread, and completed with its notification delivered after
// the bytes, so it has every property of a network transfer but the network.
// Two-sided transfers to itself are matched here too (by tag, oldest first), host memory only.
// Invariant: the local path never overtakes. It is taken only while nothing else to the same
// peer waits or is in flight over a connection (a GPU-memory transfer to itself still takes the
// loopback connection); otherwise the run queues behind the others and takes the connection
// too, so that notifications keep their post order.
#include <algorithm>
#include <cstring>

#include "common/log.h"
#include "common/strings.h"
#include "engine/engine_core.h"

namespace tcpx::engine {

namespace {

// Copies [0, total) of `from` into `to` (equal totals). memmove: a transfer between overlapping
// ranges of one region leaves the bytes of one of the two orders, never a torn copy.
void copySegments(const SegmentList& from, const SegmentList& to, uint64_t total) {
  from.forEachPiece(0, total, [&to](char* src, uint64_t len, uint64_t at, int) {
    to.forEachPiece(at, at + len, [src](char* dst, uint64_t n, uint64_t offset, int) {
      std::memmove(dst, src + offset, n);
    });
  });
}

// Whether a run or notification to the engine's own peer may take the local path without
// overtaking anything (see the invariant above).
bool nothingAhead(const Peer& peer) {
  return peer.waiting.empty() && peer.initiated.empty();
}

}  // namespace

bool EngineCore::isSelf(const Peer& peer) const {
  return !peer.loopback_acceptor && !peer.uuid.empty() && peer.uuid == uuid_;
}

bool EngineCore::runLocally(Peer* peer, const std::shared_ptr<Transfer>& t) {
  if (!isSelf(*peer)) return false;
  if (t->kind == XferKind::kSend || t->kind == XferKind::kRecv) {
    // Over the connection to itself a send would go to the connection's other half, where no
    // recv can be posted: two-sided transfers to itself are always matched here.
    postLocalTwoSided(peer, t);
    return true;
  }
  if (!nothingAhead(*peer) || t->local.anyDevice()) return false;
  SegmentList target;
  std::vector<MemoryId> pinned;
  Status st = registry_.resolveRemoteRequest(t->remote, t->total, &target, &pinned);
  if (st.isOk() && target.anyDevice()) {
    registry_.unpin(pinned);
    return false;
  }
  LOG_TRACE("peer '%s': %s of %llu bytes to this engine itself, copied locally", peer->name.c_str(),
            xferKindName(t->kind), static_cast<unsigned long long>(t->total));
  if (st.isOk()) {
    if (t->kind == XferKind::kWrite) {
      copySegments(t->local, target, t->total);
    } else {
      copySegments(target, t->local, t->total);
    }
  }
  registry_.unpin(pinned);
  if (st.isOk() && t->notification && !deliverNotification(peer, *t->notification)) {
    // More notifications wait than the application has taken: the same bound that fails a peer
    // over the network fails this one (and the run with it).
    st = peer->failure;
  }
  endRun(t.get(), st);
  return true;
}

void EngineCore::postLocalTwoSided(Peer* peer, const std::shared_ptr<Transfer>& t) {
  if (t->local.anyDevice()) {
    endRun(t.get(), Status(StatusCode::kNotSupported,
                           strfmt("%s of GPU memory to this engine itself ('%s'): two-sided "
                                  "transfers to the engine itself move host memory only",
                                  xferKindName(t->kind), peer->name.c_str())));
    return;
  }
  const bool sending = t->kind == XferKind::kSend;
  auto& counterparts = sending ? peer->local_recvs : peer->local_sends;
  auto it = counterparts.find(t->tag);
  if (it == counterparts.end() || it->second.empty()) {
    t->stage = OpStage::kLocalMatch;
    (sending ? peer->local_sends : peer->local_recvs)[t->tag].push_back(t);
    return;
  }
  const std::shared_ptr<Transfer> other = it->second.front();
  it->second.pop_front();
  if (it->second.empty()) counterparts.erase(it);
  const Transfer& send = sending ? *t : *other;
  const Transfer& recv = sending ? *other : *t;
  Status st;
  if (send.total != recv.total) {
    // The network path's rule: a size mismatch fails both halves.
    st = Status(StatusCode::kLengthMismatch,
                strfmt("send of %llu bytes does not match recv of %llu bytes (tag %llu)",
                       static_cast<unsigned long long>(send.total),
                       static_cast<unsigned long long>(recv.total),
                       static_cast<unsigned long long>(recv.tag)));
  } else {
    copySegments(send.local, recv.local, send.total);
  }
  for (Transfer* run : {t.get(), other.get()}) endRun(run, st);
}

void EngineCore::dropLocalTwoSided(Peer* peer, const Transfer& t) {
  auto& queues = t.kind == XferKind::kSend ? peer->local_sends : peer->local_recvs;
  auto it = queues.find(t.tag);
  if (it == queues.end()) return;
  auto& queue = it->second;
  queue.erase(std::remove_if(queue.begin(), queue.end(),
                             [&t](const std::shared_ptr<Transfer>& q) { return q.get() == &t; }),
              queue.end());
  if (queue.empty()) queues.erase(it);
}

bool EngineCore::notifyLocally(Peer* peer, std::string& text) {
  if (!isSelf(*peer) || !nothingAhead(*peer)) return false;
  // sendNotification refused anything over max_notification_size: our own limit is the limit.
  (void)deliverNotification(peer, std::move(text));
  return true;
}

}  // namespace tcpx::engine
