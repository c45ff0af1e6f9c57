// tcpx_bench: shared declarations of the benchmark's parts.
//
// Roles: a target process serves memory; an initiator drives the sweep. `loopback` (the default)
// starts a target as a child process of the same binary and runs the initiator against it.
// The two processes meet on a bootstrap TCP connection (length-prefixed text messages) that
// carries options, connection info, descriptors and the per-point handshake.
//
// Data moves over two sessions that stay up for the whole run: the engine, and plain TCP sockets
// (raw, the baseline, with the engine's total socket count). Each point runs in rounds that
// alternate between the sessions, so both see the same machine state; the comparison reports the
// median of the per-round ratios.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <sys/types.h>
#include <utility>
#include <vector>

#include <tcpx_p2p/tcpx_p2p.h>

#include "common/net.h"
#include "common/pattern_memory.h"

namespace tcpx::bench {

using Clock = std::chrono::steady_clock;

inline double usSince(Clock::time_point t0, Clock::time_point t1) {
  return std::chrono::duration<double, std::micro>(t1 - t0).count();
}

struct Options {
  std::string role = "loopback";  // loopback | target | initiator
  std::string host = "127.0.0.1";
  uint16_t port = 0;   // bootstrap port (target listens, initiator connects)
  int report_fd = -1;  // target: write the bound port here (used by loopback)
  std::vector<std::string> modes{"engine", "raw"};
  // Memory of each engine session, initiator:target ("dram:dram", "vram:vram", ...).
  std::vector<std::string> mems{"dram:dram"};
  // Transports of the engine sessions ("" = the configured one); each gets its own sessions.
  std::vector<std::string> transports{""};
  int device = 0;         // the initiator's GPU for vram
  int target_device = 0;  // the target's GPU for vram
  std::vector<std::string> ops{"write", "read"};
  std::vector<std::pair<uint64_t, uint64_t>> points;  // (block, batch); empty = sweep
  uint64_t min_block = 4096;
  uint64_t max_block = 64ULL << 20;
  std::vector<uint64_t> batches{1};
  uint64_t max_buffer = 1ULL << 30;
  int iters = 0;    // per round; 0 = adaptive
  int warmup = -1;  // per round; -1 = adaptive
  // Blocks over 1 MiB run iters and warmup divided by this (nixlbench's --large_blk_iter_ftr).
  int large_block_iter_factor = 1;
  int rounds = 1;  // rounds per point and mode, alternating between modes
  bool verify = true;
  bool block_wait = false;  // wait with waitTransfer instead of polling checkTransfer
  // Transfers kept in flight at once (engine and raw modes): each on its own slice of the
  // buffers, reposted as soon as it completes (steady state).
  int inflight = 1;
  // Target processes (loopback): every round moves the point to all of them at once, from one
  // engine with a peer each, or from as many sets of raw sockets.
  int peers = 1;
  // How many of the --peers targets a round moves the point to (the first ones); the others stay
  // connected and idle, as the prefill workers a decode worker is not pulling from. 0 = all.
  int active_peers = 0;
  // Initiators (loopback): as many engines, or raw socket sets, in this process, each with a
  // bootstrap connection of its own, moving every point into one target process at once; the
  // target's engine has a peer each. The target accepts this many bootstrap connections.
  int initiators = 1;
  std::string json;
  std::vector<std::pair<std::string, std::string>> engine_params;  // key=value for the engine
  // Backends of the NIXL sessions (mode "nixl"; tcpx_nixl_bench only): the TCPX backend gets
  // the engine parameters and the first of `transports`, others their own defaults.
  std::vector<std::string> nixl_backends{"TCPX"};
  bool nixlbench_columns = false;  // print tables in nixlbench's layout
  double idle_seconds = 0;         // > 0: measure idle CPU with idle_peers peers instead of a sweep
  int idle_peers = 4;
  bool quiet = false;
};

// One round of one point in one mode.
struct Round {
  double seconds = 0;              // wall time of the timed iterations
  std::vector<double> latency_us;  // per timed iteration, post to completion
  std::vector<double> post_us;     // engine: time inside postTransfer
  std::string verified = "-";      // "yes", "no (...)", or "-"
};

// One point in one mode, over all its rounds.
struct PointResult {
  std::string mode;
  std::string op;
  uint64_t block = 0;
  uint64_t batch = 0;
  int iters = 0;  // timed iterations per round; 0 when the point failed
  std::vector<double> round_gbps;
  double gbps = 0;  // median over rounds
  double avg_lat_us = 0;
  double p50_lat_us = 0;
  double p99_lat_us = 0;
  double avg_prep_us = 0;
  double p99_prep_us = 0;
  double avg_post_us = 0;
  double p99_post_us = 0;
  std::string verified = "-";
  int inflight = 1;  // transfers kept in flight (Options::inflight)
  int peers = 1;     // targets moved to at once (Session::targets)
};

// Length-prefixed text messages over a TCP connection.
class Bootstrap {
 public:
  explicit Bootstrap(net::Fd fd) : fd_(std::move(fd)) {}
  bool send(const std::string& message);
  bool recv(std::string* message);

