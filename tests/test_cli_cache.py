"""`flashinfer-jit cache list|show|verify|clear|prune` and the `last_used` record, with the fake
compiler. No GPU needed."""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flashinfer_jit import cache, cli, loader
from flashinfer_jit.spec import MergeStateSpec

SPECS = [MergeStateSpec(64, "fp16"), MergeStateSpec(128, "fp16"), MergeStateSpec(256, "fp16")]
DAY = 86400


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def three(fake_nvcc, cache_root) -> list[cache.Entry]:
    """Three merge_state entries in the writable cache, loaded once each (so last_used exists)."""
    entries = [loader.load(s).entry for s in SPECS]
    loader.clear_memo()
    return entries


def layer(root: Path) -> cache.CacheLayer:
    return cache.CacheLayer(root, writable=True)


def uris(root: Path) -> list[str]:
    return sorted(e.uri for e in layer(root).entries())


def age(entry: cache.Entry, built_days: float, used_days: float | None) -> None:
    """Pretend the entry was built `built_days` ago and last loaded `used_days` ago (None: never)."""
    manifest_path = entry.path / cache.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    built = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=built_days)
    manifest["created"] = built.isoformat(timespec="seconds")
    manifest_path.write_text(json.dumps(manifest))
    last_used = entry.path / cache.LAST_USED
    if used_days is None:
        last_used.unlink(missing_ok=True)
    else:
        last_used.touch()
        t = time.time() - used_days * DAY
        os.utime(last_used, (t, t))


# ---- list / show ---------------------------------------------------------------------------------

def test_list_json_matches_the_cache(capsys, three, cache_root, tmp_path, monkeypatch):
    code, out, _ = run_cli(capsys, "cache", "list", "--json")
    assert code == 0
    listed = json.loads(out)["entries"]
    assert [r["uri"] for r in listed] == sorted(s.uri for s in SPECS)
    for r in listed:
        entry = next(e for e in three if str(e.path) == r["path"])
        assert r["arch"] == "90a" and r["layer"] == str(cache_root) and r["writable"] is True
        assert r["key"] == entry.manifest["key"] and r["size"] == entry.library.stat().st_size
        assert r["disk_bytes"] == cache.tree_bytes(entry.path)
        assert r["verified"] is True and r["problem"] is None and r["toolchain_differs"] == []
        assert r["built"] == entry.manifest["created"]
        assert r["last_used"] is not None
        assert r["toolchain"]["nvcc"].startswith("Cuda compilation tools, release 99.9")


