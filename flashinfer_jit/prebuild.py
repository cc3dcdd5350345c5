"""Build a matrix of kernel variants ahead of time (`flashinfer-jit prebuild`), in parallel.

The matrix comes from the spec classes themselves (`spec.FAMILIES`, `KernelSpec.supported()`, the
choices declared on each field), so there is no second list of names to drift: a new field or a new
head_dim shows up here, in the CLI options and in `loader.prebuild_command` at once.

Filters name spec fields (`head_dim`, `dtype`, `kv_layout` alias `layout`, `causal`, ...). A filter
applies to the families that have that field and leaves the others alone, so
`--family prefill,merge --dtype bf16` is every bf16 prefill and merge_state variant. Values may be
a field's aliases (`--kv-layout paged_nhd` and `paged_hnd` are `paged`: one kernel for both page
layouts). Derived fields (tile shapes) are not options: the matrix has their defaults.

Family names are the exact ones (`merge_state`, `prefill`, `append_paged`) or these aliases:

    merge    merge_state
    prefill  prefill (every layout)
    decode   prefill on the paged layout with causal=false, fa2 backend (decode runs that kernel)
    append   append_paged

Targets (`--arch`): one `--arch` is one build, and its archs go into one library, written as in
FLASHINFER_JIT_ARCH and TORCH_CUDA_ARCH_LIST (`80,90a`, `8.0;9.0a`, `80+90a`: what a process
seeing an A100 and an H100 at once loads; `9.0+PTX` adds PTX). Unlike the other options, a comma
here does not separate alternatives: repeat `--arch` for separate builds (`--arch 90a --arch 80`).

A variant that runs on one GPU family only (the sm90 prefill backend: sm_90a) is built only for
the `--arch` targets that include it. Already cached variants are skipped; the rest are built through `loader.ensure_built`, the same
lock-and-recheck path the runtime takes, so a prebuild and a running job never build one variant
twice.
"""
from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from . import build, cache, env, loader, toolchain
from .errors import FlashInferJITError, KernelCompileError
from .spec import FAMILIES, KernelSpec, matrix_fields

# alias -> (family, extra constraints on fields)
FAMILY_ALIASES: dict[str, tuple[str, dict[str, tuple[Any, ...]]]] = {
    "merge": ("merge_state", {}),
    "prefill": ("prefill", {}),
    # decode-like batches run the FA2-class kernel (16-row q tiles) on every card
    "decode": ("prefill", {"kv_layout": ("paged",), "causal": (False,), "backend": ("fa2",)}),
    "append": ("append_paged", {}),
}
# short option name -> spec field
OPTION_ALIASES = {"layout": "kv_layout"}
# keys a --config file may hold besides the matrix options
CONFIG_KEYS = ("family", "arch", "jobs", "cache_dir", "matrix")


# ---- the matrix ----------------------------------------------------------------------------------

def matrix_options() -> dict[str, tuple[Any, ...]]:
    """Every matrix field of every family with the union of its supported values, in declaration order."""
    options: dict[str, list[Any]] = {}
    for cls in FAMILIES.values():
        for f in matrix_fields(cls):
            values = options.setdefault(f.name, [])
            values.extend(v for v in f.metadata["choices"] if v not in values)
    return {name: tuple(values) for name, values in options.items()}


def value_aliases(field_name: str) -> dict[Any, Any]:
    """Other spellings a field accepts for its values (e.g. kv_layout paged_nhd -> paged)."""
    aliases: dict[Any, Any] = {}
    for cls in FAMILIES.values():
        for f in matrix_fields(cls):
            if f.name == field_name:
                aliases.update(f.metadata["aliases"])
    return aliases


def family_names() -> list[str]:
    return [*FAMILIES, *(a for a in FAMILY_ALIASES if a not in FAMILIES)]


def _field_name(name: str) -> str:
    name = name.replace("-", "_")
    return OPTION_ALIASES.get(name, name)


