"""The standalone RoPE ops (flashinfer_jit.rope: FlashInfer's apply_rope, apply_rope_inplace,
apply_rope_pos_ids, apply_rope_pos_ids_inplace; issue #16).

CPU: bad arguments raise before any kernel is loaded; the kernels render and compile with nvcc for both
pairings. GPU (marked gpu): every form against a float32 reference written here from FlashInfer's
definition (rotate-half and interleaved pairs, partial rotary_dim, rope_scale / rope_theta, GQA heads,
strided q / k views of one fused qkv tensor, long positions), outputs poisoned, in place equal to out of
place, the indptr form equal to the pos_ids form."""
from __future__ import annotations

import pytest
import torch

import flashinfer_jit
from conftest import DEVICE, NAN, requires_nvcc
from reference import rope_reference
from flashinfer_jit import codegen, loader
from flashinfer_jit.spec import RopeSpec


class _Cuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA (for argument checks without a GPU)."""

    @property
    def device(self):  # type: ignore[override]
        return torch.device("cuda", 0)


def cl(*shape, dtype=torch.float16):
    return torch.zeros(shape, dtype=dtype).as_subclass(_Cuda)


@pytest.fixture
def no_kernels(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a kernel library would be loaded: the bad argument got through")

    monkeypatch.setattr(loader, "load", fail)


@pytest.mark.parametrize("call, error, match", [
    (lambda: flashinfer_jit.apply_rope_pos_ids(cl(4, 8, 128), cl(4, 2, 128), cl(3, dtype=torch.int32)), ValueError,
     "one position per token"),
    (lambda: flashinfer_jit.apply_rope_pos_ids(cl(4, 8, 128), cl(4, 2, 128), cl(4, dtype=torch.int64)), TypeError,
     "pos_ids"),
    (lambda: flashinfer_jit.apply_rope_pos_ids(cl(4, 8, 128), cl(5, 2, 128), cl(4, dtype=torch.int32)), ValueError,
     "nnz=4"),
    (lambda: flashinfer_jit.apply_rope_pos_ids(cl(4, 8, 96), cl(4, 2, 96), cl(4, dtype=torch.int32)), ValueError,
     "head_dim"),
    (lambda: flashinfer_jit.apply_rope_pos_ids(cl(4, 8, 128), cl(4, 2, 128, dtype=torch.bfloat16),
                                               cl(4, dtype=torch.int32)), TypeError, "k"),
    (lambda: flashinfer_jit.apply_rope_pos_ids(cl(4, 8, 128), cl(4, 2, 128), cl(4, dtype=torch.int32), rotary_dim=63),
     ValueError, "rotary_dim=63"),
    (lambda: flashinfer_jit.apply_rope_pos_ids(cl(4, 8, 128), cl(4, 2, 128), cl(4, dtype=torch.int32), rotary_dim=256),
     ValueError, "rotary_dim=256"),
    (lambda: flashinfer_jit.apply_rope_pos_ids(cl(4, 8, 128), cl(4, 2, 128), cl(4, dtype=torch.int32), rope_theta=0),
     ValueError, "rope_theta=0"),
    (lambda: flashinfer_jit.apply_rope(cl(4, 8, 128), cl(4, 2, 128), torch.tensor([0, 2, 3], dtype=torch.int32),
                                       torch.tensor([0, 5], dtype=torch.int32)), ValueError, "end at nnz=4"),
    (lambda: flashinfer_jit.apply_rope(cl(4, 8, 128), cl(4, 2, 128), torch.tensor([0, 3, 2, 4], dtype=torch.int32),
                                       torch.tensor([0, 5, 1], dtype=torch.int32)), ValueError, "non-decreasing"),
    (lambda: flashinfer_jit.apply_rope_inplace(cl(4, 8, 128), cl(4, 2, 128), torch.tensor([0, 4], dtype=torch.int32),
                                               torch.tensor([0, 5], dtype=torch.int32)), ValueError, "expected batch \\+ 1"),
    (lambda: flashinfer_jit.apply_rope_pos_ids(torch.zeros(4, 8, 128, dtype=torch.float16), cl(4, 2, 128),
                                               cl(4, dtype=torch.int32)), ValueError, "CUDA"),
])
def test_bad_arguments_raise_before_any_kernel(call, error, match, no_kernels) -> None:
    with pytest.raises(error, match=match):
        call()


@requires_nvcc
@pytest.mark.slow
@pytest.mark.parametrize("interleave", [False, True])
def test_rope_kernels_build(interleave: bool, monkeypatch, tmp_path, no_gpu) -> None:
    monkeypatch.setenv("FLASHINFER_JIT_CACHE_DIR", str(tmp_path))
    spec = RopeSpec(128, "bf16", interleave)
    assert spec.uri == f"rope_hd128_bf16_{'interleave' if interleave else 'halves'}"
    assert f"constexpr bool kInterleave = {'true' if interleave else 'false'};" in codegen.render(spec)["rope.cu"]
    kernel = loader.load(spec)
    assert kernel.entry.library.exists()


@requires_nvcc
@pytest.mark.slow
def test_rope_vector_kernel_is_opt_in(monkeypatch, tmp_path, no_gpu) -> None:
    """-DFIJ_ROPE_VEC=1 (off until it has run on a GPU: benchmarks/rope_ab.sh) adds the 16-byte kernel:
    128-bit global loads and stores that the scalar kernel has none of; its own cache key."""
    from test_sm90_build import built_sass
    monkeypatch.setenv("FLASHINFER_JIT_CACHE_DIR", str(tmp_path))
    spec = RopeSpec(128, "bf16", False)
    sass, keys = {}, set()
    for flags in ("", "-DFIJ_ROPE_VEC=1"):
        monkeypatch.setenv("FLASHINFER_JIT_EXTRA_CUDAFLAGS", flags)
        keys.add(loader.compute_key(spec).key)
        loader.clear_memo()  # (a process loads a spec once; the flags are read at load)
        sass[flags] = built_sass(spec)
    assert len(keys) == 2
    assert "STG.E.128" not in sass[""] and "STG.E.128" in sass["-DFIJ_ROPE_VEC=1"]


# ---- GPU ---------------------------------------------------------------------------------------------

CASES = [  # (head_dim, rotary_dim, interleave, scale, theta); rotary_dim % 16 != 0: always the scalar kernel
    (128, None, False, 1.0, 1e4), (128, None, True, 1.0, 1e4), (64, 32, False, 2.0, 5e5), (256, 128, True, 1.0, 1e6),
    (64, 40, False, 1.0, 1e4), (128, 24, True, 1.0, 1e4),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim, rotary_dim, interleave, scale, theta", CASES)
def test_rope_matches_reference(head_dim, rotary_dim, interleave, scale, theta, dtype) -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(head_dim)
    nnz, hq, hk = 77, 8, 2
    qkv = torch.randn(nnz, hq + 2 * hk, head_dim, device=DEVICE, dtype=dtype, generator=gen)  # fused: strided views
    q, k = qkv[:, :hq], qkv[:, hq:hq + hk]
    pos = torch.randint(0, 4096, (nnz,), device=DEVICE, dtype=torch.int32, generator=gen)
    rot = head_dim if rotary_dim is None else rotary_dim
    ref_q = rope_reference(q, pos, rot, interleave, scale, theta)
    ref_k = rope_reference(k, pos, rot, interleave, scale, theta)
    tol = dict(atol=2e-2, rtol=1e-2) if dtype == torch.bfloat16 else dict(atol=4e-3, rtol=2e-3)
    kw = dict(rotary_dim=rotary_dim, interleave=interleave, rope_scale=scale, rope_theta=theta)
    q_out, k_out = flashinfer_jit.apply_rope_pos_ids(q, k, pos, **kw)
    for got, want in ((q_out, ref_q), (k_out, ref_k)):
        assert bool(torch.isfinite(got).all())
        torch.testing.assert_close(got.float(), want, **tol)
    # in place on the fused tensor: the same values, v untouched
    v_before = qkv[:, hq + hk:].clone()
    flashinfer_jit.apply_rope_pos_ids_inplace(q, k, pos, **kw)
    assert torch.equal(q, q_out) and torch.equal(k, k_out) and torch.equal(qkv[:, hq + hk:], v_before)


@pytest.mark.gpu
@pytest.mark.parametrize("interleave", [False, True], ids=["half", "interleave"])
def test_rope_on_views_not_16_byte_aligned(interleave: bool) -> None:
    """Rows one element off 16-byte alignment: the 16-byte kernel must not take them (the scalar one does)."""
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    nnz, hq, hk, head_dim = 33, 4, 2, 128
    buf = torch.randn(nnz, (hq + hk) * head_dim + 1, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    qk = buf[:, 1:].unflatten(1, (hq + hk, head_dim))
    q, k = qk[:, :hq], qk[:, hq:]
    pos = torch.randint(0, 4096, (nnz,), device=DEVICE, dtype=torch.int32, generator=gen)
    q_out, k_out = flashinfer_jit.apply_rope_pos_ids(q, k, pos, interleave=interleave)
    for got, x in ((q_out, q), (k_out, k)):
        assert bool(torch.isfinite(got).all())
        torch.testing.assert_close(got.float(), rope_reference(x, pos, head_dim, interleave, 1.0, 1e4),
                                   atol=2e-2, rtol=1e-2)


@pytest.mark.gpu
def test_indptr_form_equals_pos_ids_form() -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    lens, offsets = [5, 0, 17, 1, 30], [0, 3, 100, 7, 2000]
    nnz = sum(lens)
    q = torch.randn(nnz, 4, 128, device=DEVICE, dtype=torch.float16, generator=gen)
    k = torch.randn(nnz, 1, 128, device=DEVICE, dtype=torch.float16, generator=gen)
    indptr = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    off = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    pos = torch.cat([torch.arange(n, dtype=torch.int32) + o for n, o in zip(lens, offsets)]).to(DEVICE)
    a = flashinfer_jit.apply_rope(q, k, indptr, off)
    b = flashinfer_jit.apply_rope_pos_ids(q, k, pos)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    q2, k2 = q.clone(), k.clone()
    flashinfer_jit.apply_rope_inplace(q2, k2, indptr, off)
    assert torch.equal(q2, a[0]) and torch.equal(k2, a[1])
    out = torch.full_like(q, NAN)
    out.copy_(a[0])
    assert bool(torch.isfinite(out).all())


@pytest.mark.gpu
def test_rope_under_torch_compile_fullgraph() -> None:
    q = torch.randn(9, 4, 64, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(9, 2, 64, device=DEVICE, dtype=torch.bfloat16)
    pos = torch.arange(9, dtype=torch.int32, device=DEVICE)
    eager = flashinfer_jit.apply_rope_pos_ids(q, k, pos)
    compiled = torch.compile(lambda q, k, p: flashinfer_jit.apply_rope_pos_ids(q, k, p), fullgraph=True)
    got = compiled(q, k, pos)
    assert torch.equal(got[0], eager[0]) and torch.equal(got[1], eager[1])
