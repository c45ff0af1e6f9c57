// Same-engine transfers: READ, WRITE, send and recv between this engine and itself, without a
// connection.
//
// A peer whose uuid is this engine's own is this engine (an application, or NIXL's local
// transfers, adding the engine as its own peer). Nothing to it ever touches a transport: a
// loopback connection would cost a copy through the kernel, and with TCPX it would send GPU
// memory through the plugin without devmem. A transfer to it is validated against the
// registrations exactly as a peer's request would be (the "remote" descriptors name our own
// regions), copied, and completed with its notification delivered after the bytes, so it has
// every property of a network transfer but the network. Two-sided transfers to itself are
// matched here too (by tag, oldest first).
//
// Where the bytes are copied (LocalMode): a small host-only copy at once on the progress thread;
// GPU memory of one GPU by asynchronous copies on that GPU's local copy queue, polled like the
// staging copies; anything else (host and GPU memory, several GPUs, long host copies) on the copy
// thread (LocalCopier). The progress thread never waits for the GPU or a long memcpy, and every
// GPU copy first waits for the caller's default-stream work queued before the post.
//
// Invariants, per peer (the engine itself is one; direct copies with a process of this host run
// here too, see direct_path.cc): a peer's local runs complete in post order (a run completes
// only after every earlier run of its peer; only a transfer refused before it is queued, by
// validation or a size mismatch, ends at once, having copied nothing), so a notification sent
// after a transfer is delivered after that transfer's bytes; a run starts only once every run
// of its peer before it has started on the same queue, stream or copy lane (or ended), so copies
// into one place land in post order; a run completes only once no copy of it can run. Runs of
// different peers wait for each other in nothing: a copy from a peer whose page never becomes
// readable holds that peer's runs only (its copy lane, LocalCopier).
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>

#include "common/log.h"
#include "common/strings.h"
#include "engine/engine_core.h"

