#!/usr/bin/env bash
# One short device call for new features: build the kernels the feature tests use, run those GPU tests,
# then bench_decode and bench_prefill on the feature rows (--quick timing). Everything lands in $OUT:
# feature_tests.log, dec/ and pre/ (run_device.sh's logs and bench reports). Knobs: BENCH_COMMIT,
# TESTS (default: the variant / RoPE / fp8 GPU tests), DECODE_WORKLOADS, PREFILL_WORKLOADS, PREFILL_IMPLS.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
export PYTHONPATH=$PWD FIJ_CACHE_DIR=${FIJ_CACHE_DIR:-$PWD/cache/device}
TESTS=${TESTS:-"tests/test_variants_gpu.py tests/test_fp8_gpu.py tests/test_rope.py"}
DECODE_WORKLOADS=${DECODE_WORKLOADS:-b1_kv32768,b16_kv4096,b128_kv2048,b128_kv2048_softcap30,b128_kv2048_window1023,b128_kv2048_rope,b16_kv4096_rope,b128_kv2048_alibi,b1_kv32768_fp8,b16_kv4096_fp8,b128_kv2048_fp8,b128_kv2048_fp8e5m2}
PREFILL_WORKLOADS=${PREFILL_WORKLOADS:-chat16_causal_hd128,chat16_causal_hd128_softcap50,chat16_causal_hd128_window4096,chat16_causal_hd128_rope,chat16_causal_hd128_alibi_mode,chat16_causal_hd128_alibi,chat16_causal_hd128_fp8kv}
PREFILL_IMPLS=${PREFILL_IMPLS:-flashinfer_jit,flashinfer_jit_fa2,flashinfer_jit_paged,flashinfer_jit_rope_2calls,flex_docmask}
mkdir -p "$OUT/dec" "$OUT/pre"
OUT=/tmp/fij-build BUDGET_S=${BUILD_S:-150} BUILD_HEAD_DIM=${BUILD_HEAD_DIM:-128} bash benchmarks/run_device.sh build > /tmp/fij-build.log 2>&1
grep -E "^build: |== build|warm" /tmp/fij-build.log | tail -3
FLASHINFER_JIT_CACHE_DIR=$FIJ_CACHE_DIR timeout "${TESTS_S:-160}" python3 -m pytest -m gpu -q -rfE --maxfail=20 \
  -p no:cacheprovider $TESTS > "$OUT/feature_tests.log" 2>&1
tail -30 "$OUT/feature_tests.log"
OUT=$OUT/dec BUDGET_S=${DECODE_S:-100} BENCH_DECODE_ARGS="--quick --workloads $DECODE_WORKLOADS" \
  bash benchmarks/run_device.sh bench_decode > /dev/null 2>&1
grep -E "^variant|^fp8|^target" "$OUT"/dec/run_device.log
OUT=$OUT/pre BUDGET_S=${PREFILL_S:-150} BENCH_ARGS="--quick --workloads $PREFILL_WORKLOADS --impls $PREFILL_IMPLS" \
  bash benchmarks/run_device.sh bench > /dev/null 2>&1
grep -E "^variant|TFLOP/s  \|" "$OUT"/pre/run_device.log | head -40
rm -f "$OUT"/dec/summary.json "$OUT"/pre/summary.json
