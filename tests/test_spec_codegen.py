"""Specs name kernel variants; codegen turns them into source text. Both are pure and CPU-only."""
from __future__ import annotations

import ctypes
import dataclasses
import itertools
import re
import shutil
from pathlib import Path

import jinja2
import pytest

from flashinfer_jit import abi, codegen, spec

GOLDEN = Path(__file__).resolve().parent / "golden"


def _families():
    # Every family's templates must exist: a missing one fails the render, it is not skipped.
    for family, cls in spec.FAMILIES.items():
        yield pytest.param(cls, id=family)


# ---- specs and URIs ------------------------------------------------------------------------------

def test_uri_is_derived_from_the_fields():
    assert spec.MergeStateSpec(128, "bf16").uri == "merge_state_hd128_bf16"
    assert spec.MergeStateSpec(head_dim=64, dtype="fp16").uri == "merge_state_hd64_fp16"


@pytest.mark.parametrize("cls", list(spec.FAMILIES.values()), ids=list(spec.FAMILIES))
def test_uris_are_unique_and_file_name_safe(cls):
    """One URI per variant: a field missing from the URI would make two variants share a name."""
    fields = spec.matrix_fields(cls)
    opt_in = [f.name for f in fields if f.metadata["opt_in"]]
    uris = [s.uri for s in cls.supported(opt_in=opt_in)]  # every variant, the opt-in ones too
    assert len(uris) == len(set(uris))
    combinations = [dict(zip([f.name for f in fields], values))
                    for values in itertools.product(*(f.metadata["choices"] for f in fields))]
    assert len(uris) == sum(cls.combination_exists(c) for c in combinations)
    # the default matrix: opt-in fields at their defaults only, so their URIs are the plain ones
    plain = [s for s in cls.supported() if all(getattr(s, n) == cls.__dataclass_fields__[n].default for n in opt_in)]
    assert plain == list(cls.supported())
    for uri in uris:
        assert re.fullmatch(r"[a-z0-9_]+", uri), uri


@pytest.mark.parametrize("cls", list(spec.FAMILIES.values()), ids=list(spec.FAMILIES))
def test_spec_round_trips_through_a_dict(cls):
    for s in cls.supported():
        assert spec.spec_from_dict(s.to_dict()) == s


def test_prefill_backend_and_tiles_are_fields_in_the_uri():
    s = spec.PrefillSpec("ragged", 128, "bf16", True)
    assert (s.backend, s.kv_tile, s.cta_q_options) == ("fa2", 64, (128, 64, 16))  # derived from head_dim
    assert s.uri == "prefill_ragged_hd128_bf16_causal_fa2_kv64_q128x64x16"
    wide = spec.PrefillSpec("paged", 256, "fp16", False)
    assert (wide.kv_tile, wide.cta_q_options) == (32, (64,))
    assert wide.uri == "prefill_paged_hd256_fp16_full_fa2_kv32_q64"
    tuned = spec.PrefillSpec("ragged", 128, "bf16", True, kv_tile=32, cta_q_options=[16, 64])
    assert tuned.cta_q_options == (64, 16) and tuned.uri == "prefill_ragged_hd128_bf16_causal_fa2_kv32_q64x16"
    assert tuned != s and spec.spec_from_dict(tuned.to_dict()) == tuned
    assert tuned.to_dict()["cta_q_options"] == [64, 16]  # JSON-friendly (manifests, keys)
    # supported(): the defaults only; the sm90 backend has ragged and paged kernels
    assert {x.kv_tile for x in spec.PrefillSpec.supported() if x.backend == "fa2"} == {32, 64}
    sm90 = [x for x in spec.PrefillSpec.supported() if x.backend == "sm90"]
    assert {x.kv_tile for x in sm90} == {64, 128} and {x.kv_layout for x in sm90} == {"ragged", "paged"}
    assert {x.cta_q_options for x in sm90} == {(128,)}
    with pytest.raises(ValueError, match="the sm90 backend runs 128-row q tiles"):
        spec.PrefillSpec("paged", 128, "bf16", True, backend="sm90", cta_q_options=(64,))
    with pytest.raises(ValueError, match=r"PrefillSpec.kv_tile=48 is not supported; supported values: 16, 32, 64, 128"):
        spec.PrefillSpec("ragged", 128, "bf16", True, kv_tile=48)
    with pytest.raises(ValueError, match=r"cta_q_options=\(\) is not supported"):
        spec.PrefillSpec("ragged", 128, "bf16", True, cta_q_options=())
    with pytest.raises(ValueError, match=r"backend='fa3' is not supported; supported values: fa2, sm90"):
        spec.PrefillSpec("ragged", 128, "bf16", True, backend="fa3")


