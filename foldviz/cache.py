"""A persistent tensor cache on disk: validated on every read, written atomically, bounded by least-recently-used
eviction, safe for several processes (CLI runs, sweep workers, the app) sharing one directory.

Each entry is one safetensors file ``NAMESPACE/KEY.safetensors`` holding a single tensor plus metadata: the format
tag, the entry's own key, its shape, dtype and a SHA-256 of the tensor bytes. A read trusts nothing: the file size
is bounded before reading, the header is parsed and checked, the key must be the requested one (a file copied
under another name is foreign), shape, dtype and checksum must match and every value must be finite. A file that
fails any check is reported once with a :class:`CacheWarning`, removed and treated as a miss, so the caller builds
the value again. Nothing is ever unpickled.

Location (first that applies): the ``root`` argument, :func:`configure`'s ``directory``, the environment variable
``FOLDVIZ_CACHE_DIR``, ``platformdirs.user_cache_dir("foldviz")`` when platformdirs is installed, else
``$XDG_CACHE_HOME/foldviz`` or ``~/.cache/foldviz``. ``FOLDVIZ_CACHE=0`` (or ``configure(enabled=False)``) turns the
cache off: :func:`default_cache` then returns None and callers keep values in memory only.

Recency is the file's modification time, refreshed on every hit; after each write the namespace is trimmed to
``max_bytes`` (default 512 MiB, ``FOLDVIZ_CACHE_MAX_MB``) oldest first. :meth:`TensorCache.get_or_build` holds an
advisory lock (``fcntl.flock``, where the platform has it) while it builds, so two processes asking for the same
missing entry build it once: the second waits and reads the first one's file. Without the lock, writes are still
atomic (temporary file + ``os.replace``), so racing writers leave one complete, valid file.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .utils import all_finite, atomic_write_bytes

__all__ = ["CACHE_DIR_ENV", "CACHE_SWITCH_ENV", "CACHE_MAX_ENV", "CacheWarning", "CacheError", "TensorCache",
           "CacheHit", "default_cache_dir", "default_cache", "configure", "cache_key"]

CACHE_DIR_ENV = "FOLDVIZ_CACHE_DIR"
CACHE_SWITCH_ENV = "FOLDVIZ_CACHE"          # "0", "off", "false", "no": no persistent cache
CACHE_MAX_ENV = "FOLDVIZ_CACHE_MAX_MB"
FORMAT = "foldviz-tensor-cache-1"
DEFAULT_MAX_BYTES = 512 * 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024               # one tensor and a few metadata strings need far less
LOCK_SLOTS = 64                             # lock files per namespace (keys hash onto them): a bounded set
_SUFFIX = ".safetensors"
_DTYPES = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_OFF = {"0", "off", "false", "no"}


class CacheWarning(UserWarning):
    """A cache file was damaged, truncated, foreign or unwritable; the value is rebuilt (nothing is lost)."""


class CacheError(ValueError):
    """A cache setting that cannot work (e.g. a cache directory that is a file); the message is for the user."""


def cache_key(*parts) -> str:
    """A 64-hex key from JSON-serialisable ``parts`` (tuples and lists alike, dict keys sorted)."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _tensor_sha(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    arr = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()
    return hashlib.sha256(memoryview(arr).cast("B") if arr.ndim and arr.size else arr.tobytes()).hexdigest()


@dataclass
class CacheHit:
    """A value read from the cache, with the metadata stored beside it."""

    tensor: torch.Tensor
    meta: dict[str, str]
    path: Path


