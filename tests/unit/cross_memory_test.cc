// Reading another process's memory (common/cross_memory.h): every byte of many ranges, ranges
// split across calls, each failure by its code, and which process holds a socket.
#include "common/cross_memory.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <gtest/gtest.h>
#include <linux/userfaultfd.h>
#include <string_view>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <thread>
#include <vector>

#include "common/strings.h"
#include "support/unserved_pages.h"

namespace tcpx {
namespace {

// A child that fills `buffer` with its own bytes (the parent's copy keeps others) and waits to be
// killed; the parent reads the child's.
class Child {
 public:
  explicit Child(std::vector<uint8_t>* buffer) {
    int ready[2];
    EXPECT_EQ(pipe(ready), 0);
    pid_ = fork();
    if (pid_ == 0) {
      for (size_t i = 0; i < buffer->size(); ++i) (*buffer)[i] = static_cast<uint8_t>(i * 7 + 3);
      const char byte = 1;
      (void)!write(ready[1], &byte, 1);
      pause();
      _exit(0);
    }
    char byte = 0;
    EXPECT_EQ(read(ready[0], &byte, 1), 1);
    close(ready[0]);
    close(ready[1]);
  }
  ~Child() { stop(); }
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;
  [[nodiscard]] pid_t pid() const { return pid_; }
  void stop() {
    if (pid_ <= 0) return;
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }

