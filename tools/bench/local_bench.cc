// Local modes, both in the initiator's process: "local" moves data between an engine and itself
// (the engine added as its own peer, as NIXL's local transfers do), "copy" is the baseline it is
// measured against: the same bytes copied by one thread (memcpy between host buffers, cudaMemcpy
// when GPU memory is involved, waited for).
#include <cstring>
#include <optional>

#include "bench.h"
#include "common/strings.h"

namespace tcpx::bench {
namespace {

constexpr uint8_t kPoison = 0xEE;

// The two buffers of a local session and the point they are set up for: the source holds the
// pattern, the destination is poisoned before every round.
class LocalBuffers {
 public:
  LocalBuffers(std::unique_ptr<tools::PatternMemory> local,
               std::unique_ptr<tools::PatternMemory> target)
      : local_(std::move(local)), target_(std::move(target)) {}

  void setPoint(bool is_write, uint64_t bytes, uint64_t seed) {
    is_write_ = is_write;
    bytes_ = bytes;
    seed_ = seed;
    source().fill(0, bytes, seed);
  }
  void poison() { destination().fillByte(0, bytes_, kPoison); }
  [[nodiscard]] std::string verify() const {
    const int64_t bad = destination().check(0, bytes_, seed_);
    return bad < 0 ? "yes" : strfmt("no (byte %lld)", static_cast<long long>(bad));
  }
  [[nodiscard]] tools::PatternMemory& local() const { return *local_; }
  [[nodiscard]] tools::PatternMemory& target() const { return *target_; }
  // WRITE: local -> target; READ: target -> local.
  [[nodiscard]] tools::PatternMemory& source() const { return is_write_ ? *local_ : *target_; }
  [[nodiscard]] tools::PatternMemory& destination() const { return is_write_ ? *target_ : *local_; }

 private:
  std::unique_ptr<tools::PatternMemory> local_;
  std::unique_ptr<tools::PatternMemory> target_;
  bool is_write_ = true;
  uint64_t bytes_ = 0;
  uint64_t seed_ = 0;
};

class LocalSession final : public Session {
 public:
  LocalSession(const Options& opts, std::string mode, std::unique_ptr<Engine> engine,
               LocalBuffers buffers)
      : opts_(opts),
        mode_(std::move(mode)),
        engine_(std::move(engine)),
        buffers_(std::move(buffers)) {}
  ~LocalSession() override {
    if (handle_ != 0) (void)engine_->releaseTransfer(handle_);
  }
  LocalSession(const LocalSession&) = delete;
  LocalSession& operator=(const LocalSession&) = delete;

  bool open(std::string* error) {
    Status st = engine_->addPeer(engine_->name(), engine_->connectionInfo());
    if (!st.isOk()) return fail(error, "adding the engine as its own peer: " + st.toString());
    for (tools::PatternMemory* m : {&buffers_.local(), &buffers_.target()}) {
      auto id = engine_->registerMemory(m->data(), m->size(), m->kind(), m->device());
      if (!id.isOk()) return fail(error, "registering memory: " + id.status().toString());
      (m == &buffers_.local() ? local_id_ : target_id_) = id.value();
    }
    auto remote = engine_->loadRemoteMemory(engine_->memoryDescriptor(target_id_).value());
    if (!remote.isOk())
      return fail(error, "loading its own descriptor: " + remote.status().toString());
    remote_id_ = remote->id;
    return true;
  }

  [[nodiscard]] const std::string& mode() const override { return mode_; }
  bool preparePoint(bool is_write, uint64_t block, uint64_t batch, uint64_t seed,
                    int /*iterations_per_round*/, std::string* error) override {
    buffers_.setPoint(is_write, block * batch, seed);
    buffers_.poison();
    if (handle_ != 0) (void)engine_->releaseTransfer(handle_);
    handle_ = 0;
    std::vector<LocalDesc> local;
    std::vector<RemoteDesc> remote;
    for (uint64_t i = 0; i < batch; ++i) {
      local.push_back({local_id_, i * block, block});
      remote.push_back({remote_id_, i * block, block});
    }
    const auto t0 = Clock::now();
    auto h = engine_->prepareTransfer(is_write ? OpKind::kWrite : OpKind::kRead, engine_->name(),
                                      local, remote);
    prep_us_.push_back(usSince(t0, Clock::now()));
    if (!h.isOk()) return fail(error, h.status().toString());
    handle_ = h.value();
    return true;
  }
  bool runRound(int warmup, int iters, Round* round, std::string* error) override {
    return timeTransfers(opts_, *engine_, handle_, warmup, iters, round, error);
  }
  std::string verify() override { return buffers_.verify(); }
  [[nodiscard]] std::vector<double> prepSamples() const override { return prep_us_; }

