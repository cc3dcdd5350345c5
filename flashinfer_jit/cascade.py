"""Merging attention states and cascade attention (FlashInfer's `flashinfer.cascade`): merge_state,
merge_state_in_place, merge_states, MultiLevelCascadeAttentionWrapper and the deprecated two-level
BatchDecodeWithSharedPrefixPagedKVCacheWrapper / BatchPrefillWithSharedPrefixPagedKVCacheWrapper, with
FlashInfer 0.7.2's parameters at its positions (off values pass; missing features raise
NotSupportedError, see prefill.py).

LSE values are base 2, as in FlashInfer: s = log2(sum_j exp2(x_j)) where x_j are the logits already
scaled by sm_scale * log2(e). An LSE of -inf marks an empty state (attention over no keys); merging
only empty states yields v = 0 and s = -inf, never NaN.

Stricter than FlashInfer: every argument is checked (dtype, device, shape, alignment) before launch.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import loader, options, validate
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


# ---- cascade wrappers (FlashInfer's flashinfer.cascade classes) -----------------------------------

_KVCache = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


def _level_list(name: str, value: object, levels: int) -> list:
    if not isinstance(value, (list, tuple)) or len(value) != levels:
        got = f"{type(value).__name__} of {len(value)}" if isinstance(value, (list, tuple)) else type(value).__name__
        raise ValueError(f"{name}: expected a list of {levels} tensors (one per level), got {got}")
    return list(value)


class MultiLevelCascadeAttentionWrapper:
    """Cascade attention over a paged KV cache shared by levels (FlashInfer's wrapper of the same name):
    level i is a batch whose requests are runs of queries (qo_indptr_arr[i]) attending to a page list
    (paged_kv_*_arr[i]); a query's attention over all levels is the LSE merge of its per-level states.
    Typically level 0 holds the shared prefix (one request holding every query), the last level each
    request's own pages. Only the last level is causal (as in FlashInfer).

    Each level plans and runs one BatchPrefillWithPagedKVCacheWrapper (one kernel launch per level, all
    requests of a level in one launch), then the levels are merged in place with merge_state_in_place.
    The levels share the float workspace (they run one after the other on the stream)."""

    def __init__(self, num_levels: int, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD",
                 use_cuda_graph: bool = False, qo_indptr_buf_arr: Optional[list[torch.Tensor]] = None,
                 paged_kv_indptr_buf_arr: Optional[list[torch.Tensor]] = None,
                 paged_kv_indices_buf_arr: Optional[list[torch.Tensor]] = None,
                 paged_kv_last_page_len_buf_arr: Optional[list[torch.Tensor]] = None) -> None:
        from .prefill import BatchPrefillWithPagedKVCacheWrapper

        if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 1:
            raise ValueError(f"num_levels: expected a positive int, got {num_levels!r}")
        buffers = []
        for name, arr in (("qo_indptr_buf_arr", qo_indptr_buf_arr), ("paged_kv_indptr_buf_arr", paged_kv_indptr_buf_arr),
                          ("paged_kv_indices_buf_arr", paged_kv_indices_buf_arr),
                          ("paged_kv_last_page_len_buf_arr", paged_kv_last_page_len_buf_arr)):
            buffers.append(_level_list(name, arr, num_levels) if arr is not None else [None] * num_levels)
        self._batch_prefill_wrappers = [
            BatchPrefillWithPagedKVCacheWrapper(float_workspace_buffer, kv_layout, use_cuda_graph,
                                                qo_indptr_buf=qo_buf, paged_kv_indptr_buf=indptr_buf,
                                                paged_kv_indices_buf=indices_buf,
                                                paged_kv_last_page_len_buf=last_buf)
            for qo_buf, indptr_buf, indices_buf, last_buf in zip(*buffers)
        ]
        self._num_levels = num_levels
        self._kv_layout = kv_layout
        self._use_cuda_graph = bool(use_cuda_graph)

    @property
    def is_cuda_graph_enabled(self) -> bool:
        return self._use_cuda_graph

    def reset_workspace_buffer(self, float_workspace_buffer: torch.Tensor,
                               int_workspace_buffers: Optional[list[torch.Tensor]]) -> None:
        """A new float workspace for every level (from the next plan() on); int_workspace_buffers is
        accepted for FlashInfer compatibility (each level keeps its own metadata buffer)."""
        ints = (_level_list("int_workspace_buffers", int_workspace_buffers, self._num_levels)
                if int_workspace_buffers is not None else [None] * self._num_levels)
        for wrapper, int_buf in zip(self._batch_prefill_wrappers, ints):
            wrapper.reset_workspace_buffer(float_workspace_buffer, int_buf)

    def plan(self, qo_indptr_arr: list[torch.Tensor], paged_kv_indptr_arr: list[torch.Tensor],
             paged_kv_indices_arr: list[torch.Tensor], paged_kv_last_page_len: list[torch.Tensor], num_qo_heads: int,
             num_kv_heads: int, head_dim: int, page_size: int, causal: bool = False, pos_encoding_mode: str = "NONE",
             use_fp16_qk_reduction: bool = False, sm_scale: Optional[float] = None, window_left: int = -1,
             logits_soft_cap: Optional[float] = None, rope_scale: Optional[float] = None,
             rope_theta: Optional[float] = None, q_data_type: Union[str, torch.dtype] = "float16",
             kv_data_type: Optional[Union[str, torch.dtype]] = None) -> None:
        """Plan every level (FlashInfer's parameters and positions). Per level: qo_indptr [batch_l + 1]
        over the same queries, and a page table (indptr, indices, last_page_len) into the one cache passed
        to run(). int32; CPU tensors need no device sync. A request without pages is empty at its level.
        rope_scale / rope_theta only matter with RoPE (not implemented); the other options must mean off."""
        from .decode import empty_requests_have_no_tokens, host_int32, resolve_dtypes

        where = "MultiLevelCascadeAttentionWrapper.plan()"
        options.pos_encoding_mode(where, pos_encoding_mode)
        options.flag_off(where, "use_fp16_qk_reduction", use_fp16_qk_reduction,
                         "fp16 QK reduction is not implemented; the fp32 reduction is always used")
        options.window_left(where, window_left)
        options.logits_soft_cap(where, logits_soft_cap)
        q_dtype, kv_dtype = resolve_dtypes(where, q_data_type, kv_data_type)
        options.no_fp8_kv(where, kv_dtype, kv_data_type)
        levels = self._num_levels
        qo_arr = _level_list("qo_indptr_arr", qo_indptr_arr, levels)
        indptr_arr = _level_list("paged_kv_indptr_arr", paged_kv_indptr_arr, levels)
        indices_arr = _level_list("paged_kv_indices_arr", paged_kv_indices_arr, levels)
        last_arr = _level_list("paged_kv_last_page_len", paged_kv_last_page_len, levels)
        for i, (wrapper, qo, indptr, indices, last) in enumerate(
                zip(self._batch_prefill_wrappers, qo_arr, indptr_arr, indices_arr, last_arr)):
            indptr_h = host_int32(f"paged_kv_indptr_arr[{i}]", indptr)
            last_h = empty_requests_have_no_tokens(indptr_h, host_int32(f"paged_kv_last_page_len[{i}]", last))
            wrapper.plan(qo, indptr_h, indices, last_h, num_qo_heads, num_kv_heads, head_dim, page_size,
                         causal=bool(causal) if i == levels - 1 else False, sm_scale=sm_scale,
                         q_data_type=q_dtype, kv_data_type=kv_dtype)

    begin_forward = plan

    def prewarm_paged_kv_stride_variant(self, variant: str = "independent") -> None:
        """FlashInfer compiles a kernel variant for K and V with different strides lazily; here one kernel
        handles both, so there is nothing to prewarm."""
        if variant != "independent":
            raise ValueError(f"variant: expected 'independent', got {variant!r}")

    def run(self, q: torch.Tensor, paged_kv_cache: _KVCache) -> torch.Tensor:
        """q: [total queries, Hq, D] (the queries every level's qo_indptr counts). Returns out."""
        wrappers = self._batch_prefill_wrappers
        out, lse = wrappers[-1].run(q, paged_kv_cache, return_lse=True)
        for wrapper in wrappers[:-1]:
            out_i, lse_i = wrapper.run(q, paged_kv_cache, return_lse=True)
            merge_state_in_place(out, lse, out_i, lse_i)
        return out

    forward = run


class BatchDecodeWithSharedPrefixPagedKVCacheWrapper:
    """Decode with a shared prefix held in its own K/V tensors plus each request's pages (FlashInfer's
    deprecated two-level wrapper; MultiLevelCascadeAttentionWrapper is the general form)."""

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD") -> None:
        from .decode import BatchDecodeWithPagedKVCacheWrapper

        self._batch_decode_wrapper = BatchDecodeWithPagedKVCacheWrapper(float_workspace_buffer, kv_layout)
        self._kv_layout = kv_layout

    def reset_workspace_buffer(self, float_workspace_buffer: torch.Tensor,
                               int_workspace_buffer: Optional[torch.Tensor]) -> None:
        self._batch_decode_wrapper.reset_workspace_buffer(float_workspace_buffer, int_workspace_buffer)

    def begin_forward(self, unique_kv_indptr: torch.Tensor, unique_kv_indices: torch.Tensor,
                      unique_kv_last_page_len: torch.Tensor, num_qo_heads: int, num_kv_heads: int, head_dim: int,
                      page_size: int, data_type: Union[str, torch.dtype] = "float16") -> None:
        """Plan the unique (per-request) part; the shared prefix is given to forward()."""
        self._batch_decode_wrapper.plan(unique_kv_indptr, unique_kv_indices, unique_kv_last_page_len, num_qo_heads,
                                        num_kv_heads, head_dim, page_size, pos_encoding_mode="NONE",
                                        data_type=data_type)

    def forward(self, q: torch.Tensor, k_shared: torch.Tensor, v_shared: torch.Tensor,
                unique_kv_cache: _KVCache) -> torch.Tensor:
        """q [batch, Hq, D]; k_shared, v_shared [prefix_len, Hkv, D] (NHD) or [Hkv, prefix_len, D] (HND)."""
        from .prefill import single_prefill_with_kv_cache

        decode = self._batch_decode_wrapper
        v_shared_out, s_shared = single_prefill_with_kv_cache(q, k_shared, v_shared, causal=False,
                                                              sm_scale=decode._sm_scale, kv_layout=self._kv_layout,
                                                              return_lse=True)
        v_unique, s_unique = decode.run(q, unique_kv_cache, return_lse=True)
        merge_state_in_place(v_shared_out, s_shared, v_unique, s_unique)
        return v_shared_out


class BatchPrefillWithSharedPrefixPagedKVCacheWrapper:
    """Prefill / append with a shared prefix held in its own K/V tensors plus each request's pages
    (FlashInfer's deprecated two-level wrapper; MultiLevelCascadeAttentionWrapper is the general form).
    forward()'s causal and sm_scale apply to the unique part: a change of either re-plans it."""

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD") -> None:
        from .prefill import BatchPrefillWithPagedKVCacheWrapper

        self._batch_prefill_wrapper = BatchPrefillWithPagedKVCacheWrapper(float_workspace_buffer, kv_layout)
        self._kv_layout = kv_layout
        self._plan_args: Optional[tuple] = None
        self._planned: Optional[tuple[bool, Optional[float], torch.dtype]] = None

    def reset_workspace_buffer(self, float_workspace_buffer: torch.Tensor,
                               int_workspace_buffer: Optional[torch.Tensor]) -> None:
        self._batch_prefill_wrapper.reset_workspace_buffer(float_workspace_buffer, int_workspace_buffer)

    def begin_forward(self, qo_indptr: torch.Tensor, paged_kv_indptr: torch.Tensor, paged_kv_indices: torch.Tensor,
                      paged_kv_last_page_len: torch.Tensor, num_qo_heads: int, num_kv_heads: int, head_dim: int,
                      page_size: int) -> None:
        """Record the unique part's page table (host copies); the plan is made by forward(), which knows
        causal, sm_scale and the query dtype."""
        from .decode import host_int32

        self._plan_args = (host_int32("qo_indptr", qo_indptr), host_int32("paged_kv_indptr", paged_kv_indptr),
                           host_int32("paged_kv_indices", paged_kv_indices),
                           host_int32("paged_kv_last_page_len", paged_kv_last_page_len),
                           num_qo_heads, num_kv_heads, head_dim, page_size)
        self._planned = None

    def prewarm_paged_kv_stride_variant(self, variant: str = "independent") -> None:
        if variant != "independent":
            raise ValueError(f"variant: expected 'independent', got {variant!r}")

    def forward(self, q: torch.Tensor, k_shared: torch.Tensor, v_shared: torch.Tensor, unique_kv_cache: _KVCache,
                causal: bool = False, use_fp16_qk_reduction: bool = False, sm_scale: Optional[float] = None,
                rope_scale: Optional[float] = None, rope_theta: Optional[float] = None) -> torch.Tensor:
        """q [qo_indptr[-1], Hq, D]; k_shared, v_shared [prefix_len, Hkv, D] (NHD) or [Hkv, prefix_len, D]."""
        from .prefill import single_prefill_with_kv_cache

        where = "BatchPrefillWithSharedPrefixPagedKVCacheWrapper.forward()"
        options.flag_off(where, "use_fp16_qk_reduction", use_fp16_qk_reduction,
                         "fp16 QK reduction is not implemented; the fp32 reduction is always used")
        if self._plan_args is None:
            raise RuntimeError(f"{where} called before begin_forward()")
        key = (bool(causal), sm_scale, getattr(q, "dtype", None))
        if self._planned != key:
            self._batch_prefill_wrapper.plan(*self._plan_args, causal=bool(causal), sm_scale=sm_scale,
                                             q_data_type=key[2])
            self._planned = key
        v_shared_out, s_shared = single_prefill_with_kv_cache(q, k_shared, v_shared, causal=False, sm_scale=sm_scale,
                                                              kv_layout=self._kv_layout, return_lse=True)
        v_unique, s_unique = self._batch_prefill_wrapper.run(q, unique_kv_cache, return_lse=True)
        merge_state_in_place(v_shared_out, s_shared, v_unique, s_unique)
        return v_shared_out
