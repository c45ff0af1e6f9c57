// Received fragments: checking what a transport wrote into its unpack metadata, and copying the
// fragments out of its bounce pool to their destinations.
//
// A transport of device type UNPACK (TCPX, the emulator) delivers a receive as fragments of at
// most one page somewhere in its bounce pool, described by (src_off, len, dst_off) entries. The
// entries come from plugin memory filled from network data, so they are checked before a byte is
// copied: every fragment must lie inside the pool and inside the receive, and together they must
// cover the receive exactly once. A receive that fails the check fails its peer; nothing of it is
// copied.
#pragma once

#include <cstdint>
#include <vector>

#include <tcpx_p2p/status.h>

#include "common/segment_list.h"
#include "gpu/gpu.h"
#include "transport/plugin/net_abi.h"

namespace tcpx::engine {

using transport::abi::LoadMeta;

// Checks the `count` fragments of a receive of `size` bytes from a bounce pool of `pool_size`
// bytes (0 = unknown: only the 32-bit offset range is checked). `scratch` is reused between
// calls so that the check does not allocate once warm.
Status checkFragments(const LoadMeta* frags, uint64_t count, uint64_t size, uint64_t pool_size,
                      std::vector<LoadMeta>* scratch);

// Copies checked fragments of a host-memory pool to the bytes [begin, begin + size) of
// `segments` (host pieces only).
void unpackOnHost(const LoadMeta* frags, uint64_t count, const char* pool,
                  const SegmentList& segments, uint64_t begin);
// Copies checked fragments of a host-memory pool into one contiguous buffer.
void unpackOnHost(const LoadMeta* frags, uint64_t count, const char* pool, char* dst);

// Queues the copies of checked fragments of a device pool: to the pieces of `segments` (all on
// the queue's device) or, when `linear` is set, into that contiguous device-accessible buffer.
Status unpackOnDevice(const LoadMeta* frags, uint64_t count, const char* pool,
                      const SegmentList* segments, uint64_t begin, char* linear,
                      gpu::CopyQueue* queue);

}  // namespace tcpx::engine
