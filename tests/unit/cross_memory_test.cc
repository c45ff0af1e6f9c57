// Reading another process's memory (common/cross_memory.h): every byte of many ranges, ranges
// split across calls, and each failure by its code.
#include "common/cross_memory.h"

#include <signal.h>
#include <unistd.h>

#include <cstring>
#include <gtest/gtest.h>
#include <sys/wait.h>
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

}  // namespace
}  // namespace tcpx
