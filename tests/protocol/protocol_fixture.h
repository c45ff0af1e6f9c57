// Fixture for protocol tests: an engine under test in this process, a well-behaved bystander
// peer in a child process, and scripted peers (support/scripted_peer.h) that break the protocol.
// Memory the engine registers sits between poisoned guard areas that no frame may change.
#pragma once

#include <chrono>
#include <cstring>
#include <future>
#include <gtest/gtest.h>
#include <memory>
#include <string>
#include <vector>

#include <tcpx_p2p/tcpx_p2p.h>

#include "common/pattern_memory.h"
#include "common/random.h"
#include "control/frames.h"
#include "support/forked_peer.h"
#include "support/scripted_peer.h"

namespace tcpx::testing {

using namespace std::chrono_literals;

constexpr uint8_t kPoison = 0xA5;

// `size` registered bytes with kGuard poisoned bytes on each side.
class GuardedRegion {
 public:
  static constexpr size_t kGuard = size_t{64} * 1024;
  GuardedRegion(Engine& engine, size_t size) : buffer_(size + 2 * kGuard, kPoison), size_(size) {
    auto id = engine.registerMemory(buffer_.data() + kGuard, size);
    EXPECT_TRUE(id.isOk()) << id.status().toString();
    id_ = id.isOk() ? id.value() : 0;
  }
  [[nodiscard]] MemoryId id() const { return id_; }
  [[nodiscard]] uint8_t* data() const { return buffer_.data() + kGuard; }
  [[nodiscard]] size_t size() const { return size_; }
  // Whether both guard areas still hold the poison.
  [[nodiscard]] bool guardsIntact() const {
    return allBytes(buffer_.data(), kGuard, kPoison) &&
           allBytes(buffer_.data() + kGuard + size_, kGuard, kPoison);
  }
  static bool allBytes(const uint8_t* p, size_t n, uint8_t value) {
    for (size_t i = 0; i < n; ++i) {
      if (p[i] != value) return false;
    }
    return true;
  }

 private:
  tools::HostBuffer buffer_;
  size_t size_;
  MemoryId id_ = 0;
};

inline std::string patternBytes(size_t size, uint64_t seed) {
  std::string out(size, '\0');
  fillPattern(out.data(), size, seed);
  return out;
}

// One encoded frame.
template <typename Encode>
std::vector<uint8_t> frameOf(Encode&& encode) {
  std::vector<uint8_t> out;
  encode(&out);
  return out;
}

class ProtocolTest : public ::testing::Test {
 protected:
  // Forks the bystander first (no threads exist yet), then builds the engine under test.
  void SetUp() override { startEngine({}); }

  void startEngine(const std::vector<std::pair<std::string, std::string>>& extra) {
    std::vector<std::pair<std::string, std::string>> settings{{"transport", "socket"}};
    settings.insert(settings.end(), extra.begin(), extra.end());
    bystander_ = std::make_unique<ForkedPeer>("bystander", settings);
    ASSERT_FALSE(bystander_->connectionInfo().empty());
    auto engine = Engine::create(testConfig("engine", settings));
    ASSERT_TRUE(engine.isOk()) << engine.status().toString();
    engine_ = std::move(engine.value());
    ASSERT_TRUE(engine_->addPeer("bystander", bystander_->connectionInfo()).isOk());
    bystander_->addPeer("engine", engine_->connectionInfo());
  }

  void TearDown() override {
    scripted_.reset();
    engine_.reset();
    bystander_.reset();
  }

  // A new scripted peer (the previous one, if any, is dropped first).
  ScriptedPeer& connectScripted(const ScriptedPeer::Options& options = {}) {
    scripted_.reset();
    auto peer = ScriptedPeer::connect(engine_->connectionInfo(), options);
    EXPECT_TRUE(peer.isOk()) << peer.status().toString();
    if (!peer.isOk()) std::abort();
    scripted_ = std::move(peer.value());
    return *scripted_;
  }

  // A "remote" region of the scripted peer, loaded into the engine.
  RemoteMemory scriptedRegion(uint64_t id, uint64_t length) {
    auto remote = engine_->loadRemoteMemory(scripted_->memoryDescriptor(id, length));
    EXPECT_TRUE(remote.isOk()) << remote.status().toString();
    return remote.isOk() ? remote.value() : RemoteMemory{};
  }

