"""GPU tests of the built-in attention variants (issue #12): sliding window (`window_left`) and logits
soft-cap (`logits_soft_cap`) on the ragged and paged prefill wrappers and the decode wrapper, against the
float32 reference in tests/reference.py, which applies the window and the cap itself (written out there,
not taken from the kernels' variant.cuh).

Pinned down (FlashInfer's semantics): a query at position p = kv_len - q_len + i sees keys
j >= p - window_left (and j <= p when causal); scores become cap * tanh(sm_scale * q.k / cap).
Window sizes 0, 1, odd and longer than every request; causal and not; GQA groups 1/4/8; lengths that
are not tile multiples, length 1 and empty requests; soft-cap with large logits (q scaled up); both
together. Outputs poisoned with NaN; LSE checked (-inf exactly where no key is visible: a window of 0
on a non-causal query past the keys, an empty request). forward() cannot change the plan's variant.

Positional encodings (issue #16 / #12): pos_encoding_mode="ROPE_LLAMA" against a reference that rotates q
and k in float64 at FlashInfer's positions (query i at kv_len - q_len + i, key j at j) and then runs the
float32 attention; "ALIBI" against the reference with slope(h) * (j - p) added to the scaled scores, the
slopes written out in tests/reference.py. The paged cache must be left unrotated.

Run: python -m pytest -m gpu -q tests/test_variants_gpu.py   (skipped, with the reason, without CUDA)
"""
from __future__ import annotations


import pytest
import torch

import flashinfer_jit

import reference as ref
from conftest import DEVICE, NAN, PREFILL_BACKEND

pytestmark = pytest.mark.gpu

WORKSPACE_BYTES = 128 << 20
NUM_KV_HEADS = 2
# (q_len, kv_len): not tile multiples, a prefix in the cache, q > kv, single tokens, empty requests.
LENS = ((1, 1), (17, 17), (129, 1000), (0, 9), (63, 63), (5, 0), (300, 301), (1, 700), (40, 15))
WINDOWS = (0, 1, 37, 5000)  # 0: the query's own key only (causal); 5000: longer than every request
CAPS = (0.0, 30.0)


def _ragged(lens, group: int, head_dim: int, dtype: torch.dtype, seed: int, q_scale: float = 1.0) -> ref.RaggedBatch:
    batch = ref.make_ragged_batch([a for a, _ in lens], [b for _, b in lens], NUM_KV_HEADS * group, NUM_KV_HEADS,
                                  head_dim, dtype, DEVICE, "NHD", seed)
    if q_scale != 1.0:
        batch.q.mul_(q_scale)  # large logits: the soft-cap saturates
    return batch


def _poisoned(total_q: int, num_qo_heads: int, head_dim: int, dtype: torch.dtype):
    out = torch.full((total_q, num_qo_heads, head_dim), NAN, dtype=dtype, device=DEVICE)
    lse = torch.full((total_q, num_qo_heads), NAN, dtype=torch.float32, device=DEVICE)
    return out, lse


def _check_ragged(batch: ref.RaggedBatch, causal: bool, window_left: int, cap: float, what: str) -> None:
    workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=DEVICE)
    w = flashinfer_jit.BatchPrefillWithRaggedKVCacheWrapper(workspace, kv_layout="NHD", backend=PREFILL_BACKEND)
    w.plan(batch.qo_indptr, batch.kv_indptr, batch.num_qo_heads, batch.num_kv_heads, batch.head_dim, causal=causal,
           window_left=window_left, logits_soft_cap=cap, q_data_type=batch.q.dtype)
    out, lse = _poisoned(batch.total_q, batch.num_qo_heads, batch.head_dim, batch.q.dtype)
    w.run(batch.q, batch.k, batch.v, out=out, lse=lse, return_lse=True)
    ref_out, ref_lse = ref.ragged_attention_ref(batch.q, batch.k, batch.v, batch.qo_indptr, batch.kv_indptr, causal,
                                                window_left=window_left, logits_soft_cap=cap)
    ref.check_attention(out, ref_out, batch.q.dtype, f"{what} ({w.backend})", lse, ref_lse)


# Every window and cap at hd128; hd64 and hd256 (their own tile shapes) with the window and the cap
# together and a window of 0 (fewer kernels to build on the device).
CASES = ([(128, causal, w, cap) for causal in (False, True) for w in WINDOWS for cap in CAPS]
         + [(d, causal, w, cap) for d in (64, 256) for causal in (False, True) for w, cap in ((37, 30.0), (0, 0.0))])


@pytest.mark.parametrize("head_dim, causal, window_left, cap", CASES,
                         ids=[f"hd{d}-{'causal' if c else 'full'}-w{w}-cap{int(s)}" for d, c, w, s in CASES])