 private:
  static bool fail(std::string* error, const std::string& why) {
    *error = why;
    return false;
  }

  const Options& opts_;
  std::string mode_;
  std::unique_ptr<Engine> engine_;
  LocalBuffers buffers_;
  MemoryId local_id_ = 0;
  MemoryId target_id_ = 0;
  MemoryId remote_id_ = 0;
  TransferHandle handle_ = 0;
  std::vector<double> prep_us_;
};

class CopySession final : public Session {
 public:
  CopySession(std::string mode, LocalBuffers buffers)
      : mode_(std::move(mode)), buffers_(std::move(buffers)) {}
  [[nodiscard]] const std::string& mode() const override { return mode_; }
  bool preparePoint(bool is_write, uint64_t block, uint64_t batch, uint64_t seed,
                    int /*iterations_per_round*/, std::string* /*error*/) override {
    buffers_.setPoint(is_write, block * batch, seed);
    buffers_.poison();
    block_ = block;
    batch_ = batch;
    return true;
  }
  bool runRound(int warmup, int iters, Round* round, std::string* error) override {
    const tools::PatternMemory& src = buffers_.source();
    const tools::PatternMemory& dst = buffers_.destination();
    const bool host = src.device() < 0 && dst.device() < 0;
    return timeRound(
        warmup, iters, round, error,
        [&] {
          // One copy per descriptor, as the transfer has.
          for (uint64_t i = 0; i < batch_; ++i) {
            if (host) {
              std::memcpy(dst.data() + i * block_, src.data() + i * block_, block_);
            } else if (!tools::copyBytes(dst.data() + i * block_, src.data() + i * block_,
                                         block_)) {
              return std::string("cudaMemcpy failed");
            }
          }
          return std::string();
        },
        [] { return std::string(); });
  }
  std::string verify() override { return buffers_.verify(); }

 private:
  std::string mode_;
  LocalBuffers buffers_;
  uint64_t block_ = 0;
  uint64_t batch_ = 0;
};

// Both buffers of a local session, or nullopt (with a message) when there is no such GPU.
std::optional<LocalBuffers> localBuffers(const Options& opts, uint64_t buffer_size,
                                         const std::string& mem) {
  const auto [local_kind, target_kind] = memoryKinds(mem);
  auto local = allocateBuffer(local_kind, buffer_size, opts.device);
  auto target = allocateBuffer(target_kind, buffer_size, opts.target_device);
  if (!local || !target) return std::nullopt;
  return LocalBuffers(std::move(local), std::move(target));
}

}  // namespace

std::unique_ptr<Session> openLocalSession(const Options& opts, uint64_t buffer_size,
                                          const std::string& mem) {
  auto buffers = localBuffers(opts, buffer_size, mem);
  if (!buffers) return nullptr;
  auto engine = makeEngine("bench-local", opts.engine_params, "127.0.0.1");
  if (!engine.isOk()) {
    std::fprintf(stderr, "tcpx_bench: local engine: %s\n", engine.status().toString().c_str());
    return nullptr;
  }
  auto session = std::make_unique<LocalSession>(opts, mem == "dram:dram" ? "local" : "local " + mem,
                                                std::move(engine.value()), std::move(*buffers));
  std::string error;
  if (!session->open(&error)) {
    std::fprintf(stderr, "tcpx_bench: local session: %s\n", error.c_str());
    return nullptr;
  }
  return session;
}

std::unique_ptr<Session> openCopySession(const Options& opts, uint64_t buffer_size,
                                         const std::string& mem) {
  auto buffers = localBuffers(opts, buffer_size, mem);
  if (!buffers) return nullptr;
  return std::make_unique<CopySession>(mem == "dram:dram" ? "copy" : "copy " + mem,
                                       std::move(*buffers));
}

}  // namespace tcpx::bench
