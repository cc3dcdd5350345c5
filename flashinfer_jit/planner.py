"""The host C planner of a prefill kernel library, called through ctypes.

`templates/include/flashinfer_jit/prefill_plan.h` holds the algorithms (C++, microseconds from host
arrays, no device sync): the work-list planner (templated on the library's attention variant) and
the page-table check; `plan_upload.h` plans and uploads in one call. This module binds them and turns
their status codes into clear Python errors. The structs are in `abi.py`.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from .abi import PageTableCheck, PlanCall, PlanResult
from .loader import LoadedKernel

PLAN_OK, PLAN_CAPACITY, PLAN_WORKSPACE = 0, 1, 7
_PLAN_ERRORS = {
    2: "qo_indptr[0] must be 0",
    3: "kv_indptr[0] must be 0",
    4: "qo_indptr must be non-decreasing",
    5: "kv_indptr must be non-decreasing",
    6: "invalid plan configuration",
}
_CHECK_ARGTYPES = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.POINTER(PlanResult)]
_PAGED_LENGTHS_ARGTYPES = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32,
                           ctypes.c_int32, ctypes.c_void_p, ctypes.POINTER(PageTableCheck)]

# A split KV chunk spans at least this many KV tiles: shorter chunks cost more in merging than they gain.
MIN_CHUNK_TILES = 4


@dataclass(frozen=True)
class Plan:
    num_items: int
    num_merges: int
    partial_rows: int


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


def check_indptrs(kernel: LoadedKernel, qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, batch: int) -> None:
    """The planner's indptr checks (first entry 0, non-decreasing) on host int32 tensors, run by plan()
    before anything touches the device. Raises ValueError naming the index."""
    result = PlanResult()
    status = kernel.function("check_indptrs", _CHECK_ARGTYPES)(
        qo_indptr.data_ptr(), kv_indptr.data_ptr(), batch, ctypes.byref(result))
    if status != PLAN_OK:
        raise_plan_error(status, result, qo_indptr, kv_indptr)


def paged_kv_lengths(kernel: LoadedKernel, indptr: torch.Tensor, last_page_len: torch.Tensor, indices: torch.Tensor,
                     page_size: int, batch: int) -> tuple[torch.Tensor, int]:
    """Check a host page table (in C: microseconds even for 100k pages) and return the cumulative KV
    lengths [batch + 1] and the largest page index in use (-1 for none)."""
    kv_indptr = torch.empty(batch + 1, dtype=torch.int32)
    check = PageTableCheck()
    status = kernel.function("paged_lengths", _PAGED_LENGTHS_ARGTYPES)(
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
