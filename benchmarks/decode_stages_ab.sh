#!/usr/bin/env bash
# A/B of the FA2-class decode kernel's K/V pipeline depth (mainloop_sm80.cuh: FIJ_KV_STAGES, default 3
# for decode tiles) on bench_decode's bf16 and fp8 rows, one card, one run. Each setting is its own
# FLASHINFER_JIT_EXTRA_CUDAFLAGS (part of the cache key), so kernels of different settings never mix.
#
#   OUT=dir PYTHONPATH=. bash benchmarks/decode_stages_ab.sh [STAGES ...]      (default: 3 4 5)
#
# Writes OUT/stages<N>/<card>-<date>-decode.{json,md}; prints bench_decode's per-row and fp8 lines.
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:?set OUT to the output folder}
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(3 4 5)
WORKLOADS=${WORKLOADS:-b1_kv32768,b16_kv4096,b128_kv2048,b1_kv32768_fp8,b16_kv4096_fp8,b128_kv2048_fp8}
PY=${PYTHON:-python3}
for s in "${STAGES[@]}"; do
  export FLASHINFER_JIT_EXTRA_CUDAFLAGS="-DFIJ_KV_STAGES=$s" FLASHINFER_JIT_CACHE_DIR="$PWD/cache/stages$s"
  timeout "${BENCH_S:-120}" "$PY" benchmarks/bench_decode.py --quick --impls flashinfer_jit --workloads "$WORKLOADS" \
    --out "$OUT/stages$s" 2>&1 | grep -E "^== |^  flashinfer_jit |^fp8 " | sed "s/^/stages $s: /" | cut -c1-110
done
