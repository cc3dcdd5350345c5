"""`flashinfer-jit prebuild`: matrix expansion, filters, aliases, config files, dry runs, parallel
builds with the fake compiler, failures, and the MissingKernelError command run end to end. The last
tests build two real variants with nvcc (slow, CPU only)."""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import requires_nvcc, run_cli, subprocess_env
from flashinfer_jit import cache, cli, loader, prebuild, spec, toolchain
from flashinfer_jit.errors import MissingKernelError
from flashinfer_jit.spec import AppendPagedSpec, MergeStateSpec, PrefillSpec




TILES = "_fa2_kv64_q128x64x16"  # backend and default tiles in a prefill URI (head_dim 64 and 128)
SM90 = "_sm90_kv128_q128"  # the same for the Hopper backend


def uris(specs) -> list[str]:
    return [s.uri for s in specs]


# ---- the matrix comes from the spec classes ------------------------------------------------------

def test_whole_matrix_is_every_supported_variant_of_every_family():
    expected = [s for cls in spec.FAMILIES.values() for s in cls.supported()]
    assert prebuild.expand() == expected
    assert len(expected) == len(set(expected))


def test_options_are_the_spec_fields_and_their_choices():
    options = prebuild.matrix_options()
    for cls in spec.FAMILIES.values():
        for f in spec.matrix_fields(cls):
            assert set(f.metadata["choices"]) <= set(options[f.name])
    derived = {f.name for cls in spec.FAMILIES.values() for f in dataclasses.fields(cls)} - set(options)
    # tile shapes (their defaults) and a user variant's code: not matrix options
    assert derived == {"kv_tile", "cta_q_options", "custom"}
    parser = cli.build_parser()
    help_text = parser._subparsers._group_actions[0].choices["prebuild"].format_help()
    for name in options:
        assert f"--{name.replace('_', '-')}" in help_text
    assert "--layout" in help_text


def test_filters_narrow_each_family_that_has_the_field():
    specs = prebuild.expand(["prefill"], {"layout": "ragged", "head_dim": "64,128", "dtype": "bf16",
                                          "causal": "true"})
    # both backends (ragged has an sm90 kernel), in the matrix's order
    assert uris(specs) == [f"prefill_ragged_hd64_bf16_causal{TILES}", f"prefill_ragged_hd64_bf16_causal{SM90}",
                           f"prefill_ragged_hd128_bf16_causal{TILES}", f"prefill_ragged_hd128_bf16_causal{SM90}"]
    assert uris(prebuild.expand(["prefill"], {"layout": "ragged", "head_dim": 128, "dtype": "bf16", "causal": "true",
                                              "backend": "fa2"})) == [f"prefill_ragged_hd128_bf16_causal{TILES}"]

    mixed = prebuild.expand(["prefill", "merge"], {"dtype": "fp16", "layout": "ragged", "head_dim": 64})
    assert uris(mixed) == [f"prefill_ragged_hd64_fp16_full{TILES}", f"prefill_ragged_hd64_fp16_full{SM90}",
                           f"prefill_ragged_hd64_fp16_causal{TILES}", f"prefill_ragged_hd64_fp16_causal{SM90}",
                           "merge_state_hd64_fp16"]  # --layout leaves merge_state alone


def test_opt_in_rope_alibi_and_fp8_kv_variants():
    """--rope, --alibi, --kv-dtype (issue #16) name opt-in variants: outside the default matrix, in it when
    named, with their aliases (e4m3 / float8_e4m3fn / same); fused RoPE and fp8 K/V only on the fa2 backend
    (the matrix leaves out the sm90 combinations instead of failing), and append_paged gets the fp8 cache."""
    assert not any(getattr(s, "rope", False) or getattr(s, "alibi", False) or getattr(s, "kv_dtype", "")
                   for s in prebuild.expand())
    fp8 = prebuild.expand(["decode", "append"], {"head_dim": 128, "dtype": "bf16", "kv_dtype": "e4m3,float8_e5m2",
                                                 "rope": "true,false"})
    assert uris(fp8) == [
        "prefill_paged_hd128_bf16_full_fa2_fp8e4m3_kv64_q128x64x16",
        "prefill_paged_hd128_bf16_full_fa2_fp8e5m2_kv64_q128x64x16",
        "prefill_paged_hd128_bf16_full_fa2_rope_fp8e4m3_kv64_q128x64x16",
        "prefill_paged_hd128_bf16_full_fa2_rope_fp8e5m2_kv64_q128x64x16",
        "append_paged_hd128_bf16_fp8e4m3", "append_paged_hd128_bf16_fp8e5m2"]
    alibi = prebuild.expand(["prefill"], {"layout": "ragged", "head_dim": 128, "dtype": "bf16", "causal": "true",
                                          "alibi": "true"})
    assert {s.backend for s in alibi} == {"fa2", "sm90"} and all(s.alibi and not s.rope for s in alibi)
    same = prebuild.expand(["append"], {"head_dim": 64, "dtype": "fp16", "kv_dtype": "same"})
    assert uris(same) == ["append_paged_hd64_fp16"]


