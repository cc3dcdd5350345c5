"""Row-by-row comparison of two trees' benchmark JSONs written by benchmarks/ab_trees.sh.

For every (benchmark, workload, impl, timing) the median over rounds of each tree, the ratio
new/old of the times, and whether it is within the tolerance (default 3 %). Exit status 1 if a row
is outside it or missing on one side.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

TIMINGS = {"prefill": ("ms",), "decode": ("ms", "ms_clean_l2")}


def load(out: Path, side: str, rounds: int, bench: str) -> dict[tuple[str, str, str], list[float]]:
    times: dict[tuple[str, str, str], list[float]] = {}
    for r in range(1, rounds + 1):
        path = out / f"{side}{r}-{bench}.json"
        if not path.exists():
            continue
        for row in json.loads(path.read_text())["rows"]:
            for timing in TIMINGS[bench]:
                if isinstance(row.get(timing), (int, float)):
                    times.setdefault((row["workload"], row["impl"], timing), []).append(row[timing])
    return times


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--old", default="old")
    ap.add_argument("--new", default="new")
    ap.add_argument("--tolerance", type=float, default=0.03)
    args = ap.parse_args()
    bad = 0
    print(f"# A/B, one machine: {args.new} (new) vs {args.old} (old), median of {args.rounds} alternating rounds\n")
    print("| bench | workload | impl | timing | old ms | new ms | new/old | within "
          f"{args.tolerance:.0%} |\n|---|---|---|---|---:|---:|---:|---|")
    for bench in TIMINGS:
        old, new = load(args.out, "old", args.rounds, bench), load(args.out, "new", args.rounds, bench)
        for key in sorted(set(old) | set(new)):
            if key not in old or key not in new:
                bad += 1
                print(f"| {bench} | {key[0]} | {key[1]} | {key[2]} | {'-' if key not in old else ''} | "
                      f"{'-' if key not in new else ''} | | **missing** |")
                continue
            o, n = statistics.median(old[key]), statistics.median(new[key])
            ok = abs(n / o - 1) <= args.tolerance
            bad += not ok
            print(f"| {bench} | {key[0]} | {key[1]} | {key[2]} | {o:.4f} | {n:.4f} | {n / o:.3f} | "
                  f"{'yes' if ok else '**NO**'} |")
    print(f"\n{'every row within tolerance' if not bad else f'{bad} row(s) outside tolerance or missing'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
