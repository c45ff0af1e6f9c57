// A fake peer that speaks the engine's wire protocol from a test script.
//
// It performs the real handshake (HELLO / HELLO_ACK, CHANNEL_SETUP, data channels over the
// project's socket transport), then sends whatever frames and data the script asks for, including
// what a correct engine never sends: duplicate, unsolicited, late or mis-addressed frames, data
// without an announcement, floods. Tests check what the engine under test does with them.
// Driven by one thread (the test's); every wait is bounded and keeps the control connection alive
// with PINGs, so the engine never declares the scripted peer silent unless the script wants it.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <tcpx_p2p/status.h>

#include "control/control_connection.h"
#include "control/frames.h"
#include "control/negotiation.h"
#include "transport/transport.h"

namespace tcpx::testing {

class ScriptedPeer {
 public:
  struct Options {
    std::string name = "scripted";
    // What the HELLO announces (channels, chunk size, limits, timeout).
    control::WireSettings settings{2, 512ULL * 1024, 65536, 65536, 4000};
    int sockets = 1;                   // data sockets per channel
    size_t min_split = 512ULL * 1024;  // how our sends are cut over them
    // The transport the HELLO names: "socket", or "emulator" (whose bytes travel over the same
    // socket transport, so this peer can stand in for an engine on the emulator).
    std::string transport = "socket";
    // Called with the engine's data-channel handles before this peer connects to them.
    std::function<void(const std::vector<transport::ConnectHandle>&)> before_data_connect;
    // false: the channel handles are exchanged but this peer never connects or accepts, so the
    // engine's connects and accepts stay under way (a peer stuck in set-up); connect() returns
    // once the handles are exchanged.
    bool set_up_data = true;
    // Direct copies offered in the HELLO (pid 0: none). With an offer the connection info names
    // this host, so that an engine here offers them back.
    control::DirectOffer direct;
    // Called with the control connection's socket once it is connected, before the HELLO: a
    // test hands it to the process its offer names (the engine reads only a process holding
    // the peer's end of the connection).
    std::function<void(int fd)> after_connect;
  };
  struct Frame {
    control::FrameType type = control::FrameType::kPing;
    std::string payload;
  };

  // Connects to the engine whose connection info is `engine_info` as a new peer, and sets up the
  // data channels; fails if the engine refuses or does not finish within 10 s.
  static Result<std::unique_ptr<ScriptedPeer>> connect(const std::string& engine_info,
                                                       const Options& options);
  ~ScriptedPeer();
  ScriptedPeer(const ScriptedPeer&) = delete;
  ScriptedPeer& operator=(const ScriptedPeer&) = delete;

  [[nodiscard]] const std::string& name() const { return options_.name; }
  [[nodiscard]] const control::AgreedSettings& agreed() const { return agreed_; }
  // What the engine offered back in its HELLO_ACK.
  [[nodiscard]] const control::DirectOffer& engineDirect() const { return engine_direct_; }
  // A memory descriptor as if this peer had registered `length` bytes under `id`: the engine
  // under test can then address this peer's "memory" in READs and WRITEs.
  [[nodiscard]] std::string memoryDescriptor(uint64_t id, uint64_t length) const;

  // The next id for an operation this peer announces (they increase, as an engine's do).
  uint64_t nextId() { return ++last_id_; }

  // Sends encoded frames as they are.
  Status send(const std::vector<uint8_t>& frames);
  // The next frame from the engine other than PING, waiting up to `timeout`.
  Result<Frame> next(std::chrono::milliseconds timeout);
  // The next frame, which must be of `type` (another type is a PROTOCOL_ERROR result).
  Result<Frame> expect(control::FrameType type, std::chrono::milliseconds timeout);
  // Whether the engine closes the control connection within `timeout` (frames before the close
  // are read and dropped; PINGs keep going, so the close is not the engine's peer timeout).
  bool closedWithin(std::chrono::milliseconds timeout);
  // Keeps the connection alive for `duration` without sending anything else; frames that arrive
  // meanwhile are kept for next().
  Status idle(std::chrono::milliseconds duration);

