"""Typed exceptions. Each carries the objects it talks about as attributes, not only as text."""
from __future__ import annotations

from pathlib import Path
from typing import Any


class FlashInferJITError(Exception):
    """Base class of every error this package raises on purpose."""


class ToolchainNotFoundError(FlashInferJITError):
    """No usable nvcc / CUDA toolkit was found. `searched` lists every place that was tried."""

    def __init__(self, message: str, searched: list[str]):
        super().__init__(message)
        self.searched = searched


class KernelCompileError(FlashInferJITError):
    """nvcc (or the link) failed. The generated sources and the full log are kept on disk."""

    def __init__(self, uri: str, source_dir: Path, log_path: Path, tail: str):
        self.uri = uri
        self.source_dir = Path(source_dir)
        self.log_path = Path(log_path)
        self.tail = tail
        super().__init__(
            f"building kernel '{uri}' failed.\n"
            f"  generated sources: {self.source_dir}\n"
            f"  full build log:    {self.log_path}\n"
            f"--- compiler output (last lines) ---\n{tail}"
        )


class VariantCompileError(KernelCompileError):
    """A user-defined attention variant's snippet (flashinfer_jit.AttentionVariant score_mod / mask_mod)
    does not compile: names the variant, the snippet, its line and the compiler's message, and quotes
    the line. Still a KernelCompileError (generated sources and log kept)."""

    def __init__(self, variant: str, snippet: str, line: int, message: str, text: str, cause: KernelCompileError):
        self.variant, self.snippet, self.line, self.message, self.text = variant, snippet, line, message, text
        self.uri, self.source_dir, self.log_path, self.tail = cause.uri, cause.source_dir, cause.log_path, cause.tail
        FlashInferJITError.__init__(
            self,
            f"attention variant '{variant}': its {snippet} does not compile: line {line}: {message}\n"
            f"  {snippet} line {line}: {text.strip()}\n"
            f"  generated sources: {self.source_dir}\n"
            f"  full build log:    {self.log_path}")


class BuildLockTimeout(FlashInferJITError):
    """Another process held the build lock of a kernel for longer than the timeout."""

    def __init__(self, lock_path: Path, timeout: float, holder: str | None):
        self.lock_path = Path(lock_path)
        self.timeout = timeout
        who = f" (held by {holder})" if holder else ""
        super().__init__(
            f"waited {timeout:.0f} s for the build lock {self.lock_path}{who}. Another process is still "
            f"building this kernel. Raise FLASHINFER_JIT_LOCK_TIMEOUT to wait longer. A lock of a "
            f"killed process is released by the OS, so a stuck lock means a live builder."
        )


class MissingKernelError(FlashInferJITError):
    """FLASHINFER_JIT_DISABLE_BUILD is set and no cache layer holds the kernel."""

    def __init__(self, uri: str, key: str, layers: list[str], prebuild_command: str):
        self.uri = uri
        self.key = key
        self.layers = layers
        self.prebuild_command = prebuild_command
        searched = "\n".join(f"  - {layer}" for layer in layers) or "  (none)"
        super().__init__(
            f"kernel '{uri}' (key {key[:16]}) is not in any cache layer and building is disabled "
            f"(FLASHINFER_JIT_DISABLE_BUILD=1).\nLayers searched:\n{searched}\n"
            f"Add it with:\n  {prebuild_command}"
        )


class CacheIntegrityError(FlashInferJITError):
    """A cached kernel failed its checksum again right after a rebuild."""

    def __init__(self, message: str, path: Path):
        super().__init__(message)
        self.path = Path(path)


class CacheSecurityError(FlashInferJITError):
    """A cache path could be written by someone else; loading a .so from it would run their code."""

    def __init__(self, message: str, path: Path):
        super().__init__(message)
        self.path = Path(path)


class CacheWriteError(FlashInferJITError):
    """The writable cache could not take a new kernel (disk full, quota, read-only filesystem).
    Nothing was published: the half-written build was removed, and the next call starts over."""

    def __init__(self, message: str, path: Path, errno: int | None = None):
        super().__init__(message)
        self.path = Path(path)
        self.errno = errno


class KernelLoadError(FlashInferJITError):
    """A built .so could not be loaded (dlopen failed)."""

    def __init__(self, message: str, path: Path):
        super().__init__(message)
        self.path = Path(path)


class KernelLaunchError(FlashInferJITError):
    """A kernel launch returned a CUDA error."""


def describe(value: Any) -> str:
    """Short text for a value in an error message (tensors by dtype/shape/device)."""
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        return f"Tensor(dtype={value.dtype}, shape={tuple(value.shape)}, device={value.device})"
    return repr(value)


class NotSupportedError(FlashInferJITError, ValueError):
    """A FlashInfer parameter was given a value for a feature flashinfer-jit does not have (yet).

    Raised before any kernel launch, never instead of a result: `parameter` and `value` name what was
    asked for, `supported` what works today."""

    def __init__(self, parameter: str, value: Any, supported: str, where: str = ""):
        self.parameter, self.value, self.supported = parameter, value, supported
        prefix = f"{where}: " if where else ""
        super().__init__(f"{prefix}{parameter}={value!r} is not supported by flashinfer-jit; supported: {supported}")
