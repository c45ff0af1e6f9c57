// GPU support: device memory checks, ordering with the caller's GPU work, and staging between
// device memory and the host buffers a host-only transport sends from and receives into.
//
// Built with CUDA (the CUDA runtime is linked statically, so the library also loads and runs on
// machines without a driver) or without it, in which case every entry point reports
// NOT_SUPPORTED. Nothing here allocates or creates streams per transfer: streams, events, pinned
// and device staging buffers belong to channels and devices and are created on first use.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <tcpx_p2p/status.h>

#include "common/segment_list.h"

namespace tcpx::gpu {

// True when the library was built with CUDA.
bool built();
// CUDA devices usable now (0 without a GPU or driver, or without CUDA in the build).
int deviceCount();
// Why there is no GPU ("built without CUDA", "no CUDA-capable device: ..."); empty if there is.
std::string unavailableReason();
// A CUDA driver function by name, of the CUDA 12 ABI, found through the runtime (nothing links
// the driver); nullptr where the driver lacks it, and without CUDA in the build.
void* driverFunction(const char* name);

// Checks that [addr, addr + length) is device memory of `device`, inside one allocation.
Status checkDeviceRegion(const void* addr, size_t length, int device);

// Where a pointer lives: the CUDA device of device memory, or -1 for host memory (pinned or
// not) and for pointers CUDA does not know.
int deviceOf(const void* ptr);
// Whether `ptr` is GPU memory the CPU cannot address (device memory that is not managed), asked
// of the driver without making a context current (registering host memory must not create a
// context on a GPU the process does not use). False without a GPU.
bool isDeviceMemory(const void* ptr);
// Bytes from `ptr` to the end of its device allocation; 0 when unknown or not device memory.
uint64_t deviceBytesAfter(const void* ptr);
// The calling thread's current CUDA device (0 without a GPU) and a way to set it: plugins such
// as TCPX use the current device of the thread that calls them.
int currentDevice();
Status setCurrentDevice(int device);
// PCI bus id of a GPU in sysfs form ("0000:04:00.0"), lower case.
Result<std::string> pciBusId(int device);

// Makes `device`'s primary context current on the calling thread for a scope (the engine's
// streams, events and buffers live there; a context the application made itself on the same
// device cannot use them), then gives the thread back exactly the CUDA context it had, or none:
// the engine runs CUDA calls on its users' threads and must
// neither change their device nor create a context on a GPU the process does not use, and its
// progress thread stays on the engine's GPU, which a plugin such as TCPX uses for every comm it
// sets up. Only a thread marked with markEngineThread() that had no context at all keeps the
// first one it switches to (so that it does not switch back and forth on every copy). Without a
// GPU (or without CUDA in the build) it does nothing.
// Marks the calling thread as the engine's own (its progress thread); see DeviceScope.
void markEngineThread();

class DeviceScope {
 public:
  explicit DeviceScope(int device);
  // Not trivial in the CUDA build (it restores the context); the stub build shares the class.
  ~DeviceScope();  // NOLINT(performance-trivially-destructible)
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  void* previous_ = nullptr;  // the thread's CUcontext before the scope (may be none)
  bool restore_ = false;
  int previous_device_ = -1;  // fallback when the driver's context calls are not available
};

// Bytes of a completion signal's handle (CopyQueue::shareCompletion).
constexpr size_t kSignalHandleBytes = 64;

// A signal of another process's CopyQueue (an interprocess CUDA event), opened in this process
// on `device`; closed when the object goes.
class PeerSignal {
 public:
  static Result<std::unique_ptr<PeerSignal>> open(std::string_view handle, int device);
  // Not trivial in the CUDA build (it closes the event); the stub build shares the class.
  ~PeerSignal();  // NOLINT(performance-trivially-destructible)
  PeerSignal(const PeerSignal&) = delete;
  PeerSignal& operator=(const PeerSignal&) = delete;
  // Whether the work before the signal's latest record has finished. An error: the signal can
  // no longer be read (its process may be gone); it says nothing about the copies.
  [[nodiscard]] Result<bool> reached() const;
  // Signals open in this process now (for tests that count what leaks).
  static int64_t openCount();

