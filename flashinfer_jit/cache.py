"""Key -> artifact directory on disk. Knows nothing about CUDA or attention.

Layout of a cache root (one per layer):

    <root>/<arch>/<uri>-<key[:16]>/   one entry: <uri>*.so, manifest.json, src/, build.log, last_used
    <root>/locks/<uri>-<key[:16]>.lock  flock per entry (released by the OS when its holder dies)
    <root>/tmp/                       private build dirs; an entry is published by one rename
    <root>/quarantine/                entries that failed verification, kept for inspection

An entry directory appears only by `rename` of a complete build dir, so a reader sees a whole entry
or none. Entries are never modified in place: a process that mapped a .so keeps a valid file even
while another process quarantines, removes or replaces that entry (removal renames the entry out of
the way first, then unlinks; nothing is ever truncated or rewritten). The one file that changes is
`last_used`, an empty file whose mtime a load refreshes (at most once per process per entry, and
never in a read-only layer); `cache prune` evicts by it.

Inspection and housekeeping (`flashinfer-jit cache ...`) live here too: `entry_report`, `verify_all`,
`select_for_clear`, `select_for_prune`, `remove`. They know nothing about CUDA either.
"""
from __future__ import annotations

import datetime
import errno
import fnmatch
import hashlib
import json
import logging
import os
import shlex
import shutil
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import filelock

from . import env
from .errors import BuildLockTimeout, CacheSecurityError, CacheWriteError

logger = logging.getLogger("flashinfer_jit")

MANIFEST = "manifest.json"
LAST_USED = "last_used"
SCHEMA = 1
_INTERMEDIATES = (".o", ".ninja_deps", ".ninja_log", "lock")
_SPECIAL_DIRS = ("locks", "tmp", "quarantine")
# A build dir under tmp/ is left over (its builder died or failed) once it is older than this and
# its entry lock is free.
STALE_TMP_SECONDS = 3600.0


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

    @property
    def uri(self) -> str:
        return str(self.manifest.get("uri", self.path.name))

    @property
    def arch(self) -> str:
        return self.path.parent.name

    @property
    def created(self) -> float:
        """Build time (epoch seconds) from the manifest, else the directory's mtime."""
        text = self.manifest.get("created")
        if isinstance(text, str):
            try:
                return datetime.datetime.fromisoformat(text).timestamp()
            except ValueError:
                pass
        return _mtime(self.path) or 0.0

    @property
    def last_used(self) -> float | None:
        """When a process last loaded it (mtime of `last_used`); None if never recorded."""
        return _mtime(self.path / LAST_USED)

    @property
    def last_activity(self) -> float:
        """The later of build and last load: the age `cache clear --older-than` and `prune` go by."""
        used = self.last_used
        return max(self.created, used) if used is not None else self.created


def _mtime(path: Path) -> float | None:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def tree_bytes(path: Path) -> int:
    """Bytes of every regular file under `path` (symlinks not followed)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def _newest_mtime(path: Path) -> float:
    newest = _mtime(path) or 0.0
    for dirpath, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
            except OSError:
                continue
    return newest


# Modes of what the cache creates: readable by every user (a prebuilt image layer is read by the
# service's user), writable only by the owner. A stricter umask (077, 027) is honoured; a looser one
# (000) never makes anything group- or world-writable, which check_private would refuse.
DIR_MODE = 0o755
FILE_MODE = 0o644
_umask_guard = threading.Lock()


def _umask() -> int:
    """The process umask, read without changing it where /proc says (threads build in parallel)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_guard:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def dir_mode() -> int:
    return DIR_MODE & ~_umask()


def file_mode() -> int:
    return FILE_MODE & ~_umask()


def _make_dirs(path: Path) -> None:
    """mkdir -p; every directory it creates gets dir_mode() (0755 unless the umask is stricter)."""
    mode = dir_mode()
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=mode)
        except FileExistsError:
            continue
        os.chmod(d, mode)


def _set_tree_modes(root: Path) -> None:
    """Directories dir_mode(), regular files file_mode(): the compiler, the linker and mkdtemp create
    them with their own modes (0700 build dirs, 0777 files under umask 000)."""
    dmode, fmode = dir_mode(), file_mode()
    for path in [root, *root.rglob("*")]:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            os.chmod(path, dmode)
        elif stat.S_ISREG(st.st_mode):
            os.chmod(path, fmode)


