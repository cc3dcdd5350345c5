"""Cold build and warm load times of kernel libraries, each measured in a fresh Python process.

    PYTHONPATH=. python3 benchmarks/measure_build.py [--cache-dir DIR] [--out DIR] [--warm-runs N] [--timeout S]
    PYTHONPATH=. python3 benchmarks/measure_build.py --warm-all [--jobs N] [--families prefill,merge_state] [--out DIR]

Default mode: with a fresh FLASHINFER_JIT_CACHE_DIR (a new temporary directory, or --cache-dir, which
must be missing or empty), for MergeStateSpec(128, 'bf16') and PrefillSpec('ragged', 128, 'bf16', True):
  cold: a new process loads the spec into the empty cache (a full nvcc build);
  warm: --warm-runs new processes load it again from the now warm cache (no build).
Each child reports the time of the loader.load() call alone (and its imports); the parent reports
the whole process wall time. Writes <out>/<card>-<date>-build.json.

--warm-all: builds every spec the GPU tests need (PrefillSpec.supported() with kv_layout 'ragged',
plus every MergeStateSpec) in parallel with a ProcessPoolExecutor, each worker calling
flashinfer_jit.loader.load(spec), into the cache named by FLASHINFER_JIT_CACHE_DIR. Writes
<out>/<card>-<date>-warm.json.

Children get os.environ plus the cache dir and PYTHONPATH (this checkout first). On --timeout every
process this script started (with its nvcc children) is killed and the JSON still written.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_SPECS = (
    {"family": "merge_state", "head_dim": 128, "dtype": "bf16"},
    {"family": "prefill", "kv_layout": "ragged", "head_dim": 128, "dtype": "bf16", "causal": True},
)

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
from flashinfer_jit import loader
from flashinfer_jit.spec import spec_from_dict
t2 = time.perf_counter()
spec = spec_from_dict(json.loads(sys.argv[1]))
t3 = time.perf_counter()
kernel = loader.load(spec)
t4 = time.perf_counter()
print("FIJ_RESULT " + json.dumps({
    "uri": spec.uri, "load_s": t4 - t3, "import_torch_s": t1 - t0, "import_flashinfer_jit_s": t2 - t1,
    "builds_in_process": loader.build_count, "library": str(kernel.entry.library),
    "library_bytes": kernel.entry.manifest.get("size"), "manifest_build_s": kernel.entry.manifest.get("build_seconds"),
}), flush=True)
"""

_children: set[int] = set()  # process-group ids of everything we started and have not reaped


