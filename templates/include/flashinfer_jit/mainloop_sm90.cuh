// Mainloop of the sm90 (Hopper, sm_90a) prefill kernel: one work unit's q tile against its KV range,
// warp-specialized; the barrier sequences continue across the units of a persistent CTA.
//
//   - Producer warp (warpgroup 0, which gives its registers to the consumers): brings the Q tile
//     [128 packed rows, D] and kStages stages of K and V tiles [KV_TILE, D] into shared memory by TMA,
//     each completing on its own mbarrier; waits for a stage's "empty" barrier before refilling it
//     (and for q_empty before the next unit's Q). All tiles use the 128-byte swizzle in blocks of 64
//     head dims ([D / 64][rows][64]); paged K/V come one box per page.
//   - Two consumer warpgroups, 64 q rows each: S = Q K^T by wgmma (both operands in shared memory),
//     mask and online softmax in registers, O += P V by wgmma with P from registers (the S
//     accumulator layout is the A-fragment layout once packed to 16 bits) and V N-major from shared
//     memory. Within a warpgroup, tile j's QK^T is issued before tile j-1's PV and tile j's softmax is
//     placed before the wait for that PV (ptxas currently hoists the wait above it: benchmarks/NOTES.md);
//     the two warpgroups take turns issuing GEMMs (TurnTaking; -DFIJ_SM90_PINGPONG=0: they interleave freely).
//   - The variant (variant.cuh) decides visible keys, mask and logits transform, as in the sm80 path;
//     masks are applied only to tiles that can need them. Query / key transforms (RoPE) rewrite the
//     landed Q and K tiles in shared memory (transform_sm90.cuh): the consumers their Q rows, the
//     producer warpgroup's idle warps 1..3 each K tile, between its TMA barrier and the consumers'.
//   - V rows past the request's last key (the tail tile) are zeroed in shared memory before use: TMA
//     reads whatever follows in the tensor (another request's rows, or unwritten memory), and a NaN
//     there would survive P = 0 in the PV product.
//   - Compile-time switches (ping-pong, staged epilogue, unit order, and the ones still under A/B such
//     as the cp.async gather for paged K/V): switches_sm90.h.
#pragma once
#include <cuda.h>  // CUtensorMap

#include "flashinfer_jit/async_sm90.cuh"
#include "flashinfer_jit/gqa.cuh"
#include "flashinfer_jit/prefill_params.h"
#include "flashinfer_jit/score_mask.cuh"
#include "flashinfer_jit/softmax.cuh"
#include "flashinfer_jit/switches_sm90.h"
#include "flashinfer_jit/tile_layout_sm90.cuh"
#include "flashinfer_jit/tile_scheduler.cuh"
#include "flashinfer_jit/transform_sm90.cuh"
#include "flashinfer_jit/variant.cuh"

