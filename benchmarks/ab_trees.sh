#!/usr/bin/env bash
# A/B on one device machine, in one call: the benchmarks of this checkout ("new") and of another tree
# ("old", e.g. `git archive <commit> | tar -x -C baseline/`), alternating new, old, new, old, each
# tree with its own kernel cache. Only our impls run (peers do not change between trees).
#
#   bash benchmarks/ab_trees.sh OLD_TREE OUT_DIR [ROUNDS]
#
# Writes OUT_DIR/{new,old}{1..ROUNDS}-{prefill,decode}.json (+ .md) and OUT_DIR/ab.md, the row-by-row
# comparison (benchmarks/ab_compare.py). OLD_COMMIT / NEW_COMMIT name the trees in the report.
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
NEW=$PWD
OLD=$(cd "$1" && pwd)
OUT=$2
ROUNDS=${3:-2}
PY=${PYTHON:-python3}
mkdir -p "$OUT"

prebuild() {  # tree cache
  (cd "$1" && PYTHONPATH="$1" FLASHINFER_JIT_CACHE_DIR="$2" "$PY" -m flashinfer_jit prebuild \
    --family prefill --head-dim 64,128 --dtype bf16 --jobs 16 >/dev/null 2>&1) || echo "prebuild in $1 failed"
}
prebuild "$NEW" /tmp/ab-cache-new &
prebuild "$OLD" /tmp/ab-cache-old &
wait

for round in $(seq 1 "$ROUNDS"); do
  for side in new old; do
    tree=$NEW; [ "$side" = old ] && tree=$OLD
    commit=${NEW_COMMIT:-new}; [ "$side" = old ] && commit=${OLD_COMMIT:-old}
    mkdir -p "$OUT/$side$round"
    for bench in prefill decode; do
      impls=flashinfer_jit,flashinfer_jit_paged; [ $bench = decode ] && impls=flashinfer_jit,flashinfer_jit_graph
      (cd "$tree" && PYTHONPATH="$tree" FLASHINFER_JIT_CACHE_DIR=/tmp/ab-cache-$side BENCH_COMMIT=$commit \
        "$PY" benchmarks/bench_$bench.py --impls $impls --out "$OUT/$side$round" >"$OUT/$side$round/$bench.log" 2>&1) \
        || echo "bench_$bench in $side round $round failed (see $OUT/$side$round/$bench.log)"
      for f in "$OUT/$side$round"/*-$bench.json; do [ -f "$f" ] && cp "$f" "$OUT/$side$round-$bench.json"; done
    done
  done
done
"$PY" benchmarks/ab_compare.py "$OUT" --rounds "$ROUNDS" --old "${OLD_COMMIT:-old}" --new "${NEW_COMMIT:-new}" | tee "$OUT/ab.md"
