"""Kernel variants as data.

One frozen dataclass per kernel family names a variant. Its URI (readable, file-name safe) is derived
from the fields, never hand-written; the cache key (see `loader.py`) hashes the rendered sources, so any
field that changes the binary changes the key. `supported()` enumerates every valid variant of a
family: the runtime, the tests and `flashinfer-jit prebuild` all use that one list.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import torch

from . import abi

# dtype name in specs/URIs -> (torch dtype, CUDA C++ type)
DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "fp16": (torch.float16, "half"),
    "bf16": (torch.bfloat16, "__nv_bfloat16"),
}
HEAD_DIMS = (64, 128, 256)
KV_LAYOUTS = ("ragged", "paged_nhd", "paged_hnd")


def dtype_name(dtype: torch.dtype) -> str:
    for name, (torch_dtype, _) in DTYPES.items():
        if torch_dtype == dtype:
            return name
    raise TypeError(f"unsupported dtype {dtype}; supported: torch.float16, torch.bfloat16")


def _uri_field(fmt: str, choices: tuple) -> Any:
    """A spec field: `fmt` renders it in the URI, `choices` are the supported values."""
    return field(metadata={"uri": fmt, "choices": choices})


@dataclass(frozen=True)
class KernelSpec:
    """Base of all kernel specs. Subclasses set `family` and `templates` and declare fields."""

    family: ClassVar[str]
    templates: ClassVar[tuple[str, ...]]  # template file names (in templates/), rendered in order

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            choices = f.metadata["choices"]
            if value not in choices:
                raise ValueError(
                    f"{type(self).__name__}.{f.name}={value!r} is not supported; "
                    f"supported values: {', '.join(map(str, choices))}"
                )

    @property
    def uri(self) -> str:
        parts = [self.family]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            fmt = f.metadata["uri"]
            if isinstance(value, bool):
                yes, no = fmt.split("|")
                parts.append(yes if value else no)
            else:
                parts.append(fmt.format(value))
        return "_".join(p for p in parts if p)

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, **dataclasses.asdict(self)}

    def template_context(self) -> dict[str, Any]:
        """Values the templates may use. StrictUndefined turns a typo into an error."""
        ctx = dataclasses.asdict(self)
        ctx["uri"] = self.uri
        ctx["symbol_prefix"] = "fij_" + self.uri
        if "dtype" in ctx:
            ctx["dtype_cpp"] = DTYPES[ctx["dtype"]][1]
        return ctx

    @classmethod
    def supported(cls) -> Iterator["KernelSpec"]:
        fields = dataclasses.fields(cls)
        for values in itertools.product(*(f.metadata["choices"] for f in fields)):
            yield cls(*values)


@dataclass(frozen=True)
class MergeStateSpec(KernelSpec):
    """merge_state / merge_state_in_place / merge_states for one (head_dim, dtype)."""

    family: ClassVar[str] = "merge_state"
    templates: ClassVar[tuple[str, ...]] = ("merge_state.cu.jinja",)

    head_dim: int = _uri_field("hd{}", HEAD_DIMS)
    dtype: str = _uri_field("{}", tuple(DTYPES))


@dataclass(frozen=True)
class PrefillSpec(KernelSpec):
    """Batch prefill attention (q, k, v, out all of `dtype`), one KV storage layout."""

    family: ClassVar[str] = "prefill"
    templates: ClassVar[tuple[str, ...]] = ("prefill.cu.jinja",)

    kv_layout: str = _uri_field("{}", KV_LAYOUTS)
    head_dim: int = _uri_field("hd{}", HEAD_DIMS)
    dtype: str = _uri_field("{}", tuple(DTYPES))
    causal: bool = _uri_field("causal|full", (False, True))

    # Tile shapes are derived, not spec fields: they follow from head_dim (registers, shared memory).
    @property
    def kv_tile(self) -> int:
        # Two K/V stages must fit beside Q twice per SM (2 CTAs/SM): 32 keys at head_dim 256.
        return 32 if self.head_dim == 256 else 64

    @property
    def cta_q_options(self) -> tuple[int, ...]:
        """Packed q rows per CTA the library contains; plan() picks one per batch."""
        # 16: decode-sized tiles (a few packed rows per request), four warps split the keys.
        return (64,) if self.head_dim == 256 else (128, 64, 16)

    def template_context(self) -> dict[str, Any]:
        ctx = super().template_context()
        ctx["kv_tile"] = self.kv_tile
        ctx["cta_q_options"] = list(self.cta_q_options)
        ctx["abi_structs"] = abi.layout_checks(*abi.PREFILL_STRUCTS)  # compile-time ABI checks
        return ctx


@dataclass(frozen=True)
class AppendPagedSpec(KernelSpec):
    """append_paged_kv_cache for one head_dim and dtype (the page layout is a run-time stride)."""

    family: ClassVar[str] = "append_paged"
    templates: ClassVar[tuple[str, ...]] = ("page.cu.jinja",)

    head_dim: int = _uri_field("hd{}", HEAD_DIMS)
    dtype: str = _uri_field("{}", tuple(DTYPES))

    def template_context(self) -> dict[str, Any]:
        ctx = super().template_context()
        ctx["abi_structs"] = abi.layout_checks(*abi.PAGE_STRUCTS)
        return ctx


FAMILIES: dict[str, type[KernelSpec]] = {cls.family: cls for cls in (MergeStateSpec, PrefillSpec, AppendPagedSpec)}


def spec_from_dict(data: dict[str, Any]) -> KernelSpec:
    data = dict(data)
    family = data.pop("family")
    if family not in FAMILIES:
        raise ValueError(f"unknown kernel family {family!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[family](**data)
