"""Batch and single decode attention with FlashInfer's names, parameters and semantics (FlashInfer's
`flashinfer.decode`): `BatchDecodeWithPagedKVCacheWrapper`, `CUDAGraphBatchDecodeWithPagedKVCacheWrapper`,
`single_decode_with_kv_cache` and `fast_decode_plan`.

Decode plans and runs the paged prefill wrapper (prefill.py): its smallest q tiles pack the query
heads of a few requests, four warps split each KV tile's keys, and long KV ranges are split across
CTAs (flash-decoding) and merged in the same launch. `q_len_per_req > 1` (speculative-decoding
verification) runs the same kernel with a causal mask inside each request's block, as FlashInfer's
tensor-core path does. See prefill.py for the checks and the stricter-than-FlashInfer rules.

FlashInfer parameters are accepted by FlashInfer's names at FlashInfer's positions. A value that means
"feature off" works; a sliding window (window_left), logit soft-capping (logits_soft_cap) and
pos_encoding_mode "ROPE_LLAMA" (fused RoPE, with rope_scale / rope_theta) or "ALIBI" are the prefill
kernels' variants, chosen by plan() (forward() and run() cannot change them; prefill.py has their
semantics); a value asking for a feature flashinfer-jit does not have (fp8 / NVFP4 KV and their scales, attention sinks,
custom JIT variants) raises `NotSupportedError` (a ValueError) before any launch. `use_tensor_cores` may be True or False: the
tensor-core kernel is always used, and both give the same result.

Differences from FlashInfer, all on the side of accepting more:
  - a request without pages is empty whatever its last_page_len (vLLM pads CUDA-graph batches with
    last_page_len 1 there; FlashInfer's kernels read such a request as empty too);
  - `use_cuda_graph=True` needs no buffers, and later plans may use a smaller batch (see prefill.py);
  - `fixed_split_size` is a KV length per chunk in tokens (rounded up to the kernel's KV tile); None,
    -1 and 0 mean "no fixed split".
"""
from __future__ import annotations

import functools
import math
import warnings
import weakref
from typing import Any, Optional, Union

import torch

from . import options, validate
from .errors import NotSupportedError
from .kernels import select_backend
from .variants import AttentionVariant
from .page import get_seq_lens
from .prefill import BatchPrefillWithPagedKVCacheWrapper, single_prefill_with_kv_cache

_DTypeArg = Optional[Union[str, torch.dtype]]
_KVCache = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]

@functools.lru_cache(maxsize=64)
def _get_range_buf(seq_len: int, device: Union[str, torch.device]) -> torch.Tensor:
    """int32 [0, 1, ..., seq_len - 1] on `device`, cached (FlashInfer's helper, imported by vLLM)."""
    return torch.arange(seq_len, dtype=torch.int32, device=device)


def trtllm_batch_decode_with_kv_cache(*args: Any, **kwargs: Any) -> torch.Tensor:
    """FlashInfer's TensorRT-LLM decode entry point: not part of flashinfer-jit (importable, so that
    code importing it loads; calling it raises)."""
    raise NotSupportedError("backend", "trtllm-gen", "'auto' or 'fa2' through BatchDecodeWithPagedKVCacheWrapper "
                            "(TensorRT-LLM kernels are not part of flashinfer-jit)", "trtllm_batch_decode_with_kv_cache()")


def _canonical_dtype(value: Union[str, torch.dtype]) -> Any:
    if isinstance(value, str):
        return getattr(torch, value, value)
    return value


def resolve_dtypes(where: str, q_data_type: _DTypeArg, kv_data_type: _DTypeArg,
                   data_type: _DTypeArg = None) -> tuple[Any, Any]:
    """(q dtype, KV dtype) from FlashInfer's three dtype arguments: `data_type` (deprecated) fills
    whichever of the other two is None; q defaults to the KV dtype if that is fp16 / bf16, else float16;
    KV defaults to q's. fp8 KV (float8_e4m3fn / e5m2) passes; fp8 queries, fnuz fp8 and packed (NVFP4)
    dtypes raise NotSupportedError; other mismatches are left to the wrapper's check."""
    if data_type is not None:
        q_data_type = data_type if q_data_type is None else q_data_type
        kv_data_type = data_type if kv_data_type is None else kv_data_type
    kv = _canonical_dtype(kv_data_type) if kv_data_type is not None else None
    if q_data_type is not None:
        q = _canonical_dtype(q_data_type)
    else:  # the KV dtype when it is a 16-bit one, else FlashInfer's default
        q = kv if kv in validate.ATTENTION_DTYPES else torch.float16
    kv = q if kv is None else kv
    options.quantized_dtype(where, "q_data_type", q)
    options.kv_storage(where, kv)
    return q, kv


