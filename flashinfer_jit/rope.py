"""Rotary position embedding as standalone ops, FlashInfer's `flashinfer.rope` API: apply_rope,
apply_rope_inplace (positions from indptr and per-request offsets), apply_rope_pos_ids,
apply_rope_pos_ids_inplace (a position per token). For engines that rotate q and k before attention.

q [nnz, num_q_heads, head_dim] and k [nnz, num_k_heads, head_dim], fp16 / bf16, any token and head
strides (last dim contiguous). Dims [0, rotary_dim) (default: all) of every head rotate by pos *
freq(i), freq(i) = theta^(-2i / rotary_dim) / rope_scale for pair i; interleave=False pairs dims
(i, i + rotary_dim / 2) (rotate-half, Llama), interleave=True pairs (2i, 2i + 1) (GPT-J). float32
math (the angle reduced by 2 pi before a fast sincos), results rounded to q's dtype. The kernel is
JIT-built per (head_dim, dtype, interleave) (spec.RopeSpec).

The pos_ids form never synchronizes the device. The indptr form reads indptr and offsets on the host
(one copy each when they are CUDA tensors), as plan() does, so that a bad indptr is a ValueError
before any launch: stricter than FlashInfer, which checks neither.
"""
from __future__ import annotations

import ctypes
import math
from typing import Optional

import torch

from . import loader, validate
from .abi import RopeParams
from .ops import define, device_guard, stream_of
from .spec import RopeSpec, dtype_name

def _kernel(q: torch.Tensor, interleave: bool) -> loader.LoadedKernel:
    return loader.load(RopeSpec(head_dim=q.shape[-1], dtype=dtype_name(q.dtype), interleave=bool(interleave)))


def _launch(q: torch.Tensor, k: torch.Tensor, q_out: torch.Tensor, k_out: torch.Tensor, pos_ids: torch.Tensor,
            rotary_dim: int, interleave: bool, rcp_scale: float, rcp_theta: float, *,
            num_q_heads: Optional[int] = None, freqs: Optional[torch.Tensor] = None) -> None:
    """num_q_heads=0: k only (q is ignored); freqs: a frequency table instead of rcp_scale / rcp_theta."""
    p = RopeParams()
    p.q, p.k, p.q_out, p.k_out = q.data_ptr(), k.data_ptr(), q_out.data_ptr(), k_out.data_ptr()
    p.pos_ids = ctypes.cast(pos_ids.data_ptr(), ctypes.POINTER(ctypes.c_int32))
    p.q_stride_n, p.q_stride_h = q.stride(0), q.stride(1)
    p.k_stride_n, p.k_stride_h = k.stride(0), k.stride(1)
    p.qo_stride_n, p.qo_stride_h = q_out.stride(0), q_out.stride(1)
    p.ko_stride_n, p.ko_stride_h = k_out.stride(0), k_out.stride(1)
    p.nnz, p.num_k_heads, p.rotary_dim = q.shape[0], k.shape[1], rotary_dim
    p.num_q_heads = q.shape[1] if num_q_heads is None else num_q_heads
    p.rcp_scale, p.rcp_theta = rcp_scale, rcp_theta
    if freqs is not None:
        p.freqs = ctypes.cast(freqs.data_ptr(), ctypes.POINTER(ctypes.c_float))
    _run(p, q, interleave)


def _run(p: RopeParams, like: torch.Tensor, interleave: bool) -> None:
    """Launch the kernel of `like`'s head_dim and dtype on its device's current stream."""
    kernel = _kernel(like, interleave)
    fn = kernel.function("apply", [ctypes.POINTER(RopeParams), ctypes.c_void_p])
    with device_guard(like.device):
        code = fn(ctypes.byref(p), stream_of(like.device))
    kernel.check(code, "apply_rope")


