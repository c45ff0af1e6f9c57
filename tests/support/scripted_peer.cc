#include "support/scripted_peer.h"

#include <poll.h>

#include <algorithm>
#include <cerrno>
#include <deque>
#include <sys/socket.h>
#include <thread>

#include "common/net.h"
#include "common/random.h"
#include "common/strings.h"
#include "control/blobs.h"
#include "engine/chunk_plan.h"
#include "transport/socket/socket_transport.h"

namespace tcpx::testing {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

namespace {

constexpr auto kPingEvery = 200ms;
constexpr uint32_t kWindow = 8;  // requests in flight per channel

Status timedOut(const char* what) {
  return Status(StatusCode::kTimeout, std::string("scripted peer: timed out ") + what);
}

}  // namespace

ScriptedPeer::ScriptedPeer(Options options) : options_(std::move(options)) {}

ScriptedPeer::~ScriptedPeer() {
  // Closing a comm joins its helper threads; the engine sees the sockets close.
  for (auto* c : sends_) {
    if (c != nullptr) transport_->closeSend(c);
  }
  for (auto* c : recvs_) {
    if (c != nullptr) transport_->closeRecv(c);
  }
  for (auto* l : listens_) {
    if (l != nullptr) transport_->closeListen(l);
  }
}

Result<std::unique_ptr<ScriptedPeer>> ScriptedPeer::connect(const std::string& engine_info,
                                                            const Options& options) {
  std::unique_ptr<ScriptedPeer> peer(new ScriptedPeer(options));
  Status st = peer->handshake(engine_info);
  if (!st.isOk()) return st;
  return peer;
}

std::string ScriptedPeer::memoryDescriptor(uint64_t id, uint64_t length) const {
  control::MemoryDescriptor desc;
  desc.owner_uuid = uuid_;
  desc.id = id;
  desc.base_addr = 0x100000;
  desc.length = length;
  return control::encodeMemoryDescriptor(desc);
}

namespace {

// The outcome (0 or an errno) of a connect that a signal interrupted.
int finishInterruptedConnect(int fd, Clock::time_point deadline) {
  for (;;) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (left <= 0) return ETIMEDOUT;
    pollfd pfd{fd, POLLOUT, 0};
    const int n = ::poll(&pfd, 1, static_cast<int>(left));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno;
    if (n == 0) continue;
    int err = 0;
    socklen_t len = sizeof(err);
    if (::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) return errno;
    return err;
  }
}

}  // namespace

