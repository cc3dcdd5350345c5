"""benchmarks/plot.py renders the committed results as SVG bar charts: one bar per implementation
and workload, with the numbers in the JSON. Needs matplotlib (the `bench` extra; `make test`
installs it); skipped without it."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import plot  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
PREFILL = sorted(RESULTS.glob("*-prefill.json"))
DECODE = sorted(RESULTS.glob("*-decode.json"))


def test_there_are_committed_results_to_plot():
    assert PREFILL and DECODE


@pytest.mark.parametrize("path", PREFILL + DECODE, ids=lambda p: p.name)
def test_series_are_the_rows_of_the_json(path):
    data = plot.load(path)
    workloads, impls, values = plot.series(data)
    assert workloads == list(dict.fromkeys(r["workload"] for r in data["rows"]))
    assert impls[0] == "flashinfer_jit" and set(impls) == {r["impl"] for r in data["rows"]}
    field = "tflops" if path.name.endswith("-prefill.json") else "pct_of_copy"
    assert plot.kind(data) == ("prefill" if field == "tflops" else "decode")
    for r in data["rows"]:
        assert values[(r["workload"], r["impl"])]["value"] == pytest.approx(r[field])
        if field == "pct_of_copy" and r.get("pct_of_copy_clean_l2") is not None:
            assert values[(r["workload"], r["impl"])]["clean"] == pytest.approx(r["pct_of_copy_clean_l2"])


@pytest.mark.parametrize("path", PREFILL + DECODE, ids=lambda p: p.name)
def test_renders_an_svg_bar_chart(path, tmp_path):
    pytest.importorskip("matplotlib", reason="benchmarks/plot.py needs matplotlib: pip install -e '.[bench]'")
    out = tmp_path / path.with_suffix(".svg").name
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "plot.py"), str(path), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    root = ET.parse(out).getroot()
    assert root.tag.endswith("svg")
    text = out.read_text()
    data = json.loads(path.read_text())
    workloads, impls, _ = plot.series(data)
    for impl in impls:
        assert impl.replace("_", " ") in text  # the legend
    for workload in workloads:
        assert workload.split("_", 1)[0] in text  # the axis labels
    bars = re.findall(r'<g id="patch_\d+">', text)
    assert len(bars) >= len(data["rows"])  # one bar per row (decode: two, with the clean-L2 one)
    committed = path.with_suffix(".svg")
    assert committed.exists(), f"render {committed.name} with benchmarks/plot.py and commit it beside the JSON"
    # the committed chart shows what its JSON says now (its text: title, labels, values, legend)
    assert _texts(committed) == _texts(out), f"{committed.name} is stale: re-run benchmarks/plot.py"


def _texts(svg: Path) -> list[str]:
    return sorted("".join(t.itertext()).strip() for t in ET.parse(svg).getroot().iter() if t.tag.endswith("text"))


def test_not_a_results_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"rows": [{"workload": "a", "impl": "b"}]}))
    assert plot.main([str(bad)]) == 1
    bad.write_text("[]")
    with pytest.raises(ValueError, match="non-empty 'rows'"):
        plot.load(bad)
