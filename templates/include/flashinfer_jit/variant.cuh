// Attention variants: *what* a kernel computes, apart from *how* (mainloop, softmax, epilogue).
//
// A variant is a struct the kernels and the host planner are templated on. It answers:
//   - kv_range(token, q_len, kv_len): the keys [begin, end) one query token of a request may see.
//     The planner (tile sizes, work split), the kernel's tile skipping and its mask all derive their
//     ranges from this one function (host and device), so they cannot disagree. Ranges must be
//     monotone in the token (begin and end non-decreasing), which the causal mask and sliding windows
//     are: the union and intersection over a tile's tokens then follow from its first and last token.
//   - how raw logits q.k become the scores the softmax exponentiates (kTransformsLogits,
//     transform_logits, softmax_scale_log2): with no transform the positive sm_scale * log2(e) is
//     folded into exp2 (one FFMA), and the running maximum may be taken over raw logits because the
//     scale is positive; a non-linear transform (soft-cap, ALiBi, user snippets) is applied first and
//     the softmax then scales by log2(e) alone, so its maximum is over the transformed scores.
//   - mask(q, kv, head): an extra per-element mask (kMasksLogits), on top of kv_range.
//   - the query transform (kTransformsQuery) for RoPE-like variants.
// New variants are new structs here (or rendered from a spec), not branches in the kernels.
//
// Plain C++ when compiled by the host compiler (the planner), __host__ __device__ under nvcc.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define FIJ_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FIJ_HOST_DEVICE inline
#endif

namespace fij {

// Keys [begin, end) within one request; empty when end <= begin.
struct KvRange {
  int32_t begin, end;
};

FIJ_HOST_DEVICE int32_t clamp_to(int32_t x, int32_t lo, int32_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

// Keys some token of [first_token, last_token] sees (monotone variants: the first's begin, the last's end).
template <typename Variant>
FIJ_HOST_DEVICE KvRange kv_range_union(int32_t first_token, int32_t last_token, int32_t q_len, int32_t kv_len) {
  return KvRange{Variant::kv_range(first_token, q_len, kv_len).begin, Variant::kv_range(last_token, q_len, kv_len).end};
}

// Keys every token of [first_token, last_token] sees: tiles inside it need no mask.
template <typename Variant>
FIJ_HOST_DEVICE KvRange kv_range_common(int32_t first_token, int32_t last_token, int32_t q_len, int32_t kv_len) {
  return KvRange{Variant::kv_range(last_token, q_len, kv_len).begin, Variant::kv_range(first_token, q_len, kv_len).end};
}

// Plain softmax attention, optionally with FlashInfer's bottom-right aligned causal mask (query i
// of a request with q_len queries and kv_len keys sees keys j <= kv_len - q_len + i).
template <bool CAUSAL>
struct StandardAttention {
  static constexpr bool kCausal = CAUSAL;
  static constexpr bool kBoundedBelow = false;   // kv_range(t).begin is always 0
  static constexpr bool kTransformsLogits = false;
  static constexpr bool kMasksLogits = false;
  static constexpr bool kTransformsQuery = false;

  float scale_log2;  // sm_scale * log2(e)

  template <typename Params>
  FIJ_HOST_DEVICE explicit StandardAttention(const Params& p) : scale_log2(p.scale_log2) {}

  static FIJ_HOST_DEVICE KvRange kv_range(int32_t token, int32_t q_len, int32_t kv_len) {
    if (!CAUSAL) return KvRange{0, kv_len};
    return KvRange{0, clamp_to(token + (kv_len - q_len) + 1, 0, kv_len)};
  }

  // The factor exp2 applies to the softmax input: raw logits here (the scale is folded in).
  FIJ_HOST_DEVICE float softmax_scale_log2() const { return scale_log2; }

#if defined(__CUDACC__)
  __device__ __forceinline__ float transform_logits(float qk, int32_t, int32_t, int32_t) const { return qk; }
  __device__ __forceinline__ bool mask(int32_t, int32_t, int32_t) const { return true; }
  // Dims [dim0, dim0 + 8) and [dim0 + D/2, dim0 + D/2 + 8) of query (token, head), in place.
  __device__ __forceinline__ void transform_query(float (&)[8], float (&)[8], int32_t, int32_t, int32_t) const {}
#endif
};

}  // namespace fij
