// Peers that deviate around direct copies between processes of one host (same_host_copy): a
// process whose proof does not read back, direct frames without an agreement or out of turn,
// answers naming memory of the wrong size or none at all, a peer that cannot read us, a peer that
// never finishes a direct copy while its control connection lives. Each case
// checks the typed outcome, that no byte of registered memory or around it changes unless the
// protocol allows it, and that the engine's other peers go on working.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <functional>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <thread>

#include "common/cross_memory.h"
#include "common/net.h"
#include "common/pattern_memory.h"
#include "gpu/gpu.h"
#include "protocol/protocol_fixture.h"
#include "support/unserved_pages.h"

namespace tcpx::testing {
namespace {

using control::FrameType;

class DirectPeerTest : public ProtocolTest {
 protected:
  // A short data timeout: a peer that stalls a direct copy is failed within it.
  void SetUp() override { startEngine({{"same_host_copy", "auto"}, {"data_timeout_ms", "600"}}); }

  void TearDown() override {
    failNextProcessReads(0);  // a test that stopped early leaves none pending
    // The holder first: a copy still reading its memory (a page it never serves) ends with it,
    // and the engine's destruction waits for that copy.
    if (holder_ > 0) {
      kill(holder_, SIGKILL);
      waitpid(holder_, nullptr, 0);
    }
    ProtocolTest::TearDown();
  }

  // Connects a scripted peer offering direct copies from a process of its own: a child forked
  // once, holding a copy of this process's memory (cookie_, and every source buffer made before
  // its fork, at the same addresses), and handed the scripted peer's end of the control
  // connection before the HELLO, as a peer's own process holds it. `cookie` is the proof it
  // offers: cookie_ is what the child's memory holds at the address it names. (An offer of this
  // process's own pid would be refused: the scripted peer is no engine of it.)
  ScriptedPeer& connectDirect(const std::string& cookie) {
    if (holder_ <= 0) startHolder();
    ScriptedPeer::Options options;
    options.direct = {static_cast<uint32_t>(holder_), reinterpret_cast<uint64_t>(cookie_.data()),
                      cookie};
    options.after_connect = [this](int fd) { EXPECT_TRUE(handToHolder(fd)); };
    ScriptedPeer& peer = connectScripted(options);
    EXPECT_NE(peer.engineDirect().pid, 0u) << "the engine offered no direct copies back";
    return peer;
  }

  // One byte with room for one descriptor (SCM_RIGHTS) beside it.
  struct FdMessage {
    FdMessage() {
      msg.msg_iov = &iov;
      msg.msg_iovlen = 1;
      msg.msg_control = space;
      msg.msg_controllen = sizeof(space);
    }
    FdMessage(const FdMessage&) = delete;
    FdMessage& operator=(const FdMessage&) = delete;
    char byte = 'h';
    alignas(cmsghdr) char space[CMSG_SPACE(sizeof(int))] = {};
    iovec iov{&byte, 1};
    msghdr msg{};
  };

  // The holder keeps every descriptor it is handed (SCM_RIGHTS over holder_link_) and answers
  // one byte once it holds it. With `unserved` (a page of this process, never touched), the
  // holder first registers its copy of that page with a userfaultfd that nobody reads, so that
  // reading it waits until the holder ends; it answers 'u' once it did, 'n' where it could not.
  void startHolder(void* unserved = nullptr) {
    int link[2];
    ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, link), 0);
    holder_ = fork();
    if (holder_ == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (unserved != nullptr) {
        const int uffd = openUserfaultfd();
        const bool ok =
            uffd >= 0 &&
            registerUnservedPages(uffd, unserved, static_cast<size_t>(sysconf(_SC_PAGESIZE)));
        const char answer = ok ? 'u' : 'n';
        (void)!write(link[1], &answer, 1);
      }
      for (;;) {
        FdMessage m;
        if (recvmsg(link[1], &m.msg, 0) <= 0) {
          for (;;) pause();
        }
        (void)!write(link[1], &m.byte, 1);
      }
    }
    close(link[1]);
    holder_link_ = net::Fd(link[0]);
    if (unserved != nullptr) {
      char answer = 0;
      ASSERT_EQ(read(holder_link_.get(), &answer, 1), 1);
      unserved_registered_ = answer == 'u';
    }
  }

  bool handToHolder(int fd) const {
    FdMessage m;
    cmsghdr* cm = CMSG_FIRSTHDR(&m.msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(cm), &fd, sizeof(int));
    return sendmsg(holder_link_.get(), &m.msg, MSG_NOSIGNAL) == 1 &&
           read(holder_link_.get(), &m.byte, 1) == 1;
  }

  // A direct WRITE_REQUEST of `source` into the engine's `region`.
  std::vector<uint8_t> directWrite(uint64_t id, const GuardedRegion& region,
                                   const std::string& source,
                                   const std::optional<std::string>& notification = {}) {
    const std::vector<control::WireDesc> descs{{region.id(), 0, source.size()}};
    const size_t half = source.size() / 2;
    const std::vector<control::DirectPiece> pieces{
        {reinterpret_cast<uint64_t>(source.data()), half},
        {reinterpret_cast<uint64_t>(source.data()) + half, source.size() - half}};
    control::WriteRequest m;
    m.xfer_id = id;
    m.total = source.size();
    m.descs = descs;
    m.has_notification = notification.has_value();
    if (notification) m.notification = *notification;
    m.direct = true;
    m.pieces = pieces;
    return frameOf([&](auto* out) { control::encode(m, {}, out); });
  }

