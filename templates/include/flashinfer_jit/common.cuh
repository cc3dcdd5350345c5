// Shared device helpers of flashinfer-jit kernels. No torch headers: kernel translation units
// include only CUDA headers so that they compile in seconds.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#ifdef FIJ_DEBUG_LAUNCH
#include <stdio.h>
#endif

#define FIJ_EXPORT extern "C" __attribute__((visibility("default")))

namespace fij {

// std::conditional without <type_traits> (kernel units include only CUDA headers).
template <bool COND, typename A, typename B>
struct Select {
  using type = A;
};
template <typename A, typename B>
struct Select<false, A, B> {
  using type = B;
};

template <typename T>
struct Converter;

template <>
struct Converter<half> {
  static __device__ __forceinline__ float2 to_float2(uint32_t bits) {
    return __half22float2(*reinterpret_cast<const __half2*>(&bits));
  }
  static __device__ __forceinline__ uint32_t from_float2(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

template <>
struct Converter<__nv_bfloat16> {
  static __device__ __forceinline__ float2 to_float2(uint32_t bits) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&bits));
  }
  static __device__ __forceinline__ uint32_t from_float2(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

// 8 consecutive 16-bit values <-> 8 floats through one 16-byte access.
template <typename T>
__device__ __forceinline__ void load8(const T* ptr, float (&out)[8]) {
  uint4 raw = *reinterpret_cast<const uint4*>(ptr);
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 f = Converter<T>::to_float2(words[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

template <typename T>
__device__ __forceinline__ void store8(T* ptr, const float (&in)[8]) {
  uint4 raw;
  raw.x = Converter<T>::from_float2(in[0], in[1]);
  raw.y = Converter<T>::from_float2(in[2], in[3]);
  raw.z = Converter<T>::from_float2(in[4], in[5]);
  raw.w = Converter<T>::from_float2(in[6], in[7]);
  *reinterpret_cast<uint4*>(ptr) = raw;
}

__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }

// Launch `kernel` and return this launch's status (or a sticky context error) as an int.
// cudaLaunchKernelEx reports the launch itself; `<<<>>>` + cudaGetLastError would also report
// whatever error another library left in the thread's last-error slot (the CUDA runtime is shared
// with torch), as if this launch had failed. A failure reported here is consumed from the slot.
template <typename... Expected, typename... Actual>
inline int launch(void (*kernel)(Expected...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                  Actual&&... args) {
#ifdef FIJ_DEBUG_LAUNCH
  const cudaError_t stale = cudaPeekAtLastError();
  if (stale != cudaSuccess) fprintf(stderr, "flashinfer-jit launch: stale error %d in the last-error slot\n", int(stale));
#endif
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  const cudaError_t err = cudaLaunchKernelEx(&config, kernel, static_cast<Actual&&>(args)...);
  if (err != cudaSuccess) (void)cudaGetLastError();
  return static_cast<int>(err);
}

}  // namespace fij

#define FIJ_DEFINE_ERROR_STRING(prefix) \
  FIJ_EXPORT const char* prefix##_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }
