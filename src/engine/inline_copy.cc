// Small transfers with GPU memory on our side still travel inside control frames (one round trip,
// no data channel): their bytes pass between the GPU and a pinned inline slot by asynchronous
// copies, and the step that needs them (sending the frame, or completing) waits in
// Peer::inline_copies until the copies are done. The progress thread never waits for the GPU.
//
// Invariants: a slot is busy from the start of its copy until the copy finished and its bytes
// were encoded into a frame; a transfer in kGathering or kScattering is released by the user
// only after its copy finished (handleCancel); a failed peer's inline staging retires with its
// channels, and its transfers complete once the copies are done (RetiringChannels).
#include <cstring>

#include "common/log.h"
#include "common/strings.h"
#include "engine/engine_core.h"

namespace tcpx::engine {

static_assert(kInlineSlots < 32, "inline slots are tracked in one 32-bit mask");

namespace {
// An inline copy takes a few microseconds unless it waits for the user's GPU work: the progress
// loop looks at it every couple of microseconds this long, then at the staging copies' pace.
constexpr auto kInlineEagerPoll = std::chrono::microseconds(200);
}  // namespace

void EngineCore::noteInlinePending(const InlineCopy& copy) {
  if (Clock::now() - copy.started < kInlineEagerPoll) {
    hints_.inline_pending = true;
  } else {
    hints_.gpu_pending = true;
  }
}

int EngineCore::takeInlineSlot(Peer* peer) {
  if (!peer->inline_staging) {
    peer->inline_staging = std::make_unique<gpu::ChannelStaging>(kInlineSlots, kInlineSlotBytes);
    peer->inline_free = (1U << kInlineSlots) - 1;
  }
  if (peer->inline_free == 0) return -1;
  const int slot = __builtin_ctz(peer->inline_free);
  peer->inline_free &= ~(1U << slot);
  return slot;
}

bool EngineCore::startInlineGather(Peer* peer, InlineCopy::Kind kind, uint64_t id,
                                   const SegmentList& segments, const gpu::Fences* fences,
                                   uint64_t peer_id) {
  const int slot = takeInlineSlot(peer);
  if (slot < 0) return false;
  InlineCopy copy;
  copy.kind = kind;
  copy.id = id;
  copy.peer_id = peer_id;
  copy.slot = slot;
  copy.started = Clock::now();
  // A copy that fails to start is reported by ready() once the slot's started copies are done.
  peer->inline_staging->gather(slot, segments, 0, segments.total(), fences);
  peer->inline_copies.push_back(std::move(copy));
  hints_.inline_pending = true;
  return true;
}

std::pair<const SegmentList*, const gpu::Fences*> EngineCore::scatterTarget(
    Peer* peer, const InlineCopy& copy) {
  if (copy.kind == InlineCopy::Kind::kWriteScatter) {
    auto it = peer->target_ops.find(copy.id);
    if (it == peer->target_ops.end()) return {nullptr, nullptr};
    return {&it->second->segments, &it->second->fences};
  }
  auto it = peer->initiated.find(copy.id);
  if (it == peer->initiated.end()) return {nullptr, nullptr};
  return {&it->second->local, &it->second->fences};
}

void EngineCore::beginInlineScatter(Peer* peer, InlineCopy& copy, std::string_view bytes) {
  auto buffer = peer->inline_staging->slotBuffer(copy.slot);
  if (!buffer.isOk()) {
    copy.failure = buffer.status();
    return;
  }
  std::memcpy(buffer.value(), bytes.data(), bytes.size());
  const auto [target, fences] = scatterTarget(peer, copy);
  if (target == nullptr) return;  // its transfer is gone: nothing to copy
  // After the user's GPU work on the destination, recorded at post (or at the request's arrival).
  peer->inline_staging->scatter(copy.slot, *target, 0, bytes.size(), fences);
}

void EngineCore::startInlineScatter(Peer* peer, InlineCopy::Kind kind, uint64_t id,
                                    std::string_view bytes) {
  InlineCopy copy;
  copy.kind = kind;
  copy.id = id;
  copy.slot = takeInlineSlot(peer);
  copy.started = Clock::now();
  if (copy.slot >= 0) {
    beginInlineScatter(peer, copy, bytes);
  } else {
    copy.held.assign(bytes.begin(), bytes.end());  // until a slot is free
    peer->held_inline_bytes += copy.held.size();
  }
  peer->inline_copies.push_back(std::move(copy));
  hints_.inline_pending = true;
}

void EngineCore::driveInlineCopies(Peer* peer) {
  for (size_t i = 0; i < peer->inline_copies.size();) {
    InlineCopy& copy = peer->inline_copies[i];
    if (copy.slot < 0) {
      copy.slot = takeInlineSlot(peer);
      if (copy.slot < 0) {
        hints_.gpu_pending = true;  // a running copy will free one
        ++i;
        continue;
      }
      copy.started = Clock::now();
      peer->held_inline_bytes -= copy.held.size();
      const std::vector<uint8_t> held = std::move(copy.held);
      beginInlineScatter(peer, copy,
                         std::string_view(reinterpret_cast<const char*>(held.data()), held.size()));
    }
    auto ready = peer->inline_staging->ready(copy.slot);
    if (ready.isOk() && !ready.value()) {
      noteInlinePending(copy);
      ++i;
      continue;
    }
    Status status = copy.failure;
    if (!ready.isOk() && status.isOk()) status = ready.status();
    const InlineCopy done = std::move(copy);
    peer->inline_copies.erase(peer->inline_copies.begin() + static_cast<std::ptrdiff_t>(i));
    finishInlineCopy(peer, done, status);  // encodes the slot's bytes before it is released
    if (!peer->inline_staging) return;     // the peer failed meanwhile
    peer->inline_free |= 1U << done.slot;
  }
}

std::shared_ptr<Transfer> EngineCore::inlineCopyDone(Peer* peer, uint64_t id) {
  auto it = peer->initiated.find(id);
  return it == peer->initiated.end() ? nullptr : it->second;
}

void EngineCore::finishInlineCopy(Peer* peer, const InlineCopy& copy, const Status& status) {
  switch (copy.kind) {
    case InlineCopy::Kind::kWriteGather: {
      const std::shared_ptr<Transfer> t = inlineCopyDone(peer, copy.id);
      if (t == nullptr) return;
      // Never announced: the target knows nothing of it.
      if (t->released()) return finishTransfer(peer, t, Status(StatusCode::kCanceled, "released"));
      if (!status.isOk()) return finishTransfer(peer, t, status);
      // The id it ran under was never sent: announce it under the next one, so that the ids the
      // peer sees keep increasing.
      peer->initiated.erase(t->wire_id);
      assignWireId(peer, t);
      const transport::IoSlice bytes{peer->inline_staging->slotBuffer(copy.slot).value(), t->total};
      encodeWriteRequest(peer, t.get(), /*inline_data=*/true, {&bytes, 1});
      return;
    }
    case InlineCopy::Kind::kWriteScatter: {
      auto it = peer->target_ops.find(copy.id);
      if (it == peer->target_ops.end()) return;
      TargetOp* op = it->second.get();
      if (!status.isOk() && op->status.isOk()) {
        LOG_WARN("peer '%s': WRITE %llu into GPU memory failed: %s", peer->name.c_str(),
                 static_cast<unsigned long long>(copy.id), status.message().c_str());
        op->status = status;
      }
      op->stage = OpStage::kReplied;
      op->data_done = true;
      maybeFinishTargetWrite(peer, op);
      return;
    }
    case InlineCopy::Kind::kReadGather: {
      auto it = peer->target_ops.find(copy.id);
      if (it == peer->target_ops.end()) return;
      TargetOp* op = it->second.get();
      control::ReadResponse resp;
      resp.xfer_id = copy.id;
      if (status.isOk()) {
        resp.inline_data = true;
        const transport::IoSlice bytes{peer->inline_staging->slotBuffer(copy.slot).value(),
                                       op->segments.total()};
        control::encode(resp, {&bytes, 1}, peer->control->out());
      } else {
        LOG_WARN("peer '%s': READ %llu of GPU memory failed: %s", peer->name.c_str(),
                 static_cast<unsigned long long>(copy.id), status.message().c_str());
        resp.code = status.code();
        resp.message = status.message();
        control::encode(resp, {}, peer->control->out());
      }
      retireTargetOp(peer, copy.id);
      return;
    }
    case InlineCopy::Kind::kReadScatter: {
      const std::shared_ptr<Transfer> t = inlineCopyDone(peer, copy.id);
      if (t == nullptr) return;
      if (!status.isOk() && t->local_status.isOk()) t->local_status = status;
      t->stage = OpStage::kReplied;
      t->data_done = true;
      maybeFinish(peer, t);
      return;
    }
    case InlineCopy::Kind::kSendGather: {
      const std::shared_ptr<Transfer> t = inlineCopyDone(peer, copy.id);
      if (t == nullptr) return;
      control::SendData data;
      data.send_id = t->wire_id;
      data.recv_id = copy.peer_id;
      if (t->released() || !status.isOk()) {
        // The recv learns why; the send ends here.
        data.code = t->released() ? StatusCode::kCanceled : status.code();
        control::encode(data, {}, peer->control->out());
        return finishTransfer(peer, t,
                              t->released() ? Status(StatusCode::kCanceled, "released") : status);
      }
      data.inline_data = true;
      const transport::IoSlice bytes{peer->inline_staging->slotBuffer(copy.slot).value(), t->total};
      control::encode(data, {&bytes, 1}, peer->control->out());
      t->stage = OpStage::kAwaitingSendDone;
      t->data_done = true;
      return;
    }
    case InlineCopy::Kind::kRecvScatter: {
      const std::shared_ptr<Transfer> t = inlineCopyDone(peer, copy.id);
      if (t == nullptr) return;
      if (!status.isOk() && t->local_status.isOk()) t->local_status = status;
      t->stage = OpStage::kReplied;
      t->data_done = true;
      return maybeFinish(peer, t);
    }
  }
}

void EngineCore::dropInlineCopies(Peer* peer) {
  // The slots themselves went with the channels (closeDataChannels), their copies retiring.
  peer->inline_copies.clear();
  peer->held_inline_bytes = 0;
  peer->inline_free = 0;
}

}  // namespace tcpx::engine
