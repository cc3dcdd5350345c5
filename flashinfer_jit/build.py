"""Sources -> shared library, through torch.utils.cpp_extension (ninja + nvcc).

Knows nothing about attention or the cache layout: it builds in the directory it is given and
reports the compiler's output on failure.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from . import env, toolchain
from .codegen import include_dir
from .errors import KernelCompileError

logger = logging.getLogger("flashinfer_jit")

LOG_TAIL_LINES = 40


@dataclass(frozen=True)
class BuildResult:
    library: Path
    seconds: float
    log: Path


def build_environment(jobs: int) -> dict[str, str]:
    """The variables torch's loader reads during a build: ninja's job count, the resolved CUDA home,
    and the nvcc to run (FLASHINFER_JIT_NVCC, through torch's PYTORCH_NVCC)."""
    updates = {"MAX_JOBS": str(jobs), "CUDA_HOME": str(toolchain.cuda_home())}
    nvcc = env.nvcc_override()
    if nvcc:
        updates["PYTORCH_NVCC"] = nvcc
    return updates


def _cpp_extension():
    """Import torch's loader with CUDA_HOME already resolved: at import it guesses from the nvcc on
    PATH, which is wrong when that nvcc is a wrapper script (the link then fails)."""
    home = str(toolchain.cuda_home())
    env.set_default("CUDA_HOME", home)
    # torch warns "No CUDA runtime is found" at import on GPU-less build machines: expected here.
    torch_logger = logging.getLogger("torch.utils.cpp_extension")
    level = torch_logger.level
    torch_logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        torch_logger.setLevel(level)

    cpp_extension.CUDA_HOME = home
    return cpp_extension


def build_library(name: str, sources: dict[str, str], build_dir: Path, archs: tuple[str, ...]) -> BuildResult:
    """Write `sources` under build_dir/src and compile them into build_dir/<name>.so."""
    cpp_extension = _cpp_extension()
    src_dir = build_dir / "src"
    src_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for file_name, text in sources.items():
        path = src_dir / file_name
        path.write_text(text)
        paths.append(str(path))
    log_path = build_dir / "build.log"
    env_updates = build_environment(toolchain.build_jobs(len(paths)))
    start = time.perf_counter()
    try:
        with env.overridden(env_updates):
            cpp_extension.load(
                name=name,
                sources=paths,
                extra_cflags=list(toolchain.BASE_CXX_FLAGS),
                extra_cuda_cflags=toolchain.nvcc_flags(archs),
                extra_include_paths=[str(include_dir())],
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=False,
            )
    except (RuntimeError, OSError) as exc:
        output = str(exc)
        log_path.write_text(output)
        tail = "\n".join(output.splitlines()[-LOG_TAIL_LINES:])
        raise KernelCompileError(name, src_dir, log_path, tail) from None
    seconds = time.perf_counter() - start
    ninja_file = build_dir / "build.ninja"
    log_path.write_text(
        f"built {name} in {seconds:.2f} s with {env_updates['MAX_JOBS']} job(s)\n\n"
        + (ninja_file.read_text() if ninja_file.exists() else "")
    )
    # torch names a rebuild of the same name in one process `<name>_v<N>.so`.
    libraries = sorted(build_dir.glob(f"{name}*.so"))
    if not libraries:
        raise KernelCompileError(name, src_dir, log_path, f"the build reported success but no {name}*.so is in {build_dir}")
    return BuildResult(library=libraries[-1], seconds=seconds, log=log_path)
