// Umbrella header of the tcpx_p2p library.
#pragma once

#include <tcpx_p2p/config.h>
#include <tcpx_p2p/engine.h>
#include <tcpx_p2p/status.h>
#include <tcpx_p2p/types.h>
