"""Decode diagnostics on the GPU (what benchmarks/NOTES.md's decode analysis came from):

* the read-bandwidth ceiling for the decode cache sizes (a read-only x.sum(), clean-L2 timing);
* the decode workloads of bench_decode.py, eager / graph-sized grid / CUDA-graph replay, both timings;
* per-CTA traces from a -DFIJ_TRACE build (a separate cache entry): SM placement, start skew, main-loop
  end, split-KV merge start and end of every CTA, and the slowest CTAs.

    PYTHONPATH=. python3 benchmarks/decode_diag.py [--quick]
"""
import ctypes
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_decode as bd  # noqa: E402
import common  # noqa: E402

from flashinfer_jit import batch_attention, kernels, loader  # noqa: E402

QUICK = "--quick" in sys.argv
REPS = 30 if QUICK else 100
ORIG_CHOOSE = batch_attention._choose_cta_q


def set_flags(flags: str, cta_q):
    os.environ["FLASHINFER_JIT_EXTRA_CUDAFLAGS"] = flags
    loader.clear_memo()
    kernels._variants.clear()
    batch_attention._choose_cta_q = ORIG_CHOOSE if cta_q is None else (lambda options, rows, batch: cta_q)


def read_bw(copy_clean):
    for mb in (134, 268, 1074):
        x = torch.randn(mb * 1000 * 1000 // 4, device="cuda")
        ms = bd.clean_l2_ms(lambda: x.sum(), REPS)
        gbps = x.numel() * 4 / ms / 1e6
        print(f"read-only sum of {mb} MB: {ms * 1e3:.1f} us, {gbps:.0f} GB/s = {100 * gbps / copy_clean:.1f}% of copy (clean)")
        del x


def make_wrapper(data, graph=False):
    w = bd._new_decode_wrapper(use_cuda_graph=graph)
    bd._plan_decode(w, data)
    return w


def timed(data, w, label, copy_dirty, copy_clean, capture=False):
    q, cache = data.batch.q, data.batch.cache
    out = torch.full_like(q, float("nan"))
    w.run(q, cache, out=out)
    torch.cuda.synchronize()
    err = (out.float() - data.ref_out).abs().max().item()
    fn = lambda: w.run(q, cache, out=out)  # noqa: E731
    if capture:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            w.run(q, cache, out=out)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            w.run(q, cache, out=out)
        fn = g.replay
    dirty = common.bench_ms(fn, warmup=10, rep=REPS)
    clean = bd.clean_l2_ms(fn, REPS)
    nb = data.wl.bytes
    s = w._inner._state
    print(f"  {label:<34} clean {clean * 1e3:7.1f} us {100 * nb / clean / 1e6 / copy_clean:5.1f}% | dirty "
          f"{dirty * 1e3:7.1f} us {100 * nb / dirty / 1e6 / copy_dirty:5.1f}% | cta_q {s.params.cta_q} grid "
          f"{s.grid_items}x{s.num_kv_heads} | max|d| {err:.3g}", flush=True)
    return fn


def trace(data, w, label, capture=False):
    s = w._inner._state
    grid = s.grid_items * s.num_kv_heads
    buf = torch.zeros(grid * 8, dtype=torch.int64, device="cuda")
    s.kernel.function("set_trace", [ctypes.c_void_p])(buf.data_ptr())
    q, cache = data.batch.q, data.batch.cache
    out = torch.empty_like(q)
    sweep = torch.ones(256 << 20, dtype=torch.uint8, device="cuda")
    for _ in range(3):
        sweep.max()
        w.run(q, cache, out=out)
        torch.cuda.synchronize()
    t = buf.view(grid, 8).cpu().clone()
    s.kernel.function("set_trace", [ctypes.c_void_p])(None)
    start, loop_end, merge_begin, end, sm, item = (t[:, i] for i in range(6))
    real = item >= 0
    t0 = start[real].min()
    us = lambda x: (x - t0).double() / 1e3  # noqa: E731
    rs, le, re_ = us(start[real]), us(loop_end[real]), us(end[real])
    body = le - rs
    per_sm = torch.bincount(sm[real], minlength=132)
    merged = real & (merge_begin > 0)
    print(f"  trace {label}: grid {grid}, real {int(real.sum())} on {int((per_sm > 0).sum())} SMs "
          f"(max {int(per_sm.max())}/SM); start {rs.min():.1f}..{rs.max():.1f} us; body min/med/max "
          f"{body.min():.1f}/{body.median():.1f}/{body.max():.1f}; loop end->end med/max {(re_ - le).median():.1f}/"
          f"{(re_ - le).max():.1f}; last end {re_.max():.1f}; ends p10/p50/p90 {re_.quantile(.1):.1f}/"
          f"{re_.median():.1f}/{re_.quantile(.9):.1f}", flush=True)
    if merged.any():
        mb, me, ml = us(merge_begin[merged]), us(end[merged]), us(loop_end[merged])
        print(f"    {int(merged.sum())} merging CTAs: loop end {ml.min():.1f}..{ml.max():.1f}, merge start "
              f"{mb.min():.1f}..{mb.max():.1f}, end {me.min():.1f}..{me.max():.1f} (merge {(me - mb).median():.1f} us)")
    order = torch.argsort(end[real], descending=True)[:10]
    idx = torch.nonzero(real).flatten()[order]
    for i in idx.tolist():
        print(f"    slow: block {i} item {int(item[i])} sm {int(sm[i])} start {us(start[i]):.1f} loop_end "
              f"{us(loop_end[i]):.1f} merge {us(merge_begin[i]) if merge_begin[i] > 0 else '-'} end {us(end[i]):.1f}")


def main():
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    copy_dirty = 2 * x.numel() / common.bench_ms(lambda: y.copy_(x), warmup=10, rep=REPS) / 1e6
    copy_clean = 2 * x.numel() / bd.clean_l2_ms(lambda: y.copy_(x), REPS) / 1e6
    del x, y
    torch.cuda.empty_cache()
    print(f"copy: {copy_dirty:.0f} GB/s (do_bench) {copy_clean:.0f} GB/s (clean)")
    read_bw(copy_clean)
    datas = [bd.make_data(wl) for wl in bd.WORKLOADS]
    configs = [("q16 s3", "", None)]
    for name, flags, cta_q in configs:
        set_flags(flags, cta_q)
        t = time.time()
        make_wrapper(datas[0])
        print(f"== {name} (flags '{flags}', load {time.time() - t:.1f} s)", flush=True)
        for data in datas:
            print(f" {data.wl.name}")
            timed(data, make_wrapper(data), "eager", copy_dirty, copy_clean)
            if name in ("q64 s3", "q16 s3"):
                timed(data, make_wrapper(data, graph=True), "graph wrapper, eager launch", copy_dirty, copy_clean)
                timed(data, make_wrapper(data, graph=True), "graph replay", copy_dirty, copy_clean, capture=True)
    for name, cta_q in (("q16", None),):
        set_flags("-DFIJ_TRACE", cta_q)
        print(f"== trace {name}", flush=True)
        for data in datas[:2]:
            print(f" {data.wl.name}")
            trace(data, make_wrapper(data), "eager")
            trace(data, make_wrapper(data, graph=True), "graph-sized grid")


if __name__ == "__main__":
    main()