def test_ragged_variant_matches_reference(head_dim: int, causal: bool, window_left: int, cap: float) -> None:
    for group in (1, 4, 8):
        batch = _ragged(LENS, group, head_dim, torch.bfloat16, seed=head_dim + group + window_left)
        _check_ragged(batch, causal, window_left, cap, f"ragged hd{head_dim} g{group} causal={causal} "
                      f"window_left={window_left} cap={cap}")


def test_window_off_equals_the_plain_kernel_bitwise() -> None:
    """window_left=-1 / cap 0.0 select the plain kernel: identical bits to a plan without them."""
    batch = _ragged(LENS, 4, 128, torch.float16, seed=3)
    outs = []
    for extra in ({}, dict(window_left=-1, logits_soft_cap=0.0)):
        w = flashinfer_jit.BatchPrefillWithRaggedKVCacheWrapper(
            torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=DEVICE), backend=PREFILL_BACKEND)
        w.plan(batch.qo_indptr, batch.kv_indptr, batch.num_qo_heads, batch.num_kv_heads, 128, causal=True,
               q_data_type=torch.float16, **extra)
        outs.append(w.run(batch.q, batch.k, batch.v))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("cap", [5.0, 20.0])
def test_soft_cap_with_large_logits(cap: float) -> None:
    """q scaled by 8: raw logits reach ~100, far past the cap; tanh saturates and the softmax stays finite."""
    for causal in (False, True):
        batch = _ragged(LENS, 4, 128, torch.bfloat16, seed=11, q_scale=8.0)
        _check_ragged(batch, causal, -1, cap, f"soft-cap {cap}, large logits, causal={causal}")


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("window_left, cap", [(0, 0.0), (37, 0.0), (-1, 30.0), (100, 50.0)])
def test_paged_variant_matches_reference(layout: str, page_size: int, window_left: int, cap: float) -> None:
    for causal, group in ((True, 4), (False, 8), (True, 1)):
        b = ref.make_paged_batch([a for a, _ in LENS], [k for _, k in LENS], NUM_KV_HEADS * group, NUM_KV_HEADS,
                                 128, torch.float16, DEVICE, layout, page_size, seed=page_size + group)
        workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=DEVICE)
        w = flashinfer_jit.BatchPrefillWithPagedKVCacheWrapper(workspace, kv_layout=layout, backend=PREFILL_BACKEND)
        t = b.table
        w.plan(b.qo_indptr, t.indptr, t.indices, t.last_page_len, b.num_qo_heads, b.num_kv_heads, 128, page_size,
               causal=causal, window_left=window_left, logits_soft_cap=cap, q_data_type=torch.float16)
        out, lse = _poisoned(b.total_q, b.num_qo_heads, 128, torch.float16)
        w.run(b.q, b.cache, out=out, lse=lse, return_lse=True)
        k, v = b.gathered()
        ref_out, ref_lse = ref.ragged_attention_ref(b.q, k, v, b.qo_indptr, b.kv_indptr, causal,
                                                    window_left=window_left, logits_soft_cap=cap)
        ref.check_attention(out, ref_out, torch.float16, f"paged {layout} page {page_size} g{group} causal={causal} "
                            f"window_left={window_left} cap={cap} ({w.backend})", lse, ref_lse)
        w.run(b.q, b.cache, window_left=window_left)  # run()'s per-call window: the plan's is accepted
        with pytest.raises(ValueError, match="window_left"):  # and another refused (plan() chooses the kernel)
            w.run(b.q, b.cache, window_left=window_left + 1)


@pytest.mark.parametrize("window_left, cap", [(0, 0.0), (1, 0.0), (63, 0.0), (-1, 30.0), (200, 30.0)])
def test_decode_variant_matches_reference(window_left: int, cap: float) -> None:
    kv_lens = [1, 17, 300, 1000, 64, 2049]
    group = 4
    b = ref.make_paged_batch([1] * len(kv_lens), kv_lens, NUM_KV_HEADS * group, NUM_KV_HEADS, 128, torch.bfloat16,
                             DEVICE, "NHD", 16, seed=5)
    workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=DEVICE)
    w = flashinfer_jit.BatchDecodeWithPagedKVCacheWrapper(workspace, kv_layout="NHD")
    t = b.table
    w.plan(t.indptr, t.indices, t.last_page_len, b.num_qo_heads, b.num_kv_heads, 128, 16,
           window_left=window_left, logits_soft_cap=cap, q_data_type=torch.bfloat16)
    assert (w._window_left, w._logits_soft_cap) == (window_left, cap)  # what FlashInfer keeps (vLLM asserts it)
    out = torch.full((len(kv_lens), b.num_qo_heads, 128), NAN, dtype=torch.bfloat16, device=DEVICE)
    w.run(b.q, b.cache, out=out)
    k, v = b.gathered()
    ref_out, _ = ref.ragged_attention_ref(b.q, k, v, b.qo_indptr, b.kv_indptr, False, window_left=window_left,
                                          logits_soft_cap=cap)
    ref.check_attention(out, ref_out, torch.bfloat16, f"decode window_left={window_left} cap={cap}")


