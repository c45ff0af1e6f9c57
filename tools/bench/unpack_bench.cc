// tcpx_unpack_bench: bandwidth of the unpack copies against a plain device-to-device copy, in
// the same run on the same GPU.
//
// The workload is what TCPX delivers: receives of `chunk` bytes, each split into 4 KiB fragments
// that sit on random pages of a bounce pool and are listed in shuffled order; a launch unpacks
// `batch` receives. Three figures, each as bytes moved per second (read + written count once as
// the payload, as for cudaMemcpy):
//   memcpy   cudaMemcpyAsync device to device of the same payload (the baseline);
//   kernel   the batched copy kernel over prebuilt fragment descriptors in device memory;
//   queue    the engine's CopyQueue path: descriptors built on the CPU per launch, as in a run.
// Rounds alternate between the three; medians of per-round ratios are reported.
#include <cuda_runtime.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "gpu/cuda/copy_kernel.h"
#include "gpu/gpu.h"

namespace {

using Clock = std::chrono::steady_clock;

#define CHECK_CUDA(call)                                                                    \
  do {                                                                                      \
    const cudaError_t err_ = (call);                                                        \
    if (err_ != cudaSuccess) {                                                              \
      std::fprintf(stderr, "tcpx_unpack_bench: %s: %s\n", #call, cudaGetErrorString(err_)); \
      return 1;                                                                             \
    }                                                                                       \
  } while (0)

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Unpack-kernel bandwidth against a device-to-device copy"};
  uint64_t payload_mib = 256;
  uint64_t chunk_kib = 512;
  uint64_t fragment = 4096;
  int batch = 16;
  int rounds = 11;
  int device = 0;
  app.add_option("--payload-mib", payload_mib, "bytes unpacked per round (MiB)");
  app.add_option("--chunk-kib", chunk_kib, "bytes per receive (KiB)");
  app.add_option("--fragment", fragment, "bytes per fragment (at most 4096)")
      ->check(CLI::Range(1, 4096));
  app.add_option("--batch", batch, "receives unpacked per launch")->check(CLI::Range(1, 4096));
  app.add_option("--rounds", rounds, "rounds per method, alternating")->check(CLI::Range(1, 1001));
  app.add_option("--device", device, "GPU");
  CLI11_PARSE(app, argc, argv);

  if (tcpx::gpu::deviceCount() == 0) {
    std::printf("tcpx_unpack_bench: skipped, %s\n", tcpx::gpu::unavailableReason().c_str());
    return 0;
  }
  CHECK_CUDA(cudaSetDevice(device));
  const uint64_t chunk = chunk_kib * 1024;
  const uint64_t payload = payload_mib << 20;
  const uint64_t nchunks = payload / chunk;
  const uint64_t per_chunk = (chunk + fragment - 1) / fragment;
  const uint64_t pages = nchunks * per_chunk;

  char* pool = nullptr;
  char* dst = nullptr;
  char* src_linear = nullptr;
  CHECK_CUDA(cudaMalloc(&pool, pages * 4096));
  CHECK_CUDA(cudaMalloc(&dst, payload));
  CHECK_CUDA(cudaMalloc(&src_linear, payload));
  CHECK_CUDA(cudaMemset(pool, 0x11, pages * 4096));
  CHECK_CUDA(cudaMemset(src_linear, 0x22, payload));

  // Fragments: every fragment on its own random page, each receive's list shuffled.
  std::mt19937_64 rng(42);
  std::vector<uint64_t> page_of(pages);
  std::iota(page_of.begin(), page_of.end(), 0);
  std::shuffle(page_of.begin(), page_of.end(), rng);
  std::vector<tcpx::gpu::CopyTile> tiles;
  tiles.reserve(pages);
  for (uint64_t c = 0; c < nchunks; ++c) {
    const size_t first = tiles.size();
    for (uint64_t f = 0; f < per_chunk; ++f) {
      const uint64_t off = f * fragment;
      const uint64_t len = std::min(fragment, chunk - off);
      tiles.push_back({reinterpret_cast<uint64_t>(pool + page_of[c * per_chunk + f] * 4096),
                       reinterpret_cast<uint64_t>(dst + c * chunk + off), len});
    }
    std::shuffle(tiles.begin() + static_cast<std::ptrdiff_t>(first), tiles.end(), rng);
  }
  tcpx::gpu::CopyTile* tiles_dev = nullptr;
  CHECK_CUDA(cudaMalloc(&tiles_dev, tiles.size() * sizeof(tcpx::gpu::CopyTile)));
  CHECK_CUDA(cudaMemcpy(tiles_dev, tiles.data(), tiles.size() * sizeof(tcpx::gpu::CopyTile),
                        cudaMemcpyHostToDevice));
  cudaStream_t stream = nullptr;
  CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaEvent_t start = nullptr;
  cudaEvent_t stop = nullptr;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  tcpx::gpu::CopyQueue queue(device);

  const auto per_launch = static_cast<uint64_t>(batch) * per_chunk;
  std::vector<double> memcpy_gbs;
  std::vector<double> kernel_gbs;
  std::vector<double> queue_gbs;
  std::vector<double> kernel_ratio;
  std::vector<double> queue_ratio;
  for (int r = -1; r < rounds; ++r) {  // round -1 warms up
    // Baseline: one device-to-device copy of the payload.
    CHECK_CUDA(cudaEventRecord(start, stream));
    CHECK_CUDA(cudaMemcpyAsync(dst, src_linear, payload, cudaMemcpyDeviceToDevice, stream));
    CHECK_CUDA(cudaEventRecord(stop, stream));
    CHECK_CUDA(cudaEventSynchronize(stop));
    float ms_memcpy = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms_memcpy, start, stop));