 private:
  PeerSignal(void* event, int device) : event_(event), device_(device) {}
  void* event_;  // cudaEvent_t
  int device_;
};

// Memory the transports and staging paths allocate once and reuse. Host memory is page-aligned
// and pinned when a GPU is present (plain aligned memory otherwise, so host-only transports work
// on machines without a GPU); `mapped` pinned memory is also addressable from kernels.
Result<void*> allocHost(size_t bytes, bool mapped = false);
void freeHost(void* ptr);
Result<void*> allocDevice(int device, size_t bytes);  // 2 MiB aligned
void freeDevice(int device, void* ptr);
// Fault injection for tests: the next `count` allocations of `kind` this library makes fail as
// CUDA's would (cudaErrorMemoryAllocation), so that the error paths of pinned and device
// allocation (staging slots and areas, copy descriptors, receive buffers) are reached on a
// machine with memory to spare; 0 ends it. Process-wide. Without a GPU host memory is not pinned
// and is not affected.
enum class AllocKind : uint8_t { kPinnedHost, kDevice };
void failNextAllocations(AllocKind kind, int count);

// Synchronous copy between any two places (host or device); it waits for nothing but itself (not
// for the application's work on the default stream).
Status copySync(void* dst, const void* src, size_t bytes);

// Batches of small copies on one device's stream, each batch one kernel launch: the unpack of
// received fragments out of a bounce pool, or a NIC's DMA of fragments into it. add() queues a
// copy (any alignment, any length); launch() starts the queued copies and returns a ticket;
// done(ticket) says whether that batch and every one before it finished. Batches (up to
// kTilesPerBatch copies each, descriptor memory allocated when a batch first carries copies) are
// reused once finished; when every batch is in flight a new one is made, so no call ever waits
// for the GPU (the queue holds as many batches as were ever in flight at once).
class CopyQueue {
 public:
  static constexpr size_t kTilesPerBatch = 8192;

  // How a queue meets a launch that fails: kWait waits for what runs on its stream before it
  // reuses the batch (the stream only ever waits for copies and for the application's work);
  // kLeave leaves it running and stays broken, for a stream that may wait on a gate the engine
  // itself has to open (CopyQueue::waitFor) or on a peer's GPU work: its owner opens the gates
  // and destroys it only once idle() (the destructor waits for the stream).
  enum class OnFailure : uint8_t { kWait, kLeave };
  explicit CopyQueue(int device, OnFailure on_failure = OnFailure::kWait);
  ~CopyQueue();
  CopyQueue(const CopyQueue&) = delete;
  CopyQueue& operator=(const CopyQueue&) = delete;

  [[nodiscard]] int device() const { return device_; }
  Status add(const void* src, void* dst, uint64_t len);
  // Copies added from now on (and those added but not launched yet) start only once `event`
  // (an opaque cudaEvent_t, e.g. a Fences entry) has completed; null does nothing.
  Status after(void* event);
  // Queues one DMA copy (cudaMemcpyAsync) on the same stream: it runs after every batch launched
  // before and before every batch launched after; launch() still gives its ticket.
  Status enqueueMemcpy(void* dst, const void* src, uint64_t len);
  // Copies added from now on (and those added but not launched yet) start only once the 32-bit
  // word at `word` (device memory this process addresses: a ReadGates slot, or one mapped from
  // another process) holds `value` (cuStreamWaitValue32).
  Status waitFor(const void* word, uint32_t value);
  // Launches what add() queued; returns the ticket of the batch holding the last added copy
  // (also when nothing was queued since the previous launch).
  Result<uint64_t> launch();
  Result<bool> done(uint64_t ticket);
  // Records, after everything launched so far, a signal that another process of this host can
  // open (PeerSignal) and poll, and returns its handle (kSignalHandleBytes). A signal is recorded
  // again only once this queue has seen it reached, so a process that polls it late sees a later
  // batch's completion, never an earlier one. RESOURCE_EXHAUSTED while kMaxSignals are pending.
  static constexpr size_t kMaxSignals = 64;
  Result<std::string> shareCompletion();
  // Waits for everything launched. Only where waiting is the point: destruction, and tests.
  Status sync();
  // Whether nothing queued here can still run (never waits: the progress thread polls it before
  // it lets go of what the copies read or write).
  [[nodiscard]] bool idle() const;

