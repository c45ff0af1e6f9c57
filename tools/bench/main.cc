// tcpx_bench: transfer benchmark with an in-run raw TCP baseline. See bench.h for the roles.
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <sstream>
#include <sys/wait.h>
#include <thread>

#include "bench.h"
#include "common/random.h"
#include "common/strings.h"

namespace tcpx::bench {

bool Bootstrap::send(const std::string& message) {
  const uint32_t len = static_cast<uint32_t>(message.size());
  return net::writeAll(fd_.get(), &len, sizeof(len)).isOk() &&
         net::writeAll(fd_.get(), message.data(), message.size()).isOk();
}

bool Bootstrap::recv(std::string* message) {
  uint32_t len = 0;
  if (!net::readAll(fd_.get(), &len, sizeof(len)).isOk() || len > (64u << 20)) return false;
  message->resize(len);
  return net::readAll(fd_.get(), message->data(), len).isOk();
}

std::vector<std::pair<uint64_t, uint64_t>> sweepPoints(const Options& opts) {
  if (!opts.points.empty()) return opts.points;
  std::vector<std::pair<uint64_t, uint64_t>> out;
  for (uint64_t batch : opts.batches) {
    for (uint64_t block = opts.min_block; block <= opts.max_block && block != 0; block *= 2) {
      if (block * batch * static_cast<uint64_t>(opts.inflight) <= opts.max_buffer) {
        out.emplace_back(block, batch);
      }
    }
  }
  return out;
}

uint64_t largestTransfer(const Options& opts) {
  // Every transfer in flight has its own slice.
  uint64_t largest = 4096;
  for (const auto& [block, batch] : sweepPoints(opts)) largest = std::max(largest, block * batch);
  return largest * static_cast<uint64_t>(opts.inflight);
}

// nixlbench's "large block": fewer iterations above this size (--large_blk_iter_ftr).
constexpr uint64_t kLargeBlock = 1ULL << 20;

int itersFor(const Options& opts, uint64_t block, uint64_t bytes) {
  if (opts.iters > 0) {
    return block > kLargeBlock ? std::max(1, opts.iters / opts.large_block_iter_factor)
                               : opts.iters;
  }
  // About 1 GiB per round, between 20 and 2000 iterations.
  const uint64_t n = (1ULL << 30) / std::max<uint64_t>(bytes, 1);
  return static_cast<int>(std::clamp<uint64_t>(n, 20, 2000));
}

int warmupFor(const Options& opts, uint64_t block, int iters) {
  if (opts.warmup >= 0) {
    return block > kLargeBlock ? opts.warmup / opts.large_block_iter_factor : opts.warmup;
  }
  return std::max(2, iters / 10);
}

std::string joinParams(const std::vector<std::pair<std::string, std::string>>& params) {
  if (params.empty()) return "-";
  std::string out;
  for (const auto& [k, v] : params) {
    if (!out.empty()) out += ',';
    out += k;
    out += '=';
    out += v;
  }
  return out;
}

std::vector<std::pair<std::string, std::string>> splitParams(const std::string& text) {
  std::vector<std::pair<std::string, std::string>> out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    const size_t eq = item.find('=');
    if (eq != std::string::npos) out.emplace_back(item.substr(0, eq), item.substr(eq + 1));
  }
  return out;
}

uint64_t paramSize(const std::vector<std::pair<std::string, std::string>>& params,
                   const std::string& key) {
  Config config = Config::fromEnvironment();
  for (const auto& [k, v] : params) (void)config.set(k, v);
  return parseSize(config.get(key).value(), 0, UINT64_MAX).value_or(0);
}

int socketCount(const std::vector<std::pair<std::string, std::string>>& params) {
  return static_cast<int>(paramSize(params, "channels") * paramSize(params, "sockets_per_channel"));
}

void progress(const Options& opts, const char* fmt, ...) {
  if (opts.quiet) return;
  va_list args;
  va_start(args, fmt);
  std::fprintf(stderr, "[tcpx_bench] ");
  std::vfprintf(stderr, fmt, args);
  std::fprintf(stderr, "\n");
  va_end(args);
}

