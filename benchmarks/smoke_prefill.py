"""Quick first look at one prefill backend on the GPU: a few ragged batches against the float32
reference (max |diff| of out and LSE per case). Meant as the first step of a device
run after kernel changes (a wrong barrier hangs: run it under `timeout`); every case also runs on a
paged cache (--pages, default 16). The GPU test suite is the real check.

    PYTHONPATH=. timeout 300 python3 benchmarks/smoke_prefill.py [--backend sm90] [--head-dims 64,128,256]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import reference as ref  # noqa: E402

import flashinfer_jit  # noqa: E402

CASES = [  # (q_lens, kv_lens, group, causal)
    ([1], [1], 1, False),
    ([17], [17], 1, True),
    ([130, 5], [130, 300], 4, True),
    ([129, 0, 63, 1000], [129, 17, 15, 1000], 8, True),
    ([200, 33], [700, 33], 4, False),
]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="sm90")
    ap.add_argument("--head-dims", default="128,64,256")
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument("--pages", default="16",
                    help="page sizes of the paged runs (NHD, shuffled pages, NaN in every unowned slot); '' for none")
    args = ap.parse_args()
    page_sizes = [int(x) for x in args.pages.split(",") if x]
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    workspace = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    failures = 0
    for head_dim in map(int, args.head_dims.split(",")):
        for dtype_name in args.dtypes.split(","):
            dtype = dtypes[dtype_name]
            for i, (q_lens, kv_lens, group, causal) in enumerate(CASES):
                batch = ref.make_ragged_batch(q_lens, kv_lens, 2 * group, 2, head_dim, dtype, "cuda", "NHD", 10 + i)
                ref_out, ref_lse = batch.reference(causal)
                for page_size in [0] + page_sizes:  # 0: ragged K/V
                    failures += not run_case(args.backend, workspace, batch, head_dim, dtype_name, dtype, i, group,
                                             causal, page_size, ref_out, ref_lse)
    print(f"{failures} failing case(s)")
    return 1 if failures else 0


def run_case(backend, workspace, batch, head_dim, dtype_name, dtype, i, group, causal, page_size, ref_out,
             ref_lse) -> bool:
    """One case on ragged K/V (page_size 0) or on a paged cache; prints its line, returns whether it passed."""
    out = torch.full_like(batch.q, float("nan"))
    lse = torch.full((batch.total_q, batch.num_qo_heads), float("nan"), device="cuda")
    t0 = time.perf_counter()
    if page_size:
        table = ref.make_page_table(batch.kv_lens, page_size, extra_pages=3, seed=i)
        cache = ref.new_paged_cache(table.num_pages, page_size, batch.num_kv_heads, head_dim, dtype,
                                    "cuda", "NHD")  # NaN: a slot no request owns poisons the output
        pages, slots = ref.token_page_slots(table.indptr, table.indices, batch.kv_lens, page_size)
        ref.scatter_to_pages(cache, batch.k, batch.v, pages, slots, "NHD")
        w = flashinfer_jit.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend=backend)
        w.plan(batch.qo_indptr, table.indptr, table.indices, table.last_page_len, batch.num_qo_heads,
               batch.num_kv_heads, head_dim, page_size, causal=causal, q_data_type=dtype)
        w.run(batch.q, cache, out=out, lse=lse, return_lse=True)
    else:
        w = flashinfer_jit.BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD", backend=backend)
        w.plan(batch.qo_indptr, batch.kv_indptr, batch.num_qo_heads, batch.num_kv_heads, head_dim,
               causal=causal, q_data_type=dtype)
        w.run(batch.q, batch.k, batch.v, out=out, lse=lse, return_lse=True)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    d_out = (out.float() - ref_out).abs().nan_to_num(float("inf")).max().item() if out.numel() else 0.0
    finite = torch.isfinite(ref_lse)
    d_lse = ((lse - ref_lse).abs()[finite].nan_to_num(float("inf")).max().item()
             if finite.any() else 0.0)
    ok = d_out < 3e-2 and d_lse < 3e-2
    kv = f"page {page_size}" if page_size else "ragged"
    print(f"{'ok  ' if ok else 'FAIL'} hd{head_dim} {dtype_name} case {i} q={batch.q_lens} kv={batch.kv_lens} "
          f"g={group} causal={causal} {kv} backend={w.backend}: |d out| {d_out:.3g} |d lse| {d_lse:.3g} "
          f"({seconds * 1e3:.0f} ms incl. build)", flush=True)
    return ok


if __name__ == "__main__":
    sys.exit(main())
