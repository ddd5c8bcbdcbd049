"""Reading checkpoints (state dicts) safely and applying them to a model.

Only *data* formats are accepted:

* ``.safetensors`` files (read with :func:`safetensors.torch.load_file`);
* ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` files holding a state dict, read with
  ``torch.load(..., weights_only=True)``.  Anything that needs code execution to unpickle (a whole pickled
  ``nn.Module``, arbitrary Python objects) is refused with a :class:`ModelLoadError`.

Common wrappers are unwrapped (``{"state_dict": ...}``, ``{"model": ...}``, ``{"model_state_dict": ...}``,
``{"net": ...}``) and the ``module.`` (DataParallel / DDP) and ``_orig_mod.`` (``torch.compile``) prefixes are
stripped.  Every user-facing failure raises :class:`ModelLoadError` with a readable message.
"""
from __future__ import annotations

import io
import json
import math
import os
import struct
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .utils import all_finite

__all__ = [
    "ModelLoadError",
    "MAX_CHECKPOINT_BYTES",
    "MAX_UPLOAD_BYTES",
    "SAFETENSORS_SUFFIXES",
    "TORCH_SUFFIXES",
    "load_state_dict_file",
    "load_state_dict_bytes",
    "normalize_state_dict",
    "apply_state_dict",
    "describe_mismatch",
    "check_values",
    "save_safetensors",
    "read_safetensors_header",
    "json_depth",
    "MAX_HEADER_BYTES",
]

#: Largest checkpoint file read from a path (CLI, library).
MAX_CHECKPOINT_BYTES = 2 * 1024**3
#: Largest checkpoint accepted as an upload (the app's file uploader should use this limit).
MAX_UPLOAD_BYTES = 1024**3

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "state_dict_ema")
_STRIP_PREFIXES = ("module.", "_orig_mod.")


class ModelLoadError(ValueError):
    """A model or checkpoint could not be loaded; the message is meant for the user."""


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _check_size(size: int, limit: int, what: str) -> None:
    if size > limit:
        raise ModelLoadError(
            f"{what} is {_human_bytes(size)}, larger than the limit of {_human_bytes(limit)}; "
            "refusing to load it"
        )


def _kind_from_name(filename: str) -> str:
    name = str(filename).lower()
    if name.endswith(SAFETENSORS_SUFFIXES):
        return "safetensors"
    if name.endswith(TORCH_SUFFIXES):
        return "torch"
    raise ModelLoadError(
        f"unsupported checkpoint file {Path(str(filename)).name!r}: expected one of "
        f"{', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}"
    )


def _unpickle_detail(msg: str) -> str:
    m = re.search(r"GLOBAL ([\w.]+)", msg) or re.search(r"[Uu]nsupported global:? ([\w.]+)", msg)
    if m:
        return f"it references the Python object {m.group(1)}, e.g. a whole pickled model or custom class"
    m = re.search(r"Unsupported operand \d+", msg)
    if m:
        return "it is a pickle, but not one written by torch.save"
    return "it is not a plain weights-only checkpoint"


def _head(source, n: int = 4) -> bytes:
    if isinstance(source, io.BytesIO):
        return source.getvalue()[:n]
    with open(source, "rb") as f:
        return f.read(n)


def _torch_load(source, label: str):
    head = _head(source)
    if not head:
        raise ModelLoadError(f"{label} is empty")
    # torch.save writes a zip archive (PK..) or, with the legacy format, a pickle (protocol 2+: 0x80)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise ModelLoadError(f"{label} is not a PyTorch checkpoint (neither torch.save's zip format nor a pickle)")
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelLoadError(
            f"refused to unpickle {label}: {_unpickle_detail(str(exc))}; loading it would need code execution. "
            "Save a state_dict (torch.save(model.state_dict(), path)) or a safetensors file instead."
        ) from None
    except Exception as exc:  # corrupt zip, truncated file, ...: a plain reason, never the library's internals
        why = ("it is truncated (an interrupted download or copy?)" if isinstance(exc, EOFError) or
               "central directory" in str(exc) or "truncated" in str(exc).lower()
               else "the file is damaged")
        raise ModelLoadError(f"could not read {label} as a PyTorch checkpoint: {why}") from None


def _safetensors_load(path_or_bytes, label: str) -> dict:
    from safetensors.torch import load, load_file

    try:
        if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
            return load(bytes(path_or_bytes))
        return load_file(str(path_or_bytes), device="cpu")
    except Exception as exc:
        msg = str(exc).lower()
        why = ("its header is damaged or the file is truncated" if "header" in msg or "eof" in msg or
               "too small" in msg else "the file is damaged")
        raise ModelLoadError(f"could not read {label} as a safetensors file: {why}") from None


