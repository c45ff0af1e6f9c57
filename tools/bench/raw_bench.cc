// Raw mode: the in-run baseline. The same bytes per iteration move over N plain TCP sockets
// (N = channels x sockets_per_channel of the engine run), each part with its own thread, and an
// iteration ends as the engine's does: WRITE when the receiver acknowledges it has everything,
// READ when the requester has received everything. Transfers below one 64 KiB part use one
// socket and no helper thread: a plain ping-pong round trip.
//
// With --inflight M the same sockets carry M concurrent streams: min(M, N) lanes, each with its
// own share of the sockets and its own slice of the buffers, run their transfers back to back at
// once (every lane is a stream that is never idle: the steady state of M transfers in flight when
// M <= N; with M > N each socket is one lane and its transfers queue behind one another, so a
// raw latency is then one transfer's time without the queueing an engine transfer sees).
#include <algorithm>
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

// A share of the sockets and a slice of the buffer that carry one stream of transfers, with a
// helper thread per socket.
class RawLane {
 public:
  RawLane(std::vector<int> socks, uint8_t* data)
      : socks_(std::move(socks)), data_(data), pool_(static_cast<int>(socks_.size())) {}

  uint8_t* data() { return data_; }

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
    return net::writeAll(socks_[0], &b, 1).isOk();
  }
  bool recvByte() {
    char b = 0;
    return net::readAll(socks_[0], &b, 1).isOk();
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
    return net::writeAll(socks_[static_cast<size_t>(k)], data_ + off, len).isOk();
  }
  bool recvPart(uint64_t bytes, int parts, int k) {
    const auto [off, len] = partOf(bytes, parts, k);
    return net::readAll(socks_[static_cast<size_t>(k)], data_ + off, len).isOk();
  }

  std::vector<int> socks_;  // owned by the RawLink
  uint8_t* data_;
  WorkerPool pool_;
};

// Sockets and buffer, split into lanes (one per stream in flight): the same on both ends.
class RawLink {
 public:
  RawLink(std::vector<net::Fd> socks, uint64_t buffer_size)
      : socks_(std::move(socks)), buffer_(buffer_size, 0) {}

  [[nodiscard]] int sockets() const { return static_cast<int>(socks_.size()); }
  // Whether the buffer holds a slice of `bytes` for every lane of `streams`.
  [[nodiscard]] bool fits(int streams, uint64_t bytes) const {
    return static_cast<uint64_t>(std::max(1, std::min(streams, sockets()))) * bytes <=
           buffer_.size();
  }
  // min(streams, sockets) lanes; lane i takes sockets [i N / L, (i + 1) N / L) and the buffer
  // from i x stride. Made again only when the lane count or stride changes.
  std::vector<std::unique_ptr<RawLane>>& lanes(int streams, uint64_t stride) {
    const int n = std::max(1, std::min(streams, sockets()));
    if (static_cast<int>(lanes_.size()) != n || stride != stride_) {
      lanes_.clear();
      for (int i = 0; i < n; ++i) {
        std::vector<int> fds;
        for (int k = i * sockets() / n; k < (i + 1) * sockets() / n; ++k) {
          fds.push_back(socks_[static_cast<size_t>(k)].get());
        }
        lanes_.push_back(std::make_unique<RawLane>(
            std::move(fds), buffer_.data() + static_cast<uint64_t>(i) * stride));
      }
      stride_ = stride;
    }
    return lanes_;
  }

 private:
  std::vector<net::Fd> socks_;
  tools::HostBuffer buffer_;
  std::vector<std::unique_ptr<RawLane>> lanes_;
  uint64_t stride_ = 0;
};

// Share `count` of transfers of lane `lane` among `lanes` (the first lanes take the remainder).
int shareOf(int count, int lanes, int lane) {
  return count / lanes + (lane < count % lanes ? 1 : 0);
}

// Runs body(lane) for every lane at once (a thread per lane beyond the first); false if any
// returned false.
bool onEveryLane(int lanes, const std::function<bool(int)>& body) {
  if (lanes == 1) return body(0);
  std::vector<char> ok(static_cast<size_t>(lanes), 0);
  std::vector<std::thread> threads;
  for (int i = 1; i < lanes; ++i) {
    threads.emplace_back([&, i] { ok[static_cast<size_t>(i)] = body(i) ? 1 : 0; });
  }
  ok[0] = body(0) ? 1 : 0;
  for (auto& t : threads) t.join();
  return std::all_of(ok.begin(), ok.end(), [](char c) { return c != 0; });
}

