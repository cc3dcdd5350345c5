// The sm90 (Hopper, sm_90a) batch-prefill kernel, composed from its parts, and its host launcher.
//
//   tile_scheduler.cuh  which work item and KV head this CTA runs; the split-KV handoff
//   mainloop_sm90.cuh   producer warp (TMA, mbarriers) and consumer warpgroups (wgmma, softmax)
//   transform_sm90.cuh  query / key transforms (RoPE) of the landed tiles
//   epilogue.cuh        final / partial row stores, the split-KV tile merge
//   variant.cuh         what is computed: visible keys, mask, logits transform
//   tma_host_sm90.h     the q / k / v tensor maps, encoded per run on the host
// The planner and the work items are the sm80 path's (prefill_plan.h) with 128-row q tiles.
// Rows that see no key produce O = 0 and LSE = -inf.
//
// Built for every target arch; the body exists only in the sm_90a pass (__CUDA_ARCH_FEAT_SM90_ALL),
// elsewhere it traps. The Python side selects this backend on compute capability 9.x only.
#pragma once
#include "flashinfer_jit/epilogue.cuh"
#include "flashinfer_jit/mainloop_sm90.cuh"
#include "flashinfer_jit/tile_scheduler.cuh"
#include "flashinfer_jit/tma_host_sm90.h"
#include "flashinfer_jit/trace.cuh"

