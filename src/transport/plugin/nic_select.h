// Which plugin device (NIC) each channel of a GPU uses.
//
// Each GPU uses the NICs whose PCI path shares the longest prefix with its own (on A3-high, the
// NIC under the same PCIe switch: GPUs 0 and 1 share eth1, and so on). When several NICs are
// equally close, channels spread over them round-robin. An override names one device by index
// or interface name. When the GPU's path is unknown while NICs have theirs, nothing tells the
// close NICs from the far ones: selection fails (NOT_SUPPORTED) and asks for an override;
// devices that all lack a path (loopback, the emulator's) are all used.
#pragma once

#include <string>
#include <vector>

#include <tcpx_p2p/status.h>

namespace tcpx::transport {

struct NicInfo {
  std::string name;
  std::string pci_path;  // sysfs path, empty when unknown
};

// Length, in path components, of the common prefix of two sysfs PCI paths after resolving
// symbolic links (0 when either is unknown).
int pciAffinity(const std::string& gpu_path, const std::string& nic_path);

// Devices the channels of a GPU whose sysfs PCI path is `gpu_path` use, in channel order
// (channel i uses result[i % size]). `override_name` ("auto", an index, or an interface name)
// picks one device.
Result<std::vector<int>> selectNics(const std::vector<NicInfo>& nics, const std::string& gpu_path,
                                    const std::string& override_name);

// sysfs path of a PCI device ("/sys/bus/pci/devices/0000:04:00.0", links resolved), or "".
std::string pciSysfsPath(const std::string& bus_id);

}  // namespace tcpx::transport
