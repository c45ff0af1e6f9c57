#!/usr/bin/env python3
"""Charts of tcpx_bench results.

Reads the JSON lines `tcpx_bench --json FILE` appends (one object per point and mode) and draws,
for each operation (write, read), descriptor count and number of transfers in flight, two charts
against the block size:
bandwidth (GB/s) and median latency (us), one line per mode (engine over each memory and
transport, NIXL backends, local, ...). The in-run baselines ("raw" sockets, "copy") are drawn
dashed in black and grey, so that every chart carries the comparison it was measured against.

Usage: scripts/plot-bench.py RESULTS.jsonl [MORE.jsonl ...] --out DIR [--title TEXT]

Writes DIR/<op>-b<batch>[-i<inflight>]-{bandwidth,latency}.png and lists them. Points
that failed (no iterations) are left out; points whose data did not verify are drawn with a red
cross and reported, since their figures mean nothing. Needs matplotlib (Debian:
python3-matplotlib); exits with status 2 and says so when it is missing.
"""

import argparse
import collections
import json
import os
import sys

BASELINES = {"raw": ("black", "--"), "copy": ("grey", "--")}


def load(paths):
    points = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    point = json.loads(line)
                except json.JSONDecodeError as e:
                    sys.exit(f"plot-bench: {path}:{number}: not a JSON object ({e})")
                missing = [k for k in ("mode", "op", "block_size", "batch_size", "gbps",
                                       "p50_lat_us", "iterations") if k not in point]
                if missing:
                    sys.exit(f"plot-bench: {path}:{number}: missing {', '.join(missing)}")
                points.append(point)
    return points


def size_label(n):
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def draw(plt, groups, op, batch, inflight, metric, ylabel, out_dir, title, log_y):
    fig, ax = plt.subplots(figsize=(8, 5))
    unverified = []
    sizes = set()
    for mode in sorted(groups, key=lambda m: (m in BASELINES, m)):
        rows = sorted(groups[mode], key=lambda p: p["block_size"])
        xs = [p["block_size"] for p in rows]
        ys = [p[metric] for p in rows]
        sizes.update(xs)
        color, style = BASELINES.get(mode, (None, "-"))
        ax.plot(xs, ys, style, marker="o", markersize=3, color=color, label=mode)
        for p in rows:
            if p.get("verified", "-") not in ("yes", "-"):
                ax.plot([p["block_size"]], [p[metric]], "x", color="red", markersize=9)
                unverified.append(f"{mode} {size_label(p['block_size'])}: {p['verified']}")
    ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
    ticks = sorted(sizes)
    ax.set_xticks(ticks)
    ax.set_xticklabels([size_label(t) for t in ticks], rotation=45)
    ax.set_xlabel("block size (bytes)" + (f", {batch} descriptors" if batch > 1 else ""))
    ax.set_ylabel(ylabel)
    heading = f"{op.upper()}: {ylabel}" + (f", {inflight} in flight" if inflight > 1 else "")
    ax.set_title(f"{title}\n{heading}" if title else heading)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    kind = "bandwidth" if metric == "gbps" else "latency"
    suffix = f"-i{inflight}" if inflight > 1 else ""
    path = os.path.join(out_dir, f"{op.lower()}-b{batch}{suffix}-{kind}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path, unverified


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="tcpx_bench --json files")
    parser.add_argument("--out", required=True, help="folder for the PNG files")
    parser.add_argument("--title", default="", help="first line of every chart's title")
    args = parser.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot-bench: matplotlib is needed (Debian: apt-get install python3-matplotlib)",
              file=sys.stderr)
        return 2

    points = [p for p in load(args.results) if p["iterations"] > 0]
    if not points:
        sys.exit("plot-bench: no measured point in " + ", ".join(args.results))
    os.makedirs(args.out, exist_ok=True)
    charts = collections.defaultdict(lambda: collections.defaultdict(list))
    for p in points:
        charts[(p["op"], p["batch_size"], p.get("inflight", 1))][p["mode"]].append(p)
    bad = []
    for (op, batch, inflight), groups in sorted(charts.items()):
        for metric, ylabel, log_y in (("gbps", "bandwidth (GB/s)", False),
                                      ("p50_lat_us", "median latency (us)", True)):
            path, unverified = draw(plt, groups, op, batch, inflight, metric, ylabel, args.out,
                                    args.title, log_y)
            print(path)
            if metric == "gbps":
                bad.extend(f"{op} batch {batch}: {u}" for u in unverified)
    for b in bad:
        print(f"plot-bench: NOT VERIFIED {b}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
