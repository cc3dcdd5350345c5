"""GPU tests of BatchPrefillWithRaggedKVCacheWrapper and single_prefill_with_kv_cache against the
float32 PyTorch reference in tests/reference.py.

What is pinned down (FlashInfer semantics):
* every head_dim (64/128/256) x dtype (fp16/bf16) x causal x GQA group (1/4/8) x kv_layout (NHD/HND),
  on one ragged batch holding q/kv lengths 1, 15, 17, 63, 129, 1000, q_len < kv_len (a prefix in the
  cache), q_len > kv_len, q_len 0 and kv_len 0 requests;
* outputs poisoned with NaN before the run: preallocated out=/lse= filled with NaN, and the allocating
  path (NaN-filled blocks freed into the caching allocator just before); LSE (base 2) checked;
* a batch of 0 requests gives empty outputs; q_len 0 writes nothing; kv_len 0 gives out 0, LSE -inf;
* CUDA-graph replay equals eager, including after a re-plan with other lengths; a later plan with more
  requests or q tokens than the first is refused (ValueError) and the wrapper still replays correctly;
* wrapper.run under torch.compile(fullgraph=True) equals eager;
* 200 seeded random ragged batches (small sizes, mixed settings);
* plan() from CPU int32 indptrs and run() perform no device synchronization.

Tolerance (FlashInfer's, on unit randn inputs, default sm_scale): out atol 1e-2 (fp16) / 2e-2 (bf16)
plus a small rtol; LSE atol 1e-2 plus rtol 2e-3 (reference.py).

Run: python -m pytest -m gpu -q tests/test_prefill_gpu.py   (skipped, with the reason, without CUDA)
"""
from __future__ import annotations

import itertools
import random

import pytest
import torch

import flashinfer_jit

import reference as ref
from conftest import DEVICE, NAN, PREFILL_BACKEND

pytestmark = pytest.mark.gpu

HEAD_DIMS = (64, 128, 256)
DTYPES = (torch.float16, torch.bfloat16)
LAYOUTS = ("NHD", "HND")
GROUPS = (1, 4, 8)
NUM_KV_HEADS = 2
WORKSPACE_BYTES = 128 << 20

# (q_len, kv_len) per request; the order interleaves long and short requests.
STANDARD_LENS = (
    (1, 1), (15, 15), (129, 1000), (17, 17), (0, 17), (63, 63), (5, 0), (129, 129),
    (15, 129), (1000, 1000), (1, 1000), (63, 15), (17, 63), (0, 0),
)


# ---- helpers -------------------------------------------------------------------------------------

def _name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def new_wrapper(layout: str, use_cuda_graph: bool = False):
    workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=DEVICE)
    return flashinfer_jit.BatchPrefillWithRaggedKVCacheWrapper(workspace, kv_layout=layout, use_cuda_graph=use_cuda_graph,
                                                               backend=PREFILL_BACKEND)


def make_batch(lens, group: int, head_dim: int, dtype: torch.dtype, layout: str, seed: int,
               num_kv_heads: int = NUM_KV_HEADS) -> ref.RaggedBatch:
    q_lens = [a for a, _ in lens]
    kv_lens = [b for _, b in lens]
    return ref.make_ragged_batch(q_lens, kv_lens, num_kv_heads * group, num_kv_heads, head_dim, dtype, DEVICE,
                                 layout, seed)


def plan(wrapper, batch: ref.RaggedBatch, causal: bool, sm_scale: float | None = None, indptr_device: str = "cpu",
         explicit_kv_dtype: bool = False) -> None:
    kwargs = {"kv_data_type": batch.q.dtype} if explicit_kv_dtype else {}
    wrapper.plan(batch.qo_indptr.to(indptr_device), batch.kv_indptr.to(indptr_device), batch.num_qo_heads,
                 batch.num_kv_heads, batch.head_dim, causal=causal, sm_scale=sm_scale, q_data_type=batch.q.dtype,
                 **kwargs)


