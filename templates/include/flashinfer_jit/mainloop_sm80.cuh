// Mainloop of the FA2-class (sm80+) prefill kernel: one work item's q tile against its KV range.
//
//   - Q tile [CTA_Q packed rows, D] and kStages stages of K/V tiles [KV_TILE, D] in XOR-swizzled
//     shared memory (swizzle.cuh), loaded with cp.async: tiles j+1 .. j+kStages-1 stream in while
//     tile j is computed, one barrier a tile; paged K/V rows go through the page table, read a tile
//     ahead;
//   - each warp owns 16 * kMmaQ rows (decode-sized 16-row tiles: four warps split each tile's keys);
//     S = Q K^T and O += P V with mma.sync m16n8k16 fed by ldmatrix (V through ldmatrix.trans), P
//     kept in registers as the A operand of the second GEMM;
//   - the variant (variant.cuh) decides the visible keys, the mask and any logits / query / key
//     transform (RoPE rotates Q once and each K tile in shared memory, one extra barrier a tile);
//     masks are applied only to tiles that can need them (the KV tail, tiles crossing the range of
//     keys every row sees);
//   - fp32 online softmax in base 2 (softmax.cuh).
#pragma once
#include "flashinfer_jit/gqa.cuh"
#include "flashinfer_jit/mma.cuh"
#include "flashinfer_jit/prefill_params.h"
#include "flashinfer_jit/quant.cuh"
#include "flashinfer_jit/score_mask.cuh"
#include "flashinfer_jit/softmax.cuh"
#include "flashinfer_jit/swizzle.cuh"
#include "flashinfer_jit/tile_scheduler.cuh"
#include "flashinfer_jit/variant.cuh"

// Tuning switches (experiments pass them through FLASHINFER_JIT_EXTRA_CUDAFLAGS, which is part of
// the cache key): K/V pipeline depth (0: by shape) and skipping the O rescale when no row maximum moved.
#ifndef FIJ_KV_STAGES
#define FIJ_KV_STAGES 0
#endif
#ifndef FIJ_LAZY_RESCALE  // 1 on, 0 off, -1: on for head_dim >= 128 (at 64 the vote costs more than it saves)
#define FIJ_LAZY_RESCALE -1
#endif
// Decode tiles (four warps splitting each KV tile's keys): each warp widens (fp8) or transforms (RoPE)
// only its own keys, with warp barriers (0: the CTA does the whole tile, a CTA barrier; off until it
// has run on a GPU: benchmarks/decode_ab.sh).
#ifndef FIJ_DECODE_WARP_LOCAL
#define FIJ_DECODE_WARP_LOCAL 0
#endif

namespace fij {

template <int HEAD_DIM, int CTA_Q, int KV_TILE>
struct PrefillShape {
  static constexpr int kMmaQ = (HEAD_DIM == 256 || CTA_Q <= 64) ? 1 : 2;  // m16 tiles per warp
  static constexpr int kWarpsQ = CTA_Q / (16 * kMmaQ);  // warps along the q rows
  // Decode-sized tiles (16 packed rows): four warps split each KV tile's keys instead of the rows,
  // so a tile costs a quarter of the MMAs of a 64-row tile; their states merge in the epilogue.
  static constexpr int kWarpsKV = CTA_Q == 16 ? 4 : 1;
  static constexpr int kWarps = kWarpsQ * kWarpsKV;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kKeysPerWarp = KV_TILE / kWarpsKV;
  static constexpr int kChunks = HEAD_DIM / 8;      // 16-byte chunks per row
  static constexpr int kNtS = kKeysPerWarp / 8;     // n8 tiles of a warp's S
  static constexpr int kNtO = HEAD_DIM / 8;         // n8 tiles of O
  static constexpr int kKsQK = HEAD_DIM / 16;       // k16 steps of Q K^T
  static constexpr int kKsPV = kKeysPerWarp / 16;   // k16 steps of P V
  // Q, then kStages stages of (K, V): tiles j+1 .. j+kStages-1 stream in while tile j is computed,
  // one barrier a tile. Three stages where two CTAs per SM still fit (the small-q / decode tiles:
  // more bytes in flight), else two.
  static constexpr int kStages =
      FIJ_KV_STAGES > 0 ? FIJ_KV_STAGES : ((CTA_Q <= 64 && HEAD_DIM <= 128) ? 3 : 2);
  static_assert(kStages >= 2, "the pipeline needs at least two K/V stages");
  static constexpr bool kLazyRescale = FIJ_LAZY_RESCALE < 0 ? HEAD_DIM >= 128 : FIJ_LAZY_RESCALE != 0;
  // Epilogue of a KV-split tile: each warp's unnormalised O rows (fp32, rows padded by 8 floats
  // against bank conflicts), then its row maxima and sums; overlays the K/V tiles (MainloopSm80).
  static constexpr int kMergeRowFloats = HEAD_DIM + 8;
  static constexpr int kMergeBytes = kWarpsKV > 1 ? kWarpsKV * CTA_Q * (kMergeRowFloats + 2) * 4 : 0;
  static_assert(kWarpsQ >= 1 && kWarpsQ * 16 * kMmaQ == CTA_Q, "bad CTA_Q");
  static_assert(kKeysPerWarp % 16 == 0, "each warp needs whole k16 steps of keys");
};

// Where a thread's mma fragments sit: its warp's rows and keys, and its lane within the quad.
template <typename S>
struct FragmentCoords {
  int warp_kv;    // which key slice of the tile (KV-split warps), else 0
  int warp_row0;  // first tile row of the warp
  int warp_key0;  // first key of the warp within a KV tile
  int lane_g;     // lane / 4: row within an 8-row half of an m16 tile
  int lane_t;     // lane % 4: column pair within an n8 tile

