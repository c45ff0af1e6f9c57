#include "common/net.h"

#include <fcntl.h>
#include <ifaddrs.h>
#include <netdb.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <optional>
#include <sys/eventfd.h>

#include "common/strings.h"

namespace tcpx::net {

void Fd::reset(int fd) {
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

uint16_t SockAddr::port() const {
  if (family() == AF_INET) return ntohs(reinterpret_cast<const sockaddr_in*>(&storage)->sin_port);
  if (family() == AF_INET6)
    return ntohs(reinterpret_cast<const sockaddr_in6*>(&storage)->sin6_port);
  return 0;
}

void SockAddr::setPort(uint16_t port) {
  if (family() == AF_INET) reinterpret_cast<sockaddr_in*>(&storage)->sin_port = htons(port);
  if (family() == AF_INET6) reinterpret_cast<sockaddr_in6*>(&storage)->sin6_port = htons(port);
}

std::string SockAddr::host() const {
  char buf[INET6_ADDRSTRLEN] = "?";
  if (family() == AF_INET) {
    inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in*>(&storage)->sin_addr, buf, sizeof(buf));
  } else if (family() == AF_INET6) {
    inet_ntop(AF_INET6, &reinterpret_cast<const sockaddr_in6*>(&storage)->sin6_addr, buf,
              sizeof(buf));
  }
  return buf;
}

std::string SockAddr::toString() const {
  if (family() == AF_INET6) return strfmt("[%s]:%u", host().c_str(), port());
  return strfmt("%s:%u", host().c_str(), port());
}

Result<SockAddr> resolve(const std::string& host, uint16_t port) {
  SockAddr out;
  if (host.empty()) {
    auto* in = reinterpret_cast<sockaddr_in*>(&out.storage);
    in->sin_family = AF_INET;
    in->sin_addr.s_addr = htonl(INADDR_ANY);
    in->sin_port = htons(port);
    out.len = sizeof(sockaddr_in);
    return out;
  }
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  const int rc = getaddrinfo(host.c_str(), nullptr, &hints, &res);
  if (rc != 0 || res == nullptr) {
    return Status(StatusCode::kInvalidArgument,
                  strfmt("cannot resolve host '%s': %s", host.c_str(), gai_strerror(rc)));
  }
  // Prefer IPv4 when both exist: loopback and most data-centre NICs are configured for it.
  const addrinfo* pick = res;
  for (const addrinfo* ai = res; ai != nullptr; ai = ai->ai_next) {
    if (ai->ai_family == AF_INET) {
      pick = ai;
      break;
    }
  }
  std::memcpy(&out.storage, pick->ai_addr, pick->ai_addrlen);
  out.len = pick->ai_addrlen;
  freeaddrinfo(res);
  out.setPort(port);
  return out;
}

Result<std::string> interfaceAddress(const std::string& ifname) {
  ifaddrs* list = nullptr;
  if (getifaddrs(&list) != 0) {
    return Status(StatusCode::kTransportError, "getifaddrs: " + errnoString(errno));
  }
  std::string found;
  for (ifaddrs* ifa = list; ifa != nullptr; ifa = ifa->ifa_next) {
    if (ifa->ifa_addr == nullptr || ifa->ifa_addr->sa_family != AF_INET) continue;
    if (ifname != ifa->ifa_name) continue;
    char buf[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(ifa->ifa_addr)->sin_addr, buf, sizeof(buf));
    found = buf;
    break;
  }
  freeifaddrs(list);
  if (found.empty()) {
    return Status(StatusCode::kNotFound,
                  strfmt("network interface '%s' has no IPv4 address", ifname.c_str()));
  }
  return found;
}

std::string hostIdentity() {
  static const std::string id = [] {
    std::string text;
    if (FILE* f = std::fopen("/proc/sys/kernel/random/boot_id", "re")) {
      char buf[64] = {};
      if (std::fgets(buf, sizeof(buf), f) != nullptr) text = buf;
      std::fclose(f);
    }
    while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
    return text;
  }();
  return id;
}

std::string primaryAddress() {
  // A UDP "connect" sends nothing; it only asks the kernel which source address it would use.
  Fd probe(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  if (probe.valid()) {
    sockaddr_in dst{};
    dst.sin_family = AF_INET;
    dst.sin_port = htons(53);
    inet_pton(AF_INET, "8.8.8.8", &dst.sin_addr);
    if (::connect(probe.get(), reinterpret_cast<sockaddr*>(&dst), sizeof(dst)) == 0) {
      sockaddr_in local{};
      socklen_t len = sizeof(local);
      if (getsockname(probe.get(), reinterpret_cast<sockaddr*>(&local), &len) == 0 &&
          local.sin_addr.s_addr != htonl(INADDR_ANY)) {
        char buf[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, &local.sin_addr, buf, sizeof(buf));
        return buf;
      }
    }
  }
  ifaddrs* list = nullptr;
  std::string found = "127.0.0.1";
  if (getifaddrs(&list) == 0) {
    for (ifaddrs* ifa = list; ifa != nullptr; ifa = ifa->ifa_next) {
      if (ifa->ifa_addr == nullptr || ifa->ifa_addr->sa_family != AF_INET) continue;
      if ((ifa->ifa_flags & IFF_UP) == 0 || (ifa->ifa_flags & IFF_LOOPBACK) != 0) continue;
      char buf[INET_ADDRSTRLEN];
      inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(ifa->ifa_addr)->sin_addr, buf,
                sizeof(buf));
      found = buf;
      break;
    }
    freeifaddrs(list);
  }
  return found;
}

Status setNonBlocking(int fd, bool on) {
  const int flags = fcntl(fd, F_GETFL, 0);
  if (flags < 0)
    return Status(StatusCode::kTransportError, "fcntl(F_GETFL): " + errnoString(errno));
  const int want = on ? (flags | O_NONBLOCK) : (flags & ~O_NONBLOCK);
  if (want != flags && fcntl(fd, F_SETFL, want) < 0) {
    return Status(StatusCode::kTransportError, "fcntl(F_SETFL): " + errnoString(errno));
  }
  return {};
}

Status setNoDelay(int fd) {
  int one = 1;
  if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) != 0) {
    return Status(StatusCode::kTransportError, "setsockopt(TCP_NODELAY): " + errnoString(errno));
  }
  return {};
}