  // ---- Data channels: chunks as both engines cut them (engine/chunk_plan.h) ----
  // Where the next stream this peer announces starts, and where the engine's next one starts.
  [[nodiscard]] uint64_t outNextChunk() const { return out_next_chunk_; }
  [[nodiscard]] uint64_t inNextChunk() const { return in_next_chunk_; }
  // The spread this peer announces with each stream it sends (every socket, as an engine does
  // for a stream alone): set it in the announcing frame.
  [[nodiscard]] uint32_t outSpread() const { return 2 * agreed_.channels; }
  // Sends `bytes` as the stream starting at outNextChunk() (announce it first, with `spread`:
  // 0 stands for outSpread()) and waits until every chunk left.
  Status sendStream(std::string_view bytes, std::chrono::milliseconds timeout, uint32_t spread = 0);
  // Receives the engine's stream of `total` bytes that starts at inNextChunk(), cut as the
  // engine's announcement said (`spread`). With `pace`, one chunk at a time with that pause
  // before each: a live but slow receiver.
  Result<std::string> receiveStream(uint64_t total, uint32_t spread,
                                    std::chrono::milliseconds timeout,
                                    std::chrono::milliseconds pace = {});
  // Sends like sendStream (spread outSpread()), one chunk at a time with `pace` before each.
  Status sendStreamPaced(std::string_view bytes, std::chrono::milliseconds pace,
                         std::chrono::milliseconds timeout);
  // Closes the data connection this peer sends on over `channel` (its sockets close) while
  // the control connection lives on.
  void cutChannel(uint32_t channel);
  // Sends `size` bytes on one channel as a single request that no frame announced.
  Status sendUnannounced(uint32_t channel, size_t size, std::chrono::milliseconds timeout);

 private:
  explicit ScriptedPeer(Options options);
  Status handshake(const std::string& engine_info);
  Status setUpChannels(std::chrono::steady_clock::time_point deadline);
  Status flushOut(std::chrono::steady_clock::time_point deadline);
  // Reads what the socket has (waiting up to `wait`) and pings when the line was quiet.
  Status pump(std::chrono::milliseconds wait);
  Result<bool> popFrame(Frame* out);
  // Moves one stream over the channels: posts every chunk in order and tests them to the end.
  // `data` stays valid until the peer is destroyed (a stream given up on a timeout may still
  // have requests in the transport).
  Status runStream(bool sending, uint64_t first_chunk, uint64_t chunk, char* data, uint64_t total,
                   std::chrono::milliseconds timeout, std::chrono::milliseconds pace = {});
  // Sends `bytes` as the next stream, cut by `spread`, paced as sendStreamPaced (none: 0).
  Status sendCut(std::string_view bytes, uint32_t spread, std::chrono::milliseconds pace,
                 std::chrono::milliseconds timeout);
  // A buffer that lives as long as the peer's comms.
  std::string* keep(std::string bytes);

  Options options_;
  std::string uuid_;  // 16 raw bytes
  std::unique_ptr<control::ControlConnection> conn_;
  control::AgreedSettings agreed_;
  control::DirectOffer engine_direct_;
  std::unique_ptr<transport::Transport> transport_;
  std::vector<transport::ListenComm*> listens_;
  std::vector<transport::SendComm*> sends_;
  std::vector<transport::RecvComm*> recvs_;
  uint64_t last_id_ = 0;
  uint64_t out_next_chunk_ = 0;
  uint64_t in_next_chunk_ = 0;
  // Stream buffers and their slice arrays, kept until the comms are closed.
  std::vector<std::unique_ptr<std::string>> buffers_;
  std::vector<std::unique_ptr<std::vector<transport::IoSlice>>> slice_lists_;
};

}  // namespace tcpx::testing
