"""Merging attention states (FlashInfer's `flashinfer.cascade` functions).

LSE values are base 2, as in FlashInfer: s = log2(sum_j exp2(x_j)) where x_j are the logits already
scaled by sm_scale * log2(e). An LSE of -inf marks an empty state (attention over no keys); merging
only empty states yields v = 0 and s = -inf, never NaN.

Stricter than FlashInfer: every argument is checked (dtype, device, shape, alignment) before launch.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import loader, validate
from .ops import I32, I64, PTR, define, device_guard, ptr, stream_of
from .spec import MergeStateSpec, dtype_name

_MERGE_TWO_ARGS = [PTR, I64, I64, PTR, I64, I64, PTR, I64, I64, PTR, I64, I64,
                   PTR, I64, I64, PTR, I64, I64, PTR, I64, I32, PTR]
_MERGE_MANY_ARGS = [PTR, I64, I64, I64, PTR, I64, I64, I64, PTR, I64, I64, PTR, I64, I64, I64, I32, I32, PTR]


def _kernel(v: torch.Tensor) -> loader.LoadedKernel:
    return loader.load(MergeStateSpec(head_dim=v.shape[-1], dtype=dtype_name(v.dtype)))


def _merge_two_cuda(v_a: torch.Tensor, s_a: torch.Tensor, v_b: torch.Tensor, s_b: torch.Tensor,
                    v_out: torch.Tensor, s_out: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
    validate.aligned_pointers("merge_state", v_a, v_b, v_out)
    kernel = _kernel(v_a)
    fn = kernel.function("merge_two", _MERGE_TWO_ARGS)
    with device_guard(v_a.device):
        code = fn(ptr(v_a), v_a.stride(0), v_a.stride(1), ptr(s_a), s_a.stride(0), s_a.stride(1),
                  ptr(v_b), v_b.stride(0), v_b.stride(1), ptr(s_b), s_b.stride(0), s_b.stride(1),
                  ptr(v_out), v_out.stride(0), v_out.stride(1), ptr(s_out), s_out.stride(0), s_out.stride(1),
                  ptr(mask), v_a.shape[0], v_a.shape[1], stream_of(v_a.device))
    kernel.check(code, "merge_state")


def _merge_many_cuda(v: torch.Tensor, s: torch.Tensor, v_out: torch.Tensor, s_out: torch.Tensor) -> None:
    validate.aligned_pointers("merge_states", v, v_out)
    kernel = _kernel(v)
    fn = kernel.function("merge_many", _MERGE_MANY_ARGS)
    with device_guard(v.device):
        code = fn(ptr(v), v.stride(0), v.stride(1), v.stride(2), ptr(s), s.stride(0), s.stride(1), s.stride(2),
                  ptr(v_out), v_out.stride(0), v_out.stride(1), ptr(s_out), s_out.stride(0), s_out.stride(1),
                  v.shape[0], v.shape[1], v.shape[2], stream_of(v.device))
    kernel.check(code, "merge_states")


_merge_two_op = define(
    "merge_two(Tensor v_a, Tensor s_a, Tensor v_b, Tensor s_b, Tensor(a!) v_out, Tensor(b!) s_out, Tensor? mask) -> ()",
    _merge_two_cuda, lambda *args: None,
)
_merge_many_op = define(
    "merge_many(Tensor v, Tensor s, Tensor(a!) v_out, Tensor(b!) s_out) -> ()",
    _merge_many_cuda, lambda *args: None,
)


def _check_state(prefix: str, v: object, s: object, like: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    v_t = validate.cuda_tensor(f"{prefix}v", v, dtypes=validate.ATTENTION_DTYPES, ndim=3)
    validate.head_dim(f"{prefix}v.shape[-1] (head_dim)", v_t.shape[-1])
    validate.vector_rows(f"{prefix}v", v_t)
    s_t = validate.tensor(f"{prefix}s", s, dtypes=(torch.float32,), shape=(v_t.shape[0], v_t.shape[1]), device=v_t.device)
    if like is not None:
        validate.tensor(f"{prefix}v", v_t, dtypes=(like.dtype,), shape=tuple(like.shape), device=like.device)
    return v_t, s_t


def merge_state(v_a: torch.Tensor, s_a: torch.Tensor, v_b: torch.Tensor, s_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two attention states. v_*: [seq, heads, head_dim] fp16/bf16; s_*: [seq, heads] float32
    base-2 LSE. Returns (v, s) of the same shapes."""
    v_a, s_a = _check_state("v_a/s_a: ", v_a, s_a)
    v_b, s_b = _check_state("v_b/s_b: ", v_b, s_b, like=v_a)
    v_out = torch.empty_like(v_a, memory_format=torch.contiguous_format)
    s_out = torch.empty(s_a.shape, dtype=torch.float32, device=s_a.device)
    _merge_two_op(v_a, s_a, v_b, s_b, v_out, s_out, None)
    return v_out, s_out


def merge_state_in_place(v: torch.Tensor, s: torch.Tensor, v_other: torch.Tensor, s_other: torch.Tensor,
                         mask: Optional[torch.Tensor] = None) -> None:
    """Merge (v_other, s_other) into (v, s) in place. `mask` (bool [seq], optional) selects the rows
    to merge; other rows are left untouched."""
    v, s = _check_state("v/s: ", v, s)
    v_other, s_other = _check_state("v_other/s_other: ", v_other, s_other, like=v)
    if mask is not None:
        validate.tensor("mask", mask, dtypes=(torch.bool,), shape=(v.shape[0],), device=v.device)
        mask = mask.contiguous()
    _merge_two_op(v, s, v_other, s_other, v, s, mask)


def merge_states(v: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge K states per row. v: [seq, K, heads, head_dim]; s: [seq, K, heads] float32.
    Returns (v [seq, heads, head_dim], s [seq, heads])."""
    v_t = validate.cuda_tensor("v", v, dtypes=validate.ATTENTION_DTYPES, ndim=4)
    validate.head_dim("v.shape[-1] (head_dim)", v_t.shape[-1])
    validate.vector_rows("v", v_t)
    s_t = validate.tensor("s", s, dtypes=(torch.float32,), shape=tuple(v_t.shape[:3]), device=v_t.device)
    n, k, h, d = v_t.shape
    v_out = torch.empty((n, h, d), dtype=v_t.dtype, device=v_t.device)
    s_out = torch.empty((n, h), dtype=torch.float32, device=v_t.device)
    if k == 0:
        v_out.zero_()
        s_out.fill_(float("-inf"))
        return v_out, s_out
    _merge_many_op(v_t, s_t, v_out, s_out)
    return v_out, s_out