namespace fij {
namespace sm90 {

template <int HEAD_DIM, int KV_TILE>
struct Shape {
  static constexpr int kConsumers = 2;             // consumer warpgroups
  static constexpr int kRowsPerConsumer = 64;      // wgmma M
  static constexpr int kCtaQ = kConsumers * kRowsPerConsumer;
  static constexpr int kThreads = 128 * (kConsumers + 1);
  static constexpr int kBlocks = HEAD_DIM / 64;    // 128-byte column blocks of a row
  static constexpr int kStages = HEAD_DIM <= 64 ? FIJ_SM90_HD64_STAGES : 2;
  static constexpr int kNtS = KV_TILE / 8;         // n8 tiles of S
  static constexpr int kNtO = HEAD_DIM / 8;        // n8 tiles of O
  static constexpr uint32_t kQBytes = kCtaQ * HEAD_DIM * 2;
  static constexpr uint32_t kTileBytes = KV_TILE * HEAD_DIM * 2;
  static constexpr int kQBuffers = FIJ_SM90_DOUBLE_Q != 0 && HEAD_DIM <= 128 ? 2 : 1;
  // Q buffers, K stages, V stages, the mbarriers, the split-merge flag, the O staging buffer; +1024 to
  // align the start to a swizzle atom.
  static constexpr uint32_t kKOffset = kQBuffers * kQBytes;
  static constexpr uint32_t kVOffset = kKOffset + kStages * kTileBytes;
  static constexpr uint32_t kBarOffset = kVOffset + kStages * kTileBytes;
  static constexpr int kBarriers = 2 * kQBuffers + kStages + 4 * kStages + 2 * kConsumers + kStages + kQBuffers;
  static constexpr uint32_t kFlagOffset = kBarOffset + kBarriers * 8;
  // FIJ_SM90_STAGED_EPILOGUE: O rows staged in shared memory for 16-byte row stores; there
  // is room for it up to head_dim 128.
  static constexpr bool kStagedEpilogue = FIJ_SM90_STAGED_EPILOGUE != 0 && HEAD_DIM <= 128;
  static constexpr bool kStoreWarps = FIJ_SM90_STORE_WARPS != 0 && kStagedEpilogue;
  // Store warps and the TMA store are two ways to do one thing: the store warps, asked for, replace it.
  static constexpr bool kTmaStore = FIJ_SM90_TMA_STORE != 0 && kStagedEpilogue && !kStoreWarps;
  // The TMA's 128-byte swizzle is a function of the address: its source must be 1024-byte aligned.
  static constexpr uint32_t kOAlign = kTmaStore ? 1024 : 128;
  static constexpr uint32_t kOOffset = (kFlagOffset + 8 + kOAlign - 1) / kOAlign * kOAlign;
  static constexpr uint32_t kOBytes = kStagedEpilogue ? kCtaQ * HEAD_DIM * 2 : 0;
  static constexpr uint32_t kSmemBytes = kOOffset + kOBytes + 1024;
  static_assert(kSmemBytes <= 227 * 1024, "more shared memory than an sm_90 CTA may have");
  static constexpr bool kTailWarp = FIJ_SM90_TAIL_WARP != 0;
  static constexpr bool kPagePrefetch = FIJ_SM90_PAGE_PREFETCH != 0;
  static constexpr bool kItemPrefetch = FIJ_SM90_ITEM_PREFETCH != 0;
  static_assert(!(kStoreWarps && kTailWarp) || kConsumers <= 2, "store warps 1..kConsumers and tail warp 3 overlap");
  static constexpr bool kLazyRescale = HEAD_DIM >= 128;
  static constexpr int kPolyExp2 = FIJ_POLY_EXP2;  // eighths of the softmax's exp2s taken off the MUFU
  static_assert(HEAD_DIM % 64 == 0 && KV_TILE % 16 == 0 && KV_TILE <= 256, "unsupported sm90 tile shape");
};

// Where everything lives in shared memory (addresses in the shared window).
template <typename S>
struct SmemLayout {
  uint32_t base;  // 1024-byte aligned
  __device__ __forceinline__ uint32_t q(int buffer) const { return base + buffer * S::kQBytes; }
  __device__ __forceinline__ uint32_t k(int stage) const { return base + S::kKOffset + stage * S::kTileBytes; }
  __device__ __forceinline__ uint32_t v(int stage) const { return base + S::kVOffset + stage * S::kTileBytes; }
  __device__ __forceinline__ uint32_t bar(int i) const { return base + S::kBarOffset + 8 * i; }
  __device__ __forceinline__ uint32_t q_full(int buffer) const { return bar(buffer); }
  __device__ __forceinline__ uint32_t q_empty(int buffer) const { return bar(S::kQBuffers + buffer); }
  // V tail tiles land on a barrier of their own: one per stage with the tail warp (two tails can be in
  // flight then), else one (the producer waits for each tail before the next load).
  __device__ __forceinline__ static int tail_slot(int stage) { return S::kTailWarp ? stage : 0; }
  __device__ __forceinline__ uint32_t v_tail(int stage) const { return bar(2 * S::kQBuffers + tail_slot(stage)); }
  static constexpr int kKvBar = 2 * S::kQBuffers + S::kStages;  // first K/V barrier
  __device__ __forceinline__ uint32_t k_full(int stage) const { return bar(kKvBar + stage); }
  __device__ __forceinline__ uint32_t k_empty(int stage) const { return bar(kKvBar + S::kStages + stage); }
  __device__ __forceinline__ uint32_t v_full(int stage) const { return bar(kKvBar + 2 * S::kStages + stage); }
  __device__ __forceinline__ uint32_t v_empty(int stage) const { return bar(kKvBar + 3 * S::kStages + stage); }
  // Store warps (kStoreWarps): consumer warpgroup c's half of the O staging buffer is full / copied out.
  __device__ __forceinline__ uint32_t o_full(int c) const { return bar(kKvBar + 4 * S::kStages + c); }
  __device__ __forceinline__ uint32_t o_empty(int c) const { return bar(kKvBar + 4 * S::kStages + S::kConsumers + c); }
  // Key transforms (transform_sm90.cuh): a K tile's TMA completes here; k_full once it is transformed.
  __device__ __forceinline__ uint32_t k_landed(int stage) const {
    return bar(kKvBar + 4 * S::kStages + 2 * S::kConsumers + stage);
  }
  // Query transforms by the producer's transform warps (FIJ_SM90_ROPE_Q_PRODUCER): Q lands here.
  __device__ __forceinline__ uint32_t q_landed(int buffer) const {
    return bar(kKvBar + 5 * S::kStages + 2 * S::kConsumers + buffer);
  }
  __device__ __forceinline__ uint32_t flag() const { return base + S::kFlagOffset; }
  __device__ __forceinline__ uint32_t o_stage() const { return base + S::kOOffset; }

