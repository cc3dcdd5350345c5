"""The cache under stress, with the fake compiler: killed compilers, stale locks, corrupt entries,
failing compiles, lock timeouts, permissions, logging, layers. No CUDA needed. Cold-start races,
SIGKILLed builders, replaced entries under a running process, disk full and security cases are in
test_reliability.py."""
from __future__ import annotations

import contextlib
import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flashinfer_jit import cache, loader, toolchain
from flashinfer_jit.errors import (
    BuildLockTimeout, CacheSecurityError, KernelCompileError, MissingKernelError, ToolchainNotFoundError,
)
from flashinfer_jit.spec import MergeStateSpec

SPEC = MergeStateSpec(head_dim=128, dtype="bf16")
SPEC_ARGS = ("merge_state", "head_dim=128", "dtype=bf16")


def entries(root: Path) -> list[Path]:
    return [e.path for e in cache.CacheLayer(root, writable=True).entries()]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def lock_path(root: Path) -> Path:
    info = loader.compute_key(SPEC)
    return root / "locks" / f"{cache.entry_name(SPEC.uri, info.key)}.lock"


# ---- killed builders, stale locks ----------------------------------------------------------------
# (N cold processes building once, and builders SIGKILLed mid-compile or mid-publish: test_reliability.py)

def test_compiler_dying_mid_write_publishes_nothing_and_next_call_rebuilds(fake_nvcc, cache_root):
    fake_nvcc.behave(die_mid_write=True)
    with pytest.raises(KernelCompileError):
        loader.load(SPEC)
    assert entries(cache_root) == []

    fake_nvcc.behave()
    kernel = loader.load(SPEC)
    assert kernel.entry.library.is_file()
    assert fake_nvcc.compiles == 2


def test_stale_lock_files_do_not_block(fake_nvcc, cache_root, monkeypatch):
    """Lock *files* left behind by dead processes (ours and torch's) are harmless: only a live
    flock blocks."""
    monkeypatch.setenv("FLASHINFER_JIT_LOCK_TIMEOUT", "5")
    ours = lock_path(cache_root)
    ours.parent.mkdir(parents=True)
    ours.write_text("")
    ours.with_suffix(".owner").write_text("pid 999999 on some-host since long ago\n")
    (cache_root / "tmp").mkdir(mode=0o700)
    (cache_root / "tmp" / "lock").write_text("")

    # torch's own lock file inside the build directory, as an old torch (FileBaton) leaves it.
    real_mkdtemp = cache.tempfile.mkdtemp

    def mkdtemp_with_stale_torch_lock(*args, **kwargs):
        path = real_mkdtemp(*args, **kwargs)
        Path(path, "lock").write_text("")
        return path

    monkeypatch.setattr(cache.tempfile, "mkdtemp", mkdtemp_with_stale_torch_lock)
    start = time.monotonic()
    kernel = loader.load(SPEC)
    assert time.monotonic() - start < 5
    assert kernel.entry.library.is_file()
    assert not (kernel.entry.path / "lock").exists()  # build intermediates are not published


def test_lock_held_by_a_live_process_times_out_with_the_lock_path(fake_nvcc, cache_root, monkeypatch):
    path = lock_path(cache_root)
    path.parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import filelock, sys, time; l = filelock.FileLock(sys.argv[1]); l.acquire(); "
         "print('locked', flush=True); time.sleep(120)", str(path)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setenv("FLASHINFER_JIT_LOCK_TIMEOUT", "1")
        start = time.monotonic()
        with pytest.raises(BuildLockTimeout) as excinfo:
            loader.load(SPEC)
        assert time.monotonic() - start < 10
    finally:
        holder.kill()
        holder.wait()
    assert str(path) in str(excinfo.value)
    assert "FLASHINFER_JIT_LOCK_TIMEOUT" in str(excinfo.value)
    assert excinfo.value.lock_path == path
    assert fake_nvcc.compiles == 0


