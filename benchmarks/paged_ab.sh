#!/usr/bin/env bash
# A/B of FLASHINFER_JIT_PAGED_VIA_RAGGED (batch_attention.PagedGather: sm90 paged NHD plans copy the
# batch's K (rotated under fused RoPE) and V rows out of the pages each run and launch the ragged kernel)
# against the paged kernel, one card, one run:
#   1. build every supported kernel (run_device.sh build) into one cache;
#   2. with the switch on: the paged-via-ragged GPU test and the whole paged suite forced onto sm90
#      (FIJ_TEST_PREFILL_BACKEND=sm90: its NHD 16-bit cases then run through the gather), logs
#      OUT/via_ragged-tests.log, OUT/paged-suite.log;
#   3. bench_prefill --quick, ragged and paged rows (plain causal / full, fused RoPE), switch off then on:
#      OUT/off/ and OUT/on/ (<card>-<date>-prefill.{json,md}); prints the TFLOP/s lines.
#
#   OUT=dir PYTHONPATH=. bash benchmarks/paged_ab.sh
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:?set OUT to the output folder}
PY=${PYTHON:-python3}
WORKLOADS=${WORKLOADS:-chat16_causal_hd128,chat16_full_hd128,chat16_causal_hd128_rope}
mkdir -p "$OUT"
# The gathers run on the standalone RoPE kernel: its 16-byte form unless FLAGS says otherwise (the flags
# are part of every kernel's cache key, so both settings run the same binaries).
export FLASHINFER_JIT_EXTRA_CUDAFLAGS=${FLAGS--DFIJ_ROPE_VEC=1}
export FIJ_CACHE_DIR=${FIJ_CACHE_DIR:-$PWD/cache/paged-ab}
OUT=$OUT/build BUDGET_S=${BUILD_S:-150} bash benchmarks/run_device.sh build > "$OUT/build.log" 2>&1
export FLASHINFER_JIT_CACHE_DIR=$FIJ_CACHE_DIR
FLASHINFER_JIT_PAGED_VIA_RAGGED=1 timeout "${TESTS_S:-120}" "$PY" -m pytest -m gpu -q -p no:cacheprovider \
  tests/test_variants_gpu.py -k paged_via_ragged > "$OUT/via_ragged-tests.log" 2>&1
echo "paged via ragged tests: $(tail -1 "$OUT/via_ragged-tests.log")"
FLASHINFER_JIT_PAGED_VIA_RAGGED=1 FIJ_TEST_PREFILL_BACKEND=sm90 timeout "${SUITE_S:-180}" "$PY" -m pytest -m gpu -q \
  -p no:cacheprovider --maxfail=10 tests/test_paged_gpu.py > "$OUT/paged-suite.log" 2>&1
echo "paged suite (sm90, via ragged): $(tail -1 "$OUT/paged-suite.log")"
for setting in 0 1; do
  tag=$([ $setting = 1 ] && echo on || echo off)
  FLASHINFER_JIT_PAGED_VIA_RAGGED=$setting timeout "${BENCH_S:-150}" "$PY" benchmarks/bench_prefill.py --quick \
    --workloads "$WORKLOADS" --impls flashinfer_jit,flashinfer_jit_paged --out "$OUT/$tag" 2>&1 \
    | grep -E "^== |^  flashinfer_jit" | sed "s/^/$tag: /" | cut -c1-110
done