  __device__ __forceinline__ static SmemLayout of(uint8_t* smem) {
    const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    return SmemLayout{(raw + 1023u) & ~1023u};
  }
  __device__ __forceinline__ uint8_t* generic(uint8_t* smem, uint32_t addr) const {
    return smem + (addr - static_cast<uint32_t>(__cvta_generic_to_shared(smem)));
  }
  // One thread, before the CTA barrier that starts the roles.
  __device__ __forceinline__ void init_barriers(uint32_t kv_full_arrivals = 1, uint32_t k_full_arrivals = 1,
                                                uint32_t q_full_arrivals = 1) const {
    for (int b = 0; b < S::kQBuffers; ++b) {
      mbar_init(q_landed(b), 1);  // the TMA issuer
      mbar_init(q_full(b), q_full_arrivals);  // the TMA issuer, or one per transform warp
      mbar_init(q_empty(b), S::kConsumers * 4);  // one arrival per consumer warp
    }
    for (int s = 0; s < S::kStages; ++s) mbar_init(v_tail(s), 1);
    for (int c = 0; c < S::kConsumers; ++c) {
      mbar_init(o_full(c), 128);  // every thread of the consumer warpgroup, after its own stores
      mbar_init(o_empty(c), 32);  // every lane of its store warp, after its own loads
    }
    for (int s = 0; s < S::kStages; ++s) {
      mbar_init(k_landed(s), 1);  // the TMA issuer
      mbar_init(k_full(s), k_full_arrivals);  // kv_full_arrivals, or (key transforms) one per transform warp
      mbar_init(v_full(s), kv_full_arrivals);
      mbar_init(k_empty(s), S::kConsumers * 4);  // one arrival per consumer warp
      mbar_init(v_empty(s), S::kConsumers * 4);
    }
    mbar_init_fence();
  }
};

// The q, k and v tensor maps of one run (tma_host_sm90.h), passed by value as a __grid_constant__, and
// the order of their outer coordinates.
struct TensorMaps {
  CUtensorMap q, k, v;
  CUtensorMap o;     // Shape::kTmaStore: the output, boxes of 64 head dims x G heads x 64 / G tokens
  int32_t o_by_tma;  // o is encoded (kTmaStore and 64 % G == 0)
  // Ragged: k / v maps are (head dims, rows, heads) for head-major tensors, else (head dims, heads, rows).
  // Paged: (head dims, slots, heads, pages) for HND caches, else (head dims, heads, slots, pages).
  int32_t k_rows_inner, v_rows_inner;
  int32_t box_rows;  // paged: slots per box (min(page size, KV tile))
  int32_t head_step;  // paged, FIJ_SM90_PAGED_WIDE_BOX: a KV head's step in its map coordinate (tma_host_sm90.h)
};

// Where a role is in the barrier sequences, across the work units of a persistent CTA: the producer
// and the consumers each keep one and advance it identically (units with no KV tile use no barrier).
struct PipelineState {
  int tiles = 0;   // K/V tiles so far: tile t uses stage t % kStages in phase (t / kStages) & 1
  int q_uses = 0;  // Q tiles so far: use u is buffer u % kQBuffers, phase (u / kQBuffers) & 1
  uint32_t tail_parity = 0;  // bit i: the parity of tail barrier i's next V tail (SmemLayout::tail_slot)
  int outputs = 0; // staged outputs so far (store warps: o_full / o_empty phases)

  template <typename S>
  __device__ __forceinline__ int q_buffer() const { return q_uses % S::kQBuffers; }
  template <typename S>
  __device__ __forceinline__ uint32_t q_phase() const { return uint32_t(q_uses / S::kQBuffers) & 1; }
};

// The KV tiles of an item: [kv.begin, kv.end) in steps of KV_TILE (kv.begin is tile-aligned).
template <int KV_TILE>
__device__ __forceinline__ int kv_tiles(const WorkTile& w) {
  return w.kv.end > w.kv.begin ? (w.kv.end - w.kv.begin + KV_TILE - 1) / KV_TILE : 0;
}

// TRANSFORM_K: the variant transforms keys (RoPE): K tiles land on k_landed, and the key transform
// warps (transform_sm90.cuh) hand them to the consumers; TRANSFORM_Q: the same warps transform Q (on
// q_landed; FIJ_SM90_ROPE_Q_PRODUCER).
template <typename T, int HEAD_DIM, int KV_TILE, bool PAGED, bool TRANSFORM_K = false, bool TRANSFORM_Q = false>
struct Producer {
  using S = Shape<HEAD_DIM, KV_TILE>;
  // FIJ_SM90_PAGED_WIDE_BOX: paged K / V tiles by 8-row group, one box per page (tile_layout_sm90.cuh)
  static constexpr bool kWideBox = PAGED && FIJ_SM90_PAGED_WIDE_BOX != 0;
  using KvLayout = KvTileLayout<HEAD_DIM, KV_TILE, kWideBox>;
  using KeyWarps = KeyTransformWarps<T, HEAD_DIM, KV_TILE, KvLayout>;
  static_assert(!TRANSFORM_Q || TRANSFORM_K, "the query transform warps are the key transform warps");
  static constexpr bool kTransformQ = TRANSFORM_Q;
  static constexpr uint32_t kQFullArrivals = TRANSFORM_Q ? KeyWarps::kWarps : 1;
  static constexpr bool kGather = PAGED && FIJ_SM90_PAGED_GATHER != 0;
  static constexpr int kThreads = kGather ? 128 : 32;  // the threads running run(): a warpgroup or a warp
  static constexpr uint32_t kFullArrivals = kGather ? 128 : 1;  // per K / V full phase: gatherers or the TMA issuer
  static constexpr uint32_t kKFullArrivals = TRANSFORM_K ? KeyWarps::kWarps : kFullArrivals;
  static_assert(!kGather || (!S::kStoreWarps && !S::kTailWarp), "the gather takes the whole producer warpgroup");
  static_assert(!kGather || !kWideBox, "the gather writes the by-block layout: no wide boxes with it");
  static_assert(!TRANSFORM_K || (!kGather && !S::kStoreWarps && !S::kTailWarp),
                "the key transform warps are warps 1..3 of the producer warpgroup: no gather, store or tail warps");

  // Paged: where key `pos` of the request lives (its page, and its slot in the page).
  struct PageBox {
    int page = 0, slot = 0;
  };
  __device__ __forceinline__ static PageBox locate(const PrefillParams& p, const WorkTile& w, uint32_t pos) {
    const uint32_t entry = (__umulhi(pos, p.page_div_mul) + pos) >> p.page_div_shift;  // pos / page_size
    return PageBox{p.page_indices[w.page_start + int(entry)], int(pos - entry * uint32_t(p.page_size))};
  }

  // Gather geometry (kGather): thread tid copies 16-byte chunk tid % kChunks of rows tid / kChunks +
  // i * kRowsPerPass, pass i = 0 .. kPasses - 1; a warp covers kRowsPerWarpPass rows per pass, so its
  // kPasses * kRowsPerWarpPass rows (at most 32) are one per lane.
  static constexpr int kChunks = HEAD_DIM / 8;  // 16-byte chunks of a row
  static constexpr int kRowsPerPass = 128 / kChunks;
  static constexpr int kRowsPerWarpPass = 32 / kChunks;
  static constexpr int kPasses = KV_TILE / kRowsPerPass;
  static_assert(!kGather || (kChunks <= 32 && kPasses * kRowsPerWarpPass <= 32), "a gathered tile's rows: one per lane");