def test_paged_layouts_are_one_spec():
    """NHD and HND pages differ only in run-time strides: one kernel, one cache entry."""
    nhd, hnd = (spec.PrefillSpec(layout, 64, "fp16", False) for layout in ("paged_nhd", "paged_hnd"))
    assert nhd == hnd == spec.PrefillSpec("paged", 64, "fp16", False)
    assert nhd.kv_layout == "paged" and nhd.uri == "prefill_paged_hd64_fp16_full_fa2_kv64_q128x64x16"
    assert spec.spec_from_dict({"family": "prefill", "kv_layout": "paged_hnd", "head_dim": 64, "dtype": "fp16",
                                "causal": False}) == nhd  # manifests written before the merge still read


def test_unsupported_values_are_rejected_with_the_choices():
    with pytest.raises(ValueError, match=r"MergeStateSpec.head_dim=96 is not supported; supported values: 64, 128, 256"):
        spec.MergeStateSpec(96, "bf16")
    with pytest.raises(ValueError, match=r"dtype='fp32'.*fp16, bf16"):
        spec.MergeStateSpec(128, "fp32")
    with pytest.raises(ValueError, match="unknown kernel family 'decode'"):
        spec.spec_from_dict({"family": "decode"})


def test_specs_are_frozen_and_hashable():
    s = spec.MergeStateSpec(128, "bf16")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.head_dim = 64  # type: ignore[misc]
    assert {s: 1}[spec.MergeStateSpec(128, "bf16")] == 1


# ---- rendering -----------------------------------------------------------------------------------

def test_rendering_uses_strict_undefined():
    env = codegen._environment(str(codegen.templates_dir()))
    assert env.undefined is jinja2.StrictUndefined


def test_a_template_typo_is_an_error_not_an_empty_string(monkeypatch, tmp_path):
    copy = tmp_path / "templates"
    shutil.copytree(codegen.templates_dir(), copy)
    template = copy / "merge_state.cu.jinja"
    template.write_text(template.read_text().replace("{{ head_dim }}", "{{ head_dimm }}"))
    monkeypatch.setattr(codegen, "templates_dir", lambda: copy)
    with pytest.raises(jinja2.UndefinedError, match="head_dimm"):
        codegen.render(spec.MergeStateSpec(128, "bf16"))


@pytest.mark.parametrize("cls", list(_families()))
def test_every_supported_spec_renders(cls):
    for s in cls.supported():
        sources = codegen.render(s)
        assert set(sources) == {t.removesuffix(".jinja") for t in s.templates}
        for name, text in sources.items():
            assert text.strip(), f"{s.uri}: {name} rendered empty"
            assert "{{" not in text and "{%" not in text, f"{s.uri}: {name} has unrendered jinja"
            assert s.uri in text, f"{s.uri}: {name} does not name its variant"


def test_render_is_pure():
    s = spec.MergeStateSpec(256, "fp16")
    assert codegen.render(s) == codegen.render(s)


def test_merge_state_source_has_the_spec_baked_in():
    text = codegen.render(spec.MergeStateSpec(64, "fp16"))["merge_state.cu"]
    assert "using DType = half;" in text
    assert "constexpr int kHeadDim = 64;" in text
    assert "fij_merge_state_hd64_fp16_merge_two(" in text


