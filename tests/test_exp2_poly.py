"""The polynomial exp2 of the sm90 softmax (softmax.cuh, exp2_poly; -DFIJ_POLY_EXP2, switches_sm90.h), on the
CPU: its coefficients, read from the header (the one place they live), evaluated in float32 the way the
kernel does (floor, Horner, the integer part added to the exponent bits) against 2**x in float64 over
the softmax's inputs x <= 0. P is rounded to 16 bits before P V (bf16: 2^-9, fp16: 2^-11 relative),
so a relative error of 1e-4 is far below what the kernel keeps; -inf (masked scores) must give exactly
0 and nothing finite a NaN."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

HEADER = Path(__file__).resolve().parent.parent / "templates" / "include" / "flashinfer_jit" / "softmax.cuh"
MAX_RELATIVE_ERROR = 1e-4  # the fit's is 8.6e-5


def header_constant(name: str) -> float:
    found = re.search(rf"\b{name} = ([-+0-9.e]+)f\b", HEADER.read_text())
    assert found, f"no constant {name} in {HEADER.name}"
    return float(found.group(1))


def exp2_poly(x: torch.Tensor) -> torch.Tensor:
    """exp2_poly of softmax.cuh in float32 (torch rounds the Horner steps' products apart, the GPU's FFMA
    does not: a difference of an ulp or so, far below the fit's error)."""
    c1, c2, c3 = (torch.tensor(header_constant(n), dtype=torch.float32) for n in ("kC1", "kC2", "kC3"))
    x = torch.clamp_min(x, -127.0)
    whole = torch.floor(x)  # the kernel: __fadd_rd(x, kRound) - kRound
    f = x - whole
    p = ((c3 * f + c2) * f + c1) * f + 1.0
    return (p.view(torch.int32) + (whole.to(torch.int32) << 23)).view(torch.float32)


def test_the_rounding_constant_puts_the_integer_in_the_shifted_bits() -> None:
    """kRound + n (n = floor(x) in [-127, 0]) is exact and its bit pattern shifted left by 23 is n << 23
    (the kernel adds that to p's exponent)."""
    k_round = np.float32(header_constant("kRound"))
    n = np.arange(-127, 1, dtype=np.int32)
    shifted = (k_round + n.astype(np.float32)).astype(np.float32)
    assert np.array_equal(shifted - k_round, n.astype(np.float32)), "kRound + n is not exact"
    assert np.array_equal(shifted.view(np.int32) << 23, n << 23)


def test_exp2_poly_matches_exp2_over_the_softmax_inputs() -> None:
    x = torch.cat([torch.linspace(-130.0, 0.0, 4_000_001, dtype=torch.float32),
                   torch.arange(-130, 1, dtype=torch.float32),  # integers: exact powers of two
                   torch.tensor([-126.5, -127.0, -0.0, 2.0 ** -24, 2.0 ** -20], dtype=torch.float32)])
    y = exp2_poly(x).double()
    exact = torch.exp2(x.double())
    assert not torch.isnan(y).any() and (y >= 0).all()
    normal = x >= -126
    relative = ((y[normal] - exact[normal]) / exact[normal]).abs()
    assert relative.max().item() < MAX_RELATIVE_ERROR, f"max relative error {relative.max().item():.3g}"
    integers = (x == torch.floor(x)) & normal
    assert torch.equal(y[integers], exact[integers]), "2^n is not exact at integers n"
    # below 2^-126 (where ex2.approx.ftz flushes to 0) the result is below 2^-126, and 0 from -127 on
    assert (y[~normal] < 2.0 ** -126).all()
    assert (y[x <= -127] == 0).all()


@pytest.mark.parametrize("x", [float("-inf"), -1e30, -127.0, -3.4e38])
def test_exp2_poly_of_masked_scores_is_exactly_zero(x: float) -> None:
    y = exp2_poly(torch.tensor([x], dtype=torch.float32))
    assert y.item() == 0.0 and not torch.signbit(y).item()


def test_exp2_poly_max_relative_error_is_the_fit_s() -> None:
    """The fit is minimax: its error equioscillates, so the maximum is reached near 8.6e-5 (a changed
    coefficient that still passes the bound above would show here too)."""
    f = torch.linspace(0.0, 1.0, 1_000_001, dtype=torch.float32)
    relative = (exp2_poly(f).double() / torch.exp2(f.double()) - 1).abs().max().item()
    assert 8.0e-5 < relative < 9.0e-5, relative