  // Where the row a lane looks up lives: page -1 past the request's end (the copy zero-fills it).
  struct GatherRow {
    int page = -1, slot = 0;
  };
  // One page-table lookup per lane and tile, shared by K and V (the tile's first pass row of lane L is
  // looked up by lane L; gather_tile hands it to the copying lanes by shuffles). The single dependent load
  // of the tile, issued one tile ahead by run().
  __device__ __forceinline__ static GatherRow gather_lookup(const PrefillParams& p, const WorkTile& w, int pos0, int tid) {
    const int lane = tid % 32, warp = tid / 32;
    GatherRow g;
    const int r = warp * kRowsPerWarpPass + lane % kRowsPerWarpPass + (lane / kRowsPerWarpPass) * kRowsPerPass;
    if (lane < kPasses * kRowsPerWarpPass && pos0 + r < w.kv_len) {
      const PageBox at = locate(p, w, uint32_t(pos0 + r));
      g.page = at.page;
      g.slot = at.slot;
    }
    return g;
  }

  // One paged K or V tile gathered by the warpgroup (kGather), keys [pos0, pos0 + KV_TILE) into the stage at
  // `dst` in the 128-byte swizzled layout the TMA would give; `tid` 0..127, `row` its warp's lookups
  // (gather_lookup of this tile). No memory access but the copies: the rows' pages come by shuffle.
  __device__ __forceinline__ static void gather_tile(const PrefillParams& p, const T* base, uint32_t dst, uint32_t bar,
                                                     int hk, int tid, const GatherRow& row) {
    const int chunk = tid % kChunks, lane = tid % 32;
    const T* head = base + int64_t(hk) * p.k_stride_h + chunk * 8;  // K and V share their strides
    const uint32_t block = dst + (chunk / 8) * KV_TILE * 128;  // the chunk's 64-head-dim block
#pragma unroll 4  // fully unrolled, 16 passes spill in the producer's 56 registers
    for (int i = 0; i < kPasses; ++i) {
      const int r = tid / kChunks + i * kRowsPerPass;
      const int from = i * kRowsPerWarpPass + lane / kChunks;
      const int page = __shfl_sync(0xffffffffu, row.page, from);
      const int slot = __shfl_sync(0xffffffffu, row.slot, from);
      const bool valid = page >= 0;
      // read nothing past the request's end: the row is zero-filled
      const T* src = valid ? head + int64_t(page) * p.stride_page + int64_t(slot) * p.k_stride_n : base;
      cp_async_16(block + r * 128 + (((chunk % 8) ^ (r & 7)) * 16), src, valid);
    }
    mbar_arrive_after_cp_async(bar);
  }

  // One K or V tile, keys [pos0, pos0 + KV_TILE) of the request, into the stage at `dst`, completing on
  // `bar` (expected bytes included). Whole warp. Ragged: one box per 64 head dims, issued by lane 0.
  // Paged: one box per page (or per tile, for pages longer than it) and 64 head dims, lane i issuing
  // the i-th page's; pages past the request's last key are not read (their rows stay stale: masked
  // for K, zeroed for V by zero_v_tail).
  __device__ __forceinline__ static void load_tile(const PrefillParams& p, const CUtensorMap* map, bool rows_inner,
                                                   int box_rows, uint32_t dst, uint32_t bar, const WorkTile& w,
                                                   int hk, int pos0) {
    const int lane = threadIdx.x % 32;
    if constexpr (!PAGED) {
      if (lane == 0) {
        mbar_arrive_expect_tx(bar, S::kTileBytes);
        const int row = int(w.kv_start) + pos0;
#pragma unroll
        for (int b = 0; b < S::kBlocks; ++b) {
          if (rows_inner)
            tma_load_3d(dst + b * KV_TILE * 128, map, b * 64, row, hk, bar);
          else
            tma_load_3d(dst + b * KV_TILE * 128, map, b * 64, hk, row, bar);
        }
      }
    } else {
      const int rows = min(KV_TILE, w.kv_len - pos0);
      const int boxes = (rows + box_rows - 1) / box_rows;
      if (lane == 0) mbar_arrive_expect_tx(bar, uint32_t(boxes * box_rows) * HEAD_DIM * uint32_t(sizeof(T)));
      __syncwarp();
#pragma unroll 1
      for (int i = lane; i < boxes; i += 32) issue_page_box(map, rows_inner, dst, bar, hk, i * box_rows,
                                                             locate(p, w, uint32_t(pos0 + i * box_rows)));
    }
  }

  // The boxes of one page's rows [row0, row0 + box rows) of a paged tile: one per 64 head dims into the
  // by-block layout, or (kWideBox) one with all of them into the by-group layout (map coordinates:
  // tma_host_sm90.h's encode_page_map / encode_wide_page_map). `hk` is the KV head, times
  // TensorMaps::head_step with kWideBox (head_coord).
  __device__ __forceinline__ static void issue_page_box(const CUtensorMap* map, bool rows_inner, uint32_t dst,
                                                        uint32_t bar, int hk, int row0, const PageBox& at) {
    if constexpr (kWideBox) {
      const uint32_t to = dst + KvLayout::row(0, row0);
      if (rows_inner)  // HND: (64 dims, 8 slots, blocks, heads x 8-slot groups, pages)
        tma_load_5d(to, map, 0, 0, 0, hk + at.slot / 8, at.page, bar);
      else  // NHD: (64 dims, 8 slots, heads x 64-dim blocks, 8-slot groups, pages)
        tma_load_5d(to, map, 0, 0, hk, at.slot / 8, at.page, bar);
    } else {
#pragma unroll
      for (int b = 0; b < S::kBlocks; ++b) {
        const uint32_t to = dst + KvLayout::row(b, row0);
        if (rows_inner)
          tma_load_4d(to, map, b * 64, at.slot, hk, at.page, bar);
        else
          tma_load_4d(to, map, b * 64, hk, at.slot, at.page, bar);
      }
    }
  }