# ---- integrity -----------------------------------------------------------------------------------

# The damaged bytes go in through a new file renamed over the old one: this process has the
# original mapped, and changing a mapped library in place would crash it (SIGBUS), not test us.
def _replace_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".damaged")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _truncate(path: Path) -> None:
    _replace_bytes(path, path.read_bytes()[:100])


def _flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    _replace_bytes(path, bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip_one_byte], ids=["truncated", "one-byte-flip"])
def test_damaged_library_is_quarantined_and_rebuilt_once(fake_nvcc, cache_root, damage, caplog):
    first = loader.load(SPEC)
    damaged_dir = first.entry.path
    damage(first.entry.library)
    loader.clear_memo()

    builds = loader.build_count
    with caplog.at_level(logging.WARNING, logger="flashinfer_jit"):
        second = loader.load(SPEC)
    assert loader.build_count == builds + 1
    assert fake_nvcc.compiles == 2

    quarantined = list((cache_root / "quarantine").iterdir())
    assert len(quarantined) == 1 and quarantined[0].name.startswith(damaged_dir.name)
    assert (quarantined[0] / "QUARANTINED").read_text().strip()
    assert second.entry.path == damaged_dir  # a fresh entry at the same place
    assert cache.CacheLayer(cache_root, writable=True).verify(second.entry) is None
    assert any("quarantined" in r.getMessage() for r in caplog.records)

    loader.clear_memo()
    loader.load(SPEC)  # and now it is simply warm
    assert fake_nvcc.compiles == 2


# ---- failing compiles ----------------------------------------------------------------------------

def test_failing_compile_reports_compiler_message_sources_and_log(fake_nvcc, cache_root):
    fake_nvcc.behave(fail="identifier 'frobnicate' is undefined")
    with pytest.raises(KernelCompileError) as excinfo:
        loader.load(SPEC)
    err = excinfo.value
    text = str(err)
    assert "identifier 'frobnicate' is undefined" in text
    assert str(err.source_dir) in text and (err.source_dir / "merge_state.cu").is_file()
    assert str(err.log_path) in text and "frobnicate" in err.log_path.read_text()
    assert SPEC.uri in text
    assert entries(cache_root) == []  # nothing published, so nothing stale to trip over later

    fake_nvcc.behave()
    kernel = loader.load(SPEC)  # failures are not cached: the fixed compiler is used at once
    assert kernel.entry.library.is_file()
    assert fake_nvcc.compiles == 2


def test_cold_cache_without_a_toolkit_says_what_was_searched(cache_root, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(toolchain, "DEFAULT_CUDA_HOMES", ())
    toolchain._resolve_cuda_home.cache_clear()
    with pytest.raises(ToolchainNotFoundError, match=r"no CUDA toolkit \(nvcc\) found. Searched:\n  - CUDA_HOME"):
        loader.load(SPEC)
    assert not cache_root.exists()  # no lock, no build dir: nothing to clean up


def test_cold_cache_with_a_missing_nvcc_override_names_it(cache_root, monkeypatch):
    monkeypatch.setenv("FLASHINFER_JIT_NVCC", "/nonexistent/bin/nvcc")
    toolchain._resolve_cuda_home.cache_clear()
    with pytest.raises(ToolchainNotFoundError, match=r"cannot run nvcc /nonexistent/bin/nvcc: No such file"):
        loader.load(SPEC)
    assert not cache_root.exists()


# ---- permissions ---------------------------------------------------------------------------------

def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextlib.contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("umask, dirs, files", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600), (0o027, 0o750, 0o640)])
def test_cache_is_readable_by_others_unless_the_umask_is_stricter(fake_nvcc, tmp_path, monkeypatch, umask, dirs,
                                                                   files):
    """Directories 0755 and files 0644 (a prebuilt image is read by another user), or what a stricter
    umask leaves of them."""
    root = tmp_path / "a" / "b" / "cache"
    monkeypatch.setenv("FLASHINFER_JIT_CACHE_DIR", str(root))
    with _umask(umask):
        kernel = loader.load(SPEC)
    assert _mode(root) == dirs
    assert _mode(tmp_path / "a") == dirs and _mode(tmp_path / "a" / "b") == dirs
    for path in [kernel.entry.path, *kernel.entry.path.rglob("*")]:
        assert _mode(path) == (dirs if path.is_dir() else files), f"{path} is {stat.filemode(path.stat().st_mode)}"


