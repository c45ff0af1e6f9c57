// Fixture for two-process tests: a forked target peer and an initiator engine in the test
// process, introduced to each other.
#pragma once

#include <chrono>
#include <gtest/gtest.h>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <tcpx_p2p/tcpx_p2p.h>

#include "common/random.h"
#include "support/forked_peer.h"

namespace tcpx::testing {

using namespace std::chrono_literals;

class TwoProcessTest : public ::testing::Test {
 protected:
  // Forks the target first (no threads exist yet), then builds the local engine.
  void start(const std::vector<std::pair<std::string, std::string>>& target_extra = {},
             const std::vector<std::pair<std::string, std::string>>& local_extra = {}) {
    target_ = std::make_unique<ForkedPeer>("target", target_extra);
    ASSERT_FALSE(target_->connectionInfo().empty()) << "target engine did not start";
    auto engine = Engine::create(testConfig("initiator", local_extra));
    ASSERT_TRUE(engine.isOk()) << engine.status().toString();
    engine_ = std::move(engine.value());
    ASSERT_TRUE(engine_->addPeer("target", target_->connectionInfo()).isOk());
    target_->addPeer("initiator", engine_->connectionInfo());
  }

  void TearDown() override {
    engine_.reset();
    target_.reset();
  }

  // Registers `size` bytes on the target and loads its descriptor here.
  RemoteMemory targetRegion(size_t size, uint64_t* target_id = nullptr) {
    const ForkedPeer::Region region = target_->registerMemory(size);
    auto remote = engine_->loadRemoteMemory(region.descriptor);
    EXPECT_TRUE(remote.isOk()) << remote.status().toString();
    if (target_id != nullptr) *target_id = region.id;
    return remote.isOk() ? remote.value() : RemoteMemory{};
  }

  MemoryId localRegion(const HostBuffer& buffer) {
    auto id = engine_->registerMemory(buffer.data(), buffer.size());
    EXPECT_TRUE(id.isOk()) << id.status().toString();
    return id.isOk() ? id.value() : 0;
  }

  // Prepares, posts and waits for one transfer; releases the handle.
  Status run(OpKind op, const std::vector<LocalDesc>& local, const std::vector<RemoteDesc>& remote,
             std::optional<std::string> notification = std::nullopt,
             std::chrono::milliseconds timeout = 60s) {
    auto h = engine_->prepareTransfer(op, "target", local, remote, std::move(notification));
    if (!h.isOk()) return h.status();
    Status st = engine_->postTransfer(h.value());
    if (st.isOk()) st = engine_->waitTransfer(h.value(), timeout);
    (void)engine_->releaseTransfer(h.value());
    return st;
  }

  std::unique_ptr<ForkedPeer> target_;
  std::unique_ptr<Engine> engine_;
  size_t async_ = 0;  // next async token the target will hand out
};

}  // namespace tcpx::testing
