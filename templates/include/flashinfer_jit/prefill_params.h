// Run-time parameters of one batch-prefill launch, filled by the Python side (a ctypes mirror:
// flashinfer_jit's ABI mirrors, checked field by field at compile time) and passed by value
// (__grid_constant__). Host and device.
#pragma once
#include <stdint.h>

#include "flashinfer_jit/prefill_plan.h"

namespace fij {

struct PrefillParams {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  float* lse;  // [total_q, Hq] or nullptr
  int64_t q_stride_n, q_stride_h;
  int64_t k_stride_n, k_stride_h;
  int64_t v_stride_n, v_stride_h;
  int64_t o_stride_n, o_stride_h;
  const WorkItem* items;  // each carries its request's offsets and lengths (no indptr on the device)
  const int32_t* counts;  // [num_items, num_merges], on the device (fixed grids under CUDA graphs)
  float* partial_o;       // [partial_rows, Hkv, D] fp32
  float* partial_lse;     // [partial_rows, Hkv]
  int32_t num_qo_heads;
  int32_t num_kv_heads;
  int32_t group;
  float scale_log2;       // sm_scale * log2(e)
  int32_t cta_q;
  int32_t page_size;        // paged layouts: tokens per page
  // Paged layouts: a request's pages are page_indices[WorkItem::page_start ..); token t of a page
  // starts at page * stride_page + t * {k,v}_stride_n (K and V share the strides).
  const int32_t* page_indices;
  int64_t stride_page;
  // Rows of q and of k / v (pages for paged layouts) as the run's tensors have them: the bounds of the
  // sm90 kernel's tensor maps (rows past them read as zeros).
  int64_t q_rows;
  int64_t kv_rows;
  uint32_t page_div_mul;    // pos / page_size == (umulhi(pos, mul) + pos) >> shift
  int32_t page_div_shift;
  int32_t* merge_counters;  // [merges, Hkv], zero between runs: chunks of a split tile that finished
  // Set by launch_prefill for the aligned-pages kernel: row d of a tile lies (d >> page_row_shift)
  // pages after the tile's first, at (d & page_row_mask) past the tile's in-page position.
  int32_t page_row_shift;
  int32_t page_row_mask;
  // A user variant's per-query-head parameters (flashinfer_jit.AttentionVariant), and custom masks
  // (variant.cuh WithCustomMask): packed bits and each request's first byte (int64).
  const void* user_tensor0;
  const void* user_tensor1;
  const void* user_tensor2;
  const void* user_tensor3;
  const void* custom_mask;
  const void* mask_offsets;
  const float* alibi_slopes_log2;  // ALiBi: one slope a query head, times log2(e)
  const float* rope_freqs;         // fused RoPE: head_dim / 2 frequencies (variant.cuh WithRope)
  // fp8 K/V: the scales FlashInfer takes as k_scale / v_scale, each a float here times (when not null) a
  // one-element float32 device tensor's value (vLLM passes them so: no host read, no sync).
  const float* k_scale_ptr;
  const float* v_scale_ptr;
  float k_scale;
  float v_scale;
  float soft_cap_pre_tanh;  // soft-capping: sm_scale / cap (scale_log2 then holds cap * log2(e))
  float user_scalars[8];    // a user variant's scalar parameters
  int32_t window_left;      // the sliding window's size (KeyRange)
  // Key transforms (RoPE): 1 when the launcher already rotated k (a copy: K stays unrotated in the
  // user's tensor), so the kernel skips its key transform; 0 otherwise. Last: a missing mirror field
  // shows as padding.
  int32_t keys_rotated;
};

}  // namespace fij