namespace {

// Accepts sizes like 4K, 64M, 1G.
CLI::Validator sizeValidator() {
  return CLI::Validator(
      [](std::string& s) -> std::string {
        return parseSize(s, 1, UINT64_MAX) ? "" : "not a size (e.g. 4K, 64M): " + s;
      },
      "SIZE");
}

uint64_t size(const std::string& s) {
  return *parseSize(s, 1, UINT64_MAX);
}

// Starts a target child of this very program and returns its bootstrap port.
int startLoopbackTargetImpl(const Options& opts, pid_t* child) {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) return -1;
  std::vector<std::string> args{"/proc/self/exe",      "--role", "target", "--host",
                                "127.0.0.1",           "--port", "0",      "--report-fd",
                                std::to_string(fds[1])};
  if (opts.quiet) args.emplace_back("--quiet");
  if (opts.initiators > 1) {
    args.emplace_back("--initiators");
    args.push_back(std::to_string(opts.initiators));
  }
  std::vector<char*> argv;
  argv.reserve(args.size() + 1);
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  *child = fork();
  if (*child == 0) {
    ::close(fds[0]);
    fcntl(fds[1], F_SETFD, 0);
    execv(argv[0], argv.data());
    _exit(127);
  }
  ::close(fds[1]);
  uint16_t port = 0;
  const ssize_t n = ::read(fds[0], &port, sizeof(port));  // a pipe: not a socket
  ::close(fds[0]);
  return n == sizeof(port) ? port : -1;
}

}  // namespace

int startLoopbackTarget(const Options& opts, pid_t* child) {
  return startLoopbackTargetImpl(opts, child);
}