 private:
  net::Fd fd_;
};

// The initiator's end of one data path.
class Session {
 public:
  virtual ~Session() = default;
  // "engine", "engine vram:vram", "raw".
  [[nodiscard]] virtual const std::string& mode() const = 0;
  // Fills (WRITE) or poisons (READ) the local buffer and has the target do the opposite.
  virtual bool preparePoint(bool is_write, uint64_t block, uint64_t batch, uint64_t seed,
                            int iterations_per_round, std::string* error) = 0;
  // Runs warmup + iters transfers; a failure ends the point.
  virtual bool runRound(int warmup, int iters, Round* round, std::string* error) = 0;
  // Byte-for-byte check of the last round's destination.
  virtual std::string verify() = 0;
  // Cost of preparing the point's transfer, in microseconds (engine and NIXL sessions).
  [[nodiscard]] virtual std::vector<double> prepSamples() const { return {}; }
  // Targets a round moves the point's bytes to at once (--peers).
  [[nodiscard]] virtual int targets() const { return 1; }
};

// Runs the same point on several sessions at once, one target process each (--peers): a round
// starts the first `active` parts' rounds (0 = all) together on threads of its own and lasts
// until the last one ends; its samples are all of theirs. The other parts stay connected and idle.
// `what` names the parts in the mode ("peers", "initiators").
std::unique_ptr<Session> makeFanOutSession(std::vector<std::unique_ptr<Session>> parts,
                                           const std::string& what, int active = 0);

// A session that moves one buffer per side (the engine's and NIXL's sessions). For each point it
// tells the target (which poisons its buffer for a WRITE, fills it for a READ), fills or poisons
// the local buffer, and has the subclass prepare a request only when the point changed: the same
// request is posted again otherwise. After a round it checks the destination byte for byte.
class BufferSession : public Session {
 public:
  // `inflight`: transfers the subclass keeps posted at once, each on its own slice of
  // block x batch bytes (the point covers all of them).
  BufferSession(Bootstrap& boot, std::unique_ptr<tools::PatternMemory> buffer, std::string mode,
                std::string key, int inflight = 1)
      : boot_(boot),
        buffer_(std::move(buffer)),
        mode_(std::move(mode)),
        key_(std::move(key)),
        inflight_(inflight) {}
  // Ends the target's side (after the subclass released its requests and its engine or agent).
  ~BufferSession() override;
  BufferSession(const BufferSession&) = delete;
  BufferSession& operator=(const BufferSession&) = delete;

  [[nodiscard]] const std::string& mode() const final { return mode_; }
  bool preparePoint(bool is_write, uint64_t block, uint64_t batch, uint64_t seed,
                    int iterations_per_round, std::string* error) final;
  std::string verify() final;
  [[nodiscard]] std::vector<double> prepSamples() const final { return prep_us_; }

