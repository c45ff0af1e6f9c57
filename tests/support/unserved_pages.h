// Pages whose faults nobody serves, for tests of a peer whose memory never becomes readable: a
// userfaultfd registered over them (missing pages) that no thread reads, so that touching such a
// page, or reading it from another process (process_vm_readv), waits until the descriptor serves
// the page or closes (its process ends).
#pragma once

#include <cstddef>

namespace tcpx::testing {

// A userfaultfd of this process, past its API handshake; -1 (errno set) where the kernel or its
// policy does not offer one.
int openUserfaultfd();

// Registers the untouched pages of [area, area + len) with `uffd` for their missing-page faults.
bool registerUnservedPages(int uffd, void* area, size_t len);

}  // namespace tcpx::testing
