"""Finding CUDA, choosing archs, flags and job counts. CPU only; no nvcc needed except where marked."""
from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from conftest import clear_toolchain_memos, requires_nvcc
from flashinfer_jit import loader, prebuild, toolchain
from flashinfer_jit.errors import ToolchainNotFoundError
from flashinfer_jit.spec import MergeStateSpec


def make_cuda_home(path: Path) -> Path:
    """A directory that passes for a CUDA toolkit (bin/nvcc + include/cuda_runtime.h)."""
    (path / "bin").mkdir(parents=True)
    (path / "include").mkdir()
    (path / "include" / "cuda_runtime.h").write_text("")
    nvcc = path / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 0.0, V0.0.0'\n")
    nvcc.chmod(0o755)
    return path


@pytest.fixture
def no_cuda_anywhere(monkeypatch, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    for name in ("CUDA_HOME", "CUDA_PATH", "FLASHINFER_JIT_NVCC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(toolchain, "DEFAULT_CUDA_HOMES", (str(tmp_path / "no-cuda"), "/nonexistent/cuda"))
    clear_toolchain_memos()
    return empty


# ---- CUDA home -----------------------------------------------------------------------------------

def test_cuda_home_resolves_through_a_wrapper_script_on_path(no_cuda_anywhere, tmp_path):
    real = make_cuda_home(tmp_path / "cuda-12.9")
    wrapper = no_cuda_anywhere / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {real}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    assert toolchain.cuda_home() == real


@pytest.mark.skipif(
    not (os.path.isfile("/usr/local/bin/nvcc") and os.path.isdir("/usr/local/cuda-13.0")),
    reason="this machine has no /usr/local/bin/nvcc wrapper around /usr/local/cuda-13.0",
)
def test_cuda_home_resolves_this_machines_nvcc_wrapper(monkeypatch):
    for name in ("CUDA_HOME", "CUDA_PATH", "FLASHINFER_JIT_NVCC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PATH", "/usr/local/bin:/usr/bin:/bin")
    clear_toolchain_memos()
    assert toolchain.cuda_home() == Path("/usr/local/cuda-13.0")


def test_cuda_home_env_wins_and_is_resolved(no_cuda_anywhere, tmp_path, monkeypatch):
    real = make_cuda_home(tmp_path / "cuda-real")
    link = tmp_path / "cuda-link"
    link.symlink_to(real)
    monkeypatch.setenv("CUDA_HOME", str(link))
    assert toolchain.cuda_home() == real


def test_no_nvcc_anywhere_lists_what_was_searched(no_cuda_anywhere, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", "/nonexistent/cuda-home")
    with pytest.raises(ToolchainNotFoundError) as excinfo:
        toolchain.cuda_home()
    text = str(excinfo.value)
    assert "CUDA_HOME/CUDA_PATH=/nonexistent/cuda-home" in text
    assert f"nvcc on PATH (not found; PATH={no_cuda_anywhere})" in text
    assert "/nonexistent/cuda (not a CUDA toolkit)" in text
    assert "FLASHINFER_JIT_NVCC" in text and "CUDA_HOME" in text  # how to fix it
    assert "/nonexistent/cuda-home" in " ".join(excinfo.value.searched)


def test_unset_and_missing_settings_are_listed_too(no_cuda_anywhere, monkeypatch):
    monkeypatch.setenv("FLASHINFER_JIT_NVCC", "/nonexistent/bin/nvcc")
    with pytest.raises(ToolchainNotFoundError) as excinfo:
        toolchain.cuda_home()
    assert excinfo.value.searched[:3] == [
        "FLASHINFER_JIT_NVCC=/nonexistent/bin/nvcc (no such file)",
        "CUDA_HOME/CUDA_PATH (unset)",
        f"nvcc on PATH (not found; PATH={no_cuda_anywhere})",
    ]


def test_no_nvcc_means_no_nvcc_version_rather_than_an_error(no_cuda_anywhere):
    assert toolchain.nvcc_version() is None


def test_nvcc_override_that_does_not_exist_gives_no_version(monkeypatch):
    monkeypatch.setenv("FLASHINFER_JIT_NVCC", "/nonexistent/bin/nvcc")
    clear_toolchain_memos()
    assert toolchain.nvcc_version() is None


def test_fake_nvcc_version_is_accepted(fake_nvcc):
    assert toolchain.nvcc_version() == "Cuda compilation tools, release 99.9, V99.9.0 | Build fake_99.9"
    assert toolchain.cuda_home() == fake_nvcc.home


# ---- archs and flags -----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "text, arch",
    [("9.0", "90a"), ("9.0a", "90a"), ("sm_90a", "90a"), ("90", "90a"), ("compute_90a", "90a"),
     ("8.0", "80"), ("8.6+PTX", "86+PTX"), ("sm_90a+ptx", "90a+PTX"), ("10.0a", "100a"), ("12.0f", "120f")],
)
def test_normalize_arch(text, arch):
    assert toolchain.normalize_arch(text) == arch


@pytest.mark.parametrize("text", ["7.5", "hopper", "9"])
def test_bad_arch_is_an_error_naming_it(text):
    with pytest.raises(ValueError, match=repr(text)):
        toolchain.normalize_arch(text)


def test_arch_resolution_order(monkeypatch):
    monkeypatch.setattr(toolchain.torch.cuda, "is_available", lambda: False)
    assert toolchain.target_archs() == ("90a",)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0 8.6")
    assert toolchain.target_archs() == ("80", "86")
    monkeypatch.setenv("FLASHINFER_JIT_ARCH", "9.0,8.0")
    assert toolchain.target_archs() == ("80", "90a")
    monkeypatch.setenv("FLASHINFER_JIT_ARCH", "9.0+PTX")
    assert toolchain.target_archs() == ("90a+PTX",)


def test_visible_gpus_decide_the_archs(monkeypatch):
    monkeypatch.setattr(toolchain.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(toolchain.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(toolchain.torch.cuda, "get_device_capability", lambda i: [(9, 0), (8, 0)][i])
    monkeypatch.setenv("FLASHINFER_JIT_ARCH", "120f")
    assert toolchain.target_archs() == ("80", "90a")


def test_gencode_flags():
    assert toolchain.gencode_flags(("90a",)) == ["-gencode=arch=compute_90a,code=sm_90a"]
    assert toolchain.gencode_flags(("80", "90a")) == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]


def test_extra_flags_are_appended_shell_split(monkeypatch):
    monkeypatch.setenv("FLASHINFER_JIT_EXTRA_CUDAFLAGS", "-DA=1 '-DB=two words'")
    flags = toolchain.nvcc_flags(("90a",))
    assert flags[-2:] == ["-DA=1", "-DB=two words"]
    assert "-gencode=arch=compute_90a,code=sm_90a" in flags


# ---- jobs ----------------------------------------------------------------------------------------

def test_max_jobs_is_honoured_and_still_capped_by_free_memory(monkeypatch):
    monkeypatch.setenv("MAX_JOBS", "3")
    monkeypatch.setattr(toolchain, "_available_memory", lambda: 64 * 1024**3)
    assert toolchain.build_jobs(num_sources=10) == 3
    assert toolchain.resolve_jobs() == (3, "MAX_JOBS=3")
    assert toolchain.resolve_jobs(5) == (5, "--jobs 5")  # --jobs > MAX_JOBS
    monkeypatch.setattr(toolchain, "_available_memory", lambda: 1)
    assert toolchain.build_jobs(num_sources=10) == 1
    assert toolchain.resolve_jobs() == (1, "MAX_JOBS=3, capped from 3 by free memory (about 2 GiB per nvcc)")


@pytest.mark.parametrize("bad", ["0", "-2", "many"])
def test_bad_max_jobs_names_the_variable(monkeypatch, bad):
    monkeypatch.setenv("MAX_JOBS", bad)
    with pytest.raises(ValueError, match="MAX_JOBS"):
        toolchain.build_jobs(num_sources=4)


def test_jobs_are_capped_by_sources_cores_and_free_memory(monkeypatch):
    monkeypatch.setattr(toolchain.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(toolchain, "_available_memory", lambda: 64 * 1024**3)
    assert toolchain.build_jobs(num_sources=4) == 4
    assert toolchain.build_jobs(num_sources=40) == 16
    monkeypatch.setattr(toolchain, "_available_memory", lambda: 5 * toolchain.NVCC_JOB_BYTES + 1)
    assert toolchain.build_jobs(num_sources=40) == 5
    monkeypatch.setattr(toolchain, "_available_memory", lambda: 100)
    assert toolchain.build_jobs(num_sources=40) == 1
    monkeypatch.setattr(toolchain, "_available_memory", lambda: None)
    assert toolchain.build_jobs(num_sources=40) == 16


# ---- one arch syntax for --arch, FLASHINFER_JIT_ARCH and TORCH_CUDA_ARCH_LIST --------------------

ARCH_TABLE = [
    # text, the archs of the one library it means, the -gencode flags
    ("9.0", ("90a",), ["-gencode=arch=compute_90a,code=sm_90a"]),
    ("80,90a", ("80", "90a"), ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]),
    ("8.0;9.0a", ("80", "90a"), ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]),
    ("8.0 9.0", ("80", "90a"), ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]),
    ("80+90a", ("80", "90a"), ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]),
    ("9.0+PTX", ("90a+PTX",), ["-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_90,code=compute_90"]),
    ("8.0;9.0+PTX", ("80", "90a+PTX"),
     ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
      "-gencode=arch=compute_90,code=compute_90"]),
    ("8.6+ptx, 8.6", ("86+PTX",), ["-gencode=arch=compute_86,code=sm_86", "-gencode=arch=compute_86,code=compute_86"]),
    ("80+90a+PTX", ("80", "90a+PTX"),
     ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
      "-gencode=arch=compute_90,code=compute_90"]),
    ("sm_100a;12.0f+PTX", ("100a", "120f+PTX"),
     ["-gencode=arch=compute_100a,code=sm_100a", "-gencode=arch=compute_120f,code=sm_120f",
      "-gencode=arch=compute_120,code=compute_120"]),
]


