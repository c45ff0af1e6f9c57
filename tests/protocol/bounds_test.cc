// What a peer can make the engine hold is bounded (README, "Memory bound per peer"): a peer
// pushed past a bound gets a typed refusal or is failed, and the engine's memory stays under
// the documented figure; a process out of descriptors, address space or threads gets typed
// errors and lives on.
#include <unistd.h>

#include <fstream>
#include <thread>

#include "common/process_counts.h"
#include "common/strings.h"
#include "protocol/protocol_fixture.h"

namespace tcpx::testing {
namespace {

using control::FrameType;

// Resident memory of this process, in bytes.
uint64_t residentBytes() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stoull(line.substr(6)) * 1024;
  }
  return 0;
}

// Under the sanitizers, freed memory is held in quarantine: resident memory says nothing.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool kMeasuresMemory = false;
#else
constexpr bool kMeasuresMemory = true;
#endif

class BoundsTest : public ProtocolTest {
 protected:
  // The peer's bound kept the engine's growth under `bound` (the scripted peer's own buffers
  // included: it lives in this process too).
  static void expectGrowthUnder(uint64_t before, uint64_t bound) {
    if (!kMeasuresMemory) return;
    const uint64_t after = residentBytes();
    EXPECT_LT(after, before + bound)
        << "resident memory grew from " << (before >> 20) << " to " << (after >> 20) << " MiB";
  }
};

TEST_F(BoundsTest, APeerThatStopsReadingIsFailedAtTheControlBacklogBound) {
  connectScripted();
  constexpr size_t kSize = 64ULL * 1024;
  GuardedRegion region(*engine_, kSize);
  const uint64_t before = residentBytes();
  // 1,200 inline READs of 64 KiB answer with 75 MiB of frames the peer never reads.
  ASSERT_TRUE(scripted_->send(readRequests(1200, {{region.id(), 0, kSize}}, kSize)).isOk());
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (engine_->peerState("scripted") != PeerState::kFailed &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(5ms);  // not reading, and not pinging either: just waiting
  }
  EXPECT_EQ(engine_->peerState("scripted"), PeerState::kFailed);
  expectGrowthUnder(before, 160u << 20);  // 64 MiB of backlog, its frames, the socket buffers
  EXPECT_TRUE(deregisterWithin(region.id(), 1s).isOk());
  expectBystanderWorks();
}

// A peer that stops reading for a while, its control connection full of answers, is owed a
// keepalive every 25 ms. None is queued behind the answers: a keepalive per round would have the
// progress thread spin (the keepalive stays due while nothing leaves) and pile frames onto a
// backlog that is not moving. Once the peer reads again every answer arrives, and it is still up.
TEST_F(BoundsTest, APeerThatPausesReadingIsNotSentAKeepalivePerRound) {
  ScriptedPeer::Options options;
  options.settings.peer_timeout_ms = 100;  // the engine keeps alive every 100 / 4 ms
  connectScripted(options);
  constexpr size_t kSize = 64ULL * 1024;
  constexpr int kReads = 400;  // 25 MiB of inline answers: more than the sockets hold
  GuardedRegion region(*engine_, kSize);
  ASSERT_TRUE(scripted_->send(readRequests(kReads, {{region.id(), 0, kSize}}, kSize)).isOk());
  std::this_thread::sleep_for(300ms);  // the engine answers until the connection is full
  const double before = tools::threadsCpuSeconds(getpid(), "tcpx-progress");
  std::this_thread::sleep_for(1s);  // neither reading nor sending
  const double used = tools::threadsCpuSeconds(getpid(), "tcpx-progress") - before;
  EXPECT_LT(used, 0.2) << "the progress thread ran " << used
                       << " s of 1 s while the peer did not read";
  int answers = 0;
  int pings = 0;
  const auto deadline = std::chrono::steady_clock::now() + 30s;
  while (answers < kReads && std::chrono::steady_clock::now() < deadline) {
    auto frame = scripted_->next(5s);
    ASSERT_TRUE(frame.isOk()) << frame.status().toString() << " after " << answers << " answers";
    if (frame->type == FrameType::kReadResponse) ++answers;
    if (frame->type == FrameType::kPing) ++pings;
  }
  EXPECT_EQ(answers, kReads);
  // Keepalives go out only while the connection is not full of answers (a few, at 25 ms).
  EXPECT_LT(pings, 40);
  EXPECT_EQ(engine_->peerState("scripted"), PeerState::kReady);
  expectBystanderWorks();
}

