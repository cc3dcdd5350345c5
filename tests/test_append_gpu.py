"""GPU tests of append_paged_kv_cache and get_batch_indices_positions: appending then attending equals
attending over the concatenation.

What is pinned down (FlashInfer semantics):
* get_batch_indices_positions(append_indptr, seq_lens, nnz) gives request i's new tokens the positions
  seq_lens[i] - append_len[i] .. seq_lens[i] - 1 (seq_lens are the KV lengths after the append), on
  CPU and CUDA inputs;
* append_paged_kv_cache writes exactly the appended slots: the whole cache afterwards equals (bit for
  bit) the cache before with the new K/V placed through the page table; every other byte, including
  unused pages (NaN) and the old tokens, is unchanged; both layouts, page sizes 1, 7, 16, the cache as
  one tensor or a (k, v) tuple, index tensors on the CPU or CUDA, keys/values as strided views of a
  fused qkv buffer, requests with no old tokens, no new tokens or neither;
* paged prefill (causal, q = the new tokens) and decode over the appended cache match the float32
  reference over the dense concatenation of old and new K/V;
* a decode loop (append one token per request, grow the page table from a shuffled free list, decode)
  stays equal to the reference over the accumulated K/V at every step;
* nnz = 0 appends nothing.

Run: python -m pytest -m gpu -q tests/test_append_gpu.py   (skipped, with the reason, without CUDA)
"""
from __future__ import annotations

import itertools

import pytest
import torch

import flashinfer_jit

import reference as ref
from conftest import DEVICE, NAN

pytestmark = pytest.mark.gpu

LAYOUTS = ("NHD", "HND")
NUM_KV_HEADS = 2
WORKSPACE_BYTES = 128 << 20

# (old_len, new_len) per request: a fresh request (prefill through append), decode steps (+1), appends
# that cross page boundaries, a request that appends nothing and one with no tokens at all.
APPEND_LENS = ((0, 5), (17, 1), (16, 16), (100, 37), (5, 0), (0, 0), (63, 1), (1, 64), (250, 3))