def poisoned_outputs(batch: ref.RaggedBatch, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    rows = batch.total_q if rows is None else rows
    out = torch.full((rows, batch.num_qo_heads, batch.head_dim), NAN, dtype=batch.q.dtype, device=DEVICE)
    lse = torch.full((rows, batch.num_qo_heads), NAN, dtype=torch.float32, device=DEVICE)
    return out, lse


def poison_allocator(batch: ref.RaggedBatch) -> None:
    """Free NaN-filled blocks of the output sizes so the allocating path gets them back: an element the
    kernel forgets stays NaN instead of showing stale finite data."""
    blocks = poisoned_outputs(batch)
    del blocks


def run_into(wrapper, batch: ref.RaggedBatch, out: torch.Tensor, lse: torch.Tensor) -> None:
    """run(out=, lse=, return_lse=True) must write into (and return) the given tensors."""
    result = wrapper.run(batch.q, batch.k, batch.v, out=out, lse=lse, return_lse=True)
    assert isinstance(result, tuple) and len(result) == 2, f"run(return_lse=True) returned {type(result)}"
    if out.numel():
        assert result[0].data_ptr() == out.data_ptr(), "run(out=...) did not return the given out tensor"
    if lse.numel():
        assert result[1].data_ptr() == lse.data_ptr(), "run(lse=...) did not return the given lse tensor"


def check_run(wrapper, batch: ref.RaggedBatch, causal: bool, what: str, sm_scale: float | None = None,
              allocate: bool = True) -> None:
    """Run `batch` through a planned wrapper on every output path and compare with the reference."""
    ref_out, ref_lse = batch.reference(causal, sm_scale)
    out, lse = poisoned_outputs(batch)
    run_into(wrapper, batch, out, lse)
    ref.check_attention(out, ref_out, batch.q.dtype, f"{what} [out=, lse=]", lse, ref_lse)
    if not allocate:
        return
    poison_allocator(batch)
    out2, lse2 = wrapper.run(batch.q, batch.k, batch.v, return_lse=True)
    ref.check_attention(out2, ref_out, batch.q.dtype, f"{what} [allocated, return_lse]", lse2, ref_lse)
    poison_allocator(batch)
    out3 = wrapper.run(batch.q, batch.k, batch.v)
    assert isinstance(out3, torch.Tensor), f"{what}: run() without return_lse must return a tensor, got {type(out3)}"
    ref.check_attention(out3, ref_out, batch.q.dtype, f"{what} [allocated]")


# ---- the main sweep ------------------------------------------------------------------------------

MAIN_CASES = list(itertools.product(HEAD_DIMS, DTYPES, (False, True), GROUPS, LAYOUTS))


def _case_id(case) -> str:
    head_dim, dtype, causal, group, layout = case
    return f"hd{head_dim}-{_name(dtype)}-{'causal' if causal else 'full'}-g{group}-{layout}"


@pytest.mark.parametrize("case", MAIN_CASES, ids=[_case_id(c) for c in MAIN_CASES])
def test_ragged_matches_reference(case) -> None:
    head_dim, dtype, causal, group, layout = case
    seed = 1000 + MAIN_CASES.index(case)
    batch = make_batch(STANDARD_LENS, group, head_dim, dtype, layout, seed)
    # CUDA indptrs are accepted too (plan may synchronize then); cover them on a quarter of the cases.
    indptr_device = "cuda" if group == 4 and layout == "HND" else "cpu"
    wrapper = new_wrapper(layout)
    plan(wrapper, batch, causal, indptr_device=indptr_device)
    what = f"{_case_id(case)} {batch.describe()}"
    check_run(wrapper, batch, causal, what)
    if group == 4:
        # One plan serves every layer: new data of the same lengths, same plan.
        batch2 = make_batch(STANDARD_LENS, group, head_dim, dtype, layout, seed + 5000)
        check_run(wrapper, batch2, causal, what + " [second run, same plan]", allocate=False)


# Decode-sized tiles: a few query tokens per request (speculative decoding, chunked decode). The
# planner picks 16-row tiles when a request's packed rows (q_len x group) fit, and four warps split
# each KV tile's keys; their states merge in the epilogue, and split-KV chunks merge on top of that.
SMALL_Q_LENS = ((1, 1), (2, 17), (1, 1000), (3, 63), (0, 9), (4, 129), (1, 0), (2, 2), (1, 64), (4, 4))
SMALL_CASES = [(hd, dt, causal, g, lay) for hd, dt, causal, g, lay in MAIN_CASES if hd != 256 and (dt == torch.bfloat16
               or lay == "NHD")]


@pytest.mark.parametrize("split", ["auto", "fixed64"])
@pytest.mark.parametrize("case", SMALL_CASES, ids=[_case_id(c) for c in SMALL_CASES])
@pytest.mark.skipif(PREFILL_BACKEND == "sm90", reason="the sm90 kernel has 128-row q tiles only (\"auto\" runs "
                    "decode-like batches such as these on fa2's 16-row tiles)")
def test_decode_sized_tiles(case, split: str) -> None:
    head_dim, dtype, causal, group, layout = case
    # q lengths scaled so q_len x group stays within 16 rows (group 8: 1-2 tokens).
    lens = tuple((min(q, 16 // group), kv) for q, kv in SMALL_Q_LENS)
    batch = make_batch(lens, group, head_dim, dtype, layout, seed=7000 + SMALL_CASES.index(case))
    wrapper = new_wrapper(layout)
    kwargs = {"fixed_split_size": 64} if split == "fixed64" else {}
    wrapper.plan(batch.qo_indptr, batch.kv_indptr, batch.num_qo_heads, batch.num_kv_heads, head_dim, causal=causal,
                 q_data_type=dtype, **kwargs)
    assert wrapper._state.params.cta_q == 16, "the planner should pick 16-row tiles for this batch"
    check_run(wrapper, batch, causal, f"{_case_id(case)} split={split} {batch.describe()}")


@pytest.mark.parametrize("sm_scale", [0.02, 0.3])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_explicit_sm_scale(head_dim: int, causal: bool, sm_scale: float) -> None:
    lens = ((17, 17), (63, 200), (129, 129), (1, 50), (40, 20))
    batch = make_batch(lens, 4, head_dim, torch.bfloat16, "NHD", seed=head_dim + int(sm_scale * 100) + causal)
    wrapper = new_wrapper("NHD")
    plan(wrapper, batch, causal, sm_scale=sm_scale)
    check_run(wrapper, batch, causal, f"sm_scale={sm_scale} hd{head_dim} causal={causal}", sm_scale=sm_scale,
              allocate=False)


DEGENERATE_LENS = (
    (),  # a batch of 0 requests: empty outputs
    ((0, 0),),
    ((0, 5), (0, 17)),  # only q_len 0 requests: nothing to write
    ((3, 0), (7, 0)),  # only kv_len 0 requests: out 0, lse -inf
    ((0, 0), (4, 0), (0, 9), (2, 2)),
)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_degenerate_batches(head_dim: int, causal: bool, layout: str) -> None:
    dtype = torch.float16 if head_dim == 128 else torch.bfloat16
    for i, lens in enumerate(DEGENERATE_LENS):
        batch = make_batch(lens, 4, head_dim, dtype, layout, seed=i)
        wrapper = new_wrapper(layout)
        plan(wrapper, batch, causal)
        what = f"degenerate hd{head_dim} causal={causal} {batch.describe()}"
        check_run(wrapper, batch, causal, what)
        out, lse = wrapper.run(batch.q, batch.k, batch.v, return_lse=True)
        assert tuple(out.shape) == (batch.total_q, batch.num_qo_heads, head_dim), f"{what}: out shape {tuple(out.shape)}"
        assert tuple(lse.shape) == (batch.total_q, batch.num_qo_heads), f"{what}: lse shape {tuple(lse.shape)}"


# ---- single_prefill_with_kv_cache ----------------------------------------------------------------

SINGLE_CASES = (  # (kv_layout, q_len, kv_len, group, sm_scale)
    ("NHD", 129, 129, 4, None),
    ("HND", 17, 1000, 8, None),
    ("NHD", 1, 1, 1, None),
    ("HND", 63, 15, 4, None),
    ("NHD", 1000, 1000, 1, 0.1),
    ("HND", 15, 63, 1, None),
)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_single_prefill(head_dim: int, dtype: torch.dtype, causal: bool) -> None:
    for i, (layout, q_len, kv_len, group, sm_scale) in enumerate(SINGLE_CASES):
        batch = make_batch(((q_len, kv_len),), group, head_dim, dtype, layout, seed=77 + i)
        ref_out, ref_lse = batch.reference(causal, sm_scale)
        what = f"single_prefill hd{head_dim} {_name(dtype)} causal={causal} {layout} q={q_len} kv={kv_len} g={group}"
        out, lse = flashinfer_jit.single_prefill_with_kv_cache(
            batch.q, batch.k, batch.v, causal=causal, sm_scale=sm_scale, kv_layout=layout, return_lse=True,
            backend=PREFILL_BACKEND)
        ref.check_attention(out, ref_out, dtype, what, lse, ref_lse)
        out_only = flashinfer_jit.single_prefill_with_kv_cache(
            batch.q, batch.k, batch.v, causal=causal, sm_scale=sm_scale, kv_layout=layout, backend=PREFILL_BACKEND)
        assert isinstance(out_only, torch.Tensor), f"{what}: return_lse=False must return a tensor"
        ref.check_attention(out_only, ref_out, dtype, what + " [no lse]")


# ---- fuzz ----------------------------------------------------------------------------------------

FUZZ_CASES = 200
FUZZ_SEED = 20240611


def test_fuzz_random_ragged_batches() -> None:
    """200 seeded random small ragged batches over every setting; every failing case is listed."""
    rng = random.Random(FUZZ_SEED)
    failures = []
    for case in range(FUZZ_CASES):
        head_dim = rng.choice(HEAD_DIMS)
        dtype = rng.choice(DTYPES)
        causal = rng.random() < 0.5
        group = rng.choice((1, 2, 4, 8))
        num_kv_heads = rng.choice((1, 2, 3))
        layout = rng.choice(LAYOUTS)
        batch_size = rng.choice((0, 1, 1, 2, 3, 4, 5, 7, 9))
        q_lens, kv_lens = ref.random_lengths(rng, batch_size, max_q=rng.choice((8, 48, 130)),
                                             max_kv=rng.choice((16, 96, 300)))
        sm_scale = None if rng.random() < 0.7 else rng.uniform(0.03, 0.3)
        indptr_device = "cuda" if rng.random() < 0.25 else "cpu"
        explicit_kv_dtype = rng.random() < 0.5
        allocate = rng.random() < 0.3
        batch = ref.make_ragged_batch(q_lens, kv_lens, num_kv_heads * group, num_kv_heads, head_dim, dtype, DEVICE,
                                      layout, seed=case)
        what = (f"fuzz case {case}: causal={causal} sm_scale={sm_scale} indptr on {indptr_device} "
                f"{batch.describe()}")
        try:
            wrapper = new_wrapper(layout)
            plan(wrapper, batch, causal, sm_scale=sm_scale, indptr_device=indptr_device,
                 explicit_kv_dtype=explicit_kv_dtype)
            ref_out, ref_lse = batch.reference(causal, sm_scale)
            if allocate:
                poison_allocator(batch)
                out, lse = wrapper.run(batch.q, batch.k, batch.v, return_lse=True)
            else:
                out, lse = poisoned_outputs(batch)
                run_into(wrapper, batch, out, lse)
            ref.check_attention(out, ref_out, dtype, what, lse, ref_lse)
        except Exception as exc:  # noqa: BLE001 - every failing case is reported, then the test fails
            failures.append(f"{what}\n    {type(exc).__name__}: {str(exc)[:600]}")
    assert not failures, f"{len(failures)} of {FUZZ_CASES} fuzz cases failed:\n" + "\n".join(failures[:20])


# ---- no device synchronization -------------------------------------------------------------------

SYNC_LENS_1 = ((17, 17), (1, 300), (129, 129), (0, 3), (40, 90), (7, 0))
SYNC_LENS_2 = ((100, 100), (3, 60), (50, 400), (1, 1))


@pytest.mark.parametrize("mode", ["replan", "fresh_wrapper", "cuda_graph_wrapper"])
def test_plan_and_run_do_not_synchronize(mode: str) -> None:
    """plan() from CPU int32 indptrs, then run(), under torch.cuda.set_sync_debug_mode('error')."""
    head_dim, dtype, causal = 128, torch.bfloat16, True
    batch1 = make_batch(SYNC_LENS_1, 4, head_dim, dtype, "NHD", seed=11)
    batch2 = make_batch(SYNC_LENS_2, 4, head_dim, dtype, "NHD", seed=12)
    assert batch2.total_q <= batch1.total_q and batch2.batch_size <= batch1.batch_size
    wrapper = new_wrapper("NHD", use_cuda_graph=mode == "cuda_graph_wrapper")
    # Warm-up outside the check: loads the kernel library, first-use allocations.
    plan(wrapper, batch1, causal)
    wrapper.run(batch1.q, batch1.k, batch1.v)
    if mode == "fresh_wrapper":
        wrapper = new_wrapper("NHD")
    qo_indptr, kv_indptr = batch2.qo_indptr, batch2.kv_indptr
    assert qo_indptr.device.type == "cpu" and qo_indptr.dtype == torch.int32
    out, lse = poisoned_outputs(batch2)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        wrapper.plan(qo_indptr, kv_indptr, batch2.num_qo_heads, batch2.num_kv_heads, head_dim, causal=causal,
                     q_data_type=dtype)
        wrapper.run(batch2.q, batch2.k, batch2.v, out=out, lse=lse, return_lse=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    ref_out, ref_lse = batch2.reference(causal)
    ref.check_attention(out, ref_out, dtype, f"no-sync {mode}", lse, ref_lse)


# ---- CUDA graphs ---------------------------------------------------------------------------------

GRAPH_MAX_Q = 512
GRAPH_MAX_KV = 1536
GRAPH_LENS_1 = ((17, 17), (1, 100), (129, 129), (0, 5), (63, 200), (5, 0), (40, 40), (1, 1), (30, 10))
# Fewer requests, totals within the first plan's, but single requests longer than any before.
GRAPH_LENS_2 = ((200, 230), (3, 240), (0, 0), (20, 10), (50, 20))
# Totals above the first plan's (still within the captured buffers).
GRAPH_LENS_3 = ((400, 400), (1, 900), (100, 50))

GRAPH_CASES = (
    (128, torch.bfloat16, True, "NHD", 4),
    (64, torch.float16, False, "HND", 1),
    (256, torch.bfloat16, True, "HND", 8),
    (128, torch.float16, False, "NHD", 8),
)


def _graph_case_id(case) -> str:
    head_dim, dtype, causal, layout, group = case
    return f"hd{head_dim}-{_name(dtype)}-{'causal' if causal else 'full'}-{layout}-g{group}"


class GraphRig:
    """A CUDA-graph wrapper captured once on fixed-size buffers (larger than any planned batch)."""

    def __init__(self, head_dim: int, dtype: torch.dtype, causal: bool, layout: str, group: int):
        self.head_dim, self.dtype, self.causal, self.layout, self.group = head_dim, dtype, causal, layout, group
        hq, hkv = NUM_KV_HEADS * group, NUM_KV_HEADS
        gen = torch.Generator(device=DEVICE).manual_seed(head_dim + group)
        self.q = torch.randn((GRAPH_MAX_Q, hq, head_dim), generator=gen, device=DEVICE).to(dtype)
        kv_shape = (GRAPH_MAX_KV, hkv, head_dim) if layout == "NHD" else (hkv, GRAPH_MAX_KV, head_dim)
        self.k = torch.randn(kv_shape, generator=gen, device=DEVICE).to(dtype)
        self.v = torch.randn(kv_shape, generator=gen, device=DEVICE).to(dtype)
        self.out = torch.full((GRAPH_MAX_Q, hq, head_dim), NAN, dtype=dtype, device=DEVICE)
        self.lse = torch.full((GRAPH_MAX_Q, hq), NAN, dtype=torch.float32, device=DEVICE)
        self.wrapper = new_wrapper(layout, use_cuda_graph=True)
        self.graph: torch.cuda.CUDAGraph | None = None

    def batch(self, lens, seed: int) -> ref.RaggedBatch:
        return make_batch(lens, self.group, self.head_dim, self.dtype, self.layout, seed)

    def load(self, batch: ref.RaggedBatch) -> None:
        """plan() for `batch` and copy its data into the head of the static buffers."""
        assert batch.total_q <= GRAPH_MAX_Q and batch.total_kv <= GRAPH_MAX_KV
        plan(self.wrapper, batch, self.causal)
        self.q[: batch.total_q].copy_(batch.q)
        if self.layout == "NHD":
            self.k[: batch.total_kv].copy_(batch.k)
            self.v[: batch.total_kv].copy_(batch.v)
        else:
            self.k[:, : batch.total_kv].copy_(batch.k)
            self.v[:, : batch.total_kv].copy_(batch.v)

    def _run(self) -> None:
        self.wrapper.run(self.q, self.k, self.v, out=self.out, lse=self.lse, return_lse=True)

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

    def replay_and_check(self, batch: ref.RaggedBatch, what: str) -> None:
        assert self.graph is not None
        self.out.fill_(NAN)
        self.lse.fill_(NAN)
        self.graph.replay()
        torch.cuda.synchronize()
        tq = batch.total_q
        # Eager, on a plain wrapper with exact-size tensors.
        eager = new_wrapper(self.layout)
        plan(eager, batch, self.causal)
        eager_out, eager_lse = eager.run(batch.q, batch.k, batch.v, return_lse=True)
        ref.check_attention(self.out[:tq], eager_out.float(), self.dtype, f"{what}: graph replay vs eager",
                            self.lse[:tq], eager_lse)
        ref_out, ref_lse = batch.reference(self.causal)
        ref.check_attention(self.out[:tq], ref_out, self.dtype, f"{what}: graph replay vs reference",
                            self.lse[:tq], ref_lse)
        assert bool(torch.isnan(self.out[tq:]).all()), f"{what}: graph replay wrote out rows past the planned total"
        assert bool(torch.isnan(self.lse[tq:]).all()), f"{what}: graph replay wrote lse rows past the planned total"


@pytest.mark.parametrize("case", GRAPH_CASES, ids=[_graph_case_id(c) for c in GRAPH_CASES])
def test_cuda_graph_replay_equals_eager(case) -> None:
    rig = GraphRig(*case)
    first = rig.batch(GRAPH_LENS_1, seed=1)
    rig.load(first)
    rig.capture()
    rig.replay_and_check(first, f"{_graph_case_id(case)} first plan")
    second = rig.batch(GRAPH_LENS_2, seed=2)
    assert second.batch_size <= first.batch_size
    assert second.total_q <= first.total_q and second.total_kv <= first.total_kv
    rig.load(second)
    rig.replay_and_check(second, f"{_graph_case_id(case)} re-plan with other lengths")
    again = rig.batch(GRAPH_LENS_1, seed=3)
    rig.load(again)
    rig.replay_and_check(again, f"{_graph_case_id(case)} back to the first lengths, new data")


@pytest.mark.parametrize("case", GRAPH_CASES[:2], ids=[_graph_case_id(c) for c in GRAPH_CASES[:2]])
def test_cuda_graph_replan_with_larger_totals(case) -> None:
    """With use_cuda_graph=True the first plan fixes the capacity: a later plan() whose total q tokens
    (here with a smaller batch, within the captured buffers) or whose batch exceeds the first plan's
    raises ValueError ("later plans must fit the first", as FlashInfer refuses it), and a plan that
    fits still replays correctly afterwards."""
    rig = GraphRig(*case)
    first = rig.batch(GRAPH_LENS_1, seed=4)
    rig.load(first)
    rig.capture()
    rig.replay_and_check(first, f"{_graph_case_id(case)} first plan")
    bigger = rig.batch(GRAPH_LENS_3, seed=5)
    assert bigger.total_q > first.total_q and bigger.total_kv > first.total_kv
    assert bigger.batch_size <= first.batch_size
    with pytest.raises(ValueError, match="later plans must fit the first"):
        plan(rig.wrapper, bigger, rig.causal)
    more_requests = rig.batch(((1, 1),) * (first.batch_size + 1), seed=7)
    assert more_requests.total_q <= first.total_q and more_requests.total_kv <= first.total_kv
    with pytest.raises(ValueError, match="later plans must fit the first"):
        plan(rig.wrapper, more_requests, rig.causal)
    again = rig.batch(GRAPH_LENS_1, seed=6)
    rig.load(again)
    rig.replay_and_check(again, f"{_graph_case_id(case)} after refused larger plans")


# ---- less common paths ---------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_single_prefill_empty_kv(causal: bool) -> None:
    """kv_len 0: every row is an empty state (out 0, lse -inf), as in the batch wrapper."""
    for layout in LAYOUTS:
        batch = make_batch(((5, 0),), 4, 128, torch.bfloat16, layout, seed=3)
        out, lse = flashinfer_jit.single_prefill_with_kv_cache(batch.q, batch.k, batch.v, causal=causal,
                                                               kv_layout=layout, return_lse=True,
                                                               backend=PREFILL_BACKEND)
        ref_out, ref_lse = batch.reference(causal)
        ref.check_attention(out, ref_out, torch.bfloat16, f"single_prefill kv_len 0 {layout}", lse, ref_lse)


def test_wrapper_run_under_torch_compile() -> None:
    """wrapper.run inside torch.compile(fullgraph=True), planned outside: the same result as eager."""
    batch = make_batch(((17, 17), (1, 100), (129, 129), (40, 90)), 4, 128, torch.bfloat16, "NHD", seed=21)
    wrapper = new_wrapper("NHD")
    plan(wrapper, batch, True)  # plan outside the compiled region

    def f(q, k, v):
        return wrapper.run(q, k, v).float() * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    got = compiled(batch.q, batch.k, batch.v)
    expected = f(batch.q, batch.k, batch.v)
    torch.cuda.synchronize()
    assert torch.equal(got, expected), "compiled wrapper.run differs from eager"
    ref_out, _ = batch.reference(True)
    ref.check_attention((got / 2.0).to(torch.bfloat16), ref_out, torch.bfloat16, "compiled wrapper.run")


# ---- the Hopper backend ----------------------------------------------------------------------------

def _is_hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.skipif(not _is_hopper(), reason="the sm90 backend runs on compute capability 9.x only")
def test_auto_picks_sm90_on_hopper_and_falls_back_per_plan() -> None:
    """backend="auto" runs sm90 on Hopper for ragged K/V; a GQA group that does not divide 128 falls back
    to fa2 for that plan (visible in wrapper.backend); an explicit "sm90" refuses it before launch."""
    workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=DEVICE)
    wrapper = flashinfer_jit.BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD")
    assert wrapper.backend == "sm90"
    batch = make_batch(((17, 40), (130, 130)), 4, 128, torch.bfloat16, "NHD", seed=5)
    plan(wrapper, batch, True)
    assert wrapper.backend == "sm90"
    check_run(wrapper, batch, True, "auto sm90", allocate=False)
    odd = make_batch(((17, 40), (130, 130)), 3, 128, torch.bfloat16, "NHD", seed=6)
    plan(wrapper, odd, True)
    assert wrapper.backend == "fa2"
    check_run(wrapper, odd, True, "auto -> fa2 (group 3)", allocate=False)
    explicit = flashinfer_jit.BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD", backend="fa3")
    with pytest.raises(flashinfer_jit.NotSupportedError, match="group"):
        plan(explicit, odd, True)


SM90_AGREEMENT_CASES = 24


@pytest.mark.skipif(not _is_hopper(), reason="the sm90 backend runs on compute capability 9.x only")
def test_sm90_agrees_with_fa2_on_random_batches() -> None:
    """The two kernel families on the same random ragged batches: both within tolerance of the float32
    reference, and of each other (the same tolerance)."""
    rng = random.Random(90)
    workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=DEVICE)
    wrappers = {b: flashinfer_jit.BatchPrefillWithRaggedKVCacheWrapper(workspace if b == "fa2" else
                                                                       torch.empty_like(workspace), "NHD", backend=b)
                for b in ("fa2", "sm90")}
    for i in range(SM90_AGREEMENT_CASES):
        head_dim = rng.choice(HEAD_DIMS)
        dtype = rng.choice(DTYPES)
        causal = rng.random() < 0.5
        group = rng.choice(GROUPS)
        lens = [(rng.choice((0, 1, rng.randint(1, 300))), rng.choice((0, 1, rng.randint(1, 700))))
                for _ in range(rng.randint(1, 9))]
        batch = make_batch(lens, group, head_dim, dtype, "NHD", seed=900 + i, num_kv_heads=rng.choice((1, 2)))
        outs = {}
        for name, wrapper in wrappers.items():
            plan(wrapper, batch, causal)
            assert wrapper.backend == name
            out, lse = poisoned_outputs(batch)
            run_into(wrapper, batch, out, lse)
            outs[name] = (out, lse)
        what = f"case {i}: hd{head_dim} {_name(dtype)} causal={causal} g={group} lens={lens}"
        ref_out, ref_lse = batch.reference(causal)
        for name, (out, lse) in outs.items():
            ref.check_attention(out, ref_out, dtype, f"{what} [{name}]", lse, ref_lse)
        ref.check_attention(outs["sm90"][0], outs["fa2"][0].float(), dtype, f"{what} [sm90 vs fa2]",
                            outs["sm90"][1], outs["fa2"][1])
