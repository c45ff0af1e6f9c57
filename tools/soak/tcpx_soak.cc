// tcpx_soak: mixed READ / WRITE / notification traffic between N processes for a given time,
// every byte verified, with resource counts at start and end.
//
// Each process registers one region laid out as
//   [source: S bytes of a fixed pattern][inbox: an S-byte slot per writer][read scratch: a slot
//   per peer][write source: a slot per peer]
// Peers READ random ranges of a process's source and check them against the pattern; a process
// WRITEs random ranges (as 1..64 descriptors) into its own slot of a peer's inbox, one WRITE per
// peer at a time, with a notification naming the writer, and checks the range by reading it back
// once the WRITE completed. Standalone notifications go in between; every notification must
// name its sender.
// With --mem vram (or mixed: even ranks in GPU memory, odd ranks in host memory) the regions live
// in GPU memory, and each process writes them as an application would between transfers: WRITE
// sources by a synchronous cudaMemcpy from pageable memory, and every READ destination is cleared
// by a cudaMemsetAsync on the default stream just before the READ is posted, without waiting for
// it. The engine must order its copies after both.
// The parent forks the workers (before any thread exists), passes connection info and
// descriptors between them over pipes, and collects one result line per worker. It fails when
// any worker saw an error or a mismatch, or when a worker's open file descriptors or resident
// memory grew between the first and the last minute.
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <deque>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <sys/wait.h>
#include <thread>
#include <vector>

#include <tcpx_p2p/engine.h>

#include "common/line_pipe.h"
#include "common/pattern_memory.h"
#include "common/random.h"
#include "common/strings.h"

namespace {

using Clock = std::chrono::steady_clock;
using tcpx::Engine;
using tcpx::LocalDesc;
using tcpx::MemoryId;
using tcpx::OpKind;
using tcpx::RemoteDesc;
using tcpx::Status;
using tcpx::TransferHandle;
using tcpx::tools::readLine;
using tcpx::tools::writeLine;

struct Options {
  int processes = 4;
  double seconds = 120;
  uint64_t slot = 8ULL << 20;  // S
  int inflight = 4;            // READs in flight per peer
  std::string mem = "dram";    // dram, vram or mixed
  int device = 0;
  std::vector<std::pair<std::string, std::string>> params;
};

uint64_t sourceSeed(int rank) {
  return 0x50AC0000ULL + static_cast<uint64_t>(rank);
}

size_t openFds() {
  size_t n = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator("/proc/self/fd")) ++n;
  return n;
}

size_t rssBytes() {
  FILE* f = std::fopen("/proc/self/statm", "r");
  if (f == nullptr) return 0;
  unsigned long size = 0;
  unsigned long resident = 0;
  if (std::fscanf(f, "%lu %lu", &size, &resident) != 2) resident = 0;
  std::fclose(f);
  return resident * static_cast<size_t>(sysconf(_SC_PAGESIZE));
}

// Random split of [0, length) into 1..max_pieces contiguous pieces.
std::vector<std::pair<uint64_t, uint64_t>> split(uint64_t length, int max_pieces,
                                                 std::mt19937_64& rng) {
  const uint64_t pieces = std::min<uint64_t>(length, 1 + rng() % max_pieces);
  std::vector<uint64_t> cuts{0, length};
  for (uint64_t i = 1; i < pieces; ++i) cuts.push_back(1 + rng() % (length - 1));
  std::sort(cuts.begin(), cuts.end());
  cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
  std::vector<std::pair<uint64_t, uint64_t>> out;
  for (size_t i = 0; i + 1 < cuts.size(); ++i) out.emplace_back(cuts[i], cuts[i + 1] - cuts[i]);
  return out;
}

struct Stats {
  uint64_t transfers = 0;
  uint64_t bytes_verified = 0;
  uint64_t notifications = 0;
  uint64_t errors = 0;
  size_t fds_start = 0;
  size_t fds_end = 0;
  size_t rss_start = 0;
  size_t rss_end = 0;
  std::string first_error;
  void error(const std::string& what) {
    if (errors++ == 0) first_error = what;
  }
};

