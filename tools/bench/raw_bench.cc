// Raw mode: the in-run baseline. The same bytes per iteration move over N plain TCP sockets
// (N = channels x sockets_per_channel of the engine run), each part with its own thread, and an
// iteration ends as the engine's does: WRITE when the receiver acknowledges it has everything,
// READ when the requester has received everything. Transfers below one 64 KiB part use one
// socket and no helper thread: a plain ping-pong round trip.
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <mutex>
#include <sys/socket.h>
#include <thread>

#include "bench.h"
#include "common/pattern_memory.h"
#include "common/random.h"
#include "common/strings.h"

namespace tcpx::bench {
namespace {

constexpr uint64_t kMinPart = 64ULL * 1024;

// Runs fn(k) on worker k for every k < parts, in parallel, and waits for all.
class WorkerPool {
 public:
  explicit WorkerPool(int n) {
    for (int k = 0; k < n; ++k) threads_.emplace_back([this, k] { loop(k); });
  }
  ~WorkerPool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      ++generation_;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  // Returns false if any part failed.
  bool run(int parts, const std::function<bool(int)>& fn) {
    std::unique_lock<std::mutex> lock(mu_);
    fn_ = &fn;
    parts_ = parts;
    pending_ = parts;
    ok_ = true;
    ++generation_;
    cv_.notify_all();
    done_cv_.wait(lock, [this] { return pending_ == 0; });
    return ok_;
  }

 private:
  void loop(int k) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<bool(int)>* fn = nullptr;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (stop_) return;
        if (k >= parts_) continue;
        fn = fn_;
      }
      const bool ok = (*fn)(k);
      std::lock_guard<std::mutex> lock(mu_);
      ok_ = ok_ && ok;
      if (--pending_ == 0) done_cv_.notify_one();
    }
  }
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  uint64_t generation_ = 0;
  const std::function<bool(int)>* fn_ = nullptr;
  int parts_ = 0;
  int pending_ = 0;
  bool ok_ = true;
  bool stop_ = false;
};

// Sockets, buffer and helper threads: the same on both ends.
class RawLink {
 public:
  RawLink(std::vector<net::Fd> socks, uint64_t buffer_size)
      : socks_(std::move(socks)), buffer_(buffer_size, 0), pool_(static_cast<int>(socks_.size())) {}

  uint8_t* data() { return buffer_.data(); }

  bool sendAll(uint64_t bytes) {
    const int parts = partsFor(bytes);
    if (parts == 1) return sendPart(bytes, 1, 0);
    return pool_.run(parts, [&](int k) { return sendPart(bytes, parts, k); });
  }
  bool recvAll(uint64_t bytes) {
    const int parts = partsFor(bytes);
    if (parts == 1) return recvPart(bytes, 1, 0);
    return pool_.run(parts, [&](int k) { return recvPart(bytes, parts, k); });
  }
  bool sendByte() {
    const char b = 1;
    return net::writeAll(socks_[0].get(), &b, 1).isOk();
  }
  bool recvByte() {
    char b = 0;
    return net::readAll(socks_[0].get(), &b, 1).isOk();
  }

 private:
  int partsFor(uint64_t bytes) const {
    return static_cast<int>(
        std::min<uint64_t>(socks_.size(), std::max<uint64_t>(1, bytes / kMinPart)));
  }
  static std::pair<uint64_t, uint64_t> partOf(uint64_t bytes, int parts, int k) {
    const uint64_t b = bytes * static_cast<uint64_t>(k) / static_cast<uint64_t>(parts);
    const uint64_t e = bytes * static_cast<uint64_t>(k + 1) / static_cast<uint64_t>(parts);
    return {b, e - b};
  }
  bool sendPart(uint64_t bytes, int parts, int k) {
    const auto [off, len] = partOf(bytes, parts, k);
    return net::writeAll(socks_[static_cast<size_t>(k)].get(), buffer_.data() + off, len).isOk();
  }
  bool recvPart(uint64_t bytes, int parts, int k) {
    const auto [off, len] = partOf(bytes, parts, k);
    return net::readAll(socks_[static_cast<size_t>(k)].get(), buffer_.data() + off, len).isOk();
  }

  std::vector<net::Fd> socks_;
  tools::HostBuffer buffer_;
  WorkerPool pool_;
};

class RawSession final : public Session {
 public:
  RawSession(Bootstrap& boot, std::unique_ptr<RawLink> link)
      : boot_(boot), link_(std::move(link)) {}
  ~RawSession() override {
    std::string reply;
    boot_.send("END R");
    boot_.recv(&reply);
  }

  [[nodiscard]] const std::string& mode() const override { return mode_; }

  bool preparePoint(bool is_write, uint64_t block, uint64_t batch, uint64_t seed,
                    int iterations_per_round, std::string* error) override {
    is_write_ = is_write;
    bytes_ = block * batch;
    seed_ = seed;
    boot_.send(strfmt("POINT R %c %llu %llu %d", is_write ? 'W' : 'R',
                      static_cast<unsigned long long>(bytes_),
                      static_cast<unsigned long long>(seed), iterations_per_round));
    std::string reply;
    if (!boot_.recv(&reply) || reply != "READY") {
      *error = "target not ready";
      return false;
    }
    if (is_write) {
      fillPattern(link_->data(), bytes_, seed);
    } else {
      std::memset(link_->data(), 0x5A, bytes_);
    }
    return true;
  }