def _kill_children(sig: int = signal.SIGKILL) -> None:
    """Kill every process group we started (each child leads its own group), then the leader itself."""
    for pgid in list(_children):
        for kill in (os.killpg, os.kill):
            try:
                kill(pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        _children.discard(pgid)


def _on_term(signum, frame):  # noqa: ARG001
    print(f"measure_build: signal {signum}: killing {len(_children)} child process group(s)", flush=True)
    _kill_children()
    sys.stderr.flush()
    os._exit(128 + signum)  # not sys.exit: that would wait on a process pool whose workers just died


def child_env(cache_dir: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["PYTHONWARNINGS"] = "ignore"
    if cache_dir is not None:
        env["FLASHINFER_JIT_CACHE_DIR"] = str(cache_dir)
    return env


def run_child(spec: dict[str, Any], cache_dir: Path, timeout: float) -> dict[str, Any]:
    """One fresh process loading `spec`; its own session so a timeout kills nvcc too."""
    timeout = max(1.0, timeout)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(spec)], env=child_env(cache_dir),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _children.add(proc.pid)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_children()
        proc.communicate()
        return {"error": f"timed out after {timeout:.0f} s", "process_s": round(time.perf_counter() - t0, 3)}
    finally:
        _children.discard(proc.pid)
    process_s = time.perf_counter() - t0
    result: dict[str, Any] = {"process_s": round(process_s, 3), "returncode": proc.returncode}
    for line in stdout.splitlines():
        if line.startswith("FIJ_RESULT "):
            result.update(json.loads(line[len("FIJ_RESULT "):]))
    if proc.returncode != 0 or "load_s" not in result:
        result["error"] = (stderr or stdout).strip()[-3000:] or f"exit code {proc.returncode}"
    for key in ("load_s", "import_torch_s", "import_flashinfer_jit_s"):
        if key in result:
            result[key] = round(result[key], 4)
    return result


def _provenance() -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import common  # noqa: E402  (imports torch)
    from flashinfer_jit import toolchain

    return {
        "card": common.card_slug(),
        "date": common.today(),
        "commit": common.git_commit(),
        "torch": common.environment().get("torch"),
        "nvcc": toolchain.nvcc_version(),
        "cpu_count": os.cpu_count(),
        "max_jobs_env": os.environ.get("MAX_JOBS"),
    }


def _fresh_cache_dir(path: str | None) -> Path:
    if path is None:
        return Path(tempfile.mkdtemp(prefix="fij-measure-build-"))
    p = Path(path).expanduser().absolute()
    if p.exists() and any(p.iterdir()):
        raise SystemExit(f"--cache-dir {p} is not empty: a cold build needs an empty cache")
    return p


def measure(args: argparse.Namespace) -> int:
    deadline = time.perf_counter() + args.timeout
    cache_dir = _fresh_cache_dir(args.cache_dir)
    info = _provenance()
    report: dict[str, Any] = {**info, "cache_dir": str(cache_dir), "warm_runs": args.warm_runs, "specs": []}
    out_path = Path(args.out) / f"{info['card']}-{info['date']}-build.json"
    print(f"measure_build: cache {cache_dir} | nvcc {info['nvcc']} | {info['cpu_count']} cores", flush=True)
    ok = True
    for spec in DEFAULT_SPECS:
        entry: dict[str, Any] = {"spec": spec}
        report["specs"].append(entry)
        cold = run_child(spec, cache_dir, deadline - time.perf_counter())
        entry["uri"] = cold.get("uri")
        entry["cold"] = cold
        if "error" in cold:
            ok = False
            print(f"  {spec}: cold build FAILED: {cold['error'][-1500:]}", flush=True)
            _write(out_path, report)
            continue
        if cold.get("builds_in_process") != 1:
            cold["warning"] = f"expected 1 build in the cold process, saw {cold.get('builds_in_process')}"
        warm = []
        for _ in range(args.warm_runs):
            w = run_child(spec, cache_dir, deadline - time.perf_counter())
            if "error" not in w and w.get("builds_in_process") != 0:
                w["error"] = f"warm process rebuilt the kernel ({w.get('builds_in_process')} builds)"
            warm.append(w)
        entry["warm"] = warm
        good = [w for w in warm if "error" not in w]
        if len(good) != len(warm):
            ok = False
        if good:
            entry["warm_load_s_median"] = round(statistics.median(w["load_s"] for w in good), 4)
            entry["warm_process_s_median"] = round(statistics.median(w["process_s"] for w in good), 3)
        print(f"  {entry['uri']}: cold load {cold['load_s']:.2f} s (process {cold['process_s']:.2f} s, "
              f"nvcc build {cold.get('manifest_build_s')} s, {cold.get('library_bytes')} bytes); warm load "
              f"{entry.get('warm_load_s_median')} s (process {entry.get('warm_process_s_median')} s, "
              f"median of {len(good)})", flush=True)
        _write(out_path, report)
    _write(out_path, report)
    print(f"wrote {out_path}", flush=True)
    return 0 if ok else 1


# ---- --warm-all ----------------------------------------------------------------------------------

def _worker_init() -> None:
    os.setpgrp()  # our own process group: the parent can kill this worker with its nvcc children


def _warm_one(spec_dict: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    result: dict[str, Any] = {"pid": os.getpid()}
    try:
        from flashinfer_jit import loader
        from flashinfer_jit.spec import spec_from_dict

        spec = spec_from_dict(spec_dict)
        result["uri"] = spec.uri
        builds_before = loader.build_count
        kernel = loader.load(spec)
        result["built"] = loader.build_count > builds_before
        result["manifest_build_s"] = kernel.entry.manifest.get("build_seconds")
    except BaseException as exc:  # noqa: BLE001 - reported, never raised across the pool
        result["error"] = f"{type(exc).__name__}: {exc}"[-3000:]
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def test_specs(families: list[str] | None = None) -> list[Any]:
    from flashinfer_jit.spec import MergeStateSpec, PrefillSpec

    specs = [s for s in PrefillSpec.supported() if s.kv_layout == "ragged"] + list(MergeStateSpec.supported())
    if families:
        specs = [s for s in specs if s.family in families]
    # Longest first (LPT): prefill before merge_state, larger head_dim first.
    return sorted(specs, key=lambda s: (s.family != "prefill", -s.head_dim, s.uri))


def warm_all(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    families = [f.strip() for f in args.families.split(",")] if args.families else None
    specs = test_specs(families)
    jobs = args.jobs or min(len(specs), os.cpu_count() or 1)
    jobs = max(1, jobs)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # spawned workers: no import-time warning noise
    if not os.environ.get("MAX_JOBS"):
        os.environ["MAX_JOBS"] = str(max(1, (os.cpu_count() or 1) // jobs))  # nvcc jobs per build
    info = _provenance()
    cache = os.environ.get("FLASHINFER_JIT_CACHE_DIR")
    report: dict[str, Any] = {**info, "mode": "warm-all", "cache_dir": cache, "jobs": jobs,
                              "max_jobs_per_build": os.environ["MAX_JOBS"], "results": [], "pending": []}
    out_path = Path(args.out) / f"{info['card']}-{info['date']}-warm.json"
    print(f"warm-all: {len(specs)} specs, {jobs} workers, MAX_JOBS={os.environ['MAX_JOBS']} per build, cache {cache}",
          flush=True)
    ctx = multiprocessing.get_context("spawn")
    pool = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init)
    futures = {pool.submit(_warm_one, s.to_dict()): s.uri for s in specs}
    for pid in list(getattr(pool, "_processes", {}) or {}):
        _children.add(pid)  # killed (with their nvcc children) if we are terminated
    try:
        for fut in cf.as_completed(futures, timeout=args.timeout):
            res = fut.result()
            res.setdefault("uri", futures[fut])
            report["results"].append(res)
            status = "FAILED " + res["error"][-800:] if "error" in res else ("built" if res.get("built") else "cached")
            print(f"  {res['seconds']:7.1f} s  {res['uri']}: {status}", flush=True)
    except cf.TimeoutError:
        done = {r["uri"] for r in report["results"]}
        report["pending"] = [uri for uri in futures.values() if uri not in done]
        print(f"warm-all: timed out after {args.timeout:.0f} s; unfinished: {', '.join(report['pending'])}", flush=True)
    finally:
        if report["pending"]:
            for pid in list(getattr(pool, "_processes", {}) or {}):
                _children.add(pid)
            _kill_children()
        pool.shutdown(wait=not report["pending"], cancel_futures=True)
        _children.clear()
    report["wall_s"] = round(time.perf_counter() - start, 1)
    failed = [r for r in report["results"] if "error" in r]
    report["ok"] = not failed and not report["pending"]
    _write(out_path, report)
    print(f"warm-all: {len(report['results']) - len(failed)} ok, {len(failed)} failed, {len(report['pending'])} "
          f"unfinished in {report['wall_s']} s; wrote {out_path}", flush=True)
    return 0 if report["ok"] else 1


def _write(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="directory for the JSON report")
    p.add_argument("--cache-dir", default=None,
                   help="fresh cache root for the cold/warm measurement (must be missing or empty; default: a new temp dir)")
    p.add_argument("--warm-runs", type=int, default=3, help="warm-load processes per spec (default 3)")
    p.add_argument("--timeout", type=float, default=600, help="seconds for the whole run (default 600)")
    p.add_argument("--warm-all", action="store_true", help="build every spec the GPU tests need, in parallel")
    p.add_argument("--jobs", type=int, default=None, help="--warm-all workers (default: min(specs, cores))")
    p.add_argument("--families", default=None, help="--warm-all: only these families (e.g. merge_state)")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_term)
    return warm_all(args) if args.warm_all else measure(args)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # do not wait on a process pool whose workers a timeout killed
