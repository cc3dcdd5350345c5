"""Bad inputs across the API (ragged / paged / decode wrappers, merge_state, append_paged_kv_cache) are
refused before any launch with the documented exception type and a message naming the argument.

One table (CASES). Each case builds its inputs for an `Env` and returns the bad call:
* Env("cpu"): tensors are `CudaLooking` (CPU memory that reports device cuda:0). The checks read only
  metadata (dtype, shape, strides, data_ptr), so they run exactly as on a GPU; kernel loads and launches
  are replaced by failures, so a check that lets a bad input through fails the test instead of
  building. The cases marked cpu=True (everything decided before a kernel library is needed) run here;
  page-table data checks run in the planner's C code (in the kernel library), so they are GPU cases,
  in CI, without a GPU.
* library cases (lib=True): decided by a kernel library's host code (indptr and page-table checks)
  before any GPU query; they also run on CPU with a real nvcc-built library (slow), where a GPU query
  or a launch fails the test.
* Env("gpu"): real CUDA tensors, every case (marked gpu; skipped without CUDA). Cases that need a plan
  (run-time checks, planner and page-table checks, workspace size) exist only here.

test_data_free_checks_do_not_synchronize re-runs every GPU case under
torch.cuda.set_sync_debug_mode("error"): a check that needs no tensor data (all of them, since index
tensors are passed on the CPU) must not synchronize the device, even on its error path.

test_refused_plan_keeps_the_previous_plan: after plan() refuses its input (negative page index, split
states too large for the workspace, bad last_page_len), the plan in force must stay intact (run() gives
the previous result bit for bit) or run() must refuse to run; it must never run a half-staged plan.

Error types (README): TypeError for a non-tensor or a wrong dtype, NotSupportedError (a ValueError) for
a FlashInfer option asking for a feature flashinfer-jit lacks, ValueError for the rest; RuntimeError for
run() before plan().

Run: python -m pytest -q tests/test_bad_inputs.py   (the GPU half is skipped, with the reason, without CUDA)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

import flashinfer_jit
from flashinfer_jit import cascade, kernels, loader, page

import reference as ref
from conftest import requires_nvcc

HQ, HKV, D = 8, 2, 128
DT = torch.bfloat16
WORKSPACE_BYTES = 16 << 20
TINY_WORKSPACE = 4096
# Ragged batch: q lengths 5, 0, 7 over kv lengths 9, 3, 7.
QO = [0, 5, 5, 12]
KV = [0, 9, 12, 19]
# Paged batch (page size 16): kv lengths 20, 0, 7 -> pages [3, 0], [], [5] of a 6-page cache.
PS = 16
NUM_PAGES = 6
PAGE_INDPTR = [0, 2, 2, 3]
PAGE_INDICES = [3, 0, 5]
LAST_PAGE_LEN = [4, 0, 7]
# One long request (kv 1000 = 63 pages, the last holding 8 tokens), for the workspace-size cases.
LONG_PAGES = 63


class CudaLooking(torch.Tensor):
    """A CPU tensor that reports device cuda:0 (as in tests/test_validation_merge.py)."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("cuda", 0)


def i32(values, dtype=torch.int32) -> torch.Tensor:
    """Index tensors always live on the CPU (no sync at plan time)."""
    return torch.tensor(values, dtype=dtype)


class Env:
    """Where a case's tensors live: 'cpu' (CudaLooking, no GPU) or 'gpu' (real CUDA tensors)."""

    def __init__(self, mode: str):
        self.mode = mode

    def zeros(self, *shape: int, dtype: torch.dtype = DT) -> torch.Tensor:
        if self.mode == "gpu":
            return torch.zeros(shape, dtype=dtype, device="cuda")
        return torch.zeros(shape, dtype=dtype).as_subclass(CudaLooking)

    def workspace(self, nbytes: int = WORKSPACE_BYTES) -> torch.Tensor:
        if self.mode == "gpu":
            return torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        return torch.zeros(nbytes, dtype=torch.uint8).as_subclass(CudaLooking)

    def misaligned(self, *shape: int, dtype: torch.dtype = DT) -> torch.Tensor:
        """A tensor whose data_ptr is one element past a 16-byte boundary."""
        n = 1
        for s in shape:
            n *= s
        return self.zeros(n + 8, dtype=dtype)[1:n + 1].view(*shape)


# ---- builders ------------------------------------------------------------------------------------

def ragged_wrapper(env: Env, nbytes: int = WORKSPACE_BYTES, **kw):
    return flashinfer_jit.BatchPrefillWithRaggedKVCacheWrapper(env.workspace(nbytes), **kw)


def ragged_plan_args(**over) -> dict[str, Any]:
    args = dict(qo_indptr=i32(QO), kv_indptr=i32(KV), num_qo_heads=HQ, num_kv_heads=HKV, head_dim=D, causal=False,
                q_data_type=DT)
    args.update(over)
    return args


def ragged_plan(**over) -> Callable[[Env], Callable[[], Any]]:
    def build(env: Env):
        w = ragged_wrapper(env)
        return lambda: w.plan(**ragged_plan_args(**over))
    return build


