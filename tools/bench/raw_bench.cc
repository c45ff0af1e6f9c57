// Raw mode: the in-run baseline. The same bytes per iteration move over N plain TCP sockets
// (N = channels x sockets_per_channel of the engine run), each part with its own thread, and an
// iteration ends as the engine's does: WRITE when the receiver acknowledges it has everything,
// READ when the requester has received everything. Transfers below one 64 KiB part use one
// socket and no helper thread: a plain ping-pong round trip.
#include <stdlib.h>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <mutex>
#include <netinet/in.h>
#include <sstream>
#include <sys/socket.h>
#include <thread>

#include "bench.h"
#include "common/random.h"
#include "common/strings.h"

namespace tcpx::bench {
namespace {

using Clock = std::chrono::steady_clock;
constexpr uint64_t kMinPart = 64ULL * 1024;

// Runs fn(k) on worker k for every k, in parallel, and waits for all.
class WorkerPool {
 public:
  explicit WorkerPool(int n) {
    for (int k = 0; k < n; ++k) {
      threads_.emplace_back([this, k] { loop(k); });
    }
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

struct Part {
  uint64_t offset, length;
};

Part partOf(uint64_t bytes, int parts, int k) {
  const uint64_t b = bytes * static_cast<uint64_t>(k) / static_cast<uint64_t>(parts);
  const uint64_t e = bytes * static_cast<uint64_t>(k + 1) / static_cast<uint64_t>(parts);
  return {b, e - b};
}

int partsFor(uint64_t bytes, int sockets) {
  return static_cast<int>(std::min<uint64_t>(sockets, std::max<uint64_t>(1, bytes / kMinPart)));
}

// Both ends of the raw run: sockets, buffer and a pool.
struct RawSide {
  std::vector<net::Fd> socks;
  uint8_t* buffer = nullptr;
  std::unique_ptr<WorkerPool> pool;
  ~RawSide() { std::free(buffer); }

  bool sendPart(uint64_t bytes, int parts, int k) {
    const Part p = partOf(bytes, parts, k);
    return net::writeAll(socks[static_cast<size_t>(k)].get(), buffer + p.offset, p.length).isOk();
  }
  bool recvPart(uint64_t bytes, int parts, int k) {
    const Part p = partOf(bytes, parts, k);
    return net::readAll(socks[static_cast<size_t>(k)].get(), buffer + p.offset, p.length).isOk();
  }
  bool sendAll(uint64_t bytes) {
    const int parts = partsFor(bytes, static_cast<int>(socks.size()));
    if (parts == 1) return sendPart(bytes, 1, 0);
    return pool->run(parts, [&](int k) { return sendPart(bytes, parts, k); });
  }
  bool recvAll(uint64_t bytes) {
    const int parts = partsFor(bytes, static_cast<int>(socks.size()));
    if (parts == 1) return recvPart(bytes, 1, 0);
    return pool->run(parts, [&](int k) { return recvPart(bytes, parts, k); });
  }
  bool sendByte() {
    const char b = 1;
    return net::writeAll(socks[0].get(), &b, 1).isOk();
  }
  bool recvByte() {
    char b = 0;
    return net::readAll(socks[0].get(), &b, 1).isOk();
  }
};

double usSince(Clock::time_point t0, Clock::time_point t1) {
  return std::chrono::duration<double, std::micro>(t1 - t0).count();
}

uint64_t largest(const Options& opts) {
  uint64_t out = 4096;
  for (const auto& [block, batch] : sweepPoints(opts)) out = std::max(out, block * batch);
  return out;
}

uint8_t* allocate(uint64_t bytes) {
  void* p = nullptr;
  if (posix_memalign(&p, 4096, bytes) != 0) std::abort();
  std::memset(p, 0, bytes);
  return static_cast<uint8_t*>(p);
}

}  // namespace

std::vector<PointResult> runRawSweep(const Options& opts, Bootstrap& boot) {
  std::vector<PointResult> results;
  const int nsock = socketCount(opts.engine_params);
  const uint64_t buffer_size = largest(opts);
  boot.send(strfmt("RAW %d %llu", nsock, static_cast<unsigned long long>(buffer_size)));
  std::string reply;
  if (!boot.recv(&reply)) return results;
  const uint16_t port = static_cast<uint16_t>(std::stoul(reply));
  auto addr = net::resolve(opts.host, port);
  RawSide side;
  side.buffer = allocate(buffer_size);
  for (int k = 0; k < nsock; ++k) {
    net::Fd fd(::socket(addr->family(), SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (::connect(fd.get(), addr->raw(), addr->len) != 0) return results;
    (void)net::setNoDelay(fd.get());
    const uint32_t index = static_cast<uint32_t>(k);
    if (!net::writeAll(fd.get(), &index, sizeof(index)).isOk()) return results;
    side.socks.push_back(std::move(fd));
  }
  side.pool = std::make_unique<WorkerPool>(nsock);

  const auto points = sweepPoints(opts);
  size_t index = 0;
  for (const std::string& op_name : opts.ops) {
    const bool is_write = op_name == "write";
    for (const auto& [block, batch] : points) {
      ++index;
      const uint64_t bytes = block * batch;
      PointResult r =
          startPoint(opts, "raw", is_write, block, batch, index, points.size() * opts.ops.size());
      const int iters = r.iters;
      const int warmup = warmupFor(opts, iters);
      const uint64_t seed = randomU64();
      boot.send(strfmt("POINT %c %llu %d %llu", is_write ? 'W' : 'R',
                       static_cast<unsigned long long>(bytes), warmup + iters,
                       static_cast<unsigned long long>(seed)));
      if (!boot.recv(&reply) || reply != "READY") break;
      if (is_write) fillPattern(side.buffer, bytes, seed);
      std::vector<double> lat;
      lat.reserve(static_cast<size_t>(iters));
      bool ok = true;
      Clock::time_point start;
      for (int i = 0; i < warmup + iters && ok; ++i) {
        if (i == warmup) start = Clock::now();
        const auto a = Clock::now();
        ok = is_write ? side.sendAll(bytes) && side.recvByte()
                      : side.sendByte() && side.recvAll(bytes);
        if (i >= warmup) lat.push_back(usSince(a, Clock::now()));
      }
      const double seconds = usSince(start, Clock::now()) / 1e6;
      boot.recv(&reply);  // the target's verdict
      if (!ok) {
        std::fprintf(stderr, "tcpx_bench: raw %s failed\n", r.op.c_str());
        r.iters = 0;
        results.push_back(r);
        break;
      }
      r.gbps = static_cast<double>(bytes) * iters / seconds / 1e9;
      const Stats s = statsOf(lat);
      r.avg_lat_us = s.avg;
      r.p50_lat_us = s.p50;
      r.p99_lat_us = s.p99;
      if (!opts.verify) {
        r.verified = "-";
      } else if (is_write) {
        r.verified = reply == "OK" ? "yes" : "no (" + reply + ")";
      } else {
        const int64_t bad = checkPattern(side.buffer, bytes, seed);
        r.verified =
            bad < 0 ? "yes" : strfmt("no (byte %lld differs)", static_cast<long long>(bad));
      }
      results.push_back(r);
    }
  }
  boot.send("END");
  boot.recv(&reply);
  return results;
}

bool serveRaw(const Options& opts, Bootstrap& boot, const std::string& first_message) {
  std::istringstream in(first_message);
  std::string word;
  int nsock = 0;
  uint64_t buffer_size = 0;
  in >> word >> nsock >> buffer_size;
  if (word != "RAW" || nsock <= 0 || nsock > 1024) return false;
  auto addr = net::resolve(opts.host == "127.0.0.1" ? opts.host : "", 0);
  auto listener = net::listenTcp(&addr.value(), nsock);
  if (!listener.isOk()) return false;
  boot.send(std::to_string(addr->port()));
  RawSide side;
  side.buffer = allocate(buffer_size);
  side.socks.resize(static_cast<size_t>(nsock));
  for (int k = 0; k < nsock; ++k) {
    net::Fd fd(::accept(listener->get(), nullptr, nullptr));
    uint32_t index = 0;
    if (!fd.valid() || !net::readAll(fd.get(), &index, sizeof(index)).isOk() ||
        index >= static_cast<uint32_t>(nsock)) {
      return false;
    }
    (void)net::setNoDelay(fd.get());
    side.socks[index] = std::move(fd);
  }
  side.pool = std::make_unique<WorkerPool>(nsock);

  std::string message;
  while (boot.recv(&message)) {
    std::istringstream cmd(message);
    cmd >> word;
    if (word == "END") {
      boot.send("ENDED");
      return true;
    }
    if (word != "POINT") return false;
    char op = 0;
    uint64_t bytes = 0, seed = 0;
    int rounds = 0;
    cmd >> op >> bytes >> rounds >> seed;
    if (op == 'W') {
      std::memset(side.buffer, 0xA5, bytes);
    } else {
      fillPattern(side.buffer, bytes, seed);
    }
    boot.send("READY");
    bool ok = true;
    for (int i = 0; i < rounds && ok; ++i) {
      ok = op == 'W' ? side.recvAll(bytes) && side.sendByte()
                     : side.recvByte() && side.sendAll(bytes);
    }
    if (!ok) {
      boot.send("socket error");
      return false;
    }
    const int64_t bad = op == 'W' ? checkPattern(side.buffer, bytes, seed) : -1;
    boot.send(bad < 0 ? "OK" : strfmt("byte %lld differs", static_cast<long long>(bad)));
  }
  return false;
}

}  // namespace tcpx::bench