namespace fij {
namespace sm90 {

// Registers per thread after setmaxnreg. The CTA's pool is what it was launched with (168 a thread:
// the cap of __launch_bounds__(384, 1)), and setmaxnreg.inc waits until the pool has what it asks for,
// so producer * 128 + consumer * 256 must stay <= 168 * 384 = 64512 (more hangs the consumers). The
// hd256 consumers need 232 (224 spills there), which leaves the hd256 producer 40 (enough with its loops
// kept rolled); the others keep 56 / 224, as measured.
template <int HEAD_DIM>
constexpr int producer_registers() { return HEAD_DIM < 256 ? 56 : 40; }
template <int HEAD_DIM>
constexpr int consumer_registers() { return HEAD_DIM < 256 ? 224 : 232; }
static_assert(producer_registers<128>() * 128 + consumer_registers<128>() * 256 <= 168 * 384 &&
                  producer_registers<256>() * 128 + consumer_registers<256>() * 256 <= 168 * 384,
              "setmaxnreg asks for more registers than the CTA was launched with");

constexpr int kConsumerBarrier = 1;      // named barrier of the consumer warps (epilogue, split merge)
constexpr int kStagingBarrier = 4;       // + consumer: one consumer warpgroup's staged epilogue (2, 3: TurnTaking)

// The staged epilogue (Shape::kStagedEpilogue) of a final (not split) item: each consumer warpgroup
// writes its 64 normalised rows into its half of the staging buffer (16-byte chunks XORed with row % 8
// against bank conflicts); the rows leave as 16-byte row stores, copied out by the warpgroup itself or
// (Shape::kStoreWarps) by its store warp while it goes on to the next unit.

// Where 16-byte chunk `chunk` of staged row `local` (0..63) of a half lives, from the half's start: rows
// of HEAD_DIM * 2 bytes with the chunk XORed with row % 8 (against bank conflicts), or (kTmaStore) the
// TMA's layout, one block of 64 rows x 128 bytes per 64 head dims, each 128-byte swizzled the same way.
template <typename S>
__device__ __forceinline__ uint32_t staged_offset(int local, int chunk) {
  if constexpr (S::kTmaStore)
    return uint32_t((chunk / 8) * 64 * 128 + local * 128 + (((chunk % 8) ^ (local & 7)) * 16));
  else
    return uint32_t(local * S::kBlocks * 128 + ((chunk ^ (local & 7)) * 16));
}

// Copy staged rows [0, rows) of consumer half `half` to the output (those inside the tile), by `threads`
// threads numbered `tid`.
template <typename T, int HEAD_DIM, typename S>
__device__ __forceinline__ void copy_staged_rows(const PrefillParams& p, const WorkItem& item, const WorkTile& w,
                                                 int hk, int half, const uint8_t* stage, int tid, int threads,
                                                 int rows = 64) {
  constexpr int kChunks = HEAD_DIM / 8;  // 16-byte chunks of a row
#pragma unroll 1
  for (int i = tid; i < rows * kChunks; i += threads) {
    const int local = i / kChunks, chunk = i % kChunks;
    const int r = half * 64 + local;
    if (r >= w.rows) break;  // i only grows: every later row is past the tile too
    const uint4 v = *reinterpret_cast<const uint4*>(stage + staged_offset<S>(local, chunk));
    *reinterpret_cast<uint4*>(FinalRow<T, HEAD_DIM>::at(p, w.q_start, item.row_begin + r, hk).o + chunk * 8) = v;
  }
}

template <typename T, int HEAD_DIM, int KV_TILE, typename Variant>
__device__ __forceinline__ void store_output_staged(const PrefillParams& p, const WorkItem& item, const WorkTile& w,
                                                    int hk, const Consumer<T, HEAD_DIM, KV_TILE, Variant>& c,
                                                    const typename Consumer<T, HEAD_DIM, KV_TILE, Variant>::State& st,
                                                    float scale, const SmemLayout<Shape<HEAD_DIM, KV_TILE>>& sm,
                                                    uint8_t* smem, PipelineState& ps, const TensorMaps& maps) {
  using S = Shape<HEAD_DIM, KV_TILE>;
  constexpr int kChunks = HEAD_DIM / 8;
  constexpr int kRowBytes = HEAD_DIM * 2;
  const uint32_t stage_addr = sm.o_stage() + c.consumer * 64 * kRowBytes;
  uint8_t* stage = sm.generic(smem, stage_addr);
  const int tid = (c.warp * 32) + c.lane_g * 4 + c.lane_t;  // 0..127 within the warpgroup
  const bool by_tma = S::kTmaStore && maps.o_by_tma && w.rows >= (c.consumer + 1) * 64;
  if constexpr (S::kTmaStore) {
    // The half's previous TMA store has read the buffer (its issuer waits; the barrier tells the rest).
    if (tid == 0) bulk_wait_group_read<0>();
    named_barrier_sync(kStagingBarrier + c.consumer, 128);
  }
  // Store warps: the half must have been copied out of (its previous output). For the first output the
  // parity is that of the phase before a fresh barrier's first, which counts as complete: no branch
  // (a divergent wait here makes ptxas serialize every wgmma, C7520).
  if constexpr (S::kStoreWarps) mbar_wait(sm.o_empty(c.consumer), (uint32_t(ps.outputs) & 1) ^ 1);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float sum = st.softmax.total_sum(0, h);
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    const int local = c.warp * 16 + c.lane_g + 8 * h;  // row within the warpgroup's 64
#pragma unroll
    for (int nt = 0; nt < kChunks; ++nt) {
      const uint32_t pair = Converter<T>::from_float2(st.o[4 * nt + 2 * h] * inv, st.o[4 * nt + 2 * h + 1] * inv);
      *reinterpret_cast<uint32_t*>(stage + staged_offset<S>(local, nt) + 4 * c.lane_t) = pair;
    }
    const int r = c.row(h);
    if (r < w.rows && c.lane_t == 0)
      FinalRow<T, HEAD_DIM>::at(p, w.q_start, item.row_begin + r, hk)
          .store_lse(sum > 0.f ? st.softmax.row_max[0][h] * scale + log2f(sum) : neg_inf());
  }
  ps.outputs += 1;
  if constexpr (S::kTmaStore) {
    // One path for both ways out, the choice made by predicates, not branches: a warpgroup-divergent
    // branch here makes ptxas serialize every wgmma of the kernel (C7520).
    fence_proxy_async();  // this thread's staged rows, visible to the copy engine
    named_barrier_sync(kStagingBarrier + c.consumer, 128);
    if (by_tma && tid == 0) {
      const int token0 = int(w.q_start) + (item.row_begin + c.consumer * 64) / p.group;
#pragma unroll
      for (int b = 0; b < S::kBlocks; ++b)
        tma_store_3d(&maps.o, b * 64, hk * p.group, token0, stage_addr + b * 64 * 128);
      bulk_commit_group();
    }
    copy_staged_rows<T, HEAD_DIM, S>(p, item, w, hk, c.consumer, stage, tid, 128, by_tma ? 0 : 64);
    named_barrier_sync(kStagingBarrier + c.consumer, 128);
  } else if constexpr (S::kStoreWarps) {
    mbar_arrive(sm.o_full(c.consumer));  // release: this thread's staged rows are visible to the store warp
    // The warpgroup reconverges here: without it ptxas places its own warpgroup.arrive for the next
    // unit's first wgmma in a divergent path and serializes every wgmma of the kernel (C7520).
    named_barrier_sync(kStagingBarrier + c.consumer, 128);
  } else {
    named_barrier_sync(kStagingBarrier + c.consumer, 128);
    copy_staged_rows<T, HEAD_DIM, S>(p, item, w, hk, c.consumer, stage, tid, 128);
    named_barrier_sync(kStagingBarrier + c.consumer, 128);  // the buffer is free for the next unit
  }
}

// Store warp of consumer half `half` (Shape::kStoreWarps): walks the CTA's units like the other roles and
// copies each staged output of its half out once the consumers have written it.
template <typename T, int HEAD_DIM, int KV_TILE, typename Variant>
__device__ __forceinline__ void run_store_warp(const PrefillParams& p, const SmemLayout<Shape<HEAD_DIM, KV_TILE>>& sm,
                                               uint8_t* smem, int units, int half) {
  using S = Shape<HEAD_DIM, KV_TILE>;
  const int lane = threadIdx.x % 32;
  const uint8_t* stage = sm.generic(smem, sm.o_stage()) + half * 64 * HEAD_DIM * 2;
  int outputs = 0;
  for_each_unit<Variant, S::kCtaQ>(p, units, [&](int, const WorkItem& item, int hk, const WorkTile& tile) {
    if (item.partial >= 0) return;  // split chunks write partial rows themselves
    mbar_wait_sleeping(sm.o_full(half), uint32_t(outputs) & 1);
    copy_staged_rows<T, HEAD_DIM, S>(p, item, tile, hk, half, stage, lane, 32);
    mbar_arrive(sm.o_empty(half));  // release: this lane's loads of the half are done
    ++outputs;
  });
}

template <typename T, int HEAD_DIM, int KV_TILE, typename Variant>
__device__ __forceinline__ void store_output(const PrefillParams& p, const WorkItem& item, const WorkTile& w, int hk,
                                             const Consumer<T, HEAD_DIM, KV_TILE, Variant>& c,
                                             const typename Consumer<T, HEAD_DIM, KV_TILE, Variant>::State& st,
                                             float scale) {
  constexpr int kNtO = HEAD_DIM / 8;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float sum = st.softmax.total_sum(0, h);
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    const float lse = sum > 0.f ? st.softmax.row_max[0][h] * scale + log2f(sum) : neg_inf();
    const int r = c.row(h);
    if (r >= w.rows) continue;
    to_row_sink<T, HEAD_DIM>(p, item, w.q_start, r, hk, [&](const auto& row) {
      store_fragment_row(row, c.lane_t, reinterpret_cast<const float(&)[kNtO][4]>(st.o), h, inv, lse);
    });
  }
}

