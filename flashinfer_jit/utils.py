"""Names that FlashInfer users import from `flashinfer.utils`.

vLLM's FlashInfer backend imports `FP4Tensor` at module load; flashinfer-jit has no NVFP4 support,
so the class exists (the import works) and constructing one raises NotSupportedError.
"""
from __future__ import annotations

from typing import Any

from .errors import NotSupportedError


class FP4Tensor:
    """FlashInfer's NVFP4 tensor (packed data + scale factors): not supported by flashinfer-jit."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotSupportedError("FP4Tensor", "an NVFP4 tensor", "fp16 / bf16 tensors (NVFP4 is not implemented)",
                                "flashinfer_jit.utils.FP4Tensor")
