// A connected send/recv comm pair of an ncclNet v7 plugin over loopback, driven through the raw
// table, with one registered host buffer on each side (the plugin contract and emulator tests).
#pragma once

#include <dlfcn.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <gtest/gtest.h>
#include <string>
#include <vector>

#include "transport/plugin/net_abi.h"

namespace tcpx::testing {

// Opens a private copy of the plugin library at `path` and returns its v7 table, or null with
// `*error` set. A copy is a library of its own: its raw init does not take the one init of the
// library that the engine, in the same process, loads from `path`.
inline const transport::abi::NetV7* loadPrivateCopy(const std::string& path, const std::string& tag,
                                                    std::string* error) {
  const std::string copy = (std::filesystem::temp_directory_path() /
                            ("tcpx-" + tag + "-" + std::to_string(getpid()) + ".so"))
                               .string();
  std::error_code ec;
  std::filesystem::copy_file(path, copy, std::filesystem::copy_options::overwrite_existing, ec);
  if (ec) {
    *error = "cannot copy " + path + ": " + ec.message();
    return nullptr;
  }
  void* lib = dlopen(copy.c_str(), RTLD_NOW | RTLD_LOCAL);
  std::filesystem::remove(copy, ec);  // stays mapped
  if (lib == nullptr) {
    const char* err = dlerror();  // NOLINT(concurrency-mt-unsafe): per thread in glibc
    *error = "cannot load " + path + ": " + (err != nullptr ? err : "?");
    return nullptr;
  }
  const auto* net =
      static_cast<const transport::abi::NetV7*>(dlsym(lib, transport::abi::kSymbolV7));
  if (net == nullptr) *error = path + " exports no ncclNetPlugin_v7";
  return net;
}

struct PluginPair {
  using Clock = std::chrono::steady_clock;
  const transport::abi::NetV7* net;
  void* send = nullptr;
  void* recv = nullptr;
  alignas(16) transport::abi::DeviceHandle dh{transport::abi::kDeviceUnpack,
                                              transport::abi::kUnpackVersion, nullptr, 0, 0};
  transport::abi::DeviceHandle* dh_ptr = &dh;
  std::vector<char> send_buf;
  std::vector<char> recv_buf;
  void* send_mh = nullptr;
  void* recv_mh = nullptr;

  PluginPair(const transport::abi::NetV7* n, size_t send_bytes, size_t recv_bytes)
      : net(n), send_buf(send_bytes), recv_buf(recv_bytes) {
    using transport::abi::kSuccess;
    unsigned char handle[transport::abi::kHandleSize] = {};
    void* listen = nullptr;
    EXPECT_EQ(net->listen(0, handle, &listen), kSuccess);
    transport::abi::DeviceHandle* none = nullptr;
    const auto deadline = Clock::now() + std::chrono::seconds(20);
    // A failed connect or accept ends the attempt: TCPX's comm is not usable after one (a later
    // accept reads memory the failed one freed), and without its RxDM every accept fails.
    bool failed = false;
    const auto step = [&failed](int rc) {
      EXPECT_EQ(rc, kSuccess);
      failed = rc != kSuccess;
    };
    while ((send == nullptr || recv == nullptr) && !failed && Clock::now() < deadline) {
      if (send == nullptr) step(net->connect(0, handle, &send, &none));
      if (recv == nullptr && !failed) step(net->accept(listen, &recv, &dh_ptr));
    }
    EXPECT_NE(send, nullptr);
    EXPECT_NE(recv, nullptr);
    // One accept per listen comm. (A second one is not tried here: TCPX answers it with a result
    // read from memory it freed.)
    net->close_listen(listen);
    if (send == nullptr || recv == nullptr) return;  // not connected(): the test stops there
    EXPECT_EQ(net->reg_mr(send, send_buf.data(), static_cast<int>(send_buf.size()),
                          transport::abi::kPtrHost, &send_mh),
              kSuccess);
    EXPECT_EQ(net->reg_mr(recv, recv_buf.data(), static_cast<int>(recv_buf.size()),
                          transport::abi::kPtrHost, &recv_mh),
              kSuccess);
  }
  ~PluginPair() {
    // The comms close first; the handles go after (TCPX's deregMr reads the handle alone).
    if (send != nullptr) net->close_send(send);
    if (recv != nullptr) net->close_recv(recv);
    if (send_mh != nullptr) net->dereg_mr(nullptr, send_mh);
    if (recv_mh != nullptr) net->dereg_mr(nullptr, recv_mh);
  }
  // Both comms up and both buffers registered: a test goes on only then (ASSERT_TRUE).
  [[nodiscard]] bool connected() const {
    return send != nullptr && recv != nullptr && send_mh != nullptr && recv_mh != nullptr;
  }
  PluginPair(const PluginPair&) = delete;
  PluginPair& operator=(const PluginPair&) = delete;

  [[nodiscard]] const transport::abi::UnpackHandle& unpack() const {
    return *static_cast<const transport::abi::UnpackHandle*>(dh.handle);
  }
  int isend(size_t offset, size_t size, void** req) {
    return net->isend(send, send_buf.data() + offset, static_cast<int>(size), 0, send_mh, req);
  }
  int irecv(size_t offset, size_t size, void** req) {
    void* data = recv_buf.data() + offset;
    int sz = static_cast<int>(size);
    int tag = 0;
    return net->irecv(recv, 1, &data, &sz, &tag, &recv_mh, req);
  }
  // Posts until the plugin takes the request (it may say "not now" with a null request).
  void* post(bool sending, size_t offset, size_t size) {
    void* req = nullptr;
    for (int i = 0; i < 100000 && req == nullptr; ++i) {
      EXPECT_EQ(sending ? isend(offset, size, &req) : irecv(offset, size, &req),
                transport::abi::kSuccess);
    }
    return req;
  }
  // Tests `req` (the oldest of its comm) and `also` (the other side's oldest request, which TCPX
  // needs polled to progress) until both are done or `bound` passed.
  bool waitDone(void* req, void* also = nullptr,
                std::chrono::milliseconds bound = std::chrono::seconds(20)) {
    const auto deadline = Clock::now() + bound;
    int done = 0;
    int also_done = also == nullptr ? 1 : 0;
    while ((done == 0 || also_done == 0) && Clock::now() < deadline) {
      int sizes = -1;
      if (done == 0 && net->test(req, &done, &sizes) != transport::abi::kSuccess) return false;
      EXPECT_EQ(sizes, -1) << "TCPX never writes sizes";
      if (also_done == 0 && net->test(also, &also_done, &sizes) != transport::abi::kSuccess) {
        return false;
      }
    }
    return done != 0 && also_done != 0;
  }
};

}  // namespace tcpx::testing
