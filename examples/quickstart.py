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
from flashinfer_jit.spec import MergeStateSpec  # noqa: E402

MERGE_STATE_SPECS = [MergeStateSpec(head_dim=128, dtype="bf16"), MergeStateSpec(head_dim=128, dtype="fp16")]


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
# The BatchPrefillWithRaggedKVCacheWrapper demo goes here: build_or_load(PREFILL_SPECS) above and a
# check_prefill() against a float32 reference below, called from main() like the merge_state parts.


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(f"flashinfer-jit {flashinfer_jit.__version__}, torch {torch.__version__} (CUDA {torch.version.cuda})")

    print("\n1. build or load the kernels")
    build_or_load(MERGE_STATE_SPECS)

    print("\n2. run them")
    if not torch.cuda.is_available():
        print("  no GPU visible (torch.cuda.is_available() is False): running the kernels needs a GPU.")
        print("  The kernels above are built and cached; run this script on a GPU machine to check them.")
        return 0
    ok = check_merge_state(MERGE_STATE_SPECS)
    print("\nall results match the float32 reference" if ok else "\nSOME RESULTS DO NOT MATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
