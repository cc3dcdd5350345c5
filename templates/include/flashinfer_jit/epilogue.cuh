// Epilogue of a batch-prefill work item: normalise the accumulated state and write it out.
//
// A row goes to one of two places (the row sinks below, the only code that addresses them):
//   FinalRow    the output O[token, head, :] in T and, when asked for, LSE[token, head];
//   PartialRow  for a chunk of a split-KV tile, its normalised fp32 partial state in the float
//               workspace, merged later by merge_split_tile (the tile's last chunk to finish).
// States are combined by StateMerger (state_merge.cuh): across the KV-split warps of a decode tile
// and across the chunks of a split tile.
#pragma once
#include "flashinfer_jit/gqa.cuh"
#include "flashinfer_jit/prefill_params.h"
#include "flashinfer_jit/state_merge.cuh"

namespace fij {

template <typename T, int HEAD_DIM>
struct FinalRow {
  T* o;
  float* lse;  // nullptr: not asked for

  __device__ __forceinline__ static FinalRow at(const PrefillParams& p, int64_t q_start, int packed, int hk) {
    const PackedRow row = unpack_row(packed, p.group, hk);
    const int64_t token = q_start + row.token;
    return FinalRow{static_cast<T*>(p.o) + token * p.o_stride_n + int64_t(row.head) * p.o_stride_h,
                    p.lse != nullptr ? p.lse + token * p.num_qo_heads + row.head : nullptr};
  }
  // The same row from column `col` on: callers fold their per-thread column in once, so that the
  // stores that follow use constant offsets (an int column added per store is not folded).
  __device__ __forceinline__ FinalRow advance(int col) const { return FinalRow{o + col, lse}; }
  // Columns [col, col + N): N = 2 (one 4-byte store), 4 (8 bytes) or a multiple of 8 (16-byte stores).
  template <int N>
  __device__ __forceinline__ void store(int col, const float (&v)[N]) const {
    if constexpr (N == 2) {
      *reinterpret_cast<uint32_t*>(o + col) = Converter<T>::from_float2(v[0], v[1]);
    } else if constexpr (N == 4) {
      *reinterpret_cast<uint2*>(o + col) =
          make_uint2(Converter<T>::from_float2(v[0], v[1]), Converter<T>::from_float2(v[2], v[3]));
    } else {
      static_assert(N % 8 == 0, "row stores are 2, 4 or a multiple of 8 elements");
#pragma unroll
      for (int i = 0; i < N / 8; ++i) {
        float eight[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) eight[j] = v[8 * i + j];
        store8(o + col + 8 * i, eight);
      }
    }
  }
  __device__ __forceinline__ void store_lse(float value) const {
    if (lse != nullptr) *lse = value;
  }
};

template <int HEAD_DIM>
struct PartialRow {
  float* o;
  float* lse;

