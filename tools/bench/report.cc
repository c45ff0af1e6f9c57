// Statistics, tables (nixlbench's columns) and JSON lines.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>

#include "bench.h"
#include "common/strings.h"

namespace tcpx::bench {

double median(std::vector<double> values) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 == 1 ? values[n / 2] : (values[n / 2 - 1] + values[n / 2]) / 2;
}

Stats statsOf(std::vector<double> samples) {
  Stats s;
  if (samples.empty()) return s;
  std::sort(samples.begin(), samples.end());
  double sum = 0;
  for (double v : samples) sum += v;
  s.avg = sum / static_cast<double>(samples.size());
  s.p50 = samples[samples.size() / 2];
  const auto rank = static_cast<size_t>(std::ceil(0.99 * static_cast<double>(samples.size())));
  s.p99 = samples[std::min(samples.size(), std::max<size_t>(rank, 1)) - 1];
  return s;
}

PointResult summarize(const std::string& mode, bool is_write, uint64_t block, uint64_t batch,
                      int iters, const std::vector<Round>& rounds, uint64_t bytes) {
  PointResult r;
  r.mode = mode;
  r.op = is_write ? "WRITE" : "READ";
  r.block = block;
  r.batch = batch;
  r.iters = rounds.empty() ? 0 : iters;
  std::vector<double> latency, post;
  r.verified = rounds.empty() ? "-" : rounds.front().verified;
  for (const Round& round : rounds) {
    r.round_gbps.push_back(static_cast<double>(bytes) * iters / round.seconds / 1e9);
    latency.insert(latency.end(), round.latency_us.begin(), round.latency_us.end());
    post.insert(post.end(), round.post_us.begin(), round.post_us.end());
    // Any round that failed its check marks the point.
    if (round.verified.rfind("no", 0) == 0) r.verified = round.verified;
  }
  r.gbps = median(r.round_gbps);
  const Stats s = statsOf(latency);
  r.avg_lat_us = s.avg;
  r.p50_lat_us = s.p50;
  r.p99_lat_us = s.p99;
  const Stats p = statsOf(post);
  r.avg_post_us = p.avg;
  r.p99_post_us = p.p99;
  return r;
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
    const bool engine = r.mode != "raw";
    std::printf("%-6s %14llu %7llu %12.3f %13.1f %13.1f %13.1f %13s %13s %9s\n", r.op.c_str(),
                static_cast<unsigned long long>(r.block), static_cast<unsigned long long>(r.batch),
                r.gbps, r.avg_lat_us, r.p50_lat_us, r.p99_lat_us,
                engine ? strfmt("%.1f", r.avg_prep_us).c_str() : "-",
                engine ? strfmt("%.1f", r.avg_post_us).c_str() : "-", r.verified.c_str());
  }
  std::fflush(stdout);
}

void printNixlbenchTable(const std::vector<PointResult>& results, const std::string& title) {
  std::printf("\n%s (nixlbench columns; %s)\n", title.c_str(),
              results.empty() ? "" : results.front().op.c_str());
  std::printf("%-20s%-15s%-15s%-15s%-15s%-15s%-15s%-15s%-15s%-15s\n", "Block Size (B)",
              "Batch Size", "B/W (GB/Sec)", "Avg Lat. (us)", "Avg Prep (us)", "P99 Prep (us)",
              "Avg Post (us)", "P99 Post (us)", "Avg Tx (us)", "P99 Tx (us)");
  std::string op;
  for (const PointResult& r : results) {
    if (!op.empty() && r.op != op) std::printf("(%s)\n", r.op.c_str());
    op = r.op;
    if (r.iters == 0) {
      std::printf("%-20llu%-15lluFAILED\n", static_cast<unsigned long long>(r.block),
                  static_cast<unsigned long long>(r.batch));
      continue;
    }
    // nixlbench: latency = total duration / (iterations x batch), i.e. per descriptor.
    const double per_descriptor = r.avg_lat_us / static_cast<double>(r.batch);
    std::printf("%-20llu%-15llu%-15.6f%-15.1f%-15.1f%-15.1f%-15.1f%-15.1f%-15.1f%-15.1f\n",
                static_cast<unsigned long long>(r.block), static_cast<unsigned long long>(r.batch),
                r.gbps, per_descriptor, r.avg_prep_us, r.p99_prep_us, r.avg_post_us, r.p99_post_us,
                r.avg_lat_us, r.p99_lat_us);
  }
  std::fflush(stdout);
}

void printComparison(const std::vector<PointResult>& other,
                     const std::vector<PointResult>& baseline) {
  std::map<std::tuple<std::string, uint64_t, uint64_t>, const PointResult*> by_key;
  for (const PointResult& r : baseline) by_key[{r.op, r.block, r.batch}] = &r;
  std::printf("(bandwidth: median of per-round ratios, with their range)\n");
  std::printf("%-6s %14s %7s %12s %12s %20s %14s\n", "Op", "Block Size (B)", "Batch", "B/W ratio",
              "P50 lat x", "per-round B/W range", "Avg lat +us");
  for (const PointResult& e : other) {
    auto it = by_key.find({e.op, e.block, e.batch});
    if (it == by_key.end() || e.iters == 0 || it->second->iters == 0) continue;
    const PointResult& r = *it->second;
    std::vector<double> ratios;
    for (size_t i = 0; i < std::min(e.round_gbps.size(), r.round_gbps.size()); ++i) {
      ratios.push_back(e.round_gbps[i] / r.round_gbps[i]);
    }
    const auto [lo, hi] = std::minmax_element(ratios.begin(), ratios.end());
    std::printf("%-6s %14llu %7llu %11.1f%% %11.2fx %9.0f%% .. %5.0f%% %14.1f\n", e.op.c_str(),
                static_cast<unsigned long long>(e.block), static_cast<unsigned long long>(e.batch),
                100.0 * median(ratios), e.p50_lat_us / r.p50_lat_us, 100.0 * *lo, 100.0 * *hi,
                e.avg_lat_us - r.avg_lat_us);
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
    std::string rounds;
    for (double g : r.round_gbps) rounds += (rounds.empty() ? "" : ",") + strfmt("%.4f", g);
    std::fprintf(f,
                 "{\"mode\":\"%s\",\"op\":\"%s\",\"block_size\":%llu,\"batch_size\":%llu,"
                 "\"iterations\":%d,\"gbps\":%.4f,\"round_gbps\":[%s],\"avg_lat_us\":%.2f,"
                 "\"p50_lat_us\":%.2f,\"p99_lat_us\":%.2f,\"avg_prep_us\":%.2f,"
                 "\"avg_post_us\":%.2f,\"inflight\":%d,\"peers\":%d,\"verified\":\"%s\"}\n",
                 r.mode.c_str(), r.op.c_str(), static_cast<unsigned long long>(r.block),
                 static_cast<unsigned long long>(r.batch), r.iters, r.gbps, rounds.c_str(),
                 r.avg_lat_us, r.p50_lat_us, r.p99_lat_us, r.avg_prep_us, r.avg_post_us, r.inflight,
                 r.peers, r.verified.c_str());
  }
  std::fclose(f);
}

}  // namespace tcpx::bench