 private:
  struct Impl;
  int device_;
  std::unique_ptr<Impl> impl_;
};

// One copy between two places of this process: host memory (pinned or not) or device memory of
// any GPU.
struct CopyPiece {
  void* dst = nullptr;
  const void* src = nullptr;
  uint64_t len = 0;
};

// Copies for a thread that may wait for the GPU (the engine's copy thread; never its progress
// thread): copy() queues the pieces on a non-blocking stream of `device` (a GPU they touch) after
// the given events (opaque cudaEvent_t of any device, e.g. Fences entries), one after the other
// (a piece whose source and destination overlap goes through a temporary buffer, so it copies
// as memmove does), and returns once every copy it queued has landed. On a failure it stops
// queuing, still waits for what it queued, and then reports the failure: nothing a call started
// runs on after it returned. Streams are made on first use and kept.
class WaitingCopier {
 public:
  WaitingCopier();
  ~WaitingCopier();
  WaitingCopier(const WaitingCopier&) = delete;
  WaitingCopier& operator=(const WaitingCopier&) = delete;
  Status copy(int device, const std::vector<CopyPiece>& pieces, const std::vector<void*>& after);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Ordering with the caller's GPU work. A fence records, at post time, an event on the legacy
// default stream of a device: it completes once all work the caller queued before posting on
// that stream, on per-thread default streams and on other blocking streams has completed. The
// engine's copies wait for it. Work on the caller's non-blocking streams is not covered: the
// caller synchronises those before posting.
class Fences {
 public:
  Fences();
  ~Fences();
  Fences(const Fences&) = delete;
  Fences& operator=(const Fences&) = delete;
  // Records one fence per device in `devices` (from any thread; the caller's current device is
  // left as it was). Replaces fences recorded before.
  Status record(const std::vector<int>& devices);
  // Drops the recorded fences (returns their events to the pool).
  void clear();
  // The fence of `device`, or nullptr (an opaque cudaEvent_t).
  [[nodiscard]] void* eventFor(int device) const;
  // Writes `value` to the 32-bit word at `word` (device memory this process addresses) on
  // `device`'s legacy default stream, and records one fence after it (replacing fences recorded
  // before): the write runs once the work queued there before (and on blocking streams) is done,
  // with no stream of ours and no event wait between, and ready() tells when it ran. When the
  // call fails, `*queued` tells whether the write was queued all the same (no fence covers it:
  // only with a broken context); it is never waited for.
  Status recordAfterWrite(int device, void* word, uint32_t value, bool* queued);
  // Whether every fence has completed (never waits: the progress thread polls it).
  [[nodiscard]] Result<bool> ready() const;
  [[nodiscard]] bool empty() const { return entries_.empty(); }
  // Hands the recorded fences over (to a run that outlives their owner).
  void swap(Fences& other) noexcept { entries_.swap(other.entries_); }

 private:
  struct Entry;
  std::vector<Entry> entries_;
};

// ---- CUDA IPC: GPU memory of one process mapped by another on the same host ----
// What another process needs to map the allocation holding some device memory: a handle of the
// allocation, where the allocation starts and how long it is in the exporting process, and the
// PCI bus id of its GPU (process-independent, unlike device numbers under CUDA_VISIBLE_DEVICES).
// The handle takes one of two routes, told apart by its bytes:
//   - kLegacy: memory of cudaMalloc; the bytes are CUDA's cudaIpcMemHandle_t;
//   - kShareable: memory of the CUDA VMM API (cuMemCreate, e.g. PyTorch's expandable segments)
//     created with CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR; the bytes name a file descriptor
//     the exporter holds open (`held`) for as long as the export lives, which the importer
//     duplicates with pidfd_getfd (the same ptrace permission as cross-memory attach).
enum class IpcRoute : uint8_t { kLegacy, kShareable };
struct IpcExport {
  std::string handle;  // kIpcHandleBytes
  uint64_t base = 0;
  uint64_t size = 0;
  std::string bus_id;  // "0000:04:00.0"
  // Exporter side only: what keeps the handle valid (kShareable: the open descriptor, closed
  // when the last copy of the export goes; null for a legacy handle, which holds nothing).
  // Importers never see it.
  std::shared_ptr<const void> held;
};
constexpr size_t kIpcHandleBytes = 64;

// The handle of the allocation holding `addr` (memory of `device`). NOT_SUPPORTED for memory
// CUDA cannot share (managed memory, VMM memory created without a file-descriptor handle type):
// it takes the data channels.
Result<IpcExport> exportIpc(const void* addr, int device);

// Another process's allocation, mapped here from its IpcExport (kLegacy: cudaIpcOpenMemHandle;
// kShareable: its descriptor duplicated from process `owner_pid`, imported and mapped with the
// VMM calls) and unmapped when the object goes. `owner_pid` 0: the exporter's process is not
// known for sure, and a kShareable handle is refused (NOT_SUPPORTED). The exporter must not free
// the allocation before every mapping of it is gone: the engine's IPC_CLOSE handshake sees to it.
class IpcMapping {
 public:
  static Result<std::unique_ptr<IpcMapping>> open(const IpcExport& from, int owner_pid);
  // Not trivial in the CUDA build (it unmaps); the stub build shares the class.
  ~IpcMapping();  // NOLINT(performance-trivially-destructible)
  IpcMapping(const IpcMapping&) = delete;
  IpcMapping& operator=(const IpcMapping&) = delete;
  [[nodiscard]] char* base() const { return base_; }
  [[nodiscard]] uint64_t size() const { return size_; }
  [[nodiscard]] int device() const { return device_; }  // this process's number of its GPU
  [[nodiscard]] IpcRoute route() const { return route_; }
  // Mappings of applications' memory open in this process now (for tests that count what
  // leaks); peers' read gates are counted apart.
  static int64_t openCount();
  // A peer's read-gate area (ReadGates), mapped to write its gates: counted by gateCount().
  static Result<std::unique_ptr<IpcMapping>> openGate(const IpcExport& from);
  static int64_t gateCount();

