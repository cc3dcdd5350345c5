"""torch.library registration of the kernel ops and the C-ABI call plumbing.

Ops are registered once (namespace `flashinfer_jit`) with a CUDA implementation that resolves the
kernel library (memoized) and calls its exported C function on the current stream, and a fake
implementation for torch.compile tracing. Kernel launches go to the current stream, so they are
captured by CUDA graphs.
"""
from __future__ import annotations

import ctypes
from typing import Any, Callable

import torch

NAMESPACE = "flashinfer_jit"
_library = torch.library.Library(NAMESPACE, "DEF")

# C argument types used by the exported launchers.
PTR = ctypes.c_void_p
I64 = ctypes.c_int64
I32 = ctypes.c_int


class Op:
    """A registered op. Under torch.compile tracing calls go through the dispatcher (the op is opaque
    to the compiler, its fake implementation gives the metadata); in eager mode, CUDA graph capture
    included, they call the same implementation directly, saving the dispatcher's Python round trip
    on the launch path."""

    __slots__ = ("op", "impl")

    def __init__(self, op: Any, impl: Callable[..., Any]):
        self.op, self.impl = op, impl

    def __call__(self, *args: Any) -> Any:
        if torch.compiler.is_compiling():
            return self.op(*args)
        return self.impl(*args)


def define(schema: str, cuda_impl: Callable[..., Any], fake_impl: Callable[..., Any]) -> Op:
    """Define `flashinfer_jit::<schema>` with a CUDA kernel and a fake (meta) implementation."""
    name = schema.split("(", 1)[0]
    _library.define(schema)
    _library.impl(name, cuda_impl, "CUDA")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake_impl, lib=_library)
    return Op(getattr(getattr(torch.ops, NAMESPACE), name), cuda_impl)


def ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def stream_of(device: torch.device) -> int:
    """The raw current stream of `device` (what a capture records into)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _raw_stream(index)


def _current_stream_handle(index: int) -> int:
    return torch.cuda.current_stream(index).cuda_stream


# torch's raw-stream getter skips building a Stream object (a few µs per launch); fall back to the
# public API where it does not exist.
_raw_stream: Callable[[int], int] = getattr(torch._C, "_cuda_getCurrentRawStream", _current_stream_handle)


class device_guard:
    """Make `device` current for a launch (kernels run on the current device) and restore it."""

    __slots__ = ("index", "previous")

    def __init__(self, device: torch.device):
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self.previous = -1

    def __enter__(self) -> None:
        current = torch.cuda.current_device()
        if current != self.index:
            self.previous = current
            torch.cuda.set_device(self.index)

    def __exit__(self, *exc: object) -> None:
        if self.previous >= 0:
            torch.cuda.set_device(self.previous)
