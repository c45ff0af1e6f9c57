#include "control/frames.h"

#include <cstring>
#include <optional>

#include "common/byte_io.h"
#include "common/strings.h"

namespace tcpx::control {
namespace {

// Writes a frame header with a placeholder length, then patches the length on destruction.
class FrameBuilder {
 public:
  FrameBuilder(std::vector<uint8_t>* out, FrameType type) : w_(out), start_(out->size()) {
    w_.u32(0);
    w_.u8(kProtocolVersion);
    w_.u8(static_cast<uint8_t>(type));
    w_.u16(0);
  }
  ~FrameBuilder() {
    w_.patchU32(start_, static_cast<uint32_t>(w_.size() - start_ - kFrameHeaderSize));
  }
  FrameBuilder(const FrameBuilder&) = delete;
  FrameBuilder& operator=(const FrameBuilder&) = delete;
  ByteWriter& w() { return w_; }

 private:
  ByteWriter w_;
  size_t start_;
};

Status malformed(const char* what) {
  return Status(StatusCode::kProtocolError, strfmt("malformed %s frame", what));
}

Status finish(const ByteReader& r, const char* what) {
  if (!r.done()) return malformed(what);
  return {};
}

void writeDescs(ByteWriter& w, std::span<const WireDesc> descs) {
  w.u32(static_cast<uint32_t>(descs.size()));
  for (const WireDesc& d : descs) {
    w.u64(d.mem);
    w.u64(d.offset);
    w.u64(d.length);
  }
}

// Reads a descriptor list, rejecting counts above the limit or beyond the bytes present before
// reserving memory for them.
bool readDescs(ByteReader& r, uint32_t max_descriptors, std::vector<WireDesc>* out) {
  const uint32_t n = r.u32();
  if (!r.ok() || n > max_descriptors || static_cast<size_t>(n) * kWireDescSize > r.remaining()) {
    return false;
  }
  out->resize(n);
  for (WireDesc& d : *out) {
    d.mem = r.u64();
    d.offset = r.u64();
    d.length = r.u64();
  }
  return r.ok();
}

void writeInline(ByteWriter& w, std::span<const transport::IoSlice> slices) {
  uint64_t total = 0;
  for (const auto& s : slices) total += s.size;
  w.u32(static_cast<uint32_t>(total));
  for (const auto& s : slices) w.bytes(s.data, s.size);
}

void writeSettings(ByteWriter& w, const WireSettings& s) {
  w.u32(s.channels);
  w.u64(s.chunk_size);
  w.u32(s.max_descriptors);
  w.u64(s.max_notification);
  w.u32(s.peer_timeout_ms);
}

// Ranges are checked where the settings are agreed on (control/negotiation.h).
void readSettings(ByteReader& r, WireSettings* s) {
  s->channels = r.u32();
  s->chunk_size = r.u64();
  s->max_descriptors = r.u32();
  s->max_notification = r.u64();
  s->peer_timeout_ms = r.u32();
}

void writeOffer(ByteWriter& w, const DirectOffer& o) {
  w.u32(o.pid);
  w.u64(o.cookie_addr);
  w.str(o.cookie);
}

// An offer names a process and carries its cookie, or is all zero.
bool readOffer(ByteReader& r, DirectOffer* o) {
  o->pid = r.u32();
  o->cookie_addr = r.u64();
  o->cookie = r.str(kNonceSize);
  if (o->pid == 0) return o->cookie_addr == 0 && o->cookie.empty();
  return o->cookie.size() == kNonceSize && o->cookie_addr != 0;
}

void writePieces(ByteWriter& w, std::span<const DirectPiece> pieces,
                 std::span<const IpcHandle> handles) {
  w.u32(static_cast<uint32_t>(pieces.size()));
  for (const DirectPiece& p : pieces) {
    w.u64(p.addr);
    w.u64(p.length);
    w.u32(p.handle);
  }
  w.u32(static_cast<uint32_t>(handles.size()));
  for (const IpcHandle& h : handles) {
    w.str(h.handle);
    w.u64(h.base);
    w.u64(h.size);
    w.str(h.bus_id);
  }
}

// Reads a direct piece list and its handles: at most `max_pieces` non-empty ranges that do not
// wrap around, add up to exactly `total` (nullopt: a total the frame does not carry, checked by
// the caller; the sum must then only not wrap), and are all host memory or all inside the
// allocation of a handle of the list (no more handles than pieces). The two cases are kept
// apart by the type: no value a peer puts on the wire can waive the sum.
bool readPieces(ByteReader& r, uint32_t max_pieces, std::optional<uint64_t> expected_total,
                std::vector<DirectPiece>* out, std::vector<IpcHandle>* handles) {
  const uint64_t total = expected_total.value_or(UINT64_MAX);
  const uint32_t n = r.u32();
  if (!r.ok() || n == 0 || n > max_pieces ||
      static_cast<size_t>(n) * kDirectPieceSize > r.remaining()) {
    return false;
  }
  out->resize(n);
  uint64_t sum = 0;
  for (DirectPiece& p : *out) {
    p.addr = r.u64();
    p.length = r.u64();
    p.handle = r.u32();
    if (p.length == 0 || p.addr + p.length < p.addr || p.length > total - sum) return false;
    sum += p.length;
  }
  const uint32_t count = r.u32();
  if (!r.ok() || count > n) return false;
  handles->resize(count);
  for (IpcHandle& h : *handles) {
    h.handle = r.str(kIpcHandleSize);
    h.base = r.u64();
    h.size = r.u64();
    h.bus_id = r.str(kMaxBusIdLength);
    if (!r.ok() || h.handle.size() != kIpcHandleSize || h.base + h.size < h.base) return false;
  }
  const bool host = out->front().handle == kHostPiece;
  if (host && count != 0) return false;
  for (const DirectPiece& p : *out) {
    if ((p.handle == kHostPiece) != host) return false;
    if (host) continue;
    if (p.handle >= count) return false;
    const IpcHandle& h = (*handles)[p.handle];
    if (p.addr < h.base || p.addr + p.length > h.base + h.size) return false;
  }
  return !expected_total || sum == *expected_total;
}

bool validCode(uint8_t code) {
  return code <= static_cast<uint8_t>(StatusCode::kDeviceError);
}

// A stream on the channels needs a spread the chunk rule can use (0 would divide by zero); an
// announcement without one carries 0.
bool validSpread(uint32_t spread, bool on_channels) {
  return on_channels ? spread >= 1 && spread <= kMaxSpread : spread == 0;
}

}  // namespace

const char* frameTypeName(uint8_t type) {
  switch (static_cast<FrameType>(type)) {
    case FrameType::kHello:
      return "HELLO";
    case FrameType::kHelloAck:
      return "HELLO_ACK";
    case FrameType::kPing:
      return "PING";
    case FrameType::kChannelSetup:
      return "CHANNEL_SETUP";
    case FrameType::kWriteRequest:
      return "WRITE_REQUEST";
    case FrameType::kWriteDone:
      return "WRITE_DONE";
    case FrameType::kReadRequest:
      return "READ_REQUEST";
    case FrameType::kReadResponse:
      return "READ_RESPONSE";
    case FrameType::kNotification:
      return "NOTIFICATION";
    case FrameType::kCancel:
      return "CANCEL";
    case FrameType::kSendRts:
      return "SEND_RTS";
    case FrameType::kSendCts:
      return "SEND_CTS";
    case FrameType::kSendData:
      return "SEND_DATA";
    case FrameType::kSendDone:
      return "SEND_DONE";
    case FrameType::kGoodbye:
      return "GOODBYE";
    case FrameType::kDataStatus:
      return "DATA_STATUS";
    case FrameType::kAuthChallenge:
      return "AUTH_CHALLENGE";
    case FrameType::kAuthProof:
      return "AUTH_PROOF";
    case FrameType::kReadDone:
      return "READ_DONE";
    case FrameType::kIpcClose:
      return "IPC_CLOSE";
    case FrameType::kIpcClosed:
      return "IPC_CLOSED";
    case FrameType::kWriteQueued:
      return "WRITE_QUEUED";
  }
  return "UNKNOWN";
}

Status decodeHeader(const uint8_t* bytes, uint32_t max_payload, FrameHeader* out) {
  ByteReader r(bytes, kFrameHeaderSize);
  out->length = r.u32();
  out->version = r.u8();
  out->type = r.u8();
  out->flags = r.u16();
  if (out->length > max_payload || out->length > kMaxFramePayload) {
    return Status(StatusCode::kProtocolError,
                  strfmt("frame of %u bytes exceeds the limit of %u", out->length,
                         std::min(max_payload, kMaxFramePayload)));
  }
  return {};
}

// ---- HELLO / HELLO_ACK ----

void encode(const Hello& m, std::vector<uint8_t>* out) {
  FrameBuilder f(out, FrameType::kHello);
  f.w().u32(m.magic);
  f.w().str(m.uuid);
  f.w().str(m.name);
  f.w().str(m.conn_info);
  f.w().str(m.transport);
  writeSettings(f.w(), m.settings);
  f.w().str(m.nonce);
  writeOffer(f.w(), m.direct);
}

Status decode(std::string_view payload, Hello* m) {
  ByteReader r(payload);
  m->magic = r.u32();
  m->uuid = r.str(16);
  m->name = r.str(kMaxNameLength);
  m->conn_info = r.str(1024);
  m->transport = r.str(64);
  readSettings(r, &m->settings);
  m->nonce = r.str(kNonceSize);
  const bool offer = readOffer(r, &m->direct);
  if (!r.done() || !offer || m->magic != kHelloMagic || m->uuid.size() != 16 ||
      m->nonce.size() != kNonceSize) {
    return malformed("HELLO");
  }
  return {};
}

void encode(const AuthChallenge& m, std::vector<uint8_t>* out) {
  FrameBuilder f(out, FrameType::kAuthChallenge);
  f.w().str(m.nonce);
  f.w().str(m.proof);
}

Status decode(std::string_view payload, AuthChallenge* m) {
  ByteReader r(payload);
  m->nonce = r.str(kNonceSize);
  m->proof = r.str(kProofSize);
  if (!r.done() || m->nonce.size() != kNonceSize || m->proof.size() != kProofSize) {
    return malformed("AUTH_CHALLENGE");
  }
  return {};
}

void encodeAuthProof(std::string_view proof, std::vector<uint8_t>* out) {
  FrameBuilder f(out, FrameType::kAuthProof);
  f.w().str(proof);
}

Status decodeAuthProof(std::string_view payload, std::string* proof) {
  ByteReader r(payload);
  *proof = r.str(kProofSize);
  if (!r.done() || proof->size() != kProofSize) return malformed("AUTH_PROOF");
  return {};
}

void encode(const HelloAck& m, std::vector<uint8_t>* out) {
  FrameBuilder f(out, FrameType::kHelloAck);
  f.w().u8(static_cast<uint8_t>(m.result));
  f.w().str(m.uuid);
  f.w().str(m.name);
  writeSettings(f.w(), m.settings);
  f.w().str(m.reason.substr(0, kMaxReasonLength));
  writeOffer(f.w(), m.direct);
}

Status decode(std::string_view payload, HelloAck* m) {
  ByteReader r(payload);
  const uint8_t result = r.u8();
  m->uuid = r.str(16);
  m->name = r.str(kMaxNameLength);
  readSettings(r, &m->settings);
  m->reason = r.str(kMaxReasonLength);
  const bool offer = readOffer(r, &m->direct);
  if (!r.done() || !offer || result > static_cast<uint8_t>(HelloResult::kRefused)) {
    return malformed("HELLO_ACK");
  }
  m->result = static_cast<HelloResult>(result);
  if (m->result == HelloResult::kAccepted && m->uuid.size() != 16) return malformed("HELLO_ACK");
  return {};
}

void encodePing(std::vector<uint8_t>* out) {
  FrameBuilder f(out, FrameType::kPing);
}

void encodeGoodbye(std::string_view reason, std::vector<uint8_t>* out) {
  FrameBuilder f(out, FrameType::kGoodbye);
  f.w().str(reason.substr(0, kMaxReasonLength));
}

Status decodeGoodbye(std::string_view payload, std::string_view* reason) {
  ByteReader r(payload);
  *reason = r.str(kMaxReasonLength);
  return finish(r, "GOODBYE");
}

// ---- CHANNEL_SETUP ----

void encode(const ChannelSetup& m, std::vector<uint8_t>* out) {
  FrameBuilder f(out, FrameType::kChannelSetup);
  f.w().u32(static_cast<uint32_t>(m.handles.size()));
  for (const auto& h : m.handles) f.w().bytes(h.bytes, sizeof(h.bytes));
}

Status decode(std::string_view payload, const DecodeLimits& limits, ChannelSetup* m) {
  ByteReader r(payload);
  const uint32_t n = r.u32();
  if (!r.ok() || n == 0 || n > limits.max_channels ||
      static_cast<size_t>(n) * transport::kConnectHandleSize != r.remaining()) {
    return malformed("CHANNEL_SETUP");
  }
  m->handles.resize(n);
  for (auto& h : m->handles) {
    const std::string_view bytes = r.bytes(sizeof(h.bytes));
    std::memcpy(h.bytes, bytes.data(), bytes.size());
  }
  return finish(r, "CHANNEL_SETUP");
}

// ---- WRITE ----

void encode(const WriteRequest& m, std::span<const transport::IoSlice> inline_slices,
            std::vector<uint8_t>* out) {
  FrameBuilder f(out, FrameType::kWriteRequest);
  f.w().u64(m.xfer_id);
  f.w().u64(m.total);
  f.w().u64(m.first_chunk);
  f.w().u8(static_cast<uint8_t>(m.spread));
  f.w().u8(static_cast<uint8_t>((m.has_notification ? 1 : 0) | (m.inline_data ? 2 : 0) |
                                (m.status_follows ? 4 : 0) | (m.direct ? 8 : 0) |
                                (m.want_signal ? 16 : 0)));
  if (m.has_notification) f.w().str(m.notification);
  writeDescs(f.w(), m.descs);
  if (m.inline_data) writeInline(f.w(), inline_slices);
  if (m.direct) writePieces(f.w(), m.pieces, m.handles);
}

Status decode(std::string_view payload, const DecodeLimits& limits, WriteRequest* m) {
  ByteReader r(payload);
  m->xfer_id = r.u64();
  m->total = r.u64();
  m->first_chunk = r.u64();
  m->spread = r.u8();
  const uint8_t flags = r.u8();
  if (!r.ok() || (flags & ~31U) != 0) return malformed("WRITE_REQUEST");
  m->has_notification = (flags & 1U) != 0;
  m->inline_data = (flags & 2U) != 0;
  m->status_follows = (flags & 4U) != 0;
  m->direct = (flags & 8U) != 0;
  m->want_signal = (flags & 16U) != 0;
  if (m->want_signal && !m->direct) return malformed("WRITE_REQUEST");
  // Inline bytes are the data itself: no DATA_STATUS can follow them; a direct WRITE has neither.
  if ((m->inline_data && m->status_follows) ||
      (m->direct && (m->inline_data || m->status_follows)) ||
      !validSpread(m->spread, !m->inline_data && !m->direct)) {
    return malformed("WRITE_REQUEST");
  }
  if (m->has_notification) m->notification = r.str(limits.max_notification);
  if (!readDescs(r, limits.max_descriptors, &m->decoded)) return malformed("WRITE_REQUEST");
  if (m->inline_data) {
    m->data = r.str(limits.max_inline);
    if (r.ok() && m->data.size() != m->total) return malformed("WRITE_REQUEST");
  }
  if (m->direct &&
      !readPieces(r, limits.max_descriptors, m->total, &m->decoded_pieces, &m->decoded_handles)) {
    return malformed("WRITE_REQUEST");
  }
  return finish(r, "WRITE_REQUEST");
}

namespace {
void encodeCompletion(FrameType type, const Completion& m, std::vector<uint8_t>* out) {
  FrameBuilder f(out, type);
  f.w().u64(m.xfer_id);
  f.w().u8(static_cast<uint8_t>(m.code));
  f.w().str(std::string_view(m.message).substr(0, kMaxReasonLength));
}
}  // namespace

void encodeWriteDone(const Completion& m, std::vector<uint8_t>* out) {
  encodeCompletion(FrameType::kWriteDone, m, out);
}

void encodeSendDone(const Completion& m, std::vector<uint8_t>* out) {
  encodeCompletion(FrameType::kSendDone, m, out);
}

void encodeReadDone(const Completion& m, std::vector<uint8_t>* out) {
  encodeCompletion(FrameType::kReadDone, m, out);
}

void encodeIpc(FrameType type, uint64_t base, std::vector<uint8_t>* out) {
  FrameBuilder f(out, type);
  f.w().u64(base);
}

Status decodeIpc(std::string_view payload, uint64_t* base) {
  ByteReader r(payload);
  *base = r.u64();
  return finish(r, "IPC_CLOSE");
}

void encode(const WriteQueued& m, std::vector<uint8_t>* out) {
  FrameBuilder f(out, FrameType::kWriteQueued);
  f.w().u64(m.xfer_id);
  f.w().bytes(m.signal.data(), m.signal.size());
}

Status decode(std::string_view payload, WriteQueued* m) {
  ByteReader r(payload);
  m->xfer_id = r.u64();
  m->signal = std::string(r.bytes(kSignalHandleSize));
  return finish(r, "WRITE_QUEUED");
}

void encodeDataStatus(const Completion& m, std::vector<uint8_t>* out) {
  FrameBuilder f(out, FrameType::kDataStatus);
  f.w().u64(m.xfer_id);
  f.w().u8(static_cast<uint8_t>(m.id_space));
  f.w().u8(static_cast<uint8_t>(m.code));
  f.w().str(std::string_view(m.message).substr(0, kMaxReasonLength));
}

Status decodeCompletion(std::string_view payload, Completion* m) {
  ByteReader r(payload);
  m->xfer_id = r.u64();
  const uint8_t code = r.u8();
  m->message = r.str(kMaxReasonLength);
  if (!r.done() || !validCode(code)) return malformed("completion");
  m->code = static_cast<StatusCode>(code);
  return {};
}

Status decodeDataStatus(std::string_view payload, Completion* m) {
  ByteReader r(payload);
  m->xfer_id = r.u64();
  const uint8_t space = r.u8();
  const uint8_t code = r.u8();
  m->message = r.str(kMaxReasonLength);
  if (!r.done() || !validCode(code) || space > static_cast<uint8_t>(IdSpace::kReceiver)) {
    return malformed("DATA_STATUS");
  }
  m->id_space = static_cast<IdSpace>(space);
  m->code = static_cast<StatusCode>(code);
  return {};
}

// ---- READ ----

void encode(const ReadRequest& m, std::vector<uint8_t>* out) {
  FrameBuilder f(out, FrameType::kReadRequest);
  f.w().u64(m.xfer_id);
  f.w().u64(m.total);
  f.w().u8(
      static_cast<uint8_t>((m.accept_inline ? 1 : 0) | (m.direct ? 2 : 0) | (m.gated ? 4 : 0)));
  writeDescs(f.w(), m.descs);
  if (!m.gated) return;
  f.w().u32(m.gate_value);
  writePieces(f.w(), m.gate_source, std::span<const IpcHandle>(&m.gate_source_area, 1));
  writePieces(f.w(), std::span<const DirectPiece>(&m.gate_word, 1),
              std::span<const IpcHandle>(&m.gate_area, 1));
}

Status decode(std::string_view payload, const DecodeLimits& limits, ReadRequest* m) {
  ByteReader r(payload);
  m->xfer_id = r.u64();
  m->total = r.u64();
  const uint8_t flags = r.u8();
  if (!r.ok() || flags > 7) return malformed("READ_REQUEST");
  m->accept_inline = (flags & 1U) != 0;
  m->direct = (flags & 2U) != 0;
  m->gated = (flags & 4U) != 0;
  if (m->gated && !m->direct) return malformed("READ_REQUEST");
  if (!readDescs(r, limits.max_descriptors, &m->decoded)) return malformed("READ_REQUEST");
  if (m->gated) {
    m->gate_value = r.u32();
    std::vector<IpcHandle> source_area;
    std::vector<DirectPiece> word;
    std::vector<IpcHandle> area;
    // GPU memory inside the one allocation each list names: the source, `total` bytes; the
    // gate, one word.
    if (!r.ok() || m->gate_value == 0 ||
        !readPieces(r, limits.max_descriptors, m->total, &m->decoded_gate_source, &source_area) ||
        source_area.size() != 1 || m->decoded_gate_source.front().handle != 0 ||
        !readPieces(r, 1, sizeof(uint32_t), &word, &area) || area.size() != 1 ||
        word.front().handle != 0 || word.front().addr % sizeof(uint32_t) != 0) {
      return malformed("READ_REQUEST");
    }
    m->gate_source_area = std::move(source_area.front());
    m->gate_word = word.front();
    m->gate_area = std::move(area.front());
  }
  return finish(r, "READ_REQUEST");
}

void encode(const ReadResponse& m, std::span<const transport::IoSlice> inline_slices,
            std::vector<uint8_t>* out) {
  FrameBuilder f(out, FrameType::kReadResponse);
  f.w().u64(m.xfer_id);
  f.w().u8(static_cast<uint8_t>(m.code));
  f.w().str(std::string_view(m.message).substr(0, kMaxReasonLength));
  f.w().u64(m.first_chunk);
  f.w().u8(static_cast<uint8_t>(m.spread));
  f.w().u8(static_cast<uint8_t>((m.inline_data ? 1 : 0) | (m.status_follows ? 2 : 0) |
                                (m.direct ? 4 : 0)));
  if (m.inline_data) writeInline(f.w(), inline_slices);
  if (m.direct) writePieces(f.w(), m.pieces, m.handles);
}

Status decode(std::string_view payload, const DecodeLimits& limits, ReadResponse* m) {
  ByteReader r(payload);
  m->xfer_id = r.u64();
  const uint8_t code = r.u8();
  m->message = r.str(kMaxReasonLength);
  m->first_chunk = r.u64();
  m->spread = r.u8();
  const uint8_t flags = r.u8();
  // At most one of inline data, a status to follow and direct pieces; only an answer that
  // accepts the READ carries any of them.
  if (!r.ok() || !validCode(code) || (flags != 0 && flags != 1 && flags != 2 && flags != 4) ||
      (flags != 0 && code != static_cast<uint8_t>(StatusCode::kOk))) {
    return malformed("READ_RESPONSE");
  }
  m->code = static_cast<StatusCode>(code);
  m->inline_data = (flags & 1U) != 0;
  m->status_follows = (flags & 2U) != 0;
  m->direct = (flags & 4U) != 0;
  if (!validSpread(m->spread, m->code == StatusCode::kOk && !m->inline_data && !m->direct)) {
    return malformed("READ_RESPONSE");
  }
  if (m->inline_data) m->data = r.str(limits.max_inline);
  // The total is the READ's, which the decoder does not know: the initiator checks the sum.
  if (m->direct && !readPieces(r, limits.max_descriptors, std::nullopt, &m->decoded_pieces,
                               &m->decoded_handles)) {
    return malformed("READ_RESPONSE");
  }
  return finish(r, "READ_RESPONSE");
}

// ---- Notifications and cancel ----

void encodeNotification(std::string_view message, std::vector<uint8_t>* out) {
  FrameBuilder f(out, FrameType::kNotification);
  f.w().str(message);
}

Status decodeNotification(std::string_view payload, const DecodeLimits& limits,
                          std::string_view* message) {
  ByteReader r(payload);
  *message = r.str(limits.max_notification);
  return finish(r, "NOTIFICATION");
}

void encode(const Cancel& m, std::vector<uint8_t>* out) {
  FrameBuilder f(out, FrameType::kCancel);
  f.w().u64(m.xfer_id);
}

Status decode(std::string_view payload, Cancel* m) {
  ByteReader r(payload);
  m->xfer_id = r.u64();
  return finish(r, "CANCEL");
}

// ---- Two-sided ----

void encode(const SendRts& m, std::vector<uint8_t>* out) {
  FrameBuilder f(out, FrameType::kSendRts);
  f.w().u64(m.send_id);
  f.w().u64(m.tag);
  f.w().u64(m.size);
}

Status decode(std::string_view payload, SendRts* m) {
  ByteReader r(payload);
  m->send_id = r.u64();
  m->tag = r.u64();
  m->size = r.u64();
  return finish(r, "SEND_RTS");
}

void encode(const SendCts& m, std::vector<uint8_t>* out) {
  FrameBuilder f(out, FrameType::kSendCts);
  f.w().u64(m.send_id);
  f.w().u64(m.recv_id);
  f.w().u8(m.accept_inline ? 1 : 0);
  f.w().u8(static_cast<uint8_t>(m.code));
  f.w().str(std::string_view(m.message).substr(0, kMaxReasonLength));
}

Status decode(std::string_view payload, SendCts* m) {
  ByteReader r(payload);
  m->send_id = r.u64();
  m->recv_id = r.u64();
  const uint8_t flags = r.u8();
  const uint8_t code = r.u8();
  m->message = r.str(kMaxReasonLength);
  if (!r.done() || !validCode(code) || flags > 1) return malformed("SEND_CTS");
  m->accept_inline = flags == 1;
  m->code = static_cast<StatusCode>(code);
  return {};
}

void encode(const SendData& m, std::span<const transport::IoSlice> inline_slices,
            std::vector<uint8_t>* out) {
  FrameBuilder f(out, FrameType::kSendData);
  f.w().u64(m.send_id);
  f.w().u64(m.recv_id);
  f.w().u8(static_cast<uint8_t>(m.code));
  f.w().u64(m.first_chunk);
  f.w().u8(static_cast<uint8_t>(m.spread));
  f.w().u8(static_cast<uint8_t>((m.inline_data ? 1 : 0) | (m.status_follows ? 2 : 0)));
  if (m.inline_data) writeInline(f.w(), inline_slices);
}

Status decode(std::string_view payload, const DecodeLimits& limits, SendData* m) {
  ByteReader r(payload);
  m->send_id = r.u64();
  m->recv_id = r.u64();
  const uint8_t code = r.u8();
  m->first_chunk = r.u64();
  m->spread = r.u8();
  const uint8_t flags = r.u8();
  if (!r.ok() || !validCode(code) || flags > 2) return malformed("SEND_DATA");
  m->code = static_cast<StatusCode>(code);
  m->inline_data = (flags & 1U) != 0;
  m->status_follows = (flags & 2U) != 0;
  if (!validSpread(m->spread, m->code == StatusCode::kOk && !m->inline_data)) {
    return malformed("SEND_DATA");
  }
  if (m->inline_data) m->data = r.str(limits.max_inline);
  return finish(r, "SEND_DATA");
}

}  // namespace tcpx::control
