// Two-process end-to-end tests: a child process runs its own engine and obeys text commands sent
// over a socketpair, so a test in the parent reads as a conversation between two engines.
//
// The child is a separate program (tcpx_test_peer) started with fork + exec, so peers can be
// started at any time, also while the test process runs engines of its own.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <sys/types.h>
#include <vector>

#include <tcpx_p2p/tcpx_p2p.h>

#include "common/net.h"
#include "common/pattern_memory.h"

namespace tcpx::testing {

// Length-prefixed messages over a stream socket.
class MessageChannel {
 public:
  explicit MessageChannel(int fd) : fd_(fd) {}
  bool send(const std::string& message);
  // Empty optional-like: returns false on EOF, error or timeout.
  bool recv(std::string* message, std::chrono::milliseconds timeout);

 private:
  net::Fd fd_;
};

// A test configuration: loopback only, named, with the given extra settings.
Config testConfig(const std::string& name,
                  const std::vector<std::pair<std::string, std::string>>& extra = {});

using tools::HostBuffer;  // page-aligned host memory (tools/common/pattern_memory.h)

// The child side: serves commands on `fd` with an engine built from testConfig(name, extra).
// Returns the exit code. tcpx_test_peer's main() calls it.
int runPeerService(int fd, const std::string& name,
                   const std::vector<std::pair<std::string, std::string>>& extra);

// Parent-side handle of a peer process running the command loop (see forked_peer.cc for the
// commands). Every method returns the child's one-line answer.
class ForkedPeer {
 public:
  // Starts the child with an engine named `name` built from testConfig(name, extra).
  // `flags` go to tcpx_test_peer before the settings (see peer_main.cc).
  explicit ForkedPeer(const std::string& name,
                      const std::vector<std::pair<std::string, std::string>>& extra = {},
                      const std::vector<std::string>& flags = {});
  ~ForkedPeer();
  ForkedPeer(const ForkedPeer&) = delete;
  ForkedPeer& operator=(const ForkedPeer&) = delete;

  [[nodiscard]] pid_t pid() const { return pid_; }
  [[nodiscard]] const std::string& name() const { return name_; }
  [[nodiscard]] const std::string& connectionInfo() const { return conn_info_; }
  // Why the child's engine did not start ("" when it did).
  [[nodiscard]] const std::string& startError() const { return start_error_; }

  // Sends one command line and returns the answer ("" if the child died or timed out).
  std::string call(const std::string& command,
                   std::chrono::milliseconds timeout = std::chrono::seconds(60));

  // Convenience wrappers.
  struct Region {
    uint64_t id = 0;
    std::string descriptor;  // public memory descriptor blob
  };
  Region registerMemory(size_t size);
  void addPeer(const std::string& name, const std::string& conn_info);
  std::string loadRemote(const std::string& descriptor);  // returns the answer
  void fill(uint64_t mem, uint64_t offset, uint64_t length, uint64_t seed);
  // "ok" or "mismatch <index>"
  std::string check(uint64_t mem, uint64_t offset, uint64_t length, uint64_t seed);
  std::string checkByte(uint64_t mem, uint64_t offset, uint64_t length, uint8_t value);
  // Waits for at least `count` notifications; returns them in arrival order.
  std::vector<Notification> notifications(size_t count, std::chrono::milliseconds timeout);

  void kill(int sig);
  // Stops the process (SIGSTOP) and returns once it is stopped: alive, sockets open, silent.
  void stop();
  // Exit status as from waitpid (-1 on timeout, after which the child is killed).
  int wait(std::chrono::milliseconds timeout);

 private:
  std::string name_;
  pid_t pid_ = -1;
  std::unique_ptr<MessageChannel> channel_;
  std::string conn_info_;
  std::string start_error_;
  bool reaped_ = false;
};

}  // namespace tcpx::testing
