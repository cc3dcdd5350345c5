"""GPU tests of BatchPrefillWithPagedKVCacheWrapper against the float32 reference over K/V gathered
from the pages through the page table (tests/reference.py: PagedBatch.reference).

What is pinned down (FlashInfer semantics):
* every head_dim (64/128/256) x dtype (fp16/bf16) x causal x GQA group (1/4/8) x kv_layout (NHD/HND),
  on one batch holding q/kv lengths 1, 15, 17, 63, 129, 300, 1000, q_len < kv_len, q_len > kv_len,
  q_len 0 and kv_len 0 (no pages) requests; the page size cycles through 1, 5, 16 and 64;
* page sizes 1, 5, 7, 16, 64 x both layouts x causal, with lengths on and next to page boundaries;
* pages in seeded random order (torch.randperm) with unused pages in the cache, last pages partially
  filled, and every slot no request owns (unused pages, page tails) holding NaN: a kernel that reads
  one turns the output NaN;
* the cache as one tensor, as a (k, v) tuple of views of it, and as two separate contiguous tensors;
  indices with trailing unused entries; the page table as CUDA tensors;
* outputs poisoned with NaN (preallocated out=/lse= and the allocating path); LSE (base 2) checked;
* one plan serves several layers (caches); batches of 0 requests and of only empty requests;
* CUDA-graph replay equals eager, including after re-plans with other lengths;
* plan() from CPU int32 page tables and run() perform no device synchronization.

Tolerances are the ragged tests' (reference.py): out atol 1e-2 (fp16) / 2e-2 (bf16) plus a small
rtol; LSE atol 1e-2 plus rtol 2e-3.

Run: python -m pytest -m gpu -q tests/test_paged_gpu.py   (skipped, with the reason, without CUDA)
"""
from __future__ import annotations

import itertools

import pytest
import torch

import flashinfer_jit
from flashinfer_jit import kernels

import reference as ref
from conftest import DEVICE, NAN, PREFILL_BACKEND

pytestmark = pytest.mark.gpu

HEAD_DIMS = (64, 128, 256)
DTYPES = (torch.float16, torch.bfloat16)
LAYOUTS = ("NHD", "HND")
GROUPS = (1, 4, 8)
PAGE_SIZES = (1, 5, 16, 64)
NUM_KV_HEADS = 2
WORKSPACE_BYTES = 128 << 20
CACHE_FORMS = ("tensor", "views", "separate")

# (q_len, kv_len) per request; long and short requests interleaved.
PAGED_LENS = (
    (1, 1), (15, 15), (129, 1000), (17, 17), (0, 17), (63, 63), (5, 0), (129, 129),
    (15, 129), (300, 300), (1, 1000), (63, 15), (17, 63), (0, 0), (7, 65),
)


# ---- helpers -------------------------------------------------------------------------------------

def _name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def new_wrapper(layout: str, use_cuda_graph: bool = False):
    workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=DEVICE)
    return flashinfer_jit.BatchPrefillWithPagedKVCacheWrapper(workspace, kv_layout=layout,
                                                              use_cuda_graph=use_cuda_graph, backend=PREFILL_BACKEND)


def make_batch(lens, group: int, head_dim: int, dtype: torch.dtype, layout: str, page_size: int, seed: int,
               num_kv_heads: int = NUM_KV_HEADS, **kw) -> ref.PagedBatch:
    q_lens = [a for a, _ in lens]
    kv_lens = [b for _, b in lens]
    return ref.make_paged_batch(q_lens, kv_lens, num_kv_heads * group, num_kv_heads, head_dim, dtype, DEVICE,
                                layout, page_size, seed, **kw)


