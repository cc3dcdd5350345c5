// Query / key transforms of the sm90 kernel (the variant's kTransformsQuery / kTransformsKey: fused
// RoPE), applied in shared memory between the TMA that brings a tile and the wgmma that reads it.
//
//   - Q: each consumer warpgroup rewrites its own 64 rows once the unit's Q tile has landed (16-byte
//     chunks: 8 dims and their rotate-half partners D/2 further, variant.transform_query), then fences
//     the writes for the tensor cores and syncs the warpgroup; or (FIJ_SM90_ROPE_Q_PRODUCER) the key
//     transform warps rewrite the whole tile before q_full. Once per unit: it is amortised over the
//     unit's KV tiles, so the per-element sincos is affordable here.
//   - K: warps 1..3 (1..2 at head_dim 256) of the producer warpgroup (idle otherwise: warp 0 issues the TMA) rewrite every K
//     tile between its TMA barrier (k_landed) and the consumers' (k_full), one tile ahead of them. The
//     MUFU unit is the softmax's (one exp2 per score), so a key's angle is not a sincos per element:
//     each thread keeps 4 dims (and partners) and walks its rows key0, key0 + stride, ... advancing the
//     rotation by a complex multiply (variant.key_walk*: one sincos per dim and tile). 8-byte accesses
//     (4-byte at head_dim 256) keep the walk in the producer's 56 (40) registers.
// The tiles use the TMA's 128-byte swizzle in blocks of 64 dims (tile_layout_sm90.cuh): a dim's chunk and
// its partner's chunk sit at the same swizzled position of their own 16-byte slots.
#pragma once
#include <stdint.h>

#include "flashinfer_jit/async_sm90.cuh"
#include "flashinfer_jit/common.cuh"
#include "flashinfer_jit/gqa.cuh"
#include "flashinfer_jit/switches_sm90.h"
#include "flashinfer_jit/tile_layout_sm90.cuh"

