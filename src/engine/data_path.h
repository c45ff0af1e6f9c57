// The data path: announced streams cut into chunks over a peer's channel windows, staged through
// GPU copies where needed, posted, tested and consumed in the order the transport requires.
//
// It owns no protocol state: it moves the bytes of the streams the protocol layer appended
// (addStream) and tells that layer, through DataPathEvents, when a stream passed staging, when it
// completed, when a released stream stopped touching memory, and when the data path of a peer
// failed. Everything runs on the engine's progress thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <vector>

#include <tcpx_p2p/status.h>

#include "engine/peer.h"
#include "engine/transfer.h"
#include "engine/unpack.h"
#include "transport/transport.h"

namespace tcpx::engine {

struct ChannelLeftovers;

// What the data path reports to the protocol layer above it.
class DataPathEvents {
 public:
  // Every chunk of a stream read from GPU memory passed staging: its sender's verdict is due.
  virtual void onStreamStaged(Peer* peer, Stream* stream) = 0;
  // Every chunk of the stream was sent, or is in its final place.
  virtual void onStreamDone(Peer* peer, Stream* stream) = 0;
  // A detached (released) stream has no chunk left in the transport: its memory is untouched.
  virtual void onStreamReleased(Peer* peer, Stream* stream) = 0;
  // The peer's data path cannot go on (transport failure, bad unpack metadata, ...).
  virtual void onDataPathFailed(Peer* peer, const Status& why) = 0;

 protected:
  ~DataPathEvents() = default;
};

// How soon the progress loop must look again when no event wakes it.
struct WaitHints {
  bool poll_needed = false;     // something must be retried without an event
  bool gpu_pending = false;     // staging copies in flight (polled)
  bool inline_pending = false;  // a young inline copy in flight (polled soon)
  bool copy_tail = false;       // a landed copy's last bytes in flight (polled soon)
  bool data_progress = false;   // the last round moved data
};

// The largest streams whose staged chunks overlap their GPU copy with the network (0 = never).
struct FollowLimits {
  uint64_t landed_copy = 0;      // receive: the copy follows the bytes as they land
  uint64_t followed_gather = 0;  // send: the socket follows the copy as it gathers
};

// The recv_path setting: how receive channels of an UNPACK plugin transport take their bytes.
enum class RecvPathChoice : uint8_t {
  kAuto,  // the bounce pool when it is GPU memory (devmem receives), else host receives
  kPool,  // always the bounce pool
  kHost,  // always registered host buffers (the plugin writes the bytes in place)
};

class DataPath {
 public:
  DataPath(transport::Transport& transport, uint32_t staging_slots, FollowLimits follow,
           RecvPathChoice recv_path, int gpu, std::chrono::milliseconds data_timeout,
           DataPathEvents& events, WaitHints& hints)
      : transport_(transport),
        staging_slots_(staging_slots),
        follow_(follow),
        recv_path_(recv_path),
        gpu_(gpu),
        data_timeout_(data_timeout),
        events_(events),
        hints_(hints) {}

  // Appends an announced stream to `dir` (the order rule: announcement order on both sides),
  // cut into chunks by its announced `spread` (1..control::kMaxSpread; ChunkPlan::chunkSizeFor).
  // `fences` (owned by the stream's transfer or target op) order every copy into or out of
  // `segments` after the user's GPU work before the post, or before the request arrived.
  Stream* addStream(Peer* peer, Direction& dir, uint64_t first_chunk, uint64_t total,
                    uint32_t spread, const SegmentList* segments, const gpu::Fences* fences,
                    StreamOwner owner, uint64_t owner_id);
  // The spread of a stream about to be announced to `peer` on its send direction
  // (ChunkPlan::spreadFor), from the streams still moving there: they share its sockets, and no
  // other peer's streams (a peer that stops reading, say) change how this one's are cut.
  [[nodiscard]] static uint32_t spreadFor(const Peer& peer);
  // One pass over the peer's channels: completions first, then new chunks in.
  void drive(Peer* peer);
  // Stops every copy of the direction that follows a receive as it lands (ChannelStaging::
  // abandon): the channels end, and their receives may never complete.
  static void stopLandedCopies(Direction& dir);
  // Whether no copy of the direction (staging, unpack out of a plugin's bounce pool) can still
  // run (never waits). Its comms close only then.
  [[nodiscard]] static bool copiesIdle(const Direction& dir);
  // Closes the direction's comms, which joins the transport's threads: nothing reads or writes
  // its buffers any more.
  void closeComms(Direction& dir);
  // Once the comms are closed: deregisters what the direction registered with the transport and
  // hands its GPU queues, staging and buffers to `leftovers` (freed off the progress thread).
  void releaseBuffers(Direction& dir, ChannelLeftovers* leftovers);
  // The data-path watchdog. A channel with requests in the transport and no completion for
  // data_timeout fails its peer with TIMEOUT: the control connection staying alive proves
  // nothing about the data sockets (TCPX reports a dead one as "not done" forever). Returns
  // when the next check is due (Clock::time_point::max() when nothing is outstanding).
  Clock::time_point checkStalls(Peer* peer, Clock::time_point now);

