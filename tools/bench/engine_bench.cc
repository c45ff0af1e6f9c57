// Engine mode: transfers through the tcpx_p2p API, initiator and target sides.
#include <sched.h>

#include <chrono>
#include <cstring>

#include "bench.h"
#include "common/random.h"
#include "common/strings.h"

namespace tcpx::bench {

Status spinWait(Engine& engine, TransferHandle h) {
  for (;;) {
    Status st = engine.checkTransfer(h);
    if (st.code() != StatusCode::kInProgress) return st;
    sched_yield();
  }
}

bool timeTransfers(const Options& opts, Engine& engine, TransferHandle handle, int warmup,
                   int iters, Round* round, std::string* error) {
  Status st;
  return timeRound(
      warmup, iters, round, error,
      [&] {
        st = engine.postTransfer(handle);
        return std::string();
      },
      [&] {
        if (st.isOk()) {
          st = opts.block_wait ? engine.waitTransfer(handle, std::chrono::minutes(5))
                               : spinWait(engine, handle);
        }
        return st.isOk() ? std::string() : st.toString();
      });
}

namespace {

class EngineSession final : public BufferSession {
 public:
  // `engine` may be shared with the sessions to other targets (--peers); `peer` is the target's
  // name in it.
  EngineSession(const Options& opts, Bootstrap& boot, std::shared_ptr<Engine> engine,
                std::unique_ptr<tools::PatternMemory> buffer, std::string mode, std::string key,
                std::vector<std::pair<std::string, std::string>> params, std::string peer)
      : BufferSession(boot, std::move(buffer), std::move(mode), std::move(key), opts.inflight),
        opts_(opts),
        params_(std::move(params)),
        engine_(std::move(engine)),
        peer_(std::move(peer)) {}
  ~EngineSession() override {
    releaseHandles();
    if (!opts_.quiet) printCounters();
    warnIfDirect();
  }
  EngineSession(const EngineSession&) = delete;
  EngineSession& operator=(const EngineSession&) = delete;

  // The engine's counters of its peer, as a user would read them to diagnose a deployment.
  void printCounters() const {
    auto stats = engine_->peerStats(peer_);
    if (!stats.isOk()) return;
    std::string failures;
    for (const auto& [code, n] : stats->failures) {
      failures += strfmt(" %s %llu", statusCodeName(code), static_cast<unsigned long long>(n));
    }
    std::fprintf(stderr,
                 "%s: peer counters: %llu runs posted, %llu succeeded, %llu failed%s; %s sent, "
                 "%s received%s%s\n",
                 mode().c_str(), static_cast<unsigned long long>(stats->posted),
                 static_cast<unsigned long long>(stats->succeeded),
                 static_cast<unsigned long long>(stats->failed), failures.c_str(),
                 formatBytes(stats->bytes_sent).c_str(), formatBytes(stats->bytes_received).c_str(),
                 stats->last_error.isOk() ? "" : "; last error: ",
                 stats->last_error.isOk() ? "" : stats->last_error.toString().c_str());
  }

  // Host-memory runs with a target on this host may be direct copies between the two processes
  // (same_host_copy): the figures are then those of a copy, not of the transport; say so
  // whatever --quiet says.
  void warnIfDirect() const {
    auto stats = engine_->peerStats(peer_);
    if (!stats.isOk() || stats->direct_runs == 0) return;
    std::fprintf(stderr,
                 "tcpx_bench: %s: %llu runs were direct copies between the two processes on this "
                 "host (same_host_copy=auto); --set same_host_copy=off measures the transport\n",
                 mode().c_str(), static_cast<unsigned long long>(stats->direct_runs));
  }

