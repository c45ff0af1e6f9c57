// The state of every operation two engines run together, and the frames each state admits.
//
// An operation is our own transfer (a WRITE or READ we initiate, a send or a recv) or the target
// side of a peer's WRITE or READ. Its stage says what it is waiting for from the peer; its data,
// when it moves over the channels, progresses separately (the stream's chunk counters only move
// forward) and the operation ends when it is kReplied and its data is complete.
//
//   our WRITE  kQueued -> [kGathering] -> kAwaitingWriteDone --WRITE_DONE--> kReplied
//   our READ   kQueued -> kAwaitingReadResponse --READ_RESPONSE--> kReplied | kScattering |
//              kAwaitingDataStatus --DATA_STATUS--> kReplied
//   our send   kQueued -> kAwaitingSendCts --SEND_CTS--> [kGathering] -> kAwaitingSendDone
//              --SEND_DONE--> kReplied
//   our recv   kQueued -> kRecvPosted --SEND_RTS--> kAwaitingSendData --SEND_DATA--> kReplied |
//              kScattering | kAwaitingDataStatus --DATA_STATUS--> kReplied
//   peer's WRITE  (WRITE_REQUEST) -> kScattering | kAwaitingDataStatus --DATA_STATUS--> kReplied
//   peer's READ   (READ_REQUEST)  -> kGathering | kReplied
//   our direct READ  kAwaitingReadResponse --READ_RESPONSE (direct)--> kLocalCopy -> READ_DONE
//   our direct WRITE [kFencing] -> kAwaitingWriteDone [--WRITE_QUEUED--> kWriteQueued]
//                    --WRITE_DONE, or the queued copy's signal reached--> kReplied
//   peer's direct WRITE (WRITE_REQUEST, direct) -> kLocalCopy -> WRITE_DONE
//   peer's direct READ  (READ_REQUEST, direct)  -> [kFencing] -> kAwaitingReadDone
//                       --READ_DONE--> gone
//   READ or WRITE to this engine itself  [kLocalCopy] -> kIdle; no frame
//   send or recv to this engine itself  kLocalMatch -> (matched) [kLocalCopy] -> kIdle; no frame
// A peer's CANCEL is admitted by its WRITE until the target answered (a direct one while we copy
// it), and by our recv once matched; its READ_DONE by its direct READ we answered. Any other frame
// naming an operation is a protocol error for that peer: it fails the peer's transfers and never
// moves a byte (peerMaySend is the one table that decides).
#pragma once

#include <cstdint>

#include "control/frames.h"

namespace tcpx::engine {

enum class OpStage : uint8_t {
  kIdle,               // not running: prepared, finished or failed
  kQueued,             // posted; waits for the peer or for room; nothing announced
  kRecvPosted,         // recv: waits for the peer's SEND_RTS (the peer knows nothing of it)
  kGathering,          // bytes on their way out of GPU memory into an inline slot
  kAwaitingWriteDone,  // our WRITE is announced: WRITE_DONE is due
  kWriteQueued,  // our direct WRITE's copy is queued at the target: WRITE_DONE is due, and the
                 // copy's signal, where it could be opened, may say first that it landed
  kAwaitingReadResponse,  // READ_REQUEST sent: READ_RESPONSE is due
  kAwaitingSendCts,       // SEND_RTS sent: SEND_CTS is due
  kAwaitingSendDone,      // SEND_DATA sent: SEND_DONE is due
  kAwaitingSendData,      // recv matched (SEND_CTS sent): SEND_DATA is due
  kAwaitingDataStatus,    // a stream the sender stages from GPU memory: DATA_STATUS is due
  kScattering,            // inline bytes on their way from a slot into GPU memory
  kReplied,               // nothing more is due from the peer; the data may still move
  kLocalMatch,  // send or recv to this engine itself: waits for its counterpart (local_path.cc)
  kLocalCopy,   // transfer to this engine itself, or the copy of a direct READ (ours) or WRITE
                // (the peer's): queued on or run by the progress or the copy thread
  kAwaitingReadDone,  // the peer's direct READ of our memory: READ_DONE is due
  kFencing,   // a direct copy of GPU memory waits for our application's earlier GPU work before
              // the peer may read it: our WRITE before WRITE_REQUEST, the peer's READ before
              // READ_RESPONSE (polled; nothing is due from the peer)
  kRetiring,  // failed with its connection while GPU copies of that connection still ran:
              // completes once none can touch its memory (RetiringChannels)
};
const char* opStageName(OpStage stage);

// Who started the operation: us (initiator of a WRITE/READ, either side of send/recv) or the
// peer (we are the target of its WRITE/READ).
enum class OpRole : uint8_t { kOurs, kPeers };

// What the operation is.
enum class XferKind : uint8_t { kRead, kWrite, kSend, kRecv };
const char* xferKindName(XferKind kind);

// Whether the peer may send `frame` about an operation of `role` and `kind` in `stage`.
bool peerMaySend(OpRole role, XferKind kind, OpStage stage, control::FrameType frame);

}  // namespace tcpx::engine