  // Partial slot `row` (the chunk's first partial row + the row within the tile) of KV head hk.
  __device__ __forceinline__ static PartialRow at(const PrefillParams& p, int row, int hk) {
    const int64_t slot = int64_t(row) * p.num_kv_heads + hk;
    return PartialRow{p.partial_o + slot * HEAD_DIM, p.partial_lse + slot};
  }
  __device__ __forceinline__ PartialRow advance(int col) const { return PartialRow{o + col, lse}; }
  template <int N>
  __device__ __forceinline__ void store(int col, const float (&v)[N]) const {
    if constexpr (N == 2) {
      *reinterpret_cast<float2*>(o + col) = make_float2(v[0], v[1]);
    } else {
      static_assert(N % 4 == 0, "partial row stores are 2 or a multiple of 4 floats");
#pragma unroll
      for (int i = 0; i < N / 4; ++i)
        reinterpret_cast<float4*>(o + col)[i] = make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
    }
  }
  __device__ __forceinline__ void store_lse(float value) const { *lse = value; }
};

// Write row r (within the item's tile) through the sink its item calls for: `write(sink)` stores
// the row's columns and LSE.
template <typename T, int HEAD_DIM, typename Write>
__device__ __forceinline__ void to_row_sink(const PrefillParams& p, const WorkItem& item, int64_t q_start, int r,
                                            int hk, Write&& write) {
  if (item.partial >= 0) {
    write(PartialRow<HEAD_DIM>::at(p, item.partial + r, hk));
  } else {
    write(FinalRow<T, HEAD_DIM>::at(p, q_start, item.row_begin + r, hk));
  }
}

// Row h (0: lane / 4, 1: lane / 4 + 8) of an m16n8 accumulator fragment layout (mma.sync and wgmma
// alike): this thread's two columns 2 * lane_t + {0, 1} of each of the NT n8 tiles, times `inv`,
// into `row` (a sink from to_row_sink); lane_t 0 also writes the row's LSE.
template <int NT, typename Sink>
__device__ __forceinline__ void store_fragment_row(const Sink& row, int lane_t, const float (&o)[NT][4], int h,
                                                   float inv, float lse) {
  const auto cols = row.advance(2 * lane_t);
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const float v[2] = {o[nt][2 * h] * inv, o[nt][2 * h + 1] * inv};
    cols.store(nt * 8, v);
  }
  if (lane_t == 0) row.store_lse(lse);
}

// Merge the partial states of a split q tile (packed rows [0, rows) of `item`'s tile, KV head hk);
// run by the tile's last chunk to finish, by THREADS threads numbered `tid`. Partial rows were written by other CTAs: read through L2
// (ld.cg) after the caller's fence. Everything it needs is in the item, and the LSE and O loads of
// up to kBatch chunks are in flight together (online merge), so the merge is a round trip or two:
// it sits on the kernel's critical path at the end of a decode step.
template <typename T, int HEAD_DIM, int THREADS>
__device__ __forceinline__ void merge_split_tile(const PrefillParams& p, const WorkItem& item, int rows,
                                                 int64_t q_start, int hk, int tid) {
  constexpr int kLanes = HEAD_DIM / 4;  // threads per row, 4 floats each
  constexpr int kRowsPerPass = THREADS / kLanes;
  constexpr int kBatch = 16;
  static_assert(kRowsPerPass >= 1 && THREADS % kLanes == 0, "uneven merge split");
  const int lane = tid % kLanes;
  const int64_t chunk_step = int64_t(p.cta_q) * p.num_kv_heads;  // partial (row, head) slots between chunks
  for (int r = tid / kLanes; r < rows; r += kRowsPerPass) {
    const int64_t slot0 = int64_t(item.partial_base + r) * p.num_kv_heads + hk;
    StateMerger<4> merged;
    for (int c0 = 0; c0 < item.num_chunks; c0 += kBatch) {
      float lse[kBatch], ones[kBatch], o[kBatch][4];
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        const bool present = c0 + i < item.num_chunks;
        const int64_t slot = slot0 + (c0 + i) * chunk_step;
        lse[i] = present ? __ldcg(p.partial_lse + slot) : neg_inf();
        const float4 x = present ? __ldcg(reinterpret_cast<const float4*>(p.partial_o + slot * HEAD_DIM) + lane)
                                 : make_float4(0.f, 0.f, 0.f, 0.f);
        o[i][0] = x.x, o[i][1] = x.y, o[i][2] = x.z, o[i][3] = x.w;
        ones[i] = 1.f;  // partial states are normalised
      }
      merged.add(lse, ones, o);
    }
    float out[4];
    merged.normalized(out);
    const FinalRow<T, HEAD_DIM> row = FinalRow<T, HEAD_DIM>::at(p, q_start, item.row_begin + r, hk);
    row.advance(lane * 4).store(0, out);
    if (lane == 0) row.store_lse(merged.lse());
  }
}

}  // namespace fij
