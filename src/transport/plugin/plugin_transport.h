// An external ncclNet plugin (GPUDirect-TCPX, the devmem emulator, any v7/v8 plugin) behind the
// transport interface.
//
// The library is loaded with dlopen(RTLD_NOW | RTLD_LOCAL) and its table picked by exported
// symbol: ncclNetPlugin_v8 when present, else ncclNetPlugin_v7; anything else is refused with the
// versions found. The plugin's logger output goes into ours, rate-limited (TCPX logs a warning
// per host receive attempt). The adapter translates our calls one to one and keeps, per recv
// comm, the 16-byte-aligned device handle TCPX's accept fills in, from which it reads where the
// unpack metadata and the bounce pool are.
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
  // Before loading: check what TCPX needs to run without calling exit() (a usable GPU, RxDM's
  // UNIX sockets) and set the NCCL_* settings it cannot run without when unset.
  bool tcpx_preflight = false;
};

Result<std::unique_ptr<Transport>> loadPlugin(const PluginOptions& options);

// The default candidates: for "tcpx" the A3 location then the library path; for "emulator" the
// emulator next to this library, then the library path.
std::vector<std::string> defaultPluginCandidates(const std::string& transport);

}  // namespace tcpx::transport