def ragged_planned(env: Env, use_cuda_graph: bool = False):
    """A planned ragged wrapper and good (q, k, v)."""
    w = ragged_wrapper(env, use_cuda_graph=use_cuda_graph)
    w.plan(**ragged_plan_args())
    return w, env.zeros(QO[-1], HQ, D), env.zeros(KV[-1], HKV, D), env.zeros(KV[-1], HKV, D)


def ragged_run(**bad) -> Callable[[Env], Callable[[], Any]]:
    """run() of a planned ragged wrapper with some arguments replaced (values: env -> tensor)."""
    def build(env: Env):
        w, q, k, v = ragged_planned(env)
        args = {"q": q, "k": k, "v": v}
        args.update({name: make(env) for name, make in bad.items()})
        return lambda: w.run(**args)
    return build


def paged_plan_args(**over) -> dict[str, Any]:
    args = dict(qo_indptr=i32(QO), paged_kv_indptr=i32(PAGE_INDPTR), paged_kv_indices=i32(PAGE_INDICES),
                paged_kv_last_page_len=i32(LAST_PAGE_LEN), num_qo_heads=HQ, num_kv_heads=HKV, head_dim=D,
                page_size=PS, causal=False, q_data_type=DT)
    args.update(over)
    return args


def paged_plan(**over) -> Callable[[Env], Callable[[], Any]]:
    def build(env: Env):
        w = flashinfer_jit.BatchPrefillWithPagedKVCacheWrapper(env.workspace())
        return lambda: w.plan(**paged_plan_args(**over))
    return build


def paged_run(cache: Callable[[Env], Any] | None = None, layout: str = "NHD", plan_over: dict | None = None,
              **bad) -> Callable[[Env], Callable[[], Any]]:
    def build(env: Env):
        w = flashinfer_jit.BatchPrefillWithPagedKVCacheWrapper(env.workspace(), kv_layout=layout)
        w.plan(**paged_plan_args(**(plan_over or {})))
        shape = (PS, HKV, D) if layout == "NHD" else (HKV, PS, D)
        args = {"q": env.zeros(QO[-1], HQ, D),
                "paged_kv_cache": cache(env) if cache is not None else env.zeros(NUM_PAGES, 2, *shape)}
        args.update({name: make(env) for name, make in bad.items()})
        return lambda: w.run(**args)
    return build


def decode_plan_args(**over) -> dict[str, Any]:
    args = dict(indptr=i32(PAGE_INDPTR), indices=i32(PAGE_INDICES), last_page_len=i32(LAST_PAGE_LEN),
                num_qo_heads=HQ, num_kv_heads=HKV, head_dim=D, page_size=PS, q_data_type=DT)
    args.update(over)
    return args


def decode_plan(**over) -> Callable[[Env], Callable[[], Any]]:
    def build(env: Env):
        w = flashinfer_jit.BatchDecodeWithPagedKVCacheWrapper(env.workspace())
        return lambda: w.plan(**decode_plan_args(**over))
    return build


def decode_run(num_pages: int = NUM_PAGES, **bad) -> Callable[[Env], Callable[[], Any]]:
    def build(env: Env):
        w = flashinfer_jit.BatchDecodeWithPagedKVCacheWrapper(env.workspace())
        w.plan(**decode_plan_args())
        args = {"q": env.zeros(len(LAST_PAGE_LEN), HQ, D), "paged_kv_cache": env.zeros(num_pages, 2, PS, HKV, D)}
        args.update({name: make(env) for name, make in bad.items()})
        return lambda: w.run(**args)
    return build


def tiny_workspace(kind: str) -> Callable[[Env], Callable[[], Any]]:
    """A 4096-byte float workspace and fixed_split_size=64 (the smallest chunk) on a 1000-token request:
    the split-KV partial states do not fit and plan() must say so."""
    def build(env: Env):
        ws = env.workspace(TINY_WORKSPACE)
        if kind == "ragged":
            w = flashinfer_jit.BatchPrefillWithRaggedKVCacheWrapper(ws)
            return lambda: w.plan(**ragged_plan_args(qo_indptr=i32([0, 1]), kv_indptr=i32([0, 1000]),
                                                     fixed_split_size=64))
        table = dict(paged_kv_indptr=i32([0, LONG_PAGES]), paged_kv_indices=i32(list(range(LONG_PAGES))),
                     paged_kv_last_page_len=i32([8]))
        if kind == "paged":
            w = flashinfer_jit.BatchPrefillWithPagedKVCacheWrapper(ws)
            return lambda: w.plan(**paged_plan_args(qo_indptr=i32([0, 1]), fixed_split_size=64, **table))
        w = flashinfer_jit.BatchDecodeWithPagedKVCacheWrapper(ws)
        return lambda: w.plan(**decode_plan_args(indptr=table["paged_kv_indptr"], indices=table["paged_kv_indices"],
                                                 last_page_len=table["paged_kv_last_page_len"], fixed_split_size=64))
    return build


def ragged_graph_run_short_q(env: Env):
    w, q, k, v = ragged_planned(env, use_cuda_graph=True)
    return lambda: w.run(q[:-1], k, v)