    // Kernel: `batch` receives per launch from prebuilt descriptors.
    CHECK_CUDA(cudaEventRecord(start, stream));
    for (uint64_t at = 0; at < tiles.size(); at += per_launch) {
      const auto n = static_cast<int>(std::min<uint64_t>(per_launch, tiles.size() - at));
      CHECK_CUDA(tcpx::gpu::launchBatchedCopy(tiles_dev + at, n, stream, fragment));
    }
    CHECK_CUDA(cudaEventRecord(stop, stream));
    CHECK_CUDA(cudaEventSynchronize(stop));
    float ms_kernel = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms_kernel, start, stop));

    // Queue: descriptors built per launch on the CPU, as the engine does (wall time).
    const auto t0 = Clock::now();
    uint64_t ticket = 0;
    for (uint64_t at = 0; at < tiles.size(); at += per_launch) {
      const uint64_t end = std::min<uint64_t>(at + per_launch, tiles.size());
      for (uint64_t i = at; i < end; ++i) {
        const auto& t = tiles[i];
        if (!queue.add(reinterpret_cast<const void*>(t.src), reinterpret_cast<void*>(t.dst), t.len)
                 .isOk()) {
          std::fprintf(stderr, "tcpx_unpack_bench: CopyQueue::add failed\n");
          return 1;
        }
      }
      auto launched = queue.launch();
      if (!launched.isOk()) {
        std::fprintf(stderr, "tcpx_unpack_bench: %s\n", launched.status().toString().c_str());
        return 1;
      }
      ticket = launched.value();
    }
    auto finished = queue.done(ticket);
    if (!queue.sync().isOk() || !finished.isOk()) {
      std::fprintf(stderr, "tcpx_unpack_bench: CopyQueue failed\n");
      return 1;
    }
    const double s_queue = std::chrono::duration<double>(Clock::now() - t0).count();
    if (r < 0) continue;
    const double gb = static_cast<double>(payload) / 1e9;
    memcpy_gbs.push_back(gb / (ms_memcpy / 1e3));
    kernel_gbs.push_back(gb / (ms_kernel / 1e3));
    queue_gbs.push_back(gb / s_queue);
    kernel_ratio.push_back(kernel_gbs.back() / memcpy_gbs.back());
    queue_ratio.push_back(queue_gbs.back() / memcpy_gbs.back());
  }
  cudaDeviceProp prop{};
  CHECK_CUDA(cudaGetDeviceProperties(&prop, device));
  std::printf(
      "tcpx_unpack_bench on %s: %llu MiB per round in %llu-byte fragments of %llu KiB "
      "receives, %d receives per launch, median of %d alternating rounds\n",
      prop.name, static_cast<unsigned long long>(payload_mib),
      static_cast<unsigned long long>(fragment), static_cast<unsigned long long>(chunk_kib), batch,
      rounds);
  std::printf("%-8s %12s %12s\n", "method", "GB/s", "vs memcpy");
  std::printf("%-8s %12.1f %11.1f%%\n", "memcpy", median(memcpy_gbs), 100.0);
  std::printf("%-8s %12.1f %11.1f%%\n", "kernel", median(kernel_gbs), 100 * median(kernel_ratio));
  std::printf("%-8s %12.1f %11.1f%%\n", "queue", median(queue_gbs), 100 * median(queue_ratio));
  cudaFree(pool);
  cudaFree(dst);
  cudaFree(src_linear);
  cudaFree(tiles_dev);
  return 0;
}
