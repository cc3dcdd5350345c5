"""Load one kernel in a fresh process and report what happened, as one JSON line on stdout.

    python load_kernel.py <family> <field=value>... [--go-file PATH] [--forbid-build] [--no-default-cuda]

--go-file        wait until PATH exists before loading (start several processes, then release them)
--forbid-build   make any call into the compiler fail loudly (proves a load needed no compiler)
--no-default-cuda  forget the built-in CUDA install locations (/usr/local/cuda, ...)
--hang-in-publish PATH  when publishing a build (manifest written, rename not yet done), create PATH
                 and sleep: the test SIGKILLs the process there
"""
import argparse
import json
import os
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("family")
    parser.add_argument("fields", nargs="*")
    parser.add_argument("--go-file")
    parser.add_argument("--forbid-build", action="store_true")
    parser.add_argument("--no-default-cuda", action="store_true")
    parser.add_argument("--hang-in-publish")
    args = parser.parse_args()

    from flashinfer_jit import build, cache, codegen, loader, spec, toolchain

    if args.hang_in_publish:
        real_rename = cache.os.rename

        def rename_then_hang(src, dst, *a, **k):
            if os.path.basename(os.path.dirname(str(src))) == "tmp" and "quarantine" not in str(dst):
                open(args.hang_in_publish, "w").close()
                time.sleep(600)
            return real_rename(src, dst, *a, **k)

        cache.os.rename = rename_then_hang

    if args.no_default_cuda:
        toolchain.DEFAULT_CUDA_HOMES = ()
    if args.forbid_build:
        def no_build(*a, **k):
            raise AssertionError("the compiler was invoked although the kernel is cached")
        build.build_library = no_build

    values = {}
    for item in args.fields:
        name, value = item.split("=", 1)
        values[name] = int(value) if value.isdigit() else {"true": True, "false": False}.get(value, value)
    kernel_spec = spec.spec_from_dict({"family": args.family, **values})

    if args.go_file:
        deadline = time.monotonic() + 120
        while not os.path.exists(args.go_file):
            if time.monotonic() > deadline:
                print("timed out waiting for the go file", file=sys.stderr)
                return 3
            time.sleep(0.01)
    start = time.perf_counter()
    kernel = loader.load(kernel_spec)
    seconds = time.perf_counter() - start
    print(json.dumps({
        "library": str(kernel.entry.library),
        "entry": str(kernel.entry.path),
        "key": kernel.key,
        "builds": loader.build_count,
        "seconds": seconds,
        "package": os.path.dirname(loader.__file__),
        "templates": str(codegen.templates_dir()),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
