"""The compiler side: where CUDA lives, which archs to target, which flags, and a fingerprint of it all.

Knows nothing about attention or the cache layout.
"""
from __future__ import annotations

import functools
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from . import env
from .errors import ToolchainNotFoundError
from .version import __version__

# Flags every kernel is built with. They are part of the cache key.
BASE_NVCC_FLAGS = (
    "-O3",
    "-std=c++17",
    "--use_fast_math",
    "--expt-relaxed-constexpr",
    "-lineinfo",
    "-Xptxas=-warn-spills",
    # Every kernel library defines the same template instantiations (paged NHD and HND share all of
    # them); with default visibility, GCC makes their function-local statics STB_GNU_UNIQUE and the
    # dynamic linker merges them across libraries even under RTLD_LOCAL, so one library's "shared
    # memory attribute set" flag skipped another's. Only the FIJ_EXPORT entry points are exported.
    "-Xcompiler=-fvisibility=hidden",
)
BASE_CXX_FLAGS = ("-O3", "-std=c++17", "-fvisibility=hidden")
DEFAULT_ARCH = "90a"
# Where a CUDA toolkit is looked for when neither CUDA_HOME nor PATH names one.
DEFAULT_CUDA_HOMES = ("/usr/local/cuda", "/opt/cuda")
# Rough peak resident memory of one nvcc job on our kernels; bounds parallel jobs.
NVCC_JOB_BYTES = 2 * 1024**3


def _is_cuda_home(path: Path) -> bool:
    nvcc = path / "bin" / "nvcc"
    return nvcc.is_file() and os.access(nvcc, os.X_OK) and (path / "include" / "cuda_runtime.h").is_file()


def _script_target(path: Path) -> Path | None:
    """If `path` is a shell wrapper that execs another nvcc, return the CUDA home it points to."""
    try:
        head = path.read_bytes()[:4096]
    except OSError:
        return None
    if head.startswith(b"\x7fELF"):
        return None
    for match in re.finditer(rb"(/[^\s\"'$]+)/bin/nvcc\b", head):
        candidate = Path(match.group(1).decode(errors="replace"))
        if _is_cuda_home(candidate):
            return candidate
    return None


@functools.lru_cache(maxsize=None)
def _resolve_cuda_home(cuda_home_env: str | None, nvcc_env: str | None, path_env: str | None) -> Path:
    searched: list[str] = []
    if nvcc_env:
        nvcc = Path(nvcc_env)
        home = nvcc.resolve().parent.parent
        if nvcc.is_file():
            return _script_target(nvcc.resolve()) or home
        searched.append(f"FLASHINFER_JIT_NVCC={nvcc_env} (no such file)")
    if cuda_home_env:
        if _is_cuda_home(Path(cuda_home_env)):
            return Path(cuda_home_env).resolve()
        searched.append(f"CUDA_HOME/CUDA_PATH={cuda_home_env} (no bin/nvcc and include/cuda_runtime.h there)")
    else:
        searched.append("CUDA_HOME/CUDA_PATH (unset)")
    on_path = shutil.which("nvcc", path=path_env)
    if on_path:
        real = Path(on_path).resolve()
        wrapped = _script_target(real)
        if wrapped:  # e.g. /usr/local/bin/nvcc = `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
            return wrapped.resolve()
        if _is_cuda_home(real.parent.parent):
            return real.parent.parent
        searched.append(f"nvcc on PATH: {on_path} (not inside a CUDA toolkit, nor a script that runs one)")
    else:
        searched.append(f"nvcc on PATH (not found; PATH={path_env or ''})")
    for default in DEFAULT_CUDA_HOMES:
        if _is_cuda_home(Path(default)):
            return Path(default).resolve()
        searched.append(f"{default} (not a CUDA toolkit)")
    raise ToolchainNotFoundError(
        "no CUDA toolkit (nvcc) found. Searched:\n"
        + "\n".join(f"  - {s}" for s in searched)
        + "\nInstall the CUDA toolkit, or set CUDA_HOME to its root (the folder holding bin/nvcc), "
        "or FLASHINFER_JIT_NVCC to the nvcc to use. To run only prebuilt kernels, set "
        "FLASHINFER_JIT_PREBUILT_DIRS.",
        searched,
    )


def cuda_home() -> Path:
    """The CUDA toolkit root, resolved through wrapper scripts and symlinks."""
    return _resolve_cuda_home(env.cuda_home(), env.nvcc_override(), env.search_path())


