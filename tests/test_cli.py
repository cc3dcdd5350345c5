"""`flashinfer-jit` CLI, in process (main(argv)) and as the real commands. No GPU needed."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli, subprocess_env
from flashinfer_jit import cli, loader, toolchain
from flashinfer_jit.spec import MergeStateSpec




def test_config_json_reports_versions_archs_layers_and_gpu(capsys, no_gpu, monkeypatch, tmp_path, cache_root):
    prebuilt = [tmp_path / "pre1", tmp_path / "pre2"]
    prebuilt[0].mkdir()
    monkeypatch.setenv("FLASHINFER_JIT_PREBUILT_DIRS", ":".join(map(str, prebuilt)))
    monkeypatch.setenv("FLASHINFER_JIT_ARCH", "9.0,8.0")
    code, out, _ = run_cli(capsys, "config", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["package"]["version"] == cli.__version__
    assert report["torch"]["version"] == cli.torch.__version__
    assert report["torch"]["cuda"] == cli.torch.version.cuda
    assert report["target_archs"] == {"value": ["80", "90a"], "source": "FLASHINFER_JIT_ARCH=9.0,8.0"}
    assert report["nvcc_flags"][-2:] == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]
    assert [(l["path"], l["writable"], l["exists"]) for l in report["cache_layers"]] == [
        (str(prebuilt[0]), False, True), (str(prebuilt[1]), False, False), (str(cache_root), True, False)]
    assert [l["problem"] for l in report["cache_layers"]] == [None, None, None]
    assert report["errors"] == {}
    assert report["gpus"] == []
    assert not cache_root.exists()  # config only looks


def test_config_text_names_every_section(capsys, no_gpu):
    code, out, _ = run_cli(capsys, "config")
    assert code == 0
    for label in ("package", "torch", "CUDA_HOME", "nvcc version", "target archs", "GPUs", "cache layers"):
        assert label in out
    assert "none visible" in out
    assert "90a (default: no GPU visible" in out


def test_config_names_each_gpus_prefill_backend(capsys, monkeypatch):
    """On a Hopper card `auto` runs the sm90 kernel, on others the FA2-class one: config says which."""
    import torch

    from flashinfer_jit import kernels
    cards = {0: ("NVIDIA H200", (9, 0)), 1: ("NVIDIA A100", (8, 0))}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: cards[i][0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: cards[getattr(i, "index", i) or 0][1])
    monkeypatch.setattr(kernels, "_capabilities", {})
    code, out, _ = run_cli(capsys, "config", "--json")
    assert code == 0
    gpus = json.loads(out)["gpus"]
    assert [(g["name"], g["capability"], g["prefill_backend"]) for g in gpus] == [
        ("NVIDIA H200", "9.0", "sm90"), ("NVIDIA A100", "8.0", "fa2")]


def test_config_counts_cache_entries(capsys, fake_nvcc, cache_root, no_gpu):
    loader.load(MergeStateSpec(128, "bf16"))
    code, out, _ = run_cli(capsys, "config", "--json")
    layer = json.loads(out)["cache_layers"][-1]
    assert layer["bytes"] == sum(p.stat().st_size for p in cache_root.rglob("*") if p.is_file())
    assert {k: v for k, v in layer.items() if k != "bytes"} == {
        "path": str(cache_root), "writable": True, "exists": True, "entries": 1, "problem": None}
    assert json.loads(out)["nvcc"]["version"].startswith("Cuda compilation tools, release 99.9")


def test_config_without_a_toolkit_says_why(capsys, monkeypatch, tmp_path, no_gpu):
    empty = tmp_path / "bin"
    empty.mkdir()
    for name in ("CUDA_HOME", "CUDA_PATH", "FLASHINFER_JIT_NVCC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(toolchain, "DEFAULT_CUDA_HOMES", ())
    toolchain._resolve_cuda_home.cache_clear()
    code, out, _ = run_cli(capsys, "config")
    assert code == 0
    assert "CUDA_HOME      unavailable: no CUDA toolkit (nvcc) found. Searched:" in out
    assert "nvcc version   unavailable" in out


def test_config_survives_bad_settings(capsys, monkeypatch, no_gpu):
    monkeypatch.setenv("FLASHINFER_JIT_ARCH", "hopper")
    monkeypatch.setenv("FLASHINFER_JIT_LOCK_TIMEOUT", "soon")
    code, out, _ = run_cli(capsys, "config")
    assert code == 0
    assert "target archs   unavailable: FLASHINFER_JIT_ARCH='hopper': cannot read CUDA arch 'hopper'" in out
    assert "FLASHINFER_JIT_LOCK_TIMEOUT='soon'" in out


def test_a_command_is_one_registered_function(capsys):
    calls = []

    @cli.command("hello", "say hello", lambda p: p.add_argument("--name", default="world"))
    def hello(args):
        calls.append(args.name)
        return 7

    try:
        assert run_cli(capsys, "hello", "--name", "jit")[0] == 7
        assert calls == ["jit"]
        assert "hello" in cli.build_parser().format_help()
        with pytest.raises(ValueError, match="registered twice"):
            cli.command("hello", "again")(hello)
    finally:
        del cli.COMMANDS["hello"]


def test_library_errors_exit_1_with_a_message_not_a_traceback(capsys):
    @cli.command("boom", "fail")
    def boom(args):
        raise cli.FlashInferJITError("the cache is on fire")

    try:
        code, out, err = run_cli(capsys, "boom")
    finally:
        del cli.COMMANDS["boom"]
    assert code == 1
    assert err.strip() == "flashinfer-jit: error: the cache is on fire"


def test_usage_errors(capsys):
    with pytest.raises(SystemExit) as excinfo:
        cli.main([])
    assert excinfo.value.code == 2
    assert "COMMAND" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["no-such-command"])


def test_python_dash_m(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flashinfer_jit", "config", "--json"], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["package"]["name"] == "flashinfer-jit"


def test_console_script(tmp_path):
    script = Path(sys.executable).parent / "flashinfer-jit"
    if not script.exists():
        pytest.skip(f"{script} is not installed (`make test` installs it with pip install -e)")
    proc = subprocess.run([str(script), "config"], env=subprocess_env(), capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("package        flashinfer-jit ")
    version = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert version.stdout.strip() == f"flashinfer-jit {cli.__version__}"