  __device__ __forceinline__ static FragmentCoords of(int tid) {
    const int warp = tid / 32, lane = tid % 32;
    const int warp_q = warp % S::kWarpsQ;
    FragmentCoords c;
    c.warp_kv = warp / S::kWarpsQ;
    c.warp_row0 = warp_q * 16 * S::kMmaQ;
    c.warp_key0 = c.warp_kv * S::kKeysPerWarp;
    c.lane_g = lane / 4;
    c.lane_t = lane % 4;
    return c;
  }
  // Tile row of fragment row (mi, h).
  __device__ __forceinline__ int row(int mi, int h) const { return warp_row0 + mi * 16 + lane_g + 8 * h; }
};

// Streams K or V tiles of ROWS rows of one KV head into shared memory laid out as `Tile` (the
// swizzled 16-bit tiles, or fp8 staging tiles: LinearTile), from global elements of type TE. Each
// thread copies one fixed 16-byte column chunk of rows r0, r0 + R, ... (R = THREADS / chunks per row)
// through a pointer that advances by one tile per load, so a tile costs a few instructions per copy.
template <typename TE, typename Tile, int ROWS, int THREADS>
struct KVTileLoader {
  using T = TE;
  static constexpr int kChunks = Tile::kChunks;
  static constexpr int kChunkElems = 16 / int(sizeof(TE));
  static constexpr int R = THREADS / kChunks;
  static_assert((ROWS * kChunks) % THREADS == 0 && THREADS % kChunks == 0 && ROWS % R == 0, "uneven tile split");
  static_assert(R % 8 == 0 || R == 4, "swizzle stepping assumes R is 4 or a multiple of 8");
  const T* ptr;      // this thread's chunk of row (first row of the next tile + r0)
  int64_t row_step;  // R rows, in elements
  uint32_t smem_off; // byte offset of (r0, chunk) in a tile
  int r0;

  __device__ __forceinline__ KVTileLoader(const T* base, int64_t first_row, int head, int64_t stride_n,
                                          int64_t stride_h) {
    const int chunk = threadIdx.x % kChunks;
    r0 = threadIdx.x / kChunks;
    ptr = base + (first_row + r0) * stride_n + int64_t(head) * stride_h + chunk * kChunkElems;
    row_step = R * stride_n;
    smem_off = Tile::byte_offset(r0, chunk);
  }

