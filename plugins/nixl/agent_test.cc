// NIXL agent-level tests of the TCPX backend: two agents in two processes exchange metadata and
// move verified data through NIXL's own API (READ, WRITE, 1..4096 descriptors, notifications,
// four threads posting at once, a killed peer), with host memory and, where a GPU is present,
// GPU memory on both sides. Built only with an installed NIXL.
//
// The target is this program run again (fork + exec with --agent-target): CUDA cannot be used in
// a child forked from a process that already initialised it.
#include <nixl.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <gtest/gtest.h>
#include <sstream>
#include <string>
#include <sys/wait.h>
#include <thread>
#include <vector>

#include "common/line_pipe.h"
#include "common/pattern_memory.h"
#include "common/strings.h"

namespace {

using namespace std::chrono_literals;

constexpr size_t kBuffer = 8u << 20;

using tcpx::fromHex;
using tcpx::toHex;
using tcpx::tools::PatternMemory;
using tcpx::tools::readLine;
using tcpx::tools::writeLine;

// "dram" or "vram" (GPU 0); nullptr when there is no GPU.
std::unique_ptr<PatternMemory> makeBuffer(const std::string& mem) {
  return mem == "vram" ? tcpx::tools::makeGpuMemory(kBuffer, 0, 0)
                       : tcpx::tools::makeHostMemory(kBuffer, 0);
}

nixl_mem_t segmentOf(const std::string& mem) {
  return mem == "vram" ? VRAM_SEG : DRAM_SEG;
}

// How an agent's backend gets its parameters: set here (socket transport on 127.0.0.1), or the
// way NIXL's own example does it, every option the plugin advertises with its default
// (getPluginParams), which must leave the environment's TCPX_P2P_* settings in force.
enum class Params { kExplicit, kPluginDefaults };

std::unique_ptr<nixlAgent> makeAgent(const std::string& name, nixlBackendH** backend,
                                     Params how = Params::kExplicit) {
  nixlAgentConfig cfg(false);
  cfg.syncMode = nixl_thread_sync_t::NIXL_THREAD_SYNC_RW;
  auto agent = std::make_unique<nixlAgent>(name, cfg);
  nixl_b_params_t params;
  if (how == Params::kPluginDefaults) {
    nixl_mem_list_t mems;
    if (agent->getPluginParams("TCPX", mems, params) != NIXL_SUCCESS) return nullptr;
  } else {
    params["transport"] = "socket";
    params["listen_host"] = "127.0.0.1";
  }
  if (agent->createBackend("TCPX", params, *backend) != NIXL_SUCCESS) return nullptr;
  return agent;
}

// The target process: registers a buffer, hands out its metadata, then serves commands.
[[noreturn]] void targetMain(int in, int out, const std::string& mem, Params how) {
  nixlBackendH* backend = nullptr;
  auto agent = makeAgent("target", &backend, how);
  auto buffer = makeBuffer(mem);
  if (!agent || !buffer) std::_Exit(2);
  buffer->fillByte(0, kBuffer, 0xA5);
  nixl_reg_dlist_t reg(segmentOf(mem));
  reg.addDesc(nixlBlobDesc(reinterpret_cast<uintptr_t>(buffer->data()), kBuffer, 0));
  if (agent->registerMem(reg) != NIXL_SUCCESS) std::_Exit(2);
  nixl_blob_t md;
  agent->getLocalMD(md);
  writeLine(out, toHex(md) + " " + std::to_string(reinterpret_cast<uintptr_t>(buffer->data())));
  std::string line;
  readLine(in, &line);
  std::string remote_name;
  if (agent->loadRemoteMD(fromHex(line).value_or(""), remote_name) != NIXL_SUCCESS) {
    std::_Exit(2);
  }
  writeLine(out, "READY");
  nixl_notifs_t notifs;
  while (readLine(in, &line)) {
    std::istringstream cmd(line);
    std::string verb;
    cmd >> verb;
    if (verb == "CHECK" || verb == "FILL") {
      uint64_t seed = 0, off = 0, len = 0;
      cmd >> seed >> off >> len;
      if (verb == "FILL") {
        buffer->fill(off, len, seed);
        writeLine(out, "ok");
      } else {
        writeLine(out, buffer->check(off, len, seed) < 0 ? "ok" : "bad");
      }
    } else if (verb == "NOTIFS") {
      size_t want = 0;
      cmd >> want;
      const auto deadline = std::chrono::steady_clock::now() + 10s;
      while (notifs["initiator"].size() < want && std::chrono::steady_clock::now() < deadline) {
        agent->getNotifs(notifs);
        std::this_thread::sleep_for(1ms);
      }
      std::string joined;
      for (const auto& n : notifs["initiator"]) joined += n + ",";
      notifs.clear();
      writeLine(out, joined.empty() ? "-" : joined);
    }
  }
  std::_Exit(0);
}

// The target program, run again (fork + exec) and driven over two pipes.
class TargetProcess {
 public:
  ~TargetProcess() { stop(); }
  // Starts it; its memory is `mem`, its backend parameters come as `how` says. Returns its
  // metadata and the address of its buffer.
  void start(const std::string& mem, Params how, std::string* md_hex, uintptr_t* addr) {
    int down[2], up[2];
    ASSERT_EQ(::pipe(down), 0);
    ASSERT_EQ(::pipe(up), 0);
    pid_ = ::fork();
    if (pid_ == 0) {
      ::close(down[1]);
      ::close(up[0]);
      const std::string in = std::to_string(down[0]), out = std::to_string(up[1]);
      ::execl("/proc/self/exe", "nixl_agent_tests", "--agent-target", in.c_str(), out.c_str(),
              mem.c_str(), how == Params::kPluginDefaults ? "plugin-defaults" : "explicit",
              static_cast<char*>(nullptr));
      std::_Exit(127);
    }
    ::close(down[0]);
    ::close(up[1]);
    to_ = down[1];
    from_ = up[0];
    std::string line;
    ASSERT_TRUE(readLine(from_, &line)) << "target did not start";
    std::istringstream in(line);
    in >> *md_hex >> *addr;
  }
  // Hands it our metadata; it answers READY once loaded.
  void introduce(nixlAgent& agent) {
    nixl_blob_t md;
    agent.getLocalMD(md);
    EXPECT_EQ(call(toHex(md)), "READY");
  }
  std::string call(const std::string& command) {
    writeLine(to_, command);
    std::string line;
    readLine(from_, &line);
    return line;
  }
  void kill() const { ::kill(pid_, SIGKILL); }
  void stop() {
    if (to_ >= 0) ::close(to_);
    to_ = -1;
    if (pid_ > 0) {
      int status = 0;
      ::waitpid(pid_, &status, 0);
    }
    pid_ = -1;
    if (from_ >= 0) ::close(from_);
    from_ = -1;
  }

