#include "support/tcp_proxy.h"

#include <poll.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <cstring>
#include <netinet/in.h>
#include <sys/socket.h>
#include <utility>

namespace tcpx::testing {
namespace {

void resetAndClose(int fd) {
  linger l{1, 0};  // close with RST
  setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
  ::close(fd);
}

}  // namespace

TcpProxy::TcpProxy(std::string target_host, uint16_t target_port)
    : host_(std::move(target_host)), target_port_(target_port) {
  listener_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(listener_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  ::listen(listener_, 16);
  socklen_t len = sizeof(addr);
  ::getsockname(listener_, reinterpret_cast<sockaddr*>(&addr), &len);
  port_ = ntohs(addr.sin_port);
  thread_ = std::thread([this] { run(); });
}

TcpProxy::~TcpProxy() {
  stop_.store(true);
  thread_.join();
  ::close(listener_);
}

void TcpProxy::cut() {
  cut_.store(true);
}

void TcpProxy::run() {
  std::vector<std::pair<int, int>> pairs;  // (client side, target side)
  std::vector<char> buffer(1 << 16);
  while (!stop_.load()) {
    if (cut_.exchange(false)) {
      for (auto [a, b] : pairs) {
        resetAndClose(a);
        resetAndClose(b);
      }
      pairs.clear();
    }
    std::vector<pollfd> fds{{listener_, POLLIN, 0}};
    const bool stalled = stalled_.load();
    for (auto [a, b] : pairs) {
      fds.push_back({a, static_cast<short>(stalled ? 0 : POLLIN), 0});
      fds.push_back({b, static_cast<short>(stalled ? 0 : POLLIN), 0});
    }
    if (::poll(fds.data(), fds.size(), 10) <= 0) continue;
    if ((fds[0].revents & POLLIN) != 0) {
      const int client = ::accept4(listener_, nullptr, nullptr, SOCK_CLOEXEC);
      const int upstream = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      sockaddr_in addr{};
      addr.sin_family = AF_INET;
      addr.sin_port = htons(target_port_);
      inet_pton(AF_INET, host_.c_str(), &addr.sin_addr);
      if (client >= 0 &&
          ::connect(upstream, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
        pairs.emplace_back(client, upstream);
        connections_.fetch_add(1);
      } else {
        if (client >= 0) ::close(client);
        ::close(upstream);
      }
    }
    // Pairs accepted in this round have no poll entry yet: they are served next round.
    const size_t polled = (fds.size() - 1) / 2;
    std::vector<std::pair<int, int>> alive(pairs.begin() + static_cast<std::ptrdiff_t>(polled),
                                           pairs.end());
    for (size_t i = 0; i < polled; ++i) {
      auto [a, b] = pairs[i];
      bool open = true;
      for (int side = 0; side < 2 && open; ++side) {
        const pollfd& p = fds[1 + 2 * i + static_cast<size_t>(side)];
        if ((p.revents & (POLLIN | POLLHUP | POLLERR)) == 0) continue;
        const int from = side == 0 ? a : b;
        const int to = side == 0 ? b : a;
        const ssize_t n = ::recv(from, buffer.data(), buffer.size(), 0);
        if (n <= 0) {
          open = false;
          break;
        }
        for (ssize_t sent = 0; sent < n;) {
          const ssize_t w =
              ::send(to, buffer.data() + sent, static_cast<size_t>(n - sent), MSG_NOSIGNAL);
          if (w <= 0) {
            open = false;
            break;
          }
          sent += w;
        }
      }
      if (open) {
        alive.emplace_back(a, b);
      } else {
        ::close(a);
        ::close(b);
      }
    }
    pairs = std::move(alive);
  }
  for (auto [a, b] : pairs) {
    ::close(a);
    ::close(b);
  }
}

}  // namespace tcpx::testing
