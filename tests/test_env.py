"""env.py is the package's only door to the environment: no other module of flashinfer_jit reads or
writes os.environ (checked over the source), and the readers and the set-then-restore block that
the build and the toolchain resolution go through behave as before."""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from flashinfer_jit import build, env, toolchain

PACKAGE = Path(env.__file__).resolve().parent
# os attributes that read or change the process environment.
_ENVIRON_NAMES = {"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"}


def environment_accesses(path: Path) -> list[str]:
    """`file:line: code` for every use of os.environ / os.getenv / ... (also `from os import environ`)."""
    text = path.read_text()
    found = []
    for node in ast.walk(ast.parse(text, str(path))):
        if isinstance(node, ast.Attribute) and node.attr in _ENVIRON_NAMES:
            found.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "os" and any(
                alias.name in _ENVIRON_NAMES for alias in node.names):
            found.append(node.lineno)
    lines = text.splitlines()
    return [f"{path.relative_to(PACKAGE.parent)}:{n}: {lines[n - 1].strip()}" for n in sorted(set(found))]


def test_only_env_py_touches_the_environment():
    sources = sorted(PACKAGE.rglob("*.py"))
    assert PACKAGE / "env.py" in sources and len(sources) > 5
    assert environment_accesses(PACKAGE / "env.py"), "the scan finds nothing even in env.py: it is broken"
    offenders = [hit for path in sources if path.name != "env.py" or path.parent != PACKAGE
                 for hit in environment_accesses(path)]
    assert not offenders, ("environment variables are read or set outside flashinfer_jit/env.py; add a "
                           "function there and call it:\n" + "\n".join(offenders))


def test_overridden_sets_then_restores(monkeypatch):
    monkeypatch.setenv("FIJ_TEST_SET", "before")
    monkeypatch.delenv("FIJ_TEST_UNSET", raising=False)
    with env.overridden({"FIJ_TEST_SET": "during", "FIJ_TEST_UNSET": "during"}):
        assert os.environ["FIJ_TEST_SET"] == "during" and os.environ["FIJ_TEST_UNSET"] == "during"
    assert os.environ["FIJ_TEST_SET"] == "before" and "FIJ_TEST_UNSET" not in os.environ

    with pytest.raises(RuntimeError, match="boom"):
        with env.overridden({"FIJ_TEST_SET": "during", "FIJ_TEST_UNSET": "during"}):
            raise RuntimeError("boom")
    assert os.environ["FIJ_TEST_SET"] == "before" and "FIJ_TEST_UNSET" not in os.environ


def test_set_default_keeps_a_value_already_set(monkeypatch):
    monkeypatch.delenv("FIJ_TEST_DEFAULT", raising=False)
    env.set_default("FIJ_TEST_DEFAULT", "first")
    env.set_default("FIJ_TEST_DEFAULT", "second")
    assert os.environ["FIJ_TEST_DEFAULT"] == "first"
    monkeypatch.delenv("FIJ_TEST_DEFAULT")


def test_toolchain_variables(monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    assert env.cuda_home() is None
    monkeypatch.setenv("CUDA_PATH", "/opt/cuda-path")
    assert env.cuda_home() == "/opt/cuda-path"
    monkeypatch.setenv("CUDA_HOME", "")  # empty is unset: CUDA_PATH still counts
    assert env.cuda_home() == "/opt/cuda-path"
    monkeypatch.setenv("CUDA_HOME", "/opt/cuda-home")
    assert env.cuda_home() == "/opt/cuda-home"

    monkeypatch.setenv("PATH", "/a:/b")
    assert env.search_path() == "/a:/b"
    monkeypatch.delenv("CXX", raising=False)
    assert env.host_cxx() == "c++"
    monkeypatch.setenv("CXX", "g++-13")
    assert env.host_cxx() == "g++-13"


def test_build_environment_passes_flashinfer_jit_nvcc_as_pytorch_nvcc(monkeypatch):
    monkeypatch.setattr(toolchain, "cuda_home", lambda: Path("/opt/cuda"))
    monkeypatch.delenv("FLASHINFER_JIT_NVCC", raising=False)
    assert build.build_environment(3) == {"MAX_JOBS": "3", "CUDA_HOME": "/opt/cuda"}
    monkeypatch.setenv("FLASHINFER_JIT_NVCC", "")
    assert "PYTORCH_NVCC" not in build.build_environment(3)
    monkeypatch.setenv("FLASHINFER_JIT_NVCC", "/opt/wrap/nvcc")
    assert build.build_environment(2) == {"MAX_JOBS": "2", "CUDA_HOME": "/opt/cuda", "PYTORCH_NVCC": "/opt/wrap/nvcc"}


def test_rope_prerotate_keys_is_on_unless_turned_off(monkeypatch) -> None:
    """sm90 ragged fused-RoPE plans rotate K once per run unless FLASHINFER_JIT_ROPE_PREROTATE_K=0."""
    from flashinfer_jit import env
    monkeypatch.delenv("FLASHINFER_JIT_ROPE_PREROTATE_K", raising=False)
    assert env.rope_prerotate_keys()
    monkeypatch.setenv("FLASHINFER_JIT_ROPE_PREROTATE_K", "0")
    assert not env.rope_prerotate_keys()
    monkeypatch.setenv("FLASHINFER_JIT_ROPE_PREROTATE_K", "maybe")
    with pytest.raises(ValueError, match="FLASHINFER_JIT_ROPE_PREROTATE_K='maybe'"):
        env.rope_prerotate_keys()


def test_paged_via_ragged_is_off_unless_turned_on(monkeypatch) -> None:
    """sm90 paged plans keep the paged kernel unless FLASHINFER_JIT_PAGED_VIA_RAGGED=1 (experimental)."""
    from flashinfer_jit import env
    monkeypatch.delenv("FLASHINFER_JIT_PAGED_VIA_RAGGED", raising=False)
    assert not env.paged_via_ragged()
    monkeypatch.setenv("FLASHINFER_JIT_PAGED_VIA_RAGGED", "1")
    assert env.paged_via_ragged()
    monkeypatch.setenv("FLASHINFER_JIT_PAGED_VIA_RAGGED", "sometimes")
    with pytest.raises(ValueError, match="FLASHINFER_JIT_PAGED_VIA_RAGGED='sometimes'"):
        env.paged_via_ragged()


def test_split_ctas_per_sm_is_one_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """The planner's split target: one CTA per SM unless FLASHINFER_JIT_SPLIT_CTAS_PER_SM names more."""
    monkeypatch.delenv("FLASHINFER_JIT_SPLIT_CTAS_PER_SM", raising=False)
    assert env.split_ctas_per_sm() == 1
    monkeypatch.setenv("FLASHINFER_JIT_SPLIT_CTAS_PER_SM", "2")
    assert env.split_ctas_per_sm() == 2
    for bad in ("0", "-1", "two"):
        monkeypatch.setenv("FLASHINFER_JIT_SPLIT_CTAS_PER_SM", bad)
        with pytest.raises(ValueError, match=f"FLASHINFER_JIT_SPLIT_CTAS_PER_SM='{bad}'"):
            env.split_ctas_per_sm()
