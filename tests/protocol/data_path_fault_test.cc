// A data path that stalls, breaks or crawls while the control connection stays alive (keepalives
// flowing): the data-path watchdog (data_timeout_ms) fails a peer whose channel makes no progress,
// with TIMEOUT naming the channel and direction, within the timeout plus a second; every call
// that waits returns; a slow but live peer is not taken for a dead one.
#include <thread>

#include "protocol/protocol_fixture.h"

namespace tcpx::testing {
namespace {

using control::FrameType;
using Clock = std::chrono::steady_clock;

constexpr auto kDataTimeout = 500ms;
constexpr auto kBound = kDataTimeout + 1s;  // the watchdog's promise

class DataPathFaultTest : public ProtocolTest {
 protected:
  void SetUp() override { startEngine({{"data_timeout_ms", "500"}}); }

  // The scripted peer announces a WRITE of `size` bytes into `region` and sends none of it.
  void announceWriteAndStall(const GuardedRegion& region, size_t size) {
    control::WriteRequest wr;
    wr.xfer_id = scripted_->nextId();
    wr.total = size;
    wr.first_chunk = scripted_->outNextChunk();
    wr.spread = scripted_->outSpread();
    const std::vector<control::WireDesc> descs{{region.id(), 0, size}};
    wr.descs = descs;
    ASSERT_TRUE(scripted_->send(frameOf([&](auto* o) { control::encode(wr, {}, o); })).isOk());
  }

