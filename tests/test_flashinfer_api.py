"""`import flashinfer_jit as flashinfer`: FlashInfer's signatures and the call shapes of its users.

CPU (no GPU needed):
* every entry of tests/flashinfer_signatures.py (FlashInfer 0.7.2's parameter lists) against ours with
  inspect.signature: each FlashInfer parameter is a parameter of ours of the same name, position and kind,
  with FlashInfer's literal default; our extra parameters come after FlashInfer's or are keyword-only;
  aliases (begin_forward = plan) and top-level exports are the same objects;
* CALL_SHAPES: how FlashInfer's own tests (tests/attention/test_batch_prefill_kernels.py,
  test_batch_invariant_fa2.py), vLLM (vllm/v1/attention/backends/flashinfer.py) and SGLang
  (python/sglang/srt/layers/attention/flashinfer_backend.py) call the prefill APIs, positional and
  keyword forms, int8 workspaces, off values. Each binds to our signature, and then runs on CPU tensors
  that report device cuda (`CudaLooking`) as far as a CPU allows: a constructor returns, plan() reaches
  the kernel library (every argument check passed; loading is replaced by a sentinel), run()/forward()
  get to "called before plan()" (their option checks come first), single prefill reaches its op;
* OFF_CASES: a value for a feature flashinfer-jit lacks raises NotSupportedError naming the parameter,
  before any kernel library is loaded (so before any launch).

GPU (marked gpu; run on the device): a few of the call shapes end to end against the float32 reference
(tests/reference.py): FlashInfer-test shapes with int8 workspaces, vLLM's paged plan/run (page table on
the GPU, permuted HND cache, out=, k_scale=1.0), SGLang's extend (ragged forward + paged
forward_return_lse merged by LSE, plans without causal then forward(causal=True)), forward() overriding
sm_scale and causal, lse_base="ln", reset_workspace_buffer, seq_lens; and torch.compile with
mode="reduce-overhead" and fullgraph=True of single_prefill_with_kv_cache and of each wrapper's run().

Run: python -m pytest -q tests/test_flashinfer_api.py   (the GPU tests are skipped, with the reason, without CUDA)
"""
from __future__ import annotations

import ast
import importlib
import inspect
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

import flashinfer_jit
import flashinfer_jit as flashinfer  # the one-line switch, as users write it
from flashinfer_jit import kernels, loader, prefill

import flashinfer_signatures as fsig

P = inspect.Parameter

# ---- signatures ----------------------------------------------------------------------------------

_NO_DEFAULT, _ANY_DEFAULT = object(), object()


@dataclass(frozen=True)
class Param:
    name: str
    kind: Any
    default: Any


def parse_entry(entry: list[str]) -> list[Param]:
    out, kind = [], P.POSITIONAL_OR_KEYWORD
    for item in entry:
        if item == "*":
            kind = P.KEYWORD_ONLY
        elif item.startswith("**"):
            out.append(Param(item[2:], P.VAR_KEYWORD, _NO_DEFAULT))
        elif item.startswith("*"):
            out.append(Param(item[1:], P.VAR_POSITIONAL, _NO_DEFAULT))
            kind = P.KEYWORD_ONLY
        else:
            name, eq, default = item.partition("=")
            value = _NO_DEFAULT if not eq else _ANY_DEFAULT if default == "..." else ast.literal_eval(default)
            out.append(Param(name, kind, value))
    return out


def resolve(qualname: str) -> Any:
    """flashinfer.<module>.<name>... -> the flashinfer_jit object (the longest importable module prefix)."""
    parts = qualname.split(".")
    assert parts[0] == "flashinfer", qualname
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(["flashinfer_jit", *parts[1:cut]])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise AssertionError(f"cannot resolve {qualname}")


def signature_problems(qualname: str) -> list[str]:
    theirs = parse_entry(fsig.SIGNATURES[qualname])
    try:
        ours = list(inspect.signature(resolve(qualname)).parameters.values())
    except AttributeError as exc:
        return [f"missing: {exc}"]
    index = {p.name: i for i, p in enumerate(ours)}
    problems = []
    n_positional = sum(1 for t in theirs if t.kind in (P.POSITIONAL_OR_KEYWORD, P.VAR_POSITIONAL))
    for i, t in enumerate(theirs):
        if t.name not in index:
            problems.append(f"{t.name}: FlashInfer's parameter is missing")
            continue
        p = ours[index[t.name]]
        if p.kind != t.kind:
            problems.append(f"{t.name}: kind {p.kind.description}, FlashInfer's is {t.kind.description}")
        if t.kind in (P.POSITIONAL_OR_KEYWORD, P.VAR_POSITIONAL) and index[t.name] != i:
            problems.append(f"{t.name}: at position {index[t.name]}, FlashInfer's is {i}")
        if t.default is _NO_DEFAULT or t.default is _ANY_DEFAULT or t.kind in (P.VAR_POSITIONAL, P.VAR_KEYWORD):
            if t.default is _ANY_DEFAULT and p.default is P.empty:
                problems.append(f"{t.name}: FlashInfer's has a default, ours none")
            continue
        if (qualname, t.name) in fsig.DEFAULT_DIFFERS:
            continue
        if p.default is P.empty or type(p.default) is not type(t.default) or p.default != t.default:
            problems.append(f"{t.name}: default {p.default!r}, FlashInfer's {t.default!r}")
    theirs_names = {t.name for t in theirs}
    for j, p in enumerate(ours):
        if p.name in theirs_names or p.kind in (P.KEYWORD_ONLY, P.VAR_KEYWORD):
            continue
        if p.kind == P.VAR_POSITIONAL:
            problems.append(f"*{p.name}: ours takes extra positional arguments, FlashInfer's does not")
        elif j < n_positional:
            problems.append(f"{p.name}: our extra parameter sits among FlashInfer's positional ones (at {j})")
    return problems


@pytest.mark.parametrize("qualname", sorted(fsig.SIGNATURES))
def test_signature_matches_flashinfer(qualname: str) -> None:
    problems = signature_problems(qualname)
    assert not problems, f"{qualname} (FlashInfer {fsig.FLASHINFER_VERSION}):\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("alias", sorted(fsig.ALIASES))
def test_aliases_are_the_same_callable(alias: str) -> None:
    assert resolve(alias) is resolve(fsig.ALIASES[alias]), f"{alias} is not {fsig.ALIASES[alias]}"


@pytest.mark.parametrize("name", sorted(fsig.TOP_LEVEL))
def test_top_level_names(name: str) -> None:
    """flashinfer.X is the object of FlashInfer's module that defines it (flashinfer.prefill.X, ...)."""
    obj = getattr(flashinfer_jit, name, None)
    assert obj is not None, f"flashinfer_jit.{name} is missing"
    assert name in flashinfer_jit.__all__, f"{name} is not in flashinfer_jit.__all__"
    modules = {q.split(".")[1] for q in fsig.SIGNATURES if name in q.split(".")[2:3]}
    assert modules, f"{name}: no SIGNATURES entry says which module defines it"
    for module in modules:
        assert getattr(importlib.import_module(f"flashinfer_jit.{module}"), name) is obj, (
            f"flashinfer_jit.{name} is not flashinfer_jit.{module}.{name}")


def test_signature_checker_catches_a_drift() -> None:
    """The checker itself: a moved, renamed or keyword-only-ified parameter is reported."""
    key = "flashinfer.prefill.BatchPrefillWithRaggedKVCacheWrapper.plan"
    saved = fsig.SIGNATURES[key]
    try:
        fsig.SIGNATURES[key] = ["self", "kv_indptr", "qo_indptr"] + saved[3:]
        assert any("position" in p for p in signature_problems(key))
        fsig.SIGNATURES[key] = saved + ["brand_new_option=None"]
        assert any("brand_new_option" in p for p in signature_problems(key))
        fsig.SIGNATURES[key] = [("causal=True" if p == "causal=False" else p) for p in saved]
        assert any("causal: default" in p for p in signature_problems(key))
    finally:
        fsig.SIGNATURES[key] = saved


def test_no_end_forward_in_flashinfer_but_ours_is_a_no_op() -> None:
    for qualname in fsig.ABSENT:
        if qualname.endswith(".end_forward"):
            assert resolve(qualname)(object()) is None


# ---- CPU tensors that look like CUDA tensors -------------------------------------------------------