 protected:
  [[nodiscard]] virtual bool hasRequest() const = 0;
  // Replaces the request by one for `batch` descriptors of `block` bytes (offset i x block on
  // both sides), adding the time each attempt took to prep_us_.
  virtual bool prepareRequest(bool is_write, uint64_t block, uint64_t batch,
                              std::string* error) = 0;
  static bool fail(std::string* error, const std::string& why) {
    *error = why;
    return false;
  }
  // Runs `attempt` (which prepares the request anew, keeping the last one; it returns an error
  // text, empty on success) a few times, timing each into prep_us_.
  bool timePrepare(const std::function<std::string()>& attempt, std::string* error);

  Bootstrap& boot_;
  std::unique_ptr<tools::PatternMemory> buffer_;
  std::string mode_;
  std::string key_;
  int inflight_;
  std::vector<double> prep_us_;

 private:
  uint64_t block_ = 0, batch_ = 0, bytes_ = 0, seed_ = 0;
  bool is_write_ = false, prepared_write_ = false;
};

// Times warmup + iters iterations: `post` starts one (its time is the post time) and `complete`
// waits for it (post to completion is the latency). Each returns an error text, empty on success;
// an error ends the round.
bool timeRound(int warmup, int iters, Round* round, std::string* error,
               const std::function<std::string()>& post,
               const std::function<std::string()>& complete);
// The same with `inflight` transfers kept posted: post(k) starts transfer slot k, poll(k) says
// whether it completed (1), is still running (0) or failed (-1, with the reason in *error). A
// slot is reposted as soon as it completes until warmup + iters transfers were posted; timing
// starts at the warmup-th completion, and each completion's post-to-completion time is a sample.
bool timeInflight(int warmup, int iters, int inflight, Round* round, std::string* error,
                  const std::function<std::string(int)>& post,
                  const std::function<int(int, std::string*)>& poll);
// Host or GPU memory ("dram", "vram", or "vmm": GPU memory of the CUDA VMM API) for one side of a
// session; nullptr (with a message) when there is no such GPU.
std::unique_ptr<tools::PatternMemory> allocateBuffer(const std::string& kind, size_t size,
                                                     int device);
// "initiator:target" memory ("dram:vram") as its two kinds.
std::pair<std::string, std::string> memoryKinds(const std::string& mem);

// `mem` is "initiator:target" memory ("dram:dram", "vram:vram", ...); `key` names the session
// on the bootstrap connections. One engine with a peer per bootstrap (target process), or with
// --initiators an engine per bootstrap (all to one target process).
std::unique_ptr<Session> openEngineSession(const Options& opts,
                                           const std::vector<Bootstrap*>& boots,
                                           uint64_t buffer_size, const std::string& mem,
                                           const std::string& key, const std::string& transport);
// Plain sockets to each target, as many per target as the engine uses per peer.
std::unique_ptr<Session> openRawSession(const Options& opts, const std::vector<Bootstrap*>& boots,
                                        uint64_t buffer_size);
// Transfers between an engine and itself in this process (mode "local"), and the plain copy of
// the same bytes by one thread (mode "copy", the local mode's baseline).
std::unique_ptr<Session> openLocalSession(const Options& opts, uint64_t buffer_size,
                                          const std::string& mem);
std::unique_ptr<Session> openCopySession(const Options& opts, uint64_t buffer_size,
                                         const std::string& mem);
// Waits for a transfer by polling, as latency-sensitive callers (and nixlbench) do.
Status spinWait(Engine& engine, TransferHandle h);
// timeRound over posts of `handle`, each waited for as --wait says.
bool timeTransfers(const Options& opts, Engine& engine, TransferHandle handle, int warmup,
                   int iters, Round* round, std::string* error);
// A session through the NIXL agent API with `backend` (tcpx_nixl_bench only).
std::unique_ptr<Session> openNixlSession(const Options& opts, Bootstrap& boot, uint64_t buffer_size,
                                         const std::string& mem, const std::string& key,
                                         const std::string& backend);

// The target's end of one data path: answers the initiator's bootstrap messages.
class TargetSide {
 public:
  virtual ~TargetSide() = default;
  // Handles one message for this mode ("POINT", "ROUND", "VERIFY" with the mode letter already
  // read); false on a fatal error.
  virtual bool handle(const std::string& verb, std::istringstream& args, Bootstrap& boot) = 0;
};

// The target's end of a BufferSession: answers "POINT" (poisons its buffer for a WRITE, fills
// it for a READ) and "VERIFY" for its buffer.
class BufferTarget : public TargetSide {
 public:
  explicit BufferTarget(std::unique_ptr<tools::PatternMemory> buffer)
      : buffer_(std::move(buffer)) {}
  bool handle(const std::string& verb, std::istringstream& args, Bootstrap& boot) final;

