"""Quick first look at one prefill backend on the GPU: a few ragged batches against the float32
reference (max |diff| of out and LSE per case), then one timing. Meant as the first step of a device
run after kernel changes (a wrong barrier hangs: run it under `timeout`); the GPU test suite is the
real check.

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
    args = ap.parse_args()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    workspace = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    failures = 0
    for head_dim in map(int, args.head_dims.split(",")):
        for dtype_name in args.dtypes.split(","):
            dtype = dtypes[dtype_name]
            for i, (q_lens, kv_lens, group, causal) in enumerate(CASES):
                batch = ref.make_ragged_batch(q_lens, kv_lens, 2 * group, 2, head_dim, dtype, "cuda", "NHD", 10 + i)
                w = flashinfer_jit.BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD", backend=args.backend)
                t0 = time.perf_counter()
                w.plan(batch.qo_indptr, batch.kv_indptr, batch.num_qo_heads, batch.num_kv_heads, head_dim,
                       causal=causal, q_data_type=dtype)
                out = torch.full_like(batch.q, float("nan"))
                lse = torch.full((batch.total_q, batch.num_qo_heads), float("nan"), device="cuda")
                w.run(batch.q, batch.k, batch.v, out=out, lse=lse, return_lse=True)
                torch.cuda.synchronize()
                seconds = time.perf_counter() - t0
                ref_out, ref_lse = batch.reference(causal)
                d_out = (out.float() - ref_out).abs().nan_to_num(float("inf")).max().item() if out.numel() else 0.0
                finite = torch.isfinite(ref_lse)
                d_lse = ((lse - ref_lse).abs()[finite].nan_to_num(float("inf")).max().item()
                         if finite.any() else 0.0)
                ok = d_out < 3e-2 and d_lse < 3e-2
                failures += not ok
                print(f"{'ok  ' if ok else 'FAIL'} hd{head_dim} {dtype_name} case {i} q={q_lens} kv={kv_lens} g={group} "
                      f"causal={causal} backend={w.backend}: |d out| {d_out:.3g} |d lse| {d_lse:.3g} "
                      f"({seconds * 1e3:.0f} ms incl. build)", flush=True)
    print(f"{failures} failing case(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
