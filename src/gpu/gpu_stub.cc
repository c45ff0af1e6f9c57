// GPU support in a build without CUDA: no devices; every GPU entry point says so.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

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
void* driverFunction(const char* /*name*/) {
  return nullptr;
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
Status Fences::recordAfterWrite(int /*device*/, void* /*word*/, uint32_t /*value*/, bool* queued) {
  *queued = false;
  return notBuilt();
}
Result<bool> Fences::ready() const {
  return true;
}

Result<IpcExport> exportIpc(const void* /*addr*/, int /*device*/) {
  return Status(StatusCode::kNotSupported, "built without CUDA");
}
Result<std::unique_ptr<IpcMapping>> IpcMapping::open(const IpcExport& /*from*/, int /*owner_pid*/) {
  return Status(StatusCode::kNotSupported, "built without CUDA");
}
IpcMapping::~IpcMapping() = default;
int64_t IpcMapping::openCount() {
  return 0;
}
Result<std::unique_ptr<IpcMapping>> IpcMapping::openGate(const IpcExport& /*from*/) {
  return Status(StatusCode::kNotSupported, "built without CUDA");
}
int64_t IpcMapping::gateCount() {
  return 0;
}

Result<std::unique_ptr<PeerSignal>> PeerSignal::open(std::string_view /*handle*/, int /*device*/) {
  return Status(StatusCode::kNotSupported, "built without CUDA");
}
PeerSignal::~PeerSignal() = default;
Result<bool> PeerSignal::reached() const {
  return notBuilt();
}
int64_t PeerSignal::openCount() {
  return 0;
}

int deviceOf(const void* /*ptr*/) {
  return -1;
}
bool isDeviceMemory(const void* /*ptr*/) {
  return false;
}
uint64_t deviceBytesAfter(const void* /*ptr*/) {
  return 0;
}
int currentDevice() {
  return 0;
}
Status setCurrentDevice(int /*device*/) {
  return notBuilt();
}
Result<std::string> pciBusId(int /*device*/) {
  return notBuilt();
}
DeviceScope::DeviceScope(int /*device*/) {}
DeviceScope::~DeviceScope() = default;
void markEngineThread() {}
Result<void*> allocHost(size_t bytes, bool /*mapped*/) {
  void* ptr = std::aligned_alloc(4096, (std::max<size_t>(bytes, 1) + 4095) / 4096 * 4096);
  if (ptr == nullptr) return Status(StatusCode::kResourceExhausted, "out of memory");
  return ptr;
}
void freeHost(void* ptr) {
  std::free(ptr);
}
Result<void*> allocDevice(int /*device*/, size_t /*bytes*/) {
  return notBuilt();
}
void freeDevice(int /*device*/, void* /*ptr*/) {}
Status copySync(void* dst, const void* src, size_t bytes) {
  std::memcpy(dst, src, bytes);
  return {};
}

struct WaitingCopier::Impl {};
WaitingCopier::WaitingCopier() = default;
WaitingCopier::~WaitingCopier() = default;
Status WaitingCopier::copy(int /*device*/, const std::vector<CopyPiece>& /*pieces*/,
                           const std::vector<void*>& /*after*/) {
  return notBuilt();
}

void failNextAllocations(AllocKind /*kind*/, int /*count*/) {}

struct CopyQueue::Impl {};
CopyQueue::CopyQueue(int device, OnFailure /*on_failure*/) : device_(device) {}
CopyQueue::~CopyQueue() = default;
Status CopyQueue::add(const void* /*src*/, void* /*dst*/, uint64_t /*len*/) {
  return notBuilt();
}
Status CopyQueue::after(void* /*event*/) {
  return notBuilt();
}
Status CopyQueue::enqueueMemcpy(void* /*dst*/, const void* /*src*/, uint64_t /*len*/) {
  return notBuilt();
}
Status CopyQueue::waitFor(const void* /*word*/, uint32_t /*value*/) {
  return notBuilt();
}
Result<uint64_t> CopyQueue::launch() {
  return notBuilt();
}

Result<ReadGates::Slot> ReadGates::take(int /*device*/) {
  return notBuilt();
}
void ReadGates::giveBack(const Slot& /*slot*/) {}
Status ReadGates::openHere(const Slot& /*slot*/, bool /*burn*/) {
  return notBuilt();
}
uint64_t ReadGates::burnedCount() {
  return 0;
}
Result<bool> CopyQueue::done(uint64_t /*ticket*/) {
  return notBuilt();
}
Result<std::string> CopyQueue::shareCompletion() {
  return notBuilt();
}
Status CopyQueue::sync() {
  return {};
}
bool CopyQueue::idle() const {
  return true;
}

// Without CUDA only host pieces exist: staging is plain memory and copies are memcpy.
struct ChannelStaging::Impl {
  size_t slot_bytes = 0;
  std::vector<void*> buffers;
  std::vector<Status> failures;  // per slot, reported by ready()

  void move(ChannelStaging* staging, int slot, const SegmentList& segments, uint64_t begin,
            uint64_t end, bool to_host) {
    Status& failure = failures[static_cast<size_t>(slot)];
    if (segments.anyDevice(begin, end)) {
      failure = notBuilt();
      return;
    }
    auto buffer = staging->slotBuffer(slot);
    if (!buffer.isOk()) {
      failure = buffer.status();
    } else if (to_host) {
      segments.gather(begin, buffer.value(), end - begin);
    } else {
      segments.scatter(begin, buffer.value(), end - begin);
    }
  }
};
ChannelStaging::ChannelStaging(int slots, size_t slot_bytes)
    : slots_(slots), slot_bytes_(slot_bytes), impl_(std::make_unique<Impl>()) {
  impl_->slot_bytes = slot_bytes;
  impl_->buffers.assign(static_cast<size_t>(slots), nullptr);
  impl_->failures.resize(static_cast<size_t>(slots));
}
ChannelStaging::~ChannelStaging() {
  for (void* p : impl_->buffers) freeHost(p);
}
bool ChannelStaging::idle() const {
  return true;  // host pieces are copied by the calling thread
}
Result<void*> ChannelStaging::slotBuffer(int slot) {
  void*& buffer = impl_->buffers[static_cast<size_t>(slot)];
  if (buffer == nullptr) {
    auto got = allocHost(impl_->slot_bytes);
    if (!got.isOk()) return got.status();
    buffer = got.value();
  }
  return buffer;
}
void ChannelStaging::gather(int slot, const SegmentList& segments, uint64_t begin, uint64_t end,
                            const Fences* /*fences*/) {
  impl_->move(this, slot, segments, begin, end, /*to_host=*/true);
}
void ChannelStaging::scatter(int slot, const SegmentList& segments, uint64_t begin, uint64_t end,
                             const Fences* /*fences*/) {
  impl_->move(this, slot, segments, begin, end, /*to_host=*/false);
}
void ChannelStaging::gatherOnDevice(int slot, int /*device*/, const SegmentList& /*segments*/,
                                    uint64_t /*begin*/, uint64_t /*end*/, const Fences* /*fences*/,
                                    void** out) {
  *out = nullptr;
  impl_->failures[static_cast<size_t>(slot)] = notBuilt();
}
Result<std::pair<void*, size_t>> ChannelStaging::deviceArea(int /*device*/) {
  return notBuilt();
}
Result<uint32_t*> ChannelStaging::landedWords(int /*slot*/) {
  return notBuilt();
}
bool ChannelStaging::scatterAsLanded(int /*slot*/, const SegmentList& /*segments*/,
                                     uint64_t /*begin*/, uint64_t /*end*/, const Fences* /*fences*/,
                                     int /*parts*/) {
  return false;  // no GPU pieces without CUDA
}
const uint32_t* ChannelStaging::gatherFollowed(int /*slot*/, const SegmentList& /*segments*/,
                                               uint64_t /*begin*/, uint64_t /*end*/,
                                               const Fences* /*fences*/, int /*parts*/) {
  return nullptr;  // no GPU pieces without CUDA
}
void ChannelStaging::gathered(int /*slot*/, bool /*failed*/) {}
uint64_t ChannelStaging::followedBytes(int /*slot*/) const {
  return 0;
}
void ChannelStaging::landed(int /*slot*/) {}
void ChannelStaging::abandon(int /*slot*/) {}
bool ChannelStaging::gaveUp(int /*slot*/) const {
  return false;
}
Result<bool> ChannelStaging::ready(int slot) {
  Status& failure = impl_->failures[static_cast<size_t>(slot)];
  if (!failure.isOk()) return std::exchange(failure, Status());
  return true;
}

}  // namespace tcpx::gpu