Result<Fd> listenTcp(SockAddr* addr, int backlog) {
  Fd fd(::socket(addr->family(), SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return Status(StatusCode::kTransportError, "socket: " + errnoString(errno));
  int one = 1;
  setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (::bind(fd.get(), addr->raw(), addr->len) != 0) {
    return Status(StatusCode::kTransportError,
                  strfmt("bind %s: %s", addr->toString().c_str(), errnoString(errno).c_str()));
  }
  if (::listen(fd.get(), backlog) != 0) {
    return Status(StatusCode::kTransportError, "listen: " + errnoString(errno));
  }
  socklen_t len = sizeof(addr->storage);
  if (getsockname(fd.get(), addr->raw(), &len) != 0) {
    return Status(StatusCode::kTransportError, "getsockname: " + errnoString(errno));
  }
  addr->len = len;
  return fd;
}

Status writeAll(int fd, const void* data, size_t len) {
  const auto* p = static_cast<const char*>(data);
  while (len > 0) {
    const ssize_t n = ::send(fd, p, len, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status(errno == EPIPE || errno == ECONNRESET ? StatusCode::kRemoteDisconnected
                                                          : StatusCode::kTransportError,
                    "send: " + errnoString(errno));
    }
    p += n;
    len -= static_cast<size_t>(n);
  }
  return {};
}

Status readAll(int fd, void* data, size_t len) {
  auto* p = static_cast<char*>(data);
  while (len > 0) {
    const ssize_t n = ::recv(fd, p, len, 0);
    if (n == 0) return Status(StatusCode::kRemoteDisconnected, "connection closed by peer");
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status(
          errno == ECONNRESET ? StatusCode::kRemoteDisconnected : StatusCode::kTransportError,
          "recv: " + errnoString(errno));
    }
    p += n;
    len -= static_cast<size_t>(n);
  }
  return {};
}

std::string peerAddressOf(int fd) {
  SockAddr addr;
  socklen_t len = sizeof(addr.storage);
  if (getpeername(fd, addr.raw(), &len) != 0) return "?";
  addr.len = len;
  return addr.toString();
}

bool isConnectedToItself(int fd) {
  SockAddr local;
  SockAddr remote;
  socklen_t local_len = sizeof(local.storage);
  socklen_t remote_len = sizeof(remote.storage);
  if (getsockname(fd, local.raw(), &local_len) != 0 ||
      getpeername(fd, remote.raw(), &remote_len) != 0) {
    return false;
  }
  local.len = local_len;
  remote.len = remote_len;
  return local.port() == remote.port() && local.toString() == remote.toString();
}

namespace {

// An address and port as /proc/net/tcp{,6} prints them: the address's 32-bit words in memory
// order, each as a host-order hex number, then the port.
std::string procNetForm(const SockAddr& a) {
  std::string out;
  const void* addr = nullptr;
  size_t words = 0;
  if (a.family() == AF_INET) {
    addr = &reinterpret_cast<const sockaddr_in*>(&a.storage)->sin_addr;
    words = 1;
  } else {
    addr = &reinterpret_cast<const sockaddr_in6*>(&a.storage)->sin6_addr;
    words = 4;
  }
  for (size_t i = 0; i < words; ++i) {
    uint32_t w = 0;
    std::memcpy(&w, static_cast<const char*>(addr) + 4 * i, 4);
    out += strfmt("%08X", w);
  }
  return out + strfmt(":%04X", a.port());
}

// How an address appears in /proc/net/tcp (an IPv4 socket) and in tcp6 (an IPv6 one), as far as
// it can: an IPv4 address, or an IPv4-mapped IPv6 one, has both forms, since a dual-stack socket
// talks IPv4 through a mapped address (one end of a connection may then be listed in tcp, the
// other in tcp6); another IPv6 address has only the tcp6 form (v4 empty).
struct ProcForms {
  std::string v4;
  std::string v6;
};

ProcForms procForms(const SockAddr& a) {
  ProcForms forms;
  SockAddr v4;
  SockAddr v6;
  auto* in4 = reinterpret_cast<sockaddr_in*>(&v4.storage);
  auto* in6 = reinterpret_cast<sockaddr_in6*>(&v6.storage);
  in4->sin_family = AF_INET;
  in6->sin6_family = AF_INET6;
  if (a.family() == AF_INET) {
    in4->sin_addr = reinterpret_cast<const sockaddr_in*>(&a.storage)->sin_addr;
  } else {
    in6->sin6_addr = reinterpret_cast<const sockaddr_in6*>(&a.storage)->sin6_addr;
    forms.v6 = procNetForm(a);
    if (!IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr)) return forms;
    std::memcpy(&in4->sin_addr, &in6->sin6_addr.s6_addr[12], 4);
  }
  v4.setPort(a.port());
  forms.v4 = procNetForm(v4);
  if (a.family() == AF_INET) {
    in6->sin6_addr.s6_addr[10] = 0xff;
    in6->sin6_addr.s6_addr[11] = 0xff;
    std::memcpy(&in6->sin6_addr.s6_addr[12], &in4->sin_addr, 4);
    v6.setPort(a.port());
    forms.v6 = procNetForm(v6);
  }
  return forms;
}

// The socket of `table` whose local and remote addresses are `local` and `remote`.
std::optional<LocalPeerSocket> findSocket(const char* table, const std::string& local,
                                          const std::string& remote) {
  if (local.empty() || remote.empty()) return std::nullopt;
  FILE* in = std::fopen(table, "re");
  if (in == nullptr) return std::nullopt;
  std::optional<LocalPeerSocket> found;
  char line[512];
  while (std::fgets(line, sizeof(line), in) != nullptr) {
    char l[64] = {};
    char r[64] = {};
    unsigned uid = 0;
    unsigned long long inode = 0;
    // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
    if (std::sscanf(line, " %*s %63s %63s %*s %*s %*s %*s %u %*s %llu", l, r, &uid, &inode) != 4) {
      continue;
    }
    if (local == l && remote == r) {
      found = LocalPeerSocket{static_cast<uid_t>(uid), inode};
      break;
    }
  }
  std::fclose(in);
  return found;
}

}  // namespace