def _name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw 16-bit patterns of an fp16/bf16 tensor (NaN == NaN when the bits are equal)."""
    return t.view(torch.int16)


def slot_mask(num_pages: int, page_size: int, pages: torch.Tensor, slots: torch.Tensor, layout: str) -> torch.Tensor:
    """Bool mask broadcastable to the cache: True at the given (page, slot) token slots, K and V."""
    mask = torch.zeros((num_pages, page_size), dtype=torch.bool, device=DEVICE)
    mask[pages.to(DEVICE), slots.to(DEVICE)] = True
    return mask[:, None, :, None, None] if layout == "NHD" else mask[:, None, None, :, None]


def expected_indices_positions(new_lens, final_lens) -> tuple[list[int], list[int]]:
    batch_indices, positions = [], []
    for i, (n, total) in enumerate(zip(new_lens, final_lens)):
        batch_indices += [i] * n
        positions += list(range(total - n, total))
    return batch_indices, positions


class AppendCase:
    """Old tokens written into a shuffled paged cache (NaN everywhere else) whose page table already
    covers the final lengths; the new tokens' K/V and queries are kept aside for the append."""

    def __init__(self, lens, group: int, head_dim: int, dtype: torch.dtype, layout: str, page_size: int, seed: int):
        self.old_lens = [a for a, _ in lens]
        self.new_lens = [b for _, b in lens]
        self.final_lens = [a + b for a, b in lens]
        self.layout, self.page_size, self.dtype, self.head_dim = layout, page_size, dtype, head_dim
        self.num_qo_heads = NUM_KV_HEADS * group
        self.table = ref.make_page_table(self.final_lens, page_size, extra_pages=6, seed=seed)
        # q: the new tokens' queries; k/v: the dense final K/V (old then new tokens of every request).
        self.dense = ref.make_ragged_batch(self.new_lens, self.final_lens, self.num_qo_heads, NUM_KV_HEADS, head_dim,
                                           dtype, DEVICE, "NHD", seed)
        starts = self.dense.kv_indptr.tolist()
        old_rows = [r for i, n in enumerate(self.old_lens) for r in range(starts[i], starts[i] + n)]
        new_rows = [r for i, n in enumerate(self.old_lens) for r in range(starts[i] + n, starts[i + 1])]
        old_rows_t = torch.tensor(old_rows, dtype=torch.long, device=DEVICE)
        new_rows_t = torch.tensor(new_rows, dtype=torch.long, device=DEVICE)
        self.new_k, self.new_v = self.dense.k[new_rows_t], self.dense.v[new_rows_t]
        self.nnz = len(new_rows)
        self.cache = ref.new_paged_cache(self.table.num_pages, page_size, NUM_KV_HEADS, head_dim, dtype, DEVICE,
                                         layout)
        pages, slots = ref.token_page_slots(self.table.indptr, self.table.indices, self.old_lens, page_size)
        ref.scatter_to_pages(self.cache, self.dense.k[old_rows_t], self.dense.v[old_rows_t], pages, slots, layout)
        self.new_pages, self.new_slots = ref.token_page_slots(self.table.indptr, self.table.indices,
                                                              self.final_lens, page_size, first_token=self.old_lens)

    def describe(self) -> str:
        pairs = ", ".join(f"{a}+{b}" for a, b in zip(self.old_lens, self.new_lens))
        return (f"(old+new: {pairs}) Hq={self.num_qo_heads} D={self.head_dim} {_name(self.dtype)} {self.layout} "
                f"page_size={self.page_size}")

    def append(self, index_device: str, cache_form: str, fused_kv: bool) -> None:
        append_indptr = ref.make_indptr(self.new_lens).to(index_device)
        seq_lens = torch.tensor(self.final_lens, dtype=torch.int32, device=index_device)
        batch_indices, positions = flashinfer_jit.get_batch_indices_positions(append_indptr, seq_lens, self.nnz)
        exp_b, exp_p = expected_indices_positions(self.new_lens, self.final_lens)
        assert batch_indices.dtype == torch.int32 and positions.dtype == torch.int32
        assert batch_indices.device.type == positions.device.type == torch.device(index_device).type
        assert batch_indices.tolist() == exp_b, f"batch_indices {batch_indices.tolist()} != {exp_b}"
        assert positions.tolist() == exp_p, f"positions {positions.tolist()} != {exp_p}"
        key, value = self.new_k, self.new_v
        if fused_kv:
            # K and V as strided views of one fused [nnz, Hq + 2 Hkv, D] qkv buffer.
            fused = torch.full((self.nnz, self.num_qo_heads + 2 * NUM_KV_HEADS, self.head_dim), NAN,
                               dtype=self.dtype, device=DEVICE)
            hq = self.num_qo_heads
            fused[:, hq:hq + NUM_KV_HEADS] = self.new_k
            fused[:, hq + NUM_KV_HEADS:] = self.new_v
            key, value = fused[:, hq:hq + NUM_KV_HEADS], fused[:, hq + NUM_KV_HEADS:]
            assert not key.is_contiguous()
        cache = self.cache if cache_form == "tensor" else ref.cache_kv(self.cache)
        t = self.table
        flashinfer_jit.append_paged_kv_cache(key, value, batch_indices, positions, cache, t.indices.to(index_device),
                                             t.indptr.to(index_device), t.last_page_len.to(index_device),
                                             kv_layout=self.layout)

    def check_cache(self, before: torch.Tensor, what: str) -> None:
        """Appended slots hold the new K/V; every other byte equals `before`."""
        changed = _bits(self.cache) != _bits(before)
        written = slot_mask(self.table.num_pages, self.page_size, self.new_pages, self.new_slots, self.layout)
        stray = changed & ~written
        assert not bool(stray.any()), (f"{what}: {int(stray.sum())} cache elements outside the appended slots "
                                       f"changed (first at {tuple(torch.nonzero(stray)[0].tolist())})")
        expected = before.clone()
        ref.scatter_to_pages(expected, self.new_k, self.new_v, self.new_pages, self.new_slots, self.layout)
        wrong = _bits(self.cache) != _bits(expected)
        assert not bool(wrong.any()), (f"{what}: {int(wrong.sum())} appended elements differ from the new K/V "
                                       f"(first at {tuple(torch.nonzero(wrong)[0].tolist())})")
        k, v, _ = ref.gather_paged_kv(self.cache, self.table.indptr, self.table.indices, self.table.last_page_len,
                                      self.page_size, self.layout)
        assert torch.equal(_bits(k), _bits(self.dense.k)) and torch.equal(_bits(v), _bits(self.dense.v)), \
            f"{what}: the cache read through the page table is not old + new K/V"

    def reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal attention of the new tokens over the dense concatenation (old + new) K/V."""
        return ref.ragged_attention_ref(self.dense.q, self.dense.k, self.dense.v, self.dense.qo_indptr,
                                        self.dense.kv_indptr, causal=True)


APPEND_CASES = list(itertools.product(LAYOUTS, (1, 7, 16), ("cpu", "cuda")))


def _append_case_id(case) -> str:
    layout, page_size, index_device = case
    i = APPEND_CASES.index(case)
    return f"{layout}-p{page_size}-idx_{index_device}-{'tuple' if i % 2 else 'tensor'}{'-fused' if i % 3 == 0 else ''}"


@pytest.mark.parametrize("case", APPEND_CASES, ids=[_append_case_id(c) for c in APPEND_CASES])
def test_append_then_attend_equals_concatenation(case) -> None:
    layout, page_size, index_device = case
    i = APPEND_CASES.index(case)
    head_dim, dtype, group = (64, 128, 256)[i % 3], (torch.float16, torch.bfloat16)[(i // 3) % 2], (1, 4, 8)[i % 3]
    c = AppendCase(APPEND_LENS, group, head_dim, dtype, layout, page_size, seed=500 + i)
    what = f"append {_append_case_id(case)} {c.describe()}"
    before = c.cache.clone()
    c.append(index_device, "tuple" if i % 2 else "tensor", fused_kv=i % 3 == 0)
    torch.cuda.synchronize()
    c.check_cache(before, what)
    # Attend: the new tokens (causal, bottom-right) over old + new.
    wrapper = flashinfer_jit.BatchPrefillWithPagedKVCacheWrapper(
        torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=DEVICE), kv_layout=layout)
    t = c.table
    wrapper.plan(c.dense.qo_indptr, t.indptr, t.indices, t.last_page_len, c.num_qo_heads, NUM_KV_HEADS, head_dim,
                 page_size, causal=True, q_data_type=dtype)
    out, lse = wrapper.run(c.dense.q, c.cache, return_lse=True)
    ref_out, ref_lse = c.reference()
    ref.check_attention(out, ref_out, dtype, f"{what}: prefill after append", lse, ref_lse)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_append_one_token_then_decode(layout: str) -> None:
    lens = ((0, 1), (15, 1), (16, 1), (31, 1), (1000, 1), (3, 1))
    c = AppendCase(lens, 4, 128, torch.bfloat16, layout, 16, seed=77)
    before = c.cache.clone()
    c.append("cpu", "tensor", fused_kv=True)
    c.check_cache(before, f"decode append {layout}")
    wrapper = flashinfer_jit.BatchDecodeWithPagedKVCacheWrapper(
        torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=DEVICE), kv_layout=layout)
    t = c.table
    wrapper.plan(t.indptr, t.indices, t.last_page_len, c.num_qo_heads, NUM_KV_HEADS, 128, 16,
                 q_data_type=torch.bfloat16)
    out, lse = wrapper.run(c.dense.q, c.cache, return_lse=True)
    ref_out, ref_lse = c.reference()  # q_len 1: causal sees every key
    ref.check_attention(out, ref_out, torch.bfloat16, f"decode after append {layout}", lse, ref_lse)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_decode_loop_with_growing_page_table(layout: str) -> None:
    """A generation loop: prefill by append, then 6 steps of (append one token per request, decode),
    pages taken from a shuffled free list as requests cross page boundaries."""
    page_size, head_dim, group, dtype = 4, 64, 4, torch.float16
    hq = NUM_KV_HEADS * group
    prompt_lens = [0, 3, 4, 9, 30, 1]
    num_pages = 64
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    free = torch.randperm(num_pages, generator=torch.Generator().manual_seed(4)).tolist()
    pages: list[list[int]] = [[] for _ in prompt_lens]
    lens = [0] * len(prompt_lens)
    dense_k = [torch.zeros((0, NUM_KV_HEADS, head_dim), dtype=dtype, device=DEVICE) for _ in prompt_lens]
    dense_v = [x.clone() for x in dense_k]
    cache = ref.new_paged_cache(num_pages, page_size, NUM_KV_HEADS, head_dim, dtype, DEVICE, layout)
    wrapper = flashinfer_jit.BatchDecodeWithPagedKVCacheWrapper(
        torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=DEVICE), kv_layout=layout)

    def table():
        indptr = ref.make_indptr([len(p) for p in pages])
        indices = torch.tensor([x for p in pages for x in p], dtype=torch.int32)
        last = torch.tensor([ref.last_page_len_for(n, page_size) for n in lens], dtype=torch.int32)
        return indptr, indices, last

    for step in range(7):
        new_lens = prompt_lens if step == 0 else [1] * len(prompt_lens)
        for i, n in enumerate(new_lens):
            lens[i] += n
            while len(pages[i]) * page_size < lens[i]:
                pages[i].append(free.pop())
        indptr, indices, last = table()
        nnz = sum(new_lens)
        new_k = torch.randn((nnz, NUM_KV_HEADS, head_dim), generator=gen, device=DEVICE).to(dtype)
        new_v = torch.randn((nnz, NUM_KV_HEADS, head_dim), generator=gen, device=DEVICE).to(dtype)
        index_device = "cpu" if step % 2 else "cuda"
        seq_lens = torch.tensor(lens, dtype=torch.int32, device=index_device)
        batch_indices, positions = flashinfer_jit.get_batch_indices_positions(
            ref.make_indptr(new_lens).to(index_device), seq_lens, nnz)
        flashinfer_jit.append_paged_kv_cache(new_k, new_v, batch_indices, positions, cache, indices.to(index_device),
                                             indptr.to(index_device), last.to(index_device), kv_layout=layout)
        offset = 0
        for i, n in enumerate(new_lens):
            dense_k[i] = torch.cat([dense_k[i], new_k[offset:offset + n]])
            dense_v[i] = torch.cat([dense_v[i], new_v[offset:offset + n]])
            offset += n
        k_all, v_all = torch.cat(dense_k), torch.cat(dense_v)
        got_k, got_v, kv_indptr = ref.gather_paged_kv(cache, indptr, indices, last, page_size, layout)
        what = f"decode loop {layout} step {step} (lengths {lens}, index tensors on {index_device})"
        assert torch.equal(_bits(got_k), _bits(k_all)) and torch.equal(_bits(got_v), _bits(v_all)), \
            f"{what}: cache contents differ from the appended K/V"
        q = torch.randn((len(lens), hq, head_dim), generator=gen, device=DEVICE).to(dtype)
        wrapper.plan(indptr, indices, last, hq, NUM_KV_HEADS, head_dim, page_size, q_data_type=dtype)
        out, lse = wrapper.run(q, cache, return_lse=True)
        ref_out, ref_lse = ref.ragged_attention_ref(q, k_all, v_all, ref.make_indptr([1] * len(lens)), kv_indptr)
        ref.check_attention(out, ref_out, dtype, what, lse, ref_lse)


def test_empty_append_changes_nothing() -> None:
    c = AppendCase(((5, 0), (0, 0), (17, 0)), 1, 128, torch.float16, "NHD", 16, seed=9)
    assert c.nnz == 0
    before = c.cache.clone()
    c.append("cpu", "tensor", fused_kv=False)
    c.append("cuda", "tuple", fused_kv=False)
    torch.cuda.synchronize()
    assert torch.equal(_bits(c.cache), _bits(before)), "an append of 0 tokens changed the cache"
