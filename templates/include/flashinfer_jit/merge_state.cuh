// Merging partial attention states by their log-sum-exp (base 2, as FlashInfer).
//
// A state is (v, s): v the softmax-normalised output over a subset of keys, s = log2(sum exp2(x)) of
// that subset's scaled logits. Merging states a and b:
//   m = max(s_a, s_b);  w_a = exp2(s_a - m);  w_b = exp2(s_b - m)
//   v = (w_a v_a + w_b v_b) / (w_a + w_b);      s = m + log2(w_a + w_b)
// A state with s = -inf is empty (no keys). Merging only empty states gives v = 0, s = -inf.
#pragma once
#include "flashinfer_jit/common.cuh"

namespace fij {

constexpr int kMergeThreads = 128;

// One (row, head) pair is handled by HEAD_DIM / 8 consecutive threads, 8 elements each.
template <int HEAD_DIM>
struct MergeLayout {
  static constexpr int kSlice = HEAD_DIM / 8;
  static constexpr int kPairsPerBlock = kMergeThreads / kSlice;
  static_assert(HEAD_DIM % 8 == 0 && kSlice <= 32, "a (row, head) must fit in one warp");
};

// v_out/s_out may alias v_a/s_a (merge_state_in_place): every element is read before it is written
// by the same thread, and the s write waits for the slice's reads (__syncwarp).
template <int HEAD_DIM, typename T>
__global__ void __launch_bounds__(kMergeThreads) merge_two_kernel(
    const T* v_a, int64_t va_n, int64_t va_h, const float* s_a, int64_t sa_n, int64_t sa_h,
    const T* __restrict__ v_b, int64_t vb_n, int64_t vb_h, const float* __restrict__ s_b, int64_t sb_n,
    int64_t sb_h, T* v_out, int64_t vo_n, int64_t vo_h, float* s_out, int64_t so_n, int64_t so_h,
    const bool* __restrict__ mask, int64_t num_rows, int num_heads) {
  using L = MergeLayout<HEAD_DIM>;
  const int64_t pair = int64_t(blockIdx.x) * L::kPairsPerBlock + threadIdx.x / L::kSlice;
  const int lane = threadIdx.x % L::kSlice;
  const bool active = pair < num_rows * num_heads;
  const int64_t n = active ? pair / num_heads : 0;
  const int h = active ? int(pair % num_heads) : 0;
  const bool merge = active && (mask == nullptr || mask[n]);
  float sa = 0.f, sb = 0.f;
  float a[8], b[8];
  if (merge) {
    sa = s_a[n * sa_n + h * sa_h];
    sb = s_b[n * sb_n + h * sb_h];
    load8(v_a + n * va_n + h * va_h + lane * 8, a);
    load8(v_b + n * vb_n + h * vb_h + lane * 8, b);
  }
  __syncwarp();
  if (!merge) return;
  const float m = fmaxf(sa, sb);
  float out[8];
  float s;
  if (m == neg_inf()) {
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = 0.f;
    s = neg_inf();
  } else {
    const float wa = exp2f(sa - m), wb = exp2f(sb - m);
    const float inv = 1.f / (wa + wb);
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = (wa * a[i] + wb * b[i]) * inv;
    s = m + log2f(wa + wb);
  }
  store8(v_out + n * vo_n + h * vo_h + lane * 8, out);
  if (lane == 0) s_out[n * so_n + h * so_h] = s;
}

// Merge `num_states` states per (row, head): v [N, K, H, D], s [N, K, H] -> v_out [N, H, D], s_out [N, H].
template <int HEAD_DIM, typename T>
__global__ void __launch_bounds__(kMergeThreads) merge_many_kernel(
    const T* __restrict__ v, int64_t v_n, int64_t v_k, int64_t v_h, const float* __restrict__ s,
    int64_t s_n, int64_t s_k, int64_t s_h, T* __restrict__ v_out, int64_t vo_n, int64_t vo_h,
    float* __restrict__ s_out, int64_t so_n, int64_t so_h, int64_t num_rows, int num_states, int num_heads) {
  using L = MergeLayout<HEAD_DIM>;
  const int64_t pair = int64_t(blockIdx.x) * L::kPairsPerBlock + threadIdx.x / L::kSlice;
  const int lane = threadIdx.x % L::kSlice;
  if (pair >= num_rows * num_heads) return;
  const int64_t n = pair / num_heads;
  const int h = int(pair % num_heads);
  const float* s_row = s + n * s_n + h * s_h;
  float m = neg_inf();
  for (int k = 0; k < num_states; ++k) m = fmaxf(m, s_row[k * s_k]);
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  float s_merged = neg_inf();
  if (m != neg_inf()) {
    float denom = 0.f;
    const T* v_row = v + n * v_n + h * v_h + lane * 8;
    for (int k = 0; k < num_states; ++k) {
      const float w = exp2f(s_row[k * s_k] - m);
      if (w == 0.f) continue;  // empty state: its v may be garbage
      float x[8];
      load8(v_row + k * v_k, x);
      denom += w;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] += w * x[i];
    }
    const float inv = 1.f / denom;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] *= inv;
    s_merged = m + log2f(denom);
  }
  store8(v_out + n * vo_n + h * vo_h + lane * 8, acc);
  if (lane == 0) s_out[n * so_n + h * so_h] = s_merged;
}

template <int HEAD_DIM>
inline unsigned merge_grid(int64_t num_rows, int num_heads) {
  using L = MergeLayout<HEAD_DIM>;
  return unsigned((num_rows * num_heads + L::kPairsPerBlock - 1) / L::kPairsPerBlock);
}

}  // namespace fij
