"""tests/conftest.py's `isolated` fixture: a private cache for every test, except those marked `gpu`,
which keep the caller's cache (benchmarks/run_device.sh warms it) and environment. Checked in a
pytest subprocess that pretends a GPU is visible, so its gpu test is not skipped."""
from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import subprocess_env

PROBE = '''
import os

import pytest
import torch

torch.cuda.is_available = lambda: True  # before conftest's collection hook looks

CALLER = os.environ["FLASHINFER_JIT_CACHE_DIR"]


def test_cpu_gets_a_private_cache(isolated):
    assert isolated is not None and os.environ["FLASHINFER_JIT_CACHE_DIR"] == str(isolated) != CALLER
    assert "FLASHINFER_JIT_ARCH" not in os.environ


@pytest.mark.gpu
def test_gpu_keeps_the_callers_cache(isolated):
    assert isolated is None and os.environ["FLASHINFER_JIT_CACHE_DIR"] == CALLER
    assert os.environ["FLASHINFER_JIT_ARCH"] == "80"


def test_cpu_after_gpu_is_isolated_again():
    assert os.environ["FLASHINFER_JIT_CACHE_DIR"] != CALLER
'''


def test_gpu_tests_keep_the_callers_cache(tmp_path: Path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_probe.py").write_text(textwrap.dedent(PROBE))
    caller_cache = tmp_path / "warm-cache"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env=subprocess_env(FLASHINFER_JIT_CACHE_DIR=str(caller_cache), FLASHINFER_JIT_ARCH="80"),
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "3 passed" in proc.stdout, proc.stdout[-2000:]
    assert not caller_cache.exists()
