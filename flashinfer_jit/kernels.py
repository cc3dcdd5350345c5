"""Compiled prefill variants: which kernel library a plan uses, and what plan() asks of it.

A `PrefillKernel` is one loaded library (one `PrefillSpec`) with what the planner needs from it:
the KV tile it was compiled with, its launcher, and its occupancy per q tile size (queried once per
device). `select_backend` maps a wrapper's `backend` choice to the spec's backend.
"""
from __future__ import annotations

import ctypes

import torch

from . import loader
from .abi import PrefillParams
from .ops import device_guard
from .spec import BACKENDS, PrefillSpec, dtype_name

_RUN_ARGTYPES = [ctypes.POINTER(PrefillParams), ctypes.c_int, ctypes.c_void_p]


def select_backend(requested: str = "auto") -> str:
    """The PrefillSpec backend for `requested`: "auto" picks one (today the only one, "fa2", the
    mma.sync kernel for sm_80 and newer), else a backend by name."""
    if requested == "auto":
        return BACKENDS[0]
    if requested not in BACKENDS:
        raise ValueError(f"backend: expected 'auto' or one of {', '.join(map(repr, BACKENDS))}, got {requested!r}")
    return requested


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