def host_int32(name: str, value: object) -> torch.Tensor:
    """A 1-D int32 tensor as a contiguous CPU tensor (CPU tensors: no copy, no device sync)."""
    t = validate.tensor(name, value, dtypes=(torch.int32,), ndim=1)
    return t if t.device.type == "cpu" and t.is_contiguous() else t.to("cpu").contiguous()


def empty_requests_have_no_tokens(indptr: torch.Tensor, last_page_len: torch.Tensor) -> torch.Tensor:
    """last_page_len with 0 for every request without pages (host tensors; a copy only if needed)."""
    if indptr.numel() != last_page_len.numel() + 1:
        return last_page_len  # the wrapper's check names the mismatch
    no_pages = indptr[1:] == indptr[:-1]
    if bool((no_pages & (last_page_len != 0)).any()):
        return torch.where(no_pages, torch.zeros_like(last_page_len), last_page_len)
    return last_page_len


class _PlanModule:
    """Stands in for FlashInfer's compiled decode module (`wrapper._cached_module`). vLLM's
    fast_plan_decode re-plans CUDA-graph decode wrappers through `_cached_module.plan(...)` with host
    indptr and KV lengths, after writing the page indices into the wrapper's paged_kv_indices_buffer;
    this plan() turns those arguments into a plan of the wrapper (reading the page indices back from
    that buffer: one device-to-host copy)."""

    def __init__(self, wrapper: "BatchDecodeWithPagedKVCacheWrapper"):
        self._wrapper = weakref.ref(wrapper)

    def plan(self, float_workspace_buffer: Any, int_workspace_buffer: Any, page_locked_int_workspace_buffer: Any,
             qo_indptr: torch.Tensor, paged_kv_indptr: torch.Tensor, kv_len_arr: torch.Tensor, total_num_rows: int,
             batch_size: int, num_qo_heads: int, num_kv_heads: int, page_size: int, enable_cuda_graph: bool,
             head_dim_qk: int, head_dim_vo: int, causal: bool, window_left: int = -1, fixed_split_size: int = -1,
             disable_split_kv: bool = False, num_colocated_ctas: int = 0, uniform_q_len: int = 0) -> list[int]:
        wrapper = self._wrapper()
        if wrapper is None:
            raise RuntimeError("the decode wrapper of this plan module no longer exists")
        if head_dim_vo != head_dim_qk:
            raise NotSupportedError("head_dim_vo", head_dim_vo, f"{head_dim_qk} (equal q/k and v head dims)",
                                    "BatchDecodeWithPagedKVCacheWrapper._cached_module.plan()")
        wrapper._replan_from_lengths(qo_indptr, paged_kv_indptr, kv_len_arr, batch_size, num_qo_heads, num_kv_heads,
                                     head_dim_qk, page_size, bool(causal), window_left, fixed_split_size,
                                     disable_split_kv)
        return [int(total_num_rows), int(batch_size)]


