// Engine configuration: one table of tunables, each with a default and a meaning.
//
// Precedence, lowest first: built-in default, environment variable TCPX_P2P_<NAME> (upper case),
// explicit key/value set by the caller. Explicit values are validated and a bad one is an error;
// a bad environment value is reported with a warning and the default is kept.
#pragma once

#include <map>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <tcpx_p2p/export.h>
#include <tcpx_p2p/status.h>

namespace tcpx {

struct TunableInfo {
  std::string_view name;           // key, e.g. "channels"
  std::string_view default_value;  // as text
  std::string_view range;          // accepted values, e.g. "1..32" or "socket"
  std::string_view meaning;        // one line
  // Whether two connected engines may differ: "per side", "negotiated: <rule>", "announced:
  // <what the peer does with it>", "per connection: <whose value>", or "must match".
  std::string_view scope;
};

class TCPX_P2P_API Config {
 public:
  // Built-in defaults only.
  Config();

  // Defaults overridden by TCPX_P2P_* environment variables.
  static Config fromEnvironment();

  // Defaults, then environment, then `params` (each key must be a known tunable).
  static Result<Config> make(const std::vector<std::pair<std::string, std::string>>& params);

  // Sets one tunable after validating the value against its range.
  Status set(std::string_view key, std::string_view value);

  // The current value of a tunable as text.
  [[nodiscard]] Result<std::string> get(std::string_view key) const;

  // Every tunable in documentation order.
  static std::span<const TunableInfo> tunables();

  // Environment variable name of a tunable ("TCPX_P2P_CHANNELS").
  static std::string environmentName(std::string_view key);

 private:
  std::map<std::string, std::string, std::less<>> values_;
};

}  // namespace tcpx
