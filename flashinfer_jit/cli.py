"""`flashinfer-jit` (also `python -m flashinfer_jit`): a thin command line over library calls.

Every subcommand is one small function registered with `@command`; it gets the parsed arguments
and returns the exit status. The library does the work (prebuild.py, cache.py, loader.py), the CLI
only parses and formats:

    config     toolchain, archs, GPUs and every cache layer
    prebuild   build a matrix of kernel variants ahead of time, in parallel
    cache      list | show URI | verify [--fix] | clear [--older-than 7d] [--uri GLOB] | prune --max-size 2G

Every command takes --cache-dir DIR (the writable cache; default FLASHINFER_JIT_CACHE_DIR, else the
per-user cache). Read-only layers (FLASHINFER_JIT_PREBUILT_DIRS) are listed and verified, never
written.

Errors the package raises on purpose (FlashInferJITError) and bad settings (ValueError from a
malformed environment variable) print one clear message and exit 1, without a traceback.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import cache, codegen, env, loader, prebuild, toolchain
from .errors import FlashInferJITError
from .version import __version__

PROG = "flashinfer-jit"


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    configure: Callable[[argparse.ArgumentParser], None]


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None] = lambda parser: None):
    """Register `fn(args) -> exit status` as subcommand `name`."""
    def register(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        if name in COMMANDS:
            raise ValueError(f"subcommand {name!r} is registered twice")
        COMMANDS[name] = Command(name, help, fn, configure)
        return fn
    return register


# ---- JSON ----------------------------------------------------------------------------------------

# Every --json output is one object with this schema version and these top-level keys (the --help of
# each command lists them; tests/test_cli_json.py checks both). Values are plain; a {"value", "source"}
# pair is used only where the source is said too. Bump JSON_SCHEMA when a key changes meaning.
JSON_SCHEMA = 1
JSON_KEYS: dict[str, tuple[str, ...]] = {
    "config": ("schema", "package", "python", "torch", "cuda_home", "nvcc", "host_compiler", "target_archs",
               "nvcc_flags", "jobs", "build_disabled", "lock_timeout_s", "cache_layers", "gpus", "errors"),
    "prebuild": ("schema", "cache_dir", "jobs", "jobs_source", "dry_run", "kernels", "summary"),
    "cache list": ("schema", "layers", "entries"),
    "cache show": ("schema", "entries"),
    "cache verify": ("schema", "checked", "bad", "entries"),
    "cache clear": ("schema", "cache_dir", "dry_run", "bytes", "removed"),
    "cache prune": ("schema", "cache_dir", "dry_run", "bytes", "removed"),
}


def _print_json(command: str, body: dict[str, Any]) -> None:
    obj = {"schema": JSON_SCHEMA, **body}
    assert tuple(obj) == JSON_KEYS[command], (command, tuple(obj))
    print(json.dumps(obj, indent=2))


# ---- config --------------------------------------------------------------------------------------

def _probe(errors: dict[str, str], name: str, fn: Callable[[], Any]) -> Any:
    """fn(), or None with the reason in errors[name]: `config` must describe a broken setup, not
    crash on it."""
    try:
        return fn()
    except (FlashInferJITError, ValueError, OSError) as exc:
        errors[name] = str(exc)
        return None


def _layer_report(layer: cache.CacheLayer) -> dict[str, Any]:
    exists = layer.root.is_dir()
    return {
        "path": str(layer.root),
        "writable": layer.writable,
        "exists": exists,
        "entries": sum(1 for _ in layer.entries()) if exists else 0,
        "bytes": cache.tree_bytes(layer.root) if exists else 0,
        "problem": layer.problem() if exists else None,
    }


def _gpus() -> list[dict[str, Any]]:
    if not torch.cuda.is_available():
        return []
    from . import kernels

    # "prefill_backend": what backend="auto" runs for a ragged prefill batch there (per-plan exceptions:
    # kernels.resolve_backend)
    return [
        {"index": i, "name": torch.cuda.get_device_name(i), "capability": "%d.%d" % torch.cuda.get_device_capability(i),
         "prefill_backend": kernels.resolve_backend("auto", torch.device("cuda", i), "ragged")}
        for i in range(torch.cuda.device_count())
    ]


def collect_config(cache_dir: Path | str | None = None) -> dict[str, Any]:
    """What this process would build with and where it would look: all read-only probes. A value
    that cannot be found is None, and `errors` says why."""
    errors: dict[str, str] = {}
    archs = _probe(errors, "target_archs", toolchain.resolve_target_archs)
    jobs = _probe(errors, "jobs", toolchain.resolve_jobs)
    report = {
        "schema": JSON_SCHEMA,
        "package": {"name": PROG, "version": __version__, "location": str(Path(__file__).resolve().parent),
                    "templates": _probe(errors, "templates", lambda: str(codegen.templates_dir()))},
        "python": sys.version.split()[0],
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda,
                  "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI)},
        "cuda_home": _probe(errors, "cuda_home", lambda: str(toolchain.cuda_home())),
        "nvcc": {"path": _probe(errors, "nvcc", lambda: str(toolchain.nvcc_path())), "version": toolchain.nvcc_version()},
        "host_compiler": toolchain.host_compiler_version(),
        "target_archs": {"value": list(archs[0]) if archs else None, "source": archs[1] if archs else None},
        "nvcc_flags": _probe(errors, "nvcc_flags", lambda: toolchain.nvcc_flags(toolchain.target_archs())),
        "jobs": {"value": jobs[0] if jobs else None, "source": jobs[1] if jobs else None},
        "build_disabled": _probe(errors, "build_disabled", env.build_disabled),
        "lock_timeout_s": _probe(errors, "lock_timeout_s", env.lock_timeout),
        "cache_layers": [_layer_report(layer) for layer in cache.layers(cache_dir)],
        "gpus": _gpus(),
    }
    report["errors"] = errors
    return report


def _shown(report: dict[str, Any], name: str, value: Any, render: Callable[[Any], str] = str) -> str:
    return render(value) if value is not None else f"unavailable: {report['errors'].get(name, 'unknown')}"


def format_config(report: dict[str, Any]) -> str:
    pkg, tch, nvcc = report["package"], report["torch"], report["nvcc"]
    archs, jobs = report["target_archs"], report["jobs"]
    lines = [
        f"{'package':<15}{pkg['name']} {pkg['version']} ({pkg['location']})",
        f"{'templates':<15}{_shown(report, 'templates', pkg['templates'])}",
        f"{'python':<15}{report['python']}",
        f"{'torch':<15}{tch['version']} (CUDA {tch['cuda'] or 'none: a CPU-only build'}, "
        f"cxx11 abi {'yes' if tch['cxx11_abi'] else 'no'})",
        f"{'CUDA_HOME':<15}{_shown(report, 'cuda_home', report['cuda_home'])}",
        f"{'nvcc':<15}{_shown(report, 'nvcc', nvcc['path'])}",
        f"{'nvcc version':<15}{nvcc['version'] or 'unavailable (no usable nvcc: only cached kernels can be loaded)'}",
        f"{'host compiler':<15}{report['host_compiler']}",
        f"{'target archs':<15}" + _shown(report, "target_archs", archs["value"],
                                          lambda v: f"{', '.join(v)} ({archs['source']})"),
        f"{'nvcc flags':<15}{_shown(report, 'nvcc_flags', report['nvcc_flags'], ' '.join)}",
        f"{'jobs':<15}" + _shown(report, "jobs", jobs["value"], lambda v: f"{v} ({jobs['source']})"),
        f"{'building':<15}" + _shown(report, "build_disabled", report["build_disabled"],
                                      lambda off: "disabled (FLASHINFER_JIT_DISABLE_BUILD)" if off else "enabled"),
        f"{'lock timeout':<15}{_shown(report, 'lock_timeout_s', report['lock_timeout_s'], lambda s: f'{s:g} s')}",
    ]
    gpus = report["gpus"]
    if gpus:
        lines.append(f"{'GPUs':<15}" + "; ".join(f"{g['index']}: {g['name']} (sm {g['capability']}, prefill backend "
                                                  f"{g['prefill_backend']})" for g in gpus))
    else:
        lines.append(f"{'GPUs':<15}none visible (torch.cuda.is_available() is False): kernels can be built, not run")
    lines.append("cache layers   (searched in this order)")
    for i, layer in enumerate(report["cache_layers"], 1):
        kind = "writable" if layer["writable"] else "read-only, FLASHINFER_JIT_PREBUILT_DIRS"
        if layer["exists"]:
            state = f"{layer['entries']} {'entry' if layer['entries'] == 1 else 'entries'}, {cache.format_size(layer['bytes'])}"
        else:
            state = "does not exist yet; created by the first build" if layer["writable"] else "does not exist"
        lines.append(f"  {i}. {layer['path']} ({kind}; {state})")
        if layer["problem"]:
            lines.append(f"     PROBLEM: {layer['problem']}")
    return "\n".join(lines)


def _add_cache_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", metavar="DIR", type=Path, default=None,
                        help="the writable cache (default: FLASHINFER_JIT_CACHE_DIR, else ~/.cache/flashinfer-jit)")


def _add_json(parser: argparse.ArgumentParser, command: str, where: str = "") -> None:
    keys = ", ".join(JSON_KEYS[command])
    parser.add_argument("--json", action="store_true",
                        help=f"print one JSON object instead of text, with the keys {keys}{where}")


def _configure_config(parser: argparse.ArgumentParser) -> None:
    _add_json(parser, "config")
    _add_cache_dir(parser)


@command("config", "show the toolchain, target archs, GPUs and cache layers this process would use",
         _configure_config)
def config(args: argparse.Namespace) -> int:
    report = collect_config(args.cache_dir)
    if args.json:
        _print_json("config", {k: v for k, v in report.items() if k != "schema"})
    else:
        print(format_config(report))
    return 0


# ---- prebuild ------------------------------------------------------------------------------------

def _configure_prebuild(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Build kernel variants ahead of time, in parallel, into the cache. The matrix is every supported "
        "variant of the chosen families, narrowed by the options; comma-separated values are alternatives, "
        "except in --arch, where they are the archs of one library (repeat --arch for separate builds). "
        "Variants already cached are skipped. Exit status 1 if any build failed.")
    parser.add_argument("--family", metavar="F,...",
                        help=f"kernel families or aliases: {', '.join(prebuild.family_names())} (default: all)")
    for name, choices in prebuild.matrix_options().items():
        flags = [f"--{name.replace('_', '-')}"]
        flags += [f"--{alias}" for alias, target in prebuild.OPTION_ALIASES.items() if target == name]
        shown = ",".join(str(c).lower() if isinstance(c, bool) else str(c) for c in choices)
        parser.add_argument(*flags, dest=name, metavar="V,...", help=f"only these values ({shown})")
    parser.add_argument("--arch", metavar="A,...", action="append",
                        help="the archs of one build, as in TORCH_CUDA_ARCH_LIST: 90a, or 80,90a / 8.0;9.0a (one "
                             "library holding both), 9.0+PTX (with PTX); repeat --arch for separate builds. "
                             "Default: the visible GPUs, else FLASHINFER_JIT_ARCH, else TORCH_CUDA_ARCH_LIST, else 9.0a")
    parser.add_argument("--jobs", type=int, metavar="N",
                        help="kernels compiled at once (default: MAX_JOBS, else the core count; always capped by "
                             "free memory, ~2 GiB each)")
    _add_cache_dir(parser)
    parser.add_argument("--config", type=Path, metavar="FILE.json",
                        help="read the options from a JSON file; command-line options override it")
    parser.add_argument("--dry-run", action="store_true", help="list what would be built; build nothing")
    _add_json(parser, "prebuild", " (progress lines go to stderr)")


def _arch_text(archs: Sequence[str]) -> str:
    return "+".join(f"sm_{a}" for a in archs)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def format_start(plan: prebuild.Plan) -> str:
    """The line a prebuild starts with, before the first kernel finishes."""
    return (f"prebuild: {plan.to_build} {'variant' if plan.to_build == 1 else 'variants'} to build, "
            f"{plan.cached} already cached; {plan.jobs} parallel job(s) ({plan.jobs_source}); "
            f"archs {', '.join(_arch_text(g) for g in plan.arch_groups)}; cache {plan.root}")


class PrebuildProgress:
    """Prebuild progress on `stream`. On a terminal: the start line, then one live bar (done/total,
    elapsed, time left) redrawn in place, with failures printed above it. Elsewhere (CI logs, --json):
    the start line, then one line per variant as it finishes, with its seconds."""

    WIDTH = 24

    def __init__(self, stream: Any, live: bool):
        self.stream, self.live = stream, live
        self.plan: prebuild.Plan | None = None
        self.done = 0
        self.t0 = time.perf_counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (BrokenPipeError, ValueError):
            self._stop.set()

    def bar(self, now: float | None = None) -> str:
        total = self.plan.to_build if self.plan else 0
        elapsed = (time.perf_counter() if now is None else now) - self.t0
        filled = self.WIDTH * self.done // total if total else self.WIDTH
        left = _clock(elapsed / self.done * (total - self.done)) if self.done else "?"
        return (f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {self.done}/{total} built, "
                f"elapsed {_clock(elapsed)}, left {left}")

    def _redraw(self) -> None:
        self._write(f"\r\x1b[K{self.bar()}")

    def start(self, plan: prebuild.Plan) -> None:
        self.plan = plan
        self.t0 = time.perf_counter()
        if not plan.dry_run:
            self._write(format_start(plan) + "\n")
        if self.live and plan.to_build and not plan.dry_run:
            self._redraw()
            self._ticker = threading.Thread(target=self._tick, name="prebuild-progress", daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                if not self._stop.is_set():
                    self._redraw()

    def update(self, outcome: prebuild.Outcome, index: int, total: int) -> None:
        plan = self.plan
        if not self.live or plan is None or plan.dry_run or not plan.to_build:
            self._write(_progress_line(outcome, index, total) + "\n")
            return
        if index <= plan.cached:
            return  # counted in the start line
        with self._lock:
            self.done += 1
            if outcome.status == prebuild.FAILED:
                self._write("\r\x1b[K" + _progress_line(outcome, index, total) + "\n")
            self._redraw()

    def finish(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            with self._lock:
                self._redraw()
                self._write("\n")


def _progress_line(outcome: prebuild.Outcome, index: int, total: int) -> str:
    head = f"[{index}/{total}] "
    where = f"{outcome.uri} ({_arch_text(outcome.archs)})"
    if outcome.status == prebuild.BUILT:
        return f"{head}built {where} in {outcome.seconds:.1f} s, {cache.format_size(outcome.disk_bytes)}"
    if outcome.status == prebuild.CACHED:
        return f"{head}cached {where}"
    if outcome.status == prebuild.PLANNED:
        return f"{head}would build {where}"
    lines = (outcome.error or "").strip().splitlines()
    errors = [l.strip() for l in lines if "error:" in l]  # the compiler's own "file(line): error: ..."
    why = errors[0] if errors else (lines[-1] if lines else "")
    return f"{head}FAILED {where} after {outcome.seconds:.1f} s" + (f": {why}" if why else "")


def format_prebuild_summary(report: prebuild.Report) -> str:
    d = report.to_dict()["summary"]
    if report.dry_run:
        lines = [f"dry run: {d['would_build']} to build, {d['cached']} already cached, {d['total']} in all "
                 f"(cache: {report.root})"]
    else:
        lines = [f"built {d['built']}, cached {d['cached']}, failed {d['failed']} of {d['total']} in "
                 f"{report.seconds:.1f} s with {report.jobs} parallel job(s)"]
        present = d["built"] + d["cached"]
        if present:
            lines.append(f"disk used: {cache.format_size(d['disk_bytes'])} for these {present} kernels "
                         f"({cache.format_size(d['disk_bytes_per_variant'])} each on average) in {report.root}")
    for outcome in report.failed:
        lines.append(f"\n--- {outcome.uri} ({_arch_text(outcome.archs)}) failed"
                     + (f"; full log: {outcome.log}" if outcome.log else "") + " ---")
        lines.append((outcome.error or "").rstrip())
    return "\n".join(lines)


@command("prebuild", "build a matrix of kernel variants ahead of time (parallel; skips cached ones)",
         _configure_prebuild)
def prebuild_cmd(args: argparse.Namespace) -> int:
    config = prebuild.load_config(args.config) if args.config else {"matrices": [{}], "arch": None, "jobs": None,
                                                                          "cache_dir": None}
    overrides = {name: getattr(args, name) for name in prebuild.matrix_options() if getattr(args, name) is not None}
    if args.family is not None:
        overrides["family"] = args.family
    specs = prebuild.expand_matrices([{**m, **overrides} for m in config["matrices"]])
    arch_value = args.arch if args.arch is not None else config["arch"]
    arch_groups = prebuild.parse_archs(arch_value) if arch_value is not None else [toolchain.target_archs()]
    cache_dir = args.cache_dir if args.cache_dir is not None else config["cache_dir"]
    jobs = args.jobs if args.jobs is not None else config["jobs"]
    layer = cache.writable_layer(cache_dir)
    stream = sys.stderr if args.json else sys.stdout
    progress = PrebuildProgress(stream, live=not args.json and _is_terminal(stream))
    try:
        report = prebuild.run(specs, arch_groups, layer, jobs=jobs, dry_run=args.dry_run, on_start=progress.start,
                              on_progress=progress.update)
    finally:
        progress.finish()
    if args.json:
        _print_json("prebuild", report.to_dict())
    else:
        print(format_prebuild_summary(report))
    return 1 if report.failed else 0


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


# ---- cache ---------------------------------------------------------------------------------------

def _when(ts: float | str | None) -> str:
    if ts is None:
        return "never"
    if isinstance(ts, str):
        try:
            ts = datetime.datetime.fromisoformat(ts).timestamp()
        except ValueError:
            return ts
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def _toolchain_text(report: dict[str, Any]) -> str:
    tc = report["toolchain"]
    nvcc = tc.get("nvcc") or ""
    release = nvcc.split("release", 1)[1].split(",", 1)[0].strip() if "release" in nvcc else "?"
    text = f"nvcc {release}, torch {tc.get('torch')}"
    differs = report.get("toolchain_differs")
    if differs:
        text += f" (differs: {', '.join(differs)})"
    return text


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def cache_list(args: argparse.Namespace) -> int:
    reports = loader.inventory(args.cache_dir)
    if args.json:
        layers = [{"path": str(layer.root), "writable": layer.writable,
                   "entries": sum(1 for r in reports if r["layer"] == str(layer.root)),
                   "bytes": sum(r["disk_bytes"] for r in reports if r["layer"] == str(layer.root))}
                  for layer in cache.layers(args.cache_dir)]
        _print_json("cache list", {"layers": layers, "entries": reports})
        return 0
    for layer in cache.layers(args.cache_dir):
        mine = [r for r in reports if r["layer"] == str(layer.root)]
        kind = "writable" if layer.writable else "read-only"
        print(f"{layer.root} ({kind}): {len(mine)} {'entry' if len(mine) == 1 else 'entries'}, "
              f"{cache.format_size(sum(r['disk_bytes'] for r in mine))}")
        if not mine:
            continue
        rows = [[r["uri"], r["arch"], cache.format_size(r["disk_bytes"]), _when(r["built"]), _when(r["last_used"]),
                 _toolchain_text(r), "yes" if r["verified"] else f"NO: {r['problem']}"] for r in mine]
        print(format_table(rows, ["URI", "ARCH", "SIZE", "BUILT", "LAST USED", "TOOLCHAIN", "VERIFIED"]))
    return 0


def cache_show(args: argparse.Namespace) -> int:
    matches = [r for r in loader.inventory(args.cache_dir)
               if args.uri in (r["uri"], Path(r["path"]).name, r["path"]) or (r["key"] or "").startswith(args.uri)]
    if not matches:
        print(f"{PROG}: no cache entry matches {args.uri!r} (see `{_suggest(args, 'cache', 'list')}`)",
              file=sys.stderr)
        return 1
    if args.json:
        _print_json("cache show", {"entries": matches})
        return 0
    for i, r in enumerate(matches):
        if i:
            print()
        manifest = json.loads((Path(r["path"]) / cache.MANIFEST).read_text())
        print(f"{r['uri']}  ({r['arch']}, key {r['key']})")
        rows = [
            ("path", r["path"]),
            ("layer", f"{r['layer']} ({'writable' if r['writable'] else 'read-only'})"),
            ("library", f"{r['library']} ({cache.format_size(r['size'] or 0)}; entry {cache.format_size(r['disk_bytes'])})"),
            ("verified", "yes (size and sha256 match the manifest)" if r["verified"] else f"NO: {r['problem']}"),
            ("built", f"{_when(r['built'])} in {r['build_seconds']} s"),
            ("last used", _when(r["last_used"])),
            ("toolchain", _toolchain_text(r) if r["toolchain_differs"] else _toolchain_text(r) + " (matches this installation)"),
            ("spec", json.dumps(r["spec"])),
            ("flags", " ".join(manifest.get("flags", []))),
        ]
        for name, value in rows:
            print(f"  {name:<11}{value}")
        for name, value in sorted((manifest.get("toolchain") or {}).items()):
            print(f"  {'':<11}{name}: {value}")
    return 0


def cache_verify(args: argparse.Namespace) -> int:
    results = [r for layer in cache.layers(args.cache_dir) for r in cache.check_layer(layer, fix=args.fix)]
    bad = [r for r in results if not r["ok"]]
    if args.json:
        _print_json("cache verify", {"checked": len(results), "bad": len(bad), "entries": results})
    else:
        for r in results:
            if r["ok"]:
                print(f"ok   {r['path']}")
            else:
                print(f"BAD  {r['path']}\n     {r['problem']}" + (f"; {r['action']}" if r["action"] else ""))
        hint = "" if not bad or args.fix else f" (run `{_again(args, '--fix')}` to quarantine them)"
        print(f"verified {len(results)} {'entry' if len(results) == 1 else 'entries'}: "
              f"{len(results) - len(bad)} ok, {len(bad)} bad{hint}")
    return 1 if any(not r["fixed"] for r in bad) else 0


def _suggest(args: argparse.Namespace, *words: str) -> str:
    """`flashinfer-jit WORDS` for the cache this command used (its --cache-dir, when one was given)."""
    parts = [PROG, *words]
    if getattr(args, "cache_dir", None) is not None:
        parts += ["--cache-dir", str(args.cache_dir)]
    return shlex.join(parts)


def _again(args: argparse.Namespace, *extra: str) -> str:
    """This very command line plus `extra`: pasted, it acts on the same cache with the same options."""
    argv = [a for a in getattr(args, "argv", []) if a not in extra]
    return shlex.join([PROG, *argv, *extra])


def _confirm(args: argparse.Namespace, prompt: str) -> bool:
    if args.yes:
        return True
    if not sys.stdin.isatty():
        print(f"{PROG}: nothing removed: run `{_again(args, '--yes')}` to confirm (stdin is not a terminal)",
              file=sys.stderr)
        return False
    return input(f"{prompt} [y/N] ").strip().lower() in ("y", "yes")


def _print_removal(layer: cache.CacheLayer, entries: list[Path], stale: list[Path], dry_run: bool,
                   as_json: bool, what: str) -> None:
    removed = cache.remove_paths(layer, [*entries, *stale], dry_run)
    freed = sum(size for _, size in removed)
    if as_json:
        _print_json(f"cache {what.split()[0]}", {"cache_dir": str(layer.root), "dry_run": dry_run, "bytes": freed,
                                                 "removed": [{"path": str(p), "bytes": size} for p, size in removed]})
        return
    for path, size in removed:
        print(f"{'would remove' if dry_run else 'removed'} {path} ({cache.format_size(size)})")
    print(f"{what}: {'would remove' if dry_run else 'removed'} {len(entries)} "
          f"{'entry' if len(entries) == 1 else 'entries'} and {len(stale)} leftover build dir(s), "
          f"{cache.format_size(freed)}, in {layer.root}")


def cache_clear(args: argparse.Namespace) -> int:
    layer = cache.writable_layer(args.cache_dir)
    older = cache.parse_duration(args.older_than) if args.older_than else None
    entries = [e.path for e in cache.select_for_clear(layer, older_than=older, pattern=args.uri)]
    if older is None and args.uri is None:
        entries += layer.quarantined()  # a full clear empties quarantine/ too
    stale = layer.stale_tmp_dirs()
    if not entries and not stale:
        if args.json:
            _print_json("cache clear", {"cache_dir": str(layer.root), "dry_run": args.dry_run, "bytes": 0, "removed": []})
        else:
            print(f"nothing to remove in {layer.root}")
        return 0
    if not args.dry_run and not _confirm(args, f"remove {len(entries)} entries from {layer.root}?"):
        return 1
    _print_removal(layer, entries, stale, args.dry_run, args.json, "clear")
    return 0


def cache_prune(args: argparse.Namespace) -> int:
    layer = cache.writable_layer(args.cache_dir)
    limit = cache.parse_size(args.max_size)
    stale = layer.stale_tmp_dirs()
    paths, total = cache.select_for_prune(layer, limit)
    _print_removal(layer, paths, stale, args.dry_run, args.json,
                   f"prune to {cache.format_size(limit)} (the cache held {cache.format_size(total)})")
    return 0


CACHE_ACTIONS: dict[str, tuple[str, Callable[[argparse.Namespace], int]]] = {
    "list": ("every entry of every layer: URI, arch, size, built, last used, toolchain, verified", cache_list),
    "show": ("one entry in detail (by URI, entry directory name or key prefix)", cache_show),
    "verify": ("recompute the sha256 of every .so against its manifest; --fix quarantines bad entries", cache_verify),
    "clear": ("remove entries from the writable cache (all, or --older-than / --uri)", cache_clear),
    "prune": ("remove least recently used entries until the writable cache fits --max-size", cache_prune),
}


def _configure_cache(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    parsers = {name: sub.add_parser(name, help=text, description=text) for name, (text, _) in CACHE_ACTIONS.items()}
    for name, p in parsers.items():
        _add_cache_dir(p)
        _add_json(p, f"cache {name}")
    parsers["show"].add_argument("uri", metavar="URI", help="a kernel URI, an entry directory name or a key prefix")
    parsers["verify"].add_argument("--fix", action="store_true",
                                   help="quarantine bad entries of the writable cache (the next load rebuilds them)")
    for name in ("clear", "prune"):
        parsers[name].add_argument("--dry-run", action="store_true", help="list what would be removed")
    parsers["clear"].add_argument("--older-than", metavar="AGE",
                                  help="only entries neither built nor loaded for AGE (7d, 12h, 30m)")
    parsers["clear"].add_argument("--uri", metavar="GLOB", help="only entries whose URI matches, e.g. 'prefill_*'")
    parsers["clear"].add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    parsers["prune"].add_argument("--max-size", required=True, metavar="SIZE",
                                  help="keep the writable cache at most this big (2G, 500M): quarantined entries "
                                       "go first, then the least recently used")


@command("cache", "inspect and maintain the kernel cache: list, show, verify, clear, prune", _configure_cache)
def cache_cmd(args: argparse.Namespace) -> int:
    return CACHE_ACTIONS[args.action][1](args)


# ---- entry point ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="FlashInfer-compatible attention kernels, generated, JIT-compiled and cached on disk.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log builds (-v) or everything (-vv)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS.values():
        cmd.configure(sub.add_parser(cmd.name, help=cmd.help, description=cmd.help))
    return parser


# Exit status of a command whose output pipe was closed (`flashinfer-jit cache list | head`): what a
# shell reports for a tool that SIGPIPE ended.
BROKEN_PIPE_STATUS = 128 + signal.SIGPIPE


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's last flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass  # not a real file (tests capture stdout): nothing will flush into the pipe


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s")
    try:
        status = COMMANDS[args.command].run(args)
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        _silence_stdout()
        return BROKEN_PIPE_STATUS
    except (FlashInferJITError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