def plan(wrapper, batch: ref.PagedBatch, causal: bool, sm_scale: float | None = None,
         index_device: str = "cpu") -> None:
    if PREFILL_BACKEND == "sm90":  # forced: page sizes it does not copy whole are the fa2 kernel's ("auto")
        why = kernels.sm90_obstacle(DEVICE, "paged", batch.num_qo_heads // batch.num_kv_heads, batch.page_size)
        if why:
            pytest.skip(f"FIJ_TEST_PREFILL_BACKEND=sm90, but the sm90 kernel cannot run this: {why}")
    t = batch.table
    wrapper.plan(batch.qo_indptr.to(index_device), t.indptr.to(index_device), t.indices.to(index_device),
                 t.last_page_len.to(index_device), batch.num_qo_heads, batch.num_kv_heads, batch.head_dim,
                 batch.page_size, causal=causal, sm_scale=sm_scale, q_data_type=batch.q.dtype)


def cache_arg(batch: ref.PagedBatch, form: str):
    if form == "tensor":
        return batch.cache
    if form == "views":
        return batch.cache_tuple()
    if form == "separate":
        return batch.cache_tuple(separate=True)
    raise ValueError(form)


def poisoned_outputs(batch: ref.PagedBatch, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    rows = batch.total_q if rows is None else rows
    out = torch.full((rows, batch.num_qo_heads, batch.head_dim), NAN, dtype=batch.q.dtype, device=DEVICE)
    lse = torch.full((rows, batch.num_qo_heads), NAN, dtype=torch.float32, device=DEVICE)
    return out, lse


def poison_allocator(batch: ref.PagedBatch) -> None:
    """Free NaN-filled blocks of the output sizes so the allocating path gets them back."""
    blocks = poisoned_outputs(batch)
    del blocks


def check_run(wrapper, batch: ref.PagedBatch, causal: bool, what: str, sm_scale: float | None = None,
              form: str = "tensor", allocate: bool = True) -> None:
    """Run `batch` through a planned wrapper on every output path and compare with the reference."""
    ref_out, ref_lse = batch.reference(causal, sm_scale)
    cache = cache_arg(batch, form)
    out, lse = poisoned_outputs(batch)
    result = wrapper.run(batch.q, cache, out=out, lse=lse, return_lse=True)
    assert isinstance(result, tuple) and len(result) == 2, f"{what}: run(return_lse=True) returned {type(result)}"
    if out.numel():
        assert result[0].data_ptr() == out.data_ptr(), f"{what}: run(out=...) did not return the given out"
        assert result[1].data_ptr() == lse.data_ptr(), f"{what}: run(lse=...) did not return the given lse"
    ref.check_attention(out, ref_out, batch.q.dtype, f"{what} [cache {form}, out=, lse=]", lse, ref_lse)
    if not allocate:
        return
    poison_allocator(batch)
    out2, lse2 = wrapper.run(batch.q, cache, return_lse=True)
    ref.check_attention(out2, ref_out, batch.q.dtype, f"{what} [cache {form}, allocated, return_lse]", lse2, ref_lse)
    poison_allocator(batch)
    out3 = wrapper.run(batch.q, cache)
    assert isinstance(out3, torch.Tensor), f"{what}: run() without return_lse must return a tensor, got {type(out3)}"
    ref.check_attention(out3, ref_out, batch.q.dtype, f"{what} [cache {form}, allocated]")


def test_reference_gather_round_trips() -> None:
    """The reference's page gather returns exactly the K/V that were scattered (shuffled pages, HND)."""
    for layout, page_size in itertools.product(LAYOUTS, (1, 7, 16)):
        batch = make_batch(PAGED_LENS[:6], 2, 64, torch.bfloat16, layout, page_size, seed=5)
        k, v = batch.gathered()
        assert torch.equal(k, batch.k) and torch.equal(v, batch.v), f"gather != scatter ({layout}, page {page_size})"
        assert ref.kv_lens_from_page_table(batch.table.indptr, batch.table.last_page_len, page_size) == batch.kv_lens
        order = batch.table.indices[: batch.table.used_pages].tolist()
        assert order != sorted(order), "pages are expected in shuffled order"


# ---- the main sweep ------------------------------------------------------------------------------

MAIN_CASES = list(itertools.product(HEAD_DIMS, DTYPES, (False, True), GROUPS, LAYOUTS))


def _case_settings(index: int) -> tuple[int, str, bool]:
    """(page_size, cache form, pad_indices) of main case `index`: every page size meets both layouts,
    every cache form both layouts."""
    return PAGE_SIZES[(index // 2) % len(PAGE_SIZES)], CACHE_FORMS[index % 3], index % 5 == 0


def _case_id(case) -> str:
    head_dim, dtype, causal, group, layout = case
    page_size, form, pad = _case_settings(MAIN_CASES.index(case))
    return (f"hd{head_dim}-{_name(dtype)}-{'causal' if causal else 'full'}-g{group}-{layout}-p{page_size}-{form}"
            f"{'-padidx' if pad else ''}")


@pytest.mark.parametrize("case", MAIN_CASES, ids=[_case_id(c) for c in MAIN_CASES])
def test_paged_matches_reference(case) -> None:
    head_dim, dtype, causal, group, layout = case
    index = MAIN_CASES.index(case)
    page_size, form, pad = _case_settings(index)
    seed = 3000 + index
    batch = make_batch(PAGED_LENS, group, head_dim, dtype, layout, page_size, seed, pad_indices=pad)
    # CUDA page tables are accepted too (plan synchronizes then); a quarter of the cases.
    index_device = "cuda" if group == 4 and layout == "HND" else "cpu"
    wrapper = new_wrapper(layout)
    plan(wrapper, batch, causal, index_device=index_device)
    what = f"{_case_id(case)} {batch.describe()} page table on {index_device}"
    check_run(wrapper, batch, causal, what, form=form)
    if group == 4:
        # One plan serves every layer: another cache (same page table, new values), same plan.
        other = make_batch(PAGED_LENS, group, head_dim, dtype, layout, page_size, seed, pad_indices=pad)
        other.q = torch.randn_like(other.q, dtype=torch.float32).to(dtype)
        other.cache.copy_(torch.where(torch.isnan(other.cache), other.cache, torch.randn_like(other.cache)))
        check_run(wrapper, other, causal, what + " [second layer, same plan]", form=form, allocate=False)


def _boundary_lens(page_size: int):
    """Lengths on, just under and just over page boundaries, plus q_len > kv_len and empty requests."""
    p = page_size
    return ((1, p), (p, p + 1), (3, 2 * p), (2 * p + 1, 2 * p + 1), (1, 3 * p - 1), (0, 0), (4, p - 1),
            (2 * p, p), (9, 100), (1, 1))


SWEEP_PAGE_SIZES = (1, 5, 7, 16, 32, 48, 64, 128)  # aligned (divides or multiple of the KV tile) and generic paths


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("page_size", SWEEP_PAGE_SIZES)
def test_page_size_sweep(page_size: int, causal: bool, layout: str) -> None:
    # extra_pages=0 on causal cases: every page of the cache is used, the largest index is num_pages - 1.
    batch = make_batch(_boundary_lens(page_size), 4, 128, torch.bfloat16, layout, page_size,
                       seed=page_size * 10 + causal, extra_pages=0 if causal else 9)
    wrapper = new_wrapper(layout)
    plan(wrapper, batch, causal)
    check_run(wrapper, batch, causal, f"page sweep p{page_size} causal={causal} {batch.describe()}",
              form=CACHE_FORMS[page_size % 3], allocate=False)


@pytest.mark.parametrize("sm_scale", [0.02, 0.3])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_explicit_sm_scale(head_dim: int, sm_scale: float) -> None:
    lens = ((17, 17), (63, 200), (129, 129), (1, 50), (40, 20))
    batch = make_batch(lens, 4, head_dim, torch.bfloat16, "HND", 16, seed=head_dim + int(sm_scale * 100))
    wrapper = new_wrapper("HND")
    plan(wrapper, batch, True, sm_scale=sm_scale)
    check_run(wrapper, batch, True, f"sm_scale={sm_scale} hd{head_dim}", sm_scale=sm_scale, allocate=False)


DEGENERATE_LENS = (
    (),  # a batch of 0 requests: empty outputs
    ((0, 0),),
    ((0, 5), (0, 17)),  # only q_len 0 requests: nothing to write
    ((3, 0), (7, 0)),  # only kv_len 0 (no pages) requests: out 0, lse -inf
    ((0, 0), (4, 0), (0, 9), (2, 2)),
)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_degenerate_batches(causal: bool, layout: str) -> None:
    for i, lens in enumerate(DEGENERATE_LENS):
        batch = make_batch(lens, 4, 128, torch.float16, layout, 16, seed=i)
        wrapper = new_wrapper(layout)
        plan(wrapper, batch, causal)
        what = f"degenerate causal={causal} {batch.describe()}"
        check_run(wrapper, batch, causal, what)
        out, lse = wrapper.run(batch.q, batch.cache, return_lse=True)
        assert tuple(out.shape) == (batch.total_q, batch.num_qo_heads, 128), f"{what}: out shape {tuple(out.shape)}"
        assert tuple(lse.shape) == (batch.total_q, batch.num_qo_heads), f"{what}: lse shape {tuple(lse.shape)}"


def test_paged_equals_ragged() -> None:
    """The paged kernel and the ragged kernel agree on the same K/V (both layouts, causal)."""
    for layout in LAYOUTS:
        batch = make_batch(PAGED_LENS, 4, 128, torch.bfloat16, layout, 16, seed=91)
        paged = new_wrapper(layout)
        plan(paged, batch, True)
        out_p, lse_p = paged.run(batch.q, batch.cache, return_lse=True)
        ragged = flashinfer_jit.BatchPrefillWithRaggedKVCacheWrapper(
            torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=DEVICE), kv_layout="NHD")
        ragged.plan(batch.qo_indptr, batch.kv_indptr, batch.num_qo_heads, batch.num_kv_heads, 128, causal=True,
                    q_data_type=torch.bfloat16)
        out_r, lse_r = ragged.run(batch.q, batch.k, batch.v, return_lse=True)
        ref.check_attention(out_p, out_r.float(), torch.bfloat16, f"paged vs ragged {layout}", lse_p, lse_r)


# ---- no device synchronization -------------------------------------------------------------------

SYNC_LENS_1 = ((17, 17), (1, 300), (129, 129), (0, 3), (40, 90), (7, 0))
SYNC_LENS_2 = ((100, 100), (3, 60), (50, 400), (1, 1))


@pytest.mark.parametrize("mode", ["replan", "fresh_wrapper", "cuda_graph_wrapper"])
def test_plan_and_run_do_not_synchronize(mode: str) -> None:
    """plan() from CPU int32 page tables, then run(), under torch.cuda.set_sync_debug_mode('error')."""
    head_dim, dtype, causal, layout = 128, torch.bfloat16, True, "HND"
    batch1 = make_batch(SYNC_LENS_1, 4, head_dim, dtype, layout, 16, seed=11, num_pages=64, pad_indices=True)
    batch2 = make_batch(SYNC_LENS_2, 4, head_dim, dtype, layout, 16, seed=12, num_pages=64, pad_indices=True)
    assert batch2.total_q <= batch1.total_q and batch2.batch_size <= batch1.batch_size
    wrapper = new_wrapper(layout, use_cuda_graph=mode == "cuda_graph_wrapper")
    plan(wrapper, batch1, causal)  # warm-up outside the check: kernel load, first-use allocations
    wrapper.run(batch1.q, batch1.cache)
    if mode == "fresh_wrapper":
        wrapper = new_wrapper(layout)
    t = batch2.table
    assert all(x.device.type == "cpu" and x.dtype == torch.int32 for x in (t.indptr, t.indices, t.last_page_len))
    out, lse = poisoned_outputs(batch2)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        wrapper.plan(batch2.qo_indptr, t.indptr, t.indices, t.last_page_len, batch2.num_qo_heads,
                     batch2.num_kv_heads, head_dim, 16, causal=causal, q_data_type=dtype)
        wrapper.run(batch2.q, batch2.cache, out=out, lse=lse, return_lse=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    ref_out, ref_lse = batch2.reference(causal)
    ref.check_attention(out, ref_out, dtype, f"no-sync {mode}", lse, ref_lse)


# ---- CUDA graphs ---------------------------------------------------------------------------------

GRAPH_MAX_Q = 512
GRAPH_LENS_1 = ((17, 17), (1, 100), (129, 129), (0, 5), (63, 200), (5, 0), (40, 40), (1, 1), (30, 10))
# Fewer requests, total q within the first plan's, single requests longer than any before.
GRAPH_LENS_2 = ((200, 230), (3, 240), (0, 0), (20, 10), (50, 20))
GRAPH_LENS_3 = ((1, 1), (2, 700))  # a much smaller batch, one long request (split-KV)

GRAPH_CASES = (  # head_dim, dtype, causal, layout, group, page_size
    (128, torch.bfloat16, True, "NHD", 4, 16),
    (64, torch.float16, False, "HND", 1, 5),
    (256, torch.bfloat16, True, "HND", 8, 1),
    (128, torch.float16, False, "NHD", 8, 64),
)


def _graph_case_id(case) -> str:
    head_dim, dtype, causal, layout, group, page_size = case
    return f"hd{head_dim}-{_name(dtype)}-{'causal' if causal else 'full'}-{layout}-g{group}-p{page_size}"


class PagedGraphRig:
    """A CUDA-graph wrapper captured once on fixed buffers: q/out/lse larger than any planned batch and
    one cache of fixed page count that every batch's pages live in."""

    def __init__(self, head_dim: int, dtype: torch.dtype, causal: bool, layout: str, group: int, page_size: int):
        self.head_dim, self.dtype, self.causal, self.layout, self.group = head_dim, dtype, causal, layout, group
        self.page_size = page_size
        self.num_pages = max(sum(ref.num_pages_for(kv, page_size) for _, kv in lens)
                             for lens in (GRAPH_LENS_1, GRAPH_LENS_2, GRAPH_LENS_3)) + 8
        hq = NUM_KV_HEADS * group
        gen = torch.Generator(device=DEVICE).manual_seed(head_dim + group)
        self.q = torch.randn((GRAPH_MAX_Q, hq, head_dim), generator=gen, device=DEVICE).to(dtype)
        self.cache = ref.new_paged_cache(self.num_pages, page_size, NUM_KV_HEADS, head_dim, dtype, DEVICE, layout)
        self.out = torch.full((GRAPH_MAX_Q, hq, head_dim), NAN, dtype=dtype, device=DEVICE)
        self.lse = torch.full((GRAPH_MAX_Q, hq), NAN, dtype=torch.float32, device=DEVICE)
        self.wrapper = new_wrapper(layout, use_cuda_graph=True)
        self.graph: torch.cuda.CUDAGraph | None = None

    def batch(self, lens, seed: int) -> ref.PagedBatch:
        # Every batch lists all pages of the cache in `indices` (used ones first): a fixed-size indices
        # buffer, as a serving loop under CUDA graphs would keep.
        return make_batch(lens, self.group, self.head_dim, self.dtype, self.layout, self.page_size, seed,
                          num_pages=self.num_pages, pad_indices=True)

    def load(self, batch: ref.PagedBatch) -> None:
        """plan() for `batch` and copy its data into the static buffers."""
        assert batch.total_q <= GRAPH_MAX_Q and batch.num_pages == self.num_pages
        plan(self.wrapper, batch, self.causal)
        self.q[: batch.total_q].copy_(batch.q)
        self.cache.copy_(batch.cache)

    def _run(self) -> None:
        self.wrapper.run(self.q, self.cache, out=self.out, lse=self.lse, return_lse=True)

    def capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._run()  # warm-up outside the capture
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._run()

    def replay_and_check(self, batch: ref.PagedBatch, what: str) -> None:
        assert self.graph is not None
        self.out.fill_(NAN)
        self.lse.fill_(NAN)
        self.graph.replay()
        torch.cuda.synchronize()
        tq = batch.total_q
        eager = new_wrapper(self.layout)
        plan(eager, batch, self.causal)
        eager_out, eager_lse = eager.run(batch.q, batch.cache, return_lse=True)
        ref.check_attention(self.out[:tq], eager_out.float(), self.dtype, f"{what}: graph replay vs eager",
                            self.lse[:tq], eager_lse)
        ref_out, ref_lse = batch.reference(self.causal)
        ref.check_attention(self.out[:tq], ref_out, self.dtype, f"{what}: graph replay vs reference",
                            self.lse[:tq], ref_lse)
        assert bool(torch.isnan(self.out[tq:]).all()), f"{what}: graph replay wrote out rows past the planned total"
        assert bool(torch.isnan(self.lse[tq:]).all()), f"{what}: graph replay wrote lse rows past the planned total"


@pytest.mark.parametrize("case", GRAPH_CASES, ids=[_graph_case_id(c) for c in GRAPH_CASES])
def test_cuda_graph_replay_equals_eager(case) -> None:
    rig = PagedGraphRig(*case)
    first = rig.batch(GRAPH_LENS_1, seed=1)
    rig.load(first)
    rig.capture()
    rig.replay_and_check(first, f"{_graph_case_id(case)} first plan")
    for lens, seed, label in ((GRAPH_LENS_2, 2, "re-plan with other lengths"),
                              (GRAPH_LENS_3, 3, "re-plan: 2 requests, one long"),
                              (GRAPH_LENS_1, 4, "back to the first lengths, new data")):
        batch = rig.batch(lens, seed=seed)
        assert batch.batch_size <= first.batch_size and batch.total_q <= first.total_q
        rig.load(batch)
        rig.replay_and_check(batch, f"{_graph_case_id(case)} {label}")
