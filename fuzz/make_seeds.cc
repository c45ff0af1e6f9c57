// Writes the seed corpus of the fuzz targets (fuzz/corpus/<target>/) from the real encoders, so
// the fuzzers start from valid frames, blobs and fragment lists. Run: tcpx_fuzz_seeds <dir>.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "control/blobs.h"
#include "control/frames.h"
#include "engine/unpack.h"
#include "peer_session_ops.h"

namespace fs = std::filesystem;
using namespace tcpx::control;  // NOLINT(google-build-using-namespace): a small tool

namespace {

void write(const fs::path& dir, const std::string& name, const void* data, size_t size) {
  fs::create_directories(dir);
  FILE* f = std::fopen((dir / name).c_str(), "wb");
  if (f == nullptr) return;
  std::fwrite(data, 1, size, f);
  std::fclose(f);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: tcpx_fuzz_seeds <corpus dir>\n");
    return 2;
  }
  const fs::path root = argv[1];
  const std::string uuid(16, '\x42');

  // Control frames: one file per type, and one stream of several frames.
  std::vector<std::vector<uint8_t>> frames(16);
  Hello hello;
  hello.uuid = uuid;
  hello.name = "peer";
  hello.conn_info = "info";
  hello.transport = "socket";
  hello.settings = {4, 512 * 1024, 65536, 65536, 4000};
  encode(hello, &frames[0]);
  HelloAck ack;
  ack.uuid = uuid;
  ack.name = "target";
  ack.settings = {4, 512 * 1024, 65536, 65536, 4000};
  encode(ack, &frames[1]);
  ChannelSetup setup;
  setup.handles.resize(2);
  encode(setup, &frames[2]);
  const WireDesc descs[2] = {{7, 0, 100}, {9, 4096, 28}};
  const std::string payload(128, 'x');
  const tcpx::transport::IoSlice slice{const_cast<char*>(payload.data()), payload.size()};
  WriteRequest wr;
  wr.xfer_id = 1;
  wr.total = 128;
  wr.descs = descs;
  wr.inline_data = true;
  wr.has_notification = true;
  wr.notification = "done";
  encode(wr, std::span(&slice, 1), &frames[3]);
  encodeWriteDone({1, tcpx::StatusCode::kOk, ""}, &frames[4]);
  ReadRequest rr;
  rr.xfer_id = 2;
  rr.total = 128;
  rr.descs = descs;
  encode(rr, &frames[5]);
  ReadResponse resp;
  resp.xfer_id = 2;
  resp.inline_data = true;
  encode(resp, std::span(&slice, 1), &frames[6]);
  encodeNotification("a notification", &frames[7]);
  encode(Cancel{3}, &frames[8]);
  encode(SendRts{4, 5, 6}, &frames[9]);
  SendCts cts;
  cts.send_id = 4;
  cts.recv_id = 8;
  encode(cts, &frames[10]);
  SendData sd;
  sd.send_id = 4;
  sd.recv_id = 8;
  sd.inline_data = true;
  encode(sd, std::span(&slice, 1), &frames[11]);
  encodeSendDone({4, tcpx::StatusCode::kOk, ""}, &frames[12]);
  encodeDataStatus({5, tcpx::StatusCode::kDeviceError, "copy failed", IdSpace::kSender},
                   &frames[13]);
  encodeGoodbye("bye", &frames[14]);
  encodePing(&frames[15]);
  std::vector<uint8_t> stream;
  for (size_t i = 0; i < frames.size(); ++i) {
    write(root / "fuzz_control_frames", "frame_" + std::to_string(i), frames[i].data(),
          frames[i].size());
    stream.insert(stream.end(), frames[i].begin(), frames[i].end());
  }
  write(root / "fuzz_control_frames", "stream", stream.data(), stream.size());

  // Blobs: selector byte, then the blob.
  ConnInfo info{uuid, "engine", "10.0.0.1", 18515, "socket", "3f2b1c9e-boot"};
  const std::string ci = "\x00" + encodeConnInfo(info);
  write(root / "fuzz_blobs", "conn_info", ci.data(), ci.size());
  MemoryDescriptor md{uuid, 0x1234, 0x7f0000000000, 1 << 20, tcpx::MemoryKind::kCuda, 0};
  const std::string mdb = "\x01" + encodeMemoryDescriptor(md);
  write(root / "fuzz_blobs", "memory_descriptor", mdb.data(), mdb.size());

  // Unpack: recv size, pool size, then fragments (shuffled pages, one split).
  std::vector<uint8_t> unpack(8);
  const uint32_t recv_size = 3 * 4096 + 100;
  const uint32_t pool_size = 16 * 4096;
  std::memcpy(unpack.data(), &recv_size, 4);
  std::memcpy(unpack.data() + 4, &pool_size, 4);
  const tcpx::engine::LoadMeta frags[] = {
      {5 * 4096, 4096, 4096}, {2 * 4096 + 7, 100, 3 * 4096}, {0, 4096, 0}, {9 * 4096, 4096, 8192}};
  const auto* bytes = reinterpret_cast<const uint8_t*>(frags);
  unpack.insert(unpack.end(), bytes, bytes + sizeof(frags));
  write(root / "fuzz_unpack", "four_fragments", unpack.data(), unpack.size());

  // Peer sessions: small programs (opcode, then the bytes the step reads) that start the fuzzer
  // on each kind of step: the engine's posts answered or ignored, frames, streams, releases.
  using tcpx::fuzz::SessionOp;
  auto op = [](SessionOp o) { return static_cast<uint8_t>(o); };
  const std::vector<std::vector<uint8_t>> programs{
      {op(SessionOp::kEngineRead),
       0,
       0,
       0,
       0,
       0x10,
       0,
       0,
       op(SessionOp::kDrain),
       5,
       op(SessionOp::kPeerFrame),
       0,
       0,
       3,
       1,
       0,
       0,
       op(SessionOp::kEngineRelease),
       0,
       0},
      {op(SessionOp::kEngineWrite), 1, 0, 0, 0, 0x80, 0, 1, op(SessionOp::kDrain), 9,
       op(SessionOp::kPeerReceive), op(SessionOp::kPeerFrame), 0, 0, 1, 0, 0},
      {op(SessionOp::kEngineRecv),
       2,
       0,
       0,
       0,
       0x40,
       0,
       2,
       0,
       1,
       op(SessionOp::kPeerFrame),
       0,
       0,
       6,
       2,
       0,
       0,
       2,
       op(SessionOp::kDrain),
       3,
       op(SessionOp::kPeerStream),
       0,
       0x40},
      {op(SessionOp::kPeerFrame),
       0,
       0,
       0,
       2,
       0,
       0,
       op(SessionOp::kPeerUnannounced),
       0,
       9,
       op(SessionOp::kReregister),
       0,
       1,
       op(SessionOp::kPeerRawFrame),
       7,
       0,
       4,
       1,
       2,
       3,
       4},
  };
  for (size_t i = 0; i < programs.size(); ++i) {
    write(root / "fuzz_peer_session", "program_" + std::to_string(i), programs[i].data(),
          programs[i].size());
  }
  return 0;
}
