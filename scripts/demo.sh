#!/usr/bin/env bash
# The main job: builds the library and tcpx_bench, then runs a loopback transfer between two
# processes with built-in defaults (READ and WRITE, 4 KiB to 64 MiB, data verified byte for byte)
# next to a raw TCP baseline, and prints the results table. Extra arguments go to tcpx_bench.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
"$root/scripts/install-deps.sh"
"$root/scripts/build.sh" -DTCPX_P2P_BUILD_TESTS=OFF
exec "$root/build/tools/bench/tcpx_bench" "$@"
