"""The prefill planner (C++ in the kernel library, called on the host): no GPU needed.

One ragged and one paged variant are compiled with the real nvcc (once for the module); then the
planner runs on many random batches and every work list is checked: each (request, packed q row)
is covered by exactly one q tile, the chunks of a tile cover its visible KV range exactly once, split
tiles have one merge entry with disjoint partial rows, and items come longest first.
"""
from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from flashinfer_jit import loader, scheduler, spec
from flashinfer_jit.prefill import _paged_kv_lengths, _Variant

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory):
    patch = pytest.MonkeyPatch()
    patch.setenv("FLASHINFER_JIT_CACHE_DIR", str(tmp_path_factory.mktemp("planner-cache")))
    try:
        ragged = loader.load(spec.PrefillSpec("ragged", 128, "bf16", True))
        paged = _Variant(spec.PrefillSpec("paged_nhd", 128, "bf16", False))
    finally:
        patch.undo()
    return ragged, paged


def indptr(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


def visible_limit(rb: int, cta_q: int, q_len: int, kv_len: int, group: int, causal: bool) -> int:
    if not causal:
        return kv_len
    last_token = (min(rb + cta_q, q_len * group) - 1) // group
    return max(0, min(kv_len, last_token + kv_len - q_len + 1))


def check_work_list(items: torch.Tensor, merges: torch.Tensor, plan: scheduler.Plan, q_lens: list[int],
                    kv_lens: list[int], group: int, cta_q: int, kv_tile: int, causal: bool) -> None:
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
        limit = visible_limit(rb, cta_q, q_lens[r], kv_lens[r], group, causal)
        chunks.sort(key=lambda c: c[2])
        position = 0
        for c in chunks:  # chunks tile [0, limit) exactly, on KV-tile boundaries
            assert c[2] == position and c[2] % kv_tile == 0
            position = c[3]
        assert position == limit or (limit == 0 and len(chunks) == 1 and chunks[0][3] == 0)
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
    ragged, _ = kernels
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
    config = scheduler.PlanConfig(batch, group, rng.randint(1, 8), cta_q, 64, int(causal), target,
                                  scheduler.MIN_CHUNK_TILES, split, 0)
    items, merges, plan = scheduler.plan_to_tensors(ragged, indptr(q_lens), indptr(kv_lens), config)
    check_work_list(items, merges, plan, q_lens, kv_lens, group, cta_q, 64, causal)


def test_long_request_on_an_idle_gpu_is_split_and_merged(kernels) -> None:
    ragged, _ = kernels
    config = scheduler.PlanConfig(1, 4, 8, 64, 64, 0, 132, scheduler.MIN_CHUNK_TILES, 0, 0)
    items, merges, plan = scheduler.plan_to_tensors(ragged, indptr([1]), indptr([32768]), config)
    assert plan.num_items > 1 and plan.num_merges == 1  # flash-decoding: one q tile, many KV chunks
    check_work_list(items, merges, plan, [1], [32768], 4, 64, 64, False)


def test_capacity_is_reported_before_anything_is_written(kernels) -> None:
    ragged, _ = kernels
    config = scheduler.PlanConfig(3, 1, 1, 64, 64, 0, 132, 4, -1, 0)
    items = torch.full((2, scheduler.ITEM_INTS), -7, dtype=torch.int32)
    merges = torch.empty((1, scheduler.MERGE_INTS), dtype=torch.int32)
    status, plan = scheduler.run_planner(ragged, indptr([100, 100, 100]), indptr([5, 5, 5]), config,
                                         items.data_ptr(), 2, merges.data_ptr(), 1)
    assert status == scheduler.PLAN_CAPACITY and plan.num_items == 6
    assert bool((items == -7).all())


@pytest.mark.parametrize("qo, kv, message", [
    ([1, 5], [0, 5], "qo_indptr[0] must be 0"),
    ([0, 5], [2, 5], "kv_indptr[0] must be 0"),
    ([0, 5, 3], [0, 5, 9], "qo_indptr must be non-decreasing (at index 1: qo_indptr[1:3] = [5, 3])"),
    ([0, 5, 9], [0, 9, 8], "kv_indptr must be non-decreasing (at index 1: kv_indptr[1:3] = [9, 8])"),
])
def test_bad_indptrs_are_refused_on_the_host(kernels, qo, kv, message) -> None:
    ragged, _ = kernels
    config = scheduler.PlanConfig(len(qo) - 1, 1, 1, 64, 64, 0, 132, 4, 0, 0)
    with pytest.raises(ValueError) as info:
        scheduler.plan_to_tensors(ragged, torch.tensor(qo, dtype=torch.int32), torch.tensor(kv, dtype=torch.int32), config)
    assert message in str(info.value)


def test_page_table_lengths_and_checks(kernels) -> None:
    _, paged = kernels
    page_size = 16
    rng = random.Random(3)
    pages = [rng.randint(0, 9) for _ in range(20)]
    last = [rng.randint(1, page_size) if n else 0 for n in pages]
    table = indptr(pages)
    indices = torch.randperm(int(table[-1]) + 5)[: int(table[-1])].to(torch.int32)
    kv, max_page = _paged_kv_lengths(paged, table, torch.tensor(last, dtype=torch.int32), indices, page_size, 20)
    expected = [(n - 1) * page_size + l if n else 0 for n, l in zip(pages, last)]
    assert kv.tolist() == [0, *itertools.accumulate(expected)]
    assert max_page == int(indices.max())
    bad_last = list(last)
    i = next(j for j, n in enumerate(pages) if n)
    bad_last[i] = page_size + 1
    with pytest.raises(ValueError, match=rf"paged_kv_last_page_len\[{i}\] = {page_size + 1}"):
        _paged_kv_lengths(paged, table, torch.tensor(bad_last, dtype=torch.int32), indices, page_size, 20)
    with pytest.raises(ValueError, match="page indices must be >= 0"):
        _paged_kv_lengths(paged, table, torch.tensor(last, dtype=torch.int32), -indices - 1, page_size, 20)
    with pytest.raises(ValueError, match="paged_kv_indptr must be non-decreasing"):
        _paged_kv_lengths(paged, torch.tensor([0, 3, 2], dtype=torch.int32), torch.tensor([1, 1], dtype=torch.int32),
                          indices, page_size, 2)
