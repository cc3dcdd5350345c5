"""Paged KV cache helpers (FlashInfer's `flashinfer.page` functions).

Stricter than FlashInfer: shapes, dtypes and devices are checked before launch, and the kernel never
writes outside the cache: a token whose request, position or page lies outside the page table is
skipped. When the index tensors are on the CPU they are checked on the host first and a bad entry
raises (naming it) instead of being skipped.
"""
from __future__ import annotations

import ctypes
from typing import Optional, Union

import torch

from . import loader, options, validate
from .abi import AppendParams
from .ops import define, device_guard, stream_of
from .spec import AppendPagedSpec, dtype_name


def _append_cuda(append_key: torch.Tensor, append_value: torch.Tensor, batch_indices: torch.Tensor,
                 positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_indices: torch.Tensor,
                 kv_indptr: torch.Tensor, nhd: bool, k_scale: float, v_scale: float) -> None:
    validate.aligned_pointers("append_paged_kv_cache", append_key, append_value, k_cache, v_cache)
    kernel = loader.load(AppendPagedSpec(head_dim=append_key.shape[-1], dtype=dtype_name(append_key.dtype),
                                         kv_dtype=options.FP8_KV_DTYPES.get(k_cache.dtype, "")))
    p = AppendParams(k_rcp_scale=1.0 / k_scale, v_rcp_scale=1.0 / v_scale)
    p.key, p.value = append_key.data_ptr(), append_value.data_ptr()
    p.key_stride_n, p.key_stride_h = append_key.stride(0), append_key.stride(1)
    p.value_stride_n, p.value_stride_h = append_value.stride(0), append_value.stride(1)
    p.k_cache, p.v_cache = k_cache.data_ptr(), v_cache.data_ptr()
    p.stride_page = k_cache.stride(0)
    p.stride_n, p.stride_h = (k_cache.stride(1), k_cache.stride(2)) if nhd else (k_cache.stride(2), k_cache.stride(1))
    p.batch_indices, p.positions = batch_indices.data_ptr(), positions.data_ptr()
    p.kv_indices, p.kv_indptr = kv_indices.data_ptr(), kv_indptr.data_ptr()
    p.nnz = append_key.shape[0]
    p.num_kv_heads = append_key.shape[1]
    p.page_size = k_cache.shape[1] if nhd else k_cache.shape[2]
    p.num_pages = k_cache.shape[0]
    p.batch = kv_indptr.numel() - 1
    with device_guard(append_key.device):
        code = kernel.function("append", [ctypes.POINTER(AppendParams), ctypes.c_void_p])(
            ctypes.byref(p), stream_of(append_key.device))
    kernel.check(code, "append_paged_kv_cache")


_append_op = define(
    "append_paged(Tensor key, Tensor value, Tensor batch_indices, Tensor positions, Tensor(a!) k_cache, "
    "Tensor(b!) v_cache, Tensor kv_indices, Tensor kv_indptr, bool nhd, float k_scale, float v_scale) -> ()",
    _append_cuda, lambda *args: None,
)


