"""Render a committed benchmark result as an SVG bar chart beside it.

    python benchmarks/plot.py benchmarks/results/<card>-<date>-prefill.json   # -> ...-prefill.svg
    python benchmarks/plot.py benchmarks/results/*-decode.json                # -> ...-decode.svg
    python benchmarks/plot.py RESULT.json --out chart.svg

* `*-prefill.json` (bench_prefill.py): TFLOP/s per workload, one bar per implementation.
* `*-decode.json` (bench_decode.py): % of the device copy bandwidth per workload, one bar per
  implementation, with do_bench's write-flushed L2 (`pct_of_copy`) and, lighter beside it, with a
  clean L2 (`pct_of_copy_clean_l2`) where the row has it, labelled "do_bench / clean"; the targets,
  when recorded, as dashed lines.

The kind is read from the file's rows (tflops vs pct_of_copy), not from its name. Needs matplotlib
(`pip install -e '.[bench]'`); the SVG is written without a timestamp or random ids, so the same
JSON always gives the same bytes and a re-render only shows in git when the numbers change.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# flashinfer-jit first, in one colour family; the peers after, in the order the benchmark ran them.
OURS = ("flashinfer_jit", "flashinfer_jit_paged", "flashinfer_jit_graph")
COLOURS = {"flashinfer_jit": "#1f5fa8", "flashinfer_jit_paged": "#5b8fd0", "flashinfer_jit_graph": "#9dbde6"}
PEER_COLOURS = ("#d9822b", "#6a9a3a", "#a34d8f", "#7f7f7f", "#b8a02e")


def load(path: Path) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: expected a results object with a non-empty 'rows' list")
    return data


def kind(data: dict[str, Any]) -> str:
    """'prefill' (rows with tflops) or 'decode' (rows with pct_of_copy)."""
    rows = data["rows"]
    if all("tflops" in r for r in rows):
        return "prefill"
    if all("pct_of_copy" in r for r in rows):
        return "decode"
    raise ValueError("rows carry neither 'tflops' (prefill) nor 'pct_of_copy' (decode) in every row")


def _ordered(values: list[str], first: tuple[str, ...] = ()) -> list[str]:
    seen = list(dict.fromkeys(values))
    return [v for v in first if v in seen] + [v for v in seen if v not in first]


def series(data: dict[str, Any]) -> tuple[list[str], list[str], dict[tuple[str, str], dict[str, float]]]:
    """(workloads, impls, {(workload, impl): {"value": ..., "clean": ...}}) of a result."""
    what = kind(data)
    workloads = _ordered([r["workload"] for r in data["rows"]])
    impls = _ordered([r["impl"] for r in data["rows"]], OURS)
    values: dict[tuple[str, str], dict[str, float]] = {}
    for r in data["rows"]:
        if what == "prefill":
            if r["tflops"] is not None:
                values[(r["workload"], r["impl"])] = {"value": float(r["tflops"])}
        elif r["pct_of_copy"] is not None:
            point = {"value": float(r["pct_of_copy"])}
            if r.get("pct_of_copy_clean_l2") is not None:
                point["clean"] = float(r["pct_of_copy_clean_l2"])
            values[(r["workload"], r["impl"])] = point
    return workloads, impls, values


def title(data: dict[str, Any]) -> str:
    device = (data.get("env") or {}).get("device_name") or data.get("card") or "unknown GPU"
    what = {"prefill": "batch prefill, TFLOP/s (higher is better)",
            "decode": "paged decode, % of device copy bandwidth (higher is better)"}[kind(data)]
    stamp = ", ".join(str(x) for x in (data.get("date"), data.get("commit")) if x)
    return f"{device}: {what}" + (f"\n{stamp}" if stamp else "")


def render(data: dict[str, Any], out: Path) -> Path:
    """Write the chart of `data` to `out` (SVG)."""
    what = kind(data)
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("benchmarks/plot.py needs matplotlib: pip install -e '.[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads, impls, values = series(data)
    peers = iter(PEER_COLOURS)
    colours = {impl: COLOURS.get(impl) or next(peers, "#999999") for impl in impls}
    plt.rcParams.update({"svg.hashsalt": "flashinfer-jit", "svg.fonttype": "none", "font.size": 9})
    fig, ax = plt.subplots(figsize=(max(8.0, 1.6 * len(workloads) + 2), 4.4))
    group = 0.8
    width = group / len(impls)
    for i, impl in enumerate(impls):
        xs = [w + (i - (len(impls) - 1) / 2) * width for w in range(len(workloads))]
        points = [values.get((wl, impl)) for wl in workloads]
        heights = [p["value"] if p else 0.0 for p in points]
        ax.bar(xs, heights, width * 0.92, color=colours[impl], label=impl.replace("_", " "), zorder=2)
        if what == "decode":
            clean = [p.get("clean", 0.0) if p else 0.0 for p in points]
            ax.bar(xs, clean, width * 0.92, color=colours[impl], alpha=0.35, zorder=1,
                   label="lighter: clean L2" if i == len(impls) - 1 else None)
        for x, p in zip(xs, points):
            if p:
                top = max(p["value"], p.get("clean", 0.0))
                label = f"{p['value']:.0f}" + (f" / {p['clean']:.0f}" if "clean" in p else "")
                ax.text(x, top, label, ha="center", va="bottom", fontsize=6.5, rotation=90)
    if what == "decode":
        for target in data.get("targets") or []:
            if target.get("workload") in workloads and target.get("target_pct") is not None:
                w = workloads.index(target["workload"])
                ax.hlines(target["target_pct"], w - group / 2, w + group / 2, colors="black", linestyles="dashed",
                          linewidth=0.8, zorder=3, label="target" if w == 0 else None)
        ax.set_ylabel("% of copy bandwidth")
    else:
        ax.set_ylabel("TFLOP/s")
    ax.set_xticks(range(len(workloads)))
    ax.set_xticklabels([w.replace("_", "\n", 1) for w in workloads])
    ax.set_title(title(data), fontsize=9)
    ax.grid(axis="y", color="#dddddd", zorder=0)
    ax.set_axisbelow(True)
    ax.margins(y=0.12)
    ax.legend(fontsize=7, ncol=min(len(impls) + 1, 4), loc="upper center", bbox_to_anchor=(0.5, -0.14),
              frameon=False)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, format="svg", metadata={"Date": None, "Creator": "benchmarks/plot.py"})
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="results JSON files (benchmarks/results/*.json)")
    parser.add_argument("--out", type=Path, help="where to write the SVG (one input only; default: beside it)")
    args = parser.parse_args(argv)
    if args.out and len(args.results) > 1:
        parser.error("--out takes one results file")
    for path in args.results:
        try:
            data = load(path)
            out = render(data, args.out or path.with_suffix(".svg"))
        except (OSError, ValueError) as exc:
            print(f"plot.py: {path}: {exc}", file=sys.stderr)
            return 1
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
