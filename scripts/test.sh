#!/usr/bin/env bash
# Builds everything and runs every test (unit, two-process end-to-end, library checks, format).
# Tests that need a GPU skip with a visible message on machines without one.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
"$root/scripts/install-deps.sh"
"$root/scripts/build.sh" -DTCPX_P2P_BUILD_TESTS=ON -DTCPX_P2P_WERROR=ON
cd "$root/build"
ctest --output-on-failure --timeout 600 -j "${JOBS:-2}"