def test_cache_is_never_group_or_world_writable_under_umask_000(fake_nvcc, cache_root):
    with _umask(0):
        kernel = loader.load(SPEC)
    assert _mode(cache_root) == 0o755
    for path in [kernel.entry.path, *kernel.entry.path.rglob("*")]:
        assert _mode(path) == (0o755 if path.is_dir() else 0o644), f"{path} is {stat.filemode(path.stat().st_mode)}"
    loader.clear_memo()
    loader.load(SPEC)  # and the warm load accepts it


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_group_or_world_writable_root_is_refused(fake_nvcc, cache_root, warm):
    if warm:
        loader.load(SPEC)
        loader.clear_memo()
    else:
        cache_root.mkdir(mode=0o700)
    cache_root.chmod(0o777)
    with pytest.raises(CacheSecurityError) as excinfo:
        loader.load(SPEC)
    assert excinfo.value.path == cache_root
    assert f"chmod go-w {cache_root}" in str(excinfo.value)
    assert "FLASHINFER_JIT_TRUSTED_ROOTS" in str(excinfo.value)


# ---- logging -------------------------------------------------------------------------------------

def test_build_logs_start_and_end_warm_load_logs_nothing(fake_nvcc, caplog):
    caplog.set_level(logging.INFO, logger="flashinfer_jit")
    loader.load(SPEC)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("building" in m and SPEC.uri in m for m in messages), messages
    assert any("built" in m and SPEC.uri in m and " s " in m for m in messages), messages

    caplog.clear()
    loader.clear_memo()
    loader.load(SPEC)  # from disk
    loader.load(SPEC)  # from the in-process memo
    assert [r for r in caplog.records if r.levelno >= logging.INFO] == []


# ---- layers --------------------------------------------------------------------------------------

def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(root.rglob("*"))}


def test_read_only_prebuilt_layer_serves_without_any_write(fake_nvcc, tmp_path, monkeypatch):
    prebuilt = tmp_path / "prebuilt"
    monkeypatch.setenv("FLASHINFER_JIT_CACHE_DIR", str(prebuilt))
    built = loader.load(SPEC)
    loader.clear_memo()
    before = _snapshot(prebuilt)

    user_root = tmp_path / "user-cache"
    monkeypatch.setenv("FLASHINFER_JIT_CACHE_DIR", str(user_root))
    monkeypatch.setenv("FLASHINFER_JIT_PREBUILT_DIRS", str(prebuilt))
    monkeypatch.setenv("FLASHINFER_JIT_DISABLE_BUILD", "1")
    kernel = loader.load(SPEC)
    assert kernel.entry.library == built.entry.library
    assert _snapshot(prebuilt) == before  # not even a lock file
    assert not user_root.exists()
    assert fake_nvcc.compiles == 1


def test_build_disabled_and_missing_names_layers_and_prebuild_command(fake_nvcc, cache_root, tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHINFER_JIT_PREBUILT_DIRS", str(tmp_path / "prebuilt"))
    monkeypatch.setenv("FLASHINFER_JIT_DISABLE_BUILD", "1")
    with pytest.raises(MissingKernelError) as excinfo:
        loader.load(SPEC)
    text = str(excinfo.value)
    assert f"{tmp_path / 'prebuilt'} (read-only)" in text and f"{cache_root} (writable)" in text
    assert "flashinfer-jit prebuild --family merge_state --head-dim 128 --dtype bf16 --arch 90a" in text
    assert fake_nvcc.compiles == 0