def test_list_text_table_and_layers(capsys, three, cache_root, tmp_path, monkeypatch, fake_nvcc):
    prebuilt = tmp_path / "prebuilt"
    monkeypatch.setenv("FLASHINFER_JIT_PREBUILT_DIRS", str(prebuilt))
    age(three[0], 3, None)
    code, out, _ = run_cli(capsys, "cache", "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"{prebuilt} (read-only): 0 entries, 0 B"
    assert lines[1].startswith(f"{cache_root} (writable): 3 entries, ")
    assert lines[2].split() == ["URI", "ARCH", "SIZE", "BUILT", "LAST", "USED", "TOOLCHAIN", "VERIFIED"]
    row = next(l for l in lines if l.startswith("merge_state_hd64_fp16 "))
    assert " never " in row and "nvcc 99.9, torch" in row and row.endswith("yes")

    # another nvcc now: the entries are listed as built by a different toolchain
    fake_nvcc.behave(version="98.0")
    code, out, _ = run_cli(capsys, "cache", "list")
    assert "(differs: nvcc)" in out


def test_show_by_uri_name_or_key(capsys, three):
    entry = three[1]
    for query in (entry.uri, entry.path.name, entry.manifest["key"][:12]):
        code, out, _ = run_cli(capsys, "cache", "show", query)
        assert code == 0, query
        assert out.startswith(f"{entry.uri}  (90a, key {entry.manifest['key']})")
        assert f"path       {entry.path}" in out
        assert "verified   yes (size and sha256 match the manifest)" in out
        assert "(matches this installation)" in out
        assert "nvcc_flags:" in out
    code, out, _ = run_cli(capsys, "cache", "show", entry.uri, "--json")
    assert [r["path"] for r in json.loads(out)["entries"]] == [str(entry.path)]
    code, _, err = run_cli(capsys, "cache", "show", "prefill_nothing")
    assert code == 1 and "no cache entry matches 'prefill_nothing'" in err


# ---- verify --------------------------------------------------------------------------------------

def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(bytes(data))
    os.replace(tmp, path)


def test_verify_catches_a_flipped_byte_and_fix_quarantines_it(capsys, three, cache_root, fake_nvcc):
    code, out, _ = run_cli(capsys, "cache", "verify")
    assert code == 0 and "verified 3 entries: 3 ok, 0 bad" in out

    bad = three[2]
    _flip(bad.library)
    code, out, _ = run_cli(capsys, "cache", "verify")
    assert code == 1
    assert f"BAD  {bad.path}\n     {bad.library.name} sha256" in out
    assert "2 ok, 1 bad (run `flashinfer-jit cache verify --fix` to quarantine them)" in out
    assert bad.path.exists()  # verify alone changes nothing

    code, out, _ = run_cli(capsys, "cache", "verify", "--fix", "--json")
    report = json.loads(out)
    assert code == 0 and report["bad"] == 1
    (item,) = [r for r in report["entries"] if not r["ok"]]
    assert item["fixed"] and item["action"].startswith(f"quarantined to {cache_root / 'quarantine'}")
    assert not bad.path.exists() and uris(cache_root) == sorted(s.uri for s in SPECS[:2])

    loader.clear_memo()
    loader.load(SPECS[2])  # the next load rebuilds it
    assert fake_nvcc.compiles == 4


def test_verify_reports_incomplete_entries_and_read_only_layers(capsys, three, cache_root, tmp_path, monkeypatch):
    stray = cache_root / "90a" / "merge_state_hd64_bf16-0123456789abcdef"
    stray.mkdir()
    (stray / "merge_state_hd64_bf16.so").write_bytes(b"\x7fELF half")
    prebuilt = tmp_path / "prebuilt"
    (prebuilt / "90a").mkdir(parents=True)
    import shutil
    shutil.copytree(three[0].path, prebuilt / "90a" / three[0].path.name)
    _flip(prebuilt / "90a" / three[0].path.name / three[0].library.name)
    monkeypatch.setenv("FLASHINFER_JIT_PREBUILT_DIRS", str(prebuilt))
    code, out, _ = run_cli(capsys, "cache", "verify", "--fix", "--json")
    report = json.loads(out)
    assert code == 1  # the read-only layer's bad entry cannot be fixed here
    bad = {r["path"]: r for r in report["entries"] if not r["ok"]}
    assert bad[str(stray)]["problem"] == "no readable manifest.json" and bad[str(stray)]["fixed"]
    ro = bad[str(prebuilt / "90a" / three[0].path.name)]
    assert not ro["fixed"] and ro["action"].startswith("left alone (read-only layer)")
    assert not stray.exists() and (prebuilt / "90a" / three[0].path.name).exists()


# ---- clear ---------------------------------------------------------------------------------------

def test_clear_needs_yes_when_not_interactive(capsys, three, cache_root, monkeypatch):
    monkeypatch.setattr(sys, "stdin", open(os.devnull))
    code, _, err = run_cli(capsys, "cache", "clear")
    assert code == 1 and "run `flashinfer-jit cache clear --yes` to confirm" in err
    assert len(uris(cache_root)) == 3


def test_clear_everything(capsys, three, cache_root):
    (cache_root / "quarantine").mkdir()
    (cache_root / "quarantine" / "merge_state_hd64_fp16-00.1.2").mkdir()
    code, out, _ = run_cli(capsys, "cache", "clear", "--yes")
    assert code == 0
    assert "clear: removed 4 entries and 0 leftover build dir(s)" in out
    assert uris(cache_root) == [] and list((cache_root / "quarantine").iterdir()) == []
    assert list((cache_root / "tmp").iterdir()) == []  # removals leave nothing behind


def test_clear_by_uri_glob(capsys, three, cache_root):
    code, out, _ = run_cli(capsys, "cache", "clear", "--uri", "*hd128*", "--yes")
    assert code == 0 and "removed 1 entry" in out
    assert uris(cache_root) == ["merge_state_hd256_fp16", "merge_state_hd64_fp16"]
    code, out, _ = run_cli(capsys, "cache", "clear", "--uri", "prefill_*", "--yes")
    assert code == 0 and out.startswith("nothing to remove")


def test_clear_older_than_goes_by_last_use(capsys, three, cache_root):
    old, old_but_used, new = three
    age(old, built_days=10, used_days=9)
    age(old_but_used, built_days=10, used_days=1)
    age(new, built_days=2, used_days=None)
    code, out, _ = run_cli(capsys, "cache", "clear", "--older-than", "7d", "--dry-run")
    assert code == 0 and f"would remove {old.path}" in out and uris(cache_root) == sorted(s.uri for s in SPECS)
    code, out, _ = run_cli(capsys, "cache", "clear", "--older-than", "7d", "--yes", "--json")
    assert [r["path"] for r in json.loads(out)["removed"]] == [str(old.path)]
    assert uris(cache_root) == sorted([old_but_used.uri, new.uri])
    code, out, _ = run_cli(capsys, "cache", "clear", "--older-than", "36h", "--yes")
    assert uris(cache_root) == [old_but_used.uri]
    with pytest.raises(SystemExit):
        cli.main(["cache", "clear", "--older-than"])
    code, _, err = run_cli(capsys, "cache", "clear", "--older-than", "a week", "--yes")
    assert code == 1 and "cannot read duration 'a week'" in err


# ---- prune ---------------------------------------------------------------------------------------

def test_prune_removes_least_recently_used_first(capsys, three, cache_root):
    a, b, c = three
    age(a, built_days=5, used_days=1)
    age(b, built_days=5, used_days=3)
    age(c, built_days=5, used_days=None)  # never loaded: its last activity is its build, 5 days ago
    sizes = {e.path: cache.tree_bytes(e.path) for e in three}
    total = sum(sizes.values())
    code, out, _ = run_cli(capsys, "cache", "prune", "--max-size", str(total - 1), "--json")
    assert code == 0
    assert [r["path"] for r in json.loads(out)["removed"]] == [str(c.path)]  # one is enough
    code, out, _ = run_cli(capsys, "cache", "prune", "--max-size", str(sizes[a.path]))
    assert f"removed {b.path}" in out and "prune to" in out
    assert uris(cache_root) == [a.uri]
    code, out, _ = run_cli(capsys, "cache", "prune", "--max-size", "2G")
    assert "removed 0 entries" in out and uris(cache_root) == [a.uri]


def test_prune_takes_quarantine_first(capsys, three, cache_root):
    layer(cache_root).quarantine(three[0], "test")
    code, out, _ = run_cli(capsys, "cache", "prune", "--max-size", "1", "--dry-run", "--json")
    removed = [r["path"] for r in json.loads(out)["removed"]]
    assert removed[0].startswith(str(cache_root / "quarantine")) and len(removed) == 3


@pytest.mark.parametrize("size, expected", [("2G", 2 << 30), ("500M", 500 << 20), ("1.5GiB", int(1.5 * (1 << 30))),
                                            ("4096", 4096), ("10kb", 10240)])
def test_sizes(size, expected):
    assert cache.parse_size(size) == expected


def test_bad_size(capsys, cache_root):
    code, _, err = run_cli(capsys, "cache", "prune", "--max-size", "lots")
    assert code == 1 and "cannot read size 'lots'" in err


# ---- leftover build dirs -------------------------------------------------------------------------

def test_prune_and_clear_remove_build_dirs_older_than_an_hour_unless_locked(capsys, three, cache_root):
    tmp = cache_root / "tmp"
    old = tmp / "merge_state_hd64_fp16-aaaaaaaaaaaaaaaa.x1"
    fresh = tmp / "merge_state_hd64_fp16-bbbbbbbbbbbbbbbb.x2"
    busy = tmp / "merge_state_hd64_fp16-cccccccccccccccc.x3"
    for d in (old, fresh, busy):
        (d / "src").mkdir(parents=True)
        (d / "src" / "merge_state.cu").write_text("// half a build\n")
        (d / "lock").write_text("")  # torch's baton, left by a killed build
    two_hours_ago = time.time() - 7200
    for d in (old, busy):
        for p in [d, *d.rglob("*")]:
            os.utime(p, (two_hours_ago, two_hours_ago))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import filelock, sys, time; l = filelock.FileLock(sys.argv[1]); l.acquire(); "
         "print('locked', flush=True); time.sleep(60)", str(cache_root / "locks" / "merge_state_hd64_fp16-cccccccccccccccc.lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert layer(cache_root).stale_tmp_dirs() == [old]
        code, out, _ = run_cli(capsys, "cache", "prune", "--max-size", "2G")
        assert code == 0 and f"removed {old}" in out and "1 leftover build dir(s)" in out
    finally:
        holder.kill()
        holder.wait()
    assert not old.exists() and fresh.exists() and busy.exists()
    code, out, _ = run_cli(capsys, "cache", "clear", "--uri", "nothing-matches", "--yes")
    assert f"removed {busy}" in out and not busy.exists() and fresh.exists()


# ---- last used -----------------------------------------------------------------------------------

def test_last_used_is_touched_once_per_process_and_never_the_library(fake_nvcc, cache_root):
    kernel = loader.load(SPECS[0])
    stamp = kernel.entry.path / cache.LAST_USED
    assert stamp.is_file() and stamp.stat().st_size == 0
    lib_before = (kernel.entry.library.stat().st_mtime_ns, cache.sha256_file(kernel.entry.library))
    manifest_before = (kernel.entry.path / cache.MANIFEST).read_bytes()
    past = time.time() - 3 * DAY
    os.utime(stamp, (past, past))
    loader.clear_memo()
    loader.load(SPECS[0])  # same process: not touched again
    assert abs(stamp.stat().st_mtime - past) < 1
    cache._touched.clear()  # as a new process
    loader.clear_memo()
    loader.load(SPECS[0])
    assert time.time() - stamp.stat().st_mtime < 60
    assert (kernel.entry.library.stat().st_mtime_ns, cache.sha256_file(kernel.entry.library)) == lib_before
    assert (kernel.entry.path / cache.MANIFEST).read_bytes() == manifest_before


def test_last_used_failure_is_ignored(fake_nvcc, cache_root, monkeypatch):
    real_open = os.open

    def failing_open(path, flags, *args, **kwargs):
        if str(path).endswith(cache.LAST_USED):
            raise OSError(28, "No space left on device")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(cache.os, "open", failing_open)
    kernel = loader.load(SPECS[1])
    assert not (kernel.entry.path / cache.LAST_USED).exists()


# ---- --cache-dir everywhere ----------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["config", "--json"], ["prebuild", "--family", "merge", "--head-dim", "64", "--dtype", "fp16", "--json"],
    ["cache", "list", "--json"], ["cache", "show", "merge_state_hd64_fp16", "--json"], ["cache", "verify", "--json"],
    ["cache", "prune", "--max-size", "1G", "--json"], ["cache", "clear", "--yes", "--json"],
], ids=lambda argv: "-".join(a for a in argv[:2] if not a.startswith("-")))
def test_every_command_takes_cache_dir(capsys, argv, fake_nvcc, tmp_path, cache_root):
    other = tmp_path / "other-cache"
    loader.load(SPECS[0])  # in the default cache: must not be what the commands see
    layer_count = len(list(layer(cache_root).entries()))
    if argv[0] == "cache":
        cli.main(["prebuild", "--family", "merge", "--head-dim", "64", "--dtype", "fp16", "--cache-dir", str(other)])
        capsys.readouterr()
    code, out, _ = run_cli(capsys, *argv, "--cache-dir", str(other))
    assert code == 0, out
    assert str(other) in out and str(cache_root) not in out
    assert len(list(layer(cache_root).entries())) == layer_count
