// Control-plane wire format: the one definition of every frame exchanged between two engines.
//
// A frame is an 8-byte header followed by `length` payload bytes, all little-endian:
//   u32 length | u8 version | u8 type | u16 flags (0)
// The connection starts with HELLO (connector) and HELLO_ACK (acceptor); every later frame must
// carry the negotiated version. Decoders never trust the peer: every count and length is checked
// against the bytes present and the receiver's limits before anything is allocated or copied.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <tcpx_p2p/status.h>

#include "transport/transport.h"

namespace tcpx::control {

// Version 2 added the HELLO nonce and the AUTH_CHALLENGE / AUTH_PROOF exchange; version 3 the
// limits each side announces in the handshake (WireSettings) and DATA_STATUS's id space; version
// 4 direct copies between processes of one host (DirectOffer, direct requests, READ_DONE); version
// 5 WRITE_QUEUED; version 6 gated READs (READ_REQUEST's gate); version 7 the spread of a stream
// announced on the channels, chosen by its sender.
constexpr uint8_t kProtocolVersion = 7;
constexpr size_t kFrameHeaderSize = 8;
// Hard cap on one frame's payload; the decoder limits below are tighter per field.
constexpr uint32_t kMaxFramePayload = 64U << 20;
constexpr uint32_t kHelloMagic = 0x58504354;  // "TCPX"
constexpr size_t kMaxNameLength = 256;
constexpr size_t kMaxReasonLength = 4096;
// A stream announced on the data channels (WRITE_REQUEST, READ_RESPONSE, SEND_DATA) carries its
// spread: the sender's choice of how many chunks at least it is cut into when it is small enough
// (ChunkPlan::chunkSizeFor), 1..kMaxSpread; 0 in an announcement whose data does not take the
// channels (inline, direct, refused).
constexpr uint32_t kMaxSpread = 64;

// Transfer ids: each engine numbers the operations it starts from one counter, and assigns an
// operation's id when the frame that announces it (WRITE_REQUEST, READ_REQUEST, SEND_RTS) is
// encoded, so the ids one engine announces to another strictly increase. Each frame's id fields
// belong to a fixed id space, noted below as "sender's" (the engine that sends this frame
// started the operation) or "receiver's"; DATA_STATUS, which serves both, says which.
enum class FrameType : uint8_t {
  kHello = 1,           // connector -> acceptor: identity and parameters
  kHelloAck = 2,        // acceptor -> connector: accepted, duplicate, or refused
  kPing = 3,            // keepalive; any frame counts as a sign of life
  kChannelSetup = 4,    // transport listen handles, one per channel, for the peer to connect to
  kWriteRequest = 5,    // initiator announces a WRITE (and its data on initiator->target
                        // channels); id: sender's, new
  kWriteDone = 6,       // target: data in place (or refused/canceled); id: receiver's
  kReadRequest = 7,     // initiator asks for a READ; id: sender's, new
  kReadResponse = 8,    // target accepts (and announces data on target->initiator) or refuses;
                        // id: receiver's
  kNotification = 9,    // a message for the peer's notification list
  kCancel = 10,         // initiator released an in-flight WRITE or send; id: sender's
  kSendRts = 11,        // two-sided: sender has `size` bytes for `tag`; id: sender's, new
  kSendCts = 12,        // receiver matched a recv (or refuses); send id: receiver's, recv id:
                        // sender's
  kSendData = 13,       // sender announces the data of a matched send; send id: sender's, recv
                        // id: receiver's
  kSendDone = 14,       // receiver: data in place; id: receiver's (the send)
  kGoodbye = 15,        // orderly close
  kDataStatus = 16,     // the data sender's verdict on a stream announced with status_follows:
                        // OK, or why its source could not be read (its bytes were filler); id:
                        // the frame names its space (IdSpace)
  kAuthChallenge = 17,  // acceptor with a shared secret: its nonce and its proof of the secret
  kAuthProof = 18,      // connector: its proof of the secret, answering the challenge
  kReadDone = 19,       // initiator of a direct READ: it has read the target's memory (or gave
                        // up), the target may let it go; id: sender's
  kIpcClose = 20,       // an allocation shared by CUDA IPC is going: unmap it (by its base)
  kIpcClosed = 21,      // ... it is unmapped: the sender may free it
  kWriteQueued = 22,    // target of a direct WRITE that asked for it (want_signal): the copy
                        // is queued on a GPU, and a signal the initiator may poll is reached
                        // once it has landed; WRITE_DONE still follows; id: receiver's
};
const char* frameTypeName(uint8_t type);

struct FrameHeader {
  uint32_t length = 0;
  uint8_t version = 0;
  uint8_t type = 0;
  uint16_t flags = 0;
};

// Decodes a header; fails if the length exceeds `max_payload`.
Status decodeHeader(const uint8_t* bytes, uint32_t max_payload, FrameHeader* out);

// Limits the receiver applies while decoding.
struct DecodeLimits {
  uint32_t max_descriptors = 65536;
  uint64_t max_notification = 64ULL * 1024;
  uint64_t max_inline = 64ULL * 1024;
  uint32_t max_channels = 32;
};

struct WireDesc {
  uint64_t mem = 0;
  uint64_t offset = 0;
  uint64_t length = 0;
};
constexpr size_t kWireDescSize = 24;

// Each engine's own values of the settings the two must agree on, exchanged in HELLO and
// HELLO_ACK; control/negotiation.h holds the rule that turns both into what the connection uses.
struct WireSettings {
  uint32_t channels = 0;
  uint64_t chunk_size = 0;
  uint32_t max_descriptors = 0;   // most descriptors this engine accepts in one request
  uint64_t max_notification = 0;  // largest notification this engine accepts, in bytes
  uint32_t peer_timeout_ms = 0;   // this engine declares a peer silent this long disconnected
};

// Direct copies between the processes of two engines on one host (same_host_copy): each side
// offers its process in the handshake, and proves the pid names it with a cookie the other reads
// back from its memory. pid 0: no offer.
struct DirectOffer {
  uint32_t pid = 0;
  uint64_t cookie_addr = 0;  // where `cookie` lies in the offering process
  std::string cookie;        // kNonceSize bytes with an offer, empty without
};

// A GPU allocation the frame's sender shares by CUDA IPC (gpu::IpcExport on the wire): the
// receiver maps it once per connection and reads ranges of it.
struct IpcHandle {
  std::string handle;  // kIpcHandleSize opaque bytes
  uint64_t base = 0;   // the allocation in the sender's process
  uint64_t size = 0;
  std::string bus_id;  // its GPU's PCI bus id, at most kMaxBusIdLength characters
};
constexpr size_t kIpcHandleSize = 64;
constexpr size_t kMaxBusIdLength = 32;

// A range of the frame sender's own memory that the receiver reads directly (a direct WRITE's
// source, a direct READ's source on the target): host memory (by cross-memory attach), or GPU
// memory inside the allocation `handle` indexes in the frame's IpcHandle list. A frame's pieces
// are all host memory or all GPU memory.
constexpr uint32_t kHostPiece = UINT32_MAX;
struct DirectPiece {
  uint64_t addr = 0;
  uint64_t length = 0;
  uint32_t handle = kHostPiece;
};
constexpr size_t kDirectPieceSize = 20;

struct Hello {
  uint32_t magic = kHelloMagic;
  std::string uuid;  // 16 raw bytes
  std::string name;
  std::string conn_info;  // the connector's own connection-info blob (so the acceptor can reach it)
  std::string transport;  // transport name; both ends must use the same
  WireSettings settings;
  std::string nonce;  // 16 random bytes, fresh per connection (peer authentication)
  DirectOffer direct;
};

// Peer authentication (both sides configured with the same secret): HMAC-SHA256 proofs over
// both nonces, never the secret itself.
constexpr size_t kNonceSize = 16;
constexpr size_t kProofSize = 32;
struct AuthChallenge {
  std::string nonce;  // the acceptor's nonce
  std::string
      proof;  // HMAC(secret, "acceptor" | connector nonce | acceptor nonce | connector uuid)
};

enum class HelloResult : uint8_t {
  kAccepted = 0,
  kDuplicate = 1,        // a connection between these two engines exists or is winning
  kVersionMismatch = 2,  // `reason` names the versions
  kRefused = 3,          // e.g. transport mismatch; `reason` says why
};

struct HelloAck {
  HelloResult result = HelloResult::kAccepted;
  std::string uuid;
  std::string name;
  WireSettings settings;
  std::string reason;
  DirectOffer direct;  // only with an offer in the HELLO, both engines on one host
};

struct ChannelSetup {
  std::vector<transport::ConnectHandle> handles;
};

struct WriteRequest {
  uint64_t xfer_id = 0;
  uint64_t total = 0;
  uint64_t first_chunk = 0;  // global chunk index of the data on initiator->target channels
  uint32_t spread = 0;       // see kMaxSpread
  bool has_notification = false;
  std::string_view notification;
  std::span<const WireDesc> descs;  // encode side
  std::vector<WireDesc> decoded;    // decode side
  bool inline_data = false;
  std::string_view data;        // decode side: the inline bytes
  bool status_follows = false;  // DATA_STATUS follows (the source is staged from GPU memory)
  // Direct: no data follows; the target reads the source `pieces` (in the initiator's memory,
  // `total` bytes in order) itself and answers WRITE_DONE.
  bool direct = false;
  // Direct, from GPU memory: the initiator would poll the target's copy signal (WRITE_QUEUED).
  bool want_signal = false;
  std::span<const DirectPiece> pieces;      // encode side
  std::span<const IpcHandle> handles;       // encode side
  std::vector<DirectPiece> decoded_pieces;  // decode side
  std::vector<IpcHandle> decoded_handles;   // decode side
};

// Whose operation an id names, where a frame type does not fix it.
enum class IdSpace : uint8_t {
  kSender = 0,    // an operation the frame's sender started (its WRITE or its send)
  kReceiver = 1,  // an operation the frame's receiver started (its READ)
};

struct Completion {  // WRITE_DONE, SEND_DONE, READ_DONE and DATA_STATUS
  uint64_t xfer_id = 0;
  StatusCode code = StatusCode::kOk;
  std::string message;
  IdSpace id_space = IdSpace::kReceiver;  // DATA_STATUS only; the others are fixed by their type
};

struct WriteQueued {
  uint64_t xfer_id = 0;
  std::string signal;  // kSignalHandleSize opaque bytes (an interprocess CUDA event)
};
constexpr size_t kSignalHandleSize = 64;

struct ReadRequest {
  uint64_t xfer_id = 0;
  uint64_t total = 0;
  bool accept_inline = true;  // false: the initiator takes the bytes through the channels only
  bool direct = false;  // the initiator reads the target's memory itself (READ_RESPONSE pieces)
  std::span<const WireDesc> descs;
  std::vector<WireDesc> decoded;
  // Direct, from GPU memory the initiator has mapped already: it queued its copy of
  // `gate_source` (the target's memory as it reads it, `total` bytes in order, all inside
  // `gate_source_area`, the allocation it mapped) behind a gate, a 32-bit word of its own GPU
  // memory (gpu::ReadGates) on the source's GPU. The target writes `gate_value` to the word on
  // that GPU's default stream, behind its own work queued there before, and answers at once; it
  // refuses, writing nothing, unless the descriptors resolve to exactly those ranges of exactly
  // that allocation as it exports it now, and the word lies on the source's GPU.
  bool gated = false;
  uint32_t gate_value = 0;                   // never 0
  std::span<const DirectPiece> gate_source;  // encode side (handle 0: gate_source_area)
  std::vector<DirectPiece> decoded_gate_source;
  IpcHandle gate_source_area;
  DirectPiece gate_word;  // 4 bytes inside gate_area (handle 0)
  IpcHandle gate_area;
};

struct ReadResponse {
  uint64_t xfer_id = 0;
  StatusCode code = StatusCode::kOk;
  std::string message;
  uint64_t first_chunk = 0;  // global chunk index on target->initiator channels
  uint32_t spread = 0;       // see kMaxSpread
  bool inline_data = false;
  std::string_view data;
  bool status_follows = false;
  // Direct (answering a direct READ_REQUEST): no data follows; the initiator reads `pieces` (the
  // target's memory, `total` bytes in order) and answers READ_DONE.
  bool direct = false;
  std::span<const DirectPiece> pieces;
  std::span<const IpcHandle> handles;
  std::vector<DirectPiece> decoded_pieces;
  std::vector<IpcHandle> decoded_handles;
};

struct Cancel {
  uint64_t xfer_id = 0;
};

struct SendRts {
  uint64_t send_id = 0;
  uint64_t tag = 0;
  uint64_t size = 0;
};

struct SendCts {
  uint64_t send_id = 0;
  uint64_t recv_id = 0;
  bool accept_inline = true;  // false: the sender sends the bytes through the channels only
  StatusCode code = StatusCode::kOk;
  std::string message;
};

struct SendData {
  uint64_t send_id = 0;
  uint64_t recv_id = 0;
  StatusCode code = StatusCode::kOk;  // else no data follows: kCanceled (the sender gave up)
                                      // or why the sender could not read its buffer
  uint64_t first_chunk = 0;
  uint32_t spread = 0;  // see kMaxSpread
  bool inline_data = false;
  std::string_view data;
  bool status_follows = false;
};

// ---- Encoding: each appends one whole frame (header + payload) to `out`. ----
// Inline payloads are gathered from `inline_slices` straight into the frame.
void encode(const Hello& m, std::vector<uint8_t>* out);
void encode(const HelloAck& m, std::vector<uint8_t>* out);
void encodePing(std::vector<uint8_t>* out);
void encodeGoodbye(std::string_view reason, std::vector<uint8_t>* out);
void encode(const ChannelSetup& m, std::vector<uint8_t>* out);
void encode(const WriteRequest& m, std::span<const transport::IoSlice> inline_slices,
            std::vector<uint8_t>* out);
void encodeWriteDone(const Completion& m, std::vector<uint8_t>* out);
void encode(const WriteQueued& m, std::vector<uint8_t>* out);
void encodeSendDone(const Completion& m, std::vector<uint8_t>* out);
void encodeDataStatus(const Completion& m, std::vector<uint8_t>* out);
void encodeReadDone(const Completion& m, std::vector<uint8_t>* out);
// IPC_CLOSE or IPC_CLOSED of the allocation at `base`.
void encodeIpc(FrameType type, uint64_t base, std::vector<uint8_t>* out);
void encode(const ReadRequest& m, std::vector<uint8_t>* out);
void encode(const ReadResponse& m, std::span<const transport::IoSlice> inline_slices,
            std::vector<uint8_t>* out);
void encodeNotification(std::string_view message, std::vector<uint8_t>* out);
void encode(const Cancel& m, std::vector<uint8_t>* out);
void encode(const SendRts& m, std::vector<uint8_t>* out);
void encode(const SendCts& m, std::vector<uint8_t>* out);
void encode(const SendData& m, std::span<const transport::IoSlice> inline_slices,
            std::vector<uint8_t>* out);
void encode(const AuthChallenge& m, std::vector<uint8_t>* out);
void encodeAuthProof(std::string_view proof, std::vector<uint8_t>* out);

// ---- Decoding of a payload (without its header). Views point into `payload`. ----
Status decode(std::string_view payload, Hello* m);
Status decode(std::string_view payload, HelloAck* m);
Status decode(std::string_view payload, const DecodeLimits& limits, ChannelSetup* m);
Status decode(std::string_view payload, const DecodeLimits& limits, WriteRequest* m);
// WRITE_DONE, SEND_DONE, READ_DONE
Status decodeCompletion(std::string_view payload, Completion* m);
Status decodeIpc(std::string_view payload, uint64_t* base);  // IPC_CLOSE, IPC_CLOSED
Status decode(std::string_view payload, WriteQueued* m);
Status decodeDataStatus(std::string_view payload, Completion* m);
Status decode(std::string_view payload, const DecodeLimits& limits, ReadRequest* m);
Status decode(std::string_view payload, const DecodeLimits& limits, ReadResponse* m);
Status decodeNotification(std::string_view payload, const DecodeLimits& limits,
                          std::string_view* message);
Status decodeGoodbye(std::string_view payload, std::string_view* reason);
Status decode(std::string_view payload, Cancel* m);
Status decode(std::string_view payload, SendRts* m);
Status decode(std::string_view payload, SendCts* m);
Status decode(std::string_view payload, const DecodeLimits& limits, SendData* m);
Status decode(std::string_view payload, AuthChallenge* m);
Status decodeAuthProof(std::string_view payload, std::string* proof);

}  // namespace tcpx::control
