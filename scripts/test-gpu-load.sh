#!/usr/bin/env bash
# The GPU tests under load and under compute-sanitizer, for a machine with a GPU:
#   1. load: ROUNDS rounds; in each, the GPU tests (GpuTransferTest.*, SelfGpuTransferTest.*,
#      an engine's GPU transfers to itself, which must never touch the transport, and
#      DirectGpuTest.*, CUDA IPC between two processes) over the socket transport, over the
#      emulator's GPU bounce pool, over the emulator's host receive path and with direct copies
#      between the two processes (same_host_copy=auto: GPU memory by CUDA IPC), each as
#      INSTANCES concurrent processes (every instance starts its own target process, so twice as
#      many engines share the GPU). A run of the test binary counts as failed when it exits
#      non-zero or prints a FAILED test.
#   2. sanitizer: compute-sanitizer memcheck, racecheck and synccheck (--target-processes all, so
#      the forked target engines are checked too) over the GPU tests on the socket transport and
#      on the emulator's bounce pool. ACudaErrorOnTheTargetFailsTheTransferOnBothSides and
#      TransfersOfGpuMemoryFreedBehindTheEngineFailAloneAndTheContextLives free memory behind an
#      engine's back on purpose: their reports are expected and they run apart (memcheck only),
#      where the tests themselves must pass; any report elsewhere is unexpected. Under the
#      sanitizer every CUDA call is far slower: TCPX_TEST_TIMING=lax drops the expectations about
#      timing alone (a signal seen within its poll window, a copy that follows its bytes); every
#      byte is still checked.
#
# Usage: scripts/test-gpu-load.sh [BIN_DIR]
#   BIN_DIR: a build directory (tests/ and lib/ below it) or one folder holding e2e_tests,
#   tcpx_test_peer, libtcpx_p2p.so and libnccl-net-tcpxemu.so; default build/.
#   ROUNDS (5), INSTANCES (4), PARTS ("load sanitizer"), LOAD_MODES ("sockets emulator-pool
#   emulator-host direct"), SANITIZER_TOOLS ("memcheck racecheck
#   synccheck"), SANITIZER_MODES ("sockets emulator-pool direct"), LOG_DIR (BIN_DIR/gpu-load) and
#   SANITIZER (compute-sanitizer on PATH or under /usr/local/cuda/bin) change what runs.
# Without a GPU it says so and exits 0: nothing was verified. Exit status 1 when anything failed.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="$(cd "${1:-$root/build}" && pwd)"
rounds="${ROUNDS:-5}"
instances="${INSTANCES:-4}"
parts="${PARTS:-load sanitizer}"

find_file() {  # find_file NAME: BIN_DIR/NAME, BIN_DIR/tests/NAME or BIN_DIR/lib/NAME
  local f
  for f in "$bin/$1" "$bin/tests/$1" "$bin/lib/$1"; do
    if [ -e "$f" ]; then
      echo "$f"
      return 0
    fi
  done
  echo "test-gpu-load: $1 not found under $bin" >&2
  return 1
}
e2e="$(find_file e2e_tests)" || exit 2
peer="$(find_file tcpx_test_peer)" || exit 2
emulator="$(find_file libnccl-net-tcpxemu.so)" || exit 2
shared="$(find_file libtcpx_p2p.so)" || exit 2
export TCPX_TEST_PEER="$peer" TCPX_EMULATOR_PATH="$emulator" TCPX_P2P_SHARED_LIBRARY_PATH="$shared"

if ! nvidia-smi -L >/dev/null 2>&1; then
  echo "test-gpu-load: SKIPPED - no GPU on this machine (nvidia-smi finds none); nothing was run"
  exit 0
fi
logs="${LOG_DIR:-$bin/gpu-load}"
rm -rf "$logs" && mkdir -p "$logs"
gpu_tests='GpuTransferTest.*:SelfGpuTransferTest.*:DirectGpuTest.*'
expected_errors='GpuTransferTest.ACudaErrorOnTheTargetFailsTheTransferOnBothSides:GpuTransferTest.TransfersOfGpuMemoryFreedBehindTheEngineFailAloneAndTheContextLives'
failed=0

