// tcpx_bench: shared declarations of the benchmark's parts.
//
// Roles: a target process serves memory; an initiator drives the sweep. `loopback` (the default)
// starts a target as a child process of the same binary and runs the initiator against it.
// The two processes meet on a bootstrap TCP connection (plain length-prefixed messages) that
// carries options, connection info, descriptors and the per-point handshake; data moves over the
// engine (mode engine) or over plain sockets with the same socket count (mode raw).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <sys/types.h>
#include <utility>
#include <vector>

#include <tcpx_p2p/tcpx_p2p.h>

#include "common/net.h"

namespace tcpx::bench {

struct Options {
  std::string role = "loopback";  // loopback | target | initiator
  std::string host = "127.0.0.1";
  uint16_t port = 0;   // bootstrap port (target listens, initiator connects)
  int report_fd = -1;  // target: write the bound port here (used by loopback)
  std::vector<std::string> modes{"engine", "raw"};
  std::vector<std::string> ops{"write", "read"};
  std::vector<std::pair<uint64_t, uint64_t>> points;  // (block, batch); empty = sweep
  uint64_t min_block = 4096;
  uint64_t max_block = 64ull << 20;
  std::vector<uint64_t> batches{1};
  uint64_t max_buffer = 1ull << 30;
  int iters = 0;    // 0 = adaptive
  int warmup = -1;  // -1 = adaptive
  bool verify = true;
  std::string json;
  std::vector<std::pair<std::string, std::string>> engine_params;  // key=value for the engine
  double idle_seconds = 0;  // > 0: measure idle CPU with 4 peers instead of a sweep
  int idle_peers = 4;
  bool quiet = false;
  bool block_wait = false;  // wait with waitTransfer instead of polling checkTransfer
  int repeat = 1;           // runs of every mode, alternating; the median run of each point counts
};

// One measured point.
struct PointResult {
  std::string mode;
  std::string op;
  uint64_t block = 0;
  uint64_t batch = 0;
  int iters = 0;
  double gbps = 0;
  double avg_lat_us = 0;
  double p50_lat_us = 0;
  double p99_lat_us = 0;
  double avg_prep_us = 0;
  double avg_post_us = 0;
  std::string verified;  // "yes", "no (...)", or "-"
};

// Length-prefixed text messages over a TCP connection.
class Bootstrap {
 public:
  explicit Bootstrap(net::Fd fd) : fd_(std::move(fd)) {}
  bool send(const std::string& message);
  bool recv(std::string* message);
  [[nodiscard]] int fd() const { return fd_.get(); }

 private:
  net::Fd fd_;
};

// Sweep points in run order.
std::vector<std::pair<uint64_t, uint64_t>> sweepPoints(const Options& opts);
int itersFor(const Options& opts, uint64_t bytes);
int warmupFor(const Options& opts, int iters);

// Engine parameters as "k=v,k=v" and back.
std::string joinParams(const std::vector<std::pair<std::string, std::string>>& params);
std::vector<std::pair<std::string, std::string>> splitParams(const std::string& text);

// Total sockets a configuration uses (channels x sockets_per_channel).
int socketCount(const std::vector<std::pair<std::string, std::string>>& params);
uint64_t paramSize(const std::vector<std::pair<std::string, std::string>>& params,
                   const std::string& key);

// An engine for the benchmark; binds to loopback when `bind_host` is 127.0.0.1.
Result<std::unique_ptr<Engine>> makeEngine(const std::string& name,
                                           std::vector<std::pair<std::string, std::string>> params,
                                           const std::string& bind_host);
// Starts a target child process of this program; returns its bootstrap port (-1 on failure).
int startLoopbackTarget(const Options& opts, pid_t* child);
// Connects to a target's bootstrap port (retrying while it starts).
std::unique_ptr<Bootstrap> connectBootstrap(const std::string& host, uint16_t port);

int runTarget(const Options& opts);
int runInitiator(const Options& opts);
int runIdleCpu(const Options& opts);

// Parts of the initiator.
std::vector<PointResult> runEngineSweep(const Options& opts, Bootstrap& boot);
std::vector<PointResult> runRawSweep(const Options& opts, Bootstrap& boot);
// Target side of each mode; returns false on a protocol error.
bool serveEngine(const Options& opts, Bootstrap& boot, const std::string& first_message);
bool serveRaw(const Options& opts, Bootstrap& boot, const std::string& first_message);

// Per point, the run with the median bandwidth among `runs` (one vector per repetition).
std::vector<PointResult> medianOf(const std::vector<std::vector<PointResult>>& runs);

void printTable(const std::vector<PointResult>& results, const std::string& title);
void printComparison(const std::vector<PointResult>& engine, const std::vector<PointResult>& raw);
void writeJson(const std::string& path, const std::vector<PointResult>& results);

// A fresh result for one point, announced on the progress line ("[3/30] engine WRITE 4 KiB x 1").
PointResult startPoint(const Options& opts, const char* mode, bool is_write, uint64_t block,
                       uint64_t batch, size_t index, size_t total);

// Latency statistics of per-iteration samples in microseconds.
struct Stats {
  double avg = 0, p50 = 0, p99 = 0;
};
Stats statsOf(std::vector<double> samples);

void progress(const Options& opts, const char* fmt, ...) __attribute__((format(printf, 2, 3)));

}  // namespace tcpx::bench
