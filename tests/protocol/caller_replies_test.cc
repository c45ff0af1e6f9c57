// Replies taken by the application's thread (caller_posts=on): a caller polling a small
// host-memory READ or WRITE with checkTransfer may read its reply from the control connection
// itself while the progress thread sleeps (EngineCore::takeRepliesFromCaller). Whoever reads
// the socket, every frame must be served as the progress thread alone would serve it: a request
// that arrives right behind the reply is answered, a repeated or malformed reply fails the peer
// as a protocol error and writes nothing, and the engine's other peers go on working. The
// scripted peer sends each reply together with what follows it in one write, so that the
// caller's read often takes both. While the caller polls, the engine lends it the control
// connection's reads (ControlReader): a request, a hang-up or a caller that stops polling must
// still reach the progress thread.
#include <algorithm>
#include <chrono>
#include <gtest/gtest.h>
#include <string>
#include <vector>

#include "protocol/protocol_fixture.h"

namespace tcpx::testing {
namespace {

using control::FrameType;

constexpr size_t kSmall = 4096;  // inline: its reply ends it
constexpr int kRounds = 200;

// kSmall bytes of the engine, filled with pattern `seed`, that the scripted peer READs.
struct ServedRegion {
  ServedRegion(Engine& engine, uint64_t seed)
      : region(engine, kSmall), bytes(patternBytes(kSmall, seed)) {
    std::memcpy(region.data(), bytes.data(), kSmall);
  }
  GuardedRegion region;
  std::string bytes;
};

class CallerRepliesTest : public ProtocolTest {
 protected:
  void SetUp() override { startEngine({{"caller_posts", "on"}}); }

  // Polls checkTransfer as an application would, until the transfer is no longer in progress
  // or `limit` passed (TIMEOUT).
  Status pollUntilDone(TransferHandle h, std::chrono::milliseconds limit = 5s) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    for (;;) {
      Status st = engine_->checkTransfer(h);
      if (st.code() != StatusCode::kInProgress) return st;
      if (std::chrono::steady_clock::now() > deadline) {
        return Status(StatusCode::kTimeout, "still in progress");
      }
    }
  }

  // The engine's next frame of `type`, decoded as `M` (its views point into the frame, kept
  // until the next call).
  template <typename M>
  M expectFrame(FrameType type) {
    M m;
    auto frame = scripted_->expect(type, 5s);
    EXPECT_TRUE(frame.isOk()) << frame.status().toString();
    if (frame.isOk()) {
      last_ = std::move(frame.value());
      EXPECT_TRUE(control::decode(last_.payload, control::DecodeLimits{}, &m).isOk());
    }
    return m;
  }

