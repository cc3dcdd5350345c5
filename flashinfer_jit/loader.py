"""Spec -> loaded kernel library: in-process memo, then the cache layers, then a build.

A warm cache loads the .so directly (no ninja, no nvcc run). Builds are deduplicated across
threads (a lock per spec) and across processes (an flock per entry, re-checked after acquiring).
"""
from __future__ import annotations

import ctypes
import datetime
import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from . import build, cache, env, toolchain
from .codegen import headers_digest, render
from .errors import CacheIntegrityError, KernelLaunchError, KernelLoadError, MissingKernelError
from .spec import KernelSpec

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


def prebuild_command(spec: KernelSpec, archs: tuple[str, ...]) -> str:
    fields = spec.to_dict()
    parts = ["flashinfer-jit prebuild", f"--family {fields.pop('family')}"]
    for name, value in fields.items():
        flag = name.replace("_", "-")
        parts.append(f"--{flag} {str(value).lower() if isinstance(value, bool) else value}")
    parts.append(f"--arch {','.join(archs)}")
    return " ".join(parts)


def _open(spec: KernelSpec, key: str, layer: cache.CacheLayer, entry: cache.Entry) -> LoadedKernel:
    layer.check_security(entry)
    try:
        lib = ctypes.CDLL(str(entry.library))
    except OSError as exc:
        hint = ""
        if "failed to map segment" in str(exc):
            hint = (" The cache is probably on a filesystem mounted noexec; point FLASHINFER_JIT_CACHE_DIR "
                    "at a filesystem that allows executing code.")
        raise KernelLoadError(f"cannot load {entry.library}: {exc}.{hint}", entry.library) from None
    return LoadedKernel(spec=spec, key=key, entry=entry, lib=lib)


def _find_verified(spec: KernelSpec, info: KeyInfo, layer: cache.CacheLayer) -> cache.Entry | None:
    tag = toolchain.arch_tag(info.archs)
    runtime_key = info.runtime_key if info.fingerprint["nvcc"] is None else None
    entry = layer.find(tag, spec.uri, info.key, runtime_key)
    if entry is None:
        return None
    problem = layer.verify(entry)
    if problem is None:
        return entry
    if layer.writable:
        layer.quarantine(entry, problem)
    else:
        logger.warning("skipping %s in read-only cache layer %s: %s", spec.uri, layer.root, problem)
    return None


def _load_uncached(spec: KernelSpec) -> LoadedKernel:
    info = compute_key(spec)
    layers = cache.layers()
    for layer in layers:
        entry = _find_verified(spec, info, layer)
        if entry is not None:
            return _open(spec, info.key, layer, entry)
    if env.build_disabled():
        raise MissingKernelError(
            spec.uri, info.key, [l.describe() for l in layers], prebuild_command(spec, info.archs)
        )
    if info.fingerprint["nvcc"] is None:
        toolchain.require_nvcc()  # explains why nothing can be built, before any lock or build dir
    writable = layers[-1]
    name = cache.entry_name(spec.uri, info.key)
    with writable.lock(name):
        entry = _find_verified(spec, info, writable)  # another process may have built it meanwhile
        if entry is None:
            entry = _build(spec, info, writable)
            problem = writable.verify(entry)
            if problem is not None:
                raise CacheIntegrityError(
                    f"freshly built {entry.library} fails verification: {problem}", entry.library
                )
    return _open(spec, info.key, writable, entry)


def _build(spec: KernelSpec, info: KeyInfo, layer: cache.CacheLayer) -> cache.Entry:
    global build_count
    tag = toolchain.arch_tag(info.archs)
    name = cache.entry_name(spec.uri, info.key)
    build_dir = layer.new_build_dir(name)
    logger.info("flashinfer-jit: building %s for sm_%s ...", spec.uri, tag)
    start = time.perf_counter()
    # On failure the build dir (sources + log, named in the error) stays under tmp/: it is never
    # an entry, so the cache stays consistent and the next call retries.
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
        "flashinfer-jit: built %s in %.1f s (%.1f MB) -> %s",
        spec.uri, time.perf_counter() - start, manifest["size"] / 1e6, entry.path,
    )
    return entry


def clear_memo() -> None:
    """Forget loaded kernels (tests). Libraries stay mapped; new loads re-read the cache."""
    _memo.clear()
