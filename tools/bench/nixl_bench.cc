// NIXL mode (tcpx_nixl_bench): the same sweep through the NIXL agent API, with the TCPX backend
// or any other NIXL backend (UCX, ...), so the engine's direct figures and other backends are
// measured in the same run with the same buffers, rounds and checks.
//
// Each session is a pair of agents (one per process) that exchange their metadata over the
// bootstrap connection. A point's request is created once (timed five times, as the engine's
// prepareTransfer is) and posted again for every iteration, as nixlbench does by default.
#include <nixl.h>
#include <sched.h>

#include "bench.h"
#include "common/strings.h"

namespace tcpx::bench {
namespace {

nixl_mem_t segmentOf(const tools::PatternMemory& memory) {
  return memory.kind() == MemoryKind::kCuda ? VRAM_SEG : DRAM_SEG;
}

uint64_t deviceIdOf(const tools::PatternMemory& memory) {
  return memory.device() < 0 ? 0 : static_cast<uint64_t>(memory.device());
}

// The TCPX backend runs with the engine's parameters (and transport, so that it matches the
// engine sessions of the run); other backends with their plugin's defaults.
nixl_b_params_t backendParams(const std::string& backend,
                              const std::vector<std::pair<std::string, std::string>>& params,
                              const std::string& host) {
  nixl_b_params_t out;
  if (backend != "TCPX") return out;
  for (const auto& [k, v] : params) out[k] = v;
  if (host == "127.0.0.1" && out.count("listen_host") == 0) out["listen_host"] = host;
  return out;
}

// An agent with one backend; nullptr (with *error set) when NIXL refuses it. The initiator runs
// as nixlbench does by default, without NIXL's progress thread (its status polls progress the
// backend); the target sits idle between commands, so backends whose target side must be
// progressed (UCX over TCP emulates RMA with active messages) get NIXL's progress thread there,
// where nixlbench's target would poll. The TCPX backend has its own progress thread.
std::unique_ptr<nixlAgent> makeAgent(const std::string& name, const std::string& backend,
                                     const nixl_b_params_t& params, bool progress_thread,
                                     std::string* error) {
  nixlAgentConfig config(progress_thread);
  auto agent = std::make_unique<nixlAgent>(name, config);
  nixl_mem_list_t mems;
  nixl_b_params_t all;
  if (agent->getPluginParams(backend, mems, all) != NIXL_SUCCESS) {
    *error = "NIXL found no backend plugin '" + backend + "' (check NIXL_PLUGIN_DIR)";
    return nullptr;
  }
  for (const auto& [k, v] : params) all[k] = v;
  nixlBackendH* handle = nullptr;
  const nixl_status_t rc = agent->createBackend(backend, all, handle);
  if (rc != NIXL_SUCCESS) {
    *error = strfmt("createBackend(%s) failed: %s", backend.c_str(),
                    nixlEnumStrings::statusStr(rc).c_str());
    return nullptr;
  }
  return agent;
}

nixl_status_t registerBuffer(nixlAgent& agent, const tools::PatternMemory& buffer, bool add) {
  nixl_reg_dlist_t reg(segmentOf(buffer));
  reg.addDesc(
      nixlBlobDesc(reinterpret_cast<uintptr_t>(buffer.data()), buffer.size(), deviceIdOf(buffer)));
  return add ? agent.registerMem(reg) : agent.deregisterMem(reg);
}

class NixlSession final : public BufferSession {
 public:
  NixlSession(Bootstrap& boot, std::unique_ptr<nixlAgent> agent,
              std::unique_ptr<tools::PatternMemory> buffer, std::string mode, std::string key,
              bool block_wait)
      : BufferSession(boot, std::move(buffer), std::move(mode), std::move(key)),
        agent_(std::move(agent)),
        block_wait_(block_wait) {}
  ~NixlSession() override {
    if (request_ != nullptr) agent_->releaseXferReq(request_);
    if (registered_) (void)registerBuffer(*agent_, *buffer_, false);
  }
  NixlSession(const NixlSession&) = delete;
  NixlSession& operator=(const NixlSession&) = delete;

  bool connect(const std::string& backend, const std::string& params_text,
               const std::string& target_kind, int target_device, std::string* error) {
    const nixl_status_t rc = registerBuffer(*agent_, *buffer_, true);
    if (rc != NIXL_SUCCESS) {
      return fail(error, "registerMem: " + nixlEnumStrings::statusStr(rc));
    }
    registered_ = true;
    remote_segment_ = target_kind == "dram" ? DRAM_SEG : VRAM_SEG;
    remote_device_ = static_cast<uint64_t>(target_device);
    nixl_blob_t md;
    agent_->getLocalMD(md);
    boot_.send(strfmt("NIXL %s %s %s %llu %s %s %d", key_.c_str(), backend.c_str(),
                      params_text.c_str(), static_cast<unsigned long long>(buffer_->size()),
                      toHex(md).c_str(), target_kind.c_str(), target_device));
    std::string reply;
    if (!boot_.recv(&reply)) return fail(error, "no answer from the target");
    std::istringstream in(reply);
    std::string md_hex;
    in >> md_hex >> remote_addr_;
    if (remote_addr_ == 0) return fail(error, "the target could not set up its agent");
    const nixl_status_t loaded = agent_->loadRemoteMD(fromHex(md_hex).value_or(""), remote_);
    if (loaded != NIXL_SUCCESS) {
      return fail(error, "loadRemoteMD: " + nixlEnumStrings::statusStr(loaded));
    }
    return true;
  }

