// The shared-memory layout of Q/K/V tiles: rows of HEAD_DIM 16-bit elements whose 16-byte chunks are
// XOR-swizzled by row % 8, so the 8 rows an ldmatrix reads (same logical chunk) land in 8 different
// bank groups. Every address into such a tile (cp.async destinations, ldmatrix fragments) is made
// here.
#pragma once
#include <stdint.h>

namespace fij {

template <int HEAD_DIM>
struct SwizzledTile {
  static_assert(HEAD_DIM % 64 == 0, "the swizzle needs at least 8 chunks per row");
  static constexpr int kChunks = HEAD_DIM / 8;      // 16-byte chunks per row
  static constexpr int kRowBytes = HEAD_DIM * 2;

  // Element offset of (row, 16-byte chunk).
  __host__ __device__ __forceinline__ static constexpr int offset(int row, int chunk) {
    return row * HEAD_DIM + ((chunk ^ (row & 7)) << 3);
  }
  __host__ __device__ __forceinline__ static constexpr uint32_t byte_offset(int row, int chunk) {
    return uint32_t(offset(row, chunk)) * 2u;
  }
  // From the address of (row, chunk) to (row, chunk ^ n), n < 8: the swizzle is an XOR, so this is
  // an XOR too (no carry into the row bits as long as tile bases are 8 * kRowBytes aligned). Also
  // from (row, chunk) to (row + d, chunk) with d % 8 == n, after adding d * kRowBytes.
  __host__ __device__ __forceinline__ static constexpr uint32_t xor_chunks(uint32_t addr, int n) {
    return addr ^ (uint32_t(n) << 4);
  }
};

// Rows of ROW_BYTES bytes, 16-byte chunks in order: the staging tiles of fp8 K / V (read row by row
// by the widening pass, never by ldmatrix). The same interface as SwizzledTile.
template <int ROW_BYTES>
struct LinearTile {
  static_assert(ROW_BYTES % 16 == 0, "rows of whole 16-byte chunks");
  static constexpr int kChunks = ROW_BYTES / 16;
  static constexpr int kRowBytes = ROW_BYTES;
  __host__ __device__ __forceinline__ static constexpr uint32_t byte_offset(int row, int chunk) {
    return uint32_t(row * ROW_BYTES + chunk * 16);
  }
  __host__ __device__ __forceinline__ static constexpr uint32_t xor_chunks(uint32_t addr, int) { return addr; }
};

}  // namespace fij