def nvcc_path() -> Path:
    override = env.nvcc_override()
    return Path(override) if override else cuda_home() / "bin" / "nvcc"


@functools.lru_cache(maxsize=None)
def _nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise ToolchainNotFoundError(f"`{nvcc} --version` failed: {out.stderr.strip()}", [nvcc])
    # "Cuda compilation tools, release 13.0, V13.0.88" + "Build cuda_13.0.r13.0/compiler.36424714_0"
    lines = [l.strip() for l in out.stdout.splitlines() if "release" in l or l.startswith("Build")]
    return " | ".join(lines) or out.stdout.strip()


def require_nvcc() -> str:
    """`nvcc --version` of the nvcc a build would use, or ToolchainNotFoundError saying why there is none."""
    nvcc = nvcc_path()  # without a toolkit this raises, listing everywhere it looked
    try:
        return _nvcc_version(str(nvcc))
    except OSError as exc:
        raise ToolchainNotFoundError(
            f"cannot run nvcc {nvcc}: {exc.strerror}. Set FLASHINFER_JIT_NVCC to a working nvcc, or unset it "
            f"and set CUDA_HOME to a CUDA toolkit.",
            [str(nvcc)],
        ) from None


def nvcc_version() -> str | None:
    """`nvcc --version` of the resolved nvcc; None when there is no toolkit (run-only deployments)."""
    try:
        return _nvcc_version(str(nvcc_path()))
    except (ToolchainNotFoundError, OSError):
        return None


