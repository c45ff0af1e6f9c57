#!/usr/bin/env bash
# Builds everything and runs every test, in four steps:
#   1. the suite (unit, two-process end-to-end over the socket transport and again over the
#      devmem emulator plugin, library checks, formatting) in build/, then a 2-minute soak
#      (tcpx_soak: 4 processes, mixed traffic, every byte verified, resources checked);
#   2. the libFuzzer targets, FUZZ_SECONDS each (default 60), in build-fuzz/ (scripts/fuzz.sh);
#   3. the whole suite again under AddressSanitizer + UndefinedBehaviorSanitizer, in build-asan/;
#   4. the concurrency-heavy tests under ThreadSanitizer, in build-tsan/.
# TCPX_P2P_QUICK=1 runs step 1 only. Tests that need a GPU skip with a visible message on machines
# without one; the sanitizer builds leave CUDA out (the CPU paths are what they check).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
jobs="${JOBS:-2}"
"$root/scripts/install-deps.sh" --tests

step() { printf '\n==== %s (%s)\n' "$1" "$(date +%T)"; }

step "1/4 build and test"
"$root/scripts/build.sh" -DTCPX_P2P_BUILD_TESTS=ON -DTCPX_P2P_WERROR=ON
(cd "$root/build" && ctest --output-on-failure --timeout 600 -j "$jobs")
[ "${TCPX_P2P_QUICK:-0}" = 1 ] && exit 0

step "soak: 4 processes, mixed traffic, 2 minutes"
"$root/build/tools/tcpx_soak" --processes 4 --seconds "${SOAK_SECONDS:-120}"

step "2/4 fuzz"
"$root/scripts/fuzz.sh"

# -O1 (what the sanitizers' documentation recommends) with line tables only (-g1, enough for
# their stack traces) compiles in about half the time of RelWithDebInfo's -O2 -g.
sanitized_build() {  # dir, sanitizer
  cmake -S "$root" -B "$root/$1" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1 -DNDEBUG" \
    -DTCPX_P2P_SANITIZE="$2" -DTCPX_P2P_ENABLE_CUDA=OFF -DTCPX_P2P_BUILD_TOOLS=OFF \
    -DTCPX_P2P_BUILD_TESTS=ON -DTCPX_P2P_WERROR=ON >/dev/null
  cmake --build "$root/$1" -j "$jobs"
}

step "3/4 AddressSanitizer + UndefinedBehaviorSanitizer"
sanitized_build build-asan address
# LeakSanitizer's tracer can crash at exit in a process that dlopen'ed a library (the plugins)
# when it intercepts __tls_get_addr (google/sanitizers#1322); leaks are still checked.
# The package test builds an outside program against the (here sanitized) library: it runs in
# step 1.
(cd "$root/build-asan" &&
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 LSAN_OPTIONS=intercept_tls_get_addr=0 \
    UBSAN_OPTIONS=print_stacktrace=1 \
    ctest --output-on-failure --timeout 900 -j "$jobs" -E 'code_is_formatted|packages_')

step "4/4 ThreadSanitizer"
sanitized_build build-tsan thread
# Concurrency: the socket transport and its I/O pool, the plugin contracts (helper threads), the
# shared plugin registry and set-up drain (TeardownTest), notifications, send/recv,
# authentication, simultaneous connects, a peer killed mid-transfer, transfers to oneself, small
# transfers posted from many threads at once (the short path of the posting thread), replies
# taken by polling threads (its other half) and the control reads lent to them, and the copy
# lanes (a peer's copy stalled on a page of it that never comes in, an idle lane's thread). The
# tests that move and check tens of MiB, the emulator copies of the end-to-end suite and the GPU
# tests stay out: under TSan their checks outrun the tests' timeouts (ASan covers them, and there
# is no GPU here).
(cd "$root/build-tsan" &&
  TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:suppressions=$root/tests/tsan.supp" \
    ctest --output-on-failure --timeout 900 -j "$jobs" \
    -R 'SocketTransport|SocketIoPool|^TransferTest[.](SmallTransfersPostedByManyThreads|APollingCaller)|CallerReplies|LentReads|DirectPeerTest[.]ACopy|SelfTransferTest[.]TheCopyThreadOfAnIdleLane|EmulatorContract|PluginContract|PluginLoading|TeardownTest|NotificationTest|SendRecv|AuthTest|LocalTransfer|BothSidesConnecting|AKilledPeer' \
    -E '^emulator[.]|AReadsNotification')
step "all tests passed"