  // A direct WRITE of the scripted peer into the first `page` bytes of `region` whose source is
  // `unserved` in the holder: a page its userfaultfd never serves (startHolder).
  void sendUnservedWrite(const GuardedRegion& region, void* unserved, size_t page) {
    control::WriteRequest m;
    m.xfer_id = scripted_->nextId();
    m.total = page;
    const std::vector<control::WireDesc> descs{{region.id(), 0, page}};
    const std::vector<control::DirectPiece> pieces{{reinterpret_cast<uint64_t>(unserved), page}};
    m.descs = descs;
    m.direct = true;
    m.pieces = pieces;
    ASSERT_TRUE(scripted_->send(frameOf([&](auto* out) { control::encode(m, {}, out); })).isOk());
  }

  // The scripted peer's direct READ_REQUEST of the whole of `region`; returns its id.
  uint64_t sendDirectRead(const GuardedRegion& region) {
    const std::vector<control::WireDesc> descs{{region.id(), 0, region.size()}};
    control::ReadRequest rr;
    rr.xfer_id = scripted_->nextId();
    rr.total = region.size();
    rr.descs = descs;
    rr.direct = true;
    EXPECT_TRUE(scripted_->send(frameOf([&](auto* out) { control::encode(rr, out); })).isOk());
    return rr.xfer_id;
  }

  control::Completion expectCompletion(FrameType type) {
    auto frame = scripted_->expect(type, 5s);
    EXPECT_TRUE(frame.isOk()) << frame.status().toString();
    control::Completion c;
    if (frame.isOk()) {
      EXPECT_TRUE(control::decodeCompletion(frame->payload, &c).isOk());
    }
    return c;
  }

  // A registered 1 MiB host source filled with pattern `seed`, a region of the scripted peer
  // (`region_id`) of the same size, and WRITEs of the one into the other.
  struct HostWrite {
    static constexpr size_t kSize = size_t{1} << 20;
    HostWrite(DirectPeerTest* fixture, uint64_t seed, uint64_t region_id)
        : test(fixture), local(kSize), remote(fixture->scriptedRegion(region_id, kSize)) {
      fillPattern(local.data(), kSize, seed);
      mem = fixture->engine_->registerMemory(local.data(), kSize).value();
      bytes.assign(reinterpret_cast<const char*>(local.data()), kSize);
    }
    Result<TransferHandle> post() const {
      return test->post(OpKind::kWrite, "scripted", {{mem, 0, kSize}}, {{remote.id, 0, kSize}});
    }
    DirectPeerTest* test;
    tools::HostBuffer local;
    RemoteMemory remote;
    MemoryId mem{};
    std::string bytes;  // what the WRITE must deliver
  };

  // Posts a READ of the whole of `region` from the scripted peer's `remote` (*h: its handle, 0 if
  // the post failed) and returns the engine's READ_REQUEST for it, decoded.
  control::ReadRequest postRead(const GuardedRegion& region, const RemoteMemory& remote,
                                TransferHandle* h) {
    control::ReadRequest rr;
    *h = TransferHandle{};
    auto posted = post(OpKind::kRead, "scripted", {{region.id(), 0, region.size()}},
                       {{remote.id, 0, region.size()}});
    EXPECT_TRUE(posted.isOk()) << posted.status().toString();
    if (!posted.isOk()) return rr;
    *h = posted.value();
    auto request = scripted_->expect(FrameType::kReadRequest, 5s);
    EXPECT_TRUE(request.isOk()) << request.status().toString();
    if (request.isOk()) {
      EXPECT_TRUE(control::decode(request->payload, control::DecodeLimits{}, &rr).isOk());
    }
    return rr;
  }

  // The engine's next WRITE_REQUEST, decoded.
  control::WriteRequest expectWriteRequest() {
    control::WriteRequest wr;
    auto request = scripted_->expect(FrameType::kWriteRequest, 5s);
    EXPECT_TRUE(request.isOk()) << request.status().toString();
    if (request.isOk()) {
      EXPECT_TRUE(control::decode(request->payload, control::DecodeLimits{}, &wr).isOk());
    }
    return wr;
  }

  void answerWrite(uint64_t id, StatusCode code, const std::string& message) {
    EXPECT_TRUE(scripted_
                    ->send(frameOf([&](auto* out) {
                      control::encodeWriteDone({id, code, message}, out);
                    }))
                    .isOk());
  }

  // Receives the WRITE `wr` over the data channels, checks its bytes and completes it.
  void takeOverTheChannels(const control::WriteRequest& wr, const std::string& expected) {
    auto bytes = scripted_->receiveStream(expected.size(), wr.spread, 10s);
    ASSERT_TRUE(bytes.isOk()) << bytes.status().toString();
    EXPECT_TRUE(*bytes == expected);
    answerWrite(wr.xfer_id, StatusCode::kOk, "");
  }

  // The scripted peer's connection was closed for a protocol error.
  void expectClosedForProtocolError() {
    EXPECT_TRUE(scripted_->closedWithin(5s)) << "the engine kept the connection";
    EXPECT_EQ(engine_->peerState("scripted"), PeerState::kFailed);
  }

  // A scripted peer offering `offer`, which the engine must refuse: its direct WRITE of `source`
  // (memory the process it names holds) is a protocol error, and not a byte of it is read.
  void expectOfferNeverUsed(const control::DirectOffer& offer, const std::string& source) {
    ScriptedPeer::Options options;
    options.direct = offer;
    connectScripted(options);
    GuardedRegion region(*engine_, source.size());
    std::memset(region.data(), kPoison, source.size());
    ASSERT_TRUE(scripted_->send(directWrite(scripted_->nextId(), region, source)).isOk());
    expectClosedForProtocolError();
    EXPECT_TRUE(GuardedRegion::allBytes(region.data(), source.size(), kPoison));
    EXPECT_TRUE(region.guardsIntact());
    expectBystanderWorks();
  }

  const std::string cookie_ = patternBytes(control::kNonceSize, 99);
  pid_t holder_ = -1;
  net::Fd holder_link_;               // to the holder: descriptors it keeps
  bool unserved_registered_ = false;  // startHolder(unserved) made the holder's page wait
};

