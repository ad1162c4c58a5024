#!/usr/bin/env python3
"""Sums an ncu CSV of gpu__time_duration per kernel, grid and block (the GPU machine's tooling; ncu serialises kernels,
so each time is the kernel alone, without programmatic-launch overlap).

    ncu --csv --metrics gpu__time_duration.sum ... > run.csv
    python3 tools/gpu/ncu_summary.py run.csv [--min-calls N]
"""
import argparse
import collections
import csv
import sys


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("csv")
    parser.add_argument("--min-calls", type=int, default=1, help="leave out kernels launched fewer times")
    args = parser.parse_args()
    with open(args.csv, newline="") as f:
        lines = [line for line in f if line.startswith('"')]  # ncu's own log lines start with ==PROF==
    kernels = collections.defaultdict(list)
    for row in csv.DictReader(lines):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        value = float(row["Metric Value"].replace(",", ""))
        unit = row.get("Metric Unit", "ns")
        scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}.get(unit, 1e-3)
        name = row["Kernel Name"].split("(")[0].strip()
        kernels[(name, row["Grid Size"], row["Block Size"])].append(value * scale)
    total = sum(sum(v) for v in kernels.values())
    print(f"{'kernel':48} {'grid':>14} {'block':>12} {'calls':>6} {'mean us':>9} {'total ms':>9} {'share':>6}")
    for (name, grid, block), times in sorted(kernels.items(), key=lambda kv: -sum(kv[1])):
        if len(times) < args.min_calls:
            continue
        print(f"{name[:48]:48} {grid:>14} {block:>12} {len(times):6} {sum(times) / len(times):9.2f} {sum(times) / 1e3:9.3f} "
              f"{sum(times) / total:6.1%}")
    print(f"total {total / 1e3:.3f} ms over {sum(len(v) for v in kernels.values())} launches")


if __name__ == "__main__":
    sys.exit(main())
