// Host-side planner of batch prefill: turns (qo_indptr, kv_indptr) into the work list the kernel
// runs. Plain C++ (no CUDA, no torch): it runs on the CPU in microseconds from host indptr arrays.
// It is templated on the attention variant (variant.cuh), whose kv_range is the one definition of
// the keys a query sees: the planner's tile ranges, the kernel's tile skipping and its mask agree.
//
// A work item is one (request, packed q tile, KV chunk); the kernel runs it for every KV head.
// "Packed" rows put the G = Hq / Hkv query heads of one KV head next to each other
// (row p <-> token p / G, head hk * G + p % G), so one K/V tile load serves the whole group.
//
// Items are emitted longest first: the GPU dispatches blocks in index order, so the heavy items
// start early and the short ones fill the gaps (longest-processing-time-first).
// A q tile whose KV range is much longer than the average CTA's share is split into chunks
// (split-KV); each chunk writes a partial state (fp32 O and LSE) and the last chunk to finish merges
// them (a per-tile counter in device memory; no second kernel launch).
#pragma once
#include <stdint.h>

#include <string.h>

#include <algorithm>
#include <vector>

#include "flashinfer_jit/variant.cuh"

namespace fij {

// The structs below are mirrored by ctypes on the Python side (flashinfer_jit/abi.py); the generated
// sources check every field against the mirror at compile time.

// 64 bytes: the kernel loads it in four 16-byte pieces and finds everything about its request in
// it (no dependent loads of the indptr arrays before the first K/V copy can be issued).
struct alignas(16) WorkItem {
  int32_t request;
  int32_t row_begin;  // first packed q row of the tile
  int32_t kv_begin;   // KV range [kv_begin, kv_end) within the request; kv_begin a multiple of the KV tile
  int32_t kv_end;
  int32_t partial;    // -1: write the output; else first partial row of this chunk
  int32_t merge;      // split chunks: index of the tile's MergeEntry
  int32_t num_chunks; // split chunks: chunks of the tile (the last one to finish merges them)
  int32_t partial_base;  // split chunks: the tile's first partial row (chunk c's is partial_base + c * cta_q)
  int32_t q_start;       // the request's qo_indptr entry and query length
  int32_t q_len;
  int32_t kv_start;      // ragged: the request's kv_indptr entry; kv_len: its KV length
  int32_t kv_len;
  int32_t page_start;    // paged: the request's first entry of the page table (set by plan_and_upload)
  int32_t reserved[3];
};
static_assert(sizeof(WorkItem) == 64, "WorkItem is mirrored as 16 int32 by the Python side");

// A split tile's chunks, for host plans (tests, inspection); the kernel finds all of it in its WorkItem.
struct MergeEntry {
  int32_t request;
  int32_t row_begin;
  int32_t partial_base;  // partial row of chunk c, packed row r: partial_base + c * cta_q + (r - row_begin)
  int32_t num_chunks;
};

struct PlanConfig {
  int32_t batch;
  int32_t group;            // Hq / Hkv
  int32_t num_kv_heads;
  int32_t cta_q;            // packed q rows per tile
  int32_t kv_tile;          // keys per KV tile
  int32_t target_ctas;      // CTAs that fill the GPU (SMs x resident CTAs per SM)
  int32_t min_chunk_tiles;  // a split chunk spans at least this many KV tiles
  int32_t split_tiles;      // 0: choose; -1: never split; > 0: chunk size in KV tiles
  int32_t window_left;      // sliding-window variants: keys before a query's position it sees (else -1)
};

struct PlanResult {
  int64_t num_items;
  int64_t num_merges;
  int64_t partial_rows;
  int64_t error_index;  // on an indptr error: the offending index
};

enum PlanStatus : int32_t {
  kPlanOk = 0,
  kPlanCapacity = 1,         // items or merges (merge counters) do not fit; PlanResult holds the counts needed
  kPlanQoNotZero = 2,        // qo_indptr[0] != 0
  kPlanKvNotZero = 3,        // kv_indptr[0] != 0
  kPlanQoDecreasing = 4,     // qo_indptr[i + 1] < qo_indptr[i]
  kPlanKvDecreasing = 5,     // kv_indptr[i + 1] < kv_indptr[i]
  kPlanBadConfig = 6,
  kPlanWorkspace = 7,        // split-KV partial states do not fit the float workspace
};

namespace detail {
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline WorkItem with_request(WorkItem item, const int32_t* qo_indptr, const int32_t* kv_indptr) {
  const int32_t r = item.request;
  item.q_start = qo_indptr[r];
  item.q_len = qo_indptr[r + 1] - qo_indptr[r];
  item.kv_start = kv_indptr[r];
  item.kv_len = kv_indptr[r + 1] - kv_indptr[r];
  return item;
}

}  // namespace detail

// The indptr checks of the planner on their own: plan() runs them first, before any device query,
// so a bad indptr is the first error reported even on a machine without a GPU.
inline int32_t check_indptrs(const int32_t* qo_indptr, const int32_t* kv_indptr, int32_t batch, PlanResult* result) {
  result->error_index = -1;
  if (qo_indptr[0] != 0) return kPlanQoNotZero;
  if (kv_indptr[0] != 0) return kPlanKvNotZero;
  for (int32_t i = 0; i < batch; ++i) {
    if (qo_indptr[i + 1] < qo_indptr[i]) { result->error_index = i; return kPlanQoDecreasing; }
    if (kv_indptr[i + 1] < kv_indptr[i]) { result->error_index = i; return kPlanKvDecreasing; }
  }
  return kPlanOk;
}

// Plans into `items` (and `merges`, unless null: the kernel does not read them). The keys a q tile
// may see are the union of its tokens' kv_range (Variant::Range), [begin, end), with begin rounded down to
// the KV tile (the kernel masks the keys before a token's own begin).
template <typename Variant>
int32_t plan_prefill(const int32_t* qo_indptr, const int32_t* kv_indptr, const PlanConfig& cfg, WorkItem* items,
                     int64_t item_capacity, MergeEntry* merges, int64_t merge_capacity, PlanResult* result) {
  using detail::ceil_div;
  using detail::with_request;
  *result = PlanResult{0, 0, 0, -1};
  const bool pow2_tile = cfg.kv_tile > 0 && (cfg.kv_tile & (cfg.kv_tile - 1)) == 0;
  if (cfg.batch < 0 || cfg.group < 1 || cfg.num_kv_heads < 1 || cfg.cta_q < 1 || !pow2_tile ||
      cfg.target_ctas < 1 || cfg.min_chunk_tiles < 1)
    return kPlanBadConfig;
  const int32_t indptr_status = check_indptrs(qo_indptr, kv_indptr, cfg.batch, result);
  if (indptr_status != kPlanOk) return indptr_status;
  const int32_t g = cfg.group, cta_q = cfg.cta_q;
  int tile_shift = 0;
  while ((1 << tile_shift) < cfg.kv_tile) ++tile_shift;
  // When a tile holds whole tokens (cta_q % group == 0), its first and last tokens step by
  // cta_q / group: no division per tile (this loop runs for every q tile of the batch).
  const bool whole_tokens = cta_q % g == 0;
  const int32_t tile_tokens = cta_q / g;
  const typename Variant::Range rule(cfg);  // the keys a query sees (a window's size from the config)

  // Pass 1: every q tile's KV range and tile count; the total work decides the chunk size.
  struct Tile { int32_t request, row_begin, kv_begin, kv_end, tiles; };
  std::vector<Tile> tiles;
  tiles.reserve(static_cast<size_t>(cfg.batch) + static_cast<size_t>(qo_indptr[cfg.batch]) * g / cta_q + 1);
  int64_t total_cost = 0;
  int32_t max_tiles = 0;
  for (int32_t r = 0; r < cfg.batch; ++r) {
    const int32_t q_len = qo_indptr[r + 1] - qo_indptr[r], kv_len = kv_indptr[r + 1] - kv_indptr[r];
    const int32_t packed = q_len * g;
    int32_t tokens_begin = 0;  // whole_tokens: the tile's tokens are [tokens_begin, tokens_begin + tile_tokens)
    for (int32_t rb = 0; rb < packed; rb += cta_q, tokens_begin += tile_tokens) {
      const int32_t re = rb + cta_q < packed ? rb + cta_q : packed;
      const int32_t first_token = whole_tokens ? tokens_begin : rb / g;
      const int32_t last_token = whole_tokens ? std::min(tokens_begin + tile_tokens, q_len) - 1 : (re - 1) / g;
      const KvRange range = kv_range_union(rule, first_token, last_token, q_len, kv_len);
      const int32_t end = clamp_to(range.end, 0, kv_len), begin = clamp_to(range.begin, 0, end);
      // [begin rounded down to the KV tile, end); an empty range is [0, 0): one item writing O = 0, LSE = -inf.
      const int32_t kv_begin = begin < end ? (begin >> tile_shift) << tile_shift : 0;
      const int32_t kv_end = begin < end ? end : 0;
      const int32_t n = ((kv_end + cfg.kv_tile - 1) >> tile_shift) - (kv_begin >> tile_shift);
      tiles.push_back(Tile{r, rb, kv_begin, kv_end, n});
      total_cost += n + 1;  // +1: loading Q and writing O cost about one KV tile
      max_tiles = std::max(max_tiles, n);
    }
  }
  int64_t chunk_tiles;
  if (cfg.split_tiles < 0) {
    chunk_tiles = std::max<int64_t>(max_tiles, 1);
  } else if (cfg.split_tiles > 0) {
    chunk_tiles = cfg.split_tiles;
  } else {
    const int64_t share = ceil_div(total_cost * cfg.num_kv_heads, cfg.target_ctas);
    chunk_tiles = std::max<int64_t>(cfg.min_chunk_tiles, share);
  }

  // Pass 2: count items per cost bucket and merges; check capacity before writing anything.
  const size_t buckets = static_cast<size_t>(std::min<int64_t>(max_tiles, chunk_tiles)) + 2;
  std::vector<int64_t> next(buckets, 0);
  int64_t num_items = 0, num_merges = 0, partial_rows = 0;
  for (const Tile& t : tiles) {
    if (t.tiles <= chunk_tiles) {
      ++next[static_cast<size_t>(t.tiles)];
      ++num_items;
      continue;
    }
    const int64_t chunks = ceil_div(t.tiles, chunk_tiles), per_chunk = ceil_div(t.tiles, chunks);
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t first = c * per_chunk, last = std::min<int64_t>(t.tiles, first + per_chunk);
      ++next[static_cast<size_t>(std::max<int64_t>(last - first, 0))];
    }
    num_items += chunks;
    ++num_merges;
    partial_rows += chunks * cta_q;
  }
  result->num_items = num_items;
  result->num_merges = num_merges;
  result->partial_rows = partial_rows;
  // Merges are counted against merge_capacity even when not written: it sizes the merge counters.
  if (num_items > item_capacity || num_merges > merge_capacity) return kPlanCapacity;

