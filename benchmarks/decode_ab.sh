#!/usr/bin/env bash
# A/B of the FA2-class kernel's decode switches (mainloop_sm80.cuh) on bench_decode's bf16, fp8 and RoPE
# rows, one card, one run. Each setting is its own FLASHINFER_JIT_EXTRA_CUDAFLAGS (part of the cache
# key), so kernels of different settings never mix:
#   ""                      the default (today: the CTA widens each whole fp8 tile, 3 stages)
#   -DFIJ_DECODE_WARP_LOCAL=1  each warp widens (fp8: K then V into one 16-bit tile, 5 fp8 stages) or
#                           rotates (RoPE) only its own keys, warp barriers instead of CTA ones
#   -DFIJ_KV_STAGES=4       (named only) the default widening, 4 stages (bf16 decode too)
#
#   OUT=dir PYTHONPATH=. bash benchmarks/decode_ab.sh [SETTING ...]
#
# Per setting: prebuild the paged libraries below (in parallel), the fp8 and RoPE decode GPU tests (tests/test_fp8_gpu.py -k decode, tests/test_variants_gpu.py
# -k "rope and decode"; log OUT/<tag>-tests.log), then
# bench_decode --quick (OUT/<tag>/<card>-<date>-decode.{json,md}); prints the rows and fp8 ratios.
# Expect 2-3 minutes a setting on a 16-core device (each setting builds its own kernels): two settings
# fit one 600 s device call.
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:?set OUT to the output folder}
SETTINGS=("$@")
[ ${#SETTINGS[@]} -eq 0 ] && SETTINGS=("" "-DFIJ_DECODE_WARP_LOCAL=1")
WORKLOADS=${WORKLOADS:-b1_kv32768,b16_kv4096,b128_kv2048,b1_kv32768_fp8,b16_kv4096_fp8,b128_kv2048_fp8,b128_kv2048_rope,b16_kv4096_rope}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
tag() { local t=${1//-D/}; t=${t//[^A-Za-z0-9_]/_}; echo "${t:-default}"; }
for setting in "${SETTINGS[@]}"; do
  t=$(tag "$setting")
  export FLASHINFER_JIT_EXTRA_CUDAFLAGS="$setting" FLASHINFER_JIT_CACHE_DIR="$PWD/cache/decode-$t"
  timeout "${BUILD_S:-200}" "$PY" - <<'PYEOF' | tail -1
from flashinfer_jit import cache, prebuild as pb, toolchain
from flashinfer_jit.spec import PrefillSpec
# the paged fa2 libraries (decode tiles inside) the tests and the bench rows load, built in parallel
shapes = [(128, "bf16", "", False), (128, "bf16", "", True), (128, "bf16", "fp8e4m3", False),
          (128, "bf16", "fp8e5m2", False), (64, "fp16", "fp8e4m3", False), (256, "bf16", "fp8e5m2", False),
          (128, "bf16", "fp8e4m3", True), (64, "fp16", "fp8e5m2", True), (256, "bf16", "fp8e4m3", True)]
specs = [PrefillSpec("paged", d, dt, False, backend="fa2", kv_dtype=kv, rope=rope) for d, dt, kv, rope in shapes]
report = pb.run(specs, [toolchain.target_archs()], cache.writable_layer())
print(f"prebuild: {report.count(pb.BUILT)} built, {report.count(pb.FAILED)} failed in {report.seconds:.1f} s")
PYEOF
  timeout "${TESTS_S:-150}" "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_fp8_gpu.py \
    tests/test_variants_gpu.py -k "(fp8 and decode) or (rope and decode)" > "$OUT/$t-tests.log" 2>&1
  echo "$t: fp8 / RoPE decode tests: $(tail -1 "$OUT/$t-tests.log")"
  timeout "${BENCH_S:-120}" "$PY" benchmarks/bench_decode.py --quick --impls flashinfer_jit --workloads "$WORKLOADS" \
    --out "$OUT/$t" 2>&1 | grep -E "^== |^  flashinfer_jit |^fp8 |^variant " | sed "s/^/$t: /" | cut -c1-120
  # the planner's split target at two CTAs an SM (fp8 tiles: half the bytes in flight per CTA)
  FLASHINFER_JIT_SPLIT_CTAS_PER_SM=2 timeout "${BENCH_S:-120}" "$PY" benchmarks/bench_decode.py --quick \
    --impls flashinfer_jit --workloads "${SPLIT_WORKLOADS:-b1_kv32768,b16_kv4096,b1_kv32768_fp8,b16_kv4096_fp8}" \
    --out "$OUT/$t-split2" 2>&1 | grep -E "^== |^  flashinfer_jit " | sed "s/^/$t split2: /" | cut -c1-120
done
