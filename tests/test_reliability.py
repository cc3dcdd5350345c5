"""Reliability and security of the kernel cache, on CPU: one test (or parametrized group) per case
of benchmarks/results/reliability.md. The fake compiler (tests/fakes/fake_nvcc.py) keeps them fast;
the one case that also runs a real library's host code is marked slow and needs nvcc.

Cases proved elsewhere, referenced by the report:
  * damaged .so (truncated / one byte flipped) -> sha256 mismatch before load, quarantined, rebuilt
    once: tests/test_cache.py::test_damaged_library_is_quarantined_and_rebuilt_once
  * every fingerprint input changes the key; same inputs give the same key across processes and
    PYTHONHASHSEEDs: tests/test_keys.py
  * a compiler dying mid-write publishes nothing: tests/test_cache.py::test_compiler_dying_mid_write_...
  * stale lock files (ours and torch's) and a live lock holder (timeout, message):
    tests/test_cache.py::test_stale_lock_files_do_not_block, ::test_lock_held_by_a_live_process_...

Set RELIABILITY_FIGURES=/path/figures.jsonl to collect the measured figures (one JSON line per case).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAKES, load_in_subprocess_cmd, requires_nvcc, run_loader, subprocess_env
from flashinfer_jit import cache, cli, loader, toolchain
from flashinfer_jit.errors import (
    CacheSecurityError, CacheWriteError, KernelLoadError, MissingKernelError,
)
from flashinfer_jit.spec import MergeStateSpec, PrefillSpec

SPEC = MergeStateSpec(head_dim=128, dtype="bf16")
SPEC_ARGS = ("merge_state", "head_dim=128", "dtype=bf16")


def figure(case: str, **values) -> None:
    """Record a measured figure for the report (when RELIABILITY_FIGURES names a file)."""
    path = os.environ.get("RELIABILITY_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"case": case, **values}) + "\n")


def entries(root: Path) -> list[Path]:
    return [e.path for e in cache.CacheLayer(root, writable=True).entries()]


def tmp_leftovers(root: Path) -> list[Path]:
    return sorted((root / "tmp").iterdir()) if (root / "tmp").is_dir() else []


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


# ---- 1. cold start: N processes, one build -------------------------------------------------------

def test_eight_cold_processes_build_once_and_all_load(fake_nvcc, cache_root, tmp_path):
    """8 processes (forked from one parent after `import flashinfer_jit`, before any load: see
    tests/fakes/fork_loaders.py) released together on a cold cache."""
    fake_nvcc.behave(sleep=1.5)  # every process arrives while the first one compiles
    go = tmp_path / "go"
    proc = subprocess.Popen([sys.executable, str(FAKES / "fork_loaders.py"), "8", str(go), *SPEC_ARGS],
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "forked"
    start = time.monotonic()
    go.touch()
    out, err = proc.communicate(timeout=180)
    wall = time.monotonic() - start
    reports = json.loads(out.strip().splitlines()[-1])
    assert proc.returncode == 0, json.dumps(reports, indent=1)[-3000:] + err[-2000:]

    assert len({r["pid"] for r in reports}) == 8
    assert fake_nvcc.compiles == 1
    assert sum(r["builds"] for r in reports) == 1
    assert len({r["library"] for r in reports}) == 1
    assert entries(cache_root) == [Path(reports[0]["entry"])]
    assert tmp_leftovers(cache_root) == []
    figure("cold_start", processes=len(reports), loads=sum(r["exit_status"] == 0 for r in reports),
           builds=fake_nvcc.compiles, wall_s=round(wall, 2), max_load_s=round(max(r["seconds"] for r in reports), 2))


# ---- 2. a builder SIGKILLed mid-compile or mid-publish -------------------------------------------

@pytest.mark.parametrize("where", ["compile", "publish"])
def test_builder_sigkilled_then_next_process_succeeds_at_once(where, fake_nvcc, cache_root, tmp_path, monkeypatch):
    marker = tmp_path / "in-publish"
    if where == "compile":
        fake_nvcc.behave(sleep=120)
        args = SPEC_ARGS
        reached = lambda: fake_nvcc.compiles == 1  # noqa: E731
    else:
        args = (*SPEC_ARGS, "--hang-in-publish", str(marker))
        reached = marker.exists
    builder = subprocess.Popen(load_in_subprocess_cmd(*args), env=subprocess_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(reached, 90, f"the builder to reach its {where} step")
    finally:
        os.killpg(builder.pid, signal.SIGKILL)  # the builder and its ninja / nvcc
        builder.wait(timeout=30)
    killed_at = time.monotonic()

    assert entries(cache_root) == []  # nothing half-published
    (leftover,) = tmp_leftovers(cache_root)
    assert (leftover / "lock").exists() or where == "publish"  # torch's lock file, left by the kill
    if where == "publish":
        assert (leftover / cache.MANIFEST).exists()  # killed between the manifest and the rename

    fake_nvcc.behave(sleep=0)
    monkeypatch.setenv("FLASHINFER_JIT_LOCK_TIMEOUT", "5")  # a stale lock would make this raise
    report = run_loader(*SPEC_ARGS, timeout=90)
    recovered = time.monotonic() - killed_at
    assert report["builds"] == 1
    assert entries(cache_root) == [Path(report["entry"])]
    assert report["seconds"] < 5  # no lock wait: the load is the (fake) build itself
    # the dead builder's dir is a leftover `cache prune` may remove (its lock is free)
    assert cache.CacheLayer(cache_root, writable=True).stale_tmp_dirs(max_age=0) == [leftover]
    figure(f"sigkill_during_{where}", recover_process_s=round(recovered, 2),
           recover_load_s=round(report["seconds"], 3), lock_timeout_s=5)


# ---- 4. a running process is unaffected when its entry is removed and rebuilt --------------------

def _replace_with_flipped_copy(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tmp = path.with_name(path.name + ".damaged")
    tmp.write_bytes(bytes(data))
    os.replace(tmp, path)  # a new inode: changing the mapped one in place would be our bug, not the test's


@pytest.mark.parametrize("compiler", [
    "fake", pytest.param("real", marks=[pytest.mark.slow, requires_nvcc]),
])
def test_running_process_survives_clear_rebuild_and_quarantine(compiler, request, cache_root, tmp_path, capsys):
    if compiler == "fake":
        request.getfixturevalue("fake_nvcc")
    spec = PrefillSpec("ragged", 128, "bf16", True)
    builds = loader.build_count
    original = loader.load(spec)  # B builds it; A loads it warm
    ready, stop = tmp_path / "ready", tmp_path / "stop"
    cmd = [sys.executable, str(FAKES / "run_loaded.py"), "ragged", "128", "bf16", "true", "--ready", str(ready),
           "--stop", str(stop)] + (["--plan"] if compiler == "real" else [])
    a = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(ready.exists, 120, "process A to load the kernel")
        # B: clear the whole cache and rebuild the same entry at the same path
        assert cli.main(["cache", "clear", "--yes"]) == 0
        assert not original.entry.path.exists()
        loader.clear_memo()
        rebuilt = loader.load(spec)
        assert rebuilt.entry.path == original.entry.path
        if compiler == "fake":  # (with nvcc, one more real rebuild would add seconds, not coverage)
            # B: damage the new entry, then load: quarantined and rebuilt once more
            _replace_with_flipped_copy(rebuilt.entry.library)
            loader.clear_memo()
            loader.load(spec)
            assert len(list((cache_root / "quarantine").iterdir())) == 1
        # B: and a verify --fix / prune pass for good measure
        assert cli.main(["cache", "verify", "--fix"]) == 0
        assert cli.main(["cache", "prune", "--max-size", "0"]) == 0
        time.sleep(0.5)
    finally:
        stop.touch()
        out, err = a.communicate(timeout=60)
    capsys.readouterr()
    assert a.returncode == 0, f"process A died ({a.returncode}):\n{err[-3000:]}"
    report = json.loads(out.strip().splitlines()[-1])
    assert report["mismatches"] == 0 and report["iterations"] > 0
    assert report["kv_tile"] == spec.kv_tile
    assert report["library"] == str(original.entry.library)
    replacements = 2 if compiler == "fake" else 1
    assert loader.build_count == builds + 1 + replacements
    figure(f"running_process_{compiler}", iterations=report["iterations"], mismatches=report["mismatches"],
           replacements=replacements, plan_items=report["plan_items"])


# ---- 6. security ---------------------------------------------------------------------------------

def _fake_owner(monkeypatch, target: Path, uid: int = 4242) -> None:
    real_lstat = os.lstat

    def lstat(path, *args, **kwargs):
        st = real_lstat(path, *args, **kwargs)
        if Path(path) == target:
            fields = list(st[:10])
            fields[4] = uid
            return os.stat_result(fields)
        return st

    monkeypatch.setattr(os, "lstat", lstat)


@pytest.fixture
def no_dlopen(monkeypatch):
    """Fails the test if a library is loaded (a refused path must never reach dlopen)."""
    import ctypes
    calls = []
    real = ctypes.CDLL

    def cdll(name, *args, **kwargs):
        calls.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(loader.ctypes, "CDLL", cdll)
    return calls


def _warm(root: Path) -> cache.Entry:
    entry = loader.load(SPEC).entry
    loader.clear_memo()
    return entry


@pytest.mark.parametrize("what", ["root", "arch-dir", "entry", "library"])
def test_group_or_world_writable_path_is_refused_with_the_chmod(what, fake_nvcc, cache_root, no_dlopen):
    entry = _warm(cache_root)
    target = {"root": cache_root, "arch-dir": entry.path.parent, "entry": entry.path, "library": entry.library}[what]
    target.chmod(stat.S_IMODE(target.stat().st_mode) | stat.S_IWGRP | stat.S_IWOTH)
    no_dlopen.clear()
    with pytest.raises(CacheSecurityError) as excinfo:
        loader.load(SPEC)
    assert excinfo.value.path == target
    assert f"chmod go-w {target}" in str(excinfo.value) and "FLASHINFER_JIT_TRUSTED_ROOTS" in str(excinfo.value)
    assert no_dlopen == []


@pytest.mark.parametrize("what", ["root", "entry", "library"])
def test_path_owned_by_another_user_is_refused_with_the_chown(what, fake_nvcc, cache_root, monkeypatch, no_dlopen):
    entry = _warm(cache_root)
    target = {"root": cache_root, "entry": entry.path, "library": entry.library}[what]
    _fake_owner(monkeypatch, target)
    no_dlopen.clear()
    with pytest.raises(CacheSecurityError) as excinfo:
        loader.load(SPEC)
    text = str(excinfo.value)
    assert excinfo.value.path == target and "owned by uid 4242" in text
    assert f"chown -R {os.getuid()} {target}" in text and "FLASHINFER_JIT_TRUSTED_ROOTS" in text
    assert no_dlopen == []


def test_symlinked_root_or_entry_is_refused(fake_nvcc, cache_root, tmp_path, monkeypatch, no_dlopen):
    entry = _warm(cache_root)
    link = tmp_path / "via-link"
    link.symlink_to(cache_root)
    monkeypatch.setenv("FLASHINFER_JIT_CACHE_DIR", str(link))
    no_dlopen.clear()
    with pytest.raises(CacheSecurityError) as excinfo:
        loader.load(SPEC)
    assert excinfo.value.path == link and "symbolic link" in str(excinfo.value)
    assert f"real directory ({cache_root})" in str(excinfo.value)

    # an entry directory that is a symlink to a copy elsewhere (someone else's directory)
    monkeypatch.setenv("FLASHINFER_JIT_CACHE_DIR", str(cache_root))
    elsewhere = tmp_path / "planted"
    entry.path.rename(elsewhere)
    entry.path.symlink_to(elsewhere)
    with pytest.raises(CacheSecurityError) as excinfo:
        loader.load(SPEC)
    assert excinfo.value.path == entry.path
    assert no_dlopen == []


def test_trusted_roots_admit_shared_caches(fake_nvcc, cache_root, tmp_path, monkeypatch):
    entry = _warm(cache_root)
    cache_root.chmod(0o775)
    entry.path.chmod(0o770)
    _fake_owner(monkeypatch, entry.library)
    monkeypatch.setenv("FLASHINFER_JIT_TRUSTED_ROOTS", str(cache_root))
    assert loader.load(SPEC).entry.library == entry.library
    loader.clear_memo()
    link = tmp_path / "team-cache"
    link.symlink_to(cache_root)
    monkeypatch.setenv("FLASHINFER_JIT_CACHE_DIR", str(link))
    monkeypatch.setenv("FLASHINFER_JIT_TRUSTED_ROOTS", str(link))
    assert loader.load(SPEC).entry.library == link / entry.library.relative_to(cache_root)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o077, 0o700)])
def test_every_directory_the_cache_creates_is_0755_or_what_the_umask_leaves(umask, mode, fake_nvcc, cache_root):
    old = os.umask(umask)
    try:
        entry = _warm(cache_root)
        _replace_with_flipped_copy(entry.library)
        loader.load(SPEC)  # quarantine/ too
        cli.main(["cache", "clear", "--yes"])  # and tmp/ removal dirs
    finally:
        os.umask(old)
    dirs = [cache_root, *(p for p in cache_root.rglob("*") if p.is_dir())]
    assert {p.name for p in dirs} >= {"cache", "90a", "locks", "tmp", "quarantine"}
    for d in dirs:
        assert stat.S_IMODE(d.stat().st_mode) == mode, f"{d} is {stat.filemode(d.stat().st_mode)}"


# ---- 7. disk full, noexec ------------------------------------------------------------------------

def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _assert_nothing_published_and_next_call_works(cache_root: Path, fake_nvcc, compiles_before: int) -> None:
    assert entries(cache_root) == []
    assert tmp_leftovers(cache_root) == []  # the half-written build was removed, space given back
    loader.clear_memo()
    kernel = loader.load(SPEC)  # with space again
    assert cache.CacheLayer(cache_root, writable=True).verify(kernel.entry) is None
    assert fake_nvcc.compiles == compiles_before + 1


def _inject_enospc(where: str, mp: pytest.MonkeyPatch, fake_nvcc) -> None:
    if where == "publish-rename":
        real_rename = os.rename

        def rename(src, dst, *args, **kwargs):
            if Path(src).parent.name == "tmp":
                _enospc()
            return real_rename(src, dst, *args, **kwargs)

        mp.setattr(cache.os, "rename", rename)
    elif where == "manifest-write":
        real_write = Path.write_text

        def write_text(self, data, *args, **kwargs):
            if self.name == cache.MANIFEST + ".tmp":
                real_write(self, data[: len(data) // 2], *args, **kwargs)  # half of it, then the disk is full
                _enospc()
            return real_write(self, data, *args, **kwargs)

        mp.setattr(Path, "write_text", write_text)
    else:
        fake_nvcc.behave(fail="could not write output file 'merge_state.cuda.o': No space left on device")


@pytest.mark.parametrize("where", ["publish-rename", "manifest-write", "compiler"])
def test_disk_full_is_a_clear_error_and_publishes_nothing(where, fake_nvcc, cache_root):
    with pytest.MonkeyPatch.context() as mp:
        _inject_enospc(where, mp, fake_nvcc)
        with pytest.raises(CacheWriteError) as excinfo:
            loader.load(SPEC)
    fake_nvcc.behave()
    text = str(excinfo.value)
    assert f"cannot add kernel '{SPEC.uri}' to the cache at {cache_root}" in text
    assert " free)" in text and "cache prune --max-size" in text and "FLASHINFER_JIT_CACHE_DIR" in text
    assert "Nothing was published" in text
    assert ("No space left on device" in text) if where == "compiler" else ("no space left on the device" in text)
    assert fake_nvcc.compiles == 1
    _assert_nothing_published_and_next_call_works(cache_root, fake_nvcc, 1)


def test_disk_full_advice_is_only_for_a_full_disk(fake_nvcc, cache_root, monkeypatch):
    with pytest.MonkeyPatch.context() as mp:
        _inject_enospc("publish-rename", mp, fake_nvcc)
        with pytest.raises(CacheWriteError) as excinfo:
            loader.load(SPEC)
    assert excinfo.value.errno == errno.ENOSPC and "read-only" not in str(excinfo.value)


@pytest.mark.parametrize("how", ["permission", "read-only-mount", "compiler"])
def test_read_only_cache_is_a_cache_write_error_naming_both_fixes(how, fake_nvcc, cache_root, monkeypatch, capsys):
    """A cache directory this process cannot write (another user's image layer, a read-only mount):
    CacheWriteError saying read-only, with the two ways out, and no disk-space advice. Root ignores
    mode bits, so the permission is taken away by the access check the cache makes."""
    cache_root.mkdir()
    if how == "compiler":
        fake_nvcc.behave(fail="cannot open output file 'merge_state.cuda.o': Read-only file system")
    else:
        real_access = os.access
        monkeypatch.setattr(cache.os, "access", lambda p, mode, **kw: False if str(p).startswith(str(cache_root))
                            else real_access(p, mode, **kw))
        monkeypatch.setattr(cache, "_read_only_mount", lambda p: how == "read-only-mount")
    with pytest.raises(CacheWriteError) as excinfo:
        loader.load(SPEC)
    text = str(excinfo.value)
    assert f"cannot add kernel '{SPEC.uri}' to the cache at {cache_root}" in text
    assert "read-only" in text and "Nothing was published" in text
    assert f"FLASHINFER_JIT_PREBUILT_DIRS={cache_root}" in text and "FLASHINFER_JIT_CACHE_DIR" in text
    assert "free" not in text.split("---")[0] and "prune" not in text
    expected = {"permission": errno.EACCES, "read-only-mount": errno.EROFS, "compiler": errno.EROFS}[how]
    assert excinfo.value.errno == expected
    assert entries(cache_root) == [] and tmp_leftovers(cache_root) == []
    if how != "compiler":  # and prebuild says it once, before building anything
        assert cli.main(["prebuild", "--family", "merge", "--dtype", "bf16"]) == 1
        out, err = capsys.readouterr()
        assert err.count("cannot add kernels to the cache") == 1 and "FAILED" not in out and fake_nvcc.compiles == 0


def test_noexec_cache_is_a_clear_error(fake_nvcc, cache_root, monkeypatch):
    import ctypes
    real_cdll = ctypes.CDLL

    def noexec_cdll(name, *args, **kwargs):
        if str(name).startswith(str(cache_root)):
            raise OSError(f"{name}: failed to map segment from shared object")
        return real_cdll(name, *args, **kwargs)

    # cold: the build itself works, loading it (torch's dlopen after the compile) does not
    monkeypatch.setattr(ctypes, "CDLL", noexec_cdll)
    with pytest.raises(KernelLoadError) as excinfo:
        loader.load(SPEC)
    assert "noexec" in str(excinfo.value) and "FLASHINFER_JIT_CACHE_DIR" in str(excinfo.value)
    assert entries(cache_root) == [] and tmp_leftovers(cache_root) == []

    # warm: an entry that is fine, on a filesystem that will not map it
    monkeypatch.setattr(ctypes, "CDLL", real_cdll)
    good = _warm(cache_root)
    monkeypatch.setattr(ctypes, "CDLL", noexec_cdll)
    with pytest.raises(KernelLoadError) as excinfo:
        loader.load(SPEC)
    assert "failed to map segment" in str(excinfo.value) and "noexec" in str(excinfo.value)
    assert excinfo.value.path == good.library
    assert entries(cache_root) == [good.path]  # a good entry is not quarantined for it

    monkeypatch.setattr(ctypes, "CDLL", real_cdll)  # remounted
    loader.clear_memo()
    assert loader.load(SPEC).entry.path == good.path
    assert fake_nvcc.compiles == 2


# ---- 8. read-only prebuilt layer -----------------------------------------------------------------

_WRITE_EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.chmod", "os.chown", "os.utime",
                 "os.truncate", "os.link", "os.symlink", "shutil.rmtree", "shutil.move", "shutil.copyfile"}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_audit = {"root": None, "writes": []}


def _audit_hook(event: str, args: tuple) -> None:
    root = _audit["root"]
    if root is None or not (event in _WRITE_EVENTS or event == "open"):
        return
    if event == "open":
        path, mode, flags = (list(args) + [None, None, None])[:3]
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS)
        paths = [path] if writes else []
    else:
        paths = [a for a in args if isinstance(a, (str, bytes, os.PathLike))]
    for p in paths:
        text = os.fsdecode(p) if isinstance(p, (bytes, os.PathLike)) else p
        if text == root or text.startswith(root + os.sep):
            _audit["writes"].append((event, text))


sys.addaudithook(_audit_hook)


def _snapshot(root: Path) -> dict[str, tuple]:
    snap = {}
    for p in sorted([root, *root.rglob("*")]):
        st = os.lstat(p)
        digest = cache.sha256_file(p) if stat.S_ISREG(st.st_mode) else None
        snap[str(p)] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns, digest)
    return snap


@pytest.fixture
def read_only_prebuilt(fake_nvcc, tmp_path, capsys):
    """A prebuilt layer (merge_state x3 and one prefill variant) made read-only with chmod -R a-w."""
    root = tmp_path / "prebuilt"
    assert cli.main(["prebuild", "--family", "merge", "--dtype", "bf16", "--cache-dir", str(root)]) == 0
    assert cli.main(["prebuild", "--family", "prefill", "--layout", "paged_nhd", "--head-dim", "64", "--dtype",
                     "fp16", "--causal", "false", "--cache-dir", str(root)]) == 0
    capsys.readouterr()
    loader.clear_memo()
    subprocess.run(["chmod", "-R", "a-w", str(root)], check=True)
    yield root
    subprocess.run(["chmod", "-R", "u+w", str(root)], check=True)


def test_read_only_prebuilt_layer_serves_and_is_never_written(read_only_prebuilt, fake_nvcc, tmp_path, monkeypatch,
                                                              capsys):
    root = read_only_prebuilt
    user = tmp_path / "home" / ".cache" / "flashinfer-jit"
    monkeypatch.setenv("FLASHINFER_JIT_CACHE_DIR", str(user))
    monkeypatch.setenv("FLASHINFER_JIT_PREBUILT_DIRS", str(root))
    monkeypatch.setenv("FLASHINFER_JIT_DISABLE_BUILD", "1")
    compiles = fake_nvcc.compiles
    before = _snapshot(root)
    _audit.update(root=str(root), writes=[])
    try:
        specs = [*MergeStateSpec.supported()][1::2] + [PrefillSpec("paged_nhd", 64, "fp16", False)]
        for spec in specs:
            kernel = loader.load(spec)
            assert root in kernel.entry.path.parents
        # and the maintenance commands, which only ever act on the writable layer
        for argv in (["cache", "list"], ["cache", "verify", "--fix"], ["cache", "show", specs[0].uri],
                     ["cache", "prune", "--max-size", "0"], ["cache", "clear", "--yes"], ["config"],
                     ["prebuild", "--family", "merge", "--dtype", "bf16", "--dry-run"]):
            assert cli.main(argv) == 0, argv
        with pytest.raises(MissingKernelError):
            loader.load(PrefillSpec("ragged", 64, "fp16", False))  # a miss: an error, no write either
    finally:
        writes = list(_audit["writes"])
        _audit.update(root=None, writes=[])
    capsys.readouterr()
    assert writes == []
    assert _snapshot(root) == before  # byte for byte, modes and mtimes included
    assert not user.exists()  # a warm hit in the prebuilt layer creates no user cache either
    assert fake_nvcc.compiles == compiles
    figure("read_only_layer", kernels_loaded=len(specs), files_checked=len(before), writes=len(writes))


def test_prebuilt_layer_from_another_toolchain_is_skipped_with_one_warning(read_only_prebuilt, fake_nvcc, tmp_path,
                                                                          monkeypatch, caplog):
    root = read_only_prebuilt
    monkeypatch.setenv("FLASHINFER_JIT_PREBUILT_DIRS", str(root))
    before = _snapshot(root)

    # only the compiler differs: the binaries still fit this runtime, and are used
    fake_nvcc.behave(version="98.0")
    for spec in MergeStateSpec.supported():
        if spec.dtype == "bf16":
            assert root in loader.load(spec).entry.path.parents
    loader.clear_memo()

    # another torch: every entry is skipped, with one warning naming the difference
    real_fingerprint = toolchain.fingerprint
    monkeypatch.setattr(toolchain, "fingerprint", lambda archs: {**real_fingerprint(archs), "torch": "9.9.9"})
    monkeypatch.setenv("FLASHINFER_JIT_DISABLE_BUILD", "1")
    with caplog.at_level(logging.WARNING, logger="flashinfer_jit"):
        for spec in MergeStateSpec.supported():
            if spec.dtype == "bf16":
                with pytest.raises(MissingKernelError):
                    loader.load(spec)
    warnings = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "built with a different toolchain (torch:" in warnings[0] and "'9.9.9' here" in warnings[0]

    # with building allowed, it lands in the writable cache, never in the prebuilt layer
    monkeypatch.setenv("FLASHINFER_JIT_DISABLE_BUILD", "0")
    kernel = loader.load(MergeStateSpec(64, "bf16"))
    assert root not in kernel.entry.path.parents
    assert _snapshot(root) == before
