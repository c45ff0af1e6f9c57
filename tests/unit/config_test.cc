// Tunables: defaults, environment, explicit values, validation, and the README's table.
#include <stdlib.h>

#include <fstream>
#include <gtest/gtest.h>
#include <sstream>

#include <tcpx_p2p/config.h>

#include "config/settings.h"

namespace tcpx {
namespace {

TEST(Config, DefaultsMatchTheDocumentedValues) {
  const config::Settings s = config::parse(Config());
  EXPECT_EQ(s.channels, 4u);
  EXPECT_EQ(s.chunk_size, 0u);  // auto: resolved per transport by the engine
  EXPECT_EQ(s.send_window, 12u);
  EXPECT_EQ(s.recv_window, 16u);
  EXPECT_EQ(s.listen_port, 0);
  EXPECT_EQ(s.transport, "socket");
}

TEST(Config, ExplicitValuesAreValidatedAndUnknownKeysRejected) {
  Config c;
  EXPECT_TRUE(c.set("chunk_size", "1M").isOk());
  EXPECT_EQ(config::parse(c).chunk_size, 1u << 20);
  EXPECT_TRUE(c.set("chunk_size", "auto").isOk());
  EXPECT_EQ(config::parse(c).chunk_size, 0u);
  EXPECT_EQ(c.set("chunk_size", "automatic").code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(c.set("chunk_size", "2K").code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(c.set("channels", "0").code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(c.set("channels", "33").code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(c.set("channels", "4x").code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(c.set("send_window", "17").code(), StatusCode::kInvalidArgument);
  // serve_poll_us: auto is not a number of microseconds; 0 turns the polling off.
  EXPECT_EQ(config::parse(c).serve_poll_us, -1);
  EXPECT_TRUE(c.set("serve_poll_us", "0").isOk());
  EXPECT_EQ(config::parse(c).serve_poll_us, 0);
  EXPECT_TRUE(c.set("serve_poll_us", "250").isOk());
  EXPECT_EQ(config::parse(c).serve_poll_us, 250);
  EXPECT_EQ(c.set("serve_poll_us", "100001").code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(c.set("transport", "carrier-pigeon").code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(c.set("log_level", "loud").code(), StatusCode::kInvalidArgument);
  const Status unknown = c.set("chanels", "4");
  EXPECT_EQ(unknown.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(unknown.message().find("chanels"), std::string::npos);
  EXPECT_EQ(config::parse(c).channels, 4u);  // failed sets change nothing
}

TEST(Config, EnvironmentOverridesDefaultsAndExplicitValuesOverrideEnvironment) {
  ASSERT_EQ(setenv("TCPX_P2P_CHANNELS", "6", 1), 0);
  ASSERT_EQ(setenv("TCPX_P2P_SEND_WINDOW", "junk", 1), 0);  // warned about and ignored
  EXPECT_EQ(config::parse(Config::fromEnvironment()).channels, 6u);
  EXPECT_EQ(config::parse(Config::fromEnvironment()).send_window, 12u);
  auto made = Config::make({{"channels", "2"}});
  ASSERT_TRUE(made.isOk());
  EXPECT_EQ(config::parse(made.value()).channels, 2u);
  EXPECT_EQ(Config::make({{"nope", "1"}}).status().code(), StatusCode::kInvalidArgument);
  unsetenv("TCPX_P2P_CHANNELS");
  unsetenv("TCPX_P2P_SEND_WINDOW");
  EXPECT_EQ(Config::environmentName("peer_timeout_ms"), "TCPX_P2P_PEER_TIMEOUT_MS");
}

TEST(Config, ReadmeDocumentsEveryTunableWithItsDefaultAndItsScope) {
  const char* path = std::getenv("TCPX_P2P_README");
  if (path == nullptr) GTEST_SKIP() << "TCPX_P2P_README not set (run through ctest)";
  std::ifstream in(path);
  ASSERT_TRUE(in.good()) << path;
  std::stringstream text;
  text << in.rdbuf();
  for (const TunableInfo& t : Config::tunables()) {
    // Empty defaults are written as an em dash.
    const std::string value =
        t.default_value.empty() ? "\u2014" : "`" + std::string(t.default_value) + "`";
    const std::string row = "| `" + std::string(t.name) + "` | " + value + " |";
    const size_t at = text.str().find(row);
    EXPECT_NE(at, std::string::npos) << "README lacks the row starting " << row;
    if (at == std::string::npos) continue;
    // The row ends with whether two engines may differ in it.
    const std::string line = text.str().substr(at, text.str().find('\n', at) - at);
    const std::string scope = " | " + std::string(t.scope) + " |";
    EXPECT_TRUE(line.size() >= scope.size() && line.substr(line.size() - scope.size()) == scope)
        << "README row of " << t.name << " does not end with" << scope;
  }
}

}  // namespace
}  // namespace tcpx
