"""FlashInfer's decode / page / cascade / BatchAttention API, called the way FlashInfer's own tests, vLLM
and SGLang call it (`import flashinfer_jit as flashinfer` must be the only change they need).

CPU (no GPU needed):
* every call shape replayed from FlashInfer 0.7.2's tests (tests/attention/test_batch_decode_kernels.py,
  test_shared_prefix_kernels.py, test_batch_attention.py), vLLM's FlashInfer backend
  (vllm/v1/attention/backends/flashinfer.py: the 21- and 22-argument positional decode plan(), the
  cascade plan, the fast-plan module call) and SGLang's (python/sglang/srt/layers/attention/
  flashinfer_backend.py: begin_forward, fast_decode_plan, forward) binds to our signatures, positional
  arguments to FlashInfer's parameter names;
* the imports they do (`from flashinfer.decode import _get_range_buf, get_seq_lens,
  trtllm_batch_decode_with_kv_cache`, top-level fast_decode_plan, ...) and the wrapper attributes they
  read or write (`_paged_kv_indices_buf`, `_cached_module`, `_fixed_batch_size`, ...);
* off values pass every check (the call then reaches the kernel loader, which the test replaces by a
  sentinel), the values of missing features raise NotSupportedError (a ValueError) before that, never a
  TypeError; int8 workspaces are accepted;
* get_seq_lens / get_batch_indices_positions equal FlashInfer's semantics exactly (its Triton kernel,
  re-done in Python: uncovered tokens -1 / 0, out buffers written in place).

GPU (marked gpu; the style of tests/test_decode_gpu.py, against tests/reference.py's float32 reference,
outputs poisoned with NaN, ragged lengths, GQA groups 1/4/8):
* decode through FlashInfer's and vLLM's call shapes (int8 workspace, positional plan, off values),
  q_len_per_req 2/3 (causal, and is_causal=False), non-contiguous caches, single_decode_with_kv_cache;
* fast_decode_plan as FlashInfer's test and SGLang's CUDA-graph path use it; vLLM's CUDA-graph fast plan
  (`_cached_module.plan`) with a padded batch; CUDAGraphBatchDecodeWithPagedKVCacheWrapper re-planned
  between replays; forward(sm_scale=...) applies its scale (FlashInfer semantics);
* MultiLevelCascadeAttentionWrapper with 2 and 3 levels (decode and causal append), the shared-prefix
  wrappers, BatchAttention on mixed prefill + decode batches;
* each decode wrapper's run() (decode, cascade, BatchAttention) under torch.compile(mode="reduce-overhead",
  fullgraph=True), planned outside, equals eager;
* get_batch_indices_positions on CUDA with out buffers (and under CUDA graph capture).

Run: python -m pytest -q tests/test_flashinfer_decode_api.py   (GPU half: -m gpu, on a GPU machine)
"""
from __future__ import annotations

import functools
import inspect
import math
import random
from typing import Any, Callable

import pytest
import torch

import flashinfer_jit
from flashinfer_jit import attention, cascade, decode, loader, page, prefill
from flashinfer_jit.errors import NotSupportedError

import reference as ref

# ==================================================================================================
# CPU: call shapes bind
# ==================================================================================================

X = object()  # a placeholder argument: binding only looks at how many and which names


class Shape:
    """One call as a caller writes it: callable (a function or 'Class.method'), positional, keyword."""

    def __init__(self, id: str, target: Callable, *args: Any, **kwargs: Any):
        self.id, self.target, self.args, self.kwargs = id, target, args, kwargs

    def bind(self) -> inspect.BoundArguments:
        sig = inspect.signature(self.target)
        params = list(sig.parameters)
        args = ((X,) + self.args) if params and params[0] == "self" else self.args
        return sig.bind(*args, **self.kwargs)


D = decode.BatchDecodeWithPagedKVCacheWrapper
G = decode.CUDAGraphBatchDecodeWithPagedKVCacheWrapper
M = cascade.MultiLevelCascadeAttentionWrapper
SPD = cascade.BatchDecodeWithSharedPrefixPagedKVCacheWrapper
SPP = cascade.BatchPrefillWithSharedPrefixPagedKVCacheWrapper
BA = attention.BatchAttention
PLAN7 = (X,) * 7  # indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size

SHAPES = [
    # ---- FlashInfer 0.7.2 tests/attention/test_batch_decode_kernels.py ----
    Shape("fi/decode __init__ backend", D.__init__, X, "NHD", backend="fa2"),
    Shape("fi/decode plan", D.plan, *PLAN7, logits_soft_cap=0.0, pos_encoding_mode="NONE", data_type=X,
          q_data_type=X),
    Shape("fi/decode run return_lse", D.run, X, X, return_lse=True),
    Shape("fi/decode run out=", D.run, X, X, out=X),
    Shape("fi/fast_decode_plan as wrapper.plan", functools.partial(decode.fast_decode_plan, X), *PLAN7,
          logits_soft_cap=0.0, pos_encoding_mode="NONE", data_type=X, q_data_type=X, non_blocking=True,
          global_override_indptr_cpu=X),
    Shape("fi/cuda-graph wrapper", G.__init__, X, X, X, X, "NHD"),
    Shape("fi/cuda-graph plan", D.plan, *PLAN7, data_type=X, pos_encoding_mode="NONE", q_data_type=X),
    Shape("fi/single_decode", decode.single_decode_with_kv_cache, X, X, X, pos_encoding_mode="NONE",
          logits_soft_cap=0.0),
    Shape("fi/decode __init__ graph + tensor cores", D.__init__, X, "NHD", use_cuda_graph=True,
          use_tensor_cores=True, paged_kv_indptr_buffer=X, paged_kv_indices_buffer=X,
          paged_kv_last_page_len_buffer=X),
    Shape("fi/decode plan q_len_per_req", D.plan, *PLAN7, q_data_type=X, kv_data_type=X, q_len_per_req=2),
    Shape("fi/decode __init__ fa3", D.__init__, X, "NHD", use_tensor_cores=True, backend="fa3"),
    Shape("fi/fast_decode_plan q_len_per_req", decode.fast_decode_plan, *PLAN7, q_data_type=X, kv_data_type=X,
          q_len_per_req=2),
    Shape("fi/decode run tuple cache", D.run, X, (X, X)),
    # ---- FlashInfer tests/attention/test_shared_prefix_kernels.py ----
    Shape("fi/append_paged_kv_cache", page.append_paged_kv_cache, X, X, X, X, X, X, X, X, "NHD"),
    Shape("fi/get_batch_indices_positions", page.get_batch_indices_positions, X, X, 16),
    Shape("fi/get_seq_lens", page.get_seq_lens, X, X, 16),
    Shape("fi/multi-level __init__", M.__init__, 2, X, "NHD"),
    Shape("fi/multi-level plan decode", M.plan, [X, X], [X, X], [X, X], [X, X], 8, 8, 128, 16),
    Shape("fi/multi-level plan append", M.plan, [X, X], [X, X], [X, X], [X, X], 8, 8, 128, 16, causal=False),
    Shape("fi/multi-level run", M.run, X, X),
    Shape("fi/shared-prefix decode __init__", SPD.__init__, X, "NHD"),
    Shape("fi/shared-prefix decode begin_forward", SPD.begin_forward, *PLAN7),
    Shape("fi/shared-prefix decode forward", SPD.forward, X, X, X, X),
    Shape("fi/shared-prefix prefill __init__", SPP.__init__, X, "NHD"),
    Shape("fi/shared-prefix prefill begin_forward", SPP.begin_forward, X, *PLAN7),
    Shape("fi/shared-prefix prefill forward", SPP.forward, X, X, X, X, causal=False),
    Shape("fi/merge_state_in_place mask", cascade.merge_state_in_place, X, X, X, X, mask=X),
    # ---- FlashInfer tests/attention/test_batch_attention.py ----
    Shape("fi/BatchAttention __init__", BA.__init__, kv_layout="HND"),
    Shape("fi/BatchAttention plan", BA.plan, X, X, X, X, 4, 1, 128, 128, 16, causal=True, q_data_type=X,
          kv_data_type=X, logits_soft_cap=0.0),
    Shape("fi/BatchAttention run", BA.run, X, X, v_scale=None, logits_soft_cap=0.0),
    # ---- vLLM vllm/v1/attention/backends/flashinfer.py ----
    Shape("vllm/decode __init__", D.__init__, X, "NHD", use_cuda_graph=True, paged_kv_indptr_buffer=X,
          paged_kv_indices_buffer=X, paged_kv_last_page_len_buffer=X, use_tensor_cores=True),
    # fast_plan_decode's first call: 21 positional (before o_data_type) and 22 positional (with it).
    Shape("vllm/decode plan 21 positional", D.plan, *PLAN7, "NONE", -1, None, X, X, None, X, None, None, True,
          None, None, -1, False),
    Shape("vllm/decode plan 22 positional", D.plan, *PLAN7, "NONE", -1, None, X, X, None, None, X, None, None,
          True, None, None, -1, False),
    Shape("vllm/decode run", D.run, X, X, k_scale=1.0, v_scale=1.0, out=X),
    Shape("vllm/fast plan module call (19 args)", decode._PlanModule.plan, X, X, X, X, X, X, 8, 8, 32, 8, 16, True,
          128, 128, False, -1, -1, False, 0),
    Shape("vllm/fast plan module call (16 args)", decode._PlanModule.plan, X, X, X, X, X, X, 8, 8, 32, 8, 16, True,
          128, 128, False, -1),
    Shape("vllm/cascade __init__", M.__init__, 2, X, "NHD"),
    Shape("vllm/cascade plan", M.plan, [X, X], [X, X], [X, X], [X, X], 32, 8, 128, 16, causal=True, sm_scale=0.1,
          window_left=-1, logits_soft_cap=0.0, q_data_type=X, kv_data_type=X),
    Shape("vllm/cascade run", M.run, X, X),
    # ---- SGLang python/sglang/srt/layers/attention/flashinfer_backend.py ----
    Shape("sglang/decode __init__", D.__init__, X, "NHD", backend="fa2", use_tensor_cores=False),
    Shape("sglang/decode __init__ graph", D.__init__, X, "NHD", backend="fa2", use_cuda_graph=True,
          use_tensor_cores=True, paged_kv_indptr_buffer=X, paged_kv_indices_buffer=X,
          paged_kv_last_page_len_buffer=X),
    Shape("sglang/begin_forward", D.begin_forward, X, X, X, 32, 8, 128, 1, data_type=X, q_data_type=X,
          non_blocking=True, fixed_split_size=None, disable_split_kv=False),
    Shape("sglang/begin_forward = partial(fast_decode_plan, w)", functools.partial(decode.fast_decode_plan, X),
          X, X, X, 32, 8, 128, 1, data_type=X, q_data_type=X, non_blocking=True, fixed_split_size=None,
          disable_split_kv=False, global_override_indptr_cpu=X),
    Shape("sglang/forward", D.forward, X, X, sm_scale=0.1, logits_soft_cap=0.0, k_scale=1.0, v_scale=1.0),
    Shape("sglang/merge_state", cascade.merge_state, X, X, X, X),
]