class RawSession final : public Session {
 public:
  RawSession(Bootstrap& boot, std::unique_ptr<RawLink> link, int inflight)
      : boot_(boot), link_(std::move(link)), inflight_(inflight) {}
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
    boot_.send(strfmt("POINT R %c %llu %llu %d %d", is_write ? 'W' : 'R',
                      static_cast<unsigned long long>(bytes_),
                      static_cast<unsigned long long>(seed), iterations_per_round, inflight_));
    std::string reply;
    if (!boot_.recv(&reply) || reply != "READY") {
      *error = "target not ready";
      return false;
    }
    for (auto& lane : link_->lanes(inflight_, bytes_)) {
      if (is_write) {
        fillPattern(lane->data(), bytes_, seed);
      } else {
        std::memset(lane->data(), 0x5A, bytes_);
      }
    }
    return true;
  }

  bool runRound(int warmup, int iters, Round* round, std::string* error) override {
    round->latency_us.reserve(static_cast<size_t>(iters));
    // The target serves each lane's share of the warmup and of the timed transfers, then reports.
    boot_.send(strfmt("ROUND R %d %d", warmup, iters));
    auto& lanes = link_->lanes(inflight_, bytes_);
    const int n = static_cast<int>(lanes.size());
    std::vector<std::vector<double>> latency(static_cast<size_t>(n));
    const auto phase = [&](int count, bool timed) {
      return onEveryLane(n, [&](int i) {
        RawLane& lane = *lanes[static_cast<size_t>(i)];
        for (int t = 0; t < shareOf(count, n, i); ++t) {
          const auto a = Clock::now();
          const bool ok = is_write_ ? lane.sendAll(bytes_) && lane.recvByte()
                                    : lane.sendByte() && lane.recvAll(bytes_);
          if (!ok) return false;
          if (timed) latency[static_cast<size_t>(i)].push_back(usSince(a, Clock::now()));
        }
        return true;
      });
    };
    if (!phase(warmup, false)) return fail(error);
    const Clock::time_point start = Clock::now();
    if (!phase(iters, true)) return fail(error);
    round->seconds = usSince(start, Clock::now()) / 1e6;
    for (const auto& samples : latency) {
      round->latency_us.insert(round->latency_us.end(), samples.begin(), samples.end());
    }
    boot_.recv(&verdict_);  // the target's check of what it received
    return true;
  }

  std::string verify() override {
    if (is_write_) return verdict_ == "OK" ? "yes" : "no (" + verdict_ + ")";
    for (auto& lane : link_->lanes(inflight_, bytes_)) {
      const int64_t bad = checkPattern(lane->data(), bytes_, seed_);
      if (bad >= 0) return strfmt("no (byte %lld differs)", static_cast<long long>(bad));
    }
    return "yes";
  }

 private:
  static bool fail(std::string* error) {
    *error = "socket error";
    return false;
  }

  Bootstrap& boot_;
  std::unique_ptr<RawLink> link_;
  int inflight_;
  const std::string mode_ = "raw";
  bool is_write_ = false;
  uint64_t bytes_ = 0, seed_ = 0;
  std::string verdict_;
};

class RawTarget final : public TargetSide {
 public:
  explicit RawTarget(std::unique_ptr<RawLink> link) : link_(std::move(link)) {}

  // POINT R <W|R> <bytes> <seed> <iterations per round> <streams in flight>; then
  // ROUND R <warmup> <iters> serves one round, every lane its shares of both, and reports what
  // arrived.
  bool handle(const std::string& verb, std::istringstream& args, Bootstrap& boot) override {
    if (verb == "POINT") {
      int iterations = 0;  // warmup + iters: ROUND says how they split
      args >> op_ >> bytes_ >> seed_ >> iterations >> inflight_;
      if (inflight_ < 1 || !link_->fits(inflight_, bytes_)) return false;
      for (auto& lane : link_->lanes(inflight_, bytes_)) {
        if (op_ == 'W') {
          std::memset(lane->data(), 0xA5, bytes_);
        } else {
          fillPattern(lane->data(), bytes_, seed_);
        }
      }
      return boot.send("READY");
    }
    if (verb == "ROUND") {
      int warmup = 0, iters = 0;
      args >> warmup >> iters;
      auto& lanes = link_->lanes(inflight_, bytes_);
      const int n = static_cast<int>(lanes.size());
      const auto phase = [&](int count) {
        return onEveryLane(n, [&](int i) {
          RawLane& lane = *lanes[static_cast<size_t>(i)];
          for (int t = 0; t < shareOf(count, n, i); ++t) {
            const bool ok = op_ == 'W' ? lane.recvAll(bytes_) && lane.sendByte()
                                       : lane.recvByte() && lane.sendAll(bytes_);
            if (!ok) return false;
          }
          return true;
        });
      };
      if (!phase(warmup) || !phase(iters)) {
        boot.send("socket error");
        return false;
      }
      int64_t bad = -1;
      for (auto& lane : lanes) {
        if (op_ == 'W' && bad < 0) bad = checkPattern(lane->data(), bytes_, seed_);
      }
      return boot.send(bad < 0 ? "OK" : strfmt("byte %lld differs", static_cast<long long>(bad)));
    }
    return false;
  }

 private:
  std::unique_ptr<RawLink> link_;
  char op_ = 'W';
  uint64_t bytes_ = 0, seed_ = 0;
  int inflight_ = 1;
};

std::unique_ptr<Session> openRawPart(const Options& opts, Bootstrap& boot, uint64_t buffer_size) {
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
  return std::make_unique<RawSession>(
      boot, std::make_unique<RawLink>(std::move(socks), buffer_size), opts.inflight);
}

}  // namespace

std::unique_ptr<Session> openRawSession(const Options& opts, const std::vector<Bootstrap*>& boots,
                                        uint64_t buffer_size) {
  std::vector<std::unique_ptr<Session>> parts;
  for (Bootstrap* boot : boots) {
    parts.push_back(openRawPart(opts, *boot, buffer_size));
    if (!parts.back()) return nullptr;
  }
  return parts.size() == 1
             ? std::move(parts.front())
             : makeFanOutSession(std::move(parts), opts.initiators > 1 ? "initiators" : "peers",
                                 opts.active_peers);
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
