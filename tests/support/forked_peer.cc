#include "support/forked_peer.h"

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <thread>

#include "common/pattern_memory.h"
#include "common/random.h"
#include "common/strings.h"
#include "gpu/gpu.h"

#if TCPX_P2P_HAVE_CUDA
#include <cuda_runtime.h>

#include "support/delayed_copy.h"
#endif

namespace tcpx::testing {

using tools::GpuAllocation;
using tools::gpuUnavailableReason;
using tools::makeGpuMemory;
using tools::makeHostMemory;
using tools::PatternMemory;

bool MessageChannel::send(const std::string& message) {
  const uint32_t len = static_cast<uint32_t>(message.size());
  return net::writeAll(fd_.get(), &len, sizeof(len)).isOk() &&
         net::writeAll(fd_.get(), message.data(), message.size()).isOk();
}

bool MessageChannel::recv(std::string* message, std::chrono::milliseconds timeout) {
  pollfd pfd{fd_.get(), POLLIN, 0};
  if (::poll(&pfd, 1, static_cast<int>(timeout.count())) <= 0) return false;
  uint32_t len = 0;
  if (!net::readAll(fd_.get(), &len, sizeof(len)).isOk()) return false;
  message->resize(len);
  return net::readAll(fd_.get(), message->data(), len).isOk();
}

Config testConfig(const std::string& name,
                  const std::vector<std::pair<std::string, std::string>>& extra) {
  // The environment picks the transport (TCPX_P2P_TRANSPORT, TCPX_P2P_PLUGIN_PATH), so the same
  // suite runs over sockets and over the emulator plugin.
  // A small emulator bounce pool: full-pool back-pressure happens in every emulator run.
  setenv("TCPXEMU_POOL_MIB", "8", 0);  // NOLINT(concurrency-mt-unsafe): before any engine starts
  Config config = Config::fromEnvironment();
  // Engines of a test share a host: by default their data takes the channels the suite is
  // about. TCPX_P2P_SAME_HOST_COPY=auto runs it with direct copies (DirectCopyTest sets it).
  if (std::getenv("TCPX_P2P_SAME_HOST_COPY") == nullptr) {  // NOLINT(concurrency-mt-unsafe)
    (void)config.set("same_host_copy", "off");
  }
  (void)config.set("name", name);
  (void)config.set("listen_host", "127.0.0.1");
  for (const auto& [key, value] : extra) {
    const Status st = config.set(key, value);
    if (!st.isOk()) {
      std::fprintf(stderr, "bad test setting %s=%s: %s\n", key.c_str(), value.c_str(),
                   st.toString().c_str());
      std::abort();
    }
  }
  return config;
}

namespace {

// Blobs travel as "x" + hex so that an empty one is still a word on the command line.
std::string hexOf(const std::string& s) {
  std::string out(1, 'x');
  out += toHex(s);
  return out;
}
std::string unhex(const std::string& s) {
  return s.empty() ? std::string() : fromHex(s.substr(1)).value_or(std::string());
}

// ---- The child side ----

class PeerService {
 public:
  PeerService(std::unique_ptr<Engine> engine, MessageChannel* channel)
      : engine_(std::move(engine)), channel_(channel) {}
  // The engine stops (its transfers end) before the memory registered with it is freed.
  ~PeerService() {
    joinAsync();
    engine_.reset();
  }
  PeerService(const PeerService&) = delete;
  PeerService& operator=(const PeerService&) = delete;

  int serve() {
    channel_->send(hexOf(engine_->connectionInfo()));
    std::string line;
    while (channel_->recv(&line, std::chrono::hours(1))) {
      std::istringstream in(line);
      std::string cmd;
      in >> cmd;
      if (cmd == "EXIT") {
        joinAsync();
        channel_->send("bye");
        return 0;
      }
      channel_->send(handle(cmd, in));
    }
    joinAsync();
    return 0;
  }

 private:
  std::string registerPart(std::unique_ptr<PatternMemory> memory, size_t offset, size_t length) {
    auto id =
        engine_->registerMemory(memory->data() + offset, length, memory->kind(), memory->device());
    if (!id.isOk()) return id.status().toString();
    auto desc = engine_->memoryDescriptor(id.value());
    buffers_[id.value()] = std::move(memory);
    return strfmt("%llu %s", static_cast<unsigned long long>(id.value()),
                  hexOf(desc.value()).c_str());
  }