  // Paged, one box per lane (kPagePrefetch, when a tile has at most 32 boxes): lane i's box of the tile
  // at pos0, looked up once for K and V.
  __device__ __forceinline__ static PageBox page_box(const PrefillParams& p, const WorkTile& w, int box_rows,
                                                     int pos0) {
    const int lane = threadIdx.x % 32;
    return pos0 + lane * box_rows < w.kv_len ? locate(p, w, uint32_t(pos0 + lane * box_rows)) : PageBox{};
  }
  __device__ __forceinline__ static void load_paged_tile(const CUtensorMap* map, bool rows_inner, int box_rows,
                                                         uint32_t dst, uint32_t bar, const WorkTile& w, int hk,
                                                         int pos0, const PageBox& box) {
    const int lane = threadIdx.x % 32;
    const int rows = min(KV_TILE, w.kv_len - pos0);
    const int boxes = (rows + box_rows - 1) / box_rows;
    if (lane == 0) mbar_arrive_expect_tx(bar, uint32_t(boxes * box_rows) * HEAD_DIM * uint32_t(sizeof(T)));
    __syncwarp();
    if (lane < boxes) issue_page_box(map, rows_inner, dst, bar, hk, lane * box_rows, box);
  }

  // One work unit, run by one whole warp (kGather: by the whole warpgroup).
  __device__ __forceinline__ static void run(const PrefillParams& p, const TensorMaps& maps, const WorkTile& w,
                                             int hk, const SmemLayout<S>& sm, uint8_t* smem, PipelineState& ps) {
    const int lane = threadIdx.x % 32;
    const int n = kv_tiles<KV_TILE>(w);
    if (n == 0) return;  // the consumers skip the mainloop: nothing to load
    if (threadIdx.x % kThreads == 0) {
      // Q: packed rows [row_begin, row_begin + 128) are tokens row_begin / G .. and heads hk * G ..:
      // a box of G heads x 128 / G tokens lands in packed-row order. The previous unit's consumers
      // must be done with the Q buffer (the unit kQBuffers before this one).
      const int qb = ps.q_buffer<S>();
      if (ps.q_uses >= S::kQBuffers) mbar_wait(sm.q_empty(qb), ps.q_phase<S>() ^ 1);
      const uint32_t q_bar = TRANSFORM_Q ? sm.q_landed(qb) : sm.q_full(qb);
      mbar_arrive_expect_tx(q_bar, S::kQBytes);
      const int token0 = int(w.q_start) + w.row_begin / p.group;
#pragma unroll
      for (int b = 0; b < S::kBlocks; ++b)
        tma_load_3d(sm.q(qb) + b * S::kCtaQ * 128, &maps.q, b * 64, hk * p.group, token0, q_bar);
    }
    ps.q_uses += 1;
    // Paged with kPagePrefetch: this tile's boxes, looked up one tile ahead.
    const bool box_per_lane = PAGED && S::kPagePrefetch && KV_TILE <= 32 * maps.box_rows;
    PageBox box;
    if (box_per_lane) box = page_box(p, w, maps.box_rows, w.kv.begin);
    GatherRow rows;  // kGather: the current tile's lookups
    if constexpr (kGather) rows = gather_lookup(p, w, w.kv.begin, threadIdx.x % kThreads);
    const int head_coord = kWideBox ? hk * maps.head_step : hk;  // (issue_page_box)
    auto load = [&](const CUtensorMap* map, bool rows_inner, uint32_t dst, uint32_t bar, int pos0) {
      if (box_per_lane)
        load_paged_tile(map, rows_inner, maps.box_rows, dst, bar, w, head_coord, pos0, box);
      else
        load_tile(p, map, rows_inner, maps.box_rows, dst, bar, w, head_coord, pos0);
    };
#pragma unroll 1
    for (int j = 0; j < n; ++j) {
      const int t = ps.tiles + j;
      const int stage = t % S::kStages;
      const uint32_t phase = (t / S::kStages) & 1;
      const int pos0 = w.kv.begin + j * KV_TILE;
      PageBox next;
      if (box_per_lane && j + 1 < n) next = page_box(p, w, maps.box_rows, pos0 + KV_TILE);  // in flight over the waits
      if constexpr (kGather) {
        // Four warps wait here: they sleep between tries (two stages ahead, the wake-up costs nothing).
        const int tid = threadIdx.x % kThreads;
        GatherRow ahead;  // the next tile's lookups, in flight over the waits and copies
        if (j + 1 < n) ahead = gather_lookup(p, w, pos0 + KV_TILE, tid);
        if (t >= S::kStages && lane == 0) mbar_wait_sleeping(sm.k_empty(stage), phase ^ 1);
        __syncwarp();
        gather_tile(p, static_cast<const T*>(p.k), sm.k(stage), sm.k_full(stage), hk, tid, rows);
        if (t >= S::kStages && lane == 0) mbar_wait_sleeping(sm.v_empty(stage), phase ^ 1);
        __syncwarp();
        gather_tile(p, static_cast<const T*>(p.v), sm.v(stage), sm.v_full(stage), hk, tid, rows);
        rows = ahead;
        continue;  // rows past the request's end came zero-filled: no tail
      }
      if (t >= S::kStages && lane == 0) mbar_wait(sm.k_empty(stage), phase ^ 1);
      __syncwarp();
      // (keys the launcher rotated go straight to the consumers)
      load(&maps.k, maps.k_rows_inner, sm.k(stage), TRANSFORM_K && !p.keys_rotated ? sm.k_landed(stage) : sm.k_full(stage),
           pos0);
      if (t >= S::kStages && lane == 0) mbar_wait(sm.v_empty(stage), phase ^ 1);
      __syncwarp();
      // Keys of the tile that exist in the request; past them V is zeroed (see the file comment), here
      // or (kTailWarp) by the tail warp.
      const int valid = min(KV_TILE, w.kv_len - pos0);
      if (valid >= KV_TILE) {
        load(&maps.v, maps.v_rows_inner, sm.v(stage), sm.v_full(stage), pos0);
      } else {
        load(&maps.v, maps.v_rows_inner, sm.v(stage), sm.v_tail(stage), pos0);
        const int slot = SmemLayout<S>::tail_slot(stage);
        if constexpr (!S::kTailWarp) zero_v_tail(sm, smem, stage, valid, (ps.tail_parity >> slot) & 1);
        ps.tail_parity ^= 1u << slot;
      }
      box = next;
    }
    ps.tiles += n;
  }

