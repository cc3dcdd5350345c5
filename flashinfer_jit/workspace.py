"""Workspace and CUDA-graph capacity policy of the batch attention wrappers.

A wrapper owns: the caller's float workspace, used as raw bytes whatever its dtype, as FlashInfer does
(split-KV partial states: fp32 O [slots, D] then LSE [slots]); one int32 metadata buffer on the device (counts, page table, work items, merge counters;
see `IntLayout`); and two pinned staging buffers the C planner writes before its one host-to-device
copy. Under use_cuda_graph the first plan fixes every capacity (`GraphLimits`) so that the buffers,
and the grid a captured graph launches, never move.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .abi import ITEM_INTS, UploadLayout

COUNTS_INTS = 4  # [num_items, num_merges, pad, pad] at the start of the int workspace


def _align16(n: int) -> int:
    return (n + 15) // 16 * 16


def _align8(n: int) -> int:
    return (n + 7) // 8 * 8


class IntLayout:
    """Offsets (in int32) of the plan metadata in the int workspace. Work items start 64-byte
    aligned (the kernel reads each in four 16-byte loads)."""

    def __init__(self, item_capacity: int, merge_capacity: int, page_capacity: int, num_kv_heads: int):
        self.item_capacity, self.merge_capacity = item_capacity, merge_capacity
        self.page_indices = _align16(COUNTS_INTS)
        self.items = self.page_indices + _align16(page_capacity)
        self.counters = self.items + item_capacity * ITEM_INTS  # [merge_capacity, Hkv], zeroed by every plan
        self.total_ints = self.counters + _align8(merge_capacity * num_kv_heads)

    def as_struct(self, partial_slots: int) -> UploadLayout:
        return UploadLayout(self.page_indices, self.items, self.counters, self.total_ints,
                            self.item_capacity, self.merge_capacity, partial_slots)


@dataclass(frozen=True)
class GraphLimits:
    """What the first plan of a CUDA-graph wrapper fixes for all later ones."""

    batch: int
    total_q: int
    items: int  # work items (every one a CTA of the captured grid; surplus ones exit at once)
    merges: int
    cta_q: int
    pages: int


def _graph_limits(batch: int, total_q: int, group: int, cta_q: int, num_kv_heads: int, sms: int, slots_per_gpu: int,
                  fixed_split: bool, num_pages: int, page_table_room: int) -> GraphLimits:
    # q tiles of any later plan within these limits (at this cta_q), plus split chunks: automatic
    # splitting adds at most sms / num_kv_heads of them (prefill_plan.h); a fixed split size can add
    # more, so it gets room for a full GPU of extra chunks. Every slot is a CTA the captured grid
    # launches (surplus ones exit at once).
    extra_chunks = slots_per_gpu if fixed_split else sms // num_kv_heads + 1
    items = math.ceil(total_q * group / cta_q) + batch + extra_chunks + 16
    # Page-table room: the paged_kv_indices_buffer given to the constructor, else the length of the
    # first plan's indices tensor (pass the whole, padded page table), and at least twice the pages in use.
    return GraphLimits(batch=batch, total_q=total_q, items=items, merges=items, cta_q=cta_q,
                       pages=max(page_table_room, 2 * num_pages + 64))


class Workspace:
    """The buffers one wrapper plans into (see the module docstring)."""

    def __init__(self, float_workspace_buffer: torch.Tensor, use_cuda_graph: bool, max_num_pages: int = 0):
        self.float_buffer = float_workspace_buffer
        self.nbytes = float_workspace_buffer.numel() * float_workspace_buffer.element_size()  # any dtype: bytes
        self.device = float_workspace_buffer.device
        self.use_cuda_graph = use_cuda_graph
        self.max_num_pages = max_num_pages
        self.limits: Optional[GraphLimits] = None  # set by the first successful plan under use_cuda_graph
        self._int_workspace: Optional[torch.Tensor] = None
        self._pinned: list[torch.Tensor] = [torch.empty(0, dtype=torch.int32), torch.empty(0, dtype=torch.int32)]
        self._pinned_events: list[Optional[torch.cuda.Event]] = [None, None]
        self._pinned_turn = 0

    def partial_slots(self, head_dim: int) -> int:
        """(row, KV head) partial states the float workspace holds, at offsets fixed by its size (a
        captured CUDA graph keeps valid pointers across plans)."""
        return self.nbytes // (4 * (head_dim + 1))

    @property
    def fixed_cta_q(self) -> Optional[int]:
        """The q tile size every plan must use (CUDA graphs: the first plan's), else None."""
        return self.limits.cta_q if self.limits is not None else None

    def capacities(self, *, batch: int, total_q: int, group: int, cta_q: int, num_kv_heads: int, sms: int,
                   slots_per_gpu: int, fixed_split: bool, num_pages: int,
                   page_table_len: int) -> tuple[int, int, int, Optional[GraphLimits]]:
        """(work items, merges, page-table entries) to size this plan's metadata for, and the graph
        limits to keep after it. Raises when a CUDA-graph plan exceeds the first plan's limits."""
        if not self.use_cuda_graph:
            # Enough for any plan, so the planner runs once: splitting adds at most sms / num_kv_heads
            # chunks (prefill_plan.h: only tiles longer than the per-CTA share split).
            items = total_q * group // cta_q + batch + sms // num_kv_heads + 1
            return items, items, num_pages, None
        limits = self.limits
        if limits is None:
            limits = _graph_limits(batch, total_q, group, cta_q, num_kv_heads, sms, slots_per_gpu, fixed_split,
                                   num_pages, max(self.max_num_pages, page_table_len))
        elif batch > limits.batch or total_q > limits.total_q or num_pages > limits.pages:
            raise ValueError(
                f"with use_cuda_graph=True later plans must fit the first: batch {batch} (max {limits.batch}), "
                f"total q tokens {total_q} (max {limits.total_q}), pages {num_pages} (max {limits.pages}); "
                f"create a new wrapper for larger batches, or give paged_kv_indices_buffer (its length is the "
                f"page-table room) to the constructor")
        return limits.items, limits.merges, limits.pages, limits

    def replace_float_buffer(self, float_workspace_buffer: torch.Tensor) -> None:
        """reset_workspace_buffer(): later plans put their partial states in the new buffer."""
        self.float_buffer = float_workspace_buffer
        self.nbytes = float_workspace_buffer.numel() * float_workspace_buffer.element_size()

    @property
    def device_ints(self) -> Optional[torch.Tensor]:
        """The int32 metadata buffer on the device (None before the first plan)."""
        return self._int_workspace

    def release_staging(self) -> None:
        """Wait for the staging buffers' last host-to-device copies (long finished, normally) so that freeing
        them cannot hand memory still being read to another pinned allocation."""
        for event in self._pinned_events:
            if event is not None:
                event.synchronize()

    def committed(self, limits: Optional[GraphLimits]) -> None:
        """A plan was uploaded: the next one stages in the other pinned buffer; keep its limits."""
        self._pinned_turn ^= 1
        self.limits = limits

    def pinned_buffer(self, ints: int) -> tuple[int, int]:
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
            event.record(torch.cuda.current_stream(self.device))  # creates the CUDA event
        return self._pinned[turn].data_ptr(), event.cuda_event

    def device_buffer(self, ints: int) -> torch.Tensor:
        """The int32 metadata buffer on the device, grown to `ints` (never moved under CUDA graphs)."""
        buf = self._int_workspace
        if buf is None or buf.numel() < ints:
            if buf is not None and self.use_cuda_graph:
                raise RuntimeError("internal error: CUDA-graph metadata buffer would move")
            buf = torch.empty(max(ints, 4096), dtype=torch.int32, device=self.device)
            self._int_workspace = buf
        return buf