  // Load the next tile (rows with index >= `remaining` are zero-filled) and advance.
  __device__ __forceinline__ void load(uint32_t smem_tile, int remaining, const T* fallback) {
#pragma unroll
    for (int it = 0; it < ROWS / R; ++it) {
      // Row r0 + it * R: its swizzle differs from r0's by XOR with (it * R) % 8 (0 or 4 here).
      const uint32_t dst = Tile::xor_chunks(smem_tile + smem_off + it * R * Tile::kRowBytes, (it * R) & 7);
      const bool valid = r0 + it * R < remaining;
      cp_async_16(dst, valid ? ptr + it * row_step : fallback, valid);
    }
    ptr += (ROWS / R) * row_step;
  }
};

// Paged K/V: the same copy pattern, each row's address looked up through the page table. The
// page-table reads for the next tile are issued one tile ahead (fetch), so their latency hides
// behind a tile of compute instead of stalling the copy issue.
//
// ALIGNED (chosen at launch): the page size divides the KV tile (a power of two) or is a multiple
// of it, so a tile starts page-aligned or lies inside one page: a row's page slot and in-page
// position are the tile's plus a shift and a mask of its row number (no division per row) and the
// in-page offset fits 32 bits. Other page sizes divide per row.
template <typename TE, typename Tile, int ROWS, int THREADS, bool ALIGNED>
struct PagedKVTileLoader {
  using T = TE;
  static constexpr int kChunks = Tile::kChunks;
  static constexpr int kChunkElems = 16 / int(sizeof(TE));
  static constexpr int R = THREADS / kChunks;
  static constexpr int kIters = ROWS / R;
  static_assert((ROWS * kChunks) % THREADS == 0 && THREADS % kChunks == 0 && ROWS % R == 0, "uneven tile split");
  const int32_t* pages;  // this request's page indices
  int64_t head_chunk;    // head * stride_h + chunk * 8
  uint32_t smem_off;
  int r0;
  int next_page[kIters];  // pages of this thread's rows of the tile that load_kv copies next

  __device__ __forceinline__ PagedKVTileLoader(const int32_t* request_pages, int head, int64_t stride_h) {
    const int chunk = threadIdx.x % kChunks;
    r0 = threadIdx.x / kChunks;
    pages = request_pages;
    head_chunk = int64_t(head) * stride_h + chunk * kChunkElems;
    smem_off = Tile::byte_offset(r0, chunk);
  }

  __device__ __forceinline__ static uint32_t page_slot(uint32_t pos, const PrefillParams& p) {
    return (__umulhi(pos, p.page_div_mul) + pos) >> p.page_div_shift;
  }

  // Read the page table for rows [pos0, pos0 + ROWS) (those below `remaining`).
  __device__ __forceinline__ void fetch(int pos0, int remaining, const PrefillParams& p) {
    const int tile_slot = ALIGNED ? int(page_slot(uint32_t(pos0), p)) : 0;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int row = r0 + it * R;
      const int slot = ALIGNED ? tile_slot + (row >> p.page_row_shift) : int(page_slot(uint32_t(pos0 + row), p));
      next_page[it] = row < remaining ? pages[slot] : 0;
    }
  }

  // Copy K and V rows [pos0, pos0 + ROWS) (fetched before); rows >= `remaining` are zero-filled.
  __device__ __forceinline__ void load_kv(uint32_t k_tile, uint32_t v_tile, const T* k_base, const T* v_base,
                                          int pos0, int remaining, const PrefillParams& p) {
    // ALIGNED: the tile's position inside its page (0 unless the page is longer than the tile).
    const int tile_pos = ALIGNED ? pos0 - int(page_slot(uint32_t(pos0), p)) * p.page_size : 0;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int row = r0 + it * R;
      const bool valid = row < remaining;
      int64_t offset;
      if constexpr (ALIGNED) {
        const int in_page = int(head_chunk) + (tile_pos + (row & p.page_row_mask)) * int(p.k_stride_n);
        offset = int64_t(next_page[it]) * int(p.stride_page) + in_page;
      } else {
        const uint32_t pos = uint32_t(pos0 + row);
        const int in_page = int(pos - page_slot(pos, p) * uint32_t(p.page_size));
        offset = int64_t(next_page[it]) * p.stride_page + int64_t(in_page) * p.k_stride_n + head_chunk;
      }
      offset = valid ? offset : 0;
      const uint32_t dst = Tile::xor_chunks(smem_off + it * R * Tile::kRowBytes, (it * R) & 7);
      cp_async_16(k_tile + dst, k_base + offset, valid);
      cp_async_16(v_tile + dst, v_base + offset, valid);
    }
  }
};

// TKV: the K/V storage type, T (16-bit) or fp8 (quant.cuh): fp8 tiles are copied into staging tiles and
// widened (in registers, conversions two values at a time) into one 16-bit K and V tile per KV tile
// that the tensor cores read (an extra barrier a tile; decode tiles: see kWarpLocal), with k_scale
// applied to the logits in float32 (folded into the softmax's exp2 factor, or a multiply before a
// variant's logits transform) and v_scale to the output. (Folding k_scale into the 16-bit Q
// would round q * k_scale to bf16: LSE errors of 1e-2 at logits of a few units, measured on the H100.)
template <typename T, int HEAD_DIM, int CTA_Q, int KV_TILE, typename Variant, bool PAGED, bool ALIGNED_PAGES,
          typename TKV = T>