def ragged_graph_replan_larger(env: Env):
    w, q, k, v = ragged_planned(env, use_cuda_graph=True)
    return lambda: w.plan(**ragged_plan_args(qo_indptr=i32(QO + [12]), kv_indptr=i32(KV + [19])))


def run_before_plan(env: Env):
    w = ragged_wrapper(env)
    return lambda: w.run(env.zeros(QO[-1], HQ, D), env.zeros(KV[-1], HKV, D), env.zeros(KV[-1], HKV, D))


def merge_state_call(index: int, bad: Callable[[Env], torch.Tensor]) -> Callable[[Env], Callable[[], Any]]:
    def build(env: Env):
        args = [env.zeros(4, HQ, D), env.zeros(4, HQ, dtype=torch.float32), env.zeros(4, HQ, D),
                env.zeros(4, HQ, dtype=torch.float32)]
        args[index] = bad(env)
        return lambda: flashinfer_jit.merge_state(*args)
    return build


def merge_state_in_place_int_mask(env: Env):
    v, s = env.zeros(4, HQ, D), env.zeros(4, HQ, dtype=torch.float32)
    return lambda: flashinfer_jit.merge_state_in_place(v, s, env.zeros(4, HQ, D), env.zeros(4, HQ, dtype=torch.float32),
                                                       mask=env.zeros(4, dtype=torch.int32))


def merge_states_3d(env: Env):
    return lambda: flashinfer_jit.merge_states(env.zeros(4, HQ, D), env.zeros(4, HQ, dtype=torch.float32))


def append_call(**bad) -> Callable[[Env], Callable[[], Any]]:
    """append_paged_kv_cache of one token (request 2, position 7: its page 5) with some arguments
    replaced. Values in `bad`: env -> value, or a plain value."""
    def build(env: Env):
        args: dict[str, Any] = dict(
            append_key=env.zeros(1, HKV, D), append_value=env.zeros(1, HKV, D), batch_indices=i32([2]),
            positions=i32([7]), paged_kv_cache=env.zeros(NUM_PAGES, 2, PS, HKV, D), kv_indices=i32(PAGE_INDICES),
            kv_indptr=i32(PAGE_INDPTR), kv_last_page_len=i32([4, 0, 8]), kv_layout="NHD")
        args.update({name: (make(env) if callable(make) else make) for name, make in bad.items()})
        return lambda: flashinfer_jit.append_paged_kv_cache(**args)
    return build


def batch_indices_positions(**bad) -> Callable[[Env], Callable[[], Any]]:
    def build(env: Env):
        args = dict(append_indptr=i32([0, 1, 1, 2]), seq_lens=i32([21, 0, 8]), nnz=2)
        args.update(bad)
        return lambda: flashinfer_jit.get_batch_indices_positions(**args)
    return build


# ---- the table -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Env], Callable[[], Any]]
    exc: type[Exception]
    fragments: tuple[str, ...]
    cpu: bool = False  # decided before any kernel library is needed: runs without a GPU too
    lib: bool = False  # decided in a kernel library's host code, before any GPU query: runs on CPU with nvcc


def C(id: str, build, exc, *fragments: str, cpu: bool = False, lib: bool = False) -> Case:
    return Case(id, build, exc, fragments, cpu, lib)


NHD_SHAPE = (NUM_PAGES, 2, PS, HKV, D)

