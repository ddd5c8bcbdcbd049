"""Saving and loading folded models without pickle, validated and atomic (issue #13).

A folded model directory holds ``model.safetensors`` (weights), ``plan.json`` (the plan used) and
``foldviz-model.json``: the base model's card plus the constructor arguments of every conv/linear/BatchNorm layer.

Writing goes to a temporary sibling directory that is renamed into place (see :func:`foldviz.utils.atomic_dir`),
so a crash never leaves new weights beside old metadata.

Loading is validated before anything is allocated: size limits, JSON nesting depth, a JSON schema for the metadata,
an allow-list of layer types and constructor arguments, and the shapes/dtypes/offsets of the safetensors *header*
(read on its own) against the architecture built on the ``meta`` device.  Only then are the weights read (their
size is bounded by the file) and assigned; they must be finite floating-point tensors.  Symlinks are refused.
Every failure is a :class:`ModelLoadError` naming the file and the problem.
"""
from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import jsonschema
import torch
from torch import nn

from .groups import _BN, _CONV
from .checkpoints import ModelLoadError
from .zoo import LoadedModel, build_architecture
from .utils import all_finite, atomic_dir, check_output_dir, dumps_json, state_dict_hash

FORMAT = "foldviz-folded-model"
FORMAT_VERSION = 1
META_FILE = "foldviz-model.json"
WEIGHTS_FILE = "model.safetensors"
PLAN_FILE = "plan.json"

#: Largest metadata file read (bytes), like plans.
MAX_META_BYTES = 5 * 1024 * 1024
#: Deepest JSON nesting accepted in the metadata (the real files nest 5 levels).
MAX_JSON_DEPTH = 32
#: Largest safetensors header (bytes).
MAX_HEADER_BYTES = 64 * 1024 * 1024
#: Largest weights file (bytes).
MAX_WEIGHTS_BYTES = 8 * 1024 ** 3


def _layer_args(m: nn.Module) -> dict:
    if isinstance(m, nn.Linear):
        return {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}
    if isinstance(m, _CONV):
        return {"in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": list(m.kernel_size),
                "stride": list(m.stride), "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
                "dilation": list(m.dilation), "groups": m.groups, "bias": m.bias is not None,
                "padding_mode": m.padding_mode}
    return {"num_features": m.num_features, "eps": m.eps, "momentum": m.momentum, "affine": m.affine,
            "track_running_stats": m.track_running_stats}


def _base_type(m: nn.Module) -> type | None:
    """The allow-listed layer type ``m`` is (or subclasses, e.g. timm's BatchNormAct2d), or None."""
    return next((t for t in type(m).__mro__ if t in _TYPES.values()), None)


def _layers(model: nn.Module) -> dict:
    return {n: {"type": _base_type(m).__name__, "args": _layer_args(m)} for n, m in model.named_modules()
            if _base_type(m) is not None}


def save_folded(result, loaded: LoadedModel, out_dir, *, report: dict | None = None, force: bool = False) -> Path:
    """Write a folded model (a FoldResult from ``fold``/``prune``) to ``out_dir``, atomically.

    ``out_dir`` must be new, empty, or (with ``force``) an existing folded model, which is then replaced by
    renames so that one complete model exists at every instant.  The input model's own directory is refused.
    """
    protected = [loaded.spec] if Path(str(loaded.spec)).is_dir() else []
    out = check_output_dir(out_dir, force, protected=protected)
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in result.model.state_dict().items()}
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION, "base_spec": loaded.spec, "base_card": loaded.card,
        "input_shape": list(loaded.input_shape), "method": result.method, "label": result.label,
        "layers": _layers(result.model), "weights_sha256": state_dict_hash(state),
        "groups": [{k: v for k, v in g.items() if k in ("id", "channels_before", "channels_after", "ratio")}
                   for g in result.groups],
    }
    with atomic_dir(out) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE))
        (tmp / META_FILE).write_text(dumps_json(meta))
        (tmp / PLAN_FILE).write_text(result.plan.to_json())
        if report is not None:
            (tmp / "report.json").write_text(dumps_json(report))
    return out


