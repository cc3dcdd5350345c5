"""FlashInfer's optional parameters: which values mean "feature off", and the one error for the rest.

FlashInfer callers (its tests, vLLM, SGLang) pass many options whose value switches a feature off:
`pos_encoding_mode="NONE"`, `window_left=-1`, `logits_soft_cap=0.0` or None, scales of 1.0, ... Those
work here. A value that asks for a feature flashinfer-jit does not implement raises
`NotSupportedError` naming the parameter, the value and what is supported, before any kernel
launch; it is never ignored when it would change the result. Options that do not change the result
(`non_blocking`, `enable_pdl`, ...) are accepted with any value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from .errors import NotSupportedError

LOG2E = 1.4426950408889634  # the kernels' softmax is in base 2: exp(x) = exp2(x * LOG2E)


def off_value(where: str, name: str, value: Any, *off: Any, supported: Optional[str] = None) -> None:
    """Accept `value` if it equals one of `off` (None always counts as off), else NotSupportedError."""
    if value is None or any(_same(value, o) for o in off):
        return
    raise NotSupportedError(name, value, supported or " or ".join(repr(o) for o in (None, *off)), where)


def _same(value: Any, off: Any) -> bool:
    if isinstance(off, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) == off
    if isinstance(value, torch.Tensor):  # a one-element scale tensor (vLLM passes k_scale this way)
        return value.numel() == 1 and not value.is_cuda and float(value) == off
    return type(value) is type(off) and value == off


def pos_encoding_mode(where: str, value: Any) -> None:
    """For entry points without positional encodings (the cascade wrapper): "NONE" only."""
    if value is None or (isinstance(value, str) and value.upper() == "NONE") or value == 0:
        return
    raise NotSupportedError("pos_encoding_mode", value, "'NONE' (use the batch prefill / decode wrappers for "
                            "fused RoPE and ALiBi)", where)


# FlashInfer's PosEncodingMode names and enum values.
POS_ENCODINGS = ("NONE", "ROPE_LLAMA", "ALIBI")


def parse_pos_encoding_mode(where: str, value: Any) -> str:
    """FlashInfer's pos_encoding_mode: a name ("NONE", "ROPE_LLAMA", "ALIBI", any case), its PosEncodingMode
    value (0, 1, 2) or the enum itself; None is "NONE". Anything else is ValueError."""
    if value is None:
        return "NONE"
    name = getattr(value, "name", value)  # FlashInfer's PosEncodingMode enum
    if isinstance(name, str) and name.upper() in POS_ENCODINGS:
        return name.upper()
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(POS_ENCODINGS):
        return POS_ENCODINGS[value]
    raise ValueError(f"{where}: pos_encoding_mode={value!r}: expected one of {', '.join(map(repr, POS_ENCODINGS))} "
                     f"(or FlashInfer's PosEncodingMode values 0, 1, 2)")


def _positive(where: str, name: str, value: Any, default: float) -> float:
    if value is None:
        return default
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0):
        raise ValueError(f"{where}: {name}={value!r}: expected None (default {default:g}) or a finite number > 0")
    return float(value)


def window_left(where: str, value: Any) -> None:
    off_value(where, "window_left", value, -1, supported="-1 or None (sliding-window attention is not implemented yet)")


def logits_soft_cap(where: str, value: Any) -> None:
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0):
        return  # FlashInfer: a cap <= 0 (0.0 is vLLM's default) means no cap
    raise NotSupportedError("logits_soft_cap", value, "None or 0.0 (logits soft-capping is not implemented yet)", where)


def scale(where: str, name: str, value: Any) -> None:
    """q_scale / o_scale / scale_q ..., and k_scale / v_scale of a 16-bit KV plan: None or 1.0 (a Python number
    or a one-element tensor). CUDA tensors are not read (that would synchronize): they are refused."""
    supported = ("None or 1.0 (k_scale / v_scale apply to fp8 KV caches: plan with kv_data_type=torch.float8_e4m3fn "
                 "or float8_e5m2; q_scale / o_scale are not implemented)")
    if isinstance(value, torch.Tensor) and value.is_cuda:
        raise NotSupportedError(name, f"a CUDA tensor of shape {tuple(value.shape)}", supported, where)
    off_value(where, name, value, 1.0, supported=supported)


def dtype_like(where: str, name: str, value: Optional[Union[str, torch.dtype]], expected: torch.dtype) -> None:
    """o_data_type and the like: None or the same dtype as `expected`."""
    if value is None:
        return
    resolved = getattr(torch, value, None) if isinstance(value, str) else value
    if resolved != expected:
        raise NotSupportedError(name, value, f"None or {expected} (the output dtype equals the query dtype)", where)


def no_custom_mask(where: str, **masks: Any) -> None:
    for name, value in masks.items():
        if value is not None:
            raise NotSupportedError(name, f"a tensor of shape {tuple(getattr(value, 'shape', ()))}",
                                    "None (custom masks are not implemented yet)", where)


def flag_off(where: str, name: str, value: Any, reason: str) -> None:
    """A boolean feature switch that must be off: False or None."""
    if value is None or value is False or value == 0:
        return
    raise NotSupportedError(name, value, f"False ({reason})", where)


FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                   if hasattr(torch, n))


def quantized_dtype(where: str, name: str, value: Any) -> None:
    """q_data_type and the like: an fp8 dtype (or uint8, FlashInfer's packed NVFP4 KV) is a missing feature
    there (NotSupportedError). Other dtypes are left to the dtype checks."""
    resolved = getattr(torch, value, None) if isinstance(value, str) else value
    if resolved in FP8_DTYPES or resolved is torch.uint8:
        raise NotSupportedError(name, value, "torch.float16 or torch.bfloat16 (fp8 queries and NVFP4 KV caches are "
                                "not implemented)", where)


# The fp8 KV caches the FA2-class kernel reads (spec.PrefillSpec.kv_dtype): torch dtype -> spec name.
FP8_KV_DTYPES = {torch.float8_e4m3fn: "fp8e4m3", torch.float8_e5m2: "fp8e5m2"}


def kv_storage(where: str, value: Any) -> str:
    """kv_data_type's kernel storage: "" (the query dtype's 16 bits), "fp8e4m3" or "fp8e5m2". The fnuz fp8
    variants (AMD's) and uint8 (FlashInfer's packed NVFP4) raise NotSupportedError."""
    resolved = getattr(torch, value, None) if isinstance(value, str) else value
    if resolved in FP8_KV_DTYPES:
        return FP8_KV_DTYPES[resolved]
    if resolved in FP8_DTYPES or resolved is torch.uint8:
        raise NotSupportedError("kv_data_type", value, "torch.float16, torch.bfloat16, torch.float8_e4m3fn or "
                                "torch.float8_e5m2", where)
    return ""


def no_fp8_kv(where: str, kv_dtype: Any, given: Any) -> None:
    """Entry points without fp8 caches (cascade, BatchAttention): NotSupportedError for an fp8 KV dtype."""
    if kv_dtype in FP8_DTYPES:
        raise NotSupportedError("kv_data_type", given, "torch.float16 or torch.bfloat16 here (fp8 KV caches work on "
                                "the batch prefill and decode wrappers)", where)


def kv_scale(where: str, name: str, value: Any, device: torch.device) -> tuple[float, Optional[int]]:
    """An fp8 cache's k_scale / v_scale as the kernel takes it: (a float, a device pointer or None). None is
    1.0; a Python number must be finite and > 0; a one-element float32 tensor on the CPU is read, one on the
    wrapper's CUDA device is passed by pointer (read by the kernel: no synchronization, CUDA-graph safe as
    long as the tensor lives; its value is not checked, since reading it would synchronize: it must be
    finite and > 0, as a number must)."""
    if value is None:
        return 1.0, None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype != torch.float32:
            raise ValueError(f"{where}: {name}: expected a Python float or a one-element float32 tensor, got a "
                             f"{value.dtype} tensor of shape {tuple(value.shape)}")
        if value.device.type != "cuda":
            value = float(value)
        elif value.device != device:
            raise ValueError(f"{where}: {name}: expected a tensor on {device} (the wrapper's device), got {value.device}")
        else:
            return 1.0, value.data_ptr()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}: {name}={value!r}: expected None, a finite number > 0 or a one-element float32 "
                         f"tensor")
    return float(value), None


@dataclass(frozen=True)
class VariantOptions:
    """The built-in attention variants a plan asks for (variant.cuh), FlashInfer's semantics.

    window_left: -1 no sliding window; k >= 0: a query at position p (bottom-right aligned: token i of a
    request with q_len queries and kv_len keys is at p = kv_len - q_len + i) sees keys j >= p - k, so a
    causal query sees k + 1 keys. logits_soft_cap: 0.0 none; c > 0: scores c * tanh(sm_scale * q.k / c)
    (Gemma 2). Each is a compile-time switch of the kernel (its own cache entry) and a run-time value."""

    window_left: int = -1
    logits_soft_cap: float = 0.0
    custom_mask: bool = False  # plan's custom_mask / packed_custom_mask (the bits are plan data: masks.py)
    # pos_encoding_mode: "NONE", "ROPE_LLAMA" (fused rotary embedding of q and k: rotate-half pairs (i, i + D/2),
    # angle position * rope_theta^(-2i / D) / rope_scale) or "ALIBI" (score + slope(head) * (key - position)).
    pos_encoding: str = "NONE"
    rope_scale: float = 1.0
    rope_theta: float = 1e4

    @property
    def sliding_window(self) -> bool:
        return self.window_left >= 0

    @property
    def soft_cap(self) -> bool:
        return self.logits_soft_cap > 0.0

    @property
    def rope(self) -> bool:
        return self.pos_encoding == "ROPE_LLAMA"

    @property
    def alibi(self) -> bool:
        return self.pos_encoding == "ALIBI"


PLAIN = VariantOptions()


def attention_variant(where: str, window_left: Any = -1, logits_soft_cap: Any = None, pos_encoding_mode: Any = "NONE",
                      rope_scale: Any = None, rope_theta: Any = None) -> VariantOptions:
    """Parse plan()'s window_left, logits_soft_cap, pos_encoding_mode and (with "ROPE_LLAMA") rope_scale /
    rope_theta. Stricter than FlashInfer, which takes any negative window or cap for "off": None, -1
    (window) and None, 0.0 (cap, vLLM's default) mean off; other negative values, NaN, infinities and
    non-numbers raise ValueError before anything is planned, as do unknown pos_encoding_mode values,
    RoPE scales / thetas <= 0 and ALiBi with a soft-cap (FlashInfer's fa2 kernels would apply both)."""
    encoding = parse_pos_encoding_mode(where, pos_encoding_mode)
    scale_, theta = 1.0, 1e4
    if encoding == "ROPE_LLAMA":  # FlashInfer ignores rope_scale / rope_theta without RoPE; so do we
        scale_ = _positive(where, "rope_scale", rope_scale, 1.0)
        theta = _positive(where, "rope_theta", rope_theta, 1e4)
    if window_left is None:
        window = -1
    elif isinstance(window_left, bool) or not isinstance(window_left, int) or window_left < -1:
        raise ValueError(f"{where}: window_left={window_left!r}: expected -1 (no sliding window) or a number of "
                         f"keys >= 0 before each query's position")
    else:
        window = int(window_left)
    if logits_soft_cap is None:
        cap = 0.0
    elif (isinstance(logits_soft_cap, bool) or not isinstance(logits_soft_cap, (int, float))
          or not math.isfinite(logits_soft_cap) or logits_soft_cap < 0):
        raise ValueError(f"{where}: logits_soft_cap={logits_soft_cap!r}: expected None or 0.0 (no soft-cap) or a "
                         f"finite cap > 0 (scores become cap * tanh(logit / cap))")
    else:
        cap = float(logits_soft_cap)
    if encoding == "ALIBI" and cap > 0:
        raise ValueError(f"{where}: pos_encoding_mode='ALIBI' and logits_soft_cap={logits_soft_cap!r} do not combine "
                         f"here: write both into a flashinfer_jit.AttentionVariant score_mod")
    return VariantOptions(window, cap, pos_encoding=encoding, rope_scale=scale_, rope_theta=theta)


def same_variant(where: str, asked: VariantOptions, planned: VariantOptions) -> None:
    """forward()-style calls pass window_left / logits_soft_cap / pos_encoding_mode / rope_scale / rope_theta
    again; they choose the kernel and its tables, which plan() did: anything but the plan's values is
    NotSupportedError."""
    for name in ("window_left", "logits_soft_cap", "pos_encoding", "rope_scale", "rope_theta"):
        value, plan_value = getattr(asked, name), getattr(planned, name)
        if value != plan_value:
            shown = "pos_encoding_mode" if name == "pos_encoding" else name
            raise NotSupportedError(shown, value, f"plan()'s {plan_value!r} (the attention variant is chosen by "
                                    f"plan(): call it with the new value)", where)


def variant_scales(sm_scale: float, variant: VariantOptions) -> tuple[float, float]:
    """(scale_log2, soft_cap_pre_tanh) of the launch params: sm_scale * log2(e) and 0, or with a soft-cap
    cap * log2(e) and sm_scale / cap (the kernel computes tanh(q.k * pre_tanh) and exp2 scales by the first)."""
    if variant.soft_cap:
        return variant.logits_soft_cap * LOG2E, sm_scale / variant.logits_soft_cap
    return sm_scale * LOG2E, 0.0


def no_fp16_qk_reduction(where: str, use_fp16_qk_reduction: Any = False) -> None:
    flag_off(where, "use_fp16_qk_reduction", use_fp16_qk_reduction,
             "fp16 QK reduction is not implemented; QK products are accumulated in fp32")


# The variants' device tables, made once per value and kept for the process (a few hundred bytes each): a
# plan's launch params, and CUDA graphs captured with them, keep pointing at live memory.
_tables: dict[tuple, torch.Tensor] = {}


def rope_frequencies(head_dim: int, variant: VariantOptions, device: torch.device) -> torch.Tensor:
    """Fused RoPE's table on `device`: freq(i) = rope_theta^(-2i / head_dim) / rope_scale for i < head_dim / 2,
    computed in float64 and rounded once to float32 (variant.cuh WithRope)."""
    key = ("rope", device, head_dim, variant.rope_scale, variant.rope_theta)
    table = _tables.get(key)
    if table is None:
        i = torch.arange(head_dim // 2, dtype=torch.float64)
        freqs = torch.pow(variant.rope_theta, -2.0 * i / head_dim) / variant.rope_scale
        table = _tables[key] = freqs.to(torch.float32).to(device)
    return table


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al.; FlashInfer's get_alibi_slopes): 2^(-8 (h + 1) / n) for the
    first n = 2^floor(log2(num_heads)) heads, then the odd steps of the 2n series; float32 on the CPU."""
    n = 2 ** math.floor(math.log2(num_heads))
    slopes = [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]
    slopes += [2.0 ** (-4.0 * (2 * j + 1) / n) for j in range(num_heads - n)]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_slopes_log2(num_heads: int, device: torch.device) -> torch.Tensor:
    """alibi_slopes times log2(e) on `device` (the kernels' softmax is in base 2), made once."""
    key = ("alibi", device, num_heads)
    table = _tables.get(key)
    if table is None:
        table = _tables[key] = (alibi_slopes(num_heads).double() * LOG2E).float().to(device)
    return table


def no_tensor(where: str, name: str, value: Any, feature: str) -> None:
    """An optional input whose presence switches a feature on (prefix_len_ptr, sinks, kv_cache_sf, ...): None."""
    if value is not None:
        shown = (f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor)
                 else f"a {type(value).__name__} of {len(value)}" if isinstance(value, (tuple, list)) else value)
        raise NotSupportedError(name, shown, f"None ({feature} is not implemented yet)", where)


def no_extra_args(where: str, args: tuple) -> None:
    """run(*args): FlashInfer passes them to custom JIT attention variants, which flashinfer-jit does not build."""
    if args:
        raise NotSupportedError("*args", f"{len(args)} extra positional argument(s)",
                                "none (they feed FlashInfer's custom JIT attention variants, not implemented)", where)


def no_jit_variant(where: str, jit_args: Any, jit_kwargs: Any, variant_owns_mask: Any) -> None:
    """The constructor's custom-variant options (FlashInfer JIT-compiles user attention variants)."""
    if jit_args is not None:
        raise NotSupportedError("jit_args", f"a list of {len(jit_args)}" if isinstance(jit_args, (list, tuple))
                                else jit_args, "None (custom JIT attention variants are not implemented)", where)
    if jit_kwargs is not None:
        raise NotSupportedError("jit_kwargs", jit_kwargs, "None (custom JIT attention variants are not implemented)",
                                where)
    flag_off(where, "variant_owns_mask", variant_owns_mask, "custom JIT attention variants are not implemented")


def lse_base(where: str, value: Any) -> bool:
    """run(lse_base=): "log2" (FlashInfer's default, as the kernels write it) or "ln". True for "ln"."""
    if value == "log2":
        return False
    if value == "ln":
        return True
    raise ValueError(f"{where}: lse_base: expected 'log2' or 'ln', got {value!r}")


def lse_layout(where: str, value: Any) -> None:
    """run(lse_layout=): "NH" ([tokens, heads], the only layout here)."""
    if value != "NH":
        raise NotSupportedError("lse_layout", value, "'NH' (the transposed 'HN' LSE layout is not implemented yet)",
                                where)


def finite_or_none(name: str, value: Optional[float]) -> Optional[float]:
    if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0):
        raise ValueError(f"{name}: expected a positive finite number or None, got {value!r}")
    return value