  std::string handle(const std::string& cmd, std::istringstream& in) {
    if (cmd == "REGISTER" || cmd == "REGISTER_GPU") {
      // REGISTER <size> | REGISTER_GPU <size> <device> [vmm | vmm-private | vmm-split]
      size_t size = 0;
      int device = -1;
      std::string how;
      in >> size >> device >> how;
      const GpuAllocation allocation = how == "vmm"           ? GpuAllocation::kVmmShareable
                                       : how == "vmm-private" ? GpuAllocation::kVmmPrivate
                                       : how == "vmm-split"   ? GpuAllocation::kVmmSplit
                                                              : GpuAllocation::kRuntime;
      auto memory =
          cmd == "REGISTER" ? makeHostMemory(size) : makeGpuMemory(size, device, 0xA5, allocation);
      if (!memory) return "NO_GPU " + gpuUnavailableReason();
      return registerPart(std::move(memory), 0, size);
    }
    if (cmd == "REGISTER_PART") {
      // Allocates `total` bytes but registers only [off, off + len): the rest is the guard area
      // that no transfer may touch. FILL/CHECK offsets stay relative to the allocation.
      size_t total = 0, off = 0, len = 0;
      in >> total >> off >> len;
      return registerPart(makeHostMemory(total), off, len);
    }
    if (cmd == "FREE_BEHIND_ENGINE") {
      // Frees a registration's memory without telling the engine (provokes CUDA errors).
      uint64_t mem = 0;
      in >> mem;
      auto it = buffers_.find(mem);
      if (it == buffers_.end()) return "bad id";
      it->second->releaseEarly();
      return "ok";
    }
    if (cmd == "FAIL_ALLOC") {
      // The next N pinned or device allocations of the engine fail (gpu::failNextAllocations).
      std::string kind;
      int count = 0;
      in >> kind >> count;
      if (kind != "pinned" && kind != "device") return "bad kind";
      gpu::failNextAllocations(
          kind == "pinned" ? gpu::AllocKind::kPinnedHost : gpu::AllocKind::kDevice, count);
      return "ok";
    }
    if (cmd == "IPC_MAPPINGS") {
      // Mappings of peers' GPU memory open in this process (direct copies).
      return std::to_string(gpu::IpcMapping::openCount());
    }
    if (cmd == "DEREGISTER") {
      uint64_t mem = 0;
      in >> mem;
      return engine_->deregisterMemory(mem).toString();
    }
    if (cmd == "ADD_PEER") {
      std::string name, info;
      in >> name >> info;
      return engine_->addPeer(name, unhex(info)).toString();
    }
    if (cmd == "CONNECT") {
      std::string name;
      in >> name;
      return engine_->connect(name).toString();
    }
    if (cmd == "LOAD_REMOTE") {
      std::string desc;
      in >> desc;
      auto r = engine_->loadRemoteMemory(unhex(desc));
      if (!r.isOk()) return r.status().toString();
      return strfmt("OK %llu", static_cast<unsigned long long>(r->id));
    }
    if (cmd == "FILL" || cmd == "CHECK" || cmd == "CHECK_BYTE" || cmd == "FILL_BYTE") {
      uint64_t mem = 0, off = 0, len = 0, arg = 0;
      in >> mem >> off >> len >> arg;
      auto it = buffers_.find(mem);
      if (it == buffers_.end() || off + len > it->second->size()) return "bad range";
      PatternMemory& m = *it->second;
      if (cmd == "FILL") {
        m.fill(off, len, arg);
        return "ok";
      }
      if (cmd == "FILL_BYTE") {
        m.fillByte(off, len, static_cast<uint8_t>(arg));
        return "ok";
      }
      const int64_t bad = cmd == "CHECK" ? m.check(off, len, arg)
                                         : m.checkByte(off, len, static_cast<uint8_t>(arg));
      return bad < 0 ? "ok" : strfmt("mismatch %lld", static_cast<long long>(bad));
    }
    if (cmd == "DELAYED_FILL") {
      // DELAYED_FILL <mem> <offset> <length> <seed> <ms>: the application's own GPU work, still
      // running when the command returns: a kernel on the default stream that waits <ms>, then
      // writes the pattern of <seed> into the GPU region.
      uint64_t mem = 0, off = 0, len = 0, seed = 0;
      double ms = 0;
      in >> mem >> off >> len >> seed >> ms;
      auto it = buffers_.find(mem);
      if (it == buffers_.end() || off + len > it->second->size() || it->second->device() < 0) {
        return "bad range";
      }
#if TCPX_P2P_HAVE_CUDA
      auto source = makeGpuMemory(len, it->second->device());
      source->fill(0, len, seed);
      cudaSetDevice(it->second->device());
      if (cudaDeviceSynchronize() != cudaSuccess ||
          !launchDelayedCopy(source->data(), it->second->data() + off, len, ms)) {
        return "launch failed";
      }
      kernel_sources_.push_back(std::move(source));  // freed with the process
      return "ok";
#else
      return "NO_GPU built without CUDA";
#endif
    }
    if (cmd == "CHECK_BLOCKS") {
      // Block i sits at offset (count-1-i)*2*block and holds pattern bytes i*block.. of `seed`.
      uint64_t mem = 0, block = 0, count = 0, seed = 0;
      in >> mem >> block >> count >> seed;
      auto it = buffers_.find(mem);
      if (it == buffers_.end() || 2 * block * count > it->second->size()) return "bad range";
      const std::vector<uint8_t> all = it->second->read(0, 2 * block * count);
      for (uint64_t i = 0; i < count; ++i) {
        const uint8_t* p = all.data() + (count - 1 - i) * 2 * block;
        const int64_t bad = checkPattern(p, block, seed, i * block);
        if (bad >= 0) {
          return strfmt("mismatch in block %llu at %lld", static_cast<unsigned long long>(i),
                        static_cast<long long>(bad));
        }
      }
      return "ok";
    }
    if (cmd == "NOTIFS") {
      size_t count = 0;
      int64_t timeout_ms = 0;
      in >> count >> timeout_ms;
      const auto deadline =
          std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
      while (notifs_.size() < count && std::chrono::steady_clock::now() < deadline) {
        for (auto& n : engine_->takeNotifications()) notifs_.push_back(std::move(n));
        if (notifs_.size() < count) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
      for (auto& n : engine_->takeNotifications()) notifs_.push_back(std::move(n));
      std::string out = std::to_string(notifs_.size());
      for (const auto& n : notifs_) {
        out += ' ';
        out += hexOf(n.peer);
        out += ' ';
        out += hexOf(n.message);
      }
      notifs_.clear();
      return out;
    }
    if (cmd == "SEND_NOTIF") {
      std::string peer, msg;
      in >> peer >> msg;
      return engine_->sendNotification(peer, unhex(msg)).toString();
    }
    if (cmd == "XFER" || cmd == "XFER_ASYNC") {
      // XFER R|W peer local_mem local_off remote_mem remote_off block count notif_hex|-
      std::string op, peer, notif;
      uint64_t lmem = 0, loff = 0, rmem = 0, roff = 0, block = 0, count = 0;
      in >> op >> peer >> lmem >> loff >> rmem >> roff >> block >> count >> notif;
      std::vector<LocalDesc> local;
      std::vector<RemoteDesc> remote;
      for (uint64_t i = 0; i < count; ++i) {
        local.push_back({lmem, loff + i * block, block});
        remote.push_back({rmem, roff + i * block, block});
      }
      std::optional<std::string> message;
      if (notif != "-") message = unhex(notif);
      auto h = engine_->prepareTransfer(op == "R" ? OpKind::kRead : OpKind::kWrite, peer, local,
                                        remote, message);
      if (!h.isOk()) return h.status().toString();
      return runMaybeAsync(cmd == "XFER_ASYNC", h.value());
    }
    if (cmd == "SEND" || cmd == "RECV" || cmd == "SEND_ASYNC" || cmd == "RECV_ASYNC") {
      std::string peer;
      uint64_t mem = 0, off = 0, len = 0, tag = 0;
      in >> peer >> mem >> off >> len >> tag;
      const LocalDesc d{mem, off, len};
      auto h = (cmd[0] == 'S') ? engine_->postSend(peer, d, tag) : engine_->postRecv(peer, d, tag);
      if (!h.isOk()) return h.status().toString();
      return waitMaybeAsync(cmd.find("ASYNC") != std::string::npos, h.value());
    }
    if (cmd == "LIMIT") {
      // LIMIT NOFILE <n> | LIMIT AS <extra MiB> | LIMIT RESET: lowers this process's limit on
      // open files to n more than it has open, or on its address space to `extra` MiB more than
      // it maps (a new thread's stack does not fit in 1 MiB); RESET raises both back to their
      // hard limits.
      std::string what;
      uint64_t extra = 0;
      in >> what >> extra;
      return setLimit(what, extra);
    }
    if (cmd == "WAIT_ASYNC") {
      size_t token = 0;
      in >> token;
      if (token >= async_.size() || !async_[token].joinable()) return "bad token";
      async_[token].join();
      std::lock_guard<std::mutex> lock(mu_);
      return async_results_[token];
    }
    return "unknown command " + cmd;
  }

  static std::string setLimit(const std::string& what, uint64_t extra) {
    if (what == "RESET") {
      for (int resource : {RLIMIT_NOFILE, RLIMIT_AS}) {
        rlimit lim{};
        getrlimit(resource, &lim);
        lim.rlim_cur = lim.rlim_max;
        if (setrlimit(resource, &lim) != 0) return "setrlimit failed";
      }
      return "ok";
    }
    rlimit lim{};
    const int resource = what == "NOFILE" ? RLIMIT_NOFILE : RLIMIT_AS;
    getrlimit(resource, &lim);
    if (what == "NOFILE") {
      lim.rlim_cur = countOpenFiles() + extra;
    } else if (what == "AS") {
      lim.rlim_cur = mappedBytes() + (extra << 20);
    } else {
      return "bad limit " + what;
    }
    return setrlimit(resource, &lim) == 0 ? "ok" : "setrlimit failed";
  }

  static uint64_t countOpenFiles() {
    uint64_t n = 0;
    if (DIR* d = opendir("/proc/self/fd")) {
      while (readdir(d) != nullptr) ++n;
      closedir(d);
    }
    return n;  // "." and "..", and the directory's own descriptor: a little slack
  }

  static uint64_t mappedBytes() {
    std::ifstream status("/proc/self/status");
    std::string line;
    while (std::getline(status, line)) {
      if (line.rfind("VmSize:", 0) == 0) return std::stoull(line.substr(7)) * 1024;
    }
    return 0;
  }

  std::string runMaybeAsync(bool async, TransferHandle h) {
    const Status post = engine_->postTransfer(h);
    if (!post.isOk()) {
      (void)engine_->releaseTransfer(h);
      return post.toString();
    }
    return waitMaybeAsync(async, h);
  }

  std::string waitMaybeAsync(bool async, TransferHandle h) {
    auto wait = [this, h] {
      const Status st = engine_->waitTransfer(h, std::chrono::seconds(120));
      (void)engine_->releaseTransfer(h);
      return st.toString();
    };
    if (!async) return wait();
    const size_t token = async_.size();
    {
      std::lock_guard<std::mutex> lock(mu_);
      async_results_.emplace_back();
    }
    async_.emplace_back([this, token, wait] {
      std::string result = wait();
      std::lock_guard<std::mutex> lock(mu_);
      async_results_[token] = std::move(result);
    });
    return "started " + std::to_string(token);
  }

  void joinAsync() {
    for (auto& t : async_) {
      if (t.joinable()) t.join();
    }
  }

  std::unique_ptr<Engine> engine_;
  MessageChannel* channel_;
  // Registered with engine_, which goes first (~PeerService): no transfer touches them then.
  std::map<uint64_t, std::unique_ptr<PatternMemory>> buffers_;
  std::vector<std::unique_ptr<PatternMemory>> kernel_sources_;  // read by DELAYED_FILL kernels
  std::vector<Notification> notifs_;
  std::vector<std::thread> async_;
  std::mutex mu_;
  std::vector<std::string> async_results_;
};

}  // namespace

int runPeerService(int fd, const std::string& name,
                   const std::vector<std::pair<std::string, std::string>>& extra) {
  MessageChannel channel(fd);
  auto engine = Engine::create(testConfig(name, extra));
  if (!engine.isOk()) {
    channel.send("ENGINE " + engine.status().toString());
    return 2;
  }
  PeerService service(std::move(engine.value()), &channel);
  return service.serve();
}

namespace {}  // namespace

ForkedPeer::ForkedPeer(const std::string& name,
                       const std::vector<std::pair<std::string, std::string>>& extra,
                       const std::vector<std::string>& flags)
    : name_(name) {
  int fds[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) std::abort();
  // The child execs the peer program right away, so forking from a multi-threaded test process
  // is safe: nothing of the parent's state (locks held by its threads) is used in the child.
  // TCPX_TEST_PEER overrides the built-in path (for test binaries copied to another machine).
  const char* program = std::getenv("TCPX_TEST_PEER");  // NOLINT(concurrency-mt-unsafe)
  std::vector<std::string> args{program != nullptr ? program : TCPX_TEST_PEER_PROGRAM,
                                std::to_string(fds[1]), name};
  args.insert(args.end(), flags.begin(), flags.end());
  for (const auto& [key, value] : extra) args.push_back(key + "=" + value);
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::fflush(nullptr);
  pid_ = fork();
  if (pid_ < 0) std::abort();
  if (pid_ == 0) {
    ::close(fds[0]);
    // Keep the channel open across exec.
    const int fd_flags = fcntl(fds[1], F_GETFD);
    fcntl(fds[1], F_SETFD, fd_flags & ~FD_CLOEXEC);
    execv(argv[0], argv.data());
    _exit(127);
  }
  ::close(fds[1]);
  channel_ = std::make_unique<MessageChannel>(fds[0]);
  std::string hello;
  if (channel_->recv(&hello, std::chrono::seconds(30))) {
    if (hello.rfind("ENGINE ", 0) == 0) {
      start_error_ = hello.substr(7);
    } else {
      conn_info_ = unhex(hello);
    }
  }
}

ForkedPeer::~ForkedPeer() {
  if (!reaped_) {
    channel_->send("EXIT");
    if (wait(std::chrono::seconds(20)) == -1)
      std::fprintf(stderr, "peer %s did not exit\n", name_.c_str());
  }
}

std::string ForkedPeer::call(const std::string& command, std::chrono::milliseconds timeout) {
  std::string answer;
  if (!channel_->send(command) || !channel_->recv(&answer, timeout)) return "";
  return answer;
}

ForkedPeer::Region ForkedPeer::registerMemory(size_t size) {
  std::istringstream in(call("REGISTER " + std::to_string(size)));
  Region r;
  std::string desc;
  in >> r.id >> desc;
  r.descriptor = unhex(desc);
  return r;
}

void ForkedPeer::addPeer(const std::string& name, const std::string& conn_info) {
  call("ADD_PEER " + name + " " + hexOf(conn_info));
}

std::string ForkedPeer::loadRemote(const std::string& descriptor) {
  return call("LOAD_REMOTE " + hexOf(descriptor));
}

void ForkedPeer::fill(uint64_t mem, uint64_t offset, uint64_t length, uint64_t seed) {
  call(strfmt("FILL %llu %llu %llu %llu", static_cast<unsigned long long>(mem),
              static_cast<unsigned long long>(offset), static_cast<unsigned long long>(length),
              static_cast<unsigned long long>(seed)));
}

std::string ForkedPeer::check(uint64_t mem, uint64_t offset, uint64_t length, uint64_t seed) {
  return call(strfmt("CHECK %llu %llu %llu %llu", static_cast<unsigned long long>(mem),
                     static_cast<unsigned long long>(offset),
                     static_cast<unsigned long long>(length),
                     static_cast<unsigned long long>(seed)));
}

std::string ForkedPeer::checkByte(uint64_t mem, uint64_t offset, uint64_t length, uint8_t value) {
  return call(strfmt("CHECK_BYTE %llu %llu %llu %u", static_cast<unsigned long long>(mem),
                     static_cast<unsigned long long>(offset),
                     static_cast<unsigned long long>(length), value));
}

std::vector<Notification> ForkedPeer::notifications(size_t count,
                                                    std::chrono::milliseconds timeout) {
  std::istringstream in(
      call(strfmt("NOTIFS %zu %lld", count, static_cast<long long>(timeout.count())),
           timeout + std::chrono::seconds(10)));
  size_t n = 0;
  in >> n;
  std::vector<Notification> out;
  for (size_t i = 0; i < n; ++i) {
    std::string peer, msg;
    in >> peer >> msg;
    out.push_back({unhex(peer), unhex(msg)});
  }
  return out;
}

void ForkedPeer::kill(int sig) {
  ::kill(pid_, sig);
}

void ForkedPeer::stop() {
  ::kill(pid_, SIGSTOP);
  int status = 0;
  // Signal delivery is asynchronous: wait until the kernel reports the child stopped.
  while (waitpid(pid_, &status, WUNTRACED) == pid_ && !WIFSTOPPED(status)) {
  }
}

int ForkedPeer::wait(std::chrono::milliseconds timeout) {
  if (reaped_) return 0;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  int status = 0;
  for (;;) {
    const pid_t r = waitpid(pid_, &status, WNOHANG);
    if (r == pid_) {
      reaped_ = true;
      return status;
    }
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(pid_, SIGKILL);
      waitpid(pid_, &status, 0);
      reaped_ = true;
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

}  // namespace tcpx::testing