TEST_F(DirectPeerTest, ADirectWriteIsReadFromTheInitiatorAndItsNotificationFollowsTheBytes) {
  constexpr size_t kSize = size_t{1} << 20;
  const std::string source = patternBytes(kSize, 3);  // in the holder's memory too
  connectDirect(cookie_);
  GuardedRegion region(*engine_, kSize);
  ASSERT_TRUE(scripted_->send(directWrite(scripted_->nextId(), region, source, "landed")).isOk());
  const control::Completion done = expectCompletion(FrameType::kWriteDone);
  EXPECT_EQ(done.code, StatusCode::kOk) << done.message;
  EXPECT_EQ(std::memcmp(region.data(), source.data(), kSize), 0);
  EXPECT_TRUE(region.guardsIntact());
  const auto notes = engine_->takeNotifications();
  ASSERT_EQ(notes.size(), 1u);
  EXPECT_EQ(notes[0].message, "landed");
  expectBystanderWorks();
}

TEST_F(DirectPeerTest, AProcessThatIsNotThePeerIsNeverReadAndItsWriteIsRefused) {
  // The pid is a live process, but the proof does not read back: another process of that pid
  // (a peer in another pid namespace) must never be read.
  constexpr size_t kSize = size_t{1} << 20;
  const std::string source = patternBytes(kSize, 4);
  connectDirect(patternBytes(control::kNonceSize, 100));
  GuardedRegion region(*engine_, kSize);
  std::memset(region.data(), kPoison, kSize);
  ASSERT_TRUE(scripted_->send(directWrite(scripted_->nextId(), region, source, "never")).isOk());
  const control::Completion done = expectCompletion(FrameType::kWriteDone);
  EXPECT_EQ(done.code, StatusCode::kNotSupported) << done.message;
  EXPECT_TRUE(GuardedRegion::allBytes(region.data(), kSize, kPoison));
  EXPECT_TRUE(region.guardsIntact());
  EXPECT_TRUE(engine_->takeNotifications().empty());
  EXPECT_EQ(engine_->peerState("scripted"), PeerState::kReady);
  // Nothing stays pinned.
  EXPECT_TRUE(deregisterWithin(region.id(), 1s).isOk());
}

TEST_F(DirectPeerTest, AnOfferOfThisProcesssOwnPidFromNoEngineOfItIsNeverUsed) {
  // Another pid namespace's process with our pid, or a peer replaying our own offer: were it
  // believed, the engine would read memory of its own process at addresses the peer names.
  const std::string secret = patternBytes(size_t{256} << 10, 8);  // unregistered memory here
  expectOfferNeverUsed(
      {static_cast<uint32_t>(getpid()), reinterpret_cast<uint64_t>(cookie_.data()), cookie_},
      secret);
}

// A process whose memory has the right proof but that does not hold the peer's end of the
// connection is not the peer: a peer may not name another engine (whose offer it learned) or
// any process it likes for this engine to read.
TEST_F(DirectPeerTest, AProcessThatDoesNotHoldThePeersConnectionIsNeverRead) {
  const std::string source = patternBytes(size_t{256} << 10, 12);  // in the holder's memory too
  startHolder();  // never handed the scripted peer's connection
  expectOfferNeverUsed(
      {static_cast<uint32_t>(holder_), reinterpret_cast<uint64_t>(cookie_.data()), cookie_},
      source);
}

// A thread id of the engine's own process sees the engine's descriptors (the scripted peer's end
// too, in this test's process), but names no process: offered with the engine's own proof, it
// would have the engine read its own memory at addresses the peer names.
TEST_F(DirectPeerTest, AThreadOfTheEnginesProcessOfferedAsThePeerIsNeverRead) {
  const std::string secret = patternBytes(size_t{256} << 10, 8);  // unregistered memory here
  ScriptedPeer::Options first;
  first.direct = {1, 0x1000, std::string(control::kNonceSize, 'x')};
  const control::DirectOffer engine_offer = connectScripted(first).engineDirect();
  ASSERT_EQ(engine_offer.pid, static_cast<uint32_t>(getpid()));
  std::atomic<pid_t> tid{0};
  std::atomic<bool> done{false};
  std::thread thread([&] {
    tid = static_cast<pid_t>(syscall(SYS_gettid));
    while (!done.load()) std::this_thread::sleep_for(1ms);
  });
  while (tid.load() == 0) std::this_thread::sleep_for(1ms);
  expectOfferNeverUsed(
      {static_cast<uint32_t>(tid.load()), engine_offer.cookie_addr, engine_offer.cookie}, secret);
  done = true;
  thread.join();
}