@pytest.mark.parametrize("shape", SHAPES, ids=[s.id for s in SHAPES])
def test_call_shape_binds(shape: Shape) -> None:
    shape.bind()


# FlashInfer 0.7.2 maps plan()'s positional options by _BATCH_DECODE_PLAN_LEGACY_POS_ARGS.
LEGACY_POSITIONAL = ("pos_encoding_mode", "window_left", "logits_soft_cap", "q_data_type", "kv_data_type",
                     "o_data_type", "data_type", "sm_scale", "rope_scale", "rope_theta", "non_blocking",
                     "block_tables", "seq_lens", "fixed_split_size", "disable_split_kv", "q_len_per_req")


def test_positional_plan_options_land_where_flashinfer_puts_them() -> None:
    values = tuple(f"v{i}" for i in range(len(LEGACY_POSITIONAL)))
    bound = Shape("", D.plan, *PLAN7, *values).bind()
    for name, value in zip(LEGACY_POSITIONAL, values):
        assert bound.arguments[name] == value, f"positional option {value} went to a parameter other than {name}"
    # vLLM's current fast_plan_decode: ..., q_data_type, kv_data_type, o_data_type, data_type, sm_scale, ...
    args = (*PLAN7, "NONE", -1, None, "qdt", "kvdt", "odt", "dt", 0.125, None, None, True, None, None, 2048, True)
    bound = Shape("", D.plan, *args).bind().arguments
    assert (bound["q_data_type"], bound["kv_data_type"], bound["o_data_type"], bound["data_type"]) == \
        ("qdt", "kvdt", "odt", "dt")
    assert (bound["sm_scale"], bound["fixed_split_size"], bound["disable_split_kv"]) == (0.125, 2048, True)


def test_imports_and_exports_callers_use() -> None:
    # vLLM: from flashinfer.decode import _get_range_buf, get_seq_lens, trtllm_batch_decode_with_kv_cache
    from flashinfer_jit.decode import _get_range_buf, get_seq_lens, trtllm_batch_decode_with_kv_cache  # noqa: F401
    # vLLM: from flashinfer.prefill import trtllm_batch_context_with_kv_cache; from flashinfer.utils import FP4Tensor
    from flashinfer_jit.prefill import trtllm_batch_context_with_kv_cache
    from flashinfer_jit.utils import FP4Tensor
    with pytest.raises(flashinfer_jit.NotSupportedError, match="trtllm"):
        trtllm_batch_context_with_kv_cache()
    with pytest.raises(flashinfer_jit.NotSupportedError, match="FP4Tensor"):
        FP4Tensor()
    assert _get_range_buf(5, "cpu").tolist() == [0, 1, 2, 3, 4]
    assert _get_range_buf(5, "cpu").dtype == torch.int32
    with pytest.raises(NotSupportedError, match="trtllm-gen"):
        trtllm_batch_decode_with_kv_cache(query=None)
    from flashinfer_jit.attention import BatchAttention  # noqa: F401
    from flashinfer_jit.cascade import (  # noqa: F401
        BatchDecodeWithSharedPrefixPagedKVCacheWrapper,
        BatchPrefillWithSharedPrefixPagedKVCacheWrapper,
        MultiLevelCascadeAttentionWrapper,
    )
    from flashinfer_jit.page import get_seq_lens as page_get_seq_lens
    assert page_get_seq_lens is get_seq_lens


TOP_LEVEL = {
    "BatchAttention": attention.BatchAttention,
    "BatchDecodeWithPagedKVCacheWrapper": decode.BatchDecodeWithPagedKVCacheWrapper,
    "BatchDecodeWithSharedPrefixPagedKVCacheWrapper": cascade.BatchDecodeWithSharedPrefixPagedKVCacheWrapper,
    "BatchPrefillWithSharedPrefixPagedKVCacheWrapper": cascade.BatchPrefillWithSharedPrefixPagedKVCacheWrapper,
    "CUDAGraphBatchDecodeWithPagedKVCacheWrapper": decode.CUDAGraphBatchDecodeWithPagedKVCacheWrapper,
    "MultiLevelCascadeAttentionWrapper": cascade.MultiLevelCascadeAttentionWrapper,
    "append_paged_kv_cache": page.append_paged_kv_cache,
    "fast_decode_plan": decode.fast_decode_plan,
    "get_batch_indices_positions": page.get_batch_indices_positions,
    "get_seq_lens": page.get_seq_lens,
    "merge_state": cascade.merge_state,
    "merge_state_in_place": cascade.merge_state_in_place,
    "merge_states": cascade.merge_states,
    "single_decode_with_kv_cache": decode.single_decode_with_kv_cache,
}


@pytest.mark.parametrize("name", sorted(TOP_LEVEL))
def test_top_level_names_are_the_module_objects(name: str) -> None:
    """`flashinfer.X` and `flashinfer.<module>.X` are one object (SGLang compares
    wrapper.begin_forward.func == flashinfer.fast_decode_plan)."""
    assert getattr(flashinfer_jit, name, None) is TOP_LEVEL[name], f"flashinfer_jit.{name} is not exported"


def test_aliases_are_flashinfers() -> None:
    assert D.begin_forward is D.plan
    assert M.begin_forward is M.plan and M.forward is M.run
    assert isinstance(inspect.getattr_static(D, "run_return_lse"), functools.partialmethod)


# ==================================================================================================
# CPU: option checks (tensors that report cuda:0; the kernel loader is replaced by a sentinel)
# ==================================================================================================

