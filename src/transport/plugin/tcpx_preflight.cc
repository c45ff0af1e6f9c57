#include "transport/plugin/tcpx_preflight.h"

#include <dlfcn.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include "common/strings.h"

namespace tcpx::transport {
namespace {

// The few CUDA driver entry points the check calls (CUresult is an int, CUdevice an int).
using CuInit = int (*)(unsigned int flags);
using CuDeviceGetCount = int (*)(int* count);
using CuDeviceGet = int (*)(int* device, int ordinal);
using CuDeviceGetPciBusId = int (*)(char* bus_id, int len, int device);

Status notSupported(const std::string& why) {
  return Status(StatusCode::kNotSupported, "TCPX is not used: " + why);
}

}  // namespace

Result<std::string> gpuBusIdFromDriver(const TcpxPreflight& p) {
  // Kept loaded: the plugin loads the same driver right after this check.
  void* lib = dlopen(p.cuda_driver.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    const char* err = dlerror();  // NOLINT(concurrency-mt-unsafe): per thread in glibc
    return notSupported("the plugin needs the CUDA driver " + p.cuda_driver + ", which cannot be " +
                        "loaded (" + (err != nullptr ? err : "dlopen failed") + ")");
  }
  auto init = reinterpret_cast<CuInit>(dlsym(lib, "cuInit"));
  auto count = reinterpret_cast<CuDeviceGetCount>(dlsym(lib, "cuDeviceGetCount"));
  auto get = reinterpret_cast<CuDeviceGet>(dlsym(lib, "cuDeviceGet"));
  auto bus = reinterpret_cast<CuDeviceGetPciBusId>(dlsym(lib, "cuDeviceGetPCIBusId"));
  if (init == nullptr || count == nullptr || get == nullptr || bus == nullptr) {
    return notSupported(p.cuda_driver + " lacks cuInit, cuDeviceGetCount, cuDeviceGet or " +
                        "cuDeviceGetPCIBusId: it is not a CUDA driver");
  }
  if (const int rc = init(0); rc != 0) {
    return notSupported(strfmt("the CUDA driver %s fails cuInit (CUresult %d): no usable GPU",
                               p.cuda_driver.c_str(), rc));
  }
  int n = 0;
  if (const int rc = count(&n); rc != 0 || n <= 0) {
    return notSupported(
        strfmt("the CUDA driver %s reports no GPU (cuDeviceGetCount: CUresult %d, "
               "%d devices)",
               p.cuda_driver.c_str(), rc, n));
  }
  if (p.gpu < 0 || p.gpu >= n) {
    return notSupported(strfmt("GPU %d does not exist: the CUDA driver reports %d", p.gpu, n));
  }
  int device = 0;
  char id[64] = {};
  if (get(&device, p.gpu) != 0 || bus(id, sizeof(id), device) != 0 || id[0] == '\0') {
    return notSupported(strfmt("the CUDA driver gives no PCI bus id for GPU %d", p.gpu));
  }
  std::string out(id);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

namespace {

// Whether a daemon listens on the UNIX socket `path`; the reason when not.
std::string socketProblem(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return "does not exist";
  if (!S_ISSOCK(st.st_mode)) return "is not a socket";
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) return "is too long a socket path";
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return "cannot be tried (" + errnoString(errno) + ")";
  // Connecting and closing at once: RxDM serves one request per connection and sees none.
  const int rc = ::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr));
  const int err = errno;
  ::close(fd);
  if (rc != 0) return "has no daemon behind it (" + errnoString(err) + ")";
  return {};
}

}  // namespace

bool isTcpxTable(const char* name) {
  return name != nullptr && std::strncmp(name, kTcpxTableName, std::strlen(kTcpxTableName)) == 0;
}

Status checkTcpxPreconditions(const TcpxPreflight& preflight) {
  auto bus = gpuBusIdFromDriver(preflight);
  if (!bus.isOk()) return bus.status();
  // NOLINTNEXTLINE(concurrency-mt-unsafe): read while the engine is created
  const char* prefix = std::getenv("NCCL_GPUDIRECTTCPX_UNIX_CLIENT_PREFIX");
  const std::string dir = prefix != nullptr && *prefix != '\0' ? prefix : "/run/tcpx";
  const struct {
    std::string name;
    const char* role;
  } sockets[] = {
      {"rx_rule_manager", "flow steering for every accepted data socket"},
      {"get_gpu_fd_" + bus.value(), "the GPU receive pool of this GPU; without it TCPX exits"},
      {"get_gpu_metadata_" + bus.value(), "the receive pool's layout; without it TCPX exits"},
  };
  for (const auto& s : sockets) {
    const std::string path = dir + "/" + s.name;
    const std::string problem = socketProblem(path);
    if (problem.empty()) continue;
    return notSupported(strfmt(
        "the receive-data-path manager (RxDM) socket %s %s; it serves %s "
        "(GPU %d, PCI %s). Is the RxDM container running with %s shared, "
        "and NCCL_GPUDIRECTTCPX_UNIX_CLIENT_PREFIX set to it?",
        path.c_str(), problem.c_str(), s.role, preflight.gpu, bus.value().c_str(), dir.c_str()));
  }
  return {};
}

void applyTcpxDefaults() {
  // NOLINTBEGIN(concurrency-mt-unsafe): set while the engine is created, before TCPX reads them
  setenv("NCCL_DYNAMIC_CHUNK_SIZE", "524288", 0);
  setenv("NCCL_NSOCKS_PERTHREAD", "4", 0);
  setenv("NCCL_SOCKET_NTHREADS", "1", 0);
  setenv("NCCL_GPUDIRECTTCPX_PROGRAM_FLOW_STEERING_WAIT_MICROS", "50000", 0);
  // NOLINTEND(concurrency-mt-unsafe)
}

}  // namespace tcpx::transport
