"""Start N processes that load the same kernel at the same moment; report each, as one JSON list.

    python fork_loaders.py N GO_FILE <family> <field=value>...

The parent imports flashinfer_jit (and torch) once, then forks N children before any kernel is
loaded: every child is its own process with an empty in-process memo and its own file locks, so
the cache sees N cold loaders, without paying N torch imports (seconds each on a small CI machine).
Each child waits for GO_FILE, calls loader.load, and writes its report to a pipe. A child that
fails reports its traceback; the list always has N entries.
"""
import json
import os
import sys
import time
import traceback


def main() -> int:
    n, go_file, family, *fields = sys.argv[1:]
    from flashinfer_jit import loader, spec

    values = {}
    for item in fields:
        name, value = item.split("=", 1)
        values[name] = int(value) if value.isdigit() else {"true": True, "false": False}.get(value, value)
    kernel_spec = spec.spec_from_dict({"family": family, **values})

    children = []
    for _ in range(int(n)):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            code = 0
            try:
                deadline = time.monotonic() + 120
                while not os.path.exists(go_file):
                    if time.monotonic() > deadline:
                        raise TimeoutError("no go file")
                    time.sleep(0.005)
                start = time.perf_counter()
                kernel = loader.load(kernel_spec)
                report = {"pid": os.getpid(), "builds": loader.build_count, "seconds": time.perf_counter() - start,
                          "library": str(kernel.entry.library), "entry": str(kernel.entry.path)}
            except BaseException:  # noqa: BLE001  (report it to the parent whatever it is)
                report = {"pid": os.getpid(), "error": traceback.format_exc()}
                code = 1
            os.write(write_fd, json.dumps(report).encode())
            os.close(write_fd)
            os._exit(code)
        os.close(write_fd)
        children.append((pid, read_fd))
    print("forked", flush=True)

    reports = []
    for pid, read_fd in children:
        chunks = []
        while True:
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
        report = json.loads(b"".join(chunks) or b'{"error": "no report"}')
        report["exit_status"] = os.waitstatus_to_exitcode(status)
        reports.append(report)
    print(json.dumps(reports))
    return 0 if all(r["exit_status"] == 0 for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