 private:
  bool driveSendChannel(Peer* peer, Direction& dir, uint32_t channel);
  bool driveRecvChannel(Peer* peer, Direction& dir, uint32_t channel);
  // The channel's receive path, decided on first use from the comm and recv_path. A receive
  // whose outcome contradicts it (fragments in the pool for a host receive, none for a pool
  // receive) fails the peer.
  RecvPath recvPath(Direction& dir, uint32_t channel);
  // A host receive on an UNPACK comm is complete only if the plugin published no fragments.
  Status checkNoFragments(const Peer* peer, uint32_t channel, const ChannelSlot& slot,
                          const transport::Transport::UnpackSource& source) const;
  // Receive completions of an UNPACK transport: fragments out of the bounce pool, then
  // irecvConsumed in post order once their copies finished.
  bool completeUnpackReceives(Peer* peer, Direction& dir, uint32_t channel);
  // A received chunk that sits in a staging slot starts its copy out to its destinations.
  void startUnstaging(Direction& dir, uint32_t channel, ChannelSlot& slot);
  // A staged send that may follow its gather (followed_gather_max, a transport that offers it):
  // the gather is queued, and the words the send follows are returned; null otherwise (nothing
  // queued).
  const uint32_t* startFollowedGather(Direction& dir, uint32_t channel, const ChannelSlot& slot,
                                      uint64_t begin, uint64_t end);
  // A receive whose copy may follow it as it lands (landed_copy_max, a reporting transport):
  // the staging slot's words, reset, and the receive's part count; null otherwise.
  uint32_t* landedWords(Direction& dir, uint32_t channel, const ChannelSlot& slot, uint64_t bytes,
                        int* parts);
  // A kLanding receive completed: its copy takes the rest (or stops, for a released transfer).
  void endLanding(Peer* peer, Direction& dir, uint32_t channel, ChannelSlot& slot);
  Status unpackReceive(Direction& dir, uint32_t channel, ChannelSlot& slot,
                       const transport::Transport::UnpackSource& source);
  // The registered buffer and handle a plugin transport receives into or sends from.
  Result<transport::MemHandle*> registeredSlot(Direction& dir, uint32_t channel, int slot);
  Result<transport::MemHandle*> registeredDeviceStaging(Direction& dir, uint32_t channel,
                                                        int device);
  // The GPU holding every byte of [begin, end) of the stream when the transport sends from GPU
  // memory, else -1.
  [[nodiscard]] int deviceSendSource(const Stream& stream, uint64_t begin, uint64_t end) const;
  Result<transport::MemHandle*> receiveAnchor(Peer* peer, Direction& dir, uint32_t channel,
                                              void** anchor);
  void dropStagedData(Direction& dir, uint32_t channel, ChannelSlot& slot);
  [[nodiscard]] bool chunkNeedsStaging(const Direction& dir, uint32_t channel, const Stream& stream,
                                       uint64_t begin, uint64_t end) const;
  static Stream* nextChunk(Direction& dir, uint32_t channel, uint32_t* chunk);
  // Takes the channel's next chunk into its window, with a staging slot when it touches GPU
  // memory; nullptr when there is none (or no staging slot is free).
  ChannelSlot* admitChunk(Peer* peer, Direction& dir, uint32_t channel);
  // The stream's own memory for a chunk starting at `begin` (nothing for filler or discard).
  static void userSlices(const Stream& stream, uint64_t begin, const transport::IoSlice** slices,
                         int* nslices, size_t* offset);
  static void retireStreams(Direction& dir);
  gpu::ChannelStaging* stagingFor(Peer* peer, Direction& dir, uint32_t channel);
  int takeStagingSlot(Peer* peer, Direction& dir, uint32_t channel);
  static void releaseStagingSlot(Direction& dir, uint32_t channel, ChannelSlot& slot);
  static void stagingFailed(Peer* peer, Stream* stream, const Status& why);
  void chunkStaged(Peer* peer, Stream* stream);
  void finishChunk(Peer* peer, Stream* stream);
  // The oldest window entry's bytes are in place: it leaves the window. False if the peer failed.
  bool retireOldest(Peer* peer, Direction& dir, uint32_t channel);
  Status transportFailure(Peer* peer, Direction& dir, uint32_t channel, const char* what,
                          uint32_t chunk, transport::NetResult rc);

  transport::Transport& transport_;
  uint32_t staging_slots_;
  FollowLimits follow_;
  RecvPathChoice recv_path_;
  int gpu_;  // CUDA device a plugin transport runs on
  std::chrono::milliseconds data_timeout_;
  DataPathEvents& events_;
  WaitHints& hints_;
  std::vector<transport::abi::LoadMeta> unpack_scratch_;  // checked fragments
};

}  // namespace tcpx::engine