class CudaLooking(torch.Tensor):
    """A CPU tensor that reports device cuda:0 (as in tests/test_bad_inputs.py)."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("cuda", 0)


def cl(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype).as_subclass(CudaLooking)


def i32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


class ReachedKernel(Exception):
    """Raised instead of loading a kernel library: every argument check before it passed."""


@pytest.fixture
def no_kernels(monkeypatch):
    def reached(*args, **kwargs):
        raise ReachedKernel()

    monkeypatch.setattr(loader, "load", reached)
    monkeypatch.setattr(kernels, "_variants", {})
    calls: list[tuple] = []
    monkeypatch.setattr(prefill, "_single_prefill_op", lambda *args: calls.append(args))
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **{**k, "device": "cpu"}).as_subclass(CudaLooking)
                        if str(k.get("device", "cpu")).startswith("cuda") else real_empty(*a, **k))
    return calls


# The batch every CPU call shape uses: ragged q lengths 5, 0, 7 over kv lengths 9, 3, 7; paged (page 16)
# kv lengths 20, 0, 7 over pages [3, 0], [], [5] of a 6-page cache. GQA 8 / 2, head_dim 128, bf16.
HQ, HKV, D, PS, DT = 8, 2, 128, 16, torch.bfloat16
QO, KV = [0, 5, 5, 12], [0, 9, 12, 19]
PAGE_INDPTR, PAGE_INDICES, LAST_PAGE_LEN = [0, 2, 2, 3], [3, 0, 5], [4, 0, 7]
SCALE = 1.0 / math.sqrt(D)


class Args:
    """Arguments of a call shape: real CPU (CudaLooking) tensors, or placeholders for binding only."""

    def __init__(self, real: bool):
        self.real = real

    def t(self, *shape: int, dtype: torch.dtype = DT):
        return cl(*shape, dtype=dtype) if self.real else f"<tensor {shape}>"

    def workspace(self, dtype: torch.dtype = torch.int8):
        return cl(1 << 20, dtype=dtype) if self.real else "<workspace>"

    def idx(self, values):
        return i32(values) if self.real else f"<int32 {values}>"

    # ragged
    def q(self):
        return self.t(QO[-1], HQ, D)

    def k(self):
        return self.t(KV[-1], HKV, D)

    def kv_cache(self, layout: str = "NHD"):
        return self.t(6, 2, PS, HKV, D) if layout == "NHD" else self.t(6, 2, HKV, PS, D)


@dataclass(frozen=True)
class Shape:
    id: str  # "<who>: <what>"
    target: str  # the FlashInfer qualname (a SIGNATURES or ALIASES key)
    build: Callable[[Args], tuple[tuple, dict]]


R = "flashinfer.prefill.BatchPrefillWithRaggedKVCacheWrapper"
G = "flashinfer.prefill.BatchPrefillWithPagedKVCacheWrapper"
SINGLE = "flashinfer.prefill.single_prefill_with_kv_cache"


def _paged_plan_positional(a: Args, indices_on_gpu: bool = False) -> tuple:
    return (a.idx(QO), a.idx(PAGE_INDPTR), a.idx(PAGE_INDICES), a.idx(LAST_PAGE_LEN), HQ, HKV, D, PS)


CALL_SHAPES = [
    # -- FlashInfer's tests (tests/attention/test_batch_prefill_kernels.py, test_batch_invariant_fa2.py) --
    Shape("flashinfer tests: paged wrapper, int8 workspace, layout positional", f"{G}.__init__",
          lambda a: ((a.workspace(), "NHD"), {})),
    Shape("flashinfer tests: paged wrapper for CUDA graphs with its buffers", f"{G}.__init__",
          lambda a: ((a.workspace(), "NHD"), dict(use_cuda_graph=True, qo_indptr_buf=a.idx(QO),
                                                   paged_kv_indptr_buf=a.idx(PAGE_INDPTR),
                                                   paged_kv_indices_buf=a.idx(PAGE_INDICES),
                                                   paged_kv_last_page_len_buf=a.idx(LAST_PAGE_LEN)))),
    Shape("flashinfer tests: paged plan, 8 positional, off values", f"{G}.plan",
          lambda a: (_paged_plan_positional(a), dict(causal=True, pos_encoding_mode="NONE", logits_soft_cap=0.0))),
    Shape("flashinfer tests: batch-invariant paged plan", f"{G}.plan",
          lambda a: (_paged_plan_positional(a), dict(pos_encoding_mode="NONE", q_data_type=DT, kv_data_type=DT,
                                                     fixed_split_size=None, disable_split_kv=True))),
    Shape("flashinfer tests: paged run, return_lse", f"{G}.run", lambda a: ((a.q(), a.kv_cache()), dict(return_lse=True))),
    Shape("flashinfer tests: paged run into out=", f"{G}.run", lambda a: ((a.q(), a.kv_cache()), dict(out=a.q()))),
    Shape("flashinfer tests: paged run with a (k, v) tuple", f"{G}.run",
          lambda a: ((a.q(), (a.t(6, PS, HKV, D), a.t(6, PS, HKV, D))), {})),
    Shape("flashinfer tests: paged run_return_lse", f"{G}.run_return_lse", lambda a: ((a.q(), a.kv_cache()), {})),
    Shape("flashinfer tests: ragged wrapper, int8 workspace", f"{R}.__init__", lambda a: ((a.workspace(), "NHD"), {})),
    Shape("flashinfer tests: ragged plan, 5 positional, off values", f"{R}.plan",
          lambda a: ((a.idx(QO), a.idx(KV), HQ, HKV, D), dict(causal=True, pos_encoding_mode="NONE",
                                                              logits_soft_cap=0.0))),
    Shape("flashinfer tests: ragged run", f"{R}.run", lambda a: ((a.q(), a.k(), a.k()), {})),
    Shape("flashinfer tests: ragged run, return_lse", f"{R}.run", lambda a: ((a.q(), a.k(), a.k()), dict(return_lse=True))),
    Shape("flashinfer tests: single prefill reference, off values", SINGLE,
          lambda a: ((a.t(5, HQ, D), a.t(9, HKV, D), a.t(9, HKV, D)),
                     dict(causal=True, pos_encoding_mode="NONE", logits_soft_cap=0.0))),
    Shape("flashinfer docs: single prefill, positional causal", SINGLE,
          lambda a: ((a.t(5, HQ, D), a.t(9, HKV, D), a.t(9, HKV, D)), dict(causal=True, kv_layout="NHD"))),
    Shape("flashinfer docs: single_prefill_with_kv_cache_return_lse", f"{SINGLE}_return_lse",
          lambda a: ((a.t(5, HQ, D), a.t(9, HKV, D), a.t(9, HKV, D)), dict(causal=False, backend="fa2"))),
    # -- vLLM (vllm/v1/attention/backends/flashinfer.py) --
    Shape("vLLM: prefill wrapper (workspace, kv cache layout)", f"{G}.__init__", lambda a: ((a.workspace(torch.uint8), "HND"), {})),
    Shape("vLLM: DCP ragged wrapper (workspace only)", f"{R}.__init__", lambda a: ((a.workspace(torch.uint8),), {})),
    Shape("vLLM: prefill plan, 8 positional + options", f"{G}.plan",
          lambda a: (_paged_plan_positional(a), dict(causal=True, sm_scale=SCALE, window_left=-1, logits_soft_cap=None,
                                                     q_data_type=DT, kv_data_type=DT, fixed_split_size=-1,
                                                     disable_split_kv=False))),
    Shape("vLLM: DCP context plan, keyword form", f"{G}.plan",
          lambda a: ((), dict(qo_indptr=a.idx(QO), paged_kv_indptr=a.idx(PAGE_INDPTR),
                              paged_kv_indices=a.idx(PAGE_INDICES), paged_kv_last_page_len=a.idx(LAST_PAGE_LEN),
                              num_qo_heads=HQ, num_kv_heads=HKV, head_dim_qk=D, page_size=PS, causal=False,
                              sm_scale=SCALE, window_left=-1, logits_soft_cap=0.0, q_data_type=DT, kv_data_type=DT,
                              fixed_split_size=4096, disable_split_kv=True))),
    Shape("vLLM: DCP new-tokens ragged plan, keyword form", f"{R}.plan",
          lambda a: ((), dict(qo_indptr=a.idx(QO), kv_indptr=a.idx(KV), num_qo_heads=HQ, num_kv_heads=HKV,
                              head_dim_qk=D, causal=True, sm_scale=SCALE, window_left=-1, logits_soft_cap=None,
                              q_data_type=DT, kv_data_type=DT, fixed_split_size=-1, disable_split_kv=False))),
    Shape("vLLM: prefill run (permuted cache, float scales, out=)", f"{G}.run",
          lambda a: ((a.q(), a.kv_cache("HND")), dict(k_scale=1.0, v_scale=1.0, out=a.q()))),
    Shape("vLLM: DCP ragged run_return_lse-style run", f"{R}.run",
          lambda a: ((a.q(), a.k(), a.k()), dict(return_lse=True))),
    # -- SGLang (python/sglang/srt/layers/attention/flashinfer_backend.py) --
    Shape("SGLang: ragged wrapper, backend='auto' by keyword", f"{R}.__init__",
          lambda a: ((a.workspace(torch.uint8), "NHD"), dict(backend="auto"))),
    Shape("SGLang: paged wrapper, backend='fa2' by keyword", f"{G}.__init__",
          lambda a: ((a.workspace(torch.uint8), "NHD"), dict(backend="fa2"))),
    Shape("SGLang: paged wrapper for CUDA graphs (verify), keyword buffers", f"{G}.__init__",
          lambda a: ((a.workspace(torch.uint8), "NHD"), dict(use_cuda_graph=True, backend="fa2",
                                                              qo_indptr_buf=a.idx(QO),
                                                              paged_kv_indptr_buf=a.idx(PAGE_INDPTR),
                                                              paged_kv_indices_buf=a.idx(PAGE_INDICES),
                                                              paged_kv_last_page_len_buf=a.idx(LAST_PAGE_LEN)))),
    Shape("SGLang: ragged begin_forward (qo_indptr twice)", f"{R}.begin_forward",
          lambda a: ((a.idx(QO), a.idx(QO), HQ, HKV, D), dict(q_data_type=DT))),
    Shape("SGLang: paged begin_forward with off multi-item options", f"{G}.begin_forward",
          lambda a: (_paged_plan_positional(a)[:7] + (1,), dict(q_data_type=DT, kv_data_type=DT, custom_mask=None,
                                                                non_blocking=True, fixed_split_size=None,
                                                                prefix_len_ptr=None, token_pos_in_items_ptr=None,
                                                                token_pos_in_items_len=0, max_item_len_ptr=None))),
    Shape("SGLang: paged forward (extend without ragged)", f"{G}.forward",
          lambda a: ((a.q(), a.kv_cache()), dict(causal=True, sm_scale=SCALE, window_left=-1, logits_soft_cap=0.0,
                                                 k_scale=1.0, v_scale=1.0))),
    Shape("SGLang: ragged forward (extend, no prefix)", f"{R}.forward",
          lambda a: ((a.q(), a.k(), a.k()), dict(causal=True, sm_scale=SCALE, logits_soft_cap=0.0))),
    Shape("SGLang: ragged forward_return_lse (extend part)", f"{R}.forward_return_lse",
          lambda a: ((a.q(), a.k(), a.k()), dict(causal=True, sm_scale=SCALE, window_left=-1, logits_soft_cap=0.0))),
    Shape("SGLang: paged forward_return_lse (prefix part)", f"{G}.forward_return_lse",
          lambda a: ((a.q(), a.kv_cache()), dict(causal=False, sm_scale=SCALE, window_left=-1, logits_soft_cap=None))),
]


def _target_object(target: str) -> Any:
    return resolve(target)


def _is_method(target: str) -> bool:
    return target.rsplit(".", 2)[-2][:1].isupper()


@pytest.mark.parametrize("shape", CALL_SHAPES, ids=[s.id for s in CALL_SHAPES])
def test_call_shape_binds(shape: Shape) -> None:
    args, kwargs = shape.build(Args(real=False))
    sig = inspect.signature(_target_object(shape.target))
    bound_args = (("<self>",) + args) if _is_method(shape.target) else args
    try:
        sig.bind(*bound_args, **kwargs)
    except TypeError as exc:
        pytest.fail(f"{shape.id}: does not bind to {shape.target}{sig}: {exc}")


def _run_on_cpu(shape: Shape, calls: list) -> None:
    a = Args(real=True)
    args, kwargs = shape.build(a)
    cls_name, _, method = shape.target.rpartition(".")
    if not _is_method(shape.target):
        _target_object(shape.target)(*args, **kwargs)
        assert calls, f"{shape.id}: the single-prefill op was not reached"
        return
    cls = resolve(cls_name)
    if method == "__init__":
        wrapper = cls(*args, **kwargs)
        assert wrapper.backend == "fa2"
        return
    wrapper = cls(a.workspace(), "HND" if "HND" in shape.id or "permuted" in shape.id else "NHD")
    if method in ("plan", "begin_forward"):
        with pytest.raises(ReachedKernel):
            getattr(wrapper, method)(*args, **kwargs)
        return
    with pytest.raises(RuntimeError, match="before plan"):
        getattr(wrapper, method)(*args, **kwargs)


@pytest.mark.parametrize("shape", CALL_SHAPES, ids=[s.id for s in CALL_SHAPES])
def test_call_shape_passes_the_option_checks_on_cpu(shape: Shape, no_kernels) -> None:
    _run_on_cpu(shape, no_kernels)


# ---- off means off, on means NotSupportedError ----------------------------------------------------

def ragged_plan(**over):
    def call(a: Args):
        w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(a.workspace(), "NHD")
        kw = dict(causal=True, q_data_type=DT)
        kw.update(over)
        w.plan(a.idx(QO), a.idx(KV), HQ, HKV, D, **kw)
    return call


def paged_plan(**over):
    def call(a: Args):
        w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(a.workspace(), "NHD")
        kw = dict(causal=True, q_data_type=DT)
        kw.update(over)
        w.plan(*_paged_plan_positional(a), **kw)
    return call


def ragged_run(**over):
    return lambda a: flashinfer.BatchPrefillWithRaggedKVCacheWrapper(a.workspace()).run(a.q(), a.k(), a.k(), **over)


def paged_run(*args, **over):
    return lambda a: flashinfer.BatchPrefillWithPagedKVCacheWrapper(a.workspace()).run(a.q(), a.kv_cache(), *args,
                                                                                       **over)


def ctor(cls_name: str, **over):
    return lambda a: getattr(flashinfer, cls_name)(a.workspace(), **over)


def single(**over):
    return lambda a: flashinfer.single_prefill_with_kv_cache(a.t(5, HQ, D), a.t(9, HKV, D), a.t(9, HKV, D), **over)


def forward(**over):
    def call(a: Args):
        w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(a.workspace())
        w.forward(a.q(), a.k(), a.k(), **over)
    return call


FP8 = getattr(torch, "float8_e4m3fn")
OFF_CASES = [  # (id, call, parameter named in the error)
    ("ragged plan use_fp16_qk_reduction", ragged_plan(use_fp16_qk_reduction=True), "use_fp16_qk_reduction"),
    ("ragged plan fp8 q_data_type (string)", ragged_plan(q_data_type="float8_e4m3fn"), "q_data_type"),
    ("paged plan fnuz fp8 kv_data_type", paged_plan(kv_data_type=torch.float8_e4m3fnuz), "kv_data_type"),
    ("paged plan NVFP4 (uint8) kv_data_type", paged_plan(kv_data_type=torch.uint8), "kv_data_type"),
    ("ragged plan o_data_type float32", ragged_plan(o_data_type=torch.float32), "o_data_type"),
    ("paged plan o_data_type fp16 for bf16 q", paged_plan(o_data_type=torch.float16), "o_data_type"),
    ("ragged plan head_dim_vo 64", ragged_plan(head_dim_vo=64), "head_dim_vo"),
    ("paged plan prefix_len_ptr", paged_plan(prefix_len_ptr=torch.tensor([3], dtype=torch.int32)), "prefix_len_ptr"),
    ("paged plan token_pos_in_items_ptr", paged_plan(token_pos_in_items_ptr=torch.zeros(4, dtype=torch.int32)),
     "token_pos_in_items_ptr"),
    ("paged plan max_item_len_ptr", paged_plan(max_item_len_ptr=torch.zeros(1, dtype=torch.int32)), "max_item_len_ptr"),
    ("ragged plan v_indptr != kv_indptr", ragged_plan(v_indptr=i32([0, 1, 2, 3])), "v_indptr"),
    ("ragged plan o_indptr != qo_indptr", ragged_plan(o_indptr=i32([0, 1, 2, 3])), "o_indptr"),
    ("ragged backend fa3", ctor("BatchPrefillWithRaggedKVCacheWrapper", backend="fa3"), "backend"),
    ("paged backend fa3", ctor("BatchPrefillWithPagedKVCacheWrapper", backend="fa3"), "backend"),
    ("paged backend trtllm-gen", ctor("BatchPrefillWithPagedKVCacheWrapper", backend="trtllm-gen"), "backend"),
    ("ragged backend cudnn", ctor("BatchPrefillWithRaggedKVCacheWrapper", backend="cudnn"), "backend"),
    ("ragged backend cutlass (SGLang on sm100)", ctor("BatchPrefillWithRaggedKVCacheWrapper", backend="cutlass"),
     "backend"),
    ("paged backend cute-dsl", ctor("BatchPrefillWithPagedKVCacheWrapper", backend="cute-dsl"), "backend"),
    ("ragged jit_args", ctor("BatchPrefillWithRaggedKVCacheWrapper", jit_args=["variant", 1]), "jit_args"),
    ("paged variant_owns_mask", ctor("BatchPrefillWithPagedKVCacheWrapper", variant_owns_mask=True),
     "variant_owns_mask"),
    ("ragged run o_scale 2", ragged_run(o_scale=2.0), "o_scale"),
    ("paged run q_scale tensor 0.5", paged_run(q_scale=torch.tensor([0.5])), "q_scale"),
    ("paged run *args (JIT variant tensors)", paged_run(torch.zeros(1)), "*args"),
    ("paged run sinks", paged_run(sinks=torch.zeros(HQ)), "sinks"),
    ("paged run kv_cache_sf", paged_run(kv_cache_sf=(torch.zeros(1), torch.zeros(1))), "kv_cache_sf"),
    ("paged run skip_softmax_threshold", paged_run(skip_softmax_threshold_scale_factor=0.1),
     "skip_softmax_threshold_scale_factor"),
    ("ragged run lse_layout HN", ragged_run(lse_layout="HN"), "lse_layout"),
    ("single custom_mask", single(custom_mask=torch.ones(5, 9, dtype=torch.bool)), "custom_mask"),
    ("single backend fa3", single(backend="fa3"), "backend"),
    ("single k_scale 2", single(k_scale=2.0), "k_scale"),
    ("single scale_q tensor", single(scale_q=torch.full((HQ,), 0.5)), "scale_q"),
    ("single o_dtype float32", single(o_dtype=torch.float32), "o_dtype"),
    ("single kv_cache_sf", single(kv_cache_sf=(torch.zeros(1), torch.zeros(1))), "kv_cache_sf"),
    ("single v head dim 64", lambda a: flashinfer.single_prefill_with_kv_cache(a.t(5, HQ, D), a.t(9, HKV, D),
                                                                               a.t(9, HKV, 64)), "v"),
]


@pytest.mark.parametrize("case", OFF_CASES, ids=[c[0] for c in OFF_CASES])
def test_missing_feature_raises_not_supported(case, no_kernels) -> None:
    what, call, parameter = case
    with pytest.raises(flashinfer.NotSupportedError) as excinfo:
        call(Args(real=True))
    err = excinfo.value
    assert isinstance(err, ValueError), "NotSupportedError must be a ValueError"
    assert err.parameter == parameter, f"{what}: names {err.parameter!r}, expected {parameter!r}: {err}"
    assert f"{parameter}=" in str(err) and "supported:" in str(err), f"{what}: unclear message: {err}"
    assert not no_kernels, f"{what}: the single-prefill op was reached before the error"


ON_VALUES_THAT_MEAN_OFF = [  # FlashInfer values meaning "off", each must pass the plan checks
    dict(pos_encoding_mode="NONE"), dict(pos_encoding_mode=0), dict(window_left=-1), dict(logits_soft_cap=0.0),
    dict(logits_soft_cap=None), dict(use_fp16_qk_reduction=False),
    dict(custom_mask=None, packed_custom_mask=None), dict(o_data_type=DT), dict(o_data_type="bfloat16"),
    dict(head_dim_vo=D), dict(non_blocking=False), dict(rope_scale=8.0, rope_theta=5e5),
    dict(fixed_split_size=-1), dict(fixed_split_size=0), dict(kv_data_type="bfloat16", q_data_type="bfloat16"),
    dict(prefix_len_ptr=None, token_pos_in_items_ptr=None, token_pos_in_items_len=0, max_item_len_ptr=None),
]


@pytest.mark.parametrize("over", ON_VALUES_THAT_MEAN_OFF, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("which", ["ragged", "paged"])
def test_off_values_pass_the_plan_checks(which: str, over: dict, no_kernels) -> None:
    with pytest.raises(ReachedKernel):
        (ragged_plan if which == "ragged" else paged_plan)(**over)(Args(real=True))


VARIANT_PLANS = [  # (plan options, the kernel switches they select: sliding_window, soft_cap, rope, alibi)
    (dict(window_left=128), (True, False, False, False)), (dict(window_left=0), (True, False, False, False)),
    (dict(logits_soft_cap=30.0), (False, True, False, False)), (dict(logits_soft_cap=50), (False, True, False, False)),
    (dict(window_left=7, logits_soft_cap=20.0), (True, True, False, False)),
    (dict(window_left=-1, logits_soft_cap=0.0), (False, False, False, False)),
    (dict(pos_encoding_mode="ROPE_LLAMA"), (False, False, True, False)),
    (dict(pos_encoding_mode=1, rope_theta=5e5, rope_scale=8.0), (False, False, True, False)),
    (dict(pos_encoding_mode="rope_llama", window_left=31, logits_soft_cap=10.0), (True, True, True, False)),
    (dict(pos_encoding_mode="ALIBI"), (False, False, False, True)),
    (dict(pos_encoding_mode=2, window_left=3), (True, False, False, True)),
]


def planned_specs(which: str, monkeypatch, **over) -> list:
    """The specs a ragged / paged plan with these options loads (the load itself stops the call)."""
    loaded = []

    def record(spec, *args, **kwargs):
        loaded.append(spec)
        raise ReachedKernel()

    monkeypatch.setattr(loader, "load", record)
    with pytest.raises(ReachedKernel):
        (ragged_plan if which == "ragged" else paged_plan)(**over)(Args(real=True))
    return loaded


@pytest.mark.parametrize("over, switches", VARIANT_PLANS, ids=lambda o: str(o))
@pytest.mark.parametrize("which", ["ragged", "paged"])
def test_variant_options_choose_the_kernel(which: str, over: dict, switches: tuple, no_kernels, monkeypatch) -> None:
    """window_left and logits_soft_cap (issue #12) pass the plan checks and select the sliding-window /
    soft-cap kernel (its own spec, URI and cache key) instead of raising."""
    loaded = planned_specs(which, monkeypatch, **over)
    assert [(s.sliding_window, s.soft_cap, s.rope, s.alibi) for s in loaded] == [switches]
    assert loaded[0].kv_layout == which and ("window" in loaded[0].uri) == switches[0]
    assert ("softcap" in loaded[0].uri) == switches[1]
    assert ("_rope_" in loaded[0].uri) == switches[2] and ("_alibi_" in loaded[0].uri) == switches[3]
    assert loaded[0].backend == "fa2"  # fused RoPE is the FA2-class kernel's (and this machine has no Hopper)


@pytest.mark.parametrize("over, message", [
    (dict(pos_encoding_mode="ROPE"), "pos_encoding_mode='ROPE'"), (dict(pos_encoding_mode=3), "pos_encoding_mode=3"),
    (dict(pos_encoding_mode=True), "pos_encoding_mode=True"),
    (dict(pos_encoding_mode="ROPE_LLAMA", rope_theta=0.0), "rope_theta=0.0"),
    (dict(pos_encoding_mode="ROPE_LLAMA", rope_scale=-2.0), "rope_scale=-2.0"),
    (dict(pos_encoding_mode="ROPE_LLAMA", rope_theta=float("inf")), "rope_theta=inf"),
    (dict(pos_encoding_mode="ALIBI", logits_soft_cap=30.0), "ALIBI"),
], ids=str)
@pytest.mark.parametrize("which", ["ragged", "paged"])
def test_bad_positional_encoding_options_raise_before_any_kernel(which: str, over: dict, message: str,
                                                                 no_kernels) -> None:
    """Stricter than FlashInfer: unknown modes, RoPE scales / thetas <= 0 or not finite, and ALiBi with a
    soft-cap are ValueErrors naming the value, before a kernel is looked up."""
    with pytest.raises(ValueError, match=re.escape(message)):
        (ragged_plan if which == "ragged" else paged_plan)(**over)(Args(real=True))


def test_fused_rope_runs_on_either_backend(monkeypatch) -> None:
    """Fused RoPE is no obstacle to the sm90 kernel (it rotates in shared memory: transform_sm90.cuh): on a
    Hopper card "auto" picks sm90 with RoPE as without; elsewhere both resolve to fa2."""
    assert kernels.resolve_backend("auto", torch.device("cpu"), "ragged") == "fa2"
    monkeypatch.setattr(kernels, "_compute_capability", lambda device: (9, 0))
    assert kernels.sm90_obstacle(torch.device("cuda:0"), "ragged") is None
    assert kernels.resolve_backend("auto", torch.device("cuda:0"), "ragged", group=4) == "sm90"
    from flashinfer_jit.spec import PrefillSpec
    assert PrefillSpec("ragged", 128, "bf16", True, backend="sm90", rope=True).uri.endswith("_sm90_rope_kv128_q128")


def test_rope_and_alibi_tables() -> None:
    """The frequency table is float64-exact then rounded once; ALiBi slopes are FlashInfer's (a power-of-two
    head count: 2^(-8 (h + 1) / n); otherwise the interleaved second series)."""
    variant = flashinfer_jit.options.attention_variant("t", pos_encoding_mode="ROPE_LLAMA", rope_theta=5e5,
                                                       rope_scale=2.0)
    freqs = flashinfer_jit.options.rope_frequencies(128, variant, torch.device("cpu"))
    expected = (1.0 / (5e5 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128)) / 2.0).float()
    assert freqs.dtype == torch.float32 and torch.equal(freqs, expected)
    slopes = flashinfer_jit.options.alibi_slopes(8)
    assert torch.allclose(slopes, torch.tensor([2.0 ** (-(h + 1)) for h in range(8)]))
    twelve = flashinfer_jit.options.alibi_slopes(12)  # n = 8, then 2^(-4 (2j + 1) / 8) for j < 4
    assert torch.allclose(twelve[8:], torch.tensor([2.0 ** (-0.5 * (2 * j + 1)) for j in range(4)]))
    assert torch.allclose(twelve[:8], slopes)


def test_forward_cannot_change_the_positional_encoding(no_kernels, monkeypatch) -> None:
    """forward(pos_encoding_mode=...) of a plan without RoPE: the kernel is plan()'s choice."""
    w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(cl(4096, dtype=torch.int8))
    w._state, w._plan_args = object(), dict(variant=flashinfer_jit.options.PLAIN)  # as after a plan
    with pytest.raises(flashinfer.NotSupportedError, match="pos_encoding_mode"):
        w.forward(cl(5, HQ, D), cl(9, HKV, D), cl(9, HKV, D), pos_encoding_mode="ROPE_LLAMA")


