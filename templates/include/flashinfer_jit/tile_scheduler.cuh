// Work distribution of the prefill kernels, and the split-KV handoff.
//
// A work unit is one (work item, KV head), units in plan order (longest first). The FA2-class kernel
// has one CTA per unit (the GPU dispatches blocks in index order, so the heavy ones start early); the
// sm90 kernel has one persistent CTA per SM that runs a band of gridDim.x units at a time (persistent_unit).
// Under CUDA graphs the grid is a capacity; units past the plan's item count are not run.
//
// A q tile split across KV chunks is finished by the chunk that completes last: each chunk writes
// its partial state, fences, and bumps the tile's device counter; the one that sees the count reach
// num_chunks - 1 merges (epilogue.cuh) and resets the counter for the next run.
#pragma once
#include "flashinfer_jit/mma.cuh"
#include "flashinfer_jit/prefill_params.h"
#include "flashinfer_jit/switches_sm90.h"
#include "flashinfer_jit/variant.cuh"

namespace fij {

struct TileScheduler {
  int item_index;
  int kv_head;
  int num_items;

  // This CTA's work item. The item is read before the count is checked so both loads are in flight
  // at once (the items buffer holds every CTA of the grid, also under CUDA graphs).
  __device__ __forceinline__ static TileScheduler fetch(const PrefillParams& p, WorkItem& item) {
    return at(p, int(blockIdx.x), item);
  }
  // Work unit `unit` (item unit / Hkv, KV head unit % Hkv): persistent CTAs step through units.
  __device__ __forceinline__ static TileScheduler at(const PrefillParams& p, int unit, WorkItem& item) {
    TileScheduler s;
    s.item_index = unit / p.num_kv_heads;
    s.kv_head = unit % p.num_kv_heads;
    static_assert(sizeof(WorkItem) == 4 * sizeof(uint4), "WorkItem is read as four 16-byte pieces");
#pragma unroll
    for (int i = 0; i < 4; ++i)
      reinterpret_cast<uint4*>(&item)[i] =
          ld_nc_v4_early(reinterpret_cast<const uint4*>(p.items + s.item_index) + i);
    s.num_items = p.counts[0];
    return s;
  }
  __device__ __forceinline__ bool active() const { return item_index < num_items; }
  // Bring unit `unit`'s work item into L1 ahead of at() (a 64-byte item sits in one 128-byte line): a
  // persistent CTA's next item then arrives in L1 time rather than L2 time at the unit boundary.
  __device__ __forceinline__ static void prefetch(const PrefillParams& p, int unit) {
    asm volatile("prefetch.global.L1 [%0];\n" ::"l"(p.items + unit / p.num_kv_heads));
  }
};

// The k-th unit of this persistent CTA, or -1 once none is left (only the last band is partial, and
// in a partial band exactly the CTAs below its size have a unit, in either direction).
__device__ __forceinline__ int persistent_unit(int k, int units) {
  const int first = k * int(gridDim.x);
  if (first >= units) return -1;
  const int size = min(int(gridDim.x), units - first);
  if (int(blockIdx.x) >= size) return -1;
  return first + ((FIJ_SM90_SNAKE && (k & 1)) ? size - 1 - int(blockIdx.x) : int(blockIdx.x));
}

// persistent_unit without its branches, clamped into [0, units) when there is no k-th unit: for
// prefetches only (a branch at the prefetch makes ptxas serialize the sm90 kernel's wgmmas).
__device__ __forceinline__ int persistent_unit_or_any(int k, int units) {
  const int first = k * int(gridDim.x);
  const int size = min(int(gridDim.x), units - first);
  const int i = (FIJ_SM90_SNAKE && (k & 1)) ? size - 1 - int(blockIdx.x) : int(blockIdx.x);
  return min(max(first + i, 0), units - 1);
}

// What one work item covers, derived once from its WorkItem and the variant: the rows of its q
// tile and the keys its CTA visits.
struct WorkTile {
  int request;    // the request's index in the batch
  int row_begin;  // first packed row of the tile
  int rows;       // packed rows in the tile (<= CTA_Q)
  int64_t q_start, kv_start;  // the request's first q token and (ragged) first KV row
  int q_len, kv_len;
  int page_start;  // paged: the request's first page-table entry
  KvRange kv;        // keys visited: the item's KV chunk within the keys some row of the tile sees
  KvRange unmasked;  // within kv, the keys every row sees: KV tiles inside need no mask

  template <typename Variant, int CTA_Q>
  __device__ __forceinline__ static WorkTile of(const WorkItem& item, const Variant& variant, int group) {
    WorkTile w;
    w.request = item.request;
    w.row_begin = item.row_begin;
    w.q_start = item.q_start;
    w.q_len = item.q_len;
    w.kv_start = item.kv_start;
    w.kv_len = item.kv_len;
    w.page_start = item.page_start;
    w.rows = min(CTA_Q, item.q_len * group - item.row_begin);
    const int first_token = item.row_begin / group;
    const int last_token = (item.row_begin + max(w.rows, 1) - 1) / group;
    const KvRange some = kv_range_union(variant, first_token, last_token, item.q_len, item.kv_len);
    const KvRange all = kv_range_common(variant, first_token, last_token, item.q_len, item.kv_len);
    w.kv = KvRange{item.kv_begin, min(item.kv_end, some.end)};
    w.unmasked = KvRange{all.begin, min(w.kv.end, all.end)};
    return w;
  }
};

// The persistent CTA's units in order, each as fn(k, item, kv_head, tile): the walk every role of the
// sm90 kernel makes (the consumers' own loop also prefetches and traces around the same steps).
template <typename Variant, int CTA_Q, typename Fn>
__device__ __forceinline__ void for_each_unit(const PrefillParams& p, int units, Fn&& fn) {
  const Variant variant(p);
  for (int k = 0, unit; (unit = persistent_unit(k, units)) >= 0; ++k) {
    WorkItem item;
    const TileScheduler work = TileScheduler::at(p, unit, item);
    fn(k, item, work.kv_head, WorkTile::of<Variant, CTA_Q>(item, variant, p.group));
  }
}

// Split chunks only: after this chunk's partial rows are written, is it the tile's last to finish?
// Every thread taking part gets the answer (through `flag`, one int of shared memory no longer in
// use); `sync` is their barrier (the whole CTA, or the consumer warps of a warp-specialized kernel)
// and `leader` one of them. The winner must call release_split_tile after merging.
template <typename Sync>
__device__ __forceinline__ bool last_chunk_to_finish(const PrefillParams& p, const WorkItem& item, int hk, int* flag,
                                                     bool leader, Sync&& sync) {
  __threadfence();  // this CTA's partial rows are visible before the counter says so
  sync();
  if (leader) {
    const int done = atomicAdd(p.merge_counters + item.merge * p.num_kv_heads + hk, 1);
    *flag = done == item.num_chunks - 1;
  }
  sync();
  const bool last = *flag != 0;
  if (last) __threadfence();  // the other chunks' rows, fenced before their increments, are read next
  return last;
}

__device__ __forceinline__ bool last_chunk_to_finish(const PrefillParams& p, const WorkItem& item, int hk, int* flag) {
  return last_chunk_to_finish(p, item, hk, flag, threadIdx.x == 0, [] { __syncthreads(); });
}

__device__ __forceinline__ void release_split_tile(const PrefillParams& p, const WorkItem& item, int hk,
                                                   bool leader) {
  if (leader) p.merge_counters[item.merge * p.num_kv_heads + hk] = 0;  // ready for the next run
}

}  // namespace fij