class CudaLooking(torch.Tensor):
    """A CPU tensor that reports device cuda:0 (as in tests/test_bad_inputs.py): the checks read only
    metadata, so they run as on a GPU."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("cuda", 0)


def cuda_zeros(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype).as_subclass(CudaLooking)


class ReachedKernel(Exception):
    """Every argument check passed: the call went on to load a kernel library or launch."""


def _reached(*args: Any, **kwargs: Any) -> None:
    raise ReachedKernel()


@pytest.fixture
def no_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "load", _reached)
    monkeypatch.setattr(page, "_append_op", _reached)
    monkeypatch.setattr(cascade, "_merge_two_op", _reached)
    monkeypatch.setattr(cascade, "_merge_many_op", _reached)
    monkeypatch.setattr(prefill, "_single_prefill_op", _reached)
    monkeypatch.setattr(decode, "single_prefill_with_kv_cache", _reached)


HQ, HKV, HD, PS = 8, 2, 128, 16
# kv lengths 20, 0, 7: pages [3, 0], [], [5] of a 6-page cache.
INDPTR, INDICES, LAST = [0, 2, 2, 3], [3, 0, 5], [4, 0, 7]


def i32(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


def workspace(dtype: torch.dtype = torch.int8, nbytes: int = 1 << 20) -> torch.Tensor:
    return torch.zeros(nbytes // torch.tensor([], dtype=dtype).element_size(), dtype=dtype).as_subclass(CudaLooking)


def decode_wrapper(**kw: Any) -> decode.BatchDecodeWithPagedKVCacheWrapper:
    return flashinfer_jit.decode.BatchDecodeWithPagedKVCacheWrapper(workspace(), "NHD", **kw)


def decode_plan_call(**kw: Any) -> Callable[[], Any]:
    w = decode_wrapper(use_tensor_cores=kw.pop("use_tensor_cores", True))
    return lambda: w.plan(i32(INDPTR), i32(INDICES), i32(LAST), HQ, HKV, HD, PS, **kw)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.float16, torch.float32])
def test_workspace_of_any_dtype(dtype: torch.dtype, no_kernels) -> None:
    w = flashinfer_jit.decode.BatchDecodeWithPagedKVCacheWrapper(workspace(dtype), "NHD")
    assert w._inner._workspace.float_buffer is w._float_workspace_buffer  # passed through unchanged
    flashinfer_jit.cascade.MultiLevelCascadeAttentionWrapper(2, workspace(dtype), "NHD")
    flashinfer_jit.cascade.BatchDecodeWithSharedPrefixPagedKVCacheWrapper(workspace(dtype), "HND")
    flashinfer_jit.decode.CUDAGraphBatchDecodeWithPagedKVCacheWrapper(
        workspace(dtype), cuda_zeros(4, dtype=torch.int32), cuda_zeros(64, dtype=torch.int32),
        cuda_zeros(3, dtype=torch.int32))


# Off values, as FlashInfer's tests, vLLM and SGLang pass them: the checks pass, the plan reaches the kernel.
DECODE_OFF = {
    "defaults": {},
    "FlashInfer test kwargs": dict(logits_soft_cap=0.0, pos_encoding_mode="NONE", data_type=torch.bfloat16,
                                   q_data_type=torch.bfloat16),
    "vLLM kwargs": dict(pos_encoding_mode="NONE", sm_scale=0.088, window_left=-1, logits_soft_cap=None,
                        q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16, fixed_split_size=-1,
                        disable_split_kv=False),
    "batch invariant": dict(q_data_type=torch.bfloat16, fixed_split_size=2048, disable_split_kv=True),
    "SGLang kwargs": dict(data_type=torch.bfloat16, q_data_type=torch.bfloat16, non_blocking=True,
                          fixed_split_size=None, disable_split_kv=False),
    "string dtypes": dict(q_data_type="bfloat16", kv_data_type="bfloat16", o_data_type="bfloat16"),
    "rope_* without RoPE": dict(rope_scale=8.0, rope_theta=5e5, pos_encoding_mode="NONE"),
    "pos_encoding_mode 0": dict(pos_encoding_mode=0),
    "window_right 0, is_causal None": dict(window_right=0, is_causal=None),
    "block_tables, seq_lens": dict(block_tables=cuda_zeros(3, 4, dtype=torch.int32), seq_lens=i32([20, 0, 7])),
    "q_len_per_req 1": dict(q_len_per_req=1),
    "q_len_per_req 2": dict(q_len_per_req=2, use_tensor_cores=True),
    "q_len_per_req 2, is_causal=False": dict(q_len_per_req=2, is_causal=False, use_tensor_cores=True),
    "use_tensor_cores False": dict(use_tensor_cores=False),
}


@pytest.mark.parametrize("kw", list(DECODE_OFF), ids=list(DECODE_OFF))
def test_decode_plan_off_values_pass(kw: str, no_kernels) -> None:
    args = dict(DECODE_OFF[kw])
    if args.get("q_len_per_req", 1) > 1:  # every request needs kv_len >= q_len_per_req
        w = decode_wrapper(use_tensor_cores=args.pop("use_tensor_cores"))
        call = lambda: w.plan(i32([0, 2, 3]), i32([3, 0, 5]), i32([4, 7]), HQ, HKV, HD, PS, **args)  # noqa: E731
    else:
        call = decode_plan_call(**args)
    with pytest.raises(ReachedKernel):
        call()


def test_decode_plan_positional_vllm_form_passes(no_kernels) -> None:
    w = decode_wrapper(use_tensor_cores=True)
    with pytest.raises(ReachedKernel):
        w.plan(i32(INDPTR), i32(INDICES), i32([4, 1, 7]), HQ, HKV, HD, PS, "NONE", -1, None, torch.bfloat16,
               torch.bfloat16, None, None, 0.088, None, None, True, None, None, -1, False)


MISSING = {  # (plan kwargs, parameter named in the error)
    "right window": ({"window_right": -1}, "window_right"),
    "NVFP4 KV": ({"kv_data_type": torch.uint8, "q_data_type": torch.bfloat16}, "kv_data_type"),
    "fp8 q": ({"q_data_type": "float8_e4m3fn"}, "q_data_type"),
    "o_data_type": ({"q_data_type": torch.bfloat16, "o_data_type": torch.float32}, "o_data_type"),
}


def _specs_loaded_by(call, monkeypatch) -> list:
    """The specs `call` asks the loader for (it stops at the first load)."""
    loaded = []

    def record(spec, *args, **kwargs):
        loaded.append(spec)
        raise RuntimeError("reached the kernel")

    monkeypatch.setattr(loader, "load", record)
    with pytest.raises(RuntimeError, match="reached the kernel"):
        call()
    return loaded


@pytest.mark.parametrize("kw, switches", [({"window_left": 127}, (True, False)), ({"logits_soft_cap": 30.0}, (False, True)),
                                          ({"window_left": 0, "logits_soft_cap": 5}, (True, True))])
def test_decode_plan_with_a_variant_loads_its_kernel(kw: dict, switches: tuple, monkeypatch) -> None:
    """Sliding window and soft-cap (issue #12) on decode: the plan selects the variant's paged kernel."""
    loaded = _specs_loaded_by(decode_plan_call(**kw), monkeypatch)
    assert [(s.kv_layout, s.sliding_window, s.soft_cap) for s in loaded] == [("paged", *switches)]


def test_decode_plan_with_a_user_variant_loads_its_kernel(monkeypatch) -> None:
    """plan(variant=) (flashinfer-jit's keyword) on decode: the user variant's paged kernel."""
    v = flashinfer_jit.AttentionVariant("temp", score_mod="score * t", params={"t": 0.5})
    loaded = _specs_loaded_by(decode_plan_call(variant=v), monkeypatch)
    assert [(s.kv_layout, s.custom) for s in loaded] == [("paged", v.code)]


def test_decode_run_window_must_be_the_plans(no_kernels) -> None:
    with pytest.raises(ValueError, match="window_left=64 differs from plan"):
        decode_wrapper().run(cuda_zeros(3, HQ, HD), cuda_zeros(6, 2, PS, HKV, HD), window_left=64)


@pytest.mark.parametrize("case", list(MISSING), ids=list(MISSING))
def test_decode_plan_missing_features_raise_not_supported(case: str, no_kernels) -> None:
    kw, parameter = MISSING[case]
    with pytest.raises(NotSupportedError) as info:
        decode_plan_call(**kw)()
    assert isinstance(info.value, ValueError)
    assert info.value.parameter == parameter and parameter in str(info.value)


@pytest.mark.parametrize("kw, parameter", [
    ({"backend": "trtllm-gen"}, "backend"), ({"backend": "cute-dsl"}, "backend"), ({"backend": "fa3"}, "backend"),
    ({"jit_args": ["uri"]}, "jit_args")])
def test_decode_constructor_missing_features(kw: dict, parameter: str, no_kernels) -> None:
    with pytest.raises(NotSupportedError) as info:
        decode_wrapper(**kw)
    assert info.value.parameter == parameter


def test_decode_q_len_per_req_rules_as_flashinfer(no_kernels) -> None:
    with pytest.raises(ValueError, match="use_tensor_cores"):
        decode_plan_call(q_len_per_req=2, use_tensor_cores=False)()
    with pytest.raises(ValueError, match="empty KV range"):  # request 1 has no tokens
        decode_plan_call(q_len_per_req=2)()
    with pytest.raises(ValueError, match="q_len_per_req must be >= 1"):
        decode_plan_call(q_len_per_req=0)()
    with pytest.raises(ValueError, match="prior plan"):
        decode.fast_decode_plan(decode_wrapper(use_tensor_cores=True), i32(INDPTR), i32(INDICES), i32(LAST), HQ,
                                HKV, HD, PS, q_len_per_req=2)


RUN_OFF = {
    "nothing": {}, "scales 1.0": dict(q_scale=1.0, k_scale=1.0, v_scale=1.0), "scales None": dict(k_scale=None),
    "one-element CPU scale tensor": dict(k_scale=torch.ones(1)), "enable_pdl": dict(enable_pdl=True),
    "window_left -1": dict(window_left=-1),
}
RUN_MISSING = {
    "sinks": (dict(sinks=torch.zeros(HQ)), "sinks"), "kv_cache_sf": (dict(kv_cache_sf=torch.zeros(1)), "kv_cache_sf"),
    "skip-softmax": (dict(skip_softmax_threshold_scale_factor=0.1), "skip_softmax_threshold_scale_factor"),
}


@pytest.mark.parametrize("kw", list(RUN_OFF), ids=list(RUN_OFF))
def test_decode_run_off_values_pass(kw: str, no_kernels) -> None:
    """Without a plan, run() gets past its option checks to the 'run() before plan()' error."""
    w = decode_wrapper()
    with pytest.raises(RuntimeError, match="before plan"):
        w.run(cuda_zeros(3, HQ, HD), cuda_zeros(6, 2, PS, HKV, HD), **RUN_OFF[kw])


@pytest.mark.parametrize("case", list(RUN_MISSING), ids=list(RUN_MISSING))
def test_decode_run_missing_features_raise_not_supported(case: str, no_kernels) -> None:
    kw, parameter = RUN_MISSING[case]
    with pytest.raises(NotSupportedError) as info:
        decode_wrapper().run(cuda_zeros(3, HQ, HD), cuda_zeros(6, 2, PS, HKV, HD), **kw)
    assert info.value.parameter == parameter
    with pytest.raises(NotSupportedError):
        decode_wrapper().run(cuda_zeros(3, HQ, HD), cuda_zeros(6, 2, PS, HKV, HD), cuda_zeros(1))  # *args


def test_forward_before_plan_and_its_missing_features(no_kernels) -> None:
    w = decode_wrapper()
    with pytest.raises(RuntimeError, match="before plan"):  # a soft-cap is a plan()'s choice; there is none
        w.forward(cuda_zeros(3, HQ, HD), cuda_zeros(6, 2, PS, HKV, HD), logits_soft_cap=50.0)
    with pytest.raises(RuntimeError, match="before plan"):  # fused RoPE is a plan()'s choice too
        w.forward_return_lse(cuda_zeros(3, HQ, HD), cuda_zeros(6, 2, PS, HKV, HD), pos_encoding_mode="ROPE_LLAMA")
    with pytest.raises(RuntimeError, match="before plan"):
        w.forward(cuda_zeros(3, HQ, HD), cuda_zeros(6, 2, PS, HKV, HD), sm_scale=0.1, logits_soft_cap=0.0,
                  k_scale=1.0, v_scale=1.0)


def test_single_decode_options(no_kernels) -> None:
    q, k = cuda_zeros(HQ, HD), cuda_zeros(40, HKV, HD)
    for kw in ({}, dict(pos_encoding_mode="NONE", logits_soft_cap=0.0), dict(use_tensor_cores=True),
               dict(q_scale=1.0, k_scale=None, v_scale=1.0, window_left=-1), dict(rope_scale=1.0, rope_theta=1e4),
               dict(logits_soft_cap=30.0), dict(window_left=10),  # the variants (issue #12) go through too
               dict(pos_encoding_mode="ROPE_LLAMA", rope_theta=5e5), dict(pos_encoding_mode="ALIBI")):
        with pytest.raises(ReachedKernel):
            flashinfer_jit.decode.single_decode_with_kv_cache(q, k, k, **kw)
    with pytest.raises(ValueError, match="logits_soft_cap=-3.0"):
        flashinfer_jit.decode.single_decode_with_kv_cache(q, k, k, logits_soft_cap=-3.0)
    with pytest.raises(ValueError, match="rope_theta=-1"):
        flashinfer_jit.decode.single_decode_with_kv_cache(q, k, k, pos_encoding_mode="ROPE_LLAMA", rope_theta=-1)
    for kw, parameter in ((dict(k_scale=0.5), "k_scale"),):
        with pytest.raises(NotSupportedError) as info:
            flashinfer_jit.decode.single_decode_with_kv_cache(q, k, k, **kw)
        assert info.value.parameter == parameter
    with pytest.raises(ValueError, match="q: expected a 2-D tensor"):
        flashinfer_jit.decode.single_decode_with_kv_cache(cuda_zeros(1, HQ, HD), k, k)


def test_fast_decode_plan_passes_checks(no_kernels) -> None:
    w = decode_wrapper()
    with pytest.raises(ReachedKernel):  # FlashInfer's test: device-looking indptr, a host override
        decode.fast_decode_plan(w, i32(INDPTR), i32(INDICES), i32(LAST), HQ, HKV, HD, PS, logits_soft_cap=0.0,
                                pos_encoding_mode="NONE", data_type=torch.bfloat16, q_data_type=torch.bfloat16,
                                non_blocking=True, global_override_indptr_cpu=i32(INDPTR))
    # SGLang: page_size 1, last_page_len not read, a partial bound as begin_forward.
    w.begin_forward = functools.partial(flashinfer_jit.decode.fast_decode_plan, w)
    with pytest.raises(ReachedKernel):
        w.begin_forward(i32([0, 3, 3, 5]), i32([4, 2, 0, 1, 3]), i32([1, 1, 1]), HQ, HKV, HD, 1,
                        data_type=torch.bfloat16, q_data_type=torch.bfloat16, non_blocking=True, fixed_split_size=None,
                        disable_split_kv=False, global_override_indptr_cpu=i32([0, 3, 3, 5]))


def test_wrapper_attributes_vllm_and_sglang_use(no_kernels) -> None:
    indptr_buf, indices_buf = cuda_zeros(9, dtype=torch.int32), cuda_zeros(1000, dtype=torch.int32)
    last_buf = cuda_zeros(8, dtype=torch.int32)
    ws = workspace()
    w = flashinfer_jit.decode.BatchDecodeWithPagedKVCacheWrapper(
        ws, "NHD", use_cuda_graph=True, paged_kv_indptr_buffer=indptr_buf, paged_kv_indices_buffer=indices_buf,
        paged_kv_last_page_len_buffer=last_buf, use_tensor_cores=True)
    assert w.is_cuda_graph_enabled and w.use_tensor_cores
    assert w._paged_kv_indptr_buf is indptr_buf and w._paged_kv_indices_buf is indices_buf
    assert w._paged_kv_last_page_len_buf is last_buf and w._fixed_batch_size == 8
    assert w._float_workspace_buffer is ws and w._backend == "fa2" and w.resolved_backend == "fa2"
    assert hasattr(w, "_int_workspace_buffer") and hasattr(w, "_pin_memory_int_workspace_buffer")
    assert callable(w._cached_module.plan)
    assert (w._window_left, w._logits_soft_cap, w._sm_scale) == (-1, 0.0, None)
    assert not flashinfer_jit.decode.BatchDecodeWithPagedKVCacheWrapper(workspace(), "NHD").use_tensor_cores


def test_cascade_plan_options(no_kernels) -> None:
    w = cascade.MultiLevelCascadeAttentionWrapper(2, workspace(), "NHD")
    levels = ([i32([0, 3]), i32([0, 1, 2, 3])], [i32([0, 2]), i32([0, 1, 1, 2])], [i32([0, 1]), i32([2, 3])],
              [i32([16]), i32([5, 0, 9])])
    for kw in ({}, dict(causal=True, sm_scale=0.1, window_left=-1, logits_soft_cap=0.0, q_data_type=torch.bfloat16,
                        kv_data_type=torch.bfloat16),
               dict(pos_encoding_mode="NONE", use_fp16_qk_reduction=False, rope_scale=2.0, rope_theta=1e6)):
        with pytest.raises(ReachedKernel):
            w.plan(*levels, HQ, HKV, HD, PS, **kw)
    for kw, parameter in ((dict(window_left=100), "window_left"), (dict(logits_soft_cap=5.0), "logits_soft_cap"),
                          (dict(pos_encoding_mode="ROPE_LLAMA"), "pos_encoding_mode"),
                          (dict(use_fp16_qk_reduction=True), "use_fp16_qk_reduction"),
                          (dict(kv_data_type=torch.float8_e4m3fn), "kv_data_type")):
        with pytest.raises(NotSupportedError) as info:
            w.plan(*levels, HQ, HKV, HD, PS, **kw)
        assert info.value.parameter == parameter
    with pytest.raises(ValueError, match="one per level"):
        w.plan(levels[0][:1], *levels[1:], HQ, HKV, HD, PS)
    with pytest.raises(ValueError, match="num_levels"):
        cascade.MultiLevelCascadeAttentionWrapper(0, workspace())


def batch_attention_on_cpu() -> attention.BatchAttention:
    """A BatchAttention whose workspace reports cuda:0 (its constructor allocates on the GPU)."""
    b = attention.BatchAttention.__new__(attention.BatchAttention)
    b._kv_layout = "NHD"
    b.float_workspace_buffer = workspace()
    b._wrapper = prefill.BatchPrefillWithPagedKVCacheWrapper(b.float_workspace_buffer, "NHD")
    b._logits_soft_cap, b._sm_scale, b._planned = 0.0, None, False
    return b


def test_batch_attention_options(no_kernels) -> None:
    b = batch_attention_on_cpu()
    args = (i32([0, 1, 5, 6]), i32(INDPTR), i32(INDICES), i32([20, 0, 7]), HQ, HKV, HD, HD, PS)
    for kw in ({}, dict(causal=True, sm_scale=0.1, logits_soft_cap=None), dict(logits_soft_cap=0.0),
               dict(q_data_type=torch.float16, kv_data_type=torch.float16), dict(use_profiler=False)):
        with pytest.raises(ReachedKernel):
            b.plan(*args, **kw)
    for kw, parameter in ((dict(logits_soft_cap=50.0), "logits_soft_cap"), (dict(use_profiler=True), "use_profiler"),
                          (dict(kv_data_type=torch.float8_e4m3fn), "kv_data_type")):
        with pytest.raises(NotSupportedError) as info:
            b.plan(*args, **kw)
        assert info.value.parameter == parameter
    with pytest.raises(NotSupportedError) as info:
        b.plan(*args[:7], 64, PS)
    assert info.value.parameter == "head_dim_vo"
    with pytest.raises(ValueError, match=r"kv_len_arr\[0\] = 40 does not fit request 0's 2 pages"):
        b.plan(*args[:3], i32([40, 0, 7]), *args[4:])
    with pytest.raises(ValueError, match=r"kv_len_arr\[1\] = 3 does not fit request 1's 0 pages"):
        b.plan(*args[:3], i32([20, 3, 7]), *args[4:])
    q, cache = cuda_zeros(6, HQ, HD), cuda_zeros(6, 2, PS, HKV, HD)
    for kw in ({}, dict(k_scale=None, v_scale=None, logits_soft_cap=0.0), dict(v_scale=1.0)):
        with pytest.raises(RuntimeError, match="before plan"):
            b.run(q, cache, **kw)
    for kw, parameter in ((dict(v_scale=2.0), "v_scale"), (dict(logits_soft_cap=50.0), "logits_soft_cap"),
                          (dict(profiler_buffer=torch.zeros(4)), "profiler_buffer"),
                          (dict(kv_cache_sf=torch.zeros(4)), "kv_cache_sf")):
        with pytest.raises(NotSupportedError) as info:
            b.run(q, cache, **kw)
        assert info.value.parameter == parameter


def test_last_page_lens_from_kv_lens() -> None:
    lens = attention.last_page_lens(i32([0, 2, 2, 3, 7]), i32([20, 0, 16, 64]), 16)
    assert lens.tolist() == [4, 0, 16, 16] and lens.dtype == torch.int32


# ---- page.py: FlashInfer's exact semantics -------------------------------------------------------

def flashinfer_batch_indices_positions(append_indptr: list[int], seq_lens: list[int], nnz: int,
                                       positions_init: list[int] | None = None) -> tuple[list[int], list[int]]:
    """FlashInfer 0.7.2's get_batch_indices_positions: batch_indices filled with -1, positions with 0 (or
    kept), then its Triton kernel: request b writes tokens [indptr[b], indptr[b + 1]) with position
    t + seq_lens[b] - indptr[b + 1]."""
    batch = [-1] * nnz
    pos = list(positions_init) if positions_init is not None else [0] * nnz
    for b in range(len(append_indptr) - 1):
        for t in range(append_indptr[b], append_indptr[b + 1]):
            if t < nnz:
                batch[t] = b
                pos[t] = t + seq_lens[b] - append_indptr[b + 1]
    return batch, pos


INDICES_POSITIONS_CASES = [
    ([0, 1, 3, 6, 10], [5, 5, 5, 5], 10),  # FlashInfer's docstring example
    ([0, 45, 53, 78, 100], [45, 8, 25, 22], 100),  # append_paged_kv_cache's docstring example
    ([0, 0, 4, 4, 5], [3, 9, 2, 1], 5),  # requests appending nothing
    ([0, 1, 2, 3], [7, 1, 30], 8),  # nnz past append_indptr[-1] (a padded batch)
    ([0], [], 3),  # no requests
    ([0, 2, 5], [2, 3], 0),  # nnz 0
]


@pytest.mark.parametrize("indptr, seq_lens, nnz", INDICES_POSITIONS_CASES)
def test_get_batch_indices_positions_semantics(indptr: list[int], seq_lens: list[int], nnz: int) -> None:
    exp_b, exp_p = flashinfer_batch_indices_positions(indptr, seq_lens, nnz)
    b, p = flashinfer_jit.page.get_batch_indices_positions(i32(indptr), i32(seq_lens), nnz)
    assert b.dtype == p.dtype == torch.int32
    assert (b.tolist(), p.tolist()) == (exp_b, exp_p)
    # out buffers: written in place and returned; positions keeps its values where no token lands.
    init = [77] * nnz
    bi, po = torch.full((nnz,), 5, dtype=torch.int32), torch.tensor(init, dtype=torch.int32)
    rb, rp = flashinfer_jit.page.get_batch_indices_positions(i32(indptr), i32(seq_lens), nnz, batch_indices=bi,
                                                             positions=po)
    assert rb is bi and rp is po
    exp_b, exp_p = flashinfer_batch_indices_positions(indptr, seq_lens, nnz, init)
    assert (bi.tolist(), po.tolist()) == (exp_b, exp_p)


def test_get_batch_indices_positions_bad_out_buffers() -> None:
    with pytest.raises(ValueError, match="batch_indices: expected shape"):
        page.get_batch_indices_positions(i32([0, 2]), i32([2]), 2, batch_indices=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="positions"):
        page.get_batch_indices_positions(i32([0, 2]), i32([2]), 2, positions=torch.zeros(2, dtype=torch.int64))


def test_get_seq_lens_is_flashinfers_formula() -> None:
    indptr, last = i32([0, 3, 3, 5, 6]), i32([5, 1, 16, 1])
    got = flashinfer_jit.page.get_seq_lens(indptr, last, 16)
    expected = torch.clamp(indptr[1:] - indptr[:-1] - 1, min=0) * 16 + last  # FlashInfer 0.7.2 page.py
    assert torch.equal(got, expected) and got.tolist() == [37, 1, 32, 1]


def test_sanitized_last_page_len_only_touches_requests_without_pages() -> None:
    last = decode.empty_requests_have_no_tokens(i32([0, 2, 2, 3, 3]), i32([4, 1, 7, 1]))
    assert last.tolist() == [4, 0, 7, 0]
    untouched = i32([4, 0, 7])
    assert decode.empty_requests_have_no_tokens(i32(INDPTR), untouched) is untouched


# ==================================================================================================
# GPU
# ==================================================================================================

gpu = pytest.mark.gpu
DEVICE = torch.device("cuda")
NAN = float("nan")
WS_BYTES = 128 << 20
GROUPS = (1, 4, 8)
NUM_KV_HEADS = 2


def int8_workspace(nbytes: int = WS_BYTES) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.int8, device=DEVICE)  # FlashInfer's tests and vLLM use int8


