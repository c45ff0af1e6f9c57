// GPU support in a build without CUDA: no devices; every GPU entry point says so.
#include "gpu/gpu.h"

namespace tcpx::gpu {
namespace {
Status notBuilt() {
  return Status(StatusCode::kNotSupported, "this build of tcpx_p2p has no CUDA support");
}
}  // namespace

bool built() {
  return false;
}
int deviceCount() {
  return 0;
}
std::string unavailableReason() {
  return "built without CUDA";
}
Status checkDeviceRegion(const void* /*addr*/, size_t /*length*/, int /*device*/) {
  return notBuilt();
}

struct Fences::Entry {};
Fences::Fences() = default;
Fences::~Fences() = default;
Status Fences::record(const std::vector<int>& devices) {
  return devices.empty() ? Status() : notBuilt();
}
void Fences::clear() {}
void* Fences::eventFor(int /*device*/) const {
  return nullptr;
}

struct ChannelStaging::Impl {};
ChannelStaging::ChannelStaging(int slots, size_t /*slot_bytes*/) : slots_(slots) {}
ChannelStaging::~ChannelStaging() = default;
Result<void*> ChannelStaging::slotBuffer(int /*slot*/) {
  return notBuilt();
}
Status ChannelStaging::gather(int /*slot*/, const engine::SegmentList& /*segments*/,
                              uint64_t /*begin*/, uint64_t /*end*/,
                              const std::function<void*(int)>& /*fence_for*/) {
  return notBuilt();
}
Status ChannelStaging::scatter(int /*slot*/, const engine::SegmentList& /*segments*/,
                               uint64_t /*begin*/, uint64_t /*end*/) {
  return notBuilt();
}
Result<bool> ChannelStaging::ready(int /*slot*/) {
  return notBuilt();
}

}  // namespace tcpx::gpu