def test_forward_cannot_change_the_planned_variant() -> None:
    batch = _ragged(LENS, 4, 128, torch.float16, seed=1)
    w = flashinfer_jit.BatchPrefillWithRaggedKVCacheWrapper(
        torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=DEVICE), backend=PREFILL_BACKEND)
    w.plan(batch.qo_indptr, batch.kv_indptr, batch.num_qo_heads, batch.num_kv_heads, 128, causal=True,
           window_left=37, q_data_type=torch.float16)
    with pytest.raises(flashinfer_jit.NotSupportedError, match="window_left"):
        w.forward(batch.q, batch.k, batch.v, causal=True)  # forward's window_left=-1 is not the plan's 37
    out = w.forward(batch.q, batch.k, batch.v, causal=True, window_left=37)
    ref_out, _ = ref.ragged_attention_ref(batch.q, batch.k, batch.v, batch.qo_indptr, batch.kv_indptr, True,
                                          window_left=37)
    ref.check_attention(out, ref_out, torch.float16, "forward() with the plan's window")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_single_prefill_and_decode_variants(causal: bool) -> None:
    """single_prefill_with_kv_cache / single_decode_with_kv_cache take window_left and logits_soft_cap too
    (one plan per shape and variant, through their torch op)."""
    torch.manual_seed(0)
    q = torch.randn(77, 16, 128, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(300, 4, 128, device=DEVICE, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    for window_left, cap in ((20, 0.0), (-1, 30.0), (5, 10.0)):
        out, lse = flashinfer_jit.single_prefill_with_kv_cache(q, k, v, causal=causal, window_left=window_left,
                                                               logits_soft_cap=cap, return_lse=True)
        ref_out, ref_lse = ref.attention_ref(q, k, v, causal, window_left=window_left, logits_soft_cap=cap)
        ref.check_attention(out, ref_out, torch.bfloat16, f"single prefill w{window_left} cap{cap}", lse, ref_lse)
        if not causal:
            one = flashinfer_jit.single_decode_with_kv_cache(q[-1], k, v, window_left=window_left, logits_soft_cap=cap)
            ref_one, _ = ref.attention_ref(q[-1:], k, v, False, window_left=window_left, logits_soft_cap=cap)
            ref.check_attention(one, ref_one[0], torch.bfloat16, f"single decode w{window_left} cap{cap}")


# ---- user-defined variants (flashinfer_jit.AttentionVariant) ----------------------------------------

def _example():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "custom_variants.py"
    spec = importlib.util.spec_from_file_location("custom_variants", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("index", [0, 1, 2], ids=["alibi", "prefix_lm", "sigmoid_score"])
def test_example_snippets_match_reference(index: int) -> None:
    """examples/custom_variants.py's ALiBi, prefix-LM and sigmoid-style variants on a ragged batch."""
    example = _example()
    variant, causal, score_fn, mask_fn = example.variants(DEVICE)[index]
    assert example.run(variant, causal, score_fn, mask_fn) <= 1.0


def test_a_mask_that_hides_whole_rows_gives_zero_and_minus_inf() -> None:
    """mask_mod refusing every key of some rows: those rows give O = 0 and LSE = -inf, the others match."""
    every_third = flashinfer_jit.AttentionVariant("every_third", mask_mod="(q_idx % 3) != 0")
    batch = _ragged(LENS, 4, 128, torch.float16, seed=9)
    w = flashinfer_jit.BatchPrefillWithRaggedKVCacheWrapper(
        torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=DEVICE), backend=PREFILL_BACKEND)
    w.plan(batch.qo_indptr, batch.kv_indptr, batch.num_qo_heads, batch.num_kv_heads, 128, causal=True,
           window_left=40, q_data_type=torch.float16, variant=every_third)
    out, lse = _poisoned(batch.total_q, batch.num_qo_heads, 128, torch.float16)
    w.run(batch.q, batch.k, batch.v, out=out, lse=lse, return_lse=True)
    ref_out, ref_lse = ref.ragged_attention_ref(batch.q, batch.k, batch.v, batch.qo_indptr, batch.kv_indptr, True,
                                                window_left=40, mask_fn=lambda qi, ki, h, qp, r: (qi % 3) != 0)
    ref.check_attention(out, ref_out, torch.float16, f"whole rows masked ({w.backend})", lse, ref_lse)
    assert bool(torch.isneginf(ref_lse).any()), "the test needs rows that see no key"


def test_paged_user_variant_and_new_parameter_values() -> None:
    """A user variant on the paged wrapper; a re-plan with other parameter values uses them (same kernel)."""
    lens = LENS
    b = ref.make_paged_batch([a for a, _ in lens], [k for _, k in lens], 16, 4, 128, torch.bfloat16, DEVICE, "NHD", 16,
                             seed=4)
    w = flashinfer_jit.BatchPrefillWithPagedKVCacheWrapper(
        torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=DEVICE), kv_layout="NHD", backend=PREFILL_BACKEND)
    t = b.table
    k, v = b.gathered()
    for scale in (0.5, 2.0):
        temp = flashinfer_jit.AttentionVariant("temperature", score_mod="score * t", params={"t": scale})
        w.plan(b.qo_indptr, t.indptr, t.indices, t.last_page_len, 16, 4, 128, 16, causal=True,
               q_data_type=torch.bfloat16, variant=temp)
        out = w.run(b.q, b.cache)
        ref_out, _ = ref.ragged_attention_ref(b.q, k, v, b.qo_indptr, b.kv_indptr, True,
                                              score_fn=lambda s, qi, ki, h, qp, r: s * scale)
        ref.check_attention(out, ref_out, torch.bfloat16, f"paged temperature {scale} ({w.backend})")


def test_variant_plans_run_under_torch_compile_fullgraph() -> None:
    """run() of wrappers planned with a window + soft-cap and with a user variant, inside
    torch.compile(fullgraph=True) (planned outside): no graph break, the eager result."""
    batch = _ragged(LENS, 4, 128, torch.bfloat16, seed=21)
    backend = PREFILL_BACKEND
    alibi_like = flashinfer_jit.AttentionVariant("slope_bias", score_mod="score - s * float(q_pos - kv_idx)",
                                                 params={"s": 0.01})
    for plan_kwargs in (dict(window_left=64, logits_soft_cap=20.0), dict(variant=alibi_like),
                        dict(pos_encoding_mode="ROPE_LLAMA"), dict(pos_encoding_mode="ALIBI")):
        w = flashinfer_jit.BatchPrefillWithRaggedKVCacheWrapper(
            torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=DEVICE), backend=backend)
        w.plan(batch.qo_indptr, batch.kv_indptr, batch.num_qo_heads, batch.num_kv_heads, 128, causal=True,
               q_data_type=torch.bfloat16, **plan_kwargs)
        eager = w.run(batch.q, batch.k, batch.v)
        torch._dynamo.reset()
        compiled = torch.compile(lambda q, k, v: w.run(q, k, v) * 1.0, fullgraph=True)
        torch.testing.assert_close(compiled(batch.q, batch.k, batch.v), eager, atol=0, rtol=0)