// Key transform warps (Variant::kTransformsKey, transform_sm90.cuh): walk the CTA's units like the
// producer and transform each K tile it lands.
template <typename Prod, typename Variant, int CTA_Q, typename Layout>
__device__ __forceinline__ void run_key_transform_warps(const PrefillParams& p, const Layout& sm, uint8_t* smem,
                                                        int units, PipelineState& ps) {
  if constexpr (Variant::kTransformsKey) {
    if (p.keys_rotated && !Prod::kTransformQ) return;  // the launcher rotated K: nothing to do
    using KeyWarps = typename Prod::KeyWarps;
    const Variant variant(p);
    const KeyWarps kw = KeyWarps::of(int(threadIdx.x) - 32 * KeyWarps::kFirstWarp);
    auto walk = variant.template key_walk<KeyWarps::kDims>(KeyWarps::kDims * kw.group, KeyWarps::kRowsPerPass);
    for_each_unit<Variant, CTA_Q>(p, units, [&](int, const WorkItem&, int hk, const WorkTile& tile) {
      Prod::transform_unit_keys(p, variant, walk, kw, tile, hk, sm, smem, ps);
    });
  }
}

// One persistent CTA per SM (grid = min(units, SMs)): CTA b runs one unit of each band of gridDim.x
// units (persistent_unit; units in plan order, longest first). Each role walks the same sequence
// (for_each_unit): the producer loads unit i + 1 while the consumers finish unit i and write its output.
template <typename T, int HEAD_DIM, int KV_TILE, typename Variant, bool PAGED>
__global__ void __launch_bounds__(Shape<HEAD_DIM, KV_TILE>::kThreads, 1)
    prefill_kernel(const __grid_constant__ PrefillParams p, const __grid_constant__ TensorMaps maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using S = Shape<HEAD_DIM, KV_TILE>;
  using Cons = Consumer<T, HEAD_DIM, KV_TILE, Variant>;
  extern __shared__ __align__(1024) uint8_t smem[];
  const SmemLayout<S> sm = SmemLayout<S>::of(smem);
  const int units = p.counts[0] * p.num_kv_heads;
  if (int(blockIdx.x) >= units) return;
  using Prod = Producer<T, HEAD_DIM, KV_TILE, PAGED, Variant::kTransformsKey,
                        Variant::kTransformsQuery && FIJ_SM90_ROPE_Q_PRODUCER != 0>;
  if (threadIdx.x == 0) {
    sm.init_barriers(Prod::kFullArrivals, p.keys_rotated ? Prod::kFullArrivals : Prod::kKFullArrivals,
                     Prod::kQFullArrivals);
    prefetch_tensor_map(&maps.q);
    if constexpr (!Prod::kGather) {  // gathered K / V have no maps
      prefetch_tensor_map(&maps.k);
      prefetch_tensor_map(&maps.v);
    }
  }
  __syncthreads();

  PipelineState ps;
  if (threadIdx.x < 128) {
    release_registers<producer_registers<HEAD_DIM>()>();
    const int warp = threadIdx.x / 32;
    if (S::kStoreWarps && warp >= 1 && warp <= S::kConsumers) {
      run_store_warp<T, HEAD_DIM, KV_TILE, Variant>(p, sm, smem, units, warp - 1);
    } else if (S::kTailWarp && warp == 3) {
      for_each_unit<Variant, S::kCtaQ>(p, units, [&](int, const WorkItem&, int, const WorkTile& tile) {
        Prod::zero_unit_tail(tile, sm, smem, ps);
      });
    } else if (Variant::kTransformsKey && warp >= Prod::KeyWarps::kFirstWarp &&
               warp < Prod::KeyWarps::kFirstWarp + Prod::KeyWarps::kWarps) {
      run_key_transform_warps<Prod, Variant, S::kCtaQ>(p, sm, smem, units, ps);
    } else if (warp == 0 || Prod::kGather) {
      for_each_unit<Variant, S::kCtaQ>(p, units, [&](int, const WorkItem&, int hk, const WorkTile& tile) {
        Prod::run(p, maps, tile, hk, sm, smem, ps);
      });
    }
  } else {
    claim_registers<consumer_registers<HEAD_DIM>()>();
    const int tid = threadIdx.x - 128;
    const Variant variant(p);
    const Cons c = Cons::of(tid);
    auto consumers_sync = [] { named_barrier_sync(kConsumerBarrier, S::kConsumers * 128); };
    int* flag = reinterpret_cast<int*>(sm.generic(smem, sm.flag()));
    const TurnTaking turn{c.consumer};
    turn.start();
    FIJ_TRACE_UNITS(tid == 0);
    for (int k = 0, unit; (unit = persistent_unit(k, units)) >= 0; ++k) {
      FIJ_TRACE_UNIT_MARK(0);
      WorkItem item;
      const TileScheduler work = TileScheduler::at(p, unit, item);
      const int hk = work.kv_head;
      const WorkTile tile = WorkTile::of<Variant, S::kCtaQ>(item, variant, p.group);
      typename Cons::State st;
      c.template run<Prod::kGather, typename Prod::KvLayout>(p, variant, tile, hk, sm, smem, st, ps, turn, [&] {
        FIJ_TRACE_UNIT_MARK(1);
        if constexpr (S::kItemPrefetch) TileScheduler::prefetch(p, persistent_unit_or_any(k + 1, units));
      });
      FIJ_TRACE_UNIT_MARK(2);
      if (S::kStagedEpilogue && item.partial < 0)
        store_output_staged<T, HEAD_DIM, KV_TILE, Variant>(p, item, tile, hk, c, st, variant.softmax_scale_log2(), sm,
                                                           smem, ps, maps);
      else
        store_output<T, HEAD_DIM, KV_TILE, Variant>(p, item, tile, hk, c, st, variant.softmax_scale_log2());
      // Split tile: the last chunk to finish merges the tile's partial states.
      if (item.partial >= 0 && last_chunk_to_finish(p, item, hk, flag, tid == 0, consumers_sync)) {
        merge_split_tile<T, HEAD_DIM, S::kConsumers * 128>(p, item, tile.rows, tile.q_start, hk, tid);
        release_split_tile(p, item, hk, tid == 0);
      }
      FIJ_TRACE_UNIT_END(unit, kv_tiles<KV_TILE>(tile));
    }
    turn.finish();
    if constexpr (S::kTmaStore) {
      if (tid % 128 == 0) bulk_wait_group<0>();  // the last TMA stores are done before the CTA ends
    }
  }
#else
  __trap();  // not an sm_90a pass: the host never launches this
#endif
}

