// Two engines configured differently: for every setting the handshake negotiates (see
// control/negotiation.h), they either move verified bytes or refuse, typed and naming the
// setting, at connect time or for the one request over the other's limit.
#include <thread>

#include "e2e/e2e_fixture.h"

namespace tcpx::testing {
namespace {

class SettingsMismatchTest : public TwoProcessTest {
 protected:
  // Both engines on the socket transport (whatever the environment says), each with its own
  // extra settings.
  void startBoth(std::vector<std::pair<std::string, std::string>> target_extra,
                 std::vector<std::pair<std::string, std::string>> local_extra) {
    target_extra.emplace_back("transport", "socket");
    local_extra.emplace_back("transport", "socket");
    start(target_extra, local_extra);
  }

  // `count` transfers of `size` bytes each way at once (WRITEs from here into the target's
  // first half, READs into our second half), every byte checked.
  void moveBothWays(size_t size, int count) {
    const size_t span = size * static_cast<size_t>(count);
    uint64_t target_mem = 0;
    const RemoteMemory remote = targetRegion(2 * span, &target_mem);
    HostBuffer local(2 * span);
    const MemoryId mem = localRegion(local);
    const uint64_t write_seed = tools::randomSeed();
    const uint64_t read_seed = tools::randomSeed();
    fillPattern(local.data(), span, write_seed);
    target_->fill(target_mem, span, span, read_seed);
    std::vector<TransferHandle> handles;
    for (int i = 0; i < count; ++i) {
      const size_t off = size * static_cast<size_t>(i);
      for (OpKind op : {OpKind::kWrite, OpKind::kRead}) {
        const size_t base = op == OpKind::kWrite ? 0 : span;
        auto h =
            engine_->prepareTransfer(op, "target", std::vector<LocalDesc>{{mem, base + off, size}},
                                     std::vector<RemoteDesc>{{remote.id, base + off, size}});
        ASSERT_TRUE(h.isOk());
        ASSERT_TRUE(engine_->postTransfer(h.value()).isOk());
        handles.push_back(h.value());
      }
    }
    for (TransferHandle h : handles) {
      const Status st = engine_->waitTransfer(h, 30s);
      EXPECT_TRUE(st.isOk()) << st.toString();
      (void)engine_->releaseTransfer(h);
    }
    EXPECT_EQ(target_->check(target_mem, 0, span, write_seed), "ok");
    EXPECT_EQ(checkPattern(local.data() + span, span, read_seed), -1);
    // And the target's own WRITE into us (its socket settings on the sending side).
    const std::string loaded = target_->loadRemote(engine_->memoryDescriptor(mem).value());
    ASSERT_EQ(loaded.rfind("OK ", 0), 0u) << loaded;
    const uint64_t back_seed = tools::randomSeed();
    target_->fill(target_mem, 0, span, back_seed);
    EXPECT_EQ(target_->call(strfmt("XFER W initiator %llu 0 %s 0 %zu %d -",
                                   static_cast<unsigned long long>(target_mem),
                                   loaded.substr(3).c_str(), size, count)),
              "OK");
    EXPECT_EQ(checkPattern(local.data(), span, back_seed), -1);
    EXPECT_TRUE(engine_->deregisterMemory(mem).isOk());
  }
};

TEST_F(SettingsMismatchTest, SocketSplittingThatDiffersBetweenTheSidesStillMovesEveryByte) {
  // This side splits requests over 4 sockets from 4 KiB on; the target over 2 from 512 KiB.
  startBoth({}, {{"socket_min_split", "4K"}, {"sockets_per_channel", "4"}});
  moveBothWays(256 * 1024, 6);
  moveBothWays((3u << 20) + 5, 2);
  EXPECT_EQ(engine_->peerState("target"), PeerState::kReady);
}

TEST_F(SettingsMismatchTest, ChannelCountsAndChunkSizesThatDifferAgreeOnTheSmaller) {
  startBoth({{"channels", "8"}, {"chunk_size", "4M"}}, {{"channels", "2"}, {"chunk_size", "64K"}});
  moveBothWays(1 << 20, 4);
  moveBothWays((5u << 20) + 3, 1);
}

TEST_F(SettingsMismatchTest, InlineThresholdsThatDifferAreEachSidesOwn) {
  startBoth({{"inline_threshold", "0"}}, {{"inline_threshold", "64K"}});
  moveBothWays(4096, 8);
  moveBothWays(64 * 1024, 2);
}

TEST_F(SettingsMismatchTest, ARequestOverThePeersDescriptorLimitFailsHereAndTheConnectionStays) {
  startBoth({{"max_descriptors", "8"}}, {});
  const RemoteMemory remote = targetRegion(4096);
  HostBuffer local(4096);
  const MemoryId mem = localRegion(local);
  for (OpKind op : {OpKind::kWrite, OpKind::kRead}) {
    std::vector<LocalDesc> nine_local;
    std::vector<RemoteDesc> nine_remote;
    for (uint64_t i = 0; i < 9; ++i) {
      nine_local.push_back({mem, i * 16, 16});
      nine_remote.push_back({remote.id, i * 16, 16});
    }
    const Status over = run(op, nine_local, nine_remote);
    EXPECT_EQ(over.code(), StatusCode::kResourceExhausted) << over.toString();
    EXPECT_NE(over.message().find("at most 8"), std::string::npos) << over.toString();
    nine_local.pop_back();
    nine_remote.pop_back();
    EXPECT_TRUE(run(op, nine_local, nine_remote).isOk());
  }
  EXPECT_EQ(engine_->peerState("target"), PeerState::kReady);
}

TEST_F(SettingsMismatchTest, ANotificationOverThePeersLimitIsRefusedHere) {
  startBoth({{"max_notification_size", "16"}}, {});
  uint64_t target_mem = 0;
  const RemoteMemory remote = targetRegion(4096, &target_mem);
  HostBuffer local(4096);
  const MemoryId mem = localRegion(local);
  const Status over =
      run(OpKind::kWrite, {{mem, 0, 64}}, {{remote.id, 0, 64}}, std::string(17, 'n'));
  EXPECT_EQ(over.code(), StatusCode::kInvalidArgument) << over.toString();
  EXPECT_NE(over.message().find("at most 16"), std::string::npos) << over.toString();
  EXPECT_EQ(engine_->sendNotification("target", std::string(17, 'n')).code(),
            StatusCode::kInvalidArgument);
  ASSERT_TRUE(
      run(OpKind::kWrite, {{mem, 0, 64}}, {{remote.id, 0, 64}}, std::string(16, 'w')).isOk());
  ASSERT_TRUE(engine_->sendNotification("target", std::string(16, 's')).isOk());
  const auto got = target_->notifications(2, 5s);
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(got[0].message, std::string(16, 'w'));
  EXPECT_EQ(got[1].message, std::string(16, 's'));
}

TEST_F(SettingsMismatchTest, KeepalivesFollowThePeersTimeoutNotOnlyOurOwnInterval) {
  // This side would send a keepalive once a minute; the target declares a peer dead after
  // 400 ms of silence. The handshake makes this side send one every 100 ms.
  startBoth({{"peer_timeout_ms", "400"}}, {{"keepalive_ms", "60000"}});
  ASSERT_TRUE(engine_->connect("target").isOk());
  std::this_thread::sleep_for(1500ms);  // idle: nothing but keepalives
  uint64_t target_mem = 0;
  const RemoteMemory remote = targetRegion(1 << 20, &target_mem);
  HostBuffer local(1 << 20);
  const MemoryId mem = localRegion(local);
  fillPattern(local.data(), 1 << 20, 12);
  const Status st = run(OpKind::kWrite, {{mem, 0, 1 << 20}}, {{remote.id, 0, 1 << 20}});
  EXPECT_TRUE(st.isOk()) << st.toString();
  EXPECT_EQ(target_->check(target_mem, 0, 1 << 20, 12), "ok");
}

}  // namespace
}  // namespace tcpx::testing