# ---- custom masks (FlashInfer's custom_mask / packed_custom_mask) -----------------------------------

def _random_masks(q_lens, kv_lens, seed: int) -> list[torch.Tensor]:
    """One [q_len, kv_len] boolean mask per request; every third request's row 0 sees no key."""
    gen = torch.Generator().manual_seed(seed)
    masks = []
    for i, (q, k) in enumerate(zip(q_lens, kv_lens)):
        m = torch.rand(q, k, generator=gen) < 0.6
        if q and i % 3 == 0:
            m[0] = False
        masks.append(m)
    return masks


@pytest.mark.parametrize("packed", [False, True], ids=["custom_mask", "packed_custom_mask"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_custom_mask_ragged_and_paged(head_dim: int, packed: bool) -> None:
    from flashinfer_jit import masks as fij_masks

    q_lens, kv_lens = [a for a, _ in LENS], [b for _, b in LENS]
    per_request = _random_masks(q_lens, kv_lens, seed=head_dim)
    flat = torch.cat([m.flatten() for m in per_request]).to(DEVICE)
    arg = dict(packed_custom_mask=fij_masks.pack(flat, q_lens, kv_lens, "test")) if packed else dict(custom_mask=flat)
    mask_fn = lambda qi, ki, h, qp, r: per_request[r].to(DEVICE)[qi[0, :, 0]][:, ki[0, 0, :]].unsqueeze(0)  # noqa: E731
    b = ref.make_paged_batch(q_lens, kv_lens, 16, 4, head_dim, torch.bfloat16, DEVICE, "NHD", 16, seed=head_dim)
    ref_out, ref_lse = ref.ragged_attention_ref(b.q, b.k, b.v, b.qo_indptr, b.kv_indptr, False, mask_fn=mask_fn)
    assert bool(torch.isneginf(ref_lse).any()), "the test needs rows that see no key"
    ragged = flashinfer_jit.BatchPrefillWithRaggedKVCacheWrapper(
        torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=DEVICE), backend=PREFILL_BACKEND)
    ragged.plan(b.qo_indptr, b.kv_indptr, 16, 4, head_dim, causal=False, q_data_type=torch.bfloat16, **arg)
    out, lse = _poisoned(b.total_q, 16, head_dim, torch.bfloat16)
    ragged.run(b.q, b.k, b.v, out=out, lse=lse, return_lse=True)
    ref.check_attention(out, ref_out, torch.bfloat16, f"ragged custom mask ({ragged.backend})", lse, ref_lse)
    paged = flashinfer_jit.BatchPrefillWithPagedKVCacheWrapper(
        torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=DEVICE), backend=PREFILL_BACKEND)
    t = b.table
    paged.plan(b.qo_indptr, t.indptr, t.indices, t.last_page_len, 16, 4, head_dim, 16, causal=False,
               q_data_type=torch.bfloat16, **arg)
    out, lse = _poisoned(b.total_q, 16, head_dim, torch.bfloat16)
    paged.run(b.q, b.cache, out=out, lse=lse, return_lse=True)
    ref.check_attention(out, ref_out, torch.bfloat16, f"paged custom mask ({paged.backend})", lse, ref_lse)


