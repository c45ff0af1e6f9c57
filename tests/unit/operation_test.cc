// The table of frames each operation stage admits from the peer, pair by pair, and the rules
// two engines agree on in the handshake.
#include "engine/operation.h"

#include <gtest/gtest.h>
#include <set>
#include <tuple>

#include "control/negotiation.h"

namespace tcpx::engine {
namespace {

using control::FrameType;

constexpr OpStage kStages[] = {
    OpStage::kIdle,
    OpStage::kQueued,
    OpStage::kRecvPosted,
    OpStage::kGathering,
    OpStage::kAwaitingWriteDone,
    OpStage::kWriteQueued,
    OpStage::kAwaitingReadResponse,
    OpStage::kAwaitingSendCts,
    OpStage::kAwaitingSendDone,
    OpStage::kAwaitingSendData,
    OpStage::kAwaitingDataStatus,
    OpStage::kScattering,
    OpStage::kReplied,
    OpStage::kLocalMatch,
    OpStage::kLocalCopy,
    OpStage::kAwaitingReadDone,
    OpStage::kFencing,
};
constexpr XferKind kKinds[] = {XferKind::kRead, XferKind::kWrite, XferKind::kSend, XferKind::kRecv};

TEST(OperationStages, EachStageAdmitsExactlyTheFramesItsOperationWaitsFor) {
  using Pair = std::tuple<OpRole, XferKind, OpStage, FrameType>;
  const std::set<Pair> admitted{
      {OpRole::kOurs, XferKind::kWrite, OpStage::kAwaitingWriteDone, FrameType::kWriteDone},
      // A direct WRITE's copy queued at the target: said once, and WRITE_DONE still follows.
      {OpRole::kOurs, XferKind::kWrite, OpStage::kAwaitingWriteDone, FrameType::kWriteQueued},
      {OpRole::kOurs, XferKind::kWrite, OpStage::kWriteQueued, FrameType::kWriteDone},
      {OpRole::kOurs, XferKind::kRead, OpStage::kAwaitingReadResponse, FrameType::kReadResponse},
      {OpRole::kOurs, XferKind::kRead, OpStage::kAwaitingDataStatus, FrameType::kDataStatus},
      {OpRole::kOurs, XferKind::kSend, OpStage::kAwaitingSendCts, FrameType::kSendCts},
      {OpRole::kOurs, XferKind::kSend, OpStage::kAwaitingSendDone, FrameType::kSendDone},
      {OpRole::kOurs, XferKind::kRecv, OpStage::kAwaitingSendData, FrameType::kSendData},
      {OpRole::kOurs, XferKind::kRecv, OpStage::kAwaitingDataStatus, FrameType::kDataStatus},
      // A sender may release its send while our recv is matched to it.
      {OpRole::kOurs, XferKind::kRecv, OpStage::kAwaitingSendData, FrameType::kCancel},
      {OpRole::kOurs, XferKind::kRecv, OpStage::kAwaitingDataStatus, FrameType::kCancel},
      {OpRole::kOurs, XferKind::kRecv, OpStage::kScattering, FrameType::kCancel},
      {OpRole::kOurs, XferKind::kRecv, OpStage::kReplied, FrameType::kCancel},
      // The initiator of a WRITE we serve: its verdict on staged bytes, and its release.
      {OpRole::kPeers, XferKind::kWrite, OpStage::kAwaitingDataStatus, FrameType::kDataStatus},
      {OpRole::kPeers, XferKind::kWrite, OpStage::kAwaitingDataStatus, FrameType::kCancel},
      {OpRole::kPeers, XferKind::kWrite, OpStage::kScattering, FrameType::kCancel},
      {OpRole::kPeers, XferKind::kWrite, OpStage::kReplied, FrameType::kCancel},
      // A direct WRITE we read from the initiator's memory, and a direct READ of ours it reads.
      {OpRole::kPeers, XferKind::kWrite, OpStage::kLocalCopy, FrameType::kCancel},
      {OpRole::kPeers, XferKind::kRead, OpStage::kAwaitingReadDone, FrameType::kReadDone},
  };
  int checked = 0;
  for (OpRole role : {OpRole::kOurs, OpRole::kPeers}) {
    for (XferKind kind : kKinds) {
      for (OpStage stage : kStages) {
        for (int type = 0; type <= 23; ++type) {
          const auto frame = static_cast<FrameType>(type);
          const bool expected = admitted.count({role, kind, stage, frame}) != 0;
          EXPECT_EQ(peerMaySend(role, kind, stage, frame), expected)
              << (role == OpRole::kOurs ? "ours " : "peer's ") << xferKindName(kind) << " in "
              << opStageName(stage) << ", frame " << control::frameTypeName(type);
          ++checked;
        }
      }
    }
  }
  EXPECT_EQ(checked, 2 * 4 * 17 * 24);
}

TEST(Negotiation, BothSidesDeriveTheSameChannelsAndChunkAndEachObeysTheOthersLimits) {
  const control::WireSettings a{8, 4u << 20, 100, 2048, 4000};
  const control::WireSettings b{2, 64u << 10, 65536, 16, 400};
  auto at_a = control::agreeSettings(a, b, 60000);
  auto at_b = control::agreeSettings(b, a, 1000);
  ASSERT_TRUE(at_a.isOk());
  ASSERT_TRUE(at_b.isOk());
  EXPECT_EQ(at_a->channels, 2u);
  EXPECT_EQ(at_b->channels, 2u);
  EXPECT_EQ(at_a->chunk_size, 64u << 10);
  EXPECT_EQ(at_b->chunk_size, 64u << 10);
  EXPECT_EQ(at_a->peer_max_descriptors, 65536u);  // what b accepts
  EXPECT_EQ(at_b->peer_max_descriptors, 100u);    // what a accepts
  EXPECT_EQ(at_a->peer_max_notification, 16u);
  EXPECT_EQ(at_b->peer_max_notification, 2048u);
  // a's own interval is a minute; b's timeout asks for one every 100 ms.
  EXPECT_EQ(at_a->keepalive_ms, 100u);
  EXPECT_EQ(at_b->keepalive_ms, 1000u);
}

TEST(Negotiation, AValueOutOfItsRangeIsRefusedNamingTheSetting) {
  const control::WireSettings ok{4, 512u << 10, 65536, 65536, 4000};
  control::WireSettings bad = ok;
  bad.chunk_size = 17u << 20;
  auto refused = control::agreeSettings(ok, bad, 1000);
  ASSERT_FALSE(refused.isOk());
  EXPECT_EQ(refused.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(refused.status().message().find("chunk_size"), std::string::npos);
}

TEST(Negotiation, PeerNamesArePrintableAndBounded) {
  EXPECT_TRUE(control::validPeerName("decode-0"));
  EXPECT_TRUE(control::validPeerName(std::string(256, 'n')));
  EXPECT_FALSE(control::validPeerName(""));
  EXPECT_FALSE(control::validPeerName(std::string(257, 'n')));
  EXPECT_FALSE(control::validPeerName(std::string("a\0b", 3)));
  EXPECT_FALSE(control::validPeerName("line\nbreak"));
}

}  // namespace
}  // namespace tcpx::engine
