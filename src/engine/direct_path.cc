// Direct copies between the processes of two engines on one host (same_host_copy).
//
// Both engines offer their process in the handshake (control::DirectOffer: its pid and a cookie
// at an address in its memory). A READ or WRITE too large to travel inline then moves its bytes
// by one copy between the two processes' memory instead of through the kernel's TCP stack
// twice, made by the process whose memory is written, reading the other's:
//   - host memory on both sides: process_vm_readv (cross-memory attach, common/cross_memory.h);
//   - GPU memory on the side that is read: CUDA IPC. The reader maps the other's allocation
//     once per connection (gpu::IpcMapping) and copies on its own GPU streams into host or GPU
//     memory (local_path.cc's copy queues or copy thread).
// Frames:
//   - WRITE: WRITE_REQUEST carries the initiator's source ranges (and IPC handles); the target
//     validates and pins its destination as for any request, reads the source into it and
//     answers WRITE_DONE (its notification delivered first). A WRITE from GPU memory without a
//     notification that is the initiator's only transfer in flight to the peer asks
//     (want_signal) to hear of its copy as soon as the target queued it on a GPU: WRITE_QUEUED
//     carries the copy queue's completion signal (an interprocess CUDA event recorded after
//     the copy), which the initiator polls while the answer is due (directAnswerPoll); the
//     WRITE ends for its application when the signal is reached or WRITE_DONE comes, whichever
//     is first. So the answer crosses the connection while the copy runs instead of after it.
//     The signal is recorded again only once the target saw it reached, so a late poll can only
//     report a later copy's end, never one before this copy's; a signal that cannot be read
//     leaves it to WRITE_DONE. The initiator's id stays counted among its requests until
//     WRITE_DONE comes.
//   - READ: READ_REQUEST asks for it; the target validates and pins its source and answers
//     READ_RESPONSE with the source's ranges; the initiator reads them into its destination and
//     answers READ_DONE, upon which the target unpins. A READ of an allocation the initiator
//     mapped before may be gated instead: its copy queued before the answer (gated_read.cc).
//   - Freeing a shared GPU allocation: deregisterMemory of its last region sends IPC_CLOSE to
//     every peer its handle went to and returns once each answered IPC_CLOSED (it unmapped it,
//     after the runs reading it) or was failed: CUDA leaves freeing memory another process
//     still maps undefined.
// Invariants: no process ever writes another's memory (but for the engine's own gate word of a
// gated READ, gated_read.cc), so a late copy can never land in memory
// its owner deregistered or freed; the ranges a peer reads stay pinned (deregistration waits)
// until it says it is done or its connection ends; GPU memory is read only after the work its
// owner queued before the post (initiator) or the request's arrival (target) on the legacy
// default stream (kFencing: the fences are polled before the ranges are given out); a WRITE's
// notification is delivered only once its bytes are in place, as over the channels. A peer that
// does not finish a direct operation within data_timeout_ms is failed with TIMEOUT.
//
// Before this process first reads a peer's host memory, it reads the peer's cookie back: a pid
// of another pid namespace, or a kernel that does not allow the read (ptrace rules), makes it
// refuse direct copies from that peer with NOT_SUPPORTED (its WRITEs) or not ask for them (our
// READs); so does an allocation CUDA cannot map here. The initiator runs a refused transfer
// again over the data channels. Mixed host and GPU memory on the side that is read, host memory
// read into GPU memory, and GPU memory CUDA cannot share (VMM memory without a file-descriptor
// handle type, managed memory) take the channels.
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

namespace {

// The engines of this process, by uuid: a peer offering our pid is one of them or nobody (a
// process of another pid namespace with the same number).
std::mutex g_in_process_mu;
std::unordered_map<std::string, const EngineCore*>& inProcess() {
  static auto* engines = new std::unordered_map<std::string, const EngineCore*>;
  return *engines;
}

}  // namespace

void EngineCore::listInProcess(bool listed) {
  std::lock_guard<std::mutex> lock(g_in_process_mu);
  if (listed) {
    inProcess()[uuid_] = this;
  } else {
    inProcess().erase(uuid_);
  }
}

bool EngineCore::inPeerRegistrations(const Peer& peer,
                                     std::span<const control::DirectPiece> pieces) const {
  std::lock_guard<std::mutex> lock(g_in_process_mu);
  auto it = inProcess().find(peer.uuid);
  if (it == inProcess().end()) return false;
  return std::all_of(pieces.begin(), pieces.end(), [&](const control::DirectPiece& p) {
    return it->second->registry_.covers(p.addr, p.length);
  });
}

void EngineCore::adoptDirect(Peer* peer, const control::DirectOffer& ours,
                             const control::DirectOffer& theirs, int fd) {
  peer->direct.reset();
  if (ours.pid == 0 || theirs.pid == 0) return;
  const auto pid = static_cast<pid_t>(theirs.pid);
  DirectLink link;
  link.cookie_addr = theirs.cookie_addr;
  link.cookie = theirs.cookie;
  // The offer names the process to read: only the one holding the peer's end of this control
  // connection is the peer. A peer elsewhere claiming our host has no end here; one here may not
  // name another process (a thread of ours, an engine whose offer it learned), nor pass for an
  // engine of this process by claiming its uuid.
  auto end = net::localPeerSocket(fd);
  if (!end.isOk()) {
    LOG_INFO(
        "peer '%s' offers direct copies but is not a process of this host's network "
        "namespace: its data takes the channels",
        peer->name.c_str());
    return;
  }
  // Pinned down first: the process checked below is then the one every later read reads (a
  // pid of a process that ended may name another one).
  auto process = ReadableProcess::open(pid);
  Status holds = process.isOk() ? processHoldsSocket(pid, end->inode) : process.status();
  if (holds.isOk()) holds = process->running();
  if (!holds.isOk()) {
    LOG_INFO(
        "peer '%s' offers direct copies from process %d, which is not the peer (%s): its "
        "data takes the channels",
        peer->name.c_str(), static_cast<int>(pid), holds.message().c_str());
    return;
  }
  if (pid == ::getpid()) {
    std::lock_guard<std::mutex> lock(g_in_process_mu);
    link.same_process = inProcess().count(peer->uuid) != 0;
    if (!link.same_process) {
      LOG_INFO(
          "peer '%s' offers direct copies from this process but is no engine of it: its data "
          "takes the channels",
          peer->name.c_str());
      return;
    }
  } else if (end->uid != ::geteuid()) {
    // Only a process running as our user, which may read our memory anyway.
    LOG_INFO(
        "peer '%s' offers direct copies but runs as another user: its data takes the "
        "channels",
        peer->name.c_str());
    return;
  }
  link.process = std::move(process.value());
  peer->direct = std::move(link);
}