class BatchDecodeWithPagedKVCacheWrapper:
    """Batch decode over a paged KV cache (FlashInfer's wrapper of the same name).

    __init__(float_workspace_buffer, kv_layout="NHD", use_cuda_graph=False, use_tensor_cores=False,
    paged_kv_indptr_buffer=None, paged_kv_indices_buffer=None, paged_kv_last_page_len_buffer=None,
    backend="auto", jit_args=None)

    float_workspace_buffer: a contiguous CUDA tensor of any dtype, used as bytes (split-KV partial
    states; 128 MB covers large batches). With use_cuda_graph=True the first plan fixes the grid and the
    q tile size, run() can be captured, and the graph replays correctly after later plans whose batch
    and page table fit the first's (paged_kv_indices_buffer's length sets the page-table room). The
    *_buffer arguments are kept as FlashInfer's attributes (`_paged_kv_indices_buf`, ...) for callers
    that write page tables into them (SGLang, vLLM); the plan itself lives in the wrapper's own buffers.
    """

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD", use_cuda_graph: bool = False,
                 use_tensor_cores: bool = False, paged_kv_indptr_buffer: Optional[torch.Tensor] = None,
                 paged_kv_indices_buffer: Optional[torch.Tensor] = None,
                 paged_kv_last_page_len_buffer: Optional[torch.Tensor] = None, backend: str = "auto",
                 jit_args: Optional[list[Any]] = None) -> None:
        where = "BatchDecodeWithPagedKVCacheWrapper()"
        options.no_jit_variant(where, jit_args, None, False)
        select_backend(backend, where)  # NotSupportedError naming this wrapper, before anything is allocated
        self._inner = BatchPrefillWithPagedKVCacheWrapper(float_workspace_buffer, kv_layout, use_cuda_graph,
                                                          paged_kv_indices_buf=paged_kv_indices_buffer,
                                                          backend=backend)
        # FlashInfer's attributes, which vLLM and SGLang read or write.
        self._kv_layout = kv_layout
        self._float_workspace_buffer = float_workspace_buffer
        self._int_workspace_buffer: Optional[torch.Tensor] = None
        self._pin_memory_int_workspace_buffer: Optional[torch.Tensor] = None
        self.device = float_workspace_buffer.device
        self._use_cuda_graph = bool(use_cuda_graph)
        self._use_tensor_cores = bool(use_tensor_cores)
        self._backend = self._inner.backend
        self._paged_kv_indptr_buf = paged_kv_indptr_buffer
        self._paged_kv_indices_buf = paged_kv_indices_buffer
        self._paged_kv_last_page_len_buf = paged_kv_last_page_len_buffer
        self._fixed_batch_size = (len(paged_kv_last_page_len_buffer) if use_cuda_graph
                                  and isinstance(paged_kv_last_page_len_buffer, torch.Tensor) else 0)
        self._cached_module = _PlanModule(self)
        self._plan_info: Optional[list[int]] = None
        self._cached_q_data_type: Any = None
        self._cached_kv_data_type: Any = None
        self._cached_o_data_type: Any = None
        self._pos_encoding_mode = "NONE"
        self._window_left = -1
        self._window_right = 0
        self._logits_soft_cap = 0.0
        self._variant = options.PLAIN  # the plan's window and soft-cap
        self._custom: Optional[AttentionVariant] = None  # the plan's user-defined variant
        self._sm_scale: Optional[float] = None
        self._rope_scale: Optional[float] = None
        self._rope_theta: Optional[float] = None
        self._q_len_per_req: Optional[int] = None
        self._causal: Optional[bool] = None
        self._batch_size = 0
        self._total_q = -1
        self._head_dim = 0
        self._qo_indptr_host = torch.arange(0, 1, dtype=torch.int32)

    @property
    def is_cuda_graph_enabled(self) -> bool:
        return self._use_cuda_graph

    @property
    def resolved_backend(self) -> str:
        """The backend plans run on ("fa2": the FA2-class tensor-core kernel)."""
        return self._backend

    @property
    def use_tensor_cores(self) -> bool:
        """The value given to the constructor (the tensor-core kernel runs either way)."""
        return self._use_tensor_cores

    def reset_workspace_buffer(self, float_workspace_buffer: torch.Tensor,
                               int_workspace_buffer: Optional[torch.Tensor]) -> None:
        """Use a new float workspace from the next plan() on (the int workspace is the wrapper's own;
        int_workspace_buffer is accepted and kept for FlashInfer compatibility)."""
        self._inner.reset_workspace_buffer(float_workspace_buffer, int_workspace_buffer)
        self._float_workspace_buffer = float_workspace_buffer
        self._int_workspace_buffer = int_workspace_buffer

    # ---- plan ------------------------------------------------------------------------------------

    def plan(self, indptr: torch.Tensor, indices: torch.Tensor, last_page_len: torch.Tensor, num_qo_heads: int,
             num_kv_heads: int, head_dim: int, page_size: int, pos_encoding_mode: str = "NONE",
             window_left: int = -1, logits_soft_cap: Optional[float] = None, q_data_type: _DTypeArg = None,
             kv_data_type: _DTypeArg = None, o_data_type: _DTypeArg = None, data_type: _DTypeArg = None,
             sm_scale: Optional[float] = None, rope_scale: Optional[float] = None,
             rope_theta: Optional[float] = None, non_blocking: bool = True,
             block_tables: Optional[torch.Tensor] = None, seq_lens: Optional[torch.Tensor] = None,
             fixed_split_size: Optional[int] = None, disable_split_kv: bool = False, q_len_per_req: int = 1,
             *, window_right: int = 0, is_causal: Optional[bool] = None,
             variant: Optional[AttentionVariant] = None) -> None:
        """Plan a decode batch over a page table: indptr [batch + 1], indices, last_page_len [batch], all
        int32 (CPU tensors: no device synchronization; CUDA tensors cost one copy each). variant=
        (keyword only, flashinfer-jit's): a user-defined flashinfer_jit.AttentionVariant, kept by the
        re-plans that follow (fast_decode_plan, the cached module's plan) until the next plan().

        The parameters are FlashInfer's, at FlashInfer's positions. q_data_type None means the KV dtype
        (else float16). pos_encoding_mode "ROPE_LLAMA" rotates q and k in the kernel (a decode query's
        position is kv_len - 1) by rope_scale / rope_theta, which only matter with it; non_blocking, block_tables (TensorRT-LLM backend only) and seq_lens
        (a planning hint, equal to the page table's lengths) do not change the result and are not read.
        q_len_per_req > 1: q holds q_len_per_req tokens per request, by default causal within the request
        (as in FlashInfer: needs use_tensor_cores=True and kv_len >= q_len_per_req); is_causal=False makes
        them attend to the whole KV range (FlashInfer has that only on its prims-ts backend).

        FlashInfer 0.7.2 declares plan(..., page_size, *deprecated_positional_args, **kwargs) and maps
        positional options by its _BATCH_DECODE_PLAN_LEGACY_POS_ARGS, the order of the parameters here."""
        self._plan_impl(indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size,
                        pos_encoding_mode, window_left, logits_soft_cap, q_data_type, kv_data_type, o_data_type,
                        data_type, sm_scale, rope_scale, rope_theta, fixed_split_size, disable_split_kv,
                        q_len_per_req, window_right, "BatchDecodeWithPagedKVCacheWrapper.plan()", is_causal,
                        custom=variant)

    begin_forward = plan

    def _plan_impl(self, indptr: Any, indices: Any, last_page_len: Any, num_qo_heads: int, num_kv_heads: int,
                   head_dim: int, page_size: int, pos_encoding_mode: Any, window_left: Any, logits_soft_cap: Any,
                   q_data_type: _DTypeArg, kv_data_type: _DTypeArg, o_data_type: _DTypeArg, data_type: _DTypeArg,
                   sm_scale: Optional[float], rope_scale: Optional[float], rope_theta: Optional[float],
                   fixed_split_size: Optional[int], disable_split_kv: bool, q_len_per_req: Any,
                   window_right: Any, where: str, is_causal: Optional[bool] = None,
                   custom: Optional[AttentionVariant] = None) -> None:
        options.off_value(where, "window_right", window_right, 0,
                          supported="0 (a right window bound is not implemented)")
        variant = options.attention_variant(where, window_left, logits_soft_cap, pos_encoding_mode, rope_scale, rope_theta)
        q_dtype, kv_dtype = resolve_dtypes(where, q_data_type, kv_data_type, data_type)
        options.dtype_like(where, "o_data_type", o_data_type, q_dtype)
        if isinstance(q_len_per_req, bool) or not isinstance(q_len_per_req, int) or q_len_per_req < 1:
            raise ValueError(f"q_len_per_req must be >= 1, got {q_len_per_req!r}")
        if q_len_per_req > 1 and not self._use_tensor_cores:
            raise ValueError("q_len_per_req > 1 requires tensor-core decode (use_tensor_cores=True), as in FlashInfer")
        if self._use_cuda_graph and self._q_len_per_req not in (None, q_len_per_req):
            raise ValueError(f"q_len_per_req is part of the frozen cudagraph shape: this wrapper was planned with "
                             f"{self._q_len_per_req}, got {q_len_per_req}. Use a separate wrapper per q_len_per_req.")
        indptr_h = host_int32("indptr", indptr)
        last_h = host_int32("last_page_len", last_page_len)
        batch = indptr_h.numel() - 1
        if (isinstance(indices, torch.Tensor) and indices.device.type != "cpu" and batch >= 0
                and (not self._use_cuda_graph or self._paged_kv_indices_buf is not None)):
            # Copy only the pages in use: SGLang passes its whole CUDA-graph indices buffer. (The page-table
            # room of a CUDA-graph plan then comes from paged_kv_indices_buffer.)
            used = int(indptr_h[batch])
            if 0 <= used < indices.numel():
                indices = indices[:used]
        indices_h = host_int32("indices", indices)
        last_h = empty_requests_have_no_tokens(indptr_h, last_h)
        if is_causal is not None and not isinstance(is_causal, bool):
            raise ValueError(f"is_causal: expected True, False or None, got {is_causal!r}")
        causal = q_len_per_req > 1 if is_causal is None else (is_causal and q_len_per_req > 1)
        if self._use_cuda_graph and self._causal not in (None, causal):
            raise ValueError(f"is_causal is part of the frozen cudagraph shape (it selects the kernel): this wrapper "
                             f"was planned with causal={self._causal}. Use a separate wrapper.")
        if causal and batch > 0 and last_h.numel() == batch and isinstance(page_size, int) and page_size > 0:
            shortest = int(get_seq_lens(indptr_h, last_h, page_size).min())
            if shortest < q_len_per_req:
                raise ValueError(f"q_len_per_req={q_len_per_req} requires kv_len >= q_len_per_req for every request "
                                 f"(the verified tokens must already be appended to the KV cache), but got a request "
                                 f"with kv_len={shortest}: its earlier rows would attend to an empty KV range.")
        qo = self._qo_indptr_host
        if qo.numel() != batch + 1 or self._q_len_per_req != q_len_per_req:
            qo = torch.arange(0, max(batch, 0) + 1, dtype=torch.int32) * q_len_per_req
        split = fixed_split_size
        if split is not None and (isinstance(split, bool) or not isinstance(split, int)):
            raise ValueError(f"fixed_split_size: expected an int or None, got {split!r}")
        if split is not None and split <= 0:
            split = None  # FlashInfer's -1 (and vLLM's default): no fixed split
        if split is not None and isinstance(head_dim, int) and q_dtype in validate.ATTENTION_DTYPES:
            validate.head_dim("head_dim", head_dim)
            tile = self._inner._kernel("paged", head_dim, q_dtype, causal).kv_tile
            split = -(-split // tile) * tile
        self._inner.plan(qo, indptr_h, indices_h, last_h, num_qo_heads, num_kv_heads, head_dim, page_size,
                         causal=causal, sm_scale=sm_scale, q_data_type=q_dtype, kv_data_type=kv_dtype,
                         fixed_split_size=split, disable_split_kv=bool(disable_split_kv),
                         window_left=variant.window_left, logits_soft_cap=variant.logits_soft_cap,
                         pos_encoding_mode=variant.pos_encoding, rope_scale=variant.rope_scale,
                         rope_theta=variant.rope_theta, variant=custom)
        self._qo_indptr_host = qo
        self._cached_q_data_type, self._cached_kv_data_type, self._cached_o_data_type = q_dtype, kv_dtype, q_dtype
        self._pos_encoding_mode = variant.pos_encoding
        self._window_left, self._window_right = variant.window_left, 0
        self._logits_soft_cap = variant.logits_soft_cap
        self._variant, self._custom = variant, custom
        self._sm_scale, self._rope_scale, self._rope_theta = sm_scale, rope_scale, rope_theta
        self._q_len_per_req, self._causal = q_len_per_req, causal
        self._batch_size, self._total_q, self._head_dim = batch, batch * q_len_per_req, head_dim
        self._num_qo_heads, self._num_kv_heads = num_qo_heads, num_kv_heads
        self._plan_info = [batch * q_len_per_req, batch]

    def _replan_from_lengths(self, qo_indptr: Any, indptr: Any, kv_lens: Any, batch_size: int, num_qo_heads: int,
                             num_kv_heads: int, head_dim: int, page_size: int, causal: bool, window_left: int,
                             fixed_split_size: Optional[int], disable_split_kv: bool) -> None:
        """Plan from FlashInfer's module-level arguments (see _PlanModule): host indptr and KV lengths;
        the page indices are read from `_paged_kv_indices_buf`."""
        where = "BatchDecodeWithPagedKVCacheWrapper._cached_module.plan()"
        if self._cached_q_data_type is None:
            raise RuntimeError(f"{where}: the wrapper needs a plan() before its module can re-plan")
        indptr_h = host_int32("paged_kv_indptr", indptr)
        kv_lens_h = validate.tensor("kv_len_arr", kv_lens, ndim=1).to("cpu").to(torch.int32)
        qo_h = host_int32("qo_indptr", qo_indptr)
        batch = indptr_h.numel() - 1
        if batch != batch_size or kv_lens_h.numel() != batch or qo_h.numel() != batch + 1:
            raise ValueError(f"{where}: batch_size {batch_size}, paged_kv_indptr of {indptr_h.numel()}, kv_len_arr "
                             f"of {kv_lens_h.numel()} and qo_indptr of {qo_h.numel()} entries disagree")
        q_len = int(qo_h[-1]) // batch if batch else 1
        if batch and not torch.equal(qo_h, torch.arange(batch + 1, dtype=torch.int32) * q_len):
            raise NotSupportedError("qo_indptr", qo_h.tolist(), "the same number of query tokens per request", where)
        if causal != (q_len > 1):
            raise NotSupportedError("causal", causal, f"{q_len > 1} for {q_len} query tokens per request", where)
        pages = indptr_h[1:] - indptr_h[:-1]
        last = torch.where(pages > 0, kv_lens_h - (pages - 1) * page_size, torch.zeros_like(kv_lens_h))
        bad = (pages > 0) & ((last < 1) | (last > page_size))
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0, 0])
            raise ValueError(f"{where}: kv_len_arr[{i}] = {int(kv_lens_h[i])} does not fit request {i}'s "
                             f"{int(pages[i])} pages of {page_size}")
        source = self._paged_kv_indices_buf
        if not isinstance(source, torch.Tensor):
            raise RuntimeError(f"{where}: needs the paged_kv_indices_buffer given to the constructor")
        indices_h = host_int32("paged_kv_indices_buffer", source[: int(indptr_h[-1])])
        self._plan_impl(indptr_h, indices_h, last, num_qo_heads, num_kv_heads, head_dim, page_size,
                        self._pos_encoding_mode,
                        window_left, self._logits_soft_cap, self._cached_q_data_type, self._cached_kv_data_type,
                        None, None, self._sm_scale, self._rope_scale, self._rope_theta, fixed_split_size,
                        disable_split_kv, q_len, 0, where, custom=self._custom)

    # ---- run -------------------------------------------------------------------------------------

    def run(self, q: torch.Tensor, paged_kv_cache: _KVCache, *args: Any, q_scale: Optional[float] = None,
            k_scale: Optional[float] = None, v_scale: Optional[float] = None, out: Optional[torch.Tensor] = None,
            lse: Optional[torch.Tensor] = None, return_lse: bool = False, enable_pdl: Optional[bool] = None,
            window_left: Optional[int] = None, sinks: Optional[torch.Tensor] = None,
            q_len_per_req: Optional[int] = None, skip_softmax_threshold_scale_factor: Optional[float] = None,
            kv_cache_sf: Optional[_KVCache] = None):
        """Decode attention for the planned batch. q: [batch * q_len_per_req, Hq, D]; paged_kv_cache: one
        5-D tensor [pages, 2, ...] or a (k, v) tuple (see prefill.py). Returns out, or (out, lse) with
        return_lse=True (LSE base 2). enable_pdl is accepted and does not change the result; k_scale /
        v_scale with an fp8 cache (plan's kv_data_type) as in the paged prefill run() (a float or a one-element
        float32 tensor, CUDA ones read by the kernel), else None / 1.0; q_scale None / 1.0, window_left None or
        the planned one; sinks, kv_cache_sf, skip-softmax and extra *args raise NotSupportedError."""
        if (args or q_scale is not None or window_left is not None
                or sinks is not None or q_len_per_req is not None or skip_softmax_threshold_scale_factor is not None
                or kv_cache_sf is not None):
            self._check_run_options(args, q_scale, window_left, sinks, q_len_per_req,
                                    skip_softmax_threshold_scale_factor, kv_cache_sf)
        if (self._q_len_per_req is not None and isinstance(q, torch.Tensor) and q.dim() == 3
                and q.shape[0] != self._total_q and not self._use_cuda_graph):
            self._q_rows_mismatch(q)
        return self._inner.run(q, paged_kv_cache, k_scale=k_scale, v_scale=v_scale, out=out, lse=lse,
                               return_lse=return_lse)

    def _q_rows_mismatch(self, q: torch.Tensor) -> None:
        batch, planned = self._batch_size, self._q_len_per_req
        rows = q.shape[0]
        if batch and rows % batch == 0 and rows // batch != planned:
            raise ValueError(f"q implies q_len_per_req={rows // batch} but plan() used {planned}; re-plan with the "
                             f"matching q_len_per_req (q: expected shape [{self._total_q}, {self._num_qo_heads}, "
                             f"{self._head_dim}], got {tuple(q.shape)})")

    def _check_run_options(self, args: tuple, q_scale: Any, window_left: Any, sinks: Any,
                           q_len_per_req: Any, skip_softmax: Any, kv_cache_sf: Any) -> None:
        where = "BatchDecodeWithPagedKVCacheWrapper.run()"
        options.no_extra_args(where, args)
        options.scale(where, "q_scale", q_scale)
        if window_left is not None and window_left != self._window_left:
            raise ValueError(f"{where}: window_left={window_left} differs from plan()'s {self._window_left} (the "
                             f"window is chosen by plan(): plan again to change it)")
        options.no_tensor(where, "sinks", sinks, "attention sinks")
        if skip_softmax is not None:
            raise NotSupportedError("skip_softmax_threshold_scale_factor", skip_softmax,
                                    "None (skip-softmax sparsity is not implemented yet)", where)
        options.no_tensor(where, "kv_cache_sf", kv_cache_sf, "NVFP4 KV caches")
        if q_len_per_req is not None:
            warnings.warn("Passing `q_len_per_req` to BatchDecodeWithPagedKVCacheWrapper.run() is deprecated; pass "
                          "it to plan() instead.", DeprecationWarning, stacklevel=3)
            if q_len_per_req != self._q_len_per_req:
                raise ValueError(f"q_len_per_req={q_len_per_req} at run() differs from plan()'s {self._q_len_per_req}")

    run_return_lse = functools.partialmethod(run, return_lse=True)

    def forward(self, q: torch.Tensor, paged_kv_cache: _KVCache, pos_encoding_mode: str = "NONE",
                q_scale: Optional[float] = None, k_scale: Optional[float] = None, v_scale: Optional[float] = None,
                window_left: int = -1, logits_soft_cap: Optional[float] = None, sm_scale: Optional[float] = None,
                rope_scale: Optional[float] = None, rope_theta: Optional[float] = None) -> torch.Tensor:
        """Deprecated form of run(). As in FlashInfer, the options given here replace the plan's: an
        sm_scale (None: 1/sqrt(head_dim)) applies from this call on; the other options must mean off."""
        self._apply_forward_options("forward()", pos_encoding_mode, window_left, logits_soft_cap, sm_scale,
                                    rope_scale, rope_theta)
        return self.run(q, paged_kv_cache, q_scale=q_scale, k_scale=k_scale, v_scale=v_scale)

    def forward_return_lse(self, q: torch.Tensor, paged_kv_cache: _KVCache, pos_encoding_mode: str = "NONE",
                           q_scale: Optional[float] = None, k_scale: Optional[float] = None,
                           v_scale: Optional[float] = None, window_left: int = -1,
                           logits_soft_cap: Optional[float] = None, sm_scale: Optional[float] = None,
                           rope_scale: Optional[float] = None, rope_theta: Optional[float] = None):
        """Deprecated form of run_return_lse(); options as in forward()."""
        self._apply_forward_options("forward_return_lse()", pos_encoding_mode, window_left, logits_soft_cap,
                                    sm_scale, rope_scale, rope_theta)
        return self.run(q, paged_kv_cache, q_scale=q_scale, k_scale=k_scale, v_scale=v_scale, return_lse=True)

    def _apply_forward_options(self, where: str, pos_encoding_mode: Any, window_left: Any, logits_soft_cap: Any,
                               sm_scale: Optional[float], rope_scale: Any, rope_theta: Any) -> None:
        state = getattr(self._inner, "_state", None)
        if state is None:
            raise RuntimeError(f"{where} called before plan()")
        options.same_variant(where, options.attention_variant(where, window_left, logits_soft_cap, pos_encoding_mode,
                                                              rope_scale, rope_theta), self._variant)
        options.finite_or_none("sm_scale", sm_scale)
        scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(self._head_dim)
        # read at each launch: the next run() uses them
        state.params.scale_log2, state.params.soft_cap_pre_tanh = options.variant_scales(scale, self._variant)
        self._sm_scale, self._rope_scale, self._rope_theta = sm_scale, rope_scale, rope_theta

    def prewarm_paged_kv_stride_variant(self, variant: str = "independent") -> None:
        """FlashInfer loads a kernel variant for K and V with different strides lazily; here one kernel
        takes both layouts (K/V of a (k, v) cache need equal strides), so there is nothing to load."""
        if self._q_len_per_req is None:
            raise RuntimeError("plan() must complete before prewarming a paged-KV-stride variant.")
        if variant != "independent":
            raise ValueError(f"variant: expected 'independent', got {variant!r}")

    def end_forward(self) -> None:
        """Deprecated; does nothing (as in FlashInfer)."""


