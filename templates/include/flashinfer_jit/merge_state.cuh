// Merging partial attention states by their log-sum-exp (base 2, as FlashInfer).
//
// A state is (v, s): v the softmax-normalised output over a subset of keys, s = log2(sum exp2(x)) of
// that subset's scaled logits. The merge itself is StateMerger's (state_merge.cuh), shared with the
// attention kernels' split-KV merges. A state with s = -inf is empty (no keys). Merging only empty
// states gives v = 0, s = -inf.
#pragma once
#include "flashinfer_jit/common.cuh"
#include "flashinfer_jit/state_merge.cuh"

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
  const float ms[2] = {sa, sb}, ls[2] = {1.f, 1.f};  // normalised states
  float vs[2][8];
#pragma unroll
  for (int i = 0; i < 8; ++i) vs[0][i] = a[i], vs[1][i] = b[i];
  StateMerger<8> merged;
  merged.add(ms, ls, vs);
  float out[8];
  merged.normalized(out);
  const float s = merged.lse();
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
  const T* v_row = v + n * v_n + h * v_h + lane * 8;
  StateMerger<8> merged;
  for (int k = 0; k < num_states; ++k) {
    const float sk[1] = {s_row[k * s_k]}, one[1] = {1.f};
    if (sk[0] == neg_inf()) continue;  // empty state: its v may be garbage, never read it
    float x[1][8];
    load8(v_row + k * v_k, x[0]);
    merged.add(sk, one, x);
  }
  float acc[8];
  merged.normalized(acc);
  const float s_merged = merged.lse();
  store8(v_out + n * vo_n + h * vo_h + lane * 8, acc);
  if (lane == 0) s_out[n * so_n + h * so_h] = s_merged;
}

template <int HEAD_DIM>
inline unsigned merge_grid(int64_t num_rows, int num_heads) {
  using L = MergeLayout<HEAD_DIM>;
  return unsigned((num_rows * num_heads + L::kPairsPerBlock - 1) / L::kPairsPerBlock);
}

}  // namespace fij