def _cache_pair(paged_kv_cache: Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(paged_kv_cache, torch.Tensor):
        validate.cuda_tensor("paged_kv_cache", paged_kv_cache, ndim=5)
        if paged_kv_cache.shape[1] != 2:
            raise ValueError(f"paged_kv_cache: expected shape [num_pages, 2, ...] (K and V), got {tuple(paged_kv_cache.shape)}")
        return paged_kv_cache[:, 0], paged_kv_cache[:, 1]
    if isinstance(paged_kv_cache, (tuple, list)) and len(paged_kv_cache) == 2:
        k = validate.cuda_tensor("paged_kv_cache[0] (k)", paged_kv_cache[0], ndim=4)
        v = validate.tensor("paged_kv_cache[1] (v)", paged_kv_cache[1], dtypes=(k.dtype,), shape=tuple(k.shape), device=k.device)
        if k.stride() != v.stride():
            raise ValueError(f"paged_kv_cache: k and v must have equal strides, got {k.stride()} and {v.stride()}")
        return k, v
    raise TypeError(f"paged_kv_cache: expected a tensor or a (k, v) tuple, got {type(paged_kv_cache).__name__}")


def append_paged_kv_cache(append_key: torch.Tensor, append_value: torch.Tensor, batch_indices: torch.Tensor,
                          positions: torch.Tensor,
                          paged_kv_cache: Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]],
                          kv_indices: torch.Tensor, kv_indptr: torch.Tensor, kv_last_page_len: torch.Tensor,
                          kv_layout: str = "NHD", *, k_scale: Optional[float] = None,
                          v_scale: Optional[float] = None) -> None:
    """Write append_key/append_value [nnz, Hkv, D] into the paged cache: token i goes to request
    batch_indices[i] at KV position positions[i] (see get_batch_indices_positions). The page table
    (kv_indices, kv_indptr, kv_last_page_len) must already cover the new positions.

    An fp8 cache (float8_e4m3fn / e5m2) takes fp16 / bf16 keys and values: each is stored as
    value / scale (k_scale / v_scale, keyword only, flashinfer-jit's: None is 1.0, else a finite float > 0;
    the attention run()s then take the same scales), cast with saturation to the largest finite fp8 value
    (no inf, no NaN from overflow). Other caches take keys and values of their own dtype."""
    if kv_layout not in ("NHD", "HND"):
        raise ValueError(f"kv_layout: expected 'NHD' or 'HND', got {kv_layout!r}")
    nhd = kv_layout == "NHD"
    k_cache, v_cache = _cache_pair(paged_kv_cache)
    heads, head_dim = (k_cache.shape[2], k_cache.shape[3]) if nhd else (k_cache.shape[1], k_cache.shape[3])
    page_size = k_cache.shape[1] if nhd else k_cache.shape[2]
    validate.head_dim("paged_kv_cache head_dim", head_dim)
    fp8 = k_cache.dtype in options.FP8_KV_DTYPES
    if not fp8 and k_cache.dtype not in validate.ATTENTION_DTYPES:
        raise TypeError(f"paged_kv_cache: expected dtype torch.float16, torch.bfloat16, torch.float8_e4m3fn or "
                        f"torch.float8_e5m2, got {k_cache.dtype}")
    key_dtypes = validate.ATTENTION_DTYPES if fp8 else (k_cache.dtype,)
    key = validate.cuda_tensor("append_key", append_key, dtypes=key_dtypes, shape=(None, heads, head_dim),
                               device=k_cache.device)
    validate.tensor("append_value", append_value, dtypes=(key.dtype,), shape=tuple(key.shape), device=k_cache.device)
    scales = []
    for name, value in (("k_scale", k_scale), ("v_scale", v_scale)):
        if value is None:
            scales.append(1.0)
        elif not fp8:
            raise ValueError(f"append_paged_kv_cache: {name} applies to fp8 caches; this cache is {k_cache.dtype}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ValueError(f"append_paged_kv_cache: {name}={value!r}: expected None or a finite float > 0")
        else:
            scales.append(float(value))
    nnz = key.shape[0]
    for name, t in (("append_key", append_key), ("append_value", append_value), ("paged_kv_cache (k)", k_cache),
                    ("paged_kv_cache (v)", v_cache)):
        validate.vector_rows(name, t)
    index = {}
    for name, t, n in (("batch_indices", batch_indices, nnz), ("positions", positions, nnz),
                       ("kv_indices", kv_indices, None), ("kv_indptr", kv_indptr, None),
                       ("kv_last_page_len", kv_last_page_len, None)):
        validate.tensor(name, t, dtypes=(torch.int32,), shape=(n,))
        index[name] = t
    batch = kv_indptr.numel() - 1
    if batch < 0 or kv_last_page_len.numel() != batch:
        raise ValueError(f"kv_last_page_len: expected {max(batch, 0)} entries (len(kv_indptr) - 1), got {kv_last_page_len.numel()}")
    if all(t.device.type == "cpu" for t in index.values()):
        _check_append_on_host(batch_indices, positions, kv_indices, kv_indptr, page_size, k_cache.shape[0])
    device_index = {name: t.to(k_cache.device, non_blocking=True).contiguous() for name, t in index.items()
                    if name != "kv_last_page_len"}
    if nnz == 0:
        return
    _append_op(key, append_value, device_index["batch_indices"], device_index["positions"], k_cache, v_cache,
               device_index["kv_indices"], device_index["kv_indptr"], nhd, scales[0], scales[1])


def _check_append_on_host(batch_indices: torch.Tensor, positions: torch.Tensor, kv_indices: torch.Tensor,
                          kv_indptr: torch.Tensor, page_size: int, num_pages: int) -> None:
    batch = kv_indptr.numel() - 1
    if batch_indices.numel() == 0:
        return
    if int(batch_indices.min()) < 0 or int(batch_indices.max()) >= batch:
        raise ValueError(f"batch_indices: expected values in [0, {batch}), got range "
                         f"[{int(batch_indices.min())}, {int(batch_indices.max())}]")
    b = batch_indices.long()
    slots = kv_indptr.long()[b] + positions.long() // page_size
    bad = (positions < 0) | (slots >= kv_indptr.long()[b + 1])
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"positions[{i}] = {int(positions[i])} lies outside request {int(batch_indices[i])}'s pages")
    pages = kv_indices.long()[slots]
    if int(pages.min()) < 0 or int(pages.max()) >= num_pages:
        raise ValueError(f"kv_indices: page {int(pages.max())} is outside the cache ({num_pages} pages)")


