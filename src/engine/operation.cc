#include "engine/operation.h"

namespace tcpx::engine {

using control::FrameType;

const char* opStageName(OpStage stage) {
  switch (stage) {
    case OpStage::kIdle:
      return "idle";
    case OpStage::kQueued:
      return "queued";
    case OpStage::kRecvPosted:
      return "recv posted";
    case OpStage::kGathering:
      return "gathering";
    case OpStage::kAwaitingWriteDone:
      return "awaiting WRITE_DONE";
    case OpStage::kWriteQueued:
      return "awaiting WRITE_DONE, its copy queued";
    case OpStage::kAwaitingReadResponse:
      return "awaiting READ_RESPONSE";
    case OpStage::kAwaitingSendCts:
      return "awaiting SEND_CTS";
    case OpStage::kAwaitingSendDone:
      return "awaiting SEND_DONE";
    case OpStage::kAwaitingSendData:
      return "awaiting SEND_DATA";
    case OpStage::kAwaitingDataStatus:
      return "awaiting DATA_STATUS";
    case OpStage::kScattering:
      return "scattering";
    case OpStage::kReplied:
      return "replied";
    case OpStage::kLocalMatch:
      return "awaiting its local counterpart";
    case OpStage::kLocalCopy:
      return "copying locally";
    case OpStage::kAwaitingReadDone:
      return "awaiting READ_DONE";
    case OpStage::kFencing:
      return "waiting for earlier GPU work";
    case OpStage::kRetiring:
      return "failed, waiting for its GPU copies";
  }
  return "?";
}

const char* xferKindName(XferKind kind) {
  switch (kind) {
    case XferKind::kRead:
      return "READ";
    case XferKind::kWrite:
      return "WRITE";
    case XferKind::kSend:
      return "send";
    case XferKind::kRecv:
      return "recv";
  }
  return "?";
}

bool peerMaySend(OpRole role, XferKind kind, OpStage stage, FrameType frame) {
  // A sender cancels its half of a send, and an initiator its WRITE, until the other side has
  // answered (the answer may cross the CANCEL on the wire).
  const bool cancelable = stage == OpStage::kAwaitingSendData ||
                          stage == OpStage::kAwaitingDataStatus || stage == OpStage::kScattering ||
                          stage == OpStage::kReplied;
  if (role == OpRole::kPeers) {
    // A READ's target hears nothing more, but READ_DONE of a direct one.
    if (kind == XferKind::kRead) {
      return frame == FrameType::kReadDone && stage == OpStage::kAwaitingReadDone;
    }
    if (kind != XferKind::kWrite) return false;
    if (frame == FrameType::kCancel) {
      return (cancelable && stage != OpStage::kAwaitingSendData) || stage == OpStage::kLocalCopy;
    }
    return frame == FrameType::kDataStatus && stage == OpStage::kAwaitingDataStatus;
  }
  switch (kind) {
    case XferKind::kWrite:
      // WRITE_QUEUED once, and only for a direct WRITE (onWriteQueued checks that).
      return (frame == FrameType::kWriteDone &&
              (stage == OpStage::kAwaitingWriteDone || stage == OpStage::kWriteQueued)) ||
             (frame == FrameType::kWriteQueued && stage == OpStage::kAwaitingWriteDone);
    case XferKind::kRead:
      return (frame == FrameType::kReadResponse && stage == OpStage::kAwaitingReadResponse) ||
             (frame == FrameType::kDataStatus && stage == OpStage::kAwaitingDataStatus);
    case XferKind::kSend:
      return (frame == FrameType::kSendCts && stage == OpStage::kAwaitingSendCts) ||
             (frame == FrameType::kSendDone && stage == OpStage::kAwaitingSendDone);
    case XferKind::kRecv:
      return (frame == FrameType::kSendData && stage == OpStage::kAwaitingSendData) ||
             (frame == FrameType::kDataStatus && stage == OpStage::kAwaitingDataStatus) ||
             (frame == FrameType::kCancel && cancelable);
  }
  return false;
}

}  // namespace tcpx::engine