def test_decode_with_a_user_variant() -> None:
    kv_lens = [1, 17, 300, 1000]
    b = ref.make_paged_batch([1] * len(kv_lens), kv_lens, 8, 2, 128, torch.bfloat16, DEVICE, "NHD", 16, seed=8)
    w = flashinfer_jit.BatchDecodeWithPagedKVCacheWrapper(torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=DEVICE))
    t = b.table
    bias = flashinfer_jit.AttentionVariant("recency", score_mod="score - 0.01f * float(q_pos - kv_idx)")
    w.plan(t.indptr, t.indices, t.last_page_len, 8, 2, 128, 16, q_data_type=torch.bfloat16, variant=bias)
    out = w.run(b.q, b.cache)
    k, v = b.gathered()
    ref_out, _ = ref.ragged_attention_ref(b.q, k, v, b.qo_indptr, b.kv_indptr, False,
                                          score_fn=lambda s, qi, ki, h, qp, r: s - 0.01 * (qp - ki).float())
    ref.check_attention(out, ref_out, torch.bfloat16, "decode with a user variant")


# ---- positional encodings: fused RoPE (pos_encoding_mode="ROPE_LLAMA") and ALiBi ---------------------

# A long request too: positions in the tens of thousands (large angles, the table's precision matters).
ROPE_LENS = LENS + ((3, 20000),)


def _rotated(q: torch.Tensor, k: torch.Tensor, qo_indptr, kv_indptr, theta: float, scale: float):
    q_pos, k_pos = ref.rope_positions(qo_indptr, kv_indptr)
    d = q.shape[-1]
    return (ref.rope_reference(q, q_pos.to(q.device), d, False, scale, theta),
            ref.rope_reference(k, k_pos.to(k.device), d, False, scale, theta))


ROPE_CASES = ([(128, causal, theta, scale) for causal in (False, True) for theta, scale in ((1e4, 1.0), (5e5, 2.0))]
              + [(64, True, 1e4, 1.0), (256, True, 1e4, 1.0), (256, False, 5e5, 2.0)])


def _skip_unless_hopper(backend: str) -> None:
    if backend == "sm90" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the sm90 kernel needs a Hopper GPU (compute capability 9.x)")


@pytest.mark.parametrize("backend", ["fa2", "sm90"])
@pytest.mark.parametrize("head_dim, causal, theta, scale", ROPE_CASES,
                         ids=[f"hd{d}-{'causal' if c else 'full'}-theta{t:g}-scale{s:g}" for d, c, t, s in ROPE_CASES])
