// FP8 KV storage (FlashInfer's kv_data_type float8_e4m3fn / float8_e5m2): what the kernels need to read
// it. Pages hold fp8; the FA2-class mainloop copies fp8 tiles into shared memory as they are (half the
// bytes of a 16-bit tile) and widens them there into the 16-bit tiles its tensor cores read. No 16-bit
// copy of the cache exists anywhere. k_scale / v_scale are applied outside (mainloop_sm80.cuh: k_scale
// to the logits in float32, v_scale in the output's normalization).
#pragma once
#include <cuda_fp8.h>
#include <stdint.h>

#include "flashinfer_jit/common.cuh"

namespace fij {

template <typename T>
struct KvStorage {
  static constexpr bool kFp8 = false;
};
template <>
struct KvStorage<__nv_fp8_e4m3> {
  static constexpr bool kFp8 = true;
  static constexpr __nv_fp8_interpretation_t kKind = __NV_E4M3;
};
template <>
struct KvStorage<__nv_fp8_e5m2> {
  static constexpr bool kFp8 = true;
  static constexpr __nv_fp8_interpretation_t kKind = __NV_E5M2;
};

// 8 consecutive fp8 values (one 8-byte shared-memory read) -> 8 floats; two values per conversion
// instruction (cvt.rn.f16x2.e4m3x2 / .e5m2x2 on sm_89+), exact (every fp8 value is an fp16 value).
template <typename TKV>
__device__ __forceinline__ void widen8(const TKV* ptr, float (&out)[8]) {
  const uint2 raw = *reinterpret_cast<const uint2*>(ptr);
  const uint32_t words[2] = {raw.x, raw.y};
#pragma unroll
  for (int w = 0; w < 2; ++w) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const __nv_fp8x2_storage_t pair = __nv_fp8x2_storage_t(words[w] >> (16 * i));
      const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(pair, KvStorage<TKV>::kKind);
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h));
      out[4 * w + 2 * i] = f.x;
      out[4 * w + 2 * i + 1] = f.y;
    }
  }
}

}  // namespace fij