void EngineCore::directProgress(Peer* peer) {
  peer->direct_progress_at = Clock::now();
}

std::chrono::microseconds EngineCore::directAnswerPoll(uint64_t bytes) {
  // The answer comes after a hop each way and the copy: the hops take tens of microseconds, a
  // copy between GPU allocations about one per MiB (H200: 64 MiB in some 45). A host copy is
  // slower; its answer, once the window closed, costs one wake-up against milliseconds of copy.
  // Bounded, so a peer that is slow to answer costs a core for two milliseconds at most.
  constexpr auto kHops = std::chrono::microseconds(100);
  constexpr auto kMost = std::chrono::microseconds(2000);
  return std::min(kMost, kHops + std::chrono::microseconds(bytes >> 20));
}

bool EngineCore::mayReadPeer(Peer* peer) {
  if (!peer->direct) return false;
  DirectLink& link = *peer->direct;
  if (link.we_read_peer == DirectLink::Reach::kUnprobed && !link.same_process &&
      link.process->pagemapError().empty()) {
    // The probe reads the peer's cookie on this thread: not while its page is out of the peer's
    // memory (swapped out, or being migrated), which a fault nobody serves could hold. This
    // transfer takes the data channels; a later one probes again.
    const CrossPiece cookie{nullptr, link.cookie_addr, link.cookie.size()};
    if (!link.process->pagesPresent({&cookie, 1})) return false;
  }
  if (link.we_read_peer == DirectLink::Reach::kUnprobed) {
    // Another engine of this process: nothing to prove (its ranges are checked against its
    // registrations instead).
    const Status st =
        link.same_process ? Status() : probeProcess(*link.process, link.cookie_addr, link.cookie);
    if (st.isOk()) {
      link.we_read_peer = DirectLink::Reach::kReadable;
      LOG_DEBUG("peer '%s' (process %d): direct copies on this host", peer->name.c_str(),
                static_cast<int>(link.process->pid()));
    } else {
      link.we_read_peer = DirectLink::Reach::kUnreadable;
      link.unreadable_why = st.message();
      LOG_INFO(
          "peer '%s': no direct copies from its host memory (%s); its bytes take the data "
          "channels",
          peer->name.c_str(), st.message().c_str());
    }
  }
  return link.we_read_peer == DirectLink::Reach::kReadable;
}

bool EngineCore::shareable(std::span<const MemoryId> ids) const {
  // A region being deregistered is out of the registry's lookups: its allocations may be about
  // to be closed, so they are handed to no new peer.
  return std::all_of(ids.begin(), ids.end(),
                     [this](MemoryId id) { return registry_.find(id).isOk(); }) &&
         ipc_exports_.shareable(ids);
}

EngineCore::DirectKind EngineCore::directKind(Peer* peer, const Transfer& t) {
  if (!peer->direct || t.direct_refused) return DirectKind::kNone;
  if (t.kind != XferKind::kRead && t.kind != XferKind::kWrite) return DirectKind::kNone;
  const DirectLink& link = *peer->direct;
  // t.devices: the distinct GPUs of the local memory, found when the transfer was prepared.
  const bool local_host = t.devices.empty();
  const bool local_device =
      t.devices.size() == 1 && t.local.allOnDevice(0, t.total, t.devices.front());
  // What travels inline stays inline (one frame is cheaper than a copy between processes), but
  // for a WRITE from GPU memory into GPU memory: inline, its bytes are copied twice (into our
  // inline slot and out of the target's) and each copy is waited for; directly, once. (Small
  // READs stay inline: a direct READ waits for the target's fence before the answer, and with
  // many in flight ran at half the inline rate; docs/PERFORMANCE.md.)
  const bool gpu_write = t.kind == XferKind::kWrite && local_device && t.remote_all_device;
  if (!gpu_write && travelsInline(t.total, peer->announced)) return DirectKind::kNone;
  if (t.kind == XferKind::kWrite) {
    // The target reads our source: host memory into host memory, or our GPU memory (shared by
    // CUDA IPC) into anything.
    if (local_host && !t.remote_on_device) {
      return link.peer_reads_us ? DirectKind::kHost : DirectKind::kNone;
    }
    if (local_device && link.peer_maps_us && shareable(t.regions)) {
      return DirectKind::kDevice;
    }
    return DirectKind::kNone;
  }
  // We read the target's source.
  if (local_host && !t.remote_on_device) {
    return mayReadPeer(peer) ? DirectKind::kHost : DirectKind::kNone;
  }
  if (t.remote_all_device && link.we_map_peer) return DirectKind::kDevice;
  return DirectKind::kNone;
}

