#!/usr/bin/env bash
# Runs the engine against a given GPUDirect-TCPX plugin (Google's libnccl-net.so) instead of the
# emulator:
#   1. the plugin contract (tests/unit/plugin_contract_test.cc): the call sequences whose results
#      the emulator must reproduce, on the real plugin;
#   2. the end-to-end suite with transport=tcpx, each test in its own process (tests that need a
#      GPU skip on a machine without one; RecvPathTest, which sets up the emulator itself, is left
#      out). Both processes run on this host, where same_host=auto would move their data over the
#      socket transport: the suite runs with same_host=network so that TCPX carries it, except
#      SameHostTest, which checks that choice itself on TCPX;
#   3. tcpx_bench over tcpx and over the socket transport in the same run, DRAM to DRAM, with
#      transfers above the inline size and with inline_threshold=0, every byte verified.
#
# Usage: scripts/test-real-tcpx.sh PLUGIN_SO        (or TCPX_REAL_PLUGIN=PLUGIN_SO)
# Run it in the environment the plugin needs: its CUDA driver (libcuda.so.1) and runtime on the
# library path, RxDM's sockets under NCCL_GPUDIRECTTCPX_UNIX_CLIENT_PREFIX, and
# NCCL_GPUDIRECTTCPX_SOCKET_IFNAME / NCCL_GPUDIRECTTCPX_CTRL_DEV naming the interface to use
# (lo for a run on one machine). Without a plugin it says so and exits 0: nothing was verified.
# Uses build/ (built by scripts/build.sh when it is missing). Logs go to build/real-tcpx/.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
plugin="${1:-${TCPX_REAL_PLUGIN:-}}"
if [ -z "$plugin" ]; then
  echo "test-real-tcpx: SKIPPED - no TCPX plugin given (scripts/test-real-tcpx.sh PLUGIN_SO);" \
    "nothing was run against the real plugin"
  exit 0
fi
if [ ! -f "$plugin" ]; then
  echo "test-real-tcpx: $plugin does not exist" >&2
  exit 2
fi
plugin="$(cd "$(dirname "$plugin")" && pwd)/$(basename "$plugin")"
build="$root/build"
if [ ! -x "$build/tests/e2e_tests" ] || [ ! -x "$build/tools/bench/tcpx_bench" ]; then
  "$root/scripts/build.sh" -DTCPX_P2P_BUILD_TESTS=ON || exit 1
fi
logs="$build/real-tcpx"
rm -rf "$logs" && mkdir -p "$logs"
failed=0

echo "==== 1/3 plugin contract: $plugin"
if TCPX_REAL_PLUGIN="$plugin" "$build/tests/unit_tests" --gtest_filter='*PluginContract*' \
  >"$logs/contract.log" 2>&1; then
  grep -E '^\[  (PASSED|SKIPPED) ' "$logs/contract.log"
else
  failed=1
  grep -E '^\[  FAILED  \]|Failure' "$logs/contract.log"
fi

# An engine that cannot use the plugin here (its RxDM not running, a device it cannot find) fails
# every test below for the same reason: say that reason once and stop.
if ! "$build/tools/bench/tcpx_bench" --quiet --transports tcpx --mode engine \
  --set "plugin_path=$plugin" --set same_host=network --points 4Kx1 --iters 1 --warmup 0 \
  --rounds 1 >"$logs/preflight.log" 2>&1; then
  tail -5 "$logs/preflight.log"
  echo "test-real-tcpx: FAILED - an engine cannot use $plugin here (above); the end-to-end" \
    "suite and the bench were not run"
  exit 1
fi

echo "==== 2/3 end-to-end suite over transport=tcpx"
pass=0 fail=0 skip=0
skipped_names=()
failed_names=()
suite=""
while IFS= read -r line; do
  case "$line" in
    " "*) name="$suite${line#  }"; name="${name%% *}" ;;
    *) suite="$line"; continue ;;
  esac
  case "$name" in RecvPathTest.*) continue ;; esac
  log="$logs/e2e-${name//\//_}.log"
  TCPX_P2P_TRANSPORT=tcpx TCPX_P2P_PLUGIN_PATH="$plugin" TCPX_P2P_SAME_HOST=network \
    TCPX_SAME_HOST_TEST_TRANSPORT=tcpx timeout 300 \
    "$build/tests/e2e_tests" --gtest_filter="$name" >"$log" 2>&1
  rc=$?
  if grep -q '^\[  SKIPPED \]' "$log"; then
    skip=$((skip + 1)); skipped_names+=("$name")
  elif [ $rc -eq 0 ]; then
    pass=$((pass + 1))
  else
    fail=$((fail + 1)); failed_names+=("$name (rc $rc)")
  fi
done < <("$build/tests/e2e_tests" --gtest_list_tests)
echo "passed $pass, failed $fail, skipped $skip (logs in $logs)"
for n in "${failed_names[@]}"; do echo "  FAILED  $n"; done
for n in "${skipped_names[@]}"; do echo "  skipped $n: $(grep -m1 -A1 'Skipped' "$logs/e2e-${n//\//_}.log" | tail -1)"; done
[ "$fail" -eq 0 ] || failed=1

echo "==== 3/3 tcpx_bench: tcpx against the socket transport, DRAM, verified"
bench() {  # log name, extra arguments
  if "$build/tools/bench/tcpx_bench" --quiet --transports tcpx,socket --mode engine \
    --set "plugin_path=$plugin" --set same_host=network --rounds 3 "${@:2}" \
    >"$logs/$1.log" 2>&1; then
    sed -n '/^tcpx_p2p engine/,$p' "$logs/$1.log"
  else
    failed=1
    tail -20 "$logs/$1.log"
  fi
}
bench bench-large --points 256Kx1,1Mx1,4Mx1,16Mx1,64Mx1,16Kx64 --iters 20 --warmup 2
bench bench-no-inline --set inline_threshold=0 --points 4Kx1,64Kx1,1Mx1 --iters 50 --warmup 5

if [ "$failed" -eq 0 ]; then
  echo "test-real-tcpx: every step passed against $plugin"
else
  echo "test-real-tcpx: FAILED (see above and $logs)"
fi
exit "$failed"
