// Batch prefill attention over ragged (and, through KVAddress, paged) KV: FA2-class kernel.
//
// One CTA runs one work item (request, packed q tile, KV chunk) for one KV head:
//   - Q tile [CTA_Q packed rows, D] and two stages of K/V tiles [KV_TILE, D] in XOR-swizzled shared
//     memory, loaded with cp.async: tile j+1 streams in while tile j is computed (one barrier a tile);
//   - each warp owns 16 * MMA_Q rows; S = Q K^T and O += P V with mma.sync m16n8k16 fed by
//     ldmatrix (V through ldmatrix.trans), P kept in registers as the A operand of the second GEMM;
//   - fp32 online softmax in base 2 with sm_scale * log2(e) folded into one FFMA before exp2;
//   - masks only where needed: the KV tail tile and, when causal, tiles crossing the diagonal
//     (bottom-right aligned: query i sees keys j <= kv_len - q_len + i).
// Rows that see no key produce O = 0 and LSE = -inf.
#pragma once
#include "flashinfer_jit/mma.cuh"
#include "flashinfer_jit/prefill_params.h"
#include "flashinfer_jit/variant.cuh"

// Tuning switches (experiments pass them through FLASHINFER_JIT_EXTRA_CUDAFLAGS, which is part of
// the cache key): K/V pipeline depth (0: by shape) and skipping the O rescale when no row maximum moved.
#ifndef FIJ_KV_STAGES
#define FIJ_KV_STAGES 0
#endif
#ifndef FIJ_LAZY_RESCALE  // 1 on, 0 off, -1: on for head_dim >= 128 (at 64 the vote costs more than it saves)
#define FIJ_LAZY_RESCALE -1
#endif

namespace fij {

#ifdef FIJ_TRACE
// Diagnostics only (FLASHINFER_JIT_EXTRA_CUDAFLAGS=-DFIJ_TRACE, a separate cache entry): every CTA
// records {global-timer start, main loop end, merge start (0: none), end, SM id, work item or -1}
// into the buffer given to <prefix>_set_trace, 8 x uint64 per CTA, so a script can see placement,
// skew and the tail.
__device__ unsigned long long* g_trace = nullptr;
struct TraceScope {
  unsigned long long start, loop_end = 0, merge_begin = 0;
  long long item = -1;
  __device__ __forceinline__ static unsigned long long now() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
  }
  __device__ __forceinline__ TraceScope() : start(now()) {}
  __device__ __forceinline__ ~TraceScope() {
    if (threadIdx.x != 0 || g_trace == nullptr) return;
    unsigned sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    unsigned long long* slot = g_trace + 8 * uint64_t(blockIdx.x);
    slot[0] = start;
    slot[1] = loop_end;
    slot[2] = merge_begin;
    slot[3] = now();
    slot[4] = sm;
    slot[5] = static_cast<unsigned long long>(item);
  }
};
#define FIJ_TRACE_SCOPE(item_expr) ::fij::TraceScope fij_trace_scope; fij_trace_scope.item = (item_expr)
#define FIJ_TRACE_MARK(field) fij_trace_scope.field = ::fij::TraceScope::now()
#else
#define FIJ_TRACE_SCOPE(item_expr) (void)0
#define FIJ_TRACE_MARK(field) (void)0
#endif


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
  // Epilogue of a KV-split tile: each warp's unnormalised O rows (fp32, rows padded by 8 floats
  // against bank conflicts), then its row maxima and sums; overlays the K/V stages.
  static constexpr int kMergeRowFloats = HEAD_DIM + 8;
  static constexpr int kMergeBytes = kWarpsKV > 1 ? kWarpsKV * CTA_Q * (kMergeRowFloats + 2) * 4 : 0;
  template <typename T>
  static constexpr int smem_bytes() { return (CTA_Q + 2 * kStages * KV_TILE) * HEAD_DIM * int(sizeof(T)); }
  static_assert(kWarpsQ >= 1 && kWarpsQ * 16 * kMmaQ == CTA_Q, "bad CTA_Q");
  static_assert(kKeysPerWarp % 16 == 0, "each warp needs whole k16 steps of keys");
  static_assert(kMergeBytes <= 2 * kStages * KV_TILE * HEAD_DIM * 2, "merge buffer must fit in the K/V stages");
};