class CUDAGraphBatchDecodeWithPagedKVCacheWrapper(BatchDecodeWithPagedKVCacheWrapper):
    """BatchDecodeWithPagedKVCacheWrapper with use_cuda_graph=True and FlashInfer's buffers (see there):
    run() can be captured; later plans must fit the first plan's batch and the indices buffer."""

    def __init__(self, workspace_buffer: torch.Tensor, indptr_buffer: torch.Tensor, indices_buffer: torch.Tensor,
                 last_page_len_buffer: torch.Tensor, kv_layout: str = "NHD", use_tensor_cores: bool = False) -> None:
        super().__init__(workspace_buffer, kv_layout, use_cuda_graph=True, use_tensor_cores=use_tensor_cores,
                         paged_kv_indptr_buffer=indptr_buffer, paged_kv_indices_buffer=indices_buffer,
                         paged_kv_last_page_len_buffer=last_page_len_buffer)


def fast_decode_plan(self: BatchDecodeWithPagedKVCacheWrapper, indptr: torch.Tensor, indices: torch.Tensor,
                     last_page_len: torch.Tensor, num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                     pos_encoding_mode: str = "NONE", window_left: int = -1, logits_soft_cap: Optional[float] = None,
                     q_data_type: _DTypeArg = None, kv_data_type: _DTypeArg = None, data_type: _DTypeArg = None,
                     sm_scale: Optional[float] = None, rope_scale: Optional[float] = None,
                     rope_theta: Optional[float] = None, non_blocking: bool = True,
                     fixed_split_size: Optional[int] = None, disable_split_kv: bool = False, q_len_per_req: int = 1,
                     global_override_indptr_cpu: Optional[torch.Tensor] = None) -> None:
    """FlashInfer's fast re-plan of a decode wrapper (SGLang binds it as `wrapper.begin_forward` of its
    CUDA-graph wrappers; FlashInfer's tests as `wrapper.plan`). The same plan as wrapper.plan(...):
    `global_override_indptr_cpu` (a host copy of indptr) saves indptr's device-to-host copy, and with
    page_size 1 last_page_len is not read (every page holds one token). The page indices are read on
    the host (one device-to-host copy when `indices` is a CUDA tensor; only indptr[-1] entries)."""
    if q_len_per_req > 1 and self._q_len_per_req is None:
        raise ValueError("fast_decode_plan with q_len_per_req > 1 requires a prior plan() call that resolves the "
                         "backend")
    indptr_h = host_int32("indptr", global_override_indptr_cpu if global_override_indptr_cpu is not None else indptr)
    if page_size == 1:
        last = (indptr_h[1:] > indptr_h[:-1]).to(torch.int32)
    else:
        last = last_page_len
    self._plan_impl(indptr_h, indices, last, num_qo_heads, num_kv_heads, head_dim, page_size, pos_encoding_mode,
                    window_left, logits_soft_cap, q_data_type, kv_data_type, None, data_type, sm_scale, rope_scale,
                    rope_theta, fixed_split_size, disable_split_kv, q_len_per_req, 0, "fast_decode_plan()",
                    custom=self._custom)


