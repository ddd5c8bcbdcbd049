"""Saving and loading folded models without pickle, validated and atomic.

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
from pathlib import Path

import jsonschema
import torch
from torch import nn

from .groups import BN_TYPES, CONV_TYPES
from .checkpoints import FLOAT_DTYPE_NAMES, ModelLoadError, json_depth, read_safetensors_header
from .sources import build_any
from .zoo import LoadedModel
from .utils import MODELS_DIR, OutputError, all_finite, atomic_dir, check_output_dir, dumps_json, state_dict_hash

FORMAT = "foldviz-folded-model"
FORMAT_VERSION = 1
META_FILE = "foldviz-model.json"
WEIGHTS_FILE = "model.safetensors"
PLAN_FILE = "plan.json"

#: Largest metadata file read (bytes), like plans.
MAX_META_BYTES = 5 * 1024 * 1024
#: Deepest JSON nesting accepted in the metadata (the real files nest 5 levels).
MAX_JSON_DEPTH = 32
#: Largest weights file (bytes).
MAX_WEIGHTS_BYTES = 8 * 1024 ** 3


def _layer_args(m: nn.Module) -> dict:
    if isinstance(m, nn.Linear):
        return {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}
    if isinstance(m, CONV_TYPES):
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


def marker_kind(path) -> str | None:
    """The model kind ("cnn", "lm") recorded in the foldviz-model.json of a directory foldviz wrote; None when the
    directory holds no such file (or an unreadable one)."""
    m = Path(path) / META_FILE
    try:
        if m.is_symlink() or not m.is_file() or m.stat().st_size > MAX_META_BYTES:
            return None
        meta = json.loads(m.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return None
    kind = meta.get("kind", "cnn")
    return kind if kind in ("cnn", "lm") else None


def _protected(loaded) -> list[Path]:
    """Directories a fold of ``loaded`` must never write into: the one it was loaded from, and the bundled models."""
    spec = str(loaded.spec)
    out = [MODELS_DIR]
    for prefix in ("file:", "hf:", ""):
        if spec.startswith(prefix) and Path(spec[len(prefix):]).expanduser().is_dir():
            out.append(Path(spec[len(prefix):]).expanduser())
            break
    return out


def save_folded(result, loaded: LoadedModel, out_dir, *, report: dict | None = None, force: bool = False,
                fmt: str | None = None) -> Path:
    """Write a fold (a FoldResult of any kind) with its plan and report to ``out_dir``, atomically.

    ``out_dir`` must be new, empty, or (with ``force``) a directory foldviz wrote before, which is then replaced by
    renames so that one complete model exists at every instant; the input model's own directory and the bundled
    models are refused, even with ``force``. An image classifier is written in the foldviz format
    (``model.safetensors`` + ``foldviz-model.json``); a language model as a transformers directory (``fmt="hf"``,
    the default) or in foldviz's per-layer format (``fmt="foldviz-lm"``).
    """
    out = check_output_dir(out_dir, force, protected=_protected(loaded))
    kind = getattr(result, "kind", "cnn")
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "kind": kind, "base_spec": loaded.spec,
            "method": result.method, "label": result.label,
            "groups": [{k: v for k, v in g.items() if k in ("id", "unit", "channels_before", "channels_after", "ratio")}
                       for g in result.groups]}
    with atomic_dir(out) as tmp:
        if kind == "lm":
            from .lm.io import write_lm

            meta["lm_format"] = write_lm(tmp, result.model, tokenizer=getattr(loaded, "tokenizer", None),
                                         fmt=fmt or "hf", card=loaded.card)
            meta["weights_sha256"] = state_dict_hash(result.model)
        else:
            if fmt not in (None, "foldviz"):
                raise OutputError(f"image classifiers are saved in the foldviz format, not {fmt!r}")
            from safetensors.torch import save_file

            state = {k: v.detach().contiguous().cpu() for k, v in result.model.state_dict().items()}
            meta.update({"base_card": loaded.card, "input_shape": list(loaded.input_shape),
                         "layers": _layers(result.model), "weights_sha256": state_dict_hash(state)})
            save_file(state, str(tmp / WEIGHTS_FILE))
        (tmp / META_FILE).write_text(dumps_json(meta))
        (tmp / PLAN_FILE).write_text(result.plan.to_json())
        if report is not None:
            (tmp / "report.json").write_text(dumps_json(report))
    return out


def folded_zip(result, loaded, report: dict | None = None, extra: dict[str, bytes] | None = None, *,
               fmt: str | None = None) -> bytes:
    """The folded model directory :func:`save_folded` writes, as a zip (folder ``folded/``), plus ``extra`` files
    (name -> bytes) beside it: what the app offers for download."""
    import io
    import tempfile
    import zipfile

    buf = io.BytesIO()
    with tempfile.TemporaryDirectory() as tmp:
        out = save_folded(result, loaded, Path(tmp) / "folded", report=report, fmt=fmt)
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for p in sorted(out.rglob("*")):
                if p.is_file():
                    z.write(p, p.relative_to(out.parent))
            for name, data in (extra or {}).items():
                z.writestr(f"folded/{name}", data)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------------
_TYPES = {c.__name__: c for c in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d) + BN_TYPES}
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
    **{c.__name__: _BN_SCHEMA for c in BN_TYPES},
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
    depth = json_depth(raw)
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
    if meta.get("kind", "cnn") != "cnn":
        raise ModelLoadError(f"{path} holds a {meta.get('kind')!r} model, not an image classifier; load it with "
                             "foldviz.models.load_model")
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
            model = build_any(meta["base_card"], trust_code=trust_code)
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
             if own[k].is_floating_point() and header[k]["dtype"] not in FLOAT_DTYPE_NAMES
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
    header = read_safetensors_header(weights, MAX_WEIGHTS_BYTES)
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
