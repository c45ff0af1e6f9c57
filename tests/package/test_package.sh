#!/usr/bin/env bash
# Builds the Debian packages of a configured and built tree (cpack), unpacks the library and
# development packages into a scratch root, and builds and runs a program against them with
# find_package(tcpx_p2p): what a user's container build does with the packages.
# Usage: test_package.sh BUILD_DIR
set -euo pipefail
build="$(cd "$1" && pwd)"
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$build" && cpack -G DEB -B "$work/packages" >"$work/cpack.log" 2>&1) || {
  cat "$work/cpack.log"
  exit 1
}
ls "$work/packages"/*.deb | sed 's|.*/|built: |'
root="$work/root"
for name in libtcpx-p2p libtcpx-p2p-dev; do
  deb=$(ls "$work/packages/${name}_"*.deb)
  dpkg-deb -x "$deb" "$root"
  echo "unpacked $(basename "$deb") ($(dpkg-deb -f "$deb" Depends))"
done
prefix="$root$(grep -m1 '^CMAKE_INSTALL_PREFIX:' "$build/CMakeCache.txt" | cut -d= -f2)"
cmake -S "$here/consumer" -B "$work/consumer" -DCMAKE_PREFIX_PATH="$prefix" >"$work/configure.log" 2>&1 || {
  cat "$work/configure.log"
  exit 1
}
cmake --build "$work/consumer" >"$work/build.log" 2>&1 || {
  cat "$work/build.log"
  exit 1
}
"$work/consumer/consumer"