def test_fused_rope_ragged_matches_reference(head_dim: int, causal: bool, theta: float, scale: float,
                                             backend: str, monkeypatch) -> None:
    """Both kernels, named explicitly ("auto" picks fa2 for these short batches), rotating keys in the
    kernel: the sm90 kernel with a sincos recurrence (transform_sm90.cuh; FLASHINFER_JIT_ROPE_PREROTATE_K=0,
    since by default its ragged plans rotate K once per run: the next test), the fa2 kernel with a sincos
    per element."""
    _skip_unless_hopper(backend)
    monkeypatch.setenv("FLASHINFER_JIT_ROPE_PREROTATE_K", "0")
    for group in (1, 4, 8):
        batch = _ragged(ROPE_LENS, group, head_dim, torch.bfloat16, seed=head_dim + group)
        w = flashinfer_jit.BatchPrefillWithRaggedKVCacheWrapper(
            torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=DEVICE), backend=backend)
        w.plan(batch.qo_indptr, batch.kv_indptr, batch.num_qo_heads, batch.num_kv_heads, head_dim, causal=causal,
               pos_encoding_mode="ROPE_LLAMA", rope_theta=theta, rope_scale=scale, q_data_type=torch.bfloat16)
        assert w._pos_encoding_mode == "ROPE_LLAMA" and w.backend == backend and w._state.k_rotated is None
        k_before = batch.k.clone()
        out, lse = _poisoned(batch.total_q, batch.num_qo_heads, head_dim, torch.bfloat16)
        w.run(batch.q, batch.k, batch.v, out=out, lse=lse, return_lse=True)
        assert torch.equal(batch.k, k_before), "fused RoPE must not write the keys"
        q_rot, k_rot = _rotated(batch.q, batch.k, batch.qo_indptr, batch.kv_indptr, theta, scale)
        ref_out, ref_lse = ref.ragged_attention_ref(q_rot, k_rot, batch.v, batch.qo_indptr, batch.kv_indptr, causal)
        ref.check_attention(out, ref_out, torch.bfloat16, f"fused RoPE ragged hd{head_dim} g{group} causal={causal} "
                            f"theta={theta:g} scale={scale:g}", lse, ref_lse)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_fused_rope_with_keys_rotated_once_matches_reference(head_dim: int, monkeypatch) -> None:
    """The sm90 ragged plan's default: K rotated once per run into a copy, the kernel skips its key walk;
    same reference, the caller's K untouched."""
    _skip_unless_hopper("sm90")
    monkeypatch.delenv("FLASHINFER_JIT_ROPE_PREROTATE_K", raising=False)
    for group, causal in ((1, True), (4, False), (8, True)):
        batch = _ragged(ROPE_LENS, group, head_dim, torch.bfloat16, seed=head_dim + 3 * group)
        w = flashinfer_jit.BatchPrefillWithRaggedKVCacheWrapper(
            torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=DEVICE), backend="sm90")
        w.plan(batch.qo_indptr, batch.kv_indptr, batch.num_qo_heads, batch.num_kv_heads, head_dim, causal=causal,
               pos_encoding_mode="ROPE_LLAMA", rope_theta=5e5, q_data_type=torch.bfloat16)
        assert w._state.k_rotated is not None and w._state.params.keys_rotated == 1
        k_before = batch.k.clone()
        out, lse = _poisoned(batch.total_q, batch.num_qo_heads, head_dim, torch.bfloat16)
        for _ in range(2):  # the copy is rewritten every run
            w.run(batch.q, batch.k, batch.v, out=out, lse=lse, return_lse=True)
        assert torch.equal(batch.k, k_before), "fused RoPE must not write the keys"
        q_rot, k_rot = _rotated(batch.q, batch.k, batch.qo_indptr, batch.kv_indptr, 5e5, 1.0)
        ref_out, ref_lse = ref.ragged_attention_ref(q_rot, k_rot, batch.v, batch.qo_indptr, batch.kv_indptr, causal)
        ref.check_attention(out, ref_out, torch.bfloat16, f"keys rotated once hd{head_dim} g{group} causal={causal}",
                            lse, ref_lse)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("page_size, backend", [(1, "auto"), (16, "fa2"), (16, "sm90")])
def test_fused_rope_paged_and_with_other_variants(layout: str, page_size: int, backend: str) -> None:
    """Paged K (the page table's positions, not the cache slots'), alone and with a window + soft-cap."""
    _skip_unless_hopper(backend)
    for causal, group, window_left, cap in ((True, 4, -1, 0.0), (False, 8, -1, 0.0), (True, 1, 50, 30.0)):
        b = ref.make_paged_batch([a for a, _ in ROPE_LENS], [k for _, k in ROPE_LENS], NUM_KV_HEADS * group,
                                 NUM_KV_HEADS, 128, torch.float16, DEVICE, layout, page_size, seed=page_size + group)
        w = flashinfer_jit.BatchPrefillWithPagedKVCacheWrapper(
            torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=DEVICE), kv_layout=layout, backend=backend)
        t = b.table
        w.plan(b.qo_indptr, t.indptr, t.indices, t.last_page_len, b.num_qo_heads, b.num_kv_heads, 128, page_size,
               causal=causal, pos_encoding_mode="ROPE_LLAMA", window_left=window_left, logits_soft_cap=cap,
               q_data_type=torch.float16)
        assert backend == "auto" or w.backend == backend
        cache_before = [c.clone() for c in (b.cache if isinstance(b.cache, tuple) else (b.cache,))]
        out, lse = _poisoned(b.total_q, b.num_qo_heads, 128, torch.float16)
        w.run(b.q, b.cache, out=out, lse=lse, return_lse=True)
        after = b.cache if isinstance(b.cache, tuple) else (b.cache,)
        # bitwise (the cache's unused slots hold NaN, which torch.equal never calls equal)
        assert all(torch.equal(x.view(torch.int16), y.view(torch.int16)) for x, y in zip(after, cache_before)), \
            "fused RoPE must not write the cache"
        k, v = b.gathered()
        q_rot, k_rot = _rotated(b.q, k, b.qo_indptr, b.kv_indptr, 1e4, 1.0)
        ref_out, ref_lse = ref.ragged_attention_ref(q_rot, k_rot, v, b.qo_indptr, b.kv_indptr, causal,
                                                    window_left=window_left, logits_soft_cap=cap)
        ref.check_attention(out, ref_out, torch.float16, f"fused RoPE paged {layout} page {page_size} g{group} "
                            f"causal={causal} window={window_left} cap={cap}", lse, ref_lse)