# mode_env MODE: the environment of one transport mode.
mode_env() {
  case "$1" in
    sockets) echo "TCPX_P2P_TRANSPORT=socket" ;;
    emulator-pool) echo "TCPX_P2P_TRANSPORT=emulator TCPX_P2P_PLUGIN_PATH=$emulator" ;;
    emulator-host)
      echo "TCPX_P2P_TRANSPORT=emulator TCPX_P2P_PLUGIN_PATH=$emulator TCPX_P2P_RECV_PATH=host"
      ;;
    direct) echo "TCPX_P2P_TRANSPORT=socket TCPX_P2P_SAME_HOST_COPY=auto" ;;
  esac
}

# run_failed LOG RC: whether a test binary's run failed.
run_failed() {
  [ "$2" -ne 0 ] || grep -qE '^\[  FAILED  \]' "$1"
}

if [[ " $parts " == *" load "* ]]; then
  echo "==== load: $rounds rounds x modes (${LOAD_MODES:-sockets emulator-pool emulator-host direct})" \
    "x $instances concurrent instances of $gpu_tests"
  total=0 bad=0
  for round in $(seq 1 "$rounds"); do
    for mode in ${LOAD_MODES:-sockets emulator-pool emulator-host direct}; do
      pids=()
      for i in $(seq 1 "$instances"); do
        log="$logs/load-r$round-$mode-$i.log"
        env $(mode_env "$mode") timeout 590 "$e2e" --gtest_filter="$gpu_tests" >"$log" 2>&1 &
        pids+=($!)
      done
      for i in $(seq 1 "$instances"); do
        wait "${pids[$((i - 1))]}"
        rc=$?
        log="$logs/load-r$round-$mode-$i.log"
        total=$((total + 1))
        if run_failed "$log" "$rc"; then
          bad=$((bad + 1))
          echo "FAILED: round $round, $mode, instance $i (rc $rc, $log)"
          grep -E '^\[  FAILED  \]|Failure|Expected|Which is|  Actual' "$log" | head -12
        fi
      done
      passed_tests=$(cat "$logs"/load-r"$round"-"$mode"-*.log | grep -cE '^\[       OK \]')
      echo "round $round, $mode: $passed_tests test passes over $instances instances"
    done
  done
  skipped=$(cat "$logs"/load-*.log | grep -cE '^\[  SKIPPED \]')
  echo "load: $((total - bad)) of $total instance runs passed; $skipped test skips in all"
  [ "$bad" -eq 0 ] || failed=1
fi

if [[ " $parts " == *" sanitizer "* ]]; then
  sanitizer="${SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}"
  if [ ! -x "$sanitizer" ]; then
    echo "test-gpu-load: compute-sanitizer not found ($sanitizer): sanitizer part NOT run"
    failed=1
  else
    echo "==== sanitizer: $sanitizer"
    for mode in ${SANITIZER_MODES:-sockets emulator-pool direct}; do
      for tool in ${SANITIZER_TOOLS:-memcheck racecheck synccheck}; do
        log="$logs/sanitizer-$tool-$mode.log"
        env $(mode_env "$mode") TCPX_TEST_TIMING=lax timeout 590 "$sanitizer" --tool "$tool" --target-processes all \
          --error-exitcode 9 "$e2e" --gtest_filter="$gpu_tests:-$expected_errors" >"$log" 2>&1
        rc=$?
        summaries=$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | sort | uniq -c | tr -s ' ')
        if run_failed "$log" "$rc" || grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" |
          grep -qvE ' 0 (errors|hazards)'; then
          failed=1
          echo "UNEXPECTED: $tool, $mode (rc $rc, $log): $summaries"
          grep -E '^=+ (Invalid|Race|Barrier|Error|Program hit)|^\[  FAILED  \]' "$log" | head -12
        else
          echo "clean: $tool, $mode ($summaries)"
        fi
      done
    done
    log="$logs/sanitizer-memcheck-expected.log"
    env $(mode_env sockets) TCPX_TEST_TIMING=lax timeout 590 "$sanitizer" --tool memcheck --target-processes all "$e2e" \
      --gtest_filter="$expected_errors" >"$log" 2>&1
    rc=$?
    reported=$(grep -cE '^=+ (Invalid|Program hit)' "$log")
    if [ "$rc" -ne 0 ] || ! grep -qE '^\[  PASSED  \] 2 tests' "$log"; then
      failed=1
      echo "FAILED: $expected_errors under memcheck (rc $rc, $log)"
    else
      echo "expected: $expected_errors passed; $reported reports from the memory it frees"
    fi
  fi
fi
exit "$failed"