  bool prepareRequest(bool is_write, uint64_t block, uint64_t batch, std::string* error) override {
    if (request_ != nullptr) agent_->releaseXferReq(request_);
    request_ = nullptr;
    nixl_xfer_dlist_t local(segmentOf(*buffer_));
    nixl_xfer_dlist_t remote(remote_segment_);
    const auto base = reinterpret_cast<uintptr_t>(buffer_->data());
    for (uint64_t i = 0; i < batch; ++i) {
      local.addDesc(nixlBasicDesc(base + i * block, block, deviceIdOf(*buffer_)));
      remote.addDesc(nixlBasicDesc(remote_addr_ + i * block, block, remote_device_));
    }
    return timePrepare(
        [&] {
          nixlXferReqH* request = nullptr;
          const nixl_status_t rc = agent_->createXferReq(is_write ? NIXL_WRITE : NIXL_READ, local,
                                                         remote, remote_, request);
          if (rc != NIXL_SUCCESS) return "createXferReq: " + nixlEnumStrings::statusStr(rc);
          if (request_ != nullptr) agent_->releaseXferReq(request_);
          request_ = request;
          return std::string();
        },
        error);
  }

  bool runRound(int warmup, int iters, Round* round, std::string* error) override {
    nixl_status_t rc = NIXL_SUCCESS;
    return timeRound(
        warmup, iters, round, error,
        [&] {
          rc = agent_->postXferReq(request_);
          return std::string();
        },
        [&] {
          while (rc == NIXL_IN_PROG) {
            rc = agent_->getXferStatus(request_);
            if (block_wait_ && rc == NIXL_IN_PROG) sched_yield();
          }
          return rc == NIXL_SUCCESS ? std::string() : "transfer: " + nixlEnumStrings::statusStr(rc);
        });
  }

  [[nodiscard]] bool hasRequest() const override { return request_ != nullptr; }

 private:
  std::unique_ptr<nixlAgent> agent_;
  bool block_wait_;
  bool registered_ = false;
  std::string remote_;
  uintptr_t remote_addr_ = 0;
  nixl_mem_t remote_segment_ = DRAM_SEG;
  uint64_t remote_device_ = 0;
  nixlXferReqH* request_ = nullptr;
};

class NixlTarget final : public BufferTarget {
 public:
  NixlTarget(std::unique_ptr<nixlAgent> agent, std::unique_ptr<tools::PatternMemory> buffer)
      : BufferTarget(std::move(buffer)), agent_(std::move(agent)) {}
  ~NixlTarget() override {
    if (registered_) (void)registerBuffer(*agent_, *buffer_, false);
  }
  NixlTarget(const NixlTarget&) = delete;
  NixlTarget& operator=(const NixlTarget&) = delete;
  bool setUp(const std::string& initiator_md, std::string* reply) {
    if (registerBuffer(*agent_, *buffer_, true) != NIXL_SUCCESS) return false;
    registered_ = true;
    std::string name;
    if (agent_->loadRemoteMD(initiator_md, name) != NIXL_SUCCESS) return false;
    nixl_blob_t md;
    agent_->getLocalMD(md);
    *reply = toHex(md) + " " + std::to_string(reinterpret_cast<uintptr_t>(buffer_->data()));
    return true;
  }

 private:
  std::unique_ptr<nixlAgent> agent_;
  bool registered_ = false;
};

}  // namespace

bool haveNixl() {
  return true;
}

std::unique_ptr<Session> openNixlSession(const Options& opts, Bootstrap& boot, uint64_t buffer_size,
                                         const std::string& mem, const std::string& key,
                                         const std::string& backend) {
  const auto [local_kind, target_kind] = memoryKinds(mem);
  auto buffer = allocateBuffer(local_kind, buffer_size, opts.device);
  if (!buffer) return nullptr;
  auto params = opts.engine_params;
  const std::string transport = opts.transports.front();
  if (backend == "TCPX") params.emplace_back("transport", transport.empty() ? "socket" : transport);
  std::string error;
  auto agent = makeAgent("bench-initiator-" + key, backend,
                         backendParams(backend, params, opts.host), false, &error);
  if (!agent) {
    std::fprintf(stderr, "tcpx_bench: %s\n", error.c_str());
    return nullptr;
  }
  std::string mode = "nixl " + backend;
  if (mem != "dram:dram") mode += " " + mem;
  auto session = std::make_unique<NixlSession>(boot, std::move(agent), std::move(buffer), mode, key,
                                               opts.block_wait);
  if (!session->connect(backend, joinParams(params), target_kind, opts.target_device, &error)) {
    std::fprintf(stderr, "tcpx_bench: session %s: %s\n", mode.c_str(), error.c_str());
    return nullptr;
  }
  return session;
}

std::unique_ptr<TargetSide> serveNixl(const Options& opts, Bootstrap& boot,
                                      std::istringstream& args) {
  std::string backend, params, md_hex, kind;
  uint64_t buffer_size = 0;
  int device = 0;
  args >> backend >> params >> buffer_size >> md_hex >> kind >> device;
  auto refuse = [&boot](const std::string& why) -> std::unique_ptr<TargetSide> {
    std::fprintf(stderr, "tcpx_bench target: %s\n", why.c_str());
    boot.send("- 0");
    return nullptr;
  };
  auto buffer = allocateBuffer(kind, buffer_size, device);
  if (!buffer) return refuse("no buffer");
  std::string error;
  static int serial = 0;  // agent names differ between this process's sessions
  auto agent = makeAgent(strfmt("bench-target-%d", ++serial), backend,
                         backendParams(backend, splitParams(params), opts.host), true, &error);
  if (!agent) return refuse(error);
  auto target = std::make_unique<NixlTarget>(std::move(agent), std::move(buffer));
  std::string reply;
  if (!target->setUp(fromHex(md_hex).value_or(""), &reply)) {
    return refuse("registering the buffer or loading the initiator's metadata failed");
  }
  boot.send(reply);
  return target;
}

}  // namespace tcpx::bench