 private:
  pid_t pid_ = -1;
  int to_ = -1;
  int from_ = -1;
};

// Moves `len` bytes of `local` to the same range of the target's buffer (at `remote_addr`).
nixl_status_t writeTo(nixlAgent& agent, nixl_mem_t seg, const PatternMemory& local,
                      uintptr_t remote_addr, size_t len) {
  nixl_xfer_dlist_t l(seg), r(seg);
  l.addDesc(nixlBasicDesc(reinterpret_cast<uintptr_t>(local.data()), len, 0));
  r.addDesc(nixlBasicDesc(remote_addr, len, 0));
  nixlXferReqH* req = nullptr;
  nixl_status_t rc = agent.createXferReq(NIXL_WRITE, l, r, "target", req);
  if (rc != NIXL_SUCCESS) return rc;
  rc = agent.postXferReq(req);
  const auto deadline = std::chrono::steady_clock::now() + 30s;
  while (rc == NIXL_IN_PROG && std::chrono::steady_clock::now() < deadline) {
    rc = agent.getXferStatus(req);
  }
  agent.releaseXferReq(req);
  return rc;
}

// Both sides' memory is GetParam(): "dram" or "vram".
class AgentTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    const std::string mem = GetParam();
    if (mem == "vram" && tcpx::tools::gpuCount() == 0) {
      GTEST_SKIP() << "SKIPPED (no GPU): " << tcpx::tools::gpuUnavailableReason();
    }
    std::string md_hex;
    target_.start(mem, Params::kExplicit, &md_hex, &remote_addr_);
    agent_ = makeAgent("initiator", &backend_);
    ASSERT_TRUE(agent_) << "createBackend(TCPX) failed";
    local_ = makeBuffer(mem);
    ASSERT_TRUE(local_);
    seg_ = segmentOf(mem);
    nixl_reg_dlist_t reg(seg_);
    reg.addDesc(nixlBlobDesc(reinterpret_cast<uintptr_t>(local_->data()), kBuffer, 0));
    ASSERT_EQ(agent_->registerMem(reg), NIXL_SUCCESS);
    std::string name;
    ASSERT_EQ(agent_->loadRemoteMD(fromHex(md_hex).value_or(""), name), NIXL_SUCCESS);
    ASSERT_EQ(name, "target");
    target_.introduce(*agent_);
  }
  void TearDown() override {
    agent_.reset();
    target_.stop();
  }
  std::string call(const std::string& command) { return target_.call(command); }
  // Local [off, off+len) and the same range of the target, each cut into `n` descriptors.
  void lists(size_t off, size_t len, size_t n, nixl_xfer_dlist_t* local,
             nixl_xfer_dlist_t* remote) {
    const size_t piece = len / n;
    for (size_t i = 0; i < n; ++i) {
      const size_t l = i + 1 == n ? len - piece * i : piece;
      local->addDesc(
          nixlBasicDesc(reinterpret_cast<uintptr_t>(local_->data()) + off + piece * i, l, 0));
      remote->addDesc(nixlBasicDesc(remote_addr_ + off + piece * i, l, 0));
    }
  }
  nixl_status_t runXfer(nixl_xfer_op_t op, size_t off, size_t len, size_t n,
                        const std::string& notif = "") {
    nixl_xfer_dlist_t local(seg_), remote(seg_);
    lists(off, len, n, &local, &remote);
    nixl_opt_args_t extra;
    if (!notif.empty()) {
      extra.hasNotif = true;
      extra.notifMsg = notif;
    }
    nixlXferReqH* req = nullptr;
    nixl_status_t rc = agent_->createXferReq(op, local, remote, "target", req, &extra);
    if (rc != NIXL_SUCCESS) return rc;
    rc = agent_->postXferReq(req);
    const auto deadline = std::chrono::steady_clock::now() + 30s;
    while (rc == NIXL_IN_PROG && std::chrono::steady_clock::now() < deadline) {
      rc = agent_->getXferStatus(req);
    }
    agent_->releaseXferReq(req);
    return rc;
  }

  TargetProcess target_;
  uintptr_t remote_addr_ = 0;
  nixlBackendH* backend_ = nullptr;
  std::unique_ptr<nixlAgent> agent_;
  std::unique_ptr<PatternMemory> local_;
  nixl_mem_t seg_ = DRAM_SEG;
};