Status ScriptedPeer::handshake(const std::string& engine_info) {
  const auto deadline = Clock::now() + 10s;
  auto info = control::decodeConnInfo(engine_info);
  if (!info.isOk()) return info.status();
  auto addr = net::resolve(info->host, info->port);
  if (!addr.isOk()) return addr.status();
  net::Fd fd(::socket(addr->family(), SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (::connect(fd.get(), addr->raw(), addr->len) != 0) {
    // A signal (a fuzzer's timer, say) may interrupt the blocking connect, which then goes on
    // in the background: wait for its outcome instead of failing the handshake.
    int err = errno;
    if (err == EINTR) err = finishInterruptedConnect(fd.get(), deadline);
    if (err != 0) {
      return Status(StatusCode::kRemoteDisconnected, "scripted peer: connect: " + errnoString(err));
    }
  }
  if (options_.after_connect) options_.after_connect(fd.get());
  conn_ = std::make_unique<control::ControlConnection>(std::move(fd));

  auto uuid = randomUuidHex();
  if (!uuid.isOk()) return uuid.status();
  uuid_ = fromHex(uuid.value()).value();
  std::string nonce(control::kNonceSize, '\0');
  Status st = secureRandom(nonce.data(), nonce.size());
  if (!st.isOk()) return st;
  // Our connection info names a port nobody listens on: the engine never needs to call back.
  control::ConnInfo own;
  own.uuid = uuid_;
  own.name = options_.name;
  own.host = "127.0.0.1";
  own.port = 1;
  own.transport = options_.transport;
  if (options_.direct.pid != 0) own.host_id = net::hostIdentity();
  control::Hello hello;
  hello.uuid = uuid_;
  hello.name = options_.name;
  hello.conn_info = control::encodeConnInfo(own);
  hello.transport = options_.transport;
  hello.settings = options_.settings;
  hello.nonce = nonce;
  hello.direct = options_.direct;
  control::encode(hello, conn_->out());
  st = flushOut(deadline);
  if (!st.isOk()) return st;

  auto ack_frame =
      expect(control::FrameType::kHelloAck,
             std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()));
  if (!ack_frame.isOk()) return ack_frame.status();
  control::HelloAck ack;
  st = control::decode(ack_frame->payload, &ack);
  if (!st.isOk()) return st;
  if (ack.result != control::HelloResult::kAccepted) {
    return Status(StatusCode::kRemoteRejected, "scripted peer: refused: " + ack.reason);
  }
  auto agreed = control::agreeSettings(options_.settings, ack.settings, 1000);
  if (!agreed.isOk()) return agreed.status();
  agreed_ = agreed.value();
  engine_direct_ = ack.direct;
  return setUpChannels(deadline);
}

Status ScriptedPeer::setUpChannels(Clock::time_point deadline) {
  transport::SocketTransportOptions topts;
  topts.bind_host = "127.0.0.1";
  topts.advertise_host = "127.0.0.1";
  topts.sockets_per_comm = options_.sockets;
  topts.min_split = options_.min_split;
  transport_ = transport::makeSocketTransport(topts);
  const uint32_t channels = agreed_.channels;
  control::ChannelSetup ours;
  ours.handles.resize(channels);
  listens_.assign(channels, nullptr);
  for (uint32_t i = 0; i < channels; ++i) {
    if (transport_->listen(0, &ours.handles[i], &listens_[i]) != transport::NetResult::kSuccess) {
      return Status(StatusCode::kTransportError, "scripted peer: listen failed");
    }
  }
  control::encode(ours, conn_->out());
  Status st = flushOut(deadline);
  if (!st.isOk()) return st;
  auto theirs_frame =
      expect(control::FrameType::kChannelSetup,
             std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()));
  if (!theirs_frame.isOk()) return theirs_frame.status();
  control::ChannelSetup theirs;
  st = control::decode(theirs_frame->payload, control::DecodeLimits{}, &theirs);
  if (!st.isOk()) return st;
  if (theirs.handles.size() != channels) {
    return Status(StatusCode::kProtocolError,
                  "scripted peer: the engine set up another channel count");
  }
  if (options_.before_data_connect) options_.before_data_connect(theirs.handles);
  if (!options_.set_up_data) return {};
  sends_.assign(channels, nullptr);
  recvs_.assign(channels, nullptr);
  for (;;) {
    bool all = true;
    for (uint32_t i = 0; i < channels; ++i) {
      if (sends_[i] == nullptr && transport_->connect(0, &theirs.handles[i], &sends_[i]) !=
                                      transport::NetResult::kSuccess) {
        return Status(StatusCode::kTransportError, "scripted peer: connect failed");
      }
      if (recvs_[i] == nullptr) {
        if (transport_->accept(listens_[i], &recvs_[i]) != transport::NetResult::kSuccess) {
          return Status(StatusCode::kTransportError, "scripted peer: accept failed");
        }
        if (recvs_[i] != nullptr) {
          transport_->closeListen(listens_[i]);
          listens_[i] = nullptr;
        }
      }
      all = all && sends_[i] != nullptr && recvs_[i] != nullptr;
    }
    if (all) return {};
    if (Clock::now() > deadline) return timedOut("setting up the data channels");
    st = pump(1ms);
    if (!st.isOk()) return st;
  }
}

Status ScriptedPeer::flushOut(Clock::time_point deadline) {
  while (conn_->wantsWrite()) {
    Status st = conn_->flush();
    if (!st.isOk()) return st;
    if (!conn_->wantsWrite()) break;
    if (Clock::now() > deadline) return timedOut("sending");
    pollfd pfd{conn_->fd(), POLLOUT, 0};
    ::poll(&pfd, 1, 10);
  }
  return {};
}

Status ScriptedPeer::send(const std::vector<uint8_t>& frames) {
  conn_->out()->insert(conn_->out()->end(), frames.begin(), frames.end());
  return flushOut(Clock::now() + 10s);
}