def test_cuda_only_paged_options_pass_too(no_kernels) -> None:
    """Options of other backends (cuDNN, trtllm-gen) that FlashInfer's fa2 path does not read."""
    with pytest.raises(ReachedKernel):
        paged_plan(seq_lens_q=i32([5, 0, 7]), block_tables=torch.zeros(3, 2, dtype=torch.int32),
                   max_token_per_sequence=7, max_sequence_kv=20)(Args(real=True))
    with pytest.raises(ReachedKernel):
        ragged_plan(seq_lens=i32([9, 3, 7]), seq_lens_q=i32([5, 0, 7]), max_token_per_sequence=7,
                    max_sequence_kv=9, v_indptr=i32(KV), o_indptr=i32(QO))(Args(real=True))


@pytest.mark.parametrize("over", [dict(k_scale=1.0, v_scale=1.0), dict(q_scale=1, k_scale=torch.tensor(1.0)),
                                  dict(enable_pdl=True), dict(lse_base="log2", lse_layout="NH"),
                                  dict(window_left=-1, sinks=None, use_fp16_softmax=True, uses_spcompress=False),
                                  dict(lse_base="ln")], ids=str)
def test_off_values_pass_the_run_checks(over: dict, no_kernels) -> None:
    with pytest.raises(RuntimeError, match="before plan"):
        paged_run(**over)(Args(real=True))
    ragged_over = {k: v for k, v in over.items() if k not in ("window_left", "sinks", "use_fp16_softmax",
                                                              "uses_spcompress")}
    with pytest.raises(RuntimeError, match="before plan"):
        ragged_run(**ragged_over)(Args(real=True))


