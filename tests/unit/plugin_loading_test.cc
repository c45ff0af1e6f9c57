// Loading ncclNet plugins, the TCPX preflight and choosing NICs.
#include <dlfcn.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <gtest/gtest.h>
#include <string>
#include <sys/socket.h>
#include <sys/un.h>
#include <vector>

#include "transport/plugin/nic_select.h"
#include "transport/plugin/plugin_transport.h"
#include "transport/plugin/tcpx_preflight.h"

namespace tcpx::transport {
namespace {

// Paths of the libraries built with this test; the environment overrides them (a moved tree).
std::string builtPath(const char* env, const char* fallback) {
  const char* value = std::getenv(env);
  return value != nullptr && *value != '\0' ? value : fallback;
}

TEST(PluginLoading, AMissingLibraryNamesEveryPathTried) {
  auto got = loadPlugin({"tcpx", {"/nonexistent/libnccl-net.so", "libno-such-plugin.so"}});
  ASSERT_FALSE(got.isOk());
  EXPECT_EQ(got.status().code(), StatusCode::kNotSupported);
  EXPECT_NE(got.status().message().find("/nonexistent/libnccl-net.so"), std::string::npos);
  EXPECT_NE(got.status().message().find("libno-such-plugin.so"), std::string::npos);
}

TEST(PluginLoading, ALibraryWithoutAV7OrV8TableIsRefused) {
  auto got = loadPlugin(
      {"tcpx", {builtPath("TCPX_P2P_SHARED_LIBRARY_PATH", TCPX_P2P_SHARED_LIBRARY_PATH)}});
  ASSERT_FALSE(got.isOk());
  EXPECT_NE(got.status().message().find("exports no ncclNetPlugin_v7 or _v8 table"),
            std::string::npos)
      << got.status().toString();
}

// A directory of UNIX sockets standing in for RxDM's, named by
// NCCL_GPUDIRECTTCPX_UNIX_CLIENT_PREFIX while the object lives.
class FakeRxdm {
 public:
  FakeRxdm() {
    char templ[] = "/tmp/tcpx-rxdm-XXXXXX";
    dir_ = mkdtemp(templ) != nullptr ? templ : "";
    setenv("NCCL_GPUDIRECTTCPX_UNIX_CLIENT_PREFIX", dir_.c_str(), 1);
  }
  ~FakeRxdm() {
    for (int fd : fds_) ::close(fd);
    for (const std::string& name : names_) ::unlink((dir_ + "/" + name).c_str());
    ::rmdir(dir_.c_str());
    unsetenv("NCCL_GPUDIRECTTCPX_UNIX_CLIENT_PREFIX");
  }
  FakeRxdm(const FakeRxdm&) = delete;
  FakeRxdm& operator=(const FakeRxdm&) = delete;

  // A socket a daemon listens on (connections wait in the backlog), or, `listening` false, the
  // file a daemon that went away left behind.
  void add(const std::string& name, bool listening = true) {
    const int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    const std::string path = dir_ + "/" + name;
    std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
    ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0) << path;
    names_.push_back(name);
    if (!listening) {
      ::close(fd);
      return;
    }
    ASSERT_EQ(::listen(fd, 16), 0);
    fds_.push_back(fd);
  }
  void addAll() {
    add("rx_rule_manager");
    add("get_gpu_fd_0000:04:00.0");
    add("get_gpu_metadata_0000:04:00.0");
  }

