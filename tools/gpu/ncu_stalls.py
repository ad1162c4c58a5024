"""The instructions with the most warp-stall samples in ncu's source page exported as CSV (ncu --import R --page source
--print-source sass --csv): each with its share of all samples and its stall reasons, hottest first.

    python3 tools/gpu/ncu_stalls.py tokens-sass.csv [top]
"""
import csv
import sys


def number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def main():
    path, top = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 30
    with open(path, newline="") as f:
        lines = f.read().splitlines()
    # ncu prints a few lines before the table; the table's header is the first line naming the source column.
    start = next(i for i, line in enumerate(lines) if '"Source"' in line or line.startswith("Address"))
    rows = list(csv.DictReader(lines[start:]))
    header = list(rows[0].keys())
    samples = next(c for c in header if "Sampling (All" in c)
    reasons = [c for c in header if c.startswith("stall_") or "Stall" in c and c != samples and "Sampling" not in c]
    total = sum(number(r[samples]) for r in rows) or 1.0
    print(f"{len(rows)} instructions, {total:.0f} stall samples; columns: {header}")
    for r in sorted(rows, key=lambda r: -number(r[samples]))[:top]:
        share = number(r[samples]) / total
        why = sorted(((number(r[c]), c) for c in reasons), reverse=True)[:3]
        why = ", ".join(f"{c.replace('stall_', '')} {v:.0f}" for v, c in why if v > 0)
        print(f"{share:6.1%}  {r.get('Address', ''):>6}  {r.get('Source', '')[:70]:<70}  {why}")


if __name__ == "__main__":
    main()
