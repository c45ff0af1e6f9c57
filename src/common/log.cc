#include "common/log.h"

#include <strings.h>
#include <unistd.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <sys/syscall.h>

namespace tcpx::log {
namespace {

Level initialLevel() {
  const char* env = std::getenv("TCPX_P2P_LOG_LEVEL");  // NOLINT(concurrency-mt-unsafe): read once
  Level level = Level::kWarn;
  if (env != nullptr && *env != '\0' && !parseLevel(env, &level)) {
    std::fprintf(stderr,
                 "[tcpx_p2p] TCPX_P2P_LOG_LEVEL='%s' is not one of error|warn|info|debug|trace; "
                 "using warn\n",
                 env);
  }
  return level;
}

std::atomic<int>& levelStorage() {
  static std::atomic<int> level{static_cast<int>(initialLevel())};
  return level;
}

const char* basename(const char* path) {
  const char* slash = std::strrchr(path, '/');
  return slash != nullptr ? slash + 1 : path;
}

char levelLetter(Level level) {
  switch (level) {
    case Level::kError:
      return 'E';
    case Level::kWarn:
      return 'W';
    case Level::kInfo:
      return 'I';
    case Level::kDebug:
      return 'D';
    case Level::kTrace:
      return 'T';
  }
  return '?';
}

}  // namespace

Level threshold() {
  return static_cast<Level>(levelStorage().load(std::memory_order_relaxed));
}

void setThreshold(Level level) {
  levelStorage().store(static_cast<int>(level), std::memory_order_relaxed);
}

bool parseLevel(const char* text, Level* out) {
  static constexpr const char* kNames[] = {"error", "warn", "info", "debug", "trace"};
  for (int i = 0; i < 5; ++i) {
    if (strcasecmp(text, kNames[i]) == 0 || (text[0] == '0' + i && text[1] == '\0')) {
      *out = static_cast<Level>(i);
      return true;
    }
  }
  if (strcasecmp(text, "warning") == 0) {
    *out = Level::kWarn;
    return true;
  }
  return false;
}

void write(Level level, const char* file, int line, const char* fmt, ...) {
  char message[2048];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(message, sizeof(message), fmt, args);
  va_end(args);

  timespec now{};
  clock_gettime(CLOCK_REALTIME, &now);
  tm parts{};
  localtime_r(&now.tv_sec, &parts);
  // One fprintf per line keeps lines whole when several threads log at once.
  std::fprintf(stderr, "[tcpx_p2p %02d:%02d:%02d.%06ld %d:%ld %c %s:%d] %s\n", parts.tm_hour,
               parts.tm_min, parts.tm_sec, now.tv_nsec / 1000, static_cast<int>(getpid()),
               static_cast<long>(syscall(SYS_gettid)), levelLetter(level), basename(file), line,
               message);
}

}  // namespace tcpx::log
