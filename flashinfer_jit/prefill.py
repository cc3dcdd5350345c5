"""Batch attention wrappers with FlashInfer's names and semantics:
`BatchPrefillWithRaggedKVCacheWrapper`, `BatchPrefillWithPagedKVCacheWrapper`,
`BatchDecodeWithPagedKVCacheWrapper` and `single_prefill_with_kv_cache`.

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

import ctypes
import itertools
import math
import weakref
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from . import loader, validate
from .ops import define, device_guard, stream_of
from .scheduler import (
    ITEM_INTS,
    MERGE_INTS,
    MIN_CHUNK_TILES,
    PLAN_OK,
    PLAN_WORKSPACE,
    PlanCall,
    PlanConfig,
    PlanResult,
    UploadLayout,
    plan_and_upload,
)
from .spec import PrefillSpec, dtype_name

LOG2E = 1.4426950408889634
_COUNTS_INTS = 4  # [num_items, num_merges, pad, pad] at the start of the int workspace


class PrefillParams(ctypes.Structure):
    """Mirror of fij::PrefillParams (templates/include/flashinfer_jit/prefill.cuh)."""

    _fields_ = [
        ("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("o", ctypes.c_void_p),
        ("lse", ctypes.c_void_p),
        ("q_stride_n", ctypes.c_int64), ("q_stride_h", ctypes.c_int64),
        ("k_stride_n", ctypes.c_int64), ("k_stride_h", ctypes.c_int64),
        ("v_stride_n", ctypes.c_int64), ("v_stride_h", ctypes.c_int64),
        ("o_stride_n", ctypes.c_int64), ("o_stride_h", ctypes.c_int64),
        ("items", ctypes.c_void_p),
        ("merges", ctypes.c_void_p), ("counts", ctypes.c_void_p),
        ("partial_o", ctypes.c_void_p), ("partial_lse", ctypes.c_void_p),
        ("num_qo_heads", ctypes.c_int32), ("num_kv_heads", ctypes.c_int32), ("group", ctypes.c_int32),
        ("scale_log2", ctypes.c_float), ("cta_q", ctypes.c_int32), ("page_size", ctypes.c_int32),
        ("page_indices", ctypes.c_void_p), ("stride_page", ctypes.c_int64),
        ("page_div_mul", ctypes.c_uint32), ("page_div_shift", ctypes.c_int32),
        ("merge_counters", ctypes.c_void_p),
        ("page_row_shift", ctypes.c_int32), ("page_row_mask", ctypes.c_int32),  # set by the C launcher
    ]


_RUN_ARGTYPES = [ctypes.POINTER(PrefillParams), ctypes.c_int, ctypes.c_void_p]


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
    dtype: torch.dtype
    batch: int
    total_q: int
    total_kv: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int = 0
    max_page_index: int = -1


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
    p.lse = lse.data_ptr() if lse is not None else None
    p.q_stride_n, p.q_stride_h = q.stride(0), q.stride(1)
    p.o_stride_n, p.o_stride_h = o.stride(0), o.stride(1)
    owner._set_kv(p, k, v)
    with device_guard(q.device):
        code = state.run_fn(ctypes.byref(p), state.grid_items, stream_of(q.device))
    state.kernel.check(code, "batch attention")


_attention_run_op = define(
    "attention_run(Tensor q, Tensor k, Tensor v, Tensor(a!) o, Tensor(b!)? lse, int plan_id) -> ()",
    _attention_run_cuda, lambda *args: None,
)

class _Variant:
    """One compiled prefill variant and what plan() asks of it, looked up once per process."""

    def __init__(self, spec: PrefillSpec):
        self.spec = spec
        self.kernel = loader.load(spec)
        self.kv_tile: int = self.kernel.function("kv_tile", [])()  # the planner must use the kernel's tile
        self.run_fn = self.kernel.function("run", _RUN_ARGTYPES)
        self._slots: dict[tuple[int, int], tuple[int, int]] = {}

    def gpu_slots(self, device: torch.device, cta_q: int) -> tuple[int, int]:
        """(SMs, SMs x resident CTAs per SM) on `device`; the occupancy query runs once."""
        key = (device.index or 0, cta_q)
        slots = self._slots.get(key)
        if slots is None:
            with device_guard(device):
                blocks = self.kernel.function("blocks_per_sm", [ctypes.c_int])(cta_q)
            if blocks <= 0:
                self.kernel.check(-blocks or 1, "occupancy query")
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            slots = self._slots[key] = (sms, blocks * sms)
        return slots


_variants: dict[tuple[str, int, torch.dtype, bool], _Variant] = {}


def _variant(layout: str, head_dim: int, dtype: torch.dtype, causal: bool) -> _Variant:
    key = (layout, head_dim, dtype, causal)
    variant = _variants.get(key)
    if variant is None:
        spec = PrefillSpec(kv_layout=layout, head_dim=head_dim, dtype=dtype_name(dtype), causal=causal)
        variant = _variants[key] = _Variant(spec)
    return variant


def _index_tensor(name: str, value: object, min_entries: int = 0) -> torch.Tensor:
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


def _check_dtypes(q_data_type: Union[str, torch.dtype], kv_data_type: Optional[Union[str, torch.dtype]]) -> torch.dtype:
    q_dtype = _as_dtype("q_data_type", q_data_type)
    kv_dtype = _as_dtype("kv_data_type", kv_data_type) if kv_data_type is not None else q_dtype
    if kv_dtype != q_dtype:
        raise TypeError(f"kv_data_type: expected the same dtype as q_data_type ({q_dtype}), got {kv_dtype}")
    return q_dtype


def _check_heads(num_qo_heads: object, num_kv_heads: object, head_dim: int, head_dim_vo: Optional[int]) -> None:
    validate.head_dim("head_dim", head_dim)
    if head_dim_vo not in (None, head_dim):
        raise ValueError(f"head_dim_vo: expected None or {head_dim} (equal q/k and v head dims), got {head_dim_vo}")
    for name, value in (("num_qo_heads", num_qo_heads), ("num_kv_heads", num_kv_heads)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if num_qo_heads % num_kv_heads:  # type: ignore[operator]
        raise ValueError(f"num_qo_heads ({num_qo_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")


def _no_unsupported(what: str, unsupported: dict[str, Any]) -> None:
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


class _IntLayout:
    """Offsets (in int32) of the plan metadata in the int workspace. Work items start 64-byte
    aligned (the kernel reads each in four 16-byte loads)."""

    def __init__(self, item_capacity: int, merge_capacity: int, page_capacity: int, num_kv_heads: int):
        self.item_capacity, self.merge_capacity = item_capacity, merge_capacity
        self.page_indices = _align16(_COUNTS_INTS)
        self.items = self.page_indices + _align16(page_capacity)
        self.merges = self.items + item_capacity * ITEM_INTS
        self.counters = self.merges + merge_capacity * MERGE_INTS  # zeroed by every plan
        self.total_ints = self.counters + _align8(merge_capacity * num_kv_heads)

    def as_struct(self, partial_slots: int) -> UploadLayout:
        return UploadLayout(self.page_indices, self.items, self.merges, self.counters, self.total_ints,
                            self.item_capacity, self.merge_capacity, partial_slots)


def _align16(n: int) -> int:
    return (n + 15) // 16 * 16


def _align8(n: int) -> int:
    return (n + 7) // 8 * 8


def _host_int(t: torch.Tensor, index: int) -> int:
    """t[index] of a contiguous CPU int32 tensor, without building a tensor (plan() hot path)."""
    return ctypes.c_int32.from_address(t.data_ptr() + 4 * index).value


class _BatchAttention:
    """Plan/run machinery shared by the ragged, paged and decode wrappers."""

    _layouts = ("NHD", "HND")

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str, use_cuda_graph: bool,
                 max_num_pages: int = 0):
        validate.cuda_tensor("float_workspace_buffer", float_workspace_buffer, dtypes=(torch.uint8,), ndim=1)
        self._max_num_pages = max_num_pages
        if kv_layout not in self._layouts:
            raise ValueError(f"kv_layout: expected one of {self._layouts}, got {kv_layout!r}")
        self._float_workspace = float_workspace_buffer
        self._device = float_workspace_buffer.device
        self._kv_layout = kv_layout
        self._use_cuda_graph = bool(use_cuda_graph)
        self._int_workspace: Optional[torch.Tensor] = None
        self._pinned: list[torch.Tensor] = [torch.empty(0, dtype=torch.int32), torch.empty(0, dtype=torch.int32)]
        self._pinned_events: list[Optional[torch.cuda.Event]] = [None, None]
        self._pinned_turn = 0
        self._graph_limits: Optional[dict[str, int]] = None
        self._state: Optional[_PlanState] = None
        self._params = PrefillParams()
        self._plan_call = PlanCall(result=ctypes.pointer(PlanResult()))
        self._plan_id = next(_wrapper_ids)
        _wrappers[self._plan_id] = self

    @property
    def is_cuda_graph_enabled(self) -> bool:
        return self._use_cuda_graph

    def _plan(self, layout_name: str, qo_host: torch.Tensor, kv_lens_indptr: torch.Tensor,
              num_qo_heads: int, num_kv_heads: int, head_dim: int, causal: bool, sm_scale: Optional[float],
              q_data_type: Union[str, torch.dtype], kv_data_type: Optional[Union[str, torch.dtype]],
              fixed_split_size: Optional[int], disable_split_kv: bool,
              pages: Optional[tuple[torch.Tensor, torch.Tensor, int, int]] = None) -> None:
        """Plan from host int32 tensors: qo_indptr and the cumulative KV lengths (+ page table)."""
        q_dtype = _check_dtypes(q_data_type, kv_data_type)
        batch = qo_host.numel() - 1
        total_q = _host_int(qo_host, batch)
        total_kv = _host_int(kv_lens_indptr, batch)
        group = num_qo_heads // num_kv_heads
        variant = _variant(layout_name, head_dim, q_dtype, bool(causal))

        if self._graph_limits is not None:
            cta_q = self._graph_limits["cta_q"]
        else:
            cta_q = _choose_cta_q(variant.spec.cta_q_options, total_q * group, batch)
        # Split KV only as far as one CTA per SM: measured on H100 decode, more and shorter chunks
        # lose more to merging and per-CTA start-up than they gain in parallelism.
        sms, slots_per_gpu = variant.gpu_slots(self._device, cta_q)
        if disable_split_kv:
            split_tiles = -1
        elif fixed_split_size is not None:
            if fixed_split_size <= 0 or fixed_split_size % variant.kv_tile:
                raise ValueError(f"fixed_split_size: expected a positive multiple of {variant.kv_tile}, "
                                 f"got {fixed_split_size}")
            split_tiles = fixed_split_size // variant.kv_tile
        else:
            split_tiles = 0
        config = PlanConfig(batch, group, num_kv_heads, cta_q, variant.kv_tile, int(bool(causal)), sms,
                            MIN_CHUNK_TILES, split_tiles, 0)
        num_pages = _host_int(pages[0], batch) if pages is not None else 0
        max_page_index = pages[3] if pages is not None else -1

        if self._use_cuda_graph:
            limits = self._graph_limits
            if limits is None:
                # q tiles of any later plan within these limits (at this cta_q), plus split
                # chunks: automatic splitting adds at most sms / num_kv_heads of them (prefill_plan.h);
                # a fixed split size can add more, so it gets room for a full GPU of extra chunks.
                # Every slot is a CTA the captured grid launches (surplus ones exit at once).
                extra_chunks = slots_per_gpu if split_tiles > 0 else sms // num_kv_heads + 1
                items_cap = math.ceil(total_q * group / cta_q) + batch + extra_chunks + 16
                # Page-table room: the paged_kv_indices_buffer given to the constructor, else the
                # length of the first plan's indices tensor (pass the whole, padded page table), and
                # at least twice the pages in use.
                page_room = max(self._max_num_pages, pages[1].numel() if pages is not None else 0, 2 * num_pages + 64)
                limits = {"batch": batch, "total_q": total_q, "items": items_cap, "merges": items_cap,
                          "cta_q": cta_q, "pages": page_room}
            elif batch > limits["batch"] or total_q > limits["total_q"] or num_pages > limits["pages"]:
                raise ValueError(
                    f"with use_cuda_graph=True later plans must fit the first: batch {batch} (max {limits['batch']}), "
                    f"total q tokens {total_q} (max {limits['total_q']}), pages {num_pages} (max {limits['pages']}); "
                    f"create a new wrapper for larger batches, or give paged_kv_indices_buffer (its length is the "
                    f"page-table room) to the constructor")
            items_cap, merges_cap, pages_cap = limits["items"], limits["merges"], limits["pages"]
        else:
            limits = None
            # Enough for any plan, so the planner runs once: splitting adds at most sms / num_kv_heads
            # chunks (prefill_plan.h: only tiles longer than the per-CTA share split).
            items_cap = total_q * group // cta_q + batch + sms // num_kv_heads + 1
            merges_cap, pages_cap = items_cap, num_pages

        # Partial states: fp32 O [slots, D] then LSE [slots], at offsets fixed by the buffer size (a
        # captured CUDA graph keeps valid pointers across plans).
        partial_slots = self._float_workspace.numel() // (4 * (head_dim + 1))
        call = self._plan_call
        call.qo_indptr, call.kv_indptr, call.config = qo_host.data_ptr(), kv_lens_indptr.data_ptr(), ctypes.pointer(config)
        call.stream = stream_of(self._device)
        if pages is not None:
            call.page_indptr, call.page_indices, call.num_page_indices = pages[0].data_ptr(), pages[1].data_ptr(), num_pages
        else:
            call.page_indptr = call.page_indices = None
            call.num_page_indices = 0
        while True:
            layout = _IntLayout(items_cap, merges_cap, pages_cap if pages is not None else 0, num_kv_heads)
            upload = layout.as_struct(partial_slots)
            call.layout = ctypes.pointer(upload)
            call.host, call.host_free = self._pinned_buffer(layout.total_ints)
            device_ints = self._device_buffer(layout.total_ints)
            call.device = device_ints.data_ptr()
            status, plan = plan_and_upload(variant.kernel, call, qo_host, kv_lens_indptr)
            if status == PLAN_OK:
                break
            if status == PLAN_WORKSPACE:
                need = plan.partial_rows * num_kv_heads * (head_dim + 1) * 4
                raise ValueError(
                    f"float_workspace_buffer holds {self._float_workspace.numel()} bytes but this plan's split-KV "
                    f"partial states need {need} bytes; pass a buffer of at least that size (or disable_split_kv=True)")
            if self._use_cuda_graph:
                raise ValueError(
                    f"this plan needs {plan.num_items} work items / {plan.num_merges} merges but the CUDA-graph "
                    f"buffers were sized for {items_cap} / {merges_cap} by the first plan; create a new wrapper")
            items_cap, merges_cap = max(plan.num_items, 1), max(plan.num_merges, 1)
        self._pinned_turn ^= 1  # the next plan stages in the other buffer
        self._graph_limits = limits

        base = device_ints.data_ptr()
        params = self._params  # reused: run() reads it only through self._state
        params.items, params.merges, params.counts = base + 4 * layout.items, base + 4 * layout.merges, base
        params.merge_counters = base + 4 * layout.counters
        params.partial_o = self._float_workspace.data_ptr()
        params.partial_lse = params.partial_o + partial_slots * head_dim * 4
        params.num_qo_heads, params.num_kv_heads, params.group = num_qo_heads, num_kv_heads, group
        params.scale_log2 = (sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)) * LOG2E
        params.cta_q = cta_q
        page_size = 0
        if pages is not None:
            page_size = pages[2]
            params.page_size = page_size
            params.page_div_mul, params.page_div_shift = page_divider(page_size)
            params.page_indices = base + 4 * layout.page_indices
        self._state = _PlanState(
            kernel=variant.kernel, run_fn=variant.run_fn, params=params,
            grid_items=items_cap if self._use_cuda_graph else plan.num_items,
            dtype=q_dtype, batch=batch, total_q=total_q, total_kv=total_kv, num_qo_heads=num_qo_heads,
            num_kv_heads=num_kv_heads, head_dim=head_dim, page_size=page_size, max_page_index=max_page_index)

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

    # ---- buffers ----------------------------------------------------------------------------
    def _pinned_buffer(self, ints: int) -> tuple[int, int]:
        """(address, event) of the staging buffer for this plan. Two pinned buffers alternate; each
        has a CUDA event the C planner waits on before overwriting it and records after its copy."""
        turn = self._pinned_turn
        if self._pinned[turn].numel() < ints:
            event = self._pinned_events[turn]
            if event is not None:
                event.synchronize()  # the old buffer may still be read by its copy
            self._pinned[turn] = torch.empty(max(ints, 4096), dtype=torch.int32, pin_memory=True)
        event = self._pinned_events[turn]
        if event is None:
            event = self._pinned_events[turn] = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self._device))  # creates the CUDA event
        return self._pinned[turn].data_ptr(), event.cuda_event

    def _device_buffer(self, ints: int) -> torch.Tensor:
        buf = self._int_workspace
        if buf is None or buf.numel() < ints:
            if buf is not None and self._use_cuda_graph:
                raise RuntimeError("internal error: CUDA-graph metadata buffer would move")
            buf = torch.empty(max(ints, 4096), dtype=torch.int32, device=self._device)
            self._int_workspace = buf
        return buf


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
        _no_unsupported("BatchPrefillWithRaggedKVCacheWrapper", unsupported)
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
        _no_unsupported("plan()", unsupported)
        _check_heads(num_qo_heads, num_kv_heads, head_dim, head_dim_vo)
        qo = _index_tensor("qo_indptr", qo_indptr, 1)
        kv = _index_tensor("kv_indptr", kv_indptr, 1)
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


class _PageTableCheck(ctypes.Structure):
    """Mirror of fij::PageTableCheck."""

    _fields_ = [("error_index", ctypes.c_int64), ("min_page", ctypes.c_int32), ("max_page", ctypes.c_int32)]


_PAGED_LENGTHS_ARGTYPES = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32,
                           ctypes.c_int32, ctypes.c_void_p, ctypes.POINTER(_PageTableCheck)]


def _paged_kv_lengths(variant: "_Variant", indptr: torch.Tensor, last_page_len: torch.Tensor, indices: torch.Tensor,
                      page_size: int, batch: int) -> tuple[torch.Tensor, int]:
    """Check a host page table (in C: microseconds even for 100k pages) and return the cumulative KV
    lengths [batch + 1] and the largest page index in use (-1 for none)."""
    kv_indptr = torch.empty(batch + 1, dtype=torch.int32)
    check = _PageTableCheck()
    status = variant.kernel.function("paged_lengths", _PAGED_LENGTHS_ARGTYPES)(
        indptr.data_ptr(), last_page_len.data_ptr(), indices.data_ptr(), indices.numel(), batch, page_size,
        kv_indptr.data_ptr(), ctypes.byref(check))
    i = check.error_index
    if status == 1:
        raise ValueError(f"paged_kv_indptr[0] must be 0, got {int(indptr[0])}")
    if status == 2:
        raise ValueError(f"paged_kv_indptr must be non-decreasing (at index {i}: "
                         f"paged_kv_indptr[{i}:{i + 2}] = {indptr[i:i + 2].tolist()})")
    if status == 3:
        pages = int(indptr[i + 1] - indptr[i])
        raise ValueError(
            f"paged_kv_last_page_len[{i}] = {int(last_page_len[i])} is invalid: expected 1..{page_size} for a "
            f"request with pages ({pages} here), 0 for a request without pages")
    if status == 4:
        raise ValueError(f"paged_kv_indices: expected at least paged_kv_indptr[-1] = {int(indptr[batch])} "
                         f"entries, got {indices.numel()}")
    if check.min_page < 0:
        raise ValueError(f"paged_kv_indices: page indices must be >= 0, got {check.min_page}")
    return kv_indptr, check.max_page


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
        _no_unsupported("BatchPrefillWithPagedKVCacheWrapper", unsupported)
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
        _no_unsupported("plan()", unsupported)
        _check_heads(num_qo_heads, num_kv_heads, head_dim, head_dim_vo)
        if not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size: expected a positive int, got {page_size!r}")
        qo = _index_tensor("qo_indptr", qo_indptr, 1)
        batch = qo.numel() - 1
        indptr = _index_tensor("paged_kv_indptr", paged_kv_indptr, 1)
        if indptr.numel() != batch + 1:
            raise ValueError(f"paged_kv_indptr: expected {batch + 1} entries (batch_size + 1), got {indptr.numel()}")
        indices = _index_tensor("paged_kv_indices", paged_kv_indices)
        last = _index_tensor("paged_kv_last_page_len", paged_kv_last_page_len)
        if last.numel() != batch:
            raise ValueError(f"paged_kv_last_page_len: expected {batch} entries (batch_size), got {last.numel()}")
        layout_name = f"paged_{self._kv_layout.lower()}"
        q_dtype = _check_dtypes(q_data_type, kv_data_type)  # before the kernel library is loaded
        variant = _variant(layout_name, head_dim, q_dtype, bool(causal))
        kv_lens, max_page = _paged_kv_lengths(variant, indptr, last, indices, page_size, batch)
        self._plan(layout_name, qo, kv_lens, num_qo_heads, num_kv_heads, head_dim, causal, sm_scale, q_data_type,
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
        _no_unsupported("BatchDecodeWithPagedKVCacheWrapper", unsupported)
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
        _no_unsupported("plan()", unsupported)
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


_single_workspaces: dict[torch.device, torch.Tensor] = {}


def single_prefill_with_kv_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                                 sm_scale: Optional[float] = None, kv_layout: str = "NHD",
                                 return_lse: bool = False, **unsupported: Any):
    """Attention for one request: q [q_len, Hq, D]; k, v [kv_len, Hkv, D] (NHD) or [Hkv, kv_len, D] (HND)."""
    _no_unsupported("single_prefill_with_kv_cache", unsupported)
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
