// The spread of a stream (how many chunks at least it is cut into) is its sender's choice,
// announced with it: the engine cuts what it sends finer alone than beside streams still moving
// to the same peer (not to others), and takes a peer's stream as that peer announced it, whatever
// the spread.
#include <cstring>
#include <gtest/gtest.h>
#include <string>
#include <vector>

#include "protocol/protocol_fixture.h"

namespace tcpx::testing {
namespace {

using control::FrameType;

class SpreadTest : public ProtocolTest {
 protected:
  // The engine's next WRITE_REQUEST, decoded.
  control::WriteRequest nextWriteRequest() {
    control::WriteRequest wr;
    auto frame = scripted_->expect(FrameType::kWriteRequest, 5s);
    EXPECT_TRUE(frame.isOk()) << frame.status().toString();
    if (frame.isOk()) {
      EXPECT_TRUE(control::decode(frame->payload, control::DecodeLimits{}, &wr).isOk());
      frame_ = std::move(frame.value());  // the decoded views point into it
    }
    return wr;
  }

  ScriptedPeer::Frame frame_;
};

// 64 MiB cannot leave before the peer receives (more than the transport's window and the
// sockets' buffers hold): its stream is still moving while later WRITEs are announced.
constexpr size_t kLarge = size_t{64} << 20;
constexpr size_t kSmall = size_t{1} << 20;

TEST_F(SpreadTest, AStreamAnnouncedBesideOneStillMovingIsCutIntoFewerChunks) {
  connectScripted();
  const uint32_t sockets = scripted_->outSpread();  // two per channel, the engine's own rule
  GuardedRegion region(*engine_, kLarge + kSmall);
  fillPattern(region.data(), region.size(), 51);
  const RemoteMemory remote = scriptedRegion(21, kLarge + kSmall);
  auto large =
      post(OpKind::kWrite, "scripted", {{region.id(), 0, kLarge}}, {{remote.id, 0, kLarge}});
  ASSERT_TRUE(large.isOk()) << large.status().toString();
  const control::WriteRequest first = nextWriteRequest();
  EXPECT_EQ(first.spread, sockets);  // alone: every socket
  const uint64_t first_id = first.xfer_id;
  const uint32_t first_spread = first.spread;
  auto small = post(OpKind::kWrite, "scripted", {{region.id(), kLarge, kSmall}},
                    {{remote.id, kLarge, kSmall}});
  ASSERT_TRUE(small.isOk()) << small.status().toString();
  const control::WriteRequest second = nextWriteRequest();
  EXPECT_EQ(second.spread, sockets / 2);  // beside one moving stream: half of them
  // Both streams arrive cut as announced, every byte in place.
  auto got_large = scripted_->receiveStream(kLarge, first_spread, 30s);
  ASSERT_TRUE(got_large.isOk()) << got_large.status().toString();
  EXPECT_EQ(std::memcmp(got_large->data(), region.data(), kLarge), 0);
  auto got_small = scripted_->receiveStream(kSmall, second.spread, 10s);
  ASSERT_TRUE(got_small.isOk()) << got_small.status().toString();
  EXPECT_EQ(std::memcmp(got_small->data(), region.data() + kLarge, kSmall), 0);
  for (uint64_t id : {first_id, second.xfer_id}) {
    ASSERT_TRUE(scripted_
                    ->send(frameOf([&](auto* o) {
                      control::encodeWriteDone({id, StatusCode::kOk, ""}, o);
                    }))
                    .isOk());
  }
  EXPECT_TRUE(engine_->waitTransfer(large.value(), 5s).isOk());
  EXPECT_TRUE(engine_->waitTransfer(small.value(), 5s).isOk());
}

TEST_F(SpreadTest, StreamsMovingToOnePeerDoNotChangeHowAnotherPeersAreCut) {
  connectScripted();
  ScriptedPeer::Options options;
  options.name = "other";
  auto connected = ScriptedPeer::connect(engine_->connectionInfo(), options);
  ASSERT_TRUE(connected.isOk()) << connected.status().toString();
  ScriptedPeer& other = *connected.value();
  GuardedRegion region(*engine_, kLarge + kSmall);
  fillPattern(region.data(), region.size(), 52);
  const RemoteMemory remote = scriptedRegion(23, kLarge);
  auto large =
      post(OpKind::kWrite, "scripted", {{region.id(), 0, kLarge}}, {{remote.id, 0, kLarge}});
  ASSERT_TRUE(large.isOk()) << large.status().toString();
  const control::WriteRequest first = nextWriteRequest();
  const uint64_t first_id = first.xfer_id;
  const uint32_t first_spread = first.spread;
  // The other peer's sockets carry nothing: its WRITE gets every one of them.
  auto other_remote = engine_->loadRemoteMemory(other.memoryDescriptor(24, kSmall));
  ASSERT_TRUE(other_remote.isOk()) << other_remote.status().toString();
  auto small = post(OpKind::kWrite, "other", {{region.id(), kLarge, kSmall}},
                    {{other_remote.value().id, 0, kSmall}});
  ASSERT_TRUE(small.isOk()) << small.status().toString();
  auto frame = other.expect(FrameType::kWriteRequest, 5s);
  ASSERT_TRUE(frame.isOk()) << frame.status().toString();
  control::WriteRequest wr;
  ASSERT_TRUE(control::decode(frame->payload, control::DecodeLimits{}, &wr).isOk());
  EXPECT_EQ(wr.spread, other.outSpread());
  auto got_small = other.receiveStream(kSmall, wr.spread, 10s);
  ASSERT_TRUE(got_small.isOk()) << got_small.status().toString();
  EXPECT_EQ(std::memcmp(got_small->data(), region.data() + kLarge, kSmall), 0);
  ASSERT_TRUE(other
                  .send(frameOf([&](auto* o) {
                    control::encodeWriteDone({wr.xfer_id, StatusCode::kOk, ""}, o);
                  }))
                  .isOk());
  EXPECT_TRUE(engine_->waitTransfer(small.value(), 5s).isOk());
  auto got_large = scripted_->receiveStream(kLarge, first_spread, 30s);
  ASSERT_TRUE(got_large.isOk()) << got_large.status().toString();
  EXPECT_EQ(std::memcmp(got_large->data(), region.data(), kLarge), 0);
  ASSERT_TRUE(scripted_
                  ->send(frameOf([&](auto* o) {
                    control::encodeWriteDone({first_id, StatusCode::kOk, ""}, o);
                  }))
                  .isOk());
  EXPECT_TRUE(engine_->waitTransfer(large.value(), 5s).isOk());
}

TEST_F(SpreadTest, APeersStreamIsTakenAsItsSpreadSaysFromOneChunkToTheMost) {
  connectScripted();
  constexpr size_t kSize = (size_t{1} << 20) + 4097;  // a short last chunk at every spread
  for (uint32_t spread : {1U, 3U, control::kMaxSpread}) {
    SCOPED_TRACE(spread);
    GuardedRegion region(*engine_, kSize);
    control::WriteRequest wr;
    wr.xfer_id = scripted_->nextId();
    wr.total = kSize;
    wr.first_chunk = scripted_->outNextChunk();
    wr.spread = spread;
    const std::vector<control::WireDesc> descs{{region.id(), 0, kSize}};
    wr.descs = descs;
    ASSERT_TRUE(scripted_->send(frameOf([&](auto* o) { control::encode(wr, {}, o); })).isOk());
    const std::string data = patternBytes(kSize, 60 + spread);
    ASSERT_TRUE(scripted_->sendStream(data, 10s, spread).isOk());
    auto done = scripted_->expect(FrameType::kWriteDone, 5s);
    ASSERT_TRUE(done.isOk()) << done.status().toString();
    control::Completion c;
    ASSERT_TRUE(control::decodeCompletion(done->payload, &c).isOk());
    EXPECT_EQ(c.code, StatusCode::kOk) << c.message;
    EXPECT_EQ(std::memcmp(region.data(), data.data(), kSize), 0);
    EXPECT_TRUE(region.guardsIntact());
  }
  expectBystanderWorks();
}

}  // namespace
}  // namespace tcpx::testing