# ----------------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------------
_TYPES = {c.__name__: c for c in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d) + _BN}
_MAX_DIM = 1 << 20  # no single layer size above a million channels
_POS = {"type": "integer", "minimum": 1, "maximum": _MAX_DIM}
_NONNEG = {"type": "integer", "minimum": 0, "maximum": _MAX_DIM}


def _tuple(item, n):
    return {"anyOf": [item, {"type": "array", "items": item, "minItems": n, "maxItems": n}]}


def _conv_schema(n: int) -> dict:
    return {"type": "object", "additionalProperties": False,
            "required": ["in_channels", "out_channels", "kernel_size"],
            "properties": {"in_channels": _POS, "out_channels": _POS, "kernel_size": _tuple(_POS, n),
                           "stride": _tuple(_POS, n),
                           "padding": {"anyOf": [_tuple(_NONNEG, n), {"enum": ["same", "valid"]}]},
                           "dilation": _tuple(_POS, n), "groups": _POS, "bias": {"type": "boolean"},
                           "padding_mode": {"enum": ["zeros", "reflect", "replicate", "circular"]}}}


_BN_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["num_features"],
              "properties": {"num_features": _POS, "eps": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                             "momentum": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                             "affine": {"type": "boolean"}, "track_running_stats": {"type": "boolean"}}}
ARG_SCHEMAS = {
    "Linear": {"type": "object", "additionalProperties": False, "required": ["in_features", "out_features"],
               "properties": {"in_features": _POS, "out_features": _POS, "bias": {"type": "boolean"}}},
    "Conv1d": _conv_schema(1), "Conv2d": _conv_schema(2), "Conv3d": _conv_schema(3),
    **{c.__name__: _BN_SCHEMA for c in _BN},
}

META_SCHEMA = {
    "type": "object",
    "required": ["format", "version", "base_spec", "base_card", "input_shape", "layers"],
    "properties": {
        "format": {"const": FORMAT},
        "version": {"const": FORMAT_VERSION},
        "base_spec": {"type": "string", "maxLength": 4096},
        "base_card": {"type": "object", "required": ["arch"],
                      "properties": {"arch": {"type": "string", "maxLength": 256},
                                     "kwargs": {"type": "object"},
                                     "num_classes": {"type": ["integer", "null"], "minimum": 1, "maximum": _MAX_DIM}}},
        "input_shape": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 8192},
                        "minItems": 1, "maxItems": 4},
        "method": {"type": "string"},
        "label": {"type": ["string", "null"]},
        "layers": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["type", "args"], "additionalProperties": False,
            "properties": {"type": {"enum": sorted(_TYPES)}, "args": {"type": "object"}}}},
        "weights_sha256": {"type": ["string", "null"]},
        "groups": {"type": ["array", "null"], "items": {"type": "object"}},
    },
}

_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)


def _json_depth(raw: bytes) -> int:
    """Deepest nesting of ``[``/``{`` outside strings, without recursion."""
    import numpy as np

    b = np.frombuffer(_STRINGS.sub(b'""', raw), dtype=np.uint8)
    step = (np.isin(b, (ord("["), ord("{"))).astype(np.int64) - np.isin(b, (ord("]"), ord("}"))).astype(np.int64))
    return int(step.cumsum().max()) if len(step) else 0


def _where(err) -> str:
    return ".".join(str(p) for p in err.absolute_path) or "(top level)"


def _schema_check(data, schema: dict, what: str) -> None:
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        raise ModelLoadError(f"{what}: invalid field {_where(errors[0])}: {errors[0].message[:300]}")


def _no_symlink(p: Path) -> None:
    if p.is_symlink():
        raise ModelLoadError(f"{p} is a symlink; folded-model files must be regular files")