struct MainloopSm80 {
  using S = PrefillShape<HEAD_DIM, CTA_Q, KV_TILE>;
  using Tile = SwizzledTile<HEAD_DIM>;
  using Coords = FragmentCoords<S>;
  static constexpr int MQ = S::kMmaQ;
  using Softmax = OnlineSoftmax<T, MQ, S::kNtS, S::kNtO, S::kLazyRescale>;
  static constexpr bool kFp8 = KvStorage<TKV>::kFp8;
  static_assert(kFp8 || sizeof(TKV) == sizeof(T), "K/V are stored as the query type or as fp8");
  // The layout the K/V tiles land in: the swizzled 16-bit tiles ldmatrix reads, or fp8 staging rows.
  using StageTile = typename Select<kFp8, LinearTile<HEAD_DIM * int(sizeof(TKV))>, Tile>::type;
  static constexpr int kStage = KV_TILE * HEAD_DIM;  // elements of one K (or V) tile
  static constexpr uint32_t kStageBytes = kStage * int(sizeof(TKV));  // one landed (staged) tile
  static constexpr uint32_t kTileBytes = kStage * int(sizeof(T));     // one 16-bit tile
  // Decode tiles (KV-split warps): each warp reads only its own keys, so it alone widens or transforms
  // them, with warp barriers. fp8 (kWarpWiden): K and then V into the same rows of one 16-bit tile.
  // Decode is bound by the bytes in flight per SM (fp8 tiles are half as big for the same latency), so
  // the tile saved buys deeper staging.
  static constexpr bool kWarpLocal = S::kWarpsKV > 1 && FIJ_DECODE_WARP_LOCAL != 0;
  static constexpr bool kWarpWiden = kFp8 && kWarpLocal;
  static constexpr int kWidenedTiles = kFp8 ? (kWarpWiden ? 1 : 2) : 0;
  static constexpr int kFixedBytes = (CTA_Q * HEAD_DIM + kWidenedTiles * kStage) * int(sizeof(T));
  // Stages: 16-bit K/V and fp8 prefill tiles by shape (PrefillShape); fp8 decode tiles as many as keep
  // two CTAs an SM (113 KB each on sm90), at most 5.
  static constexpr int kTwoCtaSmemBytes = 113 * 1024;
  static constexpr int clamp_stages(int n) { return n < 2 ? 2 : n > 5 ? 5 : n; }
  static constexpr int kStages =
      FIJ_KV_STAGES > 0 || !kWarpWiden
          ? S::kStages
          : clamp_stages((kTwoCtaSmemBytes - kFixedBytes) / (2 * int(kStageBytes)));

  // What the mainloop leaves for the epilogue: unnormalised O, the softmax statistics, and the factor
  // the normalized output takes (fp8 caches' v_scale, else 1).
  struct State {
    float o[MQ][S::kNtO][4];
    Softmax softmax;
    float out_scale;  // fp8 caches' v_scale (else 1)
  };

  // fp8 caches' k_scale: a Python float in the params, times a one-element device tensor's value if given.
  __device__ __forceinline__ static float k_scale(const PrefillParams& p) {
    return p.k_scale * (p.k_scale_ptr != nullptr ? __ldg(p.k_scale_ptr) : 1.f);
  }
  // The factor exp2 applies to the scores (softmax and LSE): the variant's, times k_scale for fp8 K
  // without a logits transform (the running maximum may stay over raw logits: k_scale > 0).
  __device__ __forceinline__ static float score_scale(const PrefillParams& p, const Variant& variant) {
    if constexpr (kFp8 && !Variant::kTransformsLogits)
      return variant.softmax_scale_log2() * k_scale(p);
    else
      return variant.softmax_scale_log2();
  }