  // Counting sort, most KV tiles first; ties keep request order (deterministic plans).
  int64_t offset = 0;
  for (size_t b = buckets; b-- > 0;) {
    const int64_t count = next[b];
    next[b] = offset;
    offset += count;
  }
  int32_t merge = 0, partial = 0;
  for (const Tile& t : tiles) {
    if (t.tiles <= chunk_tiles) {
      items[next[static_cast<size_t>(t.tiles)]++] = with_request(
          WorkItem{t.request, t.row_begin, t.kv_begin, t.kv_end, -1, -1, 1, 0}, qo_indptr, kv_indptr);
      continue;
    }
    const int32_t chunks = static_cast<int32_t>(ceil_div(t.tiles, chunk_tiles));
    const int32_t per_chunk = static_cast<int32_t>(ceil_div(t.tiles, chunks));
    for (int32_t c = 0; c < chunks; ++c) {
      const int32_t first = c * per_chunk, last = std::min(t.tiles, first + per_chunk);
      const int32_t kv_begin = t.kv_begin + first * cfg.kv_tile;
      const int32_t kv_end = std::min(t.kv_end, t.kv_begin + last * cfg.kv_tile);
      items[next[static_cast<size_t>(std::max(last - first, 0))]++] = with_request(
          WorkItem{t.request, t.row_begin, kv_begin, kv_end, partial + c * cta_q, merge, chunks, partial}, qo_indptr,
          kv_indptr);
    }
    if (merges != nullptr) merges[merge] = MergeEntry{t.request, t.row_begin, partial, chunks};
    ++merge;
    partial += chunks * cta_q;
  }
  return kPlanOk;
}

