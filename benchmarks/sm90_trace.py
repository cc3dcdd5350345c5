"""Where the sm90 prefill kernel's time goes, from a per-unit globaltimer trace (GPU needed).

Builds the sm90 kernels with -DFIJ_TRACE (a separate cache entry; add the switches to study with
--flags) and runs bench_prefill's workloads once each. Consumer thread 0 of every persistent CTA
records, per work unit, {start, Q landed, main loop end, epilogue end, tiles} (trace.cuh, UnitTrace).
Printed per workload:

  * the per-tile cost b and the fixed per-unit cost a of the main loop (least squares over the units:
    loop time = a + b * tiles), the median wait for Q and epilogue time, and all of a unit's fixed costs
    in tiles ((a + wait + epilogue) / b): what a unit costs beyond its tiles;
  * the tail: the spread of the CTAs' end times and makespan / mean CTA busy time (static imbalance);
  * the steady-state TFLOP/s one tile's cost implies on all SMs, next to the measured run.

    PYTHONPATH=. python3 benchmarks/sm90_trace.py [--flags "-DFIJ_SM90_PINGPONG=0"] [--workloads a,b] [--paged]
                                                  [--out DIR]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import common  # noqa: E402
from tests import reference  # noqa: E402

MAX_UNITS = 256  # trace.cuh UnitTrace::kMaxUnits
FIELDS = 8


PAGE_SIZE = 16  # --paged: bench_prefill's page size, pages shuffled


def trace_workload(wl: common.Workload, paged: bool = False) -> dict:
    import flashinfer_jit

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(wl.total_q, wl.num_qo_heads, wl.head_dim, device="cuda", dtype=common.DTYPE, generator=g)
    k = torch.randn(wl.total_kv, wl.num_kv_heads, wl.head_dim, device="cuda", dtype=common.DTYPE, generator=g)
    v = torch.randn_like(k)
    workspace = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    qo = reference.make_indptr(wl.q_lens)
    out = torch.empty_like(q)
    if paged:
        table = reference.make_page_table(wl.kv_lens, PAGE_SIZE, extra_pages=16, seed=1)
        cache = reference.new_paged_cache(table.num_pages, PAGE_SIZE, wl.num_kv_heads, wl.head_dim, common.DTYPE,
                                          "cuda", "NHD", fill=0.0)
        pages, slots = reference.token_page_slots(table.indptr, table.indices, wl.kv_lens, PAGE_SIZE)
        reference.scatter_to_pages(cache, k, v, pages, slots, "NHD")
        w = flashinfer_jit.BatchPrefillWithPagedKVCacheWrapper(workspace, kv_layout="NHD", backend="sm90")
        w.plan(qo, table.indptr, table.indices, table.last_page_len, wl.num_qo_heads, wl.num_kv_heads, wl.head_dim,
               PAGE_SIZE, causal=wl.causal, q_data_type=common.DTYPE)
        run = lambda: w.run(q, cache, out=out)  # noqa: E731
    else:
        w = flashinfer_jit.BatchPrefillWithRaggedKVCacheWrapper(workspace, kv_layout="NHD", backend="sm90")
        w.plan(qo, reference.make_indptr(wl.kv_lens), wl.num_qo_heads, wl.num_kv_heads, wl.head_dim,
               causal=wl.causal, q_data_type=common.DTYPE)
        run = lambda: w.run(q, k, v, out=out)  # noqa: E731
    untraced_ms = common.bench_ms(run, warmup=10, rep=30)
    s = w._state
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    buf = torch.zeros(sms * MAX_UNITS * FIELDS, dtype=torch.int64, device="cuda")
    set_trace = s.kernel.function("set_trace", [ctypes.c_void_p])
    set_trace(buf.data_ptr())
    for _ in range(3):
        buf.zero_()
        run()
        torch.cuda.synchronize()
    traced_ms = common.bench_ms(run, warmup=3, rep=10)
    buf.zero_()
    run()
    torch.cuda.synchronize()
    set_trace(None)
    t = buf.view(sms, MAX_UNITS, FIELDS).cpu().double()
    done = t[:, :, 3] > 0
    t0 = t[:, :, 0][done].min()
    start, qland, lend, end, tiles = (t[:, :, i] for i in (0, 1, 2, 3, 5))
    start, qland, lend, end = ((x - t0) / 1e3 for x in (start, qland, lend, end))  # us
    has_tiles = done & (tiles > 0)
    loop = (lend - qland)[has_tiles]
    n = tiles[has_tiles]
    A = torch.stack([torch.ones_like(n), n], 1)
    a, b = torch.linalg.lstsq(A, loop.unsqueeze(1)).solution.flatten().tolist()
    wait = (qland - start)[has_tiles]
    epi = (end - lend)[has_tiles]
    cta_end = torch.where(done, end, torch.zeros_like(end)).max(1).values
    active = done.any(1)
    cta_end = cta_end[active]
    cta_busy = torch.where(done, end - start, torch.zeros_like(end)).sum(1)[active]
    flops_tile = 4 * 128 * 128 * wl.head_dim  # one full 128 x 128 tile, both products
    units = int(done.sum())
    report = {
        "workload": wl.name, "kv": f"paged NHD, page {PAGE_SIZE}, shuffled" if paged else "ragged", "units": units, "ctas": int(active.sum()),
        "untraced_ms": round(untraced_ms, 4), "traced_ms": round(traced_ms, 4),
        "per_tile_us": round(b, 3), "per_unit_loop_fixed_us": round(a, 3),
        "wait_q_us_median": round(float(wait.median()), 3), "epilogue_us_median": round(float(epi.median()), 3),
        "fixed_cost_in_tiles": round((a + float(wait.median()) + float(epi.median())) / b, 2),
        "tiles_per_unit_mean": round(float(n.mean()), 2),
        "cta_end_us": {"min": round(float(cta_end.min()), 1), "p50": round(float(cta_end.median()), 1),
                       "max": round(float(cta_end.max()), 1)},
        "makespan_over_mean_busy": round(float(cta_end.max() / cta_busy.mean()), 4),
        "steady_tflops_all_sms": round(flops_tile / (b * 1e-6) * sms / 1e12, 1),
        "measured_tflops": round(wl.flops / (untraced_ms * 1e-3) / 1e12, 1),
    }
    print(json.dumps(report), flush=True)
    return report


def main(argv: "list[str] | None" = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flags", default="", help="extra -D switches besides -DFIJ_TRACE")
    ap.add_argument("--workloads", default="chat16_causal_hd128,chat16_full_hd128,dense8x4096_causal_hd128,"
                                           "long1+short31_causal_hd128,append32_prefix_causal_hd128")
    ap.add_argument("--paged", action="store_true", help="also trace the paged kernel (page 16, shuffled)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("sm90_trace.py needs a CUDA GPU", file=sys.stderr)
        return 2
    os.environ["FLASHINFER_JIT_EXTRA_CUDAFLAGS"] = f"-DFIJ_TRACE {args.flags}".strip()
    wanted = args.workloads.split(",")
    rows = [trace_workload(wl, paged) for wl in common.workloads() if wl.name in wanted
            for paged in ((False, True) if args.paged else (False,))]
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        common.write_json(args.out / f"{common.card_slug()}-{common.today()}-sm90-trace.json",
                          {"card": torch.cuda.get_device_name(), "commit": common.git_commit(), "flags": args.flags,
                           "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
