"""Shared test plumbing.

* Every test runs with its own empty cache root and without any FLASHINFER_JIT_* setting from the
  caller's shell, and with the toolchain memos cleared, so tests cannot see each other's state.
* Except `gpu` tests: they load kernels from the caller's cache (FLASHINFER_JIT_CACHE_DIR, warmed by
  benchmarks/run_device.sh) with the caller's environment, as they are, instead of rebuilding every
  kernel with nvcc into a fresh cache per test.
* `gpu` tests are skipped, with the reason, when torch sees no CUDA device (a module marks itself
  with `pytestmark = pytest.mark.gpu`; no skipif of its own is needed).
* tests/ is on sys.path, so test modules import `reference` and `conftest` (DEVICE, NAN) directly.
* `fake_nvcc` puts a stand-in compiler (tests/fakes/fake_nvcc.py) in front of the build: it makes
  real (tiny) object files quickly and can be told to sleep, fail or die mid-write.
* `--update-golden` rewrites tests/golden/* from the current templates instead of comparing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest


import torch  # noqa: E402

from flashinfer_jit import kernels, loader, toolchain  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
FAKES = TESTS / "fakes"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

# Shared by the GPU test modules.
DEVICE = torch.device("cuda")
NAN = float("nan")
# The backend= of the prefill wrappers and single_prefill in the GPU suites: "auto" (sm90 on Hopper for
# ragged K/V), or "fa2" / "sm90" to run the same tests on one kernel family (benchmarks/run_device.sh
# runs the ragged suite under both).
PREFILL_BACKEND = os.environ.get("FIJ_TEST_PREFILL_BACKEND", "auto")

# Settings that change keys, layers or build behaviour; tests start from none of them.
_ISOLATED_VARS = (
    "FLASHINFER_JIT_CACHE_DIR",
    "FLASHINFER_JIT_PREBUILT_DIRS",
    "FLASHINFER_JIT_DISABLE_BUILD",
    "FLASHINFER_JIT_ARCH",
    "FLASHINFER_JIT_NVCC",
    "FLASHINFER_JIT_EXTRA_CUDAFLAGS",
    "FLASHINFER_JIT_LOCK_TIMEOUT",
    "FLASHINFER_JIT_TRUSTED_ROOTS",
    "TORCH_CUDA_ARCH_LIST",
    "MAX_JOBS",
    "PYTORCH_NVCC",
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden", action="store_true", default=False,
        help="rewrite tests/golden/* from the current templates instead of comparing against them",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def clear_toolchain_memos() -> None:
    toolchain._resolve_cuda_home.cache_clear()
    toolchain._nvcc_version.cache_clear()
    toolchain._cxx_version.cache_clear()


@pytest.fixture(autouse=True)
def isolated(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path | None:
    """A private cache root per test; os.environ restored afterwards (a build sets CUDA_HOME).

    Tests marked `gpu` get none of this (None): they use the caller's cache and environment."""
    if request.node.get_closest_marker("gpu") is not None:
        yield None
        return
    saved = dict(os.environ)
    for name in _ISOLATED_VARS:
        monkeypatch.delenv(name, raising=False)
    root = tmp_path / "cache"
    monkeypatch.setenv("FLASHINFER_JIT_CACHE_DIR", str(root))
    clear_toolchain_memos()
    loader.clear_memo()
    kernels.clear_memo()
    yield root
    loader.clear_memo()
    kernels.clear_memo()
    clear_toolchain_memos()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def cache_root(isolated: Path) -> Path:
    """The (not yet created) writable cache root of this test."""
    return isolated