def get_seq_lens(kv_indptr: torch.Tensor, kv_last_page_len: torch.Tensor, page_size: int) -> torch.Tensor:
    """KV lengths of a page table, FlashInfer's formula exactly: max(pages - 1, 0) * page_size +
    last_page_len per request (so a request without pages has length last_page_len; keep it 0 there).
    Element-wise tensor ops on the tensors' device: no synchronization."""
    return torch.clamp(kv_indptr[1:] - kv_indptr[:-1] - 1, min=0) * page_size + kv_last_page_len


def get_batch_indices_positions(append_indptr: torch.Tensor, seq_lens: torch.Tensor, nnz: int,
                                batch_indices: Optional[torch.Tensor] = None,
                                positions: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For appending: the request index and KV position of each of the `nnz` new tokens (FlashInfer's
    semantics). append_indptr [batch + 1] offsets the new tokens; seq_lens [batch] are the KV lengths
    after appending, so token t of request b gets position t + seq_lens[b] - append_indptr[b + 1].

    `nnz` may exceed append_indptr[-1] (a padded batch): tokens no request covers get batch index -1
    and position 0 (or, with a `positions=` buffer, keep the buffer's value). `batch_indices=` /
    `positions=` are optional int32 [nnz] output buffers on the same device, written in place and
    returned. Runs on the tensors' device (CPU or CUDA) without synchronizing, and can be captured in a
    CUDA graph."""
    validate.tensor("append_indptr", append_indptr, dtypes=(torch.int32,), ndim=1)
    batch = append_indptr.numel() - 1
    if batch < 0:
        raise ValueError("append_indptr: expected at least 1 entry (batch_size + 1), got 0")
    device = append_indptr.device
    validate.tensor("seq_lens", seq_lens, dtypes=(torch.int32,), shape=(batch,), device=device)
    if isinstance(nnz, bool) or not isinstance(nnz, int) or nnz < 0:
        raise ValueError(f"nnz: expected a non-negative int, got {nnz!r}")
    for name, buf in (("batch_indices", batch_indices), ("positions", positions)):
        if buf is not None:
            validate.tensor(name, buf, dtypes=(torch.int32,), shape=(nnz,), device=device)
    token = torch.arange(nnz, dtype=torch.int32, device=device)
    ends = append_indptr[1:]
    # The request of token t: the first whose end lies past t (ends are non-decreasing).
    b = torch.searchsorted(ends, token, right=True, out_int32=True)
    covered = b < batch
    b_safe = torch.clamp(b, max=max(batch - 1, 0))
    if batch > 0:
        covered &= token >= append_indptr[b_safe]
        pos = token + seq_lens[b_safe] - ends[b_safe]
    else:
        pos = torch.zeros_like(token)
    b_out = torch.where(covered, b, torch.full_like(b, -1))
    pos_out = torch.where(covered, pos, positions if positions is not None else torch.zeros_like(pos))
    if batch_indices is None:
        batch_indices = b_out
    else:
        batch_indices.copy_(b_out)
    if positions is None:
        positions = pos_out
    else:
        positions.copy_(pos_out)
    return batch_indices, positions
