"""Kernel variants as data.

One frozen dataclass per kernel family names a variant. Its URI (readable, file-name safe) is derived
from the fields, never hand-written; the cache key (see `loader.py`) hashes the rendered sources, so any
field that changes the binary changes the key. `supported()` enumerates every valid variant of a
family: the runtime, the tests and `flashinfer-jit prebuild` all use that one list.

Two kinds of fields:
  - matrix fields (`_uri_field`): a choice among supported values; `supported()` and the prebuild
    matrix range over them. A field may accept aliases, normalized on construction (a prefill
    kv_layout of "paged_nhd" or "paged_hnd" is "paged": the page layout is a run-time stride).
    An opt-in matrix field (attention variants: sliding window, soft-cap) has a default the matrix
    keeps unless asked: `supported()` and the default prebuild matrix hold its default only, a filter
    naming it (`flashinfer-jit prebuild --soft-cap true`) ranges over its values.
  - derived fields (`_derived_field`, tile shapes): default to a value derived from the other fields
    (given None), may be set to another supported value, and are in the URI and the key like any
    field; `supported()` yields the derived defaults only.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator

import torch

from . import abi

# dtype name in specs/URIs -> (torch dtype, CUDA C++ type)
DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "fp16": (torch.float16, "half"),
    "bf16": (torch.bfloat16, "__nv_bfloat16"),
}
# K/V storage other than the query dtype (PrefillSpec.kv_dtype) -> (torch dtype name, CUDA C++ type).
# "" stores K/V as `dtype`.
KV_DTYPES: dict[str, tuple[str, str]] = {
    "": ("", ""),
    "fp8e4m3": ("float8_e4m3fn", "__nv_fp8_e4m3"),
    "fp8e5m2": ("float8_e5m2", "__nv_fp8_e5m2"),
}
KV_DTYPE_ALIASES = {"e4m3": "fp8e4m3", "e5m2": "fp8e5m2", "float8_e4m3fn": "fp8e4m3", "float8_e5m2": "fp8e5m2",
                    "same": "", "none": ""}
HEAD_DIMS = (64, 128, 256)
KV_LAYOUTS = ("ragged", "paged")
# The page layouts users name (wrappers' NHD/HND, prebuild options, config files): one kernel.
KV_LAYOUT_ALIASES = {"paged_nhd": "paged", "paged_hnd": "paged"}
# fa2: the mma.sync kernel (sm_80 and newer); sm90: the Hopper kernel (wgmma + TMA, sm_90a only)
BACKENDS = ("fa2", "sm90")
# Layouts each backend has a kernel for.
BACKEND_LAYOUTS = {"fa2": KV_LAYOUTS, "sm90": KV_LAYOUTS}
KV_TILES = (16, 32, 64, 128)
CTA_Q_TILES = (16, 32, 64, 128)


def dtype_name(dtype: torch.dtype) -> str:
    for name, (torch_dtype, _) in DTYPES.items():
        if torch_dtype == dtype:
            return name
    raise TypeError(f"unsupported dtype {dtype}; supported: torch.float16, torch.bfloat16")


def _uri_field(fmt: str, choices: tuple, *, default: Any = dataclasses.MISSING,
               aliases: dict[Any, Any] | None = None, opt_in: bool = False) -> Any:
    """A matrix field: `fmt` renders it in the URI, `choices` are the supported values, `aliases`
    other spellings accepted for them; `opt_in`: the matrix holds only `default` unless asked."""
    if opt_in and default is dataclasses.MISSING:
        raise TypeError("an opt-in matrix field needs a default")
    return field(default=default, metadata={"uri": fmt, "choices": choices, "aliases": aliases or {}, "opt_in": opt_in})


def _derived_field(fmt: str, choices: tuple, derive: Callable[[Any], Any], *, several: bool = False) -> Any:
    """A field whose default (None) is `derive(spec)`. With `several`, the value is a non-empty tuple
    of distinct `choices`, kept in descending order (rendered joined by 'x' in the URI), else one of them."""
    return field(default=None, metadata={"uri": fmt, "choices": choices, "derive": derive, "several": several})


def matrix_fields(cls: type["KernelSpec"]) -> list[dataclasses.Field]:
    """The fields `supported()` and the prebuild matrix range over (not the derived or code ones)."""
    return [f for f in dataclasses.fields(cls) if "derive" not in f.metadata and "code" not in f.metadata]


# The names a user variant's snippets may use besides its parameters (see CustomVariant).
SNIPPET_NAMES = ("score", "q_idx", "kv_idx", "head", "request", "q_len", "kv_len", "q_pos")
_IDENTIFIER = re.compile(r"[a-z][a-z0-9_]{0,31}")
MAX_SCALAR_PARAMS, MAX_TENSOR_PARAMS = 8, 4  # PrefillParams::user_scalars, user_tensor0..3


@dataclass(frozen=True)
class CustomVariant:
    """The code of a user-defined attention variant (flashinfer_jit.AttentionVariant): what the kernel
    is compiled from, so it is in the spec, the URI (name and a digest of the code) and the cache key.
    Parameter values are launch parameters, not code.

    score_mod: a CUDA float expression of `score` (the scaled logit sm_scale * q.k), `q_idx` and
    `kv_idx` (query and key index within the request), `head` (query head), `request`, `q_len`,
    `kv_len`, `q_pos` (= q_idx + kv_len - q_len: the query's bottom-right aligned position) and the
    parameters. mask_mod: a CUDA bool expression of the same names but `score`: keys it refuses are
    masked (on top of causal and the window). scalars: float parameters; tensors: per-query-head float
    arrays, read as name[head]."""

    name: str
    score_mod: str = ""
    mask_mod: str = ""
    scalars: tuple[str, ...] = ()
    tensors: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _IDENTIFIER.fullmatch(self.name):
            raise ValueError(f"AttentionVariant name {self.name!r}: expected a lower-case identifier "
                             f"([a-z][a-z0-9_]*, at most 32 characters)")
        for what in ("score_mod", "mask_mod"):
            text = getattr(self, what)
            if not isinstance(text, str):
                raise TypeError(f"AttentionVariant {self.name}: {what} must be a string of CUDA code, got "
                                f"{type(text).__name__}")
            if any(c in text for c in ";{}#"):
                raise ValueError(f"AttentionVariant {self.name}: {what} must be one expression (no ';', '{{', "
                                 f"'}}' or preprocessor lines), got {text!r}")
        if not (self.score_mod.strip() or self.mask_mod.strip()):
            raise ValueError(f"AttentionVariant {self.name}: give a score_mod, a mask_mod or both")
        names = (*self.scalars, *self.tensors)
        for n in names:
            if not isinstance(n, str) or not _IDENTIFIER.fullmatch(n) or n in SNIPPET_NAMES:
                raise ValueError(f"AttentionVariant {self.name}: parameter name {n!r} must be a lower-case "
                                 f"identifier other than {', '.join(SNIPPET_NAMES)}")
        if len(set(names)) != len(names):
            raise ValueError(f"AttentionVariant {self.name}: parameter names repeat: {names}")
        if len(self.scalars) > MAX_SCALAR_PARAMS or len(self.tensors) > MAX_TENSOR_PARAMS:
            raise ValueError(f"AttentionVariant {self.name}: at most {MAX_SCALAR_PARAMS} scalar and "
                             f"{MAX_TENSOR_PARAMS} tensor parameters, got {len(self.scalars)} and {len(self.tensors)}")

    @property
    def digest(self) -> str:
        code = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(code.encode()).hexdigest()[:10]

    @property
    def uri_part(self) -> str:
        return f"{self.name}{self.digest}"


@dataclass(frozen=True)
class KernelSpec:
    """Base of all kernel specs. Subclasses set `family` and `templates` and declare fields."""

    family: ClassVar[str]
    templates: ClassVar[tuple[str, ...]]  # template file names (in templates/), rendered in order

    def __post_init__(self) -> None:
        for f in matrix_fields(type(self)):
            value = getattr(self, f.name)
            value = f.metadata["aliases"].get(value, value) if isinstance(value, (str, int)) else value
            self._check(f, value, value)
            object.__setattr__(self, f.name, value)
        for f in dataclasses.fields(self):
            if "derive" not in f.metadata:
                continue
            value = getattr(self, f.name)
            if value is None:
                value = f.metadata["derive"](self)
            if f.metadata["several"]:
                values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
                if not values or len(set(values)) != len(values):
                    raise ValueError(f"{type(self).__name__}.{f.name}={value!r} is not supported; expected a "
                                     f"non-empty tuple of distinct values among {', '.join(map(str, f.metadata['choices']))}")
                for item in values:
                    self._check(f, item, value)
                value = tuple(sorted(values, reverse=True))  # one spelling (and URI) per set
            else:
                self._check(f, value, value)
            object.__setattr__(self, f.name, value)

    def _check(self, f: dataclasses.Field, value: Any, shown: Any) -> None:
        choices = f.metadata["choices"]
        if value not in choices or isinstance(value, bool) != isinstance(choices[0], bool):
            raise ValueError(
                f"{type(self).__name__}.{f.name}={shown!r} is not supported; "
                f"supported values: {', '.join(map(str, choices))}"
            )

    @property
    def uri(self) -> str:
        parts = [self.family]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            fmt = f.metadata["uri"]
            if "code" in f.metadata:
                parts.append(value.uri_part if value is not None else "")
            elif isinstance(value, bool):
                yes, no = fmt.split("|")
                parts.append(yes if value else no)
            elif isinstance(value, tuple):
                parts.append(fmt.format("x".join(map(str, value))))
            else:
                parts.append(fmt.format(value))
        return "_".join(p for p in parts if p)

    def to_dict(self) -> dict[str, Any]:
        """Every field (tuples as lists: the dict is JSON, in manifests and keys)."""
        return {"family": self.family,
                **{name: list(v) if isinstance(v, tuple) else v for name, v in dataclasses.asdict(self).items()}}

    def template_context(self) -> dict[str, Any]:
        """Values the templates may use. StrictUndefined turns a typo into an error."""
        ctx = {name: list(v) if isinstance(v, tuple) else v for name, v in dataclasses.asdict(self).items()}
        ctx["uri"] = self.uri
        ctx["symbol_prefix"] = "fij_" + self.uri
        if "dtype" in ctx:
            ctx["dtype_cpp"] = DTYPES[ctx["dtype"]][1]
        return ctx

    @classmethod
    def supported(cls, opt_in: Iterable[str] = ()) -> Iterator["KernelSpec"]:
        """Every combination of the matrix fields' choices, derived fields at their defaults; opt-in
        fields at their defaults unless named in `opt_in`."""
        fields = matrix_fields(cls)
        wanted = set(opt_in)
        choices = [f.metadata["choices"] if not f.metadata["opt_in"] or f.name in wanted else (f.default,)
                   for f in fields]
        for values in itertools.product(*choices):
            named = {f.name: v for f, v in zip(fields, values)}
            if cls.combination_exists(named):
                yield cls(**named)

    @classmethod
    def combination_exists(cls, values: dict[str, Any]) -> bool:
        """Whether the matrix values go together (a backend may lack a layout); True by default."""
        return True

    def runs_on(self, archs: tuple[str, ...]) -> bool:
        """Whether a library built for `archs` (toolchain's normalized names) can run this variant."""
        return True

    def explain_compile_error(self, log: str) -> tuple[str, int, str, str] | None:
        """User code in the spec that a compile error points into: (snippet, line, message, the line's
        text), or None (the error is the library's)."""
        return None


@dataclass(frozen=True)
class MergeStateSpec(KernelSpec):
    """merge_state / merge_state_in_place / merge_states for one (head_dim, dtype)."""

    family: ClassVar[str] = "merge_state"
    templates: ClassVar[tuple[str, ...]] = ("merge_state.cu.jinja",)

    head_dim: int = _uri_field("hd{}", HEAD_DIMS)
    dtype: str = _uri_field("{}", tuple(DTYPES))


def default_kv_tile(spec: "PrefillSpec") -> int:
    if spec.backend == "sm90":
        # One CTA per SM: two stages of 128-key K and V tiles beside a 128-row Q (64 keys at head_dim 256:
        # the O accumulators take 128 registers a thread).
        return 64 if spec.head_dim == 256 else 128
    # Two K/V stages must fit beside Q twice per SM (2 CTAs/SM): 32 keys at head_dim 256.
    return 32 if spec.head_dim == 256 else 64


def default_cta_q_options(spec: "PrefillSpec") -> tuple[int, ...]:
    if spec.backend == "sm90":
        return (128,)  # two consumer warpgroups of 64 rows (wgmma M)
    # 16: decode-sized tiles (a few packed rows per request), four warps split the keys.
    return (64,) if spec.head_dim == 256 else (128, 64, 16)


@dataclass(frozen=True)
class PrefillSpec(KernelSpec):
    """Batch prefill attention (q, k, v, out all of `dtype`), one KV storage kind ("ragged", or
    "paged" for both page layouts: NHD and HND differ only in run-time strides).

    Tile shapes follow from head_dim (registers, shared memory) unless given: `kv_tile` keys per KV
    tile, and `cta_q_options`, the packed q rows per CTA the library contains (plan() picks one per
    batch)."""

    family: ClassVar[str] = "prefill"
    templates: ClassVar[tuple[str, ...]] = ("prefill.cu.jinja",)

    kv_layout: str = _uri_field("{}", KV_LAYOUTS, aliases=KV_LAYOUT_ALIASES)
    head_dim: int = _uri_field("hd{}", HEAD_DIMS)
    dtype: str = _uri_field("{}", tuple(DTYPES))
    causal: bool = _uri_field("causal|full", (False, True))
    backend: str = _uri_field("{}", BACKENDS, default="fa2")
    # Attention variants (variant.cuh), compile-time on/off; their run-time values (the window's size,
    # the cap) are launch parameters. Opt-in: outside the default prebuild matrix.
    sliding_window: bool = _uri_field("window|", (False, True), default=False, opt_in=True)
    soft_cap: bool = _uri_field("softcap|", (False, True), default=False, opt_in=True)
    custom_mask: bool = _uri_field("mask|", (False, True), default=False, opt_in=True)  # FlashInfer's custom_mask
    # FlashInfer's pos_encoding_mode: "ROPE_LLAMA" (fused rotary embedding of q and k; FA2-class kernel only)
    # and "ALIBI" (linear biases, one slope a head).
    rope: bool = _uri_field("rope|", (False, True), default=False, opt_in=True)
    alibi: bool = _uri_field("alibi|", (False, True), default=False, opt_in=True)
    # An fp8 KV cache (FlashInfer's kv_data_type float8_e4m3fn / float8_e5m2): K/V pages hold fp8, widened in
    # the kernel (FA2-class kernel only); "" stores K/V as `dtype`.
    kv_dtype: str = _uri_field("{}", tuple(KV_DTYPES), default="", aliases=KV_DTYPE_ALIASES, opt_in=True)
    # A user-defined variant's code (flashinfer_jit.AttentionVariant): outside every matrix.
    custom: CustomVariant | None = field(default=None, metadata={"uri": "{}", "code": True})
    kv_tile: int = _derived_field("kv{}", KV_TILES, default_kv_tile)
    cta_q_options: tuple[int, ...] = _derived_field("q{}", CTA_Q_TILES, default_cta_q_options, several=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kv_layout not in BACKEND_LAYOUTS[self.backend]:
            raise ValueError(f"PrefillSpec: backend {self.backend!r} has no {self.kv_layout!r} kernel; "
                             f"it has: {', '.join(BACKEND_LAYOUTS[self.backend])}")
        if self.custom is not None and not isinstance(self.custom, CustomVariant):
            raise TypeError(f"PrefillSpec.custom: expected a CustomVariant or None, got {type(self.custom).__name__}")
        if self.custom is not None and self.custom_mask:
            raise ValueError("PrefillSpec: a user variant and a custom mask do not combine (write the mask as its "
                             "mask_mod)")
        if self.custom is not None and self.soft_cap:
            raise ValueError("PrefillSpec: a user variant and the built-in soft-cap do not combine (write the cap "
                             "into the score_mod)")
        if self.rope and self.alibi:
            raise ValueError("PrefillSpec: rope and alibi are two values of pos_encoding_mode; choose one")
        if self.alibi and (self.soft_cap or self.custom is not None):
            raise ValueError("PrefillSpec: ALiBi and the soft-cap or a user variant do not combine (write the bias "
                             "into a user variant's score_mod)")
        if self.kv_dtype and self.backend == "sm90":
            raise ValueError("PrefillSpec: fp8 K/V (kv_dtype) runs on the fa2 backend only; use backend='fa2'")
        if self.backend == "sm90" and (self.cta_q_options != (128,) or self.kv_tile not in (64, 128)):
            raise ValueError(f"PrefillSpec: the sm90 backend runs 128-row q tiles and 64 or 128-key KV tiles, "
                             f"got cta_q_options={self.cta_q_options}, kv_tile={self.kv_tile}")

    @classmethod
    def combination_exists(cls, values: dict[str, Any]) -> bool:
        if values.get("rope") and values.get("alibi"):
            return False
        if values.get("alibi") and values.get("soft_cap"):
            return False
        if values.get("kv_dtype") and values["backend"] == "sm90":
            return False
        return values["kv_layout"] in BACKEND_LAYOUTS[values["backend"]]

    def runs_on(self, archs: tuple[str, ...]) -> bool:
        # The sm90 kernel exists in the sm_90a pass only (elsewhere its body traps).
        return self.backend != "sm90" or any(a.split("+")[0] == "90a" for a in archs)

    def template_context(self) -> dict[str, Any]:
        ctx = super().template_context()
        ctx["abi_structs"] = abi.layout_checks(*abi.PREFILL_STRUCTS)  # compile-time ABI checks
        window = "true" if self.sliding_window else "false"
        if self.custom is not None:
            ctx["variant_cpp"] = f"UserVariant<kCausal, {window}>"
        else:
            variant = ("SoftCapAttention" if self.soft_cap else "AlibiAttention" if self.alibi
                       else "StandardAttention")
            ctx["variant_cpp"] = f"fij::{variant}<kCausal, {window}>"
        if self.custom_mask:
            ctx["variant_cpp"] = f"fij::WithCustomMask<{ctx['variant_cpp']}>"
        if self.rope:
            ctx["variant_cpp"] = f"fij::WithRope<{ctx['variant_cpp']}>"
        ctx["kv_type_cpp"] = KV_DTYPES[self.kv_dtype][1] or ctx["dtype_cpp"]
        return ctx

    def explain_compile_error(self, log: str) -> tuple[str, int, str, str] | None:
        """A compile error inside the user's snippet (the template numbers them as files score_mod and
        mask_mod): (snippet name, its line, the compiler's message, the snippet's line), else None."""
        if self.custom is None:
            return None
        found = re.search(r"\b(score_mod|mask_mod)\((\d+)\): (?:catastrophic )?error: ([^\n]*)", log)
        if found is None:
            return None
        which, line = found.group(1), int(found.group(2))
        lines = getattr(self.custom, which).splitlines() or [""]
        return which, line, found.group(3).strip(), lines[min(max(line, 1), len(lines)) - 1]


@dataclass(frozen=True)
class AppendPagedSpec(KernelSpec):
    """append_paged_kv_cache for one head_dim and dtype of the appended keys / values (the page layout is a
    run-time stride), into a cache of that dtype or (kv_dtype) an fp8 one (cast with saturation)."""

    family: ClassVar[str] = "append_paged"
    templates: ClassVar[tuple[str, ...]] = ("page.cu.jinja",)

    head_dim: int = _uri_field("hd{}", HEAD_DIMS)
    dtype: str = _uri_field("{}", tuple(DTYPES))
    kv_dtype: str = _uri_field("{}", tuple(KV_DTYPES), default="", aliases=KV_DTYPE_ALIASES, opt_in=True)

    def template_context(self) -> dict[str, Any]:
        ctx = super().template_context()
        ctx["abi_structs"] = abi.layout_checks(*abi.PAGE_STRUCTS)
        ctx["kv_type_cpp"] = KV_DTYPES[self.kv_dtype][1] or ctx["dtype_cpp"]
        return ctx


@dataclass(frozen=True)
class RopeSpec(KernelSpec):
    """The standalone RoPE ops (rope.py: apply_rope*, apply_rope_pos_ids*) for one head_dim, dtype and
    pairing (interleaved or rotate-half); rotary_dim, scale and theta are run-time values."""

    family: ClassVar[str] = "rope"
    templates: ClassVar[tuple[str, ...]] = ("rope.cu.jinja",)

    head_dim: int = _uri_field("hd{}", HEAD_DIMS)
    dtype: str = _uri_field("{}", tuple(DTYPES))
    interleave: bool = _uri_field("interleave|halves", (False, True))

    def template_context(self) -> dict[str, Any]:
        ctx = super().template_context()
        ctx["abi_structs"] = abi.layout_checks(*abi.ROPE_STRUCTS)
        return ctx


FAMILIES: dict[str, type[KernelSpec]] = {cls.family: cls for cls in (MergeStateSpec, PrefillSpec, AppendPagedSpec,
                                                                      RopeSpec)}


def spec_from_dict(data: dict[str, Any]) -> KernelSpec:
    data = dict(data)
    family = data.pop("family")
    if family not in FAMILIES:
        raise ValueError(f"unknown kernel family {family!r}; known: {', '.join(FAMILIES)}")
    cls = FAMILIES[family]
    for f in dataclasses.fields(cls):  # a code field comes back from JSON as a dict of lists
        if "code" in f.metadata and isinstance(data.get(f.name), dict):
            data[f.name] = CustomVariant(**{k: tuple(v) if isinstance(v, list) else v for k, v in data[f.name].items()})
    return cls(**data)