CASES = [
    # -- ragged prefill: plan() --
    C("ragged/head_dim 96", ragged_plan(head_dim=96), ValueError, "head_dim=96", "64, 128, 256", cpu=True),
    C("ragged/Hq % Hkv != 0", ragged_plan(num_qo_heads=6, num_kv_heads=4), ValueError,
      "num_qo_heads (6)", "num_kv_heads (4)", cpu=True),
    C("ragged/qo_indptr int64", ragged_plan(qo_indptr=i32(QO, torch.int64)), TypeError,
      "qo_indptr", "torch.int32", "torch.int64", cpu=True),
    C("ragged/kv_indptr float", ragged_plan(kv_indptr=torch.tensor(KV, dtype=torch.float32)), TypeError,
      "kv_indptr", "torch.int32", cpu=True),
    C("ragged/qo_indptr not a tensor", ragged_plan(qo_indptr=QO), TypeError, "qo_indptr", "a torch.Tensor", cpu=True),
    C("ragged/qo_indptr 2-D", ragged_plan(qo_indptr=i32([QO])), ValueError, "qo_indptr", "1-D", cpu=True),
    C("ragged/kv_indptr wrong length", ragged_plan(kv_indptr=i32(KV[:-1])), ValueError,
      "kv_indptr", "expected 4 entries", cpu=True),
    C("ragged/q_data_type float32", ragged_plan(q_data_type=torch.float32), TypeError,
      "q_data_type", "torch.float16 or torch.bfloat16", cpu=True),
    C("ragged/kv_data_type differs", ragged_plan(kv_data_type=torch.float16), TypeError,
      "kv_data_type", "same dtype as q_data_type", cpu=True),
    C("ragged/logits_soft_cap negative", ragged_plan(logits_soft_cap=-1.0), ValueError,
      "logits_soft_cap=-1.0", "finite cap > 0", cpu=True),
    C("ragged/logits_soft_cap nan", ragged_plan(logits_soft_cap=float("nan")), ValueError,
      "logits_soft_cap=nan", cpu=True),
    C("ragged/logits_soft_cap a tensor", ragged_plan(logits_soft_cap=torch.tensor(30.0)), ValueError,
      "logits_soft_cap=tensor", cpu=True),
    C("ragged/window_left -2", ragged_plan(window_left=-2), ValueError, "window_left=-2", "-1 (no sliding window)",
      cpu=True),
    C("ragged/window_left True", ragged_plan(window_left=True), ValueError, "window_left=True", cpu=True),
    C("ragged/window_left 1.5", ragged_plan(window_left=1.5), ValueError, "window_left=1.5", cpu=True),
    C("ragged/qo_indptr[0] != 0", ragged_plan(qo_indptr=i32([1, 5, 5, 12])), ValueError, "qo_indptr[0] must be 0", lib=True),
    C("ragged/kv_indptr decreasing", ragged_plan(kv_indptr=i32([0, 9, 8, 19])), ValueError,
      "kv_indptr must be non-decreasing", "kv_indptr[1:3] = [9, 8]", lib=True),
    C("ragged/fixed_split_size not a tile multiple", ragged_plan(fixed_split_size=100), ValueError,
      "fixed_split_size", "multiple of 64", lib=True),
    C("ragged/workspace too small for splits", tiny_workspace("ragged"), ValueError,
      "float_workspace_buffer holds 4096 bytes", "need"),
    # -- ragged prefill: constructor --
    C("ragged/kv_layout NDH", lambda env: lambda: ragged_wrapper(env, kv_layout="NDH"), ValueError,
      "kv_layout", "'NDH'", cpu=True),
    C("workspace not contiguous", lambda env: lambda: flashinfer_jit.BatchPrefillWithRaggedKVCacheWrapper(
        env.zeros(1024, 2, dtype=torch.int8)[:, 0]), ValueError, "float_workspace_buffer", "contiguous", cpu=True),
    # A CPU workspace is refused by plan(), after the host-side checks (tests/test_check_order.py shows
    # the order on CPU with a real kernel library); the plan needs the library, so this is a GPU case.
    C("workspace on the CPU", lambda env: lambda: flashinfer_jit.BatchPrefillWithRaggedKVCacheWrapper(
        torch.zeros(1 << 20, dtype=torch.uint8)).plan(torch.tensor(QO, dtype=torch.int32),
                                                       torch.tensor(KV, dtype=torch.int32), HQ, HKV, D,
                                                       q_data_type=DT),
      ValueError, "float_workspace_buffer", "a CUDA tensor", lib=True),
    C("ragged/run() before plan()", run_before_plan, RuntimeError, "run() called before plan()", cpu=True),
    # -- ragged prefill: run() (plan/run mismatch, shapes, strides, devices) --
    C("ragged/run q dtype differs from plan", ragged_run(q=lambda e: e.zeros(12, HQ, D, dtype=torch.float16)),
      TypeError, "q: expected dtype torch.bfloat16", "torch.float16"),
    C("ragged/run q tokens != qo_indptr[-1]", ragged_run(q=lambda e: e.zeros(13, HQ, D)), ValueError,
      "q: expected shape [12, 8, 128]"),
    C("ragged/run k tokens != kv_indptr[-1]", ragged_run(k=lambda e: e.zeros(18, HKV, D)), ValueError,
      "k: expected shape [19, 2, 128]"),
    C("ragged/run q heads differ from plan", ragged_run(q=lambda e: e.zeros(12, 4, D)), ValueError,
      "q: expected shape [12, 8, 128]"),
    C("ragged/run v head_dim differs from plan", ragged_run(v=lambda e: e.zeros(19, HKV, 64)), ValueError,
      "v: expected shape [19, 2, 128]"),
    C("ragged/run q on the CPU", ragged_run(q=lambda e: torch.zeros(12, HQ, D, dtype=DT)), ValueError,
      "q: expected a tensor on cuda:0", "device=cpu"),
    C("ragged/run k strided last dim", ragged_run(k=lambda e: e.zeros(19, HKV, 2 * D)[..., ::2]), ValueError,
      "k: expected a contiguous last dimension"),
    C("ragged/run q misaligned data_ptr", ragged_run(q=lambda e: e.misaligned(12, HQ, D)), ValueError,
      "q: expected 16-byte aligned rows"),
    C("ragged/run v misaligned row stride", ragged_run(v=lambda e: e.zeros(19, HKV, D + 1)[..., :D]), ValueError,
      "v: expected 16-byte aligned rows"),
    C("ragged/run out shape", ragged_run(out=lambda e: e.zeros(12, HQ, 64)), ValueError,
      "out: expected shape [12, 8, 128]"),
    C("ragged/run lse float16", ragged_run(lse=lambda e: e.zeros(12, HQ, dtype=torch.float16)), TypeError,
      "lse: expected dtype torch.float32"),
    C("ragged/run lse not contiguous", ragged_run(lse=lambda e: e.zeros(HQ, 12, dtype=torch.float32).t()), ValueError,
      "lse: expected a contiguous tensor"),
    C("ragged/graph run q shorter than the plan", ragged_graph_run_short_q, ValueError,
      "q: expected at least 12 tokens"),
    C("ragged/graph re-plan with a larger batch", ragged_graph_replan_larger, ValueError,
      "use_cuda_graph=True", "batch 4 (max 3)"),
    # -- paged prefill: plan() --
    C("paged/last_page_len 0", paged_plan(paged_kv_last_page_len=i32([0, 0, 7])), ValueError,
      "paged_kv_last_page_len[0] = 0", "1..16", lib=True),
    C("paged/last_page_len > page_size", paged_plan(paged_kv_last_page_len=i32([17, 0, 7])), ValueError,
      "paged_kv_last_page_len[0] = 17", "1..16", lib=True),
    C("paged/last_page_len wrong length", paged_plan(paged_kv_last_page_len=i32([4, 0])), ValueError,
      "paged_kv_last_page_len", "expected 3 entries", cpu=True),
    C("paged/indptr[0] != 0", paged_plan(paged_kv_indptr=i32([1, 2, 2, 3])), ValueError,
      "paged_kv_indptr[0] must be 0", lib=True),
    C("paged/indptr decreasing", paged_plan(paged_kv_indptr=i32([0, 2, 1, 3])), ValueError,
      "paged_kv_indptr must be non-decreasing", "[2, 1]", lib=True),
    C("paged/indptr wrong length", paged_plan(paged_kv_indptr=i32([0, 2, 3])), ValueError,
      "paged_kv_indptr", "expected 4 entries", cpu=True),
    C("paged/indptr int64", paged_plan(paged_kv_indptr=i32(PAGE_INDPTR, torch.int64)), TypeError,
      "paged_kv_indptr", "torch.int32", cpu=True),
    C("paged/indices int64", paged_plan(paged_kv_indices=i32(PAGE_INDICES, torch.int64)), TypeError,
      "paged_kv_indices", "torch.int32", cpu=True),
    C("paged/indices shorter than indptr[-1]", paged_plan(paged_kv_indices=i32([3, 0])), ValueError,
      "paged_kv_indices", "paged_kv_indptr[-1] = 3", lib=True),
    C("paged/page_size 0", paged_plan(page_size=0), ValueError, "page_size", "positive", cpu=True),
    C("paged/head_dim 96", paged_plan(head_dim=96), ValueError, "head_dim=96", cpu=True),
    C("paged/Hq % Hkv != 0", paged_plan(num_kv_heads=3), ValueError, "num_qo_heads (8)", "num_kv_heads (3)",
      cpu=True),
    C("paged/negative page index", paged_plan(paged_kv_indices=i32([3, -1, 5])), ValueError,
      "paged_kv_indices", ">= 0", "-1", lib=True),
    C("paged/workspace too small for splits", tiny_workspace("paged"), ValueError,
      "float_workspace_buffer holds 4096 bytes", "need"),
    # -- paged prefill: run() --
    C("paged/page index == num_pages", paged_run(plan_over={"paged_kv_indices": i32([3, 0, NUM_PAGES])}), ValueError,
      "paged_kv_indices", f"page index {NUM_PAGES} is outside the cache ({NUM_PAGES} pages)"),
    C("paged/cache page_size differs from plan", paged_run(cache=lambda e: e.zeros(NUM_PAGES, 2, 8, HKV, D)),
      ValueError, "paged_kv_cache: expected shape [*, 2, 16, 2, 128]"),
    C("paged/HND cache to an NHD wrapper", paged_run(cache=lambda e: e.zeros(NUM_PAGES, 2, HKV, PS, D)),
      ValueError, "paged_kv_cache: expected shape [*, 2, 16, 2, 128]"),
    C("paged/NHD cache to an HND wrapper", paged_run(cache=lambda e: e.zeros(*NHD_SHAPE), layout="HND"),
      ValueError, "paged_kv_cache: expected shape [*, 2, 2, 16, 128]"),
    C("paged/cache dtype differs from plan", paged_run(cache=lambda e: e.zeros(*NHD_SHAPE, dtype=torch.float16)),
      TypeError, "paged_kv_cache: expected dtype torch.bfloat16"),
    C("paged/cache 4-D (no K/V axis)", paged_run(cache=lambda e: e.zeros(NUM_PAGES, PS, HKV, D)), ValueError,
      "paged_kv_cache: expected shape [*, 2, 16, 2, 128]"),
    C("paged/cache on the CPU", paged_run(cache=lambda e: torch.zeros(NHD_SHAPE, dtype=DT)), ValueError,
      "paged_kv_cache: expected a tensor on cuda:0"),
    C("paged/cache strided last dim", paged_run(cache=lambda e: e.zeros(*NHD_SHAPE[:-1], 2 * D)[..., ::2]), ValueError,
      "paged_kv_cache", "contiguous last dimension"),
    C("paged/(k, v) with unequal strides",
      paged_run(cache=lambda e: (e.zeros(NUM_PAGES, PS, HKV, D), e.zeros(NUM_PAGES, PS, HKV, 2 * D)[..., :D])),
      ValueError, "paged_kv_cache", "equal strides"),
    C("paged/(k, v) with v of another dtype",
      paged_run(cache=lambda e: (e.zeros(NUM_PAGES, PS, HKV, D), e.zeros(NUM_PAGES, PS, HKV, D, dtype=torch.float16))),
      TypeError, "paged_kv_cache[1] (v)", "torch.bfloat16"),
    C("paged/cache a list of 3", paged_run(cache=lambda e: [e.zeros(NUM_PAGES, PS, HKV, D)] * 3), TypeError,
      "paged_kv_cache: expected a tensor or a (k, v) tuple"),
    C("paged/run q dtype differs from plan", paged_run(q=lambda e: e.zeros(12, HQ, D, dtype=torch.float16)),
      TypeError, "q: expected dtype torch.bfloat16"),
    # -- decode --
    C("decode/indptr int64", decode_plan(indptr=i32(PAGE_INDPTR, torch.int64)), TypeError, "indptr", "torch.int32",
      cpu=True),
    C("decode/last_page_len > page_size", decode_plan(last_page_len=i32([4, 0, 17])), ValueError,
      "last_page_len[2] = 17", "1..16", lib=True),
    C("decode/head_dim 96", decode_plan(head_dim=96), ValueError, "head_dim=96", cpu=True),
    C("decode/Hq % Hkv != 0", decode_plan(num_qo_heads=7), ValueError, "num_qo_heads (7)", cpu=True),
    C("decode/kv_data_type differs from q_data_type", decode_plan(q_data_type=torch.float16, kv_data_type=DT),
      TypeError, "kv_data_type", "same dtype as q_data_type", cpu=True),
    C("decode/pos_encoding_mode unknown", decode_plan(pos_encoding_mode="ROPE_GPTJ"), ValueError,
      "pos_encoding_mode='ROPE_GPTJ'", "ROPE_LLAMA", cpu=True),
    C("decode/negative page index", decode_plan(indices=i32([3, 0, -2])), ValueError, "indices", ">= 0", "-2", lib=True),
    C("decode/workspace too small for splits", tiny_workspace("decode"), ValueError,
      "float_workspace_buffer holds 4096 bytes", "need"),
    C("decode/run q 2-D", decode_run(q=lambda e: e.zeros(3, HQ * D)), ValueError, "q: expected shape [3, 8, 128]"),
    C("decode/run batch differs from plan", decode_run(q=lambda e: e.zeros(4, HQ, D)), ValueError,
      "q: expected shape [3, 8, 128]"),
    C("decode/page index == num_pages", decode_run(num_pages=5), ValueError, "page index 5 is outside the cache (5 pages)"),
    # -- merge_state --
    C("merge_state/v_a float32", merge_state_call(0, lambda e: e.zeros(4, HQ, D, dtype=torch.float32)), TypeError,
      "v_a/s_a: v", "torch.float16 or torch.bfloat16", cpu=True),
    C("merge_state/s_b shape", merge_state_call(3, lambda e: e.zeros(4, HQ + 1, dtype=torch.float32)), ValueError,
      "v_b/s_b: s", f"shape [4, {HQ}]", cpu=True),
    C("merge_state/head_dim 96", merge_state_call(0, lambda e: e.zeros(4, HQ, 96)), ValueError,
      "head_dim)=96", cpu=True),
    C("merge_state/v_b on the CPU", merge_state_call(2, lambda e: torch.zeros(4, HQ, D, dtype=DT)), ValueError,
      "v_b/s_b: v", "a CUDA tensor", cpu=True),
    C("merge_state/v_a misaligned", merge_state_call(0, lambda e: e.misaligned(4, HQ, D)), ValueError,
      "v_a/s_a: v", "16-byte aligned", cpu=True),
    C("merge_state_in_place/int32 mask", merge_state_in_place_int_mask, TypeError, "mask", "torch.bool", cpu=True),
    C("merge_states/v 3-D", merge_states_3d, ValueError, "v: expected a 4-D tensor", cpu=True),
    # -- append_paged_kv_cache / get_batch_indices_positions --
    C("append/key dtype differs from cache", append_call(append_key=lambda e: e.zeros(1, HKV, D, dtype=torch.float16)),
      TypeError, "append_key: expected dtype torch.bfloat16", cpu=True),
    C("append/k_scale on a 16-bit cache", append_call(k_scale=0.5), ValueError, "k_scale applies to fp8 caches",
      cpu=True),
    C("append/v_scale zero on an fp8 cache",
      append_call(paged_kv_cache=lambda e: e.zeros(NUM_PAGES, 2, PS, HKV, D, dtype=torch.float8_e4m3fn), v_scale=0.0),
      ValueError, "v_scale=0.0", "finite float > 0", cpu=True),
    C("append/fp32 keys into an fp8 cache",
      append_call(paged_kv_cache=lambda e: e.zeros(NUM_PAGES, 2, PS, HKV, D, dtype=torch.float8_e5m2),
                  append_key=lambda e: e.zeros(1, HKV, D, dtype=torch.float32)), TypeError, "append_key", cpu=True),
    C("append/int8 cache", append_call(paged_kv_cache=lambda e: e.zeros(NUM_PAGES, 2, PS, HKV, D, dtype=torch.int8)),
      TypeError, "torch.float8_e4m3fn", "torch.int8", cpu=True),
    C("append/key head_dim differs from cache", append_call(append_key=lambda e: e.zeros(1, HKV, 64)), ValueError,
      "append_key: expected shape [*, 2, 128]", cpu=True),
    C("append/value shape differs from key", append_call(append_value=lambda e: e.zeros(2, HKV, D)), ValueError,
      "append_value: expected shape [1, 2, 128]", cpu=True),
    C("append/key strided last dim", append_call(append_key=lambda e: e.zeros(1, HKV, 2 * D)[..., ::2]), ValueError,
      "append_key: expected a contiguous last dimension", cpu=True),
    C("append/cache head_dim 96", append_call(paged_kv_cache=lambda e: e.zeros(NUM_PAGES, 2, PS, HKV, 96)), ValueError,
      "paged_kv_cache head_dim=96", cpu=True),
    C("append/cache 4-D", append_call(paged_kv_cache=lambda e: e.zeros(NUM_PAGES, PS, HKV, D)), ValueError,
      "paged_kv_cache", "5-D", cpu=True),
    C("append/batch_indices int64", append_call(batch_indices=i32([2], torch.int64)), TypeError,
      "batch_indices", "torch.int32", cpu=True),
    C("append/positions wrong length", append_call(positions=i32([7, 8])), ValueError,
      "positions: expected shape [1]", cpu=True),
    C("append/kv_last_page_len wrong length", append_call(kv_last_page_len=i32([4, 0])), ValueError,
      "kv_last_page_len", "expected 3 entries", cpu=True),
    C("append/kv_layout", append_call(kv_layout="NDH"), ValueError, "kv_layout", "'NDH'", cpu=True),
    C("append/batch index out of range", append_call(batch_indices=i32([3])), ValueError,
      "batch_indices", "[0, 3)", cpu=True),
    C("append/position past the request's pages", append_call(batch_indices=i32([0]), positions=i32([40])),
      ValueError, "positions[0] = 40", "request 0", cpu=True),
    C("append/page index outside the cache", append_call(kv_indices=i32([3, 0, NUM_PAGES + 3])), ValueError,
      "kv_indices", f"page {NUM_PAGES + 3} is outside the cache ({NUM_PAGES} pages)", cpu=True),
    C("get_batch_indices_positions/seq_lens int64", batch_indices_positions(seq_lens=i32([21, 0, 8], torch.int64)),
      TypeError, "seq_lens", "torch.int32", cpu=True),
    C("get_batch_indices_positions/seq_lens wrong length", batch_indices_positions(seq_lens=i32([21, 0])),
      ValueError, "seq_lens: expected shape [3]", cpu=True),
]