 private:
  std::string dir_;
  std::vector<int> fds_;
  std::vector<std::string> names_;
};

TcpxPreflight fakeDriver(int gpu = 0) {
  return {builtPath("TCPX_FAKE_CUDA_DRIVER_PATH", TCPX_FAKE_CUDA_DRIVER_PATH), gpu};
}

// Expects NOT_SUPPORTED with `words` in the message.
void expectRefused(const Status& st, const std::string& words) {
  EXPECT_EQ(st.code(), StatusCode::kNotSupported) << st.toString();
  EXPECT_NE(st.message().find(words), std::string::npos) << st.toString();
}

TEST(TcpxPreflight, NamesTheMissingDriverGpuOrRxdmSocket) {
  FakeRxdm rxdm;
  expectRefused(checkTcpxPreconditions({"/nonexistent/libcuda.so.1", 0}),
                "the plugin needs the CUDA driver /nonexistent/libcuda.so.1");
  setenv("FAKE_CUDA_INIT_RESULT", "100", 1);  // CUDA_ERROR_NO_DEVICE
  expectRefused(checkTcpxPreconditions(fakeDriver()), "fails cuInit (CUresult 100)");
  unsetenv("FAKE_CUDA_INIT_RESULT");
  setenv("FAKE_CUDA_DEVICES", "0", 1);
  expectRefused(checkTcpxPreconditions(fakeDriver()), "reports no GPU");
  setenv("FAKE_CUDA_DEVICES", "2", 1);
  expectRefused(checkTcpxPreconditions(fakeDriver(2)), "GPU 2 does not exist");
  unsetenv("FAKE_CUDA_DEVICES");

  expectRefused(checkTcpxPreconditions(fakeDriver()), "rx_rule_manager does not exist");
  rxdm.add("rx_rule_manager");
  // The pool sockets are those of the GPU in use, by its lower-case PCI bus id.
  expectRefused(checkTcpxPreconditions(fakeDriver()), "get_gpu_fd_0000:04:00.0 does not exist");
  rxdm.add("get_gpu_fd_0000:04:00.0");
  rxdm.add("get_gpu_metadata_0000:04:00.0", /*listening=*/false);
  expectRefused(checkTcpxPreconditions(fakeDriver()),
                "get_gpu_metadata_0000:04:00.0 has no daemon behind it");
}

TEST(TcpxPreflight, PassesWhenTheDriverAndEveryRxdmSocketOfTheGpuAreThere) {
  FakeRxdm rxdm;
  rxdm.addAll();
  EXPECT_TRUE(checkTcpxPreconditions(fakeDriver()).isOk());
  setenv("FAKE_CUDA_DEVICES", "2", 1);
  expectRefused(checkTcpxPreconditions(fakeDriver(1)), "get_gpu_fd_0000:05:00.0 does not exist");
  unsetenv("FAKE_CUDA_DEVICES");
}

TEST(PluginLoading, ACandidateWithoutATableIsClosedAndTheNextOneLoads) {
  // A library that opens but exports no table (and, plain C, can be unloaded again).
  const std::string no_table = fakeDriver().cuda_driver;
  const bool was_loaded = dlopen(no_table.c_str(), RTLD_NOW | RTLD_NOLOAD) != nullptr;
  auto got =
      loadPlugin({"emulator", {no_table, builtPath("TCPX_EMULATOR_PATH", TCPX_EMULATOR_PATH)}});
  ASSERT_TRUE(got.isOk()) << got.status().toString();
  EXPECT_STREQ(got.value()->name(), "emulator");
  if (!was_loaded) {
    EXPECT_EQ(dlopen(no_table.c_str(), RTLD_NOW | RTLD_NOLOAD), nullptr)
        << "a library without a table stays loaded";
  }
}

TEST(PluginLoading, TcpxTakesOnlyATableUnderTcpxsName) {
  auto got = loadPlugin({"tcpx", {builtPath("TCPX_EMULATOR_PATH", TCPX_EMULATOR_PATH)}});
  ASSERT_FALSE(got.isOk());
  expectRefused(got.status(), "its table is 'TCPXEmulator_v7', not GPUDirect-TCPX's");
}

TEST(PluginLoading, TcpxIsCheckedBeforeItsInitRunsOnceWithItsDefaults) {
  const std::string path = builtPath("TCPX_FAKE_TCPX_PLUGIN_PATH", TCPX_FAKE_TCPX_PLUGIN_PATH);
  PluginOptions opts{"tcpx", {path}, 0, fakeDriver().cuda_driver};
  unsetenv("NCCL_DYNAMIC_CHUNK_SIZE");
  void* probe = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  ASSERT_NE(probe, nullptr) << dlerror();
  const int* inits = static_cast<const int*>(dlsym(probe, "fake_tcpx_inits"));
  const char* chunk_seen = static_cast<const char*>(dlsym(probe, "fake_tcpx_chunk_size_at_init"));
  ASSERT_TRUE(inits != nullptr && chunk_seen != nullptr);
  const int before = *inits;
  {
    FakeRxdm rxdm;  // empty: the preflight refuses before init
    auto refused = loadPlugin(opts);
    ASSERT_FALSE(refused.isOk());
    expectRefused(refused.status(), "rx_rule_manager does not exist");
    EXPECT_EQ(*inits, before);
    if (before == 0) {
      EXPECT_EQ(std::getenv("NCCL_DYNAMIC_CHUNK_SIZE"), nullptr);
    }
  }
  FakeRxdm rxdm;
  rxdm.addAll();
  auto first = loadPlugin(opts);
  ASSERT_TRUE(first.isOk()) << first.status().toString();
  auto second = loadPlugin(opts);
  ASSERT_TRUE(second.isOk()) << second.status().toString();
  EXPECT_EQ(*inits, 1) << "a plugin is initialised once per process and shared";
  EXPECT_STREQ(chunk_seen, "524288") << "TCPX's init saw its chunk size default";
  // An engine on another GPU is checked for that GPU's RxDM sockets.
  setenv("FAKE_CUDA_DEVICES", "2", 1);
  opts.gpu = 1;
  expectRefused(loadPlugin(opts).status(), "get_gpu_fd_0000:05:00.0 does not exist");
  unsetenv("FAKE_CUDA_DEVICES");
  dlclose(probe);
}

TEST(PluginLoading, OtherPluginsGetNoTcpxDefaults) {
  unsetenv("NCCL_DYNAMIC_CHUNK_SIZE");
  auto got = loadPlugin({"emulator", {builtPath("TCPX_EMULATOR_PATH", TCPX_EMULATOR_PATH)}});
  ASSERT_TRUE(got.isOk()) << got.status().toString();
  EXPECT_EQ(std::getenv("NCCL_DYNAMIC_CHUNK_SIZE"), nullptr);
}

TEST(PluginLoading, TheEmulatorLoadsAsAnUnpackTransport) {
  auto got = loadPlugin({"emulator", {builtPath("TCPX_EMULATOR_PATH", TCPX_EMULATOR_PATH)}});
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
  // A GPU whose path is unknown cannot be placed among NICs whose paths are known.
  got = selectNics(nics, "", "auto");
  ASSERT_FALSE(got.isOk());
  EXPECT_EQ(got.status().code(), StatusCode::kNotSupported);
  EXPECT_NE(got.status().message().find("set net_device"), std::string::npos);
  EXPECT_EQ(selectNics(nics, "", "eth3").value(), std::vector<int>{2});
  // Devices without PCI paths (loopback) all tie.
  const std::vector<NicInfo> loopback = {{"lo", ""}, {"lo2", ""}};
  got = selectNics(loopback, "", "auto");
  ASSERT_TRUE(got.isOk());
  EXPECT_EQ(got.value(), (std::vector<int>{0, 1}));
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