 private:
  IpcMapping(IpcRoute route, char* base, uint64_t size, int device, uint64_t allocation)
      : route_(route), base_(base), size_(size), device_(device), allocation_(allocation) {}
  bool gate_ = false;
  IpcRoute route_;
  char* base_;
  uint64_t size_;
  int device_;
  uint64_t allocation_;  // kShareable: the imported allocation's handle, released on unmap
};

// Gates of same-host GPU READs: the initiator queues its copy of the peer's memory before the
// peer answered, behind a 32-bit word of its own GPU memory (CopyQueue::waitFor), and the peer
// writes the word on its default stream, after the work it queued there before
// (Fences::recordAfterWrite on the word, mapped there by CUDA IPC). So the copy starts without
// the answer's hop and the calls that would follow it.
//
// One area of kSlots words per GPU and process, made on first use and never freed: another
// process may hold it mapped, and the engine never frees memory a peer maps (its IPC_CLOSE
// handshake covers the application's allocations; this area outlives every connection instead).
// A slot is taken for one READ and given back when its copy has landed; each use waits for a
// new value (a process-wide counter, never 0), so a word still holding an earlier use's value
// opens nothing (slots are handed out round robin, so a word's value is far fewer than 2^32
// takes old when its slot is taken again). A slot whose peer may still write it (the READ was given
// up before the peer's write was seen: released, or its peer failed) is burned: never taken again,
// since a late write of an old value could otherwise land between a new value and the copy waiting
// for it.
class ReadGates {
 public:
  static constexpr uint32_t kSlots = 4096;
  struct Slot {
    int device = -1;
    uint32_t index = 0;
    uint32_t value = 0;
    void* word = nullptr;  // this process's address of the slot
    IpcExport area;        // the area's export, for the peer to map
  };
  // A free slot of `device`'s area (made on first use). NOT_SUPPORTED where the driver lacks the
  // stream-memory calls; RESOURCE_EXHAUSTED when every slot is taken or burned.
  static Result<Slot> take(int device);
  // The READ's copy has landed (its gate was opened and seen): the slot may be taken again.
  static void giveBack(const Slot& slot);
  // Opens the gate here, on the area's own stream (the peer will not, or may never): the copy
  // waiting for it starts. `burn`: the peer may still write the slot (the READ was given up
  // after its request left), so it is never handed out again; otherwise (the peer refused, or
  // never heard of it) giveBack() frees it once the copy has run.
  static Status openHere(const Slot& slot, bool burn);
  // Slots burned so far in this process (for tests).
  static uint64_t burnedCount();
};

// Moves chunks between their pieces (host memory and device memory, on any devices) and
// contiguous pinned host slots, for one channel. Copies run asynchronously on per-device
// non-blocking streams of this channel; host pieces are copied by the calling thread. Completion
// is polled with ready(): a host callback per copy would hold up the stream behind CUDA's
// callback thread.
//
// Invariant: a slot is reused only after ready(slot) stopped reporting false. gather(), scatter()
// and gatherOnDevice() never report a failure themselves: a copy that could not be queued is
// reported by ready() once every copy that was queued for the slot has finished, so that no
// copy of a failed or abandoned chunk can land in a slot (or in user memory) someone reuses.
class ChannelStaging {
 public:
  static constexpr int kMaxLandedParts = 16;  // parts of a receive a landed copy follows
  ChannelStaging(int slots, size_t slot_bytes);
  // Waits for the copies still running (nothing in flight may outlive the buffers).
  ~ChannelStaging();
  ChannelStaging(const ChannelStaging&) = delete;
  ChannelStaging& operator=(const ChannelStaging&) = delete;

