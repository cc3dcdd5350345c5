"""The prefill planner (C++ in the kernel library, called on the host): no GPU needed.

One causal ragged and one non-causal paged variant are compiled with the real nvcc (once for the
module; the planner is templated on the library's attention variant, so each plans with its own
mask); then the planner runs on many random batches and every work list is checked: each (request,
packed q row) is covered by exactly one q tile, the chunks of a tile cover its visible KV range
exactly once, split tiles have one merge entry with disjoint partial rows, and items come longest
first.
"""
from __future__ import annotations

import ctypes
import itertools
import math
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

import planner_tools
from conftest import requires_nvcc
from flashinfer_jit import codegen, loader, planner, spec
from flashinfer_jit.abi import ITEM_INTS, MERGE_INTS, PlanConfig

pytestmark = [pytest.mark.slow, requires_nvcc]


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory):
    """(causal library, non-causal library): ragged causal and paged full (the planner is the same
    for both layouts)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("FLASHINFER_JIT_CACHE_DIR", str(tmp_path_factory.mktemp("planner-cache")))
    try:
        causal = loader.load(spec.PrefillSpec("ragged", 128, "bf16", True))
        full = loader.load(spec.PrefillSpec("paged", 128, "bf16", False))
    finally:
        patch.undo()
    return causal, full


def config(batch: int, group: int, num_kv_heads: int, cta_q: int, kv_tile: int, target_ctas: int,
           min_chunk_tiles: int, split_tiles: int, window_left: int = -1) -> PlanConfig:
    return PlanConfig(batch=batch, group=group, num_kv_heads=num_kv_heads, cta_q=cta_q, kv_tile=kv_tile,
                      target_ctas=target_ctas, min_chunk_tiles=min_chunk_tiles, split_tiles=split_tiles,
                      window_left=window_left)


def indptr(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


def visible_range(rb: int, cta_q: int, q_len: int, kv_len: int, group: int, causal: bool,
                  window_left: int = -1) -> tuple[int, int]:
    """Keys [begin, end) some query of the tile sees: its first token's begin, its last token's end
    ((0, 0) when empty). `window_left` >= 0: FlashInfer's sliding window (keys j >= pos - window_left,
    pos = token + kv_len - q_len), written out here independently of variant.cuh."""
    def token_range(token: int) -> tuple[int, int]:
        pos = token + kv_len - q_len
        end = max(0, min(kv_len, pos + 1)) if causal else kv_len
        return (max(0, min(end, pos - window_left)) if window_left >= 0 else 0), end

    first, last = rb // group, (min(rb + cta_q, q_len * group) - 1) // group
    begin, end = token_range(first)[0], token_range(last)[1]
    return (begin, end) if begin < end else (0, 0)


def check_work_list(items: torch.Tensor, merges: torch.Tensor, plan: planner.Plan, q_lens: list[int],
                    kv_lens: list[int], group: int, cta_q: int, kv_tile: int, causal: bool,
                    window_left: int = -1) -> None:
    rows = items.tolist()
    # Longest first: the GPU dispatches blocks in index order.
    costs = [math.ceil(max(ke - kb, 0) / kv_tile) for _, _, kb, ke, *_ in rows]
    assert costs == sorted(costs, reverse=True)
    q_starts, kv_starts = [0], [0]
    for q, k in zip(q_lens, kv_lens):
        q_starts.append(q_starts[-1] + q)
        kv_starts.append(kv_starts[-1] + k)
    for row in rows:  # each item carries its request's offsets and lengths (the kernel reads no indptr)
        r = row[0]
        assert row[8:12] == [q_starts[r], q_lens[r], kv_starts[r], kv_lens[r]], row
    tiles: dict[tuple[int, int], list[list[int]]] = {}
    for row in rows:
        tiles.setdefault((row[0], row[1]), []).append(row)
    expected = {(r, rb) for r, q in enumerate(q_lens) for rb in range(0, q * group, cta_q)}
    assert set(tiles) == expected  # every packed q row of every request in exactly one tile
    partial_rows: set[int] = set()
    merge_rows = {tuple(m) for m in merges.tolist()}
    assert len(merge_rows) == plan.num_merges == len(merges)
    for (r, rb), chunks in tiles.items():
        begin, end = visible_range(rb, cta_q, q_lens[r], kv_lens[r], group, causal, window_left)
        chunks.sort(key=lambda c: c[2])
        position = begin // kv_tile * kv_tile
        for c in chunks:  # chunks tile [begin rounded down to the KV tile, end) exactly, on KV-tile boundaries
            assert c[2] == position and c[2] % kv_tile == 0
            position = c[3]
        assert position == end or (end == 0 and len(chunks) == 1 and chunks[0][3] == 0)
        if len(chunks) == 1:
            assert chunks[0][4] == -1 and chunks[0][6] == 1
            continue
        base = min(c[4] for c in chunks)
        assert sorted(c[4] for c in chunks) == [base + i * cta_q for i in range(len(chunks))]
        assert all(c[7] == base for c in chunks)  # partial_base: where the merging chunk finds the others
        assert all(c[6] == len(chunks) for c in chunks) and len({c[5] for c in chunks}) == 1
        assert (r, rb, base, len(chunks)) in merge_rows
        new = set(range(base, base + len(chunks) * cta_q))
        assert not (partial_rows & new)  # partial states of different tiles never overlap
        partial_rows |= new
    assert len(partial_rows) == plan.partial_rows


@pytest.mark.parametrize("seed", range(40))
def test_random_batches_are_covered_exactly_once(kernels, seed: int) -> None:
    rng = random.Random(seed)
    batch = rng.randint(0, 12)
    causal = rng.random() < 0.5
    group = rng.choice([1, 2, 3, 4, 8])
    cta_q = rng.choice([64, 128])
    q_lens = [rng.choice([0, 1, 2, 15, 17, 63, 129, rng.randint(0, 2000)]) for _ in range(batch)]
    kv_lens = [q + rng.choice([0, 0, 1, 5, 300, rng.randint(0, 5000)]) for q in q_lens]
    if not causal and batch:
        kv_lens[0] = rng.randint(0, 3000)  # any length without the causal diagonal
    split = rng.choice([0, 0, -1, rng.randint(1, 8)])
    target = rng.choice([1, 8, 132, 264])  # small targets force split-KV
    cfg = config(batch, group, rng.randint(1, 8), cta_q, 64, target, planner.MIN_CHUNK_TILES, split)
    kernel = kernels[0] if causal else kernels[1]
    items, merges, plan = planner_tools.plan_to_tensors(kernel, indptr(q_lens), indptr(kv_lens), cfg)
    check_work_list(items, merges, plan, q_lens, kv_lens, group, cta_q, 64, causal)


WINDOW_PLANNER = r"""
#include "flashinfer_jit/prefill_plan.h"