  // Key transform warps (TRANSFORM_K): walk the same units; each K tile, once landed, is transformed in
  // place (keys past the request's end are left: masked), fenced for the tensor cores and handed over.
  template <typename Variant, typename Walk>
  __device__ __forceinline__ static void transform_unit_keys(const PrefillParams& p, const Variant& variant, Walk& walk,
                                                             const KeyWarps& kw, const WorkTile& w, int hk,
                                                             const SmemLayout<S>& sm, uint8_t* smem, PipelineState& ps) {
    const int n = kv_tiles<KV_TILE>(w);
    if (n == 0) return;  // no Q, no K: the producer loads nothing for the unit
    if constexpr (TRANSFORM_Q) {
      const int qb = ps.q_buffer<S>();
      mbar_wait(sm.q_landed(qb), ps.q_phase<S>());
      const int tid = int(threadIdx.x) - 32 * KeyWarps::kFirstWarp;
      transform_query_rows<T, HEAD_DIM, S::kCtaQ, KeyWarps::kThreads>(variant, w, p.group, hk, sm.generic(smem, sm.q(qb)),
                                                                      0, S::kCtaQ, tid);
      fence_proxy_async();  // this thread's rows, visible to the wgmma (async proxy)
      __syncwarp();
      if (threadIdx.x % 32 == 0) mbar_arrive(sm.q_full(qb));
    }
    ps.q_uses += 1;
#pragma unroll 1
    for (int j = 0; j < n && !p.keys_rotated; ++j) {
      const int t = ps.tiles + j;
      const int stage = t % S::kStages;
      const int pos0 = w.kv.begin + j * KV_TILE;
      mbar_wait(sm.k_landed(stage), uint32_t(t / S::kStages) & 1);
      kw.transform_tile(variant, walk, sm.generic(smem, sm.k(stage)), pos0, min(KV_TILE, w.kv_len - pos0));
      fence_proxy_async();  // this thread's keys, visible to the wgmma (async proxy)
      __syncwarp();
      if (threadIdx.x % 32 == 0) mbar_arrive(sm.k_full(stage));
    }
    ps.tiles += n;
  }

  // Tail warp (kTailWarp): walks the same units and zeroes each tail tile's V rows once they land.
  // Only a unit's last tile can hold the request's last key.
  __device__ __forceinline__ static void zero_unit_tail(const WorkTile& w, const SmemLayout<S>& sm, uint8_t* smem,
                                                        PipelineState& ps) {
    const int n = kv_tiles<KV_TILE>(w);
    if (n == 0) return;
    const int stage = (ps.tiles + n - 1) % S::kStages;
    const int valid = min(KV_TILE, w.kv_len - (w.kv.begin + (n - 1) * KV_TILE));
    if (valid < KV_TILE) {
      const int slot = SmemLayout<S>::tail_slot(stage);
      zero_v_tail(sm, smem, stage, valid, (ps.tail_parity >> slot) & 1);
      ps.tail_parity ^= 1u << slot;
    }
    ps.tiles += n;
  }

  // The tail tile's V, loaded on a barrier of its own: rows [valid, KV_TILE) zeroed by the warp, fenced
  // for the tensor cores, then handed to the consumers (one plain arrival on v_full).
  __device__ __forceinline__ static void zero_v_tail(const SmemLayout<S>& sm, uint8_t* smem, int stage, int valid,
                                                     uint32_t parity) {
    const int lane = threadIdx.x % 32;
    if constexpr (S::kTailWarp)
      mbar_wait_sleeping(sm.v_tail(stage), parity);  // the tail warp, off the critical path
    else
      mbar_wait(sm.v_tail(stage), parity);
    const int rows = KV_TILE - max(valid, 0);
    uint8_t* tile = sm.generic(smem, sm.v(stage));
    // 16-byte zero stores over whole 128-byte rows (the swizzle permutes chunks within a row only).
#pragma unroll 1
    for (int i = lane; i < S::kBlocks * rows * 8; i += 32) {
      const int b = i / (rows * 8), r = (i / 8) % rows, chunk = i % 8;
      *reinterpret_cast<uint4*>(tile + KvLayout::row(b, KV_TILE - rows + r) + chunk * 16) = make_uint4(0, 0, 0, 0);
    }
    fence_proxy_async();
    __syncwarp();
    if (lane == 0) mbar_arrive(sm.v_full(stage));
  }
};

// Turn-taking between the two consumer warpgroups on named barriers 2 and 3 (256 threads: the waiting
// warpgroup and the one handing over). Every GEMM-issue phase is wait() ... pass(); both warpgroups run
// the same phases (same units, same tiles). Consumer 1 hands consumer 0 the first turn; consumer 0
// takes the one hand-over left at the end (finish()), so no barrier is left half-arrived.
struct TurnTaking {
  static constexpr bool kEnabled = FIJ_SM90_PINGPONG != 0;
  static constexpr int kFirstBarrier = 2;
  int consumer;

