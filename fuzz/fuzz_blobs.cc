// libFuzzer target: the blobs users pass between processes, connection info and remote memory
// descriptors. The first byte picks the parser; a blob that parses must survive a round trip.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "control/blobs.h"

using namespace tcpx::control;  // NOLINT(google-build-using-namespace): a fuzz entry point

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::string_view blob(reinterpret_cast<const char*>(data + 1), size - 1);
  if ((data[0] & 1) == 0) {
    auto info = decodeConnInfo(blob);
    if (info.isOk()) {
      auto again = decodeConnInfo(encodeConnInfo(info.value()));
      if (!again.isOk() || again->name != info->name || again->host != info->host ||
          again->port != info->port || again->uuid != info->uuid) {
        std::abort();
      }
    }
  } else {
    auto desc = decodeMemoryDescriptor(blob);
    if (desc.isOk()) {
      auto again = decodeMemoryDescriptor(encodeMemoryDescriptor(desc.value()));
      if (!again.isOk() || again->id != desc->id || again->length != desc->length ||
          again->base_addr != desc->base_addr || again->device != desc->device) {
        std::abort();
      }
    }
  }
  return 0;
}