def test_head_dim_is_a_keyword_alias_of_head_dim_qk(no_kernels) -> None:
    a = Args(real=True)
    w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(a.workspace())
    with pytest.raises(ReachedKernel):
        w.plan(a.idx(QO), a.idx(KV), HQ, HKV, head_dim=D, q_data_type=DT)
    with pytest.raises(ValueError, match="another name for head_dim_qk"):
        w.plan(a.idx(QO), a.idx(KV), HQ, HKV, D, head_dim=64, q_data_type=DT)
    with pytest.raises(TypeError, match="head_dim_qk"):
        w.plan(a.idx(QO), a.idx(KV), HQ, HKV, q_data_type=DT)
    p = flashinfer.BatchPrefillWithPagedKVCacheWrapper(a.workspace())
    with pytest.raises(TypeError, match="page_size"):
        p.plan(a.idx(QO), a.idx(PAGE_INDPTR), a.idx(PAGE_INDICES), a.idx(LAST_PAGE_LEN), HQ, HKV, D)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.float16, torch.float32, torch.int64])
def test_workspace_of_any_dtype(dtype: torch.dtype) -> None:
    ws = cl(4096, dtype=dtype)
    for cls in (flashinfer.BatchPrefillWithRaggedKVCacheWrapper, flashinfer.BatchPrefillWithPagedKVCacheWrapper):
        w = cls(ws)
        assert w._workspace.nbytes == 4096 * ws.element_size()
    two_d = cl(64, 64, dtype=torch.int8)
    assert flashinfer.BatchPrefillWithRaggedKVCacheWrapper(two_d)._workspace.nbytes == 4096


