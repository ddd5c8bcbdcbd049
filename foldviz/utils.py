"""Small helpers shared across the library: devices, seeds, hashing, atomic writes and output-path checks."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

#: where the bundled models (assets/models) and texts live
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
MODELS_DIR = ASSETS_DIR / "models"

# progress(stage, done, total): every long-running call reports through this one signature
Progress = Callable[[str, int, int], None] | None


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Return ``device`` as a torch.device; ``None``/"auto" means cuda when available, else cpu."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {str(device)[:60]!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {str(device)[:60]!r}; use cpu, cuda, cuda:N or auto")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available on this machine")
    return dev


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# elements checked at once by all_finite: torch.isfinite materialises |x| and two masks, 2.5x the tensor
FINITE_CHUNK = 4 * 1024 * 1024


def all_finite(t: torch.Tensor) -> bool:
    """True when every element of ``t`` is finite, checked in flat chunks of ``FINITE_CHUNK`` elements (bounded
    scratch memory: ``torch.isfinite`` on VGG-16's 4096 x 29185 feature matrix alone allocates 0.7 GB)."""
    if not (t.is_floating_point() or t.is_complex()):
        return True
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + FINITE_CHUNK]).all()) for i in range(0, flat.numel(), FINITE_CHUNK))


def json_default(o):
    """``json.dumps(default=...)`` for numpy scalars/arrays, tensors and paths found in reports."""
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if torch.is_tensor(o):
        return o.tolist()
    return str(o)


def state_dict_hash(model_or_state: nn.Module | dict) -> str:
    """SHA-256 over the names, shapes and float32 bytes of a state dict (order-independent)."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if not torch.is_tensor(t):
            continue
        t = t.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        # the raw bytes, never a converted copy (a bf16 embedding of 128k x 2048 would be 1 GB in float32)
        arr = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
        h.update(memoryview(arr).cast("B") if arr.ndim and arr.size else arr.tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# safe output: atomic writes and output-path checks
# ----------------------------------------------------------------------------------------------------------------

#: Files that make a directory "a foldviz model" (see foldviz.io).
FOLDED_MODEL_MARKER = "foldviz-model.json"


class OutputError(ValueError):
    """An output path that foldviz refuses to write to; the message is meant for the user."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: a temp file in the same directory, fsync, then ``os.replace``.

    Readers see either the old file or the complete new one, never a partial file; on any error (including
    KeyboardInterrupt) the temp file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def dumps_json(obj, *, indent: int | None = 2) -> str:
    """Strict JSON (no NaN/Infinity tokens: they are written as null) with numpy/tensor support."""
    return json.dumps(_finite(obj), indent=indent, default=json_default, allow_nan=False) + "\n"


def _finite(o):
    if isinstance(o, float):
        return o if o == o and o not in (float("inf"), float("-inf")) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if isinstance(o, (np.floating, np.integer, np.ndarray)) or torch.is_tensor(o):
        return _finite(json.loads(json.dumps(o, default=json_default)))
    return o


def _real(p: Path) -> Path:
    return Path(os.path.realpath(str(p)))


def is_folded_model_dir(path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / FOLDED_MODEL_MARKER).exists()


def _inside(path: Path, protected) -> str | None:
    rp = _real(path)
    for prot in protected or ():
        if prot is None:
            continue
        pp = _real(Path(prot))
        if rp == pp or pp in rp.parents:
            return str(prot)
    return None


def _check_parent(p: Path, path) -> None:
    """The nearest existing ancestor of ``p`` must be a directory."""
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"--out {path}: {parent} is not a directory")
            return


def check_output_file(path, force: bool = False, *, protected=()) -> Path:
    """Validate an output *file* path before any work starts (raises :class:`OutputError`).

    Refused: an existing directory, a path whose parent is a file, a path inside a ``protected`` directory
    (e.g. the input model), an existing file unless ``force``.  Missing parent directories are fine (created
    at write time).
    """
    p = Path(path).expanduser()
    if str(path) in ("", "."):
        raise OutputError("output path is empty")
    if p.is_dir():
        raise OutputError(f"--out {path} is a directory; give a file name (e.g. {p / 'out'}{p.suffix or ''})")
    _check_parent(p, path)
    hit = _inside(p, protected)
    if hit:
        raise OutputError(f"--out {path} is inside the input model {hit}; write somewhere else")
    if p.exists() and not force:
        raise OutputError(f"--out {path} already exists; pass --force to replace it")
    return p


def check_output_dir(path, force: bool = False, *, protected=()) -> Path:
    """Validate an output *directory* for a folded model before any work starts (raises :class:`OutputError`).

    Refused: a file; the input model's directory (``protected``, compared by real path) or anything inside it;
    an existing non-empty directory unless it holds a foldviz model *and* ``force`` is given (it is then
    replaced atomically by :func:`atomic_dir`).
    """
    p = Path(path).expanduser()
    if str(path) in ("", "."):
        raise OutputError("--out must name a new directory")
    hit = _inside(p, protected)
    if hit:
        raise OutputError(f"--out {path} is the input model {hit} (or inside it); refusing to overwrite the input, "
                          "write to another directory")
    if p.is_symlink():
        raise OutputError(f"--out {path} is a symlink; give a real directory path")
    if p.exists() and not p.is_dir():
        raise OutputError(f"--out {path} is a file; --out must be a directory")
    _check_parent(p, path)
    if p.is_dir() and any(p.iterdir()):
        if not is_folded_model_dir(p):
            raise OutputError(f"--out {path} exists and holds other files (not a foldviz model); "
                              "choose a new or empty directory")
        if not force:
            raise OutputError(f"--out {path} already holds a folded model; pass --force to replace it")
    return p


@contextlib.contextmanager
def atomic_dir(path):
    """Build a directory atomically: yields a temporary sibling directory to fill; on success it becomes ``path``.

    * ``path`` missing or empty: the sibling is renamed onto it.
    * ``path`` exists (already validated by :func:`check_output_dir`): the old directory is first renamed to a
      backup sibling, the new one renamed into place, then the backup deleted -- at every instant one complete
      model exists under ``path`` or the backup name (a crash between the two renames leaves the old model at
      ``.NAME.old-*``, never a mix of files).
    * On any exception (KeyboardInterrupt included) the temporary sibling is removed and ``path`` is untouched.
    """
    path = Path(path).expanduser()
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = parent / f".{path.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.iterdir():  # make the contents durable before they become visible
            if f.is_file():
                os.chmod(f, 0o644)   # writers that go through temp files leave 0600 behind
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if path.is_dir() and any(path.iterdir()):
            old = parent / f".{path.name}.old-{tag}"
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            if path.is_dir():
                path.rmdir()
            os.rename(tmp, path)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
