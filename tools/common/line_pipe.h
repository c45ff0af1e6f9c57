// Newline-terminated text messages over a pipe or socket, for tools that coordinate processes
// they forked (tcpx_soak, the NIXL agent tests). Blocking; a message must not contain '\n'.
#pragma once

#include <unistd.h>

#include <string>

namespace tcpx::tools {

inline bool writeLine(int fd, const std::string& line) {
  const std::string s = line + "\n";
  size_t done = 0;
  while (done < s.size()) {
    const ssize_t n = ::write(fd, s.data() + done, s.size() - done);
    if (n <= 0) return false;
    done += static_cast<size_t>(n);
  }
  return true;
}

// False at end of file before a newline.
inline bool readLine(int fd, std::string* line) {
  line->clear();
  char c = 0;
  while (::read(fd, &c, 1) == 1) {
    if (c == '\n') return true;
    line->push_back(c);
  }
  return false;
}

}  // namespace tcpx::tools
