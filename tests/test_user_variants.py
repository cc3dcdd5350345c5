"""User-defined attention variants (flashinfer_jit.AttentionVariant, issue #12) without a GPU: the
variant's code is checked when it is made, rendered into the kernel, part of the URI and the cache key
(tests/test_keys.py checks the key); snippets compile with nvcc for both backends; a snippet that does not
compile raises VariantCompileError quoting it and leaves nothing in the cache; plan(variant=) selects
the variant's kernel and binds its parameters. The GPU checks against a reference are in
tests/test_variants_gpu.py and examples/custom_variants.py."""
from __future__ import annotations

import pytest
import torch

import flashinfer_jit
from conftest import requires_nvcc
from flashinfer_jit import codegen, loader
from flashinfer_jit.abi import PrefillParams
from flashinfer_jit.spec import CustomVariant, PrefillSpec

ALIBI = dict(score_mod="score - slopes[head] * float(q_pos - kv_idx)")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(name="Bad-Name", score_mod="score"), ValueError, "lower-case identifier"),
    (dict(name="v"), ValueError, "give a score_mod, a mask_mod or both"),
    (dict(name="v", score_mod="score; return 0"), ValueError, "one expression"),
    (dict(name="v", mask_mod="#include <x>"), ValueError, "one expression"),
    (dict(name="v", score_mod="score", params={"score": 1.0}), ValueError, "other than score"),
    (dict(name="v", score_mod="score", params={"a": "x"}), TypeError, "finite number"),
    (dict(name="v", score_mod="score", params={"a": float("inf")}), TypeError, "finite number"),
    (dict(name="v", score_mod="score", params={f"p{i}": 1.0 for i in range(9)}), ValueError, "at most 8"),
    (dict(name="v", score_mod=3), TypeError, "string of CUDA code"),
])
def test_bad_variants_raise_when_made(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        flashinfer_jit.AttentionVariant(**kwargs)


def test_the_snippet_is_rendered_into_the_kernel() -> None:
    v = flashinfer_jit.AttentionVariant("alibi", **ALIBI, mask_mod="kv_idx >= int(lo)",
                                        params={"slopes": torch.ones(8), "lo": 2.0})
    spec = PrefillSpec("ragged", 128, "bf16", True, custom=v.code)
    assert spec.uri.startswith("prefill_ragged_hd128_bf16_causal_fa2_alibi") and v.code.digest in spec.uri
    text = codegen.render(spec)["prefill.cu"]
    assert "using Variant = UserVariant<kCausal, false>;" in text
    assert '#line 1 "score_mod"\n' + ALIBI["score_mod"] in text and '#line 1 "mask_mod"\nkv_idx >= int(lo)' in text
    assert "lo(p.user_scalars[0])" in text and "slopes(static_cast<const float*>(p.user_tensor0))" in text
    # the snippets come last: their #line directives renumber nothing of the library's code
    assert text.rindex('#line 1 "mask_mod"') > text.rindex("FIJ_DEFINE_ERROR_STRING")
    with pytest.raises(ValueError, match="do not combine"):
        PrefillSpec("ragged", 128, "bf16", True, soft_cap=True, custom=v.code)


def test_plan_selects_the_variants_kernel_and_binds_its_parameters(monkeypatch) -> None:
    import test_flashinfer_api as api  # its CPU stand-ins for CUDA tensors and the wrappers' arguments

    on_gpu = api.cl(8, dtype=torch.float32)  # a CPU tensor that says cuda:0, where the wrapper's workspace is
    v = flashinfer_jit.AttentionVariant("alibi", **ALIBI, params={"slopes": on_gpu, "scale2": 0.25})
    loaded = []

    def record(spec, *args, **kwargs):
        loaded.append(spec)
        raise api.ReachedKernel()

    monkeypatch.setattr(loader, "load", record)
    monkeypatch.setattr(flashinfer_jit.kernels, "_variants", {})
    with pytest.raises(api.ReachedKernel):
        api.ragged_plan(variant=v)(api.Args(real=True))
    assert [s.custom for s in loaded] == [v.code]
    # a per-head tensor elsewhere than the wrapper's device, or too short: refused before any kernel
    for bad, match in ((torch.arange(8, dtype=torch.float32), "float32 tensor on cuda"),
                       (api.cl(4, dtype=torch.float32), "one value per query head")):
        loaded.clear()
        wrong = flashinfer_jit.AttentionVariant("alibi", **ALIBI, params={"slopes": bad, "scale2": 0.25})
        with pytest.raises(ValueError, match=match):
            api.ragged_plan(variant=wrong)(api.Args(real=True))
        assert not loaded
    # the values go into the launch params (the tensor must live where the plan runs)
    slopes = torch.arange(8, dtype=torch.float32)
    v = flashinfer_jit.AttentionVariant("alibi", **ALIBI, params={"slopes": slopes, "scale2": 0.25})
    params = PrefillParams()
    kept = v.bind(params, num_qo_heads=8, device=torch.device("cpu"), where="test")
    assert params.user_tensor0 == slopes.data_ptr() and params.user_scalars[0] == 0.25 and kept == [slopes]
    with pytest.raises(ValueError, match="one value per query head"):
        v.bind(PrefillParams(), num_qo_heads=16, device=torch.device("cpu"), where="test")
    with pytest.raises(ValueError, match="float32 tensor on cuda"):
        v.bind(PrefillParams(), num_qo_heads=8, device=torch.device("cuda"), where="test")
    with pytest.raises(ValueError, match="do not combine"):
        api.ragged_plan(variant=v, logits_soft_cap=30.0)(api.Args(real=True))


@requires_nvcc
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fa2", "sm90"])
def test_snippets_compile_into_both_backends(backend: str, monkeypatch, tmp_path, no_gpu) -> None:
    from test_sm90_build import built_sass, serialized_wgmma, spills_between_hgmmas

    monkeypatch.setenv("FLASHINFER_JIT_ARCH", "90a")
    code = CustomVariant("alibi_prefix", score_mod=ALIBI["score_mod"], mask_mod="kv_idx < int(prefix) || kv_idx <= q_pos",
                         scalars=("prefix",), tensors=("slopes",))
    sass = built_sass(PrefillSpec("ragged", 128, "bf16", False, backend=backend, custom=code))
    if backend == "sm90":
        assert "HGMMA" in sass and not serialized_wgmma(sass)
        assert not spills_between_hgmmas(sass), f"local memory in the KV loop: {spills_between_hgmmas(sass)[:5]}"
    else:
        assert "HMMA.16816" in sass


@requires_nvcc
@pytest.mark.slow
@pytest.mark.parametrize("which, snippet, line, quoted", [
    ("score_mod", "score +\n  undefined_name * 2.f", 2, "undefined_name * 2.f"),
    ("mask_mod", "kv_idx <= q_pos &&", 2, "kv_idx <= q_pos &&"),
])
def test_a_snippet_that_does_not_compile_raises_quoting_it(which: str, snippet: str, line: int, quoted: str,
                                                           monkeypatch, tmp_path, no_gpu) -> None:
    monkeypatch.setenv("FLASHINFER_JIT_ARCH", "80")
    monkeypatch.setenv("FLASHINFER_JIT_CACHE_DIR", str(tmp_path))
    spec = PrefillSpec("ragged", 64, "fp16", True, custom=CustomVariant("broken", **{which: snippet}))
    for _ in range(2):  # nothing half-built is served: the second load builds (and fails) again
        with pytest.raises(flashinfer_jit.VariantCompileError) as info:
            loader.load(spec)
        err = info.value
        assert isinstance(err, flashinfer_jit.KernelCompileError)
        assert (err.variant, err.snippet) == ("broken", which)
        assert err.line == line or which == "mask_mod", str(err)  # an unfinished mask errs at its last line
        assert quoted in str(err) and "generated sources" in str(err) and err.log_path.exists()
        loader.clear_memo()
    assert not list(tmp_path.glob("**/*.so"))
