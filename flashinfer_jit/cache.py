"""Key -> artifact directory on disk. Knows nothing about CUDA or attention.

Layout of a cache root (one per layer):

    <root>/<arch>/<uri>-<key[:16]>/   one entry: <uri>*.so, manifest.json, src/, build.log
    <root>/locks/<uri>-<key[:16]>.lock  flock per entry (released by the OS when its holder dies)
    <root>/tmp/                       private build dirs; an entry is published by one rename
    <root>/quarantine/                entries that failed verification, kept for inspection

An entry directory appears only by `rename` of a complete build dir, so a reader sees a whole entry
or none. Entries are never modified in place: a process that mapped a .so keeps a valid file even
while another process quarantines or replaces that entry.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import filelock

from . import env
from .errors import BuildLockTimeout, CacheSecurityError

logger = logging.getLogger("flashinfer_jit")

MANIFEST = "manifest.json"
SCHEMA = 1
_INTERMEDIATES = (".o", ".ninja_deps", ".ninja_log", "lock")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def entry_name(uri: str, key: str) -> str:
    return f"{uri}-{key[:16]}"


@dataclass(frozen=True)
class Entry:
    path: Path
    manifest: dict[str, Any]

    @property
    def library(self) -> Path:
        return self.path / self.manifest["library"]


def _make_private_dir(path: Path) -> None:
    """mkdir -p with mode 0700 for every directory we create (whatever the umask)."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            continue
        os.chmod(d, 0o700)


def _make_private_tree(root: Path) -> None:
    """Directories 0700, files without group/other write. The compiler and linker create files
    with the process umask (0777 under umask 000), and check_private would then refuse them."""
    for path in [root, *root.rglob("*")]:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            os.chmod(path, 0o700)
        elif stat.S_ISREG(st.st_mode) and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            os.chmod(path, stat.S_IMODE(st.st_mode) & ~(stat.S_IWGRP | stat.S_IWOTH))


def check_private(path: Path, trusted: bool = False) -> None:
    """Refuse a path that another user could have written: loading a .so runs its code.

    The path must not be a symlink, must be owned by us or root, and must not be writable by
    group/others (unless it lies under a root listed in FLASHINFER_JIT_TRUSTED_ROOTS).
    """
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise CacheSecurityError(
            f"refusing cache path {path}: it is a symbolic link. Point FLASHINFER_JIT_CACHE_DIR at the real "
            f"directory instead.",
            path,
        )
    if st.st_uid not in (os.getuid(), 0):
        raise CacheSecurityError(
            f"refusing cache path {path}: owned by uid {st.st_uid}, not by you (uid {os.getuid()}) or root. "
            f"Use a cache directory you own (FLASHINFER_JIT_CACHE_DIR), or list a deliberately shared one in "
            f"FLASHINFER_JIT_TRUSTED_ROOTS.",
            path,
        )
    if not trusted and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise CacheSecurityError(
            f"refusing cache path {path}: mode {stat.filemode(st.st_mode)} lets other users write it. "
            f"Fix it with `chmod go-w {path}`, or list the root in FLASHINFER_JIT_TRUSTED_ROOTS if it is "
            f"meant to be shared.",
            path,
        )