  bool connect(const std::string& target_kind, std::string* error) {
    auto id = engine_->registerMemory(buffer_->data(), buffer_->size(), buffer_->kind(),
                                      buffer_->device());
    if (!id.isOk()) return fail(error, id.status().toString());
    mem_ = id.value();
    const std::string params = joinParams(params_);
    boot_.send(strfmt("ENGINE %s %s %llu %s %s %d", key_.c_str(), params.c_str(),
                      static_cast<unsigned long long>(buffer_->size()),
                      toHex(engine_->connectionInfo()).c_str(), target_kind.c_str(),
                      opts_.target_device));
    std::string reply;
    if (!boot_.recv(&reply)) return fail(error, "no answer from the target");
    std::istringstream in(reply);
    std::string info_hex, desc_hex;
    in >> info_hex >> desc_hex;
    Status st = engine_->addPeer(peer_, fromHex(info_hex).value_or(""));
    if (!st.isOk()) return fail(error, st.toString());
    auto remote = engine_->loadRemoteMemory(fromHex(desc_hex).value_or(""));
    if (!remote.isOk()) return fail(error, remote.status().toString());
    remote_ = remote->id;
    const auto t0 = Clock::now();
    st = engine_->connect(peer_);
    if (!st.isOk()) return fail(error, st.toString());
    progress(opts_, "engine connected in %.1f ms", usSince(t0, Clock::now()) / 1000);
    warnIfAnotherTransport();
    return true;
  }

  // A target on this host may take another transport than the one configured (same_host): the
  // figures would be that transport's, so say so whatever --quiet says.
  void warnIfAnotherTransport() const {
    auto stats = engine_->peerStats(peer_);
    Config config = Config::fromEnvironment();
    for (const auto& [key, value] : params_) (void)config.set(key, value);
    auto configured_value = config.get("transport");
    const std::string configured = configured_value.isOk() ? configured_value.value() : "";
    if (!stats.isOk() || stats->transport.empty() || stats->transport == configured) return;
    std::fprintf(stderr,
                 "tcpx_bench: %s: the target is on this host, so its data moves over the %s "
                 "transport (same_host); --set same_host=network measures %s itself\n",
                 mode().c_str(), stats->transport.c_str(), configured.c_str());
  }

  bool prepareRequest(bool is_write, uint64_t block, uint64_t batch, std::string* error) override {
    releaseHandles();
    const OpKind op = is_write ? OpKind::kWrite : OpKind::kRead;
    // One request per slot in flight, each on its own slice of both buffers; the first is timed
    // (the others are the same request at other offsets).
    for (int k = 0; k < opts_.inflight; ++k) {
      const uint64_t base = static_cast<uint64_t>(k) * block * batch;
      std::vector<LocalDesc> local(batch);
      std::vector<RemoteDesc> remote(batch);
      for (uint64_t i = 0; i < batch; ++i) {
        local[i] = {mem_, base + i * block, block};
        remote[i] = {remote_, base + i * block, block};
      }
      TransferHandle handle = 0;
      const auto attempt = [&] {
        auto h = engine_->prepareTransfer(op, peer_, local, remote);
        if (!h.isOk()) return h.status().toString();
        if (handle != 0) (void)engine_->releaseTransfer(handle);
        handle = h.value();
        return std::string();
      };
      if (k == 0 ? !timePrepare(attempt, error) : !attempt().empty()) {
        if (handle != 0) (void)engine_->releaseTransfer(handle);
        releaseHandles();
        return k == 0 ? false : fail(error, "preparing a request in flight failed");
      }
      handles_.push_back(handle);
    }
    return true;
  }

  bool runRound(int warmup, int iters, Round* round, std::string* error) override {
    if (handles_.size() == 1) {
      return timeTransfers(opts_, *engine_, handles_.front(), warmup, iters, round, error);
    }
    return timeInflight(
        warmup, iters, static_cast<int>(handles_.size()), round, error,
        [&](int k) {
          const Status st = engine_->postTransfer(handles_[static_cast<size_t>(k)]);
          return st.isOk() ? std::string() : st.toString();
        },
        [&](int k, std::string* why) {
          const Status st = engine_->checkTransfer(handles_[static_cast<size_t>(k)]);
          if (st.code() == StatusCode::kInProgress) return 0;
          if (st.isOk()) return 1;
          *why = st.toString();
          return -1;
        });
  }

  [[nodiscard]] bool hasRequest() const override { return !handles_.empty(); }

 private:
  const Options& opts_;
  std::vector<std::pair<std::string, std::string>> params_;  // engine settings of both sides
  std::shared_ptr<Engine> engine_;
  std::string peer_;
  void releaseHandles() {
    for (TransferHandle h : handles_) (void)engine_->releaseTransfer(h);
    handles_.clear();
  }

