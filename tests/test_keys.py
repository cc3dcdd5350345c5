"""The cache key (loader.compute_key) covers everything that changes the binary, and nothing else.

A missed input serves a stale or wrong binary (an ABI-stale .so after a torch upgrade, an old
header after a same-version reinstall); an extra input (a path, a hash seed) rebuilds for nothing.
Changing one input at a time, the key must change; changing nothing, it must not.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REAL_NVCC, clear_toolchain_memos, requires_nvcc, subprocess_env
from flashinfer_jit import codegen, loader, spec, toolchain

BASE = spec.MergeStateSpec(head_dim=128, dtype="bf16")
REAL_NVCC_VERSION = toolchain.nvcc_version


@pytest.fixture(autouse=True)
def fixed_nvcc_version(monkeypatch):
    """Keys without running nvcc (and the same on machines with and without a toolkit)."""
    monkeypatch.setattr(toolchain, "nvcc_version", lambda: "Cuda compilation tools, release 13.0, V13.0.88")


def key(s: spec.KernelSpec = BASE, archs: tuple[str, ...] | None = None) -> str:
    return loader.compute_key(s, archs).key


def _families_with_templates():
    # Every family's templates must exist: a missing one fails the render, it is not skipped.
    for family, cls in spec.FAMILIES.items():
        yield pytest.param(cls, id=family)


def test_same_inputs_same_key():
    assert key() == key()
    assert loader.compute_key(BASE).runtime_key == loader.compute_key(BASE).runtime_key


@pytest.mark.parametrize("cls", list(_families_with_templates()))
def test_every_spec_field_changes_the_key(cls):
    base = next(iter(cls.supported()))
    derived = [f.name for f in dataclasses.fields(cls) if "derive" in f.metadata]
    for f in dataclasses.fields(cls):
        # a code field (a user variant): two snippets that differ by one character, and their parameters
        choices = f.metadata["choices"] if "code" not in f.metadata else (
            spec.CustomVariant("v", score_mod="score * 2.f"), spec.CustomVariant("v", score_mod="score * 3.f"),
            spec.CustomVariant("v", score_mod="score * 2.f", scalars=("a",)),
            spec.CustomVariant("v", mask_mod="kv_idx <= q_pos"), spec.CustomVariant("w", mask_mod="kv_idx <= q_pos"))
        keys = set()
        for other in choices:
            if other == getattr(base, f.name):
                continue
            if f.name in derived:
                try:
                    changed = dataclasses.replace(base, **{f.name: other})
                except ValueError:
                    continue  # a tile shape the base's backend does not run
            else:  # tile shapes re-derived for the new value (the sm90 backend has its own)
                changed = dataclasses.replace(base, **{f.name: other}, **{d: None for d in derived})
            assert key(changed) != key(base), f"{cls.__name__}.{f.name}: {getattr(base, f.name)} -> {other}"
            keys.add(key(changed))
        assert len(keys) == len([c for c in choices if c != getattr(base, f.name)]), f"{cls.__name__}.{f.name}"


@pytest.fixture
def template_copy(monkeypatch, tmp_path) -> Path:
    """A private copy of templates/ that the code under test renders from."""
    copy = tmp_path / "templates"
    shutil.copytree(codegen.templates_dir(), copy)
    monkeypatch.setattr(codegen, "templates_dir", lambda: copy)
    return copy


def _edit_keeping_mtime(path: Path, old: bytes, new: bytes) -> None:
    st = path.stat()
    data = path.read_bytes()
    assert old in data
    path.write_bytes(data.replace(old, new, 1))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # as a reinstall/checkout may leave it


def test_template_byte_changes_the_key(template_copy):
    before = key()  # renders (and lets jinja cache) the original template first
    _edit_keeping_mtime(template_copy / "merge_state.cu.jinja", b"Do not edit.", b"Do not edit!")
    assert key() != before


def test_header_byte_with_old_mtime_changes_the_key(template_copy):
    before = key()
    header = template_copy / "include" / "flashinfer_jit" / "merge_state.cuh"
    _edit_keeping_mtime(header, b"#pragma once", b"#pragma  once")
    assert key() != before


@pytest.mark.parametrize(
    "component, patch",
    [
        ("nvcc version", lambda mp: mp.setattr(toolchain, "nvcc_version", lambda: "Cuda compilation tools, release 13.1, V13.1.0")),
        ("torch version", lambda mp: mp.setattr(torch, "__version__", "2.99.0+cu130")),
        ("torch CUDA version", lambda mp: mp.setattr(torch.version, "cuda", "12.8")),
        ("cxx11 abi", lambda mp: mp.setattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", not torch._C._GLIBCXX_USE_CXX11_ABI)),
        ("arch list (FLASHINFER_JIT_ARCH)", lambda mp: mp.setenv("FLASHINFER_JIT_ARCH", "80")),
        ("arch list (TORCH_CUDA_ARCH_LIST)", lambda mp: mp.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")),
        ("extra nvcc flags", lambda mp: mp.setenv("FLASHINFER_JIT_EXTRA_CUDAFLAGS", "-DFIJ_DEBUG=1")),
        ("package version", lambda mp: mp.setattr(toolchain, "__version__", "0.1.1")),
        ("host compiler", lambda mp: mp.setattr(toolchain, "host_compiler_version", lambda: "c++ (GCC) 99.0")),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_toolchain_component_changes_the_key(monkeypatch, component, patch):
    before = loader.compute_key(BASE)
    patch(monkeypatch)
    after = loader.compute_key(BASE)
    assert after.key != before.key, component


@pytest.mark.parametrize(
    "component, patch",
    [
        ("torch version", lambda mp: mp.setattr(torch, "__version__", "2.99.0+cu130")),
        ("arch list", lambda mp: mp.setenv("FLASHINFER_JIT_ARCH", "80")),
        ("extra nvcc flags", lambda mp: mp.setenv("FLASHINFER_JIT_EXTRA_CUDAFLAGS", "-DFIJ_DEBUG=1")),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_runtime_key_tracks_what_a_prebuilt_binary_must_match(monkeypatch, component, patch):
    """The runtime key (used when no compiler is installed) ignores compiler versions only."""
    before = loader.compute_key(BASE)
    patch(monkeypatch)
    assert loader.compute_key(BASE).runtime_key != before.runtime_key, component


def test_runtime_key_ignores_the_compiler_version(monkeypatch):
    before = loader.compute_key(BASE)
    monkeypatch.setattr(toolchain, "nvcc_version", lambda: None)
    after = loader.compute_key(BASE)
    assert after.key != before.key
    assert after.runtime_key == before.runtime_key


def test_arch_order_and_spelling_are_irrelevant(monkeypatch):
    monkeypatch.setenv("FLASHINFER_JIT_ARCH", "90a,80")
    a = key()
    monkeypatch.setenv("FLASHINFER_JIT_ARCH", "sm_80;9.0")
    assert key() == a
    assert key(archs=("80", "90a")) == a


def _key_in_subprocess(hash_seed: str, templates: Path) -> str:
    code = (
        "import pathlib, sys\n"
        "from flashinfer_jit import codegen, loader, spec, toolchain\n"
        "codegen.templates_dir = lambda: pathlib.Path(sys.argv[1])\n"
        "toolchain.nvcc_version = lambda: 'Cuda compilation tools, release 13.0, V13.0.88'\n"
        "print(loader.compute_key(spec.MergeStateSpec(128, 'bf16')).key)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(templates)], env=subprocess_env(PYTHONHASHSEED=hash_seed),
                         capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.strip()


def test_key_is_the_same_in_processes_with_different_hash_seeds(template_copy):
    # A private template copy: a concurrent edit of templates/ must not make this flaky.
    keys = {_key_in_subprocess(seed, template_copy) for seed in ("0", "1", "12345")}
    assert keys == {key()}


@requires_nvcc
def test_key_has_no_paths_cuda_home_through_a_symlink_gives_the_same_key(monkeypatch, tmp_path):
    # the real `nvcc --version`, read through each spelling of CUDA_HOME
    monkeypatch.setattr(toolchain, "nvcc_version", REAL_NVCC_VERSION)
    real = toolchain.cuda_home()
    link = tmp_path / "cuda-link"
    link.symlink_to(real)

    monkeypatch.setenv("CUDA_HOME", str(real))
    clear_toolchain_memos()
    direct = loader.compute_key(BASE)
    monkeypatch.setenv("CUDA_HOME", str(link))
    clear_toolchain_memos()
    via_link = loader.compute_key(BASE)

    assert direct.fingerprint["nvcc"] == REAL_NVCC
    assert via_link.key == direct.key
    text = json.dumps({"spec": BASE.to_dict(), "toolchain": direct.fingerprint})
    for path in (str(real), str(link), str(codegen.templates_dir()), str(Path.home()), os.getcwd()):
        assert path not in text
    assert '"/' not in text, text  # no absolute path of any kind