  // Whether the engine fails the scripted peer within `bound` while it keeps pinging.
  bool failedWithin(std::chrono::milliseconds bound) {
    const auto deadline = Clock::now() + bound;
    while (Clock::now() < deadline) {
      if (engine_->peerState("scripted") == PeerState::kFailed) return true;
      (void)scripted_->idle(10ms);
    }
    return engine_->peerState("scripted") == PeerState::kFailed;
  }
};

TEST_F(DataPathFaultTest, AnIncomingStreamThatNeverComesFailsThePeerAndFreesTheMemory) {
  connectScripted();
  constexpr size_t kSize = 1 << 20;
  GuardedRegion region(*engine_, kSize);
  announceWriteAndStall(region, kSize);
  ASSERT_TRUE(scripted_->idle(50ms).isOk());
  // Deregistration waits for the WRITE that pins the region: no longer than the watchdog.
  const auto started = Clock::now();
  Status dereg;
  std::thread deregister([&] { dereg = engine_->deregisterMemory(region.id()); });
  EXPECT_TRUE(failedWithin(kBound + 500ms));
  deregister.join();
  EXPECT_TRUE(dereg.isOk()) << dereg.toString();
  EXPECT_LT(Clock::now() - started, kBound + 500ms);
  EXPECT_TRUE(GuardedRegion::allBytes(region.data(), kSize, kPoison));
  EXPECT_TRUE(region.guardsIntact());
  expectBystanderWorks();
}

TEST_F(DataPathFaultTest, AReadWhoseDataNeverComesFailsWithTimeoutNamingTheChannel) {
  connectScripted();
  constexpr size_t kSize = 1 << 20;
  GuardedRegion region(*engine_, kSize);
  const TransferHandle h = postReadAnsweredWithAStream(region, kSize).first;
  const auto started = Clock::now();
  EXPECT_TRUE(failedWithin(kBound));
  const Status st = engine_->waitTransfer(h, 1s);
  EXPECT_EQ(st.code(), StatusCode::kTimeout) << st.toString();
  EXPECT_NE(st.message().find("receive channel"), std::string::npos) << st.toString();
  EXPECT_LT(Clock::now() - started, kBound);
  EXPECT_TRUE(engine_->releaseTransfer(h).isOk());
  EXPECT_TRUE(region.guardsIntact());
  expectBystanderWorks();
}

TEST_F(DataPathFaultTest, AWriteThePeerNeverReceivesFailsAndReleaseAndRemovalReturn) {
  connectScripted();
  constexpr size_t kSize = 64u << 20;  // more than the sockets' buffers hold
  GuardedRegion region(*engine_, kSize);
  const RemoteMemory remote = scriptedRegion(10, kSize);
  auto h = post(OpKind::kWrite, "scripted", {{region.id(), 0, kSize}}, {{remote.id, 0, kSize}});
  ASSERT_TRUE(h.isOk());
  ASSERT_TRUE(scripted_->expect(FrameType::kWriteRequest, 5s).isOk());
  const auto started = Clock::now();
  EXPECT_TRUE(failedWithin(kBound + 500ms));
  const Status st = engine_->waitTransfer(h.value(), 1s);
  EXPECT_EQ(st.code(), StatusCode::kTimeout) << st.toString();
  EXPECT_NE(st.message().find("send channel"), std::string::npos) << st.toString();
  EXPECT_LT(Clock::now() - started, kBound + 500ms);
  EXPECT_TRUE(engine_->releaseTransfer(h.value()).isOk());
  EXPECT_TRUE(deregisterWithin(region.id(), 1s).isOk());
  EXPECT_TRUE(engine_->removePeer("scripted").isOk());
  expectBystanderWorks();
}

TEST_F(DataPathFaultTest, ReleasingAStalledReadReturnsWithinTheWatchdogBound) {
  connectScripted();
  constexpr size_t kSize = 1 << 20;
  GuardedRegion region(*engine_, kSize);
  const TransferHandle h = postReadAnsweredWithAStream(region, kSize).first;
  ASSERT_TRUE(scripted_->idle(50ms).isOk());  // the receives are posted
  // The release waits for the posted receives, which only the watchdog ends.
  const auto started = Clock::now();
  Status released;
  std::thread releaser([&] { released = engine_->releaseTransfer(h); });
  EXPECT_TRUE(failedWithin(kBound + 500ms));
  releaser.join();
  EXPECT_TRUE(released.isOk()) << released.toString();
  EXPECT_LT(Clock::now() - started, kBound + 500ms);
  EXPECT_TRUE(deregisterWithin(region.id(), 1s).isOk());
}

TEST_F(DataPathFaultTest, ASlowButLivePeerIsNotTakenForDead) {
  // One channel: a live peer must move a chunk on every channel that has one outstanding within
  // the data timeout, and here that is this one.
  ScriptedPeer::Options options;
  options.settings.channels = 1;
  connectScripted(options);
  constexpr size_t kSize = 4u << 20;  // 8 chunks of 512 KiB
  // The peer takes our WRITE one chunk every 300 ms: 2.4 s in all, five times the data timeout,
  // but never 500 ms without progress.
  {
    GuardedRegion region(*engine_, kSize);
    fillPattern(region.data(), kSize, 41);
    const RemoteMemory remote = scriptedRegion(12, kSize);
    auto h = post(OpKind::kWrite, "scripted", {{region.id(), 0, kSize}}, {{remote.id, 0, kSize}});
    ASSERT_TRUE(h.isOk());
    auto request = scripted_->expect(FrameType::kWriteRequest, 5s);
    ASSERT_TRUE(request.isOk());
    control::WriteRequest wr;
    ASSERT_TRUE(control::decode(request->payload, control::DecodeLimits{}, &wr).isOk());
    auto got = scripted_->receiveStream(kSize, wr.spread, 20s, 300ms);
    ASSERT_TRUE(got.isOk()) << got.status().toString();
    EXPECT_EQ(checkPattern(got->data(), kSize, 41), -1);
    ASSERT_TRUE(scripted_
                    ->send(frameOf([&](auto* o) {
                      control::encodeWriteDone({wr.xfer_id, StatusCode::kOk, ""}, o);
                    }))
                    .isOk());
    const Status st = engine_->waitTransfer(h.value(), 5s);
    EXPECT_TRUE(st.isOk()) << st.toString();
    (void)engine_->releaseTransfer(h.value());
  }
  // And sends the engine a WRITE one chunk every 300 ms.
  {
    GuardedRegion region(*engine_, kSize);
    control::WriteRequest wr;
    wr.xfer_id = scripted_->nextId();
    wr.total = kSize;
    wr.first_chunk = scripted_->outNextChunk();
    wr.spread = scripted_->outSpread();
    const std::vector<control::WireDesc> descs{{region.id(), 0, kSize}};
    wr.descs = descs;
    ASSERT_TRUE(scripted_->send(frameOf([&](auto* o) { control::encode(wr, {}, o); })).isOk());
    const std::string data = patternBytes(kSize, 42);
    ASSERT_TRUE(scripted_->sendStreamPaced(data, 300ms, 20s).isOk());
    ASSERT_TRUE(scripted_->expect(FrameType::kWriteDone, 5s).isOk());
    EXPECT_EQ(std::memcmp(region.data(), data.data(), kSize), 0);
  }
  EXPECT_EQ(engine_->peerState("scripted"), PeerState::kReady);
}

TEST_F(DataPathFaultTest, ACutDataConnectionFailsThePeerAtOnceOverSockets) {
  connectScripted();
  constexpr size_t kSize = 1 << 20;
  GuardedRegion region(*engine_, kSize);
  announceWriteAndStall(region, kSize);
  scripted_->cutChannel(0);
  // The socket transport sees the connection close: no need to wait for the watchdog.
  const auto started = Clock::now();
  EXPECT_TRUE(failedWithin(2s));
  EXPECT_LT(Clock::now() - started, kDataTimeout);
  EXPECT_TRUE(deregisterWithin(region.id(), 1s).isOk());
  expectBystanderWorks();
}

// Over the emulator, as over TCPX: a data channel whose sender stops leaves its receives "not
// done" (only the watchdog notices), while a sender that closes its end makes test() return 2 at
// once (TCPX's control socket sees the close; the emulator sees the end of its data streams).
class EmulatorDataPathFaultTest : public ProtocolTest {
 protected:
  void SetUp() override { startEngine({{"data_timeout_ms", "500"}, {"transport", "emulator"}}); }

