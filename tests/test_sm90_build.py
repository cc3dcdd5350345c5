"""The sm90 (Hopper) prefill backend on a machine without a GPU: its generated wgmma header is up to
date, every variant renders, and a real nvcc build of one variant is an sm_90a library whose SASS runs
the tensor cores through HGMMA and the copy engine through UTMALDG, without local-memory spills.
(Running it needs an H100/H200: tests/test_prefill_gpu.py under FIJ_TEST_PREFILL_BACKEND=sm90.)"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import requires_nvcc
from flashinfer_jit import codegen, loader, wgmma_gen
from flashinfer_jit.spec import PrefillSpec

SM90_SPECS = [s for s in PrefillSpec.supported() if s.backend == "sm90"]


def test_wgmma_header_matches_its_generator() -> None:
    assert wgmma_gen.header_path().read_text() == wgmma_gen.generate(), (
        "templates/include/flashinfer_jit/wgmma_sm90.cuh is stale: run `python -m flashinfer_jit.wgmma_gen`")


@pytest.mark.parametrize("spec", SM90_SPECS, ids=[s.uri for s in SM90_SPECS])
def test_every_sm90_variant_renders_the_hopper_kernel(spec: PrefillSpec) -> None:
    text = codegen.render(spec)["prefill.cu"]
    assert '#include "flashinfer_jit/prefill_sm90.cuh"' in text and "fij::sm90::launch_prefill" in text
    assert f"constexpr int kKvTile = {spec.kv_tile};" in text


def test_sm90_runs_only_where_sm_90a_is_built() -> None:
    spec = SM90_SPECS[0]
    assert spec.runs_on(("90a",)) and spec.runs_on(("80", "90a")) and spec.runs_on(("90a+PTX",))
    assert not spec.runs_on(("80",)) and not spec.runs_on(("100a",))
    assert PrefillSpec("paged", 128, "bf16", True).runs_on(("80",))


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton  # ships the CUDA binary utilities
    except ImportError:
        return None
    candidate = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(candidate) if candidate.exists() else None


def built_sass(spec: PrefillSpec) -> str:
    """Build (or load) `spec` and return its SASS; skip without a cuobjdump to read it with."""
    kernel = loader.load(spec)
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA binary utilities or triton's copy) to read the SASS with")
    return subprocess.run([tool, "-sass", str(kernel.entry.library)], capture_output=True, text=True,
                          check=True).stdout


def spills(sass: str) -> list[str]:
    """SASS lines touching local memory (register spills)."""
    return [line for line in sass.splitlines() if re.search(r"\b(LDL|STL)\b", line)]


def serialized_wgmma(sass: str) -> bool:
    """ptxas serializes wgmma (C7518-C7520: each HGMMA then waits on its own scoreboard) when it cannot
    prove the asynchronous pipeline safe: every HGMMA carries gsb0 instead of the last of a group."""
    hgmma = [line for line in sass.splitlines() if "HGMMA" in line]
    return len(hgmma) > 0 and sum("gsb0" in line for line in hgmma) > len(hgmma) // 4


@pytest.mark.parametrize("layout, head_dim, causal", [("ragged", 128, True), ("ragged", 64, False),
                                                     ("ragged", 256, True), ("paged", 256, False)])
def test_sm90_build_uses_hgmma_and_tma_without_spills(layout: str, head_dim: int, causal: bool, monkeypatch,
                                                       no_gpu) -> None:
    monkeypatch.setenv("FLASHINFER_JIT_ARCH", "90a")
    spec = PrefillSpec(layout, head_dim, "bf16", causal, backend="sm90")
    sass = built_sass(spec)
    assert "sm_90a" in sass, "the library holds no sm_90a code"
    assert re.search(rf"HGMMA\.64x{spec.kv_tile}x16\.F32\.BF16", sass), "S = Q K^T is not an HGMMA"
    assert re.search(rf"HGMMA\.64x{head_dim}x16\.F32\.BF16", sass), "O += P V is not an HGMMA"
    assert ("UTMALDG.4D" if layout == "paged" else "UTMALDG.3D") in sass, "no TMA loads"
    assert "USETMAXREG" in sass, "no setmaxnreg (warp specialization)"
    assert not spills(sass), f"local-memory spills in the sm90 kernel: {spills(sass)[:5]}"
    assert not serialized_wgmma(sass), "ptxas serialized the wgmma pipeline"


@pytest.mark.parametrize("flags, present, absent", [
    # the defaults: the warpgroups' turn-taking, O by TMA for whole halves and 16-byte row stores for the rest
    ("", ["BAR.ARV", "UTMASTG.3D", "STG.E.128"], []),
    ("-DFIJ_SM90_PINGPONG=0", ["STG.E.128", "UTMASTG.3D"], ["BAR.ARV"]),
    ("-DFIJ_SM90_STAGED_EPILOGUE=0", ["BAR.ARV"], ["UTMASTG.3D"]),  # no staging buffer, no TMA store
    ("-DFIJ_SM90_PINGPONG=0 -DFIJ_SM90_STAGED_EPILOGUE=0 -DFIJ_SM90_SNAKE=0", [], ["BAR.ARV", "UTMASTG.3D"]),
    ("-DFIJ_SM90_TMA_STORE=0", ["BAR.ARV", "STG.E.128"], ["UTMASTG.3D"]),
    ("-DFIJ_SM90_DOUBLE_Q=1 -DFIJ_SM90_STORE_WARPS=1", ["BAR.ARV", "STG.E.128"], ["UTMASTG.3D"]),  # replaces it
    ("-DFIJ_SM90_TAIL_WARP=1", ["BAR.ARV", "UTMASTG.3D"], []),
    ("-DFIJ_SM90_PAGED_GATHER=1", ["BAR.ARV", "UTMALDG.3D"], []),  # ragged: unchanged (gathers are paged)
], ids=["defaults", "no-pingpong", "no-staged-epilogue", "all-off", "no-tma-store", "double-q-store-warps",
        "tail-warp", "paged-gather-ragged"])
def test_sm90_switches_build(flags: str, present: list, absent: list, monkeypatch, no_gpu) -> None:
    """The kernel's switches (ping-pong, staged epilogue, snake unit order, TMA store: on by default,
    measured on the H200; benchmarks/sm90_switches.sh A/Bs them) build either way, have their own cache keys, show or
    lose their instructions in the SASS and do not spill."""
    monkeypatch.setenv("FLASHINFER_JIT_ARCH", "90a")
    spec = PrefillSpec("ragged", 128, "bf16", True, backend="sm90")
    plain = loader.compute_key(spec).key
    if flags:
        monkeypatch.setenv("FLASHINFER_JIT_EXTRA_CUDAFLAGS", flags)
        assert loader.compute_key(spec).key != plain
    sass = built_sass(spec)
    for marker in present:
        assert marker in sass, f"{flags or 'defaults'}: no {marker} in the SASS"
    for marker in absent:
        assert marker not in sass, f"{flags or 'defaults'}: {marker} in the SASS"
    assert not spills(sass), f"{flags or 'defaults'}: local-memory spills: {spills(sass)[:5]}"
    assert not serialized_wgmma(sass), f"{flags or 'defaults'}: ptxas serialized the wgmma pipeline"


UNDER_AB = ("-DFIJ_SM90_DOUBLE_Q=1 -DFIJ_SM90_STORE_WARPS=1 -DFIJ_SM90_TAIL_WARP=1 -DFIJ_SM90_PAGE_PREFETCH=1 "
            "-DFIJ_SM90_ITEM_PREFETCH=1 -DFIJ_SM90_HD64_STAGES=4")
UNDER_AB_TMA = UNDER_AB.replace(" -DFIJ_SM90_STORE_WARPS=1", "")  # with the default TMA store (they exclude each other)
# The gather takes the whole producer warpgroup: no store or tail warps beside it.
UNDER_AB_GATHER = UNDER_AB_TMA.replace("-DFIJ_SM90_TAIL_WARP=1", "-DFIJ_SM90_PAGED_GATHER=1")


def test_sm90_paged_gather_builds_cp_async_loads(monkeypatch, no_gpu) -> None:
    """-DFIJ_SM90_PAGED_GATHER=1 (off by default): paged K/V come by cp.async (LDGSTS) completing on the
    stage barriers (ARRIVES.LDGSTSBAR), no per-page TMA boxes (UTMALDG.4D), a proxy fence before the wgmmas
    read them; Q still by TMA; spill-free and pipelined."""
    monkeypatch.setenv("FLASHINFER_JIT_ARCH", "90a")
    monkeypatch.setenv("FLASHINFER_JIT_EXTRA_CUDAFLAGS", "-DFIJ_SM90_PAGED_GATHER=1")
    sass = built_sass(PrefillSpec("paged", 128, "bf16", False, backend="sm90"))
    for marker in ("LDGSTS", "ARRIVES.LDGSTSBAR", "FENCE.VIEW.ASYNC.S", "UTMALDG.3D"):
        assert marker in sass, f"no {marker} in the gathering kernel's SASS"
    assert "UTMALDG.4D" not in sass, "the gathering kernel still loads pages by TMA"
    assert not spills(sass), f"local-memory spills: {spills(sass)[:5]}"
    assert not serialized_wgmma(sass), "ptxas serialized the wgmma pipeline"


@pytest.mark.parametrize("flags", [UNDER_AB, UNDER_AB_TMA, UNDER_AB_GATHER], ids=["store-warps", "tma-store", "gather"])
@pytest.mark.parametrize("layout, head_dim", [("ragged", 64), ("paged", 128), ("paged", 64), ("ragged", 256)])
def test_sm90_switches_under_ab_build_for_other_shapes(layout: str, head_dim: int, flags: str, monkeypatch,
                                                       no_gpu) -> None:
    """The switches still under A/B (off by default: double Q, store warps (replacing the default TMA
    store), tail warp, page and item prefetch) fit shared memory and registers at every head_dim and
    layout together: hd256 keeps one Q buffer and no staging (no room); every build is spill-free and
    keeps the wgmma pipeline."""
    monkeypatch.setenv("FLASHINFER_JIT_ARCH", "90a")
    monkeypatch.setenv("FLASHINFER_JIT_EXTRA_CUDAFLAGS", flags)
    sass = built_sass(PrefillSpec(layout, head_dim, "bf16", True, backend="sm90"))
    assert not spills(sass), f"local-memory spills: {spills(sass)[:5]}"
    assert not serialized_wgmma(sass), "ptxas serialized the wgmma pipeline"


def spills_between_hgmmas(sass: str) -> list[str]:
    """Local-memory accesses between the first and the last HGMMA: the KV-tile loop lies there."""
    lines = sass.splitlines()
    hgmma = [i for i, line in enumerate(lines) if "HGMMA" in line]
    return [line for line in lines[hgmma[0]:hgmma[-1]] if re.search(r"\b(LDL|STL)\b", line)] if hgmma else []


VARIANT_SPECS = [
    PrefillSpec("ragged", 128, "bf16", True, backend="sm90", soft_cap=True),
    PrefillSpec("paged", 128, "bf16", True, backend="sm90", sliding_window=True),
    PrefillSpec("ragged", 64, "fp16", False, backend="sm90", sliding_window=True, soft_cap=True),
    PrefillSpec("ragged", 128, "fp16", True, backend="fa2", sliding_window=True, soft_cap=True),
    PrefillSpec("paged", 128, "bf16", False, backend="sm90", custom_mask=True),
    PrefillSpec("ragged", 64, "fp16", False, backend="fa2", custom_mask=True, soft_cap=True),
    PrefillSpec("ragged", 128, "bf16", True, backend="sm90", alibi=True),  # pos_encoding_mode="ALIBI"
    PrefillSpec("paged", 128, "bf16", True, backend="fa2", rope=True),  # fused RoPE
    PrefillSpec("ragged", 128, "bf16", True, backend="sm90", rope=True),  # (sm90: transform_sm90.cuh)
    PrefillSpec("paged", 64, "fp16", False, backend="sm90", rope=True, sliding_window=True),
    PrefillSpec("ragged", 256, "bf16", True, backend="sm90", rope=True),
    PrefillSpec("ragged", 64, "fp16", False, backend="fa2", rope=True, sliding_window=True, alibi=False),
    PrefillSpec("paged", 128, "bf16", False, backend="fa2", kv_dtype="fp8e4m3"),  # an fp8 KV cache (decode's)
    PrefillSpec("ragged", 256, "fp16", True, backend="fa2", kv_dtype="fp8e5m2", rope=True),
]


@pytest.mark.parametrize("spec", VARIANT_SPECS, ids=[s.uri for s in VARIANT_SPECS])
def test_attention_variants_build(spec: PrefillSpec, monkeypatch, no_gpu) -> None:
    """The sliding-window, soft-cap, custom-mask, ALiBi and fused-RoPE kernels (opt-in spec fields,
    variant.cuh) build (fp8 K/V: the fa2 kernel only): the cap's tanh is a MUFU.TANH, RoPE's sincos MUFU.SIN/COS, the sm90 kernels keep HGMMA, an unserialized wgmma pipeline and a KV
    loop free of local memory (the window's extra live values spill a few registers once per work unit
    at hd128, outside the loop: measured in the SASS, 2026-12-04)."""
    monkeypatch.setenv("FLASHINFER_JIT_ARCH", "90a")
    text = codegen.render(spec)["prefill.cu"]
    variant = "SoftCapAttention" if spec.soft_cap else "AlibiAttention" if spec.alibi else "StandardAttention"
    expected = f"fij::{variant}<kCausal, {'true' if spec.sliding_window else 'false'}>"
    expected = f"fij::WithCustomMask<{expected}>" if spec.custom_mask else expected
    expected = f"fij::WithRope<{expected}>" if spec.rope else expected
    assert f"using Variant = {expected};" in text
    sass = built_sass(spec)
    assert ("MUFU.TANH" in sass) == spec.soft_cap, "the soft-cap's tanh (MUFU.TANH) is missing or misplaced"
    # fused RoPE rotates q and k with MUFU.SIN / MUFU.COS (nothing else in these kernels calls them)
    assert ("MUFU.SIN" in sass and "MUFU.COS" in sass) == spec.rope, "RoPE's sincos is missing or misplaced"
    if spec.backend == "sm90":
        assert "HGMMA" in sass
        assert not serialized_wgmma(sass), "ptxas serialized the wgmma pipeline"
        # the custom mask's two pointers are reloaded from local memory once per tile (measured in the
        # SASS: 2 LDL.64 in the loop at hd128); every other variant keeps the loop free of local memory
        assert len(spills_between_hgmmas(sass)) <= (2 if spec.custom_mask else 0), spills_between_hgmmas(sass)[:5]
    else:
        assert "HMMA.16816" in sass
        if spec.rope or spec.kv_dtype:  # rotation state / widened fp8 values stay in registers
            assert not spills(sass), spills(sass)[:5]
        # fp8 K/V: the kernel reads fp8 (one KvType), widened by F2FP conversions; 16-bit K/V: none
        assert f"using KvType = {dict(fp8e4m3='__nv_fp8_e4m3', fp8e5m2='__nv_fp8_e5m2').get(spec.kv_dtype, 'x')};" \
            in text or not spec.kv_dtype
        assert ("F2FP" in sass and ".E4M3" in sass or ".E5M2" in sass) == bool(spec.kv_dtype), \
            "the fp8 widening (F2FP ... E4M3 / E5M2) is missing or misplaced"


# (RoPE hd128 causal: the non-causal library's 128-row aligned-page kernel spills 8 B at any setting, nvcc 13.0)
WARP_LOCAL_SPECS = [PrefillSpec("paged", 128, "bf16", False, backend="fa2", kv_dtype="fp8e4m3"),
                    PrefillSpec("paged", 64, "fp16", True, backend="fa2", kv_dtype="fp8e5m2", rope=True),
                    PrefillSpec("paged", 128, "bf16", True, backend="fa2", rope=True)]


@pytest.mark.parametrize("spec", WARP_LOCAL_SPECS, ids=["hd128-e4m3", "hd64-e5m2-rope", "hd128-bf16-rope"])
def test_decode_warp_local_builds(spec: PrefillSpec, monkeypatch, no_gpu) -> None:
    """-DFIJ_DECODE_WARP_LOCAL=1 (off until measured on a GPU: benchmarks/decode_ab.sh): in the decode tiles
    each warp widens (fp8: K then V into one 16-bit tile, staged 5 fp8 tiles deep while two CTAs still fit
    an SM, a static_assert) or rotates (RoPE) only its own keys; its own cache key, fp8 still widened by
    F2FP ... E4M3 / E5M2 conversions, no spills."""
    monkeypatch.setenv("FLASHINFER_JIT_ARCH", "90a")
    plain = loader.compute_key(spec).key
    monkeypatch.setenv("FLASHINFER_JIT_EXTRA_CUDAFLAGS", "-DFIJ_DECODE_WARP_LOCAL=1")
    assert loader.compute_key(spec).key != plain
    sass = built_sass(spec)
    assert "HMMA.16816" in sass and (".E4M3" in sass or ".E5M2" in sass) == bool(spec.kv_dtype)
    assert ("MUFU.SIN" in sass) == spec.rope
    assert not spills(sass), spills(sass)[:5]


def count(sass: str, opcode: str) -> int:
    """SASS instructions whose opcode starts with `opcode` (MUFU.EX2, FADD.FTZ.RM, ...)."""
    return len(re.findall(rf"\s{re.escape(opcode)}[\s.]", sass))


@requires_nvcc
@pytest.mark.slow
@pytest.mark.parametrize("eighths", [2, 4])
def test_poly_exp2_moves_softmax_exp2s_off_the_mufu(eighths: int, monkeypatch, no_gpu) -> None:
    """-DFIJ_POLY_EXP2=N (off until measured: benchmarks/softcap_ab.sh): N eighths of the softmax's element
    exp2s become exp2_poly (softmax.cuh; its rounding add is an FADD.FTZ.RM) in the sm90 soft-cap kernel,
    MUFU.EX2s drop by that share of the 2 x 64 element exp2s a consumer thread's two softmax blocks (tile 0,
    the loop) hold, the cap's MUFU.TANHs stay; its own cache key, HGMMA, no spills, pipelined wgmma. The
    fa2 kernel (same OnlineSoftmax) is untouched by the flag."""
    monkeypatch.setenv("FLASHINFER_JIT_ARCH", "90a")
    spec = PrefillSpec("ragged", 128, "bf16", True, backend="sm90", soft_cap=True)
    plain_key = loader.compute_key(spec).key
    default = built_sass(spec)
    monkeypatch.setenv("FLASHINFER_JIT_EXTRA_CUDAFLAGS", f"-DFIJ_POLY_EXP2={eighths}")
    assert loader.compute_key(spec).key != plain_key
    loader.clear_memo()  # (a process loads a spec once; the flags are read at load)
    poly = built_sass(spec)
    moved = 2 * 64 * eighths // 8
    assert count(default, "FADD.FTZ.RM") == 0 and count(poly, "FADD.FTZ.RM") == moved
    assert count(poly, "MUFU.EX2") == count(default, "MUFU.EX2") - moved
    assert count(poly, "MUFU.TANH") == count(default, "MUFU.TANH") > 0
    assert re.search(r"HGMMA\.64x128x16\.F32\.BF16", poly), "no HGMMA"
    assert not spills(poly), f"local-memory spills: {spills(poly)[:5]}"
    assert not serialized_wgmma(poly), "ptxas serialized the wgmma pipeline"
    fa2 = built_sass(PrefillSpec("ragged", 128, "bf16", True, backend="fa2", soft_cap=True))
    assert count(fa2, "FADD.FTZ.RM") == 0 and count(fa2, "MUFU.EX2") > 0, "the flag reached the fa2 kernel"


@requires_nvcc
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sm90", "fa2"])
def test_alibi_bias_costs_two_ffmas_an_element(backend: str, monkeypatch, no_gpu) -> None:
    """ALiBi's bias slope * (key - pos) takes the per-row form (AlibiAttention::logits_row, kRowLogits):
    one int -> float conversion and one multiply per fragment row and KV tile, then two FFMAs per
    element. The element-wise form cost an add, a sub, an I2FP, an FMUL and an FFMA per element (SASS,
    hd128: 128 I2FP in the sm90 kernel, 104 in the fa2 one), beside the softmax's own few per element."""
    monkeypatch.setenv("FLASHINFER_JIT_ARCH", "90a")
    plain = built_sass(PrefillSpec("ragged", 128, "bf16", True, backend=backend))
    alibi = built_sass(PrefillSpec("ragged", 128, "bf16", True, backend=backend, alibi=True))
    conversions = count(alibi, "I2FP") + count(alibi, "I2F") - count(plain, "I2FP") - count(plain, "I2F")
    assert conversions <= 16, f"{conversions} more int -> float conversions than the plain kernel: per element again?"
    assert count(alibi, "FMUL") <= count(plain, "FMUL") + 16, "a multiply per element is back in the ALiBi bias"
    assert count(alibi, "FFMA") > count(plain, "FFMA"), "the bias's FFMAs are missing"


