// Attention variants: *what* a kernel computes, apart from *how* (mainloop, softmax, epilogue).
//
// A variant is a struct the kernels and the host planner are templated on. It answers:
//   - kv_range(token, q_len, kv_len): the keys [begin, end) one query token of a request may see,
//     from its key-range rule (Variant::Range: causal, sliding window), an object of run-time values
//     (the window size) built from the plan's config on the host and from the launch's params on the
//     device. The planner (tile sizes, work split), the kernel's tile skipping and its mask all derive
//     their ranges from this one function (host and device), so they cannot disagree. Ranges must be
//     monotone in the token (begin and end non-decreasing), which the causal mask and sliding windows
//     are: the union and intersection over a tile's tokens then follow from its first and last token.
//   - how raw logits q.k become the scores the softmax exponentiates (kTransformsLogits,
//     transform_logits, softmax_scale_log2): with no transform the positive sm_scale * log2(e) is
//     folded into exp2 (one FFMA), and the running maximum may be taken over raw logits because the
//     scale is positive; a non-linear transform (soft-cap, ALiBi, user snippets) is applied first and
//     the softmax then scales by log2(e) alone, so its maximum is over the transformed scores. A variant
//     whose transform splits by row (optional member kRowLogits = true) also gives logits_row and
//     transform_row_logits: row terms once per row and KV tile, then a compile-time key offset per element.
//   - mask(q, kv, head, tile): an extra per-element mask (kMasksLogits), on top of kv_range. The hooks
//     get the work tile (its request, q_len, kv_len) as their last argument.
//   - query and key transforms (kTransformsQuery, kTransformsKey: RoPE), applied in shared memory to
//     8 dims of a row and the 8 rotate-half partners D/2 further (lo, hi), in float32, with a per-thread
//     state for those dims (qk_state(dim0), built once: each thread keeps its dims for the whole kernel).
//     The sm90 kernel applies the key transform as a walk over a thread's rows (key_walk*:
//     transform_sm90.cuh), which must give the same keys as transform_key.
// New variants are new structs here (or rendered from a spec), not branches in the kernels.
//
// Plain C++ when compiled by the host compiler (the planner), __host__ __device__ under nvcc.
#pragma once
#include <stdint.h>
#if defined(__CUDACC__)
#include "flashinfer_jit/rope.cuh"  // rope_sincos
#endif

#if defined(__CUDACC__)
#define FIJ_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FIJ_HOST_DEVICE inline
#endif