  MemoryId mem_ = 0;
  MemoryId remote_ = 0;
  std::vector<TransferHandle> handles_;  // one per transfer in flight (Options::inflight)
};

class EngineTarget final : public BufferTarget {
 public:
  // `engine` may serve other initiators too (--initiators): this session's initiator is its peer
  // `peer`, and its buffer is its own registration.
  EngineTarget(std::shared_ptr<Engine> engine, std::unique_ptr<tools::PatternMemory> buffer,
               std::string peer)
      : BufferTarget(std::move(buffer)), engine_(std::move(engine)), peer_(std::move(peer)) {}
  // The buffer goes with this session while a shared engine lives on: the peer and the
  // registration go first.
  ~EngineTarget() override {
    (void)engine_->removePeer(peer_);
    if (mem_ != 0) (void)engine_->deregisterMemory(mem_);
  }
  EngineTarget(const EngineTarget&) = delete;
  EngineTarget& operator=(const EngineTarget&) = delete;

  Engine& engine() { return *engine_; }
  [[nodiscard]] const std::string& peer() const { return peer_; }
  Result<MemoryId> registerBuffer() {
    auto id = engine_->registerMemory(buffer_->data(), buffer_->size(), buffer_->kind(),
                                      buffer_->device());
    if (id.isOk()) mem_ = id.value();
    return id;
  }

