// Reading another process's memory (common/cross_memory.h): every byte of many ranges, ranges
// split across calls, each failure by its code, and which process holds a socket.
#include "common/cross_memory.h"

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <thread>
#include <vector>

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