@requires_nvcc
@pytest.mark.slow
@pytest.mark.parametrize("layout, head_dim, rope", [("paged", 128, False), ("paged", 256, False), ("paged", 64, True)],
                         ids=["hd128", "hd256", "hd64-rope"])
def test_sm90_paged_wide_box_builds_one_box_per_page(layout: str, head_dim: int, rope: bool, monkeypatch,
                                                     no_gpu) -> None:
    """-DFIJ_SM90_PAGED_WIDE_BOX=1 (off until measured: benchmarks/paged_ab.sh): paged K / V tiles by 8-row
    group (tile_layout_sm90.cuh), each page's rows with all head dims in one 5-D TMA box (UTMALDG.5D), so
    no 4-D per-64-dim boxes are left; its own cache key; HGMMA, pipelined wgmma, a loop free of local
    memory (the key transform warps' walk too, under fused RoPE). The ragged kernel keeps its 3-D boxes."""
    monkeypatch.setenv("FLASHINFER_JIT_ARCH", "90a")
    spec = PrefillSpec(layout, head_dim, "bf16", True, backend="sm90", rope=rope)
    default = built_sass(spec)
    plain_key = loader.compute_key(spec).key
    monkeypatch.setenv("FLASHINFER_JIT_EXTRA_CUDAFLAGS", "-DFIJ_SM90_PAGED_WIDE_BOX=1")
    assert loader.compute_key(spec).key != plain_key
    loader.clear_memo()
    wide = built_sass(spec)
    assert count(default, "UTMALDG.4D") > 0 and count(default, "UTMALDG.5D") == 0
    assert count(wide, "UTMALDG.5D") > 0 and count(wide, "UTMALDG.4D") == 0, "per-64-dim boxes left"
    assert "HGMMA" in wide and not serialized_wgmma(wide)
    assert not spills_between_hgmmas(wide), spills_between_hgmmas(wide)[:5]
    ragged = built_sass(PrefillSpec("ragged", head_dim, "bf16", True, backend="sm90"))
    assert count(ragged, "UTMALDG.5D") == 0 and count(ragged, "UTMALDG.3D") > 0
