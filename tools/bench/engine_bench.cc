// Engine mode: the sweep through the tcpx_p2p API, initiator and target sides.
#include <sched.h>
#include <stdlib.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <sstream>

#include <tcpx_p2p/tcpx_p2p.h>

#include "bench.h"
#include "common/random.h"
#include "common/strings.h"

namespace tcpx::bench {
namespace {

using Clock = std::chrono::steady_clock;

double usSince(Clock::time_point t0, Clock::time_point t1) {
  return std::chrono::duration<double, std::micro>(t1 - t0).count();
}

struct AlignedBuffer {
  explicit AlignedBuffer(size_t n) : size(n) {
    void* p = nullptr;
    if (posix_memalign(&p, 4096, n) != 0) std::abort();
    data = static_cast<uint8_t*>(p);
    std::memset(data, 0, n);
  }
  ~AlignedBuffer() { std::free(data); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  uint8_t* data;
  size_t size;
};

uint64_t largestTransfer(const Options& opts) {
  uint64_t largest = 4096;
  for (const auto& [block, batch] : sweepPoints(opts)) largest = std::max(largest, block * batch);
  return largest;
}

// Waits for a transfer by polling, as latency-sensitive callers (and nixlbench) do.
Status spinWait(Engine& engine, TransferHandle h) {
  for (;;) {
    Status st = engine.checkTransfer(h);
    if (st.code() != StatusCode::kInProgress) return st;
    sched_yield();
  }
}

}  // namespace

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

std::vector<PointResult> runEngineSweep(const Options& opts, Bootstrap& boot) {
  std::vector<PointResult> results;
  const uint64_t buffer_size = largestTransfer(opts);
  auto engine_or = makeEngine("bench-initiator", opts.engine_params, opts.host);
  if (!engine_or.isOk()) {
    std::fprintf(stderr, "tcpx_bench: %s\n", engine_or.status().toString().c_str());
    return results;
  }
  Engine& engine = *engine_or.value();
  AlignedBuffer buffer(buffer_size);
  const MemoryId mem = engine.registerMemory(buffer.data, buffer.size).value();

  const std::string params = joinParams(opts.engine_params);
  boot.send(strfmt("ENGINE %s %llu %s", params.empty() ? "-" : params.c_str(),
                   static_cast<unsigned long long>(buffer_size),
                   toHex(engine.connectionInfo()).c_str()));
  std::string reply;
  if (!boot.recv(&reply)) return results;
  std::istringstream in(reply);
  std::string info_hex, desc_hex;
  in >> info_hex >> desc_hex;
  Status st = engine.addPeer("target", fromHex(info_hex).value_or(""));
  auto remote = engine.loadRemoteMemory(fromHex(desc_hex).value_or(""));
  if (!st.isOk() || !remote.isOk()) {
    std::fprintf(stderr, "tcpx_bench: target answered with bad connection info or descriptor\n");
    return results;
  }
  const auto t0 = Clock::now();
  st = engine.connect("target");
  if (!st.isOk()) {
    std::fprintf(stderr, "tcpx_bench: connect: %s\n", st.toString().c_str());
    return results;
  }
  progress(opts, "engine connected in %.1f ms", usSince(t0, Clock::now()) / 1000);

  const auto points = sweepPoints(opts);
  size_t index = 0;
  for (const std::string& op_name : opts.ops) {
    const bool is_write = op_name == "write";
    for (const auto& [block, batch] : points) {
      ++index;
      const uint64_t bytes = block * batch;
      PointResult r = startPoint(opts, "engine", is_write, block, batch, index,
                                 points.size() * opts.ops.size());
      const int iters = r.iters;
      const int warmup = warmupFor(opts, iters);
      const uint64_t seed = randomU64();
      boot.send(strfmt(
          "POINT %c %llu %llu %llu", is_write ? 'W' : 'R', static_cast<unsigned long long>(block),
          static_cast<unsigned long long>(batch), static_cast<unsigned long long>(seed)));
      if (!boot.recv(&reply) || reply != "READY") break;
      if (is_write) {
        fillPattern(buffer.data, bytes, seed);
      } else {
        std::memset(buffer.data, 0x5A, bytes);
      }
      std::vector<LocalDesc> local(batch);
      std::vector<RemoteDesc> rdesc(batch);
      for (uint64_t i = 0; i < batch; ++i) {
        local[i] = {mem, i * block, block};
        rdesc[i] = {remote->id, i * block, block};
      }
      const OpKind op = is_write ? OpKind::kWrite : OpKind::kRead;
      // Preparation cost, averaged over a few repetitions.
      std::vector<double> prep;
      TransferHandle h = 0;
      for (int i = 0; i < 5; ++i) {
        const auto p0 = Clock::now();
        auto prepared = engine.prepareTransfer(op, "target", local, rdesc);
        prep.push_back(usSince(p0, Clock::now()));
        if (!prepared.isOk()) {
          std::fprintf(stderr, "tcpx_bench: prepare: %s\n", prepared.status().toString().c_str());
          return results;
        }
        if (i < 4) (void)engine.releaseTransfer(prepared.value());
        h = prepared.value();
      }
      r.avg_prep_us = statsOf(prep).avg;

      std::vector<double> lat, post;
      lat.reserve(static_cast<size_t>(iters));
      post.reserve(static_cast<size_t>(iters));
      Status failure;
      Clock::time_point start;
      for (int i = 0; i < warmup + iters && failure.isOk(); ++i) {
        if (i == warmup) start = Clock::now();
        const auto a = Clock::now();
        failure = engine.postTransfer(h);
        const auto b = Clock::now();
        if (failure.isOk()) {
          failure = opts.block_wait ? engine.waitTransfer(h, std::chrono::minutes(5))
                                    : spinWait(engine, h);
        }
        const auto c = Clock::now();
        if (i >= warmup) {
          post.push_back(usSince(a, b));
          lat.push_back(usSince(a, c));
        }
      }
      const double seconds = usSince(start, Clock::now()) / 1e6;
      (void)engine.releaseTransfer(h);
      if (!failure.isOk()) {
        std::fprintf(stderr, "tcpx_bench: %s %s x %llu failed: %s\n", r.op.c_str(),
                     formatBytes(block).c_str(), static_cast<unsigned long long>(batch),
                     failure.toString().c_str());
        r.iters = 0;
        results.push_back(r);
        boot.send("SKIP");
        boot.recv(&reply);
        break;
      }
      r.gbps = static_cast<double>(bytes) * iters / seconds / 1e9;
      const Stats s = statsOf(lat);
      r.avg_lat_us = s.avg;
      r.p50_lat_us = s.p50;
      r.p99_lat_us = s.p99;
      r.avg_post_us = statsOf(post).avg;
      if (!opts.verify) {
        r.verified = "-";
        boot.send("SKIP");
        boot.recv(&reply);
      } else if (is_write) {
        boot.send("VERIFY");
        boot.recv(&reply);
        r.verified = reply == "OK" ? "yes" : "no (" + reply + ")";
      } else {
        boot.send("SKIP");
        boot.recv(&reply);
        const int64_t bad = checkPattern(buffer.data, bytes, seed);
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

bool serveEngine(const Options& opts, Bootstrap& boot, const std::string& first_message) {
  std::istringstream in(first_message);
  std::string word, params, info_hex;
  uint64_t buffer_size = 0;
  in >> word >> params >> buffer_size >> info_hex;
  auto engine_or = makeEngine("bench-target", splitParams(params == "-" ? "" : params), opts.host);
  if (!engine_or.isOk()) {
    std::fprintf(stderr, "tcpx_bench target: %s\n", engine_or.status().toString().c_str());
    return false;
  }
  Engine& engine = *engine_or.value();
  AlignedBuffer buffer(buffer_size);
  const MemoryId mem = engine.registerMemory(buffer.data, buffer.size).value();
  if (!engine.addPeer("bench-initiator", fromHex(info_hex).value_or("")).isOk()) return false;
  boot.send(toHex(engine.connectionInfo()) + " " + toHex(engine.memoryDescriptor(mem).value()));

  std::string message;
  uint64_t bytes = 0, seed = 0;
  while (boot.recv(&message)) {
    std::istringstream cmd(message);
    cmd >> word;
    if (word == "POINT") {
      char op = 0;
      uint64_t block = 0, batch = 0;
      cmd >> op >> block >> batch >> seed;
      bytes = block * batch;
      if (op == 'W') {
        std::memset(buffer.data, 0xA5, bytes);
      } else {
        fillPattern(buffer.data, bytes, seed);
      }
      boot.send("READY");
    } else if (word == "VERIFY") {
      const int64_t bad = checkPattern(buffer.data, bytes, seed);
      boot.send(bad < 0 ? "OK" : strfmt("byte %lld differs", static_cast<long long>(bad)));
    } else if (word == "SKIP") {
      boot.send("OK");
    } else if (word == "END") {
      boot.send("ENDED");
      return true;
    } else {
      return false;
    }
  }
  return false;
}

}  // namespace tcpx::bench
