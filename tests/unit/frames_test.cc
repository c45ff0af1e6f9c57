// The control-plane wire format: every frame round-trips, and no truncated or oversized input
// decodes.
#include "control/frames.h"

#include <cstring>
#include <gtest/gtest.h>
#include <span>

namespace tcpx::control {
namespace {

// Splits one encoded frame into header and payload.
std::string_view payloadOf(const std::vector<uint8_t>& frame, FrameHeader* header) {
  EXPECT_GE(frame.size(), kFrameHeaderSize);
  EXPECT_TRUE(decodeHeader(frame.data(), kMaxFramePayload, header).isOk());
  EXPECT_EQ(header->version, kProtocolVersion);
  EXPECT_EQ(frame.size(), kFrameHeaderSize + header->length);
  return {reinterpret_cast<const char*>(frame.data() + kFrameHeaderSize), header->length};
}

// Every strict prefix of a valid payload must be rejected by `decode`.
template <typename Decode>
void expectPrefixesRejected(std::string_view payload, Decode decode) {
  for (size_t n = 0; n < payload.size(); ++n) {
    const Status st = decode(payload.substr(0, n));
    EXPECT_EQ(st.code(), StatusCode::kProtocolError) << "prefix of " << n << " bytes decoded";
  }
}

TEST(Frames, AuthFramesRoundTripAndRejectTruncationAndBadSizes) {
  AuthChallenge c;
  c.nonce = std::string(kNonceSize, 'a');
  c.proof = std::string(kProofSize, 'p');
  std::vector<uint8_t> frame;
  encode(c, &frame);
  FrameHeader h;
  std::string_view payload = payloadOf(frame, &h);
  EXPECT_EQ(h.type, static_cast<uint8_t>(FrameType::kAuthChallenge));
  AuthChallenge d;
  ASSERT_TRUE(decode(payload, &d).isOk());
  EXPECT_EQ(d.nonce, c.nonce);
  EXPECT_EQ(d.proof, c.proof);
  expectPrefixesRejected(payload, [](std::string_view p) {
    AuthChallenge x;
    return decode(p, &x);
  });
  std::vector<uint8_t> proof_frame;
  encodeAuthProof(std::string(kProofSize, 'q'), &proof_frame);
  payload = payloadOf(proof_frame, &h);
  EXPECT_EQ(h.type, static_cast<uint8_t>(FrameType::kAuthProof));
  std::string proof;
  ASSERT_TRUE(decodeAuthProof(payload, &proof).isOk());
  EXPECT_EQ(proof, std::string(kProofSize, 'q'));
  expectPrefixesRejected(payload, [](std::string_view p) {
    std::string x;
    return decodeAuthProof(p, &x);
  });
  std::vector<uint8_t> short_proof;
  encodeAuthProof("too short", &short_proof);
  EXPECT_FALSE(decodeAuthProof(payloadOf(short_proof, &h), &proof).isOk());
}

TEST(Frames, HelloRoundTripsAndRejectsTruncation) {
  Hello m;
  m.uuid = std::string(16, 'u');
  m.name = "node-1";
  m.conn_info = "blob";
  m.transport = "socket";
  m.settings = {4, 512 * 1024, 1000, 4096, 2500};
  m.nonce = std::string(kNonceSize, 'n');
  std::vector<uint8_t> frame;
  encode(m, &frame);
  FrameHeader h;
  const std::string_view payload = payloadOf(frame, &h);
  EXPECT_EQ(h.type, static_cast<uint8_t>(FrameType::kHello));
  Hello d;
  ASSERT_TRUE(decode(payload, &d).isOk());
  EXPECT_EQ(d.nonce, m.nonce);
  EXPECT_EQ(d.uuid, m.uuid);
  EXPECT_EQ(d.name, m.name);
  EXPECT_EQ(d.conn_info, m.conn_info);
  EXPECT_EQ(d.transport, m.transport);
  EXPECT_EQ(d.settings.channels, 4u);
  EXPECT_EQ(d.settings.chunk_size, 512u * 1024);
  EXPECT_EQ(d.settings.max_descriptors, 1000u);
  EXPECT_EQ(d.settings.max_notification, 4096u);
  EXPECT_EQ(d.settings.peer_timeout_ms, 2500u);
  expectPrefixesRejected(payload, [](std::string_view p) {
    Hello x;
    return decode(p, &x);
  });
}

TEST(Frames, HelloWithWrongMagicOrShortUuidIsRejected) {
  Hello m;
  m.uuid = std::string(15, 'u');
  std::vector<uint8_t> frame;
  encode(m, &frame);
  FrameHeader h;
  Hello d;
  EXPECT_EQ(decode(payloadOf(frame, &h), &d).code(), StatusCode::kProtocolError);
  m.uuid = std::string(16, 'u');
  m.magic = 0x12345678;
  frame.clear();
  encode(m, &frame);
  EXPECT_EQ(decode(payloadOf(frame, &h), &d).code(), StatusCode::kProtocolError);
}

TEST(Frames, WriteRequestCarriesDescriptorsNotificationAndInlineData) {
  const std::vector<WireDesc> descs{{1, 2, 3}, {4, 5, 6}};
  char a[2] = {'a', 'b'};
  char b[4] = {'c', 'd', 'e', 'f'};
  const std::vector<transport::IoSlice> slices{{a, 2}, {b, 4}};
  WriteRequest m;
  m.xfer_id = 77;
  m.total = 6;
  m.first_chunk = 9;
  m.has_notification = true;
  m.notification = "done";
  m.descs = descs;
  m.inline_data = true;
  std::vector<uint8_t> frame;
  encode(m, slices, &frame);
  FrameHeader h;
  const std::string_view payload = payloadOf(frame, &h);
  WriteRequest d;
  ASSERT_TRUE(decode(payload, DecodeLimits{}, &d).isOk());
  EXPECT_EQ(d.xfer_id, 77u);
  EXPECT_EQ(d.first_chunk, 9u);
  EXPECT_EQ(d.notification, "done");
  ASSERT_EQ(d.decoded.size(), 2u);
  EXPECT_EQ(d.decoded[1].mem, 4u);
  EXPECT_EQ(d.decoded[1].offset, 5u);
  EXPECT_EQ(d.decoded[1].length, 6u);
  EXPECT_EQ(d.data, "abcdef");
  expectPrefixesRejected(payload, [](std::string_view p) {
    WriteRequest x;
    return decode(p, DecodeLimits{}, &x);
  });
}

TEST(Frames, DirectOffersRoundTripInHelloAndHelloAckAndMustBeWholeOrAbsent) {
  Hello m;
  m.uuid = std::string(16, 'u');
  m.name = "node-1";
  m.transport = "socket";
  m.nonce = std::string(kNonceSize, 'n');
  m.direct = {4242, 0x7f0000001000, std::string(kNonceSize, 'c')};
  std::vector<uint8_t> frame;
  encode(m, &frame);
  FrameHeader h;
  const std::string_view payload = payloadOf(frame, &h);
  Hello d;
  ASSERT_TRUE(decode(payload, &d).isOk());
  EXPECT_EQ(d.direct.pid, 4242u);
  EXPECT_EQ(d.direct.cookie_addr, 0x7f0000001000u);
  EXPECT_EQ(d.direct.cookie, std::string(kNonceSize, 'c'));
  expectPrefixesRejected(payload, [](std::string_view p) {
    Hello x;
    return decode(p, &x);
  });

  HelloAck ack;
  ack.uuid = std::string(16, 'v');
  ack.name = "node-2";
  ack.direct = {7, 0x1000, std::string(kNonceSize, 'k')};
  frame.clear();
  encode(ack, &frame);
  HelloAck a;
  ASSERT_TRUE(decode(payloadOf(frame, &h), &a).isOk());
  EXPECT_EQ(a.direct.pid, 7u);
  EXPECT_EQ(a.direct.cookie, std::string(kNonceSize, 'k'));

  // An offer is all there (pid, address, a whole cookie) or all zero.
  for (const DirectOffer& bad :
       {DirectOffer{5, 0x1000, "short"}, DirectOffer{5, 0, std::string(kNonceSize, 'c')},
        DirectOffer{0, 0x1000, ""}, DirectOffer{0, 0, std::string(kNonceSize, 'c')}}) {
    m.direct = bad;
    frame.clear();
    encode(m, &frame);
    EXPECT_EQ(decode(payloadOf(frame, &h), &d).code(), StatusCode::kProtocolError)
        << "pid " << bad.pid << " address " << bad.cookie_addr << " cookie of "
        << bad.cookie.size();
  }
}

TEST(Frames, DirectRequestsCarryPiecesThatAddUpToTheTotal) {
  const std::vector<WireDesc> descs{{1, 0, 6000}};
  const std::vector<DirectPiece> pieces{{0x10000, 4000}, {0x30000, 2000}};
  WriteRequest m;
  m.xfer_id = 5;
  m.total = 6000;
  m.descs = descs;
  m.direct = true;
  m.pieces = pieces;
  std::vector<uint8_t> frame;
  encode(m, {}, &frame);
  FrameHeader h;
  std::string_view payload = payloadOf(frame, &h);
  WriteRequest d;
  ASSERT_TRUE(decode(payload, DecodeLimits{}, &d).isOk());
  EXPECT_TRUE(d.direct);
  EXPECT_FALSE(d.want_signal);
  ASSERT_EQ(d.decoded_pieces.size(), 2u);
  EXPECT_EQ(d.decoded_pieces[1].addr, 0x30000u);
  EXPECT_EQ(d.decoded_pieces[1].length, 2000u);
  expectPrefixesRejected(payload, [](std::string_view p) {
    WriteRequest x;
    return decode(p, DecodeLimits{}, &x);
  });
  // Asking for the copy's signal: only with a direct WRITE.
  for (const bool direct : {true, false}) {
    WriteRequest asking = m;
    asking.want_signal = true;
    asking.direct = direct;
    if (!direct) asking.pieces = {};
    std::vector<uint8_t> f;
    encode(asking, {}, &f);
    FrameHeader fh;
    WriteRequest x;
    const Status st = decode(payloadOf(f, &fh), DecodeLimits{}, &x);
    EXPECT_EQ(st.isOk(), direct) << st.toString();
    if (direct) {
      EXPECT_TRUE(x.want_signal);
    }
  }

  // Pieces that do not add up to the total, an empty or wrapping piece, more pieces than
  // descriptors allowed, or direct with inline data: malformed.
  auto rejected = [&](uint64_t total, std::vector<DirectPiece> bad, bool inline_data,
                      uint32_t max_descriptors) {
    WriteRequest w;
    w.xfer_id = 5;
    w.total = total;
    w.descs = descs;
    w.direct = true;
    w.pieces = bad;
    w.inline_data = inline_data;
    std::string bytes(inline_data ? total : 0, 'x');
    const std::vector<transport::IoSlice> data{{bytes.data(), bytes.size()}};
    std::vector<uint8_t> f;
    encode(w,
           inline_data ? std::span<const transport::IoSlice>(data)
                       : std::span<const transport::IoSlice>(),
           &f);
    FrameHeader fh;
    WriteRequest x;
    DecodeLimits limits;
    limits.max_descriptors = max_descriptors;
    return decode(payloadOf(f, &fh), limits, &x).code() == StatusCode::kProtocolError;
  };
  EXPECT_TRUE(rejected(6001, pieces, false, 100));
  EXPECT_TRUE(rejected(5999, pieces, false, 100));
  EXPECT_TRUE(rejected(4000, {{0x10000, 4000}, {0x20000, 0}}, false, 100));
  EXPECT_TRUE(rejected(10, {{UINT64_MAX - 4, 10}}, false, 100));
  EXPECT_TRUE(rejected(6000, pieces, false, 1));
  EXPECT_TRUE(rejected(6000, pieces, true, 100));
  EXPECT_TRUE(rejected(0, {}, false, 100));
  // The largest total a frame can carry waives nothing (found by fuzz_control_frames).
  EXPECT_TRUE(rejected(UINT64_MAX, pieces, false, 100));
  EXPECT_FALSE(rejected(6000, pieces, false, 2));

  ReadRequest r;
  r.xfer_id = 6;
  r.total = 6000;
  r.descs = descs;
  r.direct = true;
  r.accept_inline = false;
  frame.clear();
  encode(r, &frame);
  ReadRequest rd;
  ASSERT_TRUE(decode(payloadOf(frame, &h), DecodeLimits{}, &rd).isOk());
  EXPECT_TRUE(rd.direct);
  EXPECT_FALSE(rd.accept_inline);

  ReadResponse resp;
  resp.xfer_id = 6;
  resp.direct = true;
  resp.pieces = pieces;
  frame.clear();
  encode(resp, {}, &frame);
  payload = payloadOf(frame, &h);
  ReadResponse rr;
  ASSERT_TRUE(decode(payload, DecodeLimits{}, &rr).isOk());
  EXPECT_TRUE(rr.direct);
  ASSERT_EQ(rr.decoded_pieces.size(), 2u);
  EXPECT_EQ(rr.decoded_pieces[0].length, 4000u);
  expectPrefixesRejected(payload, [](std::string_view p) {
    ReadResponse x;
    return decode(p, DecodeLimits{}, &x);
  });
  // A refusal carries no pieces.
  resp.code = StatusCode::kRemoteRejected;
  frame.clear();
  encode(resp, {}, &frame);
  EXPECT_EQ(decode(payloadOf(frame, &h), DecodeLimits{}, &rr).code(), StatusCode::kProtocolError);

  frame.clear();
  encodeReadDone({6, StatusCode::kOk, ""}, &frame);
  payload = payloadOf(frame, &h);
  EXPECT_EQ(h.type, static_cast<uint8_t>(FrameType::kReadDone));
  EXPECT_STREQ(frameTypeName(h.type), "READ_DONE");
  Completion c;
  ASSERT_TRUE(decodeCompletion(payload, &c).isOk());
  EXPECT_EQ(c.xfer_id, 6u);
}

TEST(Frames, AStreamOnTheChannelsCarriesTheSpreadItsSenderChose) {
  std::vector<uint8_t> frame;
  FrameHeader h;
  // Encodes `m` (with `slices` inline) and decodes the frame into `*d`.
  auto again = [&](const auto& m, auto* d, std::span<const transport::IoSlice> slices = {}) {
    frame.clear();
    encode(m, slices, &frame);
    return decode(payloadOf(frame, &h), DecodeLimits{}, d);
  };
  WriteRequest wr;
  wr.xfer_id = 3;
  wr.total = 1 << 20;
  wr.first_chunk = 40;
  wr.spread = 2;
  WriteRequest wd;
  ASSERT_TRUE(again(wr, &wd).isOk());
  EXPECT_EQ(wd.spread, 2u);
  EXPECT_EQ(wd.first_chunk, 40u);

  ReadResponse rr;
  rr.xfer_id = 4;
  rr.first_chunk = 41;
  rr.spread = kMaxSpread;
  ReadResponse rd;
  ASSERT_TRUE(again(rr, &rd).isOk());
  EXPECT_EQ(rd.spread, kMaxSpread);

  SendData sd;
  sd.send_id = 5;
  sd.recv_id = 6;
  sd.spread = 1;
  SendData dd;
  ASSERT_TRUE(again(sd, &dd).isOk());
  EXPECT_EQ(dd.spread, 1u);

  // A stream on the channels without a usable spread (0 would divide the stream by zero), or
  // one past the bound, is malformed; so is a spread on an announcement without such a stream.
  auto rejected = [&](auto m, std::span<const transport::IoSlice> slices = {}) {
    decltype(m) d;
    return again(m, &d, slices).code() == StatusCode::kProtocolError;
  };
  for (uint32_t bad : {0U, kMaxSpread + 1}) {
    SCOPED_TRACE(bad);
    wr.spread = bad;
    EXPECT_TRUE(rejected(wr));
    rr.spread = bad;
    EXPECT_TRUE(rejected(rr));
    sd.spread = bad;
    EXPECT_TRUE(rejected(sd));
  }
  char byte = 'x';
  const transport::IoSlice one{&byte, 1};
  wr.total = 1;
  wr.inline_data = true;
  wr.spread = 1;
  EXPECT_TRUE(rejected(wr, std::span(&one, 1)));
  rr.inline_data = true;
  rr.spread = 1;
  EXPECT_TRUE(rejected(rr, std::span(&one, 1)));
  rr.inline_data = false;
  rr.code = StatusCode::kNotFound;  // a refusal announces nothing
  EXPECT_TRUE(rejected(rr));
  sd.code = StatusCode::kCanceled;
  sd.spread = 1;
  EXPECT_TRUE(rejected(sd));
  sd.spread = 0;
  EXPECT_FALSE(rejected(sd));
  sd.code = StatusCode::kOk;
  sd.inline_data = true;
  sd.spread = 1;
  EXPECT_TRUE(rejected(sd, std::span(&one, 1)));
  sd.spread = 0;
  EXPECT_FALSE(rejected(sd, std::span(&one, 1)));
  // Direct copies take no channel either.
  const std::vector<WireDesc> descs{{1, 0, 1}};
  const std::vector<DirectPiece> host_piece{{0x1000, 1, kHostPiece}};
  WriteRequest direct_write;
  direct_write.xfer_id = 7;
  direct_write.total = 1;
  direct_write.descs = descs;
  direct_write.direct = true;
  direct_write.pieces = host_piece;
  direct_write.spread = 1;
  EXPECT_TRUE(rejected(direct_write));
  direct_write.spread = 0;
  EXPECT_FALSE(rejected(direct_write));
  ReadResponse direct_read;
  direct_read.xfer_id = 8;
  direct_read.direct = true;
  direct_read.pieces = host_piece;
  direct_read.spread = 1;
  EXPECT_TRUE(rejected(direct_read));
  direct_read.spread = 0;
  EXPECT_FALSE(rejected(direct_read));
}

TEST(Frames, DirectPiecesOfGpuMemoryNameAHandleWhoseAllocationHoldsThem) {
  const std::vector<WireDesc> descs{{1, 0, 6000}};
  const IpcHandle alloc{std::string(kIpcHandleSize, 'h'), 0x100000, 0x10000, "0000:04:00.0"};
  auto decoded = [&](std::vector<DirectPiece> pieces, std::vector<IpcHandle> handles,
                     WriteRequest* out) {
    WriteRequest m;
    m.xfer_id = 9;
    m.total = 6000;
    m.descs = descs;
    m.direct = true;
    m.pieces = pieces;
    m.handles = handles;
    std::vector<uint8_t> frame;
    encode(m, {}, &frame);
    FrameHeader h;
    return decode(payloadOf(frame, &h), DecodeLimits{}, out);
  };
  WriteRequest d;
  ASSERT_TRUE(decoded({{0x100000, 4000, 0}, {0x10f000, 2000, 0}}, {alloc}, &d).isOk());
  ASSERT_EQ(d.decoded_handles.size(), 1u);
  EXPECT_EQ(d.decoded_handles[0].handle, alloc.handle);
  EXPECT_EQ(d.decoded_handles[0].base, alloc.base);
  EXPECT_EQ(d.decoded_handles[0].size, alloc.size);
  EXPECT_EQ(d.decoded_handles[0].bus_id, alloc.bus_id);
  EXPECT_EQ(d.decoded_pieces[1].handle, 0u);
  // A piece past its allocation's end, before its base, naming a handle that is not there,
  // host and GPU pieces mixed, handles with host pieces, a short handle: malformed.
  EXPECT_FALSE(decoded({{0x100000, 4000, 0}, {0x10fc00, 2000, 0}}, {alloc}, &d).isOk());
  EXPECT_FALSE(decoded({{0xff000, 4000, 0}, {0x100000, 2000, 0}}, {alloc}, &d).isOk());
  EXPECT_FALSE(decoded({{0x100000, 4000, 0}, {0x101000, 2000, 1}}, {alloc}, &d).isOk());
  EXPECT_FALSE(decoded({{0x100000, 4000, 0}, {0x5000, 2000, kHostPiece}}, {alloc}, &d).isOk());
  EXPECT_FALSE(decoded({{0x5000, 4000}, {0x9000, 2000}}, {alloc}, &d).isOk());
  IpcHandle short_handle = alloc;
  short_handle.handle.resize(10);
  EXPECT_FALSE(decoded({{0x100000, 6000, 0}}, {short_handle}, &d).isOk());

  for (FrameType type : {FrameType::kIpcClose, FrameType::kIpcClosed}) {
    std::vector<uint8_t> frame;
    encodeIpc(type, 0x7f0012340000, &frame);
    FrameHeader h;
    const std::string_view payload = payloadOf(frame, &h);
    EXPECT_EQ(h.type, static_cast<uint8_t>(type));
    uint64_t base = 0;
    ASSERT_TRUE(decodeIpc(payload, &base).isOk());
    EXPECT_EQ(base, 0x7f0012340000u);
    expectPrefixesRejected(payload, [](std::string_view p) {
      uint64_t x = 0;
      return decodeIpc(p, &x);
    });
  }

  // WRITE_QUEUED: its id and exactly one signal handle; a byte more or less is malformed.
  std::vector<uint8_t> frame;
  std::string signal(kSignalHandleSize, '\0');
  for (size_t i = 0; i < signal.size(); ++i) signal[i] = static_cast<char>(i * 7 + 3);
  encode(WriteQueued{42, signal}, &frame);
  FrameHeader h;
  const std::string_view payload = payloadOf(frame, &h);
  EXPECT_EQ(h.type, static_cast<uint8_t>(FrameType::kWriteQueued));
  WriteQueued queued;
  ASSERT_TRUE(decode(payload, &queued).isOk());
  EXPECT_EQ(queued.xfer_id, 42u);
  EXPECT_EQ(queued.signal, signal);
  expectPrefixesRejected(payload, [](std::string_view p) {
    WriteQueued x;
    return decode(p, &x);
  });
  const std::string longer = std::string(payload) + "x";
  EXPECT_FALSE(decode(longer, &queued).isOk());
}

// A gated READ_REQUEST carries the source as the initiator reads it (inside one allocation, the
// READ's total) and its gate (one word of one allocation, a value other than 0); any other shape
// is malformed.
TEST(Frames, GatedReadRequestsRoundTripAndRejectEveryOtherShape) {
  const std::vector<WireDesc> descs{{1, 0, 4000}, {2, 64, 2000}};
  const std::vector<DirectPiece> source{{0x200000, 4000, 0}, {0x201000, 2000, 0}};
  IpcHandle area{std::string(kIpcHandleSize, 's'), 0x200000, 0x200000, "0000:04:00.0"};
  IpcHandle gates{std::string(kIpcHandleSize, 'g'), 0x7f0000000000, 16384, "0000:04:00.0"};
  auto make = [&] {
    ReadRequest r;
    r.xfer_id = 9;
    r.total = 6000;
    r.accept_inline = false;
    r.direct = true;
    r.descs = descs;
    r.gated = true;
    r.gate_value = 77;
    r.gate_source = source;
    r.gate_source_area = area;
    r.gate_word = {0x7f0000000010, 4, 0};
    r.gate_area = gates;
    return r;
  };
  auto decoded = [](const ReadRequest& r, ReadRequest* out) {
    std::vector<uint8_t> frame;
    encode(r, &frame);
    FrameHeader h;
    return decode(payloadOf(frame, &h), DecodeLimits{}, out);
  };
  ReadRequest d;
  ASSERT_TRUE(decoded(make(), &d).isOk());
  EXPECT_TRUE(d.gated);
  EXPECT_EQ(d.gate_value, 77u);
  ASSERT_EQ(d.decoded_gate_source.size(), 2u);
  EXPECT_EQ(d.decoded_gate_source[1].addr, 0x201000u);
  EXPECT_EQ(d.decoded_gate_source[1].length, 2000u);
  EXPECT_EQ(d.gate_source_area.handle, area.handle);
  EXPECT_EQ(d.gate_source_area.base, area.base);
  EXPECT_EQ(d.gate_word.addr, 0x7f0000000010u);
  EXPECT_EQ(d.gate_area.handle, gates.handle);
  {
    std::vector<uint8_t> frame;
    encode(make(), &frame);
    FrameHeader h;
    expectPrefixesRejected(payloadOf(frame, &h), [](std::string_view p) {
      ReadRequest x;
      return decode(p, DecodeLimits{}, &x);
    });
  }
  ReadRequest bad = make();
  bad.direct = false;  // a gate without a direct READ
  EXPECT_EQ(decoded(bad, &d).code(), StatusCode::kProtocolError);
  bad = make();
  bad.gate_value = 0;
  EXPECT_EQ(decoded(bad, &d).code(), StatusCode::kProtocolError);
  bad = make();
  const std::vector<DirectPiece> short_source{{0x200000, 4000, 0}};  // not the READ's total
  bad.gate_source = short_source;
  EXPECT_EQ(decoded(bad, &d).code(), StatusCode::kProtocolError);
  bad = make();
  const std::vector<DirectPiece> outside{{0x200000, 4000, 0}, {0x3fff00, 2000, 0}};
  bad.gate_source = outside;  // past the end of the allocation
  EXPECT_EQ(decoded(bad, &d).code(), StatusCode::kProtocolError);
  bad = make();
  bad.gate_word = {0x7f0000000010, 8, 0};  // more than one word
  EXPECT_EQ(decoded(bad, &d).code(), StatusCode::kProtocolError);
  bad = make();
  bad.gate_word = {0x7f0000000010, 4, kHostPiece};  // not GPU memory
  EXPECT_EQ(decoded(bad, &d).code(), StatusCode::kProtocolError);
  bad = make();
  bad.gate_word = {0x7f0000000012, 4, 0};  // not a word's address
  EXPECT_EQ(decoded(bad, &d).code(), StatusCode::kProtocolError);
  bad = make();
  bad.gate_word = {0x7f0000004000, 4, 0};  // past the end of the gate area
  EXPECT_EQ(decoded(bad, &d).code(), StatusCode::kProtocolError);
}

TEST(Frames, DescriptorCountsAboveTheLimitOrBeyondThePayloadAreRejected) {
  std::vector<WireDesc> descs(10);
  ReadRequest m;
  m.xfer_id = 1;
  m.total = 10;
  m.descs = descs;
  std::vector<uint8_t> frame;
  encode(m, &frame);
  FrameHeader h;
  const std::string_view payload = payloadOf(frame, &h);
  DecodeLimits limits;
  limits.max_descriptors = 9;
  ReadRequest d;
  EXPECT_EQ(decode(payload, limits, &d).code(), StatusCode::kProtocolError);
  limits.max_descriptors = 10;
  EXPECT_TRUE(decode(payload, limits, &d).isOk());

  // A count that claims far more descriptors than bytes follow must fail before allocating.
  std::string forged(payload);
  const uint32_t huge = 0xFFFFFFF0;
  std::memcpy(forged.data() + 17, &huge, sizeof(huge));  // after id, total and flags
  limits.max_descriptors = UINT32_MAX;
  EXPECT_EQ(decode(forged, limits, &d).code(), StatusCode::kProtocolError);
}

TEST(Frames, InlineDataMustMatchTheAnnouncedTotal) {
  char data[3] = {'x', 'y', 'z'};
  const std::vector<transport::IoSlice> slices{{data, 3}};
  WriteRequest m;
  m.total = 4;  // one more than carried
  m.inline_data = true;
  std::vector<uint8_t> frame;
  encode(m, slices, &frame);
  FrameHeader h;
  WriteRequest d;
  EXPECT_EQ(decode(payloadOf(frame, &h), DecodeLimits{}, &d).code(), StatusCode::kProtocolError);
}

TEST(Frames, OversizedNotificationAndOversizedFrameAreRejected) {
  std::vector<uint8_t> frame;
  encodeNotification(std::string(100, 'n'), &frame);
  FrameHeader h;
  const std::string_view payload = payloadOf(frame, &h);
  DecodeLimits limits;
  limits.max_notification = 99;
  std::string_view msg;
  EXPECT_EQ(decodeNotification(payload, limits, &msg).code(), StatusCode::kProtocolError);
  limits.max_notification = 100;
  ASSERT_TRUE(decodeNotification(payload, limits, &msg).isOk());
  EXPECT_EQ(msg, std::string(100, 'n'));

  uint8_t header[kFrameHeaderSize] = {};
  const uint32_t len = 1000;
  std::memcpy(header, &len, sizeof(len));
  EXPECT_EQ(decodeHeader(header, 999, &h).code(), StatusCode::kProtocolError);
  EXPECT_TRUE(decodeHeader(header, 1000, &h).isOk());
}

TEST(Frames, CompletionReadResponseAndTwoSidedFramesRoundTrip) {
  std::vector<uint8_t> frame;
  encodeWriteDone({5, StatusCode::kOutOfRange, "outside"}, &frame);
  FrameHeader h;
  Completion c;
  ASSERT_TRUE(decodeCompletion(payloadOf(frame, &h), &c).isOk());
  EXPECT_EQ(c.xfer_id, 5u);
  EXPECT_EQ(c.code, StatusCode::kOutOfRange);
  EXPECT_EQ(c.message, "outside");

  frame.clear();
  ReadResponse r;
  r.xfer_id = 3;
  r.first_chunk = 12;
  r.spread = 8;
  encode(r, {}, &frame);
  ReadResponse rd;
  ASSERT_TRUE(decode(payloadOf(frame, &h), DecodeLimits{}, &rd).isOk());
  EXPECT_EQ(rd.first_chunk, 12u);
  EXPECT_EQ(rd.spread, 8u);
  EXPECT_FALSE(rd.inline_data);

  frame.clear();
  encode(SendRts{1, 2, 3}, &frame);
  SendRts rts;
  ASSERT_TRUE(decode(payloadOf(frame, &h), &rts).isOk());
  EXPECT_EQ(rts.tag, 2u);
  EXPECT_EQ(rts.size, 3u);

  frame.clear();
  encode(SendCts{1, 2, true, StatusCode::kLengthMismatch, "no"}, &frame);
  SendCts cts;
  ASSERT_TRUE(decode(payloadOf(frame, &h), &cts).isOk());
  EXPECT_EQ(cts.recv_id, 2u);
  EXPECT_EQ(cts.code, StatusCode::kLengthMismatch);

  // A status code the protocol does not define is malformed.
  frame.clear();
  encodeWriteDone({5, static_cast<StatusCode>(200), ""}, &frame);
  EXPECT_EQ(decodeCompletion(payloadOf(frame, &h), &c).code(), StatusCode::kProtocolError);
}

TEST(Frames, DataStatusNamesTheIdSpaceOfItsTransfer) {
  std::vector<uint8_t> frame;
  encodeDataStatus({9, StatusCode::kDeviceError, "copy failed", IdSpace::kSender}, &frame);
  FrameHeader h;
  Completion c;
  const std::string_view payload = payloadOf(frame, &h);
  ASSERT_TRUE(decodeDataStatus(payload, &c).isOk());
  EXPECT_EQ(c.xfer_id, 9u);
  EXPECT_EQ(c.id_space, IdSpace::kSender);
  EXPECT_EQ(c.code, StatusCode::kDeviceError);
  frame.clear();
  encodeDataStatus({9, StatusCode::kOk, "", IdSpace::kReceiver}, &frame);
  ASSERT_TRUE(decodeDataStatus(payloadOf(frame, &h), &c).isOk());
  EXPECT_EQ(c.id_space, IdSpace::kReceiver);
  expectPrefixesRejected(payloadOf(frame, &h), [](std::string_view p) {
    Completion x;
    return decodeDataStatus(p, &x);
  });
  // An id space the protocol does not define is malformed.
  std::string bad(payloadOf(frame, &h));
  bad[8] = 2;
  EXPECT_EQ(decodeDataStatus(bad, &c).code(), StatusCode::kProtocolError);
}

TEST(Frames, InlineDataNeverAnnouncesADataStatus) {
  char byte = 'x';
  const transport::IoSlice slice{&byte, 1};
  const std::vector<WireDesc> descs{{1, 0, 1}};
  WriteRequest w;
  w.xfer_id = 1;
  w.total = 1;
  w.descs = descs;
  w.inline_data = true;
  w.status_follows = true;
  std::vector<uint8_t> frame;
  encode(w, {&slice, 1}, &frame);
  FrameHeader h;
  WriteRequest wd;
  EXPECT_EQ(decode(payloadOf(frame, &h), DecodeLimits{}, &wd).code(), StatusCode::kProtocolError);
  ReadResponse r;
  r.inline_data = true;
  r.status_follows = true;
  frame.clear();
  encode(r, {&slice, 1}, &frame);
  ReadResponse rd;
  EXPECT_EQ(decode(payloadOf(frame, &h), DecodeLimits{}, &rd).code(), StatusCode::kProtocolError);
  SendData d;
  d.inline_data = true;
  d.status_follows = true;
  frame.clear();
  encode(d, {&slice, 1}, &frame);
  SendData dd;
  EXPECT_EQ(decode(payloadOf(frame, &h), DecodeLimits{}, &dd).code(), StatusCode::kProtocolError);
}

TEST(Frames, ChannelSetupNeedsBetweenOneAndMaxChannelsWholeHandles) {
  ChannelSetup m;
  m.handles.resize(3);
  std::memset(m.handles[1].bytes, 7, sizeof(m.handles[1].bytes));
  std::vector<uint8_t> frame;
  encode(m, &frame);
  FrameHeader h;
  const std::string_view payload = payloadOf(frame, &h);
  ChannelSetup d;
  ASSERT_TRUE(decode(payload, DecodeLimits{}, &d).isOk());
  ASSERT_EQ(d.handles.size(), 3u);
  EXPECT_EQ(d.handles[1].bytes[127], 7);
  DecodeLimits limits;
  limits.max_channels = 2;
  EXPECT_EQ(decode(payload, limits, &d).code(), StatusCode::kProtocolError);
  EXPECT_EQ(decode(payload.substr(0, payload.size() - 1), DecodeLimits{}, &d).code(),
            StatusCode::kProtocolError);
}

}  // namespace
}  // namespace tcpx::control
