"""GPU tests of merge_state / merge_state_in_place / merge_states against the float32 reference.

Inputs are fresh randn values (never zeros), with empty states (LSE -inf) in one or both inputs;
outputs are poisoned with NaN before each call (freshly allocated outputs through the caching
allocator: NaN-filled blocks of the same sizes are freed just before the call), and NaN never passes:
every output is checked finite except LSEs the reference says are -inf.

Run: python -m pytest -m gpu -q tests/test_merge_state_gpu.py   (skipped, with the reason, without CUDA)
"""
from __future__ import annotations

import pytest
import torch

import flashinfer_jit

import reference as ref
from conftest import DEVICE, NAN

pytestmark = pytest.mark.gpu

NEG_INF = float("-inf")
HEAD_DIMS = (64, 128, 256)
DTYPES = (torch.float16, torch.bfloat16)
NUM_HEADS = 5  # odd on purpose: (row, head) pairs do not fill blocks evenly


def _name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def _tol(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for merged v; inputs are unit randn, so this is output rounding plus a margin."""
    return (1e-2, 8e-3) if dtype == torch.bfloat16 else (2e-3, 2e-3)


S_ATOL, S_RTOL = 1e-3, 1e-5


def poison_allocator(*specs: tuple[tuple[int, ...], torch.dtype]) -> None:
    """Free NaN-filled blocks of exactly the sizes the op is about to allocate (in the same order), so
    the caching allocator hands them back to it: an output element the kernel forgets stays NaN."""
    blocks = [torch.full(shape, NAN, dtype=dtype, device=DEVICE) for shape, dtype in specs]
    del blocks


def rand_state(n: int, h: int, d: int, dtype: torch.dtype, gen: torch.Generator,
               p_empty: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    v = torch.randn((n, h, d), generator=gen, device=DEVICE).to(dtype)
    s = torch.randn((n, h), generator=gen, device=DEVICE) * 8.0
    empty = torch.rand((n, h), generator=gen, device=DEVICE) < p_empty
    return v, s.masked_fill(empty, NEG_INF)


def rand_pair(n: int, h: int, d: int, dtype: torch.dtype, seed: int):
    """Two states with every emptiness combination present: row 0 empty in both, row 1 only in a,
    row 2 only in b, row 3 with a large LSE gap (stability), the rest random."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    v_a, s_a = rand_state(n, h, d, dtype, gen)
    v_b, s_b = rand_state(n, h, d, dtype, gen)
    if n > 0:
        s_a[0] = NEG_INF
        s_b[0] = NEG_INF
    if n > 1:
        s_a[1] = NEG_INF
        s_b[1] = torch.randn((h,), generator=gen, device=DEVICE)
    if n > 2:
        s_a[2] = torch.randn((h,), generator=gen, device=DEVICE)
        s_b[2] = NEG_INF
    if n > 3:
        s_a[3] = 60.0 + torch.randn((h,), generator=gen, device=DEVICE)
        s_b[3] = -60.0 + torch.randn((h,), generator=gen, device=DEVICE)
    return v_a, s_a, v_b, s_b


def check_state(v: torch.Tensor, s: torch.Tensor, ref_v: torch.Tensor, ref_s: torch.Tensor, dtype: torch.dtype,
                what: str) -> None:
    assert v.dtype == dtype, f"{what}: v dtype {v.dtype}"
    assert s.dtype == torch.float32, f"{what}: s dtype {s.dtype}"
    assert v.shape == ref_v.shape and s.shape == ref_s.shape, (
        f"{what}: shapes v {tuple(v.shape)} s {tuple(s.shape)}, expected {tuple(ref_v.shape)} {tuple(ref_s.shape)}")
    if v.numel():
        bad = ~torch.isfinite(v)
        assert not bool(bad.any()), f"{what}: {int(bad.sum())} non-finite v values (first at {torch.nonzero(bad)[0].tolist()})"
    atol, rtol = _tol(dtype)
    ref.check_close(v, ref_v, atol, rtol, f"{what}: v")
    if s.numel() == 0:
        return
    empty = torch.isneginf(ref_s)
    assert torch.equal(torch.isneginf(s), empty), f"{what}: s is not -inf exactly where the reference is -inf"
    assert bool(torch.isfinite(s[~empty]).all()), f"{what}: non-finite s where the reference is finite"
    if bool(empty.any()):
        assert bool((v[empty] == 0).all()), f"{what}: merging only empty states must give v = 0"
    ref.check_close(torch.where(empty, 0.0, s), torch.where(empty, 0.0, ref_s), S_ATOL, S_RTOL, f"{what}: s")


# ---- merge_state ---------------------------------------------------------------------------------

@pytest.mark.parametrize("num_rows", [1, 37, 777])
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_merge_state(head_dim: int, dtype: torch.dtype, num_rows: int) -> None:
    v_a, s_a, v_b, s_b = rand_pair(num_rows, NUM_HEADS, head_dim, dtype, seed=head_dim + num_rows)
    ref_v, ref_s = ref.merge_state_ref(v_a, s_a, v_b, s_b)
    poison_allocator((tuple(v_a.shape), dtype), (tuple(s_a.shape), torch.float32))
    v, s = flashinfer_jit.merge_state(v_a, s_a, v_b, s_b)
    check_state(v, s, ref_v, ref_s, dtype, f"merge_state D={head_dim} {_name(dtype)} rows={num_rows}")


@pytest.mark.parametrize("with_mask", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_merge_state_in_place(head_dim: int, dtype: torch.dtype, with_mask: bool) -> None:
    n = 301
    v, s, v_other, s_other = rand_pair(n, NUM_HEADS, head_dim, dtype, seed=7 * head_dim + with_mask)
    v0, s0 = v.clone(), s.clone()
    ref_v, ref_s = ref.merge_state_ref(v0, s0, v_other, s_other)
    mask = None
    if with_mask:
        gen = torch.Generator(device=DEVICE).manual_seed(head_dim)
        mask = torch.rand((n,), generator=gen, device=DEVICE) < 0.5
        mask[:4] = True  # the special rows of rand_pair are merged
        mask[4] = False
    flashinfer_jit.merge_state_in_place(v, s, v_other, s_other, mask=mask)
    what = f"merge_state_in_place D={head_dim} {_name(dtype)} mask={with_mask}"
    if mask is None:
        check_state(v, s, ref_v, ref_s, dtype, what)
        return
    keep = ~mask
    assert torch.equal(v[keep], v0[keep]), f"{what}: rows with mask False were modified (v)"
    assert torch.equal(s[keep], s0[keep]), f"{what}: rows with mask False were modified (s)"
    check_state(v[mask], s[mask], ref_v[mask], ref_s[mask], dtype, what)


# ---- merge_states --------------------------------------------------------------------------------

@pytest.mark.parametrize("num_states", [0, 1, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_merge_states(head_dim: int, dtype: torch.dtype, num_states: int) -> None:
    n = 123
    gen = torch.Generator(device=DEVICE).manual_seed(head_dim * 10 + num_states)
    v = torch.randn((n, num_states, NUM_HEADS, head_dim), generator=gen, device=DEVICE).to(dtype)
    s = torch.randn((n, num_states, NUM_HEADS), generator=gen, device=DEVICE) * 8.0
    s = s.masked_fill(torch.rand(s.shape, generator=gen, device=DEVICE) < 0.3, NEG_INF)
    if num_states:
        s[0] = NEG_INF  # every state of row 0 empty
        s[1, 0] = 50.0  # large gaps
        if num_states > 1:
            s[1, 1] = -50.0
    ref_v, ref_s = ref.merge_states_ref(v, s)
    poison_allocator(((n, NUM_HEADS, head_dim), dtype), ((n, NUM_HEADS), torch.float32))
    out_v, out_s = flashinfer_jit.merge_states(v, s)
    check_state(out_v, out_s, ref_v, ref_s, dtype, f"merge_states D={head_dim} {_name(dtype)} K={num_states}")


# ---- strided inputs ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_strided_inputs(head_dim: int, dtype: torch.dtype) -> None:
    """Non-contiguous views (last dim contiguous, rows 16-byte aligned, as the ops require)."""
    n, h, d = 77, NUM_HEADS, head_dim
    va, sa, vb, sb = rand_pair(n, h, d, dtype, seed=99 + d)
    # v_a: the first half of a wider last dim; v_b: a [H, N, D] tensor transposed to [N, H, D].
    big_a = torch.randn((n, h, 2 * d), device=DEVICE).to(dtype)
    big_a[:, :, :d] = va
    v_a = big_a[:, :, :d]
    v_b = vb.transpose(0, 1).contiguous().transpose(0, 1)
    # s_a: every other column of [N, 2H]; s_b: a [H, N] tensor transposed.
    big_s = torch.randn((n, 2 * h), device=DEVICE)
    big_s[:, ::2] = sa
    s_a = big_s[:, ::2]
    s_b = sb.t().contiguous().t()
    assert not v_a.is_contiguous() and not v_b.is_contiguous() and not s_a.is_contiguous() and not s_b.is_contiguous()
    ref_v, ref_s = ref.merge_state_ref(va, sa, vb, sb)
    poison_allocator(((n, h, d), dtype), ((n, h), torch.float32))
    v, s = flashinfer_jit.merge_state(v_a, s_a, v_b, s_b)
    check_state(v, s, ref_v, ref_s, dtype, f"merge_state strided D={d}")

    # In place into the second half of a wider tensor: the first half must stay untouched.
    big_v = torch.randn((n, h, 2 * d), device=DEVICE).to(dtype)
    big_v[:, :, d:] = va
    first_half = big_v[:, :, :d].clone()
    big_s2 = torch.randn((n, 2 * h), device=DEVICE)
    big_s2[:, 1::2] = sa
    even_cols = big_s2[:, ::2].clone()
    flashinfer_jit.merge_state_in_place(big_v[:, :, d:], big_s2[:, 1::2], v_b, s_b)
    check_state(big_v[:, :, d:], big_s2[:, 1::2], ref_v, ref_s, dtype, f"merge_state_in_place strided D={d}")
    assert torch.equal(big_v[:, :, :d], first_half), "merge_state_in_place wrote outside its view (v)"
    assert torch.equal(big_s2[:, ::2], even_cols), "merge_state_in_place wrote outside its view (s)"

    # merge_states on permuted views: v from [K, N, H, D], s from [H, N, K].
    k = 4
    gen = torch.Generator(device=DEVICE).manual_seed(d)
    v_knhd = torch.randn((k, n, h, d), generator=gen, device=DEVICE).to(dtype)
    s_hnk = torch.randn((h, n, k), generator=gen, device=DEVICE) * 8.0
    s_hnk[:, 0, :] = NEG_INF
    v_many = v_knhd.permute(1, 0, 2, 3)
    s_many = s_hnk.permute(1, 2, 0)
    ref_v, ref_s = ref.merge_states_ref(v_many.contiguous(), s_many.contiguous())
    poison_allocator(((n, h, d), dtype), ((n, h), torch.float32))
    out_v, out_s = flashinfer_jit.merge_states(v_many, s_many)
    check_state(out_v, out_s, ref_v, ref_s, dtype, f"merge_states strided D={d}")


# ---- CUDA graphs and torch.compile ---------------------------------------------------------------

def _warm_up_on_side_stream(fn) -> None:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()


@pytest.mark.parametrize("op", ["merge_state", "merge_state_in_place", "merge_states"])
@pytest.mark.parametrize("head_dim,dtype", [(128, torch.bfloat16), (64, torch.float16)], ids=["hd128-bf16", "hd64-fp16"])
def test_cuda_graph_replay_equals_eager(op: str, head_dim: int, dtype: torch.dtype) -> None:
    n, h, d = 200, NUM_HEADS, head_dim
    if op == "merge_states":
        def make(seed):
            gen = torch.Generator(device=DEVICE).manual_seed(seed)
            v = torch.randn((n, 3, h, d), generator=gen, device=DEVICE).to(dtype)
            s = torch.randn((n, 3, h), generator=gen, device=DEVICE) * 8.0
            s[0] = NEG_INF
            return v, s

        static = make(1)
        run = lambda: flashinfer_jit.merge_states(*static)  # noqa: E731
    else:
        make = lambda seed: rand_pair(n, h, d, dtype, seed)  # noqa: E731
        static = make(1)
        mask = (torch.arange(n, device=DEVICE) % 3) != 1
        if op == "merge_state":
            run = lambda: flashinfer_jit.merge_state(*static)  # noqa: E731
        else:
            run = lambda: flashinfer_jit.merge_state_in_place(*static, mask=mask)  # noqa: E731

    _warm_up_on_side_stream(run)
    for t, fresh in zip(static, make(1)):
        t.copy_(fresh)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = run()

    for seed in (2, 3):
        fresh = make(seed)
        for t, f in zip(static, fresh):
            t.copy_(f)
        if op == "merge_state_in_place":
            v_e, s_e = fresh[0].clone(), fresh[1].clone()
            flashinfer_jit.merge_state_in_place(v_e, s_e, fresh[2], fresh[3], mask=mask)
            expected = (v_e, s_e)
        elif op == "merge_state":
            expected = flashinfer_jit.merge_state(*fresh)
        else:
            expected = flashinfer_jit.merge_states(*fresh)
        graph.replay()
        torch.cuda.synchronize()
        got = (static[0], static[1]) if op == "merge_state_in_place" else graph_out
        assert torch.equal(got[0], expected[0]), f"{op}: graph replay v differs from eager (seed {seed})"
        assert torch.equal(got[1], expected[1]), f"{op}: graph replay s differs from eager (seed {seed})"
        what = f"{op} graph replay seed {seed}"
        if op == "merge_states":
            ref_v, ref_s = ref.merge_states_ref(*fresh)
            check_state(got[0], got[1], ref_v, ref_s, dtype, what)
        elif op == "merge_state":
            ref_v, ref_s = ref.merge_state_ref(*fresh)
            check_state(got[0], got[1], ref_v, ref_s, dtype, what)
        else:
            ref_v, ref_s = ref.merge_state_ref(*fresh)
            keep = ~mask
            assert torch.equal(got[0][keep], fresh[0][keep]), f"{what}: rows with mask False were modified (v)"
            assert torch.equal(got[1][keep], fresh[1][keep]), f"{what}: rows with mask False were modified (s)"
            check_state(got[0][mask], got[1][mask], ref_v[mask], ref_s[mask], dtype, what)


def test_merge_state_under_torch_compile() -> None:
    """torch.compile(fullgraph=True) traces through merge_state (a registered custom op) without a
    graph break, and the compiled result equals eager."""
    torch._dynamo.reset()
    n, h, d, dtype = 64, NUM_HEADS, 128, torch.bfloat16
    v_a, s_a, v_b, s_b = rand_pair(n, h, d, dtype, seed=5)

    def f(va, sa, vb, sb):
        v, s = flashinfer_jit.merge_state(va, sa, vb, sb)
        return v.float() * 2.0, s - 1.0

    compiled = torch.compile(f, fullgraph=True)
    got_v, got_s = compiled(v_a, s_a, v_b, s_b)
    exp_v, exp_s = f(v_a, s_a, v_b, s_b)
    torch.cuda.synchronize()
    assert torch.equal(got_v, exp_v), "compiled merge_state: v differs from eager"
    assert torch.equal(got_s, exp_s), "compiled merge_state: s differs from eager"
    # fresh inputs through the same compiled function (no stale captured values)
    v_a2, s_a2, v_b2, s_b2 = rand_pair(n, h, d, dtype, seed=6)
    got_v, got_s = compiled(v_a2, s_a2, v_b2, s_b2)
    ref_v, ref_s = ref.merge_state_ref(v_a2, s_a2, v_b2, s_b2)
    check_state((got_v / 2.0).to(dtype), got_s + 1.0, ref_v, ref_s, dtype, "compiled merge_state, second inputs")
