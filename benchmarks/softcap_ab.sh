#!/usr/bin/env bash
# A/B of the sm90 kernel's polynomial exp2 (switches_sm90.h: FIJ_POLY_EXP2, softmax.cuh: exp2_poly) in
# one device call: the soft-cap kernel ran at 0.861 of the plain causal kernel's TFLOP/s on the H100
# (issue #12, MUFU-bound; target >= 0.95). For each setting (FLASHINFER_JIT_EXTRA_CUDAFLAGS, part of the
# cache key): prebuild the sm90 kernels the tests and rows load (in parallel), run the soft-cap / window
# variant GPU tests (ragged hd128 bf16, paged hd128 fp16 page 16), the ALiBi ragged hd128 test and the
# ragged suite's hd128 cases on the sm90 kernel, then bench_prefill's chat16_causal_hd128,
# chat16_causal_hd128_softcap50 and chat16_causal_hd128_alibi_mode rows (the "variant" lines are their
# ratios to the plain row; ALiBi was 0.85 on the H100), all on one card in one run.
#
#   OUT=dir PYTHONPATH=. bash benchmarks/softcap_ab.sh [SETTING ...]
#
# Writes OUT/<tag>-tests.log, OUT/<tag>-ragged-tests.log and OUT/<tag>/<card>-<date>-prefill.{json,md};
# prints each setting's test tails, TFLOP/s lines and ratio. A setting that would start after BUDGET_S
# (default 420) seconds minus its expected 150 is skipped, so the call ends inside the 600 s limit.
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:?set OUT to the output folder}
SETTINGS=("$@")
# default: today's kernels, a quarter and half of the element exp2s on the FMA pipe
[ ${#SETTINGS[@]} -eq 0 ] && SETTINGS=("" "-DFIJ_POLY_EXP2=2" "-DFIJ_POLY_EXP2=4")
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-420}
mkdir -p "$OUT"
tag() { local t=${1//-D/}; t=${t//[^A-Za-z0-9_]/_}; echo "${t:-default}"; }

for setting in "${SETTINGS[@]}"; do
  t=$(tag "$setting")
  if [ $SECONDS -gt $((BUDGET_S - 150)) ]; then echo "$t: skipped (budget: ${SECONDS} s used of $BUDGET_S)"; continue; fi
  export FLASHINFER_JIT_CACHE_DIR="$PWD/cache/softcap-$t" FLASHINFER_JIT_EXTRA_CUDAFLAGS="$setting"
  timeout 150 "$PY" - <<'PYEOF' | tail -1
from flashinfer_jit import cache, prebuild as pb, toolchain
from flashinfer_jit.spec import PrefillSpec
# ragged bf16: the variant tests (window x cap) and the bench rows / ragged suite (plain; fp16 too)
specs = [PrefillSpec("ragged", 128, "bf16", c, backend="sm90", sliding_window=w, soft_cap=s)
         for c in (False, True) for w in (False, True) for s in (False, True)]
specs += [PrefillSpec("ragged", 128, "fp16", c, backend="sm90") for c in (False, True)]
# ALiBi (its bias by row since 6448ad8: two FFMAs an element): its hd128 test and bench row
specs += [PrefillSpec("ragged", 128, "bf16", c, backend="sm90", alibi=True) for c in (False, True)]
# the paged variant test's fp16 kernels (window, cap, both)
specs += [PrefillSpec("paged", 128, "fp16", c, backend="sm90", sliding_window=w, soft_cap=s)
          for c in (False, True) for w, s in ((True, False), (False, True), (True, True))]
report = pb.run(specs, [toolchain.target_archs()], cache.writable_layer())
print(f"prebuild: {report.count(pb.BUILT)} built, {report.count(pb.FAILED)} failed in {report.seconds:.1f} s")
PYEOF
  FIJ_TEST_PREFILL_BACKEND=sm90 timeout 100 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_variants_gpu.py \
    -k "soft_cap or (ragged_variant and hd128) or (paged_variant and 16) or (alibi_ragged and 128)" > "$OUT/$t-tests.log" 2>&1
  echo "$t: variant tests: $(tail -1 "$OUT/$t-tests.log")"
  FIJ_TEST_PREFILL_BACKEND=sm90 timeout 100 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_prefill_gpu.py \
    -k "ragged_matches_reference and hd128" > "$OUT/$t-ragged-tests.log" 2>&1
  echo "$t: ragged suite hd128 (sm90): $(tail -1 "$OUT/$t-ragged-tests.log")"
  timeout 120 "$PY" benchmarks/bench_prefill.py --quick --workloads chat16_causal_hd128,chat16_causal_hd128_softcap50,chat16_causal_hd128_alibi_mode \
    --impls flashinfer_jit --out "$OUT/$t" 2>&1 | grep -E "^== |^  flashinfer_jit|^variant" | cut -c1-110 | sed "s/^/$t: /"
done
echo "done in $SECONDS s"