template <int KV_TILE>
inline bool pages_fit_boxes(int page_size) {
  return page_size > 0 && (KV_TILE % page_size == 0 || page_size % KV_TILE == 0);
}

template <typename T, int HEAD_DIM, int KV_TILE, bool PAGED>
inline int encode_tensor_maps(const PrefillParams& p, TensorMaps* maps) {
  using S = Shape<HEAD_DIM, KV_TILE>;
  if (S::kCtaQ % p.group != 0) return int(cudaErrorInvalidValue);  // a Q box is G heads x 128 / G tokens
  int err = encode_row_map<T>(&maps->q, p.q, p.q_rows, p.num_qo_heads, HEAD_DIM, p.q_stride_n, p.q_stride_h,
                              p.group, S::kCtaQ / p.group, false);
  // The output, in boxes of 64 packed rows; where it cannot be (64 % G, an output the encoder refuses)
  // every half keeps the row stores.
  maps->o_by_tma = S::kTmaStore && 64 % p.group == 0 &&
                   encode_row_map<T>(&maps->o, p.o, p.q_rows, p.num_qo_heads, HEAD_DIM, p.o_stride_n, p.o_stride_h,
                                     p.group, 64 / p.group, false) == 0;
  maps->k_rows_inner = p.k_stride_n < p.k_stride_h;
  maps->v_rows_inner = p.v_stride_n < p.v_stride_h;
  if constexpr (Producer<T, HEAD_DIM, KV_TILE, PAGED>::kGather) {
    maps->box_rows = 0;  // gathered by cp.async: no K / V maps, any page size
  } else if constexpr (Producer<T, HEAD_DIM, KV_TILE, PAGED>::kWideBox) {
    if (!pages_fit_boxes<KV_TILE>(p.page_size) || maps->k_rows_inner != maps->v_rows_inner)
      return int(cudaErrorInvalidValue);
    maps->box_rows = p.page_size < KV_TILE ? p.page_size : KV_TILE;
    int v_step = 0;
    if (err == 0)
      err = encode_wide_page_map<T>(&maps->k, p.k, p.kv_rows, p.page_size, p.num_kv_heads, HEAD_DIM, p.stride_page,
                                    p.k_stride_n, p.k_stride_h, maps->box_rows, maps->k_rows_inner, &maps->head_step);
    if (err == 0)
      err = encode_wide_page_map<T>(&maps->v, p.v, p.kv_rows, p.page_size, p.num_kv_heads, HEAD_DIM, p.stride_page,
                                    p.v_stride_n, p.v_stride_h, maps->box_rows, maps->v_rows_inner, &v_step);
    if (err == 0 && v_step != maps->head_step) err = int(cudaErrorInvalidValue);
  } else if constexpr (PAGED) {
    if (!pages_fit_boxes<KV_TILE>(p.page_size)) return int(cudaErrorInvalidValue);
    maps->box_rows = p.page_size < KV_TILE ? p.page_size : KV_TILE;
    if (err == 0)
      err = encode_page_map<T>(&maps->k, p.k, p.kv_rows, p.page_size, p.num_kv_heads, HEAD_DIM, p.stride_page,
                               p.k_stride_n, p.k_stride_h, maps->box_rows, maps->k_rows_inner);
    if (err == 0)
      err = encode_page_map<T>(&maps->v, p.v, p.kv_rows, p.page_size, p.num_kv_heads, HEAD_DIM, p.stride_page,
                               p.v_stride_n, p.v_stride_h, maps->box_rows, maps->v_rows_inner);
  } else {
    maps->box_rows = KV_TILE;
    if (err == 0)
      err = encode_row_map<T>(&maps->k, p.k, p.kv_rows, p.num_kv_heads, HEAD_DIM, p.k_stride_n, p.k_stride_h, 1,
                              KV_TILE, maps->k_rows_inner);
    if (err == 0)
      err = encode_row_map<T>(&maps->v, p.v, p.kv_rows, p.num_kv_heads, HEAD_DIM, p.v_stride_n, p.v_stride_h, 1,
                              KV_TILE, maps->v_rows_inner);
  }
  return err;
}

