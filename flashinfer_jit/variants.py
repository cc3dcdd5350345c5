"""User-defined attention variants: a few lines of CUDA that become part of a kernel.

    alibi = flashinfer_jit.AttentionVariant(
        "alibi", score_mod="score - slopes[head] * float(q_pos - kv_idx)", params={"slopes": slopes})
    wrapper.plan(qo_indptr, kv_indptr, 32, 8, 128, causal=True, variant=alibi)

The snippets are rendered into the prefill kernel template (inlined: no function pointers), so the
variant is specialized, compiled and cached like any other kernel; its code is part of the spec, the
URI and the cache key, and its parameter values are launch parameters (changing a value re-plans, it
does not rebuild). A snippet that does not compile raises VariantCompileError quoting its line.

Names a snippet may use (spec.CustomVariant): `score` (the scaled logit sm_scale * q.k; score_mod
only), `q_idx` / `kv_idx` (query / key index within the request), `head` (query head), `request`,
`q_len`, `kv_len`, `q_pos` (q_idx + kv_len - q_len: the query's bottom-right aligned position), and
the parameters: a Python number is a float, a tensor a per-query-head float32 array read as
name[head]. mask_mod's keys it refuses are masked on top of `causal` and `window_left`; a row that sees
no key gives O = 0, LSE = -inf. An extension of FlashInfer's API (FlashInfer asks for C++ structs
through jit_args): plan(..., variant=...) on the ragged and paged prefill wrappers.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch

from .spec import MAX_SCALAR_PARAMS, MAX_TENSOR_PARAMS, CustomVariant


class AttentionVariant:
    """A user-defined attention variant: `name`, a `score_mod` and / or a `mask_mod` CUDA expression,
    and `params` (name -> float, or name -> per-query-head float32 CUDA tensor). See the module docstring."""

    def __init__(self, name: str, score_mod: str = "", mask_mod: str = "",
                 params: Optional[Mapping[str, Any]] = None):
        params = dict(params or {})
        scalars = tuple(k for k, v in params.items() if not isinstance(v, torch.Tensor))
        tensors = tuple(k for k, v in params.items() if isinstance(v, torch.Tensor))
        for k in scalars:
            value = params[k]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"AttentionVariant {name}: parameter {k}={value!r}: expected a finite number or a "
                                f"float32 CUDA tensor with one value per query head")
        self.code = CustomVariant(name, score_mod, mask_mod, scalars, tensors)  # validates the code
        self.params = params

    @property
    def name(self) -> str:
        return self.code.name

    def __repr__(self) -> str:
        return (f"AttentionVariant({self.code.name!r}, score_mod={self.code.score_mod!r}, "
                f"mask_mod={self.code.mask_mod!r}, params={sorted(self.params)})")

    def check(self, num_qo_heads: int, device: torch.device, where: str) -> None:
        """Every tensor parameter: a contiguous 1-D float32 tensor on `device`, one value per query head
        (plan() calls this before it loads a kernel)."""
        for k in self.code.tensors:
            t = self.params[k]
            if t.dtype != torch.float32 or t.device != device or t.dim() != 1 or not t.is_contiguous():
                raise ValueError(f"{where}: variant {self.name} parameter {k}: expected a contiguous 1-D float32 "
                                 f"tensor on {device}, got {t.dtype} {tuple(t.shape)} on {t.device}")
            if t.numel() < num_qo_heads:
                raise ValueError(f"{where}: variant {self.name} parameter {k}: one value per query head needed "
                                 f"({num_qo_heads}), got {t.numel()}")

    def bind(self, params: Any, num_qo_heads: int, device: torch.device, where: str) -> list[torch.Tensor]:
        """Write the parameter values into the launch params (abi.PrefillParams), checked; returns the
        tensors, which the plan must keep alive."""
        assert len(self.code.scalars) <= MAX_SCALAR_PARAMS and len(self.code.tensors) <= MAX_TENSOR_PARAMS
        self.check(num_qo_heads, device, where)
        for i, k in enumerate(self.code.scalars):
            params.user_scalars[i] = float(self.params[k])
        kept = []
        for i, k in enumerate(self.code.tensors):
            t = self.params[k]
            setattr(params, f"user_tensor{i}", t.data_ptr())
            kept.append(t)
        return kept
