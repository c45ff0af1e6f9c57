#include "support/unserved_pages.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstdint>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>

namespace tcpx::testing {

int openUserfaultfd() {
  const int uffd = static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC));
  if (uffd < 0) return -1;
  uffdio_api api{};
  api.api = UFFD_API;
  if (::ioctl(uffd, UFFDIO_API, &api) != 0) {
    ::close(uffd);
    return -1;
  }
  return uffd;
}

bool registerUnservedPages(int uffd, void* area, size_t len) {
  uffdio_register reg{};
  reg.range = {reinterpret_cast<uint64_t>(area), len};
  reg.mode = UFFDIO_REGISTER_MODE_MISSING;
  return ::ioctl(uffd, UFFDIO_REGISTER, &reg) == 0;
}

}  // namespace tcpx::testing