  // A WRITE of `region` announced by the scripted peer, whose data it never sends.
  void announceWrite(const GuardedRegion& region) {
    ScriptedPeer::Options options;
    options.transport = "emulator";
    options.sockets = 2;
    connectScripted(options);
    control::WriteRequest wr;
    wr.xfer_id = scripted_->nextId();
    wr.total = region.size();
    wr.first_chunk = scripted_->outNextChunk();
    wr.spread = scripted_->outSpread();
    const std::vector<control::WireDesc> descs{{region.id(), 0, region.size()}};
    wr.descs = descs;
    ASSERT_TRUE(scripted_->send(frameOf([&](auto* o) { control::encode(wr, {}, o); })).isOk());
    ASSERT_TRUE(scripted_->idle(50ms).isOk());
  }

  // How long the engine took to fail the scripted peer, which keeps pinging (or the bound).
  std::chrono::milliseconds timeToFailure() {
    const auto started = Clock::now();
    const auto deadline = started + kBound + 500ms;
    while (engine_->peerState("scripted") != PeerState::kFailed && Clock::now() < deadline) {
      (void)scripted_->idle(10ms);
    }
    EXPECT_EQ(engine_->peerState("scripted"), PeerState::kFailed);
    return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - started);
  }
};

TEST_F(EmulatorDataPathFaultTest, AStalledDataChannelLeavesRequestsNotDoneUntilTheWatchdog) {
  GuardedRegion region(*engine_, 1 << 20);
  announceWrite(region);
  const auto took = timeToFailure();
  EXPECT_GE(took, kDataTimeout - 100ms);
  EXPECT_LT(took, kBound + 500ms);
  EXPECT_TRUE(deregisterWithin(region.id(), 1s).isOk());
  EXPECT_TRUE(region.guardsIntact());
}

TEST_F(EmulatorDataPathFaultTest, ADataChannelItsSenderClosesFailsThePeerAtOnce) {
  GuardedRegion region(*engine_, 1 << 20);
  announceWrite(region);
  scripted_->cutChannel(0);
  EXPECT_LT(timeToFailure(), kDataTimeout);
  EXPECT_TRUE(deregisterWithin(region.id(), 1s).isOk());
  EXPECT_TRUE(region.guardsIntact());
  expectBystanderWorks();
}

}  // namespace
}  // namespace tcpx::testing
