// --peers: one initiator moving each point to several target processes at once; --initiators:
// several initiators moving each point into one target process at once.
#include <algorithm>
#include <thread>

#include "bench.h"
#include "common/strings.h"

namespace tcpx::bench {
namespace {

class FanOutSession final : public Session {
 public:
  FanOutSession(std::vector<std::unique_ptr<Session>> parts, const std::string& what, int active)
      : parts_(std::move(parts)),
        active_(active > 0 ? std::min(static_cast<size_t>(active), parts_.size()) : parts_.size()) {
    mode_ = active_ == parts_.size()
                ? strfmt("%s x%zu %s", parts_.front()->mode().c_str(), parts_.size(), what.c_str())
                : strfmt("%s x%zu of %zu %s", parts_.front()->mode().c_str(), active_,
                         parts_.size(), what.c_str());
  }

  [[nodiscard]] const std::string& mode() const override { return mode_; }
  [[nodiscard]] int targets() const override { return static_cast<int>(active_); }

  bool preparePoint(bool is_write, uint64_t block, uint64_t batch, uint64_t seed,
                    int iterations_per_round, std::string* error) override {
    for (size_t i = 0; i < active_; ++i) {
      if (!parts_[i]->preparePoint(is_write, block, batch, seed, iterations_per_round, error)) {
        return false;
      }
    }
    return true;
  }

  // Every part's round at once; the round lasts from the first start to the last end, so the
  // aggregate rate counts the slowest target in full.
  bool runRound(int warmup, int iters, Round* round, std::string* error) override {
    std::vector<Round> rounds(active_);
    std::vector<std::string> errors(active_);
    std::vector<char> ok(active_, 0);
    std::vector<std::thread> threads;
    threads.reserve(active_);
    for (size_t i = 0; i < active_; ++i) {
      threads.emplace_back(
          [&, i] { ok[i] = parts_[i]->runRound(warmup, iters, &rounds[i], &errors[i]) ? 1 : 0; });
    }
    for (auto& t : threads) t.join();
    for (size_t i = 0; i < active_; ++i) {
      if (ok[i] == 0) {
        *error = strfmt("peer %zu: %s", i, errors[i].c_str());
        return false;
      }
      round->seconds = std::max(round->seconds, rounds[i].seconds);
      round->latency_us.insert(round->latency_us.end(), rounds[i].latency_us.begin(),
                               rounds[i].latency_us.end());
      round->post_us.insert(round->post_us.end(), rounds[i].post_us.begin(),
                            rounds[i].post_us.end());
    }
    return true;
  }

  std::string verify() override {
    for (size_t i = 0; i < active_; ++i) {
      const std::string verdict = parts_[i]->verify();
      if (verdict != "yes") return strfmt("%s (peer %zu)", verdict.c_str(), i);
    }
    return "yes";
  }

  [[nodiscard]] std::vector<double> prepSamples() const override {
    return parts_.front()->prepSamples();
  }

 private:
  std::vector<std::unique_ptr<Session>> parts_;
  size_t active_;  // the first parts, those a round moves to
  std::string mode_;
};

}  // namespace

std::unique_ptr<Session> makeFanOutSession(std::vector<std::unique_ptr<Session>> parts,
                                           const std::string& what, int active) {
  return std::make_unique<FanOutSession>(std::move(parts), what, active);
}

}  // namespace tcpx::bench
