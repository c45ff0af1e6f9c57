// A library exporting an ncclNet v7 table under TCPX's name ("GPUDirectTCPX_v7"), so that what a
// host does for TCPX alone (the preflight, the environment defaults, one init per process) can be
// tested where the real plugin is not built. It has one device and moves nothing: every call past
// the properties fails. It counts its inits and records the NCCL_DYNAMIC_CHUNK_SIZE it saw.
#include <cstdlib>
#include <cstring>

#include "transport/plugin/net_abi.h"

namespace abi = tcpx::transport::abi;

extern "C" {
__attribute__((visibility("default"))) int fake_tcpx_inits = 0;
__attribute__((visibility("default"))) char fake_tcpx_chunk_size_at_init[32] = "";
}

namespace {

int init(abi::Logger /*logger*/) {
  if (++fake_tcpx_inits > 1) return abi::kInternalError;       // as TCPX: "gpu lib init twice"
  const char* chunk = std::getenv("NCCL_DYNAMIC_CHUNK_SIZE");  // NOLINT(concurrency-mt-unsafe)
  std::strncpy(fake_tcpx_chunk_size_at_init, chunk != nullptr ? chunk : "(unset)",
               sizeof(fake_tcpx_chunk_size_at_init) - 1);
  return abi::kSuccess;
}
int devices(int* n) {
  *n = 1;
  return abi::kSuccess;
}
char kName[] = "lo";
int properties(int dev, abi::PropertiesV7* p) {
  if (dev != 0) return abi::kInternalError;
  std::memset(p, 0, sizeof(*p));
  p->name = kName;
  p->ptr_support = abi::kPtrHost | abi::kPtrCuda;
  p->speed = 10000;
  p->max_comms = 65536;
  p->max_recvs = 1;
  p->net_device_type = abi::kDeviceUnpack;
  p->net_device_version = abi::kUnpackVersion;
  return abi::kSuccess;
}
int listen(int, void*, void**) {
  return abi::kInternalError;
}
int connect(int, void*, void**, abi::DeviceHandle**) {
  return abi::kInternalError;
}
int accept(void*, void**, abi::DeviceHandle**) {
  return abi::kInternalError;
}
int regMr(void*, void*, int, int, void**) {
  return abi::kInternalError;
}
int deregMr(void*, void*) {
  return abi::kSuccess;
}
int isend(void*, void*, int, int, void*, void**) {
  return abi::kInternalError;
}
int irecv(void*, int, void**, int*, int*, void**, void**) {
  return abi::kInternalError;
}
int iflush(void*, int, void**, int*, void**, void**) {
  return abi::kInternalError;
}
int test(void*, int*, int*) {
  return abi::kInternalError;
}
int close(void*) {
  return abi::kSuccess;
}
int getDeviceMr(void*, void*, void**) {
  return abi::kInternalError;
}
int irecvConsumed(void*, int, void*) {
  return abi::kInternalError;
}

}  // namespace

extern "C" __attribute__((visibility("default"))) const abi::NetV7 ncclNetPlugin_v7 = {
    "GPUDirectTCPX_v7",
    init,
    devices,
    properties,
    listen,
    connect,
    accept,
    regMr,
    nullptr,
    deregMr,
    isend,
    irecv,
    iflush,
    test,
    close,
    close,
    close,
    getDeviceMr,
    irecvConsumed,
};
