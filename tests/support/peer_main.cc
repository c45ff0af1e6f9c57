// tcpx_test_peer: the process end-to-end tests talk to. Usage (by ForkedPeer only):
//   tcpx_test_peer <channel fd> <engine name> [key=value ...]
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "support/forked_peer.h"

int main(int argc, char** argv) {
  if (argc < 3) return 64;
  std::vector<std::pair<std::string, std::string>> extra;
  for (int i = 3; i < argc; ++i) {
    const std::string arg = argv[i];
    const size_t eq = arg.find('=');
    if (eq == std::string::npos) return 64;
    extra.emplace_back(arg.substr(0, eq), arg.substr(eq + 1));
  }
  return tcpx::testing::runPeerService(std::atoi(argv[1]), argv[2], extra);
}