// The kernel refuses a read of the peer it allowed when the peer was probed (the peer made
// itself non-dumpable since, say): the READ takes the data channels and lands whole, and later
// READs are not asked for directly.
TEST_F(DirectPeerTest, ADirectReadTheKernelRefusesAfterTheProbeTakesTheChannels) {
  constexpr size_t kSize = size_t{1} << 20;
  const std::string source = patternBytes(kSize, 11);  // in the holder's memory too
  connectDirect(cookie_);
  GuardedRegion region(*engine_, kSize);
  const RemoteMemory remote = scriptedRegion(77, kSize);
  for (int round = 0; round < 3; ++round) {
    SCOPED_TRACE(round);
    std::memset(region.data(), kPoison, kSize);
    if (round == 1) failNextProcessReads(1);
    TransferHandle h{};
    control::ReadRequest rr = postRead(region, remote, &h);
    ASSERT_NE(h, TransferHandle{});
    // Asked directly until the refusal, over the channels after it.
    EXPECT_EQ(rr.direct, round <= 1);
    control::ReadResponse resp;
    resp.xfer_id = rr.xfer_id;
    if (rr.direct) {
      const std::vector<control::DirectPiece> pieces{
          {reinterpret_cast<uint64_t>(source.data()), kSize}};
      resp.direct = true;
      resp.pieces = pieces;
      ASSERT_TRUE(
          scripted_->send(frameOf([&](auto* out) { control::encode(resp, {}, out); })).isOk());
      const control::Completion done = expectCompletion(FrameType::kReadDone);
      if (round == 0) {
        EXPECT_EQ(done.code, StatusCode::kOk) << done.message;
      } else {
        // Refused here: the READ is asked again, over the channels.
        EXPECT_EQ(done.code, StatusCode::kNotSupported) << done.message;
        auto again = scripted_->expect(FrameType::kReadRequest, 5s);
        ASSERT_TRUE(again.isOk()) << again.status().toString();
        rr = control::ReadRequest{};
        ASSERT_TRUE(control::decode(again->payload, control::DecodeLimits{}, &rr).isOk());
        EXPECT_FALSE(rr.direct);
        resp = control::ReadResponse{};
        resp.xfer_id = rr.xfer_id;
      }
    }
    if (!rr.direct) {
      resp.first_chunk = scripted_->outNextChunk();
      resp.spread = scripted_->outSpread();
      ASSERT_TRUE(
          scripted_->send(frameOf([&](auto* out) { control::encode(resp, {}, out); })).isOk());
      ASSERT_TRUE(scripted_->sendStream(source, 10s).isOk());
    }
    ASSERT_TRUE(engine_->waitTransfer(h, 5s).isOk());
    EXPECT_EQ(std::memcmp(region.data(), source.data(), kSize), 0);
    EXPECT_TRUE(region.guardsIntact());
    EXPECT_TRUE(engine_->releaseTransfer(h).isOk());
  }
}