@dataclass
class TensorCache:
    """Tensors under ``root / namespace``, at most ``max_bytes`` in all (see the module docstring)."""

    root: Path
    namespace: str = "proxy"
    max_bytes: int = DEFAULT_MAX_BYTES

    def __post_init__(self):
        self.root = Path(self.root).expanduser()
        if not self.namespace.replace("-", "").replace("_", "").isalnum():
            raise CacheError(f"cache namespace must be letters, digits, - or _, got {self.namespace!r}")
        if self.max_bytes < 0:
            raise CacheError(f"cache size limit must be >= 0 bytes, got {self.max_bytes}")
        if self.root.exists() and not self.root.is_dir():
            raise CacheError(f"cache directory {self.root} is a file")

    @property
    def directory(self) -> Path:
        return self.root / self.namespace

    def path(self, key: str) -> Path:
        if not (len(key) == 64 and all(c in "0123456789abcdef" for c in key)):
            raise CacheError(f"cache key must be 64 lowercase hex digits (cache_key()), got {key[:80]!r}")
        return self.directory / f"{key}{_SUFFIX}"

    # -- reading -----------------------------------------------------------------------------------------------
    def get(self, key: str, *, shape=None, dtype: torch.dtype | None = None) -> CacheHit | None:
        """The entry ``key`` if present and valid (and of ``shape`` / ``dtype`` when given), else None.

        An invalid file is removed with a :class:`CacheWarning`; a valid hit becomes the most recently used entry.
        """
        p = self.path(key)
        try:
            st = p.stat()
        except OSError:
            return None
        try:
            hit = self._read(p, key, st.st_size, shape, dtype)
        except _Invalid as exc:
            warnings.warn(f"ignoring cache file {p}: {exc}; it will be rebuilt", CacheWarning, stacklevel=2)
            with contextlib.suppress(OSError):
                if p.stat().st_ino == st.st_ino:  # not a valid file another process has just put in its place
                    p.unlink()
            return None
        with contextlib.suppress(OSError):
            os.utime(p)  # recency for the LRU order
        return hit

    def _read(self, p: Path, key: str, size: int, shape, dtype) -> CacheHit:
        if size > self.max_bytes + MAX_HEADER_BYTES + 8:
            raise _Invalid(f"{size} bytes, larger than the cache limit")
        if size < 8:
            raise _Invalid("truncated (no header)")
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise _Invalid(f"unreadable ({exc.strerror or exc})") from None
        (n,) = struct.unpack("<Q", data[:8])
        if n > MAX_HEADER_BYTES or 8 + n > len(data):
            raise _Invalid("truncated or not a safetensors file (bad header length)")
        try:
            header = json.loads(data[8:8 + n])
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _Invalid("header is not JSON") from None
        if not isinstance(header, dict):
            raise _Invalid("header is not a JSON object")
        meta = header.get("__metadata__") or {}
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise _Invalid(f"not a foldviz cache entry (format {str(meta.get('format'))[:40]!r})")
        if meta.get("key") != key:
            raise _Invalid("foreign entry (stored under another key)")
        info = header.get("value")
        if not isinstance(info, dict) or set(header) != {"__metadata__", "value"}:
            raise _Invalid("unexpected tensors in the file")
        st_dtype, st_shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if st_dtype not in _DTYPES or not isinstance(st_shape, list) or not all(
                isinstance(d, int) and d >= 0 for d in st_shape):
            raise _Invalid("bad dtype or shape in the header")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise _Invalid("bad data offsets in the header")
        t_dtype = _DTYPES[st_dtype]
        nbytes = int(torch.tensor([], dtype=t_dtype).element_size()) * int(torch.Size(st_shape).numel())
        if offsets != [0, nbytes] or 8 + n + nbytes != len(data):
            raise _Invalid(f"truncated or padded ({len(data)} bytes, header promises {8 + n + nbytes})")
        if shape is not None and tuple(st_shape) != tuple(int(d) for d in shape):
            raise _Invalid(f"shape {tuple(st_shape)}, expected {tuple(shape)}")
        if dtype is not None and t_dtype != dtype:
            raise _Invalid(f"dtype {t_dtype}, expected {dtype}")
        if meta.get("shape") != json.dumps(st_shape) or meta.get("dtype") != st_dtype:
            raise _Invalid("header and metadata disagree")
        raw = bytearray(data[8 + n:])
        t = torch.frombuffer(raw, dtype=t_dtype).reshape(st_shape) if nbytes else torch.empty(st_shape, dtype=t_dtype)
        if meta.get("sha256") != _tensor_sha(t):
            raise _Invalid("checksum mismatch (damaged data)")
        if not all_finite(t):
            raise _Invalid("non-finite values")
        return CacheHit(t, {k: v for k, v in meta.items() if isinstance(v, str)}, p)

    # -- writing -----------------------------------------------------------------------------------------------
    def put(self, key: str, tensor: torch.Tensor, meta: dict | None = None) -> Path | None:
        """Store ``tensor`` (finite values only) under ``key`` atomically, then trim the cache to its size limit.

        Returns the file, or None when the entry alone exceeds the limit or the directory is not writable (a
        :class:`CacheWarning`; the caller keeps its value in memory).
        """
        from safetensors.torch import save

        t = tensor.detach().cpu().contiguous()
        if not all_finite(t):
            raise ValueError("refusing to cache a tensor with non-finite values")
        st_dtype = {v: k for k, v in _DTYPES.items()}.get(t.dtype)
        if st_dtype is None:
            raise ValueError(f"cannot cache tensors of dtype {t.dtype}")
        extra = {str(k): str(v) for k, v in (meta or {}).items()}
        fixed = {"format": FORMAT, "key": key, "shape": json.dumps(list(t.shape)), "dtype": st_dtype,
                 "sha256": _tensor_sha(t), "created": f"{time.time():.3f}"}
        p = self.path(key)
        data = save({"value": t}, metadata={**extra, **fixed})
        if len(data) > self.max_bytes:
            return None
        try:
            atomic_write_bytes(p, data)
        except OSError as exc:
            warnings.warn(f"cannot write cache file {p}: {exc.strerror or exc}; keeping the value in memory only",
                          CacheWarning, stacklevel=2)
            return None
        self.evict(keep=p)
        return p

    def get_or_build(self, key: str, build: Callable[[], tuple[torch.Tensor, dict]], *, shape=None,
                     dtype: torch.dtype | None = None) -> tuple[CacheHit, bool]:
        """The valid entry ``key``, building and storing it with ``build() -> (tensor, meta)`` when missing.

        Returns (hit, built). While one process builds, others asking for the same key wait on a lock file and
        then read its result instead of building it again.
        """
        hit = self.get(key, shape=shape, dtype=dtype)
        if hit is not None:
            return hit, False
        with self._lock(key):
            hit = self.get(key, shape=shape, dtype=dtype)  # filled while we waited
            if hit is not None:
                return hit, False
            tensor, meta = build()
            if shape is not None and tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"cache builder returned shape {tuple(tensor.shape)}, expected {tuple(shape)}")
            p = self.put(key, tensor, meta)
            return CacheHit(tensor.detach().cpu(), {k: str(v) for k, v in meta.items()}, p or self.path(key)), True

    @contextlib.contextmanager
    def _lock(self, key: str):
        """An exclusive inter-process lock for ``key`` (one of LOCK_SLOTS lock files; a no-op without fcntl)."""
        try:  # flock belongs to the open file: threads of one process exclude each other through it too
            import fcntl
        except ImportError:  # not POSIX: atomic writes still keep one valid file
            yield
            return
        locks = self.directory / "locks"
        try:
            locks.mkdir(parents=True, exist_ok=True)
            fh = open(locks / f"{int(key[:8], 16) % LOCK_SLOTS:02d}.lock", "a+b")
        except OSError:
            yield
            return
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            fh.close()

    # -- housekeeping ------------------------------------------------------------------------------------------
    def entries(self) -> list[tuple[Path, int, float]]:
        """(file, bytes, last use) of every entry, least recently used first (temporary files excluded)."""
        out = []
        try:
            files = list(self.directory.glob(f"*{_SUFFIX}"))
        except OSError:
            return []
        for p in files:
            if p.name.startswith("."):
                continue
            with contextlib.suppress(OSError):
                st = p.stat()
                out.append((p, st.st_size, st.st_mtime))
        return sorted(out, key=lambda e: (e[2], e[0].name))

    def size(self) -> int:
        return sum(b for _p, b, _t in self.entries())

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Delete least recently used entries until the namespace fits ``max_bytes`` (``keep`` goes last)."""
        entries = self.entries()
        total = sum(b for _p, b, _t in entries)
        removed = []
        order = [e for e in entries if e[0] != keep] + [e for e in entries if e[0] == keep]
        for p, b, _t in order:
            if total <= self.max_bytes:
                break
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
            total -= b
        self._sweep_temporaries()
        return removed

    def _sweep_temporaries(self, age_s: float = 3600.0) -> None:
        """Temporary files of writers that died (older than ``age_s``; live writers take seconds)."""
        now = time.time()
        with contextlib.suppress(OSError):
            for p in self.directory.glob(".*.tmp"):
                with contextlib.suppress(OSError):
                    if now - p.stat().st_mtime > age_s:
                        p.unlink()

    def clear(self) -> int:
        """Delete every entry; returns how many."""
        n = 0
        for p, _b, _t in self.entries():
            with contextlib.suppress(OSError):
                p.unlink()
                n += 1
        return n


class _Invalid(Exception):
    """Why a cache file was rejected (turned into a CacheWarning)."""


# ---------------------------------------------------------------------------------------------------------------
# process-wide configuration
# ---------------------------------------------------------------------------------------------------------------
_CONFIG: dict = {"directory": None, "enabled": None, "max_bytes": None}


def configure(*, directory: str | os.PathLike | None = None, enabled: bool | None = None,
              max_bytes: int | None = None) -> None:
    """Set this process's cache directory, switch and size limit (None leaves a setting to the environment).

    The settings are also exported to the environment (``FOLDVIZ_CACHE_DIR`` / ``FOLDVIZ_CACHE``), so worker
    processes started afterwards (multiprocessing, a local Ray instance) use the same cache.
    """
    if directory is not None:
        d = Path(directory).expanduser()
        if d.exists() and not d.is_dir():
            raise CacheError(f"--cache-dir {directory} is a file; give a directory")
        _CONFIG["directory"] = d
        os.environ[CACHE_DIR_ENV] = str(d.resolve())
    if enabled is not None:
        _CONFIG["enabled"] = bool(enabled)
        os.environ[CACHE_SWITCH_ENV] = "1" if enabled else "0"
    if max_bytes is not None:
        if max_bytes < 0:
            raise CacheError(f"cache size limit must be >= 0, got {max_bytes}")
        _CONFIG["max_bytes"] = int(max_bytes)


def default_cache_dir() -> Path:
    """Where the cache lives unless told otherwise (see the module docstring)."""
    if _CONFIG["directory"] is not None:
        return _CONFIG["directory"]
    env = os.environ.get(CACHE_DIR_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    try:
        import platformdirs

        return Path(platformdirs.user_cache_dir("foldviz", appauthor=False))
    except ImportError:
        pass
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg) if xdg else Path.home() / ".cache") / "foldviz"


def _enabled() -> bool:
    if _CONFIG["enabled"] is not None:
        return _CONFIG["enabled"]
    return os.environ.get(CACHE_SWITCH_ENV, "1").strip().lower() not in _OFF


def _max_bytes() -> int:
    if _CONFIG["max_bytes"] is not None:
        return _CONFIG["max_bytes"]
    env = os.environ.get(CACHE_MAX_ENV, "").strip()
    if env:
        try:
            mb = float(env)
        except ValueError:
            raise CacheError(f"{CACHE_MAX_ENV}={env!r} is not a number of megabytes") from None
        if not mb >= 0:
            raise CacheError(f"{CACHE_MAX_ENV}={env!r} must be >= 0")
        return int(mb * 1024 * 1024)
    return DEFAULT_MAX_BYTES


def default_cache(namespace: str = "proxy") -> TensorCache | None:
    """The configured cache for ``namespace``, or None when caching is off."""
    if not _enabled():
        return None
    return TensorCache(default_cache_dir(), namespace=namespace, max_bytes=_max_bytes())


def new_build_id() -> str:
    """An identifier for one build of a value (kept in its metadata: copies of one build share it)."""
    return uuid.uuid4().hex[:16]
