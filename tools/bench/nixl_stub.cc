// tcpx_bench without NIXL: the nixl mode is refused up front (see main.cc), so these are never
// reached with a request.
#include "bench.h"

namespace tcpx::bench {

bool haveNixl() {
  return false;
}

std::unique_ptr<Session> openNixlSession(const Options& /*opts*/, Bootstrap& /*boot*/,
                                         uint64_t /*buffer_size*/, const std::string& /*mem*/,
                                         const std::string& /*key*/,
                                         const std::string& /*backend*/) {
  return nullptr;
}

std::unique_ptr<TargetSide> serveNixl(const Options& /*opts*/, Bootstrap& /*boot*/,
                                      std::istringstream& /*args*/) {
  return nullptr;
}

}  // namespace tcpx::bench