  __device__ __forceinline__ void start() const {
    if (kEnabled && consumer == 1) named_barrier_arrive(kFirstBarrier + 0, 256);
  }
  __device__ __forceinline__ void wait() const {
    if (kEnabled) named_barrier_sync(kFirstBarrier + consumer, 256);
  }
  __device__ __forceinline__ void pass() const {
    if (kEnabled) named_barrier_arrive(kFirstBarrier + (1 - consumer), 256);
  }
  __device__ __forceinline__ void finish() const {
    if (kEnabled && consumer == 0) named_barrier_sync(kFirstBarrier + 0, 256);
  }
};

template <typename T, int HEAD_DIM, int KV_TILE, typename Variant>
struct Consumer {
  using S = Shape<HEAD_DIM, KV_TILE>;
  static constexpr int kQueryBarrier = 6;  // + consumer: its warpgroup's transformed Q rows (transform_sm90.cuh)
  // Q rotated by the consumers (else by the producer's transform warps, before q_full)
  static constexpr bool kTransformsQ = Variant::kTransformsQuery && !FIJ_SM90_ROPE_Q_PRODUCER;
  using Softmax = OnlineSoftmax<T, 1, S::kNtS, S::kNtO, S::kLazyRescale, S::kPolyExp2>;
  using MmaS = Wgmma<KV_TILE, T>;
  using MmaO = Wgmma<HEAD_DIM, T>;

  struct State {
    float o[HEAD_DIM / 2];  // the m64nD accumulator: n8 tile j at o[4j .. 4j + 3]
    Softmax softmax;
  };

  int consumer;  // 0 .. kConsumers - 1
  int warp;      // warp within the warpgroup
  int lane_g, lane_t;

  __device__ __forceinline__ static Consumer of(int tid_in_consumers) {
    Consumer c;
    c.consumer = tid_in_consumers / 128;
    c.warp = (tid_in_consumers % 128) / 32;
    c.lane_g = (tid_in_consumers % 32) / 4;
    c.lane_t = tid_in_consumers % 4;
    return c;
  }
  // Tile row of accumulator row h (0: lane / 4, 1: lane / 4 + 8).
  __device__ __forceinline__ int row(int h) const {
    return consumer * S::kRowsPerConsumer + warp * 16 + lane_g + 8 * h;
  }

  // S = Q K^T of one stage: D / 16 k-steps; a step advances 32 bytes within a 128-byte block. K-major K:
  // its 8-row groups KvLayout::kGroupStride apart (tile_layout_sm90.cuh).
  template <typename KvLayout>
  __device__ __forceinline__ void issue_qk(float (&s)[KV_TILE / 2], const SmemLayout<S>& sm, int q_buffer,
                                           int stage) const {
    const uint32_t q0 = sm.q(q_buffer) + consumer * S::kRowsPerConsumer * 128;
    const uint32_t k0 = sm.k(stage);
#pragma unroll
    for (int ks = 0; ks < HEAD_DIM / 16; ++ks) {
      const uint32_t step = (ks / 4), within = (ks % 4) * 32;
      const uint64_t a = smem_desc_sw128(q0 + step * S::kCtaQ * 128 + within, 16, 1024);
      const uint64_t b = smem_desc_sw128(k0 + step * KvLayout::kBlockStride + within, 16, KvLayout::kGroupStride);
      MmaS::ss(s, a, b, ks > 0 ? 1 : 0);
    }
  }

  // O += P V of one stage: KV_TILE / 16 k-steps of 16 keys (two 8-row groups of V each). MN-major V: its
  // 64-dim blocks KvLayout::kBlockStride apart (leading), its 8-row groups kGroupStride apart (stride).
  template <typename KvLayout>
  __device__ __forceinline__ static void issue_pv(float (&o)[HEAD_DIM / 2], const uint32_t (&pf)[KV_TILE / 16][4],
                                                  const SmemLayout<S>& sm, int stage) {
    const uint32_t v0 = sm.v(stage);
#pragma unroll
    for (int kk = 0; kk < KV_TILE / 16; ++kk)
      MmaO::rs(o, pf[kk],
               smem_desc_sw128(v0 + kk * 2 * KvLayout::kGroupStride, KvLayout::kBlockStride, KvLayout::kGroupStride), 1);
  }

  // P (fp32 in s) -> 16-bit A fragments: k-step kk takes n8 tiles 2kk and 2kk + 1 of S.
  __device__ __forceinline__ static void pack_p(const float (&s)[KV_TILE / 2], uint32_t (&pf)[KV_TILE / 16][4]) {
#pragma unroll
    for (int kk = 0; kk < KV_TILE / 16; ++kk)
#pragma unroll
      for (int i = 0; i < 4; ++i) pf[kk][i] = Converter<T>::from_float2(s[8 * kk + 2 * i], s[8 * kk + 2 * i + 1]);
  }

