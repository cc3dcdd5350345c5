"""GPU tests of fp8 KV caches (issue #16): kv_data_type torch.float8_e4m3fn / float8_e5m2 on the paged and
ragged prefill wrappers and the decode wrapper, with FlashInfer's k_scale / v_scale, against a float32
reference that dequantizes the same fp8 bytes (fp8 value * scale) and attends in float32.

Pinned down: scores are q . k_fp8 * k_scale * sm_scale and the output is (softmax . v_fp8) * v_scale
(FlashInfer folds k_scale into the softmax scale and v_scale into the output); scales as Python floats,
one-element CPU tensors and one-element CUDA tensors (read by the kernel); e4m3 and e5m2; page sizes 1 and
16, NHD and HND; head_dim 64 / 128 / 256; GQA groups 1 / 4 / 8; causal or not; lengths not tile
multiples, length 1 and empty requests. Outputs poisoned with NaN (and the cache's unused slots hold NaN):
NaN never passes. A cache of another dtype than the plan's is a TypeError before any launch.

Run: python -m pytest -m gpu -q tests/test_fp8_gpu.py   (skipped, with the reason, without CUDA)
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import flashinfer_jit

import reference as ref
from conftest import DEVICE, NAN

pytestmark = pytest.mark.gpu

WORKSPACE_BYTES = 128 << 20
NUM_KV_HEADS = 2
LENS = ((1, 1), (17, 17), (129, 1000), (0, 9), (63, 63), (5, 0), (300, 301), (1, 700), (40, 15))
FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def _workspace() -> torch.Tensor:
    return torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=DEVICE)


def _poisoned(total_q: int, num_qo_heads: int, head_dim: int, dtype: torch.dtype):
    return (torch.full((total_q, num_qo_heads, head_dim), NAN, dtype=dtype, device=DEVICE),
            torch.full((total_q, num_qo_heads), NAN, dtype=torch.float32, device=DEVICE))


def _fp8_paged(lens, group: int, head_dim: int, dtype: torch.dtype, fp8: torch.dtype, layout: str, page_size: int,
               seed: int):
    """A paged batch whose cache holds fp8 (NaN slots stay NaN), and the dense K/V as the fp8 values read back."""
    b = ref.make_paged_batch([a for a, _ in lens], [k for _, k in lens], NUM_KV_HEADS * group, NUM_KV_HEADS,
                             head_dim, dtype, DEVICE, layout, page_size, seed=seed)
    k16, v16 = b.gathered()
    return dataclasses.replace(b, cache=b.cache.to(fp8)), k16.to(fp8).float(), v16.to(fp8).float()


def _scale_forms(k_scale: float, v_scale: float):
    return ((k_scale, v_scale), (torch.tensor([k_scale]), torch.tensor([v_scale])),
            (torch.tensor([k_scale], device=DEVICE), torch.tensor([v_scale], device=DEVICE)))


PAGED_CASES = [(fmt, layout, ps, d) for fmt in FP8 for layout in ("NHD", "HND") for ps in (1, 16) for d in (128,)]
PAGED_CASES += [("e4m3", "NHD", 16, 64), ("e5m2", "HND", 16, 256)]


@pytest.mark.parametrize("fmt, layout, page_size, head_dim", PAGED_CASES,
                         ids=[f"{f}-{l}-p{p}-hd{d}" for f, l, p, d in PAGED_CASES])
def test_paged_prefill_fp8_matches_dequantized_reference(fmt: str, layout: str, page_size: int, head_dim: int) -> None:
    for causal, group, dtype in ((True, 4, torch.bfloat16), (False, 8, torch.float16), (True, 1, torch.bfloat16)):
        b, k, v = _fp8_paged(LENS, group, head_dim, dtype, FP8[fmt], layout, page_size, seed=page_size + group)
        w = flashinfer_jit.BatchPrefillWithPagedKVCacheWrapper(_workspace(), kv_layout=layout)
        t = b.table
        w.plan(b.qo_indptr, t.indptr, t.indices, t.last_page_len, b.num_qo_heads, b.num_kv_heads, head_dim, page_size,
               causal=causal, q_data_type=dtype, kv_data_type=FP8[fmt])
        assert w.backend == "fa2"
        for k_scale, v_scale in _scale_forms(0.5, 2.0):
            out, lse = _poisoned(b.total_q, b.num_qo_heads, head_dim, dtype)
            w.run(b.q, b.cache, k_scale=k_scale, v_scale=v_scale, out=out, lse=lse, return_lse=True)
            ref_out, ref_lse = ref.ragged_attention_ref(b.q, k * 0.5, v * 2.0, b.qo_indptr, b.kv_indptr, causal)
            ref.check_attention(out, ref_out, dtype, f"fp8 {fmt} paged {layout} page {page_size} hd{head_dim} "
                                f"g{group} causal={causal} scales {type(k_scale).__name__}", lse, ref_lse)
        out = w.run(b.q, b.cache)  # no scales: 1.0 (the previous run's do not linger)
        ref_out, _ = ref.ragged_attention_ref(b.q, k, v, b.qo_indptr, b.kv_indptr, causal)
        ref.check_attention(out, ref_out, dtype, f"fp8 {fmt} paged, no scales")


@pytest.mark.parametrize("fmt", list(FP8))
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_ragged_prefill_fp8(fmt: str, head_dim: int) -> None:
    for causal in (False, True):
        batch = ref.make_ragged_batch([a for a, _ in LENS], [b for _, b in LENS], 16, 4, head_dim, torch.bfloat16,
                                      DEVICE, "NHD", head_dim)
        k8, v8 = batch.k.to(FP8[fmt]), batch.v.to(FP8[fmt])
        w = flashinfer_jit.BatchPrefillWithRaggedKVCacheWrapper(_workspace())
        w.plan(batch.qo_indptr, batch.kv_indptr, 16, 4, head_dim, causal=causal, q_data_type=torch.bfloat16,
               kv_data_type=FP8[fmt])
        out, lse = _poisoned(batch.total_q, 16, head_dim, torch.bfloat16)
        w.run(batch.q, k8, v8, k_scale=1.5, v_scale=0.25, out=out, lse=lse, return_lse=True)
        ref_out, ref_lse = ref.ragged_attention_ref(batch.q, k8.float() * 1.5, v8.float() * 0.25, batch.qo_indptr,
                                                    batch.kv_indptr, causal)
        ref.check_attention(out, ref_out, torch.bfloat16, f"fp8 {fmt} ragged hd{head_dim} causal={causal}", lse, ref_lse)
        with pytest.raises(TypeError, match="k: expected dtype"):  # the plan's cache dtype, checked before launch
            w.run(batch.q, batch.k, batch.v)


@pytest.mark.parametrize("fmt", list(FP8))
def test_decode_fp8_with_device_scales(fmt: str) -> None:
    """Decode (vLLM's kv_cache_dtype=fp8): scales as one-element CUDA tensors, updated in place between runs."""
    kv_lens = [1, 17, 300, 1000, 64, 2049]
    b, k, v = _fp8_paged([(1, n) for n in kv_lens], 4, 128, torch.bfloat16, FP8[fmt], "NHD", 16, seed=5)
    w = flashinfer_jit.BatchDecodeWithPagedKVCacheWrapper(_workspace(), kv_layout="NHD")
    t = b.table
    w.plan(t.indptr, t.indices, t.last_page_len, b.num_qo_heads, b.num_kv_heads, 128, 16, q_data_type=torch.bfloat16,
           kv_data_type=FP8[fmt])
    k_scale = torch.tensor([0.75], device=DEVICE)
    v_scale = torch.tensor([1.25], device=DEVICE)
    for ks, vs in ((0.75, 1.25), (2.0, 0.5)):
        k_scale.fill_(ks)
        v_scale.fill_(vs)
        out = torch.full((len(kv_lens), b.num_qo_heads, 128), NAN, dtype=torch.bfloat16, device=DEVICE)
        w.run(b.q, b.cache, k_scale=k_scale, v_scale=v_scale, out=out)
        ref_out, _ = ref.ragged_attention_ref(b.q, k * ks, v * vs, b.qo_indptr, b.kv_indptr, False)
        ref.check_attention(out, ref_out, torch.bfloat16, f"fp8 {fmt} decode k_scale {ks} v_scale {vs}")
    with pytest.raises(TypeError, match="paged_kv_cache: expected dtype"):
        w.run(b.q, b.cache.to(torch.bfloat16))


DECODE_SHAPES = [(64, 1, torch.float16, "e4m3", "NONE"), (256, 8, torch.bfloat16, "e5m2", "NONE"),
                 (128, 4, torch.bfloat16, "e4m3", "ROPE_LLAMA"), (64, 8, torch.float16, "e5m2", "ROPE_LLAMA"),
                 (256, 1, torch.bfloat16, "e4m3", "ROPE_LLAMA")]


@pytest.mark.parametrize("head_dim, group, dtype, fmt, pos_encoding", DECODE_SHAPES,
                         ids=[f"hd{d}-g{g}-{fmt}-{pe}" for d, g, _, fmt, pe in DECODE_SHAPES])
def test_decode_fp8_head_dims_groups_and_fused_rope(head_dim: int, group: int, dtype: torch.dtype, fmt: str,
                                                    pos_encoding: str) -> None:
    """Decode at every head_dim (hd64 / hd128: the 16-row decode tiles, whose fp8 path under
    -DFIJ_DECODE_WARP_LOCAL=1 widens each warp's keys and stages 5 tiles deep; hd256: 64-row tiles), GQA
    groups 1 / 8, the fused-RoPE key transform applied while the keys are widened; KV lengths from 1 to
    past 4k (a long range goes round the stage ring many times)."""
    kv_lens = [1, 33, 777, 64, 4100, 5]
    b, k, v = _fp8_paged([(1, n) for n in kv_lens], group, head_dim, dtype, FP8[fmt], "HND", 16, seed=head_dim + group)
    w = flashinfer_jit.BatchDecodeWithPagedKVCacheWrapper(_workspace(), kv_layout="HND")
    t = b.table
    w.plan(t.indptr, t.indices, t.last_page_len, b.num_qo_heads, b.num_kv_heads, head_dim, 16, q_data_type=dtype,
           kv_data_type=FP8[fmt], pos_encoding_mode=pos_encoding)
    out = torch.full((len(kv_lens), b.num_qo_heads, head_dim), NAN, dtype=dtype, device=DEVICE)
    w.run(b.q, b.cache, k_scale=0.5, v_scale=1.5, out=out)
    q, keys = b.q, k * 0.5
    if pos_encoding == "ROPE_LLAMA":
        q_pos, k_pos = ref.rope_positions(b.qo_indptr, b.kv_indptr)
        q = ref.rope_reference(b.q, q_pos.to(DEVICE), head_dim, False, 1.0, 1e4)
        keys = ref.rope_reference(keys, k_pos.to(DEVICE), head_dim, False, 1.0, 1e4)
    ref_out, _ = ref.ragged_attention_ref(q, keys, v * 1.5, b.qo_indptr, b.kv_indptr, False)
    ref.check_attention(out, ref_out, dtype, f"fp8 {fmt} decode hd{head_dim} g{group} {pos_encoding}")


def test_fp8_with_fused_rope_and_a_window() -> None:
    b, k, v = _fp8_paged(LENS, 4, 128, torch.bfloat16, torch.float8_e4m3fn, "NHD", 16, seed=41)
    w = flashinfer_jit.BatchPrefillWithPagedKVCacheWrapper(_workspace())
    t = b.table
    w.plan(b.qo_indptr, t.indptr, t.indices, t.last_page_len, b.num_qo_heads, b.num_kv_heads, 128, 16, causal=True,
           q_data_type=torch.bfloat16, kv_data_type=torch.float8_e4m3fn, pos_encoding_mode="ROPE_LLAMA",
           window_left=60)
    out, lse = _poisoned(b.total_q, b.num_qo_heads, 128, torch.bfloat16)
    w.run(b.q, b.cache, k_scale=0.5, out=out, lse=lse, return_lse=True)
    q_pos, k_pos = ref.rope_positions(b.qo_indptr, b.kv_indptr)
    q_rot = ref.rope_reference(b.q, q_pos.to(DEVICE), 128, False, 1.0, 1e4)
    k_rot = ref.rope_reference(k * 0.5, k_pos.to(DEVICE), 128, False, 1.0, 1e4)
    ref_out, ref_lse = ref.ragged_attention_ref(q_rot, k_rot, v, b.qo_indptr, b.kv_indptr, True, window_left=60)
    ref.check_attention(out, ref_out, torch.bfloat16, "fp8 + fused RoPE + window", lse, ref_lse)


FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


@pytest.mark.parametrize("fmt", list(FP8))
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_append_into_an_fp8_cache_then_attend(fmt: str, layout: str) -> None:
    """append_paged_kv_cache casts bf16 keys / values into an fp8 cache (value / scale, saturated: large
    values become the largest finite fp8, never inf / NaN), bit for bit as torch casts the clamped values;
    decode over that cache with the same scales matches the reference on the dequantized values."""
    fp8 = FP8[fmt]
    kv_lens = [5, 40, 17]
    b = ref.make_paged_batch([1] * 3, kv_lens, 8, NUM_KV_HEADS, 128, torch.bfloat16, DEVICE, layout, 16, seed=3,
                             fill=0.0)
    keys, values = b.k.clone(), b.v.clone()
    keys[0, 0, :4] = torch.tensor([1e6, -1e6, 3e4, -3e4])  # past the fp8 range: saturated
    cache = torch.zeros_like(b.cache, dtype=fp8)
    t = b.table
    append_indptr = ref.make_indptr(kv_lens).to(DEVICE)
    seq_lens = torch.tensor(kv_lens, dtype=torch.int32, device=DEVICE)
    batch_idx, positions = flashinfer_jit.get_batch_indices_positions(append_indptr, seq_lens, keys.shape[0])
    k_scale, v_scale = 0.5, 4.0
    flashinfer_jit.append_paged_kv_cache(keys, values, batch_idx, positions, cache, t.indices.to(DEVICE),
                                         t.indptr.to(DEVICE), t.last_page_len.to(DEVICE), layout,
                                         k_scale=k_scale, v_scale=v_scale)
    pages, slots = ref.token_page_slots(t.indptr, t.indices, kv_lens, 16)
    # read back through a byte view (indexing needs no fp8 kernels that way)
    k_read, v_read = (x.view(fp8) for x in ref.gather_from_pages(cache.view(torch.uint8), pages, slots, layout))

    def cast(x: torch.Tensor, scale: float) -> torch.Tensor:
        limit = FP8_MAX[fp8]
        return (x.float() * torch.tensor(1.0 / scale, dtype=torch.float32)).clamp(-limit, limit).to(fp8)

    assert torch.equal(k_read.view(torch.uint8), cast(keys, k_scale).view(torch.uint8))
    assert torch.equal(v_read.view(torch.uint8), cast(values, v_scale).view(torch.uint8))
    assert bool(torch.isfinite(k_read.float()).all())
    w = flashinfer_jit.BatchDecodeWithPagedKVCacheWrapper(_workspace(), kv_layout=layout)
    w.plan(t.indptr, t.indices, t.last_page_len, 8, NUM_KV_HEADS, 128, 16, q_data_type=torch.bfloat16,
           kv_data_type=fp8)
    out = w.run(b.q, cache, k_scale=k_scale, v_scale=v_scale)
    ref_out, _ = ref.ragged_attention_ref(b.q, k_read.float() * k_scale, v_read.float() * v_scale, b.qo_indptr,
                                          b.kv_indptr, False)
    ref.check_attention(out, ref_out, torch.bfloat16, f"append into fp8 {fmt} {layout}, then decode")