CPU_CASES = [c for c in CASES if c.cpu]
LIB_CASES = [c for c in CASES if c.lib]


def _fail_load(*args, **kwargs):
    raise AssertionError("validation let a bad input through: a kernel library would be loaded")


def _fail_launch(*args, **kwargs):
    raise AssertionError("validation let a bad input through: a kernel would be launched")


@pytest.fixture
def no_kernels(monkeypatch):
    """CPU mode: loading a kernel library or launching an op fails the test."""
    monkeypatch.setattr(loader, "load", _fail_load)
    monkeypatch.setattr(page, "_append_op", _fail_launch)
    monkeypatch.setattr(cascade, "_merge_two_op", _fail_launch)
    monkeypatch.setattr(cascade, "_merge_many_op", _fail_launch)


def _fail_gpu_query(*args, **kwargs):
    raise AssertionError("validation let a bad input through: the GPU would be queried for this plan")


@pytest.fixture(scope="module")
def shared_kernel_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bad-input-kernels")


@pytest.fixture
def host_only_kernels(monkeypatch, shared_kernel_cache):
    """Library mode: real kernel libraries (nvcc-built on this machine, one cache for the module), whose
    host code (indptr and page-table checks) runs; a GPU query or a launch fails the test."""
    monkeypatch.setenv("FLASHINFER_JIT_CACHE_DIR", str(shared_kernel_cache))
    monkeypatch.setattr(kernels.PrefillKernel, "gpu_slots", _fail_gpu_query)
    monkeypatch.setattr(page, "_append_op", _fail_launch)
    monkeypatch.setattr(cascade, "_merge_two_op", _fail_launch)
    monkeypatch.setattr(cascade, "_merge_many_op", _fail_launch)