// The library's sliding-window variants (variant.cuh), causal and not: the window's size comes from
// PlanConfig::window_left at run time.
extern "C" int window_plan(const int32_t* qo, const int32_t* kv, const fij::PlanConfig* cfg, fij::WorkItem* items,
                           int64_t item_capacity, fij::MergeEntry* merges, int64_t merge_capacity,
                           fij::PlanResult* result) {
  return fij::plan_prefill<fij::StandardAttention<true, true>>(qo, kv, *cfg, items, item_capacity, merges,
                                                               merge_capacity, result);
}
extern "C" int window_full_plan(const int32_t* qo, const int32_t* kv, const fij::PlanConfig* cfg,
                                fij::WorkItem* items, int64_t item_capacity, fij::MergeEntry* merges,
                                int64_t merge_capacity, fij::PlanResult* result) {
  return fij::plan_prefill<fij::SoftCapAttention<false, true>>(qo, kv, *cfg, items, item_capacity, merges,
                                                               merge_capacity, result);
}
"""


class _HostLibrary:
    """What planner.* call on a kernel library (`function`), for a host-only test library."""

    def __init__(self, path: Path, prefix: str):
        self.lib = ctypes.CDLL(str(path))
        self.prefix = prefix

    def function(self, name: str, argtypes: list) -> Any:
        fn = getattr(self.lib, f"{self.prefix}_{name}")
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
        return fn


@pytest.fixture(scope="module")
def window_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    compiler = shutil.which("c++")
    if compiler is None:
        pytest.skip("needs a host C++ compiler (c++) to build the sliding-window planner")
    tmp = tmp_path_factory.mktemp("window-planner")
    (tmp / "window.cpp").write_text(WINDOW_PLANNER)
    subprocess.run([compiler, "-std=c++17", "-O1", "-shared", "-fPIC", "-I", str(codegen.include_dir()),
                    str(tmp / "window.cpp"), "-o", str(tmp / "window.so")], check=True)
    return tmp / "window.so"


@pytest.fixture(scope="module")
def window_planner(window_library: Path) -> _HostLibrary:
    return _HostLibrary(window_library, "window")


@pytest.mark.parametrize("seed", range(12))
def test_a_variant_whose_range_begins_later_plans_from_its_begin(window_planner, seed: int) -> None:
    """The planner takes each q tile's keys from the variant's kv_range: with a sliding window
    (window_left 99: 100 keys), a tile's chunks start at its first token's begin rounded down to the KV
    tile, not at 0."""
    rng = random.Random(seed)
    batch = rng.randint(1, 6)
    group = rng.choice([1, 2, 4])
    cta_q = rng.choice([16, 64])
    q_lens = [rng.choice([1, 5, 63, rng.randint(1, 600)]) for _ in range(batch)]
    kv_lens = [q + rng.choice([0, 1, 300, rng.randint(0, 3000)]) for q in q_lens]
    cfg = config(batch, group, 2, cta_q, 64, rng.choice([1, 132]), planner.MIN_CHUNK_TILES, rng.choice([0, -1, 1]),
                 window_left=99)
    items, merges, plan = planner_tools.plan_to_tensors(window_planner, indptr(q_lens), indptr(kv_lens), cfg)
    check_work_list(items, merges, plan, q_lens, kv_lens, group, cta_q, 64, True, window_left=99)


@pytest.mark.parametrize("seed", range(8))
def test_a_non_causal_window_plans_from_each_tiles_begin(window_library: Path, seed: int) -> None:
    """Non-causal with a window (and the soft-cap variant, which shares the key range): keys
    [pos - window_left, kv_len); window sizes 0, 1, odd and longer than the requests."""
    rng = random.Random(100 + seed)
    batch = rng.randint(1, 5)
    group = rng.choice([1, 4, 8])
    window_left = rng.choice([0, 1, 77, 5000])
    q_lens = [rng.choice([1, 5, 63, rng.randint(1, 400)]) for _ in range(batch)]
    kv_lens = [q + rng.choice([0, 1, 300, rng.randint(0, 2000)]) for q in q_lens]
    cfg = config(batch, group, 2, 64, 64, 132, planner.MIN_CHUNK_TILES, rng.choice([0, -1]), window_left=window_left)
    items, merges, plan = planner_tools.plan_to_tensors(_HostLibrary(window_library, "window_full"), indptr(q_lens),
                                                        indptr(kv_lens), cfg)
    check_work_list(items, merges, plan, q_lens, kv_lens, group, 64, 64, False, window_left=window_left)


def test_a_window_tile_starts_at_its_begin_rounded_down_to_the_kv_tile(window_planner) -> None:
    cfg = config(1, 1, 1, 16, 64, 132, planner.MIN_CHUNK_TILES, -1, window_left=99)
    items, _, _ = planner_tools.plan_to_tensors(window_planner, indptr([1]), indptr([1000]), cfg)
    assert [row[2:4] for row in items.tolist()] == [[896, 1000]]  # keys [900, 1000): tiles from 896


def test_long_request_on_an_idle_gpu_is_split_and_merged(kernels) -> None:
    _, full = kernels
    cfg = config(1, 4, 8, 64, 64, 132, planner.MIN_CHUNK_TILES, 0)
    items, merges, plan = planner_tools.plan_to_tensors(full, indptr([1]), indptr([32768]), cfg)
    assert plan.num_items > 1 and plan.num_merges == 1  # flash-decoding: one q tile, many KV chunks
    check_work_list(items, merges, plan, [1], [32768], 4, 64, 64, False)


def test_capacity_is_reported_before_anything_is_written(kernels) -> None:
    _, full = kernels
    cfg = config(3, 1, 1, 64, 64, 132, 4, -1)
    items = torch.full((2, ITEM_INTS), -7, dtype=torch.int32)
    merges = torch.empty((1, MERGE_INTS), dtype=torch.int32)
    status, plan = planner_tools.run_planner(full, indptr([100, 100, 100]), indptr([5, 5, 5]), cfg,
                                       items.data_ptr(), 2, merges.data_ptr(), 1)
    assert status == planner.PLAN_CAPACITY and plan.num_items == 6
    assert bool((items == -7).all())


@pytest.mark.parametrize("qo, kv, message", [
    ([1, 5], [0, 5], "qo_indptr[0] must be 0"),
    ([0, 5], [2, 5], "kv_indptr[0] must be 0"),
    ([0, 5, 3], [0, 5, 9], "qo_indptr must be non-decreasing (at index 1: qo_indptr[1:3] = [5, 3])"),
    ([0, 5, 9], [0, 9, 8], "kv_indptr must be non-decreasing (at index 1: kv_indptr[1:3] = [9, 8])"),
])
def test_bad_indptrs_are_refused_on_the_host(kernels, qo, kv, message) -> None:
    causal, _ = kernels
    cfg = config(len(qo) - 1, 1, 1, 64, 64, 132, 4, 0)
    with pytest.raises(ValueError) as info:
        planner_tools.plan_to_tensors(causal, torch.tensor(qo, dtype=torch.int32), torch.tensor(kv, dtype=torch.int32), cfg)
    assert message in str(info.value)


def test_page_table_lengths_and_checks(kernels) -> None:
    _, paged = kernels
    lengths = planner.paged_kv_lengths
    page_size = 16
    rng = random.Random(3)
    pages = [rng.randint(0, 9) for _ in range(20)]
    last = [rng.randint(1, page_size) if n else 0 for n in pages]
    table = indptr(pages)
    indices = torch.randperm(int(table[-1]) + 5)[: int(table[-1])].to(torch.int32)
    kv, max_page = lengths(paged, table, torch.tensor(last, dtype=torch.int32), indices, page_size, 20)
    expected = [(n - 1) * page_size + l if n else 0 for n, l in zip(pages, last)]
    assert kv.tolist() == [0, *itertools.accumulate(expected)]
    assert max_page == int(indices.max())
    bad_last = list(last)
    i = next(j for j, n in enumerate(pages) if n)
    bad_last[i] = page_size + 1
    with pytest.raises(ValueError, match=rf"paged_kv_last_page_len\[{i}\] = {page_size + 1}"):
        lengths(paged, table, torch.tensor(bad_last, dtype=torch.int32), indices, page_size, 20)
    with pytest.raises(ValueError, match="page indices must be >= 0"):
        lengths(paged, table, torch.tensor(last, dtype=torch.int32), -indices - 1, page_size, 20)
    with pytest.raises(ValueError, match="paged_kv_indptr must be non-decreasing"):
        lengths(paged, torch.tensor([0, 3, 2], dtype=torch.int32), torch.tensor([1, 1], dtype=torch.int32),
                indices, page_size, 2)
