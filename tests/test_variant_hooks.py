"""The prefill kernel's variant hooks compile into real kernels (CPU only: nvcc, no GPU).

The library's variants (variant.cuh: sliding window, soft-cap) use some of the hooks; a test variant
here turns every one on: a sliding-window kv_range (begin > 0), a logits transform (soft-cap, so the
softmax runs on transformed scores with scale log2(e)), an extra mask and query / key transforms with a
per-thread state (as fused RoPE has; the sm90 kernel's key walk too). It is
instantiated for the 64-row ragged kernel and the 16-row paged (KV-split warps) kernel, and (with and
without the query / key transforms) for the sm90 ragged and paged kernels, and compiled to sm_90a
machine code. Running such variants against a reference is the attention-variants
issue's job; this test keeps the hook interface honest until then.
"""
from __future__ import annotations

import subprocess

import pytest

from conftest import requires_nvcc
from flashinfer_jit import codegen, toolchain

pytestmark = [pytest.mark.slow, requires_nvcc]

SOURCE = r"""
#include "flashinfer_jit/prefill.cuh"
#include "flashinfer_jit/prefill_sm90.cuh"

struct WindowSoftCapVariant : fij::KeyRange<true, true> {  // causal, sliding window: kv_range begins > 0
  using Range = fij::KeyRange<true, true>;
  static constexpr bool kTransformsLogits = true;
  static constexpr bool kMasksLogits = true;
  static constexpr bool kTransformsQuery = true;
  static constexpr bool kTransformsKey = true;
  float cap;
  template <typename Params>
  __host__ __device__ explicit WindowSoftCapVariant(const Params& p) : Range(p), cap(30.f) {}
  __host__ __device__ float softmax_scale_log2() const { return 1.4426950408889634f; }
  template <typename Tile>
  __device__ float transform_logits(float qk, int, int, int, const Tile&) const { return cap * tanhf(qk / cap); }
  template <typename Tile>
  __device__ bool mask(int q, int kv, int, const Tile& w) const { return ((q + kv + w.request) & 1) == 0; }
  struct QKState {
    float factor;
  };
  __device__ QKState qk_state(int dim0) const { return QKState{1.0f / float(dim0 + 1)}; }
  template <typename Tile>
  __device__ void transform_query(const QKState& st, float (&lo)[8], float (&hi)[8], int, int, const Tile&) const {
    for (int i = 0; i < 8; ++i) lo[i] *= st.factor, hi[i] *= 0.5f;
  }
  template <typename Tile>
  __device__ void transform_key(const QKState& st, float (&lo)[8], float (&hi)[8], int key, int, const Tile&) const {
    for (int i = 0; i < 8; ++i) lo[i] *= st.factor * float(key), hi[i] *= 2.0f;
  }
  // the sm90 kernel's form of the key transform: a walk over a thread's keys
  template <int N>
  struct KeyWalk {
    float factor, key;
    int stride;
  };
  template <int N>
  __device__ KeyWalk<N> key_walk(int dim0, int stride) const { return KeyWalk<N>{1.0f / float(dim0 + 1), 0.f, stride}; }
  template <int N>
  __device__ void key_walk_start(KeyWalk<N>& k, int key0) const { k.key = float(key0); }
  template <int N>
  __device__ void transform_walked_key(KeyWalk<N>& k, float (&lo)[N], float (&hi)[N]) const {
    for (int i = 0; i < N; ++i) lo[i] *= k.factor * k.key, hi[i] *= 2.0f;
    k.key += float(k.stride);
  }
};

template int fij::launch_prefill<__nv_bfloat16, 128, 64, 64, WindowSoftCapVariant, false>(
    const fij::PrefillParams&, int, cudaStream_t);
template int fij::launch_prefill<half, 64, 16, 64, WindowSoftCapVariant, true>(
    const fij::PrefillParams&, int, cudaStream_t);

// The sm90 kernels: with every hook, and without the query / key transforms (no transform warps).
struct WindowSoftCapNoQuery : WindowSoftCapVariant {
  static constexpr bool kTransformsQuery = false;
  static constexpr bool kTransformsKey = false;
  using WindowSoftCapVariant::WindowSoftCapVariant;
};
template int fij::sm90::launch_prefill<__nv_bfloat16, 128, 128, WindowSoftCapVariant, false>(
    const fij::PrefillParams&, int, cudaStream_t);
template int fij::sm90::launch_prefill<half, 64, 128, WindowSoftCapNoQuery, true>(
    const fij::PrefillParams&, int, cudaStream_t);
template int fij::sm90::launch_prefill<half, 256, 64, WindowSoftCapVariant, true>(
    const fij::PrefillParams&, int, cudaStream_t);
"""


def test_every_variant_hook_compiles(tmp_path):
    source = tmp_path / "variant_hooks.cu"
    source.write_text(SOURCE)
    cmd = [str(toolchain.nvcc_path()), *toolchain.nvcc_flags(("90a",)), "-I", str(codegen.include_dir()),
           "-cubin", "-o", str(tmp_path / "variant_hooks.cubin"), str(source)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"nvcc failed on the hook variant:\n{result.stderr[-4000:]}"
    assert (tmp_path / "variant_hooks.cubin").stat().st_size > 10_000
