// The program language of fuzz_peer_session: each input is a sequence of steps, one opcode byte
// (taken modulo kCount) followed by the bytes that step reads. Shared with tcpx_fuzz_seeds, which
// writes a few valid programs as the seed corpus.
#pragma once

#include <cstdint>

namespace tcpx::fuzz {

enum class SessionOp : uint8_t {
  kEngineWrite = 0,  // region, offset, length: the engine WRITEs to the scripted peer
  kEngineRead,       // region, offset, length: the engine READs from the scripted peer
  kEngineRecv,       // region, offset, length, tag: the engine posts a recv
  kEngineSend,       // region, offset, length, tag: the engine posts a send
  kEngineRelease,    // handle index: the engine releases one of its handles
  kPeerFrame,        // frame type, then its fields: the peer sends one well-formed frame
  kPeerRawFrame,     // type, length, bytes: the peer sends one frame of any content
  kPeerStream,       // length: the peer sends a data stream where its next one would start
  kPeerUnannounced,  // length: the peer sends bytes on channel 0 that nothing announced
  kPeerReceive,      // the peer receives the engine's next announced stream
  kDrain,            // the peer reads the engine's frames for a moment
  kReregister,       // region: deregister it (its old buffer must never change again) and
                     // register fresh memory in its place
  kCount,
};

}  // namespace tcpx::fuzz
