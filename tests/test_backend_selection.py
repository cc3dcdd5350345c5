"""Which kernel family a plan runs (kernels.resolve_backend), decided without a GPU: the device's compute
capability is faked. "auto" takes sm90 on Hopper unless the plan is one it cannot run or should not (a
GQA group not dividing 128, pages it cannot copy whole, decode-like batches); an explicit "sm90" / "fa3"
that cannot run raises NotSupportedError naming the reason, before anything is built or launched."""
from __future__ import annotations

import pytest
import torch

from flashinfer_jit import kernels
from flashinfer_jit.errors import NotSupportedError

CUDA = torch.device("cuda:0")


@pytest.fixture
def card(monkeypatch):
    """Set the fake card's compute capability: card((9, 0))."""
    def set_capability(capability):
        monkeypatch.setattr(kernels, "_compute_capability", lambda device: capability if device.type == "cuda" else None)
    return set_capability


@pytest.mark.parametrize("layout, group, page_size, rows, expected", [
    ("ragged", 4, None, 1000.0, "sm90"),
    ("ragged", 1, None, 64.0, "sm90"),
    ("ragged", 8, None, None, "sm90"),       # before a plan: group and rows unknown
    ("ragged", 3, None, 1000.0, "fa2"),      # 128 % 3
    ("ragged", 4, None, 63.9, "fa2"),        # decode-like
    ("paged", 4, 16, 1000.0, "sm90"),
    ("paged", 4, 8, 1000.0, "sm90"),
    ("paged", 4, 256, 1000.0, "sm90"),       # a multiple of the 128-key tile
    ("paged", 4, 1, 1000.0, "fa2"),
    ("paged", 4, 5, 1000.0, "fa2"),
    ("paged", 4, 48, 1000.0, "fa2"),         # neither divides 128 nor a multiple of it
    ("paged", 4, 16, 4.0, "fa2"),            # decode
])
def test_auto_on_hopper(card, layout, group, page_size, rows, expected) -> None:
    card((9, 0))
    assert kernels.resolve_backend("auto", CUDA, layout, group, page_size=page_size, rows_per_request=rows) == expected


@pytest.mark.parametrize("capability", [(8, 0), (8, 9), (10, 0), None])
def test_auto_elsewhere_is_fa2_and_an_explicit_sm90_says_why(card, capability) -> None:
    card(capability)
    assert kernels.resolve_backend("auto", CUDA, "ragged", 4) == "fa2"
    with pytest.raises(NotSupportedError, match="compute capability 9.x") as info:
        kernels.resolve_backend("sm90", CUDA, "ragged", 4, requested="fa3")
    assert info.value.parameter == "backend" and "backend='fa3'" in str(info.value)


@pytest.mark.parametrize("kwargs, reason", [
    ({"layout": "ragged", "group": 6}, "GQA group size"),
    ({"layout": "paged", "group": 4, "page_size": 5}, "page size"),
    ({"layout": "paged", "group": 4, "page_size": 1}, "page size"),
])
def test_explicit_sm90_refuses_what_it_cannot_run(card, kwargs, reason) -> None:
    card((9, 0))
    with pytest.raises(NotSupportedError, match=reason):
        kernels.resolve_backend("sm90", CUDA, **kwargs)


def test_explicit_choices_are_kept(card) -> None:
    card((9, 0))
    # an explicit sm90 also runs decode-like batches (the user asked for it); fa2 is fa2 everywhere
    assert kernels.resolve_backend("sm90", CUDA, "paged", 4, page_size=16, rows_per_request=4.0) == "sm90"
    assert kernels.resolve_backend("fa2", CUDA, "ragged", 4) == "fa2"
    card(None)
    assert kernels.resolve_backend("fa2", torch.device("cpu"), "ragged", 3) == "fa2"
