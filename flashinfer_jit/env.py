"""Every environment variable the package reads, in one place, read lazily (tests change them).

| variable                          | meaning                                                          |
|-----------------------------------|------------------------------------------------------------------|
| FLASHINFER_JIT_CACHE_DIR          | writable cache root (else $XDG_CACHE_HOME/flashinfer-jit, else ~/.cache/flashinfer-jit) |
| FLASHINFER_JIT_PREBUILT_DIRS      | read-only cache layers searched first (os.pathsep separated)     |
| FLASHINFER_JIT_DISABLE_BUILD      | 1: never compile; a kernel missing from every layer is an error  |
| FLASHINFER_JIT_ARCH               | target archs without a GPU, e.g. "9.0a" or "80,90a"              |
| TORCH_CUDA_ARCH_LIST              | used when FLASHINFER_JIT_ARCH is unset and no GPU is visible     |
| FLASHINFER_JIT_NVCC               | the nvcc to build with (else $CUDA_HOME/bin/nvcc, resolved)      |
| FLASHINFER_JIT_EXTRA_CUDAFLAGS    | extra nvcc flags (shell syntax); part of the cache key           |
| FLASHINFER_JIT_LOCK_TIMEOUT       | seconds to wait for another process's build (default 900)        |
| FLASHINFER_JIT_TRUSTED_ROOTS      | shared team caches: skip the owner/mode checks, root may be a symlink |
| MAX_JOBS                          | parallel compile jobs (default: cores, capped by free memory)    |
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path


def _get(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else None


def _flag(name: str) -> bool:
    value = (_get(name) or "0").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={value!r}: expected 1/0, true/false, yes/no or on/off")


def _paths(name: str) -> list[Path]:
    return [Path(p).expanduser() for p in (_get(name) or "").split(os.pathsep) if p]


def cache_dir() -> Path:
    explicit = _get("FLASHINFER_JIT_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser().absolute()
    xdg = _get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "flashinfer-jit").absolute()


def prebuilt_dirs() -> list[Path]:
    return [p.absolute() for p in _paths("FLASHINFER_JIT_PREBUILT_DIRS")]


def trusted_roots() -> list[Path]:
    return [p.absolute() for p in _paths("FLASHINFER_JIT_TRUSTED_ROOTS")]


def build_disabled() -> bool:
    return _flag("FLASHINFER_JIT_DISABLE_BUILD")


def arch_override() -> str | None:
    return _get("FLASHINFER_JIT_ARCH")


def torch_arch_list() -> str | None:
    return _get("TORCH_CUDA_ARCH_LIST")


def nvcc_override() -> str | None:
    return _get("FLASHINFER_JIT_NVCC")


def extra_cuda_flags() -> list[str]:
    return shlex.split(_get("FLASHINFER_JIT_EXTRA_CUDAFLAGS") or "")


def lock_timeout() -> float:
    raw = _get("FLASHINFER_JIT_LOCK_TIMEOUT") or "900"
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"FLASHINFER_JIT_LOCK_TIMEOUT={raw!r}: expected a number of seconds") from None


def max_jobs() -> int | None:
    raw = _get("MAX_JOBS")
    if raw is None:
        return None
    try:
        jobs = int(raw)
    except ValueError:
        raise ValueError(f"MAX_JOBS={raw!r}: expected a positive integer") from None
    if jobs < 1:
        raise ValueError(f"MAX_JOBS={raw!r}: expected a positive integer")
    return jobs
