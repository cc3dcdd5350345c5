"""Batch prefill attention with FlashInfer's names and semantics (FlashInfer's `flashinfer.prefill`):
`BatchPrefillWithRaggedKVCacheWrapper`, `BatchPrefillWithPagedKVCacheWrapper`,
`single_prefill_with_kv_cache` and `single_prefill_with_kv_cache_return_lse`. The decode wrapper is in
decode.py; the plan/run machinery they share in batch_attention.py.

Every callable takes FlashInfer 0.7.2's parameters, by FlashInfer's names and at FlashInfer's positions
(tests/flashinfer_signatures.py holds them; tests/test_flashinfer_api.py checks them). A value that means
"feature off" (window_left=-1, logits_soft_cap=0.0 or None, scales of 1.0,
use_fp16_qk_reduction=False, no custom mask, backend="auto" / "fa2", ...) works; a value asking for a
feature flashinfer-jit does not have raises `NotSupportedError` (a ValueError) naming the parameter, the
value and what is supported, before any kernel launch. Options that only affect performance or other
backends (non_blocking, enable_pdl, max_token_per_sequence, ...) are accepted.

Semantics follow FlashInfer: LSE is base 2 (lse_base="ln" gives natural log); causal masks are
bottom-right aligned (query i of a request sees keys j <= kv_len - q_len + i); sm_scale defaults to
1/sqrt(head_dim). A paged request with n pages holds (n - 1) * page_size + last_page_len tokens.

Attention variants on plan() (both wrappers and the decode wrapper; each its own compiled kernel,
built on first use, `flashinfer-jit prebuild --sliding-window true --soft-cap true` for images):
  - window_left=k >= 0, a sliding window: query i (position p = kv_len - q_len + i) sees keys
    j >= p - k (and j <= p when causal: k + 1 keys). KV tiles outside every row's window are skipped.
  - logits_soft_cap=c > 0: scores c * tanh(sm_scale * q.k / c) (Gemma 2), LSE over those scores.
  - custom_mask (bool, each request's [q_len, kv_len] mask flattened and concatenated) or
    packed_custom_mask (FlashInfer's segment_packbits bytes): keys a query's bit refuses are hidden;
    stricter than FlashInfer: with causal=False only (FlashInfer ignores causal=True then), not both
    at once, sizes checked, not on use_cuda_graph wrappers (masks.py).
  - pos_encoding_mode="ROPE_LLAMA" (fused rotary embedding, FlashInfer's semantics): q and k rotate inside
    the kernel in float32, rotate-half pairs (i, i + D/2) by angle position * rope_theta^(-2i / D) /
    rope_scale (defaults 1e4 and 1); a query's position is kv_len - q_len + i, a key's its index in the
    request's KV; K stays unrotated in memory. It runs on the fa2 kernel (backend="auto" picks it,
    wrapper.backend says so; an explicit "fa3"/"sm90" raises NotSupportedError). The frequencies are a
    table computed in float64 (FlashInfer's fast-math powf is ~1e-6 off: 0.03 rad at position 32k).
  - pos_encoding_mode="ALIBI": score sm_scale * q.k + slope(h) * (j - p), FlashInfer's slopes for the
    number of query heads; the bias is 0 at the query's own position p and LSE is over those scores (a
    bias measured from another origin shifts a row by a constant: same output, LSE shifted).
  Stricter than FlashInfer: window_left below -1, a negative, NaN or infinite cap, an unknown
  pos_encoding_mode, rope_scale / rope_theta <= 0 and ALiBi with a soft-cap raise ValueError (FlashInfer
  reads any negative as off); forward() and run(window_left=...) cannot change the plan's variant.

Stricter than FlashInfer, and documented here:
  - every tensor is checked (dtype, device, shape, strides, 16-byte aligned rows) before launch, and
    run() must be called with exactly the dtypes and sizes given to plan();
  - indptrs must be int32, start at 0 and be non-decreasing; page indices must lie inside the cache
    passed to run(); last_page_len must be in [1, page_size] for a request with pages (a request
    without pages is empty whatever its entry, as in FlashInfer).
    All of this is checked on the host: plan() with CPU tensors never synchronizes the device (CUDA
    tensors cost one copy to the host);
  - rows that see no key (kv_len 0, or causal rows before the diagonal) give O = 0 and LSE = -inf;
  - a float workspace too small for the split-KV partial states is an error that says how large it
    must be, never an overflow;
  - fixed_split_size counts KV tokens (a multiple of the kernel's KV tile) on both wrappers; FlashInfer
    counts pages on the paged one. Either way the split is independent of the batch (batch-invariant
    results); only where the chunks fall differs.
"""
from __future__ import annotations

import concurrent.futures
import functools
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from . import options, validate
from .abi import PrefillParams
from .batch_attention import (
    LN2,
    _BatchAttention,
    _host_int,
    _PlanState,
    check_dtypes,
    check_heads,
    check_plan_options,
    index_tensor,
    resolve_head_dim,
    run_options,
    set_ragged_kv,
)
from .errors import NotSupportedError
from .kernels import resolve_backend, select_backend
from .ops import define
from .planner import paged_kv_lengths
from .variants import AttentionVariant

_RAGGED = "BatchPrefillWithRaggedKVCacheWrapper"
_PAGED = "BatchPrefillWithPagedKVCacheWrapper"