int worker(const Options& opts, int rank, int in_fd, int out_fd) {
  const int n = opts.processes;
  const uint64_t s = opts.slot;
  const uint64_t region_size = s * static_cast<uint64_t>(3 * n + 1);
  // [source][inbox: a slot per writer][read scratch: a slot per peer][write source: per peer]
  const uint64_t inbox = s;
  const uint64_t scratch = s * static_cast<uint64_t>(n + 1);
  const uint64_t outbox = s * static_cast<uint64_t>(2 * n + 1);
  auto params = opts.params;
  params.insert(params.begin(), {"name", "soak-" + std::to_string(rank)});
  params.insert(params.begin(), {"listen_host", "127.0.0.1"});
  auto config = tcpx::Config::make(params);
  if (!config.isOk()) return 2;
  auto created = Engine::create(config.value());
  if (!created.isOk()) {
    std::fprintf(stderr, "soak %d: %s\n", rank, created.status().toString().c_str());
    return 2;
  }
  Engine& engine = *created.value();
  const bool on_gpu = opts.mem == "vram" || (opts.mem == "mixed" && rank % 2 == 0);
  std::unique_ptr<tcpx::tools::PatternMemory> memory =
      on_gpu ? tcpx::tools::makeGpuMemory(region_size, opts.device, 0)
             : tcpx::tools::makeHostMemory(region_size, 0);
  if (!memory) {
    std::fprintf(stderr, "soak %d: no GPU memory on device %d: %s\n", rank, opts.device,
                 tcpx::tools::gpuUnavailableReason().c_str());
    return 2;
  }
  memory->fill(0, s, sourceSeed(rank));
  auto mem = engine.registerMemory(memory->data(), region_size, memory->kind(), memory->device());
  if (!mem.isOk()) {
    std::fprintf(stderr, "soak %d: %s\n", rank, mem.status().toString().c_str());
    return 2;
  }
  writeLine(out_fd, tcpx::toHex(engine.connectionInfo()) + " " +
                        tcpx::toHex(engine.memoryDescriptor(mem.value()).value()));

  // Everyone's info from the parent: "<rank> <info> <descriptor>" per line, then "GO".
  std::map<int, tcpx::RemoteMemory> remotes;
  std::string line;
  std::vector<std::pair<int, std::string>> infos;
  while (readLine(in_fd, &line) && line != "GO") {
    std::istringstream in(line);
    int r = 0;
    std::string info;
    std::string desc;
    in >> r >> info >> desc;
    if (r == rank) continue;
    infos.emplace_back(r, tcpx::fromHex(info).value_or(""));
    if (!engine.addPeer("soak-" + std::to_string(r), infos.back().second).isOk()) return 2;
    auto remote = engine.loadRemoteMemory(tcpx::fromHex(desc).value_or(""));
    if (!remote.isOk()) return 2;
    remotes[r] = remote.value();
  }
  for (const auto& [r, info] : infos) {
    // Connect in one direction per pair; the other side finds the connection.
    if (r > rank && !engine.connect("soak-" + std::to_string(r)).isOk()) return 2;
  }

  Stats stats;
  std::mt19937_64 rng(tcpx::tools::randomSeed());
  // A WRITE is checked by reading the written range back once it completed (completion means
  // the bytes are in place); the peer checks that its notification names its own slot.
  enum class Kind { kRead, kWrite, kReadBack };
  struct Pending {
    TransferHandle handle;
    int peer;
    Kind kind;
    uint64_t offset;  // read: in the peer's source; write/read-back: in our slot of its inbox
    uint64_t length;
    uint64_t seed;          // write/read-back: pattern written
    int scratch_slot = -1;  // read: which part of our scratch slot for that peer
  };
  std::deque<Pending> pending;
  std::map<int, bool> write_busy;        // a WRITE or its read-back in flight to that peer
  std::map<int, uint32_t> scratch_free;  // peer -> free read scratch parts (bits)
  const uint64_t part = s / static_cast<uint64_t>(opts.inflight + 1);
  for (const auto& [peer, remote] : remotes) scratch_free[peer] = (1U << opts.inflight) - 1;
  uint64_t write_counter = 0;
  const auto start = Clock::now();
  const auto end = start + std::chrono::duration_cast<Clock::duration>(
                               std::chrono::duration<double>(opts.seconds));
  bool measured_start = false;
  // The reference for growth is taken once the first minute (or half of a shorter run) is over:
  // by then every pool, channel and staging buffer the traffic needs exists, also the pinned
  // staging slots and copy descriptors of GPU memory that only bursts of transfers reach.
  const auto reference_at =
      start + std::chrono::duration_cast<Clock::duration>(
                  std::chrono::duration<double>(std::min(60.0, opts.seconds / 2)));

  auto post = [&](OpKind op, int peer, const std::vector<LocalDesc>& local,
                  const std::vector<RemoteDesc>& remote_descs,
                  std::optional<std::string> note) -> std::optional<TransferHandle> {
    auto h = engine.prepareTransfer(op, "soak-" + std::to_string(peer), local, remote_descs,
                                    std::move(note));
    if (!h.isOk() || !engine.postTransfer(h.value()).isOk()) {
      stats.error("posting a transfer failed");
      if (h.isOk()) (void)engine.releaseTransfer(h.value());
      return std::nullopt;
    }
    return h.value();
  };
  // Descriptors for [0, len) at `local_at` here and `remote_at` there, cut the same random way.
  auto descs = [&](uint64_t len, uint64_t local_at, MemoryId remote_mem, uint64_t remote_at,
                   std::vector<LocalDesc>* local, std::vector<RemoteDesc>* remote_descs) {
    for (const auto& [piece_off, piece_len] : split(len, 64, rng)) {
      local->push_back({mem.value(), local_at + piece_off, piece_len});
      remote_descs->push_back({remote_mem, remote_at + piece_off, piece_len});
    }
  };

  auto check_notifications = [&] {
    for (const tcpx::Notification& note : engine.takeNotifications()) {
      ++stats.notifications;
      if (note.message == "hello") continue;
      std::istringstream in(note.message);
      char tag = 0;
      int writer = -1;
      in >> tag >> writer;
      if (tag != 'W' || note.peer != "soak-" + std::to_string(writer)) {
        stats.error("unexpected notification '" + note.message + "' from " + note.peer);
      }
    }
  };

  while (Clock::now() < end || !pending.empty()) {
    if (!measured_start && Clock::now() >= reference_at) {
      stats.fds_start = openFds();
      stats.rss_start = rssBytes();
      measured_start = true;
    }
    if (Clock::now() < end) {
      for (const auto& [peer, remote] : remotes) {
        const auto peer_index = static_cast<uint64_t>(peer);
        uint32_t& free = scratch_free[peer];
        if (free != 0 && rng() % 2 == 0) {
          const int slot_part = __builtin_ctz(free);
          const uint64_t len = 1 + rng() % part;
          const uint64_t off = rng() % (s - len + 1);
          const uint64_t at = scratch + peer_index * s + static_cast<uint64_t>(slot_part) * part;
          memory->queueFill(at, len, 0);
          std::vector<LocalDesc> local;
          std::vector<RemoteDesc> remote_descs;
          descs(len, at, remote.id, off, &local, &remote_descs);
          if (auto h = post(OpKind::kRead, peer, local, remote_descs, std::nullopt)) {
            pending.push_back({*h, peer, Kind::kRead, off, len, 0, slot_part});
            free &= ~(1U << slot_part);
          }
        }
        if (!write_busy[peer] && rng() % 2 == 0) {
          const uint64_t len = 1 + rng() % part;
          const uint64_t off = rng() % (s - len + 1);
          const uint64_t seed = (static_cast<uint64_t>(rank) << 48) | ++write_counter;
          memory->fill(outbox + peer_index * s, len, seed);
          std::vector<LocalDesc> local;
          std::vector<RemoteDesc> remote_descs;
          descs(len, outbox + peer_index * s, remote.id,
                inbox + static_cast<uint64_t>(rank) * s + off, &local, &remote_descs);
          if (auto h =
                  post(OpKind::kWrite, peer, local, remote_descs, tcpx::strfmt("W %d", rank))) {
            pending.push_back({*h, peer, Kind::kWrite, off, len, seed});
            write_busy[peer] = true;
          }
        }
        if (rng() % 8 == 0 &&
            !engine.sendNotification("soak-" + std::to_string(peer), "hello").isOk()) {
          stats.error("sending a notification failed");
        }
      }
    }
    if (!pending.empty()) {
      const Pending p = pending.front();
      pending.pop_front();
      const Status st = engine.waitTransfer(p.handle, std::chrono::seconds(60));
      (void)engine.releaseTransfer(p.handle);
      ++stats.transfers;
      const auto peer_index = static_cast<uint64_t>(p.peer);
      if (!st.isOk()) {
        stats.error("transfer failed: " + st.toString());
      } else if (p.kind == Kind::kRead) {
        const uint64_t got =
            scratch + peer_index * s + static_cast<uint64_t>(p.scratch_slot) * part;
        if (memory->check(got, p.length, sourceSeed(p.peer), p.offset) != -1) {
          stats.error(tcpx::strfmt("READ from %d: %llu bytes at %llu do not match", p.peer,
                                   static_cast<unsigned long long>(p.length),
                                   static_cast<unsigned long long>(p.offset)));
        } else {
          stats.bytes_verified += p.length;
        }
      } else if (p.kind == Kind::kWrite) {
        // Read the written range back into the last part of the scratch slot.
        const uint64_t at = scratch + peer_index * s + static_cast<uint64_t>(opts.inflight) * part;
        memory->queueFill(at, p.length, 0);
        std::vector<LocalDesc> local;
        std::vector<RemoteDesc> remote_descs;
        descs(p.length, at, remotes[p.peer].id, inbox + static_cast<uint64_t>(rank) * s + p.offset,
              &local, &remote_descs);
        if (auto h = post(OpKind::kRead, p.peer, local, remote_descs, std::nullopt)) {
          pending.push_back({*h, p.peer, Kind::kReadBack, p.offset, p.length, p.seed});
          continue;  // the peer's WRITE slot stays busy until the read-back is checked
        }
      } else {
        const uint64_t got = scratch + peer_index * s + static_cast<uint64_t>(opts.inflight) * part;
        if (memory->check(got, p.length, p.seed) != -1) {
          stats.error(tcpx::strfmt("WRITE to %d: %llu bytes at %llu do not match", p.peer,
                                   static_cast<unsigned long long>(p.length),
                                   static_cast<unsigned long long>(p.offset)));
        } else {
          stats.bytes_verified += p.length;
        }
      }
      if (p.kind == Kind::kRead) {
        scratch_free[p.peer] |= 1U << p.scratch_slot;
      } else {
        write_busy[p.peer] = false;
      }
    }
    check_notifications();
  }
  // Let the peers' last WRITE notifications arrive, then report.
  writeLine(out_fd, "DRAINED");
  std::string go;
  readLine(in_fd, &go);
  const auto drain_end = Clock::now() + std::chrono::seconds(2);
  while (Clock::now() < drain_end) {
    check_notifications();
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  stats.fds_end = openFds();
  stats.rss_end = rssBytes();
  if (!measured_start) {
    stats.fds_start = stats.fds_end;
    stats.rss_start = stats.rss_end;
  }
  writeLine(out_fd, tcpx::strfmt("RESULT %d %llu %llu %llu %llu %zu %zu %zu %zu %s", rank,
                                 static_cast<unsigned long long>(stats.transfers),
                                 static_cast<unsigned long long>(stats.bytes_verified),
                                 static_cast<unsigned long long>(stats.notifications),
                                 static_cast<unsigned long long>(stats.errors), stats.fds_start,
                                 stats.fds_end, stats.rss_start, stats.rss_end,
                                 stats.first_error.empty() ? "-" : stats.first_error.c_str()));
  readLine(in_fd, &go);  // everyone reported: shut down together
  return stats.errors == 0 ? 0 : 1;
}

int soakMain(int argc, char** argv) {
  CLI::App app{"Mixed READ/WRITE/notification traffic between processes, every byte verified"};
  Options opts;
  std::vector<std::string> sets;
  uint64_t slot_mib = 8;
  app.add_option("--processes", opts.processes, "worker processes")->check(CLI::Range(2, 16));
  app.add_option("--seconds", opts.seconds, "duration of the traffic")->check(CLI::Range(1, 86400));
  app.add_option("--slot-mib", slot_mib, "largest transfer (MiB)")->check(CLI::Range(1, 256));
  app.add_option("--inflight", opts.inflight, "READs in flight per peer")->check(CLI::Range(1, 15));
  app.add_option("--mem", opts.mem,
                 "where each process's region lives: dram, vram (GPU memory) or mixed (even "
                 "ranks vram, odd ranks dram)")
      ->check(CLI::IsMember({"dram", "vram", "mixed"}));
  app.add_option("--device", opts.device, "GPU of the vram regions")->check(CLI::Range(0, 63));
  app.add_option("--set", sets, "engine setting key=value (e.g. transport=emulator)");
  CLI11_PARSE(app, argc, argv);
  opts.slot = slot_mib << 20;
  for (const std::string& kv : sets) {
    const size_t eq = kv.find('=');
    if (eq == std::string::npos) return 2;
    opts.params.emplace_back(kv.substr(0, eq), kv.substr(eq + 1));
  }

  struct Child {
    pid_t pid;
    int to;
    int from;
  };
  std::vector<Child> children;
  for (int rank = 0; rank < opts.processes; ++rank) {
    int down[2];
    int up[2];
    if (::pipe2(down, O_CLOEXEC) != 0 || ::pipe2(up, O_CLOEXEC) != 0) return 2;
    const pid_t pid = ::fork();
    if (pid == 0) {
      ::close(down[1]);
      ::close(up[0]);
      std::_Exit(worker(opts, rank, down[0], up[1]));
    }
    ::close(down[0]);
    ::close(up[1]);
    children.push_back({pid, down[1], up[0]});
  }
  std::string line;
  std::vector<std::string> hello;
  for (auto& c : children) {
    if (!readLine(c.from, &line)) return 2;
    hello.push_back(line);
  }
  for (auto& c : children) {
    for (size_t r = 0; r < hello.size(); ++r) writeLine(c.to, std::to_string(r) + " " + hello[r]);
    writeLine(c.to, "GO");
  }
  for (auto& c : children) readLine(c.from, &line);  // DRAINED
  for (auto& c : children) writeLine(c.to, "REPORT");
  bool ok = true;
  uint64_t transfers = 0;
  uint64_t bytes = 0;
  uint64_t errors = 0;
  std::printf("%-6s %10s %14s %8s %6s %12s %16s %s\n", "worker", "transfers", "bytes verified",
              "notifs", "errors", "fds start/end", "RSS MiB start/end", "first error");
  for (auto& c : children) {
    if (!readLine(c.from, &line)) {
      ok = false;
      continue;
    }
    std::istringstream in(line);
    std::string tag;
    int rank = 0;
    unsigned long long t = 0, b = 0, nt = 0, e = 0;
    size_t fs = 0, fe = 0, rs = 0, re = 0;
    std::string first;
    in >> tag >> rank >> t >> b >> nt >> e >> fs >> fe >> rs >> re;
    std::getline(in, first);
    transfers += t;
    bytes += b;
    errors += e;
    const bool grew = fe > fs || re > rs + (16ULL << 20);
    std::printf("%-6d %10llu %14llu %8llu %6llu %6zu/%-5zu %8.1f/%-7.1f %s%s\n", rank, t, b, nt, e,
                fs, fe, rs / 1048576.0, re / 1048576.0, first.c_str(),
                grew ? "  (resources grew)" : "");
    ok = ok && e == 0 && !grew;
  }
  for (auto& c : children) writeLine(c.to, "BYE");
  for (auto& c : children) {
    int status = 0;
    ::waitpid(c.pid, &status, 0);
    ok = ok && WIFEXITED(status) && WEXITSTATUS(status) == 0;
  }
  std::printf("total: %llu transfers, %llu bytes verified, %llu errors: %s\n",
              static_cast<unsigned long long>(transfers), static_cast<unsigned long long>(bytes),
              static_cast<unsigned long long>(errors), ok ? "PASS" : "FAIL");
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return soakMain(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tcpx_soak: %s\n", e.what());
    return 2;
  }
}
