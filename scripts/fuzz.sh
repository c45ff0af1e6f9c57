#!/usr/bin/env bash
# Builds the libFuzzer targets (Clang, AddressSanitizer + UndefinedBehaviorSanitizer) into
# build-fuzz/ and runs each for FUZZ_SECONDS seconds (default 60), JOBS targets at a time (default
# 2), starting from the seed corpus in fuzz/corpus/<target>. Fails on any crash, sanitizer
# report, leak or timeout; the input that failed is left in build-fuzz/artifacts/. New corpus
# entries stay in build-fuzz/corpus/.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
seconds="${FUZZ_SECONDS:-60}"
out="$root/build-fuzz"
"$root/scripts/install-deps.sh"
CC=clang CXX=clang++ cmake -S "$root" -B "$out" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DTCPX_P2P_FUZZ=ON -DTCPX_P2P_ENABLE_CUDA=OFF -DTCPX_P2P_BUILD_TESTS=OFF \
  -DTCPX_P2P_BUILD_TOOLS=OFF >/dev/null
targets=(fuzz_control_frames fuzz_blobs fuzz_unpack fuzz_peer_session)
cmake --build "$out" -j "${JOBS:-2}" --target "${targets[@]}" tcpx_fuzz_seeds
mkdir -p "$out/artifacts"
# One target per job, JOBS at a time (each target is one single-threaded process): on two cores
# the four targets' minutes take two.
fuzz_one() {  # target
  local t="$1" extra=()
  mkdir -p "$out/corpus/$t"
  # Programs of a few dozen steps, not only the short ones libFuzzer tries first.
  [ "$t" = fuzz_peer_session ] && extra=(-max_len=256 -len_control=20)
  "$out/fuzz/$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    "${extra[@]}" \
    -artifact_prefix="$out/artifacts/$t-" "$out/corpus/$t" "$root/fuzz/corpus/$t" \
    2>"$out/$t.log" || { tail -40 "$out/$t.log"; echo "fuzz target $t FAILED"; return 1; }
  grep -E "stat::number_of_executed_units|stat::peak_rss_mb" "$out/$t.log" | sed "s/^/  $t: /"
}
failed=0
running=0
for t in "${targets[@]}"; do
  if [ "$running" -ge "${JOBS:-2}" ]; then
    wait -n || failed=1
    running=$((running - 1))
  fi
  echo "fuzzing $t for ${seconds}s"
  fuzz_one "$t" &
  running=$((running + 1))
done
while [ "$running" -gt 0 ]; do
  wait -n || failed=1
  running=$((running - 1))
done
[ "$failed" = 0 ] || exit 1
echo "all fuzz targets ran ${seconds}s without a finding"