TEST_P(AgentTest, WriteAndReadMoveVerifiedDataWithOneTo4096Descriptors) {
  uint64_t seed = 1;
  for (size_t n : {size_t{1}, size_t{64}, size_t{4096}}) {
    SCOPED_TRACE(n);
    const size_t len = 4u << 20;
    local_->fill(0, len, ++seed);
    ASSERT_EQ(runXfer(NIXL_WRITE, 0, len, n, "w" + std::to_string(n)), NIXL_SUCCESS);
    EXPECT_EQ(call("CHECK " + std::to_string(seed) + " 0 " + std::to_string(len)), "ok");
    EXPECT_EQ(call("NOTIFS 1"), "w" + std::to_string(n) + ",");
    EXPECT_EQ(call("FILL " + std::to_string(++seed) + " 0 " + std::to_string(len)), "ok");
    local_->fillByte(0, len, 0);
    ASSERT_EQ(runXfer(NIXL_READ, 0, len, n), NIXL_SUCCESS);
    EXPECT_EQ(local_->check(0, len, seed), -1);
  }
}

TEST_P(AgentTest, TransfersWithinTheAgentMoveVerifiedDataWithTheirNotification) {
  // NIXL's local transfers (the backend supports them): the agent is its own target. Host memory
  // and GPU memory are copied by the engine without a connection (GPU memory on its copy thread).
  const size_t half = kBuffer / 2;
  const auto base = reinterpret_cast<uintptr_t>(local_->data());
  uint64_t seed = 40;
  for (nixl_xfer_op_t op : {NIXL_WRITE, NIXL_READ}) {
    SCOPED_TRACE(op == NIXL_WRITE ? "WRITE" : "READ");
    // WRITE: first half -> second half. READ: second half -> first half.
    const size_t from = op == NIXL_WRITE ? 0 : half;
    const size_t to = op == NIXL_WRITE ? half : 0;
    local_->fill(from, half, ++seed);
    local_->fillByte(to, half, 0);
    nixl_xfer_dlist_t local(seg_), remote(seg_);
    for (size_t i = 0; i < 16; ++i) {
      const size_t piece = half / 16;
      // The local list names the initiator's side: the source of a WRITE, the sink of a READ.
      local.addDesc(nixlBasicDesc(base + (op == NIXL_WRITE ? from : to) + piece * i, piece, 0));
      remote.addDesc(nixlBasicDesc(base + (op == NIXL_WRITE ? to : from) + piece * i, piece, 0));
    }
    nixl_opt_args_t extra;
    extra.hasNotif = true;
    extra.notifMsg = "local";
    nixlXferReqH* req = nullptr;
    ASSERT_EQ(agent_->createXferReq(op, local, remote, "initiator", req, &extra), NIXL_SUCCESS);
    nixl_status_t rc = agent_->postXferReq(req);
    const auto deadline = std::chrono::steady_clock::now() + 30s;
    while (rc == NIXL_IN_PROG && std::chrono::steady_clock::now() < deadline) {
      rc = agent_->getXferStatus(req);
    }
    agent_->releaseXferReq(req);
    ASSERT_EQ(rc, NIXL_SUCCESS);
    EXPECT_EQ(local_->check(to, half, seed), -1);
    nixl_notifs_t notifs;
    const auto until = std::chrono::steady_clock::now() + 10s;
    while (notifs["initiator"].empty() && std::chrono::steady_clock::now() < until) {
      agent_->getNotifs(notifs);
    }
    ASSERT_EQ(notifs["initiator"].size(), 1u);
    EXPECT_EQ(notifs["initiator"][0], "local");
  }
}