bool EngineCore::directPieces(Peer* peer, const SegmentList& segments,
                              std::span<const MemoryId> regions,
                              std::vector<control::DirectPiece>* pieces,
                              std::vector<control::IpcHandle>* handles) {
  if (!segments.anyDevice()) {
    *pieces = piecesOf(segments);  // no more than the descriptors both sides checked
    return true;
  }
  if (!shareable(regions)) return false;
  std::unordered_map<uint64_t, uint32_t> handle_of;  // allocation base -> handle index
  for (const transport::IoSlice& s : segments.vector()) {
    // A range over the end of an allocation (VMM memory mapped back to back) is cut there: the
    // peer maps each allocation on its own.
    const auto begin = reinterpret_cast<uint64_t>(s.data);
    for (uint64_t addr = begin; addr < begin + s.size;) {
      auto ipc = ipc_exports_.covering(regions, addr);
      if (ipc == nullptr) return false;
      const uint64_t length = std::min(begin + s.size, ipc->base + ipc->size) - addr;
      auto [known, added] =
          handle_of.try_emplace(ipc->base, static_cast<uint32_t>(handles->size()));
      if (added) handles->push_back({ipc->handle, ipc->base, ipc->size, ipc->bus_id});
      pieces->push_back({addr, length, known->second});
      addr += length;
    }
  }
  // The peer takes no frame with more pieces than its max_descriptors: the transfer's
  // descriptors are within it, but cuts at allocation boundaries add pieces.
  if (pieces->size() > peer->agreed.peer_max_descriptors) return false;
  for (const auto& [base, index] : handle_of) peer->ipc_sent.insert(base);
  return true;
}

Status EngineCore::mapPeerPieces(Peer* peer, std::span<const control::DirectPiece> pieces,
                                 std::span<const control::IpcHandle> handles, SegmentList* out,
                                 LocalRun* run) {
  DirectLink& link = *peer->direct;
  if (link.same_process) {
    // The peer is an engine of this process: its registered memory is ours to address (CUDA
    // refuses to open a handle in the process that exported it).
    if (!inPeerRegistrations(*peer, pieces)) {
      return Status(StatusCode::kRemoteRejected, "ranges outside the peer's registrations");
    }
    for (const control::DirectPiece& p : pieces) {
      void* at = reinterpret_cast<void*>(p.addr);
      out->add(at, p.length, gpu::deviceOf(at));
    }
    return {};
  }
  std::vector<std::shared_ptr<gpu::IpcMapping>> mapped(handles.size());
  const uint64_t use = ++link.uses;
  for (size_t i = 0; i < handles.size(); ++i) {
    const control::IpcHandle& h = handles[i];
    auto it = link.mappings.find(h.base);
    if (it != link.mappings.end() && it->second.handle == h.handle &&
        it->second.mapping->size() == h.size) {
      it->second.last_use = use;
      mapped[i] = it->second.mapping;
      continue;
    }
    if (it != link.mappings.end()) {
      // Another allocation at that address now: the old one is gone from the peer (it would
      // have asked us to unmap it first), so let the old mapping go with its last run.
      link.closing.push_back({h.base, std::move(it->second.mapping), /*answer=*/false});
      link.mappings.erase(it);
    }
    if (link.mappings.size() >= settings_.ipc_mappings_per_peer && !releaseIdleMapping(link)) {
      // For this request only: the next one may find an idle mapping to release.
      return Status(StatusCode::kResourceExhausted,
                    strfmt("this engine holds %zu mappings of the peer's GPU memory, all in use "
                           "(ipc_mappings_per_peer)",
                           link.mappings.size()));
    }
    // A VMM allocation's descriptor is taken from the peer's process: only from a process
    // proven to be the peer's (the cookie read back).
    auto opened = gpu::IpcMapping::open({h.handle, h.base, h.size, h.bus_id, nullptr},
                                        mayReadPeer(peer) ? link.process->pid() : 0);
    if (!opened.isOk()) return opened.status();
    std::shared_ptr<gpu::IpcMapping> mapping = std::move(opened.value());
    link.mappings[h.base] = {h.handle, mapping, use};
    mapped[i] = std::move(mapping);
  }
  for (const control::DirectPiece& p : pieces) {
    const control::IpcHandle& h = handles[p.handle];
    const gpu::IpcMapping& m = *mapped[p.handle];
    out->add(m.base() + (p.addr - h.base), p.length, m.device());
  }
  run->mappings = std::move(mapped);
  return {};
}

bool EngineCore::releaseIdleMapping(DirectLink& link) {
  // Idle: only the cache holds it (no run copies from it, and this request took none yet, as
  // the mappings it took are held in its `mapped`).
  auto oldest = link.mappings.end();
  for (auto it = link.mappings.begin(); it != link.mappings.end(); ++it) {
    if (it->second.mapping.use_count() == 1 &&
        (oldest == link.mappings.end() || it->second.last_use < oldest->second.last_use)) {
      oldest = it;
    }
  }
  if (oldest == link.mappings.end()) return false;
  // Unmapped now; an IPC_CLOSE of it later finds nothing mapped and is answered at once.
  link.mappings.erase(oldest);
  return true;
}

void EngineCore::closeReleasedMappings(Peer* peer) {
  if (!peer->direct || peer->direct->closing.empty() || !peer->control) return;
  auto& closing = peer->direct->closing;
  for (size_t i = 0; i < closing.size();) {
    if (closing[i].mapping.use_count() > 1) {
      ++i;
      continue;
    }
    closing[i].mapping.reset();  // unmapped here
    if (closing[i].answer) {
      control::encodeIpc(control::FrameType::kIpcClosed, closing[i].base, peer->control->out());
    }
    closing.erase(closing.begin() + static_cast<std::ptrdiff_t>(i));
  }
}

void EngineCore::onIpcClose(Peer* peer, std::string_view payload) {
  uint64_t base = 0;
  Status st = control::decodeIpc(payload, &base);
  if (!st.isOk()) return protocolError(peer, st);
  if (!directAgreed(peer, control::FrameType::kIpcClose)) return;
  auto& link = *peer->direct;
  auto it = link.mappings.find(base);
  if (it == link.mappings.end()) {
    // Never mapped here (or replaced already): nothing holds it.
    control::encodeIpc(control::FrameType::kIpcClosed, base, peer->control->out());
    return;
  }
  link.closing.push_back({base, std::move(it->second.mapping), /*answer=*/true});
  link.mappings.erase(it);
  closeReleasedMappings(peer);
}

