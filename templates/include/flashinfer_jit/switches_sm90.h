// Compile-time switches of the sm90 prefill kernel, in one place. Each is a -D flag given through
// FLASHINFER_JIT_EXTRA_CUDAFLAGS (part of the cache key, so each setting has its own kernels);
// benchmarks/sm90_switches.sh A/Bs them on a GPU (suites first, then bench_prefill) and
// tests/test_sm90_build.py builds them and checks their SASS. A switch is on by default once measured
// faster on the device; benchmarks/NOTES.md ("Hopper kernel") has the numbers.
#pragma once

// ---- on: measured on the H200 -------------------------------------------------------------------

// Switch (on; -DFIJ_SM90_PINGPONG=0 turns it off, part of the cache key): the two consumer warpgroups take
// turns issuing their GEMMs (FA3's ping-pong), so one's softmax runs under the other's tensor-core work.
// Measured on the H200: +2% (causal hd128) to +8% (hd64) over free interleaving (benchmarks/NOTES.md).
#ifndef FIJ_SM90_PINGPONG
#define FIJ_SM90_PINGPONG 1
#endif

// Switch (on; FLASHINFER_JIT_EXTRA_CUDAFLAGS=-DFIJ_SM90_STAGED_EPILOGUE=0 turns it off, part of the cache
// key): final O rows go through shared memory and leave as 16-byte row stores instead of 4-byte fragment
// stores. Measured with the ping-pong below (benchmarks/NOTES.md, "Hopper kernel, second look").
#ifndef FIJ_SM90_STAGED_EPILOGUE
#define FIJ_SM90_STAGED_EPILOGUE 1
#endif

// Switch (on; FLASHINFER_JIT_EXTRA_CUDAFLAGS=-DFIJ_SM90_SNAKE=0 turns it off, part of the cache key):
// persistent CTAs take units in bands of gridDim.x, alternately forward and backward, so the CTA given a
// band's longest unit gets the next band's shortest (units are longest first). Plain striding hands CTA
// 0 the longest unit of every band: the last CTA ended 2.1-4.5% after the mean CTA's busy time in the
// H200 trace (benchmarks/sm90_trace.py), 0.7-1.7% with the snake.
#ifndef FIJ_SM90_SNAKE
#define FIJ_SM90_SNAKE 1
#endif

// Switch (on; -DFIJ_SM90_TMA_STORE=0 turns it off, part of the cache key): with the staged epilogue, a
// consumer warpgroup's 64 staged rows leave by one TMA store per 64 head dims (the staging buffer then
// holds them in the TMA's swizzled layout) when all 64 belong to the tile; a half holding the tile's end
// (whose box would reach into the next request's rows) keeps the row stores. The warpgroup goes on while
// the copy engine writes; the next epilogue first waits for the store to have read the buffer. Measured
// on the H200 (2026-12-04, ragged and paged suites passed): +1.5-3% on chat16 full, long1+short31, hd64
// and dense 8x4096, flat on hd256 and paged (benchmarks/NOTES.md, "Hopper kernel, third look").
// -DFIJ_SM90_STORE_WARPS=1 (the other way to do the same thing) replaces it.
#ifndef FIJ_SM90_TMA_STORE
#define FIJ_SM90_TMA_STORE 1
#endif

// ---- off: not (yet) measured faster; built and SASS-checked on the CPU -------------------------

// Switch (off; -DFIJ_SM90_DOUBLE_Q=1): two Q buffers where shared memory has room (head_dim <= 128: 224 KB
// at 128), so the producer loads unit i+1's Q while unit i runs instead of after its last Q K^T. With
// the store warps it measured 1-3% slower on the H200 (d451acb); alone: to measure.
#ifndef FIJ_SM90_DOUBLE_Q
#define FIJ_SM90_DOUBLE_Q 0
#endif

// Switch (off; -DFIJ_SM90_STORE_WARPS=1): with the staged epilogue, warps 1 and 2 of the producer warpgroup
// (idle otherwise) copy each consumer warpgroup's staged O rows to global memory, so the consumers only
// write shared memory and go on. With double Q: the consumers' epilogue fell from 2.3 to 0.8 us but the
// tiles ran 9% slower (H200 trace, d451acb); alone: to measure.
#ifndef FIJ_SM90_STORE_WARPS
#define FIJ_SM90_STORE_WARPS 0
#endif


// Switch (off until measured; -DFIJ_SM90_TAIL_WARP=1): warp 3 of the producer warpgroup zeroes the V rows
// past a request's end (the tail tile), so the producer warp issues the next loads instead of waiting
// for the tail's bytes to land (the trace showed ~2.7 us per unit in non-causal batches, whose every
// unit ends in a tail).
#ifndef FIJ_SM90_TAIL_WARP
#define FIJ_SM90_TAIL_WARP 0
#endif

// Switch (off until measured; -DFIJ_SM90_PAGE_PREFETCH=1): paged K and V of a tile share one page-table
// lookup per lane, and the next tile's lookup is issued before the waits for free stages, so its load
// latency is hidden (paged ran at 0.83 of ragged with a lookup per K and per V tile, each waited for).
#ifndef FIJ_SM90_PAGE_PREFETCH
#define FIJ_SM90_PAGE_PREFETCH 0
#endif

