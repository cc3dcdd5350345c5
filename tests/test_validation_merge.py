"""merge_state rejects bad inputs before any launch, naming the argument. No GPU needed.

Checks after the device check run on `CudaLooking` tensors: CPU tensors that report device cuda:0.
The validation reads only metadata (dtype, shape, strides, data_ptr), so they exercise it exactly;
the op itself is replaced by a recorder, so nothing is launched. Error types: TypeError for a
non-tensor or a wrong dtype, ValueError for the rest (documented in README).
"""
from __future__ import annotations

import pytest
import torch

import flashinfer_jit
from flashinfer_jit import cascade


class CudaLooking(torch.Tensor):
    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("cuda", 0)


def cuda_looking(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.zeros(*shape, dtype=dtype).as_subclass(CudaLooking)


N, H, D = 4, 8, 128


@pytest.fixture
def launches(monkeypatch):
    """Record would-be launches; allocate outputs as CudaLooking tensors."""
    calls = []
    monkeypatch.setattr(cascade, "_merge_two_op", lambda *args: calls.append(("merge_two", args)))
    monkeypatch.setattr(cascade, "_merge_many_op", lambda *args: calls.append(("merge_many", args)))
    real_empty, real_empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **{**k, "device": "cpu"}).as_subclass(CudaLooking))
    monkeypatch.setattr(torch, "empty_like", lambda t, **k: real_empty_like(t.as_subclass(torch.Tensor), **k).as_subclass(CudaLooking))
    return calls


def good():
    v = cuda_looking(N, H, D)
    s = cuda_looking(N, H, dtype=torch.float32)
    return [v, s, cuda_looking(N, H, D), cuda_looking(N, H, dtype=torch.float32)]


def misaligned_v():
    flat = cuda_looking(N * H * D + 1)
    return flat[1:].view(N, H, D)  # data_ptr 2 bytes past a 16-byte boundary


CASES = [
    # (id, argument index, replacement, exception, message fragments)
    ("v_a not a tensor", 0, lambda: [[1.0]], TypeError, ["v_a/s_a: v", "a torch.Tensor"]),
    ("v_a float32", 0, lambda: cuda_looking(N, H, D, dtype=torch.float32), TypeError, ["v_a/s_a: v", "torch.float16 or torch.bfloat16", "torch.float32"]),
    ("s_a float16", 1, lambda: cuda_looking(N, H, dtype=torch.float16), TypeError, ["v_a/s_a: s", "torch.float32"]),
    ("v_a on the CPU", 0, lambda: torch.zeros(N, H, D, dtype=torch.bfloat16), ValueError, ["v_a/s_a: v", "a CUDA tensor", "device=cpu"]),
    ("s_b on the CPU", 3, lambda: torch.zeros(N, H), ValueError, ["v_b/s_b: s", "cuda:0", "device=cpu"]),
    ("v_a 2-D", 0, lambda: cuda_looking(N, D), ValueError, ["v_a/s_a: v", "3-D"]),
    ("head_dim 96", 0, lambda: cuda_looking(N, H, 96), ValueError, ["v_a/s_a: v.shape[-1] (head_dim)=96", "64, 128, 256"]),
    ("s_a shape mismatch", 1, lambda: cuda_looking(N, H + 1, dtype=torch.float32), ValueError, ["v_a/s_a: s", f"shape [{N}, {H}]", f"({N}, {H + 1})"]),
    ("v_b head_dim differs from v_a", 2, lambda: cuda_looking(N, H, 64), ValueError, ["v_b/s_b: v", f"shape [{N}, {H}, {D}]"]),
    ("v_b rows differ, s_b matches v_a", 2, lambda: cuda_looking(N + 1, H, D), ValueError, ["v_b/s_b: s", f"shape [{N + 1}, {H}]"]),
    ("v_b dtype mismatch", 2, lambda: cuda_looking(N, H, D, dtype=torch.float16), TypeError, ["v_b/s_b: v", "torch.bfloat16"]),
    ("misaligned rows", 0, misaligned_v, ValueError, ["v_a/s_a: v", "16-byte aligned"]),
    ("strided last dim", 0, lambda: cuda_looking(N, H, 2 * D)[:, :, ::2], ValueError, ["v_a/s_a: v", "stride(-1) == 1"]),
]


@pytest.mark.parametrize("index, bad, exc, fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_merge_state_rejects(launches, index, bad, exc, fragments):
    args = good()
    args[index] = bad()
    with pytest.raises(exc) as excinfo:
        flashinfer_jit.merge_state(*args)
    for fragment in fragments:
        assert fragment in str(excinfo.value), f"{fragment!r} not in {excinfo.value}"
    assert launches == []


def test_plain_cpu_tensors_are_rejected_without_touching_cuda():
    """The most common mistake, with no patching at all: fails fast, no CUDA initialisation."""
    v = torch.zeros(N, H, D, dtype=torch.bfloat16)
    s = torch.zeros(N, H)
    with pytest.raises(ValueError, match=r"v_a/s_a: v: expected a CUDA tensor"):
        flashinfer_jit.merge_state(v, s, v, s)
    with pytest.raises(TypeError, match=r"v_a/s_a: v: expected dtype torch.float16 or torch.bfloat16"):
        flashinfer_jit.merge_state(v.float(), s, v, s)


def test_valid_inputs_pass_validation_and_launch_once(launches):
    v_out, s_out = flashinfer_jit.merge_state(*good())
    assert [name for name, _ in launches] == ["merge_two"]
    assert tuple(v_out.shape) == (N, H, D) and tuple(s_out.shape) == (N, H)


def test_merge_state_in_place_checks_the_mask(launches):
    v, s, v_o, s_o = good()
    with pytest.raises(TypeError, match="mask: expected dtype torch.bool"):
        flashinfer_jit.merge_state_in_place(v, s, v_o, s_o, mask=cuda_looking(N, dtype=torch.int32))
    with pytest.raises(ValueError, match=rf"mask: expected shape \[{N}\]"):
        flashinfer_jit.merge_state_in_place(v, s, v_o, s_o, mask=cuda_looking(N + 1, dtype=torch.bool))
    assert launches == []
    flashinfer_jit.merge_state_in_place(v, s, v_o, s_o, mask=cuda_looking(N, dtype=torch.bool))
    assert len(launches) == 1


def test_merge_states_checks_shapes_and_handles_zero_states(launches):
    with pytest.raises(ValueError, match=r"s: expected shape \[4, 3, 8\]"):
        flashinfer_jit.merge_states(cuda_looking(N, 3, H, D), cuda_looking(N, 3, H + 1, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"v: expected a 4-D tensor"):
        flashinfer_jit.merge_states(cuda_looking(N, H, D), cuda_looking(N, H, dtype=torch.float32))
    assert launches == []
    v_out, s_out = flashinfer_jit.merge_states(cuda_looking(N, 0, H, D), cuda_looking(N, 0, H, dtype=torch.float32))
    assert launches == []  # no states to merge: no launch, documented empty result
    assert torch.all(s_out.as_subclass(torch.Tensor) == float("-inf"))
    assert torch.all(v_out.as_subclass(torch.Tensor) == 0)
