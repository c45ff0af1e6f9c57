// Peers that deviate around direct copies between processes of one host (same_host_copy): a
// process whose proof does not read back, direct frames without an agreement or out of turn,
// answers naming memory of the wrong size or none at all, a peer that cannot read us, a peer that
// never finishes a direct copy while its control connection lives. Each case
// checks the typed outcome, that no byte of registered memory or around it changes unless the
// protocol allows it, and that the engine's other peers go on working.
#include <signal.h>
#include <unistd.h>

#include <cstring>
#include <functional>
#include <sys/prctl.h>
#include <sys/wait.h>

#include "common/pattern_memory.h"
#include "gpu/gpu.h"
#include "protocol/protocol_fixture.h"

namespace tcpx::testing {
namespace {

using control::FrameType;

class DirectPeerTest : public ProtocolTest {
 protected:
  // A short data timeout: a peer that stalls a direct copy is failed within it.
  void SetUp() override { startEngine({{"same_host_copy", "auto"}, {"data_timeout_ms", "600"}}); }

  void TearDown() override {
    ProtocolTest::TearDown();
    if (holder_ > 0) {
      kill(holder_, SIGKILL);
      waitpid(holder_, nullptr, 0);
    }
  }

  // Connects a scripted peer offering direct copies from a process of its own: a child forked
  // now, holding a copy of this process's memory (cookie_, and every source buffer made before
  // the call, at the same addresses). `cookie` is the proof it offers: cookie_ is what the
  // child's memory holds at the address it names. (An offer of this process's own pid would be
  // refused: the scripted peer is no engine of it.)
  ScriptedPeer& connectDirect(const std::string& cookie) {
    if (holder_ <= 0) {
      holder_ = fork();
      if (holder_ == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        for (;;) pause();
      }
    }
    ScriptedPeer::Options options;
    options.direct = {static_cast<uint32_t>(holder_), reinterpret_cast<uint64_t>(cookie_.data()),
                      cookie};
    ScriptedPeer& peer = connectScripted(options);
    EXPECT_NE(peer.engineDirect().pid, 0u) << "the engine offered no direct copies back";
    return peer;
  }

  // A direct WRITE_REQUEST of `source` into the engine's `region`.
  std::vector<uint8_t> directWrite(uint64_t id, const GuardedRegion& region,
                                   const std::string& source,
                                   const std::optional<std::string>& notification = {}) {
    const std::vector<control::WireDesc> descs{{region.id(), 0, source.size()}};
    const size_t half = source.size() / 2;
    const std::vector<control::DirectPiece> pieces{
        {reinterpret_cast<uint64_t>(source.data()), half},
        {reinterpret_cast<uint64_t>(source.data()) + half, source.size() - half}};
    control::WriteRequest m;
    m.xfer_id = id;
    m.total = source.size();
    m.descs = descs;
    m.has_notification = notification.has_value();
    if (notification) m.notification = *notification;
    m.direct = true;
    m.pieces = pieces;
    return frameOf([&](auto* out) { control::encode(m, {}, out); });
  }

  // The scripted peer's direct READ_REQUEST of the whole of `region`; returns its id.
  uint64_t sendDirectRead(const GuardedRegion& region) {
    const std::vector<control::WireDesc> descs{{region.id(), 0, region.size()}};
    control::ReadRequest rr;
    rr.xfer_id = scripted_->nextId();
    rr.total = region.size();
    rr.descs = descs;
    rr.direct = true;
    EXPECT_TRUE(scripted_->send(frameOf([&](auto* out) { control::encode(rr, out); })).isOk());
    return rr.xfer_id;
  }

  control::Completion expectCompletion(FrameType type) {
    auto frame = scripted_->expect(type, 5s);
    EXPECT_TRUE(frame.isOk()) << frame.status().toString();
    control::Completion c;
    if (frame.isOk()) {
      EXPECT_TRUE(control::decodeCompletion(frame->payload, &c).isOk());
    }
    return c;
  }

