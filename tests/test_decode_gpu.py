"""GPU tests of BatchDecodeWithPagedKVCacheWrapper (one query token per request) against the float32
reference over K/V gathered from the pages (tests/reference.py).

What is pinned down (FlashInfer semantics):
* both layouts x page sizes 1/16/64 x GQA groups 1/4/8 (head_dim and dtype cycling through 64/128/256
  and fp16/bf16) on a batch of 64 requests with KV lengths on page boundaries, kv_len 0 (no pages)
  requests, random lengths up to 3000 and one of 12000; pages shuffled, unused pages and page tails NaN;
* long KV (30000 tokens, batch 1 and 3) takes the split-KV (flash-decoding) path, checked through the
  plan's work-item count, and matches the reference;
* fixed_split_size and disable_split_kv give the default result within tolerance (and do / do not
  split); decode equals paged prefill with q_len 1;
* outputs poisoned with NaN (out=/lse= and the allocating path); LSE (base 2) checked;
* the data_type= alias and q_data_type/kv_data_type given alone;
* CUDA-graph replay equals eager after re-plans with other KV lengths (no split -> split -> a smaller
  batch with kv_len 0 requests);
* plan() from CPU int32 page tables and run() perform no device synchronization.

Run: python -m pytest -m gpu -q tests/test_decode_gpu.py   (skipped, with the reason, without CUDA)
"""
from __future__ import annotations

import itertools
import random

import pytest
import torch

import flashinfer_jit

import reference as ref
from conftest import DEVICE, NAN

pytestmark = pytest.mark.gpu

HEAD_DIMS = (64, 128, 256)
DTYPES = (torch.float16, torch.bfloat16)
LAYOUTS = ("NHD", "HND")
GROUPS = (1, 4, 8)
PAGE_SIZES = (1, 7, 16, 64, 128)
NUM_KV_HEADS = 2
WORKSPACE_BYTES = 128 << 20
LONG_KV = 30000


# ---- helpers -------------------------------------------------------------------------------------

def _name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def new_wrapper(layout: str, use_cuda_graph: bool = False, workspace_bytes: int = WORKSPACE_BYTES):
    workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=DEVICE)
    return flashinfer_jit.BatchDecodeWithPagedKVCacheWrapper(workspace, kv_layout=layout,
                                                             use_cuda_graph=use_cuda_graph)


def make_batch(kv_lens, group: int, head_dim: int, dtype: torch.dtype, layout: str, page_size: int, seed: int,
               **kw) -> ref.PagedBatch:
    return ref.make_paged_batch([1] * len(kv_lens), list(kv_lens), NUM_KV_HEADS * group, NUM_KV_HEADS, head_dim,
                                dtype, DEVICE, layout, page_size, seed, **kw)


def plan(wrapper, batch: ref.PagedBatch, dtype_args: str = "q", **kw) -> None:
    """plan() from CPU int32 tensors; dtype_args picks how the dtype is given (FlashInfer accepts all)."""
    t = batch.table
    dtype = batch.q.dtype
    dtype_kw = {"q": {"q_data_type": dtype}, "kv": {"kv_data_type": dtype}, "data_type": {"data_type": dtype},
                "both": {"q_data_type": dtype, "kv_data_type": dtype}}[dtype_args]
    wrapper.plan(t.indptr, t.indices, t.last_page_len, batch.num_qo_heads, batch.num_kv_heads, batch.head_dim,
                 batch.page_size, **dtype_kw, **kw)


def extra_chunks(wrapper) -> int | None:
    """Work items beyond one per request in the plan in force: > 0 exactly when the plan splits some
    request's KV range (decode has one q tile per request). White-box: the decode wrapper runs the paged
    prefill machinery, whose plan state records its grid; None (the check is skipped) if that state
    is not found."""
    state = getattr(getattr(wrapper, "_inner", None), "_state", None)
    items, batch = getattr(state, "grid_items", None), getattr(state, "batch", None)
    if items is None or batch is None or wrapper.is_cuda_graph_enabled:
        return None
    return items - batch