def check_raises(case: Case, thunk: Callable[[], Any]) -> None:
    with pytest.raises(case.exc) as excinfo:
        thunk()
    message = str(excinfo.value)
    for fragment in case.fragments:
        assert fragment in message, f"{case.id}: {fragment!r} not in the {case.exc.__name__} message: {message}"


def test_table_size() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    assert len(CASES) >= 25 and len(CPU_CASES) >= 25, (len(CASES), len(CPU_CASES))


@pytest.mark.parametrize("case", CPU_CASES, ids=[c.id for c in CPU_CASES])
def test_bad_input_cpu(case: Case, no_kernels) -> None:
    check_raises(case, case.build(Env("cpu")))


@pytest.mark.slow
@requires_nvcc
@pytest.mark.parametrize("case", LIB_CASES, ids=[c.id for c in LIB_CASES])
def test_bad_input_host_library(case: Case, host_only_kernels) -> None:
    """Cases decided by the kernel library's host code come before any GPU query: on CPU they raise
    the same error as on the GPU (host-side checks first, so the first error names the root cause)."""
    check_raises(case, case.build(Env("cpu")))


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gpu(case: Case) -> None:
    check_raises(case, case.build(Env("gpu")))


@pytest.mark.gpu
def test_data_free_checks_do_not_synchronize() -> None:
    """Every case again (inputs built outside the check), the bad call under set_sync_debug_mode('error'):
    a synchronizing operation would raise a RuntimeError instead of the expected error."""
    failures = []
    for case in CASES:
        thunk = case.build(Env("gpu"))
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            thunk()
        except case.exc as exc:
            missing = [f for f in case.fragments if f not in str(exc)]
            if missing:
                failures.append(f"{case.id}: {type(exc).__name__} without {missing}: {str(exc)[:300]}")
        except Exception as exc:  # noqa: BLE001 - collected, reported below
            failures.append(f"{case.id}: {type(exc).__name__}: {str(exc)[:300]}")
        else:
            failures.append(f"{case.id}: no exception")
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert not failures, f"{len(failures)} of {len(CASES)} checks failed or synchronized:\n" + "\n".join(failures)


