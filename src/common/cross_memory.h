// Reading another process's memory on this host (cross-memory attach, process_vm_readv).
//
// The engine uses it for direct copies between same-host peers (same_host_copy): the process
// whose memory is written reads the other's memory, so that no process ever writes memory of
// another (a peer that deregisters or frees memory cannot be written by a late copy), and a
// read of memory the peer has just freed fails (or reads stale bytes of a transfer that is
// failing anyway) without harming the peer.
//
// The kernel allows it where the caller may ptrace the peer (same user and, under Yama's
// ptrace_scope 1, an ancestor or a process the peer allowed): elsewhere the calls fail with
// NOT_SUPPORTED, and the engine moves the bytes over its data channels instead.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <sys/types.h>

#include <tcpx_p2p/status.h>

#include "common/net.h"

namespace tcpx {

// One range to copy: `len` bytes at address `remote` in the peer into `local` here.
struct CrossPiece {
  void* local = nullptr;
  uint64_t remote = 0;
  uint64_t len = 0;
};

// When a read last moved bytes, in steady-clock ticks (0: not started), for a watchdog on
// another thread: a read that waits for a page its process never brings in moves none.
using ReadProgress = std::atomic<int64_t>;
inline void markProgress(ReadProgress& progress) {
  progress.store(std::chrono::steady_clock::now().time_since_epoch().count(),
                 std::memory_order_relaxed);
}

// Copies every piece from process `pid` into this process, in system calls of at most 64 MiB,
// marking `progress` (if any) after each. NOT_SUPPORTED when the kernel does not allow it,
// REMOTE_DISCONNECTED when the process is gone, REMOTE_REJECTED when a range is not mapped in
// it; the bytes of a failed call are unspecified.
Status readProcessMemory(pid_t pid, std::span<const CrossPiece> pieces,
                         ReadProgress* progress = nullptr);

// Fault injection for tests: the next `count` calls of readProcessMemory fail as the kernel's
// refusal would (EPERM: NOT_SUPPORTED), as when a peer that was probed made itself non-dumpable
// since, which a test running as root cannot cause; 0 ends it. Process-wide.
void failNextProcessReads(int count);

// The same, split into up to `threads` parts of consecutive bytes read at once, each by its own
// thread (the calling thread takes one): one thread's process_vm_readv moves some 0.6 of a
// memcpy, two reach 0.9 (the kernel pins and maps the peer's pages as it goes). The first
// failure is reported.
Status readProcessMemoryParallel(pid_t pid, std::span<const CrossPiece> pieces, int threads,
                                 ReadProgress* progress = nullptr);

// Whether process `pid` is the peer that offered `cookie` at `address`: reads it back and
// compares (a pid names another process in another pid namespace, or after the peer died).
// OK when it matches; NOT_SUPPORTED when it cannot be read or differs.
Status probeProcess(pid_t pid, uint64_t address, std::string_view cookie);

// A process to read, pinned down: its pid and a pidfd of the process that pid named when it was
// opened. A pid is reused once its process ended; the pidfd is not, so a read checks through it
// that the process it reads is still that one. Copies share the pidfd.
class ReadableProcess {
 public:
  // NOT_SUPPORTED when the kernel has no pidfd_open (before Linux 5.3) or `pid` names no process.
  static Result<ReadableProcess> open(pid_t pid);
  [[nodiscard]] pid_t pid() const { return pid_; }
  // OK while that process runs; REMOTE_DISCONNECTED once it ended (the pid may name another
  // process now).
  [[nodiscard]] Status running() const;
  // Whether every page the sources of `pieces` touch is in the process's memory now (its page
  // table, /proc/<pid>/pagemap): reading them faults nothing in, so the read cannot wait for
  // whatever serves the process's faults (an unserved userfaultfd, a hung FUSE or NFS mapping).
  // False when it is not so, or cannot be told (pagemap could not be opened or read).
  [[nodiscard]] bool pagesPresent(std::span<const CrossPiece> pieces) const;
  // Why pagemap could not be opened (pagesPresent is then always false); empty when it was.
  [[nodiscard]] const std::string& pagemapError() const { return pagemap_error_; }

 private:
  ReadableProcess(pid_t pid, std::shared_ptr<const net::Fd> pidfd,
                  std::shared_ptr<const net::Fd> pagemap, std::string pagemap_error)
      : pid_(pid),
        pidfd_(std::move(pidfd)),
        pagemap_(std::move(pagemap)),
        pagemap_error_(std::move(pagemap_error)) {}
  pid_t pid_ = 0;
  std::shared_ptr<const net::Fd> pidfd_;
  std::shared_ptr<const net::Fd> pagemap_;  // /proc/<pid>/pagemap; not valid where refused
  std::string pagemap_error_;
};

// readProcessMemory / readProcessMemoryParallel / probeProcess of `process`, once running() says
// it is still the process it was opened for; the probe also only once pagesPresent() says that
// the cookie's page needs no fault.
Status readProcessMemory(const ReadableProcess& process, std::span<const CrossPiece> pieces,
                         int threads = 1, ReadProgress* progress = nullptr);
Status probeProcess(const ReadableProcess& process, uint64_t address, std::string_view cookie);

// Whether `pid` is a process (not a thread of one) that holds the socket `inode` among its
// descriptors. A peer's offer names the process to read; only one holding the peer's end of the
// connection is the peer: otherwise a peer could name a thread of ours, or another engine whose
// offer it learned, and have us read that process's memory for it. OK when it holds it;
// NOT_SUPPORTED otherwise, or when its descriptors cannot be listed (a process we may not
// ptrace, whose memory we could not read either).
Status processHoldsSocket(pid_t pid, uint64_t inode);

}  // namespace tcpx