@pytest.mark.parametrize("cache_form", ["5d", "tuple"])
def test_paged_via_ragged_matches_reference(cache_form: str, monkeypatch) -> None:
    """FLASHINFER_JIT_PAGED_VIA_RAGGED=1 (experimental): sm90 paged NHD plans copy the batch's K (rotated under
    fused RoPE) and V rows out of the shuffled pages each run and run the ragged kernel: plain, fused RoPE,
    RoPE with a window + soft-cap, GQA 1 / 4 / 8; two runs on one plan; the cache never written."""
    _skip_unless_hopper("sm90")
    monkeypatch.setenv("FLASHINFER_JIT_PAGED_VIA_RAGGED", "1")
    for causal, group, rope, window_left, cap in ((True, 4, False, -1, 0.0), (True, 4, True, -1, 0.0),
                                                  (False, 8, True, -1, 0.0), (True, 1, True, 50, 30.0)):
        b = ref.make_paged_batch([a for a, _ in ROPE_LENS], [k for _, k in ROPE_LENS], NUM_KV_HEADS * group,
                                 NUM_KV_HEADS, 128, torch.bfloat16, DEVICE, "NHD", 16, seed=group + 3 * rope)
        cache = b.cache if cache_form == "5d" else (b.cache[:, 0], b.cache[:, 1])
        w = flashinfer_jit.BatchPrefillWithPagedKVCacheWrapper(
            torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=DEVICE), kv_layout="NHD", backend="sm90")
        t = b.table
        w.plan(b.qo_indptr, t.indptr, t.indices, t.last_page_len, b.num_qo_heads, b.num_kv_heads, 128, 16,
               causal=causal, pos_encoding_mode="ROPE_LLAMA" if rope else "NONE", window_left=window_left,
               logits_soft_cap=cap, q_data_type=torch.bfloat16)
        assert w.backend == "sm90" and w._state.gather is not None
        before = b.cache.clone()
        k, v = b.gathered()
        q_ref, k_ref = _rotated(b.q, k, b.qo_indptr, b.kv_indptr, 1e4, 1.0) if rope else (b.q, k)
        ref_out, ref_lse = ref.ragged_attention_ref(q_ref, k_ref, v, b.qo_indptr, b.kv_indptr, causal,
                                                    window_left=window_left, logits_soft_cap=cap)
        for attempt in range(2):
            out, lse = _poisoned(b.total_q, b.num_qo_heads, 128, torch.bfloat16)
            w.run(b.q, cache, out=out, lse=lse, return_lse=True)
            ref.check_attention(out, ref_out, torch.bfloat16, f"paged via ragged ({cache_form}) g{group} rope={rope} "
                                f"causal={causal} window={window_left} cap={cap}, run {attempt}", lse, ref_lse)
        assert torch.equal(b.cache.view(torch.int16), before.view(torch.int16)), "the cache must not be written"


