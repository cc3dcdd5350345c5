"""The wheel is complete: installed outside the source tree, it renders its own templates and builds a
kernel. Slow (builds a wheel, then one real nvcc build)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, requires_nvcc, run_loader, subprocess_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build the wheel from a copy of the sources (setuptools writes build/ next to them)."""
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "flashinfer_jit", src / "flashinfer_jit", ignore=ignore)
    shutil.copytree(REPO / "templates", src / "templates", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    dist = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = dist.glob("flashinfer_jit-*.whl")
    return wheel


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """`pip install --no-deps --target`: the package alone; torch comes from this interpreter."""
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return target


def test_wheel_ships_every_template_and_header(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in sorted((REPO / "templates").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            shipped = "flashinfer_jit/_templates/" + path.relative_to(REPO / "templates").as_posix()
            assert shipped in names, f"{shipped} is missing from {wheel.name}"


def test_wheel_declares_the_console_script(wheel):
    with zipfile.ZipFile(wheel) as zf:
        (entry_points,) = [n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt")]
        text = zf.read(entry_points).decode()
    assert "flashinfer-jit = flashinfer_jit.cli:main" in text


@requires_nvcc
def test_installed_copy_builds_a_kernel_from_its_own_templates(installed, tmp_path):
    outside = tmp_path / "elsewhere"  # cwd outside the repo: nothing can come from the checkout
    outside.mkdir()
    env = subprocess_env(PYTHONPATH=str(installed), FLASHINFER_JIT_CACHE_DIR=str(tmp_path / "cache"))
    report = run_loader("merge_state", "head_dim=64", "dtype=fp16", env=env, cwd=outside, timeout=300)
    assert report["package"] == str(installed / "flashinfer_jit")
    assert report["templates"] == str(installed / "flashinfer_jit" / "_templates")
    assert report["builds"] == 1
    ninja = (Path(report["entry"]) / "build.ninja").read_text()
    assert f"-I{installed / 'flashinfer_jit' / '_templates' / 'include'}" in ninja
    assert str(REPO / "templates") not in ninja


def test_installed_cli_runs(installed, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flashinfer_jit", "config", "--json"],
                          env=subprocess_env(PYTHONPATH=str(installed)), capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f'"location": "{installed / "flashinfer_jit"}"' in proc.stdout
