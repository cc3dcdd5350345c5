"""The kernel library's bare planner export (`<prefix>_plan`: the work list into caller memory, no
upload, no CUDA call), bound for tests and inspection on machines without a GPU. The runtime plans
through `planner.plan_and_upload` instead."""
from __future__ import annotations

import ctypes

import torch

from flashinfer_jit.abi import ITEM_INTS, MERGE_INTS, PlanConfig, PlanResult
from flashinfer_jit.loader import LoadedKernel
from flashinfer_jit.planner import PLAN_CAPACITY, PLAN_OK, Plan, raise_plan_error

_PLAN_ARGTYPES = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(PlanConfig), ctypes.c_void_p, ctypes.c_int64,
                  ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(PlanResult)]


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
