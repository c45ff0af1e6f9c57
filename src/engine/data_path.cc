// Chunks over channel windows: where chunks are scheduled, tested and receives consumed.
//
// Per direction, streams form a FIFO in announcement order. Each channel walks that FIFO with its
// own cursor, taking the chunks that map to it (ChunkPlan), and keeps at most its window of
// requests outstanding. Completed requests leave the window strictly oldest first; a completed
// receive is released with irecvConsumed right away (data goes straight into its destination with
// the socket transport; an unpacking transport copies before this point).
#include <algorithm>

#include "common/log.h"
#include "common/strings.h"
#include "engine/engine_core.h"

namespace tcpx::engine {

Stream* EngineCore::addStream(Peer* peer, Direction& dir, uint64_t first_chunk, uint64_t total,
                              const SegmentList* segments, StreamOwner owner, uint64_t owner_id) {
  auto stream = std::make_unique<Stream>();
  stream->first_chunk = first_chunk;
  // Two chunks per channel: with the socket transport's default, consecutive requests of a channel
  // alternate between its sockets.
  stream->chunk_size = ChunkPlan::chunkSizeFor(total, peer->chunk_size, 2 * peer->channels);
  stream->nchunks = ChunkPlan::chunkCount(total, stream->chunk_size);
  stream->total = total;
  stream->segments = segments;
  stream->owner = owner;
  stream->owner_id = owner_id;
  dir.next_chunk = first_chunk + stream->nchunks;
  Stream* raw = stream.get();
  dir.streams.push_back(std::move(stream));
  return raw;
}

Stream* EngineCore::nextChunk(Direction& dir, uint32_t channel, uint32_t* chunk) {
  ChannelCursor& cur = dir.cursors[channel];
  for (;;) {
    const uint64_t index = cur.stream_seq - dir.front_seq;
    if (index >= dir.streams.size()) return nullptr;
    Stream* s = dir.streams[index].get();
    if (cur.chunk == ChannelCursor::kNotStarted) {
      cur.chunk = ChunkPlan::firstChunkOnChannel(s->first_chunk, channel, dir.channels());
    }
    if (cur.chunk < s->nchunks) {
      *chunk = cur.chunk;
      return s;
    }
    ++cur.stream_seq;
    cur.chunk = ChannelCursor::kNotStarted;
  }
}

void EngineCore::retireStreams(Direction& dir) {
  while (!dir.streams.empty() && dir.streams.front()->complete()) {
    dir.streams.pop_front();
    ++dir.front_seq;
  }
  // A channel with no chunk in a retired stream may still point at it.
  for (ChannelCursor& cur : dir.cursors) {
    if (cur.stream_seq < dir.front_seq) {
      cur.stream_seq = dir.front_seq;
      cur.chunk = ChannelCursor::kNotStarted;
    }
  }
}

void EngineCore::driveData(Peer* peer) {
  if (!peer->control || peer->out.channels() == 0) return;
  // A few rounds: completions free window slots that the next round fills.
  for (int round = 0; round < 4; ++round) {
    bool progress = false;
    for (Direction* dir : {&peer->out, &peer->in}) {
      for (uint32_t ch = 0; ch < dir->channels(); ++ch) {
        if (dir->comms[ch] == nullptr) continue;
        progress |= testChannel(peer, *dir, ch);
        if (!peer->control) return;  // the peer failed
        progress |= postChannel(peer, *dir, ch);
        if (!peer->control) return;
      }
    }
    if (!progress) break;
  }
  retireStreams(peer->out);
  retireStreams(peer->in);
}

bool EngineCore::testChannel(Peer* peer, Direction& dir, uint32_t channel) {
  ChannelWindow& window = dir.windows[channel];
  void* comm = dir.comms[channel];
  bool any = false;
  while (!window.empty()) {
    ChannelSlot& slot = window.oldest();
    int done = 0;
    size_t size = 0;
    transport::NetResult rc = transport_->test(slot.request, &done, &size);
    if (rc == transport::NetResult::kSuccess && done != 0 && !dir.sending) {
      rc = transport_->irecvConsumed(static_cast<transport::RecvComm*>(comm), slot.request);
    }
    if (rc != transport::NetResult::kSuccess) {
      const std::string detail = transport_->commError(comm);
      failPeer(peer, Status(StatusCode::kRemoteDisconnected,
                            strfmt("%s channel %u, chunk %u: transport reported %s%s%s",
                                   dir.sending ? "send" : "receive", channel, slot.chunk,
                                   transport::netResultName(rc), detail.empty() ? "" : ": ",
                                   detail.c_str())));
      return false;
    }
    if (done == 0) {
      if (transport_->completionFd() < 0) poll_needed_ = true;
      break;
    }
    Stream* stream = slot.stream;
    window.popOldest();
    --stream->in_transport;
    ++stream->done;
    any = true;
    onChunkLeftTransport(peer, stream);
    if (stream->complete()) onStreamDone(peer, stream);
    if (!peer->control) return any;
  }
  return any;
}

bool EngineCore::postChannel(Peer* peer, Direction& dir, uint32_t channel) {
  ChannelWindow& window = dir.windows[channel];
  void* comm = dir.comms[channel];
  bool any = false;
  while (!window.full()) {
    uint32_t chunk = 0;
    Stream* stream = nextChunk(dir, channel, &chunk);
    if (stream == nullptr) break;
    const auto [begin, end] = ChunkPlan::chunkRange(stream->total, stream->chunk_size, chunk);
    const transport::IoSlice* slices = nullptr;
    int nslices = 0;
    size_t offset = 0;
    if (stream->segments != nullptr && !stream->detached) {
      const auto [index, start] = stream->segments->locate(begin);
      slices = stream->segments->slices() + index;
      nslices = static_cast<int>(std::min<size_t>(stream->segments->count() - index, INT32_MAX));
      offset = begin - start;
    }
    transport::Request* request = nullptr;
    const transport::NetResult rc =
        dir.sending ? transport_->isend(static_cast<transport::SendComm*>(comm), slices, nslices,
                                        offset, end - begin, 0, nullptr, &request)
                    : transport_->irecv(static_cast<transport::RecvComm*>(comm), slices, nslices,
                                        offset, end - begin, 0, nullptr, &request);
    if (rc != transport::NetResult::kSuccess) {
      const std::string detail = transport_->commError(comm);
      failPeer(peer, Status(StatusCode::kRemoteDisconnected,
                            strfmt("%s channel %u: posting chunk %u failed (%s)%s%s",
                                   dir.sending ? "send" : "receive", channel, chunk,
                                   transport::netResultName(rc), detail.empty() ? "" : ": ",
                                   detail.c_str())));
      return false;
    }
    if (request == nullptr) {
      poll_needed_ = true;  // the transport is busy: retry without waiting for an event
      break;
    }
    ChannelSlot& slot = window.push();
    slot.stream = stream;
    slot.chunk = chunk;
    slot.request = request;
    ++stream->in_transport;
    dir.cursors[channel].chunk += dir.channels();
    any = true;
  }
  return any;
}

void EngineCore::onChunkLeftTransport(Peer* peer, Stream* stream) {
  if (stream->in_transport != 0 || !stream->detached) return;
  // A released transfer waits until none of its chunks can touch its memory any more.
  switch (stream->owner) {
    case StreamOwner::kInitiatorWrite:
    case StreamOwner::kInitiatorRead:
    case StreamOwner::kSend:
    case StreamOwner::kRecv: {
      auto it = peer->initiated.find(stream->owner_id);
      if (it != peer->initiated.end() && it->second->release_waiter) {
        it->second->release_waiter->complete(Status());
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
    case StreamOwner::kSend: {
      auto it = peer->initiated.find(stream->owner_id);
      if (it == peer->initiated.end()) return;
      std::shared_ptr<Transfer> t = it->second;
      t->stream = nullptr;
      t->local_done = true;
      maybeFinish(peer, t);
      return;
    }
    case StreamOwner::kInitiatorRead: {
      auto it = peer->initiated.find(stream->owner_id);
      if (it == peer->initiated.end()) return;
      std::shared_ptr<Transfer> t = it->second;
      t->stream = nullptr;
      t->local_done = true;
      if (!t->canceled && t->notification) {
        control::encodeNotification(*t->notification, peer->control->out());
      }
      maybeFinish(peer, t);
      return;
    }
    case StreamOwner::kRecv: {
      auto it = peer->initiated.find(stream->owner_id);
      if (it == peer->initiated.end()) return;
      std::shared_ptr<Transfer> t = it->second;
      t->stream = nullptr;
      const bool kept = !t->canceled && !t->peer_canceled;
      control::encodeSendDone({t->peer_send_id, kept ? StatusCode::kOk : StatusCode::kCanceled, ""},
                              peer->control->out());
      finishTransfer(peer, t,
                     kept ? Status() : Status(StatusCode::kCanceled, "sender released the send"));
      return;
    }
    case StreamOwner::kTargetWrite: {
      auto it = peer->target_ops.find(stream->owner_id);
      if (it == peer->target_ops.end()) return;
      TargetOp& op = *it->second;
      Status st = op.canceled ? Status(StatusCode::kCanceled, "the initiator released the transfer")
                              : op.status;
      // The notification is queued before WRITE_DONE leaves: the initiator's completion implies
      // the target can already see it.
      if (st.isOk() && op.has_notification) deliverNotification(peer, std::move(op.notification));
      registry_.unpin(op.pinned);
      control::encodeWriteDone({op.xfer_id, st.code(), st.message()}, peer->control->out());
      peer->target_ops.erase(it);
      return;
    }
    case StreamOwner::kTargetRead: {
      auto it = peer->target_ops.find(stream->owner_id);
      if (it == peer->target_ops.end()) return;
      registry_.unpin(it->second->pinned);
      peer->target_ops.erase(it);
      return;
    }
  }
}

}  // namespace tcpx::engine