namespace fij {
namespace sm90 {

// N (2 or 4) consecutive 16-bit values <-> N floats through one 4- or 8-byte access.
template <typename T, int N>
__device__ __forceinline__ void load_n(const uint8_t* ptr, float (&out)[N]) {
  static_assert(N == 2 || N == 4, "2 or 4 values");
  uint32_t raw[N / 2];
  if constexpr (N == 4) {
    const uint2 v = *reinterpret_cast<const uint2*>(ptr);
    raw[0] = v.x, raw[1] = v.y;
  } else {
    raw[0] = *reinterpret_cast<const uint32_t*>(ptr);
  }
#pragma unroll
  for (int i = 0; i < N / 2; ++i) {
    const float2 f = Converter<T>::to_float2(raw[i]);
    out[2 * i] = f.x, out[2 * i + 1] = f.y;
  }
}
template <typename T, int N>
__device__ __forceinline__ void store_n(uint8_t* ptr, const float (&in)[N]) {
  if constexpr (N == 4)
    *reinterpret_cast<uint2*>(ptr) =
        make_uint2(Converter<T>::from_float2(in[0], in[1]), Converter<T>::from_float2(in[2], in[3]));
  else
    *reinterpret_cast<uint32_t*>(ptr) = Converter<T>::from_float2(in[0], in[1]);
}

// Rows [first_row, first_row + rows) of the unit's 128-row Q tile at `q_tile` (a generic pointer),
// transformed in place by THREADS threads (`tid` 0 .. THREADS - 1); the caller fences and syncs. Rows
// past the tile (w.rows) are transformed too: they hold whatever the TMA brought, their scores are
// never stored.
template <typename T, int HEAD_DIM, int CTA_Q, int THREADS, typename Variant, typename Tile>
__device__ __forceinline__ void transform_query_rows(const Variant& variant, const Tile& w, int group, int kv_head,
                                                     uint8_t* q_tile, int first_row, int rows, int tid) {
  constexpr int kHalfChunks = HEAD_DIM / 16;  // 16-byte chunks of half a row
  constexpr int kRowsPerPass = THREADS / kHalfChunks;
  static_assert(THREADS % kHalfChunks == 0, "a thread's dims must stay fixed");
  const int chunk = tid % kHalfChunks;
  const auto state = variant.qk_state(chunk * 8);
#pragma unroll 1
  for (int local = tid / kHalfChunks; local < rows; local += kRowsPerPass) {
    const int row = first_row + local;
    const PackedRow pr = unpack_row(w.row_begin + row, group, kv_head);
    T* lo_ptr = reinterpret_cast<T*>(q_tile + sw128_chunk(CTA_Q, row, chunk));
    T* hi_ptr = reinterpret_cast<T*>(q_tile + sw128_chunk(CTA_Q, row, chunk + kHalfChunks));
    float lo[8], hi[8];
    load8(lo_ptr, lo);
    load8(hi_ptr, hi);
    if (FIJ_SM90_ROPE_DIAG != 2) variant.transform_query(state, lo, hi, pr.token, pr.head, w);
    store8(lo_ptr, lo);
    store8(hi_ptr, hi);
  }
}

// The K-tile transform warps (warps 1..3 of the producer warpgroup); K tiles laid out as KvLayout.
template <typename T, int HEAD_DIM, int KV_TILE, typename KvLayout = KvTileLayout<HEAD_DIM, KV_TILE, false>>
struct KeyTransformWarps {
  static constexpr int kFirstWarp = 1;
  // Dims a thread keeps: 4 (8-byte accesses), 2 at head_dim 256, whose producer has 40 registers.
  static constexpr int kDims = HEAD_DIM >= 256 ? 2 : 4;
  static constexpr int kGroups = HEAD_DIM / 2 / kDims;  // kDims-dim groups of half a row
  static constexpr int kWarps = kGroups <= 32 ? 3 : 2;  // 3 at most; whole rows per pass
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kRowsPerPass = kThreads / kGroups;
  static_assert(kThreads % kGroups == 0, "a thread's dims must stay fixed");

  int group;  // dims [kDims * group, kDims * group + kDims) and their partners D/2 further
  int row0;   // first row of every tile

  __device__ __forceinline__ static KeyTransformWarps of(int tid) {  // tid 0 .. kThreads - 1
    return KeyTransformWarps{tid % kGroups, tid / kGroups};
  }

  // Rows [0, rows) of the K tile at `tile` (generic pointer), keys pos0 .. of the request, in place.
  // The caller waited for the tile's TMA; it fences and hands the tile over after.
  template <typename Variant, typename Walk>
  __device__ __forceinline__ void transform_tile(const Variant& variant, Walk& walk, uint8_t* tile, int pos0,
                                                 int rows) const {
    const int dim = kDims * group;
    const int lo_chunk = dim / 8, hi_chunk = (dim + HEAD_DIM / 2) / 8, within = (dim % 8) * 2;  // bytes into the chunk
    if (FIJ_SM90_ROPE_DIAG == 1) return;
    variant.key_walk_start(walk, pos0 + row0);
#pragma unroll 1  // unrolled by 2: no faster on the H100 (issue slots, not latency: benchmarks/NOTES.md)
    for (int r = row0; r < rows; r += kRowsPerPass) {
      uint8_t* lo_ptr = tile + KvLayout::chunk(r, lo_chunk) + within;
      uint8_t* hi_ptr = tile + KvLayout::chunk(r, hi_chunk) + within;
      float lo[kDims], hi[kDims];
      load_n<T, kDims>(lo_ptr, lo);
      load_n<T, kDims>(hi_ptr, hi);
      variant.transform_walked_key(walk, lo, hi);
      store_n<T, kDims>(lo_ptr, lo);
      store_n<T, kDims>(hi_ptr, hi);
    }
  }
};

}  // namespace sm90
}  // namespace fij