  // The variant's logits transform, then its mask (score_mask.cuh).
  __device__ __forceinline__ void score_and_mask(const PrefillParams& p, const Variant& variant, const WorkTile& w,
                                                 int hk, int pos0, float (&s)[KV_TILE / 2]) const {
    const PackedRow rows[1][2] = {{unpack_row(w.row_begin + row(0), p.group, hk),
                                   unpack_row(w.row_begin + row(1), p.group, hk)}};
    score_and_mask_fragments<Variant, KV_TILE>(variant, w, rows, pos0, pos0 + 2 * lane_t,
                                               reinterpret_cast<float(&)[1][S::kNtS][4]>(s));
  }

  __device__ __forceinline__ void softmax_tile(const PrefillParams& p, const Variant& variant, const WorkTile& w,
                                               int hk, int pos0, float (&s)[KV_TILE / 2], State& st,
                                               float (&correction)[1][2]) const {
    score_and_mask(p, variant, w, hk, pos0, s);
    st.softmax.exponentiate(reinterpret_cast<float(&)[1][S::kNtS][4]>(s), variant.softmax_scale_log2(), correction);
  }

  // Every consumer warp releases a stage once its warpgroup's wgmma reading it has completed.
  __device__ __forceinline__ static void release(uint32_t empty_bar) {
    __syncwarp();
    if (threadIdx.x % 32 == 0) mbar_arrive(empty_bar);
  }

  // One work unit. Leaves O (unnormalised) and the softmax state for the epilogue. `q_landed` runs once
  // the unit's Q tile is in shared memory (a trace hook; empty otherwise).
  // kGathered: K and V came by cp.async (Producer::kGather), ordinary writes that the wgmma (async
  // proxy) may read only after a proxy fence by the reading thread. KvLayout: the producer's K / V tiles.
  template <bool kGathered, typename KvLayout, typename OnQ>
  __device__ __forceinline__ void run(const PrefillParams& p, const Variant& variant, const WorkTile& w, int hk,
                                      const SmemLayout<S>& sm, uint8_t* smem, State& st, PipelineState& ps,
                                      const TurnTaking& turn, OnQ&& q_landed) const {
    auto wait_kv = [&](uint32_t bar, uint32_t parity) {
      mbar_wait(bar, parity);
      if constexpr (kGathered) fence_proxy_async();
    };
    auto init_state = [&] {
#pragma unroll
      for (int i = 0; i < HEAD_DIM / 2; ++i) st.o[i] = 0.f;
      st.softmax.init();
    };
    const int n = kv_tiles<KV_TILE>(w);
    if (n == 0) return init_state();
    const int qb = ps.q_buffer<S>();
    mbar_wait(sm.q_full(qb), ps.q_phase<S>());
    // (before the state exists: at head_dim 256 a transform with the zeroed O live spills)
    if constexpr (kTransformsQ) {
      transform_query_rows<T, HEAD_DIM, S::kCtaQ, 128>(variant, w, p.group, hk, sm.generic(smem, sm.q(qb)),
                                                       consumer * 64, 64, warp * 32 + lane_g * 4 + lane_t);
      fence_proxy_async();  // this thread's rows, visible to the wgmma (async proxy)
      named_barrier_sync(kQueryBarrier + consumer, 128);
    }
    init_state();
    float s[KV_TILE / 2];
    uint32_t pf[KV_TILE / 16][4];
    float correction[1][2];
    q_landed();
    ps.q_uses += 1;
    const int t0 = ps.tiles;
    auto stage_of = [&](int j) { return (t0 + j) % S::kStages; };
    auto phase_of = [&](int j) { return uint32_t((t0 + j) / S::kStages) & 1; };

    // Tile 0: S, softmax, P.
    turn.wait();
    wait_kv(sm.k_full(stage_of(0)), phase_of(0));
    wgmma_fence();
    issue_qk<KvLayout>(s, sm, qb, stage_of(0));
    wgmma_commit();
    turn.pass();
    wgmma_wait<0>();
    fence_operands(s);
    release(sm.k_empty(stage_of(0)));
    softmax_tile(p, variant, w, hk, w.kv.begin, s, st, correction);
    pack_p(s, pf);

    for (int j = 1; j < n; ++j) {
      const int stage = stage_of(j), prev = stage_of(j - 1);
      turn.wait();
      wait_kv(sm.k_full(stage), phase_of(j));
      fence_operands(s);
      wgmma_fence();
      issue_qk<KvLayout>(s, sm, qb, stage);
      wgmma_commit();
      wait_kv(sm.v_full(prev), phase_of(j - 1));
      fence_operands(st.o);
      issue_pv<KvLayout>(st.o, pf, sm, prev);
      wgmma_commit();
      turn.pass();
      wgmma_wait<1>();  // S of tile j is ready; tile j-1's PV may still run
      fence_operands(s);
      release(sm.k_empty(stage));
      softmax_tile(p, variant, w, hk, w.kv.begin + j * KV_TILE, s, st, correction);
      wgmma_wait<0>();
      fence_operands(st.o);
      release(sm.v_empty(prev));
      st.softmax.rescale(reinterpret_cast<float(&)[1][S::kNtO][4]>(st.o), correction);
      pack_p(s, pf);
    }
    release(sm.q_empty(qb));  // every Q K^T of the unit has completed: the next unit's Q may land

    const int last = stage_of(n - 1);
    turn.wait();
    wait_kv(sm.v_full(last), phase_of(n - 1));
    fence_operands(st.o);
    wgmma_fence();
    issue_pv<KvLayout>(st.o, pf, sm, last);
    wgmma_commit();
    turn.pass();
    wgmma_wait<0>();
    fence_operands(st.o);
    release(sm.v_empty(last));
    ps.tiles += n;
  }
};

}  // namespace sm90
}  // namespace fij