def check_private(path: Path, trusted: bool = False, is_root: bool = False) -> None:
    """Refuse a path that another user could have written: loading a .so runs its code.

    The path must not be a symlink, must be owned by us or root, and must not be writable by
    group/others. Under a root listed in FLASHINFER_JIT_TRUSTED_ROOTS (a deliberately shared team
    cache) owner and mode are not checked, and the root itself may be a symlink; a symlink inside a
    cache is always refused (the cache never creates one).
    """
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) and not (trusted and is_root):
        raise CacheSecurityError(
            f"refusing cache path {path}: it is a symbolic link, which whoever controls its target could "
            f"redirect. Point FLASHINFER_JIT_CACHE_DIR (or FLASHINFER_JIT_PREBUILT_DIRS) at the real directory "
            f"({os.path.realpath(path)}), or list the root in FLASHINFER_JIT_TRUSTED_ROOTS if it is meant to be "
            f"shared.",
            path,
        )
    if trusted:
        return
    if st.st_uid not in (os.getuid(), 0):
        raise CacheSecurityError(
            f"refusing cache path {path}: owned by uid {st.st_uid}, not by you (uid {os.getuid()}) or root, "
            f"so its owner could replace the kernels in it. Fix it with `chown -R {os.getuid()} {shlex.quote(str(path))}` (as "
            f"root), use a cache directory you own (FLASHINFER_JIT_CACHE_DIR), or list a deliberately shared "
            f"root in FLASHINFER_JIT_TRUSTED_ROOTS.",
            path,
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise CacheSecurityError(
            f"refusing cache path {path}: mode {stat.filemode(st.st_mode)} lets other users write it. "
            f"Fix it with `chmod go-w {shlex.quote(str(path))}`, or list the root in FLASHINFER_JIT_TRUSTED_ROOTS if it is "
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

    def candidates(self, arch_tag: str, uri: str) -> Iterator[Entry]:
        """Every entry of `uri` for `arch_tag`, whatever its key (to explain a mismatch)."""
        arch_dir = self.root / arch_tag
        if not arch_dir.is_dir():
            return
        for candidate in sorted(arch_dir.glob(f"{uri}-*")):
            manifest = self._read_manifest(candidate)
            if manifest is not None and manifest.get("uri", uri) == uri:
                yield Entry(candidate, manifest)

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
        check_private(path, trusted, is_root=True)
        for part in entry.library.relative_to(self.root).parts:
            path = path / part
            check_private(path, trusted)

    def entry_dirs(self) -> Iterator[Path]:
        """Every directory in an entry's place, complete or not (verify reports the incomplete ones)."""
        if not self.root.is_dir():
            return
        for arch_dir in sorted(self.root.iterdir()):
            if arch_dir.name in _SPECIAL_DIRS or not arch_dir.is_dir() or arch_dir.is_symlink():
                continue
            for directory in sorted(arch_dir.iterdir()):
                if directory.is_dir() and not directory.is_symlink():
                    yield directory

    def entries(self) -> Iterator[Entry]:
        for directory in self.entry_dirs():
            manifest = self._read_manifest(directory)
            if manifest is not None:
                yield Entry(directory, manifest)

    def quarantined(self) -> list[Path]:
        directory = self.root / "quarantine"
        return sorted(p for p in directory.iterdir() if p.is_dir()) if directory.is_dir() else []

    def tmp_dirs(self) -> list[Path]:
        directory = self.root / "tmp"
        return sorted(p for p in directory.iterdir() if p.is_dir()) if directory.is_dir() else []

    def stale_tmp_dirs(self, max_age: float = STALE_TMP_SECONDS, now: float | None = None) -> list[Path]:
        """Build dirs under tmp/ untouched for `max_age` seconds whose entry lock is free: left by a
        builder that died or failed (a live builder holds the lock)."""
        now = time.time() if now is None else now
        stale = []
        for directory in self.tmp_dirs():
            if now - _newest_mtime(directory) < max_age:
                continue
            name = directory.name.split(".", 1)[0]
            if self.writable and not _lock_is_free(self.root / "locks" / f"{name}.lock"):
                continue
            stale.append(directory)
        return stale

    # ---- writing (writable layer only) -----------------------------------------------------
    def _require_writable(self) -> None:
        if not self.writable:
            raise PermissionError(f"cache layer {self.root} is read-only")

    def ensure_root(self) -> None:
        self._require_writable()
        _make_dirs(self.root)
        check_private(self.root, self.trusted, is_root=True)

    def prepare(self) -> None:
        """Create the root, locks/ and tmp/ and check that we may write them, before a build. Raises
        CacheSecurityError (an unsafe root) or OSError with EROFS / EACCES (read-only) or ENOSPC."""
        self.ensure_root()
        for directory in (self.root, self.root / "locks", self.root / "tmp"):
            _make_dirs(directory)
            if not os.access(directory, os.W_OK | os.X_OK):
                code = errno.EROFS if _read_only_mount(directory) else errno.EACCES
                raise OSError(code, os.strerror(code), str(directory))

    def problem(self) -> str | None:
        """Why this layer's root would be refused (CacheSecurityError's text), read-only: None when
        it is fine or does not exist yet (`flashinfer-jit config` lists it)."""
        try:
            check_private(self.root, self.trusted, is_root=True)
        except FileNotFoundError:
            return None
        except CacheSecurityError as exc:
            return str(exc)
        except OSError as exc:
            return f"cannot inspect {self.root}: {exc.strerror}"
        return None

    def lock(self, name: str) -> "BuildLock":
        self.ensure_root()
        _make_dirs(self.root / "locks")
        return BuildLock(self.root / "locks" / f"{name}.lock", env.lock_timeout())

    def new_build_dir(self, name: str) -> Path:
        self.ensure_root()
        _make_dirs(self.root / "tmp")
        return Path(tempfile.mkdtemp(prefix=f"{name}.", dir=self.root / "tmp"))

    def publish(self, build_dir: Path, arch_tag: str, uri: str, key: str, manifest: dict[str, Any]) -> Entry:
        """Write the manifest into the finished build dir, drop intermediates, rename it into place."""
        self._require_writable()
        final = self.entry_dir(arch_tag, uri, key)
        try:
            for path in list(build_dir.iterdir()):
                if path.is_file() and (path.suffix in _INTERMEDIATES or path.name in _INTERMEDIATES):
                    path.unlink()
            tmp_manifest = build_dir / (MANIFEST + ".tmp")
            tmp_manifest.write_text(json.dumps(manifest, indent=2, sort_keys=True))
            os.replace(tmp_manifest, build_dir / MANIFEST)
            _set_tree_modes(build_dir)
            _make_dirs(final.parent)
            os.rename(build_dir, final)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                # Disk full, quota, read-only: nothing was published; drop the half-written build dir.
                shutil.rmtree(build_dir, ignore_errors=True)
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
        _make_dirs(self.root / "quarantine")
        target = self.root / "quarantine" / f"{entry.path.name}.{int(time.time())}.{os.getpid()}"
        os.rename(entry.path, target)  # FileNotFoundError: someone else moved it first
        try:
            (target / "QUARANTINED").write_text(reason + "\n")
        except OSError:
            pass
        logger.warning("quarantined cache entry %s: %s (moved to %s)", entry.path, reason, target)
        return target

    def touch_last_used(self, entry: Entry) -> None:
        """Record a load: refresh the mtime of `<entry>/last_used`, at most once per process per entry.

        Writable layers only (a read-only layer is never written). Best effort: a failure (disk full,
        a layer made read-only underneath us) is ignored. The .so and the manifest are never touched.
        """
        if not self.writable:
            return
        with _touched_guard:
            if entry.path in _touched:
                return
            _touched.add(entry.path)
        path = entry.path / LAST_USED
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, file_mode())
            os.close(fd)
            os.utime(path)
        except OSError as exc:
            logger.debug("could not record the last use of %s: %s", entry.path, exc)

    def remove(self, path: Path) -> int:
        """Remove an entry, quarantined entry or build dir of this layer; returns the bytes freed.

        The directory is first renamed out of its place (atomically: a reader sees the whole entry or
        none), then deleted. Deleting only unlinks: a process that has the .so mapped keeps it."""
        self._require_writable()
        path = Path(path)
        if self.root not in path.parents:
            raise ValueError(f"{path} is not inside the cache layer {self.root}")
        size = tree_bytes(path)
        _make_dirs(self.root / "tmp")
        doomed = self.root / "tmp" / f"{path.name.split('.', 1)[0]}.removing-{os.getpid()}-{time.monotonic_ns()}"
        try:
            os.rename(path, doomed)
        except FileNotFoundError:
            return 0  # already gone (another process removed or quarantined it)
        shutil.rmtree(doomed, ignore_errors=True)
        return size


def _read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


# errno values that mean "the cache cannot take more data", not "the kernel is wrong".
SPACE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded"}
READ_ONLY_ERRNOS = {errno.EROFS: "the filesystem is read-only", errno.EACCES: "permission denied",
                    errno.EPERM: "operation not permitted"}
WRITE_ERRNOS = {**SPACE_ERRNOS, **READ_ONLY_ERRNOS}
# The same, as compilers and linkers print them.
SPACE_TEXTS = ("No space left on device", "Disk quota exceeded")
READ_ONLY_TEXTS = ("Read-only file system",)


def write_error(layer: "CacheLayer", what: str, code: int | None, detail: str = "") -> CacheWriteError:
    """The CacheWriteError for failing to add `what` ("kernel 'uri'") to `layer`: advice for a full
    disk only when the disk is full (ENOSPC, quota), the two ways out of a read-only cache otherwise.
    Every command it suggests names the cache (--cache-dir), so it pastes as-is."""
    root = shlex.quote(str(layer.root))
    head = f"cannot add {what} to the cache at {layer.root}"
    if code in SPACE_ERRNOS or code is None:
        why = SPACE_ERRNOS.get(code, "the compiler could not write its output")
        try:
            free = f"{format_size(shutil.disk_usage(layer.root).free)} free"
        except OSError:
            free = "free space unknown"
        message = (f"{head}: {why} ({free}). Nothing was published; the next call starts over. Free space "
                   f"with `flashinfer-jit cache prune --max-size 2G --cache-dir {root}` (or `flashinfer-jit cache "
                   f"clear --cache-dir {root}`), or point FLASHINFER_JIT_CACHE_DIR at a filesystem with room.")
    else:
        why = READ_ONLY_ERRNOS.get(code, os.strerror(code))
        message = (f"{head}: the cache directory is read-only for this process ({why}, uid {os.getuid()}). "
                   f"Nothing was published. Either point FLASHINFER_JIT_CACHE_DIR (or --cache-dir) at a directory "
                   f"you can write, or, if {layer.root} holds prebuilt kernels, use it as a read-only layer: "
                   f"FLASHINFER_JIT_PREBUILT_DIRS={root} (kernels missing from it are then built into "
                   f"FLASHINFER_JIT_CACHE_DIR).")
    if detail:
        message += f"\n{detail}"
    return CacheWriteError(message, layer.root, code)


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


_touched: set[Path] = set()
_touched_guard = threading.Lock()


def _lock_is_free(path: Path) -> bool:
    """True if nobody holds the flock at `path` (taking and dropping it at once)."""
    if not path.exists():
        return True
    lock = filelock.FileLock(str(path), timeout=0, thread_local=False)
    try:
        lock.acquire()
    except filelock.Timeout:
        return False
    except OSError:
        return True
    lock.release()
    return True


def layers(cache_dir: Path | str | None = None) -> list[CacheLayer]:
    """Read-only prebuilt layers first (FLASHINFER_JIT_PREBUILT_DIRS), then the writable user cache
    (`cache_dir`, else FLASHINFER_JIT_CACHE_DIR, else the per-user default)."""
    writable = Path(cache_dir).expanduser().absolute() if cache_dir is not None else env.cache_dir()
    return [CacheLayer(p, writable=False) for p in env.prebuilt_dirs()] + [CacheLayer(writable, writable=True)]


def writable_layer(cache_dir: Path | str | None = None) -> CacheLayer:
    return layers(cache_dir)[-1]


# ---- inspection and housekeeping (flashinfer-jit cache ...) ---------------------------------------

SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2, "mib": 1024**2,
              "g": 1024**3, "gb": 1024**3, "gib": 1024**3, "t": 1024**4, "tb": 1024**4, "tib": 1024**4}