def paged_batch(q_lens, kv_lens, group: int, head_dim: int = 128, dtype=torch.bfloat16, layout: str = "NHD",
                page_size: int = 16, seed: int = 0, **kw) -> ref.PagedBatch:
    return ref.make_paged_batch(list(q_lens), list(kv_lens), NUM_KV_HEADS * group, NUM_KV_HEADS, head_dim, dtype,
                                DEVICE, layout, page_size, seed, **kw)


def poisoned(rows: int, heads: int, head_dim: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.full((rows, heads, head_dim), NAN, dtype=dtype, device=DEVICE),
            torch.full((rows, heads), NAN, dtype=torch.float32, device=DEVICE))


def ragged_decode_lens(n: int, page_size: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    special = [0, 1, page_size, page_size + 1, 3 * page_size - 1, 5000]
    lens = special + [rng.randint(1, 1500) for _ in range(n - len(special))]
    rng.shuffle(lens)
    return lens


def check_decode(wrapper, batch: ref.PagedBatch, what: str, cache=None, causal: bool = False,
                 sm_scale: float | None = None, run: Callable | None = None) -> None:
    """run into poisoned out/lse buffers, and allocating; both against the float32 reference."""
    ref_out, ref_lse = batch.reference(causal, sm_scale)
    cache = batch.cache if cache is None else cache
    out, lse = poisoned(batch.total_q, batch.num_qo_heads, batch.head_dim, batch.q.dtype)
    run = run or (lambda **kw: wrapper.run(batch.q, cache, **kw))
    got = run(out=out, lse=lse, return_lse=True)
    assert got[0].data_ptr() == out.data_ptr() and got[1].data_ptr() == lse.data_ptr(), f"{what}: out=/lse= ignored"
    ref.check_attention(out, ref_out, batch.q.dtype, f"{what} [out=, lse=]", lse, ref_lse)
    del out, lse
    poisoned(batch.total_q, batch.num_qo_heads, batch.head_dim, batch.q.dtype)  # freed NaN blocks for the allocator
    ref.check_attention(run(), ref_out, batch.q.dtype, f"{what} [allocated]")


@gpu
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_decode_flashinfer_test_call_shape(layout: str, group: int) -> None:
    """test_batch_decode_kernels.py's calls: int8 workspace, CUDA index tensors, data_type + q_data_type,
    off values; run(return_lse=True) and run(out=)."""
    page_size = 16 if group != 4 else 1
    batch = paged_batch([1] * 40, ragged_decode_lens(40, page_size, seed=group), group, 128, torch.float16, layout,
                        page_size, seed=group)
    t = batch.table
    w = flashinfer_jit.decode.BatchDecodeWithPagedKVCacheWrapper(int8_workspace(), layout, backend="fa2")
    w.plan(t.indptr.to(DEVICE), t.indices.to(DEVICE), t.last_page_len.to(DEVICE), batch.num_qo_heads,
           NUM_KV_HEADS, 128, page_size, logits_soft_cap=0.0, pos_encoding_mode="NONE", data_type=torch.float16,
           q_data_type=torch.float16)
    check_decode(w, batch, f"FlashInfer-test decode {layout} g{group} {batch.describe()}")
    out, lse = w.run_return_lse(batch.q, batch.cache)
    ref_out, ref_lse = batch.reference(False)
    ref.check_attention(out, ref_out, torch.float16, "run_return_lse", lse, ref_lse)
    o_buffer = torch.full_like(out, NAN)
    w.run(batch.q, batch.cache, out=o_buffer)  # FlashInfer's "user-allocated output" check
    ref.check_attention(o_buffer, ref_out, torch.float16, "run(out=)")


@gpu
@pytest.mark.parametrize("group", GROUPS)
def test_decode_vllm_positional_plan_and_run(group: int) -> None:
    """vLLM's plan (22 positional arguments, o_data_type included) and run(k_scale=, v_scale=, out=) with
    a permuted HND cache; vLLM's assertions on _window_left, _logits_soft_cap, _sm_scale hold."""
    batch = paged_batch([1] * 33, ragged_decode_lens(33, 16, seed=10 + group), group, 128, torch.bfloat16, "HND",
                        16, seed=20 + group)
    t, scale = batch.table, 1.0 / math.sqrt(128) * 0.9
    w = flashinfer_jit.decode.BatchDecodeWithPagedKVCacheWrapper(int8_workspace(), "HND", use_tensor_cores=True)
    w.plan(t.indptr, t.indices, t.last_page_len, batch.num_qo_heads, NUM_KV_HEADS, 128, 16, "NONE", -1, None,
           torch.bfloat16, torch.bfloat16, None, None, scale, None, None, True, None, None, -1, False)
    assert w._window_left == -1 and w._logits_soft_cap == 0.0 and w._sm_scale == scale
    # vLLM's HND cache: an NHD-shaped tensor over HND memory, permuted back (kv_cache.permute(0, 1, 3, 2, 4)):
    # contiguous, as batch.cache is. Also an HND-shaped view of NHD memory (strided).
    strided = batch.cache.permute(0, 1, 3, 2, 4).contiguous().permute(0, 1, 3, 2, 4)
    for cache, what in ((batch.cache, "contiguous"), (strided, "strided view")):
        check_decode(w, batch, f"vLLM decode g{group} {what}", cache=cache, sm_scale=scale,
                     run=lambda **kw: w.run(batch.q, cache, k_scale=1.0, v_scale=1.0, **kw))  # noqa: B023


@gpu
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_decode_non_contiguous_cache(layout: str) -> None:
    """FlashInfer's contiguous_kv=False: every cache dim strided (kv_data[:, 1, :, 1, :, 1, :, 1, :])."""
    batch = paged_batch([1] * 12, [54, 97, 0, 512, 17, 16, 1, 300, 64, 2, 33, 160], 4, 128, torch.float16, layout, 8,
                        seed=3)
    shape = batch.cache.shape
    big = torch.full((shape[0], 2, 2, 2, shape[2], 2, shape[3], 2, shape[4]), NAN, dtype=torch.float16, device=DEVICE)
    strided = big[:, 1, :, 1, :, 1, :, 1, :]
    strided.copy_(batch.cache)
    assert not strided.is_contiguous()
    w = flashinfer_jit.decode.BatchDecodeWithPagedKVCacheWrapper(int8_workspace(), layout)
    t = batch.table
    w.plan(t.indptr, t.indices, t.last_page_len, batch.num_qo_heads, NUM_KV_HEADS, 128, 8, q_data_type=torch.float16)
    check_decode(w, batch, f"strided cache {layout}", cache=strided)
    check_decode(w, batch, f"strided (k, v) tuple {layout}", cache=(strided[:, 0], strided[:, 1]))


@gpu
@pytest.mark.parametrize("q_len, group, is_causal", [(2, 4, None), (3, 8, None), (3, 1, True), (2, 4, False)])
def test_decode_q_len_per_req(q_len: int, group: int, is_causal) -> None:
    """Speculative-decoding verification: q_len_per_req tokens per request, causal within the request
    (FlashInfer's tensor-core path), or is_causal=False."""
    kv_lens = [q_len, 129, 33, 17, 65, 2000, q_len + 5, 48]
    batch = paged_batch([q_len] * len(kv_lens), kv_lens, group, 128, torch.bfloat16, "NHD", 16, seed=q_len * 10 + group)
    t = batch.table
    w = flashinfer_jit.decode.BatchDecodeWithPagedKVCacheWrapper(int8_workspace(), "NHD", use_tensor_cores=True)
    kw = {} if is_causal is None else {"is_causal": is_causal}
    w.plan(t.indptr, t.indices, t.last_page_len, batch.num_qo_heads, NUM_KV_HEADS, 128, 16, q_data_type=torch.bfloat16,
           q_len_per_req=q_len, **kw)
    causal = is_causal is not False
    check_decode(w, batch, f"q_len_per_req={q_len} causal={causal} g{group}", causal=causal)
    with pytest.raises(ValueError, match="q_len_per_req"):  # FlashInfer: q rows imply another q_len
        w.run(torch.zeros((len(kv_lens) * (q_len + 1), batch.num_qo_heads, 128), dtype=torch.bfloat16, device=DEVICE),
              batch.cache)


@gpu
@pytest.mark.parametrize("page_size", [1, 16])
def test_fast_decode_plan_flashinfer_test_shape(page_size: int) -> None:
    """wrapper.plan = partial(flashinfer.fast_decode_plan, wrapper), re-planned with a host indptr override."""
    batch = paged_batch([1] * 17, [97] * 17, 8, 128, torch.float16, "NHD", page_size, seed=page_size, shuffle=False)
    t = batch.table
    w = flashinfer_jit.decode.BatchDecodeWithPagedKVCacheWrapper(int8_workspace(), "NHD")
    args = (t.indptr.to(DEVICE), t.indices.to(DEVICE), t.last_page_len.to(DEVICE), batch.num_qo_heads, NUM_KV_HEADS,
            128, page_size)
    w.plan(*args, logits_soft_cap=0.0, pos_encoding_mode="NONE", data_type=torch.float16, q_data_type=torch.float16)
    w.plan = functools.partial(flashinfer_jit.fast_decode_plan, w)
    w.plan(*args, logits_soft_cap=0.0, pos_encoding_mode="NONE", data_type=torch.float16, q_data_type=torch.float16,
           non_blocking=True, global_override_indptr_cpu=t.indptr.clone())
    check_decode(w, batch, f"fast_decode_plan p{page_size}")


@gpu
def test_sglang_cuda_graph_decode_with_fast_decode_plan() -> None:
    """SGLang's CUDA-graph decode: wrappers over its buffers (page size 1), the page indices written into
    wrapper._paged_kv_indices_buf, begin_forward = partial(fast_decode_plan, w) with a host indptr
    override, forward(q, cache, sm_scale=, logits_soft_cap=, k_scale=, v_scale=) captured and replayed
    after re-plans with other lengths."""
    bs, group, head_dim, pool = 8, 4, 128, 6000
    hq = NUM_KV_HEADS * group
    kv_indptr_buf = torch.zeros(bs + 1, dtype=torch.int32, device=DEVICE)
    kv_indices_buf = torch.zeros(pool, dtype=torch.int32, device=DEVICE)
    last_page_len_buf = torch.ones(bs, dtype=torch.int32, device=DEVICE)
    w = flashinfer_jit.BatchDecodeWithPagedKVCacheWrapper(
        int8_workspace(), "NHD", backend="fa2", use_cuda_graph=True, use_tensor_cores=False,
        paged_kv_indptr_buffer=kv_indptr_buf[: bs + 1], paged_kv_indices_buffer=kv_indices_buf,
        paged_kv_last_page_len_buffer=last_page_len_buf[:bs])
    cache = ref.new_paged_cache(pool, 1, NUM_KV_HEADS, head_dim, torch.bfloat16, DEVICE, "NHD")
    q = torch.zeros((bs, hq, head_dim), dtype=torch.bfloat16, device=DEVICE)
    scale = 0.1  # not 1/sqrt(128): forward()'s sm_scale must be the one applied

    def begin(kv_lens, seed, fast: bool):
        batch = paged_batch([1] * bs, kv_lens, group, head_dim, torch.bfloat16, "NHD", 1, seed=seed, num_pages=pool)
        cache.copy_(batch.cache)
        q.copy_(batch.q)
        indptr = batch.table.indptr.to(DEVICE)
        kv_indptr_buf[: bs + 1].copy_(indptr)
        n = int(batch.table.indptr[-1])
        w._paged_kv_indices_buf[:n].copy_(batch.table.indices[:n])  # SGLang's Triton kernel writes them here
        override = torch.empty_like(kv_indptr_buf[: bs + 1], device="cpu")
        override[0] = 0
        override[1:] = torch.cumsum(torch.tensor(kv_lens), 0)
        w.begin_forward(kv_indptr_buf[: bs + 1], w._paged_kv_indices_buf, last_page_len_buf[:bs], hq, NUM_KV_HEADS,
                        head_dim, 1, data_type=torch.bfloat16, q_data_type=torch.bfloat16, non_blocking=True,
                        fixed_split_size=None, disable_split_kv=False,
                        **({"global_override_indptr_cpu": override} if fast else {}))
        return batch

    begin([50] * bs, seed=1, fast=False)  # the regular plan first (SGLang installs fast_decode_plan after it)
    w.begin_forward = functools.partial(flashinfer_jit.fast_decode_plan, w)
    forward = lambda: w.forward(q, cache, sm_scale=scale, logits_soft_cap=None, k_scale=1.0, v_scale=1.0)  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = forward()
    for i, lens in enumerate(([50] * bs, [1, 700, 3, 5000, 64, 0, 129, 20], [700] * bs)):
        batch = begin(lens, seed=10 + i, fast=True)
        out.fill_(NAN)
        graph.replay()
        torch.cuda.synchronize()
        ref_out, _ = batch.reference(False, scale)
        ref.check_attention(out, ref_out, torch.bfloat16, f"SGLang graph replay {i} (lengths {lens})")


def vllm_fast_plan_decode(self, indptr_cpu, indices, last_page_len_cpu, seq_lens_cpu, num_qo_heads, num_kv_heads,
                          head_dim, page_size, pos_encoding_mode="NONE", window_left=-1, logits_soft_cap=None,
                          q_data_type="float16", kv_data_type=None, o_data_type=None, data_type=None, sm_scale=None,
                          rope_scale=None, rope_theta=None, non_blocking=True, fixed_split_size=-1,
                          disable_split_kv=False) -> None:
    """vLLM's fast_plan_decode (vllm/v1/attention/backends/flashinfer.py), as it calls FlashInfer."""
    if not self.is_cuda_graph_enabled or getattr(self, "vllm_first_call", True):
        self.plan(indptr_cpu, indices, last_page_len_cpu, num_qo_heads, num_kv_heads, head_dim, page_size,
                  pos_encoding_mode, window_left, logits_soft_cap, q_data_type, kv_data_type, o_data_type, data_type,
                  sm_scale, rope_scale, rope_theta, non_blocking, None, None, fixed_split_size, disable_split_kv)
        self.vllm_first_call = False
        return
    batch_size = len(last_page_len_cpu)
    logits_soft_cap = 0.0 if logits_soft_cap is None else logits_soft_cap
    assert batch_size == self._fixed_batch_size and len(indices) <= len(self._paged_kv_indices_buf)
    self._paged_kv_indptr_buf.copy_(indptr_cpu, non_blocking=True)
    self._paged_kv_last_page_len_buf.copy_(last_page_len_cpu, non_blocking=True)
    qo_indptr_host = decode._get_range_buf(batch_size + 1, "cpu")
    args = [self._float_workspace_buffer, self._int_workspace_buffer, self._pin_memory_int_workspace_buffer,
            qo_indptr_host, indptr_cpu, seq_lens_cpu, batch_size, batch_size, num_qo_heads, num_kv_heads, page_size,
            self.is_cuda_graph_enabled, head_dim, head_dim, False, window_left]
    if self._backend == "fa2":
        args += [fixed_split_size, disable_split_kv, 0]
    self._plan_info = self._cached_module.plan(*args)
    self._pos_encoding_mode, self._window_left, self._logits_soft_cap = pos_encoding_mode, window_left, logits_soft_cap
    self._sm_scale, self._rope_scale, self._rope_theta = sm_scale, rope_scale, rope_theta


@gpu
def test_vllm_cuda_graph_decode_with_padded_batch() -> None:
    """vLLM's FULL CUDA-graph decode: one wrapper per padded batch size over persistent buffers; the first
    plan() is the regular one (22 positional), later ones go through wrapper._cached_module.plan with
    host indptr and seq_lens, the page indices written into the buffer; padded requests have no pages
    and last_page_len 1 (vLLM's padding) and must come out empty."""
    real, padded, group, head_dim, page_size, max_pages = 5, 8, 8, 128, 16, 2048
    hq = NUM_KV_HEADS * group
    indptr_dev = torch.zeros(padded + 1, dtype=torch.int32, device=DEVICE)
    indices_dev = torch.zeros(max_pages, dtype=torch.int32, device=DEVICE)
    last_dev = torch.zeros(padded, dtype=torch.int32, device=DEVICE)
    w = flashinfer_jit.BatchDecodeWithPagedKVCacheWrapper(
        int8_workspace(), "NHD", use_cuda_graph=True, paged_kv_indptr_buffer=indptr_dev,
        paged_kv_indices_buffer=indices_dev, paged_kv_last_page_len_buffer=last_dev, use_tensor_cores=True)
    cache = ref.new_paged_cache(max_pages, page_size, NUM_KV_HEADS, head_dim, torch.bfloat16, DEVICE, "NHD")
    q = torch.zeros((padded, hq, head_dim), dtype=torch.bfloat16, device=DEVICE)
    out = torch.full((padded, hq, head_dim), NAN, dtype=torch.bfloat16, device=DEVICE)
    scale = 1.0 / math.sqrt(head_dim)

    def step(kv_lens, seed):
        batch = paged_batch([1] * real, kv_lens, group, head_dim, torch.bfloat16, "NHD", page_size, seed=seed,
                            num_pages=max_pages)
        cache.copy_(batch.cache)
        q[:real].copy_(batch.q)
        t = batch.table
        n = int(t.indptr[-1])
        indptr = torch.cat([t.indptr, t.indptr[-1:].repeat(padded - real)])  # vLLM: padding repeats the last
        last = torch.cat([t.last_page_len, torch.ones(padded - real, dtype=torch.int32)])  # and last_page_len 1
        seq_lens = torch.tensor(list(kv_lens) + [0] * (padded - real), dtype=torch.int32)
        indices_dev[:n].copy_(t.indices[:n])
        vllm_fast_plan_decode(w, indptr, indices_dev[:n], last, seq_lens, hq, NUM_KV_HEADS, head_dim, page_size,
                              pos_encoding_mode="NONE", sm_scale=scale, window_left=-1, logits_soft_cap=None,
                              q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16, fixed_split_size=-1,
                              disable_split_kv=False)
        assert w._window_left == -1 and w._logits_soft_cap == 0.0 and w._sm_scale == scale
        return batch

    step([100, 7, 16, 300, 1], seed=1)
    run = lambda: w.run(q, cache, k_scale=1.0, v_scale=1.0, out=out)  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for i, lens in enumerate(([100, 7, 16, 300, 1], [9000, 1, 0, 17, 4096], [33, 33, 33, 33, 33])):
        batch = step(lens, seed=10 + i)
        out.fill_(NAN)
        graph.replay()
        torch.cuda.synchronize()
        ref_out, _ = batch.reference(False, scale)
        ref.check_attention(out[:real], ref_out, torch.bfloat16, f"vLLM graph replay {i} (lengths {lens})")
        assert bool((out[real:] == 0).all()), f"vLLM graph replay {i}: padded requests (no pages) must give 0"


@gpu
def test_cuda_graph_wrapper_flashinfer_test_shape() -> None:
    """test_cuda_graph_batch_decode_with_paged_kv_cache: warm-up plan (one page each, CUDA indptr), capture,
    re-plan with 1..3 pages per request and replay, then the full table."""
    batch_size, kv_len, page_size, group, head_dim = 12, 54, 8, 4, 128
    pages_per = -(-kv_len // page_size)
    total = pages_per * batch_size
    hq = NUM_KV_HEADS * group
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    q = torch.randn((batch_size, hq, head_dim), generator=gen, device=DEVICE).half()
    kv = torch.randn((total, 2, page_size, NUM_KV_HEADS, head_dim), generator=gen, device=DEVICE).half()
    w = flashinfer_jit.decode.CUDAGraphBatchDecodeWithPagedKVCacheWrapper(
        int8_workspace(), torch.empty(batch_size + 1, dtype=torch.int32, device=DEVICE),
        torch.empty(total, dtype=torch.int32, device=DEVICE), torch.empty(batch_size, dtype=torch.int32, device=DEVICE),
        "NHD")
    plan_kw = dict(data_type=torch.float16, pos_encoding_mode="NONE", q_data_type=torch.float16)
    w.plan(torch.arange(batch_size + 1, dtype=torch.int32, device=DEVICE),
           torch.arange(batch_size, dtype=torch.int32, device=DEVICE),
           torch.full((batch_size,), page_size, dtype=torch.int32), hq, NUM_KV_HEADS, head_dim, page_size, **plan_kw)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            o = w.run(q, kv)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o = w.run(q, kv)

    def check(indptr, last, what):
        k_all, v_all, kv_indptr = ref.gather_paged_kv(kv, indptr, torch.arange(int(indptr[-1]), dtype=torch.int32),
                                                      last, page_size, "NHD")
        ref_out, _ = ref.ragged_attention_ref(q, k_all, v_all, torch.arange(batch_size + 1, dtype=torch.int32),
                                              kv_indptr, False)
        ref.check_attention(o, ref_out, torch.float16, what)

    for i in range(1, min(4, pages_per)):
        indptr = torch.arange(batch_size + 1, dtype=torch.int32) * i
        last = torch.full((batch_size,), page_size, dtype=torch.int32)
        w.plan(indptr, torch.arange(i * batch_size, dtype=torch.int32), last, hq, NUM_KV_HEADS, head_dim, page_size,
               **plan_kw)
        graph.replay()
        torch.cuda.synchronize()
        check(indptr, last, f"CUDA-graph wrapper, {i} pages each")
    indptr = torch.arange(batch_size + 1, dtype=torch.int32) * pages_per
    last = torch.full((batch_size,), (kv_len - 1) % page_size + 1, dtype=torch.int32)
    w.plan(indptr, torch.arange(total, dtype=torch.int32), last, hq, NUM_KV_HEADS, head_dim, page_size, **plan_kw)
    graph.replay()
    torch.cuda.synchronize()
    check(indptr, last, "CUDA-graph wrapper, full table")


@gpu
def test_forward_applies_its_sm_scale_and_plan_resets_it() -> None:
    batch = paged_batch([1] * 9, [5, 100, 0, 1000, 16, 17, 3, 64, 250], 4, seed=8)
    t = batch.table
    w = flashinfer_jit.decode.BatchDecodeWithPagedKVCacheWrapper(int8_workspace(), "NHD")
    w.plan(t.indptr, t.indices, t.last_page_len, batch.num_qo_heads, NUM_KV_HEADS, 128, 16,
           q_data_type=torch.bfloat16)
    ref_out, ref_lse = batch.reference(False, 0.05)
    out, lse = w.forward_return_lse(batch.q, batch.cache, sm_scale=0.05, logits_soft_cap=0.0, k_scale=1.0)
    ref.check_attention(out, ref_out, torch.bfloat16, "forward_return_lse(sm_scale=0.05)", lse, ref_lse)
    assert w._sm_scale == 0.05
    ref.check_attention(w.run(batch.q, batch.cache), ref_out, torch.bfloat16, "run() after forward(sm_scale=0.05)")
    ref.check_attention(w.forward(batch.q, batch.cache), batch.reference(False)[0], torch.bfloat16,
                        "forward() (sm_scale None: 1/sqrt(D), as FlashInfer)")
    w.plan(t.indptr, t.indices, t.last_page_len, batch.num_qo_heads, NUM_KV_HEADS, 128, 16,
           q_data_type=torch.bfloat16, sm_scale=0.05)
    ref.check_attention(w.run(batch.q, batch.cache), ref_out, torch.bfloat16, "plan(sm_scale=0.05)")


@gpu
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("group", GROUPS)
def test_single_decode_with_kv_cache(layout: str, group: int) -> None:
    for kv_len, dtype in ((1, torch.float16), (97, torch.bfloat16), (4096, torch.float16)):
        dense = ref.make_ragged_batch([1], [kv_len], NUM_KV_HEADS * group, NUM_KV_HEADS, 128, dtype, DEVICE, layout,
                                      seed=kv_len + group)
        ref_out, ref_lse = dense.reference(False)
        out, lse = flashinfer_jit.single_decode_with_kv_cache(dense.q[0], dense.k, dense.v, kv_layout=layout,
                                                              pos_encoding_mode="NONE", logits_soft_cap=0.0,
                                                              return_lse=True)
        assert out.shape == (NUM_KV_HEADS * group, 128) and lse.shape == (NUM_KV_HEADS * group,)
        ref.check_attention(out[None], ref_out, dtype, f"single_decode {layout} g{group} kv {kv_len}", lse[None],
                            ref_lse)
        out = flashinfer_jit.decode.single_decode_with_kv_cache(dense.q[0], dense.k, dense.v, layout,
                                                                use_tensor_cores=True)
        ref.check_attention(out[None], ref_out, dtype, f"single_decode positional {layout} g{group} kv {kv_len}")


# ---- cascade -------------------------------------------------------------------------------------

class Cascade:
    """Requests whose KV is the concatenation of levels: level 0 one prefix shared by all, a middle level
    (with 3 levels) shared by groups of requests, the last level each request's own tokens. All levels
    live in one page pool (pages shuffled, unused pages NaN)."""

    def __init__(self, q_lens, shared_len: int, group_lens: list[int] | None, groups_of: list[int] | None,
                 unique_lens, group: int, head_dim: int = 128, dtype=torch.bfloat16, layout: str = "NHD",
                 page_size: int = 16, seed: int = 0):
        self.q_lens, self.group, self.dtype, self.layout = list(q_lens), group, dtype, layout
        batch = len(q_lens)
        hq = NUM_KV_HEADS * group
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        rand = lambda n: torch.randn((n, NUM_KV_HEADS, head_dim), generator=gen, device=DEVICE).to(dtype)  # noqa: E731
        self.q = torch.randn((sum(q_lens), hq, head_dim), generator=gen, device=DEVICE).to(dtype)
        # each level: list of (owner requests, k, v)
        lists = [[(list(range(batch)), rand(shared_len), rand(shared_len))]]
        if group_lens is not None:
            lists.append([([r for r in range(batch) if groups_of[r] == g], rand(n), rand(n))
                          for g, n in enumerate(group_lens)])
        lists.append([([r], rand(n), rand(n)) for r, n in enumerate(unique_lens)])
        pages_needed = sum(ref.num_pages_for(k.shape[0], page_size) for level in lists for _, k, _ in level)
        num_pages = pages_needed + 7
        order = torch.randperm(num_pages, generator=torch.Generator().manual_seed(seed)).to(torch.int32)
        self.cache = ref.new_paged_cache(num_pages, page_size, NUM_KV_HEADS, head_dim, dtype, DEVICE, layout)
        cursor = 0
        self.levels = []  # (qo_indptr, indptr, indices, last_page_len) per level
        q_indptr = ref.make_indptr(q_lens)
        for level in lists:
            qo, ptr, idx, last = [0], [0], [], []
            for owners, k, v in level:
                n_pages = ref.num_pages_for(k.shape[0], page_size)
                pages = order[cursor: cursor + n_pages]
                cursor += n_pages
                p, s = ref.token_page_slots(torch.tensor([0, n_pages]), pages, [k.shape[0]], page_size)
                ref.scatter_to_pages(self.cache, k, v, p, s, layout)
                # a level's request is a run of queries (its owners are consecutive requests)
                assert owners == list(range(owners[0], owners[-1] + 1))
                qo.append(int(q_indptr[owners[-1] + 1]))
                ptr.append(ptr[-1] + n_pages)
                idx += pages.tolist()
                last.append(ref.last_page_len_for(k.shape[0], page_size))
            self.levels.append(tuple(torch.tensor(x, dtype=torch.int32) for x in (qo, ptr, idx, last)))
        self.kv = [torch.cat([k for level in lists for owners, k, _ in level if r in owners]) for r in range(batch)]
        self.vv = [torch.cat([v for level in lists for owners, _, v in level if r in owners]) for r in range(batch)]

    def reference(self, causal: bool) -> torch.Tensor:
        k, v = torch.cat(self.kv), torch.cat(self.vv)
        kv_indptr = ref.make_indptr([t.shape[0] for t in self.kv])
        return ref.ragged_attention_ref(self.q, k, v, ref.make_indptr(self.q_lens), kv_indptr, causal)[0]

    def plan_args(self):
        return [list(x) for x in zip(*self.levels)]


@gpu
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("levels", [2, 3])
@pytest.mark.parametrize("stage", ["decode", "append"])
def test_multi_level_cascade_matches_reference(stage: str, levels: int, group: int) -> None:
    batch = 6
    q_lens = [1] * batch if stage == "decode" else [5, 1, 17, 3, 8, 2]
    unique = [37, 17, 64, 3, 100, 9] if stage == "decode" else [40, 1, 17, 3, 90, 2]
    middle = ([48, 130], [0, 0, 0, 1, 1, 1]) if levels == 3 else (None, None)
    c = Cascade(q_lens, 512, middle[0], middle[1], unique, group, layout="HND" if group == 4 else "NHD",
                seed=levels * 10 + group)
    w = flashinfer_jit.cascade.MultiLevelCascadeAttentionWrapper(levels, int8_workspace(32 << 20), c.layout)
    causal = stage == "append"
    hq = NUM_KV_HEADS * group
    if causal:
        w.plan(*c.plan_args(), hq, NUM_KV_HEADS, 128, 16, causal=True, sm_scale=None, window_left=-1,
               logits_soft_cap=0.0, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
    else:
        w.plan(*c.plan_args(), hq, NUM_KV_HEADS, 128, 16, q_data_type="bfloat16")
    out = w.run(c.q, c.cache)
    ref.check_attention(out, c.reference(causal), torch.bfloat16, f"cascade {stage} {levels} levels g{group}")
    out2 = w.forward(c.q, (c.cache[:, 0], c.cache[:, 1]))
    ref.check_attention(out2, c.reference(causal), torch.bfloat16, f"cascade forward, (k, v) cache, {stage}")


@gpu
@pytest.mark.parametrize("stage", ["decode", "append"])
def test_shared_prefix_wrappers(stage: str) -> None:
    """test_shared_prefix_kernels.py's comparison: the two-level wrappers (shared prefix in its own
    tensors) against the multi-level cascade and the reference."""
    batch, shared_len, unique_len, heads, head_dim, page_size = 12, 512, 37, 8, 128, 16
    q_len = 1 if stage == "decode" else unique_len
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    q = torch.randn((batch * q_len, heads, head_dim), generator=gen, device=DEVICE).half()
    k_shared, v_shared = (torch.randn((shared_len, heads, head_dim), generator=gen, device=DEVICE).half()
                          for _ in range(2))
    k_unique, v_unique = (torch.randn((batch * unique_len, heads, head_dim), generator=gen, device=DEVICE).half()
                          for _ in range(2))
    shared_pages = shared_len // page_size
    unique_pages = -(-unique_len // page_size)
    kv_data = torch.zeros((shared_pages + batch * unique_pages, 2, page_size, heads, head_dim), device=DEVICE).half()
    shared_indices = torch.arange(shared_pages, dtype=torch.int32, device=DEVICE)
    shared_indptr = torch.tensor([0, shared_pages], dtype=torch.int32, device=DEVICE)
    shared_last = torch.tensor([page_size], dtype=torch.int32, device=DEVICE)
    unique_indices = torch.arange(batch * unique_pages, dtype=torch.int32, device=DEVICE) + shared_pages
    unique_indptr = torch.arange(batch + 1, dtype=torch.int32, device=DEVICE) * unique_pages
    unique_last = torch.full((batch,), (unique_len - 1) % page_size + 1, dtype=torch.int32, device=DEVICE)
    for k, v, indices, indptr, last, n in ((k_shared, v_shared, shared_indices, shared_indptr, shared_last, 1),
                                           (k_unique, v_unique, unique_indices, unique_indptr, unique_last, batch)):
        append_indptr = torch.arange(n + 1, dtype=torch.int32, device=DEVICE) * (k.shape[0] // n)
        flashinfer_jit.append_paged_kv_cache(
            k, v, *flashinfer_jit.get_batch_indices_positions(
                append_indptr, flashinfer_jit.get_seq_lens(indptr, last, page_size), k.shape[0]),
            kv_data, indices, indptr, last, "NHD")
    qo_top = torch.tensor([0, q.shape[0]], dtype=torch.int32, device=DEVICE)
    qo_bottom = torch.arange(batch + 1, dtype=torch.int32, device=DEVICE) * q_len
    multi = flashinfer_jit.MultiLevelCascadeAttentionWrapper(2, int8_workspace(32 << 20), "NHD")
    multi.plan([qo_top, qo_bottom], [shared_indptr, unique_indptr], [shared_indices, unique_indices],
               [shared_last, unique_last], heads, heads, head_dim, page_size, causal=stage == "append")
    o_multi = multi.run(q, kv_data)
    if stage == "decode":
        two = flashinfer_jit.BatchDecodeWithSharedPrefixPagedKVCacheWrapper(int8_workspace(32 << 20), "NHD")
        two.begin_forward(unique_indptr, unique_indices, unique_last, heads, heads, head_dim, page_size)
        o_two = two.forward(q, k_shared, v_shared, kv_data)
    else:
        two = flashinfer_jit.BatchPrefillWithSharedPrefixPagedKVCacheWrapper(int8_workspace(32 << 20), "NHD")
        two.begin_forward(qo_bottom, unique_indptr, unique_indices, unique_last, heads, heads, head_dim, page_size)
        o_two = two.forward(q, k_shared, v_shared, kv_data, causal=True)
    ref.check_attention(o_two, o_multi.float(), torch.float16, f"shared-prefix {stage} vs multi-level")
    k_all = torch.cat([torch.cat([k_shared, k_unique[r * unique_len:(r + 1) * unique_len]]) for r in range(batch)])
    v_all = torch.cat([torch.cat([v_shared, v_unique[r * unique_len:(r + 1) * unique_len]]) for r in range(batch)])
    ref_out, _ = ref.ragged_attention_ref(q, k_all, v_all, qo_bottom.cpu(),
                                          torch.arange(batch + 1, dtype=torch.int32) * (shared_len + unique_len),
                                          stage == "append")
    ref.check_attention(o_multi, ref_out, torch.float16, f"multi-level {stage} vs reference")


# ---- BatchAttention -----------------------------------------------------------------------------

BATCH_ATTENTION_MIXES = {
    "decode only": ([1] * 40, None),
    "prefill only": ([129, 64], [4099, 200]),
    "mixed": ([1] * 20 + [3] * 4 + [17, 512], [600] * 20 + [5000] * 4 + [8192, 1024]),
    "chunked prefill": ([2] * 9 + [300], [766] * 9 + [1024]),
    "with empty requests": ([1, 0, 5, 1, 7], [0, 40, 5, 1000, 300]),
}


@gpu
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mix", list(BATCH_ATTENTION_MIXES))
def test_batch_attention_mixed_batches(mix: str, causal: bool, group: int) -> None:
    q_lens, kv_lens = BATCH_ATTENTION_MIXES[mix]
    if kv_lens is None:
        kv_lens = ragged_decode_lens(len(q_lens), 16, seed=group)
    layout, page_size = ("HND", 1) if group == 8 else ("NHD", 16)
    batch = paged_batch(q_lens, kv_lens, group, 128, torch.bfloat16, layout, page_size, seed=len(mix) + group)
    t = batch.table
    w = flashinfer_jit.BatchAttention(kv_layout=layout)
    w.plan(batch.qo_indptr.to(DEVICE), t.indptr.to(DEVICE), t.indices.to(DEVICE),
           torch.tensor(kv_lens, dtype=torch.int32, device=DEVICE), batch.num_qo_heads, NUM_KV_HEADS, 128, 128,
           page_size, causal=causal, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16, logits_soft_cap=0.0)
    ref_out, ref_lse = batch.reference(causal)
    out, lse = poisoned(batch.total_q, batch.num_qo_heads, 128, torch.bfloat16)
    got = w.run(batch.q, batch.cache, out=out, lse=lse, v_scale=None, logits_soft_cap=0.0)
    assert got[0].data_ptr() == out.data_ptr() and got[1].data_ptr() == lse.data_ptr()
    ref.check_attention(out, ref_out, torch.bfloat16, f"BatchAttention {mix} causal={causal} g{group}", lse, ref_lse)
    out2, lse2 = w.run(batch.q, batch.cache)  # FlashInfer's BatchAttention always returns (out, lse)
    ref.check_attention(out2, ref_out, torch.bfloat16, f"BatchAttention {mix} [allocated]", lse2, ref_lse)


@gpu
def test_batch_attention_is_one_launch() -> None:
    """The whole mixed batch is one plan of the paged prefill wrapper: one kernel launch per run()."""
    q_lens, kv_lens = BATCH_ATTENTION_MIXES["mixed"]
    batch = paged_batch(q_lens, kv_lens, 4, seed=3)
    t = batch.table
    w = flashinfer_jit.BatchAttention()
    w.plan(batch.qo_indptr, t.indptr, t.indices, torch.tensor(kv_lens, dtype=torch.int32), batch.num_qo_heads,
           NUM_KV_HEADS, 128, 128, 16, causal=True)
    w.run(batch.q, batch.cache)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        w.run(batch.q, batch.cache)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    if not any("kernel" in n.lower() for n in names):
        pytest.skip("the profiler recorded no CUDA kernels here (CUPTI unavailable)")
    kernels = [n for n in names if "prefill_kernel" in n and "launch" not in n.lower()]
    assert len(kernels) == 1, f"expected one attention kernel launch, got {kernels}"


# ---- torch.compile(mode="reduce-overhead", fullgraph=True) ---------------------------------------

def _compiled_equals_eager(fn: Callable, args: tuple, what: str, dtype=torch.bfloat16) -> torch.Tensor:
    torch._dynamo.reset()
    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    expected = fn(*args).float()
    for i in range(3):  # warm-up, recording, replay
        got = compiled(*args).clone()
        torch.cuda.synchronize()
        ref.check_attention(got.to(dtype), expected, dtype, f"{what}: compiled call {i} vs eager")
    return got


@gpu
def test_decode_run_under_torch_compile_reduce_overhead() -> None:
    batch = paged_batch([1] * 24, ragged_decode_lens(24, 16, seed=2), 8, seed=4)
    t = batch.table
    w = flashinfer_jit.BatchDecodeWithPagedKVCacheWrapper(int8_workspace(), "NHD", use_tensor_cores=True)
    w.plan(t.indptr, t.indices, t.last_page_len, batch.num_qo_heads, NUM_KV_HEADS, 128, 16, q_data_type=torch.bfloat16)
    got = _compiled_equals_eager(lambda q, cache: w.run(q, cache) * 1.0, (batch.q, batch.cache), "decode run")
    ref.check_attention(got.to(torch.bfloat16), batch.reference(False)[0], torch.bfloat16, "compiled decode run")
    # the CUDA-graph decode wrapper and run(return_lse=True) too
    g = flashinfer_jit.BatchDecodeWithPagedKVCacheWrapper(int8_workspace(), "NHD", use_cuda_graph=True)
    g.plan(t.indptr, t.indices, t.last_page_len, batch.num_qo_heads, NUM_KV_HEADS, 128, 16, q_data_type=torch.bfloat16)
    _compiled_equals_eager(lambda q, cache: g.run(q, cache, return_lse=True)[0] * 1.0, (batch.q, batch.cache),
                           "CUDA-graph decode wrapper run(return_lse=True)")


@gpu
def test_cascade_and_batch_attention_run_under_torch_compile_reduce_overhead() -> None:
    c = Cascade([1] * 6, 256, None, None, [37, 17, 64, 3, 100, 9], 4, seed=9)
    w = flashinfer_jit.MultiLevelCascadeAttentionWrapper(2, int8_workspace(32 << 20), "NHD")
    w.plan(*c.plan_args(), NUM_KV_HEADS * 4, NUM_KV_HEADS, 128, 16, q_data_type=torch.bfloat16)
    got = _compiled_equals_eager(lambda q, cache: w.run(q, cache) * 1.0, (c.q, c.cache), "cascade run")
    ref.check_attention(got.to(torch.bfloat16), c.reference(False), torch.bfloat16, "compiled cascade run")
    q_lens, kv_lens = BATCH_ATTENTION_MIXES["mixed"]
    batch = paged_batch(q_lens, kv_lens, 4, seed=11)
    t = batch.table
    b = flashinfer_jit.BatchAttention()
    b.plan(batch.qo_indptr, t.indptr, t.indices, torch.tensor(kv_lens, dtype=torch.int32), batch.num_qo_heads,
           NUM_KV_HEADS, 128, 128, 16, causal=True)
    got = _compiled_equals_eager(lambda q, cache: b.run(q, cache)[0] * 1.0, (batch.q, batch.cache),
                                 "BatchAttention run")
    ref.check_attention(got.to(torch.bfloat16), batch.reference(True)[0], torch.bfloat16, "compiled BatchAttention")


# ---- page.py on the GPU --------------------------------------------------------------------------

@gpu
def test_get_batch_indices_positions_on_cuda_with_out_buffers_and_graph_capture() -> None:
    indptr, seq_lens, nnz = [0, 1, 3, 3, 10], [5, 9, 2, 7], 12
    exp_b, exp_p = flashinfer_batch_indices_positions(indptr, seq_lens, nnz, [3] * nnz)
    a = torch.tensor(indptr, dtype=torch.int32, device=DEVICE)
    s = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    bi = torch.empty(nnz, dtype=torch.int32, device=DEVICE)
    po = torch.full((nnz,), 3, dtype=torch.int32, device=DEVICE)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        flashinfer_jit.get_batch_indices_positions(a, s, nnz, batch_indices=bi, positions=po)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert (bi.tolist(), po.tolist()) == (exp_b, exp_p)
    po.fill_(3)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        flashinfer_jit.get_batch_indices_positions(a, s, nnz, batch_indices=bi, positions=po)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        flashinfer_jit.get_batch_indices_positions(a, s, nnz, batch_indices=bi, positions=po)
    a.copy_(torch.tensor([0, 2, 2, 6, 9], dtype=torch.int32))
    po.fill_(3)
    graph.replay()
    torch.cuda.synchronize()
    assert (bi.tolist(), po.tolist()) == flashinfer_batch_indices_positions([0, 2, 2, 6, 9], seq_lens, nnz, [3] * nnz)


@pytest.mark.parametrize("kw, expected", [
    (dict(kv_data_type=torch.float8_e4m3fn, q_data_type=torch.bfloat16), ("fp8e4m3", "bf16", False)),
    (dict(data_type=torch.float8_e5m2, q_data_type=torch.float16), ("fp8e5m2", "fp16", False)),
    (dict(kv_data_type=torch.float8_e4m3fn), ("fp8e4m3", "fp16", False)),  # q defaults to float16, as FlashInfer
    (dict(pos_encoding_mode="ROPE_LLAMA", q_data_type=torch.bfloat16), ("", "bf16", True)),
])
def test_decode_plan_chooses_fp8_and_rope_kernels(kw: dict, expected: tuple, monkeypatch) -> None:
    """Decode plans the paged fa2 kernel with fp8 K/V storage (issue #16) or fused RoPE; the plan keeps the
    choice (the re-plans of fast_decode_plan and the cached module inherit it)."""
    loaded = []

    def record(spec, *args, **kwargs):
        loaded.append(spec)
        raise ReachedKernel()

    monkeypatch.setattr(loader, "load", record)
    monkeypatch.setattr(flashinfer_jit.kernels, "_variants", {})
    with pytest.raises(ReachedKernel):
        decode_plan_call(**kw)()
    assert [(s.kv_dtype, s.dtype, s.rope, s.kv_layout, s.backend) for s in loaded] == [(*expected, "paged", "fa2")]


def test_cascade_and_batch_attention_refuse_fp8_kv(no_kernels) -> None:
    """fp8 caches work on the batch prefill / decode wrappers; the cascade wrapper and BatchAttention say so."""
    w = cascade.MultiLevelCascadeAttentionWrapper(2, workspace(), "NHD")
    levels = ([i32([0, 3]), i32([0, 1, 2, 3])], [i32([0, 2]), i32([0, 1, 1, 2])], [i32([0, 1]), i32([2, 3])],
              [i32([16]), i32([5, 0, 9])])
    with pytest.raises(NotSupportedError, match="batch prefill and decode wrappers") as info:
        w.plan(*levels, HQ, HKV, HD, PS, kv_data_type=torch.float8_e4m3fn)
    assert info.value.parameter == "kv_data_type"