  Result<TransferHandle> post(OpKind op, const std::string& peer, std::vector<LocalDesc> local,
                              std::vector<RemoteDesc> remote,
                              std::optional<std::string> notification = std::nullopt) {
    auto h = engine_->prepareTransfer(op, peer, local, remote, std::move(notification));
    if (!h.isOk()) return h.status();
    Status st = engine_->postTransfer(h.value());
    if (!st.isOk()) return st;
    return h.value();
  }

  // Posts a READ of `size` bytes from the scripted peer into `region`, takes its READ_REQUEST
  // and answers with a READ_RESPONSE announcing a stream (status_follows as given) whose data
  // the test sends, or not. Returns the handle and the READ's wire id.
  std::pair<TransferHandle, uint64_t> postReadAnsweredWithAStream(GuardedRegion& region,
                                                                  size_t size,
                                                                  bool status_follows = false) {
    const RemoteMemory remote = scriptedRegion(77, size);
    auto h = post(OpKind::kRead, "scripted", {{region.id(), 0, size}}, {{remote.id, 0, size}});
    EXPECT_TRUE(h.isOk()) << h.status().toString();
    auto request = scripted_->expect(control::FrameType::kReadRequest, 5s);
    EXPECT_TRUE(request.isOk()) << request.status().toString();
    control::ReadRequest rr;
    if (request.isOk()) {
      EXPECT_TRUE(control::decode(request->payload, control::DecodeLimits{}, &rr).isOk());
    }
    control::ReadResponse resp;
    resp.xfer_id = rr.xfer_id;
    resp.first_chunk = scripted_->outNextChunk();
    resp.spread = scripted_->outSpread();
    resp.status_follows = status_follows;
    EXPECT_TRUE(
        scripted_->send(frameOf([&](auto* out) { control::encode(resp, {}, out); })).isOk());
    return {h.isOk() ? h.value() : 0, rr.xfer_id};
  }

  // `count` READ_REQUESTs of the scripted peer for `descs` (`total` bytes), with fresh ids.
  std::vector<uint8_t> readRequests(int count, const std::vector<control::WireDesc>& descs,
                                    uint64_t total) {
    std::vector<uint8_t> frames;
    for (int i = 0; i < count; ++i) {
      control::ReadRequest rr;
      rr.xfer_id = scripted_->nextId();
      rr.total = total;
      rr.descs = descs;
      control::encode(rr, &frames);
    }
    return frames;
  }

  // The bystander still moves verified bytes both ways: another peer's trouble left it alone.
  void expectBystanderWorks() {
    constexpr size_t kSize = 1 << 20;
    const ForkedPeer::Region region = bystander_->registerMemory(kSize);
    auto remote = engine_->loadRemoteMemory(region.descriptor);
    ASSERT_TRUE(remote.isOk());
    tools::HostBuffer local(kSize);
    const MemoryId mem = engine_->registerMemory(local.data(), kSize).value();
    const uint64_t seed = tools::randomSeed();
    fillPattern(local.data(), kSize, seed);
    for (OpKind op : {OpKind::kWrite, OpKind::kRead}) {
      auto h = post(op, "bystander", {{mem, 0, kSize}}, {{remote->id, 0, kSize}});
      ASSERT_TRUE(h.isOk()) << h.status().toString();
      EXPECT_TRUE(engine_->waitTransfer(h.value(), 30s).isOk());
      (void)engine_->releaseTransfer(h.value());
    }
    EXPECT_EQ(bystander_->check(region.id, 0, kSize, seed), "ok");
    EXPECT_EQ(checkPattern(local.data(), kSize, seed), -1);
    EXPECT_TRUE(engine_->deregisterMemory(mem).isOk());
  }

  // Deregisters within `bound` (a pin left behind would block it forever).
  Status deregisterWithin(MemoryId id, std::chrono::milliseconds bound) {
    auto done =
        std::async(std::launch::async, [this, id] { return engine_->deregisterMemory(id); });
    if (done.wait_for(bound) != std::future_status::ready) {
      ADD_FAILURE() << "deregisterMemory still blocked after " << bound.count() << " ms";
      std::abort();  // the engine would hang the test's teardown too
    }
    return done.get();
  }

  std::unique_ptr<ForkedPeer> bystander_;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<ScriptedPeer> scripted_;
};

}  // namespace tcpx::testing
