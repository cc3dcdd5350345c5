// Appending tokens to a paged KV cache.
#pragma once
#include "flashinfer_jit/common.cuh"
#include "flashinfer_jit/quant.cuh"

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
  float k_rcp_scale;  // fp8 caches: stored = saturate(value / scale); 1 otherwise (unused)
  float v_rcp_scale;
};

// 8 values of T (one 16-byte read) into the cache's type TC: a 16-byte copy, or for an fp8 cache
// value * rcp_scale cast with saturation to the largest finite fp8 (an 8-byte store).
template <typename T, typename TC>
__device__ __forceinline__ void store_cache8(TC* dst, const T* src, float rcp_scale) {
  if constexpr (KvStorage<TC>::kFp8) {
    float x[8];
    load8(src, x);
    uint32_t words[2];
#pragma unroll
    for (int w = 0; w < 2; ++w) {
      const __nv_fp8x2_storage_t lo = __nv_cvt_float2_to_fp8x2(make_float2(x[4 * w] * rcp_scale, x[4 * w + 1] * rcp_scale),
                                                             __NV_SATFINITE, KvStorage<TC>::kKind);
      const __nv_fp8x2_storage_t hi = __nv_cvt_float2_to_fp8x2(
          make_float2(x[4 * w + 2] * rcp_scale, x[4 * w + 3] * rcp_scale), __NV_SATFINITE, KvStorage<TC>::kKind);
      words[w] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
    *reinterpret_cast<uint2*>(dst) = make_uint2(words[0], words[1]);
  } else {
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
  }
}

// One CTA per appended token; threads copy 8-element chunks of every head (TC: the cache's type, T or fp8). A token whose request,
// position or page lies outside the page table is not written (no out-of-bounds store).
template <int HEAD_DIM, typename T, typename TC>
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
    store_cache8(static_cast<TC*>(p.k_cache) + dst,
                 static_cast<const T*>(p.key) + i * p.key_stride_n + h * p.key_stride_h + chunk * 8, p.k_rcp_scale);
    store_cache8(static_cast<TC*>(p.v_cache) + dst,
                 static_cast<const T*>(p.value) + i * p.value_stride_n + h * p.value_stride_h + chunk * 8,
                 p.v_rcp_scale);
  }
}

}  // namespace fij