// Streams K or V tiles of ROWS rows of one KV head into shared memory. Each thread copies one fixed
// 16-byte column chunk of rows r0, r0 + R, ... (R = THREADS / chunks per row) through a pointer that
// advances by one tile per load, so a tile costs a few instructions per 16-byte copy.
template <typename T, int HEAD_DIM, int ROWS, int THREADS>
struct KVTileLoader {
  static constexpr int kChunks = HEAD_DIM / 8;
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
    ptr = base + (first_row + r0) * stride_n + int64_t(head) * stride_h + chunk * 8;
    row_step = R * stride_n;
    smem_off = uint32_t((r0 * HEAD_DIM + ((chunk ^ (r0 & 7)) << 3)) * int(sizeof(T)));
  }

  // Load the next tile (rows with index >= `remaining` are zero-filled) and advance.
  __device__ __forceinline__ void load(uint32_t smem_tile, int remaining, const T* fallback) {
#pragma unroll
    for (int it = 0; it < ROWS / R; ++it) {
      // Adding it * R to r0 changes r0 % 8 by XOR with (it * R) % 8 (0 or 4 here): the swizzle steps
      // by a constant.
      const uint32_t dst = (smem_tile + smem_off + it * R * HEAD_DIM * int(sizeof(T))) ^ (((it * R) & 7) << 4);
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
template <typename T, int HEAD_DIM, int ROWS, int THREADS, bool ALIGNED>
struct PagedKVTileLoader {
  static constexpr int kChunks = HEAD_DIM / 8;
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
    head_chunk = int64_t(head) * stride_h + chunk * 8;
    smem_off = uint32_t((r0 * HEAD_DIM + ((chunk ^ (r0 & 7)) << 3)) * int(sizeof(T)));
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
      const uint32_t dst = (smem_off + it * R * HEAD_DIM * int(sizeof(T))) ^ (((it * R) & 7) << 4);
      cp_async_16(k_tile + dst, k_base + offset, valid);
      cp_async_16(v_tile + dst, v_base + offset, valid);
    }
  }
};

// Merge the partial states of a split q tile (packed rows [0, rows) of `item`'s tile, KV head hk);
// run by the tile's last chunk to finish. Partial rows were written by other CTAs: read through L2
// (ld.cg) after the caller's fence. Everything it needs is in the item or already in registers, and
// the LSE and O loads of up to 16 chunks are in flight together (online rescaling), so the merge
// is a round trip or two: it sits on the kernel's critical path at the end of a decode step.
template <typename T, int HEAD_DIM, int THREADS>
__device__ __forceinline__ void merge_tile(const PrefillParams& p, const WorkItem& item, int rows, int64_t q_start,
                                           int hk) {
  constexpr int kLanes = HEAD_DIM / 4;  // threads per row, 4 floats each
  constexpr int kRowsPerPass = THREADS / kLanes;
  constexpr int kBatch = 16;
  static_assert(kRowsPerPass >= 1 && THREADS % kLanes == 0, "uneven merge split");
  const int lane = threadIdx.x % kLanes;
  const int64_t chunk_step = int64_t(p.cta_q) * p.num_kv_heads;  // partial (row, head) slots between chunks
  for (int r = threadIdx.x / kLanes; r < rows; r += kRowsPerPass) {
    const int64_t slot0 = int64_t(item.partial_base + r) * p.num_kv_heads + hk;
    float m = neg_inf(), denom = 0.f;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int c0 = 0; c0 < item.num_chunks; c0 += kBatch) {
      float lse[kBatch];
      float4 o[kBatch];
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        const bool present = c0 + i < item.num_chunks;
        const int64_t slot = slot0 + (c0 + i) * chunk_step;
        lse[i] = present ? __ldcg(p.partial_lse + slot) : neg_inf();
        o[i] = present ? __ldcg(reinterpret_cast<const float4*>(p.partial_o + slot * HEAD_DIM) + lane)
                       : make_float4(0.f, 0.f, 0.f, 0.f);
      }
      float m_new = m;
#pragma unroll
      for (int i = 0; i < kBatch; ++i) m_new = fmaxf(m_new, lse[i]);
      if (m_new == neg_inf()) continue;  // only empty chunks so far (LSE -inf, O = 0)
      const float rescale = exp2f(m - m_new);
      denom *= rescale;
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[j] *= rescale;
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        const float w = exp2f(lse[i] - m_new);
        denom += w;
        acc[0] += w * o[i].x;
        acc[1] += w * o[i].y;
        acc[2] += w * o[i].z;
        acc[3] += w * o[i].w;
      }
      m = m_new;
    }
    const float inv = denom > 0.f ? 1.f / denom : 0.f;
    const int packed = item.row_begin + r;
    const int token = packed / p.group, head = hk * p.group + packed % p.group;
    T* dst = static_cast<T*>(p.o) + (q_start + token) * p.o_stride_n + int64_t(head) * p.o_stride_h + lane * 4;
    *reinterpret_cast<uint2*>(dst) = make_uint2(Converter<T>::from_float2(acc[0] * inv, acc[1] * inv),
                                                Converter<T>::from_float2(acc[2] * inv, acc[3] * inv));
    if (p.lse != nullptr && lane == 0)
      p.lse[(q_start + token) * p.num_qo_heads + head] = denom > 0.f ? m + log2f(denom) : neg_inf();
  }
}

