#!/usr/bin/env bash
# Nsight Compute on one launch of the sm90 prefill kernel (GPU needed; ncu on PATH or in /usr/local/cuda).
# What it answers: is the kernel bound by the tensor pipe, by shared-memory bandwidth (the wgmma
# operands, the staged epilogue and any helper warp's copies all use it), or by stalls (barrier waits,
# issue slots)? The per-unit trace (sm90_trace.py) says where a unit's time goes; this says why.
#
#   PYTHONPATH=. bash benchmarks/ncu_sm90.sh OUT_DIR [WORKLOAD] [FLAGS]
#
# WORKLOAD: a bench_prefill workload (default chat16_causal_hd128); FLAGS: FLASHINFER_JIT_EXTRA_CUDAFLAGS
# (default: the shipped kernel). IMPL=flashinfer_jit_paged profiles the paged kernel (page 16, shuffled)
# instead; FORMATS="txt" skips the CSV pass (half the time). Writes OUT_DIR/ncu-<impl>-<workload>.csv (ncu's details page, CSV) and
# OUT_DIR/ncu-<impl>-<workload>.txt (the same, readable). About 30-60 s on an H200 (ncu replays the launch once
# per metric pass).
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=$1
WORKLOAD=${2:-chat16_causal_hd128}
export FLASHINFER_JIT_EXTRA_CUDAFLAGS=${3:-}
export FLASHINFER_JIT_CACHE_DIR=${FLASHINFER_JIT_CACHE_DIR:-$PWD/cache/ncu}
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
PY=${PYTHON:-python3}
IMPL=${IMPL:-flashinfer_jit}
NAME=$IMPL-$WORKLOAD
mkdir -p "$OUT"
# Build (and warm) outside the profiler, so ncu sees only the timed kernel.
timeout 120 "$PY" benchmarks/bench_prefill.py --impls "$IMPL" --workloads "$WORKLOAD" --quick > /dev/null
SECTIONS=(--section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis
          --section MemoryWorkloadAnalysis_Tables --section WarpStateStats --section SchedulerStats
          --section Occupancy --section LaunchStats)
for fmt in ${FORMATS:-csv txt}; do
  extra=()
  [ "$fmt" = csv ] && extra=(--csv)
  timeout 240 "$NCU" --target-processes all -k regex:prefill_kernel -c 1 "${SECTIONS[@]}" "${extra[@]}" \
    --page details "$PY" benchmarks/bench_prefill.py --impls "$IMPL" --workloads "$WORKLOAD" --quick \
    > "$OUT/ncu-$NAME.$fmt" 2> "$OUT/ncu-$NAME.$fmt.err"
  echo "ncu ($fmt): exit $? -> $OUT/ncu-$NAME.$fmt"
done
grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|Shared|Bank|Tensor|Issue Slots|Stall|No Eligible" \
  "$OUT/ncu-$NAME.txt" | head -60