def normalize_state_dict(obj) -> dict[str, torch.Tensor]:
    """Unwrap common checkpoint wrappers and strip ``module.`` / ``_orig_mod.`` prefixes.

    Non-tensor entries (epoch counters, optimizer names, ...) are dropped.  Raises :class:`ModelLoadError` when
    no tensors are left.
    """
    if isinstance(obj, nn.Module):  # only reachable for objects handed in directly, never from torch.load
        obj = obj.state_dict()
    for _ in range(4):  # nested wrappers such as {"model": {"state_dict": ...}}
        if not isinstance(obj, Mapping):
            break
        if any(torch.is_tensor(v) for v in obj.values()):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ModelLoadError(f"checkpoint does not contain a state dict (found {type(obj).__name__})")
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not torch.is_tensor(value):
            continue
        name = str(key)
        changed = True
        while changed:
            changed = False
            for prefix in _STRIP_PREFIXES:
                if name.startswith(prefix):
                    name = name[len(prefix):]
                    changed = True
        out[name] = value
    if not out:
        keys = ", ".join(list(map(str, obj.keys()))[:5])
        raise ModelLoadError(f"checkpoint holds no tensors (top-level keys: {keys or 'none'})")
    return out


def load_state_dict_file(path: str | os.PathLike, *, max_bytes: int = MAX_CHECKPOINT_BYTES) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict (see module docstring)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"checkpoint file not found: {p}")
    if p.is_dir():
        raise ModelLoadError(f"checkpoint path is a directory, expected a file: {p}")
    kind = _kind_from_name(p.name)
    _check_size(p.stat().st_size, max_bytes, f"checkpoint {p.name}")
    if kind == "safetensors":
        raw = _safetensors_load(p, f"{p.name}")
    else:
        raw = _torch_load(str(p), f"{p.name}")
    return normalize_state_dict(raw)


def load_state_dict_bytes(data: bytes, filename: str, *, max_bytes: int = MAX_UPLOAD_BYTES) -> dict[str, torch.Tensor]:
    """Like :func:`load_state_dict_file` for an uploaded file's bytes; ``filename`` picks the format."""
    kind = _kind_from_name(filename)
    _check_size(len(data), max_bytes, f"upload {Path(str(filename)).name}")
    label = Path(str(filename)).name
    if kind == "safetensors":
        raw = _safetensors_load(data, label)
    else:
        raw = _torch_load(io.BytesIO(bytes(data)), label)
    return normalize_state_dict(raw)


def describe_mismatch(model: nn.Module, state: Mapping[str, torch.Tensor], *, limit: int = 5) -> list[str]:
    """Human-readable problems between ``state`` and ``model.state_dict()`` (empty list: compatible).

    Missing ``num_batches_tracked`` buffers are tolerated (many checkpoints omit them).
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    # weight matrices / kernels first: they say more than the BatchNorm vectors next to them
    bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    bad.sort(key=lambda k: own[k].ndim < 2)
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in bad]
    problems = []

    def _fmt(items):
        extra = f" (+{len(items) - limit} more)" if len(items) > limit else ""
        return ", ".join(items[:limit]) + extra

    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {_fmt(shapes)}")
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_fmt(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_fmt(unexpected)}")
    return problems


#: dtypes accepted for tensors that are floating point in the model (weights, BatchNorm statistics).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_values(model: nn.Module, state: Mapping[str, torch.Tensor], *, label: str = "checkpoint",
                 limit: int = 5) -> None:
    """Refuse tensors that would silently give a wrong model (raises :class:`ModelLoadError`).

    * a tensor that is floating point in the model must be fp16/bf16/fp32/fp64 in the checkpoint (int8, bool or
      complex weights would otherwise be cast to float: a quantised or corrupt checkpoint folds to chance);
    * integer buffers (``num_batches_tracked``) must be integers;
    * every floating tensor must be finite (no NaN / Inf); the message names the first few offenders.
    """
    own = model.state_dict()
    wrong, nonfinite = [], []
    for k, v in state.items():
        if k not in own:
            continue
        if own[k].is_floating_point():
            if v.dtype not in FLOAT_DTYPES:
                wrong.append(f"{k} ({str(v.dtype).replace('torch.', '')})")
            elif not all_finite(v):
                nonfinite.append(k)
        elif v.is_floating_point() or v.is_complex() or v.dtype == torch.bool:
            wrong.append(f"{k} ({str(v.dtype).replace('torch.', '')}, expected an integer)")

    def _fmt(items):
        extra = f" (+{len(items) - limit} more)" if len(items) > limit else ""
        return ", ".join(items[:limit]) + extra

    if wrong:
        raise ModelLoadError(f"{label}: {len(wrong)} tensor(s) have a dtype foldviz cannot fold "
                             f"(weights must be float16/bfloat16/float32/float64): {_fmt(wrong)}")
    if nonfinite:
        raise ModelLoadError(f"{label}: {len(nonfinite)} tensor(s) hold NaN or Inf values: {_fmt(nonfinite)}")


def apply_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], *, label: str = "checkpoint") -> nn.Module:
    """Load ``state`` into ``model`` strictly; raise :class:`ModelLoadError` describing any mismatch."""
    problems = describe_mismatch(model, state)
    if problems:
        raise ModelLoadError(f"{label} does not match the model architecture — " + "; ".join(problems))
    check_values(model, state, label=label)
    own = model.state_dict()
    cleaned = {}
    for k, v in state.items():
        if k in own and own[k].is_floating_point() and v.is_floating_point():
            v = v.to(own[k].dtype)
        cleaned[k] = v
    try:
        model.load_state_dict(cleaned, strict=False)
    except Exception as exc:  # pragma: no cover - describe_mismatch should have caught it
        raise ModelLoadError(f"{label} could not be loaded: {str(exc).splitlines()[0]}") from None
    return model


def save_safetensors(model_or_state: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write a state dict as safetensors (tensors made contiguous and moved to CPU)."""
    from safetensors.torch import save_file

    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items() if torch.is_tensor(v)}
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:  # atomic: temp file + fsync + os.replace, so a crash never leaves a truncated checkpoint
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p

