// A stand-in for the CUDA driver (libcuda.so.1) with the four entry points the TCPX preflight
// calls, so that its checks run on machines without a GPU. Behaviour from the environment:
//   FAKE_CUDA_INIT_RESULT  what cuInit returns (default 0)
//   FAKE_CUDA_DEVICES      how many devices cuDeviceGetCount reports (default 1)
// Device i has the PCI bus id "0000:0<4+i>:00.0" in upper case (the preflight lower-cases it).
#include <cstdio>
#include <cstdlib>

namespace {
int envInt(const char* name, int fallback) {
  const char* v = std::getenv(name);  // NOLINT(concurrency-mt-unsafe): test fixture
  return v != nullptr && *v != '\0' ? std::atoi(v) : fallback;
}
}  // namespace

extern "C" {
__attribute__((visibility("default"))) int cuInit(unsigned int /*flags*/) {
  return envInt("FAKE_CUDA_INIT_RESULT", 0);
}
__attribute__((visibility("default"))) int cuDeviceGetCount(int* count) {
  *count = envInt("FAKE_CUDA_DEVICES", 1);
  return 0;
}
__attribute__((visibility("default"))) int cuDeviceGet(int* device, int ordinal) {
  *device = ordinal;
  return ordinal < envInt("FAKE_CUDA_DEVICES", 1) ? 0 : 101;  // CUDA_ERROR_INVALID_DEVICE
}
__attribute__((visibility("default"))) int cuDeviceGetPCIBusId(char* bus_id, int len, int device) {
  std::snprintf(bus_id, static_cast<size_t>(len), "0000:%02X:00.0", 4 + device);
  return 0;
}
}
