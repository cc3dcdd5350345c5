// Rotary position embedding (RoPE) with FlashInfer's semantics, for the standalone ops (rope.py:
// apply_rope*, apply_rope_pos_ids*), the sm90 fused-RoPE plans' pass over K, and gathers of paged K / V
// rows into ragged copies (rotary_dim 0: a copy; src_pages). Dims [0, rotary_dim) of
// every head rotate by angle pos * freq(i), freq(i) = rcp_scale * rcp_theta^(2i / rotary_dim) for pair i;
// non-interleaved pairs are (i, i + rotary_dim / 2) (rotate-half, Llama), interleaved ones (2i, 2i + 1)
// (GPT-J). The math is float32; dims past rotary_dim are copied (out-of-place) or left (in place).
#pragma once
#include <stdint.h>

#include "flashinfer_jit/common.cuh"

// The 16-byte kernel (rope_kernel_vec) for aligned rows: off until it has run on a GPU (rope_ab.sh).
#ifndef FIJ_ROPE_VEC
#define FIJ_ROPE_VEC 0
#endif

namespace fij {

// Mirrored by ctypes (flashinfer_jit/abi.py RopeParams); strides in elements.
struct RopeParams {
  const void* q;
  const void* k;
  void* q_out;  // == q for the in-place ops
  void* k_out;
  const int32_t* pos_ids;  // [nnz]
  int64_t q_stride_n, q_stride_h, k_stride_n, k_stride_h;
  int64_t qo_stride_n, qo_stride_h, ko_stride_n, ko_stride_h;
  int64_t nnz;
  int32_t num_q_heads, num_k_heads, rotary_dim;
  float rcp_scale, rcp_theta;
  const float* freqs;  // or nullptr: rotary_dim / 2 frequencies (the fused kernels' float64-exact table)
  // Paged input (gathers, num_q_heads == 0): k row `token` is slot pos_ids[token] % src_page_size of page
  // src_pages[token] (k_stride_n / k_stride_h within the page, src_stride_page between pages); else nullptr.
  const int32_t* src_pages;
  int64_t src_stride_page;
  int32_t src_page_size;
};

constexpr int kRopeThreads = 128;

__device__ __forceinline__ float rope_in(const half& x) { return __half2float(x); }
__device__ __forceinline__ float rope_in(const __nv_bfloat16& x) { return __bfloat162float(x); }
__device__ __forceinline__ void rope_out(half* to, float x) { *to = __float2half_rn(x); }
__device__ __forceinline__ void rope_out(__nv_bfloat16* to, float x) { *to = __float2bfloat16_rn(x); }

// cos / sin of a float32 angle: reduced by 2 pi in two parts first, so the fast __sincosf stays accurate
// for the long positions a KV cache reaches (its own reduction loses digits past a few hundred radians).
__device__ __forceinline__ void rope_sincos(float angle, float* s, float* c) {
  const float k = rintf(angle * 0.15915494309189535f);
  float r = fmaf(-k, 6.28318548202514648f, angle);
  r = fmaf(-k, -1.7484556e-07f, r);
  __sincosf(r, s, c);
}

// Head h of the token: q's heads first, then k's; its input row and its output row.
template <typename T>
__device__ __forceinline__ void rope_rows(const RopeParams& p, int64_t token, int h, const T** in, T** out) {
  const bool is_q = h < p.num_q_heads;
  const int hh = is_q ? h : h - p.num_q_heads;
  if (!is_q && p.src_pages != nullptr) {
    const int32_t slot = __ldg(p.pos_ids + token) % p.src_page_size;
    *in = static_cast<const T*>(p.k) + __ldg(p.src_pages + token) * p.src_stride_page + slot * p.k_stride_n +
          hh * p.k_stride_h;
  } else {
    *in = static_cast<const T*>(is_q ? p.q : p.k) + token * (is_q ? p.q_stride_n : p.k_stride_n) +
          hh * (is_q ? p.q_stride_h : p.k_stride_h);
  }
  *out = static_cast<T*>(is_q ? p.q_out : p.k_out) + token * (is_q ? p.qo_stride_n : p.ko_stride_n) +
         hh * (is_q ? p.qo_stride_h : p.ko_stride_h);
}

template <typename T, int HEAD_DIM, bool INTERLEAVE>
__global__ void __launch_bounds__(kRopeThreads) rope_kernel(const RopeParams p) {
  const int64_t token = blockIdx.x;
  const float pos = float(p.pos_ids[token]);
  const int half = p.rotary_dim / 2;
  const int heads = p.num_q_heads + p.num_k_heads;
  // one thread per (head, pair) of rotated dims, then per copied dim
  for (int e = threadIdx.x; e < heads * half; e += kRopeThreads) {
    const int h = e / half, i = e % half;
    const T* in;
    T* out;
    rope_rows(p, token, h, &in, &out);
    const int a = INTERLEAVE ? 2 * i : i, b = INTERLEAVE ? 2 * i + 1 : i + half;
    const float freq =
        p.freqs != nullptr ? __ldg(p.freqs + i) : p.rcp_scale * __powf(p.rcp_theta, float(2 * i) / float(p.rotary_dim));
    float s, c;
    rope_sincos(pos * freq, &s, &c);
    const float x = rope_in(in[a]), y = rope_in(in[b]);
    rope_out(out + a, x * c - y * s);
    rope_out(out + b, y * c + x * s);
  }
  if (p.q_out == p.q && p.k_out == p.k) return;  // in place: the unrotated dims stay
  const int rest = HEAD_DIM - p.rotary_dim;
  for (int e = threadIdx.x; e < heads * rest; e += kRopeThreads) {
    const int h = e / rest, d = p.rotary_dim + e % rest;
    const T* in;
    T* out;
    rope_rows(p, token, h, &in, &out);
    out[d] = in[d];
  }
}

// 16-byte form of rope_kernel, for rows whose rotated dims split into whole 16-byte chunks (the
// launcher checks: rotary_dim % 16 == 0, 16-byte aligned pointers and strides). One thread per
// (token, head, chunk): a non-interleaved chunk is 8 dims of the first half and the same 8 of the
// second, an interleaved one 4 adjacent pairs. The scalar kernel moves 2 bytes a thread and reached
// ~30 % of the copy bandwidth on the sm90 fused-RoPE path's pass over K.
template <typename T>
struct RopeVec8 {
  uint4 raw;
  __device__ __forceinline__ float get(int i) const { return rope_in(reinterpret_cast<const T*>(&raw)[i]); }
  __device__ __forceinline__ void set(int i, float x) { rope_out(reinterpret_cast<T*>(&raw) + i, x); }
};

__device__ __forceinline__ float rope_freq(const RopeParams& p, int i) {
  return p.freqs != nullptr ? __ldg(p.freqs + i) : p.rcp_scale * __powf(p.rcp_theta, float(2 * i) / float(p.rotary_dim));
}

template <typename T, int HEAD_DIM, bool INTERLEAVE>
__global__ void __launch_bounds__(kRopeThreads) rope_kernel_vec(const RopeParams p) {
  constexpr int kChunkDims = 8;
  const int heads = p.num_q_heads + p.num_k_heads;
  // chunks a head: rotated ones first (non-interleaved: one per 8 dims of the first half), then copied ones
  const int rot_chunks = INTERLEAVE ? p.rotary_dim / kChunkDims : p.rotary_dim / (2 * kChunkDims);
  const bool in_place = p.q_out == p.q && p.k_out == p.k;
  const int copy_chunks = in_place ? 0 : (HEAD_DIM - p.rotary_dim) / kChunkDims;
  const int per_head = rot_chunks + copy_chunks;
  const int64_t items = p.nnz * heads * per_head;
  for (int64_t e = blockIdx.x * int64_t(kRopeThreads) + threadIdx.x; e < items; e += int64_t(gridDim.x) * kRopeThreads) {
    const int64_t token = e / (heads * per_head);
    const int rest = int(e - token * (heads * per_head));
    const int h = rest / per_head, c = rest % per_head;
    const T* in;
    T* out;
    rope_rows(p, token, h, &in, &out);
    if (c >= rot_chunks) {  // a dim past rotary_dim: copied
      const int d = p.rotary_dim + (c - rot_chunks) * kChunkDims;
      *reinterpret_cast<uint4*>(out + d) = __ldg(reinterpret_cast<const uint4*>(in + d));
      continue;
    }
    const float pos = float(__ldg(p.pos_ids + token));
    if constexpr (INTERLEAVE) {
      const int d = c * kChunkDims;
      RopeVec8<T> v{__ldg(reinterpret_cast<const uint4*>(in + d))};
#pragma unroll
      for (int j = 0; j < kChunkDims / 2; ++j) {
        float s, co;
        rope_sincos(pos * rope_freq(p, d / 2 + j), &s, &co);
        const float x = v.get(2 * j), y = v.get(2 * j + 1);
        v.set(2 * j, x * co - y * s);
        v.set(2 * j + 1, y * co + x * s);
      }
      *reinterpret_cast<uint4*>(out + d) = v.raw;
    } else {
      const int half = p.rotary_dim / 2, d = c * kChunkDims;
      RopeVec8<T> a{__ldg(reinterpret_cast<const uint4*>(in + d))};
      RopeVec8<T> b{__ldg(reinterpret_cast<const uint4*>(in + d + half))};
#pragma unroll
      for (int j = 0; j < kChunkDims; ++j) {
        float s, co;
        rope_sincos(pos * rope_freq(p, d + j), &s, &co);
        const float x = a.get(j), y = b.get(j);
        a.set(j, x * co - y * s);
        b.set(j, y * co + x * s);
      }
      *reinterpret_cast<uint4*>(out + d) = a.raw;
      *reinterpret_cast<uint4*>(out + d + half) = b.raw;
    }
  }
}

// Whether rope_kernel_vec may run: every row's rotated and copied dims are whole, aligned 16-byte chunks.
template <typename T, int HEAD_DIM>
inline bool rope_vec_ok(const RopeParams& p) {
  constexpr int64_t kElems = 16 / int64_t(sizeof(T));
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  const bool strides = p.k_stride_n % kElems == 0 && p.k_stride_h % kElems == 0 && p.ko_stride_n % kElems == 0 &&
                       p.src_stride_page % kElems == 0 &&
                       p.ko_stride_h % kElems == 0 &&
                       (p.num_q_heads == 0 || (p.q_stride_n % kElems == 0 && p.q_stride_h % kElems == 0 &&
                                               p.qo_stride_n % kElems == 0 && p.qo_stride_h % kElems == 0));
  const bool pointers = aligned(p.k) && aligned(p.k_out) && (p.num_q_heads == 0 || (aligned(p.q) && aligned(p.q_out)));
  return p.rotary_dim % 16 == 0 && HEAD_DIM % 8 == 0 && strides && pointers;
}

// Grid of the 16-byte kernel: enough CTAs to fill the GPU a few times over, grid-striding past that.
inline unsigned rope_vec_grid(const RopeParams& p, int head_dim) {
  const int64_t items = p.nnz * (p.num_q_heads + p.num_k_heads) * (head_dim / 8);
  const int64_t ctas = (items + kRopeThreads - 1) / kRopeThreads;
  return unsigned(ctas < 65536 ? ctas : 65536);
}

}  // namespace fij
