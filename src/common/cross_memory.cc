#include "common/cross_memory.h"

#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <system_error>
#include <thread>
#include <vector>

#include "common/strings.h"

namespace tcpx {

namespace {

// Bytes one call moves at most: a long copy is split so that a failure names its range and the
// iovec arrays stay small.
constexpr uint64_t kMaxCallBytes = uint64_t{64} << 20;
constexpr size_t kMaxIov = 1024;  // IOV_MAX on Linux

Status callFailed(pid_t pid, int err, uint64_t remote, uint64_t len) {
  switch (err) {
    case EPERM:
    case ENOSYS:
      return Status(StatusCode::kNotSupported,
                    strfmt("reading the memory of process %d is not permitted (%s): direct "
                           "same-host copies need the right to ptrace the peer",
                           static_cast<int>(pid), errnoString(err).c_str()));
    case ESRCH:
      return Status(StatusCode::kRemoteDisconnected,
                    strfmt("process %d cannot be found", static_cast<int>(pid)));
    case EFAULT:
      return Status(StatusCode::kRemoteRejected,
                    strfmt("%llu bytes at 0x%llx are not mapped in process %d",
                           static_cast<unsigned long long>(len),
                           static_cast<unsigned long long>(remote), static_cast<int>(pid)));
    default:
      return Status(StatusCode::kTransportError,
                    strfmt("process_vm_readv from process %d: %s", static_cast<int>(pid),
                           errnoString(err).c_str()));
  }
}

}  // namespace

namespace {
// failNextProcessReads: calls of readProcessMemory still to refuse.
std::atomic<int> g_refused_reads{0};
}  // namespace

void failNextProcessReads(int count) {
  g_refused_reads.store(count, std::memory_order_relaxed);
}

Status readProcessMemory(pid_t pid, std::span<const CrossPiece> pieces, ReadProgress* progress) {
  int refusals = g_refused_reads.load(std::memory_order_relaxed);
  while (refusals > 0 && !g_refused_reads.compare_exchange_weak(refusals, refusals - 1)) {
  }
  if (refusals > 0) return callFailed(pid, EPERM, pieces.empty() ? 0 : pieces.front().remote, 0);
  std::vector<iovec> local;
  std::vector<iovec> remote;
  size_t next = 0;      // the first piece not fully copied
  uint64_t offset = 0;  // bytes of it already copied
  while (next < pieces.size()) {
    // One call: as many (rest of) pieces as fit in kMaxIov entries and kMaxCallBytes.
    local.clear();
    remote.clear();
    uint64_t batch = 0;
    for (size_t i = next; i < pieces.size() && local.size() < kMaxIov && batch < kMaxCallBytes;
         ++i) {
      const uint64_t skip = i == next ? offset : 0;
      const uint64_t len = std::min(pieces[i].len - skip, kMaxCallBytes - batch);
      if (len == 0) continue;
      local.push_back({static_cast<char*>(pieces[i].local) + skip, len});
      remote.push_back({reinterpret_cast<void*>(pieces[i].remote + skip), len});
      batch += len;
    }
    if (batch == 0) break;  // only empty pieces were left
    const ssize_t got =
        process_vm_readv(pid, local.data(), local.size(), remote.data(), remote.size(), 0);
    if (got < 0) {
      const int err = errno;
      if (err == EINTR) continue;
      return callFailed(pid, err, reinterpret_cast<uint64_t>(remote.front().iov_base), batch);
    }
    if (got == 0) {
      // Nothing moved: the first remote range is not readable.
      return callFailed(pid, EFAULT, reinterpret_cast<uint64_t>(remote.front().iov_base),
                        remote.front().iov_len);
    }
    if (progress != nullptr) markProgress(*progress);
    // A short count stops at the first range that could not be read whole: advance past what
    // was copied and let the next call report it.
    auto left = static_cast<uint64_t>(got);
    while (left > 0 && next < pieces.size()) {
      const uint64_t rest = pieces[next].len - offset;
      if (left < rest) {
        offset += left;
        left = 0;
      } else {
        left -= rest;
        ++next;
        offset = 0;
      }
    }
    while (next < pieces.size() && pieces[next].len == 0) ++next;
  }
  return {};
}

Status readProcessMemoryParallel(pid_t pid, std::span<const CrossPiece> pieces, int threads,
                                 ReadProgress* progress) {
  uint64_t total = 0;
  for (const CrossPiece& p : pieces) total += p.len;
  if (threads <= 1 || total == 0) return readProcessMemory(pid, pieces, progress);
  // Part k gets bytes [k * share, (k + 1) * share) of the pieces, split where they cross.
  const uint64_t share =
      (total + static_cast<uint64_t>(threads) - 1) / static_cast<uint64_t>(threads);
  std::vector<std::vector<CrossPiece>> parts(static_cast<size_t>(threads));
  size_t part = 0;
  uint64_t room = share;
  for (CrossPiece p : pieces) {
    while (p.len > 0) {
      const uint64_t n = std::min(p.len, room);
      parts[part].push_back({p.local, p.remote, n});
      p.local = static_cast<char*>(p.local) + n;
      p.remote += n;
      p.len -= n;
      room -= n;
      if (room == 0 && part + 1 < parts.size()) {
        ++part;
        room = share;
      }
    }
  }
  std::vector<Status> results(parts.size());
  std::vector<std::thread> helpers;
  for (size_t k = 1; k < parts.size(); ++k) {
    if (parts[k].empty()) continue;
    try {
      helpers.emplace_back([&, k] { results[k] = readProcessMemory(pid, parts[k], progress); });
    } catch (const std::system_error&) {
      results[k] = readProcessMemory(pid, parts[k], progress);  // no thread: this one reads it
    }
  }
  results[0] = readProcessMemory(pid, parts[0], progress);
  for (std::thread& h : helpers) h.join();
  for (const Status& st : results) {
    if (!st.isOk()) return st;
  }
  return {};
}

Status probeProcess(pid_t pid, uint64_t address, std::string_view cookie) {
  std::string seen(cookie.size(), '\0');
  const CrossPiece piece{seen.data(), address, seen.size()};
  Status st = readProcessMemory(pid, {&piece, 1});
  if (!st.isOk()) {
    return Status(StatusCode::kNotSupported, strfmt("the peer's process %d cannot be read: %s",
                                                    static_cast<int>(pid), st.message().c_str()));
  }
  if (seen != cookie) {
    return Status(
        StatusCode::kNotSupported,
        strfmt("process %d here is not the peer (another pid namespace?)", static_cast<int>(pid)));
  }
  return {};
}

Result<ReadableProcess> ReadableProcess::open(pid_t pid) {
  auto pidfd = std::make_shared<net::Fd>(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  if (!pidfd->valid()) {
    return Status(StatusCode::kNotSupported,
                  strfmt("process %d cannot be pinned down (pidfd_open: %s)", static_cast<int>(pid),
                         errnoString(errno).c_str()));
  }
  // Opened after the pidfd: if the pid was reused in between, running() fails every read, and
  // this answers for a process that is never read. This process's own through /proc/self, which
  // is right also where /proc numbers another pid namespace's processes.
  const std::string path = pid == ::getpid() ? std::string("/proc/self/pagemap")
                                             : strfmt("/proc/%d/pagemap", static_cast<int>(pid));
  auto pagemap = std::make_shared<net::Fd>(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  std::string why;
  if (!pagemap->valid()) why = strfmt("%s: %s", path.c_str(), errnoString(errno).c_str());
  return ReadableProcess(pid, std::move(pidfd), std::move(pagemap), std::move(why));
}

bool ReadableProcess::pagesPresent(std::span<const CrossPiece> pieces) const {
  if (!pagemap_->valid()) return false;
  static const auto kPage = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  constexpr uint64_t kPresent = uint64_t{1} << 63;  // pagemap: bit 63 of a page's entry
  constexpr size_t kBatch = 64;
  std::array<uint64_t, kBatch> entries{};
  // Pages [seen_first, seen_last] were found present: pieces of one range come in order and
  // share pages where they meet, so each page is read once.
  uint64_t seen_first = 1;
  uint64_t seen_last = 0;
  for (const CrossPiece& p : pieces) {
    if (p.len == 0) continue;
    const uint64_t last = (p.remote + p.len - 1) / kPage;
    uint64_t page = p.remote / kPage;
    if (page >= seen_first && page <= seen_last + 1 && seen_last >= seen_first) {
      page = seen_last + 1;  // the piece starts in (or right after) what was seen
    } else {
      seen_first = page;
      seen_last = page - 1;
    }
    for (; page <= last;) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(kBatch, last - page + 1));
      const ssize_t got = ::pread(pagemap_->get(), entries.data(), n * sizeof(uint64_t),
                                  static_cast<off_t>(page * sizeof(uint64_t)));
      if (got != static_cast<ssize_t>(n * sizeof(uint64_t))) return false;
      for (size_t i = 0; i < n; ++i) {
        if ((entries[i] & kPresent) == 0) return false;
      }
      page += n;
      seen_last = page - 1;
    }
  }
  return true;
}

Status ReadableProcess::running() const {
  // A pidfd turns readable when its process ends.
  pollfd ended{pidfd_->get(), POLLIN, 0};
  if (::poll(&ended, 1, 0) == 0) return {};
  return Status(
      StatusCode::kRemoteDisconnected,
      strfmt("process %d ended: its pid may name another process now", static_cast<int>(pid_)));
}

Status readProcessMemory(const ReadableProcess& process, std::span<const CrossPiece> pieces,
                         int threads, ReadProgress* progress) {
  Status st = process.running();
  if (!st.isOk()) return st;
  return readProcessMemoryParallel(process.pid(), pieces, threads, progress);
}

Status probeProcess(const ReadableProcess& process, uint64_t address, std::string_view cookie) {
  Status st = process.running();
  if (!st.isOk()) return Status(StatusCode::kNotSupported, st.message());
  // The probe runs on the engine's progress thread: a cookie whose page would have to be
  // faulted in is not read (a peer whose faults nobody serves would hold the thread).
  const CrossPiece piece{nullptr, address, cookie.size()};
  if (!process.pagesPresent({&piece, 1})) {
    return Status(
        StatusCode::kNotSupported,
        process.pagemapError().empty()
            ? strfmt("the peer's process %d: its cookie at 0x%llx is not in its memory "
                     "now",
                     static_cast<int>(process.pid()), static_cast<unsigned long long>(address))
            : strfmt("the peer's process %d: whether its pages are in memory cannot be "
                     "told (%s)",
                     static_cast<int>(process.pid()), process.pagemapError().c_str()));
  }
  return probeProcess(process.pid(), address, cookie);
}

namespace {

// The first number of `field` ("Tgid:", "Pid:") in a /proc/<...>/status file; -1 if none.
long statusField(const std::string& path, const char* field) {
  std::ifstream status(path);
  std::string line;
  const size_t n = std::strlen(field);
  while (std::getline(status, line)) {
    if (line.compare(0, n, field) == 0) return std::strtol(line.c_str() + n, nullptr, 10);
  }
  return -1;
}

// Whether /proc numbers processes as this process's pid namespace does (a process that entered
// a new pid namespace without mounting its own /proc sees another namespace's numbers there).
bool procSharesOurPidNamespace() {
  static const bool shares = statusField("/proc/self/status", "Pid:") == ::getpid();
  return shares;
}

}  // namespace

Status processHoldsSocket(pid_t pid, uint64_t inode) {
  const bool self = pid == ::getpid();
  if (!self && !procSharesOurPidNamespace()) {
    return Status(StatusCode::kNotSupported,
                  "/proc numbers processes of another pid namespace than this process's, so the "
                  "peer's process cannot be checked");
  }
  const std::string proc = self ? "/proc/self" : strfmt("/proc/%d", static_cast<int>(pid));
  // A thread id has its own /proc entry, sharing its process's descriptors: only a thread group
  // leader names a process.
  if (!self) {
    const long tgid = statusField(proc + "/status", "Tgid:");
    if (tgid != static_cast<long>(pid)) {
      return Status(StatusCode::kNotSupported,
                    tgid < 0 ? strfmt("process %d cannot be found", static_cast<int>(pid))
                             : strfmt("%d is a thread of process %ld, not a process",
                                      static_cast<int>(pid), tgid));
    }
  }
  // Newest descriptors first: the connection was just made, and a process may hold thousands.
  std::error_code error;
  std::vector<long> fds;
  for (std::filesystem::directory_iterator it(proc + "/fd", error);
       !error && it != std::filesystem::directory_iterator(); it.increment(error)) {
    fds.push_back(std::strtol(it->path().filename().c_str(), nullptr, 10));
  }
  if (error) {
    return Status(StatusCode::kNotSupported,
                  strfmt("the descriptors of process %d cannot be listed: %s",
                         static_cast<int>(pid), error.message().c_str()));
  }
  std::sort(fds.begin(), fds.end(), std::greater<>());
  const std::string want = strfmt("socket:[%llu]", static_cast<unsigned long long>(inode));
  for (const long fd : fds) {
    // One closed meanwhile is skipped: it is not the connection's, which stays open.
    std::error_code unreadable;
    if (std::filesystem::read_symlink(strfmt("%s/fd/%ld", proc.c_str(), fd), unreadable).native() ==
        want) {
      return {};
    }
  }
  return Status(
      StatusCode::kNotSupported,
      strfmt("process %d does not hold the peer's end of the connection", static_cast<int>(pid)));
}

}  // namespace tcpx