  // Shared memory: Q, then kStages K tiles, then kStages V tiles (16-bit K/V); fp8: Q, one 16-bit K
  // and V tile (kWarpWiden: one tile for both), then kStages fp8 K and V staging tiles. k_smem .. the
  // end also holds the epilogue's KV-split merge buffer.
  __device__ __forceinline__ static T* q_smem(uint8_t* smem) { return reinterpret_cast<T*>(smem); }
  __device__ __forceinline__ static T* k_smem(uint8_t* smem) { return q_smem(smem) + CTA_Q * HEAD_DIM; }
  __device__ __forceinline__ static T* v_smem(uint8_t* smem) {
    return k_smem(smem) + (kFp8 ? kWidenedTiles - 1 : kStages) * kStage;
  }
  __device__ __forceinline__ static TKV* staged_k(uint8_t* smem) {
    return kFp8 ? reinterpret_cast<TKV*>(k_smem(smem) + kWidenedTiles * kStage) : reinterpret_cast<TKV*>(k_smem(smem));
  }
  __device__ __forceinline__ static TKV* staged_v(uint8_t* smem) { return staged_k(smem) + kStages * kStage; }
  static constexpr int kSmemBytes = kFixedBytes + 2 * kStages * int(kStageBytes);
  static_assert(S::kMergeBytes <= kSmemBytes - CTA_Q * HEAD_DIM * int(sizeof(T)),
                "the KV-split merge buffer must fit past Q");
  static_assert(!kWarpWiden || kSmemBytes <= kTwoCtaSmemBytes, "fp8 decode tiles: two CTAs an SM");

  // Q tile (packed rows -> (token, head)); rows past the tile's end are zero.
  __device__ __forceinline__ static void load_q(const PrefillParams& p, const WorkTile& w, int hk, T* sQ) {
    static_assert((CTA_Q * Tile::kChunks) % S::kThreads == 0, "Q tile chunks must split evenly");
    const T* q_base = static_cast<const T*>(p.q);
#pragma unroll
    for (int it = 0; it < CTA_Q * Tile::kChunks / S::kThreads; ++it) {
      const int i = threadIdx.x + it * S::kThreads;
      const int row = i / Tile::kChunks, chunk = i % Tile::kChunks;
      const bool valid = row < w.rows;
      const PackedRow pr = unpack_row(w.row_begin + row, p.group, hk);
      const T* src =
          valid ? q_base + (w.q_start + pr.token) * p.q_stride_n + int64_t(pr.head) * p.q_stride_h + chunk * 8 : q_base;
      cp_async_16(smem_addr(sQ + Tile::offset(row, chunk)), src, valid);
    }
  }

  // Query / key transforms of the variant (RoPE), in shared memory once the tile has landed: each
  // thread takes 8 dims of the first half of a row and the same 8 of the second half (rotate-half
  // pairs). S::kThreads is a multiple of the half-row chunks, so a thread's dims stay fixed: its
  // transform state (the variant's QKState: RoPE frequencies) is built once.
  static constexpr int kHalfChunks = Tile::kChunks / 2;
  static_assert(S::kThreads % kHalfChunks == 0, "a thread's transform dims must stay fixed");
  __device__ __forceinline__ static int transform_dim0() { return (threadIdx.x % kHalfChunks) * 8; }

  template <typename QKState>
  __device__ __forceinline__ static void transform_q(const PrefillParams& p, const Variant& variant, const QKState& qk,
                                                     const WorkTile& w, int hk, T* sQ) {
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    const int chunk = threadIdx.x % kHalfChunks;
    for (int row = threadIdx.x / kHalfChunks; row < w.rows; row += S::kThreads / kHalfChunks) {
      const PackedRow pr = unpack_row(w.row_begin + row, p.group, hk);
      T* lo_ptr = sQ + Tile::offset(row, chunk);
      T* hi_ptr = sQ + Tile::offset(row, chunk + kHalfChunks);
      float lo[8], hi[8];
      load8(lo_ptr, lo);
      load8(hi_ptr, hi);
      variant.transform_query(qk, lo, hi, pr.token, pr.head, w);
      store8(lo_ptr, lo);
      store8(hi_ptr, hi);
    }
    __syncthreads();
  }

  // Keys [pos0 + row0, pos0 + row0 + ROWS) (those before kv_end) of the K tile at sK, in place, by
  // THREADS threads (the CTA, or the caller's warp: kWarpLocal); the callers' barriers make the tile
  // visible before and publish the transformed keys after.
  template <int ROWS, int THREADS, typename QKState>
  __device__ __forceinline__ static void transform_k(const Variant& variant, const QKState& qk, const WorkTile& w,
                                                     int hk, int pos0, int kv_end, T* sK, int row0) {
    const int tid = threadIdx.x % THREADS;
    const int chunk = tid % kHalfChunks;
    const int rows = min(row0 + ROWS, kv_end - pos0);
#pragma unroll 2
    for (int row = row0 + tid / kHalfChunks; row < rows; row += THREADS / kHalfChunks) {
      T* lo_ptr = sK + Tile::offset(row, chunk);
      T* hi_ptr = sK + Tile::offset(row, chunk + kHalfChunks);
      float lo[8], hi[8];
      load8(lo_ptr, lo);
      load8(hi_ptr, hi);
      variant.transform_key(qk, lo, hi, pos0 + row, hk, w);
      store8(lo_ptr, lo);
      store8(hi_ptr, hi);
    }
  }