 protected:
  std::unique_ptr<tools::PatternMemory> buffer_;  // outlives the subclass's engine or agent

 private:
  uint64_t bytes_ = 0, seed_ = 0;
};

// Engines of a target process that serves several initiators (--initiators): one per session
// key, shared by the bootstrap connections; each initiator is a peer of it.
class SharedTargetEngines {
 public:
  // The engine for `key`, made with `make` on first use.
  Result<std::shared_ptr<Engine>> get(const std::string& key,
                                      const std::function<Result<std::unique_ptr<Engine>>()>& make);

 private:
  std::mutex mu_;
  std::map<std::string, std::shared_ptr<Engine>> engines_;
};

// `shared` (null unless --initiators): where the engine for session `key` comes from; `conn`
// numbers the bootstrap connection (the initiator's peer name on a shared engine).
std::unique_ptr<TargetSide> serveEngine(const Options& opts, Bootstrap& boot,
                                        std::istringstream& args, const std::string& key,
                                        SharedTargetEngines* shared, int conn);
std::unique_ptr<TargetSide> serveRaw(const Options& opts, Bootstrap& boot,
                                     std::istringstream& args);
std::unique_ptr<TargetSide> serveNixl(const Options& opts, Bootstrap& boot,
                                      std::istringstream& args);
// Whether this build has the NIXL sessions.
bool haveNixl();

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

// Sweep points in run order, iteration counts, and the largest transfer.
std::vector<std::pair<uint64_t, uint64_t>> sweepPoints(const Options& opts);
int itersFor(const Options& opts, uint64_t bytes);
int warmupFor(const Options& opts, int iters);
uint64_t largestTransfer(const Options& opts);

// Engine parameters as "k=v,k=v" ("-" when empty) and back.
std::string joinParams(const std::vector<std::pair<std::string, std::string>>& params);
std::vector<std::pair<std::string, std::string>> splitParams(const std::string& text);
// Total sockets a configuration uses (channels x sockets_per_channel).
int socketCount(const std::vector<std::pair<std::string, std::string>>& params);

// Latency statistics of samples in microseconds.
struct Stats {
  double avg = 0, p50 = 0, p99 = 0;
};
Stats statsOf(std::vector<double> samples);
double median(std::vector<double> values);
// Folds a point's rounds into one result.
PointResult summarize(const std::string& mode, bool is_write, uint64_t block, uint64_t batch,
                      int iters, const std::vector<Round>& rounds, uint64_t bytes);

void printTable(const std::vector<PointResult>& results, const std::string& title);
// The same in nixlbench's columns (its Avg Lat. is per descriptor: duration / (iters x batch)).
void printNixlbenchTable(const std::vector<PointResult>& results, const std::string& title);
// Each point of `other` against the same point of `baseline`.
void printComparison(const std::vector<PointResult>& other,
                     const std::vector<PointResult>& baseline);
void writeJson(const std::string& path, const std::vector<PointResult>& results);

void progress(const Options& opts, const char* fmt, ...) __attribute__((format(printf, 2, 3)));

}  // namespace tcpx::bench