template <typename T, int HEAD_DIM, int CTA_Q, int KV_TILE, typename Variant, bool PAGED, bool ALIGNED_PAGES>
__global__ void __launch_bounds__(PrefillShape<HEAD_DIM, CTA_Q, KV_TILE>::kThreads, 2)
    prefill_kernel(const __grid_constant__ PrefillParams p) {
  using S = PrefillShape<HEAD_DIM, CTA_Q, KV_TILE>;
  using Tile = SwizzledTile<HEAD_DIM>;
  constexpr bool CAUSAL = Variant::kCausal;
  constexpr int MQ = S::kMmaQ;
  extern __shared__ __align__(128) uint8_t smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + CTA_Q * HEAD_DIM;                  // stage s at sK + s * kStage
  T* sV = sK + S::kStages * KV_TILE * HEAD_DIM;  // stage s at sV + s * kStage
  constexpr int kStage = KV_TILE * HEAD_DIM;

  const int item_index = blockIdx.x / p.num_kv_heads;
  const int hk = blockIdx.x % p.num_kv_heads;
  // The item is read before the count is checked so both loads are in flight at once (the items
  // buffer holds every CTA of the grid's slot, also under CUDA graphs where the grid is a capacity).
  WorkItem item;
  static_assert(sizeof(WorkItem) == 4 * sizeof(uint4), "WorkItem is read as four 16-byte pieces");
#pragma unroll
  for (int i = 0; i < 4; ++i)
    reinterpret_cast<uint4*>(&item)[i] = ld_nc_v4_early(reinterpret_cast<const uint4*>(p.items + item_index) + i);
  const int num_items = p.counts[0];
  FIJ_TRACE_SCOPE(item_index < num_items ? item_index : -1);
  if (item_index >= num_items) return;
  const int group = p.group;
  const int64_t q_start = item.q_start;
  const int q_len = item.q_len;
  const int64_t kv_start = item.kv_start;
  const int kv_len = item.kv_len;
  const int rows = min(CTA_Q, q_len * group - item.row_begin);
  const int causal_offset = kv_len - q_len;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int lane_g = lane / 4, lane_t = lane % 4;
  const T* q_base = static_cast<const T*>(p.q);
  const T* k_base = static_cast<const T*>(p.k);
  const T* v_base = static_cast<const T*>(p.v);

  // Q tile (packed rows -> (token, head)); rows past the tile's end are zero.
  static_assert((CTA_Q * Tile::kChunks) % S::kThreads == 0, "Q tile chunks must split evenly");
#pragma unroll
  for (int it = 0; it < CTA_Q * Tile::kChunks / S::kThreads; ++it) {
    const int i = tid + it * S::kThreads;
    const int row = i / Tile::kChunks, chunk = i % Tile::kChunks;
    const bool valid = row < rows;
    const int packed = item.row_begin + row;
    const int token = packed / group, head = hk * group + packed % group;
    const T* src = valid ? q_base + (q_start + token) * p.q_stride_n + int64_t(head) * p.q_stride_h + chunk * 8 : q_base;
    cp_async_16(smem_addr(sQ + Tile::offset(row, chunk)), src, valid);
  }

  // KV range this tile visits: the item's chunk, clipped by the causal diagonal of its last row.
  const int first_token = item.row_begin / group;
  const int last_token = (item.row_begin + max(rows, 1) - 1) / group;
  int kv_hi = item.kv_end;
  if (CAUSAL) kv_hi = min(kv_hi, max(0, last_token + causal_offset + 1));
  const int kv_lo = item.kv_begin;

  // K/V tile loads: load_tile(stage, first row) — ragged rows are contiguous per KV head (pointer
  // stepping), paged rows go through the page table (read one tile ahead).
  using Ragged = KVTileLoader<T, HEAD_DIM, KV_TILE, S::kThreads>;
  using Paged = PagedKVTileLoader<T, HEAD_DIM, KV_TILE, S::kThreads, ALIGNED_PAGES>;
  Ragged k_loader(k_base, PAGED ? 0 : kv_start + kv_lo, hk, p.k_stride_n, p.k_stride_h);
  Ragged v_loader(v_base, PAGED ? 0 : kv_start + kv_lo, hk, p.v_stride_n, p.v_stride_h);
  Paged paged(PAGED ? p.page_indices + item.page_start : nullptr, hk, p.k_stride_h);
  const uint32_t sK_addr = smem_addr(sK), sV_addr = smem_addr(sV);
  constexpr uint32_t kStageBytes = KV_TILE * HEAD_DIM * int(sizeof(T));
  auto load_tile = [&](int stage_index, int pos0) {
    if constexpr (PAGED) {
      paged.load_kv(sK_addr + stage_index * kStageBytes, sV_addr + stage_index * kStageBytes, k_base, v_base, pos0,
                    kv_hi - pos0, p);
      paged.fetch(pos0 + KV_TILE, kv_hi - pos0 - KV_TILE, p);
    } else {
      k_loader.load(sK_addr + stage_index * kStageBytes, kv_hi - pos0, k_base);
      v_loader.load(sV_addr + stage_index * kStageBytes, kv_hi - pos0, v_base);
    }
  };
  if constexpr (PAGED) paged.fetch(kv_lo, kv_hi - kv_lo, p);
  // Prologue: tiles 0 .. kStages-2, one commit group each (the first also holds Q).
#pragma unroll
  for (int t = 0; t < S::kStages - 1; ++t) {
    if (kv_lo + t * KV_TILE < kv_hi) load_tile(t, kv_lo + t * KV_TILE);
    cp_async_commit();
  }

  float o_acc[MQ][S::kNtO][4];
  float row_max[MQ][2], row_sum[MQ][2];
#pragma unroll
  for (int mi = 0; mi < MQ; ++mi) {
#pragma unroll
    for (int nt = 0; nt < S::kNtO; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o_acc[mi][nt][e] = 0.f;
    row_max[mi][0] = row_max[mi][1] = neg_inf();
    row_sum[mi][0] = row_sum[mi][1] = 0.f;
  }
  const float scale = p.scale_log2;
  const int warp_q = warp % S::kWarpsQ, warp_kv = warp / S::kWarpsQ;
  const int warp_row0 = warp_q * 16 * MQ;
  const int warp_key0 = warp_kv * S::kKeysPerWarp;  // this warp's keys within a KV tile
  // ldmatrix addresses. Row r, chunk c lives at byte r * kRowBytes + ((c ^ (r % 8)) << 4); every
  // row a lane addresses has r % 8 == lane % 8 and chunk 2 * step + bit, so the step enters as
  // `addr ^ (step << 5)` (no carry into the row bits: tile bases are kRowBytes * 8 aligned).
  constexpr int kRowBytes = HEAD_DIM * int(sizeof(T));
  const uint32_t swz = lane & 7;
  const uint32_t q_frag = smem_addr(sQ) + (warp_row0 + lane % 16) * kRowBytes + (((lane / 16) ^ swz) << 4);
  const uint32_t k_frag =
      smem_addr(sK) + (warp_key0 + (lane / 16) * 8 + lane % 8) * kRowBytes + ((((lane / 8) & 1) ^ swz) << 4);
  const uint32_t v_frag = smem_addr(sV) + (warp_key0 + lane % 16) * kRowBytes + (((lane / 16) ^ swz) << 4);

  int stage = 0;
  for (int pos0 = kv_lo; pos0 < kv_hi; pos0 += KV_TILE, stage = stage + 1 == S::kStages ? 0 : stage + 1) {
    // One barrier per tile: after it, tile j (commit group j) is visible to every thread, and every
    // warp is done with tile j-1, whose stage now receives tile j + kStages - 1.
    cp_async_wait<S::kStages - 2>();
    __syncthreads();
    {
      const int next = pos0 + (S::kStages - 1) * KV_TILE;
      const int next_stage = stage == 0 ? S::kStages - 1 : stage - 1;
      if (next < kv_hi) load_tile(next_stage, next);
      cp_async_commit();  // possibly empty: keeps one group per tile for the wait count above
    }
    const uint32_t stage_bytes = stage * kStage * int(sizeof(T));

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
      for (int mi = 0; mi < MQ; ++mi) ldmatrix_x4(a[mi], (q_frag ^ (ks << 5)) + mi * 16 * kRowBytes);
#pragma unroll
      for (int nb = 0; nb < S::kNtS / 2; ++nb) {
        uint32_t b[4];
        ldmatrix_x4(b, ((k_frag + stage_bytes) ^ (ks << 5)) + nb * 16 * kRowBytes);
#pragma unroll
        for (int mi = 0; mi < MQ; ++mi) {
          mma_16816<T>(s[mi][2 * nb], a[mi], b[0], b[1]);
          mma_16816<T>(s[mi][2 * nb + 1], a[mi], b[2], b[3]);
        }
      }
    }

    // Mask the KV tail and (causal) keys right of the diagonal; only tiles that can need it.
    const bool tail = pos0 + KV_TILE > kv_hi;
    const bool diagonal = CAUSAL && pos0 + KV_TILE - 1 > first_token + causal_offset;
    if (tail || diagonal) {
#pragma unroll
      for (int mi = 0; mi < MQ; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          // Last key this row may see (its own token's diagonal), or kv_hi - 1.
          const int packed = item.row_begin + warp_row0 + mi * 16 + lane_g + 8 * h;
          const int limit = CAUSAL ? min(kv_hi - 1, packed / group + causal_offset) : kv_hi - 1;
#pragma unroll
          for (int nt = 0; nt < S::kNtS; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e)
              if (pos0 + warp_key0 + nt * 8 + 2 * lane_t + e > limit) s[mi][nt][2 * h + e] = neg_inf();
        }
    }

    // Online softmax (base 2). A row that has seen no key keeps max -inf; exp2 of -inf is 0.
    // P is packed to 16-bit pairs right away: it is the A operand of P V (half the registers of S).
    uint32_t p_frag[MQ][S::kNtS][2];
#pragma unroll
    for (int mi = 0; mi < MQ; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float mx = row_max[mi][h];
#pragma unroll
        for (int nt = 0; nt < S::kNtS; ++nt) mx = fmaxf(mx, fmaxf(s[mi][nt][2 * h], s[mi][nt][2 * h + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
        const float base = mx == neg_inf() ? 0.f : mx * scale;
        const float correction = exp2f(row_max[mi][h] * scale - base);
        row_max[mi][h] = mx;
        float sum = row_sum[mi][h] * correction;
#pragma unroll
        for (int nt = 0; nt < S::kNtS; ++nt) {
          const float p0 = exp2f(fmaf(s[mi][nt][2 * h], scale, -base));
          const float p1 = exp2f(fmaf(s[mi][nt][2 * h + 1], scale, -base));
          p_frag[mi][nt][h] = Converter<T>::from_float2(p0, p1);
          sum += p0 + p1;
        }
        row_sum[mi][h] = sum;
        constexpr bool kLazy = FIJ_LAZY_RESCALE < 0 ? HEAD_DIM >= 128 : FIJ_LAZY_RESCALE != 0;
        if (!kLazy || __any_sync(0xffffffff, correction != 1.f)) {
#pragma unroll
          for (int nt = 0; nt < S::kNtO; ++nt) {
            o_acc[mi][nt][2 * h] *= correction;
            o_acc[mi][nt][2 * h + 1] *= correction;
          }
        }
      }


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
        ldmatrix_x4_trans(b, ((v_frag + stage_bytes) ^ (dn << 5)) + ks * 16 * kRowBytes);
#pragma unroll
        for (int mi = 0; mi < MQ; ++mi) {
          mma_16816<T>(o_acc[mi][2 * dn], a[mi], b[0], b[1]);
          mma_16816<T>(o_acc[mi][2 * dn + 1], a[mi], b[2], b[3]);
        }
      }
    }
  }
  cp_async_wait<0>();  // an empty KV range still issued the Q/K/V group
  FIJ_TRACE_MARK(loop_end);

  // Epilogue: normalise, write O (or the partial state of a split chunk) and the LSE.
  const bool split = item.partial >= 0;
  if constexpr (S::kWarpsKV == 1) {
#pragma unroll
    for (int mi = 0; mi < MQ; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float sum = row_sum[mi][h];
        sum += __shfl_xor_sync(0xffffffff, sum, 1);
        sum += __shfl_xor_sync(0xffffffff, sum, 2);
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        const float lse = sum > 0.f ? row_max[mi][h] * scale + log2f(sum) : neg_inf();
        const int r = warp_row0 + mi * 16 + lane_g + 8 * h;
        if (r >= rows) continue;
        const int packed = item.row_begin + r;
        const int token = packed / group, head = hk * group + packed % group;
        if (split) {
          const int64_t prow = int64_t(item.partial + r) * p.num_kv_heads + hk;
          float* dst = p.partial_o + prow * HEAD_DIM + 2 * lane_t;
#pragma unroll
          for (int nt = 0; nt < S::kNtO; ++nt)
            *reinterpret_cast<float2*>(dst + nt * 8) =
                make_float2(o_acc[mi][nt][2 * h] * inv, o_acc[mi][nt][2 * h + 1] * inv);
          if (lane_t == 0) p.partial_lse[prow] = lse;
        } else {
          T* dst = static_cast<T*>(p.o) + (q_start + token) * p.o_stride_n + int64_t(head) * p.o_stride_h + 2 * lane_t;
#pragma unroll
          for (int nt = 0; nt < S::kNtO; ++nt)
            *reinterpret_cast<uint32_t*>(dst + nt * 8) =
                Converter<T>::from_float2(o_acc[mi][nt][2 * h] * inv, o_acc[mi][nt][2 * h + 1] * inv);
          if (p.lse != nullptr && lane_t == 0) p.lse[(q_start + token) * p.num_qo_heads + head] = lse;
        }
      }
  } else {
    // The KV warps hold states of the same rows over different keys: each stores its unnormalised
    // O, scaled row maximum and row sum in shared memory (over the K/V stages, free after this
    // barrier), then every thread merges one segment of one row across the warps.
    static_assert(MQ == 1, "KV-split warps hold one m16 tile each");
    __syncthreads();
    float* sO = reinterpret_cast<float*>(sK);
    float* sM = sO + S::kWarpsKV * CTA_Q * S::kMergeRowFloats;
    float* sL = sM + S::kWarpsKV * CTA_Q;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float sum = row_sum[0][h];
      sum += __shfl_xor_sync(0xffffffff, sum, 1);
      sum += __shfl_xor_sync(0xffffffff, sum, 2);
      const int slot = warp_kv * CTA_Q + warp_row0 + lane_g + 8 * h;
      float* dst = sO + slot * S::kMergeRowFloats + 2 * lane_t;
#pragma unroll
      for (int nt = 0; nt < S::kNtO; ++nt)
        *reinterpret_cast<float2*>(dst + nt * 8) = make_float2(o_acc[0][nt][2 * h], o_acc[0][nt][2 * h + 1]);
      if (lane_t == 0) {
        sM[slot] = row_max[0][h] == neg_inf() ? neg_inf() : row_max[0][h] * scale;
        sL[slot] = sum;
      }
    }
    __syncthreads();
    constexpr int kSegs = S::kThreads / CTA_Q;        // threads per row
    constexpr int kSegFloats = HEAD_DIM / kSegs;
    static_assert(kSegs * CTA_Q == S::kThreads && kSegFloats % 8 == 0, "uneven merge split");
    const int r = tid / kSegs, seg = tid % kSegs;
    float m = neg_inf();
#pragma unroll
    for (int w = 0; w < S::kWarpsKV; ++w) m = fmaxf(m, sM[w * CTA_Q + r]);
    float weight[S::kWarpsKV];
    float denom = 0.f;
#pragma unroll
    for (int w = 0; w < S::kWarpsKV; ++w) {
      weight[w] = m == neg_inf() ? 0.f : exp2f(sM[w * CTA_Q + r] - m);
      denom += weight[w] * sL[w * CTA_Q + r];
    }
    const float inv = denom > 0.f ? 1.f / denom : 0.f;
    const float lse = denom > 0.f ? m + log2f(denom) : neg_inf();
    float acc[kSegFloats];
#pragma unroll
    for (int i = 0; i < kSegFloats; ++i) acc[i] = 0.f;
#pragma unroll
    for (int w = 0; w < S::kWarpsKV; ++w) {
      const float4* src = reinterpret_cast<const float4*>(sO + (w * CTA_Q + r) * S::kMergeRowFloats + seg * kSegFloats);
#pragma unroll
      for (int i = 0; i < kSegFloats / 4; ++i) {
        const float4 x = src[i];
        acc[4 * i] += weight[w] * x.x;
        acc[4 * i + 1] += weight[w] * x.y;
        acc[4 * i + 2] += weight[w] * x.z;
        acc[4 * i + 3] += weight[w] * x.w;
      }
    }
#pragma unroll
    for (int i = 0; i < kSegFloats; ++i) acc[i] *= inv;
    if (r < rows) {
      const int packed = item.row_begin + r;
      const int token = packed / group, head = hk * group + packed % group;
      if (split) {
        const int64_t prow = int64_t(item.partial + r) * p.num_kv_heads + hk;
        float4* dst = reinterpret_cast<float4*>(p.partial_o + prow * HEAD_DIM + seg * kSegFloats);
#pragma unroll
        for (int i = 0; i < kSegFloats / 4; ++i)
          dst[i] = make_float4(acc[4 * i], acc[4 * i + 1], acc[4 * i + 2], acc[4 * i + 3]);
        if (seg == 0) p.partial_lse[prow] = lse;
      } else {
        T* dst = static_cast<T*>(p.o) + (q_start + token) * p.o_stride_n + int64_t(head) * p.o_stride_h + seg * kSegFloats;
#pragma unroll
        for (int i = 0; i < kSegFloats / 8; ++i) {
          float eight[8];
#pragma unroll
          for (int j = 0; j < 8; ++j) eight[j] = acc[8 * i + j];
          store8(dst + 8 * i, eight);
        }
        if (p.lse != nullptr && seg == 0) p.lse[(q_start + token) * p.num_qo_heads + head] = lse;
      }
    }
  }

  // Split tile: the last chunk to finish (device-wide counter) merges the tile's partial states.
  if (split) {
    __threadfence();  // this CTA's partial rows are visible before the counter says so
    __syncthreads();
    int* last_flag = reinterpret_cast<int*>(sQ);  // Q is no longer read
    if (tid == 0) {
      const int done = atomicAdd(p.merge_counters + item.merge * p.num_kv_heads + hk, 1);
      *last_flag = done == item.num_chunks - 1;
    }
    __syncthreads();
    if (*last_flag) {
      FIJ_TRACE_MARK(merge_begin);
      __threadfence();
      merge_tile<T, HEAD_DIM, S::kThreads>(p, item, rows, q_start, hk);
      if (tid == 0) p.merge_counters[item.merge * p.num_kv_heads + hk] = 0;  // ready for the next run
    }
  }
}