def _as_items(value: Any) -> list[Any]:
    """'a,b' / ['a', 'b'] / 3 / True -> a list of items (strings are split on commas)."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        out: list[Any] = []
        for v in value:
            out.extend(_as_items(v))
        return out
    return [value]


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_values(name: str, value: Any) -> list[Any]:
    """The values of option `name` (a field, or an alias) as typed spec values, each checked against
    the supported ones."""
    field_name = _field_name(name)
    options = matrix_options()
    if field_name not in options:
        raise ValueError(f"unknown option {name!r}; the matrix options are: {', '.join(options)} "
                         f"(and --layout for kv_layout)")
    choices = options[field_name]
    aliases = value_aliases(field_name)
    values = []
    for item in _as_items(value):
        if isinstance(choices[0], bool):
            text = str(item).strip().lower()
            if text not in _TRUE + _FALSE:
                raise ValueError(f"--{field_name.replace('_', '-')}: {item!r} is not true or false")
            parsed: Any = text in _TRUE
        elif isinstance(choices[0], int):
            try:
                parsed = int(item)
            except (TypeError, ValueError):
                parsed = item
        else:
            parsed = aliases.get(str(item), str(item))
        if parsed not in choices:
            shown = ", ".join(str(c).lower() if isinstance(c, bool) else str(c) for c in choices)
            if aliases:
                shown += f" (or {', '.join(map(str, aliases))})"
            raise ValueError(f"--{field_name.replace('_', '-')}: {item!r} is not supported; supported: {shown}")
        if parsed not in values:
            values.append(parsed)
    if not values:
        raise ValueError(f"--{field_name.replace('_', '-')}: no value given")
    return values


def _families(names: Iterable[str] | None) -> list[tuple[type[KernelSpec], dict[str, tuple[Any, ...]]]]:
    if names is None:
        return [(cls, {}) for cls in FAMILIES.values()]
    selected = []
    for name in _as_items(list(names)):
        if name in FAMILIES:
            selected.append((FAMILIES[name], {}))
        elif name in FAMILY_ALIASES:
            family, constraints = FAMILY_ALIASES[name]
            selected.append((FAMILIES[family], constraints))
        else:
            raise ValueError(f"unknown kernel family {name!r}; known: {', '.join(family_names())}")
    return selected


def expand(families: Iterable[str] | None = None, filters: dict[str, Any] | None = None) -> list[KernelSpec]:
    """The variants of `families` (default: all) whose fields take one of the `filters` values.

    `filters` maps a field name (or alias) to a value or list of values. A filter on a field that
    none of the selected families has is an error (it would silently select nothing or everything).
    """
    selected = _families(families)
    parsed = {_field_name(k): parse_values(k, v) for k, v in (filters or {}).items() if v is not None}
    fields_of = {cls: {f.name for f in matrix_fields(cls)} for cls, _ in selected}
    for name in parsed:
        if not any(name in names for names in fields_of.values()):
            have = ", ".join(sorted({cls.family for cls, _ in selected}))
            raise ValueError(f"--{name.replace('_', '-')} does not apply to the selected families ({have})")
    specs: list[KernelSpec] = []
    for cls, constraints in selected:
        for spec in cls.supported(opt_in=[n for n in (*parsed, *constraints) if n in fields_of[cls]]):
            values = spec.to_dict()
            if any(name in values and values[name] not in allowed for name, allowed in constraints.items()):
                continue
            if any(name in values and values[name] not in allowed for name, allowed in parsed.items()):
                continue
            if spec not in specs:
                specs.append(spec)
    if not specs:
        raise ValueError("no kernel variant matches these options (for example, decode has no ragged or "
                         "causal variant)")
    return specs


def parse_archs(value: Any) -> list[tuple[str, ...]]:
    """The builds `--arch` asks for. A string is one build: its archs (separated by commas, semicolons,
    spaces or '+', as in FLASHINFER_JIT_ARCH and TORCH_CUDA_ARCH_LIST) go into one library. A list (the
    option repeated, or a JSON list in --config) is one build per item.

        '90a'            -> [('90a',)]
        '80,90a'         -> [('80', '90a')]          one library for both
        ['90a', '80']    -> [('90a',), ('80',)]      two builds
        '8.0;9.0+PTX'    -> [('80', '90a+PTX')]      with PTX for 9.0
    """
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    groups: list[tuple[str, ...]] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"--arch: expected archs like 90a or 80,90a, got {item!r}")
        try:
            group = toolchain.parse_arch_list(item)
        except ValueError as exc:
            raise ValueError(f"--arch {item!r}: {exc}") from None
        if group not in groups:
            groups.append(group)
    if not groups:
        raise ValueError("--arch: no arch given")
    return groups


# ---- config files --------------------------------------------------------------------------------

def load_config(path: Path | str) -> dict[str, Any]:
    """Read a --config JSON file: the same options as the command line, as keys (dashes or
    underscores), with lists or comma-separated strings as values. `"matrix": [{...}, {...}]` gives
    several sub-matrices whose union is built; top-level options apply to all of them.

        {"family": "prefill", "layout": "ragged", "head_dim": [64, 128], "arch": "90a", "jobs": 8}
        {"arch": "90a", "matrix": [{"family": "prefill", "layout": "ragged"}, {"family": "decode,append"}]}

    Returns {"matrices": [options...], "arch": ..., "jobs": ..., "cache_dir": ...}.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"--config {path}: cannot read it: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"--config {path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a JSON object, got {type(data).__name__}")
    known = set(matrix_options()) | set(OPTION_ALIASES) | set(CONFIG_KEYS)

    def normalized(obj: dict[str, Any], where: str, allow: set[str]) -> dict[str, Any]:
        out = {}
        for key, value in obj.items():
            name = key.replace("-", "_")
            if name not in allow:
                raise ValueError(f"--config {path}: unknown key {key!r} in {where}; known: {', '.join(sorted(allow))}")
            out[_field_name(name) if name in OPTION_ALIASES else name] = value
        return out

    top = normalized(data, "the top level", known)
    if top.get("jobs") is not None and (not isinstance(top["jobs"], int) or isinstance(top["jobs"], bool)):
        raise ValueError(f"--config {path}: \"jobs\" must be an integer, got {top['jobs']!r}")
    sub_allowed = known - {"matrix", "jobs", "cache_dir"}
    matrices = top.pop("matrix", None)
    shared = {k: v for k, v in top.items() if k not in ("jobs", "cache_dir", "arch")}
    if matrices is None:
        matrices = [{}]
    if not isinstance(matrices, list) or not all(isinstance(m, dict) for m in matrices):
        raise ValueError(f"--config {path}: \"matrix\" must be a list of objects")
    return {
        "matrices": [{**shared, **normalized(m, f'matrix[{i}]', sub_allowed)} for i, m in enumerate(matrices)],
        "arch": top.get("arch"),
        "jobs": top.get("jobs"),
        "cache_dir": top.get("cache_dir"),
    }


def expand_matrices(matrices: Sequence[dict[str, Any]]) -> list[KernelSpec]:
    """The union (first-seen order) of several option sets, each {"family": ..., field: values, ...}."""
    specs: list[KernelSpec] = []
    for options in matrices:
        options = dict(options)
        families = options.pop("family", None)
        options.pop("arch", None)
        for spec in expand(_as_items(families) if families is not None else None, options):
            if spec not in specs:
                specs.append(spec)
    return specs


# ---- building ------------------------------------------------------------------------------------

BUILT, CACHED, FAILED, PLANNED = "built", "cached", "failed", "would build"


@dataclass
class Outcome:
    """What happened to one (variant, target archs) of the matrix."""

    spec: KernelSpec
    archs: tuple[str, ...]
    status: str
    seconds: float = 0.0
    entry: Path | None = None
    disk_bytes: int = 0
    error: str | None = None
    log: Path | None = None

    @property
    def uri(self) -> str:
        return self.spec.uri

    def to_dict(self) -> dict[str, Any]:
        return {
            "uri": self.uri, "spec": self.spec.to_dict(), "archs": list(self.archs), "status": self.status,
            "seconds": round(self.seconds, 3), "entry": str(self.entry) if self.entry else None,
            "disk_bytes": self.disk_bytes, "error": self.error, "log": str(self.log) if self.log else None,
        }


@dataclass
class Plan:
    """What a run is about to do, known before the first build starts (`on_start`)."""

    root: Path
    arch_groups: list[tuple[str, ...]]
    to_build: int
    cached: int
    jobs: int
    jobs_source: str
    dry_run: bool

    @property
    def total(self) -> int:
        return self.to_build + self.cached


@dataclass
class Report:
    root: Path
    jobs: int
    dry_run: bool
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0
    jobs_source: str = ""

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == FAILED]

    @property
    def disk_bytes(self) -> int:
        """Bytes on disk of this matrix's entries (built now or already cached)."""
        return sum(o.disk_bytes for o in self.outcomes if o.status in (BUILT, CACHED))

    def to_dict(self) -> dict[str, Any]:
        present = self.count(BUILT) + self.count(CACHED)
        return {
            "cache_dir": str(self.root), "jobs": self.jobs, "jobs_source": self.jobs_source, "dry_run": self.dry_run,
            "kernels": [o.to_dict() for o in self.outcomes],
            "summary": {
                "total": len(self.outcomes), "built": self.count(BUILT), "cached": self.count(CACHED),
                "failed": self.count(FAILED), "would_build": self.count(PLANNED),
                "seconds": round(self.seconds, 3), "disk_bytes": self.disk_bytes,
                "disk_bytes_per_variant": self.disk_bytes // present if present else 0,
            },
        }