TEST_P(AgentTest, ANotificationRightAfterLoadingMetadataArrives) {
  ASSERT_EQ(agent_->genNotif("target", "hello"), NIXL_SUCCESS);
  EXPECT_EQ(call("NOTIFS 1"), "hello,");
}

TEST_P(AgentTest, FourThreadsPostingAtOnceEachMoveTheirOwnRange) {
  constexpr size_t kRange = 1u << 20;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  threads.reserve(4);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 10; ++i) {
        local_->fill(t * kRange, kRange, 100 + t);
        if (runXfer(NIXL_WRITE, t * kRange, kRange, 16) != NIXL_SUCCESS) ++failures;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  for (int t = 0; t < 4; ++t) {
    // Each thread's range lands at the same offset of the target.
    EXPECT_EQ(call("CHECK " + std::to_string(100 + t) + " " + std::to_string(t * kRange) + " " +
                   std::to_string(kRange)),
              "ok");
  }
}

TEST_P(AgentTest, AKilledPeerGivesRemoteDisconnect) {
  ASSERT_EQ(runXfer(NIXL_WRITE, 0, 1 << 20, 1), NIXL_SUCCESS);
  target_.kill();
  const auto killed = std::chrono::steady_clock::now();
  nixl_status_t rc = NIXL_SUCCESS;
  for (int i = 0; i < 50 && rc != NIXL_ERR_REMOTE_DISCONNECT; ++i) {
    rc = runXfer(NIXL_WRITE, 0, 4u << 20, 4);
  }
  EXPECT_EQ(rc, NIXL_ERR_REMOTE_DISCONNECT);
  EXPECT_LT(std::chrono::steady_clock::now() - killed, 5s);
}

