"""FlashInfer's `flashinfer.attention.BatchAttention`: one plan and one launch for a mixed batch of
prefill and decode requests over a paged KV cache.

FlashInfer's BatchAttention runs a persistent kernel that schedules prefill-like and decode-like work
together. Here the same batch is one plan of the paged prefill wrapper (prefill.py), whose planner
already mixes both: each request gets q tiles sized for the batch, long KV ranges are split across
CTAs and merged in the same launch, and a decode request is just a request with one query token. So
run() is one kernel launch for the whole batch, whatever its mix.

The differences from FlashInfer's BatchAttention: plan() takes each request's KV length in tokens
(`kv_len_arr`, as FlashInfer does) and checks it against the page table; head_dim_qk must equal
head_dim_vo; logits soft-capping, fp8 / NVFP4 KV (and their k_scale / v_scale) and the profiler
raise NotSupportedError.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import options
from .decode import host_int32, resolve_dtypes
from .errors import NotSupportedError, describe
from .prefill import BatchPrefillWithPagedKVCacheWrapper

_KVCache = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]

# FlashInfer's BatchAttention owns a 384 MB float workspace; split-KV partial states of most batches
# fit in far less (plan() says how much a plan needs when it does not fit).
_WORKSPACE_BYTES = 256 << 20


def last_page_lens(kv_indptr: torch.Tensor, kv_len_arr: torch.Tensor, page_size: int) -> torch.Tensor:
    """Host int32 last_page_len [batch] of requests with KV lengths kv_len_arr over the pages of
    kv_indptr (0 for a request without pages, whose length must be 0). Raises ValueError naming the
    first request whose length does not fit its pages."""
    pages = kv_indptr[1:] - kv_indptr[:-1]
    last = kv_len_arr - (pages - 1) * page_size
    fits = torch.where(pages > 0, (last >= 1) & (last <= page_size), kv_len_arr == 0)
    if not bool(fits.all()):
        i = int(torch.nonzero(~fits)[0, 0])
        n = int(pages[i])
        expected = f"{(n - 1) * page_size + 1}..{n * page_size}" if n > 0 else "0"
        raise ValueError(f"kv_len_arr[{i}] = {int(kv_len_arr[i])} does not fit request {i}'s {n} pages of {page_size} "
                         f"tokens (expected {expected})")
    return torch.where(pages > 0, last, torch.zeros_like(last)).to(torch.int32)


class BatchAttention:
    """Mixed prefill + decode batch attention over a paged KV cache (FlashInfer's BatchAttention).

    __init__(kv_layout="NHD", device="cuda") allocates the workspace on `device`.
    plan(qo_indptr, kv_indptr, kv_indices, kv_len_arr, num_qo_heads, num_kv_heads, head_dim_qk,
    head_dim_vo, page_size, causal=False, sm_scale=None, logits_soft_cap=None, q_data_type=torch.bfloat16,
    kv_data_type=torch.bfloat16, use_profiler=False), then run(q, kv_cache) -> (out, lse), LSE base 2.
    """

    def __init__(self, kv_layout: str = "NHD", device: Union[str, torch.device] = "cuda") -> None:
        if kv_layout not in ("NHD", "HND"):
            raise ValueError(f"kv_layout: expected 'NHD' or 'HND', got {kv_layout!r}")
        self._kv_layout = kv_layout
        self.float_workspace_buffer = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=torch.device(device))
        self._wrapper = BatchPrefillWithPagedKVCacheWrapper(self.float_workspace_buffer, kv_layout)
        self._logits_soft_cap = 0.0
        self._sm_scale: Optional[float] = None
        self._planned = False

    def plan(self, qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
             kv_len_arr: torch.Tensor, num_qo_heads: int, num_kv_heads: int, head_dim_qk: int, head_dim_vo: int,
             page_size: int, causal: bool = False, sm_scale: Optional[float] = None,
             logits_soft_cap: Optional[float] = None, q_data_type: torch.dtype = torch.bfloat16,
             kv_data_type: torch.dtype = torch.bfloat16, use_profiler: bool = False) -> None:
        """Plan the batch: qo_indptr [batch + 1] (query tokens per request: 1 for a decode request),
        kv_indptr [batch + 1] / kv_indices (the page table), kv_len_arr [batch] (KV tokens per request).
        All int32; CPU tensors need no device sync (CUDA tensors cost one copy each)."""
        where = "BatchAttention.plan()"
        options.logits_soft_cap(where, logits_soft_cap)
        options.flag_off(where, "use_profiler", use_profiler, "the profiler build is not part of flashinfer-jit")
        if head_dim_vo != head_dim_qk:
            raise NotSupportedError("head_dim_vo", head_dim_vo, f"{head_dim_qk} (equal q/k and v head dims)", where)
        q_dtype, kv_dtype = resolve_dtypes(where, q_data_type, kv_data_type)
        options.no_fp8_kv(where, kv_dtype, kv_data_type)
        if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size < 1:
            raise ValueError(f"page_size: expected a positive int, got {page_size!r}")
        indptr_h = host_int32("kv_indptr", kv_indptr)
        kv_lens = host_int32("kv_len_arr", kv_len_arr)
        if kv_lens.numel() != indptr_h.numel() - 1:
            raise ValueError(f"kv_len_arr: expected {max(indptr_h.numel() - 1, 0)} entries (len(kv_indptr) - 1), "
                             f"got {kv_lens.numel()}")
        last = last_page_lens(indptr_h, kv_lens, page_size)
        self._wrapper.plan(qo_indptr, indptr_h, kv_indices, last, num_qo_heads, num_kv_heads, head_dim_qk, page_size,
                           causal=bool(causal), sm_scale=sm_scale, q_data_type=q_dtype, kv_data_type=kv_dtype)
        self._sm_scale, self._logits_soft_cap, self._planned = sm_scale, 0.0, True
        self._num_qo_heads, self._num_kv_heads, self._page_size = num_qo_heads, num_kv_heads, page_size

    def run(self, q: torch.Tensor, kv_cache: _KVCache, out: Optional[torch.Tensor] = None,
            lse: Optional[torch.Tensor] = None, k_scale: Optional[torch.Tensor] = None,
            v_scale: Optional[torch.Tensor] = None, logits_soft_cap: float = 0.0,
            profiler_buffer: Optional[torch.Tensor] = None, kv_cache_sf: Optional[_KVCache] = None):
        """Attention for the planned batch: q [total query tokens, Hq, D]; kv_cache one 5-D tensor
        [pages, 2, ...] or a (k, v) tuple. Returns (out, lse) (as FlashInfer's BatchAttention does)."""
        if (k_scale is not None or v_scale is not None or logits_soft_cap or profiler_buffer is not None
                or kv_cache_sf is not None):
            self._check_run_options(k_scale, v_scale, logits_soft_cap, profiler_buffer, kv_cache_sf)
        return self._wrapper.run(q, kv_cache, out=out, lse=lse, return_lse=True)

    def prewarm_paged_kv_stride_variant(self, variant: str = "independent") -> None:
        """Nothing to prewarm: one kernel takes every K/V stride layout (see BatchDecodeWithPagedKVCacheWrapper)."""
        if not self._planned:
            raise RuntimeError("plan() must complete before prewarming a paged-KV-stride variant.")
        if variant != "independent":
            raise ValueError(f"variant: expected 'independent', got {variant!r}")

    def _check_run_options(self, k_scale: object, v_scale: object, logits_soft_cap: object,
                           profiler_buffer: object, kv_cache_sf: object) -> None:
        where = "BatchAttention.run()"
        options.scale(where, "k_scale", k_scale)
        options.scale(where, "v_scale", v_scale)
        options.logits_soft_cap(where, logits_soft_cap)
        if profiler_buffer is not None:
            raise NotSupportedError("profiler_buffer", describe(profiler_buffer),
                                    "None (the profiler build is not part of flashinfer-jit)", where)
        options.no_tensor(where, "kv_cache_sf", kv_cache_sf, "NVFP4 KV caches")


__all__ = ["BatchAttention"]
