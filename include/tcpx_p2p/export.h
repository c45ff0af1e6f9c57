// Symbol visibility of the public API. The library is built with -fvisibility=hidden; only
// declarations marked TCPX_P2P_API are exported from the shared library.
#pragma once

#if defined(__GNUC__)
#define TCPX_P2P_API __attribute__((visibility("default")))
#else
#define TCPX_P2P_API
#endif