def test_fused_rope_decode_and_single_calls() -> None:
    """Decode (a query at position kv_len - 1), single_prefill_with_kv_cache and single_decode_with_kv_cache."""
    kv_lens = [1, 17, 300, 1000, 64, 2049, 20000]
    group = 4
    b = ref.make_paged_batch([1] * len(kv_lens), kv_lens, NUM_KV_HEADS * group, NUM_KV_HEADS, 128, torch.bfloat16,
                             DEVICE, "NHD", 16, seed=15)
    w = flashinfer_jit.BatchDecodeWithPagedKVCacheWrapper(torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=DEVICE))
    t = b.table
    w.plan(t.indptr, t.indices, t.last_page_len, b.num_qo_heads, b.num_kv_heads, 128, 16,
           pos_encoding_mode="ROPE_LLAMA", rope_theta=5e5, q_data_type=torch.bfloat16)
    out = torch.full((len(kv_lens), b.num_qo_heads, 128), NAN, dtype=torch.bfloat16, device=DEVICE)
    w.run(b.q, b.cache, out=out)
    k, v = b.gathered()
    q_rot, k_rot = _rotated(b.q, k, b.qo_indptr, b.kv_indptr, 5e5, 1.0)
    ref_out, _ = ref.ragged_attention_ref(q_rot, k_rot, v, b.qo_indptr, b.kv_indptr, False)
    ref.check_attention(out, ref_out, torch.bfloat16, "fused RoPE decode")

    torch.manual_seed(2)
    q = torch.randn(77, 16, 128, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(300, 4, 128, device=DEVICE, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    out, lse = flashinfer_jit.single_prefill_with_kv_cache(q, k, v, causal=True, pos_encoding_mode="ROPE_LLAMA",
                                                           return_lse=True)
    q_rot, k_rot = _rotated(q, k, [0, 77], [0, 300], 1e4, 1.0)
    ref_out, ref_lse = ref.attention_ref(q_rot, k_rot, v, True)
    ref.check_attention(out, ref_out, torch.bfloat16, "fused RoPE single prefill", lse, ref_lse)
    one = flashinfer_jit.single_decode_with_kv_cache(q[-1], k, v, pos_encoding_mode="ROPE_LLAMA")
    q_rot, k_rot = _rotated(q[-1:], k, [0, 1], [0, 300], 1e4, 1.0)
    ref_one, _ = ref.attention_ref(q_rot, k_rot, v, False)
    ref.check_attention(one, ref_one[0], torch.bfloat16, "fused RoPE single decode")


def _alibi_score(num_qo_heads: int):
    slopes = ref.alibi_slopes_ref(num_qo_heads).to(DEVICE).view(-1, 1, 1)
    return lambda s, qi, ki, h, qp, r: s + slopes * (ki - qp).float()


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_alibi_ragged_matches_reference(head_dim: int, causal: bool) -> None:
    """pos_encoding_mode="ALIBI" on the ragged wrapper (sm90 where "auto" picks it, else fa2); 12 query heads
    at group 4 (not a power of two: the second slope series) and 8 / 16 at groups 1 / 8."""
    for num_kv_heads, group in ((8, 1), (3, 4), (2, 8)):
        batch = ref.make_ragged_batch([a for a, _ in LENS], [b for _, b in LENS], num_kv_heads * group, num_kv_heads,
                                      head_dim, torch.bfloat16, DEVICE, "NHD", head_dim + group)
        w = flashinfer_jit.BatchPrefillWithRaggedKVCacheWrapper(
            torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=DEVICE), backend=PREFILL_BACKEND)
        w.plan(batch.qo_indptr, batch.kv_indptr, batch.num_qo_heads, num_kv_heads, head_dim, causal=causal,
               pos_encoding_mode="ALIBI", q_data_type=torch.bfloat16)
        out, lse = _poisoned(batch.total_q, batch.num_qo_heads, head_dim, torch.bfloat16)
        w.run(batch.q, batch.k, batch.v, out=out, lse=lse, return_lse=True)
        ref_out, ref_lse = ref.ragged_attention_ref(batch.q, batch.k, batch.v, batch.qo_indptr, batch.kv_indptr, causal,
                                                    score_fn=_alibi_score(batch.num_qo_heads))
        ref.check_attention(out, ref_out, torch.bfloat16, f"ALiBi ragged hd{head_dim} g{group} causal={causal} "
                            f"({w.backend})", lse, ref_lse)


def test_alibi_paged_decode_and_single() -> None:
    b = ref.make_paged_batch([a for a, _ in LENS], [k for _, k in LENS], 16, 4, 128, torch.float16, DEVICE, "HND", 16,
                             seed=31)
    t = b.table
    k, v = b.gathered()
    w = flashinfer_jit.BatchPrefillWithPagedKVCacheWrapper(
        torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=DEVICE), kv_layout="HND", backend=PREFILL_BACKEND)
    w.plan(b.qo_indptr, t.indptr, t.indices, t.last_page_len, 16, 4, 128, 16, causal=True, window_left=100,
           pos_encoding_mode="ALIBI", q_data_type=torch.float16)
    out, lse = _poisoned(b.total_q, 16, 128, torch.float16)
    w.run(b.q, b.cache, out=out, lse=lse, return_lse=True)
    ref_out, ref_lse = ref.ragged_attention_ref(b.q, k, v, b.qo_indptr, b.kv_indptr, True, window_left=100,
                                                score_fn=_alibi_score(16))
    ref.check_attention(out, ref_out, torch.float16, f"ALiBi paged HND + window ({w.backend})", lse, ref_lse)

    kv_lens = [1, 17, 300, 1000, 2049]
    d = ref.make_paged_batch([1] * len(kv_lens), kv_lens, 32, 8, 128, torch.bfloat16, DEVICE, "NHD", 16, seed=32)
    dw = flashinfer_jit.BatchDecodeWithPagedKVCacheWrapper(torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=DEVICE))
    t = d.table
    dw.plan(t.indptr, t.indices, t.last_page_len, 32, 8, 128, 16, pos_encoding_mode="ALIBI", q_data_type=torch.bfloat16)
    out = dw.run(d.q, d.cache)
    k, v = d.gathered()
    ref_out, _ = ref.ragged_attention_ref(d.q, k, v, d.qo_indptr, d.kv_indptr, False, score_fn=_alibi_score(32))
    ref.check_attention(out, ref_out, torch.bfloat16, "ALiBi decode")

    torch.manual_seed(3)
    q = torch.randn(50, 8, 128, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(120, 8, 128, device=DEVICE, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    out = flashinfer_jit.single_prefill_with_kv_cache(q, k, v, causal=True, pos_encoding_mode="ALIBI")
    ref_out, _ = ref.attention_ref(q, k, v, True, score_fn=_alibi_score(8))
    ref.check_attention(out, ref_out, torch.bfloat16, "ALiBi single prefill")