def test_backend_choice_is_visible_and_select_backend_decides() -> None:
    # Without a Hopper GPU (here: a CPU workspace) "auto" runs the FA2-class kernel and an explicit Hopper
    # backend is refused at construction, saying why.
    for backend in ("auto", "fa2"):
        assert flashinfer.BatchPrefillWithRaggedKVCacheWrapper(cl(4096, dtype=torch.int8), backend=backend).backend == "fa2"
    assert [kernels.select_backend(b) for b in ("auto", "fa2", "fa3", "sm90")] == ["auto", "fa2", "sm90", "sm90"]
    for backend in ("fa3", "sm90"):
        with pytest.raises(flashinfer.NotSupportedError, match="compute capability 9.x"):
            flashinfer.BatchPrefillWithRaggedKVCacheWrapper(cl(4096, dtype=torch.int8), backend=backend)
    for backend in ("cudnn", "cutlass", "trtllm-gen", "cute-dsl", "cute-dsl-prims", "no-such-backend"):
        with pytest.raises(flashinfer.NotSupportedError, match="'auto', 'fa2'"):
            kernels.select_backend(backend)


def test_reset_workspace_buffer_takes_any_dtype_and_drops_the_plan() -> None:
    w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(cl(4096, dtype=torch.uint8))
    w.reset_workspace_buffer(cl(8192, dtype=torch.int8), cl(1024, dtype=torch.int32))
    assert w._workspace.nbytes == 8192
    with pytest.raises(RuntimeError, match="before plan"):
        w.run(cl(12, HQ, D), cl(19, HKV, D), cl(19, HKV, D))
    with pytest.raises(ValueError, match="int_workspace_buffer"):
        w.reset_workspace_buffer(cl(8192, dtype=torch.int8), torch.zeros(16, dtype=torch.int8))


def test_flashinfer_visible_plan_attributes_before_plan() -> None:
    """vLLM asserts these against its layers after plan(); their values before any plan are FlashInfer's
    defaults."""
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(cl(4096, dtype=torch.int8))
    assert (w._causal, w._window_left, w._logits_soft_cap, w._sm_scale) == (False, -1, 0.0, None)
    assert w.is_cuda_graph_enabled is False and w._kv_layout == "NHD"


# ---- GPU: call shapes end to end ------------------------------------------------------------------

def _gpu_imports():
    import reference as ref
    from conftest import DEVICE
    return ref, DEVICE


GPU_LENS = ((17, 17), (1, 100), (129, 300), (0, 5), (40, 90), (7, 0), (64, 64))


def _int8_workspace(device, nbytes: int = 128 << 20) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.int8, device=device)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_gpu_flashinfer_test_shapes_paged(layout: str) -> None:
    """FlashInfer's own test form: int8 workspace, plan from CUDA index tensors with 8 positional arguments
    and off values, run(return_lse=True), run(out=), run_return_lse."""
    ref, device = _gpu_imports()
    batch = ref.make_paged_batch([a for a, _ in GPU_LENS], [b for _, b in GPU_LENS], 8, 2, 128, torch.float16,
                                 device, layout, page_size=5, seed=1)
    t = batch.table
    w = flashinfer.prefill.BatchPrefillWithPagedKVCacheWrapper(_int8_workspace(device), layout)
    w.plan(batch.qo_indptr.to(device), t.indptr.to(device), t.indices.to(device), t.last_page_len.to(device),
           8, 2, 128, 5, causal=True, pos_encoding_mode="NONE", logits_soft_cap=0.0)
    ref_out, ref_lse = batch.reference(True)
    o, lse = w.run(batch.q, batch.cache, return_lse=True)
    ref.check_attention(o, ref_out, torch.float16, f"flashinfer-test paged {layout}", lse, ref_lse)
    o_buffer = torch.empty_like(o)
    w.run(batch.q, batch.cache, out=o_buffer)
    assert torch.equal(o_buffer, o)
    o2, lse2 = w.run_return_lse(batch.q, batch.cache)
    assert torch.equal(o2, o) and torch.equal(lse2, lse)