Status ScriptedPeer::pump(std::chrono::milliseconds wait) {
  if (Clock::now() - conn_->lastSend() >= kPingEvery) {
    control::encodePing(conn_->out());
    Status st = conn_->flush();
    if (!st.isOk()) return st;
  }
  pollfd pfd{conn_->fd(), POLLIN, 0};
  if (::poll(&pfd, 1, static_cast<int>(wait.count())) > 0) return conn_->readAvailable();
  return {};
}

Result<bool> ScriptedPeer::popFrame(Frame* out) {
  control::FrameHeader header;
  std::string_view payload;
  for (;;) {
    auto got = conn_->nextFrame(control::kMaxFramePayload, 0, &header, &payload);
    if (!got.isOk() || !got.value()) return got;
    if (header.type == static_cast<uint8_t>(control::FrameType::kPing)) continue;
    out->type = static_cast<control::FrameType>(header.type);
    out->payload.assign(payload);
    return true;
  }
}

Result<ScriptedPeer::Frame> ScriptedPeer::next(std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    Frame frame;
    auto got = popFrame(&frame);
    if (!got.isOk()) return got.status();
    if (got.value()) return frame;
    if (Clock::now() > deadline) return timedOut("waiting for a frame");
    Status st = pump(5ms);
    if (!st.isOk()) return st;
  }
}

Result<ScriptedPeer::Frame> ScriptedPeer::expect(control::FrameType type,
                                                 std::chrono::milliseconds timeout) {
  auto frame = next(timeout);
  if (!frame.isOk()) return frame;
  if (frame->type != type) {
    return Status(StatusCode::kProtocolError,
                  strfmt("scripted peer: expected %s, got %s",
                         control::frameTypeName(static_cast<uint8_t>(type)),
                         control::frameTypeName(static_cast<uint8_t>(frame->type))));
  }
  return frame;
}

bool ScriptedPeer::closedWithin(std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  while (Clock::now() < deadline) {
    Frame frame;
    auto got = popFrame(&frame);
    if (!got.isOk()) return false;  // garbage is not a close
    if (got.value()) continue;
    // Keepalives go on: a close now is the engine's decision, not its peer timeout.
    if (!pump(5ms).isOk()) return true;
  }
  return false;
}

Status ScriptedPeer::idle(std::chrono::milliseconds duration) {
  const auto until = Clock::now() + duration;
  while (Clock::now() < until) {
    Status st = pump(5ms);
    if (!st.isOk()) return st;
  }
  return {};
}

Status ScriptedPeer::runStream(bool sending, uint64_t first_chunk, uint64_t chunk, char* data,
                               uint64_t total, std::chrono::milliseconds timeout,
                               std::chrono::milliseconds pace) {
  const auto deadline = Clock::now() + timeout;
  const uint32_t channels = agreed_.channels;
  const uint32_t nchunks = engine::ChunkPlan::chunkCount(total, chunk);
  struct Posted {
    transport::Request* request;
    transport::IoSlice slice;
  };
  std::vector<std::deque<Posted>> in_flight(channels);
  // Slices live as long as the comms: one per chunk, never moved.
  slice_lists_.push_back(std::make_unique<std::vector<transport::IoSlice>>(nchunks));
  std::vector<transport::IoSlice>& slices = *slice_lists_.back();
  uint32_t next = 0;  // next chunk to post, in order
  uint32_t done = 0;
  while (done < nchunks) {
    // Post in chunk order while the channel of the next chunk has room (paced: one chunk in
    // flight, after a pause).
    while (next < nchunks) {
      const uint32_t ch = engine::ChunkPlan::channelOf(first_chunk + next, channels);
      if (in_flight[ch].size() >= (pace.count() > 0 ? 1U : kWindow)) break;
      if (pace.count() > 0) {
        if (done < next) break;  // the previous chunk is still in flight
        Status st = idle(pace);
        if (!st.isOk()) return st;
      }
      const auto [begin, end] = engine::ChunkPlan::chunkRange(total, chunk, next);
      slices[next] = {data + begin, end - begin};
      transport::Request* request = nullptr;
      const transport::NetResult rc = sending
                                          ? transport_->isend(sends_[ch], &slices[next], 1, 0,
                                                              end - begin, 0, nullptr, &request)
                                          : transport_->irecv(recvs_[ch], &slices[next], 1, 0,
                                                              end - begin, 0, nullptr, &request);
      if (rc != transport::NetResult::kSuccess || request == nullptr) {
        return Status(StatusCode::kTransportError, "scripted peer: posting a chunk failed");
      }
      in_flight[ch].push_back({request, slices[next]});
      ++next;
    }
    bool moved = false;
    for (uint32_t ch = 0; ch < channels; ++ch) {
      while (!in_flight[ch].empty()) {
        int finished = 0;
        size_t size = 0;
        transport::Request* request = in_flight[ch].front().request;
        if (transport_->test(request, &finished, &size) != transport::NetResult::kSuccess) {
          return Status(StatusCode::kRemoteDisconnected, "scripted peer: a data channel failed");
        }
        if (finished == 0) break;
        if (!sending) (void)transport_->irecvConsumed(recvs_[ch], request);
        in_flight[ch].pop_front();
        ++done;
        moved = true;
      }
    }
    if (Clock::now() > deadline) return timedOut("moving a stream");
    if (!moved) {
      Status st = pump(1ms);
      if (!st.isOk()) return st;
    }
  }
  return {};
}