def _checked_size(p: Path, limit: int, missing: str) -> int:
    """Size of regular file ``p`` (not a symlink), checked against ``limit`` before anything is read."""
    _no_symlink(p)
    if not p.is_file():
        raise ModelLoadError(missing)
    size = p.stat().st_size
    if size > limit:
        raise ModelLoadError(f"{p} is {size} bytes, larger than the limit of {limit}; refusing to read it")
    return size


def read_meta(path) -> dict:
    """Read and validate ``foldviz-model.json`` of a folded-model directory (size, depth, schema, layer args)."""
    path = Path(path)
    meta_path = path / META_FILE
    _checked_size(meta_path, MAX_META_BYTES, f"{path} is not a folded-model directory: {META_FILE} is missing")
    raw = meta_path.read_bytes()[: MAX_META_BYTES + 1]
    depth = _json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise ModelLoadError(f"{meta_path} nests {depth} levels deep (limit {MAX_JSON_DEPTH}); not a foldviz file")
    try:
        meta = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelLoadError(f"{meta_path} is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(meta, dict):
        raise ModelLoadError(f"{meta_path}: expected a JSON object, found {type(meta).__name__}")
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ModelLoadError(f"{meta_path}: unsupported format {str(meta.get('format'))[:60]!r} "
                             f"v{str(meta.get('version'))[:20]!r}")
    _schema_check(meta, META_SCHEMA, str(meta_path))
    if math.prod(meta["input_shape"]) > 3 * 4096 * 4096:
        raise ModelLoadError(f"{meta_path}: input_shape {meta['input_shape']} is implausibly large")
    for name, layer in meta["layers"].items():
        _schema_check(layer["args"], ARG_SCHEMAS[layer["type"]], f"{meta_path}: layer {name} ({layer['type']}) args")
        a = layer["args"]
        if "groups" in a and (a["in_channels"] % a["groups"] or a["out_channels"] % a["groups"]):
            raise ModelLoadError(f"{meta_path}: layer {name}: groups={a['groups']} does not divide "
                                 f"in_channels={a['in_channels']} and out_channels={a['out_channels']}")
    return meta


def _no_constant(tok):
    raise ValueError(f"non-finite number {tok} is not JSON")


_ST_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
              "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8, "C64": 8}
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


def read_safetensors_header(path) -> dict[str, dict]:
    """Read and validate only the header of a safetensors file: ``{name: {"dtype", "shape", "data_offsets"}}``.

    Checks the 8-byte little-endian header length, the JSON, dtypes, shapes and that every tensor's byte range
    lies inside the file and matches its shape; raises :class:`ModelLoadError` otherwise.
    """
    path = Path(path)
    size = _checked_size(path, MAX_WEIGHTS_BYTES, f"{path.parent}: {path.name} is missing")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelLoadError(f"{path} is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise ModelLoadError(f"{path} is not a valid safetensors file (header length {n} for a {size}-byte file)")
        raw = f.read(n)
    if _json_depth(raw) > 4:
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


def _resize_like(old: nn.Module, new: nn.Module, args: dict) -> None:
    """Give ``old`` (a subclass of ``new``'s type, e.g. a BatchNorm fused with its activation) ``new``'s sizes:
    its constructor attributes, parameters and buffers; whatever else the subclass holds is kept."""
    for key in args:
        setattr(old, key, getattr(new, key))
    for key in ("weight", "bias", "running_mean", "running_var"):
        if hasattr(old, key) or hasattr(new, key):
            setattr(old, key, getattr(new, key, None))


def _build_meta_model(meta: dict, meta_path: Path, trust_code: bool = False) -> nn.Module:
    """The architecture with the recorded layers swapped in, on the meta device (no memory, no init cost)."""
    try:
        with torch.device("meta"):
            model = build_architecture(meta["base_card"], trust_code=trust_code)
            for name, layer in meta["layers"].items():
                parent_name, _, attr = name.rpartition(".")
                try:
                    parent = model.get_submodule(parent_name) if parent_name else model
                    old = getattr(parent, attr, None)
                    if not isinstance(old, nn.Module):
                        raise AttributeError(f"the base architecture has no layer {name!r}")
                    new = _TYPES[layer["type"]](**layer["args"])
                    if type(old) is not type(new) and isinstance(old, type(new)):
                        _resize_like(old, new, layer["args"])
                    else:
                        setattr(parent, attr, new)
                except (AttributeError, TypeError, ValueError, RuntimeError) as exc:
                    raise ModelLoadError(f"{meta_path}: cannot rebuild layer {name}: {str(exc)[:200]}") from None
    except ModelLoadError:
        raise
    except Exception as exc:  # a card that the constructors reject in some other way
        raise ModelLoadError(f"{meta_path}: cannot build {str(meta['base_card'].get('arch'))[:80]}: "
                             f"{str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}") from None
    return model


def _check_against_header(model: nn.Module, header: dict, weights: Path) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in header]
    unexpected = [k for k in header if k not in own]
    if missing or unexpected:
        raise ModelLoadError(f"{weights}: weights do not match the recorded layers "
                             f"(missing: {missing[:3]}, unexpected: {unexpected[:3]})")
    bad = [f"{k}: file {list(header[k]['shape'])} vs layers {list(own[k].shape)}" for k in own
           if tuple(own[k].shape) != header[k]["shape"]]
    if bad:
        raise ModelLoadError(f"{weights}: layer sizes do not match the weights ({len(bad)} tensor(s)): "
                             + "; ".join(bad[:3]))
    wrong = [f"{k} ({header[k]['dtype']})" for k in own
             if own[k].is_floating_point() and header[k]["dtype"] not in _FLOAT_DTYPES
             or not own[k].is_floating_point() and header[k]["dtype"] not in ("I64", "I32")]
    if wrong:
        raise ModelLoadError(f"{weights}: tensors of the wrong dtype (need fp16/bf16/fp32/fp64 weights): "
                             + ", ".join(wrong[:5]))


def load_folded(path, *, trust_code: bool = False) -> LoadedModel:
    """Load a directory written by :func:`save_folded` (no code is unpickled; validated before allocating).
    ``trust_code`` allows rebuilding an architecture made by the user's own code (``py:`` models)."""
    path = Path(path)
    if path.is_symlink():
        raise ModelLoadError(f"{path} is a symlink; give the folded-model directory itself")
    if not path.is_dir():
        raise ModelLoadError(f"{path} is not a directory")
    meta_path = path / META_FILE
    meta = read_meta(path)
    weights = path / WEIGHTS_FILE
    header = read_safetensors_header(weights)
    model = _build_meta_model(meta, meta_path, trust_code)
    _check_against_header(model, header, weights)
    from safetensors import safe_open

    state = {}
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            for k in header:
                state[k] = f.get_tensor(k)
    except Exception as exc:
        raise ModelLoadError(f"could not read {weights}: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not all_finite(v)]
    if bad:
        raise ModelLoadError(f"{weights}: {len(bad)} tensor(s) hold NaN or Inf values: {', '.join(bad[:5])}")
    try:
        model.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in state.items()},
                              strict=True, assign=True)
    except (RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"{weights}: weights do not fit the layers: {str(exc).splitlines()[0][:200]}") from None
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ModelLoadError(f"{weights}: tensors not stored in the file: {', '.join(left[:5])}")
    card = dict(meta["base_card"], folded_from=meta["base_spec"], folded_label=meta.get("label"),
                groups=meta.get("groups"))
    note = f"Folded model ({meta.get('label') or meta.get('method')}) from {meta['base_spec']}."
    return LoadedModel(model.float().cpu().eval(), str(path), card, tuple(meta["input_shape"]), note)