def _same_offsets(where: str, name: str, value: Optional[torch.Tensor], expected: torch.Tensor, other: str) -> None:
    """v_indptr / o_indptr (FlashInfer: separate V / O row offsets, default kv_indptr / qo_indptr)."""
    if value is None:
        return
    if not torch.equal(index_tensor(name, value), expected):
        raise NotSupportedError(name, f"offsets other than {other}'s", f"None or the same offsets as {other} "
                                "(separate V / O row offsets are not implemented yet)", where)


class BatchPrefillWithRaggedKVCacheWrapper(_BatchAttention):
    """Batch prefill attention over ragged K/V (all requests packed along the token axis).

    Args (FlashInfer's; see plan() for the options):
        float_workspace_buffer: a CUDA tensor of any dtype (uint8, int8, ...), used as bytes, for split-KV
            partial states. 128 MB covers large batches; plan() says how many bytes a plan needs when short.
        kv_layout: "NHD" (k, v: [total_kv, Hkv, D]) or "HND" (k, v: [Hkv, total_kv, D]).
        use_cuda_graph: make run() capturable: grids, metadata buffers and the q tile size are
            fixed by the first plan() (plan the shape the graph will replay: a decode-like first
            plan picks 16-row tiles, correct but slow for long prompts later); later plans may
            change lengths as long as the batch size and the total q tokens do not exceed the
            first plan's. q/k/v/out may then be larger than the planned totals
            (rows past the plan are ignored and not written). The captured kernels read the plan
            metadata from this wrapper's buffers: keep the wrapper alive as long as the graph may
            be replayed.
        qo_indptr_buf, kv_indptr_buf, custom_mask_buf, mask_indptr_buf: FlashInfer's CUDA-graph staging
            buffers; accepted and not needed (the plan lives in the wrapper's own buffers). A custom
            mask itself is refused at plan().
        backend: "auto", "fa2" (our FA2-class kernel) or "sm90" (our Hopper kernel: wgmma, TMA,
            warp-specialized, persistent; FlashInfer's name "fa3" selects it). "auto" runs sm90 on compute
            capability 9.x when the batch suits it (a GQA group dividing 128, at least 64 packed q rows per
            request on average) and fa2 elsewhere; plan() decides and `wrapper.backend` says which ran. An
            explicit "sm90" / "fa3" that cannot run (another card, a group size that does not divide 128)
            raises NotSupportedError at plan(), not later at build or launch as in FlashInfer; "cudnn",
            "cutlass", "trtllm-gen", "cute-dsl" raise NotSupportedError too.
        jit_args, jit_kwargs, variant_owns_mask: FlashInfer's custom JIT variants: None / False only.
    """

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD", use_cuda_graph: bool = False,
                 qo_indptr_buf: Optional[torch.Tensor] = None, kv_indptr_buf: Optional[torch.Tensor] = None,
                 custom_mask_buf: Optional[torch.Tensor] = None, mask_indptr_buf: Optional[torch.Tensor] = None,
                 backend: str = "auto", jit_args: Optional[list] = None, jit_kwargs: Optional[dict] = None,
                 variant_owns_mask: bool = False):
        where = f"{_RAGGED}()"
        options.no_jit_variant(where, jit_args, jit_kwargs, variant_owns_mask)
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph, backend=backend, where=where)

    def plan(self, qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, num_qo_heads: int, num_kv_heads: int,
             head_dim_qk: Optional[int] = None, head_dim_vo: Optional[int] = None,
             custom_mask: Optional[torch.Tensor] = None, packed_custom_mask: Optional[torch.Tensor] = None,
             causal: bool = False, pos_encoding_mode: str = "NONE", use_fp16_qk_reduction: bool = False,
             window_left: int = -1, logits_soft_cap: Optional[float] = None, sm_scale: Optional[float] = None,
             rope_scale: Optional[float] = None, rope_theta: Optional[float] = None,
             q_data_type: Union[str, torch.dtype] = "float16", kv_data_type: Optional[Union[str, torch.dtype]] = None,
             o_data_type: Optional[Union[str, torch.dtype]] = None, non_blocking: bool = True,
             prefix_len_ptr: Optional[torch.Tensor] = None, token_pos_in_items_ptr: Optional[torch.Tensor] = None,
             token_pos_in_items_len: int = 0, max_item_len_ptr: Optional[torch.Tensor] = None,
             fixed_split_size: Optional[int] = None, disable_split_kv: bool = False,
             seq_lens: Optional[torch.Tensor] = None, seq_lens_q: Optional[torch.Tensor] = None,
             max_token_per_sequence: Optional[int] = None, max_sequence_kv: Optional[int] = None,
             v_indptr: Optional[torch.Tensor] = None, o_indptr: Optional[torch.Tensor] = None, *,
             head_dim: Optional[int] = None, variant: Optional[AttentionVariant] = None) -> None:
        """Plan a batch. qo_indptr, kv_indptr: int32 [batch + 1], on the CPU (no device sync) or CUDA.

        FlashInfer's parameters, in its order. head_dim= is accepted as another name for head_dim_qk
        (keyword only). window_left and logits_soft_cap select a variant (see the module docstring), and
        variant= (keyword only, flashinfer-jit's) a user-defined flashinfer_jit.AttentionVariant;
        off values only for the other variant options;
        fixed_split_size (KV tokens per chunk, a multiple of the KV tile; None or <= 0: automatic) and
        disable_split_kv make the split decision independent of the batch (batch-invariant results).
        seq_lens, seq_lens_q, max_token_per_sequence, max_sequence_kv (cuDNN's) and non_blocking are
        accepted and not needed; v_indptr / o_indptr only as None or equal to kv_indptr / qo_indptr."""
        where = f"{_RAGGED}.plan()"
        head_dim_qk = resolve_head_dim(where, head_dim_qk, head_dim)
        custom = variant  # plan(variant=): a user-defined AttentionVariant (flashinfer_jit.variants)
        variant = check_plan_options(where, custom_mask=custom_mask, packed_custom_mask=packed_custom_mask,
                                     pos_encoding_mode=pos_encoding_mode, use_fp16_qk_reduction=use_fp16_qk_reduction,
                                     window_left=window_left, logits_soft_cap=logits_soft_cap,
                                     prefix_len_ptr=prefix_len_ptr, token_pos_in_items_ptr=token_pos_in_items_ptr,
                                     max_item_len_ptr=max_item_len_ptr, rope_scale=rope_scale, rope_theta=rope_theta)
        check_heads(num_qo_heads, num_kv_heads, head_dim_qk, head_dim_vo)
        q_dtype, _ = check_dtypes(q_data_type, kv_data_type, where)
        options.dtype_like(where, "o_data_type", o_data_type, q_dtype)
        qo = index_tensor("qo_indptr", qo_indptr, 1)
        kv = index_tensor("kv_indptr", kv_indptr, 1)
        if qo.numel() != kv.numel():
            raise ValueError(f"kv_indptr: expected {qo.numel()} entries like qo_indptr (batch_size + 1), got {kv.numel()}")
        _same_offsets(where, "v_indptr", v_indptr, kv, "kv_indptr")
        _same_offsets(where, "o_indptr", o_indptr, qo, "qo_indptr")
        self._plan("ragged", qo, kv, num_qo_heads, num_kv_heads, head_dim_qk, causal, sm_scale, q_dtype,
                   kv_data_type, fixed_split_size, disable_split_kv, variant=variant, custom=custom,
                   mask=(custom_mask, packed_custom_mask))
        self._remember_options(pos_encoding_mode, use_fp16_qk_reduction, window_left, logits_soft_cap, rope_scale,
                               rope_theta)

    begin_forward = plan

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any,
            q_scale: Optional[float] = None, k_scale: Optional[float] = None, v_scale: Optional[float] = None,
            o_scale: Optional[float] = None, out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None,
            return_lse: bool = False, lse_base: str = "log2", lse_layout: str = "NH",
            enable_pdl: Optional[bool] = None, kv_cache_sf: Optional[Any] = None):
        """Attention for the planned batch. Returns out, or (out, lse) when return_lse is True.

        k_scale / v_scale: with an fp8 plan (kv_data_type float8_e4m3fn / e5m2; k, v of that dtype) None, a
        float or a one-element float32 tensor (CPU: read; CUDA: read by the kernel), applied as FlashInfer
        applies them (scores use q . k * k_scale, the output is scaled by v_scale); with a 16-bit plan None or
        1.0. q_scale / o_scale only as None or 1.0, no *args (custom JIT variants), no kv_cache_sf (NVFP4),
        lse_layout "NH"; lse_base "log2" (default) or "ln"; enable_pdl is accepted."""
        ln = False
        if (args or q_scale is not None or o_scale is not None
                or kv_cache_sf is not None or lse_base != "log2" or lse_layout != "NH"):
            ln = run_options(f"{_RAGGED}.run()", args, q_scale=q_scale, o_scale=o_scale, lse_base=lse_base,
                             lse_layout=lse_layout, kv_cache_sf=kv_cache_sf)
        s, out, lse = self._prepare_q_out(q, out, lse, return_lse)
        if s.fp8_kv or k_scale is not None or v_scale is not None:
            self._kv_scales(f"{_RAGGED}.run()", s, k_scale, v_scale)
        rows = None if self._use_cuda_graph else s.total_kv
        shape = (rows, s.num_kv_heads, s.head_dim) if self._kv_layout == "NHD" else (s.num_kv_heads, rows, s.head_dim)
        for name, t in (("k", k), ("v", v)):
            validate.tensor(name, t, dtypes=(s.kv_dtype,), shape=shape, device=self._device)
            validate.vector_rows(name, t)
        kv_rows = k.shape[0] if self._kv_layout == "NHD" else k.shape[1]
        if kv_rows < s.total_kv:
            raise ValueError(f"k: expected at least {s.total_kv} tokens (the planned total), got {kv_rows}")
        self._launch(s, q, k, v, out, lse)
        if ln and lse is not None:
            lse.mul_(LN2)
        return (out, lse) if return_lse else out

    run_return_lse = functools.partialmethod(run, return_lse=True)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                pos_encoding_mode: str = "NONE", use_fp16_qk_reduction: bool = False, window_left: int = -1,
                logits_soft_cap: Optional[float] = None, sm_scale: Optional[float] = None,
                rope_scale: Optional[float] = None, rope_theta: Optional[float] = None) -> torch.Tensor:
        """Deprecated (FlashInfer's, use run()). Its options apply from this call on, as in FlashInfer: a
        different sm_scale is set in place, a different causal re-plans from plan()'s arguments."""
        self._apply_forward_options(f"{_RAGGED}.forward()", causal, pos_encoding_mode, use_fp16_qk_reduction,
                                    window_left, logits_soft_cap, sm_scale, rope_scale, rope_theta)
        return self.run(q, k, v)

    def forward_return_lse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                           pos_encoding_mode: str = "NONE", use_fp16_qk_reduction: bool = False,
                           window_left: int = -1, logits_soft_cap: Optional[float] = None,
                           sm_scale: Optional[float] = None, rope_scale: Optional[float] = None,
                           rope_theta: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Deprecated (FlashInfer's, use run(return_lse=True)); options as in forward()."""
        self._apply_forward_options(f"{_RAGGED}.forward_return_lse()", causal, pos_encoding_mode,
                                    use_fp16_qk_reduction, window_left, logits_soft_cap, sm_scale, rope_scale,
                                    rope_theta)
        return self.run(q, k, v, return_lse=True)

    def _set_kv(self, p: PrefillParams, k: torch.Tensor, v: torch.Tensor) -> None:
        set_ragged_kv(p, k, v, nhd=self._kv_layout == "NHD")


def _host_lengths(name: str, value: object) -> torch.Tensor:
    t = validate.tensor(name, value, ndim=1)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor, got {t.dtype}")
    return t.to("cpu", torch.int64)


class BatchPrefillWithPagedKVCacheWrapper(_BatchAttention):
    """Batch prefill attention over a paged KV cache.

    The cache passed to run() is one tensor [num_pages, 2, page_size, Hkv, D] (NHD) or
    [num_pages, 2, Hkv, page_size, D] (HND) holding K at [:, 0] and V at [:, 1], or a (k, v) tuple of
    [num_pages, page_size, Hkv, D] / [num_pages, Hkv, page_size, D] tensors with equal strides.
    Constructor arguments as for the ragged wrapper; with use_cuda_graph=True, paged_kv_indices_buf's
    length sets the page-table room of later plans (the other *_buf arguments are accepted, only their
    lengths matter: the metadata is kept in the wrapper's own buffers). The sm90 backend copies whole
    pages by TMA: it takes page sizes of at least 8 that divide its 128-key tile or are multiples of it
    ("auto" runs fa2 for the others; an explicit "sm90" / "fa3" raises NotSupportedError at plan()).
    """

    _kv_kind = "paged"

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD", use_cuda_graph: bool = False,
                 qo_indptr_buf: Optional[torch.Tensor] = None, paged_kv_indptr_buf: Optional[torch.Tensor] = None,
                 paged_kv_indices_buf: Optional[torch.Tensor] = None,
                 paged_kv_last_page_len_buf: Optional[torch.Tensor] = None,
                 custom_mask_buf: Optional[torch.Tensor] = None, mask_indptr_buf: Optional[torch.Tensor] = None,
                 backend: str = "auto", jit_args: Optional[list] = None, jit_kwargs: Optional[dict] = None,
                 variant_owns_mask: bool = False):
        where = f"{_PAGED}()"
        options.no_jit_variant(where, jit_args, jit_kwargs, variant_owns_mask)
        room = paged_kv_indices_buf.numel() if isinstance(paged_kv_indices_buf, torch.Tensor) else 0
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph, max_num_pages=room, backend=backend,
                         where=where)

    def plan(self, qo_indptr: torch.Tensor, paged_kv_indptr: torch.Tensor, paged_kv_indices: torch.Tensor,
             paged_kv_last_page_len: torch.Tensor, num_qo_heads: int, num_kv_heads: int,
             head_dim_qk: Optional[int] = None, page_size: Optional[int] = None, head_dim_vo: Optional[int] = None,
             custom_mask: Optional[torch.Tensor] = None, packed_custom_mask: Optional[torch.Tensor] = None,
             causal: bool = False, pos_encoding_mode: str = "NONE", use_fp16_qk_reduction: bool = False,
             sm_scale: Optional[float] = None, window_left: int = -1, logits_soft_cap: Optional[float] = None,
             rope_scale: Optional[float] = None, rope_theta: Optional[float] = None,
             q_data_type: Union[str, torch.dtype] = "float16", kv_data_type: Optional[Union[str, torch.dtype]] = None,
             o_data_type: Optional[Union[str, torch.dtype]] = None, non_blocking: bool = True,
             prefix_len_ptr: Optional[torch.Tensor] = None, token_pos_in_items_ptr: Optional[torch.Tensor] = None,
             token_pos_in_items_len: int = 0, max_item_len_ptr: Optional[torch.Tensor] = None,
             seq_lens: Optional[torch.Tensor] = None, seq_lens_q: Optional[torch.Tensor] = None,
             block_tables: Optional[torch.Tensor] = None, max_token_per_sequence: Optional[int] = None,
             max_sequence_kv: Optional[int] = None, fixed_split_size: Optional[int] = None,
             disable_split_kv: bool = False, *, head_dim: Optional[int] = None,
             variant: Optional[AttentionVariant] = None) -> None:
        """Plan a batch over a page table (CSR: indptr [batch + 1], indices, last_page_len [batch]).
        All int32; CPU tensors avoid any device sync.

        FlashInfer's parameters, in its order (see the ragged plan() for the shared ones). seq_lens, when
        given, must equal the page table's lengths (FlashInfer's fa2 path would use it instead of them);
        block_tables, seq_lens_q, max_token_per_sequence and max_sequence_kv (other backends') are accepted
        and not needed."""
        where = f"{_PAGED}.plan()"
        head_dim_qk = resolve_head_dim(where, head_dim_qk, head_dim)
        if page_size is None:
            raise TypeError(f"{where}: missing required argument 'page_size'")
        custom = variant  # plan(variant=): a user-defined AttentionVariant (flashinfer_jit.variants)
        variant = check_plan_options(where, custom_mask=custom_mask, packed_custom_mask=packed_custom_mask,
                                     pos_encoding_mode=pos_encoding_mode, use_fp16_qk_reduction=use_fp16_qk_reduction,
                                     window_left=window_left, logits_soft_cap=logits_soft_cap,
                                     prefix_len_ptr=prefix_len_ptr, token_pos_in_items_ptr=token_pos_in_items_ptr,
                                     max_item_len_ptr=max_item_len_ptr, rope_scale=rope_scale, rope_theta=rope_theta)
        check_heads(num_qo_heads, num_kv_heads, head_dim_qk, head_dim_vo)
        if not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size: expected a positive int, got {page_size!r}")
        q_dtype, kv_dtype = check_dtypes(q_data_type, kv_data_type, where)  # before the kernel library is loaded
        options.dtype_like(where, "o_data_type", o_data_type, q_dtype)
        qo = index_tensor("qo_indptr", qo_indptr, 1)
        batch = qo.numel() - 1
        indptr = index_tensor("paged_kv_indptr", paged_kv_indptr, 1)
        if indptr.numel() != batch + 1:
            raise ValueError(f"paged_kv_indptr: expected {batch + 1} entries (batch_size + 1), got {indptr.numel()}")
        indices = index_tensor("paged_kv_indices", paged_kv_indices)
        last = index_tensor("paged_kv_last_page_len", paged_kv_last_page_len)
        if last.numel() != batch:
            raise ValueError(f"paged_kv_last_page_len: expected {batch} entries (batch_size), got {last.numel()}")
        lens = _host_lengths("seq_lens", seq_lens) if seq_lens is not None else None
        # The library _plan() will pick (NHD and HND share one kernel): decode-like plans load only fa2's.
        group = num_qo_heads // num_kv_heads
        kernel = self._kernel("paged", head_dim_qk, q_dtype, causal, group, page_size,
                              _host_int(qo, batch) * group / max(batch, 1), variant, custom, kv_dtype)
        try:
            kv_lens, max_page = paged_kv_lengths(kernel.kernel, indptr, last, indices, page_size, batch)
        except ValueError:
            # FlashInfer reads a request without pages as empty whatever its last_page_len (SGLang passes 1s,
            # vLLM pads CUDA-graph batches with 1): only such a request's entry is set to 0, then re-checked.
            no_pages = indptr[1:] == indptr[:-1]
            if not bool((no_pages & (last != 0)).any()):
                raise
            last = last.masked_fill(no_pages, 0)
            kv_lens, max_page = paged_kv_lengths(kernel.kernel, indptr, last, indices, page_size, batch)
        if lens is not None and not torch.equal(lens, (kv_lens[1:] - kv_lens[:-1]).to(torch.int64)):
            raise NotSupportedError("seq_lens", "KV lengths other than the page table's",
                                    "None or the page table's lengths ((pages - 1) * page_size + last_page_len)",
                                    where)
        self._plan("paged", qo, kv_lens, num_qo_heads, num_kv_heads, head_dim_qk, causal, sm_scale, q_dtype,
                   kv_data_type, fixed_split_size, disable_split_kv, pages=(indptr, indices, page_size, max_page),
                   variant=variant, custom=custom, mask=(custom_mask, packed_custom_mask))
        self._remember_options(pos_encoding_mode, use_fp16_qk_reduction, window_left, logits_soft_cap, rope_scale,
                               rope_theta)

    begin_forward = plan

    def run(self, q: torch.Tensor, paged_kv_cache: Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]],
            *args: Any, q_scale: Optional[float] = None, k_scale: Optional[float] = None,
            v_scale: Optional[float] = None, out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None,
            return_lse: bool = False, lse_base: str = "log2", lse_layout: str = "NH",
            enable_pdl: Optional[bool] = None, window_left: Optional[int] = None,
            sinks: Optional[torch.Tensor] = None, kv_cache_sf: Optional[Any] = None,
            skip_softmax_threshold_scale_factor: Optional[float] = None, use_fp16_softmax: Optional[bool] = None,
            uses_spcompress: Optional[bool] = None):
        """Attention for the planned batch. Returns out, or (out, lse) when return_lse is True.

        As the ragged run() (k_scale / v_scale with fp8 caches included); also window_left None or -1, no sinks, no skip-softmax threshold.
        use_fp16_softmax and uses_spcompress select trtllm-gen cubins and are ignored, as by FlashInfer's
        other backends."""
        ln = False
        if (args or q_scale is not None or kv_cache_sf is not None
                or window_left is not None or sinks is not None or skip_softmax_threshold_scale_factor is not None
                or lse_base != "log2" or lse_layout != "NH"):
            ln = run_options(f"{_PAGED}.run()", args, q_scale=q_scale, lse_base=lse_base, lse_layout=lse_layout, window_left=window_left, sinks=sinks,
                             kv_cache_sf=kv_cache_sf,
                             skip_softmax_threshold_scale_factor=skip_softmax_threshold_scale_factor,
                             planned_window_left=self._planned_window_left)
        s, out, lse = self._prepare_q_out(q, out, lse, return_lse)
        if s.fp8_kv or k_scale is not None or v_scale is not None:
            self._kv_scales(f"{_PAGED}.run()", s, k_scale, v_scale)
        k, v = self._split_cache(s, paged_kv_cache)
        self._launch(s, q, k, v, out, lse)
        if ln and lse is not None:
            lse.mul_(LN2)
        return (out, lse) if return_lse else out

    run_return_lse = functools.partialmethod(run, return_lse=True)

    def forward(self, q: torch.Tensor, paged_kv_cache: Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]],
                causal: bool = False, pos_encoding_mode: str = "NONE", use_fp16_qk_reduction: bool = False,
                k_scale: Optional[float] = None, v_scale: Optional[float] = None, window_left: int = -1,
                logits_soft_cap: Optional[float] = None, sm_scale: Optional[float] = None,
                rope_scale: Optional[float] = None, rope_theta: Optional[float] = None) -> torch.Tensor:
        """Deprecated (FlashInfer's, use run()); options as in the ragged forward()."""
        self._apply_forward_options(f"{_PAGED}.forward()", causal, pos_encoding_mode, use_fp16_qk_reduction,
                                    window_left, logits_soft_cap, sm_scale, rope_scale, rope_theta)
        return self.run(q, paged_kv_cache, k_scale=k_scale, v_scale=v_scale)

    def forward_return_lse(self, q: torch.Tensor,
                           paged_kv_cache: Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]],
                           causal: bool = False, pos_encoding_mode: str = "NONE", use_fp16_qk_reduction: bool = False,
                           k_scale: Optional[float] = None, v_scale: Optional[float] = None, window_left: int = -1,
                           logits_soft_cap: Optional[float] = None, sm_scale: Optional[float] = None,
                           rope_scale: Optional[float] = None,
                           rope_theta: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Deprecated (FlashInfer's, use run(return_lse=True)); options as in forward()."""
        self._apply_forward_options(f"{_PAGED}.forward_return_lse()", causal, pos_encoding_mode,
                                    use_fp16_qk_reduction, window_left, logits_soft_cap, sm_scale, rope_scale,
                                    rope_theta)
        return self.run(q, paged_kv_cache, k_scale=k_scale, v_scale=v_scale, return_lse=True)

    def _split_cache(self, s: _PlanState, cache: Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]):
        nhd = self._kv_layout == "NHD"
        page_shape = (s.page_size, s.num_kv_heads, s.head_dim) if nhd else (s.num_kv_heads, s.page_size, s.head_dim)
        if isinstance(cache, torch.Tensor):
            validate.cuda_tensor("paged_kv_cache", cache, dtypes=(s.kv_dtype,), shape=(None, 2, *page_shape),
                                 device=self._device)
            k = v = cache  # one 5-D tensor: _set_kv offsets V by stride(1), no slicing per run
        elif isinstance(cache, (tuple, list)) and len(cache) == 2:
            k = validate.cuda_tensor("paged_kv_cache[0] (k)", cache[0], dtypes=(s.kv_dtype,), shape=(None, *page_shape),
                                     device=self._device)
            v = validate.tensor("paged_kv_cache[1] (v)", cache[1], dtypes=(s.kv_dtype,), shape=tuple(k.shape),
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
        p.kv_rows = k.shape[0]  # pages (the sm90 kernel's TMA bound)
        if k.dim() == 5:
            p.v = p.k + k.stride(1) * k.element_size()
            token_dim, head_dim = token_dim + 1, head_dim + 1
        else:
            p.v = v.data_ptr()
        p.k_stride_n, p.k_stride_h = k.stride(token_dim), k.stride(head_dim)
        p.v_stride_n, p.v_stride_h = p.k_stride_n, p.k_stride_h


# ---- single_prefill_with_kv_cache ------------------------------------------------------------------
#
# One request is a one-request ragged batch. Its plan depends only on the shapes and options, so it is
# made once per shape and kept (`_SinglePlan`): a call with a known shape only launches. The call is its
# own torch op (`single_prefill_run`), so torch.compile traces it as one opaque node, and under
# mode="reduce-overhead" (CUDA-graph trees) and any CUDA graph capture the kernel replays with the
# pointers of plan buffers that outlive the graph:
#   - planning allocates (metadata buffers, pinned staging, the float workspace) and copies the plan
#     host-to-device on a planner thread, on a side stream: a graph tree routes the allocations of the
#     calling *thread* (every stream of it) into its memory pool during warm-up and recording, and a
#     plan allocated there is an untracked live allocation ("All live allocations must be tracked",
#     seen on the H200 with torch 2.11 when only a side stream was used); the calling stream then
#     waits for the side stream's copy;
#   - a shape first seen during capture cannot be planned (no copies or allocations inside a graph):
#     RuntimeError saying to run it once before capture (graph trees do a warm-up run first anyway);
#   - a plan that was used during a capture is never evicted (the graph reads its buffers); the others
#     are kept least-recently-used, up to _SINGLE_PLANS_KEPT. An evicted plan's device buffer is recorded
#     on every stream that used it (record_stream), so its memory is not reused before those kernels end.
# The float workspace (split-KV partial states) is one per device and shared by every single-prefill
# plan: calls on one stream are ordered; concurrent calls on two streams of one device would share it.

_SINGLE_PLANS_KEPT = 64
_SINGLE_WORKSPACE_BYTES = 32 << 20


@dataclass
class _SinglePlan:
    wrapper: BatchPrefillWithRaggedKVCacheWrapper
    captured: bool = False  # used during a CUDA graph capture: never evicted
    streams: set = field(default_factory=set)  # raw stream handles that ran it (record_stream done)


_single_plans: "OrderedDict[tuple, _SinglePlan]" = OrderedDict()
_single_workspaces: dict[torch.device, torch.Tensor] = {}
_plan_streams: dict[torch.device, torch.cuda.Stream] = {}


def _plan_single(key: tuple, q: torch.Tensor, kv_len: int, num_kv_heads: int, causal: bool, sm_scale: float,
                 kv_layout: str, backend: str, variant: tuple[int, float, str, float, float]) -> _SinglePlan:
    device = q.device
    side = _plan_streams.get(device)
    if side is None:
        side = _plan_streams[device] = torch.cuda.Stream(device)
    current = torch.cuda.current_stream(device)
    side.wait_stream(current)
    q_len, num_qo_heads, head_dim, dtype = q.shape[0], q.shape[1], q.shape[2], q.dtype

    def plan_on_side_stream() -> BatchPrefillWithRaggedKVCacheWrapper:
        with torch.cuda.device(device), torch.cuda.stream(side):
            workspace = _single_workspaces.get(device)
            if workspace is None:
                workspace = _single_workspaces[device] = torch.empty(_SINGLE_WORKSPACE_BYTES, dtype=torch.uint8,
                                                                     device=device)
            wrapper = BatchPrefillWithRaggedKVCacheWrapper(workspace, kv_layout, backend=backend)
            wrapper.plan(torch.tensor([0, q_len], dtype=torch.int32), torch.tensor([0, kv_len], dtype=torch.int32),
                         num_qo_heads, num_kv_heads, head_dim, causal=causal, sm_scale=sm_scale, q_data_type=dtype,
                         window_left=variant[0], logits_soft_cap=variant[1], pos_encoding_mode=variant[2],
                         rope_scale=variant[3], rope_theta=variant[4])
        return wrapper

    wrapper = _planner_thread().submit(plan_on_side_stream).result()
    current.wait_stream(side)
    entry = _SinglePlan(wrapper)
    _single_plans[key] = entry
    while len(_single_plans) > _SINGLE_PLANS_KEPT:
        old_key = next((k for k, e in _single_plans.items() if not e.captured and k != key), None)
        if old_key is None:
            break
        _single_plans.pop(old_key).wrapper._workspace.release_staging()
    return entry


@functools.lru_cache(maxsize=1)
def _planner_thread() -> concurrent.futures.ThreadPoolExecutor:
    """One thread that plans single-prefill shapes: its allocations never land in a graph pool that
    the calling thread allocates into (first use of a shape only; a known shape never comes here)."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="flashinfer-jit-single-plan")


def _single_prefill_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                         lse: Optional[torch.Tensor], causal: bool, sm_scale: float, hnd: bool, backend: str,
                         window_left: int, logits_soft_cap: float, pos_encoding: str, rope_scale: float,
                         rope_theta: float) -> None:
    kv_len, num_kv_heads = (k.shape[1], k.shape[0]) if hnd else (k.shape[0], k.shape[1])
    variant = (window_left, logits_soft_cap, pos_encoding, rope_scale, rope_theta)
    key = (q.device, tuple(q.shape), kv_len, num_kv_heads, q.dtype, causal, sm_scale, hnd, backend, variant)
    capturing = torch.cuda.is_current_stream_capturing()
    entry = _single_plans.get(key)
    if entry is None:
        if capturing:
            raise RuntimeError(
                f"single_prefill_with_kv_cache: shape q {tuple(q.shape)}, kv_len {kv_len} (causal={causal}) is "
                f"first seen during CUDA graph capture, where it cannot be planned; run it once before capturing")
        entry = _plan_single(key, q, kv_len, num_kv_heads, causal, sm_scale, "HND" if hnd else "NHD", backend,
                             variant)
    else:
        _single_plans.move_to_end(key)
    if capturing:
        entry.captured = True
    else:
        stream = torch.cuda.current_stream(q.device)
        if stream.cuda_stream not in entry.streams:
            ints = entry.wrapper._workspace.device_ints
            if ints is not None:
                ints.record_stream(stream)
            entry.streams.add(stream.cuda_stream)
    entry.wrapper.run(q, k, v, out=o, lse=lse)


_single_prefill_op = define(
    "single_prefill_run(Tensor q, Tensor k, Tensor v, Tensor(a!) o, Tensor(b!)? lse, bool causal, float sm_scale, "
    "bool hnd, str backend, int window_left, float logits_soft_cap, str pos_encoding, float rope_scale, "
    "float rope_theta) -> ()",
    _single_prefill_cuda, lambda *args: None,
)


def single_prefill_with_kv_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 scale_q: Optional[torch.Tensor] = None, scale_k: Optional[torch.Tensor] = None,
                                 scale_v: Optional[torch.Tensor] = None, o_dtype: Optional[torch.dtype] = None,
                                 custom_mask: Optional[torch.Tensor] = None,
                                 packed_custom_mask: Optional[torch.Tensor] = None, causal: bool = False,
                                 kv_layout: str = "NHD", pos_encoding_mode: str = "NONE",
                                 use_fp16_qk_reduction: bool = False, sm_scale: Optional[float] = None,
                                 window_left: int = -1, logits_soft_cap: Optional[float] = None,
                                 rope_scale: Optional[float] = None, rope_theta: Optional[float] = None,
                                 backend: str = "auto", return_lse: bool = False, kv_cache_sf: Optional[Any] = None,
                                 k_scale: Optional[float] = None, v_scale: Optional[float] = None):
    """Attention for one request: q [q_len, Hq, D]; k, v [kv_len, Hkv, D] (NHD) or [Hkv, kv_len, D] (HND).

    FlashInfer's parameters, in its order; the options as for the wrappers (window_left and
    logits_soft_cap select the sliding-window / soft-cap kernels, pos_encoding_mode fused RoPE (with
    rope_scale / rope_theta) or ALiBi; off values only for custom masks, fp16 QK reduction, fp8 scales and o_dtype other than q's; backend "auto" / "fa2"). Returns out, or (out, lse) with return_lse=True (LSE base 2).

    Works under torch.compile (fullgraph=True, mode="reduce-overhead" included) and CUDA graph capture:
    the plan of each shape is made once and kept in buffers that outlive the graph; a shape must be run
    once before it is captured (see the notes above _SINGLE_PLANS_KEPT in prefill.py)."""
    where = "single_prefill_with_kv_cache()"
    options.no_custom_mask(where, custom_mask=custom_mask, packed_custom_mask=packed_custom_mask)
    variant = check_plan_options(where, pos_encoding_mode=pos_encoding_mode, use_fp16_qk_reduction=use_fp16_qk_reduction,
                                 window_left=window_left, logits_soft_cap=logits_soft_cap, rope_scale=rope_scale,
                                 rope_theta=rope_theta)
    for name, value in (("scale_q", scale_q), ("scale_k", scale_k), ("scale_v", scale_v), ("k_scale", k_scale),
                        ("v_scale", v_scale)):
        if value is not None:
            options.scale(where, name, value)
    options.no_tensor(where, "kv_cache_sf", kv_cache_sf, "NVFP4 KV caches")
    resolved_backend = select_backend(backend, where)
    if resolved_backend == "sm90":  # an explicit Hopper backend that cannot run here fails before anything runs
        resolve_backend("sm90", q.device if isinstance(q, torch.Tensor) else torch.device("cpu"), "ragged",
                        where=where, requested=backend)
    if kv_layout not in ("NHD", "HND"):
        raise ValueError(f"kv_layout: expected 'NHD' or 'HND', got {kv_layout!r}")
    if isinstance(q, torch.Tensor):
        options.quantized_dtype(where, "q.dtype", q.dtype)
    q = validate.cuda_tensor("q", q, dtypes=validate.ATTENTION_DTYPES, ndim=3)
    options.dtype_like(where, "o_dtype", o_dtype, q.dtype)
    if isinstance(k, torch.Tensor):
        options.quantized_dtype(where, "k.dtype", k.dtype)
    validate.cuda_tensor("k", k, dtypes=(q.dtype,), ndim=3, device=q.device)
    if isinstance(v, torch.Tensor) and v.dim() == 3 and v.shape[-1] != k.shape[-1]:
        raise NotSupportedError("v", f"head dim {v.shape[-1]} (k's is {k.shape[-1]})",
                                "v with k's head dim (different q/k and v/o head dims are not implemented yet)", where)
    validate.tensor("v", v, dtypes=(q.dtype,), shape=tuple(k.shape), device=q.device)
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k: expected head dim {q.shape[2]} (q's), got shape {tuple(k.shape)}")
    num_kv_heads = k.shape[1] if kv_layout == "NHD" else k.shape[0]
    check_heads(q.shape[1], num_kv_heads, q.shape[2], None)
    for name, t in (("q", q), ("k", k), ("v", v)):
        validate.vector_rows(name, t)
    scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(q.shape[2])
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[0], q.shape[1]), dtype=torch.float32, device=q.device) if return_lse else None
    _single_prefill_op(q, k, v, out, lse, bool(causal), scale, kv_layout == "HND", resolved_backend,
                       variant.window_left, variant.logits_soft_cap, variant.pos_encoding, variant.rope_scale,
                       variant.rope_theta)
    return (out, lse) if return_lse else out


single_prefill_with_kv_cache_return_lse = functools.partial(single_prefill_with_kv_cache, return_lse=True)
single_prefill_with_kv_cache_return_lse.__doc__ = "single_prefill_with_kv_cache(..., return_lse=True): (out, lse)."


def trtllm_batch_context_with_kv_cache(*args: Any, **kwargs: Any) -> torch.Tensor:
    """FlashInfer's TensorRT-LLM prefill entry point: not part of flashinfer-jit. Importable (vLLM's
    FlashInfer backend imports it at module load); calling it raises NotSupportedError."""
    raise NotSupportedError("backend", "trtllm-gen", "'auto' or 'fa2' through the prefill wrappers "
                            "(TensorRT-LLM kernels are not part of flashinfer-jit)",
                            "trtllm_batch_context_with_kv_cache()")
