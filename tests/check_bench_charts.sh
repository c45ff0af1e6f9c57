#!/usr/bin/env bash
# The benchmark's JSON lines become charts: a short run of engine and raw modes (two operations,
# one and 64 descriptors), then scripts/plot-bench.py; every chart must exist and be a PNG.
# Usage: check_bench_charts.sh TCPX_BENCH PLOT_SCRIPT WORK_DIR. Exit 77 (skipped) without
# matplotlib.
set -uo pipefail
bench="$1" plot="$2" work="$3"
python=""
for candidate in /usr/bin/python3 python3; do
  if "$candidate" -c "import matplotlib" >/dev/null 2>&1; then
    python="$candidate"
    break
  fi
done
if [ -z "$python" ]; then
  echo "SKIPPED: no python3 with matplotlib (Debian: python3-matplotlib)"
  exit 77
fi
rm -rf "$work" && mkdir -p "$work"
"$bench" --quiet --points 4Kx1,64Kx1,16Kx64 --iters 5 --warmup 1 --json "$work/results.jsonl" \
  || { echo "FAILED: tcpx_bench"; exit 1; }
"$python" "$plot" "$work/results.jsonl" --out "$work/charts" --title "check" \
  || { echo "FAILED: plot-bench.py"; exit 1; }
expected=0
for op in write read; do
  for batch in 1 64; do
    for kind in bandwidth latency; do
      f="$work/charts/$op-b$batch-$kind.png"
      if [ "$(head -c 4 "$f" 2>/dev/null | od -An -c | tr -d ' ')" != "211PNG" ]; then
        echo "FAILED: $f is missing or not a PNG"
        exit 1
      fi
      expected=$((expected + 1))
    done
  done
done
echo "charts: $expected PNG files"