// Switch (off; -DFIJ_SM90_PAGED_GATHER=1): paged K and V tiles gathered by the producer warpgroup's 128
// threads with cp.async (16 bytes each, consecutive threads along a row, each row from its page) instead of
// one TMA box per page: any page size, rows past the request's end zero-filled (no tail to zero),
// completion by cp.async-tracked arrivals. First version (a page lookup per row and thread, 4 in flight)
// measured 0.40-0.48 of ragged on the H200 against per-page TMA's 0.82-0.86 (2026-12-04); the second (one
// lookup per lane and tile, shared by K and V, issued a tile ahead, handed out by shuffles) 0.58-0.62
// against 0.81-0.83: per-page TMA is the measured choice.
#ifndef FIJ_SM90_PAGED_GATHER
#define FIJ_SM90_PAGED_GATHER 0
#endif

// Switch (off until measured; -DFIJ_SM90_PAGED_WIDE_BOX=1): paged K and V tiles laid out by 8-row group
// (tile_layout_sm90.cuh), so one TMA box brings a page's rows with all their head dims (5-D tensor maps,
// tma_host_sm90.h) instead of one box per page and 64 dims: 8 boxes per K or V tile at head_dim 128 and
// page 16, not 16. Paged ran at 0.80-0.85 of ragged, its consumers starved for tiles with DRAM idle
// (ncu, H200, 2026-12-04); FlashInfer's maintainers say TMA falls short on small boxes (its issue #1474).
// Needs each token's heads packed (NHD: head stride = head_dim; HND: head stride = page size x slot
// stride), else the launch fails with cudaErrorInvalidValue. Not with the gather.
#ifndef FIJ_SM90_PAGED_WIDE_BOX
#define FIJ_SM90_PAGED_WIDE_BOX 0
#endif

// Switch (off until measured; -DFIJ_SM90_ITEM_PREFETCH=1): once a unit's Q tile has landed the consumers
// prefetch their next unit's work item into L1 (the trace showed ~0.5 us from a unit's start to its Q
// tile even with Q double-buffered: the item's load from L2). Issued there because at the unit's
// start the same prefetch makes ptxas serialize every wgmma (C7520) and spill.
#ifndef FIJ_SM90_ITEM_PREFETCH
#define FIJ_SM90_ITEM_PREFETCH 0
#endif

// Switch (off; -DFIJ_SM90_HD64_STAGES=4): K/V ring depth at head_dim 64 (default 3). hd64 tiles are half
// the bytes of hd128's for the same tensor-core work, so the loads have less time to hide in: a
// deeper ring (4 stages: 144 KB with the staging buffer) is the cheapest thing to try there (1.51x FA2
// against FlashInfer fa3's 1.56x).
#ifndef FIJ_SM90_HD64_STAGES
#define FIJ_SM90_HD64_STAGES 3
#endif

// Switch (off until measured; -DFIJ_POLY_EXP2=N, N = 1..8): N eighths of the softmax's element exp2s
// (element e of n8 score tile nt where (2 * nt + e) % 8 < N) come from a polynomial on the FMA and
// integer pipes (softmax.cuh, exp2_poly) instead of the MUFU; the correction factors stay on the MUFU.
// A soft-capped score costs a MUFU.TANH and a MUFU.EX2, and the soft-cap kernel ran at 0.861 of the
// plain causal kernel's TFLOP/s on the H100 (issue #12), MUFU-bound (packed tanh is two MUFU ops on
// sm_90a: no relief). Every sm90 variant takes it; the sm80 kernels never do. benchmarks/softcap_ab.sh
// A/Bs it (plain and soft-cap rows).
#ifndef FIJ_POLY_EXP2
#define FIJ_POLY_EXP2 0
#endif

// ---- fused RoPE (transform_sm90.cuh): under A/B -------------------------------------------------

// Switch (off; -DFIJ_SM90_ROPE_Q_PRODUCER=1): the key transform warps of the producer warpgroup rotate
// the unit's Q tile too (between its TMA barrier and q_full, in the shadow of the previous unit's last
// tiles and epilogue) instead of each consumer warpgroup rotating its rows before its first wgmma.
// Measured on the H100 while the same warps also walked every K tile: 309.5 vs 349.3 TFLOP/s (slower);
// untried with K rotated once per run (the warps idle then): benchmarks/NOTES.md.
#ifndef FIJ_SM90_ROPE_Q_PRODUCER
#define FIJ_SM90_ROPE_Q_PRODUCER 0
#endif

// Diagnostic (timing only, WRONG RESULTS; never shipped): -DFIJ_SM90_ROPE_DIAG=1 skips the key
// rotation's arithmetic and memory (the warps still wait and hand over every tile), =2 the query's.
// The difference to the shipped kernel is what each transform costs (benchmarks/NOTES.md).
#ifndef FIJ_SM90_ROPE_DIAG
#define FIJ_SM90_ROPE_DIAG 0
#endif
