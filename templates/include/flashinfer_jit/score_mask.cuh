// The variant's logits transform and mask applied to m16 tiles of S accumulator fragments, the layout
// mma.sync and wgmma share (n8 tile nt: s[nt][2h + e] at fragment row h, key key0 + 8 nt + e, with key0
// the thread's first key). Used by the sm80 and sm90 mainloops alike: keys outside a row's kv_range (or
// the item's chunk) or refused by variant.mask get -inf; only tiles that can hold such keys are masked.
#pragma once
#include "flashinfer_jit/common.cuh"
#include "flashinfer_jit/gqa.cuh"
#include "flashinfer_jit/tile_scheduler.cuh"
#include "flashinfer_jit/variant.cuh"

namespace fij {

// MQ m16 tiles: rows[mi][h] is the (token, head) of fragment row h of tile mi; pos0 the KV tile's first key.
template <typename Variant, int KV_TILE, int MQ, int NT>
__device__ __forceinline__ void score_and_mask_fragments(const Variant& variant, const WorkTile& w,
                                                         const PackedRow (&rows)[MQ][2], int pos0, int key0,
                                                         float (&s)[MQ][NT][4]) {
  if constexpr (Variant::kTransformsLogits) {
#pragma unroll
    for (int mi = 0; mi < MQ; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if constexpr (HasRowLogits<Variant>::value) {  // the per-row form: row terms once, then a constant offset
          const auto row = variant.logits_row(rows[mi][h].token, key0, rows[mi][h].head, w);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e)
              s[mi][nt][2 * h + e] = variant.transform_row_logits(s[mi][nt][2 * h + e], row, nt * 8 + e);
        } else {
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e)
              s[mi][nt][2 * h + e] = variant.transform_logits(s[mi][nt][2 * h + e], rows[mi][h].token,
                                                              key0 + nt * 8 + e, rows[mi][h].head, w);
        }
      }
  }
  const bool edge = pos0 + KV_TILE > w.unmasked.end || (Variant::kBoundedBelow && pos0 < w.unmasked.begin);
  if (edge || Variant::kMasksLogits) {
#pragma unroll
    for (int mi = 0; mi < MQ; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const PackedRow pr = rows[mi][h];
        const KvRange visible = variant.kv_range(pr.token, w.q_len, w.kv_len);
        const int end = min(w.kv.end, visible.end);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int key = key0 + nt * 8 + e;
            const bool hidden = key >= end || (Variant::kBoundedBelow && key < visible.begin) ||
                                (Variant::kMasksLogits && !variant.mask(pr.token, key, pr.head, w));
            if (hidden) s[mi][nt][2 * h + e] = neg_inf();
          }
      }
  }
}

}  // namespace fij
