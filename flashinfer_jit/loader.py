"""Spec -> loaded kernel library: in-process memo, then the cache layers, then a build.

A warm cache loads the .so directly (no ninja, no nvcc run). Builds are deduplicated across
threads (a lock per spec) and across processes (an flock per entry, re-checked after acquiring).

`ensure_built` is the same lookup-then-build without loading; `flashinfer-jit prebuild`
(prebuild.py) calls it for every variant of a matrix, after `lookup` (read-only: no quarantine, no
writes) has skipped the variants already cached.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import hashlib
import json
import logging
import shlex
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from . import build, cache, env, toolchain
from .codegen import headers_digest, render
from .errors import (
    CacheIntegrityError, KernelCompileError, KernelLaunchError, KernelLoadError, MissingKernelError,
    VariantCompileError,
)
from .spec import KernelSpec, matrix_fields

logger = logging.getLogger("flashinfer_jit")


@dataclass(frozen=True)
class KeyInfo:
    key: str
    runtime_key: str
    sources: dict[str, str]
    fingerprint: dict[str, Any]
    archs: tuple[str, ...]


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def compute_key(spec: KernelSpec, archs: tuple[str, ...] | None = None) -> KeyInfo:
    """Content key: rendered sources, project headers, toolchain, torch, archs, flags, version."""
    archs = archs or toolchain.target_archs()
    sources = render(spec)
    fingerprint = toolchain.fingerprint(archs)
    content = {
        "schema": cache.SCHEMA,
        "spec": spec.to_dict(),
        "sources": {name: hashlib.sha256(text.encode()).hexdigest() for name, text in sorted(sources.items())},
        "headers": headers_digest(),
    }
    runtime = {k: fingerprint[k] for k in toolchain.RUNTIME_FIELDS}
    return KeyInfo(
        key=_digest({**content, "toolchain": fingerprint}),
        runtime_key=_digest({**content, "toolchain": runtime}),
        sources=sources,
        fingerprint=fingerprint,
        archs=archs,
    )


@dataclass
class LoadedKernel:
    """A kernel library loaded into this process."""

    spec: KernelSpec
    key: str
    entry: cache.Entry
    lib: ctypes.CDLL
    _functions: dict[str, Any] = field(default_factory=dict)

    def function(self, name: str, argtypes: Sequence[Any]) -> Any:
        """The exported C function `fij_<uri>_<name>` returning a cudaError_t as int."""
        fn = self._functions.get(name)
        if fn is None:
            fn = getattr(self.lib, f"fij_{self.spec.uri}_{name}")
            fn.argtypes = list(argtypes)
            fn.restype = ctypes.c_int
            self._functions[name] = fn
        return fn

    def check(self, code: int, what: str) -> None:
        if code != 0:
            err = self.lib[f"fij_{self.spec.uri}_error_string"]
            err.restype = ctypes.c_char_p
            err.argtypes = [ctypes.c_int]
            raise KernelLaunchError(f"{what} ({self.spec.uri}) failed: CUDA error {code}: {err(code).decode()}")


_memo: dict[KernelSpec, LoadedKernel] = {}
_memo_guard = threading.Lock()
_spec_locks: dict[KernelSpec, threading.Lock] = {}
build_count = 0  # builds done by this process (tests and `cache` tooling read it)


def load(spec: KernelSpec) -> LoadedKernel:
    kernel = _memo.get(spec)
    if kernel is not None:
        return kernel
    with _memo_guard:
        spec_lock = _spec_locks.setdefault(spec, threading.Lock())
    with spec_lock:
        kernel = _memo.get(spec)
        if kernel is None:
            kernel = _load_uncached(spec)
            _memo[spec] = kernel
    return kernel


def prebuild_command(spec: KernelSpec, archs: Sequence[str], cache_dir: Path | str | None = None) -> str:
    """The `flashinfer-jit prebuild` command line that builds exactly `spec` for `archs` (one binary
    for all of them: one `--arch` with the archs joined by commas) into `cache_dir`. prebuild.py parses this syntax. It names
    the matrix fields; derived ones (tile shapes) are at their defaults in the prebuild matrix, as in
    every spec the wrappers load."""
    parts = ["flashinfer-jit prebuild", f"--family {spec.family}"]
    for f in matrix_fields(type(spec)):
        name, value = f.name, getattr(spec, f.name)
        if f.metadata["opt_in"] and value == f.default:
            continue  # the matrix holds an opt-in field's default unless it is named
        flag = name.replace("_", "-")
        parts.append(f"--{flag} {str(value).lower() if isinstance(value, bool) else value}")
    parts.append(f"--arch {shlex.quote(','.join(archs))}")
    if cache_dir is not None:
        parts.append(f"--cache-dir {shlex.quote(str(cache_dir))}")
    return " ".join(parts)


_NOEXEC_TEXT = "failed to map segment"


def _noexec_hint(message: str) -> str:
    if _NOEXEC_TEXT not in message:
        return ""
    return (" The cache is probably on a filesystem mounted noexec (libraries there cannot be mapped "
            "executable); point FLASHINFER_JIT_CACHE_DIR at a filesystem that allows executing code, or "
            "remount it without noexec.")


def _load_failure(build_output: str) -> str | None:
    """Why torch could not dlopen the library it just built ("Could not load this library: PATH"
    hides the reason): dlopen it again here to get the loader's own message."""
    marker = "Could not load this library: "
    lines = [l for l in build_output.splitlines() if marker in l]
    if not lines:
        return None
    path = lines[-1].split(marker, 1)[1].strip()
    try:
        ctypes.CDLL(path)
    except OSError as exc:
        return str(exc)
    return None


