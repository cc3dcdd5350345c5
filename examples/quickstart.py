"""flashinfer-jit quickstart: build (or load) kernels, show where they are cached, then run them.

    make demo                      # or: python examples/quickstart.py

The first run compiles each kernel with nvcc (seconds each); later runs load the cached .so in
milliseconds. Building needs the CUDA toolkit but no GPU; running and checking the kernels needs a GPU.
"""
from __future__ import annotations

import logging
import sys
import time
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch without numpy installed

import torch  # noqa: E402

import flashinfer_jit  # noqa: E402
from flashinfer_jit import env, loader  # noqa: E402
from flashinfer_jit.spec import MergeStateSpec, PrefillSpec  # noqa: E402

MERGE_STATE_SPECS = [MergeStateSpec(head_dim=128, dtype="bf16"), MergeStateSpec(head_dim=128, dtype="fp16")]
# The FA2-class kernel (any sm_80+ GPU) and the Hopper one, which backend="auto" runs on compute capability
# 9.x (built here too without a GPU: a deployment image may run on either).
_HOPPER_OR_UNKNOWN = not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] == 9
PREFILL_SPECS = [PrefillSpec(kv_layout="ragged", head_dim=128, dtype="bf16", causal=True, backend=b)
                 for b in (("fa2", "sm90") if _HOPPER_OR_UNKNOWN else ("fa2",))]


def build_or_load(specs: list) -> None:
    """Load each kernel, saying whether it was built now or found in the cache, and how long it took."""
    print(f"cache root: {env.cache_dir()}")
    for spec in specs:
        builds = loader.build_count
        start = time.perf_counter()
        kernel = loader.load(spec)
        seconds = time.perf_counter() - start
        how = "built" if loader.build_count > builds else "warm load"
        print(f"  {spec.uri:<28} {how:<9} {seconds * 1e3:9.1f} ms   {kernel.entry.path}")
        loader.clear_memo()
        start = time.perf_counter()
        loader.load(spec)  # a second load from disk: what every later process pays
        print(f"  {spec.uri:<28} {'warm load':<9} {(time.perf_counter() - start) * 1e3:9.1f} ms   (again, from disk)")


def reference_merge(v_a, s_a, v_b, s_b):
    """float32 reference of merging two attention states with base-2 LSEs."""
    s = torch.logaddexp2(s_a, s_b)
    w_a, w_b = torch.exp2(s_a - s)[..., None], torch.exp2(s_b - s)[..., None]
    return w_a * v_a.float() + w_b * v_b.float(), s


def check_merge_state(specs: list) -> bool:
    ok = True
    torch.manual_seed(0)
    for spec in specs:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[spec.dtype]
        v_a = torch.randn(1000, 32, spec.head_dim, device="cuda", dtype=dtype)
        v_b = torch.randn_like(v_a)
        s_a = torch.randn(1000, 32, device="cuda") * 4
        s_b = torch.randn(1000, 32, device="cuda") * 4
        v, s = flashinfer_jit.merge_state(v_a, s_a, v_b, s_b)
        v_ref, s_ref = reference_merge(v_a, s_a, v_b, s_b)
        v_err = (v.float() - v_ref).abs().max().item()
        s_err = (s - s_ref).abs().max().item()
        good = v_err < 2e-2 and s_err < 1e-4
        ok &= good
        print(f"  merge_state {spec.uri:<28} max |v - ref| = {v_err:.2e}, max |s - ref| = {s_err:.2e}  "
              f"{'OK' if good else 'MISMATCH'}")
    return ok


# ---- batch prefill -------------------------------------------------------------------------------
def reference_attention(q, k, v, qo_indptr, kv_indptr, causal):
    """float32 reference: per request, GQA by repeating K/V heads, bottom-right aligned causal mask."""
    group = q.shape[1] // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for i in range(len(qo_indptr) - 1):
        qs, qe, ks, ke = qo_indptr[i], qo_indptr[i + 1], kv_indptr[i], kv_indptr[i + 1]
        qi = q[qs:qe].float().transpose(0, 1)
        ki = k[ks:ke].float().repeat_interleave(group, 1).transpose(0, 1)
        vi = v[ks:ke].float().repeat_interleave(group, 1).transpose(0, 1)
        scores = qi @ ki.transpose(1, 2) / q.shape[-1] ** 0.5
        if causal:
            q_pos = torch.arange(qe - qs, device=q.device)[:, None] + (ke - ks) - (qe - qs)
            scores = scores.masked_fill(torch.arange(ke - ks, device=q.device)[None, :] > q_pos, float("-inf"))
        out[qs:qe] = (scores.softmax(-1) @ vi).transpose(0, 1)
    return out


def check_prefill() -> bool:
    """Three requests of ragged lengths (one with a cached prefix), 32 query / 8 KV heads, causal."""
    torch.manual_seed(0)
    q_lens, kv_lens = [100, 1, 517], [100, 300, 1200]
    qo_indptr = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    kv_indptr = torch.tensor([0] + torch.tensor(kv_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(q_lens), 32, 128, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(sum(kv_lens), 8, 128, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    workspace = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
    wrapper = flashinfer_jit.BatchPrefillWithRaggedKVCacheWrapper(workspace, kv_layout="NHD")
    wrapper.plan(qo_indptr, kv_indptr, num_qo_heads=32, num_kv_heads=8, head_dim=128, causal=True,
                 q_data_type=torch.bfloat16)
    out, lse = wrapper.run(q, k, v, return_lse=True)
    ref = reference_attention(q, k, v, qo_indptr.tolist(), kv_indptr.tolist(), causal=True)
    err = (out.float() - ref).abs().max().item()
    good = err < 2e-2 and bool(torch.isfinite(lse).all())
    print(f"  BatchPrefillWithRaggedKVCacheWrapper, backend {wrapper.backend} (q {q_lens}, kv {kv_lens}): "
          f"max |out - ref| = {err:.2e}  "
          f"{'OK' if good else 'MISMATCH'}")
    return good


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(f"flashinfer-jit {flashinfer_jit.__version__}, torch {torch.__version__} (CUDA {torch.version.cuda})")

    print("\n1. build or load the kernels")
    build_or_load(MERGE_STATE_SPECS + PREFILL_SPECS)

    print("\n2. run them")
    if not torch.cuda.is_available():
        print("  no GPU visible (torch.cuda.is_available() is False): running the kernels needs a GPU.")
        print("  The kernels above are built and cached; run this script on a GPU machine to check them.")
        return 0
    ok = check_merge_state(MERGE_STATE_SPECS)
    ok &= check_prefill()
    print("\nall results match the float32 reference" if ok else "\nSOME RESULTS DO NOT MATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
