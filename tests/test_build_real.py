"""A real nvcc build of merge_state into a temporary cache, then warm loads in new processes that
have no compiler at all. Slow (seconds of nvcc), CPU only; the numeric check at the end needs a GPU."""
from __future__ import annotations

import ctypes
import datetime
import json

import pytest
import torch

from conftest import REAL_NVCC, requires_nvcc, run_loader, subprocess_env
from flashinfer_jit import abi, cache, loader, toolchain
from flashinfer_jit.spec import MergeStateSpec, PrefillSpec

pytestmark = [pytest.mark.slow, requires_nvcc]

SPEC = MergeStateSpec(head_dim=128, dtype="bf16")
SPEC_ARGS = ("merge_state", "head_dim=128", "dtype=bf16")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """One real build shared by this module's tests (nvcc is the slow part)."""
    root = tmp_path_factory.mktemp("real") / "cache"
    mp = pytest.MonkeyPatch()
    mp.setenv("FLASHINFER_JIT_CACHE_DIR", str(root))
    try:
        builds = loader.build_count
        kernel = loader.load(SPEC)
        assert loader.build_count == builds + 1
        manifest = json.loads((kernel.entry.path / cache.MANIFEST).read_text())
    finally:
        loader.clear_memo()
        mp.undo()
    return {"root": root, "entry": kernel.entry.path, "library": kernel.entry.library,
            "manifest": manifest, "key": kernel.key}


def test_manifest_describes_the_build(built):
    m = built["manifest"]
    assert m["spec"] == {"family": "merge_state", "head_dim": 128, "dtype": "bf16"}
    assert m["key"] == built["key"] and len(m["key"]) == 64
    assert m["toolchain"]["nvcc"] == REAL_NVCC
    assert m["toolchain"]["torch"] == torch.__version__
    assert m["flags"] == toolchain.nvcc_flags(("90a",))
    assert "-gencode=arch=compute_90a,code=sm_90a" in m["flags"]
    assert 0 < m["build_seconds"] < 600
    assert m["size"] == built["library"].stat().st_size
    assert m["sha256"] == cache.sha256_file(built["library"])
    created = datetime.datetime.fromisoformat(m["created"])
    assert abs((datetime.datetime.now(datetime.timezone.utc) - created).total_seconds()) < 3600
    assert built["entry"] == built["root"] / "90a" / cache.entry_name(SPEC.uri, m["key"])
    assert (built["entry"] / "src" / "merge_state.cu").is_file()
    assert not list(built["entry"].glob("*.o"))  # intermediates are not published


def test_library_exports_the_launchers(built):
    lib = ctypes.CDLL(str(built["library"]))
    for name in ("merge_two", "merge_many", "error_string"):
        assert hasattr(lib, f"fij_{SPEC.uri}_{name}")


def test_library_exports_only_its_entry_points(tmp_path, monkeypatch):
    """Kernel libraries share template instantiations (paged NHD and HND variants have identical
    ones). Exported, GCC makes their function-local statics STB_GNU_UNIQUE ('u') and the dynamic
    linker merges them across libraries even under RTLD_LOCAL: one library's "shared-memory limit
    already raised" flag then skipped another's, and its launch failed with 'invalid argument'.
    Built with hidden visibility, a library exports its fij_<uri>_* functions and nothing else."""
    import shutil
    import subprocess
    nm = shutil.which("nm")
    assert nm, "nm (binutils, installed with the host compiler) is needed to read the symbol table"
    monkeypatch.setenv("FLASHINFER_JIT_CACHE_DIR", str(tmp_path / "cache"))
    spec = PrefillSpec(kv_layout="paged", head_dim=64, dtype="bf16", causal=False)
    try:
        library = loader.load(spec).entry.library
    finally:
        loader.clear_memo()
    listing = subprocess.run([nm, "-D", "--defined-only", str(library)], check=True, capture_output=True,
                             text=True).stdout.splitlines()
    symbols = [line.split() for line in listing if line.strip()]
    assert any(s[-1] == f"fij_{spec.uri}_run" for s in symbols), f"no fij_{spec.uri}_run in {symbols}"
    unexpected = [s for s in symbols if s[1] == "u" or not s[-1].startswith(f"fij_{spec.uri}_")]
    assert not unexpected, f"symbols exported beyond the fij_{spec.uri}_* entry points: {unexpected[:10]}"


def _mirror(name: str, fields: list) -> type:
    return type(name, (ctypes.Structure,), {"_fields_": fields})


def _swapped(mirror: type, a: str, b: str) -> type:
    fields = list(mirror._fields_)
    i, j = (next(n for n, f in enumerate(fields) if f[0] == name) for name in (a, b))
    fields[i], fields[j] = fields[j], fields[i]
    return _mirror(mirror.__name__, fields)


