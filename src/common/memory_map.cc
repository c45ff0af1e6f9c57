#include "common/memory_map.h"

#include <cinttypes>
#include <cstdio>

namespace tcpx {

uint64_t mappedBytesAfter(const void* ptr) {
  const auto at = reinterpret_cast<uintptr_t>(ptr);
  FILE* maps = std::fopen("/proc/self/maps", "re");
  if (maps == nullptr) return 0;
  // Lines are sorted by address: "start-end perms offset dev inode path".
  uintptr_t run_end = 0;  // end of the readable run holding `at`, once found
  char line[512];
  while (std::fgets(line, sizeof(line), maps) != nullptr) {
    uintptr_t start = 0;
    uintptr_t end = 0;
    char perms[5] = {};
    if (std::sscanf(line, "%" SCNxPTR "-%" SCNxPTR " %4s", &start, &end, perms) != 3) continue;
    const bool readable = perms[0] == 'r';
    if (run_end == 0) {
      if (at >= start && at < end && readable) run_end = end;
      if (start > at) break;
      continue;
    }
    if (start != run_end || !readable) break;  // the run ends at a gap or an unreadable mapping
    run_end = end;
  }
  std::fclose(maps);
  return run_end == 0 ? 0 : run_end - at;
}

}  // namespace tcpx