void EngineCore::onIpcClosed(Peer* peer, std::string_view payload) {
  uint64_t base = 0;
  Status st = control::decodeIpc(payload, &base);
  if (!st.isOk()) return protocolError(peer, st);
  auto it = unexports_.find(base);
  auto mine = it == unexports_.end()
                  ? std::vector<uint64_t>::iterator{}
                  : std::find(it->second.peers.begin(), it->second.peers.end(), peer->serial);
  if (it == unexports_.end() || mine == it->second.peers.end()) {
    return protocolError(peer, Status(StatusCode::kProtocolError,
                                      "IPC_CLOSED of an allocation this engine did not close"));
  }
  it->second.peers.erase(mine);
  if (it->second.peers.empty()) {
    for (auto& waiter : it->second.waiters) waiter->complete(Status());
    unexports_.erase(it);
  }
}

Status EngineCore::unexportIpc(uint64_t base) {
  Command cmd;
  cmd.kind = Command::Kind::kUnexport;
  cmd.base = base;
  return submitAndWait(std::move(cmd));
}

void EngineCore::handleUnexport(Command& cmd) {
  std::vector<uint64_t> asked;
  for (auto& [serial, peer] : peers_by_serial_) {
    if (peer->ipc_sent.erase(cmd.base) == 0 || !peer->control) continue;
    control::encodeIpc(control::FrameType::kIpcClose, cmd.base, peer->control->out());
    asked.push_back(serial);
  }
  auto it = unexports_.find(cmd.base);
  if (it == unexports_.end() && asked.empty()) {
    cmd.waiter->complete(Status());
    return;
  }
  // A close of the same allocation may still wait (it was registered again meanwhile): this one
  // returns with it, once every peer of either answered.
  if (it == unexports_.end()) {
    it = unexports_.emplace(cmd.base, Unexport{}).first;
    it->second.due = Clock::now() + std::chrono::milliseconds(settings_.data_timeout_ms);
  }
  it->second.peers.insert(it->second.peers.end(), asked.begin(), asked.end());
  it->second.waiters.push_back(cmd.waiter);
}

void EngineCore::dropUnexportsOf(const Peer& peer) {
  for (auto it = unexports_.begin(); it != unexports_.end();) {
    auto& waiting = it->second.peers;
    waiting.erase(std::remove(waiting.begin(), waiting.end(), peer.serial), waiting.end());
    if (waiting.empty()) {
      for (auto& waiter : it->second.waiters) waiter->complete(Status());
      it = unexports_.erase(it);
    } else {
      ++it;
    }
  }
}

void EngineCore::encodeDirectWrite(Peer* peer, const std::shared_ptr<Transfer>& t) {
  std::vector<control::DirectPiece> pieces;
  std::vector<control::IpcHandle> handles;
  if (!directPieces(peer, t->local, t->regions, &pieces, &handles)) {
    // A region of it is being deregistered, an allocation cannot be shared, or the pieces are
    // more than the peer takes: run it over the channels.
    return retryOverChannels(
        peer, t, Status(StatusCode::kNotSupported, "no direct pieces the peer can take"),
        Refusal::kHere);
  }
  control::WriteRequest m = writeRequestOf(*t);
  m.direct = true;
  m.pieces = pieces;
  m.handles = handles;
  // The signal pays only for a WRITE we wait for alone: with others in flight to the peer their
  // answers overlap anyway, and signals cost both progress threads and the copy queue (16 1 MiB
  // WRITEs in flight with a signal each ran a fifth slower). Never for a WRITE with a
  // notification: the target delivers it only when it sees the copy done, and what the
  // application sends after the WRITE completed must not overtake it.
  const DirectLink& link = *peer->direct;
  t->signal_asked = !t->devices.empty() && !t->notification && !link.same_process &&
                    link.signals_open && peer->initiated.size() == 1;
  m.want_signal = t->signal_asked;
  control::encode(m, {}, peer->control->out());
  t->direct = true;
  t->stage = OpStage::kAwaitingWriteDone;
  t->data_done = true;  // no stream: WRITE_DONE alone ends it
  startDirectDeadline(peer, OpRole::kOurs, t->wire_id);
  pollFor(directAnswerPoll(t->total));
}

bool EngineCore::directAgreed(Peer* peer, control::FrameType frame) {
  if (peer->direct) return true;
  protocolError(peer, Status(StatusCode::kProtocolError,
                             strfmt("a direct %s without direct copies agreed in the handshake",
                                    control::frameTypeName(static_cast<uint8_t>(frame)))));
  return false;
}