// SMs of the current device (one persistent CTA each), looked up once per device.
inline int multiprocessors() {
  static int counts[64] = {};
  int device = 0;
  cudaGetDevice(&device);
  if (device >= 64) device = 63;
  if (counts[device] == 0) {
    int sms = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    counts[device] = sms > 0 ? sms : 1;
  }
  return counts[device];
}

template <typename T, int HEAD_DIM, int KV_TILE, typename Variant, bool PAGED>
inline int set_smem_attribute() {
  using S = Shape<HEAD_DIM, KV_TILE>;
  static bool attribute_set[64] = {};  // per device ordinal
  int device = 0;
  cudaGetDevice(&device);
  if (device < 64 && attribute_set[device]) return 0;
  const cudaError_t err = cudaFuncSetAttribute(prefill_kernel<T, HEAD_DIM, KV_TILE, Variant, PAGED>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, int(S::kSmemBytes));
  if (err == cudaSuccess && device < 64) attribute_set[device] = true;
  return int(err);
}

template <typename T, int HEAD_DIM, int KV_TILE, typename Variant, bool PAGED>
inline int launch_prefill(const PrefillParams& p, int grid_items, cudaStream_t stream) {
  using S = Shape<HEAD_DIM, KV_TILE>;
  if (p.cta_q != S::kCtaQ) return int(cudaErrorInvalidValue);
  int err = set_smem_attribute<T, HEAD_DIM, KV_TILE, Variant, PAGED>();
  if (err != 0 || grid_items <= 0) return err;
  TensorMaps maps{};  // zeroed: the maps a setting does not use (gathered K / V, no TMA store) stay defined
  err = encode_tensor_maps<T, HEAD_DIM, KV_TILE, PAGED>(p, &maps);
  if (err != 0) return err;
  const int64_t units = int64_t(grid_items) * p.num_kv_heads;
  const int ctas = int(units < multiprocessors() ? units : multiprocessors());
  return launch(prefill_kernel<T, HEAD_DIM, KV_TILE, Variant, PAGED>, dim3(unsigned(ctas)), dim3(S::kThreads),
                S::kSmemBytes, stream, p, maps);
}

template <typename T, int HEAD_DIM, int KV_TILE, typename Variant, bool PAGED>
inline int blocks_per_sm() {
  using S = Shape<HEAD_DIM, KV_TILE>;
  int err = set_smem_attribute<T, HEAD_DIM, KV_TILE, Variant, PAGED>();
  if (err != 0) return -err;
  int blocks = 0;
  err = int(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, prefill_kernel<T, HEAD_DIM, KV_TILE, Variant, PAGED>,
                                                          S::kThreads, S::kSmemBytes));
  return err == 0 ? blocks : -err;
}

}  // namespace sm90
}  // namespace fij