  [[nodiscard]] int slots() const { return slots_; }
  [[nodiscard]] size_t slotBytes() const { return slot_bytes_; }
  // Pinned host memory of a slot (allocated on first use).
  Result<void*> slotBuffer(int slot);

  // Send side: copies bytes [begin, end) of `segments` into `slot`. Copies from a device wait for
  // that device's event in `fences` (none when `fences` is null or has no event for it).
  void gather(int slot, const SegmentList& segments, uint64_t begin, uint64_t end,
              const Fences* fences);
  // Send side, for transports that send from GPU memory: gathers bytes [begin, end) of
  // `segments`, all on `device`, into the slot's part of that device's staging area (one copy or
  // one batched kernel) and sets *out to it (null if the area could not be made; ready() then
  // reports why).
  void gatherOnDevice(int slot, int device, const SegmentList& segments, uint64_t begin,
                      uint64_t end, const Fences* fences, void** out);
  // The device staging area of `device` (every slot; 2 MiB aligned), for registration with a
  // transport; NOT_FOUND before the first gatherOnDevice on that device.
  Result<std::pair<void*, size_t>> deviceArea(int device);
  // Receive side: copies `slot` out to bytes [begin, end) of `segments`; copies into a device
  // wait for that device's event in `fences`, as for gather().
  void scatter(int slot, const SegmentList& segments, uint64_t begin, uint64_t end,
               const Fences* fences);
  // Send side, for transports that send while a copy fills their memory
  // (Transport::isendFollowing): gathers bytes [begin, end) of `segments` into `slot` with one
  // kernel, after the fence of the pieces' GPU, that raises per part of the send
  // (Transport::sendParts) the count of its bytes in place (copy_kernel.h,
  // launchFollowedGather). Returns the words (one per part, pinned) for the send to follow, or
  // null with nothing queued where it does not apply (pieces in host memory or on several GPUs,
  // freed memory, too many parts): the chunk is then gather()ed. The copy's end and any failure
  // are reported by ready(), as for gather(); then gathered() must be called.
  const uint32_t* gatherFollowed(int slot, const SegmentList& segments, uint64_t begin,
                                 uint64_t end, const Fences* fences, int parts);
  // After ready() reported the slot's followed gather (done, or `failed`): sets its words to
  // every part complete, so that the send takes the rest. After a failure the bytes past each
  // part's count are zeroed first: the send carries filler there, never bytes of an earlier
  // chunk (those below the count may be leaving already).
  void gathered(int slot, bool failed);
  // How many bytes the slot's followed gather has put in place so far, over all its parts (0
  // once gathered()).
  [[nodiscard]] uint64_t followedBytes(int slot) const;
  // Receive side, for transports that report what has landed (Transport::irecvReporting):
  // the slot's words (kMaxLandedParts, pinned and readable by kernels), set to 0 for a new
  // receive. Call before the receive is posted: the transport writes them from then on.
  Result<uint32_t*> landedWords(int slot);
  // Starts copying the slot out to bytes [begin, end) of `segments` while its receive lands in
  // `parts` parts (Transport::receiveParts): one kernel, after the fence of the pieces' GPU, that
  // follows the slot's words (copy_kernel.h, launchLandedCopy). False, with nothing queued, where
  // it does not apply (pieces in host memory or on several GPUs, too many parts, no words): the
  // receive then scatter()s once complete. Once it returned true, the slot must be ended with
  // landed() or abandon() before ready() can report it done.
  bool scatterAsLanded(int slot, const SegmentList& segments, uint64_t begin, uint64_t end,
                       const Fences* fences, int parts);
  // The slot's receive completed: every byte is in, whatever the transport last stored.
  void landed(int slot);
  // The slot's receive will not complete, or its bytes are no longer wanted: the copy stops at
  // its next look (bytes it already copied stay where they are). Also done by the destructor.
  void abandon(int slot);
  // Whether the slot's landed copy gave up waiting for bytes (none landed for a while: see
  // copy_kernel.h) before it copied them all; the chunk must then be scatter()ed. Meaningful
  // once ready() reported the copy done.
  [[nodiscard]] bool gaveUp(int slot) const;
  // false while a copy queued for the slot may still run; then the slot's first failure since
  // the previous ready() that was not false (once), or true.
  Result<bool> ready(int slot);
  // Whether no copy queued on any slot can still run (never waits; see CopyQueue::idle).
  [[nodiscard]] bool idle() const;

 private:
  struct Impl;
  int slots_;
  size_t slot_bytes_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tcpx::gpu