 private:
  std::shared_ptr<Engine> engine_;
  std::string peer_;
  MemoryId mem_ = 0;
};

}  // namespace

std::pair<std::string, std::string> memoryKinds(const std::string& mem) {
  const size_t colon = mem.find(':');
  return {mem.substr(0, colon), mem.substr(colon + 1)};
}

std::unique_ptr<tools::PatternMemory> allocateBuffer(const std::string& kind, size_t size,
                                                     int device) {
  // vmm: GPU memory of the CUDA VMM API with a shareable (file-descriptor) handle type.
  auto memory = kind == "vram" ? tools::makeGpuMemory(size, device, 0)
                : kind == "vmm"
                    ? tools::makeGpuMemory(size, device, 0, tools::GpuAllocation::kVmmShareable)
                    : tools::makeHostMemory(size, 0);
  if (!memory) {
    std::fprintf(stderr, "tcpx_bench: no GPU %d for %s memory: %s\n", device, kind.c_str(),
                 tools::gpuUnavailableReason().c_str());
  }
  return memory;
}

BufferSession::~BufferSession() {
  std::string reply;
  boot_.send("END " + key_);
  boot_.recv(&reply);
}

bool BufferSession::preparePoint(bool is_write, uint64_t block, uint64_t batch, uint64_t seed,
                                 int /*iterations_per_round*/, std::string* error) {
  is_write_ = is_write;
  bytes_ = block * batch * static_cast<uint64_t>(inflight_);  // every slice in flight
  seed_ = seed;
  boot_.send(strfmt("POINT %s %c %llu %llu", key_.c_str(), is_write ? 'W' : 'R',
                    static_cast<unsigned long long>(bytes_),
                    static_cast<unsigned long long>(seed)));
  std::string reply;
  if (!boot_.recv(&reply) || reply != "READY") return fail(error, "target not ready");
  if (is_write) {
    buffer_->fill(0, bytes_, seed);
  } else {
    buffer_->fillByte(0, bytes_, 0x5A);
  }
  if (block == block_ && batch == batch_ && is_write == prepared_write_ && hasRequest()) {
    return true;  // the same request is posted again
  }
  prep_us_.clear();
  if (!prepareRequest(is_write, block, batch, error)) return false;
  block_ = block;
  batch_ = batch;
  prepared_write_ = is_write;
  return true;
}

bool BufferSession::timePrepare(const std::function<std::string()>& attempt, std::string* error) {
  for (int i = 0; i < 5; ++i) {
    const auto t0 = Clock::now();
    const std::string failure = attempt();
    prep_us_.push_back(usSince(t0, Clock::now()));
    if (!failure.empty()) return fail(error, failure);
  }
  return true;
}

std::string BufferSession::verify() {
  if (is_write_) {
    std::string reply;
    boot_.send("VERIFY " + key_);
    boot_.recv(&reply);
    return reply == "OK" ? "yes" : "no (" + reply + ")";
  }
  const int64_t bad = buffer_->check(0, bytes_, seed_);
  return bad < 0 ? "yes" : strfmt("no (byte %lld differs)", static_cast<long long>(bad));
}

bool timeRound(int warmup, int iters, Round* round, std::string* error,
               const std::function<std::string()>& post,
               const std::function<std::string()>& complete) {
  round->latency_us.reserve(static_cast<size_t>(iters));
  round->post_us.reserve(static_cast<size_t>(iters));
  Clock::time_point start;
  for (int i = 0; i < warmup + iters; ++i) {
    if (i == warmup) start = Clock::now();
    const auto a = Clock::now();
    std::string failure = post();
    const auto b = Clock::now();
    if (failure.empty()) failure = complete();
    const auto c = Clock::now();
    if (!failure.empty()) {
      *error = failure;
      return false;
    }
    if (i >= warmup) {
      round->post_us.push_back(usSince(a, b));
      round->latency_us.push_back(usSince(a, c));
    }
  }
  round->seconds = usSince(start, Clock::now()) / 1e6;
  return true;
}

bool timeInflight(int warmup, int iters, int inflight, Round* round, std::string* error,
                  const std::function<std::string(int)>& post,
                  const std::function<int(int, std::string*)>& poll) {
  const int total = warmup + iters;
  round->latency_us.reserve(static_cast<size_t>(iters));
  round->post_us.reserve(static_cast<size_t>(iters));
  std::vector<Clock::time_point> posted_at(static_cast<size_t>(inflight));
  std::vector<bool> busy(static_cast<size_t>(inflight), false);
  int posted = 0, completed = 0, running = 0;
  Clock::time_point start = Clock::now();
  const auto start_one = [&](int k) {
    const auto a = Clock::now();
    const std::string failure = post(k);
    if (!failure.empty()) {
      *error = failure;
      return false;
    }
    if (posted >= warmup) round->post_us.push_back(usSince(a, Clock::now()));
    posted_at[static_cast<size_t>(k)] = a;
    busy[static_cast<size_t>(k)] = true;
    ++posted;
    ++running;
    return true;
  };
  for (int k = 0; k < inflight && posted < total; ++k) {
    if (!start_one(k)) return false;
  }
  while (running > 0) {
    for (int k = 0; k < inflight; ++k) {
      if (!busy[static_cast<size_t>(k)]) continue;
      const int state = poll(k, error);
      if (state < 0) return false;
      if (state == 0) continue;
      const auto now = Clock::now();
      busy[static_cast<size_t>(k)] = false;
      --running;
      ++completed;
      if (completed == warmup) start = now;
      if (completed > warmup) {
        round->latency_us.push_back(usSince(posted_at[static_cast<size_t>(k)], now));
      }
      if (posted < total && !start_one(k)) return false;
    }
    if (running > 0) sched_yield();
  }
  round->seconds = usSince(start, Clock::now()) / 1e6;
  return true;
}

bool BufferTarget::handle(const std::string& verb, std::istringstream& args, Bootstrap& boot) {
  if (verb == "POINT") {
    char op = 0;
    args >> op >> bytes_ >> seed_;
    if (bytes_ > buffer_->size()) return false;
    if (op == 'W') {
      buffer_->fillByte(0, bytes_, 0xA5);
    } else {
      buffer_->fill(0, bytes_, seed_);
    }
    return boot.send("READY");
  }
  if (verb == "VERIFY") {
    const int64_t bad = buffer_->check(0, bytes_, seed_);
    return boot.send(bad < 0 ? "OK" : strfmt("byte %lld differs", static_cast<long long>(bad)));
  }
  return false;
}

Result<std::unique_ptr<Engine>> makeEngine(const std::string& name,
                                           std::vector<std::pair<std::string, std::string>> params,
                                           const std::string& bind_host) {
  params.insert(params.begin(), {"name", name});
  // Loopback runs stay on loopback; between machines the engine advertises its primary address.
  if (bind_host == "127.0.0.1") params.insert(params.begin(), {"listen_host", bind_host});
  auto config = Config::make(params);
  if (!config.isOk()) return config.status();
  return Engine::create(config.value());
}

std::unique_ptr<Session> openEngineSession(const Options& opts,
                                           const std::vector<Bootstrap*>& boots,
                                           uint64_t buffer_size, const std::string& mem,
                                           const std::string& key, const std::string& transport) {
  const auto [local_kind, target_kind] = memoryKinds(mem);
  auto params = opts.engine_params;
  if (!transport.empty()) params.emplace_back("transport", transport);
  std::string mode = mem == "dram:dram" ? "engine" : "engine " + mem;
  if (!transport.empty()) mode += " over " + transport;
  // --peers: one engine, a peer per target process; --initiators: an engine per bootstrap, all
  // to one target process. Each part has its own buffers.
  const bool engine_per_boot = opts.initiators > 1;
  std::shared_ptr<Engine> engine;
  std::vector<std::unique_ptr<Session>> parts;
  for (size_t i = 0; i < boots.size(); ++i) {
    if (!engine || engine_per_boot) {
      const std::string name =
          "bench-initiator-" + key + (engine_per_boot ? "-" + std::to_string(i) : "");
      auto made = makeEngine(name, params, opts.host);
      if (!made.isOk()) {
        std::fprintf(stderr, "tcpx_bench: %s\n", made.status().toString().c_str());
        return nullptr;
      }
      engine = std::move(made.value());
    }
    auto buffer = allocateBuffer(local_kind, buffer_size, opts.device);
    if (!buffer) return nullptr;
    const std::string peer =
        boots.size() == 1 || engine_per_boot ? "target" : "target-" + std::to_string(i);
    auto session = std::make_unique<EngineSession>(opts, *boots[i], engine, std::move(buffer), mode,
                                                   key, params, peer);
    std::string error;
    if (!session->connect(target_kind, &error)) {
      std::fprintf(stderr, "tcpx_bench: engine session %s: %s\n", mode.c_str(), error.c_str());
      return nullptr;
    }
    parts.push_back(std::move(session));
  }
  return parts.size() == 1
             ? std::move(parts.front())
             : makeFanOutSession(std::move(parts), engine_per_boot ? "initiators" : "peers",
                                 opts.active_peers);
}

namespace {

Result<std::shared_ptr<Engine>> ownEngine(Result<std::unique_ptr<Engine>> made) {
  if (!made.isOk()) return made.status();
  return std::shared_ptr<Engine>(std::move(made.value()));
}

}  // namespace

Result<std::shared_ptr<Engine>> SharedTargetEngines::get(
    const std::string& key, const std::function<Result<std::unique_ptr<Engine>>()>& make) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = engines_.find(key);
  if (it != engines_.end()) return it->second;
  auto engine = ownEngine(make());
  if (engine.isOk()) engines_.emplace(key, engine.value());
  return engine;
}