std::unique_ptr<Bootstrap> connectBootstrap(const std::string& host, uint16_t port) {
  auto addr = net::resolve(host, port);
  if (!addr.isOk()) {
    std::fprintf(stderr, "tcpx_bench: %s\n", addr.status().toString().c_str());
    return nullptr;
  }
  for (int attempt = 0; attempt < 100; ++attempt) {
    net::Fd fd(::socket(addr->family(), SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (::connect(fd.get(), addr->raw(), addr->len) == 0) {
      (void)net::setNoDelay(fd.get());
      return std::make_unique<Bootstrap>(std::move(fd));
    }
    usleep(100000);
  }
  std::fprintf(stderr, "tcpx_bench: cannot reach the target at %s\n", addr->toString().c_str());
  return nullptr;
}

namespace {

// Serves one bootstrap connection until BYE: 0, or 1 when a session failed.
int serveConnection(const Options& opts, Bootstrap& boot, SharedTargetEngines* shared, int conn) {
  // Sessions by key: "R" for raw, the initiator's choice for engine sessions.
  std::map<std::string, std::unique_ptr<TargetSide>> sides;
  std::string message;
  while (boot.recv(&message)) {
    std::istringstream in(message);
    std::string verb, key;
    in >> verb;
    bool ok = true;
    if (verb == "BYE") return 0;
    if (verb == "RAW") {
      sides["R"] = serveRaw(opts, boot, in);
      ok = sides["R"] != nullptr;
    } else {
      in >> key;
      if (verb == "ENGINE") {
        sides[key] = serveEngine(opts, boot, in, key, shared, conn);
        ok = sides[key] != nullptr;
      } else if (verb == "NIXL") {
        sides[key] = serveNixl(opts, boot, in);
        ok = sides[key] != nullptr;
      } else if (verb == "END") {
        sides.erase(key);
        boot.send("ENDED");
      } else {
        auto it = sides.find(key);
        ok = it != sides.end() && it->second->handle(verb, in, boot);
      }
    }
    if (!ok) {
      std::fprintf(stderr, "tcpx_bench target: failed while serving '%s'\n", message.c_str());
      return 1;
    }
  }
  return 0;
}

}  // namespace

int runTarget(const Options& opts) {
  auto addr = net::resolve(opts.host, opts.port);
  if (!addr.isOk()) {
    std::fprintf(stderr, "tcpx_bench: %s\n", addr.status().toString().c_str());
    return 2;
  }
  auto listener = net::listenTcp(&addr.value(), std::max(4, opts.initiators));
  if (!listener.isOk()) {
    std::fprintf(stderr, "tcpx_bench: %s\n", listener.status().toString().c_str());
    return 2;
  }
  if (opts.report_fd >= 0) {
    const uint16_t port = addr->port();
    if (::write(opts.report_fd, &port, sizeof(port)) != sizeof(port)) return 2;
    ::close(opts.report_fd);
  } else {
    progress(opts, "target waiting on %s", addr->toString().c_str());
  }
  // One bootstrap connection per initiator, each served on a thread of its own; their engine
  // sessions share one engine per key (--initiators).
  std::vector<std::unique_ptr<Bootstrap>> boots;
  for (int i = 0; i < opts.initiators; ++i) {
    const int fd = ::accept(listener->get(), nullptr, nullptr);
    if (fd < 0) return 2;
    boots.push_back(std::make_unique<Bootstrap>(net::Fd(fd)));
  }
  SharedTargetEngines shared;
  SharedTargetEngines* share = opts.initiators > 1 ? &shared : nullptr;
  std::vector<int> results(boots.size(), 0);
  std::vector<std::thread> threads;
  for (size_t i = 1; i < boots.size(); ++i) {
    threads.emplace_back(
        [&, i] { results[i] = serveConnection(opts, *boots[i], share, static_cast<int>(i)); });
  }
  results[0] = serveConnection(opts, *boots[0], share, 0);
  for (auto& t : threads) t.join();
  return *std::max_element(results.begin(), results.end());
}

int runInitiator(const Options& opts, const std::vector<uint16_t>& ports) {
  std::vector<std::unique_ptr<Bootstrap>> owned;
  std::vector<Bootstrap*> boots;  // one per target process (--peers) or initiator (--initiators)
  for (uint16_t port : ports) {
    owned.push_back(connectBootstrap(opts.host, port));
    if (!owned.back()) return 2;
    boots.push_back(owned.back().get());
  }
  Bootstrap* boot = boots.front();  // the sessions that serve one target use the first
  const uint64_t buffer_size = largestTransfer(opts);
  std::vector<std::unique_ptr<Session>> sessions;
  std::vector<std::string> session_mems;  // initiator:target memory of each session
  for (const std::string& mode : opts.modes) {
    if (mode == "engine") {
      for (const std::string& transport : opts.transports) {
        for (const std::string& mem : opts.mems) {
          sessions.push_back(openEngineSession(opts, boots, buffer_size, mem,
                                               "E" + std::to_string(sessions.size()), transport));
          session_mems.push_back(mem);
          if (!sessions.back()) return 2;
        }
      }
    } else if (mode == "local" || mode == "copy") {
      for (const std::string& mem : opts.mems) {
        sessions.push_back(mode == "local" ? openLocalSession(opts, buffer_size, mem)
                                           : openCopySession(opts, buffer_size, mem));
        session_mems.push_back(mem);
        if (!sessions.back()) return 2;
      }
    } else if (mode == "nixl") {
      for (const std::string& backend : opts.nixl_backends) {
        for (const std::string& mem : opts.mems) {
          sessions.push_back(openNixlSession(opts, *boot, buffer_size, mem,
                                             "N" + std::to_string(sessions.size()), backend));
          session_mems.push_back(mem);
          if (!sessions.back()) return 2;
        }
      }
    } else {
      sessions.push_back(openRawSession(opts, boots, buffer_size));
      session_mems.emplace_back("dram:dram");
      if (!sessions.back()) return 2;
    }
  }
  std::vector<std::vector<PointResult>> results(sessions.size());

  const auto points = sweepPoints(opts);
  const size_t total = points.size() * opts.ops.size();
  size_t index = 0;
  bool failed = false;
  for (const std::string& op_name : opts.ops) {
    const bool is_write = op_name == "write";
    for (const auto& [block, batch] : points) {
      ++index;
      const uint64_t bytes = block * batch;
      const int iters = itersFor(opts, block, bytes);
      const int warmup = warmupFor(opts, block, iters);
      progress(opts, "[%zu/%zu] %s %s x %llu: %d rounds of %d iterations per mode", index, total,
               is_write ? "WRITE" : "READ", formatBytes(block).c_str(),
               static_cast<unsigned long long>(batch), opts.rounds, iters);
      // Rounds alternate between the modes; each round starts from freshly filled buffers.
      std::vector<std::vector<Round>> rounds(sessions.size());
      std::vector<std::string> errors(sessions.size());
      for (int r = 0; r < opts.rounds; ++r) {
        for (size_t m = 0; m < sessions.size(); ++m) {
          if (!errors[m].empty()) continue;
          Session& session = *sessions[m];
          Round round;
          const uint64_t seed = tools::randomSeed();
          if (!session.preparePoint(is_write, block, batch, seed, warmup + iters, &errors[m]) ||
              !session.runRound(warmup, iters, &round, &errors[m])) {
            std::fprintf(stderr, "tcpx_bench: %s %s %s x %llu failed: %s\n", session.mode().c_str(),
                         is_write ? "WRITE" : "READ", formatBytes(block).c_str(),
                         static_cast<unsigned long long>(batch), errors[m].c_str());
            continue;
          }
          if (opts.verify) round.verified = session.verify();
          rounds[m].push_back(std::move(round));
        }
      }
      for (size_t m = 0; m < sessions.size(); ++m) {
        // A round of --peers moves the point's bytes to every target.
        PointResult result =
            summarize(sessions[m]->mode(), is_write, block, batch, errors[m].empty() ? iters : 0,
                      rounds[m], bytes * static_cast<uint64_t>(sessions[m]->targets()));
        result.inflight = opts.inflight;
        result.peers = sessions[m]->targets();
        const Stats prep = statsOf(sessions[m]->prepSamples());
        result.avg_prep_us = prep.avg;
        result.p99_prep_us = prep.p99;
        failed = failed || result.iters == 0 || result.verified.rfind("no", 0) == 0;
        results[m].push_back(result);
      }
    }
  }
  std::vector<std::string> modes;
  modes.reserve(sessions.size());
  for (const auto& session : sessions) modes.push_back(session->mode());
  sessions.clear();
  for (Bootstrap* b : boots) b->send("BYE");

  const std::string params = joinParams(opts.engine_params);
  const std::string rounds =
      (opts.rounds > 1 ? strfmt("; median of %d alternating rounds", opts.rounds) : "") +
      (opts.inflight > 1 ? strfmt("; %d transfers in flight", opts.inflight) : "");
  size_t raw = modes.size();
  const auto print = opts.nixlbench_columns ? printNixlbenchTable : printTable;
  for (size_t m = 0; m < modes.size(); ++m) {
    if (modes[m].rfind("raw", 0) == 0) {
      raw = m;
      print(
          results[m],
          opts.peers > 1 || opts.initiators > 1
              ? strfmt("raw TCP baseline: same bytes %s %s %s at once, %d plain sockets each",
                       opts.peers > 1 ? "to" : "from",
                       opts.active_peers > 0 && opts.active_peers < opts.peers
                           ? strfmt("%d of %d", opts.active_peers, opts.peers).c_str()
                           : std::to_string(std::max(opts.peers, opts.initiators)).c_str(),
                       opts.peers > 1 ? "targets" : "initiators", socketCount(opts.engine_params)) +
                    rounds
              : strfmt("raw TCP baseline: same bytes over %d plain sockets",
                       socketCount(opts.engine_params)) +
                    rounds);
    } else {
      print(results[m], "tcpx_p2p " + modes[m] + " (" +
                            std::string(params == "-" ? "defaults" : params) + ")" + rounds);
    }
  }
  // What each session is compared with: the raw sockets when they ran; otherwise the first
  // earlier session of the same memory (the engine for NIXL sessions and later transports),
  // else the first session. Local sessions are measured against the copy session of their memory,
  // and so are engine sessions without raw sockets (direct copies between two processes).
  auto baselineOf = [&](size_t m) -> size_t {
    // A transfer to the engine itself against the plain copy of the same memory; the copy is
    // only a baseline.
    if (modes[m].rfind("copy", 0) == 0) return m;
    if (modes[m].rfind("local", 0) == 0 ||
        (raw >= modes.size() && modes[m].rfind("engine", 0) == 0)) {
      for (size_t b = 0; b < modes.size(); ++b) {
        if (modes[b].rfind("copy", 0) == 0 && session_mems[b] == session_mems[m]) return b;
      }
    }
    if (raw < modes.size()) return raw;
    for (size_t b = 0; b < m; ++b) {
      if (session_mems[b] == session_mems[m]) return b;
    }
    return 0;
  };
  for (size_t m = 0; m < modes.size(); ++m) {
    const size_t baseline = baselineOf(m);
    if (m == baseline) continue;
    std::printf("\n%s vs %s, same run\n", modes[m].c_str(), modes[baseline].c_str());
    printComparison(results[m], results[baseline]);
  }
  // NIXL backends against each other: the first NIXL session of each memory (TCPX) against the
  // later ones of the same memory.
  for (size_t m = 0; m < modes.size(); ++m) {
    if (modes[m].rfind("nixl", 0) != 0) continue;
    for (size_t first = 0; first < m; ++first) {
      if (modes[first].rfind("nixl", 0) != 0 || session_mems[first] != session_mems[m]) continue;
      if (baselineOf(m) != first) {
        std::printf("\n%s vs %s, same run\n", modes[first].c_str(), modes[m].c_str());
        printComparison(results[first], results[m]);
      }
      break;
    }
  }
  std::vector<PointResult> all;
  for (const auto& r : results) all.insert(all.end(), r.begin(), r.end());
  if (!opts.json.empty()) writeJson(opts.json, all);
  if (failed) {
    std::fprintf(stderr,
                 "tcpx_bench: A POINT FAILED OR ITS DATA DID NOT VERIFY (see the tables)\n");
    return 1;
  }
  return 0;
}

}  // namespace tcpx::bench

namespace {

// nixlbench's own flags, names and defaults, so that a nixlbench command line runs unchanged
// under tcpx_nixl_bench (it then runs the NIXL mode alone and prints nixlbench's columns).
struct NixlbenchFlags {
  std::string backend = "UCX";
  std::string initiator_seg_type = "DRAM";
  std::string target_seg_type = "DRAM";
  std::string op_type = "WRITE";
  uint64_t start_block_size = 4096;
  uint64_t max_block_size = 64ULL << 20;
  uint64_t start_batch_size = 1;
  uint64_t max_batch_size = 1;
  int num_iter = 1000;
  int warmup_iter = 100;
  int large_blk_iter_ftr = 16;
  bool check_consistency = false;
  int num_threads = 1;
  uint64_t total_buffer_size = 8ULL << 30;
  // Accepted; what they select is the only thing this tool does (or not needed here).
  std::string worker_type = "nixl";
  std::string scheme = "pairwise";
  int num_initiator_dev = 1;
  int num_target_dev = 1;
  std::string runtime_type = "ETCD";
  std::string etcd_endpoints;
  std::string benchmark_group = "default";
  std::string device_list = "all";
  bool enable_pt = false;
  std::vector<CLI::Option*> given;  // every option of the group, to see whether one was used

  void add(CLI::App& app) {
    const char* group = "nixlbench's flags (any of them: the NIXL mode alone, nixlbench's columns)";
    auto opt = [&](CLI::Option* o) { given.push_back(o->group(group)); };
    opt(app.add_option("--backend", backend, "NIXL backend (default UCX)"));
    opt(app.add_option("--initiator_seg_type", initiator_seg_type, "DRAM or VRAM")
            ->check(CLI::IsMember({"DRAM", "VRAM"})));
    opt(app.add_option("--target_seg_type", target_seg_type, "DRAM or VRAM")
            ->check(CLI::IsMember({"DRAM", "VRAM"})));
    opt(app.add_option("--op_type", op_type, "READ or WRITE (default WRITE)")
            ->check(CLI::IsMember({"READ", "WRITE"})));
    opt(app.add_option("--start_block_size", start_block_size, "default 4096"));
    opt(app.add_option("--max_block_size", max_block_size, "default 64 MiB"));
    opt(app.add_option("--start_batch_size", start_batch_size, "default 1"));
    opt(app.add_option("--max_batch_size", max_batch_size, "default 1 (batches double)"));
    opt(app.add_option("--num_iter", num_iter, "default 1000"));
    opt(app.add_option("--warmup_iter", warmup_iter, "default 100"));
    opt(app.add_option("--large_blk_iter_ftr", large_blk_iter_ftr,
                       "iterations divided by this for blocks over 1 MiB (default 16)")
            ->check(CLI::PositiveNumber));
    opt(app.add_flag("--check_consistency", check_consistency, "verify every byte"));
    opt(app.add_option("--num_threads", num_threads, "1 (the only value supported)"));
    opt(app.add_option("--total_buffer_size", total_buffer_size, "default 8 GiB"));
    opt(app.add_option("--worker_type", worker_type, "nixl"));
    opt(app.add_option("--scheme", scheme, "pairwise"));
    opt(app.add_option("--num_initiator_dev", num_initiator_dev, "1"));
    opt(app.add_option("--num_target_dev", num_target_dev, "1"));
    opt(app.add_option("--runtime_type", runtime_type, "ignored: peers meet over --host/--port"));
    opt(app.add_option("--etcd_endpoints", etcd_endpoints, "ignored (see --runtime_type)"));
    opt(app.add_option("--benchmark_group", benchmark_group, "ignored"));
    opt(app.add_option("--device_list", device_list,
                       "ignored: the TCPX backend picks NICs itself (net_device tunable)"));
    opt(app.add_flag("--enable_pt", enable_pt, "ignored: the engine has its own progress thread"));
  }

  [[nodiscard]] bool used() const {
    return std::any_of(given.begin(), given.end(), [](CLI::Option* o) { return o->count() > 0; });
  }

  // Applies the flags to `opts`; an error message for what this tool cannot do.
  std::string apply(tcpx::bench::Options* opts) const {
    if (num_threads != 1) return "--num_threads must be 1 (one posting thread)";
    if (worker_type != "nixl") return "--worker_type must be nixl";
    if (scheme != "pairwise") return "--scheme must be pairwise (one initiator, one target)";
    if (num_initiator_dev != 1 || num_target_dev != 1) return "one device per process";
    if (start_block_size == 0 || start_block_size > max_block_size) return "bad block sizes";
    if (start_batch_size == 0 || start_batch_size > max_batch_size) return "bad batch sizes";
    auto lower = [](std::string s) {
      for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      return s;
    };
    opts->modes = {"nixl"};
    opts->nixl_backends = {backend};
    opts->nixlbench_columns = true;
    opts->mems = {lower(initiator_seg_type) + ":" + lower(target_seg_type)};
    opts->ops = {lower(op_type)};
    opts->min_block = start_block_size;
    opts->max_block = max_block_size;
    opts->batches.clear();
    for (uint64_t b = start_batch_size; b <= max_batch_size; b *= 2) opts->batches.push_back(b);
    opts->iters = num_iter;
    opts->warmup = warmup_iter;
    opts->large_block_iter_factor = large_blk_iter_ftr;
    opts->verify = check_consistency;
    opts->max_buffer = total_buffer_size;
    return {};
  }
};

int benchMain(int argc, char** argv) {
  using namespace tcpx::bench;
  signal(SIGPIPE, SIG_IGN);
  Options opts;
  std::string min_block = "4K", max_block = "64M", max_buffer = "1G";
  std::vector<std::string> points, batches, params;
  std::string channels, sockets, chunk, send_window, recv_window;
  bool no_verify = false;

  CLI::App app{"tcpx_bench: READ/WRITE benchmark of the tcpx_p2p engine, with a raw TCP baseline"};
  app.add_option("--role", opts.role,
                 "loopback (default: starts its own target), target or initiator")
      ->check(CLI::IsMember({"loopback", "target", "initiator"}));
  app.add_option("--host", opts.host, "target: bootstrap bind address; initiator: target address");
  app.add_option("--port", opts.port, "bootstrap TCP port (target: 0 = any)");
  app.add_option("--report-fd", opts.report_fd)->group("");
  app.add_option("--transports", opts.transports,
                 "engine transports to compare in one run (socket, emulator, tcpx); each gets "
                 "its own engine sessions, alternating rounds with the others (default: the "
                 "configured transport)")
      ->check(CLI::IsMember({"socket", "emulator", "tcpx"}))
      ->delimiter(',');
  // --mode takes this tool's modes and nixlbench's SG (one GPU per process, all this tool does).
  std::vector<std::string> modes;
  app.add_option("--mode", modes,
                 "engine, raw, nixl (tcpx_nixl_bench: through the NIXL agent API), local (an "
                 "engine's transfers to itself, in this process), copy (the same bytes copied by "
                 "one thread: the local mode's baseline), comma-separated (default engine,raw); "
                 "nixlbench's SG is accepted")
      ->check(CLI::IsMember({"engine", "raw", "nixl", "local", "copy", "SG"}))
      ->delimiter(',');
  app.add_option("--nixl-backends", opts.nixl_backends,
                 "NIXL backends of the nixl mode, comma-separated (default TCPX; e.g. TCPX,UCX)")
      ->delimiter(',');
  app.add_flag("--nixlbench-columns", opts.nixlbench_columns,
               "print the tables in nixlbench's columns (Avg Lat. per descriptor, Tx = post to "
               "completion)");
  app.add_option("--mem", opts.mems,
                 "engine sessions' memory, initiator:target, comma-separated: dram:dram (default), "
                 "vram:vram, dram:vram, vram:dram; vmm:vmm is GPU memory of the CUDA VMM API "
                 "(cuMemCreate with a file-descriptor handle type)")
      ->check(CLI::IsMember({"dram:dram", "vram:vram", "dram:vram", "vram:dram", "vmm:vmm"}))
      ->delimiter(',');
  app.add_option("--device", opts.device, "the initiator's GPU for vram (default 0)");
  app.add_option("--target-device", opts.target_device, "the target's GPU for vram (default 0)");
  app.add_option("--op", opts.ops, "write, read, or both (default both)")
      ->check(CLI::IsMember({"write", "read"}))
      ->delimiter(',');
  app.add_option("--min-block", min_block, "smallest block size of the sweep")
      ->check(sizeValidator());
  app.add_option("--max-block", max_block, "largest block size of the sweep")
      ->check(sizeValidator());
  app.add_option("--batch", batches, "descriptors per transfer, comma-separated (default 1)")
      ->delimiter(',');
  app.add_option("--points", points,
                 "explicit BLOCKxBATCH points instead of a sweep, e.g. 16Kx1024,16Mx1")
      ->delimiter(',');
  app.add_option("--max-buffer", max_buffer, "skip points whose block x batch exceeds this")
      ->check(sizeValidator());
  app.add_option("--iters", opts.iters, "timed iterations per round (default: ~1 GiB, 20..2000)");
  app.add_option("--warmup", opts.warmup, "untimed iterations per round (default: iters/10)");
  app.add_flag("--no-verify", no_verify, "skip the byte-for-byte check of each point");
  app.add_option("--json", opts.json, "also write one JSON object per point to this file");
  app.add_option("--channels", channels, "engine channels per peer and direction");
  app.add_option("--sockets", sockets, "sockets per channel");
  app.add_option("--chunk", chunk, "engine chunk size");
  app.add_option("--send-window", send_window, "outstanding sends per channel");
  app.add_option("--recv-window", recv_window, "outstanding receives per channel");
  app.add_option("--set", params, "any engine tunable as key=value (repeatable)");
  app.add_option(
      "--idle-cpu", opts.idle_seconds,
      "measure the idle engine's CPU over this many seconds with --idle-peers connected peers");
  app.add_option("--idle-peers", opts.idle_peers, "peers for --idle-cpu (default 4)");
  app.add_flag("--quiet", opts.quiet, "no progress lines");
  app.add_option("--rounds", opts.rounds,
                 "rounds per point and mode, alternating between modes; bandwidth is the median "
                 "round and the comparison the median of per-round ratios (default 1)")
      ->check(CLI::Range(1, 1000));
  app.add_option("--inflight", opts.inflight,
                 "transfers kept in flight at once, each on its own slice of the buffers and "
                 "reposted as it completes (engine and raw modes; raw runs as many concurrent "
                 "streams over the same sockets); default 1")
      ->check(CLI::Range(1, 1024));
  app.add_option("--peers", opts.peers,
                 "target processes (loopback): every round moves each point to all of them at "
                 "once, from one engine with a peer each (engine mode) or from a set of raw "
                 "sockets each (raw mode); bandwidth is the aggregate; default 1")
      ->check(CLI::Range(1, 256));
  app.add_option("--active-peers", opts.active_peers,
                 "with --peers: every round moves each point to only the first N targets, the "
                 "others staying connected and idle (a decode worker among many prefill "
                 "workers); default all")
      ->check(CLI::Range(1, 256));
  app.add_option("--initiators", opts.initiators,
                 "initiators (loopback): as many engines, or raw socket sets, in this process move "
                 "each point into one target process at once; the target's engine has a peer "
                 "each; bandwidth is the aggregate; default 1")
      ->check(CLI::Range(1, 256));
  std::string wait_mode = "poll";
  app.add_option("--wait", wait_mode,
                 "poll: spin on checkTransfer like nixlbench (default); block: waitTransfer")
      ->check(CLI::IsMember({"poll", "block"}));
  NixlbenchFlags nixlbench;
  nixlbench.add(app);
  CLI11_PARSE(app, argc, argv);

  const bool nixlbench_mode = modes == std::vector<std::string>{"SG"};
  if (!modes.empty() && !nixlbench_mode) opts.modes = modes;
  opts.verify = !no_verify;

  opts.block_wait = wait_mode == "block";
  opts.min_block = size(min_block);
  opts.max_block = size(max_block);
  opts.max_buffer = size(max_buffer);
  if (!batches.empty()) {
    opts.batches.clear();
    for (const auto& b : batches) opts.batches.push_back(std::stoull(b));
  }
  for (const auto& p : points) {
    const size_t x = p.find('x');
    if (x == std::string::npos || !tcpx::parseSize(p.substr(0, x), 1, UINT64_MAX)) {
      std::fprintf(stderr, "bad point '%s' (want BLOCKxBATCH)\n", p.c_str());
      return 2;
    }
    opts.points.emplace_back(size(p.substr(0, x)), std::stoull(p.substr(x + 1)));
  }
  auto add_param = [&](const char* key, const std::string& value) {
    if (!value.empty()) opts.engine_params.emplace_back(key, value);
  };
  // The engine mode measures the transport against raw TCP over the same sockets: between two
  // processes of this host, host memory would otherwise take direct copies (same_host_copy),
  // which --set same_host_copy=auto (or the environment) measures instead.
  if (std::getenv("TCPX_P2P_SAME_HOST_COPY") == nullptr) {  // NOLINT(concurrency-mt-unsafe)
    opts.engine_params.emplace_back("same_host_copy", "off");
  }
  add_param("channels", channels);
  add_param("sockets_per_channel", sockets);
  add_param("chunk_size", chunk);
  add_param("send_window", send_window);
  add_param("recv_window", recv_window);
  for (const auto& kv : params) {
    const size_t eq = kv.find('=');
    if (eq == std::string::npos) {
      std::fprintf(stderr, "bad --set '%s' (want key=value)\n", kv.c_str());
      return 2;
    }
    opts.engine_params.emplace_back(kv.substr(0, eq), kv.substr(eq + 1));
  }
  if (nixlbench_mode || nixlbench.used()) {
    const std::string error = nixlbench.apply(&opts);
    if (!error.empty()) {
      std::fprintf(stderr, "tcpx_bench: %s\n", error.c_str());
      return 2;
    }
  }
  // Fail fast on a bad engine option rather than in the middle of a run.
  auto config = tcpx::Config::make(opts.engine_params);
  if (!config.isOk()) {
    std::fprintf(stderr, "tcpx_bench: %s\n", config.status().toString().c_str());
    return 2;
  }

  if (std::find(opts.modes.begin(), opts.modes.end(), "nixl") != opts.modes.end() && !haveNixl()) {
    std::fprintf(stderr,
                 "tcpx_bench: --mode nixl needs tcpx_nixl_bench (built when the project is "
                 "configured with TCPX_P2P_NIXL_PREFIX)\n");
    return 2;
  }
  if (opts.inflight > 1) {
    for (const std::string& mode : opts.modes) {
      if (mode != "engine" && mode != "raw") {
        std::fprintf(stderr, "tcpx_bench: --inflight applies to the engine and raw modes, not %s\n",
                     mode.c_str());
        return 2;
      }
    }
    if (opts.block_wait) {
      std::fprintf(stderr, "tcpx_bench: --inflight polls its transfers; use --wait poll\n");
      return 2;
    }
  }
  if (opts.active_peers > opts.peers) {
    std::fprintf(stderr, "tcpx_bench: --active-peers %d needs --peers %d or more\n",
                 opts.active_peers, opts.active_peers);
    return 2;
  }
  if (opts.peers > 1 && opts.initiators > 1) {
    std::fprintf(stderr, "tcpx_bench: --peers and --initiators do not combine\n");
    return 2;
  }
  if (opts.peers > 1 || (opts.initiators > 1 && opts.role != "target")) {
    if (opts.role != "loopback") {
      std::fprintf(stderr,
                   "tcpx_bench: --peers and --initiators start their processes: loopback only\n");
      return 2;
    }
    for (const std::string& mode : opts.modes) {
      if (mode != "engine" && mode != "raw") {
        std::fprintf(stderr,
                     "tcpx_bench: --peers and --initiators apply to the engine and raw modes, "
                     "not %s\n",
                     mode.c_str());
        return 2;
      }
    }
  }
  if (opts.idle_seconds > 0) return runIdleCpu(opts);
  if (opts.role == "target") return runTarget(opts);
  if (opts.role == "initiator") return runInitiator(opts, {opts.port});

  std::vector<pid_t> children;
  std::vector<uint16_t> ports;
  if (opts.initiators > 1) {
    pid_t child = -1;
    const int port = startLoopbackTarget(opts, &child);
    if (port <= 0) {
      std::fprintf(stderr, "tcpx_bench: could not start the loopback target\n");
      return 2;
    }
    children.push_back(child);
    ports.assign(static_cast<size_t>(opts.initiators), static_cast<uint16_t>(port));
  }
  for (int i = 0; i < opts.peers && opts.initiators == 1; ++i) {
    pid_t child = -1;
    const int port = startLoopbackTarget(opts, &child);
    if (port <= 0) {
      std::fprintf(stderr, "tcpx_bench: could not start the loopback target\n");
      for (pid_t started : children) kill(started, SIGKILL);
      return 2;
    }
    children.push_back(child);
    ports.push_back(static_cast<uint16_t>(port));
  }
  opts.port = ports.front();
  const int rc = runInitiator(opts, ports);
  bool targets_ok = true;
  for (pid_t child : children) {
    int status = 0;
    waitpid(child, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      std::fprintf(stderr, "tcpx_bench: a target process failed (status %d)\n", status);
      targets_ok = false;
    }
  }
  return rc == 0 && !targets_ok ? 1 : rc;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return benchMain(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tcpx_bench: %s\n", e.what());
    return 2;
  }
}
