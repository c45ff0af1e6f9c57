// Tables (nixlbench's columns) and JSON lines.
#include <algorithm>
#include <cstdio>
#include <map>

#include "bench.h"
#include "common/strings.h"

namespace tcpx::bench {

PointResult startPoint(const Options& opts, const char* mode, bool is_write, uint64_t block,
                       uint64_t batch, size_t index, size_t total) {
  PointResult r;
  r.mode = mode;
  r.op = is_write ? "WRITE" : "READ";
  r.block = block;
  r.batch = batch;
  r.iters = itersFor(opts, block * batch);
  progress(opts, "[%zu/%zu] %s %s %s x %llu, %d iterations", index, total, mode, r.op.c_str(),
           formatBytes(block).c_str(), static_cast<unsigned long long>(batch), r.iters);
  return r;
}

std::vector<PointResult> medianOf(const std::vector<std::vector<PointResult>>& runs) {
  if (runs.empty()) return {};
  std::vector<PointResult> out;
  for (size_t i = 0; i < runs.front().size(); ++i) {
    std::vector<PointResult> samples;
    for (const auto& run : runs) {
      if (i < run.size()) samples.push_back(run[i]);
    }
    // A failed or unverified repetition wins: it must show.
    auto bad = std::find_if(samples.begin(), samples.end(), [](const PointResult& r) {
      return r.iters == 0 || r.verified.rfind("no", 0) == 0;
    });
    if (bad != samples.end()) {
      out.push_back(*bad);
      continue;
    }
    std::sort(samples.begin(), samples.end(),
              [](const PointResult& a, const PointResult& b) { return a.gbps < b.gbps; });
    out.push_back(samples[samples.size() / 2]);
  }
  return out;
}

void printTable(const std::vector<PointResult>& results, const std::string& title) {
  std::printf("\n%s\n", title.c_str());
  std::printf("%-6s %14s %7s %12s %13s %13s %13s %13s %13s %9s\n", "Op", "Block Size (B)", "Batch",
              "B/W (GB/s)", "Avg Lat (us)", "P50 Lat (us)", "P99 Lat (us)", "Avg Prep (us)",
              "Avg Post (us)", "Verified");
  for (const PointResult& r : results) {
    if (r.iters == 0) {
      std::printf("%-6s %14llu %7llu  FAILED\n", r.op.c_str(),
                  static_cast<unsigned long long>(r.block),
                  static_cast<unsigned long long>(r.batch));
      continue;
    }
    const bool engine = r.mode == "engine";
    std::printf("%-6s %14llu %7llu %12.3f %13.1f %13.1f %13.1f %13s %13s %9s\n", r.op.c_str(),
                static_cast<unsigned long long>(r.block), static_cast<unsigned long long>(r.batch),
                r.gbps, r.avg_lat_us, r.p50_lat_us, r.p99_lat_us,
                engine ? strfmt("%.1f", r.avg_prep_us).c_str() : "-",
                engine ? strfmt("%.1f", r.avg_post_us).c_str() : "-", r.verified.c_str());
  }
  std::fflush(stdout);
}

void printComparison(const std::vector<PointResult>& engine, const std::vector<PointResult>& raw) {
  std::map<std::tuple<std::string, uint64_t, uint64_t>, const PointResult*> by_key;
  for (const PointResult& r : raw) by_key[{r.op, r.block, r.batch}] = &r;
  std::printf("\nengine vs raw TCP, same run\n");
  std::printf("%-6s %14s %7s %16s %18s\n", "Op", "Block Size (B)", "Batch", "B/W engine/raw",
              "P50 lat engine/raw");
  for (const PointResult& e : engine) {
    auto it = by_key.find({e.op, e.block, e.batch});
    if (it == by_key.end() || e.iters == 0 || it->second->iters == 0) continue;
    const PointResult& r = *it->second;
    std::printf("%-6s %14llu %7llu %15.1f%% %17.2fx\n", e.op.c_str(),
                static_cast<unsigned long long>(e.block), static_cast<unsigned long long>(e.batch),
                100.0 * e.gbps / r.gbps, e.p50_lat_us / r.p50_lat_us);
  }
  std::fflush(stdout);
}

void writeJson(const std::string& path, const std::vector<PointResult>& results) {
  FILE* f = std::fopen(path.c_str(), "a");
  if (f == nullptr) {
    std::fprintf(stderr, "tcpx_bench: cannot write %s\n", path.c_str());
    return;
  }
  for (const PointResult& r : results) {
    std::fprintf(
        f,
        "{\"mode\":\"%s\",\"op\":\"%s\",\"block_size\":%llu,\"batch_size\":%llu,"
        "\"iterations\":%d,\"gbps\":%.4f,\"avg_lat_us\":%.2f,\"p50_lat_us\":%.2f,"
        "\"p99_lat_us\":%.2f,\"avg_prep_us\":%.2f,\"avg_post_us\":%.2f,\"verified\":\"%s\"}\n",
        r.mode.c_str(), r.op.c_str(), static_cast<unsigned long long>(r.block),
        static_cast<unsigned long long>(r.batch), r.iters, r.gbps, r.avg_lat_us, r.p50_lat_us,
        r.p99_lat_us, r.avg_prep_us, r.avg_post_us, r.verified.c_str());
  }
  std::fclose(f);
}

}  // namespace tcpx::bench
