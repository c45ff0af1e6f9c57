// What Google's GPUDirect-TCPX plugin needs in order not to call exit(), checked from the plugin's
// point of view before its init runs.
//
// TCPX calls exit(1) when its CUDA driver fails or when it cannot import the GPU receive pool from
// RxDM, so a host must find those holes first and say which one it is. The checks look where the
// plugin looks: the CUDA driver it loads itself (libcuda.so.1, not the engine's CUDA runtime,
// which can disagree with it), and the UNIX sockets of RxDM it connects to for the GPU in use
// (<prefix>/rx_rule_manager, <prefix>/get_gpu_fd_<bdf>, <prefix>/get_gpu_metadata_<bdf>, with
// <prefix> = $NCCL_GPUDIRECTTCPX_UNIX_CLIENT_PREFIX or /run/tcpx and <bdf> the GPU's lower-case
// PCI bus id as the driver reports it).
#pragma once

#include <string>

#include <tcpx_p2p/status.h>

namespace tcpx::transport {

// The table name TCPX exports ("GPUDirectTCPX_v7"): the preflight and the environment defaults
// apply to a library whose table name starts with it.
inline constexpr const char* kTcpxTableName = "GPUDirectTCPX";
[[nodiscard]] bool isTcpxTable(const char* name);

struct TcpxPreflight {
  std::string cuda_driver = "libcuda.so.1";  // what the plugin links
  int gpu = 0;                               // CUDA device the plugin will run on
};

// The lower-case PCI bus id ("0000:04:00.0") of the GPU as the plugin's CUDA driver reports it.
Result<std::string> gpuBusIdFromDriver(const TcpxPreflight& preflight);

// OK, or NOT_SUPPORTED naming the first missing piece (driver, device, RxDM socket or daemon).
Status checkTcpxPreconditions(const TcpxPreflight& preflight);

// Google's settings for the variables TCPX cannot run well without, where the user set none:
// NCCL_DYNAMIC_CHUNK_SIZE (unset, every transfer livelocks), NCCL_NSOCKS_PERTHREAD,
// NCCL_SOCKET_NTHREADS and NCCL_GPUDIRECTTCPX_PROGRAM_FLOW_STEERING_WAIT_MICROS (5 s per accepted
// connection otherwise). Called right before TCPX's init, which reads them.
void applyTcpxDefaults();

}  // namespace tcpx::transport