# ---- a refused plan must not disturb the plan in force -------------------------------------------

def _refused_plan_rig():
    """A planned paged wrapper whose cache is big[1:]: 'page -1' is big[0], real memory filled with NaN,
    so a run that reads a refused page table stays in bounds and shows up as NaN."""
    lens = ((5, 20), (0, 0), (7, 7), (3, 1000))
    batch = ref.make_paged_batch([a for a, _ in lens], [b for _, b in lens], HQ, HKV, D, DT, "cuda", "NHD", PS, seed=5)
    big = torch.full((batch.num_pages + 1, *batch.cache.shape[1:]), float("nan"), dtype=DT, device="cuda")
    big[1:].copy_(batch.cache)
    cache = big[1:]
    wrapper = flashinfer_jit.BatchPrefillWithPagedKVCacheWrapper(
        torch.empty(256 << 10, dtype=torch.uint8, device="cuda"))
    t = batch.table
    good = dict(qo_indptr=batch.qo_indptr, paged_kv_indptr=t.indptr, paged_kv_indices=t.indices,
                paged_kv_last_page_len=t.last_page_len, num_qo_heads=HQ, num_kv_heads=HKV, head_dim=D,
                page_size=PS, causal=True, q_data_type=DT, disable_split_kv=True)
    wrapper.plan(**good)
    return batch, cache, wrapper, good