 private:
  ScriptedPeer::Frame last_;
};

// Each reply (WRITE_DONE, or an inline READ_RESPONSE with the READ's bytes) arrives in one
// write with a READ_REQUEST of the engine's memory: the transfer ends with its bytes in place,
// and the READ_REQUEST is answered with the right bytes, whether the polling caller or the
// progress thread read the two.
TEST_F(CallerRepliesTest, ARequestBehindAReplyTheCallerTookIsStillServed) {
  connectScripted();
  const RemoteMemory remote = scriptedRegion(77, kSmall);
  GuardedRegion local(*engine_, kSmall);
  const ServedRegion served(*engine_, 5);
  const std::vector<control::WireDesc> descs{{served.region.id(), 0, kSmall}};
  for (int round = 0; round < kRounds; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    const bool write = round % 2 == 0;
    const std::string bytes = patternBytes(kSmall, 100 + round);
    if (write) std::memcpy(local.data(), bytes.data(), kSmall);
    auto h = post(write ? OpKind::kWrite : OpKind::kRead, "scripted", {{local.id(), 0, kSmall}},
                  {{remote.id, 0, kSmall}});
    ASSERT_TRUE(h.isOk()) << h.status().toString();
    std::vector<uint8_t> frames;
    if (write) {
      const auto wr = expectFrame<control::WriteRequest>(FrameType::kWriteRequest);
      ASSERT_TRUE(wr.inline_data);
      EXPECT_EQ(wr.data, bytes);
      control::encodeWriteDone({wr.xfer_id, StatusCode::kOk, ""}, &frames);
    } else {
      const auto rr = expectFrame<control::ReadRequest>(FrameType::kReadRequest);
      const transport::IoSlice slice{const_cast<char*>(bytes.data()), bytes.size()};
      control::ReadResponse answer;
      answer.xfer_id = rr.xfer_id;
      answer.inline_data = true;
      control::encode(answer, {&slice, 1}, &frames);
    }
    const std::vector<uint8_t> request = readRequests(1, descs, kSmall);
    frames.insert(frames.end(), request.begin(), request.end());
    ASSERT_TRUE(scripted_->send(frames).isOk());
    EXPECT_TRUE(pollUntilDone(h.value()).isOk());
    EXPECT_EQ(std::memcmp(local.data(), bytes.data(), kSmall), 0);
    const auto resp = expectFrame<control::ReadResponse>(FrameType::kReadResponse);
    EXPECT_EQ(resp.code, StatusCode::kOk) << resp.message;
    ASSERT_TRUE(resp.inline_data);
    EXPECT_EQ(resp.data, served.bytes);
    ASSERT_TRUE(engine_->releaseTransfer(h.value()).isOk());
  }
  EXPECT_TRUE(local.guardsIntact());
  EXPECT_TRUE(served.region.guardsIntact());
  EXPECT_EQ(engine_->peerState("scripted"), PeerState::kReady);
  expectBystanderWorks();
}

// A WRITE_DONE sent twice: the first ends the WRITE, the second is out of turn and fails the
// peer, also when the caller took the first and left the second buffered.
TEST_F(CallerRepliesTest, AReplyRepeatedBehindTheFirstFailsThePeer) {
  connectScripted();
  const RemoteMemory remote = scriptedRegion(77, kSmall);
  GuardedRegion source(*engine_, kSmall);
  auto h = post(OpKind::kWrite, "scripted", {{source.id(), 0, kSmall}}, {{remote.id, 0, kSmall}});
  ASSERT_TRUE(h.isOk()) << h.status().toString();
  const auto wr = expectFrame<control::WriteRequest>(FrameType::kWriteRequest);
  std::vector<uint8_t> frames;
  for (int i = 0; i < 2; ++i) control::encodeWriteDone({wr.xfer_id, StatusCode::kOk, ""}, &frames);
  ASSERT_TRUE(scripted_->send(frames).isOk());
  EXPECT_TRUE(pollUntilDone(h.value()).isOk());
  EXPECT_TRUE(scripted_->closedWithin(5s)) << "the repeated WRITE_DONE was never handled";
  EXPECT_EQ(engine_->peerState("scripted"), PeerState::kFailed);
  ASSERT_TRUE(engine_->releaseTransfer(h.value()).isOk());
  expectBystanderWorks();
}

// An inline READ_RESPONSE of the wrong size is no reply the caller takes: the READ fails with
// the peer, and not a byte of its destination is written.
TEST_F(CallerRepliesTest, AMalformedReplyFailsTheReadAndWritesNothing) {
  connectScripted();
  const RemoteMemory remote = scriptedRegion(77, kSmall);
  GuardedRegion dest(*engine_, kSmall);
  std::memset(dest.data(), kPoison, kSmall);
  auto h = post(OpKind::kRead, "scripted", {{dest.id(), 0, kSmall}}, {{remote.id, 0, kSmall}});
  ASSERT_TRUE(h.isOk()) << h.status().toString();
  const auto rr = expectFrame<control::ReadRequest>(FrameType::kReadRequest);
  const std::string shorter(kSmall - 1, 'x');
  const transport::IoSlice slice{const_cast<char*>(shorter.data()), shorter.size()};
  control::ReadResponse resp;
  resp.xfer_id = rr.xfer_id;
  resp.inline_data = true;
  ASSERT_TRUE(scripted_->send(frameOf([&](auto* out) {
                         control::encode(resp, {&slice, 1}, out);
                       }))
                  .isOk());
  const Status st = pollUntilDone(h.value());
  EXPECT_FALSE(st.isOk());
  EXPECT_NE(st.code(), StatusCode::kTimeout) << "the malformed reply was never handled";
  EXPECT_EQ(engine_->peerState("scripted"), PeerState::kFailed);
  EXPECT_TRUE(GuardedRegion::allBytes(dest.data(), kSmall, kPoison));
  EXPECT_TRUE(dest.guardsIntact());
  ASSERT_TRUE(engine_->releaseTransfer(h.value()).isOk());
  expectBystanderWorks();
}

// Polls `h` for `span` (it must stay in progress): the engine lends this thread the peer's
// control reads at some poll of it (ControlReader::kCaller), after which the socket's input no
// longer wakes the progress thread.
void pollWhileInProgress(Engine& engine, TransferHandle h, std::chrono::milliseconds span) {
  const auto until = std::chrono::steady_clock::now() + span;
  while (std::chrono::steady_clock::now() < until) {
    ASSERT_EQ(engine.checkTransfer(h).code(), StatusCode::kInProgress);
  }
}

// The caller that holds the reads stops polling (it computes, say) before its reply comes, and
// the peer sends a request instead: the progress thread takes the reads back within the lease
// (500 us; an idle progress thread would otherwise sleep up to a second) and answers the request,
// and the reply that follows ends the WRITE in waitTransfer.
TEST_F(CallerRepliesTest, ARequestWhileTheLendingCallerPausesIsServed) {
  connectScripted();
  const RemoteMemory remote = scriptedRegion(77, kSmall);
  GuardedRegion source(*engine_, kSmall);
  const ServedRegion served(*engine_, 9);
  for (int round = 0; round < 5; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    auto h = post(OpKind::kWrite, "scripted", {{source.id(), 0, kSmall}}, {{remote.id, 0, kSmall}});
    ASSERT_TRUE(h.isOk()) << h.status().toString();
    const auto wr = expectFrame<control::WriteRequest>(FrameType::kWriteRequest);
    ASSERT_NO_FATAL_FAILURE(pollWhileInProgress(*engine_, h.value(), 50ms));
    const auto asked = std::chrono::steady_clock::now();
    ASSERT_TRUE(scripted_->send(readRequests(1, {{served.region.id(), 0, kSmall}}, kSmall)).isOk());
    const auto resp = expectFrame<control::ReadResponse>(FrameType::kReadResponse);
    EXPECT_LT(std::chrono::steady_clock::now() - asked, 200ms) << "the request waited for a timer";
    EXPECT_EQ(resp.code, StatusCode::kOk) << resp.message;
    ASSERT_TRUE(resp.inline_data);
    EXPECT_EQ(resp.data, served.bytes);
    ASSERT_TRUE(scripted_
                    ->send(frameOf([&](auto* out) {
                      control::encodeWriteDone({wr.xfer_id, StatusCode::kOk, ""}, out);
                    }))
                    .isOk());
    EXPECT_TRUE(engine_->waitTransfer(h.value(), 5s).isOk());
    ASSERT_TRUE(engine_->releaseTransfer(h.value()).isOk());
  }
  EXPECT_EQ(engine_->peerState("scripted"), PeerState::kReady);
  expectBystanderWorks();
}

// Once a polled transfer ended, the reads are the progress thread's again: a frame the peer
// sends between two transfers (here a READ_REQUEST) is answered at once, not when the lease of
// the caller that took the last reply ends (500 us). The caller polls each WRITE before and
// after its reply comes. Median of 21 answers, each measured from the request's write to the
// answer's read; a loaded machine measures again (three attempts).
TEST_F(CallerRepliesTest, AFrameBetweenTwoPolledTransfersIsServedAtOnce) {
  connectScripted();
  const RemoteMemory remote = scriptedRegion(77, kSmall);
  GuardedRegion source(*engine_, kSmall);
  const ServedRegion served(*engine_, 11);
  constexpr int kAnswers = 21;
  constexpr auto kBound = std::chrono::microseconds(250);  // half the lease
  std::string medians;
  for (int attempt = 0; attempt < 3; ++attempt) {
    std::vector<std::chrono::nanoseconds> answers;
    for (int round = 0; round < kAnswers; ++round) {
      auto h =
          post(OpKind::kWrite, "scripted", {{source.id(), 0, kSmall}}, {{remote.id, 0, kSmall}});
      ASSERT_TRUE(h.isOk()) << h.status().toString();
      const auto wr = expectFrame<control::WriteRequest>(FrameType::kWriteRequest);
      // The caller polls before the reply comes: it holds the reads when the reply arrives.
      ASSERT_NO_FATAL_FAILURE(pollWhileInProgress(*engine_, h.value(), 2ms));
      ASSERT_TRUE(scripted_
                      ->send(frameOf([&](auto* out) {
                        control::encodeWriteDone({wr.xfer_id, StatusCode::kOk, ""}, out);
                      }))
                      .isOk());
      ASSERT_TRUE(pollUntilDone(h.value()).isOk());
      ASSERT_TRUE(engine_->releaseTransfer(h.value()).isOk());
      const auto asked = std::chrono::steady_clock::now();
      ASSERT_TRUE(
          scripted_->send(readRequests(1, {{served.region.id(), 0, kSmall}}, kSmall)).isOk());
      const auto resp = expectFrame<control::ReadResponse>(FrameType::kReadResponse);
      answers.push_back(std::chrono::steady_clock::now() - asked);
      ASSERT_TRUE(resp.inline_data);
      ASSERT_EQ(resp.data, served.bytes);
    }
    std::nth_element(answers.begin(), answers.begin() + kAnswers / 2, answers.end());
    const auto median = answers[kAnswers / 2];
    medians += " " + std::to_string(median.count() / 1000) + " us";
    if (median < kBound) return;
  }
  ADD_FAILURE() << "frames between polled transfers waited for the lease: median answers"
                << medians;
}

// The peer hangs up while a polling caller holds the reads: its WRITE fails with
// REMOTE_DISCONNECTED (not a timeout), whether the caller goes on polling or blocks.
class LentReadsHangUpTest : public CallerRepliesTest {
 protected:
  void hangUpWhileLent(bool keep_polling) {
    connectScripted();
    const RemoteMemory remote = scriptedRegion(77, kSmall);
    GuardedRegion source(*engine_, kSmall);
    auto h = post(OpKind::kWrite, "scripted", {{source.id(), 0, kSmall}}, {{remote.id, 0, kSmall}});
    ASSERT_TRUE(h.isOk()) << h.status().toString();
    (void)expectFrame<control::WriteRequest>(FrameType::kWriteRequest);
    ASSERT_NO_FATAL_FAILURE(pollWhileInProgress(*engine_, h.value(), 50ms));
    const auto hung_up = std::chrono::steady_clock::now();
    scripted_.reset();  // closes its control connection and channels
    const Status st =
        keep_polling ? pollUntilDone(h.value()) : engine_->waitTransfer(h.value(), 5s);
    EXPECT_EQ(st.code(), StatusCode::kRemoteDisconnected) << st.toString();
    EXPECT_LT(std::chrono::steady_clock::now() - hung_up, 200ms)
        << "the hang-up waited for a timer";
    EXPECT_EQ(engine_->peerState("scripted"), PeerState::kFailed);
    ASSERT_TRUE(engine_->releaseTransfer(h.value()).isOk());
    expectBystanderWorks();
  }
};

TEST_F(LentReadsHangUpTest, WhileTheCallerPolls) {
  hangUpWhileLent(true);
}

TEST_F(LentReadsHangUpTest, WhileTheCallerBlocksInWaitTransfer) {
  hangUpWhileLent(false);
}

}  // namespace
}  // namespace tcpx::testing