def gather_paged_rows(cache: torch.Tensor, out: torch.Tensor, pages: torch.Tensor, pos_ids: torch.Tensor,
                      freqs: Optional[torch.Tensor]) -> None:
    """out[t] = row pos_ids[t] % page_size of page pages[t] of `cache` (one NHD half of a paged cache,
    [num_pages, page_size, heads, head_dim], any page stride), rotated (non-interleaved, all dims) at
    pos_ids[t] with the fused kernels' table `freqs`, or copied when freqs is None: the sm90 paged plans'
    gather into ragged copies (batch_attention). out [rows, heads, head_dim]; pages, pos_ids int32 [rows] on
    out's device. No checks: the plan made every tensor."""
    p = RopeParams()
    p.q = p.k = cache.data_ptr()
    p.q_out = p.k_out = out.data_ptr()
    p.pos_ids = ctypes.cast(pos_ids.data_ptr(), ctypes.POINTER(ctypes.c_int32))
    p.k_stride_n, p.k_stride_h = cache.stride(1), cache.stride(2)
    p.ko_stride_n, p.ko_stride_h = out.stride(0), out.stride(1)
    p.nnz, p.num_q_heads, p.num_k_heads = out.shape[0], 0, out.shape[1]
    p.rotary_dim = out.shape[-1] if freqs is not None else 0
    p.rcp_scale = p.rcp_theta = 1.0
    if freqs is not None:
        p.freqs = ctypes.cast(freqs.data_ptr(), ctypes.POINTER(ctypes.c_float))
    p.src_pages = ctypes.cast(pages.data_ptr(), ctypes.POINTER(ctypes.c_int32))
    p.src_stride_page, p.src_page_size = cache.stride(0), cache.shape[1]
    _run(p, out, False)


def rotate_keys(k: torch.Tensor, k_out: torch.Tensor, pos_ids: torch.Tensor, freqs: torch.Tensor) -> None:
    """k_out = k rotated (non-interleaved, all dims) at pos_ids with the fused kernels' frequency table
    `freqs` (options.rope_frequencies): the sm90 fused-RoPE launcher's one pass over K (batch_attention).
    No checks: the plan made every tensor."""
    _launch(k, k, k_out, k_out, pos_ids, k.shape[-1], False, 1.0, 1.0, num_q_heads=0, freqs=freqs)


def _apply_cuda(q: torch.Tensor, k: torch.Tensor, q_out: torch.Tensor, k_out: torch.Tensor, pos_ids: torch.Tensor,
                rotary_dim: int, interleave: bool, rcp_scale: float, rcp_theta: float) -> None:
    _launch(q, k, q_out, k_out, pos_ids, rotary_dim, interleave, rcp_scale, rcp_theta)


def _apply_inplace_cuda(q: torch.Tensor, k: torch.Tensor, pos_ids: torch.Tensor, rotary_dim: int, interleave: bool,
                        rcp_scale: float, rcp_theta: float) -> None:
    _launch(q, k, q, k, pos_ids, rotary_dim, interleave, rcp_scale, rcp_theta)


_apply_op = define(
    "rope_apply(Tensor q, Tensor k, Tensor(a!) q_out, Tensor(b!) k_out, Tensor pos_ids, int rotary_dim, "
    "bool interleave, float rcp_scale, float rcp_theta) -> ()",
    _apply_cuda, lambda *args: None,
)
_apply_inplace_op = define(
    "rope_apply_inplace(Tensor(a!) q, Tensor(b!) k, Tensor pos_ids, int rotary_dim, bool interleave, "
    "float rcp_scale, float rcp_theta) -> ()",
    _apply_inplace_cuda, lambda *args: None,
)


