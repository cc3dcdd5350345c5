"""Compiled prefill variants: which kernel library a plan uses, and what plan() asks of it.

A `PrefillKernel` is one loaded library (one `PrefillSpec`) with what the planner needs from it:
the KV tile it was compiled with, its launcher, and its occupancy per q tile size (queried once per
device). `select_backend` maps a wrapper's `backend` choice (FlashInfer's names) to the spec's backend:
it is the one place that decides which kernel family a wrapper or single_prefill runs.
"""
from __future__ import annotations

import ctypes

import torch

from . import loader
from .abi import PrefillParams
from .errors import NotSupportedError
from .ops import device_guard
from .spec import BACKENDS, PrefillSpec, dtype_name

_RUN_ARGTYPES = [ctypes.POINTER(PrefillParams), ctypes.c_int, ctypes.c_void_p]


# FlashInfer 0.7.2's backend names for the prefill wrappers and single_prefill_with_kv_cache. "auto" and
# "fa2" run our FA2-class kernel; "fa3" is FlashInfer's Hopper (sm90) kernel family, ours is not built yet;
# the others are vendor or DSL backends flashinfer-jit does not have.
FLASHINFER_BACKENDS = ("auto", "fa2", "fa3", "cudnn", "cutlass", "trtllm-gen", "cute-dsl", "cute-dsl-prims")
_SPEC_BACKEND = {"fa2": "fa2", "fa3": "fa3"}  # FlashInfer name -> PrefillSpec backend (when spec.BACKENDS has it)
_SUPPORTED = "'auto' or 'fa2' (the FA2-class mma.sync kernel, sm_80 and newer)"


def select_backend(requested: str = "auto", where: str = "") -> str:
    """The PrefillSpec backend for a FlashInfer `backend=` value, or NotSupportedError before anything runs.

    "auto" picks the FA2-class kernel ("fa2") on every card today. When the Hopper backend exists in
    spec.BACKENDS as "fa3", "fa3" selects it (and "auto" should pick it on sm_90, as FlashInfer's does).
    Until then "fa3" raises on every card: FlashInfer itself does not fall back either (an explicit "fa3"
    on a non-Hopper card fails when its sm_90a module is built or launched). "cudnn", "cutlass",
    "trtllm-gen", "cute-dsl" and "cute-dsl-prims" raise NotSupportedError; unknown names too (it is a
    ValueError)."""
    if requested == "auto":
        return BACKENDS[0]
    spec_backend = _SPEC_BACKEND.get(requested, requested if requested in BACKENDS else None)
    if spec_backend in BACKENDS:
        return spec_backend  # type: ignore[return-value]
    if requested == "fa3":
        raise NotSupportedError("backend", requested, f"{_SUPPORTED}; the Hopper (fa3-class) kernel is not built yet",
                                where)
    if requested in FLASHINFER_BACKENDS:
        raise NotSupportedError("backend", requested, f"{_SUPPORTED}; flashinfer-jit has no {requested} backend",
                                where)
    raise NotSupportedError("backend", requested, f"{_SUPPORTED} (FlashInfer's names: "
                            f"{', '.join(map(repr, FLASHINFER_BACKENDS))})", where)


class PrefillKernel:
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


_variants: dict[tuple[str, str, int, torch.dtype, bool], PrefillKernel] = {}


def prefill_kernel(backend: str, layout: str, head_dim: int, dtype: torch.dtype, causal: bool) -> PrefillKernel:
    """The kernel of (backend, layout "ragged" | "paged", head_dim, dtype, causal), loaded on first use."""
    key = (backend, layout, head_dim, dtype, causal)
    variant = _variants.get(key)
    if variant is None:
        spec = PrefillSpec(kv_layout=layout, head_dim=head_dim, dtype=dtype_name(dtype), causal=causal,
                           backend=backend)
        variant = _variants[key] = PrefillKernel(spec)
    return variant


def clear_memo() -> None:
    """Forget the loaded prefill kernels (tests; with loader.clear_memo, the next use loads again)."""
    _variants.clear()