  // fp8: rows [row0, row0 + ROWS) of the staged K and / or V tiles of keys [pos0, pos0 + KV_TILE)
  // widened into the 16-bit tiles sK, sV (K: the variant's key transform applied on the way) by THREADS
  // threads (the CTA, or the caller's warp: kWarpLocal). Rows past the KV
  // range were zero-filled by the copy and stay zero. The callers' barriers make the staged rows visible
  // before and publish the widened ones after. A thread's dims are transform_dim0()'s.
  static_assert(32 % kHalfChunks == 0, "a lane's widened dims must be the thread's transform dims");
  template <bool WIDEN_K, bool WIDEN_V, int ROWS, int THREADS, typename QKState>
  __device__ __forceinline__ static void widen(const Variant& variant, const QKState& qk, const WorkTile& w, int hk,
                                               int pos0, const TKV* staged_k_tile, const TKV* staged_v_tile, T* sK,
                                               T* sV, int row0) {
    const int tid = threadIdx.x % THREADS;  // (threadIdx.x itself, not a caller's copy: no spill at 128 rows)
    const int chunk = tid % kHalfChunks;
    constexpr int kHalf = HEAD_DIM / 2;
#pragma unroll 2
    for (int row = row0 + tid / kHalfChunks; row < row0 + ROWS; row += THREADS / kHalfChunks) {
      float lo[8], hi[8];
      if constexpr (WIDEN_K) {
        widen8(staged_k_tile + row * HEAD_DIM + chunk * 8, lo);
        widen8(staged_k_tile + row * HEAD_DIM + kHalf + chunk * 8, hi);
        if constexpr (Variant::kTransformsKey) variant.transform_key(qk, lo, hi, pos0 + row, hk, w);
        store8(sK + Tile::offset(row, chunk), lo);
        store8(sK + Tile::offset(row, chunk + kHalfChunks), hi);
      }
      if constexpr (WIDEN_V) {
        widen8(staged_v_tile + row * HEAD_DIM + chunk * 8, lo);
        widen8(staged_v_tile + row * HEAD_DIM + kHalf + chunk * 8, hi);
        store8(sV + Tile::offset(row, chunk), lo);
        store8(sV + Tile::offset(row, chunk + kHalfChunks), hi);
      }
    }
  }

