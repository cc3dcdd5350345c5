"""Batch decode attention with FlashInfer's names and semantics (FlashInfer's `flashinfer.decode`):
`BatchDecodeWithPagedKVCacheWrapper`, one query token per request over a paged KV cache. It plans and
runs the paged prefill wrapper (prefill.py), whose smallest q tiles hold a few requests' query heads;
see prefill.py for the semantics and the checks.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch

from . import validate
from .batch_attention import no_unsupported
from .prefill import BatchPrefillWithPagedKVCacheWrapper


class BatchDecodeWithPagedKVCacheWrapper:
    """Batch decode (one query token per request) over a paged KV cache.

    Runs the tensor-core attention kernel with the query heads of a KV head packed into one 16-row
    tile whose four warps split each KV tile's keys; plan() splits long KV ranges across CTAs
    (flash-decoding) when the batch cannot fill the GPU, and the last chunk of a tile to finish
    merges the parts by LSE inside the same launch. `use_tensor_cores` is accepted for FlashInfer compatibility: the
    tensor-core path is always used.
    """

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD", use_cuda_graph: bool = False,
                 use_tensor_cores: bool = True, paged_kv_indptr_buffer: Optional[torch.Tensor] = None,
                 paged_kv_indices_buffer: Optional[torch.Tensor] = None,
                 paged_kv_last_page_len_buffer: Optional[torch.Tensor] = None, **unsupported: Any):
        no_unsupported("BatchDecodeWithPagedKVCacheWrapper", unsupported)
        self._inner = BatchPrefillWithPagedKVCacheWrapper(float_workspace_buffer, kv_layout, use_cuda_graph,
                                                          paged_kv_indices_buf=paged_kv_indices_buffer)
        self._qo_indptr = torch.arange(0, 1, dtype=torch.int32)

    @property
    def is_cuda_graph_enabled(self) -> bool:
        return self._inner.is_cuda_graph_enabled

    def plan(self, indptr: torch.Tensor, indices: torch.Tensor, last_page_len: torch.Tensor, num_qo_heads: int,
             num_kv_heads: int, head_dim: int, page_size: int, *, sm_scale: Optional[float] = None,
             q_data_type: Optional[Union[str, torch.dtype]] = None,
             kv_data_type: Optional[Union[str, torch.dtype]] = None, data_type: Optional[Union[str, torch.dtype]] = None,
             fixed_split_size: Optional[int] = None, disable_split_kv: bool = False,
             pos_encoding_mode: str = "NONE", **unsupported: Any) -> None:
        """Plan a decode batch over a page table (int32 indptr [batch + 1], indices, last_page_len [batch])."""
        no_unsupported("plan()", unsupported)
        if pos_encoding_mode != "NONE":
            raise ValueError(f"pos_encoding_mode: only 'NONE' is supported, got {pos_encoding_mode!r}")
        if data_type is not None:  # FlashInfer's older name for the KV dtype
            kv_data_type = data_type if kv_data_type is None else kv_data_type
        # q and KV must share one dtype here; either may be given (default float16).
        q_data_type = q_data_type if q_data_type is not None else (kv_data_type or torch.float16)
        batch = validate.tensor("indptr", indptr, dtypes=(torch.int32,), ndim=1).numel() - 1
        if self._qo_indptr.numel() != batch + 1:
            self._qo_indptr = torch.arange(0, batch + 1, dtype=torch.int32)
        self._inner.plan(self._qo_indptr, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim,
                         page_size, causal=False, sm_scale=sm_scale,
                         q_data_type=q_data_type, kv_data_type=kv_data_type, fixed_split_size=fixed_split_size,
                         disable_split_kv=disable_split_kv)

    begin_forward = plan

    def run(self, q: torch.Tensor, paged_kv_cache: Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]],
            out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None, return_lse: bool = False):
        """q: [batch, Hq, D]. Returns out [batch, Hq, D], or (out, lse) when return_lse is True."""
        return self._inner.run(q, paged_kv_cache, out=out, lse=lse, return_lse=return_lse)

    forward = run