// Paged layouts: can the aligned-pages kernel run this page size and these strides?
template <int KV_TILE>
inline bool aligned_pages(const PrefillParams& p) {
  const int ps = p.page_size;
  const bool divides = ps > 0 && KV_TILE % ps == 0 && (ps & (ps - 1)) == 0;
  const bool multiple = ps > 0 && ps % KV_TILE == 0;
  return (divides || multiple) && p.stride_page <= INT32_MAX && p.k_stride_n >= 0 && p.k_stride_h >= 0 &&
         int64_t(ps) * p.k_stride_n + p.k_stride_h * int64_t(p.num_kv_heads) <= INT32_MAX;
}

template <typename T, int HEAD_DIM, int CTA_Q, int KV_TILE, typename Variant, bool PAGED, bool ALIGNED_PAGES>
inline int launch_kernel(const PrefillParams& p, int grid_items, cudaStream_t stream) {
  using S = PrefillShape<HEAD_DIM, CTA_Q, KV_TILE>;
  constexpr int smem = S::template smem_bytes<T>();
  auto kernel = prefill_kernel<T, HEAD_DIM, CTA_Q, KV_TILE, Variant, PAGED, ALIGNED_PAGES>;
  static bool attribute_set[64] = {};  // per device ordinal
  int device = 0;
  cudaGetDevice(&device);
  if (device < 64 && !attribute_set[device]) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return int(err);
    attribute_set[device] = true;
  }
  if (grid_items > 0) {
    return launch(kernel, dim3(unsigned(grid_items) * unsigned(p.num_kv_heads)), dim3(S::kThreads), smem, stream, p);
  }
  return 0;
}