void EngineCore::serveDirectWrite(Peer* peer, std::unique_ptr<TargetOp> op,
                                  std::span<const control::DirectPiece> source,
                                  std::span<const control::IpcHandle> handles, bool want_signal) {
  auto run = std::make_unique<LocalRun>();
  SegmentList from;
  const bool host = source.front().handle == control::kHostPiece;
  if (op->status.isOk() && host && op->segments.anyDevice()) {
    op->status = Status(StatusCode::kNotSupported,
                        "a direct WRITE of host memory into GPU memory (it takes the data "
                        "channels)");
  }
  if (op->status.isOk() && host && !mayReadPeer(peer)) {
    op->status = Status(StatusCode::kNotSupported, peer->direct->unreadable_why);
  }
  if (op->status.isOk() && host && peer->direct->same_process &&
      !inPeerRegistrations(*peer, source)) {
    op->status = Status(StatusCode::kNotSupported, "ranges outside the peer's registrations");
  }
  if (op->status.isOk() && !host) {
    op->status = mapPeerPieces(peer, source, handles, &from, run.get());
    // RESOURCE_EXHAUSTED (every mapping in use) refuses this WRITE only; anything else tells
    // the initiator not to offer its GPU memory again.
    if (!op->status.isOk() && op->status.code() != StatusCode::kResourceExhausted) {
      op->status = Status(StatusCode::kNotSupported, op->status.message());
    }
  }
  if (!op->status.isOk()) {
    // Nothing was read: no notification, and the initiator may run it again over the channels.
    registry_.unpin(op->pinned);
    control::encodeWriteDone({op->xfer_id, op->status.code(), op->status.message()},
                             peer->control->out());
    closeReleasedMappings(peer);
    return;
  }
  run->owner = LocalRun::Owner::kPeerWrite;
  run->wire_id = op->xfer_id;
  // The run holds the destination's pins: they go when the copy is done, even if the peer fails
  // (and its op is forgotten) while it runs.
  run->target_pins = std::move(op->pinned);
  op->pinned.clear();
  run->job = std::make_shared<LocalCopier::Job>();
  op->stage = OpStage::kLocalCopy;
  const SegmentList& to = op->segments;
  if (host) {
    run->job->read_from = peer->direct->process;
    run->job->cross = crossPieces(to, source);
    run->mode = to.total() <= kImmediateCopyBytes ? LocalMode::kNow : LocalMode::kCopyThread;
    run->peer_serial = peer->serial;
    addTargetOp(peer, std::move(op));
    return enqueueLocalRun(peer, std::move(run));
  }
  // The initiator's GPU work was done before it sent the request (its fences); ours on the
  // destination comes first too. The run keeps the fences: a peer failure forgets the op while
  // the copy may still wait on them.
  run->target_fences.swap(op->fences);
  run->job->after = fenceEvents(from, to, {&run->target_fences});
  const uint64_t total = to.total();
  // CUDA opens no event handle in the process that made it: another engine of this process
  // hears WRITE_DONE alone (it never asks).
  run->signal_peer = want_signal && !peer->direct->same_process;
  TargetOp& served = *op;
  addTargetOp(peer, std::move(op));
  // Before the run is queued: a copy that is done when it is first polled ends the op.
  LOG_TRACE("peer '%s': direct WRITE %llu: %llu bytes to copy", peer->name.c_str(),
            static_cast<unsigned long long>(served.xfer_id),
            static_cast<unsigned long long>(total));
  queueLocalRun(peer, std::move(run), from, served.segments, total);
}

void EngineCore::serveDirectRead(Peer* peer, std::unique_ptr<TargetOp> op,
                                 const control::ReadRequest& m) {
  const bool host = !op->segments.anyDevice();
  if (op->status.isOk() && m.gated && (host || peer->direct->same_process)) {
    // The initiator gates only copies between GPU memory of two processes.
    registry_.unpin(op->pinned);
    op->pinned.clear();
    op->status = Status(StatusCode::kNotSupported,
                        "a gated READ of host memory, or between engines of one process");
  }
  if (op->status.isOk() && !host) {
    const auto devices = op->segments.distinctDevices();
    if (devices.size() != 1 || !op->segments.allOnDevice(0, op->segments.total(), devices[0]) ||
        !shareable(op->pinned)) {
      registry_.unpin(op->pinned);
      op->pinned.clear();
      op->status = Status(StatusCode::kNotSupported,
                          "a direct READ of memory CUDA IPC cannot share, or of host and GPU "
                          "memory at once (it takes the data channels)");
    }
  }
  if (!op->status.isOk()) {
    control::ReadResponse resp;
    resp.xfer_id = op->xfer_id;
    resp.code = op->status.code();
    resp.message = op->status.message();
    control::encode(resp, {}, peer->control->out());
    return;
  }
  if (m.gated) return serveGatedRead(peer, std::move(op), m);
  TargetOp& served = *op;
  addTargetOp(peer, std::move(op));
  if (!host && !served.fences.empty()) {
    // Our application's GPU work queued before the request arrived comes first: answered at
    // once when it is done already (a failed query is the polling's to report).
    const Result<bool> passed = served.fences.ready();
    if (!passed.isOk() || !passed.value()) {
      served.stage = OpStage::kFencing;
      direct_fences_.push_back({peer->serial, OpRole::kPeers, served.xfer_id});
      return;
    }
  }
  answerDirectRead(peer, &served);
}

void EngineCore::answerDirectRead(Peer* peer, TargetOp* op) {
  std::vector<control::DirectPiece> pieces;
  std::vector<control::IpcHandle> handles;
  if (!directPieces(peer, op->segments, op->pinned, &pieces, &handles)) {
    // A region of it is being deregistered, an allocation cannot be shared, or the pieces are
    // more than the initiator takes: no direct READ (it runs over the channels).
    control::ReadResponse refusal;
    refusal.xfer_id = op->xfer_id;
    refusal.code = StatusCode::kNotSupported;
    refusal.message = "no direct pieces of the READ's source the initiator can take";
    control::encode(refusal, {}, peer->control->out());
    return retireTargetOp(peer, op->xfer_id);
  }
  sendDirectReadAnswer(peer, op, pieces, handles, /*deadline=*/true);
}

void EngineCore::sendDirectReadAnswer(Peer* peer, TargetOp* op,
                                      std::span<const control::DirectPiece> pieces,
                                      std::span<const control::IpcHandle> handles, bool deadline) {
  // The source stays pinned until the initiator's READ_DONE (or the end of the connection).
  control::ReadResponse resp;
  resp.xfer_id = op->xfer_id;
  resp.direct = true;
  resp.pieces = pieces;
  resp.handles = handles;
  control::encode(resp, {}, peer->control->out());
  LOG_TRACE("peer '%s': direct READ %llu answered", peer->name.c_str(),
            static_cast<unsigned long long>(op->xfer_id));
  op->stage = OpStage::kAwaitingReadDone;
  if (deadline) startDirectDeadline(peer, OpRole::kPeers, op->xfer_id);
}