@pytest.mark.parametrize("struct, wrong, message", [
    # two pointer fields swapped: same sizes, every other field in place
    ("PrefillParams", lambda m: _swapped(m, "k", "v"),
     'static assertion failed with "fij::PrefillParams::v: offset is not 8'),
    # the last field missing: it sat in what the mirror sees as tail padding (the size still matches)
    ("PrefillParams", lambda m: _mirror(m.__name__, m._fields_[:-1]),
     'static assertion failed with "fij::PrefillParams: the number of fields differs from its ctypes mirror '
     f'({abi.layout_checks(abi.PrefillParams)[0]["slots"] - 1} scalars'),
    # a field retyped to another of the same size
    ("PlanConfig", lambda m: _mirror(m.__name__, [(n, ctypes.c_float if n == "cta_q" else t) for n, t in m._fields_]),
     'static assertion failed with "fij::PlanConfig::cta_q: not float'),
    # a field renamed in the mirror (offsetof names every field)
    ("PageTableCheck", lambda m: _mirror(m.__name__, [("first_bad" if n == "error_index" else n, t)
                                                      for n, t in m._fields_]),
     'class "fij::PageTableCheck" has no member "first_bad"'),
], ids=["swapped", "missing-last", "retyped", "renamed"])
def test_a_ctypes_mirror_that_differs_from_its_c_struct_fails_the_build(struct, wrong, message, tmp_path,
                                                                         monkeypatch):
    """The ctypes mirrors (flashinfer_jit/abi.py) are rendered into static_asserts of every field's
    offset, size and type and of the struct's size and field count: a mirror that drifts from its C
    struct is a compile error naming the field, not shifted fields at run time."""
    from flashinfer_jit import abi
    from flashinfer_jit.errors import KernelCompileError
    monkeypatch.setenv("FLASHINFER_JIT_CACHE_DIR", str(tmp_path / "cache"))
    mirrors = tuple(wrong(m) if m.__name__ == struct else m for m in abi.PREFILL_STRUCTS)
    monkeypatch.setattr(abi, "PREFILL_STRUCTS", mirrors)
    try:
        with pytest.raises(KernelCompileError) as info:
            loader.load(PrefillSpec(kv_layout="ragged", head_dim=64, dtype="fp16", causal=False))
    finally:
        loader.clear_memo()
    log = info.value.log_path.read_text()
    assert message in log, log[-3000:]


def test_warm_load_in_the_same_process_does_not_compile(built, monkeypatch):
    monkeypatch.setenv("FLASHINFER_JIT_CACHE_DIR", str(built["root"]))
    builds = loader.build_count
    kernel = loader.load(SPEC)
    assert loader.build_count == builds
    assert kernel.entry.library == built["library"]


@pytest.mark.parametrize("no_compiler", ["nvcc-override-missing", "no-toolkit-anywhere"])
def test_new_process_without_any_compiler_loads_the_same_library(built, tmp_path, no_compiler):
    """A deployment with no CUDA toolkit: the key cannot include an nvcc version, so the loader
    matches the manifest's runtime key (same sources, torch, archs, flags) instead."""
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    env = subprocess_env(
        FLASHINFER_JIT_CACHE_DIR=str(built["root"]),
        PATH=str(empty_bin),  # no nvcc, no ninja, no c++
        CUDA_HOME=None, CUDA_PATH=None,
        FLASHINFER_JIT_NVCC="/nonexistent/bin/nvcc" if no_compiler == "nvcc-override-missing" else None,
    )
    args = [*SPEC_ARGS, "--forbid-build"]
    if no_compiler == "no-toolkit-anywhere":
        args.append("--no-default-cuda")
    report = run_loader(*args, env=env, timeout=120, cwd=tmp_path)
    assert report["builds"] == 0
    assert report["library"] == str(built["library"])
    assert report["key"] != built["key"]  # the full key has no nvcc version to include


def test_new_process_with_the_compiler_loads_by_full_key(built, tmp_path):
    report = run_loader(*SPEC_ARGS, "--forbid-build", env=subprocess_env(FLASHINFER_JIT_CACHE_DIR=str(built["root"])),
                        timeout=120, cwd=tmp_path)
    assert report["builds"] == 0
    assert report["library"] == str(built["library"])
    assert report["key"] == built["key"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_merge_state_matches_a_float32_reference(head_dim, dtype):
    import flashinfer_jit

    torch.manual_seed(0)
    n, h = 37, 5
    v_a, v_b = (torch.randn(n, h, head_dim, device="cuda", dtype=dtype) for _ in range(2))
    s_a, s_b = (torch.randn(n, h, device="cuda", dtype=torch.float32) * 4 for _ in range(2))
    s_a[0] = float("-inf")  # one empty state
    v, s = flashinfer_jit.merge_state(v_a, s_a, v_b, s_b)

    s_ref = torch.logaddexp2(s_a, s_b)
    w_a = torch.exp2(s_a - s_ref)[..., None]
    w_b = torch.exp2(s_b - s_ref)[..., None]
    v_ref = w_a * v_a.float() + w_b * v_b.float()
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v.float(), v_ref, rtol=2e-2, atol=2e-2)
