#!/usr/bin/env python3
"""A stand-in for nvcc, for tests that exercise the cache and the build plumbing without CUDA.

torch's ninja file calls it as `nvcc -MD -MF <out>.d <flags...> -c <src.cu> -o <out.o>`. Instead of
compiling CUDA, it compiles a small C file with `cc -c -fPIC`: one stub (returning 0) per function
the generated source exports, so the real link step and a ctypes load both work. `<prefix>_kv_tile`
returns the source's `constexpr int kKvTile = N;` (the spec's kv_tile), so a caller can check a value
that came out of the library.

Behaviour comes from the environment (ninja passes it through):

  FAKE_NVCC_VERSION         release printed by --version (default 99.9)
  FAKE_NVCC_COUNTER         file that gets one line per compile, appended before anything else
  FAKE_NVCC_SLEEP           seconds to sleep before producing output
  FAKE_NVCC_FAIL            print this to stderr and exit 1
  FAKE_NVCC_FAIL_MATCH      ... but only for sources whose path contains this text (e.g. "hd256")
  FAKE_NVCC_TIMELINE        file that gets "<pid> start <t>" / "<pid> end <t>" lines (parallelism checks)
  FAKE_NVCC_DIE_MID_WRITE   1: write half of the object file, then SIGKILL itself
"""
import os
import re
import signal
import subprocess
import sys
import tempfile
import time


def _version() -> int:
    release = os.environ.get("FAKE_NVCC_VERSION", "99.9")
    print("nvcc: NVIDIA (R) Cuda compiler driver (fake, for tests)")
    print(f"Cuda compilation tools, release {release}, V{release}.0")
    print(f"Build fake_{release}")
    return 0


def _option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args and args.index(name) + 1 < len(args) else None


def _stub_c(source_text: str) -> str:
    # `FIJ_EXPORT int fij_<uri>_merge_two(` and `FIJ_DEFINE_ERROR_STRING(fij_<uri>)`
    names = re.findall(r"FIJ_EXPORT\s+[\w\s\*]*?\b(\w+)\s*\(", source_text)
    names += [f"{p}_error_string" for p in re.findall(r"FIJ_DEFINE_ERROR_STRING\((\w+)\)", source_text)]
    kv_tile = re.search(r"constexpr\s+int\s+kKvTile\s*=\s*(\d+)\s*;", source_text)
    lines = ["int fake_nvcc_object(void) { return 42; }"]
    for name in dict.fromkeys(names):
        value = kv_tile.group(1) if kv_tile and name.endswith("_kv_tile") else "0"
        lines.append(f"int {name}(void) {{ return {value}; }}")
    return "\n".join(lines) + "\n"


def _timeline(event: str) -> None:
    path = os.environ.get("FAKE_NVCC_TIMELINE")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.write(fd, f"{os.getpid()} {event} {time.time():.6f}\n".encode())
        os.close(fd)


def _compile(args: list[str]) -> int:
    source, out, depfile = _option(args, "-c"), _option(args, "-o"), _option(args, "-MF")
    if source is None or out is None:
        print(f"fake nvcc: expected `-c <src> -o <out>`, got {args}", file=sys.stderr)
        return 2
    counter = os.environ.get("FAKE_NVCC_COUNTER")
    if counter:
        fd = os.open(counter, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.write(fd, f"{os.getpid()} {os.path.basename(source)}\n".encode())
        os.close(fd)
    _timeline("start")
    time.sleep(float(os.environ.get("FAKE_NVCC_SLEEP", "0")))
    message = os.environ.get("FAKE_NVCC_FAIL")
    if message and os.environ.get("FAKE_NVCC_FAIL_MATCH", "") in source:
        _timeline("end")
        print(f"{source}(1): error: {message}", file=sys.stderr)
        return 1
    with open(source) as f:
        stub = _stub_c(f.read())
    with tempfile.TemporaryDirectory() as tmp:
        c_file, obj = os.path.join(tmp, "stub.c"), os.path.join(tmp, "stub.o")
        with open(c_file, "w") as f:
            f.write(stub)
        subprocess.run([os.environ.get("CC", "cc"), "-c", "-fPIC", c_file, "-o", obj], check=True)
        with open(obj, "rb") as f:
            data = f.read()
    if os.environ.get("FAKE_NVCC_DIE_MID_WRITE") == "1":
        with open(out, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    with open(out, "wb") as f:
        f.write(data)
    if depfile:
        with open(depfile, "w") as f:
            f.write(f"{out}: {source}\n")
    _timeline("end")
    return 0


def main(args: list[str]) -> int:
    if "--version" in args:
        return _version()
    return _compile(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
