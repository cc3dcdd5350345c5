#!/usr/bin/env bash
# A/B of the sm90 kernel's fused-RoPE switches (switches_sm90.h: FIJ_SM90_ROPE_*) and the standalone
# RoPE kernel's (rope.cuh: FIJ_ROPE_VEC) in one device call. For each setting
# (FLASHINFER_JIT_EXTRA_CUDAFLAGS, part of the cache key): prebuild the sm90 RoPE kernels the tests load
# (in parallel), run the sm90 fused-RoPE GPU tests and the standalone RoPE tests (not for the diagnostic
# settings, whose results are wrong by design), then bench_prefill's chat16_causal_hd128_rope row, ours
# and apply_rope_pos_ids + attention (and, for the first setting, the plain chat16_causal_hd128 row: the
# ratio's denominator), all on one card in one run.
#
#   OUT=dir PYTHONPATH=. bash benchmarks/rope_ab.sh [SETTING ...]
#
# The first setting gets every head_dim's tests, the others hd128's. Writes OUT/<tag>-tests.log,
# OUT/<tag>-rope-tests.log and
# OUT/<tag>/<card>-<date>-prefill.{json,md}; prints one line per setting.
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:?set OUT to the output folder}
SETTINGS=("$@")
# default: today's kernels, the 16-byte standalone RoPE kernel (rope.cuh: the K-once pass and
# apply_rope_pos_ids), and that with Q rotated by the producer (-DFIJ_SM90_ROPE_DIAG=1 / 2: diagnostics)
[ ${#SETTINGS[@]} -eq 0 ] && SETTINGS=("" "-DFIJ_ROPE_VEC=1" "-DFIJ_ROPE_VEC=1 -DFIJ_SM90_ROPE_Q_PRODUCER=1")
PY=${PYTHON:-python3}
mkdir -p "$OUT"
tag() { local t=${1//-D/}; t=${t//[^A-Za-z0-9_]/_}; echo "${t:-default}"; }

first=1
for setting in "${SETTINGS[@]}"; do
  t=$(tag "$setting")
  export FLASHINFER_JIT_EXTRA_CUDAFLAGS="$setting" FLASHINFER_JIT_CACHE_DIR="$PWD/cache/rope-$t"
  diag=0; [[ $setting == *ROPE_DIAG* ]] && diag=1
  dims="128"; [ $first = 1 ] && dims="64 128 256"
  [ $diag = 1 ] && dims="-"  # bench only: its one kernel is built by the bench
  HEAD_DIMS="$dims" timeout 150 "$PY" - <<'PYEOF' | tail -1
import os
from flashinfer_jit import cache, prebuild as pb, toolchain
from flashinfer_jit.spec import PrefillSpec
dims = [int(d) for d in os.environ["HEAD_DIMS"].split() if d != "-"]
specs = [PrefillSpec("ragged", d, "bf16", c, backend="sm90", rope=True) for d in dims for c in (False, True)]
if 128 in dims:  # the paged test's kernels (fp16, with and without a window + soft-cap)
    specs += [PrefillSpec(layout, 128, "fp16", c, backend="sm90", rope=True, sliding_window=w, soft_cap=w)
              for layout in ("paged",) for c in (False, True) for w in (False, True)]
report = pb.run(specs, [toolchain.target_archs()], cache.writable_layer())
print(f"prebuild: {report.count(pb.BUILT)} built, {report.count(pb.FAILED)} failed in {report.seconds:.1f} s")
PYEOF
  if [ $diag = 0 ]; then
    sel="fused_rope and sm90"; [ $first = 1 ] || sel="fused_rope and sm90 and (hd128 or NHD or HND)"
    timeout 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_variants_gpu.py -k "$sel" \
      > "$OUT/$t-tests.log" 2>&1
    timeout 90 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_rope.py > "$OUT/$t-rope-tests.log" 2>&1
    echo "$t: standalone RoPE tests: $(tail -1 "$OUT/$t-rope-tests.log")"
    echo "$t: sm90 RoPE tests: $(tail -1 "$OUT/$t-tests.log")"
  fi
  workloads=chat16_causal_hd128_rope; [ $first = 1 ] && workloads=chat16_causal_hd128,chat16_causal_hd128_rope
  timeout 150 "$PY" benchmarks/bench_prefill.py --quick --workloads "$workloads" --impls flashinfer_jit,flashinfer_jit_rope_2calls \
    --out "$OUT/$t" 2>&1 | grep -E "^  flashinfer_jit" | sed "s/^/$t: /" | cut -c1-100
  first=0
done