def assert_split(wrapper, expected: bool, what: str) -> None:
    extra = extra_chunks(wrapper)
    if extra is not None:
        assert (extra > 0) == expected, (f"{what}: expected the plan {'to split' if expected else 'not to split'} "
                                         f"the KV range (flash-decoding); work items beyond one per request: {extra}")


def poisoned_outputs(batch: ref.PagedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.full((batch.batch_size, batch.num_qo_heads, batch.head_dim), NAN, dtype=batch.q.dtype, device=DEVICE)
    lse = torch.full((batch.batch_size, batch.num_qo_heads), NAN, dtype=torch.float32, device=DEVICE)
    return out, lse


def poison_allocator(batch: ref.PagedBatch) -> None:
    """Free NaN-filled blocks of the output sizes so the allocating path gets them back."""
    blocks = poisoned_outputs(batch)
    del blocks


def check_run(wrapper, batch: ref.PagedBatch, what: str, cache=None, allocate: bool = True,
              expected: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a planned decode wrapper on every output path; compare with the reference. Returns (out, lse)."""
    ref_out, ref_lse = batch.reference(causal=False) if expected is None else expected
    cache = batch.cache if cache is None else cache
    out, lse = poisoned_outputs(batch)
    result = wrapper.run(batch.q, cache, out=out, lse=lse, return_lse=True)
    assert isinstance(result, tuple) and result[0].data_ptr() == out.data_ptr(), f"{what}: run(out=) not honoured"
    assert result[1].data_ptr() == lse.data_ptr(), f"{what}: run(lse=) not honoured"
    ref.check_attention(out, ref_out, batch.q.dtype, f"{what} [out=, lse=]", lse, ref_lse)
    if allocate:
        poison_allocator(batch)
        out2 = wrapper.run(batch.q, cache)
        assert isinstance(out2, torch.Tensor), f"{what}: run() without return_lse must return a tensor"
        ref.check_attention(out2, ref_out, batch.q.dtype, f"{what} [allocated]")
    return out, lse


def decode_lens(batch_size: int, page_size: int, seed: int) -> list[int]:
    """KV lengths on and next to page boundaries, two kv_len 0 requests, one long, the rest random."""
    rng = random.Random(seed)
    p = page_size
    special = [0, 1, p, p + 1, max(p - 1, 1), 2 * p, 0, 12000, 3 * p - 1]
    lens = special + [rng.randint(1, 3000) for _ in range(batch_size - len(special))]
    rng.shuffle(lens)
    return lens


# ---- the main sweep ------------------------------------------------------------------------------

MAIN_CASES = list(itertools.product(LAYOUTS, PAGE_SIZES, GROUPS))


def _case_settings(index: int) -> tuple[int, torch.dtype, str]:
    return HEAD_DIMS[index % 3], DTYPES[(index // 3) % 2], ("q", "kv", "data_type", "both")[index % 4]


def _case_id(case) -> str:
    layout, page_size, group = case
    head_dim, dtype, dtype_args = _case_settings(MAIN_CASES.index(case))
    return f"{layout}-p{page_size}-g{group}-hd{head_dim}-{_name(dtype)}-{dtype_args}"


@pytest.mark.parametrize("case", MAIN_CASES, ids=[_case_id(c) for c in MAIN_CASES])
def test_decode_batch64_matches_reference(case) -> None:
    layout, page_size, group = case
    index = MAIN_CASES.index(case)
    head_dim, dtype, dtype_args = _case_settings(index)
    batch = make_batch(decode_lens(64, page_size, seed=index), group, head_dim, dtype, layout, page_size,
                       seed=4000 + index, pad_indices=index % 2 == 0)
    wrapper = new_wrapper(layout)
    plan(wrapper, batch, dtype_args)
    what = f"decode {_case_id(case)} {batch.describe()}"
    check_run(wrapper, batch, what, cache=batch.cache_tuple() if index % 3 == 1 else None)


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_decode_long_kv_splits(layout: str, page_size: int, batch_size: int) -> None:
    kv_lens = [LONG_KV] if batch_size == 1 else [LONG_KV, 0, LONG_KV - 1]
    head_dim = 128 if page_size != 64 else 256
    batch = make_batch(kv_lens, 4, head_dim, torch.bfloat16, layout, page_size, seed=page_size + batch_size)
    wrapper = new_wrapper(layout)
    plan(wrapper, batch)
    what = f"long decode {batch.describe()}"
    assert_split(wrapper, True, what)
    check_run(wrapper, batch, what)


@pytest.mark.parametrize("head_dim", [128, 256])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fixed_split_and_disable_split_match_default(layout: str, head_dim: int) -> None:
    kv_lens = [LONG_KV, 5000, 0, 17, 2048]
    batch = make_batch(kv_lens, 8, head_dim, torch.float16, layout, 16, seed=head_dim)
    expected = batch.reference(causal=False)
    wrapper = new_wrapper(layout)
    plan(wrapper, batch)
    assert_split(wrapper, True, "the default plan of a 30000-token request")
    base_out, base_lse = check_run(wrapper, batch, f"default split {layout} hd{head_dim}", allocate=False,
                                   expected=expected)
    # Multiples of the KV tile (64 keys, 32 at head_dim 256).
    for kw, splits in (({"fixed_split_size": 256}, True), ({"fixed_split_size": 4096}, True),
                       ({"disable_split_kv": True}, False)):
        plan(wrapper, batch, **kw)
        what = f"{kw} {layout} hd{head_dim}"
        assert_split(wrapper, splits, what)
        out, lse = check_run(wrapper, batch, what, allocate=False, expected=expected)
        ref.check_attention(out, base_out.float(), torch.float16, f"{what} vs the default plan", lse, base_lse)


def test_decode_equals_paged_prefill_with_q_len_1() -> None:
    batch = make_batch(decode_lens(40, 16, seed=7), 4, 128, torch.bfloat16, "NHD", 16, seed=7)
    decode = new_wrapper("NHD")
    plan(decode, batch)
    out_d, lse_d = decode.run(batch.q, batch.cache, return_lse=True)
    prefill = flashinfer_jit.BatchPrefillWithPagedKVCacheWrapper(
        torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=DEVICE), kv_layout="NHD")
    t = batch.table
    prefill.plan(batch.qo_indptr, t.indptr, t.indices, t.last_page_len, batch.num_qo_heads, batch.num_kv_heads,
                 128, 16, causal=False, q_data_type=torch.bfloat16)
    out_p, lse_p = prefill.run(batch.q, batch.cache, return_lse=True)
    ref.check_attention(out_d, out_p.float(), torch.bfloat16, "decode vs paged prefill (q_len 1)", lse_d, lse_p)


# ---- no device synchronization -------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["replan", "fresh_wrapper", "cuda_graph_wrapper"])
def test_plan_and_run_do_not_synchronize(mode: str) -> None:
    """plan() from CPU int32 page tables, then run(), under torch.cuda.set_sync_debug_mode('error'); the
    second plan splits (long request), the first does not."""
    # One page count for both (20000 tokens = 1250 pages of 16): a fixed-size indices buffer.
    batch1 = make_batch([17, 300, 0, 90, 5, 64, 1, 1000], 4, 128, torch.bfloat16, "NHD", 16, seed=11,
                        num_pages=1400, pad_indices=True)
    batch2 = make_batch([20000, 3, 0, 100], 4, 128, torch.bfloat16, "NHD", 16, seed=12, num_pages=1400,
                        pad_indices=True)
    wrapper = new_wrapper("NHD", use_cuda_graph=mode == "cuda_graph_wrapper")
    plan(wrapper, batch1)  # warm-up outside the check: kernel load, first-use allocations
    wrapper.run(batch1.q, batch1.cache)
    if mode == "fresh_wrapper":
        wrapper = new_wrapper("NHD")
    t = batch2.table
    out, lse = poisoned_outputs(batch2)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        wrapper.plan(t.indptr, t.indices, t.last_page_len, batch2.num_qo_heads, batch2.num_kv_heads, 128, 16,
                     q_data_type=torch.bfloat16)
        wrapper.run(batch2.q, batch2.cache, out=out, lse=lse, return_lse=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    ref_out, ref_lse = batch2.reference(causal=False)
    ref.check_attention(out, ref_out, torch.bfloat16, f"no-sync decode {mode}", lse, ref_lse)


# ---- CUDA graphs ---------------------------------------------------------------------------------

GRAPH_MAX_BATCH = 16
# (lengths, label): the first plan does not split; the second does (long requests); the third is a
# smaller batch with kv_len 0 requests; the fourth returns to the first lengths with new data.
GRAPH_PLANS = (
    ([random.Random(1).randint(1, 200) for _ in range(16)], "first plan (short, no split)"),
    ([5000, 1, 4000, 0] + [random.Random(2).randint(1, 3000) for _ in range(12)], "re-plan: long KV (split)"),
    ([0, 700, 0, 33, 2], "re-plan: batch 5 with kv_len 0 requests"),
    ([random.Random(1).randint(1, 200) for _ in range(16)], "back to the first lengths, new data"),
)
GRAPH_CASES = (  # head_dim, dtype, layout, group, page_size
    (128, torch.bfloat16, "NHD", 4, 16),
    (64, torch.float16, "HND", 8, 1),
    (256, torch.bfloat16, "HND", 1, 64),
)


def _graph_case_id(case) -> str:
    head_dim, dtype, layout, group, page_size = case
    return f"hd{head_dim}-{_name(dtype)}-{layout}-g{group}-p{page_size}"


@pytest.mark.parametrize("case", GRAPH_CASES, ids=[_graph_case_id(c) for c in GRAPH_CASES])
def test_cuda_graph_replay_equals_eager(case) -> None:
    head_dim, dtype, layout, group, page_size = case
    num_pages = max(sum(ref.num_pages_for(n, page_size) for n in lens) for lens, _ in GRAPH_PLANS) + 8
    hq = NUM_KV_HEADS * group
    q = torch.zeros((GRAPH_MAX_BATCH, hq, head_dim), dtype=dtype, device=DEVICE)
    cache = ref.new_paged_cache(num_pages, page_size, NUM_KV_HEADS, head_dim, dtype, DEVICE, layout)
    out = torch.full((GRAPH_MAX_BATCH, hq, head_dim), NAN, dtype=dtype, device=DEVICE)
    lse = torch.full((GRAPH_MAX_BATCH, hq), NAN, dtype=torch.float32, device=DEVICE)
    wrapper = new_wrapper(layout, use_cuda_graph=True)
    assert wrapper.is_cuda_graph_enabled
    graph = None
    for i, (lens, label) in enumerate(GRAPH_PLANS):
        what = f"{_graph_case_id(case)} {label}"
        # Every plan lists all pages of the cache in `indices` (a fixed-size indices buffer).
        batch = make_batch(lens, group, head_dim, dtype, layout, page_size, seed=100 + i, num_pages=num_pages,
                           pad_indices=True)
        plan(wrapper, batch)
        q[: batch.batch_size].copy_(batch.q)
        cache.copy_(batch.cache)
        if graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                wrapper.run(q, cache, out=out, lse=lse, return_lse=True)  # warm-up outside the capture
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                wrapper.run(q, cache, out=out, lse=lse, return_lse=True)
        out.fill_(NAN)
        lse.fill_(NAN)
        graph.replay()
        torch.cuda.synchronize()
        b = batch.batch_size
        eager = new_wrapper(layout)
        plan(eager, batch)
        eager_out, eager_lse = eager.run(batch.q, batch.cache, return_lse=True)
        ref.check_attention(out[:b], eager_out.float(), dtype, f"{what}: graph replay vs eager", lse[:b], eager_lse)
        ref_out, ref_lse = batch.reference(causal=False)
        ref.check_attention(out[:b], ref_out, dtype, f"{what}: graph replay vs reference", lse[:b], ref_lse)
        assert bool(torch.isnan(out[b:]).all()), f"{what}: graph replay wrote out rows past the planned batch"
