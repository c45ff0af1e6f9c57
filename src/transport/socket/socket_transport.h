// The built-in TCP socket transport.
//
// Each comm owns several non-blocking TCP sockets, served by a fixed pool of I/O threads
// (io_pool.h) shared by all comms of the transport, so threads do not grow with peers. A request
// is cut into at most one part per socket (parts of at least `min_split` bytes) and the parts
// travel in parallel; requests too small to split go whole, rotating over the sockets, so a window
// of requests keeps every socket busy with large writes. The first part of every request carries a
// small header (size and sequence number) that the receiver checks against what it posted, so a
// desynchronised stream is caught at once.
// Host memory is sent from and received into the caller's slices with sendmsg/recvmsg: no copy.
// Data sockets carry no TCP user timeout: the kernel's would fire per socket and during
// zero-window probing, that is for a receiver that is merely slow; the engine's data-path
// watchdog decides when a channel is dead, and closing the comm detaches its sockets from the
// pool.
#pragma once

#include <memory>
#include <string>

#include "transport/socket/io_pool.h"
#include "transport/transport.h"

namespace tcpx::transport {

struct SocketTransportOptions {
  std::string bind_host;       // address data listeners bind to; "" = all interfaces
  std::string advertise_host;  // address written into connection handles
  std::string interface;       // reported as the device name ("" -> "socket")
  int sockets_per_comm = 2;    // 1..16
  size_t min_split = 512ULL * 1024;
  // As TCPX's sockets (the emulator): a send into a connection the peer broke raises SIGPIPE in
  // the process when the thread that created the comm did not block it, as TCPX's helper
  // threads inherit their creator's mask and send without MSG_NOSIGNAL. (The I/O threads
  // themselves always block it: they serve the comms of every thread.)
  bool raise_sigpipe = false;
  // The I/O threads: a pool shared with other transports of the engine, or (null) one of the
  // transport's own with io_threads loops (0 = IoPool::autoThreads()).
  std::shared_ptr<IoPool> io_pool;
  int io_threads = 0;
};

std::unique_ptr<Transport> makeSocketTransport(const SocketTransportOptions& options);

}  // namespace tcpx::transport
