// The handshake refuses what it cannot agree with, naming why: engine names that are not names,
// a connector that claims the engine's own identity, settings outside their ranges.
#include <netinet/in.h>
#include <sys/socket.h>

#include "common/net.h"
#include "common/strings.h"
#include "control/blobs.h"
#include "protocol/protocol_fixture.h"

namespace tcpx::testing {
namespace {

// Sends one HELLO to the engine behind `conn_info` and returns its HELLO_ACK (result kRefused
// with reason "closed" when the engine closed the connection without answering).
control::HelloAck helloAck(const std::string& conn_info, const control::Hello& hello) {
  control::HelloAck ack;
  ack.result = control::HelloResult::kRefused;
  ack.reason = "closed";
  auto info = control::decodeConnInfo(conn_info);
  EXPECT_TRUE(info.isOk());
  auto addr = net::resolve(info->host, info->port);
  net::Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  EXPECT_EQ(::connect(fd.get(), addr->raw(), addr->len), 0);
  std::vector<uint8_t> frame;
  control::encode(hello, &frame);
  EXPECT_TRUE(net::writeAll(fd.get(), frame.data(), frame.size()).isOk());
  uint8_t header_bytes[control::kFrameHeaderSize];
  if (!net::readAll(fd.get(), header_bytes, sizeof(header_bytes)).isOk()) return ack;
  control::FrameHeader header;
  EXPECT_TRUE(control::decodeHeader(header_bytes, 1 << 16, &header).isOk());
  EXPECT_EQ(header.type, static_cast<uint8_t>(control::FrameType::kHelloAck));
  std::string payload(header.length, '\0');
  EXPECT_TRUE(net::readAll(fd.get(), payload.data(), payload.size()).isOk());
  EXPECT_TRUE(control::decode(payload, &ack).isOk());
  return ack;
}

control::Hello validHello() {
  control::Hello hello;
  hello.uuid = std::string(16, 'q');
  hello.name = "stranger";
  hello.transport = "socket";
  hello.settings = {4, 512 * 1024, 65536, 65536, 4000};
  hello.nonce = std::string(control::kNonceSize, 'n');
  return hello;
}

class HandshakeTest : public ProtocolTest {
 protected:
  // The engine still moves data to itself and to the bystander.
  void expectEngineWorks() {
    ASSERT_TRUE(engine_->addPeer("self", engine_->connectionInfo()).isOk());
    GuardedRegion a(*engine_, 1 << 20);
    GuardedRegion b(*engine_, 1 << 20);
    fillPattern(a.data(), a.size(), 31);
    auto rb = engine_->loadRemoteMemory(engine_->memoryDescriptor(b.id()).value());
    ASSERT_TRUE(rb.isOk());
    auto h = post(OpKind::kWrite, "self", {{a.id(), 0, a.size()}}, {{rb->id, 0, b.size()}});
    ASSERT_TRUE(h.isOk());
    ASSERT_TRUE(engine_->waitTransfer(h.value(), 30s).isOk());
    EXPECT_EQ(checkPattern(b.data(), b.size(), 31), -1);
    (void)engine_->releaseTransfer(h.value());
    expectBystanderWorks();
  }
};

TEST_F(HandshakeTest, AConnectorWhoseNameIsNotANameIsRefused) {
  for (const std::string& name : {std::string(), std::string("tab\there")}) {
    control::Hello hello = validHello();
    hello.name = name;
    const control::HelloAck ack = helloAck(engine_->connectionInfo(), hello);
    EXPECT_EQ(ack.result, control::HelloResult::kRefused);
    EXPECT_NE(ack.reason.find("name"), std::string::npos) << ack.reason;
  }
  // A name longer than a HELLO may carry makes the frame malformed: closed unanswered.
  control::Hello hello = validHello();
  hello.name = std::string(257, 'x');
  EXPECT_EQ(helloAck(engine_->connectionInfo(), hello).reason, "closed");
  expectEngineWorks();
}

TEST_F(HandshakeTest, AConnectorClaimingTheEnginesOwnIdentityIsRefused) {
  auto info = control::decodeConnInfo(engine_->connectionInfo());
  ASSERT_TRUE(info.isOk());
  control::Hello hello = validHello();
  hello.uuid = info->uuid;
  hello.name = "engine";
  const control::HelloAck ack = helloAck(engine_->connectionInfo(), hello);
  EXPECT_EQ(ack.result, control::HelloResult::kRefused);
  EXPECT_NE(ack.reason.find("own identity"), std::string::npos) << ack.reason;
  // Its own connection to itself still works (and so does everything else).
  expectEngineWorks();
}

TEST_F(HandshakeTest, SettingsOutsideTheirRangesAreRefusedNamingTheSetting) {
  struct Case {
    const char* setting;
    void (*spoil)(control::WireSettings*);
  };
  const Case cases[] = {
      {"channels", [](control::WireSettings* s) { s->channels = 0; }},
      {"channels", [](control::WireSettings* s) { s->channels = 33; }},
      {"chunk_size", [](control::WireSettings* s) { s->chunk_size = 100; }},
      {"max_descriptors", [](control::WireSettings* s) { s->max_descriptors = 0; }},
      {"max_notification_size", [](control::WireSettings* s) { s->max_notification = 0; }},
      {"peer_timeout_ms", [](control::WireSettings* s) { s->peer_timeout_ms = 5; }},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.setting);
    control::Hello hello = validHello();
    c.spoil(&hello.settings);
    const control::HelloAck ack = helloAck(engine_->connectionInfo(), hello);
    EXPECT_EQ(ack.result, control::HelloResult::kRefused);
    EXPECT_NE(ack.reason.find(c.setting), std::string::npos) << ack.reason;
  }
  expectEngineWorks();
}

TEST(EngineIdentity, AnEngineDoesNotStartWhenTheKernelCannotGiveRandomIds) {
  // Without unpredictable ids a stranger could guess registrations: no fallback, a clear error.
  ForkedPeer peer("no-random", {{"transport", "socket"}}, {"--deny-getrandom"});
  EXPECT_TRUE(peer.connectionInfo().empty());
  EXPECT_NE(peer.startError().find("NOT_SUPPORTED"), std::string::npos) << peer.startError();
  EXPECT_NE(peer.startError().find("getrandom"), std::string::npos) << peer.startError();
  EXPECT_EQ(peer.wait(10s), 2 << 8);  // exit status 2: the engine did not start
}

}  // namespace
}  // namespace tcpx::testing