namespace tcpx::engine {

namespace {

// On a GPU's copy queue, a run of a few pieces copies each with one cudaMemcpyAsync (no copy
// descriptors to write and read back), and so do pieces from 1 MiB on; the small pieces of a
// larger run are batched into one kernel launch (thousands of KV blocks cost one launch).
constexpr size_t kFewPieces = 8;
constexpr uint64_t kDmaPieceBytes = uint64_t{1} << 20;
// While a young stream copy runs, and for kShortPoll after a local run completed, the progress
// loop polls instead of sleeping (pollFor): a small GPU copy lands within microseconds,
// and the caller's next transfer (small ones come back to back) then starts without the wake-up
// of a sleeping thread, which costs more than a small copy.
// A stream copy is looked at every couple of microseconds this long, then at the staging
// copies' pace (it may be waiting for the caller's GPU work).
constexpr auto kLocalEagerPoll = std::chrono::microseconds(200);

// What pairPieces found out about the copies.
struct PieceDevices {
  int any = -1;          // a GPU the copies touch (-1: host memory only)
  bool one_gpu = true;   // every source and destination is memory of `any` (and there is one)
  bool overlap = false;  // a source piece meets a destination piece
};

// The copies that move [0, total) of `from` into `to` (equal totals), and where they are.
PieceDevices pairPieces(const SegmentList& from, const SegmentList& to, uint64_t total,
                        std::vector<gpu::CopyPiece>* pieces) {
  PieceDevices where;
  uintptr_t src_lo = UINTPTR_MAX;
  uintptr_t src_hi = 0;
  uintptr_t dst_lo = UINTPTR_MAX;
  uintptr_t dst_hi = 0;
  from.forEachPiece(0, total, [&](char* src, uint64_t len, uint64_t at, int src_device) {
    to.forEachPiece(at, at + len, [&](char* dst, uint64_t n, uint64_t offset, int dst_device) {
      for (int d : {src_device, dst_device}) {
        if (where.any < 0 && d >= 0) where.any = d;
        if (d < 0 || d != where.any) where.one_gpu = false;
      }
      pieces->push_back({dst, src + offset, n});
      const auto s = reinterpret_cast<uintptr_t>(src + offset);
      const auto t = reinterpret_cast<uintptr_t>(dst);
      src_lo = std::min(src_lo, s);
      src_hi = std::max(src_hi, s + n);
      dst_lo = std::min(dst_lo, t);
      dst_hi = std::max(dst_hi, t + n);
    });
  });
  if (where.any < 0) where.one_gpu = false;
  if (pieces->empty() || src_lo >= dst_hi || dst_lo >= src_hi) return where;
  // The spans meet: whether a source piece meets a destination piece (KV blocks moved within one
  // region interleave without overlapping).
  std::vector<std::pair<uintptr_t, uintptr_t>> srcs;
  std::vector<std::pair<uintptr_t, uintptr_t>> dsts;
  srcs.reserve(pieces->size());
  dsts.reserve(pieces->size());
  for (const gpu::CopyPiece& p : *pieces) {
    const auto s = reinterpret_cast<uintptr_t>(p.src);
    const auto d = reinterpret_cast<uintptr_t>(p.dst);
    srcs.emplace_back(s, s + p.len);
    dsts.emplace_back(d, d + p.len);
  }
  std::sort(srcs.begin(), srcs.end());
  std::sort(dsts.begin(), dsts.end());
  for (size_t i = 0, j = 0; i < srcs.size() && j < dsts.size();) {
    if (srcs[i].second <= dsts[j].first) {
      ++i;
    } else if (dsts[j].second <= srcs[i].first) {
      ++j;
    } else {
      where.overlap = true;
      break;
    }
  }
  return where;
}

}  // namespace

// For a local run: the initiator's recorded at post, the target's (for GPUs the initiator's do
// not cover) when the run was queued; a send's and a recv's both at their post.
std::vector<void*> EngineCore::fenceEvents(const SegmentList& from, const SegmentList& to,
                                           std::initializer_list<const gpu::Fences*> fences) {
  std::vector<int> devices = from.distinctDevices();
  for (int d : to.distinctDevices()) {
    if (std::find(devices.begin(), devices.end(), d) == devices.end()) devices.push_back(d);
  }
  std::vector<void*> events;
  for (int d : devices) {
    for (const gpu::Fences* f : fences) {
      if (void* ev = f->eventFor(d)) events.push_back(ev);
    }
  }
  return events;
}

bool EngineCore::isSelf(const Peer& peer) const {
  return !peer.uuid.empty() && peer.uuid == uuid_;
}

bool EngineCore::runLocally(Peer* peer, const std::shared_ptr<Transfer>& t) {
  if (!isSelf(*peer)) return false;
  if (t->kind == XferKind::kSend || t->kind == XferKind::kRecv) {
    postLocalTwoSided(peer, t);
    return true;
  }
  auto run = std::make_unique<LocalRun>();
  SegmentList target;
  Status st = registry_.resolveRemoteRequest(t->remote, t->total, &target, &run->target_pins);
  if (st.isOk() && target.anyDevice()) {
    // The target's GPU work queued before the post orders the copies too (as a request's arrival
    // does on a peer): the initiator's fences, recorded at post on the legacy default streams,
    // cover the GPUs they share; the others get theirs now.
    std::vector<int> uncovered;
    for (int d : target.distinctDevices()) {
      if (std::find(t->devices.begin(), t->devices.end(), d) == t->devices.end()) {
        uncovered.push_back(d);
      }
    }
    if (!uncovered.empty()) st = run->target_fences.record(uncovered);
  }
  if (!st.isOk()) {
    registry_.unpin(run->target_pins);
    endRun(t.get(), st);
    return true;
  }
  LOG_TRACE("peer '%s': %s of %llu bytes to this engine itself, copied locally", peer->name.c_str(),
            xferKindName(t->kind), static_cast<unsigned long long>(t->total));
  run->runs.push_back(t);
  run->notification = t->notification;
  const bool write = t->kind == XferKind::kWrite;
  run->job = std::make_shared<LocalCopier::Job>();
  run->job->after = fenceEvents(t->local, target, {&t->fences, &run->target_fences});
  queueLocalRun(peer, std::move(run), write ? t->local : target, write ? target : t->local,
                t->total);
  return true;
}

void EngineCore::postLocalTwoSided(Peer* peer, const std::shared_ptr<Transfer>& t) {
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
  if (send.total != recv.total) {
    // The network path's rule: a size mismatch fails both halves.
    const Status st(StatusCode::kLengthMismatch,
                    strfmt("send of %llu bytes does not match recv of %llu bytes (tag %llu)",
                           static_cast<unsigned long long>(send.total),
                           static_cast<unsigned long long>(recv.total),
                           static_cast<unsigned long long>(recv.tag)));
    for (Transfer* run : {t.get(), other.get()}) endRun(run, st);
    return;
  }
  auto run = std::make_unique<LocalRun>();
  run->runs = {t, other};
  run->job = std::make_shared<LocalCopier::Job>();
  run->job->after = fenceEvents(send.local, recv.local, {&send.fences, &recv.fences});
  queueLocalRun(peer, std::move(run), send.local, recv.local, send.total);
}

gpu::CopyQueue& EngineCore::localQueue(int device) {
  auto& queue = local_queues_[device];
  if (!queue) queue = std::make_unique<gpu::CopyQueue>(device);
  return *queue;
}

bool EngineCore::pairStreamPieces(const SegmentList& from, const SegmentList& to, uint64_t total,
                                  LocalCopier::Job* job) {
  const PieceDevices where = pairPieces(from, to, total, &job->pieces);
  job->device = where.any;
  return where.one_gpu && !where.overlap;
}

Status EngineCore::queueCopies(gpu::CopyQueue& queue, const LocalCopier::Job& job,
                               const gpu::ReadGates::Slot* gate) {
  Status st;
  for (void* event : job.after) {
    if (st.isOk()) st = queue.after(event);
  }
  if (st.isOk() && gate != nullptr) st = queue.waitFor(gate->word, gate->value);
  for (const gpu::CopyPiece& piece : job.pieces) {
    if (!st.isOk()) break;
    st = job.pieces.size() <= kFewPieces || piece.len >= kDmaPieceBytes
             ? queue.enqueueMemcpy(piece.dst, piece.src, piece.len)
             : queue.add(piece.src, piece.dst, piece.len);
  }
  return st;
}

void EngineCore::queueLocalRun(Peer* peer, std::unique_ptr<LocalRun> run, const SegmentList& from,
                               const SegmentList& to, uint64_t total) {
  LocalCopier::Job& job = *run->job;
  const PieceDevices where = pairPieces(from, to, total, &job.pieces);
  job.device = where.any;
  // Overlapping GPU copies go to the copy thread, which copies piece after piece and a piece
  // that overlaps itself through a temporary buffer: one order or the other, as memmove gives
  // host memory, never a torn mix (parallel copies of overlapping ranges are undefined).
  if (where.one_gpu && !where.overlap) {
    run->mode = LocalMode::kStream;
  } else if (where.any < 0 && total <= kImmediateCopyBytes) {
    run->mode = LocalMode::kNow;
  } else {
    run->mode = LocalMode::kCopyThread;
  }
  enqueueLocalRun(peer, std::move(run));
}

void EngineCore::awaitStreamCopy(Clock::time_point started) {
  if (Clock::now() - started < kLocalEagerPoll) {
    hints_.inline_pending = true;
    pollFor(kShortPoll);
  } else {
    hints_.gpu_pending = true;
  }
}

void EngineCore::enqueueLocalRun(Peer* peer, std::unique_ptr<LocalRun> run) {
  for (auto& t : run->runs) t->stage = OpStage::kLocalCopy;
  run->peer_serial = peer->serial;
  run->lane = peer->copy_lane;
  local_runs_.push_back(std::move(run));
  driveLocalRuns();
}

bool EngineCore::startWaitingLocalRuns() {
  // One pass, oldest first, each peer's runs (of its connection: its copy lane) on their own. A
  // waiting run may start once every run of its peer before it has started and none of those
  // still copying is at another place (GPU queue, copy lane) than the one it takes (it would
  // overtake them); a kNow run, copied at once, only when none before it still copies.
  struct PeerRuns {
    uint64_t copy_lane = 0;  // Peer::copy_lane: the peer's connection
    bool copying = false;    // a run of the peer before this one still copies, at `place`
    bool mixed = false;      // ... at several places
    bool blocked = false;    // a run of the peer waits: the later ones wait behind it
    CopyPlace place{};
  };
  std::vector<PeerRuns> peers;  // the few peers with local runs
  bool landed = false;
  for (auto& run : local_runs_) {
    if (run->state == LocalRunState::kCopied) continue;
    auto found = std::find_if(peers.begin(), peers.end(),
                              [&run](const PeerRuns& p) { return p.copy_lane == run->lane; });
    if (found == peers.end()) found = peers.insert(peers.end(), PeerRuns{run->lane});
    PeerRuns& mine = *found;
    if (mine.blocked) continue;
    CopyPlace key{run->mode, run->mode == LocalMode::kStream ? run->job->device : -1};
    if (run->state == LocalRunState::kWaiting) {
      const bool may =
          !mine.copying || (!mine.mixed && key == mine.place && key.mode != LocalMode::kNow);
      if (!may) {
        mine.blocked = true;
        continue;
      }
      startLocalRun(*run);
      landed = landed || run->state == LocalRunState::kCopied;
      if (run->state == LocalRunState::kCopied) continue;
      key = CopyPlace{run->mode, key.device};  // a kNow run may have gone to the copy lane
    }
    mine.mixed = mine.mixed || (mine.copying && !(key == mine.place));
    mine.copying = true;
    mine.place = key;
  }
  return landed;
}

void EngineCore::startLocalRun(LocalRun& run) {
  LocalCopier::Job& job = *run.job;
  run.started = Clock::now();
  run.state = LocalRunState::kCopying;
  // A peer's memory is read on this thread only where no page of it must be faulted in: a fault
  // that the peer's process never serves would hold the read, and every peer of the engine with
  // it. The copy thread takes the rest.
  if (run.mode == LocalMode::kNow && job.read_from && !job.read_from->pagesPresent(job.cross)) {
    run.mode = LocalMode::kCopyThread;
  }
  switch (run.mode) {
    case LocalMode::kNow:
      job.state.store(LocalCopier::JobState::kRunning);
      run.state = LocalRunState::kCopied;
      if (job.read_from) {
        run.result = readProcessMemory(*job.read_from, job.cross);
        return;
      }
      // memmove: a transfer between overlapping ranges of one region leaves the bytes of one of
      // the two orders, never a torn copy.
      for (const gpu::CopyPiece& piece : job.pieces) std::memmove(piece.dst, piece.src, piece.len);
      return;
    case LocalMode::kStream: {
      job.state.store(LocalCopier::JobState::kRunning);
      gpu::CopyQueue& queue = localQueue(job.device);
      Status st = queueCopies(queue, job, nullptr);
      // Also after a failure: the ticket covers what was queued, and the run completes (with the
      // failure) only once that has finished.
      auto ticket = queue.launch();
      if (!ticket.isOk() && st.isOk()) st = ticket.status();
      run.ticket = ticket.isOk() ? ticket.value() : 0;
      run.result = st;
      if (st.isOk() && run.signal_peer) signalQueuedWrite(run, queue);
      // Nothing signals a stream copy: the loop polls it (driveLocalRuns) from this round on.
      hints_.inline_pending = true;
      pollFor(kShortPoll);
      return;
    }
    case LocalMode::kCopyThread:
      if (!copier_) copier_ = std::make_unique<LocalCopier>([this] { wake_.signal(); });
      if (!copier_->submit(run.lane, run.job)) {
        run.result = Status(StatusCode::kResourceExhausted,
                            "a copy of this engine: its copy thread could not start");
        run.state = LocalRunState::kCopied;
      }
      return;
  }
}

void EngineCore::driveLocalRuns() {
  if (copier_) {
    for (const auto& job : copier_->takeDone()) {
      for (auto& run : local_runs_) {
        if (run->job != job) continue;
        run->result = job->result;
        run->state = LocalRunState::kCopied;
        break;
      }
    }
  }
  std::vector<int> failed_queues;
  // The lowest ticket found not done, per queue: a queue retires its copies in ticket order, so
  // no higher ticket is done either. Each queue is asked about few runs per call, not about all
  // (this is called for every run queued). (Runs of different peers start out of list order, so
  // tickets do not grow along local_runs_.)
  std::vector<std::pair<int, uint64_t>> busy_from;
  for (auto& run : local_runs_) {
    if (run->state != LocalRunState::kCopying || run->mode != LocalMode::kStream) continue;
    const int device = run->job->device;
    auto busy = std::find_if(busy_from.begin(), busy_from.end(),
                             [device](const auto& b) { return b.first == device; });
    Result<bool> done(true);
    if (run->ticket != 0) {
      done = busy != busy_from.end() && run->ticket >= busy->second
                 ? Result<bool>(false)
                 : local_queues_[device]->done(run->ticket);
    }
    if (done.isOk() && !done.value()) {
      if (busy == busy_from.end()) {
        busy_from.emplace_back(device, run->ticket);
      } else {
        busy->second = std::min(busy->second, run->ticket);
      }
      awaitStreamCopy(run->started);
      continue;
    }
    if (!done.isOk() && run->result.isOk()) run->result = done.status();
    // A queue that failed (to take the copies, or while running them) fails every later run.
    if (!run->result.isOk()) failed_queues.push_back(run->job->device);
    run->state = LocalRunState::kCopied;
  }
  // Oldest first: complete what has landed, start what may start (a kNow run lands as it starts).
  bool moved = true;
  while (moved) {
    completeLandedLocalRuns();
    moved = startWaitingLocalRuns();
  }
  // A failed queue reports every later ticket failed: replace it once no run waits on it.
  for (int device : failed_queues) {
    const bool in_use = std::any_of(local_runs_.begin(), local_runs_.end(), [device](auto& r) {
      return r->mode == LocalMode::kStream && r->state == LocalRunState::kCopying &&
             r->job->device == device;
    });
    if (!in_use) local_queues_.erase(device);
  }
}

void EngineCore::completeLandedLocalRuns() {
  // Each lane's runs from its oldest: a landed run completes once every earlier run of its lane
  // has. Lanes whose oldest run still copies are skipped, not waited for.
  std::vector<uint64_t> waiting;  // lanes with an earlier run not landed
  for (size_t i = 0; i < local_runs_.size();) {
    const uint64_t lane = local_runs_[i]->lane;
    const bool behind = std::find(waiting.begin(), waiting.end(), lane) != waiting.end();
    if (behind || local_runs_[i]->state != LocalRunState::kCopied) {
      if (!behind) waiting.push_back(lane);
      ++i;
      continue;
    }
    std::unique_ptr<LocalRun> run = std::move(local_runs_[i]);
    local_runs_.erase(local_runs_.begin() + static_cast<std::ptrdiff_t>(i));
    auto peer = peers_by_serial_.find(run->peer_serial);
    const Status status = !run->failure.isOk() ? run->failure : run->result;
    finishLocalRun(peer == peers_by_serial_.end() ? nullptr : peer->second, *run, status);
    pollFor(kShortPoll);
  }
}

Clock::time_point EngineCore::copyStallDue(const LocalRun& run) const {
  if (run.mode != LocalMode::kCopyThread || run.state != LocalRunState::kCopying ||
      !run.job->read_from || run.peer_lost ||
      run.job->state.load() != LocalCopier::JobState::kRunning) {
    return Clock::time_point::max();
  }
  const int64_t moved = run.job->progress.load(std::memory_order_relaxed);
  if (moved == 0) return Clock::time_point::max();  // taken by the lane, not started yet
  return Clock::time_point(Clock::duration(moved)) +
         std::chrono::milliseconds(settings_.data_timeout_ms);
}

void EngineCore::checkCopyStalls(Clock::time_point now) {
  // Failing a peer takes its runs that have not started out of local_runs_: look again after
  // each.
  for (bool failed = true; failed;) {
    failed = false;
    for (const auto& run : local_runs_) {
      if (now < copyStallDue(*run)) continue;
      auto found = peers_by_serial_.find(run->peer_serial);
      if (found == peers_by_serial_.end()) continue;
      Peer* peer = found->second;
      failPeer(peer,
               Status(StatusCode::kTimeout,
                      strfmt("a copy from the memory of peer '%s' (process %d) moved no byte for "
                             "%u ms (data_timeout_ms): a page it named does not come into memory "
                             "(a userfaultfd nobody serves, a hung file mapping); the copy ends "
                             "with that process, and so do the transfers that wait for it",
                             peer->name.c_str(), run->job->read_from->pid(),
                             settings_.data_timeout_ms)));
      failed = true;
      break;
    }
  }
}

void EngineCore::finishLocalRun(Peer* peer, LocalRun& run, Status status) {
  registry_.unpin(run.target_pins);
  run.target_pins.clear();
  run.target_fences.clear();
  if (run.owner != LocalRun::Owner::kSelf) return finishDirectRun(peer, run, status);
  if (status.isOk() && run.notification && peer != nullptr &&
      !deliverNotification(peer, std::move(*run.notification))) {
    // More notifications wait than the application has taken: the same bound that fails a peer
    // over the network fails this one (and the run with it).
    status = peer->failure;
  }
  for (auto& t : run.runs) {
    if (t->released()) {
      // The release waited for the copies: nothing touches the memory any more.
      t->stage = OpStage::kIdle;
      completeRelease(t.get());
    } else {
      endRun(t.get(), status);
    }
  }
}

void EngineCore::abandonLocalRun(size_t index, const Status& why) {
  LocalRun& run = *local_runs_[index];
  if (run.failure.isOk()) run.failure = why;
  // A job not started (waiting here, or queued on the copy thread) is taken back: it never runs.
  if (!LocalCopier::trySkip(*run.job)) return;  // its copies run: it ends once they are done
  std::unique_ptr<LocalRun> taken = std::move(local_runs_[index]);
  local_runs_.erase(local_runs_.begin() + static_cast<std::ptrdiff_t>(index));
  auto peer = peers_by_serial_.find(taken->peer_serial);
  finishLocalRun(peer == peers_by_serial_.end() ? nullptr : peer->second, *taken, why);
}

void EngineCore::releaseLocalRun(const Transfer& t, const Status& why) {
  abandonGatedRuns(nullptr, &t, why);
  for (size_t i = 0; i < local_runs_.size(); ++i) {
    const auto& runs = local_runs_[i]->runs;
    if (std::none_of(runs.begin(), runs.end(), [&t](const auto& r) { return r.get() == &t; })) {
      continue;
    }
    // A send released with its recv matched fails the recv too, as over the network.
    abandonLocalRun(i, why);
    return;
  }
}

void EngineCore::abandonLocalRuns(const Peer& peer, const Status& why) {
  abandonGatedRuns(&peer, nullptr, why);
  for (size_t i = 0; i < local_runs_.size();) {
    const size_t before = local_runs_.size();
    if (local_runs_[i]->peer_serial == peer.serial) {
      // The connection its frames and accounting belonged to is gone.
      local_runs_[i]->peer_lost = true;
      abandonLocalRun(i, why);
    }
    if (local_runs_.size() == before) ++i;  // still there (copying, or another peer's)
  }
}

void EngineCore::drainLocalRuns() {
  // failPeer took back every run that had not started; the others land before they complete.
  if (copier_) copier_->waitIdle();
  for (auto& [device, queue] : local_queues_) (void)queue->sync();
  // Gated READs: every gate was opened with its peer's end.
  for (auto& [device, queue] : gated_queues_) (void)queue->sync();
  driveGatedRuns();
  driveLocalRuns();
  for (size_t i = 0; i < local_runs_.size();) {  // none is expected
    const size_t before = local_runs_.size();
    abandonLocalRun(i, Status(StatusCode::kRemoteDisconnected, "engine shut down"));
    if (local_runs_.size() == before) ++i;
  }
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
  if (!isSelf(*peer)) return false;
  // sendNotification refused anything over max_notification_size: our own limit is the limit.
  const bool behind_runs = std::any_of(local_runs_.begin(), local_runs_.end(),
                                       [peer](auto& r) { return r->lane == peer->copy_lane; });
  if (!behind_runs) {
    (void)deliverNotification(peer, std::move(text));
    return true;
  }
  // Behind the runs posted before it: a job without copies keeps its place in the order.
  auto run = std::make_unique<LocalRun>();
  run->notification = std::move(text);
  run->job = std::make_shared<LocalCopier::Job>();
  queueLocalRun(peer, std::move(run), SegmentList(), SegmentList(), 0);
  return true;
}

}  // namespace tcpx::engine