void EngineCore::startDirectDeadline(Peer* peer, OpRole role, uint64_t id) {
  if (peer->direct_deadlines.empty()) directProgress(peer);
  peer->direct_deadlines.push_back(
      {Clock::now() + std::chrono::milliseconds(settings_.data_timeout_ms), role, id});
}

void EngineCore::driveDirectFences() {
  for (size_t i = 0; i < direct_fences_.size();) {
    const DirectFence wait = direct_fences_[i];
    auto found = peers_by_serial_.find(wait.peer_serial);
    Peer* peer = found == peers_by_serial_.end() ? nullptr : found->second;
    const gpu::Fences* fences = nullptr;
    if (peer != nullptr && peer->control) {
      if (wait.role == OpRole::kOurs) {
        auto t = peer->initiated.find(wait.id);
        if (t != peer->initiated.end() && t->second->stage == OpStage::kFencing) {
          fences = &t->second->fences;
        }
      } else {
        auto op = peer->target_ops.find(wait.id);
        if (op != peer->target_ops.end() && op->second->stage == OpStage::kFencing) {
          fences = &op->second->fences;
        }
      }
    }
    Result<bool> ready = fences == nullptr ? Result<bool>(true) : fences->ready();
    if (fences != nullptr && ready.isOk() && !ready.value()) {
      ++i;  // polled again after computeTimeout's GPU interval
      continue;
    }
    direct_fences_.erase(direct_fences_.begin() + static_cast<std::ptrdiff_t>(i));
    if (fences == nullptr) continue;  // gone: released, or its peer failed
    if (!ready.isOk()) {
      // The fence cannot be read: the transfer fails as a staging failure would.
      if (wait.role == OpRole::kOurs) {
        const std::shared_ptr<Transfer> t = peer->initiated.at(wait.id);
        finishTransfer(peer, t, ready.status());
      } else {
        TargetOp& op = *peer->target_ops.at(wait.id);
        control::ReadResponse resp;
        resp.xfer_id = op.xfer_id;
        resp.code = ready.status().code();
        resp.message = ready.status().message();
        control::encode(resp, {}, peer->control->out());
        retireTargetOp(peer, wait.id);
      }
      continue;
    }
    fencesPassed(peer, wait);
  }
}

void EngineCore::fencesPassed(Peer* peer, const DirectFence& wait) {
  if (wait.role == OpRole::kOurs) {
    // Announced now: under a fresh id, as the ids the peer sees only grow (control/frames.h).
    const std::shared_ptr<Transfer> t = peer->initiated.at(wait.id);
    peer->initiated.erase(wait.id);
    assignWireId(peer, t);
    return encodeDirectWrite(peer, t);
  }
  answerDirectRead(peer, peer->target_ops.at(wait.id).get());
}

void EngineCore::startDirectRead(Peer* peer, const std::shared_ptr<Transfer>& t,
                                 std::span<const control::DirectPiece> source,
                                 std::span<const control::IpcHandle> handles) {
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
  run->runs = {t};
  run->job = std::make_shared<LocalCopier::Job>();
  const bool host = source.front().handle == control::kHostPiece;
  SegmentList from;
  Status st;
  if (host && t->local.anyDevice()) {
    st = Status(StatusCode::kNotSupported,
                "the target's host memory cannot be read into GPU memory");
  } else if (host && !mayReadPeer(peer)) {
    st = Status(StatusCode::kNotSupported, peer->direct->unreadable_why);
  } else if (host && peer->direct->same_process && !inPeerRegistrations(*peer, source)) {
    st = Status(StatusCode::kNotSupported, "ranges outside the peer's registrations");
  } else if (!host) {
    st = mapPeerPieces(peer, source, handles, &from, run.get());
    // Every mapping in use refuses this READ only; a handle we cannot open, all later ones.
    if (!st.isOk() && st.code() != StatusCode::kResourceExhausted) {
      peer->direct->we_map_peer = false;
    }
  }
  if (!st.isOk()) {
    // Nothing was read: the target lets its source go, and the READ runs again over the
    // channels.
    control::encodeReadDone({t->wire_id, StatusCode::kNotSupported, st.message()},
                            peer->control->out());
    closeReleasedMappings(peer);
    return retryOverChannels(peer, t, st, Refusal::kHere);
  }
  // The run owns the READ from here: a peer failure ends it only once its copy into our memory
  // is done (abandonLocalRuns), never while the copy may still write.
  peer->initiated.erase(t->wire_id);
  if (host) {
    run->job->read_from = peer->direct->process;
    run->job->cross = crossPieces(t->local, source);
    run->mode = t->total <= kImmediateCopyBytes ? LocalMode::kNow : LocalMode::kCopyThread;
    run->peer_serial = peer->serial;
    return enqueueLocalRun(peer, std::move(run));
  }
  // The target's GPU work came first (it answered after its fences); ours on the destination
  // too.
  run->job->after = fenceEvents(from, t->local, {&t->fences});
  LOG_TRACE("peer '%s': direct READ %llu: %llu bytes to copy", peer->name.c_str(),
            static_cast<unsigned long long>(t->wire_id), static_cast<unsigned long long>(t->total));
  queueLocalRun(peer, std::move(run), from, t->local, t->total);
}

