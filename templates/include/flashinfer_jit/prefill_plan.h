// Host-side planner of batch prefill: turns (qo_indptr, kv_indptr) into the work list the kernel
// runs. Plain C++ (no CUDA, no torch): it runs on the CPU in microseconds from host indptr arrays.
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

#include <algorithm>
#include <vector>

namespace fij {

struct WorkItem {
  int32_t request;
  int32_t row_begin;  // first packed q row of the tile
  int32_t kv_begin;   // KV range [kv_begin, kv_end) within the request, multiple of the KV tile
  int32_t kv_end;
  int32_t partial;    // -1: write the output; else first partial row of this chunk
  int32_t merge;      // split chunks: index of the tile's MergeEntry
  int32_t num_chunks; // split chunks: chunks of the tile (the last one to finish merges them)
  int32_t pad;
};

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
  int32_t causal;
  int32_t target_ctas;      // CTAs that fill the GPU (SMs x resident CTAs per SM)
  int32_t min_chunk_tiles;  // a split chunk spans at least this many KV tiles
  int32_t split_tiles;      // 0: choose; -1: never split; > 0: chunk size in KV tiles
  int32_t reserved;
};

struct PlanResult {
  int64_t num_items;
  int64_t num_merges;
  int64_t partial_rows;
  int64_t error_index;  // on an indptr error: the offending index
};

enum PlanStatus : int32_t {
  kPlanOk = 0,
  kPlanCapacity = 1,         // items or merges do not fit; PlanResult holds the counts needed
  kPlanQoNotZero = 2,        // qo_indptr[0] != 0
  kPlanKvNotZero = 3,        // kv_indptr[0] != 0
  kPlanQoDecreasing = 4,     // qo_indptr[i + 1] < qo_indptr[i]
  kPlanKvDecreasing = 5,     // kv_indptr[i + 1] < kv_indptr[i]
  kPlanBadConfig = 6,
};

namespace detail {
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// KV positions [0, limit) that any row of packed rows [rb, re) of a request may see.
inline int64_t tile_kv_limit(int64_t rb, int64_t re, int64_t q_len, int64_t kv_len, int64_t group, bool causal) {
  if (!causal) return kv_len;
  const int64_t last_token = (re - 1) / group;
  return std::max<int64_t>(0, std::min<int64_t>(kv_len, last_token + (kv_len - q_len) + 1));
}
}  // namespace detail

inline int32_t plan_prefill(const int32_t* qo_indptr, const int32_t* kv_indptr, const PlanConfig& cfg,
                            WorkItem* items, int64_t item_capacity, MergeEntry* merges, int64_t merge_capacity,
                            PlanResult* result) {
  using detail::ceil_div;
  *result = PlanResult{0, 0, 0, -1};
  if (cfg.batch < 0 || cfg.group < 1 || cfg.num_kv_heads < 1 || cfg.cta_q < 1 || cfg.kv_tile < 1 ||
      cfg.target_ctas < 1 || cfg.min_chunk_tiles < 1)
    return kPlanBadConfig;
  if (qo_indptr[0] != 0) return kPlanQoNotZero;
  if (kv_indptr[0] != 0) return kPlanKvNotZero;
  for (int32_t i = 0; i < cfg.batch; ++i) {
    if (qo_indptr[i + 1] < qo_indptr[i]) { result->error_index = i; return kPlanQoDecreasing; }
    if (kv_indptr[i + 1] < kv_indptr[i]) { result->error_index = i; return kPlanKvDecreasing; }
  }
  const bool causal = cfg.causal != 0;
  const int64_t g = cfg.group, cta_q = cfg.cta_q, kv_tile = cfg.kv_tile;

  // Pass 1: per q tile, the KV tiles it must visit; the total work decides the chunk size.
  int64_t total_cost = 0, num_tiles = 0, max_tiles = 0;
  for (int32_t r = 0; r < cfg.batch; ++r) {
    const int64_t q_len = qo_indptr[r + 1] - qo_indptr[r], kv_len = kv_indptr[r + 1] - kv_indptr[r];
    for (int64_t rb = 0; rb < q_len * g; rb += cta_q) {
      const int64_t re = std::min(q_len * g, rb + cta_q);
      const int64_t tiles = ceil_div(detail::tile_kv_limit(rb, re, q_len, kv_len, g, causal), kv_tile);
      total_cost += tiles + 1;  // +1: loading Q and writing O cost about one KV tile
      max_tiles = std::max(max_tiles, tiles);
      ++num_tiles;
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

  // Pass 2: emit items (cost-bucketed for a linear-time longest-first order) and merge entries.
  std::vector<int64_t> bucket_count(static_cast<size_t>(std::min(max_tiles, chunk_tiles) + 2), 0);
  std::vector<WorkItem> unordered;
  unordered.reserve(static_cast<size_t>(num_tiles));
  int64_t partial_rows = 0, num_merges = 0;
  for (int32_t r = 0; r < cfg.batch; ++r) {
    const int64_t q_len = qo_indptr[r + 1] - qo_indptr[r], kv_len = kv_indptr[r + 1] - kv_indptr[r];
    for (int64_t rb = 0; rb < q_len * g; rb += cta_q) {
      const int64_t re = std::min(q_len * g, rb + cta_q);
      const int64_t limit = detail::tile_kv_limit(rb, re, q_len, kv_len, g, causal);
      const int64_t tiles = ceil_div(limit, kv_tile);
      const int64_t chunks = std::max<int64_t>(1, ceil_div(tiles, chunk_tiles));
      const int64_t per_chunk = chunks > 1 ? ceil_div(tiles, chunks) : tiles;
      const int64_t base = chunks > 1 ? partial_rows : -1;
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t kv_begin = c * per_chunk * kv_tile;
        const int64_t kv_end = std::min(limit, (c + 1) * per_chunk * kv_tile);
        WorkItem item{r, static_cast<int32_t>(rb), static_cast<int32_t>(kv_begin), static_cast<int32_t>(kv_end),
                      static_cast<int32_t>(chunks > 1 ? base + c * cta_q : -1),
                      static_cast<int32_t>(chunks > 1 ? num_merges : -1), static_cast<int32_t>(chunks), 0};
        unordered.push_back(item);
        ++bucket_count[static_cast<size_t>(ceil_div(std::max<int64_t>(kv_end - kv_begin, 0), kv_tile))];
      }
      if (chunks > 1) {
        if (num_merges < merge_capacity)
          merges[num_merges] = MergeEntry{r, static_cast<int32_t>(rb), static_cast<int32_t>(base),
                                          static_cast<int32_t>(chunks)};
        ++num_merges;
        partial_rows += chunks * cta_q;
      }
    }
  }
  result->num_items = static_cast<int64_t>(unordered.size());
  result->num_merges = num_merges;
  result->partial_rows = partial_rows;
  if (result->num_items > item_capacity || num_merges > merge_capacity) return kPlanCapacity;

  // Counting sort, most KV tiles first; ties keep request order (deterministic plans).
  std::vector<int64_t> next(bucket_count.size(), 0);
  int64_t offset = 0;
  for (size_t b = bucket_count.size(); b-- > 0;) {
    next[b] = offset;
    offset += bucket_count[b];
  }
  for (const WorkItem& item : unordered) {
    const size_t b = static_cast<size_t>(ceil_div(std::max(item.kv_end - item.kv_begin, 0), kv_tile));
    items[next[b]++] = item;
  }
  return kPlanOk;
}

}  // namespace fij