// A peer's direct WRITE whose source is a page that never faults in (the peer's userfaultfd
// serves nothing): the copy that reads it waits, in the kernel, on the copy lane of that peer.
// Nothing else waits with it: the progress thread goes on serving (our READ to the same peer is
// asked for at once), and a transfer of the engine to itself that takes its own copy lane (1 MiB,
// above what the progress thread copies) lands with every byte. Within data_timeout_ms the
// stalled peer is failed: its connection closes and our READ to it ends with TIMEOUT. Once the
// peer's process ends, its userfaultfd goes, the copy returns, and nothing is left waiting.
TEST_F(DirectPeerTest, ACopyFromAPageThatNeverFaultsInHoldsOnlyItsPeerAndFailsIt) {
  const auto page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* unserved = mmap(nullptr, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(unserved, MAP_FAILED);
  ASSERT_NO_FATAL_FAILURE(startHolder(unserved));
  if (!unserved_registered_) GTEST_SKIP() << "userfaultfd is not available here";
  connectDirect(cookie_);
  ASSERT_TRUE(engine_->addPeer("self", engine_->connectionInfo()).isOk());
  GuardedRegion region(*engine_, page);
  const auto stalled_since = std::chrono::steady_clock::now();
  ASSERT_NO_FATAL_FAILURE(sendUnservedWrite(region, unserved, page));
  std::this_thread::sleep_for(100ms);  // the engine is reading the page by now

  // The progress thread serves: our READ to the same peer is asked for.
  GuardedRegion other(*engine_, page);
  const RemoteMemory remote = scriptedRegion(78, page);
  TransferHandle h{};
  const auto asked = std::chrono::steady_clock::now();
  const control::ReadRequest rr = postRead(other, remote, &h);
  EXPECT_NE(rr.xfer_id, 0u) << "no READ_REQUEST: the progress thread waits for the peer's page";
  EXPECT_LT(std::chrono::steady_clock::now() - asked, 2s);

  // The engine's own copies are not queued behind the stalled one.
  constexpr size_t kSelfSize = size_t{1} << 20;
  GuardedRegion from(*engine_, kSelfSize);
  GuardedRegion to(*engine_, kSelfSize);
  const std::string bytes = patternBytes(kSelfSize, 21);
  std::memcpy(from.data(), bytes.data(), kSelfSize);
  auto to_desc = engine_->memoryDescriptor(to.id());
  ASSERT_TRUE(to_desc.isOk());
  auto to_remote = engine_->loadRemoteMemory(to_desc.value());
  ASSERT_TRUE(to_remote.isOk()) << to_remote.status().toString();
  auto self =
      post(OpKind::kWrite, "self", {{from.id(), 0, kSelfSize}}, {{to_remote->id, 0, kSelfSize}});
  ASSERT_TRUE(self.isOk()) << self.status().toString();
  EXPECT_TRUE(engine_->waitTransfer(self.value(), 2s).isOk())
      << "the engine's own copy waited behind the stalled peer's";
  EXPECT_EQ(std::memcmp(to.data(), bytes.data(), kSelfSize), 0);
  EXPECT_TRUE(to.guardsIntact());
  EXPECT_TRUE(engine_->releaseTransfer(self.value()).isOk());

  // The stalled peer is failed within data_timeout_ms (600 ms here), with TIMEOUT.
  EXPECT_TRUE(scripted_->closedWithin(5s)) << "the stalled peer was never failed";
  EXPECT_LT(std::chrono::steady_clock::now() - stalled_since, 3s);
  EXPECT_EQ(engine_->peerState("scripted"), PeerState::kFailed);
  if (h != TransferHandle{}) {
    EXPECT_EQ(engine_->waitTransfer(h, 5s).code(), StatusCode::kTimeout);
    EXPECT_TRUE(engine_->releaseTransfer(h).isOk());
  }
  expectBystanderWorks();

  // The peer's process ends: the copy returns, the WRITE's run ends without a word to the gone
  // peer, and nothing around the destination was touched.
  kill(holder_, SIGKILL);
  waitpid(holder_, nullptr, 0);
  holder_ = -1;
  EXPECT_TRUE(deregisterWithin(region.id(), 5s).isOk()) << "the stalled copy never returned";
  EXPECT_TRUE(region.guardsIntact());
  ASSERT_EQ(munmap(unserved, page), 0);
}

// The copy that a failed connection leaves held (a page of the peer's that never comes in) holds
// nothing of the peer's next connection: that connection's direct WRITEs, one small enough for
// the progress thread and one for the copy lane, land with every byte, each on the copy lane and
// in the order of its own connection.
TEST_F(DirectPeerTest, ACopyHeldByAFailedConnectionHoldsNothingOfTheNext) {
  const auto page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* unserved = mmap(nullptr, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(unserved, MAP_FAILED);
  // Sources in the holder's memory: made before its fork.
  const std::string small = patternBytes(size_t{64} << 10, 31);
  const std::string large = patternBytes(size_t{1} << 20, 32);
  ASSERT_NO_FATAL_FAILURE(startHolder(unserved));
  if (!unserved_registered_) GTEST_SKIP() << "userfaultfd is not available here";
  connectDirect(cookie_);
  GuardedRegion held(*engine_, page);
  ASSERT_NO_FATAL_FAILURE(sendUnservedWrite(held, unserved, page));
  ASSERT_TRUE(scripted_->closedWithin(5s)) << "the stalled peer was never failed";
  EXPECT_EQ(engine_->peerState("scripted"), PeerState::kFailed);

  connectDirect(cookie_);  // the same process connects again
  for (const std::string* source : {&small, &large}) {
    SCOPED_TRACE(source->size());
    GuardedRegion region(*engine_, source->size());
    const uint64_t id = scripted_->nextId();
    ASSERT_TRUE(scripted_->send(directWrite(id, region, *source)).isOk());
    const control::Completion done = expectCompletion(FrameType::kWriteDone);
    EXPECT_EQ(done.xfer_id, id);
    EXPECT_EQ(done.code, StatusCode::kOk) << done.message;
    EXPECT_EQ(std::memcmp(region.data(), source->data(), source->size()), 0);
    EXPECT_TRUE(region.guardsIntact());
  }
  EXPECT_EQ(engine_->peerState("scripted"), PeerState::kReady);

  kill(holder_, SIGKILL);
  waitpid(holder_, nullptr, 0);
  holder_ = -1;
  EXPECT_TRUE(deregisterWithin(held.id(), 5s).isOk()) << "the held copy never returned";
  EXPECT_TRUE(held.guardsIntact());
  ASSERT_EQ(munmap(unserved, page), 0);
}

TEST_F(DirectPeerTest, DirectFramesWithoutAnAgreementOrOutOfTurnFailThePeer) {
  constexpr size_t kSize = size_t{256} << 10;
  const std::string source = patternBytes(kSize, 5);
  {
    SCOPED_TRACE("a direct WRITE from a peer that offered nothing");
    connectScripted();
    EXPECT_EQ(scripted_->engineDirect().pid, 0u);
    GuardedRegion region(*engine_, kSize);
    std::memset(region.data(), kPoison, kSize);
    ASSERT_TRUE(scripted_->send(directWrite(scripted_->nextId(), region, source)).isOk());
    expectClosedForProtocolError();
    EXPECT_TRUE(GuardedRegion::allBytes(region.data(), kSize, kPoison));
    EXPECT_TRUE(deregisterWithin(region.id(), 1s).isOk());
  }
  {
    SCOPED_TRACE("READ_DONE for a READ never announced");
    connectDirect(cookie_);
    ASSERT_TRUE(scripted_
                    ->send(frameOf([&](auto* out) {
                      control::encodeReadDone({scripted_->nextId(), StatusCode::kOk, ""}, out);
                    }))
                    .isOk());
    expectClosedForProtocolError();
  }
  {
    SCOPED_TRACE("a direct READ, answered with our memory, then READ_DONE twice");
    connectDirect(cookie_);
    GuardedRegion region(*engine_, kSize);
    const uint64_t read_id = sendDirectRead(region);
    auto frame = scripted_->expect(FrameType::kReadResponse, 5s);
    ASSERT_TRUE(frame.isOk()) << frame.status().toString();
    control::ReadResponse resp;
    ASSERT_TRUE(control::decode(frame->payload, control::DecodeLimits{}, &resp).isOk());
    ASSERT_TRUE(resp.direct);
    ASSERT_EQ(resp.decoded_pieces.size(), 1u);
    EXPECT_EQ(resp.decoded_pieces[0].addr, reinterpret_cast<uint64_t>(region.data()));
    EXPECT_EQ(resp.decoded_pieces[0].length, kSize);
    const auto done = frameOf([&](auto* out) {
      control::encodeReadDone({read_id, StatusCode::kOk, ""}, out);
    });
    ASSERT_TRUE(scripted_->send(done).isOk());
    ASSERT_TRUE(scripted_->idle(100ms).isOk());
    // READ_DONE let the region go.
    EXPECT_TRUE(deregisterWithin(region.id(), 1s).isOk());
    ASSERT_TRUE(scripted_->send(done).isOk());
    expectClosedForProtocolError();
  }
  expectBystanderWorks();
}

// WRITE_QUEUED (the target's copy of a direct WRITE is queued, with a signal to poll) is admitted
// only for a direct WRITE that asked for it: a WRITE of host memory never asks. For it, for a
// WRITE over the data channels, for no WRITE, or malformed, it fails the peer and its transfer.
TEST_F(DirectPeerTest, WriteQueuedWhereNoSignalWasAskedForFailsThePeer) {
  const std::string signal(control::kSignalHandleSize, 's');
  auto queued = [&](uint64_t id) {
    return frameOf([&](auto* out) { control::encode(control::WriteQueued{id, signal}, out); });
  };
  // Posts a WRITE, checks the request, sends `frame(id)` and expects a protocol error.
  auto refused = [&](bool direct, uint64_t seed, uint64_t region,
                     const std::function<std::vector<uint8_t>(uint64_t)>& frame) {
    const HostWrite write(this, seed, region);
    auto h = write.post();
    ASSERT_TRUE(h.isOk()) << h.status().toString();
    const control::WriteRequest wr = expectWriteRequest();
    ASSERT_EQ(wr.direct, direct);
    EXPECT_FALSE(wr.want_signal) << "a WRITE of host memory asked for a signal";
    ASSERT_TRUE(scripted_->send(frame(wr.xfer_id)).isOk());
    expectClosedForProtocolError();
    EXPECT_EQ(engine_->waitTransfer(h.value(), 5s).code(), StatusCode::kProtocolError);
    (void)engine_->releaseTransfer(h.value());
    ASSERT_TRUE(engine_->deregisterMemory(write.mem).isOk());
  };
  {
    SCOPED_TRACE("for a direct WRITE of host memory");
    connectDirect(cookie_);
    refused(true, 11, 81, queued);
  }
  {
    SCOPED_TRACE("for a WRITE over the data channels");
    connectScripted();
    refused(false, 12, 82, queued);
  }
  {
    SCOPED_TRACE("for no WRITE");
    connectDirect(cookie_);
    ASSERT_TRUE(scripted_->send(queued(scripted_->nextId())).isOk());
    expectClosedForProtocolError();
  }
  {
    SCOPED_TRACE("with a short signal");
    connectDirect(cookie_);
    refused(true, 13, 83, [&](uint64_t id) {
      std::vector<uint8_t> frame = queued(id);
      frame.pop_back();
      const auto length = static_cast<uint32_t>(frame.size() - control::kFrameHeaderSize);
      std::memcpy(frame.data(), &length, sizeof(length));
      return frame;
    });
  }
  expectBystanderWorks();
}

// A direct WRITE of GPU memory asks for its copy's signal when it is the engine's only transfer
// in flight to the peer and carries no notification, and takes WRITE_QUEUED once: repeated, it
// fails the peer. A signal that cannot be opened leaves the WRITE to WRITE_DONE, and later WRITEs
// to that peer ask for none.
TEST_F(DirectPeerTest, AGpuWriteAsksForItsCopysSignalAndTakesWriteQueuedOnce) {
  if (tools::gpuCount() == 0) {
    GTEST_SKIP() << "GPU test skipped: " << tools::gpuUnavailableReason();
  }
  constexpr size_t kSize = size_t{1} << 20;
  auto local = tools::makeGpuMemory(kSize, 0);
  ASSERT_NE(local, nullptr);
  auto mem = engine_->registerMemory(local->data(), kSize, local->kind(), local->device());
  ASSERT_TRUE(mem.isOk()) << mem.status().toString();
  const std::string garbage(control::kSignalHandleSize, 's');
  auto queued = [&](uint64_t id) {
    return frameOf([&](auto* out) { control::encode(control::WriteQueued{id, garbage}, out); });
  };
  {
    SCOPED_TRACE("a WRITE, a second while it is in flight, WRITE_QUEUED twice");
    connectDirect(cookie_);
    const RemoteMemory remote = scriptedRegion(84, kSize);
    // Alone but with a notification: no signal (the notification must come before anything the
    // application sends once the WRITE completed, and the target delivers it with WRITE_DONE).
    auto notifying = post(OpKind::kWrite, "scripted", {{mem.value(), 0, kSize}},
                          {{remote.id, 0, kSize}}, std::string("kv ready"));
    ASSERT_TRUE(notifying.isOk()) << notifying.status().toString();
    const control::WriteRequest with_notification = expectWriteRequest();
    ASSERT_TRUE(with_notification.direct);
    EXPECT_FALSE(with_notification.want_signal) << "a WRITE with a notification asked for one";
    answerWrite(with_notification.xfer_id, StatusCode::kOk, "");
    EXPECT_TRUE(engine_->waitTransfer(notifying.value(), 5s).isOk());
    (void)engine_->releaseTransfer(notifying.value());
    auto first =
        post(OpKind::kWrite, "scripted", {{mem.value(), 0, kSize}}, {{remote.id, 0, kSize}});
    ASSERT_TRUE(first.isOk()) << first.status().toString();
    const control::WriteRequest a = expectWriteRequest();
    auto second =
        post(OpKind::kWrite, "scripted", {{mem.value(), 0, kSize}}, {{remote.id, 0, kSize}});
    ASSERT_TRUE(second.isOk()) << second.status().toString();
    const control::WriteRequest b = expectWriteRequest();
    ASSERT_TRUE(a.direct && b.direct) << "the GPU WRITEs were not direct";
    EXPECT_TRUE(a.want_signal) << "the only WRITE in flight asked for no signal";
    EXPECT_FALSE(b.want_signal) << "a WRITE behind another asked for a signal";
    ASSERT_TRUE(scripted_->send(queued(a.xfer_id)).isOk());
    ASSERT_TRUE(scripted_->send(queued(a.xfer_id)).isOk());
    expectClosedForProtocolError();
    for (auto h : {first.value(), second.value()}) {
      EXPECT_EQ(engine_->waitTransfer(h, 5s).code(), StatusCode::kProtocolError);
      (void)engine_->releaseTransfer(h);
    }
  }
  {
    SCOPED_TRACE("a signal that cannot be opened");
    connectDirect(cookie_);
    const RemoteMemory remote = scriptedRegion(85, kSize);
    auto h = post(OpKind::kWrite, "scripted", {{mem.value(), 0, kSize}}, {{remote.id, 0, kSize}});
    ASSERT_TRUE(h.isOk()) << h.status().toString();
    const control::WriteRequest wr = expectWriteRequest();
    ASSERT_TRUE(wr.direct && wr.want_signal);
    ASSERT_TRUE(scripted_->send(queued(wr.xfer_id)).isOk());
    ASSERT_TRUE(scripted_->idle(100ms).isOk());
    EXPECT_EQ(engine_->checkTransfer(h.value()).code(), StatusCode::kInProgress)
        << "the WRITE ended on a signal that cannot be read";
    answerWrite(wr.xfer_id, StatusCode::kOk, "");
    EXPECT_TRUE(engine_->waitTransfer(h.value(), 5s).isOk());
    ASSERT_TRUE(engine_->postTransfer(h.value()).isOk());
    const control::WriteRequest next = expectWriteRequest();
    EXPECT_TRUE(next.direct);
    EXPECT_FALSE(next.want_signal) << "asked again for a signal this peer's could not be opened";
    answerWrite(next.xfer_id, StatusCode::kOk, "");
    EXPECT_TRUE(engine_->waitTransfer(h.value(), 5s).isOk());
    (void)engine_->releaseTransfer(h.value());
    auto stats = engine_->peerStats("scripted");
    ASSERT_TRUE(stats.isOk());
    EXPECT_EQ(stats->signalled_writes, 0u);
    EXPECT_EQ(engine_->peerState("scripted"), PeerState::kReady);
  }
  EXPECT_EQ(gpu::PeerSignal::openCount(), 0);
  ASSERT_TRUE(engine_->deregisterMemory(mem.value()).isOk());
  expectBystanderWorks();
}

TEST_F(DirectPeerTest, AnswersToADirectReadOfTheWrongSizeOrOfUnmappedMemoryWriteNothing) {
  constexpr size_t kSize = size_t{512} << 10;
  for (const bool wrong_size : {true, false}) {
    SCOPED_TRACE(wrong_size ? "pieces of the wrong size" : "pieces the peer does not map");
    connectDirect(cookie_);
    GuardedRegion region(*engine_, kSize);
    std::memset(region.data(), kPoison, kSize);
    const RemoteMemory remote = scriptedRegion(77, kSize);
    TransferHandle h{};
    control::ReadRequest rr = postRead(region, remote, &h);
    ASSERT_NE(h, TransferHandle{});
    ASSERT_TRUE(rr.direct) << "the engine did not ask for a direct READ";
    const std::string source = patternBytes(kSize + 1, 6);
    const std::vector<control::DirectPiece> pieces{
        wrong_size ? control::DirectPiece{reinterpret_cast<uint64_t>(source.data()), kSize + 1}
                   : control::DirectPiece{0x10, kSize}};
    control::ReadResponse resp;
    resp.xfer_id = rr.xfer_id;
    resp.direct = true;
    resp.pieces = pieces;
    ASSERT_TRUE(
        scripted_->send(frameOf([&](auto* out) { control::encode(resp, {}, out); })).isOk());
    const Status st = engine_->waitTransfer(h, 5s);
    if (wrong_size) {
      EXPECT_EQ(st.code(), StatusCode::kProtocolError) << st.toString();
      expectClosedForProtocolError();
    } else {
      // Our own read failed: the READ says why and the peer hears READ_DONE with it.
      EXPECT_EQ(st.code(), StatusCode::kRemoteRejected) << st.toString();
      const control::Completion done = expectCompletion(FrameType::kReadDone);
      EXPECT_EQ(done.xfer_id, rr.xfer_id);
      EXPECT_EQ(done.code, StatusCode::kRemoteRejected);
      EXPECT_EQ(engine_->peerState("scripted"), PeerState::kReady);
    }
    (void)engine_->releaseTransfer(h);
    EXPECT_TRUE(GuardedRegion::allBytes(region.data(), kSize, kPoison));
    EXPECT_TRUE(region.guardsIntact());
    EXPECT_TRUE(deregisterWithin(region.id(), 1s).isOk());
  }
  expectBystanderWorks();
}

TEST_F(DirectPeerTest, AWriteThePeerCannotReadRunsAgainOverTheChannels) {
  connectDirect(cookie_);
  const HostWrite write(this, 7, 78);
  for (int round = 0; round < 2; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    auto h = write.post();
    ASSERT_TRUE(h.isOk()) << h.status().toString();
    control::WriteRequest wr = expectWriteRequest();
    if (round == 0) {
      // The first asks for a direct copy; this peer cannot read the engine and says so.
      ASSERT_TRUE(wr.direct);
      answerWrite(wr.xfer_id, StatusCode::kNotSupported, "cannot read you");
      control::WriteRequest retry = expectWriteRequest();
      EXPECT_GT(retry.xfer_id, wr.xfer_id);
      wr = std::move(retry);
    }
    // Over the channels (and, after the refusal, from the start).
    ASSERT_FALSE(wr.direct);
    takeOverTheChannels(wr, write.bytes);
    EXPECT_TRUE(engine_->waitTransfer(h.value(), 5s).isOk());
    (void)engine_->releaseTransfer(h.value());
  }
  auto stats = engine_->peerStats("scripted");
  ASSERT_TRUE(stats.isOk());
  EXPECT_EQ(stats->direct_runs, 0u);
  EXPECT_EQ(stats->succeeded, 2u);
  ASSERT_TRUE(engine_->deregisterMemory(write.mem).isOk());
}

// RESOURCE_EXHAUSTED (the peer's mappings of our memory all in use) refuses that WRITE only: it
// runs over the channels, and the next one asks for a direct copy again.
TEST_F(DirectPeerTest, AWriteThePeerCannotReadNowRunsOverTheChannelsAndTheNextGoesDirect) {
  connectDirect(cookie_);
  const HostWrite write(this, 8, 79);
  auto h = write.post();
  ASSERT_TRUE(h.isOk()) << h.status().toString();
  control::WriteRequest wr = expectWriteRequest();
  ASSERT_TRUE(wr.direct);
  answerWrite(wr.xfer_id, StatusCode::kResourceExhausted, "every mapping in use");
  control::WriteRequest retry = expectWriteRequest();
  ASSERT_FALSE(retry.direct);
  takeOverTheChannels(retry, write.bytes);
  EXPECT_TRUE(engine_->waitTransfer(h.value(), 5s).isOk());
  // Posted again, the WRITE asks for a direct copy once more (answered as done: the bytes are
  // not the point here).
  ASSERT_TRUE(engine_->postTransfer(h.value()).isOk());
  control::WriteRequest next = expectWriteRequest();
  EXPECT_TRUE(next.direct) << "one refusal for want of mappings disabled direct WRITEs";
  answerWrite(next.xfer_id, StatusCode::kOk, "");
  EXPECT_TRUE(engine_->waitTransfer(h.value(), 5s).isOk());
  (void)engine_->releaseTransfer(h.value());
  auto stats = engine_->peerStats("scripted");
  ASSERT_TRUE(stats.isOk());
  EXPECT_EQ(stats->succeeded, 2u);
  ASSERT_TRUE(engine_->deregisterMemory(write.mem).isOk());
}

// A gated READ_REQUEST (the initiator's copy queued behind a gate word it asks the target to
// write) of host memory is refused: the target writes nothing, holds nothing, and the connection
// goes on. (A gated READ of GPU memory is tested end to end in DirectGpuTest.)
TEST_F(DirectPeerTest, AGatedReadOfHostMemoryIsRefusedAndWritesNothing) {
  connectDirect(cookie_);
  GuardedRegion region(*engine_, size_t{4096} * 64);
  uint32_t gate = 0;
  const std::vector<control::WireDesc> descs{{region.id(), 0, region.size()}};
  const std::vector<control::DirectPiece> source{
      {reinterpret_cast<uint64_t>(region.data()), region.size(), 0}};
  control::ReadRequest rr;
  rr.xfer_id = scripted_->nextId();
  rr.total = region.size();
  rr.accept_inline = false;
  rr.descs = descs;
  rr.direct = true;
  rr.gated = true;
  rr.gate_value = 5;
  rr.gate_source = source;
  rr.gate_source_area = {std::string(control::kIpcHandleSize, 'a'),
                         reinterpret_cast<uint64_t>(region.data()),
                         region.size(),
                         {}};
  rr.gate_word = {reinterpret_cast<uint64_t>(&gate), sizeof(gate), 0};
  rr.gate_area = {std::string(control::kIpcHandleSize, 'g'),
                  reinterpret_cast<uint64_t>(&gate),
                  sizeof(gate),
                  {}};
  ASSERT_TRUE(scripted_->send(frameOf([&](auto* out) { control::encode(rr, out); })).isOk());
  auto answer = scripted_->expect(FrameType::kReadResponse, 5s);
  ASSERT_TRUE(answer.isOk()) << answer.status().toString();
  control::ReadResponse resp;
  ASSERT_TRUE(control::decode(answer->payload, control::DecodeLimits{}, &resp).isOk());
  EXPECT_EQ(resp.xfer_id, rr.xfer_id);
  EXPECT_EQ(resp.code, StatusCode::kNotSupported) << resp.message;
  EXPECT_FALSE(resp.direct);
  EXPECT_EQ(gate, 0u);
  // Nothing pinned: the region deregisters at once, and the peer is still ready.
  EXPECT_TRUE(deregisterWithin(region.id(), 1s).isOk());
  EXPECT_EQ(engine_->peerState("scripted"), PeerState::kReady);
  expectBystanderWorks();
}

TEST_F(DirectPeerTest, APeerThatNeverFinishesADirectCopyIsFailedWithinTheDataTimeout) {
  constexpr size_t kSize = size_t{1} << 20;
  {
    SCOPED_TRACE("our direct WRITE: the peer never answers WRITE_DONE");
    connectDirect(cookie_);
    tools::HostBuffer local(kSize);
    const MemoryId mem = engine_->registerMemory(local.data(), kSize).value();
    const RemoteMemory remote = scriptedRegion(79, kSize);
    auto h = post(OpKind::kWrite, "scripted", {{mem, 0, kSize}}, {{remote.id, 0, kSize}});
    ASSERT_TRUE(h.isOk()) << h.status().toString();
    const auto posted = std::chrono::steady_clock::now();
    auto request = scripted_->expect(FrameType::kWriteRequest, 5s);
    ASSERT_TRUE(request.isOk());
    // The control connection stays quiet but alive (the peer timeout is 4 s).
    const Status st = engine_->waitTransfer(h.value(), 5s);
    EXPECT_EQ(st.code(), StatusCode::kTimeout) << st.toString();
    EXPECT_LT(std::chrono::steady_clock::now() - posted, 1500ms);
    EXPECT_EQ(engine_->peerState("scripted"), PeerState::kFailed);
    (void)engine_->releaseTransfer(h.value());
    ASSERT_TRUE(engine_->deregisterMemory(mem).isOk());
  }
  {
    SCOPED_TRACE("its direct READ: it never sends READ_DONE, which keeps our region pinned");
    connectDirect(cookie_);
    GuardedRegion region(*engine_, kSize);
    (void)sendDirectRead(region);
    ASSERT_TRUE(scripted_->expect(FrameType::kReadResponse, 5s).isOk());
    // Deregistration waits for the pin, but only until the peer is failed for stalling.
    const auto before = std::chrono::steady_clock::now();
    EXPECT_TRUE(deregisterWithin(region.id(), 3s).isOk());
    EXPECT_GE(std::chrono::steady_clock::now() - before, 400ms);
    EXPECT_EQ(engine_->peerState("scripted"), PeerState::kFailed);
    EXPECT_TRUE(scripted_->closedWithin(2s));
  }
  expectBystanderWorks();
}

}  // namespace
}  // namespace tcpx::testing