void EngineCore::finishDirectRun(Peer* peer, LocalRun& run, const Status& status) {
  LOG_TRACE("direct %s %llu landed: %s",
            run.owner == LocalRun::Owner::kPeerWrite ? "WRITE" : "READ",
            static_cast<unsigned long long>(run.wire_id), status.toString().c_str());
  run.mappings.clear();  // before closeReleasedMappings looks at who holds them
  // A read of the peer's memory found its process gone: a killed process's memory goes before
  // its sockets close, so the copy can learn of the death first. The peer is dead either way.
  if (peer != nullptr && peer->control && !run.peer_lost && run.job->read_from &&
      status.code() == StatusCode::kRemoteDisconnected) {
    failPeer(peer, status);
  }
  const bool connected = peer != nullptr && peer->control && !run.peer_lost;
  if (connected) closeReleasedMappings(peer);
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
  if (run.gate) {
    const GateState gate = run.gate->state;
    // Written by the target alone (a failed copy opened it here, burned, first), or by us
    // alone after a refusal: the slot may serve again. One we opened otherwise is burned.
    if (gate == GateState::kAnswered || gate == GateState::kRefused) {
      gpu::ReadGates::giveBack(run.gate->slot);
    }
    if (gate == GateState::kAnswered && status.isOk() && connected && !t->released()) {
      t->counters->gatedRead();
    }
    if (connected && gate == GateState::kRefused) {
      // The target holds nothing of it: no READ_DONE.
      const Status& why = run.gate->refusal;
      if (!t->released() && (why.code() == StatusCode::kNotSupported ||
                             why.code() == StatusCode::kResourceExhausted)) {
        return retryOverChannels(peer, t, why, Refusal::kByPeer);
      }
      return finishTransfer(peer, t, refused(*peer, "READ", why.code(), why.message()));
    }
  }
  if (connected) {
    const Status verdict =
        t->released() ? Status(StatusCode::kCanceled, "the READ was released") : status;
    control::encodeReadDone({run.wire_id, verdict.code(), verdict.message()}, peer->control->out());
    // The kernel refused a read of the peer's memory that it allowed when the peer was probed
    // (the peer made itself non-dumpable, a security policy changed): READ_DONE above let the
    // target's source go, and this READ and every later one take the data channels.
    if (run.job->read_from && status.code() == StatusCode::kNotSupported && !t->released() &&
        peer->direct) {
      peer->direct->we_read_peer = DirectLink::Reach::kUnreadable;
      peer->direct->unreadable_why = status.message();
      return retryOverChannels(peer, t, status, Refusal::kHere);
    }
    return finishTransfer(peer, t, status);
  }
  // The connection it counted against is gone (and with it the target's pins).
  t->counted = false;
  t->stage = OpStage::kIdle;
  if (t->released()) return completeRelease(t.get());
  endRun(t.get(), status);
}

void EngineCore::retryOverChannels(Peer* peer, const std::shared_ptr<Transfer>& t,
                                   const Status& why, Refusal by) {
  LOG_INFO("peer '%s': direct copy of %s %llu refused %s (%s); it takes the data channels",
           peer->name.c_str(), xferKindName(t->kind), static_cast<unsigned long long>(t->wire_id),
           by == Refusal::kByPeer ? "by the peer" : "here", why.message().c_str());
  // The peer cannot read (or map) our source: later such WRITEs go over the channels at once.
  // RESOURCE_EXHAUSTED (its mappings of our memory all in use) refuses this WRITE only.
  if (by == Refusal::kByPeer && why.code() == StatusCode::kNotSupported &&
      t->kind == XferKind::kWrite && peer->direct) {
    (t->local.anyDevice() ? peer->direct->peer_maps_us : peer->direct->peer_reads_us) = false;
  }
  peer->initiated.erase(t->wire_id);
  if (t->counted) {
    --peer->announced;
    t->counted = false;
  }
  t->direct = false;
  t->direct_refused = true;
  t->signal_asked = false;
  t->data_done = false;
  t->local_status = Status();
  t->remote_status = Status();
  t->stream = nullptr;
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
  directProgress(peer);
  retireTargetOp(peer, m.xfer_id);
}

void EngineCore::signalQueuedWrite(const LocalRun& run, gpu::CopyQueue& queue) {
  auto found = peers_by_serial_.find(run.peer_serial);
  if (found == peers_by_serial_.end() || !found->second->control || run.peer_lost) return;
  Peer* peer = found->second;
  auto signal = queue.shareCompletion();
  if (!signal.isOk()) {
    // Every signal pending (or none can be made): WRITE_DONE alone ends it.
    LOG_DEBUG("peer '%s': direct WRITE %llu without a completion signal: %s", peer->name.c_str(),
              static_cast<unsigned long long>(run.wire_id), signal.status().toString().c_str());
    return;
  }
  control::encode(control::WriteQueued{run.wire_id, std::move(signal.value())},
                  peer->control->out());
}

void EngineCore::onWriteQueued(Peer* peer, std::string_view payload) {
  control::WriteQueued m;
  Status st = control::decode(payload, &m);
  if (!st.isOk()) return protocolError(peer, st);
  std::shared_ptr<Transfer> t =
      ourOperation(peer, control::FrameType::kWriteQueued, m.xfer_id, XferKind::kWrite);
  if (t == nullptr) return;
  if (!t->direct || !t->signal_asked) {
    return protocolError(
        peer, Status(StatusCode::kProtocolError,
                     strfmt("WRITE_QUEUED out of turn: our WRITE %llu asked for no signal%s",
                            static_cast<unsigned long long>(m.xfer_id),
                            t->direct ? "" : " (it is no direct copy)")));
  }
  t->stage = OpStage::kWriteQueued;
  directProgress(peer);
  std::shared_ptr<gpu::PeerSignal> signal = peerSignal(peer, m.signal, t->devices.front());
  if (signal == nullptr) return;
  // Polled while the answer would be due (the poll window of the request); a copy that takes
  // longer (it waits behind the target application's GPU work) is left to WRITE_DONE, which
  // wakes the loop, instead of waking it every 20 us.
  const std::chrono::microseconds window = directAnswerPoll(t->total);
  queued_writes_.push_back({peer->serial, t->wire_id, std::move(signal), Clock::now() + window});
  pollFor(window);
}

