// Peer authentication in the control handshake: both engines prove knowledge of a shared
// secret with HMAC-SHA256 over fresh nonces from both sides and the connector's instance id. The
// secret never travels; a recorded exchange is useless for another connection (new nonces).
//
//   connector -> HELLO (nonce_c)
//   acceptor  -> AUTH_CHALLENGE (nonce_a, acceptorProof)    [connector checks it]
//   connector -> AUTH_PROOF (connectorProof)                [acceptor checks it]
//   acceptor  -> HELLO_ACK                                  [only now is the peer known]
#pragma once

#include <string>
#include <string_view>

#include <tcpx_p2p/status.h>

namespace tcpx::control {

// 16 bytes from the kernel's CSPRNG.
Result<std::string> makeNonce();

std::string acceptorProof(std::string_view secret, std::string_view connector_nonce,
                          std::string_view acceptor_nonce, std::string_view connector_uuid);
std::string connectorProof(std::string_view secret, std::string_view connector_nonce,
                           std::string_view acceptor_nonce, std::string_view connector_uuid);

// Constant-time comparison of two proofs.
bool proofsMatch(std::string_view a, std::string_view b);

}  // namespace tcpx::control