@pytest.mark.gpu
def test_gpu_flashinfer_test_shapes_ragged_and_single() -> None:
    ref, device = _gpu_imports()
    batch = ref.make_ragged_batch([a for a, _ in GPU_LENS], [b for _, b in GPU_LENS], 32, 4, 128, torch.float16,
                                  device, "NHD", seed=2)
    w = flashinfer.prefill.BatchPrefillWithRaggedKVCacheWrapper(_int8_workspace(device), "NHD")
    w.plan(batch.qo_indptr.to(device), batch.kv_indptr.to(device), 32, 4, 128, causal=True,
           pos_encoding_mode="NONE", logits_soft_cap=0.0)
    o, lse = w.run(batch.q, batch.k, batch.v, return_lse=True)
    ref_out, ref_lse = batch.reference(True)
    ref.check_attention(o, ref_out, torch.float16, "flashinfer-test ragged", lse, ref_lse)
    qo, kv = batch.qo_indptr.tolist(), batch.kv_indptr.tolist()
    for i in range(batch.batch_size):
        if qo[i + 1] == qo[i]:
            continue
        o_i = flashinfer.prefill.single_prefill_with_kv_cache(
            batch.q[qo[i]:qo[i + 1]], batch.k[kv[i]:kv[i + 1]], batch.v[kv[i]:kv[i + 1]], causal=True,
            pos_encoding_mode="NONE", logits_soft_cap=0.0, backend="fa2")  # bitwise-compared below
        ref.check_attention(o_i, ref_out[qo[i]:qo[i + 1]], torch.float16, f"single prefill of request {i}")
        o_l, lse_l = flashinfer.single_prefill_with_kv_cache_return_lse(
            batch.q[qo[i]:qo[i + 1]], batch.k[kv[i]:kv[i + 1]], batch.v[kv[i]:kv[i + 1]], causal=True, backend="fa2")
        assert torch.equal(o_l, o_i)
        ref.check_attention(o_l, ref_out[qo[i]:qo[i + 1]], torch.float16, f"single prefill lse {i}", lse_l,
                            ref_lse[qo[i]:qo[i + 1]])


@pytest.mark.gpu
def test_gpu_vllm_prefill_shape() -> None:
    """vLLM: uint8 workspace, HND cache allocated NHD-shaped with a stride order and permuted, the page
    table on the GPU, plan with window_left=-1 / logits_soft_cap=None / fixed_split_size=-1, run with
    float scales of 1.0 into a slice of a larger output; then vLLM's asserts on the wrapper."""
    ref, device = _gpu_imports()
    lens = ((33, 33), (5, 180), (120, 400), (1, 17))
    batch = ref.make_paged_batch([a for a, _ in lens], [b for _, b in lens], 8, 2, 128, torch.bfloat16, device,
                                 "HND", page_size=16, seed=3)
    # vLLM's HND cache: shape [P, 2, ps, Hkv, D] with stride order (0, 1, 3, 2, 4), used through a permute.
    storage = batch.cache.contiguous()  # [P, 2, Hkv, ps, D] in memory
    kv_cache = storage.permute(0, 1, 3, 2, 4)  # what vLLM holds: [P, 2, ps, Hkv, D]
    kv_cache_permute = kv_cache.permute(0, 1, 3, 2, 4)  # what it passes for HND
    t = batch.table
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(torch.zeros(256 << 20, dtype=torch.uint8, device=device), "HND")
    scale = 128 ** -0.5
    w.plan(batch.qo_indptr, t.indptr, t.indices.to(device), t.last_page_len, 8, 2, 128, 16, causal=True,
           sm_scale=scale, window_left=-1, logits_soft_cap=None, q_data_type=torch.bfloat16,
           kv_data_type=torch.bfloat16, fixed_split_size=-1, disable_split_kv=False)
    assert w._causal and w._window_left == -1 and w._logits_soft_cap == (None or 0.0) and w._sm_scale == scale
    output = torch.full((batch.total_q + 7, 8, 128), float("nan"), dtype=torch.bfloat16, device=device)
    w.run(batch.q, kv_cache_permute, k_scale=1.0, v_scale=1.0, out=output[7:])
    ref_out, _ = batch.reference(True, scale)
    ref.check_attention(output[7:], ref_out, torch.bfloat16, "vLLM prefill shape")
    assert bool(torch.isnan(output[:7]).all()), "run(out=slice) wrote outside its slice"


@pytest.mark.gpu
def test_gpu_sglang_extend_shape() -> None:
    """SGLang's extend: the ragged wrapper planned with begin_forward(qo, qo, ...) (no causal), the paged
    wrapper over the cached prefix planned with page_size 1 (no causal); forward_return_lse(causal=True)
    on the new tokens and forward_return_lse(causal=False) on the prefix, merged by LSE, equal attention
    over prefix + new tokens. Then ragged forward(causal=True) alone for a batch without prefix."""
    ref, device = _gpu_imports()
    prefix, new = [40, 0, 130, 7], [16, 9, 33, 1]
    hq, hkv, d, dt = 8, 2, 128, torch.bfloat16
    full = ref.make_ragged_batch(new, [p + n for p, n in zip(prefix, new)], hq, hkv, d, dt, device, "NHD", seed=4)
    # Split full K/V into the cached prefix (paged, page size 1) and the new tokens (ragged).
    kv = full.kv_indptr.tolist()
    pre_k = torch.cat([full.k[kv[i]:kv[i] + prefix[i]] for i in range(4)])
    pre_v = torch.cat([full.v[kv[i]:kv[i] + prefix[i]] for i in range(4)])
    new_k = torch.cat([full.k[kv[i] + prefix[i]:kv[i + 1]] for i in range(4)])
    new_v = torch.cat([full.v[kv[i] + prefix[i]:kv[i + 1]] for i in range(4)])
    pool = torch.randn((sum(prefix) + 10, 2, 1, hkv, d), device=device).to(dt)  # token pool, page size 1
    slots = torch.randperm(pool.shape[0], device=device)[:sum(prefix)]
    pool[slots, 0, 0] = pre_k
    pool[slots, 1, 0] = pre_v
    qo_indptr = ref.make_indptr(new).to(device)
    kv_indptr = ref.make_indptr(prefix).to(device)
    ws = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    ragged = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD", backend="auto")
    paged = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend="fa2")
    ragged.begin_forward(qo_indptr, qo_indptr, hq, hkv, d, q_data_type=dt)
    paged.begin_forward(qo_indptr, kv_indptr, slots.to(torch.int32), torch.ones(4, dtype=torch.int32, device=device),
                        hq, hkv, d, 1, q_data_type=dt, kv_data_type=dt, custom_mask=None, non_blocking=True,
                        fixed_split_size=None, prefix_len_ptr=None, token_pos_in_items_ptr=None,
                        token_pos_in_items_len=0, max_item_len_ptr=None)
    scaling = d ** -0.5
    o1, s1 = ragged.forward_return_lse(full.q, new_k, new_v, causal=True, sm_scale=scaling, window_left=-1,
                                       logits_soft_cap=0.0)
    o2, s2 = paged.forward_return_lse(full.q, pool, causal=False, sm_scale=scaling, window_left=-1,
                                      logits_soft_cap=0.0)
    o, _ = flashinfer.merge_state(o1, s1, o2, s2)
    ref_out, _ = full.reference(True, scaling)
    ref.check_attention(o, ref_out, dt, "SGLang extend (ragged causal + paged prefix, merged)")
    # No prefix: one ragged forward(causal=True) after a plan without causal (forward re-plans).
    nopre = ref.make_ragged_batch(new, new, hq, hkv, d, dt, device, "NHD", seed=5)
    ragged.begin_forward(nopre.qo_indptr.to(device), nopre.qo_indptr.to(device), hq, hkv, d, q_data_type=dt)
    out = ragged.forward(nopre.q, nopre.k, nopre.v, causal=True, sm_scale=scaling, logits_soft_cap=0.0)
    ref.check_attention(out, nopre.reference(True, scaling)[0], dt, "SGLang extend without prefix")
    assert ragged._causal is True


@pytest.mark.gpu
def test_gpu_forward_options_apply_from_that_call_on() -> None:
    """forward(sm_scale=, causal=) as FlashInfer: they replace the plan's for this and later runs."""
    ref, device = _gpu_imports()
    batch = ref.make_ragged_batch([17, 40, 3], [17, 90, 60], 8, 2, 64, torch.float16, device, "NHD", seed=6)
    w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(_int8_workspace(device))
    w.plan(batch.qo_indptr, batch.kv_indptr, 8, 2, 64, causal=False, q_data_type=torch.float16)
    out = w.forward(batch.q, batch.k, batch.v, causal=False, sm_scale=0.05)
    ref.check_attention(out, batch.reference(False, 0.05)[0], torch.float16, "forward sm_scale override")
    ref.check_attention(w.run(batch.q, batch.k, batch.v), batch.reference(False, 0.05)[0], torch.float16,
                        "run after forward keeps its sm_scale")
    out, lse = w.forward_return_lse(batch.q, batch.k, batch.v, causal=True)
    ref_out, ref_lse = batch.reference(True)
    ref.check_attention(out, ref_out, torch.float16, "forward causal override (re-plan)", lse, ref_lse)