TEST_F(BoundsTest, NotificationsTheApplicationDoesNotTakeAreBoundedPerPeer) {
  connectScripted();
  std::vector<uint8_t> burst;
  for (size_t i = 0; i < 65536 + 100; ++i) control::encodeNotification("x", &burst);
  ASSERT_TRUE(scripted_->send(burst).isOk());
  EXPECT_TRUE(scripted_->closedWithin(10s));
  EXPECT_EQ(engine_->peerState("scripted"), PeerState::kFailed);
  EXPECT_EQ(engine_->takeNotifications().size(), 65536u);
  // Taking them frees the budget: a new instance of the peer is served again.
  connectScripted();
  ASSERT_TRUE(
      scripted_->send(frameOf([](auto* o) { control::encodeNotification("again", o); })).isOk());
  std::vector<Notification> got;
  for (int i = 0; i < 1000 && got.empty(); ++i) {
    got = engine_->takeNotifications();
    std::this_thread::sleep_for(1ms);
  }
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].message, "again");
}

TEST_F(BoundsTest, DescriptorsHeldForAPeerAreBoundedAndTheRequestPastItIsRefused) {
  connectScripted();
  // 65,536 descriptors of 1 KiB per READ: sixteen of them hold the bound of 1,048,576. The peer
  // drains none of the 64 MiB each READ sends, so all of them stay in service.
  constexpr size_t kSize = 64u << 20;
  GuardedRegion region(*engine_, kSize);
  std::vector<control::WireDesc> descs(65536);
  for (size_t i = 0; i < descs.size(); ++i) descs[i] = {region.id(), i * 1024, 1024};
  const uint64_t before = residentBytes();
  for (int i = 0; i < 17; ++i) {
    control::ReadRequest rr;
    rr.xfer_id = scripted_->nextId();
    rr.total = kSize;
    rr.descs = descs;
    ASSERT_TRUE(scripted_->send(frameOf([&](auto* o) { control::encode(rr, o); })).isOk());
    auto frame = scripted_->expect(FrameType::kReadResponse, 10s);
    ASSERT_TRUE(frame.isOk()) << frame.status().toString();
    control::ReadResponse resp;
    ASSERT_TRUE(control::decode(frame->payload, control::DecodeLimits{}, &resp).isOk());
    if (i < 16) {
      EXPECT_EQ(resp.code, StatusCode::kOk) << i;
    } else {
      EXPECT_EQ(resp.code, StatusCode::kResourceExhausted);
      EXPECT_NE(resp.message.find("bound"), std::string::npos) << resp.message;
    }
  }
  expectGrowthUnder(before, 128u << 20);  // 1M descriptors of segment list, and the frames
  EXPECT_EQ(engine_->peerState("scripted"), PeerState::kReady);  // refused, not failed
  scripted_.reset();  // the peer never drains its READs; it leaves
  EXPECT_TRUE(deregisterWithin(region.id(), 5s).isOk());
}

TEST_F(BoundsTest, RepeatedRefusalsAreServedWithoutPause) {
  // A thousand refused requests in a burst: each answered, typed, and the connection stays.
  connectScripted();
  GuardedRegion region(*engine_, 4096);
  ASSERT_TRUE(scripted_->send(readRequests(1000, {{region.id(), 4000, 200}}, 200)).isOk());
  for (int i = 0; i < 1000; ++i) {
    auto frame = scripted_->expect(FrameType::kReadResponse, 5s);
    ASSERT_TRUE(frame.isOk());
    control::ReadResponse resp;
    ASSERT_TRUE(control::decode(frame->payload, control::DecodeLimits{}, &resp).isOk());
    ASSERT_EQ(resp.code, StatusCode::kOutOfRange);
  }
  EXPECT_EQ(engine_->peerState("scripted"), PeerState::kReady);
}

TEST_F(BoundsTest, IdleConnectionsToTheDataListenersDoNotLockTheRealPeerOut) {
  // Eighty idle TCP connections to each data listener before the real data connections come.
  std::vector<net::Fd> idle;
  ScriptedPeer::Options options;
  options.before_data_connect = [&](const std::vector<transport::ConnectHandle>& handles) {
    for (const auto& h : handles) {
      uint16_t port = 0;
      std::memcpy(&port, h.bytes + 6, 2);
      auto addr = net::resolve("127.0.0.1", port);
      ASSERT_TRUE(addr.isOk());
      for (int i = 0; i < 80; ++i) {
        // Non-blocking: the engine takes them from its accept queue at its own pace.
        net::Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
        const int rc = ::connect(fd.get(), addr->raw(), addr->len);
        ASSERT_TRUE(rc == 0 || errno == EINPROGRESS) << errnoString(errno);
        idle.push_back(std::move(fd));
      }
    }
  };
  auto peer = ScriptedPeer::connect(engine_->connectionInfo(), options);
  ASSERT_TRUE(peer.isOk()) << peer.status().toString();
  // The engine takes the peer's data connections among the strays.
  const auto deadline = std::chrono::steady_clock::now() + 5s;
  while (engine_->peerState("scripted") != PeerState::kReady &&
         std::chrono::steady_clock::now() < deadline) {
    (void)peer.value()->idle(5ms);
  }
  EXPECT_EQ(engine_->peerState("scripted"), PeerState::kReady);
}

