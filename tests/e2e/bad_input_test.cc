// Bad input from the caller or from a peer: a clear error code and message, nothing lost, nothing
// written outside registered memory, and the engine keeps serving.
#include <cstring>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sstream>
#include <sys/socket.h>

#include "common/net.h"
#include "common/strings.h"
#include "control/blobs.h"
#include "control/frames.h"
#include "e2e/e2e_fixture.h"

namespace tcpx::testing {
namespace {

class BadInputTest : public TwoProcessTest {
 protected:
  Status prepare(OpKind op, const std::vector<LocalDesc>& local,
                 const std::vector<RemoteDesc>& remote,
                 std::optional<std::string> notification = std::nullopt,
                 const std::string& peer = "target") {
    auto h = engine_->prepareTransfer(op, peer, local, remote, std::move(notification));
    if (h.isOk()) {
      (void)engine_->releaseTransfer(h.value());
      return Status();
    }
    return h.status();
  }
};

TEST_F(BadInputTest, MalformedDescriptorListsAreRefusedWithTheirOwnCodes) {
  ASSERT_NO_FATAL_FAILURE(start({}, {{"max_descriptors", "8"}, {"max_notification_size", "16"}}));
  const RemoteMemory remote = targetRegion(4096);
  HostBuffer local(4096);
  const MemoryId mem = localRegion(local);

  EXPECT_EQ(prepare(OpKind::kWrite, {}, {}).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(prepare(OpKind::kWrite, {{mem, 0, 10}}, {}).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(prepare(OpKind::kWrite, {{mem, 0, 10}, {mem, 10, 10}}, {{remote.id, 0, 20}}).code(),
            StatusCode::kLengthMismatch);
  const Status lengths = prepare(OpKind::kWrite, {{mem, 0, 10}}, {{remote.id, 0, 11}});
  EXPECT_EQ(lengths.code(), StatusCode::kLengthMismatch);
  EXPECT_NE(lengths.message().find("descriptor 0"), std::string::npos) << lengths.message();
  EXPECT_EQ(prepare(OpKind::kWrite, {{mem, 0, 0}}, {{remote.id, 0, 0}}).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(prepare(OpKind::kWrite, {{mem ^ 1, 0, 10}}, {{remote.id, 0, 10}}).code(),
            StatusCode::kNotFound);
  EXPECT_EQ(prepare(OpKind::kRead, {{mem, 4090, 10}}, {{remote.id, 0, 10}}).code(),
            StatusCode::kOutOfRange);
  EXPECT_EQ(prepare(OpKind::kRead, {{mem, 0, 10}}, {{remote.id, 4090, 10}}).code(),
            StatusCode::kOutOfRange);
  EXPECT_EQ(prepare(OpKind::kRead, {{mem, 0, 10}}, {{remote.id ^ 1, 0, 10}}).code(),
            StatusCode::kNotFound);
  EXPECT_EQ(
      prepare(OpKind::kRead, {{mem, 0, 10}}, {{remote.id, 0, 10}}, std::nullopt, "nobody").code(),
      StatusCode::kNotFound);
  EXPECT_EQ(
      prepare(OpKind::kWrite, {{mem, 0, 10}}, {{remote.id, 0, 10}}, std::string(17, 'n')).code(),
      StatusCode::kInvalidArgument);
  std::vector<LocalDesc> nine_local(9, LocalDesc{mem, 0, 1});
  std::vector<RemoteDesc> nine_remote(9, RemoteDesc{remote.id, 0, 1});
  EXPECT_EQ(prepare(OpKind::kWrite, nine_local, nine_remote).code(),
            StatusCode::kResourceExhausted);
  EXPECT_EQ(engine_->sendNotification("target", std::string(17, 'n')).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(engine_->sendNotification("nobody", "x").code(), StatusCode::kNotFound);
  // Nothing above disturbed the engine.
  EXPECT_TRUE(run(OpKind::kWrite, {{mem, 0, 10}}, {{remote.id, 0, 10}}).isOk());
}

TEST_F(BadInputTest, HandlesAreCheckedForReleaseAndRepost) {
  ASSERT_NO_FATAL_FAILURE(start());
  const RemoteMemory remote = targetRegion(4096);
  HostBuffer local(4096);
  const MemoryId mem = localRegion(local);
  auto h =
      engine_->prepareTransfer(OpKind::kWrite, "target", std::vector<LocalDesc>{{mem, 0, 4096}},
                               std::vector<RemoteDesc>{{remote.id, 0, 4096}});
  ASSERT_TRUE(h.isOk());
  ASSERT_TRUE(engine_->releaseTransfer(h.value()).isOk());
  EXPECT_EQ(engine_->checkTransfer(h.value()).code(), StatusCode::kNotFound);
  EXPECT_EQ(engine_->postTransfer(h.value()).code(), StatusCode::kNotFound);
  EXPECT_EQ(engine_->releaseTransfer(h.value()).code(), StatusCode::kNotFound);
  EXPECT_EQ(engine_->checkTransfer(123456789).code(), StatusCode::kNotFound);
}

TEST_F(BadInputTest, MemoryErrorsAreReportedWithoutSideEffects) {
  ASSERT_NO_FATAL_FAILURE(start());
  const RemoteMemory remote = targetRegion(4096);
  HostBuffer local(4096);
  int dummy = 0;
  // A host pointer registered as GPU memory: refused by the driver check, or not supported at all
  // without a GPU.
  EXPECT_EQ(engine_->registerMemory(&dummy, sizeof(dummy), MemoryKind::kCuda, 0).status().code(),
            tools::gpuCount() > 0 ? StatusCode::kInvalidArgument : StatusCode::kNotSupported);
  EXPECT_EQ(engine_->deregisterMemory(42).code(), StatusCode::kNotFound);
  EXPECT_EQ(engine_->memoryDescriptor(42).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(engine_->loadRemoteMemory("not a descriptor").status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(engine_->addPeer("x", "not connection info").code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(engine_->addPeer("", target_->connectionInfo()).code(), StatusCode::kInvalidArgument);

  // A prepared transfer whose memory was deregistered fails at post, clearly, and stays failed.
  const MemoryId mem = localRegion(local);
  auto h = engine_->prepareTransfer(OpKind::kWrite, "target", std::vector<LocalDesc>{{mem, 0, 64}},
                                    std::vector<RemoteDesc>{{remote.id, 0, 64}});
  ASSERT_TRUE(h.isOk());
  ASSERT_TRUE(engine_->deregisterMemory(mem).isOk());
  EXPECT_EQ(engine_->postTransfer(h.value()).code(), StatusCode::kNotFound);
  EXPECT_EQ(engine_->checkTransfer(h.value()).code(), StatusCode::kNotFound);
  EXPECT_TRUE(engine_->releaseTransfer(h.value()).isOk());
}

// The initiator is lied to about a region's size; the target's own checks refuse the request on
// both sides, write nothing, and the channels stay in step for what follows.
TEST_F(BadInputTest, RemoteRequestsOutsideTheTargetsRegistrationAreRefusedOnBothSides) {
  ASSERT_NO_FATAL_FAILURE(start());
  constexpr size_t kTotal = 3u << 20, kOff = 1u << 20, kLen = 1u << 20;
  const std::string part = target_->call("REGISTER_PART " + std::to_string(kTotal) + " " +
                                         std::to_string(kOff) + " " + std::to_string(kLen));
  std::istringstream in(part);
  uint64_t target_mem = 0;
  std::string desc_hex;
  in >> target_mem >> desc_hex;
  auto real = control::decodeMemoryDescriptor(fromHex(desc_hex.substr(1)).value());
  ASSERT_TRUE(real.isOk());
  control::MemoryDescriptor forged = real.value();
  forged.length = kTotal;
  auto remote = engine_->loadRemoteMemory(control::encodeMemoryDescriptor(forged));
  ASSERT_TRUE(remote.isOk());
  control::MemoryDescriptor unknown = forged;
  unknown.id ^= 0x5555;
  auto stranger = engine_->loadRemoteMemory(control::encodeMemoryDescriptor(unknown));
  ASSERT_TRUE(stranger.isOk());

  HostBuffer local(kTotal);
  const MemoryId mem = localRegion(local);
  fillPattern(local.data(), kTotal, 7);
  for (size_t size : {size_t{100}, size_t{2u << 20}}) {  // inline and chunked
    SCOPED_TRACE(size);
    const Status w = run(OpKind::kWrite, {{mem, 0, size}}, {{remote->id, kLen - 10, size}},
                         std::string("must not arrive"));
    EXPECT_EQ(w.code(), StatusCode::kRemoteRejected) << w.toString();
    EXPECT_NE(w.message().find("OUT_OF_RANGE"), std::string::npos) << w.toString();
    const Status r = run(OpKind::kRead, {{mem, 0, size}}, {{remote->id, kLen - 10, size}});
    EXPECT_EQ(r.code(), StatusCode::kRemoteRejected) << r.toString();
    const Status n = run(OpKind::kWrite, {{mem, 0, size}}, {{stranger->id, 0, size}});
    EXPECT_EQ(n.code(), StatusCode::kRemoteRejected);
    EXPECT_NE(n.message().find("NOT_FOUND"), std::string::npos) << n.toString();
  }
  // Not a byte of the allocation changed, registered part included; no notification arrived.
  EXPECT_EQ(target_->checkByte(target_mem, 0, kTotal, 0xA5), "ok");
  EXPECT_TRUE(target_->notifications(1, 200ms).empty());
  // The same connection still carries valid transfers.
  ASSERT_TRUE(run(OpKind::kWrite, {{mem, 0, kLen}}, {{remote->id, 0, kLen}}).isOk());
  EXPECT_EQ(target_->check(target_mem, kOff, kLen, 7), "ok");
  EXPECT_EQ(target_->checkByte(target_mem, 0, kOff, 0xA5), "ok");
  EXPECT_EQ(target_->checkByte(target_mem, kOff + kLen, kTotal - kOff - kLen, 0xA5), "ok");
}

net::Fd connectTo(const std::string& conn_info) {
  auto info = control::decodeConnInfo(conn_info);
  EXPECT_TRUE(info.isOk());
  auto addr = net::resolve(info->host, info->port);
  net::Fd fd(::socket(AF_INET, SOCK_STREAM, 0));
  EXPECT_EQ(::connect(fd.get(), addr->raw(), addr->len), 0);
  return fd;
}

TEST_F(BadInputTest, GarbageOnTheListeningPortIsDroppedAndOtherPeersAreUndisturbed) {
  ASSERT_NO_FATAL_FAILURE(start());
  const RemoteMemory remote = targetRegion(1 << 20);
  HostBuffer local(1 << 20);
  const MemoryId mem = localRegion(local);
  ASSERT_TRUE(run(OpKind::kWrite, {{mem, 0, 1 << 20}}, {{remote.id, 0, 1 << 20}}).isOk());

  net::Fd junk = connectTo(engine_->connectionInfo());
  const char request[] = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
  ASSERT_GT(::send(junk.get(), request, sizeof(request), 0), 0);
  char byte = 0;
  EXPECT_LE(::recv(junk.get(), &byte, 1, 0), 0);  // closed by the engine

  // A well-formed frame of the wrong type is refused too.
  net::Fd ping = connectTo(engine_->connectionInfo());
  std::vector<uint8_t> frame;
  control::encodePing(&frame);
  ASSERT_GT(::send(ping.get(), frame.data(), frame.size(), 0), 0);
  EXPECT_LE(::recv(ping.get(), &byte, 1, 0), 0);

  ASSERT_TRUE(run(OpKind::kRead, {{mem, 0, 1 << 20}}, {{remote.id, 0, 1 << 20}}).isOk());
}

TEST_F(BadInputTest, AWrongProtocolVersionIsAnsweredWithAVersionMismatch) {
  ASSERT_NO_FATAL_FAILURE(start());
  net::Fd fd = connectTo(engine_->connectionInfo());
  control::Hello hello;
  hello.uuid = std::string(16, 'z');
  hello.name = "future";
  hello.transport = "socket";
  hello.settings = {4, 1 << 19, 65536, 65536, 4000};
  std::vector<uint8_t> frame;
  control::encode(hello, &frame);
  frame[4] = 99;  // protocol version
  ASSERT_TRUE(net::writeAll(fd.get(), frame.data(), frame.size()).isOk());
  uint8_t header_bytes[control::kFrameHeaderSize];
  ASSERT_TRUE(net::readAll(fd.get(), header_bytes, sizeof(header_bytes)).isOk());
  control::FrameHeader header;
  ASSERT_TRUE(control::decodeHeader(header_bytes, 1 << 16, &header).isOk());
  ASSERT_EQ(header.type, static_cast<uint8_t>(control::FrameType::kHelloAck));
  std::string payload(header.length, '\0');
  ASSERT_TRUE(net::readAll(fd.get(), payload.data(), payload.size()).isOk());
  control::HelloAck ack;
  ASSERT_TRUE(control::decode(payload, &ack).isOk());
  EXPECT_EQ(ack.result, control::HelloResult::kVersionMismatch);
  EXPECT_NE(ack.reason.find("version 99"), std::string::npos) << ack.reason;
}

}  // namespace
}  // namespace tcpx::testing