@pytest.mark.gpu
def test_gpu_lse_base_ln_and_reset_workspace_and_seq_lens() -> None:
    ref, device = _gpu_imports()
    lens = ((5, 30), (64, 64), (1, 200))
    batch = ref.make_paged_batch([a for a, _ in lens], [b for _, b in lens], 4, 4, 128, torch.bfloat16, device,
                                 "NHD", page_size=16, seed=7)
    t = batch.table
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(torch.empty(8 << 20, dtype=torch.int32, device=device))
    seq_lens = torch.tensor(batch.kv_lens, dtype=torch.int32, device=device)
    w.plan(batch.qo_indptr, t.indptr, t.indices, t.last_page_len, 4, 4, 128, 16, causal=True,
           q_data_type=torch.bfloat16, seq_lens=seq_lens)
    o2, lse2 = w.run(batch.q, batch.cache, return_lse=True)
    o_ln, lse_ln = w.run(batch.q, batch.cache, return_lse=True, lse_base="ln")
    assert torch.equal(o_ln, o2)
    torch.testing.assert_close(lse_ln, lse2 * math.log(2.0), rtol=1e-6, atol=1e-6)
    w.reset_workspace_buffer(torch.empty(64 << 20, dtype=torch.int8, device=device),
                             torch.empty(8 << 20, dtype=torch.uint8, device=device))
    with pytest.raises(RuntimeError, match="before plan"):
        w.run(batch.q, batch.cache)
    w.plan(batch.qo_indptr, t.indptr, t.indices, t.last_page_len, 4, 4, 128, 16, causal=True,
           q_data_type=torch.bfloat16)
    ref_out, ref_lse = batch.reference(True)
    out, lse = w.run(batch.q, batch.cache, return_lse=True)
    ref.check_attention(out, ref_out, torch.bfloat16, "after reset_workspace_buffer", lse, ref_lse)
    with pytest.raises(flashinfer.NotSupportedError, match="seq_lens"):
        w.plan(batch.qo_indptr, t.indptr, t.indices, t.last_page_len, 4, 4, 128, 16, causal=True,
               q_data_type=torch.bfloat16, seq_lens=seq_lens + 1)


@pytest.mark.gpu
def test_gpu_single_prefill_plan_cache_evicts_and_replans(monkeypatch) -> None:
    """More shapes than the plan cache keeps: the oldest plans go, a shape seen again is planned again,
    every result matches the reference, and a second stream's use is safe (record_stream)."""
    ref, device = _gpu_imports()
    monkeypatch.setattr(prefill, "_SINGLE_PLANS_KEPT", 2)
    monkeypatch.setattr(prefill, "_single_plans", type(prefill._single_plans)())
    shapes = [(3, 40), (17, 17), (64, 300), (1, 1000), (3, 40)]
    side = torch.cuda.Stream()
    for i, (q_len, kv_len) in enumerate(shapes):
        batch = ref.make_ragged_batch([q_len], [kv_len], 8, 2, 128, torch.bfloat16, device, "NHD", seed=60 + i)
        stream = side if i % 2 else torch.cuda.current_stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            out, lse = flashinfer.single_prefill_with_kv_cache(batch.q, batch.k, batch.v, causal=True, return_lse=True)
        torch.cuda.current_stream().wait_stream(stream)
        ref_out, ref_lse = batch.reference(True)
        ref.check_attention(out, ref_out, torch.bfloat16, f"single prefill shape {i} {q_len}/{kv_len}", lse, ref_lse)
        assert len(prefill._single_plans) <= 2


# ---- GPU: torch.compile(mode="reduce-overhead", fullgraph=True) ------------------------------------

def _compile_and_check(fn, make_inputs, reference, dtype, what: str, calls: int = 4) -> None:
    """Compile `fn` with CUDA-graph trees and full graphs; call it `calls` times on fresh inputs of one
    shape (warm-up, recording, replays), each result against the reference of its inputs."""
    ref, _ = _gpu_imports()
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    for i in range(calls):
        inputs = make_inputs(i)
        got = compiled(*inputs)
        got = tuple(g.clone() for g in got) if isinstance(got, tuple) else got.clone()  # the graph reuses outputs
        torch.cuda.synchronize()
        expected = reference(i)
        if isinstance(got, tuple):
            ref.check_attention(got[0], expected[0], dtype, f"{what} call {i}", got[1], expected[1])
        else:
            ref.check_attention(got, expected[0], dtype, f"{what} call {i}")
    skips = counters["inductor"].get("cudagraph_skips", 0)
    assert not skips, f"{what}: inductor skipped CUDA graphs ({skips}x), so the graph path was not tested"


@pytest.mark.gpu
@pytest.mark.parametrize("return_lse", [False, True], ids=["out", "out+lse"])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_gpu_single_prefill_under_reduce_overhead(layout: str, return_lse: bool) -> None:
    """The reported bug: single_prefill_with_kv_cache under torch.compile(mode="reduce-overhead") failed
    with "All live allocations must be tracked". Now its plan is made once per shape, outside the graph
    tree's pool, and the replays equal the reference on new data every call."""
    ref, device = _gpu_imports()
    batches = [ref.make_ragged_batch([77], [300], 8, 2, 128, torch.bfloat16, device, layout, seed=10 + i)
               for i in range(4)]

    def fn(q, k, v):
        return flashinfer.single_prefill_with_kv_cache(q, k, v, causal=True, kv_layout=layout, return_lse=return_lse)

    _compile_and_check(fn, lambda i: (batches[i].q, batches[i].k, batches[i].v),
                       lambda i: batches[i].reference(True), torch.bfloat16, f"single prefill {layout} reduce-overhead")


@pytest.mark.gpu
def test_gpu_single_prefill_in_a_model_under_reduce_overhead() -> None:
    """Two shapes in one compiled function around other ops (the shape of a model's attention layer)."""
    ref, device = _gpu_imports()
    a = [ref.make_ragged_batch([33], [33], 4, 4, 64, torch.float16, device, "NHD", seed=20 + i) for i in range(3)]
    b = [ref.make_ragged_batch([5], [129], 8, 1, 64, torch.float16, device, "NHD", seed=30 + i) for i in range(3)]

    def fn(q1, k1, v1, q2, k2, v2):
        o1 = flashinfer.single_prefill_with_kv_cache(q1 * 1.0, k1, v1, causal=True)
        o2 = flashinfer.single_prefill_with_kv_cache(q2, k2, v2, sm_scale=0.1)
        return o1 + 0, o2 + 0

    torch._dynamo.reset()
    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    for i in range(3):
        o1, o2 = (t.clone() for t in compiled(a[i].q, a[i].k, a[i].v, b[i].q, b[i].k, b[i].v))
        ref.check_attention(o1, a[i].reference(True)[0], torch.float16, f"model shape 1, call {i}")
        ref.check_attention(o2, b[i].reference(False, 0.1)[0], torch.float16, f"model shape 2, call {i}")


@pytest.mark.gpu
@pytest.mark.parametrize("use_cuda_graph", [False, True], ids=["plain", "use_cuda_graph"])
def test_gpu_ragged_run_under_reduce_overhead(use_cuda_graph: bool) -> None:
    ref, device = _gpu_imports()
    lens = ((17, 17), (1, 100), (129, 129), (40, 90))
    batches = [ref.make_ragged_batch([a for a, _ in lens], [b for _, b in lens], 8, 2, 128, torch.bfloat16, device,
                                     "NHD", seed=40 + i) for i in range(4)]
    w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(_int8_workspace(device), "NHD", use_cuda_graph=use_cuda_graph)
    w.plan(batches[0].qo_indptr, batches[0].kv_indptr, 8, 2, 128, causal=True, q_data_type=torch.bfloat16)

    def fn(q, k, v):
        return w.run(q, k, v, return_lse=True)

    _compile_and_check(fn, lambda i: (batches[i].q, batches[i].k, batches[i].v),
                       lambda i: batches[i].reference(True), torch.bfloat16, "ragged run reduce-overhead")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_gpu_paged_run_under_reduce_overhead(layout: str) -> None:
    ref, device = _gpu_imports()
    lens = ((17, 17), (1, 100), (129, 300), (3, 40))
    base = ref.make_paged_batch([a for a, _ in lens], [b for _, b in lens], 8, 2, 128, torch.float16, device, layout,
                                page_size=16, seed=50)
    t = base.table
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(_int8_workspace(device), layout)
    w.plan(base.qo_indptr, t.indptr, t.indices, t.last_page_len, 8, 2, 128, 16, causal=True,
           q_data_type=torch.float16)
    # New data for each call on the same page table: fresh q and a fresh cache through the same pages.
    caches = [base.cache] + [torch.randn_like(base.cache) for _ in range(3)]
    qs = [base.q] + [torch.randn_like(base.q) for _ in range(3)]

    def reference(i):
        k, v, kv_indptr = ref.gather_paged_kv(caches[i], t.indptr, t.indices, t.last_page_len, 16, layout)
        return ref.ragged_attention_ref(qs[i], k, v, base.qo_indptr, kv_indptr, True, None, "NHD")

    def fn(q, cache):
        return w.run(q, cache, k_scale=1.0, v_scale=1.0)

    _compile_and_check(fn, lambda i: (qs[i], caches[i]), reference, torch.float16, f"paged run {layout} reduce-overhead")


# ---- custom masks (issue #12): FlashInfer's custom_mask / packed_custom_mask ----------------------

