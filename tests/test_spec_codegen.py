"""Specs name kernel variants; codegen turns them into source text. Both are pure and CPU-only."""
from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import jinja2
import pytest

from flashinfer_jit import codegen, spec

GOLDEN = Path(__file__).resolve().parent / "golden"


def _families():
    for family, cls in spec.FAMILIES.items():
        missing = [t for t in cls.templates if not (codegen.templates_dir() / t).is_file()]
        marks = [pytest.mark.skip(reason=f"templates not written yet: {', '.join(missing)}")] if missing else []
        yield pytest.param(cls, id=family, marks=marks)


# ---- specs and URIs ------------------------------------------------------------------------------

def test_uri_is_derived_from_the_fields():
    assert spec.MergeStateSpec(128, "bf16").uri == "merge_state_hd128_bf16"
    assert spec.MergeStateSpec(head_dim=64, dtype="fp16").uri == "merge_state_hd64_fp16"


@pytest.mark.parametrize("cls", list(spec.FAMILIES.values()), ids=list(spec.FAMILIES))
def test_uris_are_unique_and_file_name_safe(cls):
    """One URI per variant: a field missing from the URI would make two variants share a name."""
    uris = [s.uri for s in cls.supported()]
    assert len(uris) == len(set(uris))
    n = 1
    for f in dataclasses.fields(cls):
        n *= len(f.metadata["choices"])
    assert len(uris) == n
    for uri in uris:
        assert re.fullmatch(r"[a-z0-9_]+", uri), uri


@pytest.mark.parametrize("cls", list(spec.FAMILIES.values()), ids=list(spec.FAMILIES))
def test_spec_round_trips_through_a_dict(cls):
    for s in cls.supported():
        assert spec.spec_from_dict(s.to_dict()) == s


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
