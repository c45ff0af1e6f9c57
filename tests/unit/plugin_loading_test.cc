// Loading ncclNet plugins and choosing NICs.
#include <cstdlib>
#include <gtest/gtest.h>
#include <string>

#include "transport/plugin/nic_select.h"
#include "transport/plugin/plugin_transport.h"

namespace tcpx::transport {
namespace {

// Paths of the libraries built with this test; the environment overrides them (a moved tree).
std::string builtPath(const char* env, const char* fallback) {
  const char* value = std::getenv(env);
  return value != nullptr && *value != '\0' ? value : fallback;
}

TEST(PluginLoading, AMissingLibraryNamesEveryPathTried) {
  auto got = loadPlugin({"tcpx", {"/nonexistent/libnccl-net.so", "libno-such-plugin.so"}, false});
  ASSERT_FALSE(got.isOk());
  EXPECT_EQ(got.status().code(), StatusCode::kNotSupported);
  EXPECT_NE(got.status().message().find("/nonexistent/libnccl-net.so"), std::string::npos);
  EXPECT_NE(got.status().message().find("libno-such-plugin.so"), std::string::npos);
}

TEST(PluginLoading, ALibraryWithoutAV7OrV8TableIsRefused) {
  auto got = loadPlugin(
      {"tcpx", {builtPath("TCPX_P2P_SHARED_LIBRARY_PATH", TCPX_P2P_SHARED_LIBRARY_PATH)}, false});
  ASSERT_FALSE(got.isOk());
  EXPECT_NE(got.status().message().find("exports no ncclNetPlugin_v7 or _v8 table"),
            std::string::npos)
      << got.status().toString();
}

TEST(PluginLoading, TheEmulatorLoadsAsAnUnpackTransport) {
  auto got = loadPlugin({"emulator", {builtPath("TCPX_EMULATOR_PATH", TCPX_EMULATOR_PATH)}, false});
  ASSERT_TRUE(got.isOk()) << got.status().toString();
  Transport& t = *got.value();
  EXPECT_STREQ(t.name(), "emulator");
  EXPECT_TRUE(t.needsRegistration());
  EXPECT_EQ(t.maxRequestBytes(), 4ULL << 20);
  Properties props;
  ASSERT_EQ(t.getProperties(0, &props), NetResult::kSuccess);
  EXPECT_EQ(props.device_type, NetDeviceType::kUnpack);
  EXPECT_EQ(props.max_recvs, 1);
}

TEST(NicSelection, TheNicSharingTheLongestPciPathWinsAndTiesSpreadChannels) {
  const std::string gpu = "/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:00.0";
  const std::vector<NicInfo> nics = {
      {"eth1", "/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0/0000:03:00.0"},
      {"eth2", "/sys/devices/pci0000:00/0000:00:02.0/0000:05:00.0"},
      {"eth3", "/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0/0000:04:00.0"},
      {"eth4", ""},
  };
  auto got = selectNics(nics, gpu, "auto");
  ASSERT_TRUE(got.isOk());
  EXPECT_EQ(got.value(), (std::vector<int>{0, 2}));
  // Without PCI information every device ties.
  got = selectNics(nics, "", "auto");
  ASSERT_TRUE(got.isOk());
  EXPECT_EQ(got.value().size(), nics.size());
}

TEST(NicSelection, AnOverrideNamesOneDeviceByNameOrIndex) {
  const std::vector<NicInfo> nics = {{"eth1", ""}, {"eth2", ""}};
  EXPECT_EQ(selectNics(nics, "", "eth2").value(), std::vector<int>{1});
  EXPECT_EQ(selectNics(nics, "", "0").value(), std::vector<int>{0});
  auto bad = selectNics(nics, "", "eth9");
  ASSERT_FALSE(bad.isOk());
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("eth1, eth2"), std::string::npos);
  EXPECT_FALSE(selectNics(nics, "", "2").isOk());
}

}  // namespace
}  // namespace tcpx::transport
