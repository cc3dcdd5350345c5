"""Plan/run machinery shared by the batch attention wrappers (prefill.py, decode.py).

plan() does all the work that does not depend on the tensors of a run: it checks the batch, picks
the kernel (kernels.py) and the q tile size, sizes the metadata (workspace.py), runs the C planner
and uploads its work list (planner.py), and fills the kernel's parameters (abi.PrefillParams).
run() only checks the tensors against the plan, sets their pointers and strides, and launches
through one torch op (`attention_run`), so it can be captured in a CUDA graph.

FlashInfer's options are checked here before anything runs (`check_plan_options`, `run_options`, and
options.py): values that mean "off" pass, a feature flashinfer-jit lacks raises NotSupportedError. Argument
checks come before the first use of a kernel library, so they run (and are tested) without a GPU.
"""
from __future__ import annotations

import ctypes
import dataclasses
import itertools
import math
import weakref
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from . import env, loader, masks, options, rope, validate
from .abi import PlanCall, PlanConfig, PlanResult, PrefillParams
from .kernels import PrefillKernel, prefill_kernel, resolve_backend, select_backend
from .variants import AttentionVariant
from .ops import define, device_guard, stream_of
from .errors import NotSupportedError
from .planner import MIN_CHUNK_TILES, PLAN_OK, PLAN_WORKSPACE, check_indptrs, plan_and_upload
from .workspace import IntLayout, Workspace

LOG2E = options.LOG2E


def page_divider(page_size: int) -> tuple[int, int]:
    """(mul, shift) with n // page_size == (umulhi(n, mul) + n) >> shift for 0 <= n < 2**31."""
    shift = (page_size - 1).bit_length()
    return ((1 << 32) * ((1 << shift) - page_size)) // page_size + 1, shift


@dataclass
class _PlanState:
    """Everything run() needs, computed once by plan()."""

    kernel: loader.LoadedKernel
    run_fn: Any
    params: PrefillParams
    grid_items: int
    dtype: torch.dtype  # q and out
    batch: int
    total_q: int
    total_kv: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int = 0
    max_page_index: int = -1
    kv_dtype: Optional[torch.dtype] = None  # the K/V (cache) dtype: `dtype`, or fp8
    # sm90 ragged fused RoPE (unless FLASHINFER_JIT_ROPE_PREROTATE_K=0): run() rotates k rows [kv_begin, total_kv)
    # into k_rotated at k_positions (one pass) and the kernel reads that copy (params.keys_rotated).
    k_rotated: Optional[torch.Tensor] = None
    k_positions: Optional[torch.Tensor] = None
    rope_freqs: Optional[torch.Tensor] = None
    kv_begin: int = 0
    # sm90 paged plans under FLASHINFER_JIT_PAGED_VIA_RAGGED=1: planned as ragged; run() gathers the pages.
    gather: Optional["PagedGather"] = None

    @property
    def fp8_kv(self) -> bool:
        return self.kv_dtype in options.FP8_KV_DTYPES


_wrappers: "weakref.WeakValueDictionary[int, _BatchAttention]" = weakref.WeakValueDictionary()
_wrapper_ids = itertools.count(1)


def _attention_run_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                        lse: Optional[torch.Tensor], plan_id: int) -> None:
    owner = _wrappers.get(plan_id)
    if owner is None or owner._state is None:
        raise RuntimeError(f"attention plan {plan_id} no longer exists; call plan() again")
    state = owner._state
    validate.aligned_pointers("attention run", q, k, v, o)
    p = state.params
    p.q, p.o = q.data_ptr(), o.data_ptr()
    p.q_rows = q.shape[0]
    p.lse = lse.data_ptr() if lse is not None else None
    p.q_stride_n, p.q_stride_h = q.stride(0), q.stride(1)
    p.o_stride_n, p.o_stride_h = o.stride(0), o.stride(1)
    with device_guard(q.device):
        if state.gather is not None:  # a paged cache, run by the ragged kernel on copies of its rows
            k, v = state.gather.run(k, v)
            set_ragged_kv(p, k, v, nhd=True)
        else:
            if state.k_rotated is not None:  # one rotation per K row, not one per q tile that reads it
                rope.rotate_keys(k[state.kv_begin:state.total_kv], state.k_rotated[state.kv_begin:state.total_kv],
                                 state.k_positions, state.rope_freqs)
                k = state.k_rotated
            owner._set_kv(p, k, v)
        code = state.run_fn(ctypes.byref(p), state.grid_items, stream_of(q.device))
    state.kernel.check(code, "batch attention")


_attention_run_op = define(
    "attention_run(Tensor q, Tensor k, Tensor v, Tensor(a!) o, Tensor(b!)? lse, int plan_id) -> ()",
    _attention_run_cuda, lambda *args: None,
)


def _variant_kernel(backend: str, layout: str, head_dim: int, dtype: torch.dtype, causal: bool,
                    variant: options.VariantOptions, custom: Optional[AttentionVariant],
                    kv_dtype: Optional[torch.dtype]) -> PrefillKernel:
    """The prefill kernel of `backend` and `layout` for a plan's variant switches and user variant."""
    return prefill_kernel(backend, layout, head_dim, dtype, bool(causal), sliding_window=variant.sliding_window,
                          soft_cap=variant.soft_cap, custom_mask=variant.custom_mask, rope=variant.rope,
                          alibi=variant.alibi, kv_dtype=options.FP8_KV_DTYPES.get(kv_dtype, ""),
                          custom=custom.code if custom is not None else None)


