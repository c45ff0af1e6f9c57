// A peer that deviates from the protocol: duplicate, unsolicited, late and mis-addressed frames,
// data without an announcement, reused ids, floods, a peer that never reads. Each case checks
// that the engine answers with a typed error (PROTOCOL_ERROR closes that peer's connection), that
// no byte outside registered memory or in a deregistered region changes, that no call hangs, and
// that a well-behaved peer of the same engine goes on working.
#include <thread>

#include "protocol/protocol_fixture.h"

namespace tcpx::testing {
namespace {

using control::FrameType;

class AdversarialPeerTest : public ProtocolTest {
 protected:
  // Posts a READ of `size` bytes from the scripted peer into `region` and answers it with a
  // stream of `data` (status_follows as given); returns the READ's handle and the wire id.
  std::pair<TransferHandle, uint64_t> readAnsweredWithStream(GuardedRegion& region,
                                                             const std::string& data,
                                                             bool status_follows) {
    auto read = postReadAnsweredWithAStream(region, data.size(), status_follows);
    EXPECT_TRUE(scripted_->sendStream(data, 10s).isOk());
    return read;
  }

  // The scripted peer's connection was closed for a protocol error, and the engine says so.
  void expectClosedForProtocolError() {
    EXPECT_TRUE(scripted_->closedWithin(5s)) << "the engine kept the connection";
    EXPECT_EQ(engine_->peerState("scripted"), PeerState::kFailed);
  }
};

TEST_F(AdversarialPeerTest, ASecondReadResponseNeverWritesIntoTheCompletedOrDeregisteredRead) {
  connectScripted();
  constexpr size_t kSize = 512 * 1024;
  auto region = std::make_unique<GuardedRegion>(*engine_, kSize);
  const std::string first = patternBytes(kSize, 1);
  auto [h, id] = readAnsweredWithStream(*region, first, false);
  ASSERT_TRUE(engine_->waitTransfer(h, 10s).isOk());
  EXPECT_EQ(std::memcmp(region->data(), first.data(), kSize), 0);
  // The user is done with the buffer: releases the handle and deregisters the region.
  ASSERT_TRUE(engine_->releaseTransfer(h).isOk());
  ASSERT_TRUE(deregisterWithin(region->id(), 1s).isOk());
  std::memset(region->data(), 0x11, kSize);

  // The peer answers the same READ again, with a second stream.
  control::ReadResponse again;
  again.xfer_id = id;
  again.first_chunk = scripted_->outNextChunk();
  again.spread = scripted_->outSpread();
  ASSERT_TRUE(scripted_->send(frameOf([&](auto* out) { control::encode(again, {}, out); })).isOk());
  (void)scripted_->sendStream(patternBytes(kSize, 2), 2s);  // nobody receives it
  expectClosedForProtocolError();
  EXPECT_TRUE(GuardedRegion::allBytes(region->data(), kSize, 0x11));
  EXPECT_TRUE(region->guardsIntact());
  expectBystanderWorks();
}

TEST_F(AdversarialPeerTest, ASecondSendDataNeverWritesIntoTheFinishedRecv) {
  for (size_t size : {size_t{4096}, size_t{1} << 20}) {  // inline and streamed
    SCOPED_TRACE(size);
    connectScripted();
    GuardedRegion region(*engine_, size);
    auto h = engine_->postRecv("scripted", {region.id(), 0, size}, 9);
    ASSERT_TRUE(h.isOk());
    const uint64_t send_id = scripted_->nextId();
    ASSERT_TRUE(scripted_
                    ->send(frameOf([&](auto* out) {
                      control::encode(control::SendRts{send_id, 9, size}, out);
                    }))
                    .isOk());
    auto cts_frame = scripted_->expect(FrameType::kSendCts, 5s);
    ASSERT_TRUE(cts_frame.isOk()) << cts_frame.status().toString();
    control::SendCts cts;
    ASSERT_TRUE(control::decode(cts_frame->payload, &cts).isOk());
    const std::string first = patternBytes(size, 3);
    auto send_data = [&](const std::string& bytes) {
      control::SendData data;
      data.send_id = send_id;
      data.recv_id = cts.recv_id;
      const bool inline_data = size <= 64 * 1024;
      data.inline_data = inline_data;
      data.first_chunk = scripted_->outNextChunk();
      data.spread = inline_data ? 0 : scripted_->outSpread();
      const transport::IoSlice slice{const_cast<char*>(bytes.data()), bytes.size()};
      ASSERT_TRUE(scripted_
                      ->send(frameOf([&](auto* out) {
                        control::encode(
                            data,
                            inline_data ? std::span(&slice, 1) : std::span<transport::IoSlice>(),
                            out);
                      }))
                      .isOk());
      if (!inline_data) (void)scripted_->sendStream(bytes, 5s);
    };
    send_data(first);
    ASSERT_TRUE(scripted_->expect(FrameType::kSendDone, 10s).isOk());
    ASSERT_TRUE(engine_->waitTransfer(h.value(), 10s).isOk());
    ASSERT_TRUE(engine_->releaseTransfer(h.value()).isOk());
    send_data(patternBytes(size, 4));
    expectClosedForProtocolError();
    EXPECT_EQ(std::memcmp(region.data(), first.data(), size), 0);
    EXPECT_TRUE(region.guardsIntact());
  }
  expectBystanderWorks();
}

TEST_F(AdversarialPeerTest, AnswersNobodyAskedForFailTheTransfersInFlightAndTouchNothing) {
  struct Case {
    const char* name;
    std::function<std::vector<uint8_t>(uint64_t read_id)> frame;
  };
  const std::string bytes(16, 'x');
  const transport::IoSlice slice{const_cast<char*>(bytes.data()), bytes.size()};
  const std::vector<Case> cases{
      {"WRITE_DONE for an id never used",
       [](uint64_t id) {
         return frameOf([&](auto* o) { control::encodeWriteDone({id + 1000, {}, ""}, o); });
       }},
      {"READ_RESPONSE for another id",
       [&](uint64_t id) {
         control::ReadResponse r;
         r.xfer_id = id + 1000;
         r.inline_data = true;
         return frameOf([&](auto* o) { control::encode(r, {&slice, 1}, o); });
       }},
      {"WRITE_DONE naming the READ",
       [](uint64_t id) {
         return frameOf([&](auto* o) { control::encodeWriteDone({id, {}, ""}, o); });
       }},
      {"SEND_CTS naming the READ",
       [](uint64_t id) {
         return frameOf([&](auto* o) {
           control::encode(control::SendCts{id, 5, true, {}, ""}, o);
         });
       }},
      {"SEND_DONE for an id never used",
       [](uint64_t id) {
         return frameOf([&](auto* o) { control::encodeSendDone({id + 7, {}, ""}, o); });
       }},
      {"SEND_DATA for a recv never posted",
       [&](uint64_t id) {
         control::SendData d;
         d.send_id = 1;
         d.recv_id = id + 3;
         d.inline_data = true;
         return frameOf([&](auto* o) { control::encode(d, {&slice, 1}, o); });
       }},
      {"DATA_STATUS for the READ, which expects none",
       [](uint64_t id) {
         return frameOf([&](auto* o) {
           control::encodeDataStatus({id, {}, "", control::IdSpace::kReceiver}, o);
         });
       }},
      {"DATA_STATUS for an operation the peer never started",
       [](uint64_t id) {
         return frameOf([&](auto* o) {
           control::encodeDataStatus({id, {}, "", control::IdSpace::kSender}, o);
         });
       }},
      {"CANCEL of an id the peer never announced",
       [](uint64_t id) {
         return frameOf([&](auto* o) { control::encode(control::Cancel{id + 50}, o); });
       }},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    connectScripted();
    GuardedRegion region(*engine_, 4096);
    const RemoteMemory remote = scriptedRegion(5, 4096);
    auto h = post(OpKind::kRead, "scripted", {{region.id(), 0, 16}}, {{remote.id, 0, 16}});
    ASSERT_TRUE(h.isOk());
    auto request = scripted_->expect(FrameType::kReadRequest, 5s);
    ASSERT_TRUE(request.isOk());
    control::ReadRequest rr;
    ASSERT_TRUE(control::decode(request->payload, control::DecodeLimits{}, &rr).isOk());
    ASSERT_TRUE(scripted_->send(c.frame(rr.xfer_id)).isOk());
    expectClosedForProtocolError();
    const Status st = engine_->waitTransfer(h.value(), 5s);
    EXPECT_EQ(st.code(), StatusCode::kProtocolError) << st.toString();
    (void)engine_->releaseTransfer(h.value());
    EXPECT_TRUE(GuardedRegion::allBytes(region.data(), 4096, kPoison));
    EXPECT_TRUE(region.guardsIntact());
    EXPECT_TRUE(deregisterWithin(region.id(), 1s).isOk());
  }
  expectBystanderWorks();
}

TEST_F(AdversarialPeerTest, AWriteDoneRepeatedAfterAReleaseIsRefused) {
  connectScripted();
  constexpr size_t kSize = 1 << 20;
  GuardedRegion region(*engine_, kSize);
  const RemoteMemory remote = scriptedRegion(3, kSize);
  auto h = post(OpKind::kWrite, "scripted", {{region.id(), 0, kSize}}, {{remote.id, 0, kSize}});
  ASSERT_TRUE(h.isOk());
  auto request = scripted_->expect(FrameType::kWriteRequest, 5s);
  ASSERT_TRUE(request.isOk());
  control::WriteRequest wr;
  ASSERT_TRUE(control::decode(request->payload, control::DecodeLimits{}, &wr).isOk());
  ASSERT_EQ(wr.first_chunk, scripted_->inNextChunk());
  ASSERT_TRUE(scripted_->receiveStream(kSize, wr.spread, 10s).isOk());
  // The user gives up before the answer: the engine tells the peer.
  ASSERT_TRUE(engine_->releaseTransfer(h.value()).isOk());
  ASSERT_TRUE(scripted_->expect(FrameType::kCancel, 5s).isOk());
  auto done = frameOf([&](auto* o) {
    control::encodeWriteDone({wr.xfer_id, StatusCode::kCanceled, "released"}, o);
  });
  ASSERT_TRUE(scripted_->send(done).isOk());
  ASSERT_TRUE(scripted_->idle(200ms).isOk());
  EXPECT_EQ(engine_->peerState("scripted"), PeerState::kReady);  // the answer was due
  ASSERT_TRUE(scripted_->send(done).isOk());                     // and once is all
  expectClosedForProtocolError();
  EXPECT_TRUE(region.guardsIntact());
  expectBystanderWorks();
}

TEST_F(AdversarialPeerTest, ADataStatusAppliesOnlyToTheOperationInTheIdSpaceItNames) {
  connectScripted();
  constexpr size_t kSize = 1 << 20;
  // Our READ from the peer, answered with a stream whose verdict is to follow.
  GuardedRegion read_dst(*engine_, kSize);
  const std::string read_data = patternBytes(kSize, 5);
  auto [read, read_id] = readAnsweredWithStream(read_dst, read_data, true);
  // The peer's WRITE into us, under the very same number in its own id space, also staged.
  GuardedRegion write_dst(*engine_, kSize);
  control::WriteRequest wr;
  wr.xfer_id = read_id;
  wr.total = kSize;
  wr.first_chunk = scripted_->outNextChunk();
  wr.spread = scripted_->outSpread();
  wr.status_follows = true;
  const std::vector<control::WireDesc> descs{{write_dst.id(), 0, kSize}};
  wr.descs = descs;
  ASSERT_TRUE(scripted_->send(frameOf([&](auto* o) { control::encode(wr, {}, o); })).isOk());
  ASSERT_TRUE(scripted_->sendStream(patternBytes(kSize, 6), 10s).isOk());

  // A failed verdict on the peer's own WRITE fails that WRITE, and only it.
  ASSERT_TRUE(
      scripted_
          ->send(frameOf([&](auto* o) {
            control::encodeDataStatus(
                {read_id, StatusCode::kDeviceError, "copy failed", control::IdSpace::kSender}, o);
          }))
          .isOk());
  auto done_frame = scripted_->expect(FrameType::kWriteDone, 5s);
  ASSERT_TRUE(done_frame.isOk()) << done_frame.status().toString();
  control::Completion done;
  ASSERT_TRUE(control::decodeCompletion(done_frame->payload, &done).isOk());
  EXPECT_EQ(done.xfer_id, read_id);
  EXPECT_NE(done.code, StatusCode::kOk);
  EXPECT_EQ(engine_->checkTransfer(read).code(), StatusCode::kInProgress);
  // The READ's own verdict completes it.
  ASSERT_TRUE(scripted_
                  ->send(frameOf([&](auto* o) {
                    control::encodeDataStatus({read_id, {}, "", control::IdSpace::kReceiver}, o);
                  }))
                  .isOk());
  ASSERT_TRUE(engine_->waitTransfer(read, 5s).isOk());
  EXPECT_EQ(std::memcmp(read_dst.data(), read_data.data(), kSize), 0);
  EXPECT_EQ(engine_->peerState("scripted"), PeerState::kReady);
  // A second verdict for either is out of turn.
  ASSERT_TRUE(scripted_
                  ->send(frameOf([&](auto* o) {
                    control::encodeDataStatus({read_id, {}, "", control::IdSpace::kReceiver}, o);
                  }))
                  .isOk());
  expectClosedForProtocolError();
  EXPECT_TRUE(read_dst.guardsIntact());
  EXPECT_TRUE(write_dst.guardsIntact());
  (void)engine_->releaseTransfer(read);
  expectBystanderWorks();
}

TEST_F(AdversarialPeerTest, AnAnnouncementThatReusesAnIdIsRefusedAndWritesNothing) {
  connectScripted();
  GuardedRegion region(*engine_, 4096);
  const std::string first(100, 'a');
  const std::string second(100, 'b');
  auto write = [&](uint64_t id, const std::string& bytes) {
    control::WriteRequest wr;
    wr.xfer_id = id;
    wr.total = bytes.size();
    wr.inline_data = true;
    const std::vector<control::WireDesc> descs{{region.id(), 0, bytes.size()}};
    wr.descs = descs;
    const transport::IoSlice slice{const_cast<char*>(bytes.data()), bytes.size()};
    return scripted_->send(frameOf([&](auto* o) { control::encode(wr, {&slice, 1}, o); }));
  };
  ASSERT_TRUE(write(5, first).isOk());
  ASSERT_TRUE(scripted_->expect(FrameType::kWriteDone, 5s).isOk());
  ASSERT_TRUE(write(5, second).isOk());  // a replay of the finished WRITE's id
  expectClosedForProtocolError();
  EXPECT_EQ(std::memcmp(region.data(), first.data(), first.size()), 0);
  EXPECT_TRUE(region.guardsIntact());

  // Ids below the last one are refused too, for every kind of announcement.
  connectScripted();
  ASSERT_TRUE(write(9, first).isOk());
  ASSERT_TRUE(scripted_->expect(FrameType::kWriteDone, 5s).isOk());
  ASSERT_TRUE(
      scripted_->send(frameOf([&](auto* o) {
                 control::encode(control::SendRts{4, 1, 100}, o);
               }))
          .isOk());
  expectClosedForProtocolError();
  expectBystanderWorks();
}

TEST_F(AdversarialPeerTest, OnlyAWriteTheTargetHasNotAnsweredCanBeCanceled) {
  connectScripted();
  constexpr size_t kSize = 64 << 20;  // more than the sockets buffer: the READ stays in service
  GuardedRegion region(*engine_, kSize);
  fillPattern(region.data(), kSize, 8);
  // A late CANCEL (the WRITE is answered already) is harmless.
  const std::string bytes(100, 'c');
  control::WriteRequest wr;
  wr.xfer_id = scripted_->nextId();
  wr.total = bytes.size();
  wr.inline_data = true;
  const std::vector<control::WireDesc> small{{region.id(), 0, bytes.size()}};
  wr.descs = small;
  const transport::IoSlice slice{const_cast<char*>(bytes.data()), bytes.size()};
  ASSERT_TRUE(scripted_->send(frameOf([&](auto* o) {
                         control::encode(wr, {&slice, 1}, o);
                       }))
                  .isOk());
  ASSERT_TRUE(scripted_->expect(FrameType::kWriteDone, 5s).isOk());
  ASSERT_TRUE(
      scripted_->send(frameOf([&](auto* o) { control::encode(control::Cancel{wr.xfer_id}, o); }))
          .isOk());
  ASSERT_TRUE(scripted_->idle(200ms).isOk());
  EXPECT_EQ(engine_->peerState("scripted"), PeerState::kReady);

  // A READ is not canceled with CANCEL: that is out of turn.
  control::ReadRequest rr;
  rr.xfer_id = scripted_->nextId();
  rr.total = kSize;
  const std::vector<control::WireDesc> whole{{region.id(), 0, kSize}};
  rr.descs = whole;
  ASSERT_TRUE(scripted_->send(frameOf([&](auto* o) { control::encode(rr, o); })).isOk());
  ASSERT_TRUE(scripted_->expect(FrameType::kReadResponse, 5s).isOk());
  ASSERT_TRUE(
      scripted_->send(frameOf([&](auto* o) { control::encode(control::Cancel{rr.xfer_id}, o); }))
          .isOk());
  expectClosedForProtocolError();
  EXPECT_TRUE(region.guardsIntact());
  EXPECT_TRUE(deregisterWithin(region.id(), 2s).isOk());
  expectBystanderWorks();
}

TEST_F(AdversarialPeerTest, DataOutOfStepOrWithoutAnAnnouncementFailsThePeerAndWritesNothing) {
  constexpr size_t kSize = 1 << 20;
  // An announcement that starts past where the stream stands.
  connectScripted();
  {
    GuardedRegion region(*engine_, kSize);
    control::WriteRequest wr;
    wr.xfer_id = scripted_->nextId();
    wr.total = kSize;
    wr.first_chunk = scripted_->outNextChunk() + 3;
    wr.spread = scripted_->outSpread();
    const std::vector<control::WireDesc> descs{{region.id(), 0, kSize}};
    wr.descs = descs;
    ASSERT_TRUE(scripted_->send(frameOf([&](auto* o) { control::encode(wr, {}, o); })).isOk());
    expectClosedForProtocolError();
    EXPECT_TRUE(GuardedRegion::allBytes(region.data(), kSize, kPoison));
    EXPECT_TRUE(region.guardsIntact());
    EXPECT_TRUE(deregisterWithin(region.id(), 1s).isOk());
  }
  // Bytes on a data channel that no frame announced, then a real announcement: the channel
  // is out of step and the engine stops the peer before writing anything.
  connectScripted();
  {
    GuardedRegion region(*engine_, kSize);
    ASSERT_TRUE(scripted_->sendUnannounced(0, 1000, 5s).isOk());
    control::WriteRequest wr;
    wr.xfer_id = scripted_->nextId();
    wr.total = kSize;
    wr.first_chunk = scripted_->outNextChunk();
    wr.spread = scripted_->outSpread();
    const std::vector<control::WireDesc> descs{{region.id(), 0, kSize}};
    wr.descs = descs;
    ASSERT_TRUE(scripted_->send(frameOf([&](auto* o) { control::encode(wr, {}, o); })).isOk());
    (void)scripted_->sendStream(patternBytes(kSize, 9), 2s);
    EXPECT_TRUE(scripted_->closedWithin(5s));
    EXPECT_EQ(engine_->peerState("scripted"), PeerState::kFailed);
    // The chunk that met the stray bytes was refused before its payload was read; chunks on
    // other channels may have landed, inside the WRITE's own destination only.
    EXPECT_TRUE(region.guardsIntact());
    EXPECT_TRUE(deregisterWithin(region.id(), 1s).isOk());
  }
  expectBystanderWorks();
}

TEST_F(AdversarialPeerTest, ARefusedRequestLeavesNoPinBehind) {
  connectScripted();
  GuardedRegion region(*engine_, 4096);
  // The first descriptor is valid, the second is not: the whole request is refused.
  const std::string bytes(200, 'd');
  control::WriteRequest wr;
  wr.xfer_id = scripted_->nextId();
  wr.total = bytes.size();
  wr.inline_data = true;
  const std::vector<control::WireDesc> descs{{region.id(), 0, 100}, {region.id(), 4090, 100}};
  wr.descs = descs;
  const transport::IoSlice slice{const_cast<char*>(bytes.data()), bytes.size()};
  ASSERT_TRUE(scripted_->send(frameOf([&](auto* o) {
                         control::encode(wr, {&slice, 1}, o);
                       }))
                  .isOk());
  auto done_frame = scripted_->expect(FrameType::kWriteDone, 5s);
  ASSERT_TRUE(done_frame.isOk());
  control::Completion done;
  ASSERT_TRUE(control::decodeCompletion(done_frame->payload, &done).isOk());
  EXPECT_EQ(done.code, StatusCode::kOutOfRange);
  EXPECT_TRUE(GuardedRegion::allBytes(region.data(), 4096, kPoison));
  // Nothing stays pinned: the region deregisters at once.
  EXPECT_TRUE(deregisterWithin(region.id(), 1s).isOk());
  EXPECT_EQ(engine_->peerState("scripted"), PeerState::kReady);
}

TEST_F(AdversarialPeerTest, FloodsAreServedUpToTheLimitAndAPeerOverItIsStopped) {
  connectScripted();
  // Ten thousand notifications in one burst all arrive, in order.
  std::vector<uint8_t> burst;
  for (int i = 0; i < 10000; ++i) {
    control::encodePing(&burst);
    control::encodeNotification("n" + std::to_string(i), &burst);
  }
  ASSERT_TRUE(scripted_->send(burst).isOk());
  std::vector<Notification> got;
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (got.size() < 10000 && std::chrono::steady_clock::now() < deadline) {
    for (auto& n : engine_->takeNotifications()) got.push_back(std::move(n));
    std::this_thread::sleep_for(1ms);
  }
  ASSERT_EQ(got.size(), 10000u);
  EXPECT_EQ(got.back().message, "n9999");

  // READs the peer never drains: each is an operation the engine serves; past the limit the
  // peer is stopped, and the region it pinned is free again. 64 MiB each: the sockets' buffers
  // cannot absorb even the first, so none of them finishes meanwhile.
  constexpr size_t kSize = 64u << 20;
  GuardedRegion region(*engine_, kSize);
  ASSERT_TRUE(scripted_->send(readRequests(8193, {{region.id(), 0, kSize}}, kSize)).isOk());
  expectClosedForProtocolError();
  EXPECT_TRUE(deregisterWithin(region.id(), 5s).isOk());
  expectBystanderWorks();
}

TEST_F(AdversarialPeerTest, APeerThatNeverReadsBlocksNoCallAndNoOtherPeer) {
  connectScripted();
  constexpr size_t kSize = 64 * 1024;
  GuardedRegion region(*engine_, kSize);
  const RemoteMemory remote = scriptedRegion(4, kSize);
  // Inline WRITEs pile up in the control connection the peer does not read.
  std::vector<TransferHandle> handles;
  const auto started = std::chrono::steady_clock::now();
  for (int i = 0; i < 200; ++i) {
    auto h = post(OpKind::kWrite, "scripted", {{region.id(), 0, kSize}}, {{remote.id, 0, kSize}});
    ASSERT_TRUE(h.isOk());
    handles.push_back(h.value());
  }
  EXPECT_LT(std::chrono::steady_clock::now() - started, 2s);
  expectBystanderWorks();
  // Releasing them returns at once; so does deregistration once they are released.
  for (TransferHandle h : handles) EXPECT_TRUE(engine_->releaseTransfer(h).isOk());
  EXPECT_TRUE(deregisterWithin(region.id(), 2s).isOk());
  scripted_.reset();  // the peer goes away
  const auto deadline = std::chrono::steady_clock::now() + 5s;
  while (engine_->peerState("scripted") != PeerState::kFailed &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(5ms);
  }
  EXPECT_EQ(engine_->peerState("scripted"), PeerState::kFailed);
}

}  // namespace
}  // namespace tcpx::testing
