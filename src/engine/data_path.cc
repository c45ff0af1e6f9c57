// Chunks over channel windows: where chunks are scheduled, staged, tested and receives consumed.
//
// Per direction, streams form a FIFO in announcement order. Each channel walks that FIFO with its
// own cursor, taking the chunks that map to it (ChunkPlan), and keeps them in its window until
// their bytes are in place. A chunk that touches GPU memory goes through one of the channel's
// pinned staging slots (the socket transport moves host memory only): on the send side its bytes
// are gathered into the slot before it is posted, on the receive side they are scattered out of
// the slot after the receive completed. Sends are posted and receives tested strictly in chunk
// order; a completed receive is released with irecvConsumed right away (its bytes are in their
// destination or in our own staging slot, never in transport-owned memory).
#include "engine/data_path.h"

#include <algorithm>
#include <atomic>

#include "common/log.h"
#include "common/strings.h"
#include "engine/chunk_plan.h"
#include "engine/retiring_channels.h"

namespace tcpx::engine {

namespace {
// Staging copies one channel starts per round of driveData (see driveSendChannel).
constexpr int kGathersPerRound = 2;

// One step of a chunk at trace level (TCPX_P2P_LOG_LEVEL=trace): where a transfer's time goes.
void traceChunk(const Peer* peer, const Direction& dir, uint32_t channel, const ChannelSlot& slot,
                const char* step) {
  if (!log::enabled(log::Level::kTrace) || slot.stream == nullptr) return;
  LOG_TRACE("peer '%s', %s channel %u, chunk %u of the stream at %llu: %s",
            peer != nullptr ? peer->name.c_str() : "", dir.sending ? "send" : "receive", channel,
            slot.chunk, static_cast<unsigned long long>(slot.stream->first_chunk), step);
}
}  // namespace

Stream* DataPath::addStream(Peer* peer, Direction& dir, uint64_t first_chunk, uint64_t total,
                            uint32_t spread, const SegmentList* segments, const gpu::Fences* fences,
                            StreamOwner owner, uint64_t owner_id) {
  auto stream = std::make_unique<Stream>();
  stream->first_chunk = first_chunk;
  stream->chunk_size = ChunkPlan::chunkSizeFor(total, peer->agreed.chunk_size, spread);
  stream->nchunks = ChunkPlan::chunkCount(total, stream->chunk_size);
  stream->total = total;
  stream->segments = segments;
  stream->fences = fences;
  stream->sends_status = dir.sending && segments != nullptr && segments->anyDevice();
  stream->owner = owner;
  stream->owner_id = owner_id;
  dir.next_chunk = first_chunk + stream->nchunks;
  LOG_TRACE("peer '%s', %s: stream at %llu of %llu bytes in %u chunks of %llu", peer->name.c_str(),
            dir.sending ? "send" : "receive", static_cast<unsigned long long>(first_chunk),
            static_cast<unsigned long long>(total), stream->nchunks,
            static_cast<unsigned long long>(stream->chunk_size));
  Stream* raw = stream.get();
  dir.streams.push_back(std::move(stream));
  return raw;
}

uint32_t DataPath::spreadFor(const Peer& peer) {
  // With the socket transport's default of two sockets per channel, consecutive requests of a
  // channel alternate between its sockets: two chunks per channel reach every socket.
  const uint32_t sockets = 2 * peer.agreed.channels;
  uint32_t moving = 0;
  // From `sockets` moving streams on the spread is 1: no need to count further.
  for (auto it = peer.out.streams.begin(); it != peer.out.streams.end() && moving < sockets; ++it) {
    if (!(*it)->complete()) ++moving;
  }
  return ChunkPlan::spreadFor(sockets, moving);
}

Stream* DataPath::nextChunk(Direction& dir, uint32_t channel, uint32_t* chunk) {
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

void DataPath::retireStreams(Direction& dir) {
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

gpu::ChannelStaging* DataPath::stagingFor(Peer* peer, Direction& dir, uint32_t channel) {
  auto& staging = dir.staging[channel];
  if (!staging) {
    const int slots = static_cast<int>(staging_slots_);
    staging = std::make_unique<gpu::ChannelStaging>(slots, peer->agreed.chunk_size);
    dir.staging_free[channel] = slots >= 32 ? ~0U : (1U << slots) - 1;
  }
  return staging.get();
}

int DataPath::takeStagingSlot(Peer* peer, Direction& dir, uint32_t channel) {
  stagingFor(peer, dir, channel);
  uint32_t& free = dir.staging_free[channel];
  if (free == 0) return -1;
  const int slot = __builtin_ctz(free);
  free &= ~(1U << slot);
  return slot;
}

void DataPath::releaseStagingSlot(Direction& dir, uint32_t channel, ChannelSlot& slot) {
  if (slot.staging < 0) return;
  dir.staging_free[channel] |= 1U << slot.staging;
  slot.staging = -1;
}

void DataPath::stagingFailed(Peer* peer, Stream* stream, const Status& why) {
  if (stream->error.isOk()) {
    LOG_WARN("peer '%s': staging GPU memory failed: %s", peer->name.c_str(), why.message().c_str());
    stream->error = why;
  }
}

void DataPath::chunkStaged(Peer* peer, Stream* stream) {
  ++stream->staged;
  // Every chunk of a stream read from GPU memory has left staging: the receiver learns whether
  // the bytes were real.
  if (stream->sends_status && stream->staged == stream->nchunks) {
    events_.onStreamStaged(peer, stream);
  }
}

ChannelSlot* DataPath::admitChunk(Peer* peer, Direction& dir, uint32_t channel) {
  uint32_t chunk = 0;
  Stream* stream = nextChunk(dir, channel, &chunk);
  if (stream == nullptr) return nullptr;
  const auto [begin, end] = ChunkPlan::chunkRange(stream->total, stream->chunk_size, chunk);
  int staging = -1;
  if (chunkNeedsStaging(dir, channel, *stream, begin, end)) {
    staging = takeStagingSlot(peer, dir, channel);
    if (staging < 0) return nullptr;  // every staging slot busy: wait for one
  }
  ChannelSlot& slot = dir.windows[channel].push();
  slot.stream = stream;
  slot.chunk = chunk;
  slot.staging = staging;
  ++stream->in_transport;
  dir.cursors[channel].chunk += dir.channels();
  return &slot;
}

void DataPath::userSlices(const Stream& stream, uint64_t begin, const transport::IoSlice** slices,
                          int* nslices, size_t* offset) {
  if (!stream.hasMemory()) return;  // filler or discard
  const auto [index, start] = stream.segments->locate(begin);
  *slices = stream.segments->slices() + index;
  *nslices = static_cast<int>(std::min<size_t>(stream.segments->count() - index, INT32_MAX));
  *offset = begin - start;
}

bool DataPath::retireOldest(Peer* peer, Direction& dir, uint32_t channel) {
  ChannelWindow& window = dir.windows[channel];
  releaseStagingSlot(dir, channel, window.oldest());
  Stream* stream = window.oldest().stream;
  window.popOldest();
  finishChunk(peer, stream);
  return peer->control != nullptr;  // completing a stream may have failed the peer
}

void DataPath::finishChunk(Peer* peer, Stream* stream) {
  --stream->in_transport;
  ++stream->done;
  if (stream->in_transport == 0 && stream->detached) events_.onStreamReleased(peer, stream);
  if (stream->complete()) events_.onStreamDone(peer, stream);
}

Clock::time_point DataPath::checkStalls(Peer* peer, Clock::time_point now) {
  Clock::time_point next = Clock::time_point::max();
  if (!peer->hasStreams()) return next;
  for (Direction* dir : {&peer->out, &peer->in}) {
    for (uint32_t ch = 0; ch < dir->channels(); ++ch) {
      const ChannelWindow& window = dir->windows[ch];
      if (window.inTransport() == 0) continue;
      // The oldest request waits for its gather (which may wait behind the application's GPU
      // work), not for the network: the clock restarts when the copy ends. (Requests in the
      // transport are the window's oldest entries; an older one still in the transport that
      // stalls is the network's, and is caught.)
      if (window.oldest().phase == SlotPhase::kFollowing) {
        next = std::min(next, now + data_timeout_);
        continue;
      }
      const Clock::time_point due = window.progressAt() + data_timeout_;
      if (now < due) {
        next = std::min(next, due);
        continue;
      }
      events_.onDataPathFailed(
          peer,
          Status(StatusCode::kTimeout,
                 strfmt("peer '%s': %s channel %u made no progress for %lld ms with %u "
                        "requests in the transport (data_timeout_ms): its data connection "
                        "is stalled or dead",
                        peer->name.c_str(), dir->sending ? "send" : "receive", ch,
                        static_cast<long long>(data_timeout_.count()), window.inTransport())));
      return Clock::time_point::max();
    }
  }
  return next;
}

void DataPath::drive(Peer* peer) {
  if (!peer->control || peer->out.channels() == 0) return;
  // The round visits every peer, most of them idle when there are many.
  if (!peer->hasStreams()) return;
  // A few rounds: completions free window slots that the next round fills, and each round
  // starts at most kGathersPerRound staging copies per channel.
  for (int round = 0; round < 8; ++round) {
    bool progress = false;
    for (uint32_t ch = 0; ch < peer->out.channels() && peer->control; ++ch) {
      if (peer->out.comms[ch] != nullptr) progress |= driveSendChannel(peer, peer->out, ch);
    }
    for (uint32_t ch = 0; ch < peer->in.channels() && peer->control; ++ch) {
      if (peer->in.comms[ch] != nullptr) progress |= driveRecvChannel(peer, peer->in, ch);
    }
    if (!peer->control) return;  // the peer failed
    hints_.data_progress = hints_.data_progress || progress;
    if (!progress) break;
  }
  retireStreams(peer->out);
  retireStreams(peer->in);
}

Status DataPath::transportFailure(Peer* peer, Direction& dir, uint32_t channel, const char* what,
                                  uint32_t chunk, transport::NetResult rc) {
  const std::string detail = transport_.commError(dir.comms[channel]);
  return Status(StatusCode::kRemoteDisconnected,
                strfmt("peer '%s', %s channel %u, chunk %u: %s failed (%s)%s%s", peer->name.c_str(),
                       dir.sending ? "send" : "receive", channel, chunk, what,
                       transport::netResultName(rc), detail.empty() ? "" : ": ", detail.c_str()));
}

bool DataPath::driveSendChannel(Peer* peer, Direction& dir, uint32_t channel) {
  ChannelWindow& window = dir.windows[channel];
  auto* comm = static_cast<transport::SendComm*>(dir.comms[channel]);
  bool any = false;

  // 0. Sends that follow their gather: once a gather's event is reached, its words are set
  // complete (the send takes the rest; a failed copy sends zeros) and the chunk passed staging.
  for (uint32_t i = 0; i < window.size(); ++i) {
    ChannelSlot& slot = window.at(i);
    if (slot.phase != SlotPhase::kFollowing) continue;
    auto ready = dir.staging[channel]->ready(slot.staging);
    if (ready.isOk() && !ready.value()) {
      hints_.gpu_pending = true;
      // A socket stops polling a copy that did not move for a while (one queued behind the
      // application's GPU work): it goes on once the copy moves, not only once it ended.
      const uint64_t seen = dir.staging[channel]->followedBytes(slot.staging);
      if (seen != slot.follow_seen) {
        slot.follow_seen = seen;
        transport_.recheckFollowing(slot.request);
      }
      continue;
    }
    if (!ready.isOk()) stagingFailed(peer, slot.stream, ready.status());
    dir.staging[channel]->gathered(slot.staging, !ready.isOk());
    transport_.recheckFollowing(slot.request);
    slot.phase = SlotPhase::kInTransport;
    // The watchdog skipped the channel while this was its oldest request.
    if (i == 0) window.progressed();
    traceChunk(peer, dir, channel, slot, "gathered while sending");
    chunkStaged(peer, slot.stream);
    any = true;
  }

  // 1. Completed sends leave the window, oldest first.
  while (!window.empty() && window.oldest().phase == SlotPhase::kInTransport) {
    ChannelSlot& slot = window.oldest();
    int done = 0;
    size_t size = 0;
    const transport::NetResult rc = transport_.test(slot.request, &done, &size);
    if (rc != transport::NetResult::kSuccess) {
      events_.onDataPathFailed(peer, transportFailure(peer, dir, channel, "send", slot.chunk, rc));
      return false;
    }
    if (done == 0) {
      if (transport_.completionFd() < 0) hints_.poll_needed = true;
      break;
    }
    window.leftTransport();
    any = true;
    traceChunk(peer, dir, channel, slot, "sent");
    if (!retireOldest(peer, dir, channel)) return any;
  }

  // 2. New chunks enter the window; those touching GPU memory start their gather. Issuing a
  // gather costs a few microseconds of CUDA calls: a few per call, so that every channel's
  // first chunk is on its way before any channel queues its whole window.
  int gathers = 0;
  while (!window.full() && gathers < kGathersPerRound) {
    ChannelSlot* admitted = admitChunk(peer, dir, channel);
    if (admitted == nullptr) break;
    ChannelSlot& slot = *admitted;
    Stream* stream = slot.stream;
    const auto [begin, end] = ChunkPlan::chunkRange(stream->total, stream->chunk_size, slot.chunk);
    const bool staged = slot.staging >= 0;
    const int staging = slot.staging;
    any = true;
    if (!staged || !stream->hasMemory()) {
      // Nothing to gather (a plugin transport still sends filler from the registered slot).
      slot.filler = !stream->hasMemory();
      slot.phase = SlotPhase::kReady;
      chunkStaged(peer, stream);
      continue;
    }
    slot.phase = SlotPhase::kStaging;
    ++gathers;
    const int device = deviceSendSource(*stream, begin, end);
    // A gather that fails is reported by ready() below, once nothing queued for the slot runs.
    if (device >= 0) {
      // Gathered on the GPU and sent from there (TCPX's zero-copy send reads GPU memory).
      dir.staging[channel]->gatherOnDevice(staging, device, *stream->segments, begin, end,
                                           stream->fences, &slot.device_data);
      slot.staged_device = device;
    } else if ((slot.follow_words = startFollowedGather(dir, channel, slot, begin, end)) !=
               nullptr) {
      // Posted below at once: the send takes the bytes as the kernel puts them in place.
    } else {
      dir.staging[channel]->gather(staging, *stream->segments, begin, end, stream->fences);
    }
    traceChunk(peer, dir, channel, slot, "gather queued");
    hints_.gpu_pending = true;
  }

  // 3. Ready chunks are posted in order while the transport window has room.
  for (uint32_t i = 0; i < window.size() && !window.transportFull(); ++i) {
    ChannelSlot& slot = window.at(i);
    if (slot.phase == SlotPhase::kInTransport || slot.phase == SlotPhase::kFollowing) continue;
    Stream* stream = slot.stream;
    if (slot.phase == SlotPhase::kStaging && slot.follow_words == nullptr) {
      auto ready = dir.staging[channel]->ready(slot.staging);
      if (ready.isOk() && !ready.value()) {
        hints_.gpu_pending = true;
        break;  // later chunks wait: sends leave in chunk order
      }
      if (!ready.isOk()) {
        stagingFailed(peer, stream, ready.status());
        dropStagedData(dir, channel, slot);
      }
      slot.phase = SlotPhase::kReady;
      traceChunk(peer, dir, channel, slot, "gathered");
      chunkStaged(peer, stream);
    }
    const auto [begin, end] = ChunkPlan::chunkRange(stream->total, stream->chunk_size, slot.chunk);
    const transport::IoSlice* slices = nullptr;
    int nslices = 0;
    size_t offset = 0;
    transport::MemHandle* mh = nullptr;
    if (slot.staging >= 0 && slot.staged_device >= 0 && !slot.filler) {
      slot.staged_slice = {slot.device_data, end - begin};
      slices = &slot.staged_slice;
      nslices = 1;
      auto handle = registeredDeviceStaging(dir, channel, slot.staged_device);
      if (!handle.isOk()) {
        events_.onDataPathFailed(peer, handle.status());
        return false;
      }
      mh = handle.value();
    } else if (slot.staging >= 0) {
      auto buffer = dir.staging[channel]->slotBuffer(slot.staging);
      if (!buffer.isOk()) {  // no pinned memory even for the filler a plugin must send
        events_.onDataPathFailed(peer, buffer.status());
        return false;
      }
      slot.staged_slice = {buffer.value(), end - begin};
      slices = &slot.staged_slice;
      nslices = 1;
      if (transport_.needsRegistration()) {
        auto handle = registeredSlot(dir, channel, slot.staging);
        if (!handle.isOk()) {
          events_.onDataPathFailed(peer, handle.status());
          return false;
        }
        mh = handle.value();
      }
    } else if (!slot.filler) {
      userSlices(*stream, begin, &slices, &nslices, &offset);
    }
    transport::Request* request = nullptr;
    const bool follows = slot.follow_words != nullptr;
    const transport::NetResult rc =
        follows ? transport_.isendFollowing(comm, slices, nslices, offset, end - begin,
                                            slot.follow_words, &request)
                : transport_.isend(comm, slices, nslices, offset, end - begin, 0, mh, &request);
    if (rc != transport::NetResult::kSuccess) {
      events_.onDataPathFailed(
          peer, transportFailure(peer, dir, channel, "posting a send", slot.chunk, rc));
      return false;
    }
    if (request == nullptr) {
      hints_.poll_needed = true;  // the transport is busy: retry without waiting for an event
      break;
    }
    slot.request = request;
    slot.phase = follows ? SlotPhase::kFollowing : SlotPhase::kInTransport;
    if (follows) peer->counters->followedChunk();
    window.enteredTransport();
    traceChunk(peer, dir, channel, slot,
               follows ? "send posted, following its gather" : "send posted");
    any = true;
  }
  return any;
}

bool DataPath::driveRecvChannel(Peer* peer, Direction& dir, uint32_t channel) {
  ChannelWindow& window = dir.windows[channel];
  auto* comm = static_cast<transport::RecvComm*>(dir.comms[channel]);
  bool any = false;

  const transport::Transport::UnpackSource* source = transport_.unpackSource(comm);
  const bool pool = recvPath(dir, channel) == RecvPath::kBouncePool;

  // 1. Posted receives complete in order; staged ones start their scatter, those in an UNPACK
  // transport's bounce pool their unpack.
  bool launch = false;
  for (uint32_t i = 0; i < window.size(); ++i) {
    ChannelSlot& slot = window.at(i);
    if (slot.phase != SlotPhase::kInTransport && slot.phase != SlotPhase::kLanding) continue;
    int done = 0;
    size_t size = 0;
    transport::NetResult rc = transport_.test(slot.request, &done, &size);
    if (rc == transport::NetResult::kSuccess && done != 0 && !pool) {
      if (source != nullptr) {
        Status st = checkNoFragments(peer, channel, slot, *source);
        if (!st.isOk()) {
          events_.onDataPathFailed(peer, st);
          return false;
        }
      }
      rc = transport_.irecvConsumed(comm, slot.request);
    }
    if (rc != transport::NetResult::kSuccess) {
      events_.onDataPathFailed(peer,
                               transportFailure(peer, dir, channel, "receive", slot.chunk, rc));
      return false;
    }
    if (done == 0) {
      if (transport_.completionFd() < 0) hints_.poll_needed = true;
      break;  // later receives are tested after this one
    }
    window.leftTransport();
    any = true;
    traceChunk(peer, dir, channel, slot, "received");
    if (pool) {
      Status st = unpackReceive(dir, channel, slot, *source);
      if (!st.isOk()) {
        events_.onDataPathFailed(
            peer, Status(st.code(),
                         strfmt("peer '%s', receive channel %u, chunk %u: %s", peer->name.c_str(),
                                channel, slot.chunk, st.message().c_str())));
        return false;
      }
      launch |= slot.phase == SlotPhase::kUnpacking;
      continue;
    }
    if (slot.phase == SlotPhase::kLanding) {
      endLanding(peer, dir, channel, slot);
      continue;
    }
    slot.phase = SlotPhase::kDone;
    if (slot.staging >= 0) startUnstaging(dir, channel, slot);
  }

  if (pool) {
    if (launch) {
      // One launch for the fragments of every receive that completed in this pass.
      auto ticket = dir.unpack_queues[channel]->launch();
      if (!ticket.isOk()) {
        events_.onDataPathFailed(peer, ticket.status());
        return false;
      }
      for (uint32_t i = 0; i < window.size(); ++i) {
        ChannelSlot& slot = window.at(i);
        if (slot.phase == SlotPhase::kUnpacking && slot.ticket == 0) slot.ticket = ticket.value();
      }
    }
    any |= completeUnpackReceives(peer, dir, channel);
    if (!peer->control) return false;
  }

  // 2. Chunks whose bytes are in place leave the window, oldest first.
  while (!window.empty()) {
    ChannelSlot& slot = window.oldest();
    if (slot.phase == SlotPhase::kUnstaging || slot.phase == SlotPhase::kLanded) {
      gpu::ChannelStaging& staging = *dir.staging[channel];
      auto ready = staging.ready(slot.staging);
      if (ready.isOk() && !ready.value()) {
        hints_.gpu_pending = true;
        break;
      }
      if (!ready.isOk()) {
        stagingFailed(peer, slot.stream, ready.status());
      } else if (slot.phase == SlotPhase::kLanded) {
        const Stream* stream = slot.stream;
        const bool wanted = !slot.filler && stream->hasMemory();
        if (wanted && staging.gaveUp(slot.staging)) {
          // No byte came for a while, and the copy left the rest: the whole chunk again.
          startUnstaging(dir, channel, slot);
          continue;
        }
        if (wanted) peer->counters->landedChunk();
      }
    } else if (slot.phase != SlotPhase::kDone) {
      break;
    }
    any = true;
    traceChunk(peer, dir, channel, slot, "in place");
    if (!retireOldest(peer, dir, channel)) return any;
  }

  // 3. New receives are posted in chunk order.
  while (!window.full() && !window.transportFull()) {
    ChannelSlot* admitted = admitChunk(peer, dir, channel);
    if (admitted == nullptr) break;
    ChannelSlot& slot = *admitted;
    Stream* stream = slot.stream;
    const uint32_t chunk = slot.chunk;
    const auto [begin, end] = ChunkPlan::chunkRange(stream->total, stream->chunk_size, chunk);
    const bool staged = slot.staging >= 0;
    const int staging = slot.staging;
    const transport::IoSlice* slices = nullptr;
    int nslices = 0;
    size_t offset = 0;
    transport::MemHandle* mh = nullptr;
    uint32_t* landed = nullptr;  // the receive reports what has landed here
    int parts = 0;
    if (pool) {
      // The bytes land in the bounce pool; the posted buffer only anchors their offsets.
      void* anchor = nullptr;
      auto handle = receiveAnchor(peer, dir, channel, &anchor);
      if (!handle.isOk()) {
        events_.onDataPathFailed(peer, handle.status());
        return false;
      }
      mh = handle.value();
      slot.staged_slice = {anchor, end - begin};
      slices = &slot.staged_slice;
      nslices = 1;
      slot.filler = !stream->hasMemory();
    } else if (staged) {
      auto buffer = dir.staging[channel]->slotBuffer(staging);
      if (buffer.isOk()) {
        slot.staged_slice = {buffer.value(), end - begin};
        slices = &slot.staged_slice;
        nslices = 1;
        // A plugin receives data nobody wants into a registered slot too; it stays there.
        slot.filler = !stream->hasMemory();
        if (transport_.needsRegistration()) {
          auto handle = registeredSlot(dir, channel, staging);
          if (!handle.isOk()) {
            events_.onDataPathFailed(peer, handle.status());
            return false;
          }
          mh = handle.value();
        } else {
          landed = landedWords(dir, channel, slot, end - begin, &parts);
        }
      } else {
        // No pinned memory: the chunk is received and dropped, the transfer fails.
        releaseStagingSlot(dir, channel, slot);
        stagingFailed(peer, stream, buffer.status());
      }
    } else {
      userSlices(*stream, begin, &slices, &nslices, &offset);
    }
    transport::Request* request = nullptr;
    const transport::NetResult rc =
        landed != nullptr
            ? transport_.irecvReporting(comm, slices, nslices, offset, end - begin, landed,
                                        &request)
            : transport_.irecv(comm, slices, nslices, offset, end - begin, 0, mh, &request);
    if (rc != transport::NetResult::kSuccess || request == nullptr) {
      // Not posted: the chunk leaves the window again and is taken next time.
      releaseStagingSlot(dir, channel, slot);
      --stream->in_transport;
      dir.cursors[channel].chunk -= dir.channels();
      window.popNewest();
      if (rc != transport::NetResult::kSuccess) {
        events_.onDataPathFailed(
            peer, transportFailure(peer, dir, channel, "posting a receive", chunk, rc));
        return false;
      }
      hints_.poll_needed = true;  // the transport is busy: retry without waiting for an event
      break;
    }
    slot.request = request;
    slot.phase = SlotPhase::kInTransport;
    // The copy on to the GPU follows the receive from now on (the transport may already have
    // landed bytes: the copy reads the counts, whenever they were stored).
    if (landed != nullptr && dir.staging[channel]->scatterAsLanded(
                                 staging, *stream->segments, begin, end, stream->fences, parts)) {
      slot.phase = SlotPhase::kLanding;
    }
    slot.meta_slot =
        static_cast<uint8_t>(dir.recv_posted[channel]++ % transport::abi::kUnpackSlots);
    window.enteredTransport();
    traceChunk(peer, dir, channel, slot, "receive posted");
    any = true;
  }
  return any;
}

const uint32_t* DataPath::startFollowedGather(Direction& dir, uint32_t channel,
                                              const ChannelSlot& slot, uint64_t begin,
                                              uint64_t end) {
  const Stream* stream = slot.stream;
  if (stream->total > follow_.followed_gather) return nullptr;
  const auto* comm = static_cast<const transport::SendComm*>(dir.comms[channel]);
  const int parts = transport_.sendParts(comm, end - begin);
  if (parts < 1 || parts > gpu::ChannelStaging::kMaxLandedParts) return nullptr;
  return dir.staging[channel]->gatherFollowed(slot.staging, *stream->segments, begin, end,
                                              stream->fences, parts);
}

uint32_t* DataPath::landedWords(Direction& dir, uint32_t channel, const ChannelSlot& slot,
                                uint64_t bytes, int* parts) {
  const Stream* stream = slot.stream;
  if (slot.filler || stream->total > follow_.landed_copy) return nullptr;
  const auto* comm = static_cast<const transport::RecvComm*>(dir.comms[channel]);
  *parts = transport_.receiveParts(comm, bytes);
  if (*parts < 1 || *parts > gpu::ChannelStaging::kMaxLandedParts) return nullptr;
  auto words = dir.staging[channel]->landedWords(slot.staging);
  return words.isOk() ? words.value() : nullptr;  // without words, the copy follows completion
}

void DataPath::endLanding(Peer* peer, Direction& dir, uint32_t channel, ChannelSlot& slot) {
  const Stream* stream = slot.stream;
  // A released transfer's copy stops (what it copied before stays: the release completes once
  // the copy has ended, as for bytes a receive writes straight into host memory).
  if (slot.filler || !stream->hasMemory()) {
    dir.staging[channel]->abandon(slot.staging);
  } else {
    dir.staging[channel]->landed(slot.staging);
  }
  slot.phase = SlotPhase::kLanded;
  traceChunk(peer, dir, channel, slot, "landed");
  hints_.copy_tail = true;
}

void DataPath::stopLandedCopies(Direction& dir) {
  for (auto& staging : dir.staging) {
    if (!staging) continue;
    for (int slot = 0; slot < staging->slots(); ++slot) staging->abandon(slot);
  }
}

void DataPath::startUnstaging(Direction& dir, uint32_t channel, ChannelSlot& slot) {
  Stream* stream = slot.stream;
  // Received for nobody (a discarded chunk, or one of a released transfer): its bytes stay in
  // the slot, and the memory a released transfer named is not touched again.
  if (slot.filler || !stream->hasMemory()) return;
  const auto [begin, end] = ChunkPlan::chunkRange(stream->total, stream->chunk_size, slot.chunk);
  // Waits for the user's GPU work on the destination recorded when the transfer was posted (or
  // the request arrived); a failure is reported by ready().
  dir.staging[channel]->scatter(slot.staging, *stream->segments, begin, end, stream->fences);
  slot.phase = SlotPhase::kUnstaging;
  traceChunk(nullptr, dir, channel, slot, "scatter queued");
  hints_.gpu_pending = true;
}

// ---- Plugin transports: receive paths, registered buffers and unpack ----

RecvPath DataPath::recvPath(Direction& dir, uint32_t channel) {
  RecvPath& path = dir.recv_paths[channel];
  if (path != RecvPath::kUnresolved) return path;
  const auto* source =
      transport_.unpackSource(static_cast<const transport::RecvComm*>(dir.comms[channel]));
  // TCPX decides by the posted buffer's registration: receives into CUDA memory go through its
  // devmem bounce pool, receives into host memory are plain socket reads into the buffer. A pool
  // in host memory (no devmem) is never filled by TCPX itself.
  if (source == nullptr || recv_path_ == RecvPathChoice::kHost) {
    path = RecvPath::kPosted;
  } else if (recv_path_ == RecvPathChoice::kPool) {
    path = RecvPath::kBouncePool;
  } else {
    path = source->pool_device >= 0 ? RecvPath::kBouncePool : RecvPath::kPosted;
  }
  return path;
}

Status DataPath::checkNoFragments(const Peer* peer, uint32_t channel, const ChannelSlot& slot,
                                  const transport::Transport::UnpackSource& source) const {
  const auto* meta = static_cast<const transport::abi::UnpackMeta*>(source.meta);
  const uint64_t count =
      std::atomic_ref<const uint64_t>(meta->cnt[slot.meta_slot]).load(std::memory_order_acquire);
  if (count == 0) return {};
  // The plugin does not receive this way: NOT_SUPPORTED, which the peer's transfers report as is.
  return Status(StatusCode::kNotSupported,
                strfmt("peer '%s', receive channel %u, chunk %u: the %s transport published "
                       "%llu fragments in its bounce pool for a receive into host memory, so "
                       "the bytes are not in the posted buffer; this plugin needs recv_path=pool",
                       peer->name.c_str(), channel, slot.chunk, transport_.name(),
                       static_cast<unsigned long long>(count)));
}

bool DataPath::chunkNeedsStaging(const Direction& dir, uint32_t channel, const Stream& stream,
                                 uint64_t begin, uint64_t end) const {
  const bool has_data = stream.hasMemory();
  if (!transport_.needsRegistration()) return has_data && stream.segments->anyDevice(begin, end);
  // Plugins send from registered buffers: every chunk is gathered into a registered slot.
  if (dir.sending) return true;
  // Host receives land in registered slots, one per outstanding receive.
  if (dir.recv_paths[channel] != RecvPath::kBouncePool) return true;
  if (!has_data) return false;  // received and dropped: consumed without an unpack
  const auto* source =
      transport_.unpackSource(static_cast<const transport::RecvComm*>(dir.comms[channel]));
  // Fragments are copied straight to their destinations when the copy engine can reach all of
  // them (the CPU for host memory, the pool's GPU for its own memory), else through a slot.
  if (source->pool_device < 0) return stream.segments->anyDevice(begin, end);
  return !stream.segments->allOnDevice(begin, end, source->pool_device);
}

int DataPath::deviceSendSource(const Stream& stream, uint64_t begin, uint64_t end) const {
  if (!transport_.sendsFromDevice() || stream.segments == nullptr || begin >= end) return -1;
  const int device = stream.segments->device(stream.segments->locate(begin).first);
  if (device < 0 || !stream.segments->allOnDevice(begin, end, device)) return -1;
  return device;
}

Result<transport::MemHandle*> DataPath::registeredDeviceStaging(Direction& dir, uint32_t channel,
                                                                int device) {
  for (const auto& [d, handle] : dir.device_handles[channel]) {
    if (d == device) return handle;
  }
  auto area = dir.staging[channel]->deviceArea(device);
  if (!area.isOk()) return area.status();
  // TCPX registers device memory of the calling thread's current device.
  if (device != gpu_) (void)gpu::setCurrentDevice(device);
  transport::MemHandle* handle = nullptr;
  const transport::NetResult rc =
      transport_.regMr(dir.comms[channel], area->first, area->second, transport::kPtrCuda, &handle);
  if (device != gpu_) (void)gpu::setCurrentDevice(gpu_);
  if (rc != transport::NetResult::kSuccess) {
    return Status(StatusCode::kTransportError,
                  strfmt("registering %s of GPU %d staging with the %s transport failed (%s)",
                         formatBytes(area->second).c_str(), device, transport_.name(),
                         transport::netResultName(rc)));
  }
  dir.device_handles[channel].emplace_back(device, handle);
  return handle;
}

void DataPath::dropStagedData(Direction& dir, uint32_t channel, ChannelSlot& slot) {
  slot.filler = true;
  slot.staged_device = -1;
  // A plugin transport still needs the registered slot to send the filler from.
  if (!transport_.needsRegistration()) releaseStagingSlot(dir, channel, slot);
}

Result<transport::MemHandle*> DataPath::registeredSlot(Direction& dir, uint32_t channel, int slot) {
  transport::MemHandle*& handle = dir.slot_handles[channel][static_cast<size_t>(slot)];
  if (handle != nullptr) return handle;
  gpu::ChannelStaging* staging = dir.staging[channel].get();
  auto buffer = staging->slotBuffer(slot);
  if (!buffer.isOk()) return buffer.status();
  const transport::NetResult rc = transport_.regMr(
      dir.comms[channel], buffer.value(), staging->slotBytes(), transport::kPtrHost, &handle);
  if (rc != transport::NetResult::kSuccess) {
    handle = nullptr;
    return Status(StatusCode::kTransportError,
                  strfmt("registering a %s staging buffer with the %s transport failed (%s)",
                         formatBytes(staging->slotBytes()).c_str(), transport_.name(),
                         transport::netResultName(rc)));
  }
  return handle;
}

Result<transport::MemHandle*> DataPath::receiveAnchor(Peer* peer, Direction& dir, uint32_t channel,
                                                      void** anchor) {
  if (dir.anchor_handles[channel] != nullptr) {
    *anchor = dir.anchors[channel];
    return dir.anchor_handles[channel];
  }
  const auto* source =
      transport_.unpackSource(static_cast<const transport::RecvComm*>(dir.comms[channel]));
  // TCPX receives into GPU memory through its bounce pool when the posted buffer is CUDA memory.
  const int device = source->pool_device;
  auto buffer = device >= 0 ? gpu::allocDevice(device, peer->agreed.chunk_size)
                            : gpu::allocHost(peer->agreed.chunk_size);
  if (!buffer.isOk()) return buffer.status();
  transport::MemHandle* handle = nullptr;
  const transport::NetResult rc =
      transport_.regMr(dir.comms[channel], buffer.value(), peer->agreed.chunk_size,
                       device >= 0 ? transport::kPtrCuda : transport::kPtrHost, &handle);
  if (rc != transport::NetResult::kSuccess) {
    if (device >= 0) {
      gpu::freeDevice(device, buffer.value());
    } else {
      gpu::freeHost(buffer.value());
    }
    return Status(StatusCode::kTransportError,
                  strfmt("registering the receive buffer of channel %u with the %s transport "
                         "failed (%s)",
                         channel, transport_.name(), transport::netResultName(rc)));
  }
  dir.anchors[channel] = buffer.value();
  dir.anchor_devices[channel] = device;
  dir.anchor_handles[channel] = handle;
  *anchor = buffer.value();
  return handle;
}

bool DataPath::copiesIdle(const Direction& dir) {
  const auto idle = [](const auto& p) { return !p || p->idle(); };
  return std::all_of(dir.staging.begin(), dir.staging.end(), idle) &&
         std::all_of(dir.unpack_queues.begin(), dir.unpack_queues.end(), idle);
}

void DataPath::closeComms(Direction& dir) {
  for (void*& comm : dir.comms) {
    if (comm == nullptr) continue;
    if (dir.sending) {
      transport_.closeSend(static_cast<transport::SendComm*>(comm));
    } else {
      transport_.closeRecv(static_cast<transport::RecvComm*>(comm));
    }
    comm = nullptr;
  }
}

void DataPath::releaseBuffers(Direction& dir, ChannelLeftovers* leftovers) {
  // The comms are closed: handles are deregistered without one (Transport::deregMr).
  for (uint32_t ch = 0; ch < dir.channels(); ++ch) {
    for (auto& [device, handle] : dir.device_handles[ch]) transport_.deregMr(nullptr, handle);
    dir.device_handles[ch].clear();
    for (transport::MemHandle*& handle : dir.slot_handles[ch]) {
      if (handle != nullptr) transport_.deregMr(nullptr, handle);
      handle = nullptr;
    }
    if (dir.anchor_handles[ch] != nullptr) transport_.deregMr(nullptr, dir.anchor_handles[ch]);
    dir.anchor_handles[ch] = nullptr;
    if (dir.anchors[ch] != nullptr) {
      leftovers->buffers.emplace_back(dir.anchors[ch], dir.anchor_devices[ch]);
    }
    dir.anchors[ch] = nullptr;
  }
  for (auto& staging : dir.staging) {
    if (staging) leftovers->staging.push_back(std::move(staging));
  }
  for (auto& queue : dir.unpack_queues) {
    if (queue) leftovers->queues.push_back(std::move(queue));
  }
}

Status DataPath::unpackReceive(Direction& dir, uint32_t channel, ChannelSlot& slot,
                               const transport::Transport::UnpackSource& source) {
  if (slot.filler) {  // received for nobody: release the slot without copying
    slot.phase = SlotPhase::kUnpacked;
    return {};
  }
  Stream* stream = slot.stream;
  const auto [begin, end] = ChunkPlan::chunkRange(stream->total, stream->chunk_size, slot.chunk);
  const auto* meta = static_cast<const transport::abi::UnpackMeta*>(source.meta);
  // The plugin publishes cnt after the entries (release); pair it with an acquire load.
  const uint64_t count =
      std::atomic_ref<const uint64_t>(meta->cnt[slot.meta_slot]).load(std::memory_order_acquire);
  if (count == 0 && end > begin) {
    return Status(StatusCode::kNotSupported,
                  strfmt("the %s transport published no fragments for a receive of %llu bytes "
                         "through its bounce pool: it wrote them into the posted buffer instead "
                         "(a plugin without a devmem receive pool); use recv_path=auto or host",
                         transport_.name(), static_cast<unsigned long long>(end - begin)));
  }
  Status st = checkFragments(meta->mem[slot.meta_slot], count, end - begin, source.pool_size,
                             &unpack_scratch_);
  if (!st.isOk()) return st;
  const LoadMeta* frags = unpack_scratch_.data();  // the checked copy, sorted by destination
  char* linear = nullptr;
  if (slot.staging >= 0) {
    auto buffer = dir.staging[channel]->slotBuffer(slot.staging);
    if (!buffer.isOk()) return buffer.status();
    linear = static_cast<char*>(buffer.value());
  }
  if (source.pool_device < 0) {
    if (linear != nullptr) {
      unpackOnHost(frags, count, source.pool, linear);
    } else {
      unpackOnHost(frags, count, source.pool, *stream->segments, begin);
    }
    slot.phase = SlotPhase::kUnpacked;
    return {};
  }
  auto& queue = dir.unpack_queues[channel];
  if (!queue) queue = std::make_unique<gpu::CopyQueue>(source.pool_device);
  if (linear == nullptr && stream->fences != nullptr) {
    // Straight into the destination (all of it on the pool's GPU): after the user's work there.
    st = queue->after(stream->fences->eventFor(source.pool_device));
    if (!st.isOk()) return st;
  }
  st = unpackOnDevice(frags, count, source.pool, stream->segments, begin, linear, queue.get());
  if (!st.isOk()) return st;
  slot.phase = SlotPhase::kUnpacking;
  slot.ticket = 0;  // set when the batch is launched
  hints_.gpu_pending = true;
  return {};
}

bool DataPath::completeUnpackReceives(Peer* peer, Direction& dir, uint32_t channel) {
  ChannelWindow& window = dir.windows[channel];
  auto* comm = static_cast<transport::RecvComm*>(dir.comms[channel]);
  bool any = false;
  for (uint32_t i = 0; i < window.size(); ++i) {
    ChannelSlot& slot = window.at(i);
    if (slot.phase == SlotPhase::kInTransport) break;  // consumed strictly in post order
    if (slot.phase == SlotPhase::kUnpacking) {
      auto done = dir.unpack_queues[channel]->done(slot.ticket);
      if (!done.isOk()) {
        events_.onDataPathFailed(peer, done.status());
        return false;
      }
      if (!done.value()) {
        hints_.gpu_pending = true;
        break;
      }
      slot.phase = SlotPhase::kUnpacked;
    }
    if (slot.phase != SlotPhase::kUnpacked) continue;  // consumed before
    // The bytes are out of the bounce pool: its pages go back to the transport.
    const transport::NetResult rc = transport_.irecvConsumed(comm, slot.request);
    if (rc != transport::NetResult::kSuccess) {
      events_.onDataPathFailed(
          peer, transportFailure(peer, dir, channel, "consuming a receive", slot.chunk, rc));
      return false;
    }
    any = true;
    slot.phase = SlotPhase::kDone;
    if (slot.staging >= 0 && !slot.filler) startUnstaging(dir, channel, slot);
  }
  return any;
}

}  // namespace tcpx::engine