class _EntryVanished(Exception):
    """The entry was moved away (cache clear, quarantine by another process) while we loaded it."""


def _open(spec: KernelSpec, key: str, layer: cache.CacheLayer, entry: cache.Entry) -> LoadedKernel:
    try:
        layer.check_security(entry)
    except FileNotFoundError:
        raise _EntryVanished() from None
    try:
        lib = ctypes.CDLL(str(entry.library))
    except OSError as exc:
        if not entry.library.exists():
            raise _EntryVanished() from None
        raise KernelLoadError(f"cannot load {entry.library}: {exc}.{_noexec_hint(str(exc))}", entry.library) from None
    layer.touch_last_used(entry)
    return LoadedKernel(spec=spec, key=key, entry=entry, lib=lib)


_mismatch_warned: set[Path] = set()


def _explain_mismatch(spec: KernelSpec, info: KeyInfo, layer: cache.CacheLayer, tag: str) -> None:
    """A read-only layer holds `spec` but built for another toolchain or other sources: say why it
    is skipped, once per layer per process."""
    if layer.root in _mismatch_warned:
        return
    for candidate in layer.candidates(tag, spec.uri):
        differs = cache.toolchain_differences(candidate.manifest, info.fingerprint, toolchain.RUNTIME_FIELDS)
        recorded = candidate.manifest.get("toolchain") or {}
        detail = ", ".join(f"{f}: {recorded.get(f)!r} there, {info.fingerprint.get(f)!r} here" for f in differs)
        why = f"built with a different toolchain ({detail})" if differs else (
            "built from different kernel sources (another flashinfer-jit revision)")
        _mismatch_warned.add(layer.root)
        logger.warning(
            "skipping %s in read-only cache layer %s: %s. Rebuild that layer with this installation, e.g. "
            "`%s`.", candidate.path.name, layer.root, why, prebuild_command(spec, info.archs, layer.root))
        return


def _find_entry(spec: KernelSpec, info: KeyInfo, layer: cache.CacheLayer) -> cache.Entry | None:
    """The entry `layer` holds for (spec, key), unverified."""
    # Without a compiler the key has no nvcc version to match: accept the same sources built for the
    # same runtime. A read-only layer was prebuilt elsewhere: the runtime match is what counts there.
    runtime_key = info.runtime_key if (info.fingerprint["nvcc"] is None or not layer.writable) else None
    return layer.find(toolchain.arch_tag(info.archs), spec.uri, info.key, runtime_key)


def lookup(spec: KernelSpec, info: KeyInfo, layer: cache.CacheLayer) -> cache.Entry | None:
    """The verified entry of `spec` in `layer`, or None. Reads only: a damaged entry is a miss and
    stays where it is (no quarantine), nothing is logged, locked or written (prebuild dry runs)."""
    entry = _find_entry(spec, info, layer)
    if entry is None or layer.verify(entry) is not None:
        return None
    return entry


def _find_verified(spec: KernelSpec, info: KeyInfo, layer: cache.CacheLayer) -> cache.Entry | None:
    """`lookup`, acting on what it finds: a damaged entry of a writable layer is quarantined; in a
    read-only layer a miss is explained (once per layer) and a damaged entry is logged and skipped."""
    entry = _find_entry(spec, info, layer)
    if entry is None:
        if not layer.writable:
            _explain_mismatch(spec, info, layer, toolchain.arch_tag(info.archs))
        return None
    problem = layer.verify(entry)
    if problem is None:
        return entry
    if not entry.path.exists():
        return None  # removed under us: a miss
    if layer.writable:
        try:
            layer.quarantine(entry, problem)
        except FileNotFoundError:
            pass  # another process quarantined it first
    else:
        logger.warning("skipping %s in read-only cache layer %s: %s", spec.uri, layer.root, problem)
    return None