template <typename T, int HEAD_DIM, int CTA_Q, int KV_TILE, typename Variant, bool PAGED>
inline int launch_prefill(const PrefillParams& params, int grid_items, cudaStream_t stream) {
  if constexpr (PAGED) {
    if (aligned_pages<KV_TILE>(params)) {
      PrefillParams p = params;
      const bool divides = KV_TILE % p.page_size == 0;
      p.page_row_shift = divides ? __builtin_ctz(unsigned(p.page_size)) : 30;  // rows < KV_TILE <= page: 0
      p.page_row_mask = divides ? p.page_size - 1 : -1;
      return launch_kernel<T, HEAD_DIM, CTA_Q, KV_TILE, Variant, true, true>(p, grid_items, stream);
    }
  }
  return launch_kernel<T, HEAD_DIM, CTA_Q, KV_TILE, Variant, PAGED, false>(params, grid_items, stream);
}

template <typename T, int HEAD_DIM, int CTA_Q, int KV_TILE, typename Variant, bool PAGED>
inline int blocks_per_sm() {
  using S = PrefillShape<HEAD_DIM, CTA_Q, KV_TILE>;
  constexpr int smem = S::template smem_bytes<T>();
  auto kernel = prefill_kernel<T, HEAD_DIM, CTA_Q, KV_TILE, Variant, PAGED, PAGED>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return -int(err);
  int blocks = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, S::kThreads, smem);
  return err == cudaSuccess ? blocks : -int(err);
}

}  // namespace fij
