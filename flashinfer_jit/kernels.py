"""Compiled prefill variants: which kernel library a plan uses, and what plan() asks of it.

A `PrefillKernel` is one loaded library (one `PrefillSpec`) with what the planner needs from it:
the KV tile it was compiled with, its launcher, and its occupancy per q tile size (queried once per
device). `select_backend` maps a wrapper's `backend` argument (FlashInfer's names) to a choice and
`resolve_backend` turns the choice into the kernel family of one plan: together they are the one place
that decides which kernel family a wrapper or single_prefill runs.
"""
from __future__ import annotations

import ctypes
from typing import Optional

import torch

from . import loader
from .abi import PrefillParams
from .errors import NotSupportedError
from .ops import device_guard
from .spec import BACKEND_LAYOUTS, BACKENDS, CustomVariant, PrefillSpec, dtype_name

_RUN_ARGTYPES = [ctypes.POINTER(PrefillParams), ctypes.c_int, ctypes.c_void_p]


# FlashInfer 0.7.2's backend names for the prefill wrappers and single_prefill_with_kv_cache, plus ours.
# "fa2" runs the FA2-class kernel; "fa3" (FlashInfer's Hopper kernel family) and "sm90" run our Hopper
# kernel; "auto" picks per plan (resolve_backend); the others are vendor or DSL backends flashinfer-jit
# does not have.
FLASHINFER_BACKENDS = ("auto", "fa2", "fa3", "cudnn", "cutlass", "trtllm-gen", "cute-dsl", "cute-dsl-prims")
_SPEC_BACKEND = {"fa2": "fa2", "fa3": "sm90", "sm90": "sm90"}  # accepted name -> PrefillSpec backend
# Smallest page the sm90 paged kernel copies page by page (smaller pages: one TMA box per few keys,
# the FA2-class kernel's gathers do better).
SM90_MIN_PAGE = 8
SM90_MIN_ROWS = 64  # "auto": packed q rows per request below which a batch runs the FA2-class kernel
_SUPPORTED = ("'auto', 'fa2' (the FA2-class mma.sync kernel, sm_80 and newer) or 'fa3' / 'sm90' (the Hopper "
              "wgmma + TMA kernel, compute capability 9.x)")


def select_backend(requested: str = "auto", where: str = "") -> str:
    """The backend choice of a FlashInfer `backend=` value: "auto", or a PrefillSpec backend ("fa2",
    "sm90" for FlashInfer's "fa3"); NotSupportedError before anything runs for the names flashinfer-jit
    lacks ("cudnn", "cutlass", "trtllm-gen", "cute-dsl", "cute-dsl-prims") and for unknown names (it is a
    ValueError). Which kernel a plan runs is resolve_backend's decision."""
    if requested == "auto":
        return "auto"
    spec_backend = _SPEC_BACKEND.get(requested)
    if spec_backend in BACKENDS:
        return spec_backend  # type: ignore[return-value]
    if requested in FLASHINFER_BACKENDS:
        raise NotSupportedError("backend", requested, f"{_SUPPORTED}; flashinfer-jit has no {requested} backend",
                                where)
    raise NotSupportedError("backend", requested, f"{_SUPPORTED} (FlashInfer's names: "
                            f"{', '.join(map(repr, FLASHINFER_BACKENDS))})", where)


_capabilities: dict[int, tuple[int, int]] = {}


def _compute_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device, looked up once per device (plan() asks on every call)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = _capabilities.get(index)
    if capability is None:
        capability = _capabilities[index] = torch.cuda.get_device_capability(index)
    return capability


def sm90_obstacle(device: torch.device, layout: str, group: int | None = None,
                  page_size: int | None = None, kv_tile: int = 128, fp8_kv: bool = False) -> str | None:
    """Why the sm90 kernel cannot run this plan (None: it can). `group`, `page_size` None: not known yet."""
    if fp8_kv:
        return "it has no fp8 KV cache (an fp8 kv_data_type runs on the fa2 kernel)"
    capability = _compute_capability(device)
    if capability is None or capability[0] != 9:
        shown = "no CUDA device" if capability is None else f"compute capability {capability[0]}.{capability[1]}"
        return f"it needs compute capability 9.x (Hopper), {device} has {shown}"
    if layout not in BACKEND_LAYOUTS["sm90"]:
        return f"it has no {layout} K/V kernel"
    if group is not None and 128 % group:
        return f"its 128-row q tiles need the GQA group size (Hq / Hkv = {group}) to divide 128"
    if page_size is not None and not (page_size >= SM90_MIN_PAGE and (kv_tile % page_size == 0 or
                                                                       page_size % kv_tile == 0)):
        return (f"it copies whole pages, one TMA box each: the page size ({page_size}) must be a power of two "
                f">= {SM90_MIN_PAGE} (or a multiple of {kv_tile})")
    return None


def resolve_backend(choice: str, device: torch.device, layout: str, group: int | None = None,
                    where: str = "", requested: str | None = None, page_size: int | None = None,
                    rows_per_request: float | None = None, fp8_kv: bool = False) -> str:
    """The PrefillSpec backend a plan runs: "auto" is "sm90" where sm90_obstacle finds nothing (Hopper,
    a group size dividing 128, pages it copies whole) and the batch is not decode-like (at least
    SM90_MIN_ROWS packed q rows, tokens x group, per request on average: below that the FA2-class
    kernel's 16-row tiles waste less), and "fa2" elsewhere (fp8 K/V, `fp8_kv`, are fa2's only); an explicit "sm90" (`requested`: the name
    the user gave, "fa3" or "sm90") that cannot run raises NotSupportedError saying why. Stricter than
    FlashInfer, whose explicit "fa3" on another card fails later, when its sm_90a module is built or run."""
    if choice == "fa2":
        return "fa2"
    obstacle = sm90_obstacle(device, layout, group, page_size, fp8_kv=fp8_kv)
    if choice == "auto":
        decode_like = rows_per_request is not None and rows_per_request < SM90_MIN_ROWS
        return "fa2" if obstacle or decode_like else "sm90"
    if obstacle:
        raise NotSupportedError("backend", requested or choice, f"'auto' or 'fa2' here: the sm90 kernel cannot run "
                                f"this because {obstacle}", where)
    return "sm90"


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


_variants: dict[tuple, PrefillKernel] = {}


def prefill_kernel(backend: str, layout: str, head_dim: int, dtype: torch.dtype, causal: bool, *,
                   sliding_window: bool = False, soft_cap: bool = False, custom_mask: bool = False,
                   rope: bool = False, alibi: bool = False, kv_dtype: str = "",
                   custom: Optional[CustomVariant] = None) -> PrefillKernel:
    """The kernel of (backend, layout "ragged" | "paged", head_dim, dtype, causal, variant switches, a
    user variant's code), loaded on first use."""
    key = (backend, layout, head_dim, dtype, causal, sliding_window, soft_cap, custom_mask, rope, alibi, kv_dtype, custom)
    variant = _variants.get(key)
    if variant is None:
        spec = PrefillSpec(kv_layout=layout, head_dim=head_dim, dtype=dtype_name(dtype), causal=causal,
                           backend=backend, sliding_window=sliding_window, soft_cap=soft_cap,
                           custom_mask=custom_mask, rope=rope, alibi=alibi, kv_dtype=kv_dtype, custom=custom)
        variant = _variants[key] = PrefillKernel(spec)
    return variant


def clear_memo() -> None:
    """Forget the loaded prefill kernels (tests; with loader.clear_memo, the next use loads again)."""
    _variants.clear()