def find(spec: KernelSpec, info: KeyInfo, layers: Sequence[cache.CacheLayer]) -> tuple[cache.CacheLayer, cache.Entry] | None:
    """The first layer holding a verified entry for `spec` (read-only layers first)."""
    for layer in layers:
        entry = _find_verified(spec, info, layer)
        if entry is not None:
            return layer, entry
    return None


def prepare_layer(layer: cache.CacheLayer, what: str = "kernels") -> None:
    """Make the writable layer ready for builds, or raise the one error that says why it cannot be:
    CacheSecurityError (unsafe), CacheWriteError (read-only, full)."""
    try:
        layer.prepare()
    except OSError as exc:
        if exc.errno not in cache.WRITE_ERRNOS:
            raise
        raise cache.write_error(layer, what, exc.errno) from None


def ensure_built(spec: KernelSpec, info: KeyInfo, layer: cache.CacheLayer) -> tuple[cache.Entry, bool]:
    """The verified entry of `spec` in the writable `layer`, building it if missing (under the entry
    lock, re-checked after acquiring). Returns (entry, True if this call compiled it)."""
    if info.fingerprint["nvcc"] is None:
        toolchain.require_nvcc()  # explains why nothing can be built, before any lock or build dir
    name = cache.entry_name(spec.uri, info.key)
    what = f"kernel '{spec.uri}'"
    prepare_layer(layer, what)
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(layer.lock(name))
        except OSError as exc:
            if exc.errno not in cache.WRITE_ERRNOS:
                raise
            raise cache.write_error(layer, what, exc.errno) from None
        entry = _find_verified(spec, info, layer)  # another process may have built it meanwhile
        if entry is not None:
            return entry, False
        entry = _build(spec, info, layer)
        problem = layer.verify(entry)
        if problem is not None:
            raise CacheIntegrityError(f"freshly built {entry.library} fails verification: {problem}", entry.library)
    return entry, True


# A lazy build that is still running after this many seconds says so, once per process: the first
# call into a new kernel otherwise stalls silently for the length of a compile.
SLOW_BUILD_NOTICE_S = 2.0
_notice = {"given": False}
_notice_guard = threading.Lock()


def _logging_configured() -> bool:
    """True when the application has set up logging (a handler other than NullHandler is reachable
    from our logger): then our records go there, at the levels it chose."""
    current: logging.Logger | None = logger
    while current is not None:
        if any(not isinstance(h, logging.NullHandler) for h in current.handlers):
            return True
        if not current.propagate:
            return False
        current = current.parent
    return False


