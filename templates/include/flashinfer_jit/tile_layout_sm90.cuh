// Where the sm90 kernel's tiles keep a row's head dims in shared memory. Every tile uses the TMA's
// 128-byte swizzle in blocks of 64 dims: 8 rows x 128 bytes make a 1024-byte atom, within which 16-byte
// chunk c of row r sits at slot c ^ (r % 8) (the swizzle is a function of the address: tiles start
// 1024-byte aligned). What differs is the order of the atoms:
//   - by block ([D / 64][rows][128 B]): Q tiles, ragged K / V tiles (one TMA box per 64 dims) and, by
//     default, paged ones (one box per page and 64 dims);
//   - by row group ([rows / 8][D / 64][8][128 B], FIJ_SM90_PAGED_WIDE_BOX for paged K / V): a page's rows
//     with all their dims are then one contiguous run, so one TMA box brings them (half the boxes at
//     head_dim 128, a quarter at 256).
// The wgmma descriptors read either: K's (K-major) 8-row groups are kGroupStride apart, V's (MN-major)
// 64-dim blocks kBlockStride apart and its 8-row groups kGroupStride apart.
#pragma once
#include <stdint.h>

namespace fij {
namespace sm90 {

// Byte offset of 16-byte chunk `chunk` of row `row` in a by-block tile of `rows` rows.
__device__ __forceinline__ uint32_t sw128_chunk(int rows, int row, int chunk) {
  return uint32_t((chunk / 8) * rows * 128 + row * 128 + (((chunk % 8) ^ (row & 7)) * 16));
}

template <int HEAD_DIM, int KV_TILE, bool BY_GROUP>
struct KvTileLayout {
  static constexpr bool kByGroup = BY_GROUP;
  static constexpr int kBlocks = HEAD_DIM / 64;
  static constexpr uint32_t kBlockStride = BY_GROUP ? 1024 : KV_TILE * 128;     // between 64-dim blocks
  static constexpr uint32_t kGroupStride = BY_GROUP ? kBlocks * 1024 : 1024;   // between 8-row groups
  static_assert(KV_TILE % 8 == 0, "whole 8-row groups");

  // Byte offset of row `row`'s start in 64-dim block `block` (unswizzled: chunk 0's slot in the atom).
  // (Unsigned: rows are never negative, and a signed / 8 costs sign fix-ups.)
  __device__ __forceinline__ static uint32_t row(int block, int row) {
    if constexpr (!BY_GROUP) return uint32_t(block * KV_TILE * 128 + row * 128);  // (rows back to back)
    const uint32_t r = uint32_t(row);
    return uint32_t(block) * kBlockStride + (r >> 3) * kGroupStride + (r & 7u) * 128u;
  }
  // Byte offset of 16-byte chunk `chunk` (of D / 8) of row `row`, swizzled.
  __device__ __forceinline__ static uint32_t chunk(int row, int chunk) {
    return KvTileLayout::row(chunk / 8, row) + uint32_t(((chunk % 8) ^ (row & 7)) * 16);
  }
};

}  // namespace sm90
}  // namespace fij
