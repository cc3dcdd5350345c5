"""Process A of the "keep running while the entry is replaced" test: load a prefill kernel library,
then call its host functions in a loop until told to stop, checking every result against the first.

    python run_loaded.py <kv_layout> <head_dim> <dtype> <causal> --ready PATH --stop PATH [--plan]

`<prefix>_kv_tile` is called every iteration (the fake compiler's stub returns the source's kKvTile,
so it is a value read from the mapped library). With --plan, the real C planner
(`<prefix>_plan`, needs a library built by nvcc) plans a fixed batch each iteration and the work
list must equal the first one. Prints one JSON line: iterations, mismatches, library.
A crash (SIGBUS/SIGSEGV from a library changed under us) shows as a negative exit status.
"""
import argparse
import json
import os
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("kv_layout")
    parser.add_argument("head_dim", type=int)
    parser.add_argument("dtype")
    parser.add_argument("causal", choices=("true", "false"))
    parser.add_argument("--ready", required=True)
    parser.add_argument("--stop", required=True)
    parser.add_argument("--plan", action="store_true")
    parser.add_argument("--max-seconds", type=float, default=120)
    args = parser.parse_args()

    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import planner_tools
    from flashinfer_jit import loader, planner
    from flashinfer_jit.abi import PlanConfig
    from flashinfer_jit.spec import PrefillSpec

    spec = PrefillSpec(args.kv_layout, args.head_dim, args.dtype, args.causal == "true")
    kernel = loader.load(spec)
    kv_tile_fn = kernel.function("kv_tile", [])

    def plan():
        qo = torch.tensor([0, 33, 44, 300, 301], dtype=torch.int32)
        kv = torch.tensor([0, 128, 300, 1000, 1800], dtype=torch.int32)
        config = PlanConfig(batch=4, group=4, num_kv_heads=2, cta_q=64, kv_tile=kv_tile_fn(), target_ctas=132,
                            min_chunk_tiles=planner.MIN_CHUNK_TILES, split_tiles=0)
        items, merges, counts = planner_tools.plan_to_tensors(kernel, qo, kv, config)
        return items.tolist(), merges.tolist(), (counts.num_items, counts.num_merges, counts.partial_rows)

    first_tile = kv_tile_fn()
    first_plan = plan() if args.plan else None
    iterations = mismatches = 0
    open(args.ready, "w").close()
    deadline = time.monotonic() + args.max_seconds
    while not os.path.exists(args.stop) and time.monotonic() < deadline:
        if kv_tile_fn() != first_tile:
            mismatches += 1
        if args.plan and plan() != first_plan:
            mismatches += 1
        iterations += 1
    print(json.dumps({"iterations": iterations, "mismatches": mismatches, "kv_tile": first_tile,
                      "plan_items": len(first_plan[0]) if first_plan else None,
                      "library": str(kernel.entry.library), "entry": str(kernel.entry.path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
