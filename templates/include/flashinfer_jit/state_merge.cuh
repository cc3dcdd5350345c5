// Merging attention states by log-sum-exp, in base 2 (as FlashInfer). Every merge of the project
// goes through StateMerger: the KV-split warps of a decode tile, the chunks of a split-KV tile, and
// the merge_state / merge_states ops.
//
// A state over a set of keys is (m, l, o): o = sum_j exp2(x_j - m) v_j unnormalised and
// l = sum_j exp2(x_j - m), for any m (usually the maximum of the x_j). A normalised state (v, s),
// with s its log-sum-exp, is (s, 1, v). Merging rescales every state to the common maximum:
//   m = max m_k;  w_k = exp2(m_k - m);  l = sum w_k l_k;  o = sum w_k o_k;  result o / l, lse m + log2 l.
// A state with m = -inf is empty (no keys); merging only empty states gives o = 0, lse = -inf.
#pragma once
#include "flashinfer_jit/common.cuh"

namespace fij {

template <int N>
struct StateMerger {
  float m = neg_inf();
  float l = 0.f;
  float acc[N];

  __device__ __forceinline__ StateMerger() {
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i] = 0.f;
  }

  // Fold in K states at once; what was merged before is rescaled if the maximum moves (online), so
  // a long list can be merged in batches whose loads are all in flight together. The o of a state
  // with m = -inf must be finite (it is multiplied by 0).
  template <int K>
  __device__ __forceinline__ void add(const float (&ms)[K], const float (&ls)[K], const float (&os)[K][N]) {
    float m_new = m;
#pragma unroll
    for (int k = 0; k < K; ++k) m_new = fmaxf(m_new, ms[k]);
    if (m_new == neg_inf()) return;  // only empty states so far
    if (m != neg_inf()) {            // (the first batch has nothing to rescale)
      const float rescale = exp2f(m - m_new);
      l *= rescale;
#pragma unroll
      for (int i = 0; i < N; ++i) acc[i] *= rescale;
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const float w = exp2f(ms[k] - m_new);
      l += w * ls[k];
#pragma unroll
      for (int i = 0; i < N; ++i) acc[i] += w * os[k][i];
    }
    m = m_new;
  }

  __device__ __forceinline__ float inv_sum() const { return l > 0.f ? 1.f / l : 0.f; }
  __device__ __forceinline__ float lse() const { return l > 0.f ? m + log2f(l) : neg_inf(); }
  // The merged, normalised output.
  __device__ __forceinline__ void normalized(float (&out)[N]) const {
    const float inv = inv_sum();
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = acc[i] * inv;
  }
};

}  // namespace fij