def single_decode_with_kv_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layout: str = "NHD",
                                pos_encoding_mode: str = "NONE", use_tensor_cores: bool = False,
                                q_scale: Optional[float] = None, k_scale: Optional[float] = None,
                                v_scale: Optional[float] = None, window_left: int = -1,
                                logits_soft_cap: Optional[float] = None, sm_scale: Optional[float] = None,
                                rope_scale: Optional[float] = None, rope_theta: Optional[float] = None,
                                return_lse: bool = False):
    """Decode attention of one query token: q [Hq, D]; k, v [kv_len, Hkv, D] (NHD) or [Hkv, kv_len, D]
    (HND). Returns out [Hq, D], or (out, lse [Hq]) with return_lse=True. Runs single_prefill_with_kv_cache
    with q_len 1; the options are FlashInfer's (see BatchDecodeWithPagedKVCacheWrapper)."""
    where = "single_decode_with_kv_cache()"
    variant = options.attention_variant(where, window_left, logits_soft_cap, pos_encoding_mode, rope_scale, rope_theta)
    for name, value in (("q_scale", q_scale), ("k_scale", k_scale), ("v_scale", v_scale)):
        options.scale(where, name, value)
    q = validate.cuda_tensor("q", q, dtypes=validate.ATTENTION_DTYPES, ndim=2)
    result = single_prefill_with_kv_cache(q.unsqueeze(0), k, v, causal=False, sm_scale=sm_scale, kv_layout=kv_layout,
                                          return_lse=return_lse, window_left=variant.window_left,
                                          logits_soft_cap=variant.logits_soft_cap, pos_encoding_mode=variant.pos_encoding,
                                          rope_scale=variant.rope_scale, rope_theta=variant.rope_theta)
    if return_lse:
        out, lse = result
        return out.squeeze(0), lse.squeeze(0)
    return result.squeeze(0)


__all__ = [
    "BatchDecodeWithPagedKVCacheWrapper",
    "CUDAGraphBatchDecodeWithPagedKVCacheWrapper",
    "fast_decode_plan",
    "get_seq_lens",
    "single_decode_with_kv_cache",
    "trtllm_batch_decode_with_kv_cache",
]