# ---- the fake compiler ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def fake_cuda_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory shaped like a CUDA toolkit whose bin/nvcc is tests/fakes/fake_nvcc.py.

    lib64/libcudart.so is an empty stub whose soname is its absolute path, so a library linked
    against it (torch adds -lcudart) loads without LD_LIBRARY_PATH and without a real CUDA.
    """
    home = tmp_path_factory.mktemp("fake-cuda")
    (home / "bin").mkdir()
    (home / "include").mkdir()
    (home / "lib64").mkdir()
    (home / "include" / "cuda_runtime.h").write_text("/* fake */\n")
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKES / "fake_nvcc.py"}" "$@"\n')
    nvcc.chmod(0o755)
    empty_c = home / "lib64" / "empty.c"
    empty_c.write_text("int fake_cudart(void) { return 0; }\n")
    cudart = home / "lib64" / "libcudart.so"
    subprocess.run(
        ["cc", "-shared", "-fPIC", f"-Wl,-soname,{cudart}", str(empty_c), "-o", str(cudart)], check=True
    )
    return home


@dataclass
class FakeNvcc:
    home: Path
    nvcc: Path
    counter: Path
    monkeypatch: pytest.MonkeyPatch

    def behave(self, *, sleep: float = 0, fail: str | None = None, die_mid_write: bool = False,
               version: str | None = None) -> None:
        """Set what the next compiles do (in this process and in subprocesses started after)."""
        settings = {
            "FAKE_NVCC_SLEEP": str(sleep),
            "FAKE_NVCC_FAIL": fail,
            "FAKE_NVCC_DIE_MID_WRITE": "1" if die_mid_write else None,
            "FAKE_NVCC_VERSION": version,
        }
        for name, value in settings.items():
            if value is None:
                self.monkeypatch.delenv(name, raising=False)
            else:
                self.monkeypatch.setenv(name, value)
        toolchain._nvcc_version.cache_clear()

    @property
    def compiles(self) -> int:
        """How many compiles (nvcc invocations other than --version) have started."""
        return len(self.counter.read_text().splitlines()) if self.counter.exists() else 0


@pytest.fixture
def fake_nvcc(fake_cuda_home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeNvcc:
    fake = FakeNvcc(fake_cuda_home, fake_cuda_home / "bin" / "nvcc", tmp_path / "compiles.txt", monkeypatch)
    monkeypatch.setenv("FLASHINFER_JIT_NVCC", str(fake.nvcc))
    monkeypatch.setenv("FAKE_NVCC_COUNTER", str(fake.counter))
    fake.behave()
    clear_toolchain_memos()
    return fake


# ---- subprocesses --------------------------------------------------------------------------------

def subprocess_env(**extra: str | None) -> dict[str, str]:
    """os.environ (with the test's settings) plus `extra`; a None value removes the variable.
    The repo goes first on PYTHONPATH so a subprocess imports this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["PYTHONWARNINGS"] = "ignore"
    for name, value in extra.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def load_in_subprocess_cmd(*args: str) -> list[str]:
    return [sys.executable, str(FAKES / "load_kernel.py"), *args]


def run_loader(*args: str, env: dict[str, str] | None = None, timeout: float = 120, cwd: Path | None = None) -> dict:
    """Run tests/fakes/load_kernel.py to completion and return its JSON report."""
    proc = subprocess.run(
        load_in_subprocess_cmd(*args), env=env or subprocess_env(), capture_output=True, text=True,
        timeout=timeout, cwd=cwd,
    )
    assert proc.returncode == 0, f"loader subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _real_nvcc() -> str | None:
    """`nvcc --version` of the toolkit this machine would build with, or None."""
    saved = os.environ.pop("FLASHINFER_JIT_NVCC", None)
    try:
        return toolchain.nvcc_version()
    finally:
        if saved is not None:
            os.environ["FLASHINFER_JIT_NVCC"] = saved
        clear_toolchain_memos()


REAL_NVCC = _real_nvcc()
requires_nvcc = pytest.mark.skipif(REAL_NVCC is None, reason="needs a CUDA toolkit (nvcc); none was found")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """flashinfer-jit's main() in this process: (exit code, stdout, stderr)."""
    from flashinfer_jit import cli
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def no_gpu(monkeypatch):
    """torch sees no CUDA device (the CLI's and the toolchain's arch and GPU lookups)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
