"""The prefill work-list planner, called on the CPU through the kernel library's C planner.

`templates/include/flashinfer_jit/prefill_plan.h` holds the algorithm (C++, microseconds from host
indptr arrays, no device sync); this module mirrors its structs and turns its status codes into
clear Python errors.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from .loader import LoadedKernel

ITEM_INTS = 16  # sizeof(WorkItem) / 4
MERGE_INTS = 4  # sizeof(MergeEntry) / 4


class PlanConfig(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int32) for name in (
        "batch", "group", "num_kv_heads", "cta_q", "kv_tile", "causal", "target_ctas",
        "min_chunk_tiles", "split_tiles", "reserved")]


class PlanResult(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in ("num_items", "num_merges", "partial_rows", "error_index")]


class UploadLayout(ctypes.Structure):
    """Mirror of fij::UploadLayout: int32 offsets of the plan metadata in the workspace."""

    _fields_ = [(name, ctypes.c_int64) for name in (
        "page_indices", "items", "merges", "counters", "total",
        "item_capacity", "merge_capacity", "partial_slots")]


PLAN_OK, PLAN_CAPACITY, PLAN_WORKSPACE = 0, 1, 7
_PLAN_ERRORS = {
    2: "qo_indptr[0] must be 0",
    3: "kv_indptr[0] must be 0",
    4: "qo_indptr must be non-decreasing",
    5: "kv_indptr must be non-decreasing",
    6: "invalid plan configuration",
}
_PLAN_ARGTYPES = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(PlanConfig), ctypes.c_void_p, ctypes.c_int64,
                  ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(PlanResult)]

# A split KV chunk spans at least this many KV tiles: shorter chunks cost more in merging than they gain.
MIN_CHUNK_TILES = 4


@dataclass(frozen=True)
class Plan:
    num_items: int
    num_merges: int
    partial_rows: int


class PlanCall(ctypes.Structure):
    """Mirror of fij::PlanCall: every argument of plan_and_upload in one struct (one ctypes argument)."""

    _fields_ = [
        ("qo_indptr", ctypes.c_void_p), ("kv_indptr", ctypes.c_void_p), ("config", ctypes.POINTER(PlanConfig)),
        ("host", ctypes.c_void_p), ("layout", ctypes.POINTER(UploadLayout)), ("page_indptr", ctypes.c_void_p),
        ("page_indices", ctypes.c_void_p), ("num_page_indices", ctypes.c_int64), ("device", ctypes.c_void_p),
        ("stream", ctypes.c_void_p), ("host_free", ctypes.c_void_p), ("result", ctypes.POINTER(PlanResult)),
    ]


def raise_plan_error(status: int, result: PlanResult, qo_indptr: torch.Tensor, kv_indptr: torch.Tensor) -> None:
    where = ""
    if result.error_index >= 0:
        name = "qo_indptr" if status == 4 else "kv_indptr"
        values = (qo_indptr if status == 4 else kv_indptr)[result.error_index: result.error_index + 2].tolist()
        where = f" (at index {result.error_index}: {name}[{result.error_index}:{result.error_index + 2}] = {values})"
    raise ValueError(_PLAN_ERRORS.get(status, f"planner error {status}") + where)


def plan_and_upload(kernel: LoadedKernel, call: PlanCall, qo_indptr: torch.Tensor,
                    kv_indptr: torch.Tensor) -> tuple[int, Plan]:
    """Plan into pinned host memory and start the one host-to-device copy (all in C). Returns
    (PLAN_OK | PLAN_CAPACITY | PLAN_WORKSPACE, counts); raises on bad indptrs or a failed CUDA call."""
    status = kernel.function("plan_upload", [ctypes.POINTER(PlanCall)])(ctypes.byref(call))
    result = call.result.contents
    if status < 0:
        kernel.check(-status, "plan upload (host-to-device copy)")
    if status not in (PLAN_OK, PLAN_CAPACITY, PLAN_WORKSPACE):
        raise_plan_error(status, result, qo_indptr, kv_indptr)
    return status, Plan(result.num_items, result.num_merges, result.partial_rows)


def run_planner(kernel: LoadedKernel, qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, config: PlanConfig,
                items_ptr: int, item_capacity: int, merges_ptr: int, merge_capacity: int) -> tuple[int, Plan]:
    """Run the C planner on host int32 indptrs. Returns (status, counts); raises on bad indptrs."""
    result = PlanResult()
    status = kernel.function("plan", _PLAN_ARGTYPES)(
        qo_indptr.data_ptr(), kv_indptr.data_ptr(), ctypes.byref(config),
        items_ptr, item_capacity, merges_ptr, merge_capacity, ctypes.byref(result))
    if status not in (PLAN_OK, PLAN_CAPACITY):
        raise_plan_error(status, result, qo_indptr, kv_indptr)
    return status, Plan(result.num_items, result.num_merges, result.partial_rows)


def plan_to_tensors(kernel: LoadedKernel, qo_indptr: torch.Tensor, kv_indptr: torch.Tensor,
                    config: PlanConfig) -> tuple[torch.Tensor, torch.Tensor, Plan]:
    """Plan into fresh CPU tensors: items [n, 16] and merges [m, 4] int32 (tests and inspection)."""
    capacity = 1024
    while True:
        items = torch.empty((capacity, ITEM_INTS), dtype=torch.int32)
        merges = torch.empty((capacity, MERGE_INTS), dtype=torch.int32)
        status, plan = run_planner(kernel, qo_indptr, kv_indptr, config, items.data_ptr(), capacity,
                                   merges.data_ptr(), capacity)
        if status == PLAN_OK:
            return items[: plan.num_items].clone(), merges[: plan.num_merges].clone(), plan
        capacity = max(plan.num_items, plan.num_merges) + 1
