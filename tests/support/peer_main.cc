// tcpx_test_peer: the process end-to-end tests talk to. Usage (by ForkedPeer only):
//   tcpx_test_peer <channel fd> <engine name> [--flag ...] [key=value ...]
// Flags:
//   --deny-getrandom   the getrandom system call fails with ENOSYS in this process (a seccomp
//                      filter), as on a kernel whose random generator cannot be used
//   --limit-as-extra-mib=N  the address space is limited to N MiB more than the process maps
//                      before its engine starts (no thread stack fits in 1 MiB)
#include <cerrno>
#include <cstddef>
#include <cstdlib>
#include <fstream>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <string>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <utility>
#include <vector>

#include "support/forked_peer.h"

namespace {

bool denyGetrandom() {
  sock_filter filter[] = {
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_getrandom, 0, 1),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (ENOSYS & SECCOMP_RET_DATA)),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
  };
  sock_fprog program{static_cast<unsigned short>(sizeof(filter) / sizeof(filter[0])), filter};
  return prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 &&
         prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &program) == 0;
}

bool limitAddressSpace(uint64_t extra_mib) {
  std::ifstream status("/proc/self/status");
  std::string line;
  uint64_t mapped = 0;
  while (std::getline(status, line)) {
    if (line.rfind("VmSize:", 0) == 0) mapped = std::stoull(line.substr(7)) * 1024;
  }
  rlimit lim{};
  getrlimit(RLIMIT_AS, &lim);
  lim.rlim_cur = mapped + (extra_mib << 20);
  return mapped != 0 && setrlimit(RLIMIT_AS, &lim) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) return 64;
  std::vector<std::pair<std::string, std::string>> extra;
  for (int i = 3; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--deny-getrandom") {
      if (!denyGetrandom()) return 65;
      continue;
    }
    const std::string as_flag = "--limit-as-extra-mib=";
    if (arg.rfind(as_flag, 0) == 0) {
      if (!limitAddressSpace(std::stoull(arg.substr(as_flag.size())))) return 65;
      continue;
    }
    const size_t eq = arg.find('=');
    if (eq == std::string::npos) return 64;
    extra.emplace_back(arg.substr(0, eq), arg.substr(eq + 1));
  }
  return tcpx::testing::runPeerService(std::atoi(argv[1]), argv[2], extra);
}
