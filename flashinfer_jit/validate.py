"""Input checks shared by the ops and wrappers. Every failure names the argument, what was
expected and what was found, and is raised before any kernel launch. None of these read tensor
data, so none of them synchronizes the device."""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from .errors import describe
from .spec import DTYPES, HEAD_DIMS

ATTENTION_DTYPES = tuple(t for t, _ in DTYPES.values())


def _fail(name: str, expected: str, value: object, exc: type[Exception] = ValueError) -> None:
    raise exc(f"{name}: expected {expected}, got {describe(value)}")


def tensor(
    name: str,
    value: object,
    *,
    dtypes: Iterable[torch.dtype] | None = None,
    ndim: int | None = None,
    shape: Sequence[int | None] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        _fail(name, "a torch.Tensor", value, TypeError)
    assert isinstance(value, torch.Tensor)
    if dtypes is not None:
        allowed = tuple(dtypes)
        if value.dtype not in allowed:
            _fail(name, f"dtype {' or '.join(str(d) for d in allowed)}", value, TypeError)
    if ndim is not None and value.dim() != ndim:
        _fail(name, f"a {ndim}-D tensor", value)
    if shape is not None:
        if value.dim() != len(shape) or any(s is not None and s != v for s, v in zip(shape, value.shape)):
            pretty = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            _fail(name, f"shape {pretty}", value)
    if device is not None and value.device != device:
        _fail(name, f"a tensor on {device} (the same device as the other inputs)", value)
    return value


def cuda_tensor(name: str, value: object, **kw: object) -> torch.Tensor:
    t = tensor(name, value, **kw)  # type: ignore[arg-type]
    if t.device.type != "cuda":
        _fail(name, "a CUDA tensor", t)
    return t


def head_dim(name: str, value: int) -> int:
    if value not in HEAD_DIMS:
        raise ValueError(
            f"{name}={value} is not supported; supported head dims: {', '.join(map(str, HEAD_DIMS))}"
        )
    return value


def vector_rows(name: str, t: torch.Tensor) -> None:
    """The last dim is contiguous and every row starts 16-byte aligned (kernels use 16-byte access)."""
    if t.stride(-1) != 1:
        _fail(name, "a contiguous last dimension (stride(-1) == 1); call .contiguous()", t)
    elem = t.element_size()
    # Under torch.compile tracing there is no data pointer: the op implementations re-check the
    # pointers at run time (aligned_pointers).
    pointer_misaligned = not torch.compiler.is_compiling() and t.data_ptr() % 16 != 0
    if pointer_misaligned or any((s * elem) % 16 for s in t.stride()[:-1]):
        _fail(name, f"16-byte aligned rows (data_ptr and strides multiples of {16 // elem} elements)", t)


def aligned_pointers(op: str, *tensors: "torch.Tensor | None") -> None:
    """Run-time guard inside the ops (also reached from torch.compile'd code): 16-byte aligned data."""
    bits = 0
    for t in tensors:
        if t is not None:
            bits |= t.data_ptr()
    if bits % 16:
        bad = [describe(t) for t in tensors if t is not None and t.data_ptr() % 16]
        raise ValueError(f"{op}: tensors must start at 16-byte aligned addresses; misaligned: {', '.join(bad)}")


def workspace_buffer(name: str, value: object, *, device_check: bool = True) -> int:
    """A workspace buffer, used as raw bytes as FlashInfer does: any dtype and shape (uint8, int8, ...),
    contiguous, 16-byte aligned and (unless device_check=False: the constructors defer it to plan(),
    after the host-side checks, so that the first error names the root cause) on a CUDA device.
    Returns its size in bytes (numel * element_size)."""
    t = cuda_tensor(name, value) if device_check else tensor(name, value)
    if not t.is_contiguous():
        _fail(name, "a contiguous tensor (the workspace is used as raw bytes)", t)
    if t.data_ptr() % 16:
        _fail(name, "a 16-byte aligned data_ptr", t)
    return t.numel() * t.element_size()