  bool runRound(int warmup, int iters, Round* round, std::string* error) override {
    round->latency_us.reserve(static_cast<size_t>(iters));
    boot_.send("ROUND R");  // the target serves warmup + iters iterations, then reports
    Clock::time_point start;
    for (int i = 0; i < warmup + iters; ++i) {
      if (i == warmup) start = Clock::now();
      const auto a = Clock::now();
      const bool ok = is_write_ ? link_->sendAll(bytes_) && link_->recvByte()
                                : link_->sendByte() && link_->recvAll(bytes_);
      if (!ok) {
        *error = "socket error";
        return false;
      }
      if (i >= warmup) round->latency_us.push_back(usSince(a, Clock::now()));
    }
    round->seconds = usSince(start, Clock::now()) / 1e6;
    boot_.recv(&verdict_);  // the target's check of what it received
    return true;
  }

  std::string verify() override {
    if (is_write_) return verdict_ == "OK" ? "yes" : "no (" + verdict_ + ")";
    const int64_t bad = checkPattern(link_->data(), bytes_, seed_);
    return bad < 0 ? "yes" : strfmt("no (byte %lld differs)", static_cast<long long>(bad));
  }

 private:
  Bootstrap& boot_;
  std::unique_ptr<RawLink> link_;
  const std::string mode_ = "raw";
  bool is_write_ = false;
  uint64_t bytes_ = 0, seed_ = 0;
  std::string verdict_;
};

class RawTarget final : public TargetSide {
 public:
  explicit RawTarget(std::unique_ptr<RawLink> link) : link_(std::move(link)) {}

  // POINT R <W|R> <bytes> <seed> <iterations per round>; then ROUND R serves one round and
  // reports what arrived.
  bool handle(const std::string& verb, std::istringstream& args, Bootstrap& boot) override {
    if (verb == "POINT") {
      args >> op_ >> bytes_ >> seed_ >> iterations_;
      if (op_ == 'W') {
        std::memset(link_->data(), 0xA5, bytes_);
      } else {
        fillPattern(link_->data(), bytes_, seed_);
      }
      return boot.send("READY");
    }
    if (verb == "ROUND") {
      bool ok = true;
      for (int i = 0; i < iterations_ && ok; ++i) {
        ok = op_ == 'W' ? link_->recvAll(bytes_) && link_->sendByte()
                        : link_->recvByte() && link_->sendAll(bytes_);
      }
      if (!ok) {
        boot.send("socket error");
        return false;
      }
      const int64_t bad = op_ == 'W' ? checkPattern(link_->data(), bytes_, seed_) : -1;
      return boot.send(bad < 0 ? "OK" : strfmt("byte %lld differs", static_cast<long long>(bad)));
    }
    return false;
  }

 private:
  std::unique_ptr<RawLink> link_;
  char op_ = 'W';
  uint64_t bytes_ = 0, seed_ = 0;
  int iterations_ = 0;
};

}  // namespace

std::unique_ptr<Session> openRawSession(const Options& opts, Bootstrap& boot,
                                        uint64_t buffer_size) {
  const int nsock = socketCount(opts.engine_params);
  boot.send(strfmt("RAW %d %llu", nsock, static_cast<unsigned long long>(buffer_size)));
  std::string reply;
  if (!boot.recv(&reply)) return nullptr;
  auto addr = net::resolve(opts.host, static_cast<uint16_t>(std::stoul(reply)));
  if (!addr.isOk()) return nullptr;
  std::vector<net::Fd> socks;
  for (int k = 0; k < nsock; ++k) {
    net::Fd fd(::socket(addr->family(), SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (::connect(fd.get(), addr->raw(), addr->len) != 0) return nullptr;
    (void)net::setNoDelay(fd.get());
    const uint32_t index = static_cast<uint32_t>(k);
    if (!net::writeAll(fd.get(), &index, sizeof(index)).isOk()) return nullptr;
    socks.push_back(std::move(fd));
  }
  return std::make_unique<RawSession>(boot,
                                      std::make_unique<RawLink>(std::move(socks), buffer_size));
}

std::unique_ptr<TargetSide> serveRaw(const Options& opts, Bootstrap& boot,
                                     std::istringstream& args) {
  int nsock = 0;
  uint64_t buffer_size = 0;
  args >> nsock >> buffer_size;
  if (nsock <= 0 || nsock > 1024) return nullptr;
  auto addr = net::resolve(opts.host == "127.0.0.1" ? opts.host : "", 0);
  auto listener = net::listenTcp(&addr.value(), nsock);
  if (!listener.isOk()) return nullptr;
  boot.send(std::to_string(addr->port()));
  std::vector<net::Fd> socks(static_cast<size_t>(nsock));
  for (int k = 0; k < nsock; ++k) {
    net::Fd fd(::accept(listener->get(), nullptr, nullptr));
    uint32_t index = 0;
    if (!fd.valid() || !net::readAll(fd.get(), &index, sizeof(index)).isOk() ||
        index >= static_cast<uint32_t>(nsock)) {
      return nullptr;
    }
    (void)net::setNoDelay(fd.get());
    socks[index] = std::move(fd);
  }
  return std::make_unique<RawTarget>(std::make_unique<RawLink>(std::move(socks), buffer_size));
}

}  // namespace tcpx::bench
