"""What a person sees from `flashinfer-jit`: no warning on a clean install, one log prefix, a closed
pipe ends quietly, every --json output is one object of the documented shape, every command a
message suggests pastes as-is, and the first slow lazy build says what it is doing. No GPU needed."""
from __future__ import annotations

import errno
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib

import pytest

from conftest import REPO, run_cli, subprocess_env
from flashinfer_jit import cache, cli, loader, toolchain
from flashinfer_jit.spec import MergeStateSpec

SPECS = [MergeStateSpec(64, "fp16"), MergeStateSpec(128, "fp16")]




@pytest.fixture
def warm(fake_nvcc, cache_root) -> list[cache.Entry]:
    entries = [loader.load(s).entry for s in SPECS]
    loader.clear_memo()
    return entries


def _cli_process(*argv: str, **kwargs) -> subprocess.Popen:
    # Warnings as a user gets them: no PYTHONWARNINGS=ignore (subprocess_env sets it for other tests).
    return subprocess.Popen([sys.executable, "-m", "flashinfer_jit", *argv], env=subprocess_env(PYTHONWARNINGS=None),
                            text=True, **kwargs)


# ---- quiet ---------------------------------------------------------------------------------------

def test_numpy_is_a_dependency():
    """torch warns "Failed to initialize NumPy" at import without it: every command started so."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert any(re.match(r"numpy\b", d) for d in project["dependencies"]), project["dependencies"]
    assert "matplotlib" not in " ".join(project["dependencies"])  # the charts' library is the `bench` extra
    assert any(d.startswith("matplotlib") for d in project["optional-dependencies"]["bench"])


COMMANDS = [
    ("--version",), ("config",), ("config", "--json"), ("prebuild", "--family", "merge", "--dry-run"),
    ("prebuild", "--family", "merge", "--dtype", "bf16", "--head-dim", "64", "--json"), ("cache", "list"),
    ("cache", "list", "--json"), ("cache", "show", SPECS[0].uri), ("cache", "verify"),
    ("cache", "clear", "--dry-run"), ("cache", "prune", "--max-size", "1G", "--dry-run"),
]


def test_no_command_prints_a_warning(warm, fake_nvcc):
    procs = [(argv, _cli_process(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)) for argv in COMMANDS]
    for argv, proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, (argv, err)
        assert not re.search(r"\w*Warning\b", err), (argv, err)
        if "--json" not in argv and argv[0] != "prebuild":
            assert err == "", (argv, err)


def test_log_lines_carry_the_prefix_once(fake_nvcc, cache_root, caplog):
    proc = _cli_process("-v", "prebuild", "--family", "merge", "--dtype", "bf16", "--head-dim", "64",
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    logged = [line for line in err.splitlines() if line.startswith(("INFO ", "DEBUG ", "WARNING "))]
    assert any("building merge_state_hd64_bf16" in line for line in logged), err
    for line in logged:
        assert len(re.findall(r"flashinfer[-_]jit:", line)) == 1, line
    # and the library's own records never start with the name the logger already carries
    caplog.set_level("DEBUG", logger="flashinfer_jit")
    loader.load(MergeStateSpec(256, "bf16"))
    assert caplog.records and not [r.getMessage() for r in caplog.records
                                   if r.getMessage().lower().startswith("flashinfer")]


@pytest.mark.parametrize("argv", [("config",), ("cache", "list"), ("cache", "list", "--json")],
                         ids=["config", "cache-list", "cache-list-json"])
def test_a_closed_pipe_ends_the_command_quietly(argv, warm):
    """`flashinfer-jit cache list | head` with the reader gone before the first write: the exit status
    of a tool that SIGPIPE ended (141), and nothing on stderr (no BrokenPipeError traceback)."""
    proc = _cli_process(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader has gone (before the process wrote anything: it is still importing)
    err = proc.stderr.read()
    proc.wait(timeout=180)
    assert proc.returncode == cli.BROKEN_PIPE_STATUS == 141, err
    assert err == ""


# ---- JSON ----------------------------------------------------------------------------------------

JSON_COMMANDS = {
    "config": ["config", "--json"],
    "prebuild": ["prebuild", "--family", "merge", "--dtype", "bf16", "--json"],
    "cache list": ["cache", "list", "--json"],
    "cache show": ["cache", "show", SPECS[0].uri, "--json"],
    "cache verify": ["cache", "verify", "--json"],
    "cache clear": ["cache", "clear", "--dry-run", "--json"],
    "cache prune": ["cache", "prune", "--max-size", "0", "--dry-run", "--json"],
}


def _help(command: str) -> str:
    parser = cli.build_parser()
    sub = parser._subparsers._group_actions[0].choices[command.split()[0]]
    if " " in command:
        sub = sub._subparsers._group_actions[0].choices[command.split()[1]]
    return " ".join(sub.format_help().split())


def _bare_wrappers(value, where="") -> list[str]:
    """Paths of {"value": x} objects that carry nothing else."""
    found = []
    if isinstance(value, dict):
        if set(value) == {"value"}:
            found.append(where)
        for k, v in value.items():
            found += _bare_wrappers(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _bare_wrappers(v, f"{where}[{i}]")
    return found


def test_every_command_covers_the_json_table():
    assert set(JSON_COMMANDS) == set(cli.JSON_KEYS)


@pytest.mark.parametrize("command", list(JSON_COMMANDS))
def test_json_output_is_one_object_with_a_schema_and_the_keys_its_help_lists(command, capsys, warm, no_gpu):
    code, out, _ = run_cli(capsys, *JSON_COMMANDS[command])
    assert code == 0
    obj = json.loads(out)  # the whole of stdout: one JSON document
    assert isinstance(obj, dict)
    assert obj["schema"] == cli.JSON_SCHEMA == 1
    assert tuple(obj) == cli.JSON_KEYS[command]
    assert _bare_wrappers(obj) == []
    help_text = _help(command)
    assert "one JSON object" in help_text
    assert "with the keys " + ", ".join(cli.JSON_KEYS[command]) in help_text


def test_json_values_are_plain_and_sources_ride_along(capsys, no_gpu, monkeypatch, cache_root):
    monkeypatch.setenv("FLASHINFER_JIT_ARCH", "hopper")
    monkeypatch.setenv("MAX_JOBS", "3")
    monkeypatch.setattr(toolchain, "_available_memory", lambda: 64 * 1024**3)
    code, out, _ = run_cli(capsys, "config", "--json")
    report = json.loads(out)
    assert report["jobs"] == {"value": 3, "source": "MAX_JOBS=3"}
    assert report["target_archs"] == {"value": None, "source": None}
    assert report["nvcc_flags"] is None
    assert report["errors"]["target_archs"].startswith("FLASHINFER_JIT_ARCH='hopper': cannot read CUDA arch")
    assert isinstance(report["lock_timeout_s"], float) and isinstance(report["build_disabled"], bool)
    assert isinstance(report["cuda_home"], (str, type(None))) and isinstance(report["nvcc"]["path"], (str, type(None)))


def test_clear_with_nothing_to_remove_still_prints_json(capsys, cache_root):
    code, out, _ = run_cli(capsys, "cache", "clear", "--yes", "--json")
    assert code == 0 and json.loads(out) == {"schema": 1, "cache_dir": str(cache_root), "dry_run": False,
                                             "bytes": 0, "removed": []}


# ---- suggested commands paste as-is --------------------------------------------------------------

def _suggested(text: str) -> list[str]:
    return re.findall(r"`(flashinfer-jit [^`]+)`", text)


def _paste(command: str) -> int:
    argv = shlex.split(command)
    assert argv[0] == "flashinfer-jit"
    return cli.main(argv[1:])


def test_verify_suggests_fix_for_the_cache_it_checked(capsys, fake_nvcc, cache_root, tmp_path, monkeypatch):
    other = tmp_path / "other-cache"
    monkeypatch.setenv("FLASHINFER_JIT_CACHE_DIR", str(other))
    entry = loader.load(SPECS[0]).entry
    loader.clear_memo()
    monkeypatch.setenv("FLASHINFER_JIT_CACHE_DIR", str(cache_root))  # the default cache is another one
    data = bytearray(entry.library.read_bytes())
    data[len(data) // 2] ^= 0xFF
    entry.library.with_name("x").write_bytes(bytes(data))
    os.replace(entry.library.with_name("x"), entry.library)

    code, out, _ = run_cli(capsys, "cache", "verify", "--cache-dir", str(other))
    assert code == 1
    (command,) = _suggested(out)
    assert command == f"flashinfer-jit cache verify --cache-dir {other} --fix"
    assert _paste(command) == 0
    capsys.readouterr()
    assert not entry.path.exists() and len(list((other / "quarantine").iterdir())) == 1


def test_clear_suggests_the_same_command_with_yes(capsys, warm, cache_root, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdin", open(os.devnull))
    monkeypatch.setenv("FLASHINFER_JIT_CACHE_DIR", str(tmp_path / "elsewhere"))
    code, _, err = run_cli(capsys, "cache", "clear", "--uri", "*hd64*", "--cache-dir", str(cache_root))
    assert code == 1
    (command,) = _suggested(err)
    assert command == f"flashinfer-jit cache clear --uri '*hd64*' --cache-dir {cache_root} --yes"
    assert _paste(command) == 0
    capsys.readouterr()
    assert [e.uri for e in cache.CacheLayer(cache_root, True).entries()] == [SPECS[1].uri]


def test_show_miss_points_at_the_same_cache(capsys, cache_root, tmp_path):
    code, _, err = run_cli(capsys, "cache", "show", "nothing-here", "--cache-dir", str(tmp_path / "c"))
    assert code == 1 and _suggested(err) == [f"flashinfer-jit cache list --cache-dir {tmp_path / 'c'}"]


def test_cache_write_error_commands_name_the_cache(fake_nvcc, tmp_path, monkeypatch, capsys):
    root = tmp_path / "full cache"  # a space: the command must quote it
    monkeypatch.setenv("FLASHINFER_JIT_CACHE_DIR", str(root))
    layer = cache.CacheLayer(root, writable=True)
    text = str(cache.write_error(layer, "kernel 'k'", errno.ENOSPC))
    commands = _suggested(text)
    assert commands == [f"flashinfer-jit cache prune --max-size 2G --cache-dir '{root}'",
                        f"flashinfer-jit cache clear --cache-dir '{root}'"]
    root.mkdir()
    (root / "90a").mkdir()
    for command in commands:
        assert _paste(command + (" --yes" if " clear " in command else "")) == 0
        out = capsys.readouterr().out
        assert f"in {root}" in out, out  # acted on that cache, not on FLASHINFER_JIT_CACHE_DIR's
    assert "free space" not in str(cache.write_error(layer, "kernel 'k'", errno.EROFS)).lower()


# ---- the first slow lazy build says so -----------------------------------------------------------

_LAZY = """
import sys
from flashinfer_jit import loader, spec
loader.SLOW_BUILD_NOTICE_S = float(sys.argv[1])
for head_dim in (64, 128):
    loader.load(spec.MergeStateSpec(head_dim, "fp16"))
