// Peers on one host (the same kernel boot id) under a plugin transport: with same_host=socket (what
// auto means for tcpx) their data moves over the socket transport, every byte verified and the
// transport named in PeerStats; same_host=network keeps the plugin; two engines that chose
// differently are refused with the setting named. Over the emulator whatever the suite's
// transport, or over TCPX where scripts/test-real-tcpx.sh sets TCPX_SAME_HOST_TEST_TRANSPORT=tcpx.
#include <cstdlib>
#include <gtest/gtest.h>

#include "e2e/e2e_fixture.h"

namespace tcpx::testing {
namespace {

class SameHostTest : public TwoProcessTest {
 protected:
  static std::string plugin() {
    const char* t = std::getenv("TCPX_SAME_HOST_TEST_TRANSPORT");  // NOLINT(concurrency-mt-unsafe)
    return t != nullptr && *t != '\0' ? t : "emulator";
  }

  // Starts both engines over the plugin with these same_host values (target, ours).
  void startWith(const char* target_same_host, const char* our_same_host) {
    start({{"transport", plugin()}, {"same_host", target_same_host}},
          {{"transport", plugin()}, {"same_host", our_same_host}});
  }

  std::string transportOfTarget() {
    auto stats = engine_->peerStats("target");
    EXPECT_TRUE(stats.isOk());
    return stats.isOk() ? stats.value().transport : std::string();
  }
};

TEST_F(SameHostTest, WithSameHostSocketAPluginEnginesPeerOnThisHostUsesSockets) {
  ASSERT_NO_FATAL_FAILURE(startWith("socket", "socket"));
  EXPECT_EQ(transportOfTarget(), "") << "no connection yet";
  ASSERT_TRUE(engine_->connect("target").isOk());
  EXPECT_EQ(transportOfTarget(), "socket");
  for (size_t size : {size_t{100}, size_t{3} << 20}) roundTrip(size);
  auto stats = engine_->peerStats("target");
  ASSERT_TRUE(stats.isOk());
  EXPECT_EQ(stats.value().failed, 0u);
}

TEST_F(SameHostTest, WithSameHostNetworkThePluginCarriesTheData) {
  ASSERT_NO_FATAL_FAILURE(startWith("network", "network"));
  ASSERT_TRUE(engine_->connect("target").isOk());
  EXPECT_EQ(transportOfTarget(), plugin());
  roundTrip(size_t{3} << 20);
}

TEST_F(SameHostTest, AutoMeansSocketsForTcpxAndTheEmulatorForTheEmulator) {
  ASSERT_NO_FATAL_FAILURE(startWith("auto", "auto"));
  ASSERT_TRUE(engine_->connect("target").isOk());
  EXPECT_EQ(transportOfTarget(), plugin() == "tcpx" ? "socket" : plugin());
  roundTrip(size_t{1} << 20);
}

TEST_F(SameHostTest, EnginesThatChoseDifferentlyAreRefusedNamingTheSetting) {
  ASSERT_NO_FATAL_FAILURE(startWith("network", "socket"));
  const Status st = engine_->connect("target");
  EXPECT_FALSE(st.isOk());
  EXPECT_NE(st.message().find("same_host"), std::string::npos) << st.toString();
  EXPECT_EQ(engine_->peerState("target"), PeerState::kFailed);
}

TEST_F(SameHostTest, TheEngineItselfIsLocal) {
  ASSERT_NO_FATAL_FAILURE(startWith("auto", "auto"));
  ASSERT_TRUE(engine_->addPeer("self", engine_->connectionInfo()).isOk());
  auto stats = engine_->peerStats("self");
  ASSERT_TRUE(stats.isOk());
  EXPECT_EQ(stats.value().transport, "local");
}

}  // namespace
}  // namespace tcpx::testing
