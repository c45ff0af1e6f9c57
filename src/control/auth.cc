#include "control/auth.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "common/random.h"
#include "control/frames.h"

namespace tcpx::control {
namespace {

// HMAC-SHA256(secret, role | connector nonce | acceptor nonce | connector uuid). The role label
// makes the two proofs differ, so one side's proof cannot be reflected back as the other's.
std::string proof(std::string_view role, std::string_view secret, std::string_view connector_nonce,
                  std::string_view acceptor_nonce, std::string_view connector_uuid) {
  std::string message;
  message.reserve(role.size() + 1 + 2 * kNonceSize + connector_uuid.size());
  message.append(role).push_back('\0');
  message.append(connector_nonce).append(acceptor_nonce).append(connector_uuid);
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  if (HMAC(EVP_sha256(), secret.data(), static_cast<int>(secret.size()),
           reinterpret_cast<const unsigned char*>(message.data()), message.size(), digest,
           &length) == nullptr) {
    return {};  // never matches a real proof
  }
  return std::string(reinterpret_cast<const char*>(digest), length);
}

}  // namespace

Result<std::string> makeNonce() {
  std::string nonce(kNonceSize, '\0');
  Status st = secureRandom(nonce.data(), nonce.size());
  if (!st.isOk()) return st;
  return nonce;
}

std::string acceptorProof(std::string_view secret, std::string_view connector_nonce,
                          std::string_view acceptor_nonce, std::string_view connector_uuid) {
  return proof("tcpx_p2p acceptor", secret, connector_nonce, acceptor_nonce, connector_uuid);
}

std::string connectorProof(std::string_view secret, std::string_view connector_nonce,
                           std::string_view acceptor_nonce, std::string_view connector_uuid) {
  return proof("tcpx_p2p connector", secret, connector_nonce, acceptor_nonce, connector_uuid);
}

bool proofsMatch(std::string_view a, std::string_view b) {
  return a.size() == kProofSize && b.size() == kProofSize &&
         CRYPTO_memcmp(a.data(), b.data(), kProofSize) == 0;
}

}  // namespace tcpx::control
