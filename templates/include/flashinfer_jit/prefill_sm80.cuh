// The FA2-class (sm80+) batch-prefill kernel, composed from its parts, and its host launchers.
//
//   tile_scheduler.cuh  which work item and KV head this CTA runs; the split-KV handoff
//   mainloop_sm80.cuh   Q/K/V tiles through cp.async, S = Q K^T, mask, online softmax, O += P V
//   epilogue_sm80.cuh   fragments -> rows (KV-split warps merged), through epilogue.cuh's row sinks
//   epilogue.cuh        final / partial row stores, the split-KV tile merge
//   variant.cuh         what is computed: visible keys, mask, logits and query / key transforms
//   quant.cuh           fp8 K/V storage (widened in shared memory by the mainloop)
// Rows that see no key produce O = 0 and LSE = -inf.
#pragma once
#include "flashinfer_jit/epilogue_sm80.cuh"
#include "flashinfer_jit/mainloop_sm80.cuh"
#include "flashinfer_jit/tile_scheduler.cuh"
#include "flashinfer_jit/trace.cuh"

namespace fij {

// TKV: the K/V storage type (T, or fp8: quant.cuh).
template <typename T, int HEAD_DIM, int CTA_Q, int KV_TILE, typename Variant, bool PAGED, bool ALIGNED_PAGES,
          typename TKV>
__global__ void __launch_bounds__(PrefillShape<HEAD_DIM, CTA_Q, KV_TILE>::kThreads, 2)
    prefill_kernel(const __grid_constant__ PrefillParams p) {
  using Mainloop = MainloopSm80<T, HEAD_DIM, CTA_Q, KV_TILE, Variant, PAGED, ALIGNED_PAGES, TKV>;
  extern __shared__ __align__(128) uint8_t smem[];
  WorkItem item;
  const TileScheduler work = TileScheduler::fetch(p, item);
  FIJ_TRACE_SCOPE(work.active() ? work.item_index : -1);
  if (!work.active()) return;
  const int hk = work.kv_head;
  const Variant variant(p);
  const WorkTile tile = WorkTile::of<Variant, CTA_Q>(item, variant, p.group);

  typename Mainloop::State state;
  Mainloop::run(p, variant, tile, hk, smem, state);
  FIJ_TRACE_MARK(loop_end);
  store_output_sm80<T, HEAD_DIM, Mainloop>(p, item, tile, hk, state, Mainloop::score_scale(p, variant), smem);

  // Split tile: the last chunk to finish merges the tile's partial states (Q's smem is free now).
  if (item.partial >= 0 && last_chunk_to_finish(p, item, hk, reinterpret_cast<int*>(smem))) {
    FIJ_TRACE_MARK(merge_begin);
    merge_split_tile<T, HEAD_DIM, Mainloop::S::kThreads>(p, item, tile.rows, tile.q_start, hk, threadIdx.x);
    release_split_tile(p, item, hk, threadIdx.x == 0);
  }
}

// Paged layouts: can the aligned-pages kernel run this page size and these strides?
template <int KV_TILE>
inline bool aligned_pages(const PrefillParams& p) {
  const int ps = p.page_size;
  const bool divides = ps > 0 && KV_TILE % ps == 0 && (ps & (ps - 1)) == 0;
  const bool multiple = ps > 0 && ps % KV_TILE == 0;
  return (divides || multiple) && p.stride_page <= INT32_MAX && p.k_stride_n >= 0 && p.k_stride_h >= 0 &&
         int64_t(ps) * p.k_stride_n + p.k_stride_h * int64_t(p.num_kv_heads) <= INT32_MAX;
}

template <typename T, int HEAD_DIM, int CTA_Q, int KV_TILE, typename Variant, bool PAGED, bool ALIGNED_PAGES,
          typename TKV>
inline int launch_kernel(const PrefillParams& p, int grid_items, cudaStream_t stream) {
  using S = PrefillShape<HEAD_DIM, CTA_Q, KV_TILE>;
  constexpr int smem = MainloopSm80<T, HEAD_DIM, CTA_Q, KV_TILE, Variant, PAGED, ALIGNED_PAGES, TKV>::kSmemBytes;
  auto kernel = prefill_kernel<T, HEAD_DIM, CTA_Q, KV_TILE, Variant, PAGED, ALIGNED_PAGES, TKV>;
  static bool attribute_set[64] = {};  // per device ordinal
  int device = 0;
  cudaGetDevice(&device);
  if (device < 64 && !attribute_set[device]) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return int(err);
    attribute_set[device] = true;
  }
  if (grid_items > 0) {
    return launch(kernel, dim3(unsigned(grid_items) * unsigned(p.num_kv_heads)), dim3(S::kThreads), smem, stream, p);
  }
  return 0;
}

template <typename T, int HEAD_DIM, int CTA_Q, int KV_TILE, typename Variant, bool PAGED, typename TKV = T>
inline int launch_prefill(const PrefillParams& params, int grid_items, cudaStream_t stream) {
  if constexpr (PAGED) {
    if (aligned_pages<KV_TILE>(params)) {
      PrefillParams p = params;
      const bool divides = KV_TILE % p.page_size == 0;
      p.page_row_shift = divides ? __builtin_ctz(unsigned(p.page_size)) : 30;  // rows < KV_TILE <= page: 0
      p.page_row_mask = divides ? p.page_size - 1 : -1;
      return launch_kernel<T, HEAD_DIM, CTA_Q, KV_TILE, Variant, true, true, TKV>(p, grid_items, stream);
    }
  }
  return launch_kernel<T, HEAD_DIM, CTA_Q, KV_TILE, Variant, PAGED, false, TKV>(params, grid_items, stream);
}

template <typename T, int HEAD_DIM, int CTA_Q, int KV_TILE, typename Variant, bool PAGED, typename TKV = T>
inline int blocks_per_sm() {
  using S = PrefillShape<HEAD_DIM, CTA_Q, KV_TILE>;
  constexpr int smem = MainloopSm80<T, HEAD_DIM, CTA_Q, KV_TILE, Variant, PAGED, PAGED, TKV>::kSmemBytes;
  auto kernel = prefill_kernel<T, HEAD_DIM, CTA_Q, KV_TILE, Variant, PAGED, PAGED, TKV>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return -int(err);
  int blocks = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, S::kThreads, smem);
  return err == cudaSuccess ? blocks : -int(err);
}

}  // namespace fij