@pytest.mark.parametrize("kernel, mirrors", [
    (spec.PrefillSpec("paged", 128, "bf16", True), abi.PREFILL_STRUCTS),
    (spec.AppendPagedSpec(64, "fp16"), abi.PAGE_STRUCTS),
], ids=["prefill", "append_paged"])
def test_sources_check_every_ctypes_mirror_field_at_compile_time(kernel, mirrors):
    """Each library's source asserts, for every struct it shares with Python, the size, the field
    count and every field's offset, size and type of the ctypes mirror (a drift fails the build:
    tests/test_build_real.py compiles one)."""
    (text,) = codegen.render(kernel).values()
    assert '#include "flashinfer_jit/abi_check.h"' in text
    for mirror in mirrors:
        name = f"fij::{mirror.__name__}"
        assert f"static_assert(sizeof({name}) == {ctypes.sizeof(mirror)}," in text
        slots = sum(getattr(t, "_length_", 1) for _, t in mirror._fields_)
        assert f"static_assert(fij::abi::field_slots<{name}, {slots}>()," in text
        for field_name, _ in mirror._fields_:
            f = getattr(mirror, field_name)
            assert f"static_assert(offsetof({name}, {field_name}) == {f.offset}," in text
            assert f"static_assert(sizeof({name}::{field_name}) == {f.size}," in text
            assert f"decltype({name}::{field_name});" in text


def test_abi_type_checks():
    checks = {f["name"]: f for s in abi.layout_checks(abi.PlanCall, abi.WorkItem, abi.PrefillParams) for f in s["fields"]}
    assert checks["qo_indptr"]["check"] == "std::is_pointer<T>::value"
    assert checks["config"]["check"] == ("std::is_pointer<T>::value && std::is_same<std::remove_cv_t<"
                                         "std::remove_pointer_t<T>>, fij::PlanConfig>::value")
    assert checks["num_page_indices"]["check"] == "std::is_same<T, int64_t>::value"
    assert checks["reserved"]["check"] == "std::is_same<T, int32_t[3]>::value"
    assert checks["scale_log2"]["check"] == "std::is_same<T, float>::value"
    assert checks["page_div_mul"]["check"] == "std::is_same<T, uint32_t>::value"
    assert abi.ITEM_INTS == 16 and abi.MERGE_INTS == 4
    assert "merges" not in dict(abi.PrefillParams._fields_)  # the kernel finds everything in its WorkItem


def test_prefill_source_bakes_in_the_spec():
    text = codegen.render(spec.PrefillSpec("ragged", 256, "fp16", True))["prefill.cu"]
    assert "constexpr int kKvTile = 32;" in text and "FIJ_KV_TILE" not in text
    assert "using Variant = fij::StandardAttention<kCausal, false>;" in text
    assert spec.PrefillSpec("ragged", 256, "fp16", True).uri == "prefill_ragged_hd256_fp16_causal_fa2_kv32_q64"
    both = spec.PrefillSpec("ragged", 256, "fp16", True, sliding_window=True, soft_cap=True)
    assert both.uri == "prefill_ragged_hd256_fp16_causal_fa2_window_softcap_kv32_q64"
    assert "using Variant = fij::SoftCapAttention<kCausal, true>;" in codegen.render(both)["prefill.cu"]
    assert "fij::plan_prefill<Variant>(" in text and "fij::plan_and_upload<Variant>(" in text
    assert "launch_prefill<DType, kHeadDim, 64, kKvTile, Variant, kPaged, KvType>" in text
    assert "using KvType = half;" in text  # K/V stored as the query dtype (no kv_dtype)
    assert "launch_prefill<DType, kHeadDim, 128," not in text  # head_dim 256: 64-row tiles only


def test_golden_merge_state_hd128_bf16(request):
    """Pins the generated text. After an intended template change, regenerate with
    `pytest tests/test_spec_codegen.py --update-golden` and review the diff."""
    golden = GOLDEN / "merge_state_hd128_bf16.cu"
    text = codegen.render(spec.MergeStateSpec(128, "bf16"))["merge_state.cu"]
    if request.config.getoption("--update-golden"):
        golden.write_text(text)
        pytest.skip(f"rewrote {golden}")
    assert golden.is_file(), f"{golden} is missing; create it with --update-golden"
    assert text == golden.read_text(), f"rendered source differs from {golden}; if intended, rerun with --update-golden"


def test_headers_digest_covers_every_header_by_content(monkeypatch, tmp_path):
    copy = tmp_path / "templates"
    shutil.copytree(codegen.templates_dir(), copy)
    monkeypatch.setattr(codegen, "templates_dir", lambda: copy)
    before = codegen.headers_digest()
    (copy / "include" / "flashinfer_jit" / "new.cuh").write_text("#pragma once\n")
    assert codegen.headers_digest() != before
