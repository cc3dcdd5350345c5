// Diagnostics only (FLASHINFER_JIT_EXTRA_CUDAFLAGS=-DFIJ_TRACE, a separate cache entry): every CTA
// records {global-timer start, main loop end, merge start (0: none), end, SM id, work item or -1}
// into the buffer given to <prefix>_set_trace, 8 x uint64 per CTA, so a script
// (benchmarks/decode_diag.py) can see placement, skew and the tail. Without the flag the macros
// expand to nothing.
#pragma once

#ifdef FIJ_TRACE
namespace fij {
__device__ unsigned long long* g_trace = nullptr;
struct TraceScope {
  unsigned long long start, loop_end = 0, merge_begin = 0;
  long long item = -1;
  __device__ __forceinline__ static unsigned long long now() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
  }
  __device__ __forceinline__ TraceScope() : start(now()) {}
  __device__ __forceinline__ ~TraceScope() {
    if (threadIdx.x != 0 || g_trace == nullptr) return;
    unsigned sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    unsigned long long* slot = g_trace + 8 * uint64_t(blockIdx.x);
    slot[0] = start;
    slot[1] = loop_end;
    slot[2] = merge_begin;
    slot[3] = now();
    slot[4] = sm;
    slot[5] = static_cast<unsigned long long>(item);
  }
};

// Persistent kernels (sm90): consumer thread 0 of each CTA records, for its k-th unit (k < kMaxUnits),
// {unit start, Q landed, main loop end, epilogue end, unit index, KV tiles, SM id, 0} at
// g_trace + 8 * (blockIdx.x * kMaxUnits + k): one record per unit, so a script sees each unit's
// main-loop time against its tile count (the per-tile cost and the per-unit overhead) and every
// CTA's end (the tail).
struct UnitTrace {
  static constexpr int kMaxUnits = 256;
  int k = 0;
  bool on = false;
  unsigned long long* base = nullptr;  // g_trace, read once: a load per mark would stall the marking warp
  __device__ __forceinline__ void start(bool leader) {
    base = g_trace;
    on = leader && base != nullptr;
  }
  __device__ __forceinline__ unsigned long long* slot() const {
    return base + 8 * (uint64_t(blockIdx.x) * kMaxUnits + k);
  }
  __device__ __forceinline__ void mark(int field) const {
    if (on && k < kMaxUnits) slot()[field] = TraceScope::now();
  }
  __device__ __forceinline__ void finish(int unit, int tiles) {
    if (on && k < kMaxUnits) {
      unsigned sm;
      asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
      unsigned long long* s = slot();
      s[3] = TraceScope::now();
      s[4] = unit;
      s[5] = tiles;
      s[6] = sm;
    }
    ++k;
  }
};
}  // namespace fij
#define FIJ_TRACE_UNITS(leader) ::fij::UnitTrace fij_unit_trace; fij_unit_trace.start(leader)
#define FIJ_TRACE_UNIT_MARK(field) fij_unit_trace.mark(field)
#define FIJ_TRACE_UNIT_END(unit, tiles) fij_unit_trace.finish(unit, tiles)
#define FIJ_TRACE_SCOPE(item_expr) ::fij::TraceScope fij_trace_scope; fij_trace_scope.item = (item_expr)
#define FIJ_TRACE_MARK(field) fij_trace_scope.field = ::fij::TraceScope::now()
#else
#define FIJ_TRACE_SCOPE(item_expr) (void)0
#define FIJ_TRACE_MARK(field) (void)0
#define FIJ_TRACE_UNITS(leader) (void)0
#define FIJ_TRACE_UNIT_MARK(field) (void)0
#define FIJ_TRACE_UNIT_END(unit, tiles) (void)0
#endif
