#!/usr/bin/env bash
# The one command for a GPU device run. From the repo root:
#
#   PYTHONPATH=. bash benchmarks/run_device.sh                 # all: measure build tests tests_fa2 bench bench_decode sanitizer
#   PYTHONPATH=. bash benchmarks/run_device.sh tests bench     # only some steps (in the fixed order)
#
# Steps (each under `timeout`; a failing or timed-out step is recorded and the run goes on):
#   measure  benchmarks/measure_build.py: cold nvcc build and warm load (fresh processes) of
#            MergeStateSpec(128,bf16) and PrefillSpec(ragged,128,bf16,causal), in the fresh cache
#   build    benchmarks/measure_build.py --warm-all over EVERY supported spec of spec.FAMILIES and the hd128
#            attention variants (sliding window, soft-cap) the tests and benches use (prefill
#            ragged / paged (NHD and HND share one kernel), merge_state, append_paged: what all GPU tests and benches
#            load), built in parallel (ProcessPoolExecutor); measure_build's own list is ragged + merge only,
#            so this step swaps in the full list (inline Python below)
#   tests    python3 -m pytest -m gpu -q --maxfail=25 tests/   (log: $OUT/gpu_tests.log)
#   tests_fa2  the prefill suites again with FIJ_TEST_PREFILL_BACKEND=fa2 (on Hopper "auto" runs sm90)
#            (log: $OUT/gpu_tests_fa2.log)
#            Not -x by default: one early failure (say the torch.compile test of merge_state, which runs
#            before every prefill test) would hide all later results of a one-shot device run.
#            PYTEST_FLAGS="-x -q" gives exactly `pytest -m gpu -x -q tests/`.
#   bench    benchmarks/bench_prefill.py --out $OUT     (<card>-<date>-prefill.json/.md; ragged + paged rows)
#   bench_decode  benchmarks/bench_decode.py --out $OUT (<card>-<date>-decode.json/.md)
#   sanitizer  compute-sanitizer memcheck over benchmarks/sanitizer_fuzz.py (SANITIZER_CASES cases, default 60;
#            ragged and 16-token-page paged cases forced onto SANITIZER_BACKEND, default sm90 on Hopper, else
#            auto); kernels prebuilt outside the sanitizer ($OUT/sanitizer.log, sanitizer.json)
#
# Everything lands in $OUT (at most 8 files): run_device.log (this whole output), gpu_tests.log,
# <card>-<date>-build.json (the measure step's report, with the build step's --warm-all report merged in
# under "warm_all"), <card>-<date>-prefill.json/.md, <card>-<date>-decode.json/.md, summary.json (exit
# code and seconds of every step). Anything beyond 8 files is bundled into extras.tar.gz.
#
# Environment knobs:
#   OUT            output directory (default benchmarks/results/device-<timestamp>)
#   BUDGET_S       wall-clock budget for all steps, seconds (default 540); step timeouts shrink to fit
#   FIJ_CACHE_DIR  reuse this kernel cache instead of a fresh one (default: a new cache/device-run.XXXXXX
#                  under the checkout; cache/ is git-ignored). E.g. FIJ_CACHE_DIR=$PWD/cache/device keeps
#                  built kernels between calls on a still-warm machine.
#   PYTEST_FLAGS   replaces the default "-q --maxfail=25" (e.g. "-x -q" to stop at the first failure)
#   BENCH_ARGS     extra bench_prefill.py arguments (e.g. "--quick" or "--workloads chat16_causal_hd128")
#   BENCH_DECODE_ARGS  extra bench_decode.py arguments (e.g. "--quick" or "--impls flashinfer_jit,fa2_dense_kv")
#   BENCH_COMMIT   commit id to record when the checkout has no .git
#   BUILD_HEAD_DIM build step: of the supported specs only this head_dim's (the variants list stays whole)
#   PYTHON         interpreter (default python3)
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
REPO=$PWD
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-540}
ALL_STEPS=(measure build tests tests_fa2 bench bench_decode sanitizer)
# Defaults add up to more than the budget on purpose: step_timeout() shrinks a step's timeout so every
# later wanted step keeps its minimum, and fast steps leave their unused time to the later ones.
declare -A DEFAULT_T=([measure]=120 [build]=240 [tests]=220 [tests_fa2]=120 [bench]=150 [bench_decode]=100
                   [sanitizer]=150)
