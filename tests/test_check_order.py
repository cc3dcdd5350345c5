"""Host-side argument checks come before device checks, so the first error names the root cause.

On a machine without a GPU (CI), a wrapper built on a CPU workspace must still report a bad
qo_indptr, a bad page table or an unsupported head_dim, and only a plan whose host-side arguments
are all valid reports the workspace's device. The kernel library is real (nvcc-built; it loads
without a GPU); nothing here touches a GPU, so the test is the same with or without one.
"""
from __future__ import annotations

import pytest
import torch

import flashinfer_jit
from conftest import requires_nvcc

pytestmark = [pytest.mark.slow, requires_nvcc]

HQ, HKV, D = 8, 2, 64


def i32(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


def cpu_workspace() -> torch.Tensor:
    return torch.empty(1 << 20, dtype=torch.int8)  # FlashInfer's tests allocate int8 workspaces


@pytest.mark.parametrize("qo, kv, message", [
    ([0, 5, 3], [0, 4, 8], "qo_indptr must be non-decreasing"),
    ([1, 5, 6], [0, 4, 8], r"qo_indptr\[0\] must be 0"),
    ([0, 5, 6], [0, 9, 8], "kv_indptr must be non-decreasing"),
])
def test_ragged_bad_indptr_is_reported_before_the_workspace_device(qo, kv, message):
    wrapper = flashinfer_jit.BatchPrefillWithRaggedKVCacheWrapper(cpu_workspace(), "NHD")
    with pytest.raises(ValueError, match=message):
        wrapper.plan(i32(qo), i32(kv), HQ, HKV, D, causal=True, q_data_type=torch.float16)


def test_unsupported_head_dim_is_reported_first():
    wrapper = flashinfer_jit.BatchPrefillWithRaggedKVCacheWrapper(cpu_workspace(), "NHD")
    with pytest.raises(ValueError, match="head_dim"):
        wrapper.plan(i32([0, 5, 3]), i32([0, 4, 8]), HQ, HKV, 96, q_data_type=torch.float16)


def test_paged_bad_page_table_is_reported_before_the_workspace_device():
    wrapper = flashinfer_jit.BatchPrefillWithPagedKVCacheWrapper(cpu_workspace(), "NHD")
    with pytest.raises(ValueError, match="paged_kv_last_page_len"):
        wrapper.plan(i32([0, 3, 5]), i32([0, 1, 2]), i32([4, 7]), i32([17, 5]), HQ, HKV, D, 16,
                     q_data_type=torch.float16)


def test_decode_bad_indptr_is_reported_before_the_workspace_device():
    wrapper = flashinfer_jit.BatchDecodeWithPagedKVCacheWrapper(cpu_workspace(), "NHD")
    with pytest.raises(ValueError, match="paged_kv_indptr must be non-decreasing"):
        wrapper.plan(i32([0, 2, 1]), i32([4, 7]), i32([3, 5]), HQ, HKV, D, 16, q_data_type=torch.float16)


def test_valid_host_arguments_then_name_the_workspace_device():
    wrapper = flashinfer_jit.BatchPrefillWithRaggedKVCacheWrapper(cpu_workspace(), "NHD")
    with pytest.raises(ValueError, match="float_workspace_buffer: expected a CUDA tensor"):
        wrapper.plan(i32([0, 5, 6]), i32([0, 4, 8]), HQ, HKV, D, causal=True, q_data_type=torch.float16)