def test_paged_layouts_share_one_variant_and_the_matrix_still_covers_every_wrapper_combination():
    """paged_nhd and paged_hnd render the same kernel (the page layout is a run-time stride), so the
    matrix has one paged variant where it had two: prefill 36 -> 24 per backend (fa2 and sm90: 48), all
    families 72 (with merge_state's 6, append's 6 and rope's 12). Every (layout, head_dim, dtype, causal)
    a wrapper can ask for, under either spelling, is still in it."""
    everything = prebuild.expand()
    assert len(prebuild.expand(["prefill"])) == 48 and len(everything) == 72
    assert len(prebuild.expand(["rope"])) == 12
    assert len(prebuild.expand(["prefill"], {"backend": "sm90"})) == 24
    assert len(set(everything)) == len(everything)
    for layout, head_dim, dtype, causal in itertools.product(("ragged", "paged_nhd", "paged_hnd"), spec.HEAD_DIMS,
                                                             spec.DTYPES, (False, True)):
        wanted = PrefillSpec(layout, head_dim, dtype, causal)
        assert wanted in everything, wanted
        assert prebuild.expand(["prefill"], {"layout": layout, "head_dim": head_dim, "dtype": dtype,
                                             "causal": causal, "backend": "fa2"}) == [wanted]
    assert PrefillSpec("paged_nhd", 128, "bf16", False) == PrefillSpec("paged_hnd", 128, "bf16", False)
    assert PrefillSpec("paged_hnd", 128, "bf16", False).uri == f"prefill_paged_hd128_bf16_full{TILES}"
    config = {"family": "decode", "layout": ["paged_nhd", "paged_hnd"], "head_dim": 64, "backend": "fa2"}
    assert uris(prebuild.expand_matrices([config])) == [f"prefill_paged_hd64_fp16_full{TILES}",
                                                        f"prefill_paged_hd64_bf16_full{TILES}"]


def test_family_aliases():
    merge = prebuild.expand(["merge"])
    assert merge == list(MergeStateSpec.supported()) == prebuild.expand(["merge_state"])
    assert prebuild.expand(["append"]) == list(AppendPagedSpec.supported())
    assert prebuild.expand(["prefill"]) == list(PrefillSpec.supported())
    decode = prebuild.expand(["decode"])
    assert len(decode) == len(spec.HEAD_DIMS) * len(spec.DTYPES)  # one kernel for NHD and HND
    assert {s.kv_layout for s in decode} == {"paged"} and {s.causal for s in decode} == {False}
    # comma lists, duplicates collapse
    assert prebuild.expand(["merge,merge_state"]) == merge


@pytest.mark.parametrize("families, filters, message", [
    (["attention"], {}, "unknown kernel family 'attention'; known: merge_state, prefill, append_paged, rope, merge"),
    (["prefill"], {"head_dim": "96"}, "--head-dim: '96' is not supported; supported: 64, 128, 256"),
    (["prefill"], {"causal": "maybe"}, "--causal: 'maybe' is not true or false"),
    (["prefill"], {"layout": "paged_xyz"},
     "--kv-layout: 'paged_xyz' is not supported; supported: ragged, paged (or paged_nhd, paged_hnd)"),
    (["merge"], {"layout": "ragged"}, "--kv-layout does not apply to the selected families (merge_state)"),
    (["decode"], {"causal": "true"}, "no kernel variant matches"),
    (["prefill"], {"page_size": "16"}, "unknown option 'page_size'"),
])
def test_bad_options_say_what_is_supported(families, filters, message):
    with pytest.raises(ValueError) as excinfo:
        prebuild.expand(families, filters)
    assert message in str(excinfo.value)


