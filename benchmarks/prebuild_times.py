"""Time `flashinfer-jit prebuild` of the ragged prefill matrix and measure the disk it takes.

    PYTHONPATH=. python3 benchmarks/prebuild_times.py [--jobs N] [--arch 90a] [--cache-dir DIR] [--out FILE.md]

The matrix is `prebuild --family prefill --layout ragged`: 3 head dims x 2 dtypes x causal on/off =
12 variants. Into a fresh cache (a new temporary directory, or --cache-dir, which must be missing or
empty), it runs the real command line in a new process (`python -m flashinfer_jit prebuild ... --json`),
so the time includes Python and torch start-up, as an operator would see it. Then it runs the same
command again (everything cached: nothing may be built) and reports:

  * wall time of the cold prebuild (target: <= 3 min on 16 cores), and of the warm re-run;
  * per variant: nvcc build time, .so size and whole entry size (target: <= 5 MB per variant);
  * machine: cores, memory, nvcc, torch, commit.

Prints a Markdown report (and writes it to --out) plus one JSON line (and --json-out).
Exit status 1 if a build failed or the re-run built anything; the targets are reported, not enforced
(a 2-core development machine cannot meet the 16-core time target).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TIME_TARGET_S = 180.0        # on 16 cores
SIZE_TARGET_BYTES = 5 * 10**6  # per variant
MATRIX = ["--family", "prefill", "--layout", "ragged"]


def _prebuild(cache_dir: Path, arch: str, jobs: int | None) -> tuple[float, dict[str, Any], str]:
    cmd = [sys.executable, "-m", "flashinfer_jit", "prebuild", *MATRIX, "--arch", arch, "--cache-dir", str(cache_dir),
           "--json"]
    if jobs:
        cmd += ["--jobs", str(jobs)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["PYTHONWARNINGS"] = "ignore"
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"prebuild did not print a JSON report (exit {proc.returncode})")
    return wall, report, proc.stderr


def _machine() -> dict[str, Any]:
    import torch

    from flashinfer_jit import toolchain
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemTotal:"))
    except (OSError, StopIteration):
        pass
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or os.environ.get("BENCH_COMMIT", "unknown")
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "flashinfer_jit", "templates"],
                           capture_output=True, text=True).stdout.strip()
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cores": os.cpu_count(), "cpu": cpu, "memory_bytes": mem, "nvcc": toolchain.nvcc_version(),
        "torch": torch.__version__, "python": platform.python_version(), "commit": commit + ("+dirty" if dirty else ""),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def _markdown(result: dict[str, Any]) -> str:
    m, cold, warm = result["machine"], result["cold"], result["warm"]
    kernels = sorted(cold["report"]["kernels"], key=lambda k: k["uri"])
    summary = cold["report"]["summary"]
    mem = f"{m['memory_bytes'] / 2**30:.0f} GiB" if m["memory_bytes"] else "?"
    nvcc = (m["nvcc"] or "none").split(" | ")[0]
    max_entry = max((k["disk_bytes"] for k in kernels), default=0)
    lines = [
        f"# prebuild of the ragged prefill matrix ({len(kernels)} variants)",
        "",
        f"- machine: {m['cores']} cores ({m['cpu']}), {mem} RAM, GPUs: {', '.join(m['gpus']) or 'none'}",
        f"- nvcc: {nvcc}; torch {m['torch']}; Python {m['python']}; target sm_{result['arch']}",
        f"- commit: {m['commit']}; date: {m['date']}; 1-min load average before the run: "
        f"{m['load_average']:.2f}" if m["load_average"] is not None else f"- commit: {m['commit']}; date: {m['date']}",
        f"- command: `python -m flashinfer_jit prebuild {' '.join(MATRIX)} --arch {result['arch']} --cache-dir "
        f"<fresh dir> --json`{' --jobs ' + str(result['jobs']) if result['jobs'] else ''} (jobs used: "
        f"{cold['report']['jobs']})",
        "",
        "| run | wall (whole command) | built | cached | failed | target |",
        "|---|---|---|---|---|---|",
        f"| cold (fresh cache) | {cold['wall_s']:.1f} s | {summary['built']} | {summary['cached']} | "
        f"{summary['failed']} | <= {TIME_TARGET_S:.0f} s on 16 cores: "
        f"{'met' if cold['wall_s'] <= TIME_TARGET_S else 'not met'} here ({m['cores']} cores) |",
        f"| warm re-run | {warm['wall_s']:.1f} s | {warm['report']['summary']['built']} | "
        f"{warm['report']['summary']['cached']} | {warm['report']['summary']['failed']} | nothing built |",
        "",
        f"Disk: {summary['disk_bytes'] / 1e6:.2f} MB for {len(kernels)} variants, "
        f"{summary['disk_bytes_per_variant'] / 1e6:.2f} MB per variant on average, largest entry "
        f"{max_entry / 1e6:.2f} MB (target <= {SIZE_TARGET_BYTES / 1e6:.0f} MB per variant: "
        f"{'met' if max_entry <= SIZE_TARGET_BYTES else 'NOT met'}). An entry is the .so plus its manifest, "
        f"generated source and build log.",
        "",
        "| variant | nvcc build (in parallel) | .so | entry |",
        "|---|---|---|---|",
    ]
    for k in kernels:
        lines.append(f"| {k['uri']} | {k['seconds']:.1f} s | {k['so_bytes'] / 1e6:.2f} MB | "
                     f"{k['disk_bytes'] / 1e6:.2f} MB |")
    serial = sum(k["seconds"] for k in kernels)
    lines += ["", f"Sum of per-variant build times: {serial:.1f} s (the parallel wall time above includes "
                  f"Python/torch start-up and key computation: {cold['wall_s'] - cold['report']['summary']['seconds']:.1f} s "
                  f"outside the build phase)."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, help="passed to prebuild --jobs (default: prebuild's own choice)")
    parser.add_argument("--arch", default="90a")
    parser.add_argument("--cache-dir", type=Path, help="fresh cache directory (must be missing or empty)")
    parser.add_argument("--out", type=Path, help="write the Markdown report here")
    parser.add_argument("--json-out", type=Path, help="write the JSON result here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary cache directory")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    machine = _machine()
    owned = args.cache_dir is None
    cache_dir = Path(tempfile.mkdtemp(prefix="fij-prebuild-times.")) / "cache" if owned else args.cache_dir
    if cache_dir.exists() and any(cache_dir.iterdir()):
        raise SystemExit(f"--cache-dir {cache_dir} is not empty: the cold run needs a fresh cache")
    try:
        cold_wall, cold, cold_log = _prebuild(cache_dir, args.arch, args.jobs)
        sys.stderr.write(cold_log)
        for k in cold["kernels"]:
            entry = Path(k["entry"]) if k["entry"] else None
            k["so_bytes"] = sum(p.stat().st_size for p in entry.glob("*.so")) if entry else 0
        warm_wall, warm, _ = _prebuild(cache_dir, args.arch, args.jobs)
    finally:
        if owned and not args.keep:
            shutil.rmtree(cache_dir.parent, ignore_errors=True)
    result = {"arch": args.arch, "jobs": args.jobs, "machine": machine,
              "cold": {"wall_s": round(cold_wall, 2), "report": cold},
              "warm": {"wall_s": round(warm_wall, 2), "report": warm}}
    text = _markdown(result)
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))
    print(json.dumps({"cold_wall_s": result["cold"]["wall_s"], "warm_wall_s": result["warm"]["wall_s"],
                      "variants": len(cold["kernels"]), "failed": cold["summary"]["failed"],
                      "bytes_per_variant": cold["summary"]["disk_bytes_per_variant"],
                      "warm_built": warm["summary"]["built"]}))
    return 1 if cold["summary"]["failed"] or warm["summary"]["built"] else 0


if __name__ == "__main__":
    sys.exit(main())