  // A registered 1 MiB host source filled with pattern `seed`, a region of the scripted peer
  // (`region_id`) of the same size, and WRITEs of the one into the other.
  struct HostWrite {
    static constexpr size_t kSize = size_t{1} << 20;
    HostWrite(DirectPeerTest* fixture, uint64_t seed, uint64_t region_id)
        : test(fixture), local(kSize), remote(fixture->scriptedRegion(region_id, kSize)) {
      fillPattern(local.data(), kSize, seed);
      mem = fixture->engine_->registerMemory(local.data(), kSize).value();
      bytes.assign(reinterpret_cast<const char*>(local.data()), kSize);
    }
    Result<TransferHandle> post() const {
      return test->post(OpKind::kWrite, "scripted", {{mem, 0, kSize}}, {{remote.id, 0, kSize}});
    }
    DirectPeerTest* test;
    tools::HostBuffer local;
    RemoteMemory remote;
    MemoryId mem{};
    std::string bytes;  // what the WRITE must deliver
  };

  // The engine's next WRITE_REQUEST, decoded.
  control::WriteRequest expectWriteRequest() {
    control::WriteRequest wr;
    auto request = scripted_->expect(FrameType::kWriteRequest, 5s);
    EXPECT_TRUE(request.isOk()) << request.status().toString();
    if (request.isOk()) {
      EXPECT_TRUE(control::decode(request->payload, control::DecodeLimits{}, &wr).isOk());
    }
    return wr;
  }

  void answerWrite(uint64_t id, StatusCode code, const std::string& message) {
    EXPECT_TRUE(scripted_
                    ->send(frameOf([&](auto* out) {
                      control::encodeWriteDone({id, code, message}, out);
                    }))
                    .isOk());
  }

  // Receives the WRITE `wr` over the data channels, checks its bytes and completes it.
  void takeOverTheChannels(const control::WriteRequest& wr, const std::string& expected) {
    auto bytes = scripted_->receiveStream(expected.size(), wr.spread, 10s);
    ASSERT_TRUE(bytes.isOk()) << bytes.status().toString();
    EXPECT_TRUE(*bytes == expected);
    answerWrite(wr.xfer_id, StatusCode::kOk, "");
  }

  // The scripted peer's connection was closed for a protocol error.
  void expectClosedForProtocolError() {
    EXPECT_TRUE(scripted_->closedWithin(5s)) << "the engine kept the connection";
    EXPECT_EQ(engine_->peerState("scripted"), PeerState::kFailed);
  }