print("loaded")
"""


def test_first_slow_lazy_build_prints_one_line(fake_nvcc, cache_root):
    fake_nvcc.behave(sleep=1.0)
    proc = subprocess.run([sys.executable, "-c", _LAZY, "0.3"], env=subprocess_env(), capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "loaded"
    assert proc.stderr.splitlines() == [
        f"flashinfer-jit: building kernel merge_state_hd64_fp16 (sm_90a) on first use; it is cached in {cache_root} "
        f"for next time (`flashinfer-jit prebuild` builds kernels ahead of time)"]


def test_fast_lazy_build_and_warm_load_print_nothing(fake_nvcc, cache_root):
    proc = subprocess.run([sys.executable, "-c", _LAZY, "2"], env=subprocess_env(), capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_slow_lazy_build_goes_to_logging_when_the_application_set_it_up(fake_nvcc, cache_root, monkeypatch,
                                                                        caplog, capsys):
    monkeypatch.setattr(loader, "SLOW_BUILD_NOTICE_S", 0.2)
    monkeypatch.setitem(loader._notice, "given", False)
    fake_nvcc.behave(sleep=0.8)
    caplog.set_level("INFO", logger="flashinfer_jit")  # pytest's handler: logging is configured
    loader.load(SPECS[0])
    loader.load(SPECS[1])
    notices = [r.getMessage() for r in caplog.records if "on first use" in r.getMessage()]
    assert notices == [f"building kernel {SPECS[0].uri} (sm_90a) on first use; it is cached in {cache_root} for "
                       f"next time (`flashinfer-jit prebuild` builds kernels ahead of time)"]
    assert "on first use" not in capsys.readouterr().err