declare -A MIN_T=([measure]=45 [build]=60 [tests]=90 [tests_fa2]=45 [bench]=60 [bench_decode]=45 [sanitizer]=60)

STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=("${ALL_STEPS[@]}")
for s in "${STEPS[@]}"; do
  case " ${ALL_STEPS[*]} " in
    *" $s "*) ;;
    *) echo "run_device.sh: unknown step '$s' (steps: ${ALL_STEPS[*]})" >&2; exit 2 ;;
  esac
done

OUT=${OUT:-$REPO/benchmarks/results/device-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

want() { local s; for s in "${STEPS[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }

# The build step: measure_build.py --warm-all with its spec list replaced by every supported spec of every
# family. `python -c` (no __main__ file) keeps the spawned pool workers from re-running this code; they
# unpickle benchmarks.measure_build._warm_one through PYTHONPATH (the repo root).
read -r -d '' BUILD_ALL_PY <<'PYEOF'
import os, sys
from benchmarks import measure_build as mb
from flashinfer_jit.spec import FAMILIES

from flashinfer_jit.spec import PrefillSpec

# The attention variants the GPU tests and benches use (opt-in: outside supported()): hd128 of both
# backends and layouts, bf16 (benches) and fp16 (tests), causal or not.
VARIANTS = [PrefillSpec(layout, 128, dtype, causal, backend=backend, sliding_window=window, soft_cap=cap)
            for layout in ("ragged", "paged") for dtype in ("bf16", "fp16") for causal in (False, True)
            for backend in ("fa2", "sm90") for window, cap in ((True, False), (False, True), (True, True))]
# Positional encodings (tests/test_variants_gpu.py): fused RoPE and ALiBi (both backends).
VARIANTS += [PrefillSpec(layout, d, dtype, causal, backend=backend, rope=True)
             for layout in ("ragged", "paged") for dtype in ("bf16", "fp16") for causal in (False, True)
             for d in (64, 128, 256) for backend in ("fa2", "sm90")]
VARIANTS += [PrefillSpec("paged", 128, "fp16", True, backend=backend, rope=True, sliding_window=True, soft_cap=True)
             for backend in ("fa2", "sm90")]
VARIANTS += [PrefillSpec(layout, d, dtype, causal, backend=backend, alibi=True, sliding_window=window)
             for layout, dtype, window in (("ragged", "bf16", False), ("paged", "fp16", True), ("paged", "bf16", False))
             for d in (64, 128, 256) for causal in (False, True) for backend in ("fa2", "sm90")
             if layout == "ragged" or d == 128]
# fp8 KV caches (tests/test_fp8_gpu.py, bench_decode's fp8 rows): the fa2 kernel with kv_dtype.
VARIANTS += [PrefillSpec("paged", d, dtype, causal, kv_dtype=fmt)
             for fmt, d in (("fp8e4m3", 128), ("fp8e5m2", 128), ("fp8e4m3", 64), ("fp8e5m2", 256))
             for dtype, causal in (("bf16", True), ("fp16", False), ("bf16", False))]
VARIANTS += [PrefillSpec("ragged", d, "bf16", causal, kv_dtype=fmt)
             for fmt in ("fp8e4m3", "fp8e5m2") for d in (64, 128, 256) for causal in (False, True)]
VARIANTS += [PrefillSpec("paged", 128, "bf16", True, kv_dtype="fp8e4m3", rope=True, sliding_window=True)]
from flashinfer_jit.spec import AppendPagedSpec
VARIANTS += [AppendPagedSpec(128, "bf16", kv_dtype=fmt) for fmt in ("fp8e4m3", "fp8e5m2")]

def all_specs(families=None):
    specs = [s for cls in FAMILIES.values() for s in cls.supported()]
    if os.environ.get("BUILD_HEAD_DIM"):  # a short call: the supported specs of one head_dim (+ the variants)
        specs = [s for s in specs if getattr(s, "head_dim", None) == int(os.environ["BUILD_HEAD_DIM"])]
    specs += VARIANTS
    if families:
        specs = [s for s in specs if s.family in families]
    return sorted(specs, key=lambda s: (s.family != "prefill", -s.head_dim, s.uri))  # longest builds first

mb.test_specs = all_specs
print(f"build: {len(all_specs())} specs (every supported spec of {', '.join(FAMILIES)}, and {len(VARIANTS)} "
      f"attention variants)", flush=True)
code = mb.main()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
PYEOF

# Merge the build step's <card>-<date>-warm.json into the measure step's <card>-<date>-build.json (key
# "warm_all"), so $OUT stays within 8 files.
merge_build_reports() {
  local warm build
  warm=$(ls "$OUT"/*-warm.json 2>/dev/null | head -1)
  [ -n "$warm" ] || return 0
  build=$(ls "$OUT"/*-build.json 2>/dev/null | head -1)
  [ -n "$build" ] || build=${warm%-warm.json}-build.json
  "$PY" - "$build" "$warm" <<'PYEOF' && rm -f "$warm"
import json, os, sys
build, warm = sys.argv[1], sys.argv[2]
report = json.load(open(build)) if os.path.exists(build) else {}
report["warm_all"] = json.load(open(warm))
tmp = build + ".tmp"
with open(tmp, "w") as f:
    json.dump(report, f, indent=2)
    f.write("\n")
os.replace(tmp, build)
print(f"merged {os.path.basename(warm)} into {os.path.basename(build)} (key warm_all)")
PYEOF
}

START=$(date +%s)
declare -A RC SECS TIMEOUT

# Timeout for step $1: its default, shrunk so the later wanted steps keep their minimum.
step_timeout() {
  local step=$1 reserve=0 later seen=0
  for later in "${ALL_STEPS[@]}"; do
    if [ $seen -eq 1 ] && want "$later"; then reserve=$((reserve + MIN_T[$later])); fi
    [ "$later" = "$step" ] && seen=1
  done
  local left=$((BUDGET_S - ($(date +%s) - START) - reserve))
  local t=${DEFAULT_T[$step]}
  [ $left -lt $t ] && t=$left
  echo $t
}

# run_step NAME LOGFILE(or -) CMD...: run under timeout, record exit code and seconds.
run_step() {
  local name=$1 log=$2; shift 2
  local t=${TIMEOUT[$name]}
  if [ "$t" -lt 20 ]; then
    echo "== $name: SKIPPED (only ${t}s of the ${BUDGET_S}s budget left)"
    RC[$name]=skipped; SECS[$name]=0
    return
  fi
  echo
  echo "== $name (timeout ${t}s) $(date -u +%H:%M:%S): $*"
  local s rc
  s=$(date +%s)
  if [ "$log" = "-" ]; then
    timeout -k 10 "$t" "$@"
    rc=$?
  else
    timeout -k 10 "$t" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
  fi
  SECS[$name]=$(($(date +%s) - s))
  RC[$name]=$rc
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "== $name: TIMED OUT after ${t}s"; fi
  echo "== $name: exit $rc in ${SECS[$name]}s"
}

main() {
  echo "== run_device.sh $(date -u +%Y-%m-%dT%H:%M:%SZ): steps ${STEPS[*]}, budget ${BUDGET_S}s, OUT=$OUT"
  echo "== environment"
  echo "host $(hostname), $(nproc) cores"
  free -g 2>/dev/null | head -2
  timeout 30 nvidia-smi -L || echo "nvidia-smi -L failed"
  timeout 30 nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm,memory.total --format=csv || true
  "$PY" --version
  timeout 120 "$PY" - <<'EOF' || echo "python environment probe failed"
import warnings
warnings.filterwarnings("ignore")
import torch
print("torch", torch.__version__, "| cuda", torch.version.cuda, "| cudnn", torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(), "| sm", f"{p.major}.{p.minor}", "|", p.multi_processor_count, "SMs")
else:
    print("device: torch sees NO CUDA device")
for mod in ("triton", "pytest", "jinja2", "ninja", "filelock"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception as exc:
        print(mod, "MISSING:", exc)
EOF
  (command -v nvcc >/dev/null && nvcc --version | tail -2) || echo "nvcc not on PATH"
  if [ -z "${BENCH_COMMIT:-}" ]; then
    BENCH_COMMIT=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
  fi
  export BENCH_COMMIT
  echo "commit $BENCH_COMMIT"

  # A fresh kernel cache (or FIJ_CACHE_DIR when given). Private (0700): the loader refuses others'.
  if [ -n "${FIJ_CACHE_DIR:-}" ]; then
    mkdir -p "$FIJ_CACHE_DIR" && chmod 700 "$FIJ_CACHE_DIR"
    FLASHINFER_JIT_CACHE_DIR=$(cd "$FIJ_CACHE_DIR" && pwd)
  else
    # Under the checkout's git-ignored cache/ (a filesystem we know allows exec; /tmp may be noexec).
    FLASHINFER_JIT_CACHE_DIR=$(mkdir -p "$REPO/cache" && mktemp -d "$REPO/cache/device-run.XXXXXX") ||
      FLASHINFER_JIT_CACHE_DIR=$(mktemp -d "${TMPDIR:-/tmp}/fij-device-cache.XXXXXX")
  fi
  export FLASHINFER_JIT_CACHE_DIR
  unset FLASHINFER_JIT_DISABLE_BUILD FLASHINFER_JIT_PREBUILT_DIRS
  echo "FLASHINFER_JIT_CACHE_DIR=$FLASHINFER_JIT_CACHE_DIR"
  env | grep -E '^(FLASHINFER_JIT|CUDA_HOME|CUDA_PATH|TORCH_CUDA_ARCH_LIST|MAX_JOBS|PYTHONPATH)=' || true

  if want measure; then
    TIMEOUT[measure]=$(step_timeout measure)
    # Cold builds go into the run's (empty) cache so the build step can reuse them.
    local cache_arg=()
    if [ -z "$(ls -A "$FLASHINFER_JIT_CACHE_DIR" 2>/dev/null)" ]; then
      cache_arg=(--cache-dir "$FLASHINFER_JIT_CACHE_DIR")
    fi
    run_step measure - "$PY" benchmarks/measure_build.py ${cache_arg[@]+"${cache_arg[@]}"} --out "$OUT" \
      --timeout $((TIMEOUT[measure] > 30 ? TIMEOUT[measure] - 15 : 15))
  fi
  if want build; then
    TIMEOUT[build]=$(step_timeout build)
    run_step build - "$PY" -c "$BUILD_ALL_PY" --warm-all --out "$OUT" \
      --timeout $((TIMEOUT[build] > 30 ? TIMEOUT[build] - 15 : 15))
  fi
  if want tests; then
    TIMEOUT[tests]=$(step_timeout tests)
    # shellcheck disable=SC2086
    run_step tests "$OUT/gpu_tests.log" "$PY" -m pytest -m gpu ${PYTEST_FLAGS:--q --maxfail=25} -rfEsx --durations=25 \
      -p no:cacheprovider tests/
  fi
  if want tests_fa2; then
    # On Hopper "auto" (the tests step) runs the sm90 kernel for prefill: the prefill suites again on fa2.
    TIMEOUT[tests_fa2]=$(step_timeout tests_fa2)
    # shellcheck disable=SC2086
    run_step tests_fa2 "$OUT/gpu_tests_fa2.log" env FIJ_TEST_PREFILL_BACKEND=fa2 "$PY" -m pytest -m gpu \
      ${PYTEST_FLAGS:--q --maxfail=25} -rfEsx -p no:cacheprovider tests/test_prefill_gpu.py tests/test_paged_gpu.py
  fi
  if want bench; then
    TIMEOUT[bench]=$(step_timeout bench)
    # shellcheck disable=SC2086
    run_step bench - "$PY" benchmarks/bench_prefill.py --out "$OUT" \
      --deadline $((TIMEOUT[bench] > 60 ? TIMEOUT[bench] - 30 : 30)) ${BENCH_ARGS:-}
  fi
  if want bench_decode; then
    TIMEOUT[bench_decode]=$(step_timeout bench_decode)
    # shellcheck disable=SC2086
    run_step bench_decode - "$PY" benchmarks/bench_decode.py --out "$OUT" \
      --deadline $((TIMEOUT[bench_decode] > 50 ? TIMEOUT[bench_decode] - 25 : 25)) ${BENCH_DECODE_ARGS:-}
  fi
  if want sanitizer; then
    TIMEOUT[sanitizer]=$(step_timeout sanitizer)
    local backend=${SANITIZER_BACKEND:-}
    if [ -z "$backend" ]; then
      backend=auto
      [ "$("$PY" -c 'import torch; print(torch.cuda.get_device_capability()[0])' 2>/dev/null)" = 9 ] && backend=sm90
    fi
    local fuzz=(benchmarks/sanitizer_fuzz.py --n "${SANITIZER_CASES:-60}" --prefill-backend "$backend")
    "$PY" "${fuzz[@]}" --prebuild-only | tail -1
    run_step sanitizer "$OUT/sanitizer.log" compute-sanitizer --tool memcheck --error-exitcode 1 \
      "$PY" "${fuzz[@]}" --out "$OUT/sanitizer.json"
  fi

  local total=$(($(date +%s) - START))
  echo
  echo "== summary (${total}s of ${BUDGET_S}s budget)"
  local json="{\"steps\": {" sep="" s
  for s in "${STEPS[@]}"; do
    printf '   %-12s exit %-8s %5ss (timeout %ss)\n' "$s" "${RC[$s]:-not-run}" "${SECS[$s]:-0}" "${TIMEOUT[$s]:-?}"
    json+="$sep\"$s\": {\"exit\": \"${RC[$s]:-not-run}\", \"seconds\": ${SECS[$s]:-0}, \"timeout\": \"${TIMEOUT[$s]:-}\"}"
    sep=", "
  done
  json+="}, \"total_seconds\": $total, \"budget_seconds\": $BUDGET_S, \"commit\": \"$BENCH_COMMIT\", "
  json+="\"cache_dir\": \"$FLASHINFER_JIT_CACHE_DIR\", \"finished\": \"$(date -u +%Y-%m-%dT%H:%M:%SZ)\"}"
  echo "$json" > "$OUT/summary.json"

  # At most 8 files come back: merge the two build reports, then bundle any extras (never the two logs
  # or the summary).
  rm -f "$OUT"/*.tmp
  merge_build_reports || echo "== could not merge the build reports"
  local count
  count=$(find "$OUT" -type f | wc -l)
  if [ "$count" -gt 8 ]; then
    echo "== $count files in OUT: bundling extras into extras.tar.gz"
    (cd "$OUT" && find . -type f ! -name run_device.log ! -name gpu_tests.log ! -name summary.json \
       ! -name extras.tar.gz -printf '%P\n' | tar czf extras.tar.gz -T - --remove-files)
  fi
  ls -la "$OUT"
  for s in "${STEPS[@]}"; do
    [ "${RC[$s]:-1}" = "0" ] || return 1
  done
  return 0
}

main 2>&1 | tee "$OUT/run_device.log"
exit "${PIPESTATUS[0]}"