  const std::string cookie_ = patternBytes(control::kNonceSize, 99);
  pid_t holder_ = -1;
};

TEST_F(DirectPeerTest, ADirectWriteIsReadFromTheInitiatorAndItsNotificationFollowsTheBytes) {
  constexpr size_t kSize = size_t{1} << 20;
  const std::string source = patternBytes(kSize, 3);  // in the holder's memory too
  connectDirect(cookie_);
  GuardedRegion region(*engine_, kSize);
  ASSERT_TRUE(scripted_->send(directWrite(scripted_->nextId(), region, source, "landed")).isOk());
  const control::Completion done = expectCompletion(FrameType::kWriteDone);
  EXPECT_EQ(done.code, StatusCode::kOk) << done.message;
  EXPECT_EQ(std::memcmp(region.data(), source.data(), kSize), 0);
  EXPECT_TRUE(region.guardsIntact());
  const auto notes = engine_->takeNotifications();
  ASSERT_EQ(notes.size(), 1u);
  EXPECT_EQ(notes[0].message, "landed");
  expectBystanderWorks();
}

TEST_F(DirectPeerTest, AProcessThatIsNotThePeerIsNeverReadAndItsWriteIsRefused) {
  // The pid is a live process, but the proof does not read back: another process of that pid
  // (a peer in another pid namespace) must never be read.
  constexpr size_t kSize = size_t{1} << 20;
  const std::string source = patternBytes(kSize, 4);
  connectDirect(patternBytes(control::kNonceSize, 100));
  GuardedRegion region(*engine_, kSize);
  std::memset(region.data(), kPoison, kSize);
  ASSERT_TRUE(scripted_->send(directWrite(scripted_->nextId(), region, source, "never")).isOk());
  const control::Completion done = expectCompletion(FrameType::kWriteDone);
  EXPECT_EQ(done.code, StatusCode::kNotSupported) << done.message;
  EXPECT_TRUE(GuardedRegion::allBytes(region.data(), kSize, kPoison));
  EXPECT_TRUE(region.guardsIntact());
  EXPECT_TRUE(engine_->takeNotifications().empty());
  EXPECT_EQ(engine_->peerState("scripted"), PeerState::kReady);
  // Nothing stays pinned.
  EXPECT_TRUE(deregisterWithin(region.id(), 1s).isOk());
}

TEST_F(DirectPeerTest, AnOfferOfThisProcesssOwnPidFromNoEngineOfItIsNeverUsed) {
  // Another pid namespace's process with our pid, or a peer replaying our own offer: were it
  // believed, the engine would read memory of its own process at addresses the peer names.
  constexpr size_t kSize = size_t{256} << 10;
  const std::string secret = patternBytes(kSize, 8);  // unregistered memory of this process
  ScriptedPeer::Options options;
  options.direct = {static_cast<uint32_t>(getpid()), reinterpret_cast<uint64_t>(cookie_.data()),
                    cookie_};
  connectScripted(options);
  GuardedRegion region(*engine_, kSize);
  std::memset(region.data(), kPoison, kSize);
  ASSERT_TRUE(scripted_->send(directWrite(scripted_->nextId(), region, secret)).isOk());
  expectClosedForProtocolError();
  EXPECT_TRUE(GuardedRegion::allBytes(region.data(), kSize, kPoison));
  EXPECT_TRUE(region.guardsIntact());
  expectBystanderWorks();
}

TEST_F(DirectPeerTest, DirectFramesWithoutAnAgreementOrOutOfTurnFailThePeer) {
  constexpr size_t kSize = size_t{256} << 10;
  const std::string source = patternBytes(kSize, 5);
  {
    SCOPED_TRACE("a direct WRITE from a peer that offered nothing");
    connectScripted();
    EXPECT_EQ(scripted_->engineDirect().pid, 0u);
    GuardedRegion region(*engine_, kSize);
    std::memset(region.data(), kPoison, kSize);
    ASSERT_TRUE(scripted_->send(directWrite(scripted_->nextId(), region, source)).isOk());
    expectClosedForProtocolError();
    EXPECT_TRUE(GuardedRegion::allBytes(region.data(), kSize, kPoison));
    EXPECT_TRUE(deregisterWithin(region.id(), 1s).isOk());
  }
  {
    SCOPED_TRACE("READ_DONE for a READ never announced");
    connectDirect(cookie_);
    ASSERT_TRUE(scripted_
                    ->send(frameOf([&](auto* out) {
                      control::encodeReadDone({scripted_->nextId(), StatusCode::kOk, ""}, out);
                    }))
                    .isOk());
    expectClosedForProtocolError();
  }
  {
    SCOPED_TRACE("a direct READ, answered with our memory, then READ_DONE twice");
    connectDirect(cookie_);
    GuardedRegion region(*engine_, kSize);
    const uint64_t read_id = sendDirectRead(region);
    auto frame = scripted_->expect(FrameType::kReadResponse, 5s);
    ASSERT_TRUE(frame.isOk()) << frame.status().toString();
    control::ReadResponse resp;
    ASSERT_TRUE(control::decode(frame->payload, control::DecodeLimits{}, &resp).isOk());
    ASSERT_TRUE(resp.direct);
    ASSERT_EQ(resp.decoded_pieces.size(), 1u);
    EXPECT_EQ(resp.decoded_pieces[0].addr, reinterpret_cast<uint64_t>(region.data()));
    EXPECT_EQ(resp.decoded_pieces[0].length, kSize);
    const auto done = frameOf([&](auto* out) {
      control::encodeReadDone({read_id, StatusCode::kOk, ""}, out);
    });
    ASSERT_TRUE(scripted_->send(done).isOk());
    ASSERT_TRUE(scripted_->idle(100ms).isOk());
    // READ_DONE let the region go.
    EXPECT_TRUE(deregisterWithin(region.id(), 1s).isOk());
    ASSERT_TRUE(scripted_->send(done).isOk());
    expectClosedForProtocolError();
  }
  expectBystanderWorks();
}

// WRITE_QUEUED (the target's copy of a direct WRITE is queued, with a signal to poll) is admitted
// only for a direct WRITE that asked for it: a WRITE of host memory never asks. For it, for a
// WRITE over the data channels, for no WRITE, or malformed, it fails the peer and its transfer.
TEST_F(DirectPeerTest, WriteQueuedWhereNoSignalWasAskedForFailsThePeer) {
  const std::string signal(control::kSignalHandleSize, 's');
  auto queued = [&](uint64_t id) {
    return frameOf([&](auto* out) { control::encode(control::WriteQueued{id, signal}, out); });
  };
  // Posts a WRITE, checks the request, sends `frame(id)` and expects a protocol error.
  auto refused = [&](bool direct, uint64_t seed, uint64_t region,
                     const std::function<std::vector<uint8_t>(uint64_t)>& frame) {
    const HostWrite write(this, seed, region);
    auto h = write.post();
    ASSERT_TRUE(h.isOk()) << h.status().toString();
    const control::WriteRequest wr = expectWriteRequest();
    ASSERT_EQ(wr.direct, direct);
    EXPECT_FALSE(wr.want_signal) << "a WRITE of host memory asked for a signal";
    ASSERT_TRUE(scripted_->send(frame(wr.xfer_id)).isOk());
    expectClosedForProtocolError();
    EXPECT_EQ(engine_->waitTransfer(h.value(), 5s).code(), StatusCode::kProtocolError);
    (void)engine_->releaseTransfer(h.value());
    ASSERT_TRUE(engine_->deregisterMemory(write.mem).isOk());
  };
  {
    SCOPED_TRACE("for a direct WRITE of host memory");
    connectDirect(cookie_);
    refused(true, 11, 81, queued);
  }
  {
    SCOPED_TRACE("for a WRITE over the data channels");
    connectScripted();
    refused(false, 12, 82, queued);
  }
  {
    SCOPED_TRACE("for no WRITE");
    connectDirect(cookie_);
    ASSERT_TRUE(scripted_->send(queued(scripted_->nextId())).isOk());
    expectClosedForProtocolError();
  }
  {
    SCOPED_TRACE("with a short signal");
    connectDirect(cookie_);
    refused(true, 13, 83, [&](uint64_t id) {
      std::vector<uint8_t> frame = queued(id);
      frame.pop_back();
      const auto length = static_cast<uint32_t>(frame.size() - control::kFrameHeaderSize);
      std::memcpy(frame.data(), &length, sizeof(length));
      return frame;
    });
  }
  expectBystanderWorks();
}

// A direct WRITE of GPU memory asks for its copy's signal when it is the engine's only transfer
// in flight to the peer and carries no notification, and takes WRITE_QUEUED once: repeated, it
// fails the peer. A signal that cannot be opened leaves the WRITE to WRITE_DONE, and later WRITEs
// to that peer ask for none.
TEST_F(DirectPeerTest, AGpuWriteAsksForItsCopysSignalAndTakesWriteQueuedOnce) {
  if (tools::gpuCount() == 0) {
    GTEST_SKIP() << "GPU test skipped: " << tools::gpuUnavailableReason();
  }
  constexpr size_t kSize = size_t{1} << 20;
  auto local = tools::makeGpuMemory(kSize, 0);
  ASSERT_NE(local, nullptr);
  auto mem = engine_->registerMemory(local->data(), kSize, local->kind(), local->device());
  ASSERT_TRUE(mem.isOk()) << mem.status().toString();
  const std::string garbage(control::kSignalHandleSize, 's');
  auto queued = [&](uint64_t id) {
    return frameOf([&](auto* out) { control::encode(control::WriteQueued{id, garbage}, out); });
  };
  {
    SCOPED_TRACE("a WRITE, a second while it is in flight, WRITE_QUEUED twice");
    connectDirect(cookie_);
    const RemoteMemory remote = scriptedRegion(84, kSize);
    // Alone but with a notification: no signal (the notification must come before anything the
    // application sends once the WRITE completed, and the target delivers it with WRITE_DONE).
    auto notifying = post(OpKind::kWrite, "scripted", {{mem.value(), 0, kSize}},
                          {{remote.id, 0, kSize}}, std::string("kv ready"));
    ASSERT_TRUE(notifying.isOk()) << notifying.status().toString();
    const control::WriteRequest with_notification = expectWriteRequest();
    ASSERT_TRUE(with_notification.direct);
    EXPECT_FALSE(with_notification.want_signal) << "a WRITE with a notification asked for one";
    answerWrite(with_notification.xfer_id, StatusCode::kOk, "");
    EXPECT_TRUE(engine_->waitTransfer(notifying.value(), 5s).isOk());
    (void)engine_->releaseTransfer(notifying.value());
    auto first =
        post(OpKind::kWrite, "scripted", {{mem.value(), 0, kSize}}, {{remote.id, 0, kSize}});
    ASSERT_TRUE(first.isOk()) << first.status().toString();
    const control::WriteRequest a = expectWriteRequest();
    auto second =
        post(OpKind::kWrite, "scripted", {{mem.value(), 0, kSize}}, {{remote.id, 0, kSize}});
    ASSERT_TRUE(second.isOk()) << second.status().toString();
    const control::WriteRequest b = expectWriteRequest();
    ASSERT_TRUE(a.direct && b.direct) << "the GPU WRITEs were not direct";
    EXPECT_TRUE(a.want_signal) << "the only WRITE in flight asked for no signal";
    EXPECT_FALSE(b.want_signal) << "a WRITE behind another asked for a signal";
    ASSERT_TRUE(scripted_->send(queued(a.xfer_id)).isOk());
    ASSERT_TRUE(scripted_->send(queued(a.xfer_id)).isOk());
    expectClosedForProtocolError();
    for (auto h : {first.value(), second.value()}) {
      EXPECT_EQ(engine_->waitTransfer(h, 5s).code(), StatusCode::kProtocolError);
      (void)engine_->releaseTransfer(h);
    }
  }
  {
    SCOPED_TRACE("a signal that cannot be opened");
    connectDirect(cookie_);
    const RemoteMemory remote = scriptedRegion(85, kSize);
    auto h = post(OpKind::kWrite, "scripted", {{mem.value(), 0, kSize}}, {{remote.id, 0, kSize}});
    ASSERT_TRUE(h.isOk()) << h.status().toString();
    const control::WriteRequest wr = expectWriteRequest();
    ASSERT_TRUE(wr.direct && wr.want_signal);
    ASSERT_TRUE(scripted_->send(queued(wr.xfer_id)).isOk());
    ASSERT_TRUE(scripted_->idle(100ms).isOk());
    EXPECT_EQ(engine_->checkTransfer(h.value()).code(), StatusCode::kInProgress)
        << "the WRITE ended on a signal that cannot be read";
    answerWrite(wr.xfer_id, StatusCode::kOk, "");
    EXPECT_TRUE(engine_->waitTransfer(h.value(), 5s).isOk());
    ASSERT_TRUE(engine_->postTransfer(h.value()).isOk());
    const control::WriteRequest next = expectWriteRequest();
    EXPECT_TRUE(next.direct);
    EXPECT_FALSE(next.want_signal) << "asked again for a signal this peer's could not be opened";
    answerWrite(next.xfer_id, StatusCode::kOk, "");
    EXPECT_TRUE(engine_->waitTransfer(h.value(), 5s).isOk());
    (void)engine_->releaseTransfer(h.value());
    auto stats = engine_->peerStats("scripted");
    ASSERT_TRUE(stats.isOk());
    EXPECT_EQ(stats->signalled_writes, 0u);
    EXPECT_EQ(engine_->peerState("scripted"), PeerState::kReady);
  }
  EXPECT_EQ(gpu::PeerSignal::openCount(), 0);
  ASSERT_TRUE(engine_->deregisterMemory(mem.value()).isOk());
  expectBystanderWorks();
}

TEST_F(DirectPeerTest, AnswersToADirectReadOfTheWrongSizeOrOfUnmappedMemoryWriteNothing) {
  constexpr size_t kSize = size_t{512} << 10;
  for (const bool wrong_size : {true, false}) {
    SCOPED_TRACE(wrong_size ? "pieces of the wrong size" : "pieces the peer does not map");
    connectDirect(cookie_);
    GuardedRegion region(*engine_, kSize);
    std::memset(region.data(), kPoison, kSize);
    const RemoteMemory remote = scriptedRegion(77, kSize);
    auto h = post(OpKind::kRead, "scripted", {{region.id(), 0, kSize}}, {{remote.id, 0, kSize}});
    ASSERT_TRUE(h.isOk()) << h.status().toString();
    auto request = scripted_->expect(FrameType::kReadRequest, 5s);
    ASSERT_TRUE(request.isOk()) << request.status().toString();
    control::ReadRequest rr;
    ASSERT_TRUE(control::decode(request->payload, control::DecodeLimits{}, &rr).isOk());
    ASSERT_TRUE(rr.direct) << "the engine did not ask for a direct READ";
    const std::string source = patternBytes(kSize + 1, 6);
    const std::vector<control::DirectPiece> pieces{
        wrong_size ? control::DirectPiece{reinterpret_cast<uint64_t>(source.data()), kSize + 1}
                   : control::DirectPiece{0x10, kSize}};
    control::ReadResponse resp;
    resp.xfer_id = rr.xfer_id;
    resp.direct = true;
    resp.pieces = pieces;
    ASSERT_TRUE(
        scripted_->send(frameOf([&](auto* out) { control::encode(resp, {}, out); })).isOk());
    const Status st = engine_->waitTransfer(h.value(), 5s);
    if (wrong_size) {
      EXPECT_EQ(st.code(), StatusCode::kProtocolError) << st.toString();
      expectClosedForProtocolError();
    } else {
      // Our own read failed: the READ says why and the peer hears READ_DONE with it.
      EXPECT_EQ(st.code(), StatusCode::kRemoteRejected) << st.toString();
      const control::Completion done = expectCompletion(FrameType::kReadDone);
      EXPECT_EQ(done.xfer_id, rr.xfer_id);
      EXPECT_EQ(done.code, StatusCode::kRemoteRejected);
      EXPECT_EQ(engine_->peerState("scripted"), PeerState::kReady);
    }
    (void)engine_->releaseTransfer(h.value());
    EXPECT_TRUE(GuardedRegion::allBytes(region.data(), kSize, kPoison));
    EXPECT_TRUE(region.guardsIntact());
    EXPECT_TRUE(deregisterWithin(region.id(), 1s).isOk());
  }
  expectBystanderWorks();
}

TEST_F(DirectPeerTest, AWriteThePeerCannotReadRunsAgainOverTheChannels) {
  connectDirect(cookie_);
  const HostWrite write(this, 7, 78);
  for (int round = 0; round < 2; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    auto h = write.post();
    ASSERT_TRUE(h.isOk()) << h.status().toString();
    control::WriteRequest wr = expectWriteRequest();
    if (round == 0) {
      // The first asks for a direct copy; this peer cannot read the engine and says so.
      ASSERT_TRUE(wr.direct);
      answerWrite(wr.xfer_id, StatusCode::kNotSupported, "cannot read you");
      control::WriteRequest retry = expectWriteRequest();
      EXPECT_GT(retry.xfer_id, wr.xfer_id);
      wr = std::move(retry);
    }
    // Over the channels (and, after the refusal, from the start).
    ASSERT_FALSE(wr.direct);
    takeOverTheChannels(wr, write.bytes);
    EXPECT_TRUE(engine_->waitTransfer(h.value(), 5s).isOk());
    (void)engine_->releaseTransfer(h.value());
  }
  auto stats = engine_->peerStats("scripted");
  ASSERT_TRUE(stats.isOk());
  EXPECT_EQ(stats->direct_runs, 0u);
  EXPECT_EQ(stats->succeeded, 2u);
  ASSERT_TRUE(engine_->deregisterMemory(write.mem).isOk());
}

// RESOURCE_EXHAUSTED (the peer's mappings of our memory all in use) refuses that WRITE only: it
// runs over the channels, and the next one asks for a direct copy again.
TEST_F(DirectPeerTest, AWriteThePeerCannotReadNowRunsOverTheChannelsAndTheNextGoesDirect) {
  connectDirect(cookie_);
  const HostWrite write(this, 8, 79);
  auto h = write.post();
  ASSERT_TRUE(h.isOk()) << h.status().toString();
  control::WriteRequest wr = expectWriteRequest();
  ASSERT_TRUE(wr.direct);
  answerWrite(wr.xfer_id, StatusCode::kResourceExhausted, "every mapping in use");
  control::WriteRequest retry = expectWriteRequest();
  ASSERT_FALSE(retry.direct);
  takeOverTheChannels(retry, write.bytes);
  EXPECT_TRUE(engine_->waitTransfer(h.value(), 5s).isOk());
  // Posted again, the WRITE asks for a direct copy once more (answered as done: the bytes are
  // not the point here).
  ASSERT_TRUE(engine_->postTransfer(h.value()).isOk());
  control::WriteRequest next = expectWriteRequest();
  EXPECT_TRUE(next.direct) << "one refusal for want of mappings disabled direct WRITEs";
  answerWrite(next.xfer_id, StatusCode::kOk, "");
  EXPECT_TRUE(engine_->waitTransfer(h.value(), 5s).isOk());
  (void)engine_->releaseTransfer(h.value());
  auto stats = engine_->peerStats("scripted");
  ASSERT_TRUE(stats.isOk());
  EXPECT_EQ(stats->succeeded, 2u);
  ASSERT_TRUE(engine_->deregisterMemory(write.mem).isOk());
}

// A gated READ_REQUEST (the initiator's copy queued behind a gate word it asks the target to
// write) of host memory is refused: the target writes nothing, holds nothing, and the connection
// goes on. (A gated READ of GPU memory is tested end to end in DirectGpuTest.)
TEST_F(DirectPeerTest, AGatedReadOfHostMemoryIsRefusedAndWritesNothing) {
  connectDirect(cookie_);
  GuardedRegion region(*engine_, size_t{4096} * 64);
  uint32_t gate = 0;
  const std::vector<control::WireDesc> descs{{region.id(), 0, region.size()}};
  const std::vector<control::DirectPiece> source{
      {reinterpret_cast<uint64_t>(region.data()), region.size(), 0}};
  control::ReadRequest rr;
  rr.xfer_id = scripted_->nextId();
  rr.total = region.size();
  rr.accept_inline = false;
  rr.descs = descs;
  rr.direct = true;
  rr.gated = true;
  rr.gate_value = 5;
  rr.gate_source = source;
  rr.gate_source_area = {std::string(control::kIpcHandleSize, 'a'),
                         reinterpret_cast<uint64_t>(region.data()),
                         region.size(),
                         {}};
  rr.gate_word = {reinterpret_cast<uint64_t>(&gate), sizeof(gate), 0};
  rr.gate_area = {std::string(control::kIpcHandleSize, 'g'),
                  reinterpret_cast<uint64_t>(&gate),
                  sizeof(gate),
                  {}};
  ASSERT_TRUE(scripted_->send(frameOf([&](auto* out) { control::encode(rr, out); })).isOk());
  auto answer = scripted_->expect(FrameType::kReadResponse, 5s);
  ASSERT_TRUE(answer.isOk()) << answer.status().toString();
  control::ReadResponse resp;
  ASSERT_TRUE(control::decode(answer->payload, control::DecodeLimits{}, &resp).isOk());
  EXPECT_EQ(resp.xfer_id, rr.xfer_id);
  EXPECT_EQ(resp.code, StatusCode::kNotSupported) << resp.message;
  EXPECT_FALSE(resp.direct);
  EXPECT_EQ(gate, 0u);
  // Nothing pinned: the region deregisters at once, and the peer is still ready.
  EXPECT_TRUE(deregisterWithin(region.id(), 1s).isOk());
  EXPECT_EQ(engine_->peerState("scripted"), PeerState::kReady);
  expectBystanderWorks();
}

TEST_F(DirectPeerTest, APeerThatNeverFinishesADirectCopyIsFailedWithinTheDataTimeout) {
  constexpr size_t kSize = size_t{1} << 20;
  {
    SCOPED_TRACE("our direct WRITE: the peer never answers WRITE_DONE");
    connectDirect(cookie_);
    tools::HostBuffer local(kSize);
    const MemoryId mem = engine_->registerMemory(local.data(), kSize).value();
    const RemoteMemory remote = scriptedRegion(79, kSize);
    auto h = post(OpKind::kWrite, "scripted", {{mem, 0, kSize}}, {{remote.id, 0, kSize}});
    ASSERT_TRUE(h.isOk()) << h.status().toString();
    const auto posted = std::chrono::steady_clock::now();
    auto request = scripted_->expect(FrameType::kWriteRequest, 5s);
    ASSERT_TRUE(request.isOk());
    // The control connection stays quiet but alive (the peer timeout is 4 s).
    const Status st = engine_->waitTransfer(h.value(), 5s);
    EXPECT_EQ(st.code(), StatusCode::kTimeout) << st.toString();
    EXPECT_LT(std::chrono::steady_clock::now() - posted, 1500ms);
    EXPECT_EQ(engine_->peerState("scripted"), PeerState::kFailed);
    (void)engine_->releaseTransfer(h.value());
    ASSERT_TRUE(engine_->deregisterMemory(mem).isOk());
  }
  {
    SCOPED_TRACE("its direct READ: it never sends READ_DONE, which keeps our region pinned");
    connectDirect(cookie_);
    GuardedRegion region(*engine_, kSize);
    (void)sendDirectRead(region);
    ASSERT_TRUE(scripted_->expect(FrameType::kReadResponse, 5s).isOk());
    // Deregistration waits for the pin, but only until the peer is failed for stalling.
    const auto before = std::chrono::steady_clock::now();
    EXPECT_TRUE(deregisterWithin(region.id(), 3s).isOk());
    EXPECT_GE(std::chrono::steady_clock::now() - before, 400ms);
    EXPECT_EQ(engine_->peerState("scripted"), PeerState::kFailed);
    EXPECT_TRUE(scripted_->closedWithin(2s));
  }
  expectBystanderWorks();
}

}  // namespace
}  // namespace tcpx::testing