Status ScriptedPeer::sendStream(std::string_view bytes, std::chrono::milliseconds timeout,
                                uint32_t spread) {
  return sendCut(bytes, spread == 0 ? outSpread() : spread, {}, timeout);
}

Result<std::string> ScriptedPeer::receiveStream(uint64_t total, uint32_t spread,
                                                std::chrono::milliseconds timeout,
                                                std::chrono::milliseconds pace) {
  const uint64_t first = in_next_chunk_;
  const uint64_t chunk = engine::ChunkPlan::chunkSizeFor(total, agreed_.chunk_size, spread);
  in_next_chunk_ += engine::ChunkPlan::chunkCount(total, chunk);
  std::string* out = keep(std::string(total, '\0'));
  Status st = runStream(false, first, chunk, out->data(), total, timeout, pace);
  if (!st.isOk()) return st;
  return *out;
}

Status ScriptedPeer::sendStreamPaced(std::string_view bytes, std::chrono::milliseconds pace,
                                     std::chrono::milliseconds timeout) {
  return sendCut(bytes, outSpread(), pace, timeout);
}

Status ScriptedPeer::sendCut(std::string_view bytes, uint32_t spread,
                             std::chrono::milliseconds pace, std::chrono::milliseconds timeout) {
  const uint64_t first = out_next_chunk_;
  const uint64_t chunk = engine::ChunkPlan::chunkSizeFor(bytes.size(), agreed_.chunk_size, spread);
  out_next_chunk_ += engine::ChunkPlan::chunkCount(bytes.size(), chunk);
  std::string* copy = keep(std::string(bytes));
  return runStream(true, first, chunk, copy->data(), copy->size(), timeout, pace);
}

void ScriptedPeer::cutChannel(uint32_t channel) {
  if (sends_[channel] == nullptr) return;
  transport_->closeSend(sends_[channel]);
  sends_[channel] = nullptr;
}

std::string* ScriptedPeer::keep(std::string bytes) {
  buffers_.push_back(std::make_unique<std::string>(std::move(bytes)));
  return buffers_.back().get();
}

Status ScriptedPeer::sendUnannounced(uint32_t channel, size_t size,
                                     std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  std::string* bytes = keep(std::string(size, '\x5a'));
  slice_lists_.push_back(std::make_unique<std::vector<transport::IoSlice>>(
      1, transport::IoSlice{bytes->data(), size}));
  transport::Request* request = nullptr;
  if (transport_->isend(sends_[channel], slice_lists_.back()->data(), 1, 0, size, 0, nullptr,
                        &request) != transport::NetResult::kSuccess ||
      request == nullptr) {
    return Status(StatusCode::kTransportError, "scripted peer: posting a send failed");
  }
  for (;;) {
    int finished = 0;
    size_t got = 0;
    if (transport_->test(request, &finished, &got) != transport::NetResult::kSuccess) {
      return Status(StatusCode::kRemoteDisconnected, "scripted peer: the data channel failed");
    }
    if (finished != 0) return {};
    if (Clock::now() > deadline) return timedOut("sending unannounced data");
    Status st = pump(1ms);
    if (!st.isOk()) return st;
  }
}

}  // namespace tcpx::testing
