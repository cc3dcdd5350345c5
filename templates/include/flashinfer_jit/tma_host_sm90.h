// Host side of the sm90 kernel's TMA loads: tensor maps (CUtensorMap, 128 bytes each) describing q, k
// and v of one run, encoded by the driver's cuTensorMapEncodeTiled. The entry point is looked up once
// through the runtime (no link against libcuda); encoding is a few hundred nanoseconds of CPU work.
#pragma once
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

namespace fij {
namespace sm90 {

inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encoder = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    const cudaError_t err =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found);
    return err == cudaSuccess && found == cudaDriverEntryPointSuccess
               ? reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn)
               : nullptr;
  }();
  return encoder;
}

template <typename T>
constexpr CUtensorMapDataType tensor_map_dtype() {
  return std::is_same<T, half>::value ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
}

// Shared by the encoders below: a `rank`-D map of 16-bit elements, head dims innermost, loaded in boxes
// whose innermost extent is 64 head dims (128 bytes: one swizzle row), with the 128-byte swizzle.
// Returns a cudaError_t.
template <typename T>
inline int encode_tiled(CUtensorMap* map, const void* base, int rank, const cuuint64_t* dims,
                        const cuuint64_t* byte_strides, const cuuint32_t* box) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr) return int(cudaErrorNotSupported);
  const cuuint32_t element_strides[5] = {1, 1, 1, 1, 1};
  const CUresult res = encode(map, tensor_map_dtype<T>(), cuuint32_t(rank), const_cast<void*>(base), dims,
                              byte_strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                              CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                              CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return res == CUDA_SUCCESS ? 0 : int(cudaErrorInvalidValue);
}

// Rows of `heads` x head_dim elements (row r, head h at base + r * stride_row + h * stride_head, strides
// in elements) as the 3-D map (head dims, heads, rows), boxes of 64 x box_heads x box_rows: a box lands
// as box_rows x box_heads rows of 128 bytes, in (row, head) order. With `rows_inner` (a head-major
// tensor, stride_row < stride_head, and box_heads == 1) the map is (head dims, rows, heads) instead, so
// its strides grow outwards; the kernel then passes (row, head) coordinates in that order.
template <typename T>
inline int encode_row_map(CUtensorMap* map, const void* base, int64_t rows, int heads, int head_dim,
                          int64_t stride_row, int64_t stride_head, int box_heads, int box_rows, bool rows_inner) {
  const cuuint64_t n = cuuint64_t(rows > 0 ? rows : 1);
  const cuuint64_t by_row = cuuint64_t(stride_row) * sizeof(T), by_head = cuuint64_t(stride_head) * sizeof(T);
  if (rows_inner) {
    if (box_heads != 1) return int(cudaErrorInvalidValue);
    const cuuint64_t dims[3] = {cuuint64_t(head_dim), n, cuuint64_t(heads)};
    const cuuint64_t strides[2] = {by_row, by_head};
    const cuuint32_t box[3] = {64, cuuint32_t(box_rows), 1};
    return encode_tiled<T>(map, base, 3, dims, strides, box);
  }
  const cuuint64_t dims[3] = {cuuint64_t(head_dim), cuuint64_t(heads), n};
  const cuuint64_t strides[2] = {by_head, by_row};
  const cuuint32_t box[3] = {64, cuuint32_t(box_heads), cuuint32_t(box_rows)};
  return encode_tiled<T>(map, base, 3, dims, strides, box);
}

