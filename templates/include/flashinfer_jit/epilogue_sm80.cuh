// Epilogue of the sm80 mainloop: from mma accumulator fragments to output rows (epilogue.cuh's
// row sinks). With KV-split warps (decode-sized tiles) the warps' states of the same rows are first
// merged through shared memory by StateMerger.
#pragma once
#include "flashinfer_jit/epilogue.cuh"
#include "flashinfer_jit/mainloop_sm80.cuh"

namespace fij {

template <typename T, int HEAD_DIM, typename Mainloop>
__device__ __forceinline__ void store_output_sm80(const PrefillParams& p, const WorkItem& item, const WorkTile& w,
                                                  int hk, const typename Mainloop::State& st, float scale,
                                                  uint8_t* smem) {
  using S = typename Mainloop::S;
  constexpr int MQ = Mainloop::MQ;
  constexpr int CTA_Q = S::kWarpsQ * 16 * MQ;
  const typename Mainloop::Coords c = Mainloop::Coords::of(threadIdx.x);
  if constexpr (S::kWarpsKV == 1) {
#pragma unroll
    for (int mi = 0; mi < MQ; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float sum = st.softmax.total_sum(mi, h);
        const float inv = sum > 0.f ? st.out_scale / sum : 0.f;  // out_scale: fp8 caches' v_scale
        const float lse = sum > 0.f ? st.softmax.row_max[mi][h] * scale + log2f(sum) : neg_inf();
        const int r = c.row(mi, h);
        if (r >= w.rows) continue;
        to_row_sink<T, HEAD_DIM>(p, item, w.q_start, r, hk, [&](const auto& row) {
          store_fragment_row(row, c.lane_t, st.o[mi], h, inv, lse);
        });
      }
  } else {
    // The KV warps hold states of the same rows over different keys: each stores its unnormalised
    // O, scaled row maximum and row sum in shared memory (over the K/V stages, free after this
    // barrier), then every thread merges one segment of one row across the warps.
    static_assert(MQ == 1, "KV-split warps hold one m16 tile each");
    __syncthreads();
    float* sO = reinterpret_cast<float*>(Mainloop::k_smem(smem));
    float* sM = sO + S::kWarpsKV * CTA_Q * S::kMergeRowFloats;
    float* sL = sM + S::kWarpsKV * CTA_Q;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float sum = st.softmax.total_sum(0, h);
      const int slot = c.warp_kv * CTA_Q + c.row(0, h);
      float* dst = sO + slot * S::kMergeRowFloats + 2 * c.lane_t;
#pragma unroll
      for (int nt = 0; nt < S::kNtO; ++nt)
        *reinterpret_cast<float2*>(dst + nt * 8) = make_float2(st.o[0][nt][2 * h], st.o[0][nt][2 * h + 1]);
      if (c.lane_t == 0) {
        sM[slot] = st.softmax.scaled_max(0, h, scale);
        sL[slot] = sum;
      }
    }
    __syncthreads();
    constexpr int kSegs = S::kThreads / CTA_Q;  // threads per row
    constexpr int kSegFloats = HEAD_DIM / kSegs;
    static_assert(kSegs * CTA_Q == S::kThreads && kSegFloats % 8 == 0, "uneven merge split");
    const int r = threadIdx.x / kSegs, seg = threadIdx.x % kSegs;
    float ms[S::kWarpsKV], ls[S::kWarpsKV], os[S::kWarpsKV][kSegFloats];
#pragma unroll
    for (int wk = 0; wk < S::kWarpsKV; ++wk) {
      ms[wk] = sM[wk * CTA_Q + r];
      ls[wk] = sL[wk * CTA_Q + r];
      const float4* src = reinterpret_cast<const float4*>(sO + (wk * CTA_Q + r) * S::kMergeRowFloats + seg * kSegFloats);
#pragma unroll
      for (int i = 0; i < kSegFloats / 4; ++i) {
        const float4 x = src[i];
        os[wk][4 * i] = x.x, os[wk][4 * i + 1] = x.y, os[wk][4 * i + 2] = x.z, os[wk][4 * i + 3] = x.w;
      }
    }
    StateMerger<kSegFloats> merged;
    merged.add(ms, ls, os);
    float out[kSegFloats];
    merged.normalized(out);
#pragma unroll
    for (int i = 0; i < kSegFloats; ++i) out[i] *= st.out_scale;  // fp8 caches' v_scale (else 1)
    const float lse = merged.lse();
    if (r < w.rows) {
      to_row_sink<T, HEAD_DIM>(p, item, w.q_start, r, hk, [&](const auto& row) {
        row.advance(seg * kSegFloats).store(0, out);
        if (seg == 0) row.store_lse(lse);
      });
    }
  }
}

}  // namespace fij