def _check(where: str, q: object, k: object, rotary_dim: Optional[int], rope_scale: float,
           rope_theta: float) -> tuple[torch.Tensor, torch.Tensor, int, float, float]:
    q = validate.cuda_tensor("q", q, dtypes=validate.ATTENTION_DTYPES, ndim=3)
    k = validate.cuda_tensor("k", k, dtypes=(q.dtype,), ndim=3, device=q.device)
    head_dim = validate.head_dim("q.shape[-1] (head_dim)", q.shape[-1])
    if k.shape[0] != q.shape[0] or k.shape[2] != head_dim:
        raise ValueError(f"{where}: k: expected [nnz={q.shape[0]}, num_k_heads, {head_dim}] like q, got "
                         f"{tuple(k.shape)}")
    for name, t in (("q", q), ("k", k)):
        if t.stride(-1) != 1:
            raise ValueError(f"{where}: {name}: the last dimension must be contiguous (stride 1), got strides "
                             f"{t.stride()}; call .contiguous()")
    rotary = head_dim if rotary_dim is None else rotary_dim
    if isinstance(rotary, bool) or not isinstance(rotary, int) or rotary < 2 or rotary > head_dim or rotary % 2:
        raise ValueError(f"{where}: rotary_dim={rotary_dim!r}: expected None (head_dim) or an even number of dims "
                         f"in [2, {head_dim}]")
    for name, value in (("rope_scale", rope_scale), ("rope_theta", rope_theta)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{where}: {name}={value!r}: expected a finite number > 0")
    return q, k, rotary, 1.0 / float(rope_scale), 1.0 / float(rope_theta)


def _pos_ids(where: str, pos_ids: object, q: torch.Tensor) -> torch.Tensor:
    t = validate.cuda_tensor("pos_ids", pos_ids, dtypes=(torch.int32,), ndim=1, device=q.device)
    if t.numel() != q.shape[0]:
        raise ValueError(f"{where}: pos_ids: expected one position per token ({q.shape[0]}), got {t.numel()}")
    return t.contiguous()


def _pos_ids_from_indptr(where: str, indptr: object, offsets: object, q: torch.Tensor) -> torch.Tensor:
    """Token i of request r is at offsets[r] + i - indptr[r] (checked on the host)."""
    ip = validate.tensor("indptr", indptr, dtypes=(torch.int32,), ndim=1).to("cpu")
    off = validate.tensor("offsets", offsets, dtypes=(torch.int32,), ndim=1).to("cpu")
    if ip.numel() != off.numel() + 1:
        raise ValueError(f"{where}: indptr has {ip.numel()} entries, offsets {off.numel()}: expected batch + 1 and batch")
    if ip.numel() == 0 or int(ip[0]) != 0 or int(ip[-1]) != q.shape[0]:
        raise ValueError(f"{where}: indptr must start at 0 and end at nnz={q.shape[0]}, got {ip.tolist()[:8]}...")
    lens = ip[1:] - ip[:-1]
    if bool((lens < 0).any()):
        bad = int(torch.nonzero(lens < 0)[0])
        raise ValueError(f"{where}: indptr must be non-decreasing: indptr[{bad}:{bad + 2}] = {ip[bad:bad + 2].tolist()}")
    request = torch.repeat_interleave(torch.arange(off.numel()), lens.long())
    pos = off[request] + (torch.arange(q.shape[0], dtype=torch.int32) - ip[request])
    return pos.to(torch.int32).to(q.device, non_blocking=True)


def apply_rope_pos_ids(q: torch.Tensor, k: torch.Tensor, pos_ids: torch.Tensor, rotary_dim: Optional[int] = None,
                       interleave: bool = False, rope_scale: float = 1, rope_theta: float = 1e4
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_rope, k_rope): q and k rotated at positions pos_ids (int32 [nnz], on q's device)."""
    where = "apply_rope_pos_ids()"
    q, k, rotary, rcp_scale, rcp_theta = _check(where, q, k, rotary_dim, rope_scale, rope_theta)
    pos = _pos_ids(where, pos_ids, q)
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    _apply_op(q, k, q_out, k_out, pos, rotary, bool(interleave), rcp_scale, rcp_theta)
    return q_out, k_out


def apply_rope_pos_ids_inplace(q: torch.Tensor, k: torch.Tensor, pos_ids: torch.Tensor,
                               rotary_dim: Optional[int] = None, interleave: bool = False, rope_scale: float = 1,
                               rope_theta: float = 1e4) -> None:
    """Rotate q and k in place at positions pos_ids."""
    where = "apply_rope_pos_ids_inplace()"
    q, k, rotary, rcp_scale, rcp_theta = _check(where, q, k, rotary_dim, rope_scale, rope_theta)
    _apply_inplace_op(q, k, _pos_ids(where, pos_ids, q), rotary, bool(interleave), rcp_scale, rcp_theta)


def apply_rope(q: torch.Tensor, k: torch.Tensor, indptr: torch.Tensor, offsets: torch.Tensor,
               rotary_dim: Optional[int] = None, interleave: bool = False, rope_scale: float = 1,
               rope_theta: float = 1e4) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_rope, k_rope) for a ragged batch: indptr int32 [batch + 1] (token offsets), offsets int32 [batch]
    (each request's first position)."""
    where = "apply_rope()"
    q, k, rotary, rcp_scale, rcp_theta = _check(where, q, k, rotary_dim, rope_scale, rope_theta)
    pos = _pos_ids_from_indptr(where, indptr, offsets, q)
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    _apply_op(q, k, q_out, k_out, pos, rotary, bool(interleave), rcp_scale, rcp_theta)
    return q_out, k_out


def apply_rope_inplace(q: torch.Tensor, k: torch.Tensor, indptr: torch.Tensor, offsets: torch.Tensor,
                       rotary_dim: Optional[int] = None, interleave: bool = False, rope_scale: float = 1,
                       rope_theta: float = 1e4) -> None:
    """Rotate a ragged batch's q and k in place (positions as in apply_rope)."""
    where = "apply_rope_inplace()"
    q, k, rotary, rcp_scale, rcp_theta = _check(where, q, k, rotary_dim, rope_scale, rope_theta)
    _apply_inplace_op(q, k, _pos_ids_from_indptr(where, indptr, offsets, q), rotary, bool(interleave), rcp_scale,
                      rcp_theta)