# ----------------------------------------------------------------------------------------------------------------
# safetensors headers, read and checked on their own (nothing is allocated for the tensors)
# ----------------------------------------------------------------------------------------------------------------
#: Largest safetensors header (bytes).
MAX_HEADER_BYTES = 64 * 1024 * 1024
#: Largest single safetensors file whose header is read (bytes).
MAX_SAFETENSORS_BYTES = 64 * 1024**3


def _file_size(path: Path, limit: int) -> int:
    if path.is_symlink():
        raise ModelLoadError(f"{path} is a symlink; give the file itself")
    if not path.is_file():
        raise ModelLoadError(f"{path.parent}: {path.name} is missing")
    size = path.stat().st_size
    if size > limit:
        raise ModelLoadError(f"{path} is {size} bytes, larger than the limit of {limit}; refusing to read it")
    return size


_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)



def json_depth(raw: bytes) -> int:
    """Deepest nesting of ``[``/``{`` outside strings, without recursion."""
    import numpy as np

    b = np.frombuffer(_STRINGS.sub(b'""', raw), dtype=np.uint8)
    step = (np.isin(b, (ord("["), ord("{"))).astype(np.int64) - np.isin(b, (ord("]"), ord("}"))).astype(np.int64))
    return int(step.cumsum().max()) if len(step) else 0


_ST_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
              "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8, "C64": 8}
FLOAT_DTYPE_NAMES = {"F16", "BF16", "F32", "F64"}


def read_safetensors_header(path, max_bytes: int = MAX_SAFETENSORS_BYTES) -> dict[str, dict]:
    """Read and validate only the header of a safetensors file: ``{name: {"dtype", "shape", "data_offsets"}}``.

    Checks the 8-byte little-endian header length, the JSON, dtypes, shapes and that every tensor's byte range
    lies inside the file and matches its shape; raises :class:`ModelLoadError` otherwise.
    """
    path = Path(path)
    size = _file_size(path, max_bytes)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelLoadError(f"{path} is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise ModelLoadError(f"{path} is not a valid safetensors file (header length {n} for a {size}-byte file)")
        raw = f.read(n)
    if json_depth(raw) > 4:
        raise ModelLoadError(f"{path}: safetensors header nests too deeply")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelLoadError(f"{path}: safetensors header is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: safetensors header is not a JSON object")
    data_len = size - 8 - n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise ModelLoadError(f"{path}: tensor {name!r}: malformed header entry")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _ST_DTYPES:
            raise ModelLoadError(f"{path}: tensor {name!r} has unknown dtype {str(dtype)[:20]!r}")
        if not (isinstance(shape, list) and len(shape) <= 8
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise ModelLoadError(f"{path}: tensor {name!r} has a malformed shape")
        if not (isinstance(offs, list) and len(offs) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offs) and 0 <= offs[0] <= offs[1] <= data_len):
            raise ModelLoadError(f"{path}: tensor {name!r} has data offsets outside the file (truncated file?)")
        if offs[1] - offs[0] != math.prod(shape) * _ST_DTYPES[dtype]:
            raise ModelLoadError(f"{path}: tensor {name!r}: {offs[1] - offs[0]} bytes do not match shape {shape} {dtype}")
        out[name] = {"dtype": dtype, "shape": tuple(shape), "data_offsets": tuple(offs)}
    return out