// A paged cache: token s of page g, head h at base + g * stride_page + s * stride_slot + h * stride_head
// (NHD and HND differ only in the two strides), as the 4-D map (head dims, heads, slots, pages) — or
// (head dims, slots, heads, pages) with `slots_inner` (HND) — in boxes of 64 head dims x box_rows slots of
// one head and one page.
template <typename T>
inline int encode_page_map(CUtensorMap* map, const void* base, int64_t pages, int page_size, int heads, int head_dim,
                           int64_t stride_page, int64_t stride_slot, int64_t stride_head, int box_rows,
                           bool slots_inner) {
  const cuuint64_t np = cuuint64_t(pages > 0 ? pages : 1);
  const cuuint64_t by_slot = cuuint64_t(stride_slot) * sizeof(T), by_head = cuuint64_t(stride_head) * sizeof(T);
  const cuuint64_t by_page = cuuint64_t(stride_page) * sizeof(T);
  if (slots_inner) {
    const cuuint64_t dims[4] = {cuuint64_t(head_dim), cuuint64_t(page_size), cuuint64_t(heads), np};
    const cuuint64_t strides[3] = {by_slot, by_head, by_page};
    const cuuint32_t box[4] = {64, cuuint32_t(box_rows), 1, 1};
    return encode_tiled<T>(map, base, 4, dims, strides, box);
  }
  const cuuint64_t dims[4] = {cuuint64_t(head_dim), cuuint64_t(heads), cuuint64_t(page_size), np};
  const cuuint64_t strides[3] = {by_head, by_slot, by_page};
  const cuuint32_t box[4] = {64, 1, cuuint32_t(box_rows), 1};
  return encode_tiled<T>(map, base, 4, dims, strides, box);
}

// The same cache for the by-group tile layout (FIJ_SM90_PAGED_WIDE_BOX, tile_layout_sm90.cuh): one box
// brings box_rows (a multiple of 8) slots of one head with all head_dim dims, landing as
// [box_rows / 8][head_dim / 64][8][64]. A 5-D map (64 dims, 8 slots, ...): the 64-dim blocks are a
// dimension of stride 128 bytes, which the heads' stride continues where they are packed, so
//   NHD (heads packed in a slot: stride_head == head_dim): (64, 8 slots, heads x blocks, groups of 8
//       slots, pages), a head's coordinate step (*head_step) head_dim / 64;
//   HND (slots_inner; a head's slots packed: stride_head == page_size * stride_slot): (64, 8 slots,
//       blocks, heads x groups of 8 slots, pages), step page_size / 8.
// Strides need not grow outwards (the driver asks 16-byte multiples below 2^40). A cache whose heads are
// not packed so, or pages not whole 8-slot groups, is cudaErrorInvalidValue.
template <typename T>
inline int encode_wide_page_map(CUtensorMap* map, const void* base, int64_t pages, int page_size, int heads,
                                int head_dim, int64_t stride_page, int64_t stride_slot, int64_t stride_head,
                                int box_rows, bool slots_inner, int* head_step) {
  if (page_size % 8 != 0 || box_rows % 8 != 0 || head_dim % 64 != 0) return int(cudaErrorInvalidValue);
  const int blocks = head_dim / 64;
  const cuuint64_t np = cuuint64_t(pages > 0 ? pages : 1);
  const cuuint64_t by_slot = cuuint64_t(stride_slot) * sizeof(T), by_page = cuuint64_t(stride_page) * sizeof(T);
  const cuuint32_t box[5] = {64, 8, cuuint32_t(blocks), cuuint32_t(box_rows / 8), 1};
  if (slots_inner) {
    if (stride_head != int64_t(page_size) * stride_slot) return int(cudaErrorInvalidValue);
    *head_step = page_size / 8;
    const cuuint64_t dims[5] = {64, 8, cuuint64_t(blocks), cuuint64_t(heads) * cuuint64_t(page_size / 8), np};
    const cuuint64_t strides[4] = {by_slot, 128, 8 * by_slot, by_page};
    return encode_tiled<T>(map, base, 5, dims, strides, box);
  }
  if (stride_head != head_dim) return int(cudaErrorInvalidValue);
  *head_step = blocks;
  const cuuint64_t dims[5] = {64, 8, cuuint64_t(heads) * cuuint64_t(blocks), cuuint64_t(page_size / 8), np};
  const cuuint64_t strides[4] = {by_slot, 128, 8 * by_slot, by_page};
  return encode_tiled<T>(map, base, 5, dims, strides, box);
}

}  // namespace sm90
}  // namespace fij