Result<LocalPeerSocket> localPeerSocket(int fd) {
  SockAddr ours;
  SockAddr theirs;
  socklen_t len = sizeof(ours.storage);
  if (getsockname(fd, ours.raw(), &len) != 0) return Status(StatusCode::kNotFound, "getsockname");
  ours.len = len;
  len = sizeof(theirs.storage);
  if (getpeername(fd, theirs.raw(), &len) != 0) return Status(StatusCode::kNotFound, "getpeername");
  theirs.len = len;
  if ((ours.family() != AF_INET && ours.family() != AF_INET6) ||
      (theirs.family() != AF_INET && theirs.family() != AF_INET6)) {
    return Status(StatusCode::kNotFound, "not a TCP/IP connection");
  }
  // The peer's socket: its local address is our remote one and the other way round. The tables
  // of this process's network namespace (/proc/self/net, which /proc/net points to).
  const ProcForms local = procForms(theirs);
  const ProcForms remote = procForms(ours);
  auto found = findSocket("/proc/self/net/tcp", local.v4, remote.v4);
  if (!found) found = findSocket("/proc/self/net/tcp6", local.v6, remote.v6);
  if (!found) return Status(StatusCode::kNotFound, "the peer's socket is not on this host");
  return *found;
}

EventFd::EventFd() : fd_(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) {
  if (!fd_.valid()) error_ = errno;
}

void EventFd::signal() const {
  const uint64_t one = 1;
  // A full counter (never in practice) still leaves the fd readable, which is all we need.
  [[maybe_unused]] const ssize_t n = ::write(fd_.get(), &one, sizeof(one));
}

bool EventFd::drain() const {
  uint64_t value = 0;
  return ::read(fd_.get(), &value, sizeof(value)) == sizeof(value);
}

}  // namespace tcpx::net