  __device__ __forceinline__ static void run(const PrefillParams& p, const Variant& variant, const WorkTile& w,
                                             int hk, uint8_t* smem, State& st) {
    T* sQ = q_smem(smem);
    const TKV* k_base = static_cast<const TKV*>(p.k);
    const TKV* v_base = static_cast<const TKV*>(p.v);
    load_q(p, w, hk, sQ);
    const auto qk_state = variant.qk_state(transform_dim0());
    st.out_scale = kFp8 ? p.v_scale * (p.v_scale_ptr != nullptr ? __ldg(p.v_scale_ptr) : 1.f) : 1.f;
    // fp8 with a logits transform: k_scale multiplies the raw logits before it
    const float logit_scale = kFp8 && Variant::kTransformsLogits ? k_scale(p) : 1.f;
    // fp8 without a query transform passes over Q too (it changes nothing): without the pass, ptxas
    // spills a page pointer in the loop of the 128-row paged fp8 kernel (nvcc 13.0, measured in the SASS).
    if constexpr (Variant::kTransformsQuery || kFp8) transform_q(p, variant, qk_state, w, hk, sQ);

    const int kv_lo = w.kv.begin, kv_hi = w.kv.end;
    // K/V tile loads: load_tile(stage, first row) — ragged rows are contiguous per KV head (pointer
    // stepping), paged rows go through the page table (read one tile ahead).
    using Ragged = KVTileLoader<TKV, StageTile, KV_TILE, S::kThreads>;
    using Paged = PagedKVTileLoader<TKV, StageTile, KV_TILE, S::kThreads, ALIGNED_PAGES>;
    Ragged k_loader(k_base, PAGED ? 0 : w.kv_start + kv_lo, hk, p.k_stride_n, p.k_stride_h);
    Ragged v_loader(v_base, PAGED ? 0 : w.kv_start + kv_lo, hk, p.v_stride_n, p.v_stride_h);
    Paged paged(PAGED ? p.page_indices + w.page_start : nullptr, hk, p.k_stride_h);
    // The tiles the tensor cores read (sK_addr, sV_addr: the stages, or fp8's one widened tile) and the
    // ones the copies land in (the same stages, or fp8's staging tiles).
    const uint32_t sK_addr = smem_addr(k_smem(smem)), sV_addr = smem_addr(v_smem(smem));
    const uint32_t landK_addr = smem_addr(staged_k(smem)), landV_addr = smem_addr(staged_v(smem));
    auto load_tile = [&](int stage_index, int pos0) {
      if constexpr (PAGED) {
        paged.load_kv(landK_addr + stage_index * kStageBytes, landV_addr + stage_index * kStageBytes, k_base,
                      v_base, pos0, kv_hi - pos0, p);
        paged.fetch(pos0 + KV_TILE, kv_hi - pos0 - KV_TILE, p);
      } else {
        k_loader.load(landK_addr + stage_index * kStageBytes, kv_hi - pos0, k_base);
        v_loader.load(landV_addr + stage_index * kStageBytes, kv_hi - pos0, v_base);
      }
    };
    if constexpr (PAGED) paged.fetch(kv_lo, kv_hi - kv_lo, p);
    // Prologue: tiles 0 .. kStages-2, one commit group each (the first also holds Q).
#pragma unroll
    for (int t = 0; t < kStages - 1; ++t) {
      if (kv_lo + t * KV_TILE < kv_hi) load_tile(t, kv_lo + t * KV_TILE);
      cp_async_commit();
    }

#pragma unroll
    for (int mi = 0; mi < MQ; ++mi)
#pragma unroll
      for (int nt = 0; nt < S::kNtO; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) st.o[mi][nt][e] = 0.f;
    st.softmax.init();
    const float scale = score_scale(p, variant);
    const Coords c = Coords::of(threadIdx.x);
    const int lane = threadIdx.x % 32;
    // ldmatrix addresses: every row a lane addresses has row % 8 == lane % 8 (warp rows and keys
    // start at multiples of 8), so k16 steps (two chunks) enter as Tile::xor_chunks(addr, 2 * step).
    const uint32_t q_frag = smem_addr(sQ) + Tile::byte_offset(c.warp_row0 + lane % 16, lane / 16);
    const uint32_t k_frag = sK_addr + Tile::byte_offset(c.warp_key0 + (lane / 16) * 8 + lane % 8, (lane / 8) & 1);
    const uint32_t v_frag = sV_addr + Tile::byte_offset(c.warp_key0 + lane % 16, lane / 16);
    constexpr int kRowBytes = Tile::kRowBytes;

    int stage = 0;
    for (int pos0 = kv_lo; pos0 < kv_hi; pos0 += KV_TILE, stage = stage + 1 == kStages ? 0 : stage + 1) {
      // One barrier per tile: after it, tile j (commit group j) is visible to every thread, and every
      // warp is done with tile j-1, whose stage now receives tile j + kStages - 1.
      cp_async_wait<kStages - 2>();
      __syncthreads();
      {
        const int next = pos0 + (kStages - 1) * KV_TILE;
        const int next_stage = stage == 0 ? kStages - 1 : stage - 1;
        if (next < kv_hi) load_tile(next_stage, next);
        cp_async_commit();  // possibly empty: keeps one group per tile for the wait count above
      }
      if constexpr (kWarpWiden) {  // this warp's keys of K; V follows the Q K^T MMAs into the same rows
        widen<true, false, S::kKeysPerWarp, 32>(variant, qk_state, w, hk, pos0, staged_k(smem) + stage * kStage,
                                                nullptr, k_smem(smem), nullptr, c.warp_key0);
        __syncwarp();
      } else if constexpr (kFp8) {  // the whole tile's K and V, by the CTA
        widen<true, true, KV_TILE, S::kThreads>(variant, qk_state, w, hk, pos0, staged_k(smem) + stage * kStage,
                                                staged_v(smem) + stage * kStage, k_smem(smem), v_smem(smem), 0);
        __syncthreads();
      } else if constexpr (Variant::kTransformsKey && kWarpLocal) {  // this warp's keys
        // (p.keys_rotated: only sm90 plans have the launcher rotate K, so no run-time skip here)
        transform_k<S::kKeysPerWarp, 32>(variant, qk_state, w, hk, pos0, kv_hi, k_smem(smem) + stage * kStage,
                                         c.warp_key0);
        __syncwarp();
      } else if constexpr (Variant::kTransformsKey) {
        transform_k<KV_TILE, S::kThreads>(variant, qk_state, w, hk, pos0, kv_hi, k_smem(smem) + stage * kStage, 0);
        __syncthreads();
      }
      const uint32_t stage_bytes = kFp8 ? 0u : stage * kTileBytes;

      float s[MQ][S::kNtS][4];
#pragma unroll
      for (int mi = 0; mi < MQ; ++mi)
#pragma unroll
        for (int nt = 0; nt < S::kNtS; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mi][nt][e] = 0.f;
#pragma unroll
      for (int ks = 0; ks < S::kKsQK; ++ks) {
        uint32_t a[MQ][4];
#pragma unroll
        for (int mi = 0; mi < MQ; ++mi) ldmatrix_x4(a[mi], Tile::xor_chunks(q_frag, 2 * ks) + mi * 16 * kRowBytes);
#pragma unroll
        for (int nb = 0; nb < S::kNtS / 2; ++nb) {
          uint32_t b[4];
          ldmatrix_x4(b, Tile::xor_chunks(k_frag + stage_bytes, 2 * ks) + nb * 16 * kRowBytes);
#pragma unroll
          for (int mi = 0; mi < MQ; ++mi) {
            mma_16816<T>(s[mi][2 * nb], a[mi], b[0], b[1]);
            mma_16816<T>(s[mi][2 * nb + 1], a[mi], b[2], b[3]);
          }
        }
      }

      if constexpr (kWarpWiden) {
        __syncwarp();  // every lane's K fragments are read before V lands on the same rows
        widen<false, true, S::kKeysPerWarp, 32>(variant, qk_state, w, hk, pos0, nullptr,
                                                staged_v(smem) + stage * kStage, nullptr, v_smem(smem), c.warp_key0);
        __syncwarp();
      }
      if constexpr (kFp8 && Variant::kTransformsLogits) {
#pragma unroll
        for (int mi = 0; mi < MQ; ++mi)
#pragma unroll
          for (int nt = 0; nt < S::kNtS; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[mi][nt][e] *= logit_scale;
      }
      score_and_mask(p, variant, w, hk, c, pos0, s);
      uint32_t p_frag[MQ][S::kNtS][2];
      st.softmax.update(s, p_frag, st.o, scale);

#pragma unroll
      for (int ks = 0; ks < S::kKsPV; ++ks) {
        uint32_t a[MQ][4];
#pragma unroll
        for (int mi = 0; mi < MQ; ++mi) {
          a[mi][0] = p_frag[mi][2 * ks][0];
          a[mi][1] = p_frag[mi][2 * ks][1];
          a[mi][2] = p_frag[mi][2 * ks + 1][0];
          a[mi][3] = p_frag[mi][2 * ks + 1][1];
        }
#pragma unroll
        for (int dn = 0; dn < S::kNtO / 2; ++dn) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, Tile::xor_chunks(v_frag + stage_bytes, 2 * dn) + ks * 16 * kRowBytes);
#pragma unroll
          for (int mi = 0; mi < MQ; ++mi) {
            mma_16816<T>(st.o[mi][2 * dn], a[mi], b[0], b[1]);
            mma_16816<T>(st.o[mi][2 * dn + 1], a[mi], b[2], b[3]);
          }
        }
      }
    }
    cp_async_wait<0>();  // an empty KV range still issued the Q/K/V group
  }

  // The variant's logits transform, then its mask (score_mask.cuh).
  __device__ __forceinline__ static void score_and_mask(const PrefillParams& p, const Variant& variant,
                                                        const WorkTile& w, int hk, const Coords& c, int pos0,
                                                        float (&s)[MQ][S::kNtS][4]) {
    PackedRow rows[MQ][2];
#pragma unroll
    for (int mi = 0; mi < MQ; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) rows[mi][h] = unpack_row(w.row_begin + c.row(mi, h), p.group, hk);
    score_and_mask_fragments<Variant, KV_TILE>(variant, w, rows, pos0, pos0 + c.warp_key0 + 2 * c.lane_t, s);
  }
};

}  // namespace fij