def default_jobs(todo: int, requested: int | None = None) -> int:
    """Kernels compiled at once: `requested` (--jobs), else MAX_JOBS, else the core count; never more
    than free memory holds (about 2 GiB per nvcc) nor more than there is to build."""
    return max(1, min(toolchain.resolve_jobs(requested)[0], todo))


def _steady_build_environment(jobs_per_kernel: int):
    """Set, once for the whole parallel phase, the variables build.py sets around each compile.

    build.py saves and restores them around every build; from several threads that restore could
    drop a value while another build still needs it. Set beforehand, every save/restore is a no-op."""
    return env.overridden(build.build_environment(jobs_per_kernel))


def _lookup(spec: KernelSpec, archs: tuple[str, ...], layer: cache.CacheLayer) -> tuple[loader.KeyInfo, cache.Entry | None]:
    """The key of (spec, archs) and its verified entry in `layer`, if any. Reads only (dry runs too):
    a damaged entry is a miss here; the build path quarantines it and builds again."""
    info = loader.compute_key(spec, archs)
    return info, loader.lookup(spec, info, layer)


def run(specs: Sequence[KernelSpec], arch_groups: Sequence[tuple[str, ...]], layer: cache.CacheLayer, *,
        jobs: int | None = None, dry_run: bool = False,
        on_start: Callable[[Plan], None] | None = None,
        on_progress: Callable[[Outcome, int, int], None] | None = None) -> Report:
    """Build every (spec, archs) pair missing from the writable `layer`; report each as it finishes.

    `on_start(plan)` is called once, after the lookups and before anything is built or reported.
    `on_progress(outcome, index, total)` is called once per pair: cached ones first, then builds in
    the order they complete. A failure does not stop the others. The cache directory is checked
    (and created) once, before the first build: an unsafe or read-only one is one error
    (CacheSecurityError, CacheWriteError), not one failure per variant. Dry runs write nothing."""
    if not layer.writable:
        raise ValueError(f"prebuild needs a writable cache directory, not {layer.root}")
    start = time.perf_counter()
    if not dry_run:
        toolchain.require_nvcc()  # no toolkit: say so (and where we looked) before anything else
    # A variant for one GPU family only (the sm90 backend) is built only for targets that include it.
    pairs = [(spec, archs) for archs in arch_groups for spec in specs if spec.runs_on(archs)]
    total = len(pairs)
    budget, jobs_source = toolchain.resolve_jobs(jobs)
    counter = iter(range(1, total + 1))
    report_lock = threading.Lock()
    report = Report(root=layer.root, jobs=0, dry_run=dry_run, jobs_source=jobs_source)

    def record(outcome: Outcome) -> None:
        with report_lock:
            report.outcomes.append(outcome)
            index = next(counter)
            if on_progress is not None:
                on_progress(outcome, index, total)

    cached: list[Outcome] = []
    todo: list[tuple[KernelSpec, tuple[str, ...], loader.KeyInfo]] = []
    for spec, archs in pairs:
        info, entry = _lookup(spec, archs, layer)
        if entry is not None:
            cached.append(Outcome(spec, archs, CACHED, entry=entry.path, disk_bytes=cache.tree_bytes(entry.path)))
        else:
            todo.append((spec, archs, info))

    report.jobs = max(1, min(budget, len(todo))) if todo else 0
    if todo and not dry_run:
        loader.prepare_layer(layer)  # once: an unsafe or read-only directory is one error
    if on_start is not None:
        on_start(Plan(layer.root, list(arch_groups), len(todo), len(cached), report.jobs, jobs_source, dry_run))
    for outcome in cached:
        record(outcome)
    if dry_run:
        for spec, archs, _ in todo:
            record(Outcome(spec, archs, PLANNED))
    elif todo:
        def build_one(spec: KernelSpec, archs: tuple[str, ...], info: loader.KeyInfo) -> Outcome:
            t0 = time.perf_counter()
            try:
                entry, built = loader.ensure_built(spec, info, layer)
            except KernelCompileError as exc:
                return Outcome(spec, archs, FAILED, time.perf_counter() - t0, error=exc.tail, log=exc.log_path)
            except (FlashInferJITError, OSError) as exc:
                return Outcome(spec, archs, FAILED, time.perf_counter() - t0, error=str(exc))
            return Outcome(spec, archs, BUILT if built else CACHED, time.perf_counter() - t0, entry=entry.path,
                           disk_bytes=cache.tree_bytes(entry.path))

        # The job budget is shared: `report.jobs` kernels at once, each compiling its sources with
        # what is left (MAX_JOBS=1 means one nvcc in all).
        per_kernel = max(1, budget // report.jobs)
        with _steady_build_environment(per_kernel), \
                concurrent.futures.ThreadPoolExecutor(report.jobs, thread_name_prefix="prebuild") as pool:
            futures = [pool.submit(build_one, *item) for item in todo]
            for future in concurrent.futures.as_completed(futures):
                record(future.result())
    report.seconds = time.perf_counter() - start
    return report
