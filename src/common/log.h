// A small leveled logger.
//
// The level comes from TCPX_P2P_LOG_LEVEL (error, warn, info, debug, trace; default warn) and can
// be lowered or raised at run time. Lines go to stderr as
//   [tcpx_p2p <time> <pid>:<tid> W file.cc:123] message
// Every error line must carry the context needed to act on it: peer, transfer, channel, errno.
#pragma once

#include <atomic>

namespace tcpx::log {

enum class Level : int { kError = 0, kWarn = 1, kInfo = 2, kDebug = 3, kTrace = 4 };

// Current threshold; messages above it are dropped before formatting.
Level threshold();
void setThreshold(Level level);
// Parses "error".."trace" (or 0..4); returns false on anything else.
bool parseLevel(const char* text, Level* out);

inline bool enabled(Level level) {
  return static_cast<int>(level) <= static_cast<int>(threshold());
}

void write(Level level, const char* file, int line, const char* fmt, ...)
    __attribute__((format(printf, 4, 5)));

}  // namespace tcpx::log

#define TCPX_LOG(level, ...)                                                          \
  do {                                                                                \
    if (::tcpx::log::enabled(::tcpx::log::Level::level)) {                            \
      ::tcpx::log::write(::tcpx::log::Level::level, __FILE__, __LINE__, __VA_ARGS__); \
    }                                                                                 \
  } while (0)

#define LOG_ERROR(...) TCPX_LOG(kError, __VA_ARGS__)
#define LOG_WARN(...) TCPX_LOG(kWarn, __VA_ARGS__)
#define LOG_INFO(...) TCPX_LOG(kInfo, __VA_ARGS__)
#define LOG_DEBUG(...) TCPX_LOG(kDebug, __VA_ARGS__)
#define LOG_TRACE(...) TCPX_LOG(kTrace, __VA_ARGS__)