def notify(message: str) -> None:
    """One line for the person running the program: an INFO record when the application configured
    logging, else a line on stderr (a library that is silent by default would hide a stall)."""
    if _logging_configured():
        logger.info(message)
    else:
        print(f"flashinfer-jit: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _slow_build_notice(spec: KernelSpec, info: KeyInfo, layer: cache.CacheLayer) -> Iterator[None]:
    """Say what is being built, and that it is cached for next time, if the first lazy build of this
    process takes longer than SLOW_BUILD_NOTICE_S (once per process)."""
    with _notice_guard:
        if _notice["given"]:
            yield
            return

    def say() -> None:
        with _notice_guard:
            if _notice["given"]:
                return
            _notice["given"] = True
        notify(f"building kernel {spec.uri} (sm_{toolchain.arch_tag(info.archs)}) on first use; it is cached "
               f"in {layer.root} for next time (`flashinfer-jit prebuild` builds kernels ahead of time)")

    timer = threading.Timer(SLOW_BUILD_NOTICE_S, say)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _load_uncached(spec: KernelSpec) -> LoadedKernel:
    info = compute_key(spec)
    layers = cache.layers()
    for _attempt in range(3):
        found = find(spec, info, layers)
        if found is None:
            if env.build_disabled():
                raise MissingKernelError(
                    spec.uri, info.key, [l.describe() for l in layers],
                    prebuild_command(spec, info.archs, layers[-1].root),
                )
            with _slow_build_notice(spec, info, layers[-1]):
                found = (layers[-1], ensure_built(spec, info, layers[-1])[0])
        layer, entry = found
        try:
            return _open(spec, info.key, layer, entry)
        except _EntryVanished:
            logger.info("%s was removed while loading it; looking again", entry.path)
    raise KernelLoadError(f"{spec.uri}: its cache entry keeps disappearing while loading (a concurrent "
                          f"`flashinfer-jit cache clear` in a loop?)", layers[-1].root)


def _build(spec: KernelSpec, info: KeyInfo, layer: cache.CacheLayer) -> cache.Entry:
    """Build into a private dir under tmp/ and publish it. A full or read-only cache (ENOSPC, EDQUOT,
    EROFS, EACCES) at any step, compiler included, is a CacheWriteError and leaves nothing behind."""
    build_dir: Path | None = None
    try:
        build_dir = layer.new_build_dir(cache.entry_name(spec.uri, info.key))
        return _build_in(spec, info, layer, build_dir)
    except OSError as exc:
        if exc.errno not in cache.WRITE_ERRNOS:
            raise
        if build_dir is not None:
            shutil.rmtree(build_dir, ignore_errors=True)
        raise cache.write_error(layer, f"kernel '{spec.uri}'", exc.errno) from None
    except KernelCompileError as exc:
        why = _load_failure(exc.tail)
        if build_dir is not None and why is not None and _NOEXEC_TEXT in why:
            # The compile worked; torch's own dlopen of the result did not. Publishing it is no use.
            shutil.rmtree(build_dir, ignore_errors=True)
            raise KernelLoadError(f"built kernel '{spec.uri}' but cannot load it from {layer.root}: {why}."
                                  f"{_noexec_hint(why)}", layer.root) from None
        read_only = any(text in exc.tail for text in cache.READ_ONLY_TEXTS)
        if build_dir is None or not (read_only or any(text in exc.tail for text in cache.SPACE_TEXTS)):
            _raise_for_user_code(spec, exc)
            raise
        # The compiler could not write its output: a half-written object is no use for inspection.
        shutil.rmtree(build_dir, ignore_errors=True)
        raise cache.write_error(layer, f"kernel '{spec.uri}'", errno.EROFS if read_only else None,
                                f"--- compiler output (last lines) ---\n{exc.tail}") from None


def _raise_for_user_code(spec: KernelSpec, exc: KernelCompileError) -> None:
    """A compile error inside a user variant's snippet becomes a VariantCompileError quoting it (the
    whole log is read: the snippet's line may lie above the tail's instantiation notes)."""
    try:
        log = exc.log_path.read_text(errors="replace")
    except OSError:
        log = exc.tail
    found = spec.explain_compile_error(log)
    if found is not None:
        snippet, line, message, text = found
        raise VariantCompileError(spec.custom.name, snippet, line, message, text, exc) from None


def _build_in(spec: KernelSpec, info: KeyInfo, layer: cache.CacheLayer, build_dir: Path) -> cache.Entry:
    global build_count
    tag = toolchain.arch_tag(info.archs)
    logger.info("building %s for sm_%s ...", spec.uri, tag)
    start = time.perf_counter()
    # On a compile failure the build dir (sources + log, named in the error) stays under tmp/: it is
    # never an entry, so the cache stays consistent and the next call retries.
    result = build.build_library(spec.uri, info.sources, build_dir, info.archs)
    build_count += 1
    library = result.library
    manifest = {
        "schema": cache.SCHEMA,
        "uri": spec.uri,
        "family": spec.family,
        "spec": spec.to_dict(),
        "key": info.key,
        "runtime_key": info.runtime_key,
        "toolchain": info.fingerprint,
        "archs": list(info.archs),
        "flags": info.fingerprint["nvcc_flags"],
        "library": library.name,
        "size": library.stat().st_size,
        "sha256": cache.sha256_file(library),
        "build_seconds": round(result.seconds, 3),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    entry = layer.publish(build_dir, tag, spec.uri, info.key, manifest)
    logger.info(
        "built %s in %.1f s (%.1f MB) -> %s",
        spec.uri, time.perf_counter() - start, manifest["size"] / 1e6, entry.path,
    )
    return entry


def inventory(cache_dir: Path | str | None = None, verify: bool = True) -> list[dict[str, Any]]:
    """Every entry of every cache layer as plain data (`flashinfer-jit cache list|show`), with
    `toolchain_differs`: the fields (those a prebuilt binary must match, plus the nvcc version) in
    which the entry's recorded toolchain differs from this installation's."""
    fingerprints: dict[str, dict[str, Any] | None] = {}

    def current(arch_tag: str) -> dict[str, Any] | None:
        if arch_tag not in fingerprints:
            try:
                fingerprints[arch_tag] = toolchain.fingerprint(tuple(arch_tag.split("_")))
            except (ValueError, OSError):
                fingerprints[arch_tag] = None
        return fingerprints[arch_tag]

    fields = (*toolchain.RUNTIME_FIELDS, "nvcc")
    return [cache.entry_report(layer, entry, verify=verify, current=current(entry.arch), fields=fields)
            for layer in cache.layers(cache_dir) for entry in layer.entries()]


def clear_memo() -> None:
    """Forget loaded kernels (tests). Libraries stay mapped; new loads re-read the cache."""
    _memo.clear()
