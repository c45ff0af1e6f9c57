// Which READs and WRITEs travel inside the control frames (inline_threshold): up to 16 KiB
// always; above that only while at most four requests to the peer are in flight, so that many
// concurrent transfers take the data channels side by side instead of queueing on the one
// control connection. Checked on the frames a scripted peer receives, with the bytes compared,
// with the posting thread's short path (caller_posts) off and on.
#include <cstring>
#include <gtest/gtest.h>
#include <string>
#include <vector>

#include "common/strings.h"
#include "protocol/protocol_fixture.h"

namespace tcpx::testing {
namespace {

using control::FrameType;

constexpr size_t kAlwaysInline = size_t{16} * 1024;
constexpr size_t kInFlight = 8;
constexpr size_t kInlineWhileInFlight = 4;

class InlinePolicyTest : public ProtocolTest {
 protected:
  // Posts kInFlight transfers of `size` bytes at once, the i-th between the i-th slices of
  // `region` and `remote`; the handles of those that could be posted.
  std::vector<TransferHandle> postAll(OpKind op, const GuardedRegion& region,
                                      const RemoteMemory& remote, size_t size) {
    std::vector<TransferHandle> handles;
    for (size_t i = 0; i < kInFlight; ++i) {
      auto h = post(op, "scripted", {{region.id(), i * size, size}}, {{remote.id, i * size, size}});
      EXPECT_TRUE(h.isOk()) << h.status().toString();
      if (h.isOk()) handles.push_back(h.value());
    }
    return handles;
  }

  // Posts kInFlight WRITEs of `size` bytes at once, then reads their requests in order: each
  // carries its bytes inline or announces a stream on the channels as the policy says, and the
  // bytes are the region's. Every WRITE is then answered and completes.
  void checkWrites(size_t size) {
    SCOPED_TRACE(strfmt("WRITEs of %zu bytes", size));
    GuardedRegion region(*engine_, size * kInFlight);
    fillPattern(region.data(), region.size(), 31);
    const RemoteMemory remote = scriptedRegion(5, size * kInFlight);
    const std::vector<TransferHandle> handles = postAll(OpKind::kWrite, region, remote, size);
    ASSERT_EQ(handles.size(), kInFlight);
    // Every request is read before any is answered: an answer lowers the count in flight, and
    // a transfer still queued behind the first ones would start with the lower count.
    std::vector<ScriptedPeer::Frame> frames;
    for (size_t i = 0; i < kInFlight; ++i) {
      auto request = scripted_->expect(FrameType::kWriteRequest, 5s);
      ASSERT_TRUE(request.isOk()) << request.status().toString();
      frames.push_back(std::move(request.value()));
    }
    std::vector<uint64_t> ids;  // the WRITEs' wire ids, in order
    for (size_t i = 0; i < kInFlight; ++i) {
      control::WriteRequest wr;
      ASSERT_TRUE(control::decode(frames[i].payload, control::DecodeLimits{}, &wr).isOk());
      ids.push_back(wr.xfer_id);
      EXPECT_EQ(wr.inline_data, size <= kAlwaysInline || i < kInlineWhileInFlight)
          << "WRITE " << i << " of " << kInFlight << " in flight";
      std::string bytes(wr.data);
      if (!wr.inline_data) {
        auto stream = scripted_->receiveStream(size, wr.spread, 5s);
        ASSERT_TRUE(stream.isOk()) << stream.status().toString();
        bytes = std::move(stream.value());
      }
      ASSERT_EQ(bytes.size(), size);
      EXPECT_EQ(std::memcmp(bytes.data(), region.data() + i * size, size), 0) << "WRITE " << i;
    }
    for (uint64_t id : ids) {
      ASSERT_TRUE(scripted_
                      ->send(frameOf([&](auto* o) {
                        control::encodeWriteDone({id, StatusCode::kOk, ""}, o);
                      }))
                      .isOk());
    }
    for (TransferHandle h : handles) {
      EXPECT_TRUE(engine_->waitTransfer(h, 5s).isOk());
      EXPECT_TRUE(engine_->releaseTransfer(h).isOk());
    }
    EXPECT_TRUE(region.guardsIntact());
  }

  // Posts kInFlight READs of `size` bytes at once: each READ_REQUEST accepts inline data as the
  // policy says. The peer refuses them all; each READ ends with that refusal.
  void checkReads(size_t size) {
    SCOPED_TRACE(strfmt("READs of %zu bytes", size));
    GuardedRegion region(*engine_, size * kInFlight);
    const RemoteMemory remote = scriptedRegion(6, size * kInFlight);
    const std::vector<TransferHandle> handles = postAll(OpKind::kRead, region, remote, size);
    ASSERT_EQ(handles.size(), kInFlight);
    std::vector<control::ReadRequest> requests(kInFlight);
    for (size_t i = 0; i < kInFlight; ++i) {  // all read before any is answered (see above)
      auto request = scripted_->expect(FrameType::kReadRequest, 5s);
      ASSERT_TRUE(request.isOk()) << request.status().toString();
      ASSERT_TRUE(control::decode(request->payload, control::DecodeLimits{}, &requests[i]).isOk());
      EXPECT_EQ(requests[i].accept_inline, size <= kAlwaysInline || i < kInlineWhileInFlight)
          << "READ " << i << " of " << kInFlight << " in flight";
    }
    for (const control::ReadRequest& rr : requests) {
      control::ReadResponse resp;
      resp.xfer_id = rr.xfer_id;
      resp.code = StatusCode::kNotFound;
      resp.message = "refused by the test";
      ASSERT_TRUE(scripted_->send(frameOf([&](auto* o) { control::encode(resp, {}, o); })).isOk());
    }
    for (TransferHandle h : handles) {
      EXPECT_EQ(engine_->waitTransfer(h, 5s).code(), StatusCode::kRemoteRejected);
      EXPECT_TRUE(engine_->releaseTransfer(h).isOk());
    }
    EXPECT_TRUE(GuardedRegion::allBytes(region.data(), region.size(), kPoison));
    EXPECT_TRUE(region.guardsIntact());
  }

  void checkPolicy() {
    connectScripted();
    for (const size_t size : {kAlwaysInline, size_t{64} * 1024}) {
      checkWrites(size);
      checkReads(size);
    }
    expectBystanderWorks();
  }

  // Restarts the engine under test (and its scripted peers) with caller_posts=`value`.
  void restartWithCallerPosts(const char* value) {
    scripted_.reset();
    engine_.reset();
    bystander_.reset();
    startEngine({{"caller_posts", value}});
  }
};

// Every post through the progress thread (the short path off).
TEST_F(InlinePolicyTest, AboveSixteenKibTransfersLeaveInlineOnlyWhileFewAreInFlight) {
  restartWithCallerPosts("off");
  checkPolicy();
}

TEST_F(InlinePolicyTest, ThePostingThreadsShortPathFollowsTheSamePolicy) {
  restartWithCallerPosts("on");
  checkPolicy();
}

}  // namespace
}  // namespace tcpx::testing
