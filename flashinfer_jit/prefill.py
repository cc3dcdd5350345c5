"""Batch prefill attention with FlashInfer's names and semantics (FlashInfer's `flashinfer.prefill`):
`BatchPrefillWithRaggedKVCacheWrapper`, `BatchPrefillWithPagedKVCacheWrapper` and
`single_prefill_with_kv_cache`. The decode wrapper is in decode.py; the plan/run machinery they share
in batch_attention.py.

Semantics follow FlashInfer: LSE is base 2; causal masks are bottom-right aligned (query i of a
request sees keys j <= kv_len - q_len + i); sm_scale defaults to 1/sqrt(head_dim). A paged request
with n pages holds (n - 1) * page_size + last_page_len tokens.

Stricter than FlashInfer, and documented here:
  - every tensor is checked (dtype, device, shape, strides, 16-byte aligned rows) before launch, and
    run() must be called with exactly the dtypes and sizes given to plan();
  - indptrs must be int32, start at 0 and be non-decreasing; page indices must lie inside the cache
    passed to run(); last_page_len must be in [1, page_size] (0 only for a request with no pages).
    All of this is checked on the host: plan() with CPU tensors never synchronizes the device (CUDA
    tensors cost one copy to the host);
  - rows that see no key (kv_len 0, or causal rows before the diagonal) give O = 0 and LSE = -inf;
  - a float workspace too small for the split-KV partial states is an error that says how large it
    must be, never an overflow.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch

from . import validate
from .abi import PrefillParams
from .batch_attention import _BatchAttention, _PlanState, check_dtypes, check_heads, index_tensor, no_unsupported
from .planner import paged_kv_lengths


class BatchPrefillWithRaggedKVCacheWrapper(_BatchAttention):
    """Batch prefill attention over ragged K/V (all requests packed along the token axis).

    Args:
        float_workspace_buffer: uint8 CUDA tensor for split-KV partial states. 128 MB covers large
            batches; plan() says how many bytes a plan needs when it is short.
        kv_layout: "NHD" (k, v: [total_kv, Hkv, D]) or "HND" (k, v: [Hkv, total_kv, D]).
        use_cuda_graph: make run() capturable: grids, metadata buffers and the q tile size are
            fixed by the first plan() (plan the shape the graph will replay: a decode-like first
            plan picks 16-row tiles, correct but slow for long prompts later); later plans may
            change lengths as long as the batch size and the total q tokens do not exceed the
            first plan's. q/k/v/out may then be larger than the planned totals
            (rows past the plan are ignored and not written). The captured kernels read the plan
            metadata from this wrapper's buffers: keep the wrapper alive as long as the graph may
            be replayed.
    """

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD", use_cuda_graph: bool = False,
                 **unsupported: Any):
        no_unsupported("BatchPrefillWithRaggedKVCacheWrapper", unsupported)
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph)

    def plan(self, qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, num_qo_heads: int, num_kv_heads: int,
             head_dim: int, *, causal: bool = False, sm_scale: Optional[float] = None,
             q_data_type: Union[str, torch.dtype] = torch.float16,
             kv_data_type: Optional[Union[str, torch.dtype]] = None, head_dim_vo: Optional[int] = None,
             fixed_split_size: Optional[int] = None, disable_split_kv: bool = False, **unsupported: Any) -> None:
        """Plan a batch. qo_indptr, kv_indptr: int32 [batch + 1], on the CPU (no device sync) or CUDA.

        fixed_split_size (KV tokens per chunk, a multiple of the KV tile) and disable_split_kv make the
        split decision independent of the batch (batch-invariant results). Options after head_dim are
        keyword-only (FlashInfer deprecates passing them by position, and its positions differ)."""
        no_unsupported("plan()", unsupported)
        check_heads(num_qo_heads, num_kv_heads, head_dim, head_dim_vo)
        qo = index_tensor("qo_indptr", qo_indptr, 1)
        kv = index_tensor("kv_indptr", kv_indptr, 1)
        if qo.numel() != kv.numel():
            raise ValueError(f"kv_indptr: expected {qo.numel()} entries like qo_indptr (batch_size + 1), got {kv.numel()}")
        self._plan("ragged", qo, kv, num_qo_heads, num_kv_heads, head_dim, causal, sm_scale, q_data_type,
                   kv_data_type, fixed_split_size, disable_split_kv)

    begin_forward = plan

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: Optional[torch.Tensor] = None,
            lse: Optional[torch.Tensor] = None, return_lse: bool = False):
        """Attention for the planned batch. Returns out, or (out, lse) when return_lse is True."""
        s, out, lse = self._prepare_q_out(q, out, lse, return_lse)
        rows = None if self._use_cuda_graph else s.total_kv
        shape = (rows, s.num_kv_heads, s.head_dim) if self._kv_layout == "NHD" else (s.num_kv_heads, rows, s.head_dim)
        for name, t in (("k", k), ("v", v)):
            validate.tensor(name, t, dtypes=(s.dtype,), shape=shape, device=self._device)
            validate.vector_rows(name, t)
        kv_rows = k.shape[0] if self._kv_layout == "NHD" else k.shape[1]
        if kv_rows < s.total_kv:
            raise ValueError(f"k: expected at least {s.total_kv} tokens (the planned total), got {kv_rows}")
        self._launch(s, q, k, v, out, lse)
        return (out, lse) if return_lse else out

    forward = run

    def run_return_lse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any):
        return self.run(q, k, v, return_lse=True, **kw)

    def _set_kv(self, p: PrefillParams, k: torch.Tensor, v: torch.Tensor) -> None:
        p.k, p.v = k.data_ptr(), v.data_ptr()
        nhd = self._kv_layout == "NHD"
        p.k_stride_n, p.k_stride_h = (k.stride(0), k.stride(1)) if nhd else (k.stride(1), k.stride(0))
        p.v_stride_n, p.v_stride_h = (v.stride(0), v.stride(1)) if nhd else (v.stride(1), v.stride(0))


class BatchPrefillWithPagedKVCacheWrapper(_BatchAttention):
    """Batch prefill attention over a paged KV cache.

    The cache passed to run() is one tensor [num_pages, 2, page_size, Hkv, D] (NHD) or
    [num_pages, 2, Hkv, page_size, D] (HND) holding K at [:, 0] and V at [:, 1], or a (k, v) tuple of
    [num_pages, page_size, Hkv, D] / [num_pages, Hkv, page_size, D] tensors with equal strides.
    """

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD", use_cuda_graph: bool = False,
                 qo_indptr_buf: Optional[torch.Tensor] = None, paged_kv_indptr_buf: Optional[torch.Tensor] = None,
                 paged_kv_indices_buf: Optional[torch.Tensor] = None,
                 paged_kv_last_page_len_buf: Optional[torch.Tensor] = None, **unsupported: Any):
        """With use_cuda_graph=True, paged_kv_indices_buf's length sets the page-table room of later
        plans (FlashInfer's argument; the metadata is kept in the wrapper's own buffers, so the other
        *_buf arguments are accepted and only their lengths matter)."""
        no_unsupported("BatchPrefillWithPagedKVCacheWrapper", unsupported)
        room = paged_kv_indices_buf.numel() if isinstance(paged_kv_indices_buf, torch.Tensor) else 0
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph, max_num_pages=room)

    def plan(self, qo_indptr: torch.Tensor, paged_kv_indptr: torch.Tensor, paged_kv_indices: torch.Tensor,
             paged_kv_last_page_len: torch.Tensor, num_qo_heads: int, num_kv_heads: int, head_dim: int,
             page_size: int, *, causal: bool = False, sm_scale: Optional[float] = None,
             q_data_type: Union[str, torch.dtype] = torch.float16,
             kv_data_type: Optional[Union[str, torch.dtype]] = None, head_dim_vo: Optional[int] = None,
             fixed_split_size: Optional[int] = None, disable_split_kv: bool = False, **unsupported: Any) -> None:
        """Plan a batch over a page table (CSR: indptr [batch + 1], indices, last_page_len [batch]).
        All int32; CPU tensors avoid any device sync."""
        no_unsupported("plan()", unsupported)
        check_heads(num_qo_heads, num_kv_heads, head_dim, head_dim_vo)
        if not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size: expected a positive int, got {page_size!r}")
        qo = index_tensor("qo_indptr", qo_indptr, 1)
        batch = qo.numel() - 1
        indptr = index_tensor("paged_kv_indptr", paged_kv_indptr, 1)
        if indptr.numel() != batch + 1:
            raise ValueError(f"paged_kv_indptr: expected {batch + 1} entries (batch_size + 1), got {indptr.numel()}")
        indices = index_tensor("paged_kv_indices", paged_kv_indices)
        last = index_tensor("paged_kv_last_page_len", paged_kv_last_page_len)
        if last.numel() != batch:
            raise ValueError(f"paged_kv_last_page_len: expected {batch} entries (batch_size), got {last.numel()}")
        q_dtype = check_dtypes(q_data_type, kv_data_type)  # before the kernel library is loaded
        kernel = self._kernel("paged", head_dim, q_dtype, causal)  # NHD and HND: one kernel, other strides
        kv_lens, max_page = paged_kv_lengths(kernel.kernel, indptr, last, indices, page_size, batch)
        self._plan("paged", qo, kv_lens, num_qo_heads, num_kv_heads, head_dim, causal, sm_scale, q_data_type,
                   kv_data_type, fixed_split_size, disable_split_kv, pages=(indptr, indices, page_size, max_page))

    begin_forward = plan

    def run(self, q: torch.Tensor, paged_kv_cache: Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]],
            out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None, return_lse: bool = False):
        """Attention for the planned batch. Returns out, or (out, lse) when return_lse is True."""
        s, out, lse = self._prepare_q_out(q, out, lse, return_lse)
        k, v = self._split_cache(s, paged_kv_cache)
        self._launch(s, q, k, v, out, lse)
        return (out, lse) if return_lse else out

    forward = run

    def _split_cache(self, s: _PlanState, cache: Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]):
        nhd = self._kv_layout == "NHD"
        page_shape = (s.page_size, s.num_kv_heads, s.head_dim) if nhd else (s.num_kv_heads, s.page_size, s.head_dim)
        if isinstance(cache, torch.Tensor):
            validate.cuda_tensor("paged_kv_cache", cache, dtypes=(s.dtype,), shape=(None, 2, *page_shape),
                                 device=self._device)
            k = v = cache  # one 5-D tensor: _set_kv offsets V by stride(1), no slicing per run
        elif isinstance(cache, (tuple, list)) and len(cache) == 2:
            k = validate.cuda_tensor("paged_kv_cache[0] (k)", cache[0], dtypes=(s.dtype,), shape=(None, *page_shape),
                                     device=self._device)
            v = validate.tensor("paged_kv_cache[1] (v)", cache[1], dtypes=(s.dtype,), shape=tuple(k.shape),
                                device=self._device)
            if k.stride() != v.stride():
                raise ValueError(f"paged_kv_cache: k and v must have equal strides, got {k.stride()} and {v.stride()}")
        else:
            raise TypeError(f"paged_kv_cache: expected a tensor or a (k, v) tuple, got {type(cache).__name__}")
        validate.vector_rows("paged_kv_cache", k)
        if v is not k:
            validate.vector_rows("paged_kv_cache (v)", v)
        if s.max_page_index >= k.shape[0]:
            raise ValueError(f"paged_kv_indices: page index {s.max_page_index} is outside the cache "
                             f"({k.shape[0]} pages)")
        return k, v

    def _set_kv(self, p: PrefillParams, k: torch.Tensor, v: torch.Tensor) -> None:
        # k/v: [pages, (tokens, heads | heads, tokens), D] each, or both the 5-D cache [pages, 2, ...].
        token_dim, head_dim = (1, 2) if self._kv_layout == "NHD" else (2, 1)
        p.k, p.stride_page = k.data_ptr(), k.stride(0)
        if k.dim() == 5:
            p.v = p.k + k.stride(1) * k.element_size()
            token_dim, head_dim = token_dim + 1, head_dim + 1
        else:
            p.v = v.data_ptr()
        p.k_stride_n, p.k_stride_h = k.stride(token_dim), k.stride(head_dim)
        p.v_stride_n, p.v_stride_h = p.k_stride_n, p.k_stride_h


_single_workspaces: dict[torch.device, torch.Tensor] = {}


def single_prefill_with_kv_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                                 sm_scale: Optional[float] = None, kv_layout: str = "NHD",
                                 return_lse: bool = False, **unsupported: Any):
    """Attention for one request: q [q_len, Hq, D]; k, v [kv_len, Hkv, D] (NHD) or [Hkv, kv_len, D] (HND)."""
    no_unsupported("single_prefill_with_kv_cache", unsupported)
    q = validate.cuda_tensor("q", q, dtypes=validate.ATTENTION_DTYPES, ndim=3)
    validate.tensor("k", k, ndim=3)
    if kv_layout not in ("NHD", "HND"):
        raise ValueError(f"kv_layout: expected 'NHD' or 'HND', got {kv_layout!r}")
    kv_len, num_kv_heads = (k.shape[0], k.shape[1]) if kv_layout == "NHD" else (k.shape[1], k.shape[0])
    workspace = _single_workspaces.get(q.device)
    if workspace is None:
        workspace = torch.empty(32 << 20, dtype=torch.uint8, device=q.device)
        _single_workspaces[q.device] = workspace
    wrapper = BatchPrefillWithRaggedKVCacheWrapper(workspace, kv_layout)
    wrapper.plan(torch.tensor([0, q.shape[0]], dtype=torch.int32), torch.tensor([0, kv_len], dtype=torch.int32),
                 q.shape[1], num_kv_heads, q.shape[2], causal=causal, sm_scale=sm_scale, q_data_type=q.dtype)
    return wrapper.run(q, k, v, return_lse=return_lse)
