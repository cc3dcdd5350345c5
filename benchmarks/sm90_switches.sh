#!/usr/bin/env bash
# A/B of the sm90 kernel's compile-time experiment switches on one device machine, in one call: for
# each setting (FLASHINFER_JIT_EXTRA_CUDAFLAGS, part of the cache key, so each has its own kernels) the
# ragged and paged GPU suites forced onto sm90 (correctness first: a setting that fails is not benchmarked) and bench_prefill
# with our sm90 kernel and FA2 varlen, alternating settings for ROUNDS rounds.
#
#   PYTHONPATH=. bash benchmarks/sm90_switches.sh OUT_DIR [ROUNDS] [SETTING ...]
#
# It writes more than the device tool brings back (8 files, 2 folders deep): give it a scratch OUT_DIR
# and tar that into the tool's $OUT, e.g.
#   mkdir -p /tmp/sw && bash benchmarks/sm90_switches.sh /tmp/sw 1 "" -DFIJ_SM90_TAIL_WARP=1 > $OUT/sw.log 2>&1;
#   tar czf $OUT/sw.tar.gz -C /tmp sw
#
# Settings default to "" (the shipped kernel: ping-pong, staged epilogue and snake order on) and each
# switch turned off alone. Writes OUT_DIR/<tag>-smoke.log, OUT_DIR/<tag>-tests.log
# and OUT_DIR/<tag>-r<round>/<card>-<date>-prefill.json (+ .md); ab_compare.py compares two of them.
# BENCH_ARGS adds bench_prefill arguments (e.g. "--workloads chat16_causal_hd128,chat16_full_hd128 --quick").
# SUITES=0 skips the GPU suites (smoke only: for screening; a setting that ships needs them).
# IMPLS (default flashinfer_jit,fa2_varlen) picks bench_prefill's implementations, e.g. add flashinfer_jit_paged.
# Budget: ~40 s of builds (ragged and paged) + ~30 s of tests + ~60 s of bench per setting and round on an H200.
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=$1
ROUNDS=${2:-1}
shift $(( $# >= 2 ? 2 : $# ))
SETTINGS=("$@")
[ ${#SETTINGS[@]} -eq 0 ] && SETTINGS=("" "-DFIJ_SM90_PINGPONG=0" "-DFIJ_SM90_STAGED_EPILOGUE=0" "-DFIJ_SM90_SNAKE=0")
PY=${PYTHON:-python3}
mkdir -p "$OUT"
tag() { local t=${1//-D/}; t=${t//[^A-Za-z0-9_=]/_}; echo "${t:-default}"; }

# SM clock, power and temperature every 200 ms while the script runs (bench figures of one kernel moved by
# up to 15% between scripts: clocks under the power cap are the first suspect).
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active \
    --format=csv -lms 200 > "$OUT/clocks.csv" 2>/dev/null &
  SAMPLER=$!
  trap 'kill $SAMPLER 2>/dev/null' EXIT
fi
declare -A OK
for setting in "${SETTINGS[@]}"; do
  t=$(tag "$setting")
  export FLASHINFER_JIT_EXTRA_CUDAFLAGS="$setting" FLASHINFER_JIT_CACHE_DIR="$PWD/cache/switch-$t"
  timeout 120 "$PY" -m flashinfer_jit prebuild --family prefill --layout ragged,paged --backend sm90,fa2 | tail -1
  # A wrong barrier hangs: a short smoke run first, so a hanging setting costs 60 s, not the suite's 240.
  if ! timeout 60 "$PY" benchmarks/smoke_prefill.py --backend sm90 > "$OUT/$t-smoke.log" 2>&1; then
    OK[$t]=0
    echo "$t: smoke FAILED or hung ($(tail -1 "$OUT/$t-smoke.log"))"
    continue
  fi
  if [ "${SUITES:-1}" = 0 ]; then  # screening: the smoke run only
    OK[$t]=1
    echo "$t: smoke passed (suites skipped: SUITES=0)"
    continue
  fi
  if FIJ_TEST_PREFILL_BACKEND=sm90 timeout 240 "$PY" -m pytest -m gpu -x -q -p no:cacheprovider \
      tests/test_prefill_gpu.py tests/test_paged_gpu.py > "$OUT/$t-tests.log" 2>&1; then
    OK[$t]=1
  else
    OK[$t]=0
  fi
  echo "$t: sm90 suite $( [ "${OK[$t]}" = 1 ] && echo passed || echo FAILED ) ($(tail -1 "$OUT/$t-tests.log"))"
done
for round in $(seq 1 "$ROUNDS"); do
  for setting in "${SETTINGS[@]}"; do
    t=$(tag "$setting")
    [ "${OK[$t]}" = 1 ] || continue
    export FLASHINFER_JIT_EXTRA_CUDAFLAGS="$setting" FLASHINFER_JIT_CACHE_DIR="$PWD/cache/switch-$t"
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
    timeout 200 "$PY" benchmarks/bench_prefill.py --impls "${IMPLS:-flashinfer_jit,fa2_varlen}" --deadline 170 ${BENCH_ARGS:-} \
      --out "$OUT/$t-r$round" | grep -E "^==|flashinfer_jit " | cut -c1-110
  done
done