class CacheLayer:
    """One cache root. Read-only layers are only ever read: no mkdir, no lock, no write."""

    def __init__(self, root: Path, writable: bool):
        self.root = Path(root)
        self.writable = writable

    def __repr__(self) -> str:
        return f"CacheLayer({str(self.root)!r}, {'writable' if self.writable else 'read-only'})"

    def describe(self) -> str:
        return f"{self.root} ({'writable' if self.writable else 'read-only'})"

    @property
    def trusted(self) -> bool:
        return any(self.root == t or t in self.root.parents for t in env.trusted_roots())

    def entry_dir(self, arch_tag: str, uri: str, key: str) -> Path:
        return self.root / arch_tag / entry_name(uri, key)

    # ---- reading ---------------------------------------------------------------------------
    def _read_manifest(self, directory: Path) -> dict[str, Any] | None:
        try:
            return json.loads((directory / MANIFEST).read_text())
        except (OSError, ValueError):
            return None

    def find(self, arch_tag: str, uri: str, key: str, runtime_key: str | None = None) -> Entry | None:
        """The entry for `key`; or, when `runtime_key` is given (no compiler here to fingerprint),
        any entry of `uri` built from the same sources for the same runtime."""
        directory = self.entry_dir(arch_tag, uri, key)
        manifest = self._read_manifest(directory)
        if manifest is not None and manifest.get("key") == key:
            return Entry(directory, manifest)
        if runtime_key is not None:
            for candidate in sorted((self.root / arch_tag).glob(f"{uri}-*")):
                manifest = self._read_manifest(candidate)
                if manifest is not None and manifest.get("runtime_key") == runtime_key:
                    return Entry(candidate, manifest)
        return None

    def verify(self, entry: Entry) -> str | None:
        """None if the entry's .so matches its manifest (size and sha256), else what is wrong."""
        library = entry.library
        try:
            size = library.stat().st_size
        except OSError as exc:
            return f"cannot stat {library}: {exc.strerror}"
        if size != entry.manifest.get("size"):
            return f"{library.name} is {size} bytes, manifest says {entry.manifest.get('size')}"
        digest = sha256_file(library)
        if digest != entry.manifest.get("sha256"):
            return f"{library.name} sha256 {digest[:16]}… does not match the manifest's {str(entry.manifest.get('sha256'))[:16]}…"
        return None

    def check_security(self, entry: Entry) -> None:
        """Every path from the root down to the .so must be private to us (or root)."""
        trusted = self.trusted
        path = self.root
        check_private(path, trusted)
        for part in entry.library.relative_to(self.root).parts:
            path = path / part
            check_private(path, trusted)

    def entries(self) -> Iterator[Entry]:
        if not self.root.is_dir():
            return
        for arch_dir in sorted(self.root.iterdir()):
            if arch_dir.name in ("locks", "tmp", "quarantine") or not arch_dir.is_dir():
                continue
            for directory in sorted(arch_dir.iterdir()):
                manifest = self._read_manifest(directory)
                if manifest is not None:
                    yield Entry(directory, manifest)

    # ---- writing (writable layer only) -----------------------------------------------------
    def _require_writable(self) -> None:
        if not self.writable:
            raise PermissionError(f"cache layer {self.root} is read-only")

    def ensure_root(self) -> None:
        self._require_writable()
        _make_private_dir(self.root)
        check_private(self.root, self.trusted)

    def lock(self, name: str) -> "BuildLock":
        self.ensure_root()
        _make_private_dir(self.root / "locks")
        return BuildLock(self.root / "locks" / f"{name}.lock", env.lock_timeout())

    def new_build_dir(self, name: str) -> Path:
        self.ensure_root()
        _make_private_dir(self.root / "tmp")
        return Path(tempfile.mkdtemp(prefix=f"{name}.", dir=self.root / "tmp"))

    def publish(self, build_dir: Path, arch_tag: str, uri: str, key: str, manifest: dict[str, Any]) -> Entry:
        """Write the manifest into the finished build dir, drop intermediates, rename it into place."""
        self._require_writable()
        for path in list(build_dir.iterdir()):
            if path.is_file() and (path.suffix in _INTERMEDIATES or path.name in _INTERMEDIATES):
                path.unlink()
        tmp_manifest = build_dir / (MANIFEST + ".tmp")
        tmp_manifest.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        os.replace(tmp_manifest, build_dir / MANIFEST)
        _make_private_tree(build_dir)
        final = self.entry_dir(arch_tag, uri, key)
        _make_private_dir(final.parent)
        try:
            os.rename(build_dir, final)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            # Another builder published first (only possible without working locks): keep theirs.
            shutil.rmtree(build_dir, ignore_errors=True)
            existing = self.find(arch_tag, uri, key)
            if existing is None:
                raise
            return existing
        return Entry(final, manifest)

    def quarantine(self, entry: Entry, reason: str) -> Path:
        """Move a bad entry aside (never delete under a reader that may have it mapped)."""
        self._require_writable()
        _make_private_dir(self.root / "quarantine")
        target = self.root / "quarantine" / f"{entry.path.name}.{int(time.time())}.{os.getpid()}"
        os.rename(entry.path, target)
        (target / "QUARANTINED").write_text(reason + "\n")
        logger.warning("quarantined cache entry %s: %s (moved to %s)", entry.path, reason, target)
        return target


class BuildLock:
    """An OS file lock (flock) with a bounded wait. The OS drops it if the holder dies."""

    def __init__(self, path: Path, timeout: float):
        self.path = path
        self.timeout = timeout
        self._lock = filelock.FileLock(str(path), timeout=timeout, thread_local=False)
        self._owner = path.with_suffix(".owner")

    def __enter__(self) -> "BuildLock":
        try:
            self._lock.acquire()
        except filelock.Timeout:
            holder = None
            try:
                holder = self._owner.read_text().strip()
            except OSError:
                pass
            raise BuildLockTimeout(self.path, self.timeout, holder) from None
        try:
            self._owner.write_text(f"pid {os.getpid()} on {os.uname().nodename} since {time.ctime()}\n")
        except OSError:
            pass
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def layers() -> list[CacheLayer]:
    """Read-only prebuilt layers first (FLASHINFER_JIT_PREBUILT_DIRS), then the writable user cache."""
    return [CacheLayer(p, writable=False) for p in env.prebuilt_dirs()] + [CacheLayer(env.cache_dir(), writable=True)]