std::shared_ptr<gpu::PeerSignal> EngineCore::peerSignal(Peer* peer, const std::string& handle,
                                                        int device) {
  DirectLink& link = *peer->direct;
  if (link.same_process) return nullptr;  // CUDA opens no handle in the process that made it
  auto it = link.signals.find(handle);
  if (it != link.signals.end()) return it->second;
  if (!link.signals_open) return nullptr;
  if (link.signals.size() >= DirectLink::kMaxSignals) {
    // Full (a target with many GPUs, or queues it replaced): the signals no WRITE polls now go.
    std::erase_if(link.signals, [](const auto& entry) { return entry.second.use_count() == 1; });
    if (link.signals.size() >= DirectLink::kMaxSignals) return nullptr;
  }
  auto opened = gpu::PeerSignal::open(handle, device);
  if (!opened.isOk()) {
    link.signals_open = false;
    LOG_INFO(
        "peer '%s': its copies' completion signals cannot be opened here (%s): our direct "
        "WRITEs end with its WRITE_DONE",
        peer->name.c_str(), opened.status().toString().c_str());
    return nullptr;
  }
  std::shared_ptr<gpu::PeerSignal> signal = std::move(opened.value());
  link.signals.emplace(handle, signal);
  return signal;
}

void EngineCore::driveQueuedWrites() {
  for (size_t i = 0; i < queued_writes_.size();) {
    const QueuedWrite& q = queued_writes_[i];
    auto found = peers_by_serial_.find(q.peer_serial);
    Peer* peer = found == peers_by_serial_.end() ? nullptr : found->second;
    std::shared_ptr<Transfer> t;
    if (peer != nullptr && peer->control) {
      auto it = peer->initiated.find(q.wire_id);
      if (it != peer->initiated.end() && it->second->stage == OpStage::kWriteQueued) {
        t = it->second;
      }
    }
    // Gone (WRITE_DONE came first, or the peer failed), the signal cannot be read, or its poll
    // window closed: no longer polled (WRITE_DONE ends the WRITE).
    const Result<bool> reached = t == nullptr ? Result<bool>(false) : q.signal->reached();
    if (t != nullptr && reached.isOk() && !reached.value() && Clock::now() < q.until) {
      ++i;
      continue;
    }
    if (t != nullptr && !reached.isOk()) forgetSignal(peer, q.signal);
    const bool landed = t != nullptr && reached.isOk() && reached.value();
    queued_writes_.erase(queued_writes_.begin() + static_cast<std::ptrdiff_t>(i));
    if (!landed) continue;
    // The copy into the target's memory has landed: the WRITE is done for our application. Its
    // id stays counted until WRITE_DONE, as the target holds the operation until it sends it.
    LOG_TRACE("peer '%s': direct WRITE %llu landed (its signal)", peer->name.c_str(),
              static_cast<unsigned long long>(t->wire_id));
    peer->landed_writes.insert(t->wire_id);
    t->counted = false;
    t->stage = OpStage::kReplied;
    t->counters->signalledWrite();
    pollFor(kShortPoll);  // the caller's next post, as after WRITE_DONE
    maybeFinish(peer, t);
  }
}

void EngineCore::forgetSignal(Peer* peer, const std::shared_ptr<gpu::PeerSignal>& signal) {
  // A signal that cannot be read (the target may have destroyed its event, with the queue it
  // replaced after a failure) is not polled again for a later WRITE_QUEUED with its handle.
  if (!peer->direct) return;
  std::erase_if(peer->direct->signals, [&](const auto& entry) { return entry.second == signal; });
}

bool EngineCore::landedWriteDone(Peer* peer, const control::Completion& m) {
  if (peer->landed_writes.erase(m.xfer_id) == 0) return false;
  --peer->announced;
  directProgress(peer);
  if (m.code != StatusCode::kOk) {
    // Its signal was reached after the copy: a failure reported after it is the target's view
    // of something else (a release it saw late); the bytes had landed.
    LOG_DEBUG("peer '%s': WRITE_DONE of direct WRITE %llu, which had landed, says %s",
              peer->name.c_str(), static_cast<unsigned long long>(m.xfer_id), m.message.c_str());
  }
  return true;
}

void EngineCore::checkDirectDeadlines(Peer* peer, Clock::time_point now) {
  auto& deadlines = peer->direct_deadlines;
  while (!deadlines.empty()) {
    const DirectDeadline d = deadlines.front();
    bool pending = false;
    if (d.role == OpRole::kOurs) {
      auto it = peer->initiated.find(d.id);
      pending = (it != peer->initiated.end() && it->second->direct &&
                 (it->second->stage == OpStage::kAwaitingWriteDone ||
                  it->second->stage == OpStage::kWriteQueued)) ||
                peer->landed_writes.count(d.id) != 0;
    } else {
      auto it = peer->target_ops.find(d.id);
      pending = it != peer->target_ops.end() && it->second->stage == OpStage::kAwaitingReadDone;
    }
    if (!pending) {
      deadlines.pop_front();
      continue;
    }
    const Clock::time_point quiet_until =
        peer->direct_progress_at + std::chrono::milliseconds(settings_.data_timeout_ms);
    if (now < std::max(d.due, quiet_until)) return;
    return failPeer(
        peer, Status(StatusCode::kTimeout,
                     strfmt("peer '%s' did not finish %s %llu, nor any other direct copy, "
                            "within %u ms (data_timeout_ms): it stalled while its control "
                            "connection lives",
                            peer->name.c_str(),
                            d.role == OpRole::kOurs ? "reading our direct WRITE"
                                                    : "its direct READ of our memory",
                            static_cast<unsigned long long>(d.id), settings_.data_timeout_ms)));
  }
}

}  // namespace tcpx::engine
