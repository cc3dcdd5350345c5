// Appending tokens to a paged KV cache.
#pragma once
#include "flashinfer_jit/common.cuh"

namespace fij {

struct AppendParams {
  const void* key;    // [nnz, Hkv, D]
  const void* value;  // [nnz, Hkv, D]
  int64_t key_stride_n, key_stride_h, value_stride_n, value_stride_h;
  void* k_cache;      // page base of K
  void* v_cache;      // page base of V
  int64_t stride_page, stride_n, stride_h;  // shared by K and V
  const int32_t* batch_indices;  // [nnz]
  const int32_t* positions;      // [nnz]
  const int32_t* kv_indices;
  const int32_t* kv_indptr;      // [batch + 1]
  int64_t nnz;
  int32_t num_kv_heads;
  int32_t page_size;
  int32_t num_pages;
  int32_t batch;
};

// One CTA per appended token; threads copy 16-byte chunks of every head. A token whose request,
// position or page lies outside the page table is not written (no out-of-bounds store).
template <int HEAD_DIM, typename T>
__global__ void __launch_bounds__(128) append_paged_kernel(const __grid_constant__ AppendParams p) {
  constexpr int kChunks = HEAD_DIM / 8;
  const int64_t i = blockIdx.x;
  const int b = p.batch_indices[i];
  const int pos = p.positions[i];
  if (b < 0 || b >= p.batch || pos < 0) return;
  const int64_t slot = int64_t(p.kv_indptr[b]) + pos / p.page_size;
  if (slot >= p.kv_indptr[b + 1]) return;
  const int page = p.kv_indices[slot];
  if (page < 0 || page >= p.num_pages) return;
  const int64_t row = int64_t(page) * p.stride_page + int64_t(pos % p.page_size) * p.stride_n;
  for (int c = threadIdx.x; c < p.num_kv_heads * kChunks; c += blockDim.x) {
    const int h = c / kChunks, chunk = c % kChunks;
    const int64_t dst = row + h * p.stride_h + chunk * 8;
    *reinterpret_cast<uint4*>(static_cast<T*>(p.k_cache) + dst) = *reinterpret_cast<const uint4*>(
        static_cast<const T*>(p.key) + i * p.key_stride_n + h * p.key_stride_h + chunk * 8);
    *reinterpret_cast<uint4*>(static_cast<T*>(p.v_cache) + dst) = *reinterpret_cast<const uint4*>(
        static_cast<const T*>(p.value) + i * p.value_stride_n + h * p.value_stride_h + chunk * 8);
  }
}

}  // namespace fij