std::unique_ptr<TargetSide> serveEngine(const Options& opts, Bootstrap& boot,
                                        std::istringstream& args, const std::string& key,
                                        SharedTargetEngines* shared, int conn) {
  std::string params, info_hex, kind;
  uint64_t buffer_size = 0;
  int device = 0;
  args >> params >> buffer_size >> info_hex >> kind >> device;
  auto buffer = allocateBuffer(kind, buffer_size, device);
  if (!buffer) return nullptr;
  const auto make = [&]() { return makeEngine("bench-target", splitParams(params), opts.host); };
  Result<std::shared_ptr<Engine>> engine =
      shared != nullptr ? shared->get(key, make) : ownEngine(make());
  if (!engine.isOk()) {
    std::fprintf(stderr, "tcpx_bench target: %s\n", engine.status().toString().c_str());
    return nullptr;
  }
  const std::string peer =
      shared != nullptr ? "bench-initiator-" + std::to_string(conn) : "bench-initiator";
  auto target = std::make_unique<EngineTarget>(engine.value(), std::move(buffer), peer);
  auto mem = target->registerBuffer();
  if (!mem.isOk()) {
    std::fprintf(stderr, "tcpx_bench target: %s\n", mem.status().toString().c_str());
    return nullptr;
  }
  if (!target->engine().addPeer(peer, fromHex(info_hex).value_or("")).isOk()) return nullptr;
  boot.send(toHex(target->engine().connectionInfo()) + " " +
            toHex(target->engine().memoryDescriptor(mem.value()).value()));
  return target;
}

}  // namespace tcpx::bench
