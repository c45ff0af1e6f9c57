// Socket helpers shared by the control plane, the socket transport and the tools.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <sys/socket.h>
#include <sys/types.h>
#include <utility>

#include <tcpx_p2p/status.h>

namespace tcpx::net {

// Owns a file descriptor; closes it on destruction. Move-only.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() { reset(); }
  Fd(Fd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  Fd& operator=(Fd&& other) noexcept {
    if (this != &other) {
      reset();
      fd_ = std::exchange(other.fd_, -1);
    }
    return *this;
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;

  [[nodiscard]] int get() const { return fd_; }
  [[nodiscard]] bool valid() const { return fd_ >= 0; }
  int release() { return std::exchange(fd_, -1); }
  void reset(int fd = -1);

 private:
  int fd_ = -1;
};

// An IPv4 or IPv6 socket address.
struct SockAddr {
  sockaddr_storage storage{};
  socklen_t len = 0;

  [[nodiscard]] int family() const { return storage.ss_family; }
  [[nodiscard]] uint16_t port() const;
  void setPort(uint16_t port);
  // "1.2.3.4:5678" or "[::1]:5678"
  [[nodiscard]] std::string toString() const;
  // Numeric host only ("10.0.0.1", "::1"); no name resolution.
  [[nodiscard]] std::string host() const;
  [[nodiscard]] const sockaddr* raw() const { return reinterpret_cast<const sockaddr*>(&storage); }
  sockaddr* raw() { return reinterpret_cast<sockaddr*>(&storage); }
};

// Resolves "host" (name or numeric; empty means the wildcard address) and a port.
Result<SockAddr> resolve(const std::string& host, uint16_t port);

// IPv4 address of a network interface ("eth1" -> "10.0.1.2").
Result<std::string> interfaceAddress(const std::string& ifname);

// Best guess of this host's primary address: the source address of the default route, else the
// first non-loopback interface that is up, else 127.0.0.1.
std::string primaryAddress();

// The identity of the running kernel (its boot id, shared by every process and container on the
// host): two engines reporting the same one run on one host. Empty when it cannot be read.
std::string hostIdentity();

Status setNonBlocking(int fd, bool on);
Status setNoDelay(int fd);

// Listening TCP socket bound to `addr` (port 0 = ephemeral); the chosen address is written back.
Result<Fd> listenTcp(SockAddr* addr, int backlog);

// Writes/reads exactly `len` bytes on a blocking socket. EOF on read returns kRemoteDisconnected.
Status writeAll(int fd, const void* data, size_t len);
Status readAll(int fd, void* data, size_t len);

// Address of the remote end, for log lines ("?" on error).
std::string peerAddressOf(int fd);

// Whether a connected TCP socket is connected to itself. Connecting to a port of this host that
// nothing listens on can end so (TCP simultaneous open) when the kernel happens to pick that same
// port as the source: the connect succeeds and every byte sent comes back. Such a connection
// means "refused" and must be dropped before anything is read from it.
bool isConnectedToItself(int fd);

// The other end of a connected TCP socket, when that end is a socket of this network namespace
// (a process on this host: found in /proc/net/tcp or tcp6): the user owning it and its inode,
// which names it among the descriptors of the processes holding it (/proc/<pid>/fd). NOT_FOUND
// otherwise (a connection from elsewhere, or from another network namespace).
struct LocalPeerSocket {
  uid_t uid = 0;
  uint64_t inode = 0;
};
Result<LocalPeerSocket> localPeerSocket(int fd);

// A Linux eventfd used to wake a thread blocked in epoll or poll.
class EventFd {
 public:
  EventFd();
  [[nodiscard]] int fd() const { return fd_.get(); }
  // Whether the eventfd exists (it may not when the process is out of file descriptors); if
  // not, error() is the errno of the attempt.
  [[nodiscard]] bool valid() const { return fd_.valid(); }
  [[nodiscard]] int error() const { return error_; }
  void signal() const;
  // Clears the counter; returns true if it was signalled.
  bool drain() const;

 private:
  Fd fd_;
  int error_ = 0;
};

}  // namespace tcpx::net