def _recording_loads(monkeypatch) -> list:
    loaded = []

    def record(spec, *args, **kwargs):
        loaded.append(spec)
        raise ReachedKernel()

    monkeypatch.setattr(loader, "load", record)
    return loaded


@pytest.mark.parametrize("which, kw", [
    ("ragged", dict(custom_mask=torch.ones(5 * 9 + 7 * 7, dtype=torch.bool))),  # q/kv 5/9, 0/3, 7/7
    ("ragged", dict(packed_custom_mask=torch.zeros(6 + 0 + 7, dtype=torch.uint8))),
    ("paged", dict(custom_mask=torch.zeros(5 * 20 + 7 * 7, dtype=torch.bool))),  # kv 20, 0, 7 from the pages
    ("paged", dict(packed_custom_mask=torch.zeros(13 + 7, dtype=torch.uint8))),
])
def test_a_custom_mask_selects_the_masked_kernel(which: str, kw: dict, no_kernels, monkeypatch) -> None:
    loaded = _recording_loads(monkeypatch)
    with pytest.raises(ReachedKernel):
        (ragged_plan if which == "ragged" else paged_plan)(causal=False, **kw)(Args(real=True))
    assert [(s.custom_mask, s.causal, "mask" in s.uri) for s in loaded] == [(True, False, True)]


@pytest.mark.parametrize("kw, error, match", [
    (dict(custom_mask=torch.ones(93, dtype=torch.bool)), ValueError, "need sum\\(q_len \\* kv_len\\) = 94"),
    (dict(packed_custom_mask=torch.zeros(14, dtype=torch.uint8)), ValueError, "= 13"),
    (dict(custom_mask=torch.ones(94)), TypeError, "torch.bool"),
    (dict(packed_custom_mask=torch.zeros(13, dtype=torch.int32)), TypeError, "torch.uint8"),
    (dict(custom_mask=torch.ones(94, dtype=torch.bool), packed_custom_mask=torch.zeros(13, dtype=torch.uint8)),
     ValueError, "not both"),
    (dict(custom_mask=torch.ones(94, dtype=torch.bool), causal=True), ValueError, "replaces the causal mask"),
])
def test_bad_custom_masks_raise_before_any_kernel(kw: dict, error: type, match: str, no_kernels) -> None:
    kw = {"causal": False, **kw}
    with pytest.raises(error, match=match):
        ragged_plan(**kw)(Args(real=True))


def test_custom_masks_pack_as_flashinfer_does() -> None:
    """Each request's [q_len, kv_len] mask, row-major, little-endian bits from a byte boundary
    (flashinfer.quantization.segment_packbits(..., bitorder="little"))."""
    from flashinfer_jit import masks

    gen = torch.Generator().manual_seed(0)
    q_lens, kv_lens = [5, 0, 7, 1], [9, 3, 7, 1]
    flat = torch.rand(sum(q * k for q, k in zip(q_lens, kv_lens)), generator=gen) < 0.5
    packed = masks.prepare(flat, None, q_lens, kv_lens, "test")
    start, expected, offsets = 0, [], []
    for q, k in zip(q_lens, kv_lens):
        bits = flat[start:start + q * k].tolist()
        start += q * k
        offsets.append(len(expected))
        expected += [sum(int(b) << i for i, b in enumerate(bits[j:j + 8])) for j in range(0, len(bits), 8)]
    assert packed.bits.tolist() == expected + [0]  # + the guard byte past the end
    assert packed.offsets.tolist() == offsets
    same = masks.prepare(None, torch.tensor(expected, dtype=torch.uint8), q_lens, kv_lens, "test")
    assert torch.equal(same.bits, packed.bits) and torch.equal(same.offsets, packed.offsets)


def test_kv_scales_follow_the_plans_kv_dtype() -> None:
    """k_scale / v_scale (FlashInfer's run() arguments): a 16-bit plan takes only None / 1.0 (NotSupportedError
    naming fp8 caches); an fp8 plan takes floats > 0 and one-element float32 tensors (CPU: read now; CUDA: by
    pointer, read by the kernel), sets both on every run, and refuses anything else with a ValueError."""
    from flashinfer_jit.batch_attention import _PlanState
    from flashinfer_jit.abi import PrefillParams

    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(cl(4096, dtype=torch.int8))
    params = PrefillParams(k_scale=1.0, v_scale=1.0)
    plain = _PlanState(kernel=None, run_fn=None, params=params, grid_items=1, dtype=DT, batch=1, total_q=1, total_kv=1,
                       num_qo_heads=HQ, num_kv_heads=HKV, head_dim=D, kv_dtype=DT)
    with pytest.raises(flashinfer.NotSupportedError, match="kv_data_type=torch.float8_e4m3fn") as info:
        w._kv_scales("run()", plain, 0.5, None)
    assert info.value.parameter == "k_scale"
    w._kv_scales("run()", plain, 1.0, torch.ones(1))  # off values pass
    fp8 = _PlanState(kernel=None, run_fn=None, params=params, grid_items=1, dtype=DT, batch=1, total_q=1, total_kv=1,
                     num_qo_heads=HQ, num_kv_heads=HKV, head_dim=D, kv_dtype=torch.float8_e4m3fn)
    assert fp8.fp8_kv and not plain.fp8_kv
    w._kv_scales("run()", fp8, 0.25, torch.tensor([4.0]))
    assert (params.k_scale, params.k_scale_ptr, params.v_scale, params.v_scale_ptr) == (0.25, None, 4.0, None)
    on_device = torch.tensor([0.5]).as_subclass(CudaLooking)
    w._kv_scales("run()", fp8, on_device, None)  # a CUDA tensor: its pointer, the float part 1.0
    assert (params.k_scale, params.k_scale_ptr, params.v_scale, params.v_scale_ptr) == \
        (1.0, on_device.data_ptr(), 1.0, None)  # and the previous run's v_scale does not linger
    for bad, message in ((0.0, "k_scale=0.0"), (-1.0, "k_scale=-1.0"), (float("nan"), "k_scale=nan"),
                         (torch.ones(2), "shape \\(2,\\)"), (torch.ones(1, dtype=torch.float16), "torch.float16"),
                         ("1", "k_scale='1'")):
        with pytest.raises(ValueError, match=message):
            w._kv_scales("run()", fp8, bad, None)


@pytest.mark.parametrize("which", ["ragged", "paged"])
@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2, "float8_e4m3fn"], ids=str)
def test_fp8_kv_data_type_chooses_the_fp8_kernel(which: str, kv_dtype, no_kernels, monkeypatch) -> None:
    """kv_data_type fp8 (issue #16) selects the FA2-class kernel with fp8 K/V storage (its own spec and URI)."""
    loaded = planned_specs(which, monkeypatch, kv_data_type=kv_dtype)
    name = "fp8e5m2" if kv_dtype is torch.float8_e5m2 else "fp8e4m3"
    assert [(s.kv_dtype, s.backend, s.dtype) for s in loaded] == [(name, "fa2", "bf16")]
    assert f"_{name}_" in loaded[0].uri
    assert kernels.sm90_obstacle(torch.device("cpu"), "paged", fp8_kv=True).startswith("it has no fp8 KV cache")


def test_paged_rows_of_a_paged_batch() -> None:
    """The rows FLASHINFER_JIT_PAGED_VIA_RAGGED's gather copies: each K/V row's page and index in its request,
    the same as the reference's (page, slot) walk of the page table, shuffled pages and empty requests
    included."""
    import reference as ref
    from flashinfer_jit.batch_attention import paged_rows
    kv_lens = [17, 0, 1, 48, 5]
    table = ref.make_page_table(kv_lens, 16, extra_pages=3, shuffle=True, seed=4)
    kv_indptr = torch.tensor([0, *torch.tensor(kv_lens).cumsum(0).tolist()], dtype=torch.int32)
    pages, positions = paged_rows(kv_indptr, table.indptr, table.indices, 16)
    want_pages, want_slots = ref.token_page_slots(table.indptr, table.indices, kv_lens, 16)
    assert pages.dtype == positions.dtype == torch.int32
    assert pages.tolist() == want_pages.tolist()
    assert (positions % 16).tolist() == want_slots.tolist()
    assert positions.tolist() == [j for n in kv_lens for j in range(n)]


def test_kv_positions_of_a_ragged_batch() -> None:
    """The K rows' RoPE positions the sm90 launcher rotates with (FLASHINFER_JIT_ROPE_PREROTATE_K): each row's
    index in its request, empty requests included, rows before kv_indptr[0] not covered."""
    from flashinfer_jit.batch_attention import kv_positions
    got = kv_positions(torch.tensor([2, 5, 5, 6, 9], dtype=torch.int32))
    assert got.dtype == torch.int32 and got.tolist() == [0, 1, 2, 0, 0, 1, 2]
    assert kv_positions(torch.tensor([0, 0], dtype=torch.int32)).numel() == 0
