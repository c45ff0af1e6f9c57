// An external ncclNet plugin (GPUDirect-TCPX, the devmem emulator, any v7/v8 plugin) behind the
// transport interface.
//
// The library is loaded with dlopen(RTLD_NOW | RTLD_LOCAL) and its table picked by exported
// symbol: ncclNetPlugin_v8 when present, else ncclNetPlugin_v7; anything else is refused with the
// versions found. The plugin's logger output goes into ours, rate-limited per call site (TCPX
// logs a warning per host receive attempt). The adapter translates our calls one to one and keeps,
// per recv comm, the 16-byte-aligned device handle TCPX's accept fills in, from which it reads
// where the unpack metadata and the bounce pool are.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <tcpx_p2p/status.h>

#include "transport/transport.h"

namespace tcpx::transport {

struct PluginOptions {
  std::string label;                    // transport name peers compare ("tcpx", "emulator")
  std::vector<std::string> candidates;  // library paths or names, tried in order
  // For a library whose table is TCPX's: the GPU the engine runs it on and the CUDA driver it
  // loads, checked before it is used (tcpx_preflight.h).
  int gpu = 0;
  std::string cuda_driver = "libcuda.so.1";
};

// Loads the first candidate that opens and exports a usable table (for "tcpx", TCPX's own), or
// shares the one this process loaded before: each library is loaded and initialised once per
// process. A candidate that opens without a usable table is closed again and the next is tried.
// Before a TCPX table is used, its preconditions are checked (NOT_SUPPORTED naming what is
// missing) and, before its init, its environment defaults applied.
Result<std::unique_ptr<Transport>> loadPlugin(const PluginOptions& options);

// The default candidates: for "tcpx" the A3 location then the library path; for "emulator" the
// emulator next to this library, then the library path.
std::vector<std::string> defaultPluginCandidates(const std::string& transport);

}  // namespace tcpx::transport
