// The binary interface of ncclNet plugins (versions 7 and 8) and of TCPX's unpack metadata.
//
// These are our own declarations of a published ABI: every size and offset below is fixed by the
// plugins we load (Google's GPUDirect-TCPX exports ncclNetPlugin_v7) and is pinned with
// static_asserts, so a layout change fails the build instead of corrupting memory at run time.
// x86-64 (LP64) only.
#pragma once

#include <cstddef>
#include <cstdint>

namespace tcpx::transport::abi {

// ---- Results, pointer types, logging ----
enum : int {
  kSuccess = 0,
  kUnhandledCudaError = 1,
  kSystemError = 2,
  kInternalError = 3,
  kInvalidArgument = 4,
  kInvalidUsage = 5,
  kRemoteError = 6,
  kInProgress = 7,
};
enum : int { kPtrHost = 0x1, kPtrCuda = 0x2, kPtrDmaBuf = 0x4 };
enum : int { kDeviceHost = 0, kDeviceUnpack = 1 };
constexpr int kUnpackVersion = 0x7;
constexpr size_t kHandleSize = 128;  // connection handle exchanged out of band

// Log levels and the NET subsystem flag passed to the plugin's logger.
enum : int {
  kLogNone = 0,
  kLogVersion = 1,
  kLogWarn = 2,
  kLogInfo = 3,
  kLogAbort = 4,
  kLogTrace = 5
};
constexpr unsigned long kLogSubsysNet = 16;
using Logger = void (*)(int level, unsigned long flags, const char* file, int line, const char* fmt,
                        ...);

// ---- Device properties ----
struct PropertiesV7 {
  char* name;
  char* pci_path;
  uint64_t guid;
  int ptr_support;
  int speed;  // Mbps
  int port;
  float latency;
  int max_comms;
  int max_recvs;
  int net_device_type;
  int net_device_version;
};
static_assert(sizeof(PropertiesV7) == 56);
static_assert(offsetof(PropertiesV7, pci_path) == 8);
static_assert(offsetof(PropertiesV7, guid) == 16);
static_assert(offsetof(PropertiesV7, ptr_support) == 24);
static_assert(offsetof(PropertiesV7, speed) == 28);
static_assert(offsetof(PropertiesV7, latency) == 36);
static_assert(offsetof(PropertiesV7, max_recvs) == 44);
static_assert(offsetof(PropertiesV7, net_device_type) == 48);
static_assert(offsetof(PropertiesV7, net_device_version) == 52);

struct PropertiesV8 {
  char* name;
  char* pci_path;
  uint64_t guid;
  int ptr_support;
  int reg_is_global;
  int speed;
  int port;
  float latency;
  int max_comms;
  int max_recvs;
  int net_device_type;
  int net_device_version;
};
static_assert(sizeof(PropertiesV8) == 64);
static_assert(offsetof(PropertiesV8, reg_is_global) == 28);
static_assert(offsetof(PropertiesV8, speed) == 32);
static_assert(offsetof(PropertiesV8, net_device_type) == 52);
static_assert(offsetof(PropertiesV8, net_device_version) == 56);

// ---- Device handle (v7 and v8): allocated by the host on the receive side, filled by accept ----
struct DeviceHandle {
  int net_device_type;
  int net_device_version;
  void* handle;  // device-visible pointer to the UnpackHandle
  size_t size;
  int needs_proxy_progress;
};
static_assert(sizeof(DeviceHandle) == 32);
static_assert(offsetof(DeviceHandle, handle) == 8);
static_assert(offsetof(DeviceHandle, size) == 16);
static_assert(offsetof(DeviceHandle, needs_proxy_progress) == 24);
constexpr size_t kDeviceHandleAlign = 16;

// ---- Unpack metadata ----
constexpr int kUnpackSlots = 16;              // per recv comm: irecv sequence number mod 16
constexpr uint64_t kUnpackPage = 4096;        // a fragment never exceeds one page
constexpr uint64_t kMaxUnpackRecv = 4 << 20;  // bytes of one receive
constexpr int kMaxFragments = 2048;           // per slot

// Copy `len` bytes from bounce + src_off to (receive buffer) + dst_off.
struct alignas(16) LoadMeta {
  uint32_t src_off;
  uint32_t len;
  uint64_t dst_off;
};
static_assert(sizeof(LoadMeta) == 16);
static_assert(offsetof(LoadMeta, len) == 4);
static_assert(offsetof(LoadMeta, dst_off) == 8);

// Host memory mapped into the GPU; the plugin writes mem[slot][0..cnt) and then cnt[slot].
struct UnpackMeta {
  LoadMeta mem[kUnpackSlots][kMaxFragments];
  uint64_t cnt[kUnpackSlots];
};
static_assert(offsetof(UnpackMeta, cnt) == 524288);
static_assert(sizeof(UnpackMeta) == 524416);

// Lives in device memory (or host memory when the bounce pool does).
struct UnpackHandle {
  UnpackMeta* meta;
  void* bounce_buf;
  uint64_t head;
};
static_assert(sizeof(UnpackHandle) == 24);

// ---- Function tables: 19 pointer-sized slots in this order ----
// v7 and v8 differ only in getProperties' struct and regMr's size type.
template <typename Properties, typename RegSize>
struct NetTable {
  const char* name;
  int (*init)(Logger logger);
  int (*devices)(int* ndev);
  int (*get_properties)(int dev, Properties* props);
  int (*listen)(int dev, void* handle, void** listen_comm);
  int (*connect)(int dev, void* handle, void** send_comm, DeviceHandle** send_dev_comm);
  int (*accept)(void* listen_comm, void** recv_comm, DeviceHandle** recv_dev_comm);
  int (*reg_mr)(void* comm, void* data, RegSize size, int type, void** mhandle);
  int (*reg_mr_dma_buf)(void* comm, void* data, size_t size, int type, uint64_t offset, int fd,
                        void** mhandle);
  int (*dereg_mr)(void* comm, void* mhandle);
  int (*isend)(void* send_comm, void* data, int size, int tag, void* mhandle, void** request);
  int (*irecv)(void* recv_comm, int n, void** data, int* sizes, int* tags, void** mhandles,
               void** request);
  int (*iflush)(void* recv_comm, int n, void** data, int* sizes, void** mhandles, void** request);
  int (*test)(void* request, int* done, int* sizes);
  int (*close_send)(void* send_comm);
  int (*close_recv)(void* recv_comm);
  int (*close_listen)(void* listen_comm);
  int (*get_device_mr)(void* comm, void* mhandle, void** dptr_mhandle);
  int (*irecv_consumed)(void* recv_comm, int n, void* request);
};
using NetV7 = NetTable<PropertiesV7, int>;
using NetV8 = NetTable<PropertiesV8, size_t>;
static_assert(sizeof(NetV7) == 19 * sizeof(void*));
static_assert(sizeof(NetV8) == 19 * sizeof(void*));
static_assert(offsetof(NetV7, reg_mr) == 7 * sizeof(void*));
static_assert(offsetof(NetV7, isend) == 10 * sizeof(void*));
static_assert(offsetof(NetV7, test) == 13 * sizeof(void*));
static_assert(offsetof(NetV7, irecv_consumed) == 18 * sizeof(void*));

// Exported table symbols, newest first.
constexpr const char* kSymbolV8 = "ncclNetPlugin_v8";
constexpr const char* kSymbolV7 = "ncclNetPlugin_v7";

}  // namespace tcpx::transport::abi
