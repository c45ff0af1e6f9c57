// --idle-cpu: CPU used by an engine with N connected peers and nothing in flight.
//
// Inference servers share their cores with the engine, so an idle engine must block: this probe
// starts N target processes, connects to each, lets the connections settle, then reads this
// process's CPU time (all threads) over the interval.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <sys/wait.h>
#include <thread>

#include "bench.h"
#include "common/process_counts.h"
#include "common/strings.h"

namespace tcpx::bench {
namespace {

// What this process holds: threads, file descriptors, resident memory (KiB).
struct Holdings {
  size_t threads = 0;
  size_t fds = 0;
  size_t rss_kib = 0;
};

Holdings holdings() {
  Holdings h;
  h.threads = tools::threadCount();
  h.fds = tools::fdCount();
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmRSS:", 0) == 0) h.rss_kib = std::strtoull(line.c_str() + 6, nullptr, 10);
  }
  return h;
}

}  // namespace

int runIdleCpu(const Options& opts) {
  auto engine_or = makeEngine("bench-idle", opts.engine_params, "127.0.0.1");
  if (!engine_or.isOk()) {
    std::fprintf(stderr, "tcpx_bench: %s\n", engine_or.status().toString().c_str());
    return 2;
  }
  Engine& engine = *engine_or.value();
  const Holdings before = holdings();
  std::vector<pid_t> children;
  std::vector<std::unique_ptr<Bootstrap>> boots;
  const std::string params = joinParams(opts.engine_params);
  for (int i = 0; i < opts.idle_peers; ++i) {
    pid_t child = -1;
    const int port = startLoopbackTarget(opts, &child);
    if (port <= 0) return 2;
    children.push_back(child);
    auto boot = connectBootstrap("127.0.0.1", static_cast<uint16_t>(port));
    if (!boot) return 2;
    boot->send(strfmt("ENGINE E0 %s 4096 %s dram 0", params.c_str(),
                      toHex(engine.connectionInfo()).c_str()));
    std::string reply;
    if (!boot->recv(&reply)) return 2;
    std::istringstream in(reply);
    std::string info_hex;
    in >> info_hex;
    const std::string name = "peer-" + std::to_string(i);
    Status st = engine.addPeer(name, fromHex(info_hex).value_or(""));
    if (st.isOk()) st = engine.connect(name);
    if (!st.isOk()) {
      std::fprintf(stderr, "tcpx_bench: connecting %s: %s\n", name.c_str(), st.toString().c_str());
      return 2;
    }
    boots.push_back(std::move(boot));
  }
  std::this_thread::sleep_for(std::chrono::seconds(1));  // let set-up traffic settle
  const Holdings after = holdings();
  const double peers = std::max(1, opts.idle_peers);
  std::printf(
      "engine with %d connected peers: %zu threads (%zu before any peer), %zu file descriptors "
      "(%.1f per peer), resident memory +%.1f MiB (%.0f KiB per peer)\n",
      opts.idle_peers, after.threads, before.threads, after.fds,
      static_cast<double>(after.fds - before.fds) / peers,
      (after.rss_kib - before.rss_kib) / 1024.0,
      static_cast<double>(after.rss_kib - before.rss_kib) / peers);
  const double cpu0 = tools::processCpuSeconds();
  const auto wall0 = std::chrono::steady_clock::now();
  std::this_thread::sleep_for(std::chrono::duration<double>(opts.idle_seconds));
  const double cpu = tools::processCpuSeconds() - cpu0;
  const double wall =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - wall0).count();
  std::printf(
      "idle engine with %d connected peers: %.3f%% of one core over %.1f s "
      "(%.1f ms of CPU, all engine threads)\n",
      opts.idle_peers, 100.0 * cpu / wall, wall, cpu * 1000);
  for (auto& boot : boots) {
    std::string reply;
    boot->send("END E0");
    boot->recv(&reply);
    boot->send("BYE");
  }
  for (pid_t child : children) waitpid(child, nullptr, 0);
  return 0;
}

}  // namespace tcpx::bench