@pytest.mark.parametrize("text, archs, flags", ARCH_TABLE, ids=[row[0] for row in ARCH_TABLE])
def test_one_arch_syntax_everywhere(text, archs, flags, monkeypatch):
    """A list is one library for all its archs, the same through all three doors, and +PTX is kept."""
    monkeypatch.setattr(toolchain.torch.cuda, "is_available", lambda: False)
    assert toolchain.parse_arch_list(text) == archs
    assert prebuild.parse_archs(text) == [archs]                # --arch TEXT
    for name in ("FLASHINFER_JIT_ARCH", "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv("FLASHINFER_JIT_ARCH", raising=False)
        monkeypatch.setenv(name, text)
        assert toolchain.resolve_target_archs() == (archs, f"{name}={text}")
    assert toolchain.gencode_flags(archs) == flags
    # and the command a MissingKernelError prints reads back as the same library
    argv = shlex.split(loader.prebuild_command(MergeStateSpec(64, "fp16"), archs))
    assert prebuild.parse_archs(argv[argv.index("--arch") + 1]) == [archs]


@pytest.mark.parametrize("text", ["7.5;8.0", "hopper", "+PTX", ";", "9.0+SASS"])
def test_bad_arch_lists_are_refused_the_same_way_everywhere(text, monkeypatch):
    monkeypatch.setattr(toolchain.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError):
        toolchain.parse_arch_list(text)
    with pytest.raises(ValueError, match="--arch"):
        prebuild.parse_archs(text)
    for name in ("FLASHINFER_JIT_ARCH", "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv("FLASHINFER_JIT_ARCH", raising=False)
        monkeypatch.setenv(name, text)
        with pytest.raises(ValueError, match=name):
            toolchain.resolve_target_archs()


def test_repeated_arch_is_one_build_each():
    assert prebuild.parse_archs(["90a", "8.0;9.0a", "9.0"]) == [("90a",), ("80", "90a")]


@requires_nvcc
def test_ptx_is_really_in_the_binary(tmp_path):
    """`9.0+PTX` puts compute_90 PTX into the fatbin next to the sm_90a code (uncompressed here, so the
    PTX's `.target` line can be read from the object)."""
    nvcc = toolchain.nvcc_path()
    source = tmp_path / "k.cu"
    source.write_text("__global__ void k(float* x) { x[0] = 1.0f; }\n")
    for text, want in (("9.0+PTX", True), ("9.0", False)):
        obj = tmp_path / f"k{want}.o"
        flags = toolchain.gencode_flags(toolchain.parse_arch_list(text))
        subprocess.run([str(nvcc), "-c", str(source), "-o", str(obj), "-Xfatbin=-compress=false", *flags], check=True,
                       capture_output=True, timeout=300)
        assert (b".target sm_90\n" in obj.read_bytes()) is want, text