DURATION_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(text: str) -> int:
    """'2G', '500M', '1.5GiB', '4096' -> bytes (binary units)."""
    raw = str(text).strip().lower().replace(" ", "")
    number = raw.rstrip("kmgtib")
    unit = raw[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in SIZE_UNITS or value < 0:
        raise ValueError(f"cannot read size {text!r}: write it like 2G, 500M, 1.5GiB or 4096 (bytes)")
    return int(value * SIZE_UNITS[unit])


def parse_duration(text: str) -> float:
    """'7d', '12h', '30m', '90s', '2w' -> seconds."""
    raw = str(text).strip().lower()
    number = raw.rstrip("smhdwin")
    unit = raw[len(number):] or "s"
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in DURATION_UNITS or value < 0:
        raise ValueError(f"cannot read duration {text!r}: write it like 7d, 12h, 30m, 90s or 2w")
    return value * DURATION_UNITS[unit]


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat(timespec="seconds")


def toolchain_differences(manifest: dict[str, Any], current: dict[str, Any] | None,
                          fields: Iterable[str]) -> list[str]:
    """Names of `fields` whose value in the entry's recorded toolchain differs from `current`."""
    if current is None:
        return []
    recorded = manifest.get("toolchain") or {}
    return [f for f in fields if recorded.get(f) != current.get(f)]


def entry_report(layer: CacheLayer, entry: Entry, *, verify: bool = True,
                 current: dict[str, Any] | None = None, fields: Iterable[str] = ()) -> dict[str, Any]:
    """One entry as plain data (`cache list --json`, `cache show`)."""
    m = entry.manifest
    toolchain = m.get("toolchain") or {}
    problem = layer.verify(entry) if verify else None
    differs = toolchain_differences(m, current, fields)
    return {
        "uri": entry.uri,
        "arch": entry.arch,
        "key": m.get("key"),
        "path": str(entry.path),
        "layer": str(layer.root),
        "writable": layer.writable,
        "library": m.get("library"),
        "size": m.get("size"),
        "disk_bytes": tree_bytes(entry.path),
        "built": m.get("created"),
        "build_seconds": m.get("build_seconds"),
        "last_used": _iso(entry.last_used),
        "toolchain": {"nvcc": toolchain.get("nvcc"), "torch": toolchain.get("torch"),
                      "torch_cuda": toolchain.get("torch_cuda"), "package_version": toolchain.get("package_version")},
        "toolchain_differs": differs if current is not None else None,
        "verified": (problem is None) if verify else None,
        "problem": problem,
        "spec": m.get("spec"),
    }


def verify_all(layer: CacheLayer) -> list[tuple[Path, Entry | None, str | None]]:
    """(directory, entry or None, problem or None) for every entry directory of the layer. A directory
    without a readable manifest is reported as a problem (a leftover no loader will ever use)."""
    results = []
    for directory in layer.entry_dirs():
        manifest = layer._read_manifest(directory)
        if manifest is None:
            results.append((directory, None, f"no readable {MANIFEST}"))
            continue
        entry = Entry(directory, manifest)
        results.append((directory, entry, layer.verify(entry)))
    return results


def check_layer(layer: CacheLayer, fix: bool = False) -> list[dict[str, Any]]:
    """`cache verify`: every entry directory of the layer, re-hashed. With `fix`, bad ones of a
    writable layer are quarantined (incomplete ones, with no manifest, removed); a read-only layer
    is only reported."""
    results = []
    for directory, entry, problem in verify_all(layer):
        action = None
        if problem is not None and fix:
            if not layer.writable:
                action = "left alone (read-only layer): rebuild that layer"
            elif entry is not None:
                try:
                    action = f"quarantined to {layer.quarantine(entry, problem)}"
                except FileNotFoundError:
                    action = "gone (removed by another process)"
            else:
                layer.remove(directory)
                action = "removed (incomplete entry)"
        results.append({"path": str(directory), "layer": str(layer.root), "writable": layer.writable,
                        "ok": problem is None, "problem": problem, "action": action,
                        "fixed": action is not None and not action.startswith("left alone")})
    return results


def remove_paths(layer: CacheLayer, paths: Iterable[Path], dry_run: bool = False) -> list[tuple[Path, int]]:
    """Remove each path (entry, quarantined entry or leftover build dir) of the writable layer;
    (path, bytes freed) for each. A dry run only measures."""
    return [(Path(p), tree_bytes(Path(p)) if dry_run else layer.remove(Path(p))) for p in paths]


def select_for_clear(layer: CacheLayer, *, older_than: float | None = None, pattern: str | None = None,
                     now: float | None = None) -> list[Entry]:
    """Entries of the layer matching every filter: last activity (build or load) at least `older_than`
    seconds ago; URI (or entry directory name) matching the glob `pattern`."""
    now = time.time() if now is None else now
    chosen = []
    for entry in layer.entries():
        if older_than is not None and now - entry.last_activity < older_than:
            continue
        if pattern is not None and not (fnmatch.fnmatchcase(entry.uri, pattern)
                                        or fnmatch.fnmatchcase(entry.path.name, pattern)):
            continue
        chosen.append(entry)
    return chosen


def select_for_prune(layer: CacheLayer, max_size: int) -> tuple[list[Path], int]:
    """What to remove so the layer holds at most `max_size` bytes: quarantined entries first (oldest
    first), then entries least recently used first. Returns (paths, bytes the layer holds now)."""
    sized: list[tuple[int, float, Path, int]] = []  # (priority, last activity, path, bytes)
    for directory in layer.quarantined():
        sized.append((0, _mtime(directory) or 0.0, directory, tree_bytes(directory)))
    for entry in layer.entries():
        sized.append((1, entry.last_activity, entry.path, tree_bytes(entry.path)))
    total = sum(item[3] for item in sized)
    chosen, remaining = [], total
    for _priority, _when, path, size in sorted(sized, key=lambda item: (item[0], item[1])):
        if remaining <= max_size:
            break
        chosen.append(path)
        remaining -= size
    return chosen, total
