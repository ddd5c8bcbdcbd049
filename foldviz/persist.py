"""Saving and loading folded models without pickle.

A folded model directory holds ``model.safetensors`` (weights), ``plan.json`` (the plan used) and
``foldviz-model.json``: the base model's card plus the constructor arguments of every conv/linear/BatchNorm layer.
Loading rebuilds the base architecture, swaps in layers of the recorded shapes and loads the weights strictly.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from .groups import _BN, _CONV
from .checkpoints import ModelLoadError
from .zoo import LoadedModel, build_architecture
from .utils import json_default, state_dict_hash

FORMAT = "foldviz-folded-model"
FORMAT_VERSION = 1
META_FILE = "foldviz-model.json"
WEIGHTS_FILE = "model.safetensors"
PLAN_FILE = "plan.json"


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


def _layers(model: nn.Module) -> dict:
    return {n: {"type": type(m).__name__, "args": _layer_args(m)} for n, m in model.named_modules()
            if type(m) in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d) + _BN}


def save_folded(result, loaded: LoadedModel, out_dir, *, report: dict | None = None) -> Path:
    """Write a folded model (a FoldResult from ``fold``/``prune``) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in result.model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION, "base_spec": loaded.spec, "base_card": loaded.card,
        "input_shape": list(loaded.input_shape), "method": result.method, "label": result.label,
        "layers": _layers(result.model), "weights_sha256": state_dict_hash(state),
        "groups": [{k: v for k, v in g.items() if k in ("id", "channels_before", "channels_after", "ratio")}
                   for g in result.groups],
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2, default=json_default) + "\n")
    result.plan.save(out / PLAN_FILE)
    if report is not None:
        (out / "report.json").write_text(json.dumps(report, indent=2, default=json_default) + "\n")
    return out


_TYPES = {c.__name__: c for c in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d) + _BN}


def load_folded(path) -> LoadedModel:
    """Load a directory written by :func:`save_folded` (no code is unpickled)."""
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise ModelLoadError(f"{path} is not a folded-model directory: {META_FILE} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{meta_path} is not valid JSON: {exc}") from None
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ModelLoadError(f"{meta_path}: unsupported format {meta.get('format')!r} v{meta.get('version')!r}")
    model = build_architecture(meta["base_card"])
    for name, layer in meta["layers"].items():
        cls = _TYPES.get(layer.get("type"))
        if cls is None:
            raise ModelLoadError(f"{meta_path}: layer {name} has unsupported type {layer.get('type')!r}")
        try:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, cls(**layer["args"]))
        except (AttributeError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"{meta_path}: cannot rebuild layer {name}: {exc}") from None
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelLoadError(f"{path}: {WEIGHTS_FILE} is missing")
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelLoadError(f"{weights}: weights do not match the recorded layers "
                             f"(missing: {missing[:3]}, unexpected: {unexpected[:3]})")
    card = dict(meta["base_card"], folded_from=meta["base_spec"], folded_label=meta.get("label"),
                groups=meta.get("groups"))
    note = f"Folded model ({meta.get('label', meta.get('method'))}) from {meta['base_spec']}."
    return LoadedModel(model.float().cpu().eval(), str(path), card, tuple(meta["input_shape"]), note)

