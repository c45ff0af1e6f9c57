#include <cuda_runtime.h>

#include "support/delayed_copy.h"

namespace tcpx::testing {
namespace {

__global__ void delayedCopyKernel(const unsigned char* src, unsigned char* dst, size_t length,
                                  long long delay_cycles) {
  if (threadIdx.x == 0) {
    const long long start = clock64();
    while (clock64() - start < delay_cycles) {
    }
  }
  __syncthreads();
  for (size_t i = threadIdx.x; i < length; i += blockDim.x) dst[i] = src[i];
}

}  // namespace

bool launchDelayedCopy(const void* src, void* dst, size_t length, double delay_ms) {
  int device = 0;
  int khz = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, device) != cudaSuccess) {
    return false;
  }
  const long long cycles = static_cast<long long>(delay_ms * khz);
  delayedCopyKernel<<<1, 256>>>(static_cast<const unsigned char*>(src),
                                static_cast<unsigned char*>(dst), length, cycles);
  return cudaGetLastError() == cudaSuccess;
}

}  // namespace tcpx::testing