def set_ragged_kv(p: PrefillParams, k: torch.Tensor, v: torch.Tensor, nhd: bool) -> None:
    """Ragged K / V ([tokens, heads, D] NHD, or [heads, tokens, D]) into the launch params."""
    p.k, p.v = k.data_ptr(), v.data_ptr()
    p.kv_rows = k.shape[0] if nhd else k.shape[1]  # tokens (the sm90 kernel's TMA bound)
    p.k_stride_n, p.k_stride_h = (k.stride(0), k.stride(1)) if nhd else (k.stride(1), k.stride(0))
    p.v_stride_n, p.v_stride_h = (v.stride(0), v.stride(1)) if nhd else (v.stride(1), v.stride(0))


@dataclass
class PagedGather:
    """An sm90 paged plan run by the ragged kernel (FLASHINFER_JIT_PAGED_VIA_RAGGED=1): each run copies
    the batch's K rows (rotated on the way under fused RoPE) and V rows out of the pages into ragged
    buffers of the batch's KV size, row t from page `pages[t]`, slot `positions[t] % page_size`."""

    pages: torch.Tensor      # int32 [total_kv], on the device
    positions: torch.Tensor  # int32 [total_kv]: each row's index in its request (its RoPE position)
    k_out: torch.Tensor      # [total_kv, num_kv_heads, head_dim]
    v_out: torch.Tensor
    freqs: Optional[torch.Tensor]  # fused RoPE's table (K rotated), or None (copied)

    def run(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k / v: the paged wrapper's NHD cache halves ([pages, page_size, heads, D] each, or both the 5-D
        cache [pages, 2, ...]); returns the ragged copies."""
        if k.dim() == 5:
            k, v = k[:, 0], k[:, 1]
        rope.gather_paged_rows(k, self.k_out, self.pages, self.positions, self.freqs)
        rope.gather_paged_rows(v, self.v_out, self.pages, self.positions, None)
        return self.k_out, self.v_out


def paged_rows(kv_indptr: torch.Tensor, page_indptr: torch.Tensor, page_indices: torch.Tensor,
               page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pages, positions), int32 [kv_indptr[-1]] on the host: for every K/V row of a paged batch (rows of
    request r at kv_indptr[r] ..), the page holding it and its index in the request (host tensors, checked
    by plan())."""
    positions = kv_positions(kv_indptr).to(torch.int64)
    lens = (kv_indptr[1:] - kv_indptr[:-1]).to(torch.int64)
    request = torch.repeat_interleave(torch.arange(lens.numel()), lens)
    entries = page_indptr.to(torch.int64)[request] + positions // page_size
    return page_indices[entries].to(torch.int32), positions.to(torch.int32)


# ---- argument checks shared by the wrappers ------------------------------------------------------

def kv_positions(kv_indptr: torch.Tensor) -> torch.Tensor:
    """int32 [kv_indptr[-1] - kv_indptr[0]]: each K row's index in its request (a key's RoPE position), for
    the rows kv_indptr[0] .. kv_indptr[-1] of a ragged batch (host indptr, checked non-decreasing)."""
    indptr = kv_indptr.to(torch.int64)
    starts = torch.repeat_interleave(indptr[:-1], indptr[1:] - indptr[:-1])
    return (torch.arange(int(indptr[0]), int(indptr[-1]), dtype=torch.int64) - starts).to(torch.int32)


def index_tensor(name: str, value: object, min_entries: int = 0) -> torch.Tensor:
    t = validate.tensor(name, value, dtypes=(torch.int32,), ndim=1)
    if t.numel() < min_entries:
        raise ValueError(f"{name}: expected at least {min_entries} entries, got shape {tuple(t.shape)}")
    return t if t.device.type == "cpu" and t.is_contiguous() else t.to("cpu").contiguous()


