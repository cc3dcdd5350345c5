#!/usr/bin/env bash
# A/B of the FA2-class kernel's fp8 decode switches (mainloop_sm80.cuh) on bench_decode's bf16 and fp8
# rows, one card, one run. Each setting is its own FLASHINFER_JIT_EXTRA_CUDAFLAGS (part of the cache
# key), so kernels of different settings never mix:
#   ""                      the default (today: the CTA widens each whole fp8 tile, 3 stages)
#   -DFIJ_FP8_WARP_WIDEN=1  each warp widens its own keys, K then V into one 16-bit tile; 5 fp8 stages
#   -DFIJ_KV_STAGES=4       the default widening, 4 stages (bf16 decode too: its row shows the cost)
#
#   OUT=dir PYTHONPATH=. bash benchmarks/decode_ab.sh [SETTING ...]
#
# Per setting: the fp8 decode GPU tests (tests/test_fp8_gpu.py -k decode; log OUT/<tag>-tests.log), then
# bench_decode --quick (OUT/<tag>/<card>-<date>-decode.{json,md}); prints the rows and fp8 ratios.
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:?set OUT to the output folder}
SETTINGS=("$@")
[ ${#SETTINGS[@]} -eq 0 ] && SETTINGS=("" "-DFIJ_FP8_WARP_WIDEN=1" "-DFIJ_KV_STAGES=4")
WORKLOADS=${WORKLOADS:-b1_kv32768,b16_kv4096,b128_kv2048,b1_kv32768_fp8,b16_kv4096_fp8,b128_kv2048_fp8}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
tag() { local t=${1//-D/}; t=${t//[^A-Za-z0-9_]/_}; echo "${t:-default}"; }
for setting in "${SETTINGS[@]}"; do
  t=$(tag "$setting")
  export FLASHINFER_JIT_EXTRA_CUDAFLAGS="$setting" FLASHINFER_JIT_CACHE_DIR="$PWD/cache/decode-$t"
  timeout "${TESTS_S:-150}" "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_fp8_gpu.py -k decode \
    > "$OUT/$t-tests.log" 2>&1
  echo "$t: fp8 decode tests: $(tail -1 "$OUT/$t-tests.log")"
  timeout "${BENCH_S:-120}" "$PY" benchmarks/bench_decode.py --quick --impls flashinfer_jit --workloads "$WORKLOADS" \
    --out "$OUT/$t" 2>&1 | grep -E "^== |^  flashinfer_jit |^fp8 " | sed "s/^/$t: /" | cut -c1-120
done
