// Online softmax over the S fragments of mma.sync m16n8k16 (sm80-class mainloops).
//
// A thread holds, per m16 tile mi, two rows (h = 0: lane / 4, h = 1: lane / 4 + 8); a row is spread
// over the 4 lanes of a quad. Each KV tile's scores x are turned into P = exp2(x * scale - M * scale),
// M the running row maximum, and the output accumulators are rescaled when M moves.
//
// `scale` multiplies the softmax input inside exp2 and must be positive, so the maximum of x * scale
// is M * scale with M the maximum of x: the running maximum is kept over the same values that are
// exponentiated. For plain attention x is the raw logit and scale = sm_scale * log2(e) (one FFMA per
// element); a variant that transforms logits (soft-cap, ALiBi, ...) passes transformed scores and
// scale = log2(e) (variant.cuh), so its maximum is over the transformed scores, not the raw ones.
//
// POLY_EIGHTHS (0..8; the sm90 kernel's FIJ_POLY_EXP2, switches_sm90.h): element e of n8 tile nt of a
// row takes its exp2 from exp2_poly when (2 * nt + e) % 8 < POLY_EIGHTHS, so that share of the exp2s
// runs on the FMA / integer pipes, spread evenly over the tile, and the rest on the MUFU. 0 (every
// exp2 on the MUFU) is the sm80 kernels' and the default.
#pragma once
#include "flashinfer_jit/common.cuh"

namespace fij {

// 2^x for the softmax's x <= 0 without the MUFU. A soft-capped score costs two MUFU ops (tanh, ex2) and
// the MUFU (16 ops / clock / SM) is then the kernel's bottleneck while the FMA pipe (128) has room
// (issue #12): 2^x = 2^floor(x) * p(x - floor(x)), p ~ 2^f on [0, 1) a degree-3 polynomial (minimax
// relative error with p(0) = 1: at most 8.6e-5 evaluated in fp32, below the 16-bit rounding of P;
// tests/test_exp2_poly.py reads the coefficients from here and checks them), floor(x) added to p's
// exponent bits. x <= -127, -inf (masked scores) included, gives exactly 0; (-127, -126) a value below
// 2^-126 (ex2.approx.ftz: 0); a NaN gives 0, not NaN.
__device__ __forceinline__ float exp2_poly(float x) {
  constexpr float kC1 = 0.695116758f, kC2 = 0.227644995f, kC3 = 0.0770670399f;
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23: kRound + n holds the integer n in its low mantissa bits
  x = fmaxf(x, -127.f);
  const float shifted = __fadd_rd(x, kRound);  // kRound + floor(x), exactly (rounded down to an integer)
  const float f = x - (shifted - kRound);      // x - floor(x) in [0, 1), exactly
  const float p = fmaf(fmaf(fmaf(kC3, f, kC2), f, kC1), f, 1.f);  // in [1, 2); 1 exactly at f = 0
  // shifted's 9 low bits are floor(x) in two's complement (the others shift out): add it to p's exponent
  // (x = -127: the 127 of p's biased exponent is cancelled, p = 1 leaves all bits 0)
  return __int_as_float(__float_as_int(p) + (__float_as_int(shifted) << 23));
}

template <typename T, int MQ, int NT_S, int NT_O, bool LAZY_RESCALE, int POLY_EIGHTHS = 0>
struct OnlineSoftmax {
  static_assert(POLY_EIGHTHS >= 0 && POLY_EIGHTHS <= 8, "the polynomial exp2's share is in eighths: 0..8");
  // Whether element e of n8 tile nt takes exp2_poly (see the file comment); constant once unrolled.
  __device__ __forceinline__ static constexpr bool poly_exp2(int nt, int e) { return (2 * nt + e) % 8 < POLY_EIGHTHS; }

  float row_max[MQ][2];  // running maximum of the softmax inputs (not multiplied by scale)
  float row_sum[MQ][2];  // this thread's part of the row sum (quad-reduced by total_sum)

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int mi = 0; mi < MQ; ++mi) {
      row_max[mi][0] = row_max[mi][1] = neg_inf();
      row_sum[mi][0] = row_sum[mi][1] = 0.f;
    }
  }

  // One KV tile, in two steps, so that a caller can overlap them with asynchronous MMAs (sm90):
  // exponentiate turns the scores s into P (fp32, in place), updates the running maxima and sums and
  // returns each row's correction factor (always a MUFU exp2); rescale applies the corrections to O. A
  // row that has seen no key keeps max -inf; exp2 of -inf is 0 (exp2_poly's too).
  __device__ __forceinline__ void exponentiate(float (&s)[MQ][NT_S][4], float scale, float (&correction)[MQ][2]) {
#pragma unroll
    for (int mi = 0; mi < MQ; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float mx = row_max[mi][h];
#pragma unroll
        for (int nt = 0; nt < NT_S; ++nt) mx = fmaxf(mx, fmaxf(s[mi][nt][2 * h], s[mi][nt][2 * h + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
        const float base = mx == neg_inf() ? 0.f : mx * scale;
        correction[mi][h] = exp2f(row_max[mi][h] * scale - base);
        row_max[mi][h] = mx;
        float sum = row_sum[mi][h] * correction[mi][h];
#pragma unroll
        for (int nt = 0; nt < NT_S; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float arg = fmaf(s[mi][nt][2 * h + e], scale, -base);
            const float x = poly_exp2(nt, e) ? exp2_poly(arg) : exp2f(arg);
            s[mi][nt][2 * h + e] = x;
            sum += x;
          }
        row_sum[mi][h] = sum;
      }
  }

  // With LAZY_RESCALE the rescale is skipped when no row of the warp moved.
  __device__ __forceinline__ void rescale(float (&o)[MQ][NT_O][4], const float (&correction)[MQ][2]) const {
#pragma unroll
    for (int mi = 0; mi < MQ; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (!LAZY_RESCALE || __any_sync(0xffffffff, correction[mi][h] != 1.f)) {
#pragma unroll
          for (int nt = 0; nt < NT_O; ++nt) {
            o[mi][nt][2 * h] *= correction[mi][h];
            o[mi][nt][2 * h + 1] *= correction[mi][h];
          }
        }
      }
  }

  // One KV tile at once (sm80): scores -> P packed to 16-bit pairs (the A operand of P V: half the
  // registers of S), and the O rows whose maximum moved rescaled.
  __device__ __forceinline__ void update(float (&s)[MQ][NT_S][4], uint32_t (&p)[MQ][NT_S][2],
                                         float (&o)[MQ][NT_O][4], float scale) {
    float correction[MQ][2];
    exponentiate(s, scale, correction);
#pragma unroll
    for (int mi = 0; mi < MQ; ++mi)
#pragma unroll
      for (int nt = 0; nt < NT_S; ++nt)
#pragma unroll
        for (int h = 0; h < 2; ++h) p[mi][nt][h] = Converter<T>::from_float2(s[mi][nt][2 * h], s[mi][nt][2 * h + 1]);
    rescale(o, correction);
  }

  // The whole row's sum (over the quad).
  __device__ __forceinline__ float total_sum(int mi, int h) const {
    float sum = row_sum[mi][h];
    sum += __shfl_xor_sync(0xffffffff, sum, 1);
    sum += __shfl_xor_sync(0xffffffff, sum, 2);
    return sum;
  }
  // The row maximum in exp2 units (what the state merge and the LSE use); -inf for an empty row.
  __device__ __forceinline__ float scaled_max(int mi, int h, float scale) const {
    return row_max[mi][h] == neg_inf() ? neg_inf() : row_max[mi][h] * scale;
  }
};

}  // namespace fij
