// tcpx_info: what a plugin transport would use on this machine: the plugin's devices and their
// properties, the NIC each GPU's channels would use, and the effective engine settings.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <string>

#include <tcpx_p2p/config.h>

#include "gpu/gpu.h"
#include "transport/plugin/nic_select.h"
#include "transport/plugin/plugin_transport.h"

int main(int argc, char** argv) {
  CLI::App app{"Show the ncclNet plugin's devices, the GPU-to-NIC mapping and the settings"};
  std::string transport = "tcpx";
  std::string plugin;
  std::string net_device = "auto";
  app.add_option("--transport", transport, "plugin transport to inspect")
      ->check(CLI::IsMember({"tcpx", "emulator"}));
  app.add_option("--plugin", plugin, "plugin library (default: the transport's default locations)");
  app.add_option("--net-device", net_device, "NIC override to apply (auto, index or name)");
  CLI11_PARSE(app, argc, argv);

  tcpx::Config config = tcpx::Config::fromEnvironment();
  std::printf("Effective settings (defaults < TCPX_P2P_* environment):\n");
  for (const tcpx::TunableInfo& t : tcpx::Config::tunables()) {
    auto value = config.get(std::string(t.name));
    std::string shown = value.isOk() ? value.value() : "?";
    if (t.name == "auth_secret" && !shown.empty()) shown = "(set)";  // never print the secret
    std::printf("  %-22s %s\n", std::string(t.name).c_str(), shown.c_str());
  }

  const int gpus = tcpx::gpu::deviceCount();
  std::printf("\nGPUs: %d%s%s\n", gpus, gpus == 0 ? " (" : "",
              gpus == 0 ? (tcpx::gpu::unavailableReason() + ")").c_str() : "");

  tcpx::transport::PluginOptions opts;
  opts.label = transport;
  opts.candidates = plugin.empty() ? tcpx::transport::defaultPluginCandidates(transport)
                                   : std::vector<std::string>{plugin};
  opts.gpu = std::max(tcpx::gpu::currentDevice(), 0);
  auto loaded = tcpx::transport::loadPlugin(opts);
  if (!loaded.isOk()) {
    std::printf("\nPlugin transport '%s' is not usable here:\n  %s\n", transport.c_str(),
                loaded.status().toString().c_str());
    return 1;
  }
  tcpx::transport::Transport& t = *loaded.value();
  int ndev = 0;
  t.devices(&ndev);
  std::printf("\nPlugin devices (%d):\n", ndev);
  std::vector<tcpx::transport::NicInfo> nics;
  for (int i = 0; i < ndev; ++i) {
    tcpx::transport::Properties p;
    t.getProperties(i, &p);
    nics.push_back({p.name, p.pci_path});
    std::printf(
        "  [%d] %-8s speed %d Mbps, ptrSupport 0x%x, maxComms %d, maxRecvs %d, type %s v0x%x\n"
        "       pci %s\n",
        i, p.name.c_str(), p.speed_mbps, p.ptr_support, p.max_comms, p.max_recvs,
        p.device_type == tcpx::transport::NetDeviceType::kUnpack ? "UNPACK" : "HOST",
        p.device_version, p.pci_path.empty() ? "(unknown)" : p.pci_path.c_str());
  }
  std::printf("\nGPU to NIC mapping (net_device=%s):\n", net_device.c_str());
  for (int g = 0; g < std::max(gpus, 1); ++g) {
    std::string path;
    if (auto bus = tcpx::gpu::pciBusId(g); bus.isOk()) {
      path = tcpx::transport::pciSysfsPath(bus.value());
    }
    auto chosen = tcpx::transport::selectNics(nics, path, net_device);
    if (!chosen.isOk()) {
      std::printf("  GPU %d: %s\n", g, chosen.status().toString().c_str());
      continue;
    }
    std::string names;
    for (int d : chosen.value()) names += (names.empty() ? "" : ", ") + nics[d].name;
    std::printf("  GPU %d (%s): channels spread over %s\n", g,
                path.empty() ? "no PCI path" : path.c_str(), names.c_str());
  }
  return 0;
}