def _as_dtype(name: str, value: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(value, str):
        value = getattr(torch, value, None)  # type: ignore[assignment]
    if value not in validate.ATTENTION_DTYPES:
        raise TypeError(f"{name}: expected torch.float16 or torch.bfloat16, got {value!r}")
    return value  # type: ignore[return-value]


def check_dtypes(q_data_type: Union[str, torch.dtype], kv_data_type: Optional[Union[str, torch.dtype]],
                 where: str = "plan()") -> tuple[torch.dtype, torch.dtype]:
    """(q dtype, KV cache dtype). q: fp16 / bf16; KV: q's dtype (None) or an fp8 one (float8_e4m3fn,
    float8_e5m2: an fp8 cache the FA2-class kernel widens). fp8 queries, fnuz fp8 and NVFP4 KV are
    missing features (NotSupportedError); other dtypes, or KV of the other 16-bit dtype, a TypeError."""
    options.quantized_dtype(where, "q_data_type", q_data_type)
    q_dtype = _as_dtype("q_data_type", q_data_type)
    if kv_data_type is None:
        return q_dtype, q_dtype
    if options.kv_storage(where, kv_data_type):
        return q_dtype, getattr(torch, kv_data_type) if isinstance(kv_data_type, str) else kv_data_type
    kv_dtype = _as_dtype("kv_data_type", kv_data_type)
    if kv_dtype != q_dtype:
        raise TypeError(f"kv_data_type: expected the same dtype as q_data_type ({q_dtype}) or an fp8 dtype "
                        f"(torch.float8_e4m3fn, torch.float8_e5m2), got {kv_dtype}")
    return q_dtype, kv_dtype


def check_heads(num_qo_heads: object, num_kv_heads: object, head_dim: int, head_dim_vo: Optional[int]) -> None:
    validate.head_dim("head_dim", head_dim)
    if head_dim_vo not in (None, head_dim):
        raise NotSupportedError("head_dim_vo", head_dim_vo, f"None or {head_dim} (= head_dim_qk: different q/k and "
                                "v/o head dims are not implemented yet)")
    for name, value in (("num_qo_heads", num_qo_heads), ("num_kv_heads", num_kv_heads)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if num_qo_heads % num_kv_heads:  # type: ignore[operator]
        raise ValueError(f"num_qo_heads ({num_qo_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")


def resolve_head_dim(where: str, head_dim_qk: Optional[int], head_dim: Optional[int]) -> int:
    """FlashInfer's prefill name is head_dim_qk; flashinfer-jit also takes head_dim= (keyword only)."""
    if head_dim_qk is None:
        if head_dim is None:
            raise TypeError(f"{where}: missing required argument 'head_dim_qk'")
        return head_dim
    if head_dim is not None and head_dim != head_dim_qk:
        raise ValueError(f"{where}: head_dim={head_dim} is another name for head_dim_qk={head_dim_qk}; give one")
    return head_dim_qk


def check_plan_options(where: str, *, custom_mask: Any = None, packed_custom_mask: Any = None,
                       pos_encoding_mode: Any = "NONE", use_fp16_qk_reduction: Any = False, window_left: Any = -1,
                       logits_soft_cap: Any = None, prefix_len_ptr: Any = None, token_pos_in_items_ptr: Any = None,
                       max_item_len_ptr: Any = None, rope_scale: Any = None,
                       rope_theta: Any = None) -> options.VariantOptions:
    """FlashInfer plan() options that change the result. The sliding window, the logits soft-cap, the
    positional encoding (fused RoPE with rope_scale / rope_theta, ALiBi) and whether a custom mask is given
    are parsed into the plan's variant (options.attention_variant: bad values raise ValueError; the mask
    tensors are checked by _plan, masks.py); the others must be off (NotSupportedError otherwise).

    The others are accepted as FlashInfer's fa2 path treats them: non_blocking, token_pos_in_items_len (without token_pos_in_items_ptr), max_token_per_sequence,
    max_sequence_kv, seq_lens_q and block_tables only matter to other backends or to performance."""
    options.no_fp16_qk_reduction(where, use_fp16_qk_reduction)
    options.no_tensor(where, "prefix_len_ptr", prefix_len_ptr, "multi-item scoring")
    options.no_tensor(where, "token_pos_in_items_ptr", token_pos_in_items_ptr, "multi-item scoring")
    options.no_tensor(where, "max_item_len_ptr", max_item_len_ptr, "multi-item scoring")
    parsed = options.attention_variant(where, window_left, logits_soft_cap, pos_encoding_mode, rope_scale, rope_theta)
    has_mask = custom_mask is not None or packed_custom_mask is not None
    return dataclasses.replace(parsed, custom_mask=has_mask) if has_mask else parsed


def run_options(where: str, args: tuple, *, q_scale: Any = None, k_scale: Any = None, v_scale: Any = None,
                o_scale: Any = None, lse_base: Any = "log2", lse_layout: Any = "NH", window_left: Any = None,
                sinks: Any = None, kv_cache_sf: Any = None, skip_softmax_threshold_scale_factor: Any = None,
                planned_window_left: int = -1) -> bool:
    """FlashInfer run() options (checked only when one is given). Returns True for lse_base="ln"."""
    options.no_extra_args(where, args)
    for name, value in (("q_scale", q_scale), ("k_scale", k_scale), ("v_scale", v_scale), ("o_scale", o_scale)):
        options.scale(where, name, value)
    if window_left is not None and window_left != planned_window_left:  # a per-call override: the plan's only
        raise ValueError(f"{where}: window_left={window_left!r} differs from plan()'s {planned_window_left} (the "
                         f"window is chosen by plan(): plan again to change it)")
    options.no_tensor(where, "sinks", sinks, "attention sinks")
    options.no_tensor(where, "kv_cache_sf", kv_cache_sf, "NVFP4 KV caches")
    if skip_softmax_threshold_scale_factor is not None:
        raise NotSupportedError("skip_softmax_threshold_scale_factor", skip_softmax_threshold_scale_factor,
                                "None (skip-softmax sparsity is not implemented yet)", where)
    options.lse_layout(where, lse_layout)
    return options.lse_base(where, lse_base)


LN2 = 0.6931471805599453


def no_unsupported(what: str, unsupported: dict[str, Any]) -> None:
    # FlashInfer options we do not implement are refused rather than silently ignored.
    if unsupported:
        raise TypeError(f"{what}: unsupported arguments {sorted(unsupported)}: flashinfer-jit does not implement them")


def _choose_cta_q(options: tuple[int, ...], packed_rows: int, batch: int) -> int:
    """Packed q rows per CTA: the smallest tile the library has that holds the average request's
    rows (query tokens x group), so decode-like batches do not pay for 64-row MMAs on 4 rows; the
    largest tile past that."""
    per_request = packed_rows / max(batch, 1)
    fitting = [cta_q for cta_q in options if cta_q >= per_request]
    return min(fitting) if fitting else max(options)


def _host_int(t: torch.Tensor, index: int) -> int:
    """t[index] of a contiguous CPU int32 tensor, without building a tensor (plan() hot path)."""
    return ctypes.c_int32.from_address(t.data_ptr() + 4 * index).value


class _BatchAttention:
    """Plan/run machinery shared by the ragged, paged and decode wrappers."""

    _layouts = ("NHD", "HND")
    _kv_kind = "ragged"  # the kernel layout of this wrapper's K/V ("ragged" | "paged")

    @staticmethod
    def _device_of(buffer: object) -> torch.device:
        return buffer.device if isinstance(buffer, torch.Tensor) else torch.device("cpu")

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str, use_cuda_graph: bool,
                 max_num_pages: int = 0, backend: str = "auto", where: str = ""):
        # Host properties now; the CUDA-device check waits for plan(), after every host-side check.
        validate.workspace_buffer("float_workspace_buffer", float_workspace_buffer, device_check=False)
        if kv_layout not in self._layouts:
            raise ValueError(f"kv_layout: expected one of {self._layouts}, got {kv_layout!r}")
        self._backend_choice = select_backend(backend, where)  # "auto" | "fa2" | "sm90"
        self._backend_requested = backend
        self._graph_backend: Optional[str] = None  # use_cuda_graph: the first plan's backend, kept
        # What this wrapper's K/V kind runs on its device until a plan (knowing the GQA group) says
        # otherwise; an explicit sm90 that cannot run here raises now.
        self._backend = resolve_backend(self._backend_choice, self._device_of(float_workspace_buffer), self._kv_kind,
                                        where=where, requested=backend)
        self._workspace = Workspace(float_workspace_buffer, bool(use_cuda_graph), max_num_pages)
        self._device = float_workspace_buffer.device
        self._kv_layout = kv_layout
        self._use_cuda_graph = bool(use_cuda_graph)
        self._state: Optional[_PlanState] = None
        self._plan_args: Optional[dict[str, Any]] = None  # the last successful _plan()'s arguments (forward())
        # What FlashInfer keeps on its wrappers after plan() (vLLM asserts _causal, _window_left,
        # _logits_soft_cap and _sm_scale against its layers); the plan's values.
        self._causal = False
        self._sm_scale: Optional[float] = None
        self._pos_encoding_mode = "NONE"
        self._use_fp16_qk_reduction = False
        self._window_left = -1
        self._logits_soft_cap: Optional[float] = 0.0
        self._rope_scale: Optional[float] = None
        self._rope_theta: Optional[float] = None
        self._params = PrefillParams(k_scale=1.0, v_scale=1.0)
        self._k_rotated: Optional[torch.Tensor] = None  # _prerotated_keys' (or PagedGather's K) buffer, kept
        self._v_gathered: Optional[torch.Tensor] = None  # PagedGather's V buffer, kept across plans
        self._plan_call = PlanCall(result=ctypes.pointer(PlanResult()))
        self._plan_id = next(_wrapper_ids)
        _wrappers[self._plan_id] = self

    @property
    def is_cuda_graph_enabled(self) -> bool:
        return self._use_cuda_graph

    @property
    def backend(self) -> str:
        """The kernel family this wrapper runs: "sm90" (the Hopper wgmma + TMA kernel) or "fa2" (the
        FA2-class kernel). With backend="auto", "sm90" on compute capability 9.x for GQA groups dividing 128,
        (paged) pages of at least 8 tokens that tile the 128-key KV tiles, and batches with at least 64
        packed q rows (tokens x group) per request, else "fa2"; set by each plan() (before the first, what
        "auto" expects). A use_cuda_graph=True wrapper keeps its first plan's backend for later plans
        (a captured graph replays that kernel)."""
        return self._backend

    def reset_workspace_buffer(self, float_workspace_buffer: torch.Tensor, int_workspace_buffer: torch.Tensor) -> None:
        """FlashInfer's buffer swap. The float workspace (any dtype, bytes) holds the split-KV partial states
        of later plans; the current plan is dropped (call plan() again before run()). int_workspace_buffer is
        checked and not used: the plan metadata lives in the wrapper's own buffer. A CUDA graph captured
        before keeps reading the buffers it was captured with."""
        validate.workspace_buffer("float_workspace_buffer", float_workspace_buffer)
        validate.workspace_buffer("int_workspace_buffer", int_workspace_buffer)
        for name, t in (("float_workspace_buffer", float_workspace_buffer), ("int_workspace_buffer", int_workspace_buffer)):
            if t.device != self._device:
                raise ValueError(f"{name}: expected a tensor on {self._device} (the wrapper's device), got {t.device}")
        self._workspace.replace_float_buffer(float_workspace_buffer)
        self._state = None
        self._plan_args = None

    def end_forward(self) -> None:
        """Older FlashInfer releases' no-op (0.7.2 has none); kept for their callers."""

    def _remember_options(self, pos_encoding_mode: Any, use_fp16_qk_reduction: Any, window_left: Any,
                          logits_soft_cap: Any, rope_scale: Any, rope_theta: Any) -> None:
        self._pos_encoding_mode, self._use_fp16_qk_reduction = pos_encoding_mode, use_fp16_qk_reduction
        self._window_left = window_left
        self._logits_soft_cap = 0.0 if logits_soft_cap is None else logits_soft_cap  # as FlashInfer stores it
        self._rope_scale, self._rope_theta = rope_scale, rope_theta

    def _apply_forward_options(self, where: str, causal: Any, pos_encoding_mode: Any, use_fp16_qk_reduction: Any,
                               window_left: Any, logits_soft_cap: Any, sm_scale: Optional[float],
                               rope_scale: Any, rope_theta: Any) -> None:
        """The deprecated forward(...) forms: FlashInfer stores their options on the wrapper and runs with
        them, so they apply from this call on. A feature we lack raises NotSupportedError; sm_scale is
        updated in place; a different `causal` re-plans from the last plan()'s arguments (its CPU index
        tensors are read again), which cannot happen during CUDA graph capture (ValueError)."""
        options.no_fp16_qk_reduction(where, use_fp16_qk_reduction)
        if self._state is None or self._plan_args is None:
            raise RuntimeError(f"{where} called before plan()")
        planned = self._plan_args["variant"]
        options.same_variant(where, options.attention_variant(where, window_left, logits_soft_cap, pos_encoding_mode,
                                                              rope_scale, rope_theta), planned)
        if bool(causal) != self._causal:
            if torch.cuda.is_current_stream_capturing():
                raise ValueError(
                    f"{where}: causal={bool(causal)} differs from plan()'s causal={self._causal}; forward() "
                    f"re-plans for that, which cannot happen during CUDA graph capture: plan() with "
                    f"causal={bool(causal)}, or call run()")
            self._plan(**{**self._plan_args, "causal": bool(causal), "sm_scale": sm_scale})
        elif sm_scale != self._sm_scale:
            s = self._state
            scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(s.head_dim)
            self._params.scale_log2, self._params.soft_cap_pre_tanh = options.variant_scales(scale, planned)
            self._sm_scale = sm_scale
        self._remember_options(pos_encoding_mode, use_fp16_qk_reduction, window_left, logits_soft_cap, rope_scale,
                               rope_theta)
        self._logits_soft_cap = logits_soft_cap  # FlashInfer's forward() stores it as given

    @property
    def _planned_window_left(self) -> int:
        return self._plan_args["variant"].window_left if self._plan_args is not None else -1

    def _kernel(self, layout: str, head_dim: int, dtype: torch.dtype, causal: bool, group: Optional[int] = None,
                page_size: Optional[int] = None, rows_per_request: Optional[float] = None,
                variant: options.VariantOptions = options.PLAIN, custom: Optional[AttentionVariant] = None,
                kv_dtype: Optional[torch.dtype] = None) -> PrefillKernel:
        """The kernel for layout "ragged" | "paged" (NHD and HND share it: the layout is only strides), of
        the backend this wrapper's choice resolves to for that layout, GQA group and page size on its device."""
        # A CUDA-graph wrapper keeps its first plan's kernel family: a captured graph replays that kernel.
        choice = self._graph_backend or self._backend_choice
        backend = resolve_backend(choice, self._device, layout, group, f"{type(self).__name__}.plan()",
                                  self._graph_backend or self._backend_requested, page_size, rows_per_request,
                                  fp8_kv=kv_dtype in options.FP8_KV_DTYPES)
        return _variant_kernel(backend, layout, head_dim, dtype, causal, variant, custom, kv_dtype)

    def _gathers_pages(self, layout: str, spec: Any, kv_dtype: Optional[torch.dtype]) -> bool:
        """Whether this paged plan runs the ragged kernel over per-run copies of its rows (PagedGather):
        FLASHINFER_JIT_PAGED_VIA_RAGGED=1 (experimental, off), sm90, NHD, 16-bit K/V, no CUDA graph (the
        copies' size is the plan's). It costs a read and a write of the batch's K and V a run and that much
        memory, against the paged kernel's per-page copies (0.8 of the ragged kernel's TFLOP/s) and, with
        fused RoPE, its per-q-tile key rotation (0.73 of plain paged; benchmarks/NOTES.md)."""
        return (env.paged_via_ragged() and layout == "paged" and spec.backend == "sm90" and self._kv_layout == "NHD"
                and kv_dtype not in options.FP8_KV_DTYPES and not self._use_cuda_graph)

    def _paged_gather(self, pages: tuple[torch.Tensor, torch.Tensor, int, int], kv_indptr: torch.Tensor,
                      num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                      variant: options.VariantOptions) -> PagedGather:
        """The plan's PagedGather: the rows' pages and positions on the device, the copy buffers (kept by
        the wrapper across plans, grown as needed)."""
        src_pages, positions = paged_rows(kv_indptr, pages[0], pages[1], pages[2])
        shape = (positions.numel(), num_kv_heads, head_dim)
        freqs = options.rope_frequencies(head_dim, variant, self._device) if variant.rope else None
        return PagedGather(pages=src_pages.to(self._device), positions=positions.to(self._device),
                           k_out=self._kept_buffer("_k_rotated", shape, dtype),
                           v_out=self._kept_buffer("_v_gathered", shape, dtype), freqs=freqs)

    def _kept_buffer(self, attr: str, shape: tuple[int, int, int], dtype: torch.dtype) -> torch.Tensor:
        """The first shape[0] rows of the wrapper's buffer `attr` (kept across plans; reallocated when too
        small or of another dtype or row shape)."""
        buffer = getattr(self, attr)
        if buffer is None or buffer.dtype != dtype or buffer.shape[1:] != shape[1:] or buffer.shape[0] < shape[0]:
            buffer = torch.empty(shape, dtype=dtype, device=self._device)
            setattr(self, attr, buffer)
        return buffer[:shape[0]]

    def _plan(self, layout: str, qo_host: torch.Tensor, kv_lens_indptr: torch.Tensor,
              num_qo_heads: int, num_kv_heads: int, head_dim: int, causal: bool, sm_scale: Optional[float],
              q_data_type: Union[str, torch.dtype], kv_data_type: Optional[Union[str, torch.dtype]],
              fixed_split_size: Optional[int], disable_split_kv: bool,
              pages: Optional[tuple[torch.Tensor, torch.Tensor, int, int]] = None,
              variant: options.VariantOptions = options.PLAIN, custom: Optional[AttentionVariant] = None,
              mask: tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None)) -> None:
        """Plan from host int32 tensors: qo_indptr and the cumulative KV lengths (+ page table).
        fixed_split_size None or <= 0 (FlashInfer's -1) means: split automatically. `variant`: the sliding
        window and soft-cap (options.attention_variant), each its own kernel when on; `custom`: a
        user-defined variant (variants.AttentionVariant), its own kernel."""
        if custom is not None and not isinstance(custom, AttentionVariant):
            raise TypeError(f"variant: expected a flashinfer_jit.AttentionVariant or None, got {type(custom).__name__}")
        if custom is not None and variant.soft_cap:
            raise ValueError("variant and logits_soft_cap do not combine: write the cap into the variant's score_mod")
        if custom is not None and variant.alibi:
            raise ValueError("variant and pos_encoding_mode='ALIBI' do not combine: write the bias into the variant's "
                             "score_mod (examples/custom_variants.py has one)")
        if custom is not None:
            custom.check(num_qo_heads, self._device, f"{type(self).__name__}.plan()")
        if variant.custom_mask:
            # Stricter than FlashInfer, which ignores causal=True under a custom mask, and whose CUDA-graph
            # plans copy the mask into fixed buffers (here the captured kernel would read a freed mask).
            if causal:
                raise ValueError("custom_mask replaces the causal mask (FlashInfer then ignores causal=True): put "
                                 "the causal part into the mask and pass causal=False")
            if custom is not None:
                raise ValueError("custom_mask and variant do not combine: write the mask as the variant's mask_mod")
            if self._use_cuda_graph:
                raise NotSupportedError("custom_mask", "a mask", "None with use_cuda_graph=True (a captured graph "
                                        "keeps the first plan's mask pointer)", f"{type(self).__name__}.plan()")
        packed_mask = None
        if variant.custom_mask:  # checked and packed before any kernel is loaded
            q_lens = (qo_host[1:] - qo_host[:-1]).tolist()
            kv_lens = (kv_lens_indptr[1:] - kv_lens_indptr[:-1]).tolist()
            packed_mask = masks.prepare(mask[0], mask[1], q_lens, kv_lens, f"{type(self).__name__}.plan()")
        q_dtype, kv_dtype = check_dtypes(q_data_type, kv_data_type)
        plan_args = dict(layout=layout, qo_host=qo_host, kv_lens_indptr=kv_lens_indptr, num_qo_heads=num_qo_heads,
                         num_kv_heads=num_kv_heads, head_dim=head_dim, causal=causal, sm_scale=sm_scale,
                         q_data_type=q_data_type, kv_data_type=kv_data_type, fixed_split_size=fixed_split_size,
                         disable_split_kv=disable_split_kv, pages=pages, variant=variant, custom=custom, mask=mask)

        def kernel_choice(v: options.VariantOptions, c: Optional[AttentionVariant]) -> tuple:
            # (the RoPE table's values too: a captured graph keeps reading the first plan's table)
            return (v.sliding_window, v.soft_cap, v.custom_mask, v.pos_encoding, v.rope_scale, v.rope_theta,
                    c.code if c is not None else None)

        if (self._use_cuda_graph and self._plan_args is not None
                and (kernel_choice(self._plan_args["variant"], self._plan_args["custom"]) != kernel_choice(variant, custom)
                     or self._state is not None and self._state.kv_dtype != kv_dtype)):
            raise ValueError(f"{type(self).__name__}.plan(): a CUDA-graph wrapper keeps its first plan's kernel (a "
                             f"captured graph replays it); window_left / logits_soft_cap / pos_encoding_mode / "
                             f"rope_scale / rope_theta / kv_data_type / variant switch another "
                             f"kernel in here: use a separate wrapper")
        batch = qo_host.numel() - 1
        total_q = _host_int(qo_host, batch)
        total_kv = _host_int(kv_lens_indptr, batch)
        group = num_qo_heads // num_kv_heads
        kernel = self._kernel(layout, head_dim, q_dtype, causal, group, pages[2] if pages is not None else None,
                              total_q * group / max(batch, 1), variant, custom, kv_dtype)
        gather = None
        if pages is not None and self._gathers_pages(layout, kernel.spec, kv_dtype):
            # planned as the ragged batch of its rows, copied out of the pages by each run (PagedGather)
            kernel = _variant_kernel(kernel.spec.backend, "ragged", head_dim, q_dtype, causal, variant, custom, kv_dtype)
            gather = self._paged_gather(pages, kv_lens_indptr, num_kv_heads, head_dim, q_dtype, variant)
        plan_pages = None if gather is not None else pages  # the page table the kernel reads
        workspace = self._workspace

        cta_q = workspace.fixed_cta_q
        if cta_q is None:
            cta_q = _choose_cta_q(kernel.spec.cta_q_options, total_q * group, batch)
        # Split KV only as far as one CTA per SM (FLASHINFER_JIT_SPLIT_CTAS_PER_SM: more, under A/B):
        # measured on H100 bf16 decode, more and shorter chunks lose more to merging and per-CTA
        # start-up than they gain in parallelism.
        # Host-side checks first (the indptrs, in C: microseconds), then the device: without a GPU
        # the first error still names a bad indptr.
        check_indptrs(kernel.kernel, qo_host, kv_lens_indptr, batch)
        if disable_split_kv:
            split_tiles = -1
        elif fixed_split_size is not None and fixed_split_size > 0:
            if fixed_split_size % kernel.kv_tile:
                raise ValueError(f"fixed_split_size: expected a positive multiple of {kernel.kv_tile}, "
                                 f"got {fixed_split_size}")
            split_tiles = fixed_split_size // kernel.kv_tile
        else:
            split_tiles = 0
        validate.workspace_buffer("float_workspace_buffer", workspace.float_buffer)
        sms, slots_per_gpu = kernel.gpu_slots(self._device, cta_q)
        target_ctas = min(sms * env.split_ctas_per_sm(), slots_per_gpu)
        config = PlanConfig(batch=batch, group=group, num_kv_heads=num_kv_heads, cta_q=cta_q, kv_tile=kernel.kv_tile,
                            target_ctas=target_ctas, min_chunk_tiles=MIN_CHUNK_TILES, split_tiles=split_tiles,
                            window_left=variant.window_left)
        num_pages = _host_int(plan_pages[0], batch) if plan_pages is not None else 0
        max_page_index = pages[3] if pages is not None else -1  # (checked against the cache by run())
        items_cap, merges_cap, pages_cap, limits = workspace.capacities(
            batch=batch, total_q=total_q, group=group, cta_q=cta_q, num_kv_heads=num_kv_heads, sms=target_ctas,
            slots_per_gpu=slots_per_gpu, fixed_split=split_tiles > 0, num_pages=num_pages,
            page_table_len=plan_pages[1].numel() if plan_pages is not None else 0)

        partial_slots = workspace.partial_slots(head_dim)
        call = self._plan_call
        call.qo_indptr, call.kv_indptr, call.config = qo_host.data_ptr(), kv_lens_indptr.data_ptr(), ctypes.pointer(config)
        call.stream = stream_of(self._device)
        if plan_pages is not None:
            call.page_indptr, call.page_indices, call.num_page_indices = (plan_pages[0].data_ptr(),
                                                                          plan_pages[1].data_ptr(), num_pages)
        else:
            call.page_indptr = call.page_indices = None
            call.num_page_indices = 0
        while True:
            int_layout = IntLayout(items_cap, merges_cap, pages_cap if plan_pages is not None else 0, num_kv_heads)
            upload = int_layout.as_struct(partial_slots)
            call.layout = ctypes.pointer(upload)
            call.host, call.host_free = workspace.pinned_buffer(int_layout.total_ints)
            device_ints = workspace.device_buffer(int_layout.total_ints)
            call.device = device_ints.data_ptr()
            status, plan = plan_and_upload(kernel.kernel, call, qo_host, kv_lens_indptr)
            if status == PLAN_OK:
                break
            if status == PLAN_WORKSPACE:
                need = plan.partial_rows * num_kv_heads * (head_dim + 1) * 4
                raise ValueError(
                    f"float_workspace_buffer holds {workspace.nbytes} bytes but this plan's split-KV "
                    f"partial states need {need} bytes; pass a buffer of at least that size (or disable_split_kv=True)")
            if self._use_cuda_graph:
                raise ValueError(
                    f"this plan needs {plan.num_items} work items / {plan.num_merges} merges but the CUDA-graph "
                    f"buffers were sized for {items_cap} / {merges_cap} by the first plan; create a new wrapper")
            items_cap, merges_cap = max(plan.num_items, 1), max(plan.num_merges, 1)
        workspace.committed(limits)

        base = device_ints.data_ptr()
        params = self._params  # reused: run() reads it only through self._state
        params.items, params.counts = base + 4 * int_layout.items, base
        params.merge_counters = base + 4 * int_layout.counters
        params.partial_o = workspace.float_buffer.data_ptr()
        params.partial_lse = params.partial_o + partial_slots * head_dim * 4
        params.num_qo_heads, params.num_kv_heads, params.group = num_qo_heads, num_kv_heads, group
        scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)
        params.scale_log2, params.soft_cap_pre_tanh = options.variant_scales(scale, variant)
        params.window_left = variant.window_left
        self._variant_tensors = custom.bind(params, num_qo_heads, self._device, f"{type(self).__name__}.plan()") \
            if custom is not None else []
        if variant.rope:
            params.rope_freqs = options.rope_frequencies(head_dim, variant, self._device).data_ptr()
        if variant.alibi:
            params.alibi_slopes_log2 = options.alibi_slopes_log2(num_qo_heads, self._device).data_ptr()
        if packed_mask is not None:
            packed_mask = packed_mask.to(self._device)
            params.custom_mask, params.mask_offsets = packed_mask.bits.data_ptr(), packed_mask.offsets.data_ptr()
            self._variant_tensors.append(packed_mask)
        params.cta_q = cta_q
        page_size = pages[2] if pages is not None else 0  # (run() checks the cache's shape with it)
        if plan_pages is not None:
            params.page_size = page_size
            params.page_div_mul, params.page_div_shift = page_divider(page_size)
            params.page_indices = base + 4 * int_layout.page_indices
        prerotated = self._prerotated_keys(layout, kernel.spec, variant, kv_dtype, kv_lens_indptr, num_kv_heads,
                                           head_dim, q_dtype)
        params.keys_rotated = int(prerotated is not None or (gather is not None and gather.freqs is not None))
        self._state = _PlanState(
            kernel=kernel.kernel, run_fn=kernel.run_fn, params=params,
            grid_items=items_cap if self._use_cuda_graph else plan.num_items,
            dtype=q_dtype, kv_dtype=kv_dtype, batch=batch, total_q=total_q, total_kv=total_kv, num_qo_heads=num_qo_heads,
            num_kv_heads=num_kv_heads, head_dim=head_dim, page_size=page_size, max_page_index=max_page_index,
            gather=gather, **(prerotated or {}))
        self._plan_args = plan_args
        self._causal, self._sm_scale = bool(causal), sm_scale
        self._backend = kernel.spec.backend
        if self._use_cuda_graph:
            self._graph_backend = self._backend

    def _prerotated_keys(self, layout: str, spec: Any, variant: options.VariantOptions, kv_dtype: Optional[torch.dtype],
                         kv_indptr: torch.Tensor, num_kv_heads: int, head_dim: int,
                         dtype: torch.dtype) -> Optional[dict[str, Any]]:
        """For sm90 ragged NHD fused-RoPE plans with 16-bit K outside CUDA graphs (and unless
        FLASHINFER_JIT_ROPE_PREROTATE_K=0), the _PlanState fields that make run() rotate each K row once into
        a copy (K stays unrotated in the caller's tensor; the wrapper keeps the buffer, K's size, across
        plans), so the kernel skips its per-q-tile key walk: measured on an H100, chat16 causal hd128, 0.90
        of the plain kernel's TFLOP/s instead of 0.61 (benchmarks/NOTES.md). Paged plans keep the walk
        (a page may hold keys of several requests at different positions), unless they run as ragged
        (FLASHINFER_JIT_PAGED_VIA_RAGGED: PagedGather rotates while it copies)."""
        if not (env.rope_prerotate_keys() and variant.rope and layout == "ragged" and spec.backend == "sm90"
                and self._kv_layout == "NHD" and kv_dtype not in options.FP8_KV_DTYPES and not self._use_cuda_graph):
            return None
        begin, total = int(kv_indptr[0]), int(kv_indptr[-1])
        positions = kv_positions(kv_indptr)
        return dict(k_rotated=self._kept_buffer("_k_rotated", (total, num_kv_heads, head_dim), dtype),
                    k_positions=positions.to(self._device),
                    rope_freqs=options.rope_frequencies(head_dim, variant, self._device), kv_begin=begin)

    def _kv_scales(self, where: str, s: _PlanState, k_scale: Any, v_scale: Any) -> None:
        """run()'s k_scale / v_scale into the launch params: an fp8 plan takes them (options.kv_scale; None is
        1.0, and each run sets both, so a scale of one call does not leak into the next; a captured CUDA graph
        keeps the float part it was captured with, and reads a device tensor's value at each replay); a 16-bit
        plan only None or 1.0 (NotSupportedError, naming kv_data_type)."""
        if not s.fp8_kv:
            for name, value in (("k_scale", k_scale), ("v_scale", v_scale)):
                if value is not None:
                    options.scale(where, name, value)
            return
        p = s.params
        p.k_scale, p.k_scale_ptr = options.kv_scale(where, "k_scale", k_scale, self._device)
        p.v_scale, p.v_scale_ptr = options.kv_scale(where, "v_scale", v_scale, self._device)

    def _prepare_q_out(self, q: torch.Tensor, out: Optional[torch.Tensor], lse: Optional[torch.Tensor],
                       return_lse: bool) -> tuple[_PlanState, torch.Tensor, Optional[torch.Tensor]]:
        s = self._state
        if s is None:
            raise RuntimeError("run() called before plan()")
        rows = None if self._use_cuda_graph else s.total_q
        validate.cuda_tensor("q", q, dtypes=(s.dtype,), shape=(rows, s.num_qo_heads, s.head_dim), device=self._device)
        if q.shape[0] < s.total_q:
            raise ValueError(f"q: expected at least {s.total_q} tokens (the planned total), got {q.shape[0]}")
        validate.vector_rows("q", q)
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        else:
            validate.tensor("out", out, dtypes=(s.dtype,), shape=tuple(q.shape), device=self._device)
            validate.vector_rows("out", out)
        if lse is None and return_lse:
            lse = torch.empty((q.shape[0], s.num_qo_heads), dtype=torch.float32, device=q.device)
        elif lse is not None:
            validate.tensor("lse", lse, dtypes=(torch.float32,), shape=(q.shape[0], s.num_qo_heads), device=self._device)
            if not lse.is_contiguous():
                raise ValueError(f"lse: expected a contiguous tensor, got strides {lse.stride()}")
        return s, out, lse

    def _launch(self, s: _PlanState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                lse: Optional[torch.Tensor]) -> None:
        if s.total_q > 0 and s.grid_items > 0:
            _attention_run_op(q, k, v, out, lse, self._plan_id)

    def _set_kv(self, p: PrefillParams, k: torch.Tensor, v: torch.Tensor) -> None:
        raise NotImplementedError
