"""flashinfer_jit.transformers_attention: transformers' attention-function interface over the ragged wrapper.

CPU (no transformers, no GPU needed): registration against a stand-in transformers module; the packed
batch's prefix sums (from packed_kwargs, cu_seq_lens_q, position_ids or equal rows); every refusal
(padding mask, dropout, KV cache, weights, sliding window / soft-cap, unequal q / k prefix sums) raised
before anything touches a GPU.
GPU (needs transformers: skipped with the reason without it): examples/transformers_llama.py, a tiny
random Llama on a packed ragged batch against transformers' SDPA run per sequence.
"""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

from flashinfer_jit import NotSupportedError
from flashinfer_jit import transformers_attention as ta

ROOT = Path(__file__).resolve().parent.parent


class _Module(torch.nn.Module):
    is_causal = True


def _qkv(batch: int = 1, tokens: int = 10, hq: int = 8, hk: int = 2, d: int = 128, kv_tokens: int | None = None):
    q = torch.randn(batch, hq, tokens, d)
    k = torch.randn(batch, hk, kv_tokens or tokens, d)
    return q, k, torch.randn_like(k)


def test_packed_kwargs_are_cpu_int32_prefix_sums() -> None:
    kw = ta.packed_kwargs([3, 1, 5])
    assert kw["cu_seq_lens_q"].tolist() == [0, 3, 4, 9] and kw["cu_seq_lens_q"].dtype == torch.int32
    assert kw["cu_seq_lens_q"].device.type == "cpu" and kw["cu_seq_lens_k"] is kw["cu_seq_lens_q"]
    assert kw["max_length_q"] == kw["max_length_k"] == 5


@pytest.mark.parametrize("kwargs, batch, expected", [
    ({"cu_seq_lens_q": torch.tensor([0, 4, 10], dtype=torch.int32)}, 1, [0, 4, 10]),
    ({"position_ids": torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])}, 1, [0, 4, 10]),
    ({"position_ids": torch.tensor([[0, 0, 0, 1, 2, 3, 4, 5, 6, 7]])}, 1, [0, 1, 2, 10]),  # length-1 sequences
    ({}, 3, [0, 10, 20, 30]),  # rows of equal length
])
def test_prefix_sums_of_a_batch(kwargs: dict, batch: int, expected: list) -> None:
    q, _, _ = _qkv(batch=batch)
    assert ta._prefix_sums(q, kwargs).tolist() == expected


def test_position_ids_must_start_at_zero() -> None:
    q, _, _ = _qkv()
    with pytest.raises(ValueError, match="start every sequence at 0"):
        ta._prefix_sums(q, {"position_ids": torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])})


@pytest.mark.parametrize("change, name", [
    (dict(attention_mask=torch.ones(1, 10, dtype=torch.bool)), "attention_mask"),
    (dict(dropout=0.1), "dropout"),
    (dict(output_attentions=True), "output_attentions"),
    (dict(kv_tokens=14), "key"),  # a KV cache: more keys than queries
    (dict(cu_seq_lens_q=torch.tensor([0, 4, 10], dtype=torch.int32),
          cu_seq_lens_k=torch.tensor([0, 5, 10], dtype=torch.int32)), "cu_seq_lens_k"),
    (dict(batch=2, cu_seq_lens_q=torch.tensor([0, 4, 10], dtype=torch.int32)), "query"),
])
def test_refusals_name_the_argument_before_any_kernel(change: dict, name: str) -> None:
    change = dict(change)
    q, k, v = _qkv(batch=change.pop("batch", 1), kv_tokens=change.pop("kv_tokens", None))
    mask = change.pop("attention_mask", None)
    dropout = change.pop("dropout", 0.0)
    # CPU tensors: reaching the wrapper would fail differently, so a NotSupportedError naming the
    # argument shows the refusal comes first.
    with pytest.raises(NotSupportedError, match=name):
        ta.attention_forward(_Module(), q, k, v, mask, dropout=dropout, **change)


@pytest.mark.parametrize("kwargs, module_attrs, expected", [
    ({}, {}, (-1, 0.0)),
    ({"sliding_window": 4096}, {}, (4095, 0.0)),  # W keys, the query's own included
    ({"softcap": 50.0}, {}, (-1, 50.0)),
    ({"sliding_window": None, "softcap": None}, {"sliding_window": 8}, (-1, 0.0)),  # the call's None wins
    ({}, {"sliding_window": 1, "softcap": 30}, (0, 30.0)),  # else the module's
])
def test_sliding_window_and_softcap_become_the_plans_variant(kwargs: dict, module_attrs: dict, expected: tuple,
                                                             monkeypatch) -> None:
    planned = []

    class FakeWrapper:
        def __init__(self, *args, **kw):
            pass

        def plan(self, *args, **kw):
            planned.append((kw["window_left"], kw["logits_soft_cap"]))

        def run(self, q, k, v):
            return torch.zeros_like(q)

    monkeypatch.setattr(ta, "BatchPrefillWithRaggedKVCacheWrapper", FakeWrapper)
    monkeypatch.setattr(ta, "_plans", ta.OrderedDict())
    module = _Module()
    for name, value in module_attrs.items():
        setattr(module, name, value)
    q, k, v = _qkv()
    ta.attention_forward(module, q, k, v, None, **kwargs)
    assert planned == [expected]


@pytest.mark.parametrize("kwargs", [{"sliding_window": 0}, {"sliding_window": 2.5}, {"softcap": -1.0}])
def test_bad_sliding_window_or_softcap_raise(kwargs: dict) -> None:
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ta.attention_forward(_Module(), q, k, v, None, **kwargs)


def test_register_adds_the_function_and_the_flash_attention_mask(monkeypatch) -> None:
    attention, masks = {}, {}
    transformers = types.ModuleType("transformers")
    transformers.AttentionInterface = type("AttentionInterface", (), {
        "register": classmethod(lambda cls, name, fn: attention.__setitem__(name, fn))})
    masking = types.ModuleType("transformers.masking_utils")
    masking.flash_attention_mask = object()
    masking.AttentionMaskInterface = type("AttentionMaskInterface", (), {
        "register": classmethod(lambda cls, name, fn: masks.__setitem__(name, fn))})
    monkeypatch.setitem(sys.modules, "transformers", transformers)
    monkeypatch.setitem(sys.modules, "transformers.masking_utils", masking)
    assert ta.register() == "fij_varlen"
    assert attention == {"fij_varlen": ta.attention_forward}
    assert masks == {"fij_varlen": masking.flash_attention_mask}
    # transformers 5 tries to import a FlashAttention package for any name containing "flash" (found on
    # the device with transformers 5.17): refused before anything is registered
    with pytest.raises(ValueError, match="contains 'flash'"):
        ta.register("flashinfer_jit")
    assert list(attention) == ["fij_varlen"]


@pytest.mark.gpu
def test_transformers_llama_example_matches_sdpa() -> None:
    pytest.importorskip("transformers", reason="the transformers integration needs transformers "
                        "(pip install 'flashinfer-jit[transformers]')")
    spec = importlib.util.spec_from_file_location("transformers_llama", ROOT / "examples" / "transformers_llama.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main() == 0
