#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages the build and the tests need, when any is missing;
# `--tests` adds what only the tests use (matplotlib for the benchmark charts' check).
# Idempotent: does nothing (and needs no network) when everything is present.
set -euo pipefail

packages=(cmake ninja-build g++ make libgtest-dev libcli11-dev clang-format binutils clang
          libclang-rt-14-dev libssl-dev)
[ "${1:-}" = "--tests" ] && packages+=(python3-matplotlib)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "installing: ${missing[*]}"
if [ "$(id -u)" -eq 0 ]; then
  sudo=""
elif command -v sudo >/dev/null 2>&1; then
  sudo="sudo"
else
  echo "missing packages (${missing[*]}) and no root or sudo to install them" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