// ---- The process runs out of descriptors or address space ----

class ExhaustionTest : public ::testing::Test {
 protected:
  void TearDown() override {
    engine_.reset();
    peer_.reset();
  }
  void start() {
    peer_ = std::make_unique<ForkedPeer>(
        "starved", std::vector<std::pair<std::string, std::string>>{
                       {"transport", "socket"}, {"connect_timeout_ms", "2000"}});
    ASSERT_FALSE(peer_->connectionInfo().empty()) << peer_->startError();
    auto engine = Engine::create(testConfig("plenty", {{"transport", "socket"}}));
    ASSERT_TRUE(engine.isOk());
    engine_ = std::move(engine.value());
    ASSERT_TRUE(engine_->addPeer("starved", peer_->connectionInfo()).isOk());
    peer_->addPeer("plenty", engine_->connectionInfo());
  }
  // With `limit` set in the starved process, its CONNECT fails typed; then it recovers.
  void expectConnectFailsTypedThenRecovers(const std::string& limit) {
    start();
    ASSERT_EQ(peer_->call("LIMIT " + limit), "ok");
    const std::string answer = peer_->call("CONNECT plenty", 20s);
    std::printf("the starved peer's CONNECT: %s\n", answer.c_str());
    EXPECT_TRUE(answer.rfind("TRANSPORT_ERROR", 0) == 0 || answer.rfind("TIMEOUT", 0) == 0 ||
                answer.rfind("REMOTE_DISCONNECTED", 0) == 0)
        << answer;
    expectRecovers();
  }
  // The starved process still answers, and serves once its limits are back.
  void expectRecovers() {
    EXPECT_EQ(peer_->call("LIMIT RESET"), "ok");
    EXPECT_EQ(peer_->call("CONNECT plenty", 20s), "OK");
    const ForkedPeer::Region region = peer_->registerMemory(1 << 20);
    auto remote = engine_->loadRemoteMemory(region.descriptor);
    ASSERT_TRUE(remote.isOk());
    tools::HostBuffer local(1 << 20);
    const MemoryId mem = engine_->registerMemory(local.data(), 1 << 20).value();
    fillPattern(local.data(), 1 << 20, 77);
    auto h = engine_->prepareTransfer(OpKind::kWrite, "starved",
                                      std::vector<LocalDesc>{{mem, 0, 1 << 20}},
                                      std::vector<RemoteDesc>{{remote->id, 0, 1 << 20}});
    ASSERT_TRUE(h.isOk());
    ASSERT_TRUE(engine_->postTransfer(h.value()).isOk());
    EXPECT_TRUE(engine_->waitTransfer(h.value(), 20s).isOk());
    EXPECT_EQ(peer_->check(region.id, 0, 1 << 20, 77), "ok");
  }
  std::unique_ptr<ForkedPeer> peer_;
  std::unique_ptr<Engine> engine_;
};

TEST_F(ExhaustionTest, WithoutFileDescriptorsAConnectFailsTypedAndTheProcessLivesOn) {
  expectConnectFailsTypedThenRecovers("NOFILE 1");
}

TEST_F(ExhaustionTest, WithoutRoomForThreadsAConnectFailsTypedAndTheProcessLivesOn) {
  if (!kMeasuresMemory) GTEST_SKIP() << "the sanitizers reserve address space of their own";
  expectConnectFailsTypedThenRecovers("AS 1");
}

TEST(EngineCreation, AnEngineThatCannotStartItsThreadSaysSo) {
  if (!kMeasuresMemory) GTEST_SKIP() << "the sanitizers reserve address space of their own";
  ForkedPeer peer("threadless", {{"transport", "socket"}}, {"--limit-as-extra-mib=1"});
  EXPECT_TRUE(peer.connectionInfo().empty());
  EXPECT_NE(peer.startError().find("RESOURCE_EXHAUSTED"), std::string::npos) << peer.startError();
  EXPECT_EQ(peer.wait(10s), 2 << 8);
}

}  // namespace
}  // namespace tcpx::testing
