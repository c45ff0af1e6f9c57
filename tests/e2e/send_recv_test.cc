// Two-sided send/recv: matching by tag in post order, either side first, sizes must agree.
#include <gtest/gtest.h>

#include "common/strings.h"
#include "e2e/e2e_fixture.h"

namespace tcpx::testing {
namespace {

class SendRecvTest : public TwoProcessTest {};

TEST_F(SendRecvTest, ASendMatchesARecvPostedBeforeOrAfterIt) {
  ASSERT_NO_FATAL_FAILURE(start());
  uint64_t target_mem = 0;
  targetRegion(8u << 20, &target_mem);
  const std::string tmem = std::to_string(target_mem);
  HostBuffer local(8u << 20);
  const MemoryId local_mem = localRegion(local);

  for (size_t size : {size_t{1}, size_t{5000}, size_t{3u << 20}}) {
    SCOPED_TRACE(size);
    const std::string n = std::to_string(size);
    // Recv posted first on the target.
    uint64_t seed = tools::randomSeed();
    fillPattern(local.data(), size, seed);
    ASSERT_EQ(target_->call("RECV_ASYNC initiator " + tmem + " 0 " + n + " 7").rfind("started", 0),
              0u);
    auto h = engine_->postSend("target", {local_mem, 0, size}, 7);
    ASSERT_TRUE(h.isOk());
    ASSERT_TRUE(engine_->waitTransfer(h.value(), 30s).isOk());
    ASSERT_TRUE(engine_->releaseTransfer(h.value()).isOk());
    EXPECT_EQ(target_->call(strfmt("WAIT_ASYNC %zu", async_++)), "OK");
    EXPECT_EQ(target_->check(target_mem, 0, size, seed), "ok");

    // Send posted first, recv later: the send waits for it.
    seed = tools::randomSeed();
    fillPattern(local.data(), size, seed);
    h = engine_->postSend("target", {local_mem, 0, size}, 9);
    ASSERT_TRUE(h.isOk());
    EXPECT_EQ(engine_->waitTransfer(h.value(), 200ms).code(), StatusCode::kInProgress);
    EXPECT_EQ(target_->call("RECV initiator " + tmem + " 0 " + n + " 9"), "OK");
    ASSERT_TRUE(engine_->waitTransfer(h.value(), 30s).isOk());
    ASSERT_TRUE(engine_->releaseTransfer(h.value()).isOk());
    EXPECT_EQ(target_->check(target_mem, 0, size, seed), "ok");
  }

  // Receives in the other direction.
  target_->fill(target_mem, 0, 1 << 20, 99);
  auto r = engine_->postRecv("target", {local_mem, 0, 1 << 20}, 3);
  ASSERT_TRUE(r.isOk());
  EXPECT_EQ(target_->call("SEND initiator " + tmem + " 0 1048576 3"), "OK");
  ASSERT_TRUE(engine_->waitTransfer(r.value(), 30s).isOk());
  EXPECT_EQ(checkPattern(local.data(), 1 << 20, 99), -1);
}

TEST_F(SendRecvTest, SendsWithTheSameTagMatchRecvsInPostOrder) {
  ASSERT_NO_FATAL_FAILURE(start());
  uint64_t target_mem = 0;
  targetRegion(3 * 4096, &target_mem);
  const std::string tmem = std::to_string(target_mem);
  for (int i = 0; i < 3; ++i) {
    ASSERT_EQ(
        target_->call("RECV_ASYNC initiator " + tmem + " " + std::to_string(i * 4096) + " 4096 5"),
        "started " + std::to_string(i));
  }
  HostBuffer local(3 * 4096);
  const MemoryId local_mem = localRegion(local);
  std::vector<TransferHandle> sends;
  for (int i = 0; i < 3; ++i) {
    fillPattern(local.data() + i * 4096, 4096, 100 + static_cast<uint64_t>(i));
    sends.push_back(
        engine_->postSend("target", {local_mem, static_cast<uint64_t>(i) * 4096, 4096}, 5).value());
  }
  for (TransferHandle h : sends) ASSERT_TRUE(engine_->waitTransfer(h, 30s).isOk());
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(target_->call("WAIT_ASYNC " + std::to_string(i)), "OK");
    EXPECT_EQ(target_->check(target_mem, static_cast<uint64_t>(i) * 4096, 4096,
                             100 + static_cast<uint64_t>(i)),
              "ok");
  }
}

TEST_F(SendRecvTest, MismatchedSizesFailBothSidesWithLengthMismatch) {
  ASSERT_NO_FATAL_FAILURE(start());
  uint64_t target_mem = 0;
  targetRegion(8192, &target_mem);
  ASSERT_EQ(target_->call("RECV_ASYNC initiator " + std::to_string(target_mem) + " 0 8192 1"),
            "started 0");
  HostBuffer local(4096);
  const MemoryId local_mem = localRegion(local);
  auto h = engine_->postSend("target", {local_mem, 0, 4096}, 1);
  ASSERT_TRUE(h.isOk());
  const Status st = engine_->waitTransfer(h.value(), 30s);
  EXPECT_EQ(st.code(), StatusCode::kRemoteRejected);
  EXPECT_NE(st.message().find("LENGTH_MISMATCH"), std::string::npos) << st.toString();
  EXPECT_EQ(target_->call("WAIT_ASYNC 0").rfind("LENGTH_MISMATCH", 0), 0u);
}

TEST_F(SendRecvTest, ReleasingAnUnmatchedRecvCancelsIt) {
  ASSERT_NO_FATAL_FAILURE(start());
  HostBuffer local(4096);
  const MemoryId local_mem = localRegion(local);
  auto r = engine_->postRecv("target", {local_mem, 0, 4096}, 11);
  ASSERT_TRUE(r.isOk());
  EXPECT_EQ(engine_->waitTransfer(r.value(), 100ms).code(), StatusCode::kInProgress);
  EXPECT_TRUE(engine_->releaseTransfer(r.value()).isOk());
  // A later recv with the same tag gets the next send.
  uint64_t target_mem = 0;
  targetRegion(4096, &target_mem);
  target_->fill(target_mem, 0, 4096, 5);
  r = engine_->postRecv("target", {local_mem, 0, 4096}, 11);
  EXPECT_EQ(target_->call("SEND initiator " + std::to_string(target_mem) + " 0 4096 11"), "OK");
  ASSERT_TRUE(engine_->waitTransfer(r.value(), 30s).isOk());
  EXPECT_EQ(checkPattern(local.data(), 4096, 5), -1);
}

}  // namespace
}  // namespace tcpx::testing