namespace fij {

// Whether Variant declares kRowLogits = true (optional: a variant without the member has no per-row form).
template <typename Variant, typename = void>
struct HasRowLogits {
  static constexpr bool value = false;
};
template <typename Variant>
struct HasRowLogits<Variant, decltype(void(Variant::kRowLogits))> {
  static constexpr bool value = Variant::kRowLogits;
};

// Keys [begin, end) within one request; empty when end <= begin.
struct KvRange {
  int32_t begin, end;
};

FIJ_HOST_DEVICE int32_t clamp_to(int32_t x, int32_t lo, int32_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

// Keys some token of [first_token, last_token] sees (monotone variants: the first's begin, the last's end).
template <typename Range>
FIJ_HOST_DEVICE KvRange kv_range_union(const Range& range, int32_t first_token, int32_t last_token, int32_t q_len,
                                       int32_t kv_len) {
  return KvRange{range.kv_range(first_token, q_len, kv_len).begin, range.kv_range(last_token, q_len, kv_len).end};
}

// Keys every token of [first_token, last_token] sees: tiles inside it need no mask.
template <typename Range>
FIJ_HOST_DEVICE KvRange kv_range_common(const Range& range, int32_t first_token, int32_t last_token, int32_t q_len,
                                        int32_t kv_len) {
  return KvRange{range.kv_range(last_token, q_len, kv_len).begin, range.kv_range(first_token, q_len, kv_len).end};
}

// The keys a query sees, FlashInfer's semantics. A query's position among its request's keys is
// pos = token + kv_len - q_len (bottom-right aligned). CAUSAL: keys j <= pos. WINDOW (sliding window,
// run-time size window_left >= 0): keys j >= pos - window_left, so a causal query sees window_left + 1
// keys. `P` is the plan's config (host) or the launch's params (device): both carry window_left.
template <bool CAUSAL, bool WINDOW>
struct KeyRange {
  static constexpr bool kCausal = CAUSAL;
  static constexpr bool kBoundedBelow = WINDOW;  // without a window kv_range(t).begin is always 0
  int32_t window_left;

  template <typename P>
  FIJ_HOST_DEVICE explicit KeyRange(const P& p) : window_left(WINDOW ? p.window_left : -1) {}

  FIJ_HOST_DEVICE KvRange kv_range(int32_t token, int32_t q_len, int32_t kv_len) const {
    const int32_t pos = token + (kv_len - q_len);
    const int32_t end = CAUSAL ? clamp_to(pos + 1, 0, kv_len) : kv_len;
    const int32_t begin = WINDOW ? clamp_to(pos - window_left, 0, end) : 0;
    return KvRange{begin, end};
  }
};

// Plain softmax attention over the keys of KeyRange<CAUSAL, WINDOW>.
template <bool CAUSAL, bool WINDOW = false>
struct StandardAttention : KeyRange<CAUSAL, WINDOW> {
  using Range = KeyRange<CAUSAL, WINDOW>;
  static constexpr bool kTransformsLogits = false;
  static constexpr bool kMasksLogits = false;
  static constexpr bool kTransformsQuery = false;
  static constexpr bool kTransformsKey = false;

  float scale_log2;  // sm_scale * log2(e)

  template <typename Params>
  FIJ_HOST_DEVICE explicit StandardAttention(const Params& p) : Range(p), scale_log2(p.scale_log2) {}

  // The factor exp2 applies to the softmax input: raw logits here (the scale is folded in).
  FIJ_HOST_DEVICE float softmax_scale_log2() const { return scale_log2; }

#if defined(__CUDACC__)
  template <typename Tile>
  __device__ __forceinline__ float transform_logits(float qk, int32_t, int32_t, int32_t, const Tile&) const {
    return qk;
  }
  template <typename Tile>
  __device__ __forceinline__ bool mask(int32_t, int32_t, int32_t, const Tile&) const { return true; }
  // The per-thread state of the query / key transforms for dims [dim0, dim0 + 8) (and their partners).
  struct QKState {};
  __device__ __forceinline__ QKState qk_state(int32_t) const { return {}; }
  // Dims [dim0, dim0 + 8) (lo) and [dim0 + D/2, dim0 + D/2 + 8) (hi) of query (token, head), in place.
  template <typename Tile>
  __device__ __forceinline__ void transform_query(const QKState&, float (&)[8], float (&)[8], int32_t, int32_t,
                                                  const Tile&) const {}
  // The same dims of key `key` (its index in the request's KV) of KV head kv_head, in place.
  template <typename Tile>
  __device__ __forceinline__ void transform_key(const QKState&, float (&)[8], float (&)[8], int32_t, int32_t,
                                                const Tile&) const {}
  // The key transform as a walk (the sm90 kernel's producer warps): a thread keeps dims [dim0, dim0 + N)
  // (and partners) and visits keys key0, key0 + stride, ...: key_walk once, key_walk_start(key0) per tile,
  // then transform_walked_key per key, which also steps the walk to the next key.
  template <int N>
  struct KeyWalk {};
  template <int N>
  __device__ __forceinline__ KeyWalk<N> key_walk(int32_t, int32_t) const { return {}; }
  template <int N>
  __device__ __forceinline__ void key_walk_start(KeyWalk<N>&, int32_t) const {}
  template <int N>
  __device__ __forceinline__ void transform_walked_key(KeyWalk<N>&, float (&)[N], float (&)[N]) const {}
#endif
};

// Logits soft-capping (Gemma 2; FlashInfer's logits_soft_cap): score = cap * tanh(sm_scale * q.k / cap).
// The launch's params carry pre_tanh = sm_scale / cap in soft_cap_pre_tanh and cap * log2(e) in
// scale_log2, so the kernel computes tanh(q.k * pre_tanh) and the softmax's exp2 scales by cap * log2(e)
// (positive: its running maximum over the tanh values is the maximum of the scores).
template <bool CAUSAL, bool WINDOW = false>
struct SoftCapAttention : StandardAttention<CAUSAL, WINDOW> {
  static constexpr bool kTransformsLogits = true;

  float pre_tanh;

  template <typename Params>
  FIJ_HOST_DEVICE explicit SoftCapAttention(const Params& p)
      : StandardAttention<CAUSAL, WINDOW>(p), pre_tanh(p.soft_cap_pre_tanh) {}

#if defined(__CUDACC__)
  template <typename Tile>
  __device__ __forceinline__ float transform_logits(float qk, int32_t, int32_t, int32_t, const Tile&) const {
    float t;
    asm("tanh.approx.f32 %0, %1;" : "=f"(t) : "f"(qk * pre_tanh));  // MUFU.TANH, what FlashInfer uses
    return t;
  }
#endif
};

// ALiBi (FlashInfer's pos_encoding_mode="ALIBI"): score = sm_scale * q.k + slope(head) * (key - pos), pos the
// query's position among the request's keys (bottom-right aligned, as the causal mask), so the bias is 0 on
// the query's own position and falls with the distance. The launch's params carry the slopes times log2(e)
// (p.alibi_slopes_log2, one float per query head) and sm_scale * log2(e) in scale_log2: the transform
// returns scores in base 2, and the softmax's exp2 scales by 1.
template <bool CAUSAL, bool WINDOW = false>
struct AlibiAttention : StandardAttention<CAUSAL, WINDOW> {
  static constexpr bool kTransformsLogits = true;
  static constexpr bool kRowLogits = true;

  const float* slopes_log2;

  template <typename Params>
  FIJ_HOST_DEVICE explicit AlibiAttention(const Params& p)
      : StandardAttention<CAUSAL, WINDOW>(p), slopes_log2(p.alibi_slopes_log2) {}

  FIJ_HOST_DEVICE float softmax_scale_log2() const { return 1.0f; }

#if defined(__CUDACC__)
  template <typename Tile>
  __device__ __forceinline__ float transform_logits(float qk, int32_t token, int32_t key, int32_t head,
                                                    const Tile& w) const {
    const int32_t pos = token + (w.kv_len - w.q_len);
    return fmaf(qk, this->scale_log2, __ldg(slopes_log2 + head) * float(key - pos));
  }
  // The same transform split by row (kRowLogits): logits_row once per fragment row and KV tile (the
  // thread's first key key0), then transform_row_logits per element at key key0 + dk, dk a compile-time
  // constant in the unrolled fragment loops. Per element that is two FFMAs, where the form above costs an
  // add, a sub, an int -> float conversion, an FMUL and an FFMA (SASS, sm_90a hd128: 128 I2FP a tile).
  struct LogitsRow {
    float slope, bias0;  // slope(head) * log2(e); the bias at key0
  };
  template <typename Tile>
  __device__ __forceinline__ LogitsRow logits_row(int32_t token, int32_t key0, int32_t head, const Tile& w) const {
    const float slope = __ldg(slopes_log2 + head);
    return LogitsRow{slope, slope * float(key0 - (token + (w.kv_len - w.q_len)))};
  }
  __device__ __forceinline__ float transform_row_logits(float qk, const LogitsRow& row, int32_t dk) const {
    return fmaf(qk, this->scale_log2, fmaf(row.slope, float(dk), row.bias0));
  }
#endif
};

// Fused rotary embedding (FlashInfer's pos_encoding_mode="ROPE_LLAMA") on top of any variant: q and k
// rotate in float32 inside the kernel (K is stored unrotated), non-interleaved (rotate-half) pairs
// (i, i + D/2) by angle position * freq(i); a query's position is token + kv_len - q_len, a key's its
// index in the request's KV (FlashInfer's definitions). freq(i) = theta^(-2i / D) / rope_scale comes as
// a table (p.rope_freqs, D/2 floats on the device) that plan() computes in double precision: FlashInfer's
// powf(rcp_theta, 2i / D) under fast math is ~1e-6 off, 0.03 radians at position 32k.
template <typename Base>
struct WithRope : Base {
  static constexpr bool kTransformsQuery = true;
  static constexpr bool kTransformsKey = true;
  const float* freqs;

  template <typename Params>
  FIJ_HOST_DEVICE explicit WithRope(const Params& p) : Base(p), freqs(p.rope_freqs) {}

#if defined(__CUDACC__)
  struct QKState {
    float freq[8];  // of pairs dim0 .. dim0 + 7
  };
  __device__ __forceinline__ QKState qk_state(int32_t dim0) const {
    QKState st;
#pragma unroll
    for (int i = 0; i < 8; ++i) st.freq[i] = __ldg(freqs + dim0 + i);
    return st;
  }
  __device__ __forceinline__ static void rotate(const QKState& st, float (&lo)[8], float (&hi)[8], float position) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      float s, c;
      rope_sincos(position * st.freq[i], &s, &c);
      const float x = lo[i], y = hi[i];
      lo[i] = x * c - y * s;
      hi[i] = y * c + x * s;
    }
  }
  template <typename Tile>
  __device__ __forceinline__ void transform_query(const QKState& st, float (&lo)[8], float (&hi)[8], int32_t token,
                                                  int32_t, const Tile& w) const {
    rotate(st, lo, hi, float(token + (w.kv_len - w.q_len)));
  }
  template <typename Tile>
  __device__ __forceinline__ void transform_key(const QKState& st, float (&lo)[8], float (&hi)[8], int32_t key,
                                                int32_t, const Tile&) const {
    rotate(st, lo, hi, float(key));
  }
  // The walk: the rotation (c, s) of the current key, advanced by e^{i stride freq} per key (4 FMA-class
  // ops a dim instead of a sincos; the error grows by ~1 ulp a step and restarts every tile).
  template <int N>
  struct KeyWalk {
    int32_t dim0;
    float step_c[N], step_s[N], c[N], s[N];
  };
  template <int N>
  __device__ __forceinline__ KeyWalk<N> key_walk(int32_t dim0, int32_t stride) const {
    KeyWalk<N> k;
    k.dim0 = dim0;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      rope_sincos(float(stride) * __ldg(freqs + dim0 + i), &k.step_s[i], &k.step_c[i]);
      k.c[i] = 1.f, k.s[i] = 0.f;
    }
    return k;
  }
  // (the frequencies are read again, from L1, rather than kept: the walk runs in the producer's registers)
  template <int N>
  __device__ __forceinline__ void key_walk_start(KeyWalk<N>& k, int32_t key0) const {
#pragma unroll
    for (int i = 0; i < N; ++i) rope_sincos(float(key0) * __ldg(freqs + k.dim0 + i), &k.s[i], &k.c[i]);
  }
  template <int N>
  __device__ __forceinline__ void transform_walked_key(KeyWalk<N>& k, float (&lo)[N], float (&hi)[N]) const {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float x = lo[i], y = hi[i], c = k.c[i], s = k.s[i];
      lo[i] = x * c - y * s;
      hi[i] = y * c + x * s;
      k.c[i] = c * k.step_c[i] - s * k.step_s[i];
      k.s[i] = s * k.step_c[i] + c * k.step_s[i];
    }
  }
#endif
};

// FlashInfer's custom mask (plan's custom_mask / packed_custom_mask) on top of any variant: request r's
// [q_len, kv_len] boolean mask, row-major, packed little-endian into bytes from p.mask_offsets[r] of
// p.custom_mask (each request's segment starts on a byte). A false bit hides the key from the query.
template <typename Base>
struct WithCustomMask : Base {
  static constexpr bool kMasksLogits = true;
  const uint8_t* bits;
  const int64_t* offsets;

  template <typename Params>
  FIJ_HOST_DEVICE explicit WithCustomMask(const Params& p)
      : Base(p), bits(static_cast<const uint8_t*>(p.custom_mask)), offsets(static_cast<const int64_t*>(p.mask_offsets)) {}

#if defined(__CUDACC__)
  template <typename Tile>
  __device__ __forceinline__ bool mask(int32_t q, int32_t kv, int32_t head, const Tile& w) const {
    const int64_t bit = int64_t(q) * w.kv_len + kv;
    return ((__ldg(bits + offsets[w.request] + (bit >> 3)) >> (bit & 7)) & 1) && Base::mask(q, kv, head, w);
  }
#endif
};

}  // namespace fij
