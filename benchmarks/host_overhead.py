"""Host-side cost of plan() and run() per prefill backend (GPU needed).

run() is timed on a batch small enough that the GPU finishes each kernel before the host issues the next,
so calls/second is bounded by the host: the per-call time is Python dispatch + argument checks + (sm90)
the tensor-map encoding + the launch. Printed side by side for fa2 and sm90 (ragged and paged, NHD) and
written as JSON with --out.

    PYTHONPATH=. python benchmarks/host_overhead.py [--calls 2000] [--profile] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common  # noqa: E402
from tests import reference  # noqa: E402

WORKSPACE_BYTES = 128 << 20


def _per_call_us(fn, calls: int) -> dict[str, float]:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(5):
        t0 = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        samples.append((time.perf_counter_ns() - t0) / 1e3 / calls)
    samples.sort()
    return {"median_us": round(samples[len(samples) // 2], 2), "min_us": round(samples[0], 2)}


PROFILE = False  # --profile: where run()'s host time goes (cProfile, top entries by own time)


def _profile(label: str, fn, calls: int) -> None:
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
    print(f"--- {label}: {calls} calls, cProfile by own time (profiler overhead included)\n{out.getvalue()}")


def _kernel_us(fn) -> float:
    return round(common.bench_ms(fn, warmup=10, rep=50) * 1e3, 2)


def measure(backend: str, layout: str, calls: int) -> dict:
    import flashinfer_jit

    q_lens = kv_lens = [64, 64, 64, 64]  # small: the host, not the GPU, bounds the call rate
    hq, hk, d = 32, 8, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    total = sum(q_lens)
    q = torch.randn(total, hq, d, device="cuda", dtype=common.DTYPE, generator=g)
    workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")
    qo = reference.make_indptr(q_lens)
    out = torch.empty_like(q)
    if layout == "ragged":
        k = torch.randn(total, hk, d, device="cuda", dtype=common.DTYPE, generator=g)
        v = torch.randn_like(k)
        w = flashinfer_jit.BatchPrefillWithRaggedKVCacheWrapper(workspace, kv_layout="NHD", backend=backend)

        def plan():
            w.plan(qo, reference.make_indptr(kv_lens), hq, hk, d, causal=True, q_data_type=common.DTYPE)

        def run():
            return w.run(q, k, v, out=out)
    else:
        page = 16
        table = reference.make_page_table(kv_lens, page, extra_pages=4, seed=1)
        cache = reference.new_paged_cache(table.num_pages, page, hk, d, common.DTYPE, "cuda", "NHD", fill=0.5)
        w = flashinfer_jit.BatchPrefillWithPagedKVCacheWrapper(workspace, kv_layout="NHD", backend=backend)

        def plan():
            w.plan(qo, table.indptr, table.indices, table.last_page_len, hq, hk, d, page, causal=True,
                   q_data_type=common.DTYPE)

        def run():
            return w.run(q, cache, out=out)

    plan()
    torch.cuda.synchronize()
    if PROFILE:
        _profile(f"{backend} {layout} run()", run, calls)
    plan_times = []
    for _ in range(200):
        t0 = time.perf_counter_ns()
        plan()
        plan_times.append((time.perf_counter_ns() - t0) / 1e3)
    torch.cuda.synchronize()
    plan_times.sort()
    return {"backend": w.backend, "layout": layout, "run_host": _per_call_us(run, calls),
            "kernel_us": _kernel_us(run), "plan_median_us": round(plan_times[len(plan_times) // 2], 2)}


def main(argv: "list[str] | None" = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--profile", action="store_true", help="also print a cProfile of run() per case")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    global PROFILE
    PROFILE = args.profile
    if not torch.cuda.is_available():
        print("host_overhead.py needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    for layout in ("ragged", "paged"):
        for backend in ("fa2", "sm90"):
            try:
                r = measure(backend, layout, args.calls)
            except Exception as e:  # noqa: BLE001 - report and go on (e.g. sm90 on a non-Hopper card)
                r = {"backend": backend, "layout": layout, "error": f"{type(e).__name__}: {e}"}
            rows.append(r)
            print(json.dumps(r), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        payload = {"card": torch.cuda.get_device_name(), "date": common.today(), "commit": common.git_commit(),
                   "rows": rows}
        common.write_json(args.out / f"{common.card_slug()}-{common.today()}-host.json", payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
