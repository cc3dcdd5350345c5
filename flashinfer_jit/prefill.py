"""Batch prefill over ragged KV: FlashInfer's `BatchPrefillWithRaggedKVCacheWrapper` and
`single_prefill_with_kv_cache`.

Semantics follow FlashInfer: LSE is base 2; causal masks are bottom-right aligned (query i of a
request sees keys j <= kv_len - q_len + i); sm_scale defaults to 1/sqrt(head_dim).

Stricter than FlashInfer, and documented here:
  - every tensor is checked (dtype, device, shape, strides, 16-byte aligned rows) before launch, and
    run() must be called with exactly the dtypes and sizes given to plan();
  - indptrs must be int32, start at 0 and be non-decreasing (checked on the host by the planner);
  - plan() accepts CPU indptrs without any device synchronization (a CUDA indptr costs one copy);
  - rows that see no key (kv_len 0, or causal rows left of the diagonal) give O = 0 and LSE = -inf;
  - a float workspace too small for the split-KV partial states is an error that says how large
    it must be, never an overflow.
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
from .scheduler import ITEM_INTS, MERGE_INTS, MIN_CHUNK_TILES, PLAN_OK, PlanConfig, run_planner
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
        ("qo_indptr", ctypes.c_void_p), ("kv_indptr", ctypes.c_void_p), ("items", ctypes.c_void_p),
        ("merges", ctypes.c_void_p), ("counts", ctypes.c_void_p),
        ("partial_o", ctypes.c_void_p), ("partial_lse", ctypes.c_void_p),
        ("num_qo_heads", ctypes.c_int32), ("num_kv_heads", ctypes.c_int32), ("group", ctypes.c_int32),
        ("scale_log2", ctypes.c_float), ("cta_q", ctypes.c_int32), ("reserved", ctypes.c_int32),
    ]


_RUN_ARGTYPES = [ctypes.POINTER(PrefillParams), ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
_BLOCKS_ARGTYPES = [ctypes.c_int]


@dataclass
class _PlanState:
    """Everything run() needs, computed once by plan()."""

    spec: PrefillSpec
    kernel: loader.LoadedKernel
    run_fn: Any
    params: PrefillParams
    grid_items: int
    grid_merges: int
    device: torch.device
    dtype: torch.dtype
    batch: int
    total_q: int
    total_kv: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int


_plans: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()
_plan_ids = itertools.count(1)


def _prefill_run_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                      lse: Optional[torch.Tensor], plan_id: int) -> None:
    owner = _plans.get(plan_id)
    if owner is None or owner._state is None:
        raise RuntimeError(f"prefill plan {plan_id} no longer exists; call plan() again")
    state: _PlanState = owner._state
    p = state.params
    p.q, p.k, p.v, p.o = q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr()
    p.lse = lse.data_ptr() if lse is not None else None
    p.q_stride_n, p.q_stride_h = q.stride(0), q.stride(1)
    p.k_stride_n, p.k_stride_h = owner._kv_strides(k)
    p.v_stride_n, p.v_stride_h = owner._kv_strides(v)
    p.o_stride_n, p.o_stride_h = o.stride(0), o.stride(1)
    with device_guard(q.device):
        code = state.run_fn(ctypes.byref(p), state.grid_items, state.grid_merges, stream_of(q.device))
    state.kernel.check(code, "batch prefill")


_prefill_run_op = define(
    "prefill_run(Tensor q, Tensor k, Tensor v, Tensor(a!) o, Tensor(b!)? lse, int plan_id) -> ()",
    _prefill_run_cuda, lambda *args: None,
)

_blocks_per_sm: dict[tuple[int, PrefillSpec, int], int] = {}


def _target_ctas(kernel: loader.LoadedKernel, spec: PrefillSpec, device: torch.device, cta_q: int) -> int:
    """CTAs that fill the GPU: SMs x resident CTAs per SM of this kernel (occupancy query)."""
    key = (device.index or 0, spec, cta_q)
    blocks = _blocks_per_sm.get(key)
    if blocks is None:
        with device_guard(device):
            blocks = kernel.function("blocks_per_sm", _BLOCKS_ARGTYPES)(cta_q)
        if blocks <= 0:
            kernel.check(-blocks or 1, "occupancy query")
        _blocks_per_sm[key] = blocks
    return blocks * torch.cuda.get_device_properties(device).multi_processor_count


def _kv_tile(kernel: loader.LoadedKernel) -> int:
    """Keys per KV tile, as compiled into the library (the planner must use the kernel's value)."""
    return kernel.function("kv_tile", [])()


def _check_indptr(name: str, indptr: object) -> torch.Tensor:
    t = validate.tensor(name, indptr, dtypes=(torch.int32,), ndim=1)
    if t.numel() < 1:
        raise ValueError(f"{name}: expected at least one entry (batch_size + 1), got {tuple(t.shape)}")
    return t


def _host_int32(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy/view. A CUDA indptr costs one device-to-host copy (a sync)."""
    return t.contiguous() if t.device.type == "cpu" else t.to("cpu")


class BatchPrefillWithRaggedKVCacheWrapper:
    """Batch prefill attention over ragged K/V (all requests packed along the token axis).

    Args:
        float_workspace_buffer: uint8 CUDA tensor for split-KV partial states. 128 MB covers any
            batch FlashInfer's default covers; plan() says how many bytes a plan needs if it is short.
        kv_layout: "NHD" (k, v: [total_kv, Hkv, D]) or "HND" (k, v: [Hkv, total_kv, D]).
        use_cuda_graph: make run() capturable: grids and metadata buffers are fixed by the first
            plan(); later plans may change lengths as long as the batch size and the total q tokens
            do not exceed the first plan's. q/k/v/out may then be larger than the planned totals
            (rows past the plan are ignored and not written).
    """

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD", use_cuda_graph: bool = False,
                 **unsupported: Any):
        if unsupported:
            raise TypeError(f"unsupported arguments {sorted(unsupported)}: flashinfer-jit does not implement them")
        validate.cuda_tensor("float_workspace_buffer", float_workspace_buffer, dtypes=(torch.uint8,), ndim=1)
        if kv_layout not in ("NHD", "HND"):
            raise ValueError(f"kv_layout: expected 'NHD' or 'HND', got {kv_layout!r}")
        self._float_workspace = float_workspace_buffer
        self._device = float_workspace_buffer.device
        self._kv_layout = kv_layout
        self._use_cuda_graph = use_cuda_graph
        self._int_workspace: Optional[torch.Tensor] = None
        self._pinned: list[torch.Tensor] = []
        self._pinned_events: list[Optional[torch.cuda.Event]] = [None, None]
        self._pinned_turn = 0
        self._graph_limits: Optional[dict[str, int]] = None
        self._state: Optional[_PlanState] = None
        self._plan_id = next(_plan_ids)
        _plans[self._plan_id] = self

    @property
    def is_cuda_graph_enabled(self) -> bool:
        return self._use_cuda_graph

    def _kv_strides(self, t: torch.Tensor) -> tuple[int, int]:
        return (t.stride(0), t.stride(1)) if self._kv_layout == "NHD" else (t.stride(1), t.stride(0))

    # ------------------------------------------------------------------------------------------
    def plan(self, qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, num_qo_heads: int, num_kv_heads: int,
             head_dim: int, causal: bool = False, sm_scale: Optional[float] = None,
             q_data_type: Union[str, torch.dtype] = torch.float16,
             kv_data_type: Optional[Union[str, torch.dtype]] = None, head_dim_vo: Optional[int] = None,
             fixed_split_size: Optional[int] = None, disable_split_kv: bool = False, **unsupported: Any) -> None:
        """Plan a batch. qo_indptr, kv_indptr: int32 [batch + 1], on the CPU (no device sync) or CUDA.

        fixed_split_size (KV tokens per chunk, a multiple of the KV tile) and disable_split_kv make the
        split decision independent of the batch (batch-invariant results)."""
        if unsupported:
            raise TypeError(f"unsupported plan() arguments {sorted(unsupported)}: flashinfer-jit does not implement them")
        q_dtype = _as_dtype("q_data_type", q_data_type)
        kv_dtype = _as_dtype("kv_data_type", kv_data_type) if kv_data_type is not None else q_dtype
        if kv_dtype != q_dtype:
            raise TypeError(f"kv_data_type: expected the same dtype as q_data_type ({q_dtype}), got {kv_dtype}")
        validate.head_dim("head_dim", head_dim)
        if head_dim_vo not in (None, head_dim):
            raise ValueError(f"head_dim_vo: expected None or {head_dim} (equal q/k and v head dims), got {head_dim_vo}")
        for name, value in (("num_qo_heads", num_qo_heads), ("num_kv_heads", num_kv_heads)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if num_qo_heads % num_kv_heads:
            raise ValueError(f"num_qo_heads ({num_qo_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        qo = _check_indptr("qo_indptr", qo_indptr)
        kv = _check_indptr("kv_indptr", kv_indptr)
        if qo.numel() != kv.numel():
            raise ValueError(f"kv_indptr: expected {qo.numel()} entries like qo_indptr (batch_size + 1), got {kv.numel()}")
        qo_host, kv_host = _host_int32(qo), _host_int32(kv)
        batch = qo_host.numel() - 1
        total_q, total_kv = int(qo_host[-1]), int(kv_host[-1])
        group = num_qo_heads // num_kv_heads

        spec = PrefillSpec(kv_layout="ragged", head_dim=head_dim, dtype=dtype_name(q_dtype), causal=bool(causal))
        kernel = loader.load(spec)
        if self._graph_limits is not None:
            cta_q = self._graph_limits["cta_q"]
        elif head_dim == 256:
            cta_q = 64
        else:
            cta_q = 128 if total_q * group > 64 * max(batch, 1) else 64
        target = _target_ctas(kernel, spec, self._device, cta_q)
        if disable_split_kv:
            split_tiles = -1
        elif fixed_split_size is not None:
            kv_tile = _kv_tile(kernel)
            if fixed_split_size <= 0 or fixed_split_size % kv_tile:
                raise ValueError(f"fixed_split_size: expected a positive multiple of {kv_tile}, got {fixed_split_size}")
            split_tiles = fixed_split_size // kv_tile
        else:
            split_tiles = 0
        kv_tile = _kv_tile(kernel)
        config = PlanConfig(batch, group, num_kv_heads, cta_q, kv_tile, int(bool(causal)), target,
                            MIN_CHUNK_TILES, split_tiles, 0)

        if self._use_cuda_graph:
            limits = self._graph_limits
            if limits is None:
                items_cap = math.ceil(total_q * group / 64) + batch + 4 * target + 16
                limits = {"batch": batch, "total_q": total_q, "items": items_cap, "merges": items_cap, "cta_q": cta_q}
            elif batch > limits["batch"] or total_q > limits["total_q"]:
                raise ValueError(
                    f"with use_cuda_graph=True later plans must fit the first: batch {batch} (max {limits['batch']}), "
                    f"total q tokens {total_q} (max {limits['total_q']}); create a new wrapper for larger batches")
            batch_cap, items_cap, merges_cap = limits["batch"], limits["items"], limits["merges"]
        else:
            batch_cap, items_cap, merges_cap = batch, 0, 0

        # Plan straight into pinned host memory, growing it when the planner asks for more room.
        while True:
            layout = _IntLayout(batch_cap, max(items_cap, 1), max(merges_cap, 1))
            host = self._pinned_buffer(layout.total_ints)
            status, plan = run_planner(
                kernel, qo_host, kv_host, config,
                host.data_ptr() + 4 * layout.items, layout.item_capacity,
                host.data_ptr() + 4 * layout.merges, layout.merge_capacity)
            if status == PLAN_OK:
                break
            if self._use_cuda_graph:
                raise ValueError(
                    f"this plan needs {plan.num_items} work items / {plan.num_merges} merges but the CUDA-graph "
                    f"buffers were sized for {items_cap} / {merges_cap} by the first plan; create a new wrapper")
            items_cap, merges_cap = plan.num_items, plan.num_merges

        partial_bytes = plan.partial_rows * num_kv_heads * (head_dim + 1) * 4
        if partial_bytes > self._float_workspace.numel() // (4 * (head_dim + 1)) * (4 * (head_dim + 1)):
            raise ValueError(
                f"float_workspace_buffer holds {self._float_workspace.numel()} bytes but this plan's split-KV "
                f"partial states need {partial_bytes} bytes; pass a buffer of at least that size (or "
                f"disable_split_kv=True)")

        host[0], host[1] = plan.num_items, plan.num_merges
        host[layout.qo: layout.qo + batch + 1].copy_(qo_host)
        host[layout.kv: layout.kv + batch + 1].copy_(kv_host)
        device_ints = self._device_buffer(layout.total_ints)
        device_ints[: layout.total_ints].copy_(host[: layout.total_ints], non_blocking=True)
        self._mark_pinned_in_use()
        if self._use_cuda_graph:
            self._graph_limits = limits

        base = device_ints.data_ptr()
        params = PrefillParams()
        params.qo_indptr, params.kv_indptr = base + 4 * layout.qo, base + 4 * layout.kv
        params.items, params.merges, params.counts = base + 4 * layout.items, base + 4 * layout.merges, base
        # Partial states: fp32 O [slots, D] then LSE [slots] at offsets fixed by the buffer size (so a
        # captured CUDA graph keeps valid pointers across plans).
        slots = self._float_workspace.numel() // (4 * (head_dim + 1))
        params.partial_o = self._float_workspace.data_ptr()
        params.partial_lse = params.partial_o + slots * head_dim * 4
        params.num_qo_heads, params.num_kv_heads, params.group = num_qo_heads, num_kv_heads, group
        params.scale_log2 = (sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)) * LOG2E
        params.cta_q = cta_q
        self._state = _PlanState(
            spec=spec, kernel=kernel, run_fn=kernel.function("run", _RUN_ARGTYPES), params=params,
            grid_items=items_cap if self._use_cuda_graph else plan.num_items,
            grid_merges=merges_cap if self._use_cuda_graph else plan.num_merges,
            device=self._device, dtype=q_dtype, batch=batch, total_q=total_q, total_kv=total_kv,
            num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)

    begin_forward = plan

    # ------------------------------------------------------------------------------------------
    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: Optional[torch.Tensor] = None,
            lse: Optional[torch.Tensor] = None, return_lse: bool = False):
        """Attention for the planned batch. Returns out, or (out, lse) when return_lse is True."""
        s = self._state
        if s is None:
            raise RuntimeError("run() called before plan()")
        graph = self._use_cuda_graph
        rows_q = _rows(s.total_q, graph)
        rows_kv = _rows(s.total_kv, graph)
        validate.cuda_tensor("q", q, dtypes=(s.dtype,), shape=(rows_q, s.num_qo_heads, s.head_dim), device=s.device)
        kv_shape = (rows_kv, s.num_kv_heads, s.head_dim) if self._kv_layout == "NHD" else (s.num_kv_heads, rows_kv, s.head_dim)
        validate.tensor("k", k, dtypes=(s.dtype,), shape=kv_shape, device=s.device)
        validate.tensor("v", v, dtypes=(s.dtype,), shape=kv_shape, device=s.device)
        _check_rows_fit("q", q.shape[0], s.total_q)
        kv_rows = k.shape[0] if self._kv_layout == "NHD" else k.shape[1]
        _check_rows_fit("k", kv_rows, s.total_kv)
        for name, t in (("q", q), ("k", k), ("v", v)):
            validate.vector_rows(name, t)
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        else:
            validate.tensor("out", out, dtypes=(s.dtype,), shape=tuple(q.shape), device=s.device)
            validate.vector_rows("out", out)
        if lse is None and return_lse:
            lse = torch.empty((q.shape[0], s.num_qo_heads), dtype=torch.float32, device=q.device)
        elif lse is not None:
            validate.tensor("lse", lse, dtypes=(torch.float32,), shape=(q.shape[0], s.num_qo_heads), device=s.device)
            if not lse.is_contiguous():
                raise ValueError(f"lse: expected a contiguous tensor, got strides {lse.stride()}")
        if s.total_q > 0 and (s.grid_items > 0 or s.grid_merges > 0):
            _prefill_run_op(q, k, v, out, lse, self._plan_id)
        return (out, lse) if return_lse else out

    forward = run

    def run_return_lse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any):
        return self.run(q, k, v, return_lse=True, **kw)

    # ---- buffers ----------------------------------------------------------------------------
    def _pinned_buffer(self, ints: int) -> torch.Tensor:
        """One of two pinned host buffers, alternating, so a plan never overwrites memory that the
        previous plan's asynchronous copy may still be reading."""
        turn = self._pinned_turn
        while len(self._pinned) < 2:
            self._pinned.append(torch.empty(0, dtype=torch.int32))
        event = self._pinned_events[turn]
        if event is not None and not event.query():
            event.synchronize()
        if self._pinned[turn].numel() < ints:
            self._pinned[turn] = torch.empty(max(ints, 4096), dtype=torch.int32, pin_memory=True)
        return self._pinned[turn]

    def _mark_pinned_in_use(self) -> None:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self._device))
        self._pinned_events[self._pinned_turn] = event
        self._pinned_turn ^= 1

    def _device_buffer(self, ints: int) -> torch.Tensor:
        buf = self._int_workspace
        if buf is None or buf.numel() < ints:
            if buf is not None and self._use_cuda_graph:
                raise RuntimeError("internal error: CUDA-graph metadata buffer would move")
            buf = torch.empty(max(ints, 4096), dtype=torch.int32, device=self._device)
            self._int_workspace = buf
        return buf