@functools.lru_cache(maxsize=None)
def _cxx_version(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
    except OSError:
        return "unavailable"
    return out.stdout.splitlines()[0].strip() if out.stdout else "unavailable"


def host_compiler_version() -> str:
    return _cxx_version(env.host_cxx())


# A target arch list is one library holding code for every arch in it, however it is written: the
# archs are separated by commas, semicolons, spaces or '+' ("8.0;9.0a", "80,90a", "80 90a", "80+90a").
# `--arch`, FLASHINFER_JIT_ARCH and TORCH_CUDA_ARCH_LIST all read it this way (torch's meaning of
# TORCH_CUDA_ARCH_LIST); `flashinfer-jit prebuild` takes `--arch` once per separate build.
# An arch with the suffix +PTX ("9.0+PTX") also embeds PTX, which newer GPUs JIT-compile: the PTX of
# the plain compute capability (compute_90 for 9.0a: arch-specific PTX would run on no other GPU).
PTX_SUFFIX = "+PTX"


def normalize_arch(arch: str) -> str:
    """'9.0' / '9.0a' / 'sm_90a' / '90' -> '90a'; '8.0' -> '80'; '8.6+PTX' -> '86+PTX' (SASS and PTX).
    Hopper is always built as 90a (wgmma)."""
    text = arch.strip().lower()
    ptx = text.endswith("+ptx")
    text = text.removesuffix("+ptx").removeprefix("sm_").removeprefix("compute_")
    match = re.fullmatch(r"(\d+)\.?(\d)([af]?)", text)
    if not match:
        raise ValueError(f"cannot read CUDA arch {arch!r}; write it like 9.0a, 90a, sm_90a or 9.0+PTX")
    major, minor, suffix = match.groups()
    if major == "9" and minor == "0":
        suffix = "a"
    if int(major) < 8:
        raise ValueError(f"CUDA arch {arch!r} is not supported: flashinfer-jit needs sm_80 or newer")
    return f"{major}{minor}{suffix}" + (PTX_SUFFIX if ptx else "")


def split_ptx(arch: str) -> tuple[str, bool]:
    """'90a+PTX' -> ('90a', True); '80' -> ('80', False)."""
    return (arch[: -len(PTX_SUFFIX)], True) if arch.endswith(PTX_SUFFIX) else (arch, False)


def parse_arch_list(text: str) -> tuple[str, ...]:
    """One target: '8.0;9.0a', '80,90a', '80 90a', '80+90a', '9.0+PTX' -> the sorted, normalized archs of
    one library. An arch named with and without +PTX is kept once, with the PTX."""
    marked = re.sub(r"\+\s*ptx\b", "@PTX", str(text), flags=re.IGNORECASE)
    items = [t for t in re.split(r"[,;\s+]+", marked) if t]
    if not items:
        raise ValueError(f"no CUDA arch in {text!r}; write the archs like 8.0;9.0a or 80,90a")
    archs: dict[str, bool] = {}
    for item in items:
        base, ptx = split_ptx(normalize_arch(item.replace("@PTX", PTX_SUFFIX)))
        archs[base] = archs.get(base, False) or ptx
    return tuple(sorted(base + (PTX_SUFFIX if ptx else "") for base, ptx in archs.items()))


def target_archs() -> tuple[str, ...]:
    """The visible GPUs' archs; without a GPU FLASHINFER_JIT_ARCH, else TORCH_CUDA_ARCH_LIST, else 9.0a."""
    return resolve_target_archs()[0]


def resolve_target_archs() -> tuple[tuple[str, ...], str]:
    """The target archs and where they came from (`flashinfer-jit config` shows both)."""
    if torch.cuda.is_available():
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return tuple(sorted({normalize_arch(f"{ma}.{mi}") for ma, mi in caps})), "the visible GPUs"
    for name, text in (("FLASHINFER_JIT_ARCH", env.arch_override()), ("TORCH_CUDA_ARCH_LIST", env.torch_arch_list())):
        if text:
            try:
                return parse_arch_list(text), f"{name}={text}"
            except ValueError as exc:
                raise ValueError(f"{name}={text!r}: {exc}") from None
    return (DEFAULT_ARCH,), "default: no GPU visible, FLASHINFER_JIT_ARCH and TORCH_CUDA_ARCH_LIST unset"


def arch_tag(archs: tuple[str, ...]) -> str:
    return "_".join(archs)


def gencode_flags(archs: tuple[str, ...]) -> list[str]:
    """SASS for every arch; for an arch with +PTX also the PTX of its plain compute capability."""
    flags = []
    for arch in archs:
        base, ptx = split_ptx(arch)
        flags.append(f"-gencode=arch=compute_{base},code=sm_{base}")
        if ptx:
            virtual = base.rstrip("af")
            flags.append(f"-gencode=arch=compute_{virtual},code=compute_{virtual}")
    return flags


def nvcc_flags(archs: tuple[str, ...]) -> list[str]:
    return [*BASE_NVCC_FLAGS, *gencode_flags(archs), *env.extra_cuda_flags()]


def resolve_jobs(requested: int | None = None) -> tuple[int, str]:
    """Parallel compile jobs and where the number came from: `requested` (--jobs), else MAX_JOBS
    (torch's and ninja's convention), else the core count; always capped so that the nvccs fit in
    free memory (NVCC_JOB_BYTES each)."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"--jobs: expected a positive integer, got {requested!r}")
        jobs, source = requested, f"--jobs {requested}"
    else:
        explicit = env.max_jobs()
        if explicit is not None:
            jobs, source = explicit, f"MAX_JOBS={explicit}"
        else:
            jobs, source = os.cpu_count() or 1, "the core count"
    capped = memory_capped_jobs(jobs)
    if capped < jobs:
        source += f", capped from {jobs} by free memory (about {NVCC_JOB_BYTES // 1024**3} GiB per nvcc)"
    return capped, source


def build_jobs(num_sources: int) -> int:
    """ninja jobs for one library: MAX_JOBS, else the cores; never more than its sources, and capped
    so that parallel nvccs fit in free memory."""
    return max(1, min(resolve_jobs()[0], num_sources))


def memory_capped_jobs(jobs: int) -> int:
    """`jobs` parallel nvccs, fewer if that many (NVCC_JOB_BYTES each) do not fit in free memory;
    at least 1. Free memory unknown (no /proc/meminfo): `jobs` as given."""
    available = _available_memory()
    if available is not None:
        jobs = min(jobs, available // NVCC_JOB_BYTES)
    return max(1, jobs)


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def fingerprint(archs: tuple[str, ...]) -> dict[str, object]:
    """Everything outside the sources that changes the binary. No paths, no times."""
    return {
        "package_version": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "machine": platform.machine(),
        "nvcc": nvcc_version(),
        "host_cxx": host_compiler_version(),
        "archs": list(archs),
        "nvcc_flags": nvcc_flags(archs),
        "cxx_flags": list(BASE_CXX_FLAGS),
    }


# The fields a prebuilt binary must match to run here; the compiler versions may differ.
RUNTIME_FIELDS = ("package_version", "torch", "torch_cuda", "cxx11_abi", "python", "machine", "archs", "nvcc_flags", "cxx_flags")
