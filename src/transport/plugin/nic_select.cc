#include "transport/plugin/nic_select.h"

#include <algorithm>
#include <climits>
#include <cstdlib>

#include "common/strings.h"

namespace tcpx::transport {
namespace {

std::string resolved(const std::string& path) {
  char buf[PATH_MAX];
  if (path.empty() || realpath(path.c_str(), buf) == nullptr) return path;
  return buf;
}

}  // namespace

int pciAffinity(const std::string& gpu_path, const std::string& nic_path) {
  if (gpu_path.empty() || nic_path.empty()) return 0;
  const std::vector<std::string> a = split(resolved(gpu_path), '/');
  const std::vector<std::string> b = split(resolved(nic_path), '/');
  int common = 0;
  while (static_cast<size_t>(common) < a.size() && static_cast<size_t>(common) < b.size() &&
         a[static_cast<size_t>(common)] == b[static_cast<size_t>(common)]) {
    ++common;
  }
  return common;
}

std::string pciSysfsPath(const std::string& bus_id) {
  if (bus_id.empty()) return {};
  return resolved("/sys/bus/pci/devices/" + bus_id);
}

Result<std::vector<int>> selectNics(const std::vector<NicInfo>& nics, const std::string& gpu_path,
                                    const std::string& override_name) {
  if (nics.empty()) return Status(StatusCode::kNotSupported, "the plugin reports no devices");
  if (!override_name.empty() && override_name != "auto") {
    for (size_t i = 0; i < nics.size(); ++i) {
      if (nics[i].name == override_name) return std::vector<int>{static_cast<int>(i)};
    }
    const auto index = parseSize(override_name, 0, nics.size() - 1);
    if (index) return std::vector<int>{static_cast<int>(*index)};
    std::string names;
    for (const NicInfo& n : nics) names += (names.empty() ? "" : ", ") + n.name;
    return Status(StatusCode::kInvalidArgument,
                  strfmt("net_device '%s' is neither an index below %zu nor one of: %s",
                         override_name.c_str(), nics.size(), names.c_str()));
  }
  const bool any_nic_path =
      std::any_of(nics.begin(), nics.end(), [](const NicInfo& n) { return !n.pci_path.empty(); });
  if (gpu_path.empty() && any_nic_path && nics.size() > 1) {
    // Spreading over every NIC would put channels on the other NUMA node's NICs too.
    std::string names;
    for (const NicInfo& n : nics) names += (names.empty() ? "" : ", ") + n.name;
    return Status(StatusCode::kNotSupported,
                  strfmt("cannot tell which of the %zu NICs (%s) is close to the GPU: its PCI "
                         "path is unknown; set net_device to one of them",
                         nics.size(), names.c_str()));
  }
  int best = -1;
  std::vector<int> out;
  for (size_t i = 0; i < nics.size(); ++i) {
    const int score = pciAffinity(gpu_path, nics[i].pci_path);
    if (score > best) {
      best = score;
      out.clear();
    }
    if (score == best) out.push_back(static_cast<int>(i));
  }
  return out;
}

}  // namespace tcpx::transport
