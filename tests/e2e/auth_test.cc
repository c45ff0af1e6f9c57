// Peer authentication: engines with the same auth_secret connect; any mismatch is refused on
// both sides before a request is served, and the refused peer has no effect on others.
#include <gtest/gtest.h>

#include "e2e/e2e_fixture.h"

namespace tcpx::testing {
namespace {

class AuthTest : public TwoProcessTest {
 protected:
  // Writes 1 MiB to the target and checks it there.
  void expectWriteWorks(Engine& engine, const std::string& peer) {
    uint64_t target_mem = 0;
    const ForkedPeer::Region region = target_->registerMemory(1 << 20);
    target_mem = region.id;
    auto remote = engine.loadRemoteMemory(region.descriptor);
    ASSERT_TRUE(remote.isOk()) << remote.status().toString();
    HostBuffer local(1 << 20);
    fillPattern(local.data(), local.size(), 41);
    auto mem = engine.registerMemory(local.data(), local.size());
    ASSERT_TRUE(mem.isOk());
    const std::vector<LocalDesc> local_descs = {{mem.value(), 0, 1 << 20}};
    const std::vector<RemoteDesc> remote_descs = {{remote->id, 0, 1 << 20}};
    auto h = engine.prepareTransfer(OpKind::kWrite, peer, local_descs, remote_descs);
    ASSERT_TRUE(h.isOk());
    ASSERT_TRUE(engine.postTransfer(h.value()).isOk());
    EXPECT_TRUE(engine.waitTransfer(h.value(), 30s).isOk());
    (void)engine.releaseTransfer(h.value());
    EXPECT_EQ(target_->check(target_mem, 0, 1 << 20, 41), "ok");
  }
};

TEST_F(AuthTest, EnginesWithTheSameSecretConnectAndTransfer) {
  ASSERT_NO_FATAL_FAILURE(
      start({{"auth_secret", "correct horse"}}, {{"auth_secret", "correct horse"}}));
  ASSERT_TRUE(engine_->connect("target").isOk());
  expectWriteWorks(*engine_, "target");
}

TEST_F(AuthTest, AWrongSecretIsRefusedAndOtherPeersAreUndisturbed) {
  ASSERT_NO_FATAL_FAILURE(
      start({{"auth_secret", "correct horse"}}, {{"auth_secret", "battery staple"}}));
  // A second engine with the right secret is connected and working before and after.
  auto good = Engine::create(testConfig("good", {{"auth_secret", "correct horse"}}));
  ASSERT_TRUE(good.isOk());
  ASSERT_TRUE(good.value()->addPeer("target", target_->connectionInfo()).isOk());
  target_->addPeer("good", good.value()->connectionInfo());
  ASSERT_TRUE(good.value()->connect("target").isOk());
  expectWriteWorks(*good.value(), "target");

  for (int attempt = 0; attempt < 3; ++attempt) {
    const Status st = engine_->connect("target");
    EXPECT_EQ(st.code(), StatusCode::kRemoteRejected) << st.toString();
    EXPECT_NE(st.message().find("failed authentication"), std::string::npos) << st.toString();
  }
  EXPECT_EQ(engine_->peerState("target"), PeerState::kFailed);
  expectWriteWorks(*good.value(), "target");
}

TEST_F(AuthTest, APeerWithoutTheSecretIsRefused) {
  ASSERT_NO_FATAL_FAILURE(start({{"auth_secret", "correct horse"}}, {}));
  const Status st = engine_->connect("target");
  EXPECT_EQ(st.code(), StatusCode::kRemoteRejected) << st.toString();
  EXPECT_NE(st.message().find("requires authentication"), std::string::npos) << st.toString();
}

TEST_F(AuthTest, AnAcceptorThatCannotProveTheSecretIsNotUsed) {
  ASSERT_NO_FATAL_FAILURE(start({}, {{"auth_secret", "correct horse"}}));
  const Status st = engine_->connect("target");
  EXPECT_EQ(st.code(), StatusCode::kRemoteRejected) << st.toString();
  EXPECT_NE(st.message().find("without proving the shared secret"), std::string::npos)
      << st.toString();
}

}  // namespace
}  // namespace tcpx::testing