// Paged layouts: check a page table on the host and turn it into cumulative KV lengths.
struct PageTableCheck {
  int64_t error_index;  // the offending request (statuses 2 and 3)
  int32_t min_page;     // over the pages in use (indices[0 .. indptr[batch]))
  int32_t max_page;
};

enum PageTableStatus : int32_t {
  kPagesOk = 0,
  kPagesIndptrNotZero = 1,   // indptr[0] != 0
  kPagesIndptrDecreasing = 2,
  kPagesBadLastPageLen = 3,  // not in [1, page_size] for a request with pages, not 0 without
  kPagesTooFewIndices = 4,   // indices shorter than indptr[batch]
};

inline int32_t paged_kv_lengths(const int32_t* indptr, const int32_t* last_page_len, const int32_t* indices,
                                int64_t num_indices, int32_t batch, int32_t page_size, int32_t* kv_indptr,
                                PageTableCheck* check) {
  *check = PageTableCheck{-1, 0, -1};
  if (indptr[0] != 0) return kPagesIndptrNotZero;
  kv_indptr[0] = 0;
  for (int32_t i = 0; i < batch; ++i) {
    const int32_t pages = indptr[i + 1] - indptr[i];
    if (pages < 0) { check->error_index = i; return kPagesIndptrDecreasing; }
    const int32_t last = last_page_len[i];
    if (pages > 0 ? (last < 1 || last > page_size) : last != 0) { check->error_index = i; return kPagesBadLastPageLen; }
    kv_indptr[i + 1] = kv_indptr[i] + (pages > 0 ? (pages - 1) * page_size + last : 0);
  }
  if (indptr[batch] > num_indices) return kPagesTooFewIndices;
  int32_t lo = 0, hi = -1;
  if (indptr[batch] > 0) {
    lo = hi = indices[0];
    for (int32_t j = 1; j < indptr[batch]; ++j) {
      lo = std::min(lo, indices[j]);
      hi = std::max(hi, indices[j]);
    }
  }
  check->min_page = lo;
  check->max_page = hi;
  return kPagesOk;
}

// Where plan_and_upload puts things in the int32 metadata buffer (offsets in int32 elements):
// counts [num_items, num_merges] at 0, then the page table, the work items and the merge counters
// ([merge_capacity, Hkv], zeroed by every plan) up to `total`.
struct UploadLayout {
  int64_t page_indices, items, counters, total;
  int64_t item_capacity, merge_capacity;
  int64_t partial_slots;  // (row, KV head) partial states the float workspace holds
};

}  // namespace fij
