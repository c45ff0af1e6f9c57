// A TCP proxy for fault injection: forwards connections to a target address until told to stall
// (stop moving bytes, connections stay open: a silent network) or to cut (reset every connection,
// as a failed link or a firewall would).
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace tcpx::testing {

class TcpProxy {
 public:
  TcpProxy(std::string target_host, uint16_t target_port);
  ~TcpProxy();
  TcpProxy(const TcpProxy&) = delete;
  TcpProxy& operator=(const TcpProxy&) = delete;

  [[nodiscard]] uint16_t port() const { return port_; }
  void stall() { stalled_.store(true); }
  void cut();
  [[nodiscard]] int connections() const { return connections_.load(); }

 private:
  void run();

  std::string host_;
  uint16_t target_port_;
  int listener_ = -1;
  uint16_t port_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<bool> stalled_{false};
  std::atomic<bool> cut_{false};
  std::atomic<int> connections_{0};
  std::thread thread_;
};

}  // namespace tcpx::testing
