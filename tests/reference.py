"""Float32 PyTorch references for attention and attention-state merging, plus ragged-batch and
paged-KV-cache helpers.

Used by the GPU tests (tests/test_prefill_gpu.py, tests/test_merge_state_gpu.py, tests/test_paged_gpu.py,
tests/test_decode_gpu.py, tests/test_append_gpu.py) and by benchmarks/bench_prefill.py and
benchmarks/bench_decode.py. Plain torch, any device; nothing here imports flashinfer_jit.

Conventions (FlashInfer's):
* LSE is base 2: lse = log2(sum_j exp2(x_j)) with x_j = sm_scale * log2(e) * (q . k_j), which equals
  the natural-log logsumexp of sm_scale * (q . k_j) divided by ln 2.
* An empty state (no visible key) has out = 0 and lse = -inf.
* Causal masking is bottom-right aligned: query i (0-based within its request) of a request with
  q_len queries and kv_len keys sees keys j <= kv_len - q_len + i. Rows whose visible set is empty
  (kv_len = 0, or causal with q_len > kv_len for the first q_len - kv_len rows) are empty states.
* GQA: query head h uses kv head h // (num_qo_heads // num_kv_heads).
* Paged KV cache (FlashInfer's layout): one tensor [num_pages, 2, page_size, Hkv, D] ("NHD") or
  [num_pages, 2, Hkv, page_size, D] ("HND") with K at [:, 0] and V at [:, 1]. Request i owns pages
  indices[indptr[i]:indptr[i + 1]] in that order; its token t lives in page indices[indptr[i] + t // page_size]
  at slot t % page_size. kv_len = (num_pages_i - 1) * page_size + last_page_len[i]; a request with no
  pages has last_page_len 0 and kv_len 0.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

import torch

LOG2E = 1.4426950408889634
NEG_INF = float("-inf")

# Elements of one float32 logits block [heads, rows, keys] before the reference splits the rows.
_MAX_BLOCK_ELEMENTS = 1 << 27


# ---- attention -----------------------------------------------------------------------------------

def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    sm_scale: float | None = None,
    *,
    q_len: int | None = None,
    row_index: torch.Tensor | None = None,
    window_left: int = -1,
    logits_soft_cap: float = 0.0,
    score_fn=None,
    mask_fn=None,
    request: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one request in float32.

    score_fn(score, q_idx, kv_idx, head, q_pos, request) / mask_fn(q_idx, kv_idx, head, q_pos, request):
    a user variant's score and mask in torch (score [Hq, rows, kv_len] scaled logits; the index tensors
    broadcast against it: q_idx, q_pos [1, rows, 1], kv_idx [1, 1, kv_len], head [Hq, 1, 1]).

    window_left >= 0: query row i (position p = kv_len - q_len + i) sees only keys j >= p - window_left.
    logits_soft_cap > 0: scores cap * tanh(scale * q.k / cap) before the softmax. FlashInfer's meanings.

    q: [n, Hq, D]; k, v: [kv_len, Hkv, D] (NHD), any float dtype (converted to float32).
    By default q holds all q_len = n query rows of the request. To evaluate only some rows, pass the
    request's q_len and row_index (LongTensor [n]: the position of each given row within the request).

    Returns (out float32 [n, Hq, D], lse float32 [n, Hq], base 2). Empty rows: out 0, lse -inf.
    """
    n, num_qo_heads, head_dim = q.shape
    kv_len, num_kv_heads, head_dim_k = k.shape
    assert v.shape == k.shape, f"k {tuple(k.shape)} and v {tuple(v.shape)} differ"
    assert head_dim_k == head_dim, f"q head_dim {head_dim} != k head_dim {head_dim_k}"
    assert num_qo_heads % num_kv_heads == 0, f"{num_qo_heads} query heads, {num_kv_heads} kv heads"
    if q_len is None:
        q_len = n
    if row_index is None:
        assert n == q_len, "pass row_index when q holds a subset of the rows"
        row_index = torch.arange(n, device=q.device)
    row_index = row_index.to(device=q.device, dtype=torch.long)
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
    group = num_qo_heads // num_kv_heads

    qf = q.float()
    kf = k.float()
    vf = v.float()
    if group > 1:
        kf = kf.repeat_interleave(group, dim=1)
        vf = vf.repeat_interleave(group, dim=1)

    out = torch.empty((n, num_qo_heads, head_dim), dtype=torch.float32, device=q.device)
    lse = torch.empty((n, num_qo_heads), dtype=torch.float32, device=q.device)
    rows_per_block = max(1, _MAX_BLOCK_ELEMENTS // max(1, num_qo_heads * max(1, kv_len)))
    key_pos = torch.arange(kv_len, device=q.device)
    for start in range(0, n, rows_per_block):
        stop = min(n, start + rows_per_block)
        logits = torch.einsum("qhd,khd->hqk", qf[start:stop], kf) * scale  # [Hq, rows, kv_len]
        if logits_soft_cap > 0:
            logits = logits_soft_cap * torch.tanh(logits / logits_soft_cap)
        pos = kv_len - q_len + row_index[start:stop]  # the rows' positions among the keys
        if score_fn is not None or mask_fn is not None:
            qi = row_index[start:stop].view(1, -1, 1)
            qp = pos.view(1, -1, 1)
            ki = key_pos.view(1, 1, -1)
            hd = torch.arange(num_qo_heads, device=q.device).view(-1, 1, 1)
            if score_fn is not None:
                logits = score_fn(logits, qi, ki, hd, qp, request).float()
            if mask_fn is not None:
                keep = torch.broadcast_to(mask_fn(qi, ki, hd, qp, request), logits.shape)
                logits = logits.masked_fill(~keep, NEG_INF)
        visible = torch.ones((stop - start, kv_len), dtype=torch.bool, device=q.device)
        if causal:
            visible &= key_pos[None, :] <= pos[:, None]  # key j visible iff j <= pos
        if window_left >= 0:
            visible &= key_pos[None, :] >= pos[:, None] - window_left
        if causal or window_left >= 0:
            logits = logits.masked_fill(~visible[None], NEG_INF)
        lse_e = torch.logsumexp(logits, dim=-1)  # [Hq, rows]; -inf where no key is visible
        finite = torch.isfinite(lse_e)
        p = torch.exp(logits - torch.where(finite, lse_e, torch.zeros_like(lse_e))[..., None])
        out[start:stop] = torch.einsum("hqk,khd->qhd", p, vf)
        lse[start:stop] = (lse_e * LOG2E).transpose(0, 1)
    return out, lse


def to_nhd(x: torch.Tensor, kv_layout: str) -> torch.Tensor:
    """A ragged K or V in `kv_layout` ("NHD": [N, H, D], "HND": [H, N, D]) as an NHD view."""
    if kv_layout == "NHD":
        return x
    if kv_layout == "HND":
        return x.transpose(0, 1)
    raise ValueError(f"kv_layout {kv_layout!r}")


def from_nhd(x: torch.Tensor, kv_layout: str) -> torch.Tensor:
    """An NHD ragged K or V in `kv_layout` (contiguous)."""
    if kv_layout == "NHD":
        return x.contiguous()
    if kv_layout == "HND":
        return x.transpose(0, 1).contiguous()
    raise ValueError(f"kv_layout {kv_layout!r}")


def _as_list(indptr: torch.Tensor | Sequence[int]) -> list[int]:
    if isinstance(indptr, torch.Tensor):
        return [int(x) for x in indptr.tolist()]
    return [int(x) for x in indptr]


def ragged_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qo_indptr: torch.Tensor | Sequence[int],
    kv_indptr: torch.Tensor | Sequence[int],
    causal: bool = False,
    sm_scale: float | None = None,
    kv_layout: str = "NHD",
    window_left: int = -1,
    logits_soft_cap: float = 0.0,
    score_fn=None,
    mask_fn=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for a ragged batch: q [total_q, Hq, D], k/v ragged in kv_layout (window_left,
    logits_soft_cap, score_fn and mask_fn as in attention_ref).

    Returns (out float32 [total_q, Hq, D], lse float32 [total_q, Hq]). Rows of q past
    qo_indptr[-1] are left out (the result has exactly qo_indptr[-1] rows)."""
    qo = _as_list(qo_indptr)
    kv = _as_list(kv_indptr)
    assert len(qo) == len(kv) and qo[0] == 0 and kv[0] == 0, (qo, kv)
    k_nhd = to_nhd(k, kv_layout)
    v_nhd = to_nhd(v, kv_layout)
    total_q = qo[-1]
    num_qo_heads, head_dim = q.shape[1], q.shape[2]
    out = torch.zeros((total_q, num_qo_heads, head_dim), dtype=torch.float32, device=q.device)
    lse = torch.full((total_q, num_qo_heads), NEG_INF, dtype=torch.float32, device=q.device)
    for i in range(len(qo) - 1):
        qs, qe, ks, ke = qo[i], qo[i + 1], kv[i], kv[i + 1]
        assert qe >= qs and ke >= ks, f"indptr not non-decreasing at request {i}"
        if qe == qs:
            continue
        o_i, l_i = attention_ref(q[qs:qe], k_nhd[ks:ke], v_nhd[ks:ke], causal, sm_scale, window_left=window_left,
                                 logits_soft_cap=logits_soft_cap, score_fn=score_fn, mask_fn=mask_fn, request=i)
        out[qs:qe] = o_i
        lse[qs:qe] = l_i
    return out, lse


def rope_reference(x: torch.Tensor, pos: torch.Tensor, rotary_dim: int, interleave: bool, scale: float,
                   theta: float) -> torch.Tensor:
    """x [nnz, H, D] rotated in float64 (FlashInfer's definition), returned as float32."""
    xf = x.double()
    half = rotary_dim // 2
    freq = 1.0 / (scale * theta ** (torch.arange(half, dtype=torch.float64, device=x.device) * 2 / rotary_dim))
    angle = pos.double()[:, None] * freq[None, :]  # [nnz, half]
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
    out = xf.clone()
    if interleave:
        a, b = xf[..., 0:rotary_dim:2], xf[..., 1:rotary_dim:2]
        out[..., 0:rotary_dim:2] = a * cos - b * sin
        out[..., 1:rotary_dim:2] = b * cos + a * sin
    else:
        a, b = xf[..., :half], xf[..., half:rotary_dim]
        out[..., :half] = a * cos - b * sin
        out[..., half:rotary_dim] = b * cos + a * sin
    return out.float()


def rope_positions(qo_indptr: torch.Tensor | Sequence[int], kv_indptr: torch.Tensor | Sequence[int]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused RoPE's positions of a ragged batch (FlashInfer's): query i of a request at kv_len - q_len + i,
    key j at j. Returns (q positions [total_q], k positions [total_kv]), int64 on the CPU."""
    qo, kv = _as_list(qo_indptr), _as_list(kv_indptr)
    q_pos, k_pos = [], []
    for i in range(len(qo) - 1):
        q_len, kv_len = qo[i + 1] - qo[i], kv[i + 1] - kv[i]
        q_pos.append(torch.arange(q_len) + (kv_len - q_len))
        k_pos.append(torch.arange(kv_len))
    return torch.cat(q_pos) if q_pos else torch.zeros(0, dtype=torch.long), \
        torch.cat(k_pos) if k_pos else torch.zeros(0, dtype=torch.long)


def alibi_slopes_ref(num_heads: int) -> torch.Tensor:
    """ALiBi slopes (Press et al.), written out independently of flashinfer_jit.options: the geometric
    series 2^(-8/n)^(h+1) for the largest power of two n <= num_heads, then every other term of the 2n one."""
    n = 1 << (num_heads.bit_length() - 1)
    base = torch.tensor(2.0 ** (-8.0 / n), dtype=torch.float64)
    slopes = base ** torch.arange(1, n + 1, dtype=torch.float64)
    if n < num_heads:
        extra = torch.tensor(2.0 ** (-4.0 / n), dtype=torch.float64) ** torch.arange(1, 2 * (num_heads - n), 2,
                                                                                      dtype=torch.float64)
        slopes = torch.cat([slopes, extra])
    return slopes.float()


def causal_visible_keys(q_len: int, kv_len: int) -> int:
    """Number of (query, key) pairs a bottom-right causal mask keeps for one request."""
    if q_len <= kv_len:
        return q_len * kv_len - q_len * (q_len - 1) // 2
    return kv_len * (kv_len + 1) // 2  # the first q_len - kv_len rows see nothing


# ---- merging attention states --------------------------------------------------------------------

def merge_state_ref(
    v_a: torch.Tensor, s_a: torch.Tensor, v_b: torch.Tensor, s_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two states in float32. v [..., D], s [...] base-2 LSE. -inf = empty state."""
    va, vb = v_a.float(), v_b.float()
    sa, sb = s_a.float(), s_b.float()
    m = torch.maximum(sa, sb)
    empty = torch.isneginf(m)
    m_safe = torch.where(empty, torch.zeros_like(m), m)
    wa = torch.exp2(sa - m_safe)
    wb = torch.exp2(sb - m_safe)
    denom = wa + wb
    denom_safe = torch.where(empty, torch.ones_like(denom), denom)
    v = (wa[..., None] * va + wb[..., None] * vb) / denom_safe[..., None]
    v = torch.where(empty[..., None], torch.zeros_like(v), v)
    s = torch.where(empty, torch.full_like(m, NEG_INF), m_safe + torch.log2(denom_safe))
    return v, s


def merge_states_ref(v: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge K states per row in float32: v [N, K, H, D], s [N, K, H] -> ([N, H, D], [N, H])."""
    n, k, h, d = v.shape
    if k == 0:
        return (torch.zeros((n, h, d), dtype=torch.float32, device=v.device),
                torch.full((n, h), NEG_INF, dtype=torch.float32, device=v.device))
    vf, sf = v.float(), s.float()
    m = sf.max(dim=1).values  # [N, H]
    empty = torch.isneginf(m)
    m_safe = torch.where(empty, torch.zeros_like(m), m)
    w = torch.exp2(sf - m_safe[:, None, :])  # [N, K, H]; 0 for empty states
    denom = w.sum(dim=1)
    denom_safe = torch.where(empty, torch.ones_like(denom), denom)
    out = (w[..., None] * vf).sum(dim=1) / denom_safe[..., None]
    out = torch.where(empty[..., None], torch.zeros_like(out), out)
    lse = torch.where(empty, torch.full_like(m, NEG_INF), m_safe + torch.log2(denom_safe))
    return out, lse


# ---- ragged batches ------------------------------------------------------------------------------

def make_indptr(lengths: Sequence[int]) -> torch.Tensor:
    """int32 CPU prefix sums with a leading 0."""
    out = [0]
    for n in lengths:
        assert n >= 0, lengths
        out.append(out[-1] + int(n))
    return torch.tensor(out, dtype=torch.int32)


@dataclass
class RaggedBatch:
    q_lens: list[int]
    kv_lens: list[int]
    q: torch.Tensor  # [total_q, Hq, D]
    k: torch.Tensor  # ragged K in kv_layout
    v: torch.Tensor
    qo_indptr: torch.Tensor  # int32, CPU
    kv_indptr: torch.Tensor  # int32, CPU
    kv_layout: str
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def batch_size(self) -> int:
        return len(self.q_lens)

    @property
    def total_q(self) -> int:
        return sum(self.q_lens)

    @property
    def total_kv(self) -> int:
        return sum(self.kv_lens)

    def reference(self, causal: bool, sm_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return ragged_attention_ref(self.q, self.k, self.v, self.qo_indptr, self.kv_indptr, causal, sm_scale,
                                    self.kv_layout)

    def describe(self) -> str:
        pairs = ", ".join(f"{a}/{b}" for a, b in zip(self.q_lens, self.kv_lens))
        return (f"batch={self.batch_size} (q/kv: {pairs}) Hq={self.num_qo_heads} Hkv={self.num_kv_heads} "
                f"D={self.head_dim} {self.q.dtype} {self.kv_layout}")


def make_ragged_batch(
    q_lens: Sequence[int],
    kv_lens: Sequence[int],
    num_qo_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
    kv_layout: str = "NHD",
    seed: int = 0,
) -> RaggedBatch:
    """Fresh randn q/k/v (unit scale) for the given lengths, seeded."""
    assert len(q_lens) == len(kv_lens)
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    total_q, total_kv = sum(q_lens), sum(kv_lens)
    q = torch.randn((total_q, num_qo_heads, head_dim), generator=gen, device=device, dtype=torch.float32).to(dtype)
    k = torch.randn((total_kv, num_kv_heads, head_dim), generator=gen, device=device, dtype=torch.float32).to(dtype)
    v = torch.randn((total_kv, num_kv_heads, head_dim), generator=gen, device=device, dtype=torch.float32).to(dtype)
    return RaggedBatch(
        q_lens=[int(x) for x in q_lens], kv_lens=[int(x) for x in kv_lens], q=q,
        k=from_nhd(k, kv_layout), v=from_nhd(v, kv_layout),
        qo_indptr=make_indptr(q_lens), kv_indptr=make_indptr(kv_lens), kv_layout=kv_layout,
        num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
    )


def random_lengths(rng: random.Random, batch_size: int, max_q: int = 48, max_kv: int = 96) -> tuple[list[int], list[int]]:
    """Random (q_len, kv_len) pairs mixing the interesting shapes: q_len 0, kv_len 0, q == kv,
    q < kv (a prefix in the cache), q > kv, and single-token queries."""
    q_lens, kv_lens = [], []
    for _ in range(batch_size):
        r = rng.random()
        if r < 0.08:
            q, kv = 0, rng.randint(0, max_kv)
        elif r < 0.16:
            q, kv = rng.randint(1, max_q), 0
        elif r < 0.45:
            q = rng.randint(1, max_q)
            kv = q
        elif r < 0.75:
            q = rng.randint(1, max_q)
            kv = rng.randint(q, max(q, max_kv))
        elif r < 0.88:
            q, kv = 1, rng.randint(1, max_kv)
        else:
            kv = rng.randint(1, max_q)
            q = rng.randint(kv, max_q)
        q_lens.append(q)
        kv_lens.append(kv)
    return q_lens, kv_lens


# ---- paged KV caches -----------------------------------------------------------------------------

def num_pages_for(kv_len: int, page_size: int) -> int:
    """Pages a request of kv_len tokens occupies."""
    return -(-int(kv_len) // int(page_size))


def last_page_len_for(kv_len: int, page_size: int) -> int:
    """Tokens in the last page of a request (0 for a request with no tokens, hence no pages)."""
    if kv_len == 0:
        return 0
    return int(kv_len) - (num_pages_for(kv_len, page_size) - 1) * int(page_size)


def kv_lens_from_page_table(indptr: torch.Tensor | Sequence[int], last_page_len: torch.Tensor | Sequence[int],
                            page_size: int) -> list[int]:
    """KV length of every request from a page table (the inverse of make_page_table)."""
    ptr = _as_list(indptr)
    last = _as_list(last_page_len)
    lens = []
    for i in range(len(ptr) - 1):
        n = ptr[i + 1] - ptr[i]
        lens.append(0 if n == 0 else (n - 1) * page_size + last[i])
    return lens


@dataclass
class PageTable:
    indptr: torch.Tensor  # int32 CPU [batch + 1]
    indices: torch.Tensor  # int32 CPU [>= indptr[-1]]
    last_page_len: torch.Tensor  # int32 CPU [batch]
    num_pages: int  # pages in the cache (used + unused)
    page_size: int

    @property
    def used_pages(self) -> int:
        return int(self.indptr[-1])


def make_page_table(kv_lens: Sequence[int], page_size: int, *, extra_pages: int = 0, num_pages: int | None = None,
                    shuffle: bool = True, seed: int = 0, pad_indices: bool = False) -> PageTable:
    """A page table for `kv_lens`: each request gets ceil(kv_len / page_size) pages.

    The cache holds `num_pages` pages (default: the used pages plus `extra_pages` unused ones). With
    `shuffle`, pages are drawn in a seeded random order (torch.randperm), so no request's pages are
    contiguous or ascending. With `pad_indices`, `indices` lists every page of the cache (the used
    ones first): entries past indptr[-1] are legal and unused (a preallocated indices buffer)."""
    counts = [num_pages_for(n, page_size) for n in kv_lens]
    used = sum(counts)
    total = used + extra_pages if num_pages is None else int(num_pages)
    assert total >= used, f"{used} pages needed, the cache has {total}"
    if shuffle:
        order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    else:
        order = torch.arange(total)
    indices = (order if pad_indices else order[:used]).to(torch.int32).contiguous()
    return PageTable(
        indptr=make_indptr(counts), indices=indices,
        last_page_len=torch.tensor([last_page_len_for(n, page_size) for n in kv_lens], dtype=torch.int32),
        num_pages=total, page_size=int(page_size))


def token_page_slots(indptr: torch.Tensor | Sequence[int], indices: torch.Tensor, kv_lens: Sequence[int],
                     page_size: int, device: torch.device | str | None = None,
                     first_token: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(page, slot) LongTensors [sum of lengths] of every token in request order (request 0's tokens
    first). With `first_token`, request i contributes tokens first_token[i] .. kv_lens[i] - 1 only."""
    ptr = _as_list(indptr)
    idx = indices.to(device="cpu", dtype=torch.long)
    pages, slots = [], []
    for i, n in enumerate(kv_lens):
        start = 0 if first_token is None else int(first_token[i])
        t = torch.arange(start, int(n), dtype=torch.long)
        assert int(n) <= (ptr[i + 1] - ptr[i]) * page_size, f"request {i}: {n} tokens do not fit its pages"
        pages.append(idx[ptr[i] + t // page_size])
        slots.append(t % page_size)
    page = torch.cat(pages) if pages else torch.zeros(0, dtype=torch.long)
    slot = torch.cat(slots) if slots else torch.zeros(0, dtype=torch.long)
    return page.to(device), slot.to(device)


def cache_kv(cache: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, v) 4-D page views of a paged cache given as one [P, 2, ...] tensor or a (k, v) tuple."""
    if isinstance(cache, torch.Tensor):
        assert cache.dim() == 5 and cache.shape[1] == 2, f"cache shape {tuple(cache.shape)}"
        return cache[:, 0], cache[:, 1]
    k, v = cache
    return k, v


def page_shape(page_size: int, num_kv_heads: int, head_dim: int, kv_layout: str) -> tuple[int, int, int]:
    if kv_layout == "NHD":
        return (page_size, num_kv_heads, head_dim)
    if kv_layout == "HND":
        return (num_kv_heads, page_size, head_dim)
    raise ValueError(f"kv_layout {kv_layout!r}")


def new_paged_cache(num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                    device: torch.device | str, kv_layout: str, fill: float = float("nan")) -> torch.Tensor:
    """A [num_pages, 2, *page_shape] cache filled with `fill` (NaN by default: a kernel that reads a
    slot no request owns, or a page tail past last_page_len, turns its output NaN)."""
    shape = (num_pages, 2, *page_shape(page_size, num_kv_heads, head_dim, kv_layout))
    return torch.full(shape, fill, dtype=dtype, device=device)


def _slot_view(t: torch.Tensor, pages: torch.Tensor, slots: torch.Tensor, kv_layout: str):
    """Index expression of tokens (pages[i], slots[i]) in one 4-D page tensor: a [n, H, D] selection."""
    if kv_layout == "NHD":
        return (pages, slots)
    return (pages, slice(None), slots)  # advanced indices around a slice: the token dim goes first


def scatter_to_pages(cache: torch.Tensor | tuple[torch.Tensor, torch.Tensor], k: torch.Tensor, v: torch.Tensor,
                     pages: torch.Tensor, slots: torch.Tensor, kv_layout: str) -> None:
    """Write tokens k, v [n, Hkv, D] (NHD rows) to (pages[i], slots[i]) of the cache, in place."""
    kc, vc = cache_kv(cache)
    where = _slot_view(kc, pages.to(kc.device), slots.to(kc.device), kv_layout)
    kc[where] = k.to(kc.dtype)
    vc[where] = v.to(vc.dtype)


def gather_from_pages(cache: torch.Tensor | tuple[torch.Tensor, torch.Tensor], pages: torch.Tensor,
                      slots: torch.Tensor, kv_layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (pages[i], slots[i]) of the cache as dense NHD rows (k, v) [n, Hkv, D]."""
    kc, vc = cache_kv(cache)
    where = _slot_view(kc, pages.to(kc.device), slots.to(kc.device), kv_layout)
    return kc[where], vc[where]


def gather_paged_kv(cache: torch.Tensor | tuple[torch.Tensor, torch.Tensor], indptr: torch.Tensor | Sequence[int],
                    indices: torch.Tensor, last_page_len: torch.Tensor | Sequence[int], page_size: int,
                    kv_layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense ragged K, V [total_kv, Hkv, D] (NHD) read from the cache through the page table, and the
    int32 CPU kv_indptr of the result: the reference's view of a paged batch."""
    kv_lens = kv_lens_from_page_table(indptr, last_page_len, page_size)
    pages, slots = token_page_slots(indptr, indices, kv_lens, page_size)
    k, v = gather_from_pages(cache, pages, slots, kv_layout)
    return k, v, make_indptr(kv_lens)


@dataclass
class PagedBatch:
    q_lens: list[int]
    kv_lens: list[int]
    q: torch.Tensor  # [total_q, Hq, D]
    k: torch.Tensor  # the dense K that was written to the cache: ragged NHD [total_kv, Hkv, D]
    v: torch.Tensor
    cache: torch.Tensor  # [num_pages, 2, page_size, Hkv, D] (NHD) / [num_pages, 2, Hkv, page_size, D] (HND)
    qo_indptr: torch.Tensor  # int32 CPU
    kv_indptr: torch.Tensor  # int32 CPU, cumulative kv lengths (of the dense k/v)
    table: PageTable
    kv_layout: str
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def batch_size(self) -> int:
        return len(self.kv_lens)

    @property
    def total_q(self) -> int:
        return sum(self.q_lens)

    @property
    def total_kv(self) -> int:
        return sum(self.kv_lens)

    @property
    def page_size(self) -> int:
        return self.table.page_size

    @property
    def num_pages(self) -> int:
        return self.table.num_pages

    def cache_tuple(self, separate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The cache as a (k, v) tuple: views into the one tensor (equal, non-contiguous strides), or
        `separate` contiguous copies."""
        k, v = cache_kv(self.cache)
        return (k.contiguous(), v.contiguous()) if separate else (k, v)

    def gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense K, V read back from the cache through the page table."""
        k, v, kv_indptr = gather_paged_kv(self.cache, self.table.indptr, self.table.indices,
                                          self.table.last_page_len, self.page_size, self.kv_layout)
        assert torch.equal(kv_indptr, self.kv_indptr), (kv_indptr, self.kv_indptr)
        return k, v

    def reference(self, causal: bool, sm_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 reference over K/V gathered from the pages (not the dense k/v that were written)."""
        k, v = self.gathered()
        return ragged_attention_ref(self.q, k, v, self.qo_indptr, self.kv_indptr, causal, sm_scale, "NHD")

    def describe(self) -> str:
        pairs = ", ".join(f"{a}/{b}" for a, b in zip(self.q_lens, self.kv_lens))
        return (f"batch={self.batch_size} (q/kv: {pairs}) Hq={self.num_qo_heads} Hkv={self.num_kv_heads} "
                f"D={self.head_dim} {self.q.dtype} {self.kv_layout} page_size={self.page_size} "
                f"pages={self.table.used_pages}/{self.num_pages}")


def make_paged_batch(
    q_lens: Sequence[int],
    kv_lens: Sequence[int],
    num_qo_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
    kv_layout: str = "NHD",
    page_size: int = 16,
    seed: int = 0,
    *,
    extra_pages: int = 5,
    num_pages: int | None = None,
    shuffle: bool = True,
    pad_indices: bool = False,
    fill: float = float("nan"),
) -> PagedBatch:
    """Fresh randn q/k/v (as make_ragged_batch, same seed -> same values) with k/v written into a paged
    cache whose pages are shuffled (seeded) and which has unused pages; every slot no request owns
    (unused pages, page tails past last_page_len) holds `fill` (NaN by default)."""
    dense = make_ragged_batch(q_lens, kv_lens, num_qo_heads, num_kv_heads, head_dim, dtype, device, "NHD", seed)
    table = make_page_table(kv_lens, page_size, extra_pages=extra_pages, num_pages=num_pages, shuffle=shuffle,
                            seed=seed + 7919, pad_indices=pad_indices)
    cache = new_paged_cache(table.num_pages, page_size, num_kv_heads, head_dim, dtype, device, kv_layout, fill)
    pages, slots = token_page_slots(table.indptr, table.indices, kv_lens, page_size)
    scatter_to_pages(cache, dense.k, dense.v, pages, slots, kv_layout)
    return PagedBatch(
        q_lens=dense.q_lens, kv_lens=dense.kv_lens, q=dense.q, k=dense.k, v=dense.v, cache=cache,
        qo_indptr=dense.qo_indptr, kv_indptr=dense.kv_indptr, table=table, kv_layout=kv_layout,
        num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
    )


# ---- comparisons ---------------------------------------------------------------------------------

def output_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for an fp16/bf16 attention output against the float32 reference on unit randn inputs."""
    if dtype == torch.bfloat16:
        return 2e-2, 1e-2
    if dtype == torch.float16:
        return 1e-2, 5e-3
    return 1e-4, 1e-4


LSE_ATOL = 1e-2
LSE_RTOL = 2e-3


def _worst(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> str:
    a, e = actual.float(), expected.float()
    diff = (a - e).abs()
    excess = diff - (atol + rtol * e.abs())
    idx = int(torch.argmax(excess.reshape(-1)))
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), tuple(diff.shape)))
    bad = int((excess > 0).sum())
    return (f"{bad} of {diff.numel()} elements out of tolerance (atol {atol}, rtol {rtol}); "
            f"max abs diff {float(diff.max()):.4g}; worst at {where}: got {float(a.reshape(-1)[idx]):.6g}, "
            f"expected {float(e.reshape(-1)[idx]):.6g}")


def check_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if actual.numel() == 0:
        return
    a, e = actual.float(), expected.float()
    nan = torch.isnan(a)
    assert not bool(nan.any()), f"{what}: {int(nan.sum())} NaN values (first at {tuple(torch.nonzero(nan)[0].tolist())})"
    ok = (a - e).abs() <= atol + rtol * e.abs()
    if not bool(ok.all()):
        raise AssertionError(f"{what}: {_worst(a, e, atol, rtol)}")


def check_attention(
    out: torch.Tensor,
    ref_out: torch.Tensor,
    dtype: torch.dtype,
    what: str,
    lse: torch.Tensor | None = None,
    ref_lse: torch.Tensor | None = None,
) -> None:
    """out vs reference (finite everywhere, within tolerance); LSE: -inf exactly where the reference is
    -inf (and out exactly 0 there), finite and within tolerance elsewhere."""
    assert out.dtype == dtype, f"{what}: out dtype {out.dtype}, expected {dtype}"
    assert out.shape == ref_out.shape, f"{what}: out shape {tuple(out.shape)} != {tuple(ref_out.shape)}"
    if out.numel():
        finite = torch.isfinite(out)
        assert bool(finite.all()), (f"{what}: {int((~finite).sum())} non-finite output values "
                                    f"(first at {tuple(torch.nonzero(~finite)[0].tolist())})")
    atol, rtol = output_tolerance(dtype)
    check_close(out, ref_out, atol, rtol, f"{what}: out")
    if ref_lse is None:
        return
    assert lse is not None, f"{what}: no lse returned"
    assert lse.dtype == torch.float32, f"{what}: lse dtype {lse.dtype}, expected torch.float32"
    assert lse.shape == ref_lse.shape, f"{what}: lse shape {tuple(lse.shape)} != {tuple(ref_lse.shape)}"
    if lse.numel() == 0:
        return
    empty = torch.isneginf(ref_lse)
    got_empty = torch.isneginf(lse)
    if not torch.equal(empty, got_empty):
        wrong = torch.nonzero(empty != got_empty)[0].tolist()
        raise AssertionError(f"{what}: lse -inf pattern differs from the reference; first at (row, head) "
                             f"{tuple(wrong)}: got {float(lse[tuple(wrong)])}, expected {float(ref_lse[tuple(wrong)])}")
    if bool(empty.any()):
        zeros = out[empty]
        assert bool((zeros == 0).all()), f"{what}: rows with no visible key must output exactly 0"
    finite = torch.isfinite(lse[~empty])
    assert bool(finite.all()), f"{what}: {int((~finite).sum())} non-finite lse values where the reference is finite"
    check_close(torch.where(empty, 0.0, lse), torch.where(empty, 0.0, ref_lse), LSE_ATOL, LSE_RTOL, f"{what}: lse")


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return float((a.float() - b.float()).abs().max())