REFUSALS = {
    # A page index < 0 (must be refused before anything is staged for the device).
    "negative page index": lambda good: {**good, "paged_kv_indices": torch.where(
        torch.arange(good["paged_kv_indices"].numel()) == 1, -1, good["paged_kv_indices"]).to(torch.int32)},
    # Split-KV partial states that do not fit the 256 KB workspace.
    "workspace too small": lambda good: {**good, "disable_split_kv": False, "fixed_split_size": 64},
    "last_page_len 0": lambda good: {**good, "paged_kv_last_page_len": torch.zeros_like(good["paged_kv_last_page_len"])},
}


@pytest.mark.gpu
@pytest.mark.parametrize("refusal", list(REFUSALS))
def test_refused_plan_keeps_the_previous_plan(refusal: str) -> None:
    batch, cache, wrapper, good = _refused_plan_rig()
    ref_out, ref_lse = batch.reference(causal=True)
    out1, lse1 = wrapper.run(batch.q, cache, return_lse=True)
    ref.check_attention(out1, ref_out, DT, f"{refusal}: before the refused plan", lse1, ref_lse)
    with pytest.raises(ValueError):
        wrapper.plan(**REFUSALS[refusal](good))
    try:
        out2, lse2 = wrapper.run(batch.q, cache, return_lse=True)
    except (RuntimeError, ValueError) as exc:  # refusing to run after a refused plan is acceptable
        assert "plan" in str(exc), f"{refusal}: run() after a refused plan raised an unclear error: {exc}"
        return
    torch.cuda.synchronize()
    assert torch.equal(out2, out1) and torch.equal(lse2, lse1), (
        f"{refusal}: after plan() refused its input, run() no longer gives the previous plan's result "
        f"({int(torch.isnan(out2).sum())} NaN outputs): the refused page table replaced the plan in force")