class _IntLayout:
    """Offsets (in int32) of the metadata in the int workspace: counts, indptrs, items, merges."""

    def __init__(self, batch_capacity: int, item_capacity: int, merge_capacity: int):
        self.item_capacity, self.merge_capacity = item_capacity, merge_capacity
        self.qo = _COUNTS_INTS
        self.kv = self.qo + _align8(batch_capacity + 1)
        self.items = self.kv + _align8(batch_capacity + 1)
        self.merges = self.items + item_capacity * ITEM_INTS
        self.total_ints = self.merges + merge_capacity * MERGE_INTS


def _align8(n: int) -> int:
    return (n + 7) // 8 * 8


def _rows(planned: int, graph: bool) -> Optional[int]:
    return None if graph else planned


def _check_rows_fit(name: str, rows: int, planned: int) -> None:
    if rows < planned:
        raise ValueError(f"{name}: expected at least {planned} tokens (the planned total), got {rows}")


def _as_dtype(name: str, value: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(value, str):
        value = getattr(torch, value, None) if hasattr(torch, value) else None  # type: ignore[assignment]
    if value not in validate.ATTENTION_DTYPES:
        raise TypeError(f"{name}: expected torch.float16 or torch.bfloat16, got {value!r}")
    return value  # type: ignore[return-value]


_single_workspaces: dict[torch.device, torch.Tensor] = {}


def single_prefill_with_kv_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                                 sm_scale: Optional[float] = None, kv_layout: str = "NHD",
                                 return_lse: bool = False, **unsupported: Any):
    """Attention for one request: q [q_len, Hq, D]; k, v [kv_len, Hkv, D] (NHD) or [Hkv, kv_len, D] (HND)."""
    if unsupported:
        raise TypeError(f"unsupported arguments {sorted(unsupported)}: flashinfer-jit does not implement them")
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