def test_arch_lists_and_fat_binaries():
    """One --arch (a string) is one library; a list (the option repeated) is one build per item."""
    assert prebuild.parse_archs("90a,80") == [("80", "90a")]
    assert prebuild.parse_archs("9.0;sm_80") == [("80", "90a")]
    assert prebuild.parse_archs("90a+80") == [("80", "90a")]
    assert prebuild.parse_archs(["80+90a", "90a"]) == [("80", "90a"), ("90a",)]
    assert prebuild.parse_archs(["90a", "80", "9.0"]) == [("90a",), ("80",)]
    with pytest.raises(ValueError, match="sm_80 or newer"):
        prebuild.parse_archs("75")


def test_config_file_with_sub_matrices(tmp_path):
    path = tmp_path / "matrix.json"
    path.write_text(json.dumps({
        "dtype": "bf16", "arch": "90a", "jobs": 3, "cache-dir": "/somewhere",
        "matrix": [{"family": "prefill", "layout": "ragged", "head_dim": [128], "causal": True},
                   {"family": "merge", "head_dim": [64, 128]}],
    }))
    config = prebuild.load_config(path)
    assert config["arch"] == "90a" and config["jobs"] == 3 and config["cache_dir"] == "/somewhere"
    assert uris(prebuild.expand_matrices(config["matrices"])) == [
        f"prefill_ragged_hd128_bf16_causal{TILES}", f"prefill_ragged_hd128_bf16_causal{SM90}", "merge_state_hd64_bf16",
        "merge_state_hd128_bf16"]

    path.write_text(json.dumps({"family": "merge", "head_dims": [64]}))
    with pytest.raises(ValueError, match="unknown key 'head_dims' in the top level"):
        prebuild.load_config(path)
    path.write_text(json.dumps({"family": "merge", "jobs": "8"}))
    with pytest.raises(ValueError, match='"jobs" must be an integer'):
        prebuild.load_config(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        prebuild.load_config(path)


def test_command_line_overrides_the_config_file(capsys, tmp_path, cache_root, no_gpu):
    path = tmp_path / "matrix.json"
    path.write_text(json.dumps({"family": "merge", "dtype": "fp16", "arch": "80"}))
    code, out, _ = run_cli(capsys, "prebuild", "--config", str(path), "--dtype", "bf16", "--dry-run")
    assert code == 0
    assert out.splitlines()[:3] == [
        "[1/3] would build merge_state_hd64_bf16 (sm_80)",
        "[2/3] would build merge_state_hd128_bf16 (sm_80)",
        "[3/3] would build merge_state_hd256_bf16 (sm_80)",
    ]


def test_jobs_are_capped_by_cores_memory_and_work(monkeypatch):
    monkeypatch.setattr(toolchain.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(toolchain, "_available_memory", lambda: 5 * toolchain.NVCC_JOB_BYTES + 1)
    assert prebuild.default_jobs(100) == 5          # memory: 5 nvccs fit
    assert prebuild.default_jobs(3) == 3            # only 3 to build
    assert prebuild.default_jobs(100, requested=2) == 2
    assert prebuild.default_jobs(100, requested=64) == 5
    monkeypatch.setattr(toolchain, "_available_memory", lambda: None)
    assert prebuild.default_jobs(100) == 16         # cores
    with pytest.raises(ValueError, match="--jobs"):
        prebuild.default_jobs(5, requested=0)


# ---- running it (fake compiler) ------------------------------------------------------------------

def test_dry_run_lists_and_writes_nothing(capsys, cache_root, fake_nvcc, no_gpu):
    code, out, _ = run_cli(capsys, "prebuild", "--family", "decode", "--head-dim", "128", "--dry-run")
    assert code == 0
    assert out.splitlines() == [
        f"[1/2] would build prefill_paged_hd128_fp16_full{TILES} (sm_90a)",
        f"[2/2] would build prefill_paged_hd128_bf16_full{TILES} (sm_90a)",
        f"dry run: 2 to build, 0 already cached, 2 in all (cache: {cache_root})",
    ]
    assert not cache_root.exists()
    assert fake_nvcc.compiles == 0


def test_sm90_variants_are_built_only_for_targets_with_sm_90a(capsys, cache_root, fake_nvcc, no_gpu):
    args = ("prebuild", "--family", "prefill", "--layout", "ragged", "--head-dim", "128", "--dtype", "bf16",
            "--causal", "true", "--dry-run")
    code, out, _ = run_cli(capsys, *args, "--arch", "80")
    assert code == 0 and out.splitlines()[:-1] == [f"[1/1] would build prefill_ragged_hd128_bf16_causal{TILES} (sm_80)"]
    code, out, _ = run_cli(capsys, *args, "--arch", "90a")
    assert code == 0 and out.splitlines()[:-1] == [
        f"[1/2] would build prefill_ragged_hd128_bf16_causal{TILES} (sm_90a)",
        f"[2/2] would build prefill_ragged_hd128_bf16_causal{SM90} (sm_90a)"]


def test_prebuild_builds_in_parallel_then_skips_everything(capsys, cache_root, fake_nvcc, no_gpu, tmp_path,
                                                           monkeypatch):
    timeline = tmp_path / "timeline.txt"
    monkeypatch.setenv("FAKE_NVCC_TIMELINE", str(timeline))
    fake_nvcc.behave(sleep=1.0)
    code, out, _ = run_cli(capsys, "prebuild", "--family", "merge", "--dtype", "bf16", "--arch", "90a", "--arch",
                           "80", "--jobs", "3")
    assert code == 0, out
    lines = out.splitlines()
    progress = [l for l in lines if l.startswith("[")]
    assert len(progress) == 6 and [l.split("]")[0] for l in progress] == [f"[{i}/6" for i in range(1, 7)]
    assert all(" built merge_state_hd" in l and l.endswith("KiB") for l in progress), progress
    assert {l.split(" (")[1].split(")")[0] for l in progress} == {"sm_90a", "sm_80"}
    assert "built 6, cached 0, failed 0 of 6 in" in out and "with 3 parallel job(s)" in out
    assert "disk used:" in out and "for these 6 kernels" in out
    assert fake_nvcc.compiles == 6
    assert sorted(p.name for p in cache_root.iterdir() if p.name not in ("locks", "tmp")) == ["80", "90a"]

    # the compiles overlapped: at some moment 3 were running
    events = sorted((float(t), +1 if what == "start" else -1)
                    for _, what, t in (line.split() for line in timeline.read_text().splitlines()))
    running, peak = 0, 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    assert peak == 3

    code, out, _ = run_cli(capsys, "prebuild", "--family", "merge", "--dtype", "bf16", "--arch", "90a", "--arch", "80")
    assert code == 0
    assert "built 0, cached 6, failed 0 of 6" in out
    assert sum(1 for l in out.splitlines() if " cached merge_state_" in l) == 6
    assert fake_nvcc.compiles == 6  # nothing compiled the second time


def test_failures_exit_1_with_the_compiler_tail_and_the_rest_still_builds(capsys, cache_root, fake_nvcc, no_gpu,
                                                                         monkeypatch):
    fake_nvcc.behave(fail="identifier 'bogus256' is undefined")
    monkeypatch.setenv("FAKE_NVCC_FAIL_MATCH", "hd256")
    code, out, _ = run_cli(capsys, "prebuild", "--family", "merge", "--dtype", "fp16")
    assert code == 1
    assert "built 2, cached 0, failed 1 of 3" in out
    failed = [l for l in out.splitlines() if l.startswith("[") and "FAILED" in l]
    assert len(failed) == 1 and "merge_state_hd256_fp16" in failed[0]
    assert failed[0].endswith("error: identifier 'bogus256' is undefined")
    assert "--- merge_state_hd256_fp16 (sm_90a) failed; full log:" in out
    assert "error: identifier 'bogus256' is undefined" in out
    assert [e.uri for e in cache.CacheLayer(cache_root, True).entries()] == [
        "merge_state_hd128_fp16", "merge_state_hd64_fp16"]


def test_json_report(capsys, cache_root, fake_nvcc, no_gpu):
    code, out, err = run_cli(capsys, "prebuild", "--family", "append", "--head-dim", "64", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["cache_dir"] == str(cache_root)
    assert report["summary"]["built"] == 2 and report["summary"]["total"] == 2 and report["summary"]["failed"] == 0
    assert sorted(k["uri"] for k in report["kernels"]) == ["append_paged_hd64_bf16", "append_paged_hd64_fp16"]
    for kernel in report["kernels"]:
        assert kernel["status"] == "built" and kernel["archs"] == ["90a"]
        assert Path(kernel["entry"]).is_dir() and kernel["disk_bytes"] == cache.tree_bytes(Path(kernel["entry"]))
    assert report["summary"]["disk_bytes"] == sum(k["disk_bytes"] for k in report["kernels"])
    assert err.count("] built append_paged_hd64_") == 2  # progress on stderr, JSON alone on stdout


def test_prebuild_ignores_disable_build_and_uses_cache_dir(capsys, tmp_path, fake_nvcc, no_gpu, monkeypatch):
    monkeypatch.setenv("FLASHINFER_JIT_DISABLE_BUILD", "1")
    target = tmp_path / "image-layer"
    code, out, _ = run_cli(capsys, "prebuild", "--family", "merge", "--head-dim", "64", "--dtype", "bf16",
                           "--cache-dir", str(target))
    assert code == 0, out
    assert [e.uri for e in cache.CacheLayer(target, False).entries()] == ["merge_state_hd64_bf16"]


def test_without_a_toolkit_prebuild_says_so(capsys, cache_root, monkeypatch, tmp_path, no_gpu):
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    for name in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(toolchain, "DEFAULT_CUDA_HOMES", ())
    toolchain._resolve_cuda_home.cache_clear()
    code, _, err = run_cli(capsys, "prebuild", "--family", "merge", "--head-dim", "64")
    assert code == 1
    assert "no CUDA toolkit (nvcc) found" in err
    assert not cache_root.exists()
    code, out, _ = run_cli(capsys, "prebuild", "--family", "merge", "--head-dim", "64", "--dry-run")
    assert code == 0 and "would build merge_state_hd64_fp16" in out  # a dry run needs no compiler


# ---- the MissingKernelError command fixes the miss -----------------------------------------------

def _run_command(command: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    argv = shlex.split(command)
    assert argv[0] == "flashinfer-jit"
    return subprocess.run([sys.executable, "-m", "flashinfer_jit", *argv[1:]], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("kernel, arch_env", [
    (PrefillSpec("paged_hnd", 128, "bf16", False), None),
    (MergeStateSpec(64, "fp16"), "80,90a"),   # a fat binary for two archs: --arch 80+90a
    (AppendPagedSpec(256, "bf16"), "8.0"),
], ids=["decode", "merge-two-archs", "append-sm80"])
def test_missing_kernel_error_command_fixes_the_miss(kernel, arch_env, fake_nvcc, cache_root, tmp_path,
                                                      monkeypatch, no_gpu, capsys):
    prebuilt = tmp_path / "prebuilt"
    monkeypatch.setenv("FLASHINFER_JIT_PREBUILT_DIRS", str(prebuilt))
    monkeypatch.setenv("FLASHINFER_JIT_DISABLE_BUILD", "1")
    if arch_env:
        monkeypatch.setenv("FLASHINFER_JIT_ARCH", arch_env)
    with pytest.raises(MissingKernelError) as excinfo:
        loader.load(kernel)
    command = excinfo.value.prebuild_command
    assert f"Add it with:\n  {command}" in str(excinfo.value)
    assert command.startswith(f"flashinfer-jit prebuild --family {kernel.family} ")
    assert fake_nvcc.compiles == 0

    # Run it as printed, in the same environment (building still disabled for the library)
    proc = _run_command(command, subprocess_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "built 1, cached 0, failed 0 of 1" in proc.stdout
    assert fake_nvcc.compiles == 1

    loader.clear_memo()
    loaded = loader.load(kernel)  # found now, still without building in this process
    assert loaded.entry.uri == kernel.uri
    assert loaded.entry.arch == toolchain.arch_tag(toolchain.target_archs())
    assert fake_nvcc.compiles == 1

    code = cli.main(shlex.split(command)[1:])  # and running it again is a no-op
    assert code == 0 and "built 0, cached 1" in capsys.readouterr().out


def test_missing_kernel_command_through_the_console_script(fake_nvcc, cache_root, monkeypatch, no_gpu):
    script = Path(sys.executable).parent / "flashinfer-jit"
    if not script.exists():
        pytest.skip(f"{script} is not installed (`make test` installs it with pip install -e)")
    monkeypatch.setenv("FLASHINFER_JIT_DISABLE_BUILD", "1")
    kernel = PrefillSpec("ragged", 64, "fp16", True)
    with pytest.raises(MissingKernelError) as excinfo:
        loader.load(kernel)
    argv = shlex.split(excinfo.value.prebuild_command)
    proc = subprocess.run([str(script), *argv[1:]], env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    loader.clear_memo()
    assert loader.load(kernel).entry.uri == kernel.uri


# ---- real nvcc -----------------------------------------------------------------------------------

@pytest.mark.slow
@requires_nvcc
def test_real_prebuild_of_two_variants_then_nothing_then_list_verify(tmp_path, capsys, no_gpu):
    root = tmp_path / "real-cache"
    argv = ["prebuild", "--family", "merge", "--dtype", "bf16", "--head-dim", "64,128", "--cache-dir", str(root)]
    code, out, _ = run_cli(capsys, *argv, "--json")
    report = json.loads(out)
    assert code == 0, report
    assert report["summary"]["built"] == 2 and report["summary"]["failed"] == 0
    assert all(0 < k["seconds"] < 600 and k["disk_bytes"] < 5_000_000 for k in report["kernels"])

    code, out, _ = run_cli(capsys, *argv)
    assert code == 0 and "built 0, cached 2, failed 0 of 2" in out

    code, out, _ = run_cli(capsys, "cache", "list", "--json", "--cache-dir", str(root))
    listed = json.loads(out)["entries"]
    assert sorted(r["uri"] for r in listed) == ["merge_state_hd128_bf16", "merge_state_hd64_bf16"]
    by_entry = {k["entry"]: k for k in report["kernels"]}
    for r in listed:
        manifest = json.loads((Path(r["path"]) / cache.MANIFEST).read_text())
        assert r["path"] in by_entry and r["arch"] == "90a" and r["writable"]
        assert r["size"] == manifest["size"] == (Path(r["path"]) / r["library"]).stat().st_size
        assert r["key"] == manifest["key"] and r["verified"] is True and r["toolchain_differs"] == []
        assert r["toolchain"]["nvcc"] == toolchain.nvcc_version()

    # one flipped byte (through a new file: nothing here has it mapped, but keep the habit)
    library = Path(listed[0]["path"]) / listed[0]["library"]
    data = bytearray(library.read_bytes())
    data[len(data) // 3] ^= 0x01
    tmp = library.with_name("flipped")
    tmp.write_bytes(bytes(data))
    os.replace(tmp, library)
    code, out, _ = run_cli(capsys, "cache", "verify", "--cache-dir", str(root))
    assert code == 1
    assert f"BAD  {listed[0]['path']}" in out and "sha256" in out and "1 ok, 1 bad" in out
    code, out, _ = run_cli(capsys, "cache", "verify", "--fix", "--cache-dir", str(root))
    assert code == 0 and "quarantined to" in out
    code, out, _ = run_cli(capsys, "prebuild", *argv[1:])
    assert code == 0 and "built 1, cached 1, failed 0 of 2" in out


# ---- parallelism conventions, start line, progress ----------------------------------------------

def _peak(timeline: Path) -> int:
    events = sorted((float(t), +1 if what == "start" else -1)
                    for _, what, t in (line.split() for line in timeline.read_text().splitlines()))
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


@pytest.mark.parametrize("max_jobs, argv, jobs, source", [
    ("1", [], 1, "MAX_JOBS=1"),
    ("1", ["--jobs", "2"], 2, "--jobs 2"),   # --jobs > MAX_JOBS
    (None, [], 2, "the core count"),          # > the cores (2 here)
])
def test_jobs_come_from_jobs_then_max_jobs_then_cores(max_jobs, argv, jobs, source, capsys, cache_root, fake_nvcc,
                                                      no_gpu, tmp_path, monkeypatch):
    monkeypatch.setattr(toolchain.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(toolchain, "_available_memory", lambda: 64 * 1024**3)
    if max_jobs:
        monkeypatch.setenv("MAX_JOBS", max_jobs)
    timeline = tmp_path / "timeline.txt"
    monkeypatch.setenv("FAKE_NVCC_TIMELINE", str(timeline))
    fake_nvcc.behave(sleep=0.7)
    code, out, err = run_cli(capsys, "prebuild", "--family", "merge", "--dtype", "fp16", "--json", *argv)
    assert code == 0, err
    report = json.loads(out)
    assert (report["jobs"], report["jobs_source"]) == (jobs, source)
    assert err.splitlines()[0].startswith(f"prebuild: 3 variants to build, 0 already cached; {jobs} parallel job(s) "
                                          f"({source}); archs sm_90a; cache {cache_root}")
    assert _peak(timeline) == jobs  # nvccs running at once, all kernels together
    for kernel in report["kernels"]:
        log = (Path(kernel["entry"]) / "build.log").read_text()
        assert "with 1 job(s)" in log  # ninja's share: the budget over the kernels, at most one per source


def test_config_shows_the_jobs_and_where_they_come_from(capsys, no_gpu, monkeypatch):
    monkeypatch.setattr(toolchain.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(toolchain, "_available_memory", lambda: 5 * toolchain.NVCC_JOB_BYTES + 1)
    code, out, _ = run_cli(capsys, "config")
    assert "jobs           5 (the core count, capped from 16 by free memory (about 2 GiB per nvcc))" in out
    monkeypatch.setenv("MAX_JOBS", "3")
    code, out, _ = run_cli(capsys, "config", "--json")
    assert json.loads(out)["jobs"] == {"value": 3, "source": "MAX_JOBS=3"}


def test_start_line_then_one_line_per_variant_with_its_seconds(capsys, cache_root, fake_nvcc, no_gpu):
    assert run_cli(capsys, "prebuild", "--family", "merge", "--dtype", "bf16", "--head-dim", "64")[0] == 0
    code, out, _ = run_cli(capsys, "prebuild", "--family", "merge", "--dtype", "bf16", "--arch", "90a", "--arch",
                           "80,90a", "--jobs", "1")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == (f"prebuild: 5 variants to build, 1 already cached; 1 parallel job(s) (--jobs 1); archs "
                        f"sm_90a, sm_80+sm_90a; cache {cache_root}")
    assert lines[1] == "[1/6] cached merge_state_hd64_bf16 (sm_90a)"
    assert all(re.fullmatch(r"\[\d/6\] built merge_state_hd\d+_bf16 \(sm_[0-9a+_sm]+\) in \d+\.\d s, .*KiB", l)
               for l in lines[2:7]), lines


def test_a_terminal_gets_one_live_bar(cache_root, fake_nvcc, no_gpu):
    """Under a pseudo-terminal: the start line, then one bar redrawn in place (done/total, elapsed,
    time left), no per-variant lines, then the summary."""
    import pty
    fake_nvcc.behave(sleep=1.2)
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "flashinfer_jit", "prebuild", "--family", "merge", "--dtype", "bf16",
                             "--jobs", "1"], env=subprocess_env(), stdout=slave, stderr=subprocess.PIPE, text=False)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    screen = b"".join(chunks).decode()
    assert screen.startswith("prebuild: 3 variants to build, 0 already cached; 1 parallel job(s) (--jobs 1)")
    frames = [f for f in screen.split("\r\x1b[K") if f.startswith("[")]
    assert len(frames) >= 4, screen  # redrawn as builds finish and while one runs
    assert re.match(r"\[\.{24}\] 0/3 built, elapsed 0:0\d, left \?", frames[0]), frames[0]
    assert re.search(r"\[#{8}\.{16}\] 1/3 built, elapsed 0:0\d, left 0:0\d", screen), screen
    assert re.search(r"\[#{24}\] 3/3 built, elapsed 0:0\d, left 0:00\r?\n", screen), screen
    assert "] built merge_state" not in screen  # no per-variant lines on a terminal
    assert "built 3, cached 0, failed 0 of 3" in screen


def test_unsafe_cache_dir_is_one_error_not_one_per_variant(capsys, cache_root, fake_nvcc, no_gpu):
    cache_root.mkdir()
    cache_root.chmod(0o777)
    code, out, err = run_cli(capsys, "prebuild", "--family", "merge", "--dtype", "bf16")
    assert code == 1
    assert (out + err).count("refusing cache path") == 1 and f"chmod go-w {cache_root}" in err
    assert fake_nvcc.compiles == 0
    code, out, _ = run_cli(capsys, "config")
    assert f"     PROBLEM: refusing cache path {cache_root}: mode drwxrwxrwx" in out
    code, out, _ = run_cli(capsys, "config", "--json")
    assert "lets other users write it" in json.loads(out)["cache_layers"][-1]["problem"]