// The peer dies right after its metadata was loaded, before any transfer: the first transfer
// fails within about 2 s (the backend started connecting at load time; a dead peer's address
// refuses connections), not after connect_timeout_ms (20 s).
TEST_P(AgentTest, APeerKilledRightAfterLoadingFailsTheFirstTransferWithinSeconds) {
  target_.kill();
  const auto killed = std::chrono::steady_clock::now();
  EXPECT_EQ(runXfer(NIXL_READ, 0, 1 << 20, 4), NIXL_ERR_REMOTE_DISCONNECT);
  EXPECT_LT(std::chrono::steady_clock::now() - killed, 3s);
}

INSTANTIATE_TEST_SUITE_P(Memory, AgentTest, ::testing::Values("dram", "vram"),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });

// TCPX_P2P_AUTH_SECRET holds when the backend's parameters are the plugin's advertised options
// (NIXL hands every one back, the secret's empty default included): a peer without the secret is
// refused and nothing of its WRITE lands; a peer with it moves data.
TEST(AgentAuthTest, TheEnvironmentsSecretHoldsWithTheParametersThePluginAdvertises) {
  constexpr size_t kLen = 1 << 20;
  TargetProcess target;
  std::string md_hex;
  uintptr_t remote_addr = 0;
  setenv("TCPX_P2P_AUTH_SECRET", "correct horse", 1);  // the target inherits it
  target.start("dram", Params::kPluginDefaults, &md_hex, &remote_addr);
  unsetenv("TCPX_P2P_AUTH_SECRET");
  for (const bool with_secret : {false, true}) {
    SCOPED_TRACE(with_secret ? "with the secret" : "without the secret");
    if (with_secret) setenv("TCPX_P2P_AUTH_SECRET", "correct horse", 1);
    nixlBackendH* backend = nullptr;
    auto agent =
        makeAgent(with_secret ? "initiator" : "intruder", &backend, Params::kPluginDefaults);
    ASSERT_TRUE(agent) << "createBackend(TCPX) failed";
    auto local = tcpx::tools::makeHostMemory(kLen, 0);
    nixl_reg_dlist_t reg(DRAM_SEG);
    reg.addDesc(nixlBlobDesc(reinterpret_cast<uintptr_t>(local->data()), kLen, 0));
    ASSERT_EQ(agent->registerMem(reg), NIXL_SUCCESS);
    std::string name;
    ASSERT_EQ(agent->loadRemoteMD(fromHex(md_hex).value_or(""), name), NIXL_SUCCESS);
    if (!with_secret) target.introduce(*agent);
    local->fill(0, kLen, with_secret ? 7 : 6);
    const nixl_status_t rc = writeTo(*agent, DRAM_SEG, *local, remote_addr, kLen);
    if (with_secret) {
      EXPECT_EQ(rc, NIXL_SUCCESS);
      EXPECT_EQ(target.call("CHECK 7 0 " + std::to_string(kLen)), "ok");
    } else {
      EXPECT_NE(rc, NIXL_SUCCESS) << "a peer without the secret moved data";
      EXPECT_EQ(target.call("CHECK 6 0 " + std::to_string(kLen)), "bad");
    }
    unsetenv("TCPX_P2P_AUTH_SECRET");
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 6 && std::strcmp(argv[1], "--agent-target") == 0) {
    targetMain(
        std::atoi(argv[2]), std::atoi(argv[3]), argv[4],
        std::strcmp(argv[5], "plugin-defaults") == 0 ? Params::kPluginDefaults : Params::kExplicit);
  }
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
