// Moves 1 MiB from one registered buffer to another through an engine that is its own peer, with
// the installed headers and shared library; exits 0 when every byte arrived.
#include <chrono>
#include <cstdio>
#include <vector>

#include <tcpx_p2p/tcpx_p2p.h>

int main() {
  auto config = tcpx::Config::make({{"transport", "socket"}, {"listen_host", "127.0.0.1"}});
  if (!config.isOk()) return std::printf("config: %s\n", config.status().toString().c_str()), 1;
  auto engine = tcpx::Engine::create(config.value());
  if (!engine.isOk()) return std::printf("engine: %s\n", engine.status().toString().c_str()), 1;
  tcpx::Engine& e = *engine.value();
  constexpr size_t kSize = 1 << 20;
  std::vector<unsigned char> src(kSize), dst(kSize, 0);
  for (size_t i = 0; i < kSize; ++i) src[i] = static_cast<unsigned char>(i * 7 + 3);
  auto a = e.registerMemory(src.data(), kSize);
  auto b = e.registerMemory(dst.data(), kSize);
  if (!a.isOk() || !b.isOk()) return std::printf("registration failed\n"), 1;
  auto remote = e.loadRemoteMemory(e.memoryDescriptor(b.value()).value());
  if (!remote.isOk() || !e.addPeer("self", e.connectionInfo()).isOk()) return 1;
  const std::vector<tcpx::LocalDesc> local{{a.value(), 0, kSize}};
  const std::vector<tcpx::RemoteDesc> there{{remote->id, 0, kSize}};
  auto h = e.prepareTransfer(tcpx::OpKind::kWrite, "self", local, there);
  if (!h.isOk() || !e.postTransfer(h.value()).isOk()) return std::printf("post failed\n"), 1;
  const tcpx::Status st = e.waitTransfer(h.value(), std::chrono::seconds(30));
  if (!st.isOk()) return std::printf("transfer: %s\n", st.toString().c_str()), 1;
  if (dst != src) return std::printf("the bytes differ\n"), 1;
  std::printf("consumer: 1 MiB WRITE through the installed library verified\n");
  return 0;
}
