"""Every environment variable the package reads or sets, in one place, read lazily (tests change them).

No other module touches os.environ (tests/test_env.py checks this).

| variable                          | meaning                                                          |
|-----------------------------------|------------------------------------------------------------------|
| FLASHINFER_JIT_CACHE_DIR          | writable cache root (else $XDG_CACHE_HOME/flashinfer-jit, else ~/.cache/flashinfer-jit) |
| FLASHINFER_JIT_PREBUILT_DIRS      | read-only cache layers searched first (os.pathsep separated)     |
| FLASHINFER_JIT_DISABLE_BUILD      | 1: never compile; a kernel missing from every layer is an error  |
| FLASHINFER_JIT_ARCH               | target archs without a GPU, e.g. "9.0a", "80,90a", "8.0;9.0+PTX": one library for all |
| TORCH_CUDA_ARCH_LIST              | used when FLASHINFER_JIT_ARCH is unset and no GPU is visible; same syntax |
| FLASHINFER_JIT_NVCC               | the nvcc to build with (else $CUDA_HOME/bin/nvcc, resolved)      |
| FLASHINFER_JIT_EXTRA_CUDAFLAGS    | extra nvcc flags (shell syntax); part of the cache key           |
| FLASHINFER_JIT_LOCK_TIMEOUT       | seconds to wait for another process's build (default 900)        |
| FLASHINFER_JIT_ROPE_PREROTATE_K   | 0: sm90 ragged fused-RoPE plans rotate K in the kernel, per q tile (default 1: once per run, into a copy; read by plan()) |
| FLASHINFER_JIT_PAGED_VIA_RAGGED   | 1: sm90 paged NHD 16-bit plans gather the batch's K (rotated, with fused RoPE) and V into ragged copies each run and launch the ragged kernel (default 0, experimental: not yet run on a GPU; read by plan()) |
| FLASHINFER_JIT_SPLIT_CTAS_PER_SM  | split-KV target: resident CTAs per SM the planner fills (default 1; capped by occupancy; experimental, read by plan()) |
| FLASHINFER_JIT_TRUSTED_ROOTS      | shared team caches: skip the owner/mode checks, root may be a symlink |
| MAX_JOBS                          | parallel compile jobs (--jobs wins; default: cores; capped by free memory) |
| CUDA_HOME, else CUDA_PATH         | the CUDA toolkit root, when FLASHINFER_JIT_NVCC is unset         |
| PATH                              | searched for nvcc when neither of those names a toolkit          |
| CXX                               | the host compiler whose version is in the fingerprint (default c++) |

Set for torch's cpp_extension around a build (`overridden`, then restored): MAX_JOBS, CUDA_HOME and
PYTORCH_NVCC (from FLASHINFER_JIT_NVCC); CUDA_HOME is also given a default (`set_default`) before
torch.utils.cpp_extension is first imported, since it reads CUDA_HOME at import.
"""
from __future__ import annotations

import contextlib
import os
import shlex
from pathlib import Path
from typing import Iterator, Mapping


def _get(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else None


def _flag(name: str, default: bool = False) -> bool:
    value = (_get(name) or ("1" if default else "0")).strip().lower()
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


def rope_prerotate_keys() -> bool:
    return _flag("FLASHINFER_JIT_ROPE_PREROTATE_K", default=True)


def paged_via_ragged() -> bool:
    return _flag("FLASHINFER_JIT_PAGED_VIA_RAGGED")


def split_ctas_per_sm() -> int:
    raw = _get("FLASHINFER_JIT_SPLIT_CTAS_PER_SM") or "1"
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"FLASHINFER_JIT_SPLIT_CTAS_PER_SM={raw!r}: expected a positive integer")
    return value


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


def cuda_home() -> str | None:
    """CUDA_HOME, else CUDA_PATH (unset or empty: None)."""
    return _get("CUDA_HOME") or _get("CUDA_PATH")


def search_path() -> str | None:
    """PATH as it is (nvcc is looked up on it)."""
    return os.environ.get("PATH")


def host_cxx() -> str:
    """The host C++ compiler torch's build uses: CXX, else c++."""
    return os.environ.get("CXX", "c++")


def set_default(name: str, value: str) -> None:
    """Set `name` to `value` unless it is already set (os.environ.setdefault)."""
    os.environ.setdefault(name, value)


@contextlib.contextmanager
def overridden(updates: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore them (an unset one is
    unset again)."""
    saved = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
