"""`flashinfer-jit` (also `python -m flashinfer_jit`): a thin command line over library calls.

Every subcommand is one small function registered with `@command`; it gets the parsed arguments
and returns the exit status. The library does the work, the CLI only formats it. `prebuild` and
`cache list|show|verify|clear|prune` slot in the same way (a command may add its own
sub-subcommands in `configure`).

Errors the package raises on purpose (FlashInferJITError) and bad settings (ValueError from a
malformed environment variable) print one clear message and exit 1, without a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import cache, codegen, env, toolchain
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


# ---- config --------------------------------------------------------------------------------------

def _probe(fn: Callable[[], Any]) -> dict[str, Any]:
    """{"value": fn()} or {"error": why}: `config` must describe a broken setup, not crash on it."""
    try:
        return {"value": fn()}
    except (FlashInferJITError, ValueError, OSError) as exc:
        return {"error": str(exc)}


def _layer_report(layer: cache.CacheLayer) -> dict[str, Any]:
    exists = layer.root.is_dir()
    return {
        "path": str(layer.root),
        "writable": layer.writable,
        "exists": exists,
        "entries": sum(1 for _ in layer.entries()) if exists else 0,
    }


def _gpus() -> list[dict[str, Any]]:
    if not torch.cuda.is_available():
        return []
    return [
        {"index": i, "name": torch.cuda.get_device_name(i), "capability": "%d.%d" % torch.cuda.get_device_capability(i)}
        for i in range(torch.cuda.device_count())
    ]


def collect_config() -> dict[str, Any]:
    """What this process would build with and where it would look: all read-only probes."""
    archs = _probe(toolchain.resolve_target_archs)
    return {
        "package": {"name": PROG, "version": __version__, "location": str(Path(__file__).resolve().parent),
                    "templates": _probe(lambda: str(codegen.templates_dir()))},
        "python": sys.version.split()[0],
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda,
                  "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI)},
        "cuda_home": _probe(lambda: str(toolchain.cuda_home())),
        "nvcc": {"path": _probe(lambda: str(toolchain.nvcc_path())), "version": toolchain.nvcc_version()},
        "host_compiler": toolchain.host_compiler_version(),
        "target_archs": {"value": list(archs["value"][0]), "source": archs["value"][1]} if "value" in archs else archs,
        "nvcc_flags": _probe(lambda: toolchain.nvcc_flags(toolchain.target_archs())),
        "build_disabled": _probe(env.build_disabled),
        "lock_timeout_s": _probe(env.lock_timeout),
        "cache_layers": [_layer_report(layer) for layer in cache.layers()],
        "gpus": _gpus(),
    }


def _shown(probe: dict[str, Any], render: Callable[[Any], str] = str) -> str:
    return render(probe["value"]) if "value" in probe else f"unavailable: {probe['error']}"


def format_config(report: dict[str, Any]) -> str:
    pkg, tch, nvcc = report["package"], report["torch"], report["nvcc"]
    archs = report["target_archs"]
    lines = [
        f"{'package':<15}{pkg['name']} {pkg['version']} ({pkg['location']})",
        f"{'templates':<15}{_shown(pkg['templates'])}",
        f"{'python':<15}{report['python']}",
        f"{'torch':<15}{tch['version']} (CUDA {tch['cuda'] or 'none: a CPU-only build'}, "
        f"cxx11 abi {'yes' if tch['cxx11_abi'] else 'no'})",
        f"{'CUDA_HOME':<15}{_shown(report['cuda_home'])}",
        f"{'nvcc':<15}{_shown(nvcc['path'])}",
        f"{'nvcc version':<15}{nvcc['version'] or 'unavailable (no usable nvcc: only cached kernels can be loaded)'}",
        f"{'host compiler':<15}{report['host_compiler']}",
        f"{'target archs':<15}" + (f"{', '.join(archs['value'])} ({archs['source']})" if "value" in archs else _shown(archs)),
        f"{'nvcc flags':<15}{_shown(report['nvcc_flags'], ' '.join)}",
        f"{'building':<15}" + _shown(report["build_disabled"], lambda off: "disabled (FLASHINFER_JIT_DISABLE_BUILD)" if off else "enabled"),
        f"{'lock timeout':<15}{_shown(report['lock_timeout_s'], lambda s: f'{s:g} s')}",
    ]
    gpus = report["gpus"]
    if gpus:
        lines.append(f"{'GPUs':<15}" + "; ".join(f"{g['index']}: {g['name']} (sm {g['capability']})" for g in gpus))
    else:
        lines.append(f"{'GPUs':<15}none visible (torch.cuda.is_available() is False): kernels can be built, not run")
    lines.append("cache layers   (searched in this order)")
    for i, layer in enumerate(report["cache_layers"], 1):
        kind = "writable" if layer["writable"] else "read-only, FLASHINFER_JIT_PREBUILT_DIRS"
        if layer["exists"]:
            state = f"{layer['entries']} {'entry' if layer['entries'] == 1 else 'entries'}"
        else:
            state = "does not exist yet; created by the first build" if layer["writable"] else "does not exist"
        lines.append(f"  {i}. {layer['path']} ({kind}; {state})")
    return "\n".join(lines)


def _configure_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


@command("config", "show the toolchain, target archs, GPUs and cache layers this process would use",
         _configure_config)
def config(args: argparse.Namespace) -> int:
    report = collect_config()
    print(json.dumps(report, indent=2) if args.json else format_config(report))
    return 0


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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command].run(args)
    except (FlashInferJITError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