 private:
  pid_t pid_ = -1;
};

TEST(CrossMemory, ReadsEveryByteOfManyRangesFromAnotherProcess) {
  // More ranges than one call takes (1024), and a range longer than one call moves (64 MiB).
  std::vector<uint8_t> remote((size_t{80} << 20) + 4096, 0);
  Child child(&remote);
  std::vector<uint8_t> local(remote.size(), 0xEE);
  std::vector<CrossPiece> pieces;
  // 3000 ranges of 61 bytes, in reverse order, then the rest as one long range.
  const size_t small = 3000 * 61;
  for (size_t i = 0; i < 3000; ++i) {
    pieces.push_back({local.data() + i * 61,
                      reinterpret_cast<uint64_t>(remote.data() + small - (i + 1) * 61), 61});
  }
  pieces.push_back({local.data() + small, reinterpret_cast<uint64_t>(remote.data() + small),
                    remote.size() - small});
  ASSERT_TRUE(readProcessMemory(child.pid(), pieces).isOk());
  for (size_t i = 0; i < 3000; ++i) {
    const size_t from = small - (i + 1) * 61;
    for (size_t k = 0; k < 61; ++k) {
      ASSERT_EQ(local[i * 61 + k], static_cast<uint8_t>((from + k) * 7 + 3)) << i << " " << k;
    }
  }
  for (size_t i = small; i < remote.size(); ++i) {
    ASSERT_EQ(local[i], static_cast<uint8_t>(i * 7 + 3)) << i;
  }
}

TEST(CrossMemory, UnmappedRangesGoneProcessesAndForeignCookiesFailByCode) {
  std::vector<uint8_t> remote(4096, 0);
  Child child(&remote);
  std::vector<uint8_t> local(8192);
  // An address no process maps (the first page).
  const CrossPiece unmapped{local.data(), 0x10, 4096};
  EXPECT_EQ(readProcessMemory(child.pid(), {&unmapped, 1}).code(), StatusCode::kRemoteRejected);

  // The child's cookie is its bytes: a wrong one is another process.
  const std::string cookie(reinterpret_cast<const char*>(remote.data()), 16);
  std::string theirs(16, '\0');
  for (size_t i = 0; i < 16; ++i) theirs[i] = static_cast<char>(i * 7 + 3);
  EXPECT_TRUE(probeProcess(child.pid(), reinterpret_cast<uint64_t>(remote.data()), theirs).isOk());
  EXPECT_EQ(probeProcess(child.pid(), reinterpret_cast<uint64_t>(remote.data()), cookie).code(),
            StatusCode::kNotSupported);
  EXPECT_EQ(probeProcess(child.pid(), 0x10, theirs).code(), StatusCode::kNotSupported);

  const pid_t gone = child.pid();
  child.stop();
  const CrossPiece piece{local.data(), reinterpret_cast<uint64_t>(remote.data()), 16};
  EXPECT_EQ(readProcessMemory(gone, {&piece, 1}).code(), StatusCode::kRemoteDisconnected);
}

// A process pinned down by its pidfd: read while it runs; once it ended, reads and probes through
// it fail at once, whatever the pid names by then.
TEST(CrossMemory, AProcessPinnedDownIsNoLongerReadOnceItEnded) {
  std::vector<uint8_t> remote(4096, 0);
  Child child(&remote);
  auto process = ReadableProcess::open(child.pid());
  ASSERT_TRUE(process.isOk()) << process.status().toString();
  EXPECT_TRUE(process->running().isOk());
  std::vector<uint8_t> local(16, 0);
  const CrossPiece piece{local.data(), reinterpret_cast<uint64_t>(remote.data()), local.size()};
  ASSERT_TRUE(readProcessMemory(*process, {&piece, 1}).isOk());
  EXPECT_EQ(local[1], static_cast<uint8_t>(1 * 7 + 3));
  const std::string theirs(reinterpret_cast<const char*>(local.data()), local.size());
  EXPECT_TRUE(probeProcess(*process, reinterpret_cast<uint64_t>(remote.data()), theirs).isOk());
  child.stop();
  EXPECT_EQ(process->running().code(), StatusCode::kRemoteDisconnected);
  EXPECT_EQ(readProcessMemory(*process, {&piece, 1}).code(), StatusCode::kRemoteDisconnected);
  EXPECT_EQ(probeProcess(*process, reinterpret_cast<uint64_t>(remote.data()), theirs).code(),
            StatusCode::kNotSupported);
  EXPECT_EQ(ReadableProcess::open(0x7ffffff0).status().code(), StatusCode::kNotSupported);
}

// Pages never touched are not present, and a range is present only when every page it touches
// is; a probe of a cookie on a page that is not present reads nothing and fails.
TEST(CrossMemory, PagesPresentOnlyOnceEveryPageOfTheRangeIsInMemory) {
  const auto page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* area = mmap(nullptr, 3 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(area, MAP_FAILED);
  // Small pages only: a huge page would bring the untouched neighbours in with the first.
  (void)madvise(area, 3 * page, MADV_NOHUGEPAGE);
  auto* bytes = static_cast<char*>(area);
  auto self = ReadableProcess::open(getpid());
  ASSERT_TRUE(self.isOk()) << self.status().toString();
  const auto at = [&](size_t offset) { return reinterpret_cast<uint64_t>(bytes + offset); };
  const CrossPiece first_two{nullptr, at(page - 8), 16};  // the end of page 0, the start of 1
  const CrossPiece third{nullptr, at(2 * page + 100), 10};
  EXPECT_FALSE(self->pagesPresent({&first_two, 1}));
  const std::string_view cookie = "cookie";
  std::copy(cookie.begin(), cookie.end(), bytes);
  EXPECT_FALSE(self->pagesPresent({&first_two, 1})) << "page 1 was never touched";
  EXPECT_EQ(probeProcess(*self, at(page + 64), "cookie").code(), StatusCode::kNotSupported);
  bytes[page] = 1;
  EXPECT_TRUE(self->pagesPresent({&first_two, 1}));
  const CrossPiece meeting[] = {{nullptr, at(0), 100}, {nullptr, at(100), page}};  // pages 0, 1
  EXPECT_TRUE(self->pagesPresent(meeting));
  const CrossPiece both[] = {first_two, third};
  EXPECT_FALSE(self->pagesPresent(both));
  const CrossPiece backwards[] = {third, first_two};
  EXPECT_FALSE(self->pagesPresent(backwards));
  bytes[2 * page + 100] = 1;
  EXPECT_TRUE(self->pagesPresent(both));
  EXPECT_TRUE(self->pagesPresent(backwards));
  EXPECT_TRUE(probeProcess(*self, at(0), "cookie").isOk());
  ASSERT_EQ(munmap(area, 3 * page), 0);
  EXPECT_FALSE(self->pagesPresent({&first_two, 1}));
}

// A page whose fault nobody serves (a userfaultfd that no thread reads) is not read by a probe:
// it answers at once instead of waiting for the fault. The test serves the fault itself after
// three seconds, so that a probe that did wait ends too.
TEST(CrossMemory, AProbeNeverWaitsForAFaultNobodyServes) {
  const auto page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const int uffd = testing::openUserfaultfd();
  if (uffd < 0) GTEST_SKIP() << "userfaultfd is not available here: " << errnoString(errno);
  void* area = mmap(nullptr, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(area, MAP_FAILED);
  ASSERT_TRUE(testing::registerUnservedPages(uffd, area, page)) << errnoString(errno);
  std::atomic<bool> probed{false};
  std::thread server([&] {
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(3);
    while (!probed.load() && std::chrono::steady_clock::now() < until) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    uffdio_zeropage zero{};
    zero.range = {reinterpret_cast<uint64_t>(area), page};
    (void)ioctl(uffd, UFFDIO_ZEROPAGE, &zero);  // fails harmlessly when nothing faulted
  });
  auto self = ReadableProcess::open(getpid());
  ASSERT_TRUE(self.isOk()) << self.status().toString();
  const auto start = std::chrono::steady_clock::now();
  const Status st = probeProcess(*self, reinterpret_cast<uint64_t>(area), "cookie");
  const auto took = std::chrono::steady_clock::now() - start;
  probed.store(true);
  server.join();
  EXPECT_EQ(st.code(), StatusCode::kNotSupported) << st.toString();
  EXPECT_LT(took, std::chrono::seconds(1)) << "the probe waited for the fault";
  close(uffd);
  ASSERT_EQ(munmap(area, page), 0);
}

// Only a process that holds a socket passes for its owner: not a thread id of that process, not
// a child forked before the socket existed, not a process that is gone.
TEST(CrossMemory, OnlyAProcessHoldingASocketPassesForItsOwner) {
  int pair[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair), 0);
  std::vector<uint8_t> unused(16, 0);
  Child before(&unused);  // forked before the second pair: holds the first only
  int later[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, later), 0);
  struct stat first {};
  struct stat second {};
  ASSERT_EQ(fstat(pair[0], &first), 0);
  ASSERT_EQ(fstat(later[0], &second), 0);

  EXPECT_TRUE(processHoldsSocket(getpid(), first.st_ino).isOk());
  EXPECT_TRUE(processHoldsSocket(before.pid(), first.st_ino).isOk());
  EXPECT_TRUE(processHoldsSocket(getpid(), second.st_ino).isOk());
  const Status not_held = processHoldsSocket(before.pid(), second.st_ino);
  EXPECT_EQ(not_held.code(), StatusCode::kNotSupported);
  EXPECT_NE(not_held.message().find("does not hold"), std::string::npos) << not_held.message();

  // A thread of this process sees this process's descriptors, but names no process.
  std::atomic<pid_t> tid{0};
  std::atomic<bool> done{false};
  std::thread thread([&] {
    tid = static_cast<pid_t>(syscall(SYS_gettid));
    while (!done.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  });
  while (tid.load() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  const Status thread_id = processHoldsSocket(tid.load(), first.st_ino);
  done = true;
  thread.join();
  EXPECT_EQ(thread_id.code(), StatusCode::kNotSupported);
  EXPECT_NE(thread_id.message().find("is a thread of process"), std::string::npos)
      << thread_id.message();

  const pid_t gone = before.pid();
  before.stop();
  EXPECT_EQ(processHoldsSocket(gone, first.st_ino).code(), StatusCode::kNotSupported);
  for (const int fd : {pair[0], pair[1], later[0], later[1]}) close(fd);
}

}  // namespace
}  // namespace tcpx
