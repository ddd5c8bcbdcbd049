"""Model specs and loading: a spec string (plus options) becomes a :class:`~foldviz.zoo.LoadedModel`.

A *model spec* names what to load:

``demo:NAME``
    one of the bundled demo models in ``assets/models/`` (``NAME.safetensors`` + ``NAME.json`` card), trained on
    scikit-learn's 8×8 handwritten digits by :mod:`foldviz.train`.  A bare ``NAME`` is accepted too.
``torchvision:ARCH``
    any torchvision classification architecture (``torchvision.models.get_model``), random init unless
    ``weights=FILE`` or ``pretrained=True``.
a directory path
    a folded model saved by foldviz, loaded by :func:`foldviz.persist.load_folded`.

Architectures live in :mod:`foldviz.zoo` (re-exported here). Every user-facing failure raises
:class:`ModelLoadError` (a ``ValueError``).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from . import persist
from .utils import ASSETS_DIR, MODELS_DIR
from .checkpoints import (
    MAX_CHECKPOINT_BYTES,
    ModelLoadError,
    apply_state_dict,
    load_state_dict_file,
)
from .zoo import (  # noqa: F401  (re-exported: the architectures used to live here)
    CIFAR10_NORMALIZATION,
    DEMO_ARCHS,
    IMAGENET_NORMALIZATION,
    BasicBlock,
    DigitsMLP,
    DigitsResNet,
    DigitsVGG,
    LoadedModel,
    build_torchvision,
    build_architecture,
    torchvision_card,
)

__all__ = ["ModelLoadError", "LoadedModel", "ASSETS_DIR", "MODELS_DIR", "RANDOM_INIT_NOTE", "list_demos",
           "demo_card", "load_model"]


RANDOM_INIT_NOTE = (
    "Random initialisation: no weights were loaded — an untrained network shows little redundancy."
)


# ----------------------------------------------------------------------------------------------------------------
# Demos
# ----------------------------------------------------------------------------------------------------------------
def list_demos(models_dir: str | os.PathLike | None = None) -> list[str]:
    """Names of the bundled demo models (one per ``assets/models/*.json`` card with its weights file)."""
    d = Path(models_dir) if models_dir is not None else MODELS_DIR
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.json") if p.with_suffix(".safetensors").exists())


_DEMO_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def demo_card(name: str, models_dir: str | os.PathLike | None = None) -> dict:
    """The JSON card of a bundled demo (raises :class:`ModelLoadError` for unknown names)."""
    d = Path(models_dir) if models_dir is not None else MODELS_DIR
    if not _DEMO_NAME.fullmatch(str(name)):  # no path separators, no "..": only files of the bundled set
        available = ", ".join(list_demos(d)) or "none"
        raise ModelLoadError(f"invalid demo name {str(name)[:80]!r}; available demos: {available}")
    path = d / f"{name}.json"
    if not path.exists() or path.is_symlink() or name not in list_demos(d):
        available = ", ".join(list_demos(d)) or "none"
        raise ModelLoadError(f"unknown demo model {name!r}; available demos: {available}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"demo card {path} is not valid JSON: {exc}") from None


# ----------------------------------------------------------------------------------------------------------------
# torchvision
# ----------------------------------------------------------------------------------------------------------------


def _fetch_torchvision_state_dict(weights_enum) -> dict:
    """Download (or read from the torch hub cache) a torchvision weights enum's state dict."""
    return weights_enum.get_state_dict(progress=False, check_hash=True)


def _pretrained_torchvision(arch: str, num_classes: int | None, cifar_stem: bool) -> tuple[nn.Module, str]:
    from torchvision import models as tvm

    if cifar_stem:
        raise ModelLoadError(
            "pretrained=True cannot be combined with cifar_stem: the pretrained ImageNet stem does not fit a "
            "3×3 stride-1 CIFAR stem — pass --weights FILE with CIFAR weights instead"
        )
    try:
        weights_enum = tvm.get_model_weights(arch).DEFAULT
    except Exception:
        raise ModelLoadError(f"torchvision has no pretrained weights for {arch!r}") from None
    n_cat = len(weights_enum.meta.get("categories") or []) or 1000
    if num_classes is not None and int(num_classes) != n_cat:
        raise ModelLoadError(
            f"pretrained weights {weights_enum} have {n_cat} classes, but num_classes={num_classes} was asked for"
        )
    try:
        state = _fetch_torchvision_state_dict(weights_enum)
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(
            f"could not download torchvision weights for {arch} (no internet?) — pass --weights FILE or use "
            f"random initialisation ({reason})"
        ) from None
    model = build_torchvision(arch, n_cat, False)
    apply_state_dict(model, state, label=f"torchvision weights {weights_enum}")
    return model, f"{type(weights_enum).__name__}.{weights_enum.name}"


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------


def _finish(model: nn.Module) -> nn.Module:
    return model.float().cpu().eval()


def _load_demo(name: str, weights, num_classes) -> LoadedModel:
    card = demo_card(name)
    if num_classes is not None and int(num_classes) != int(card["num_classes"]):
        raise ModelLoadError(
            f"demo:{name} has {card['num_classes']} classes; num_classes={num_classes} is not supported for demos"
        )
    model = build_architecture(card)
    if weights is None:
        wpath = MODELS_DIR / f"{name}.safetensors"
        state = load_state_dict_file(wpath)
        apply_state_dict(model, state, label=f"bundled weights {wpath.name}")
    else:
        state = load_state_dict_file(weights, max_bytes=MAX_CHECKPOINT_BYTES)
        apply_state_dict(model, state, label=f"checkpoint {Path(weights).name}")
        card = dict(card, weights=str(weights))
    return LoadedModel(_finish(model), f"demo:{name}", card, tuple(card["input_shape"]))


def _load_torchvision(arch: str, weights, num_classes, cifar_stem: bool, pretrained: bool) -> LoadedModel:
    spec = f"torchvision:{arch}"
    if pretrained and weights is not None:
        raise ModelLoadError("pass either pretrained=True or weights=FILE, not both")
    note = None
    if pretrained:
        model, wname = _pretrained_torchvision(arch, num_classes, cifar_stem)
        n_out = _num_outputs(model)
        card = torchvision_card(arch, num_classes=n_out, cifar_stem=False, weights=wname)
    else:
        state = None
        if weights is not None:
            state = load_state_dict_file(weights, max_bytes=MAX_CHECKPOINT_BYTES)
            if num_classes is None:  # infer the classifier width from the checkpoint when possible
                num_classes = _infer_num_classes(arch, state)
        n = 1000 if num_classes is None else int(num_classes)
        model = build_torchvision(arch, n, cifar_stem)
        if state is not None:
            apply_state_dict(model, state, label=f"checkpoint {Path(weights).name}")
            wname = str(weights)
        else:
            wname = "random-init"
            note = RANDOM_INIT_NOTE
        card = torchvision_card(arch, num_classes=n, cifar_stem=cifar_stem, weights=wname)
    return LoadedModel(_finish(model), spec, card, tuple(card["input_shape"]), note)


def _num_outputs(model: nn.Module) -> int | None:
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m.out_features
    return last


def _infer_num_classes(arch: str, state: dict) -> int | None:
    """Guess the number of classes from the last 2-D weight of a checkpoint whose key matches the model's head."""
    try:
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            ref = build_torchvision(arch, 1000, False).state_dict()
    except Exception:
        return None
    heads = [k for k, v in ref.items() if v.ndim == 2 and v.shape[0] == 1000 and k.endswith("weight")]
    for k in heads:
        if k in state and state[k].ndim == 2:
            return int(state[k].shape[0])
    return None


def is_lm_spec(spec: str) -> bool:
    """Whether ``spec`` names a language model: ``hf:DIR``, a bundled LM demo, or a directory holding one (a
    ``config.json`` or foldviz's per-layer format, and not an image classifier saved by foldviz)."""
    s = str(spec).strip()
    if s.startswith("hf:"):
        return True
    if s.startswith("demo:"):
        return (MODELS_DIR / s[5:] / "card.json").is_file() and _DEMO_NAME.fullmatch(s[5:]) is not None
    if s.startswith(("torchvision:", "timm:", "py:")) or ":" in s.split("/")[0] and not s.startswith("file:"):
        return False
    p = Path(s.removeprefix("file:")).expanduser()
    if not p.is_dir():
        return False
    kind = persist.marker_kind(p)
    return kind == "lm" if kind else (p / "config.json").is_file() or (p / "foldviz_lm.json").is_file()


def load_model(spec: str, *, weights: str | os.PathLike | None = None, num_classes: int | None = None,
               cifar_stem: bool = False, pretrained: bool = False, trust_code: bool = False) -> LoadedModel:
    """Load a model from a spec (see module docstring).

    ``weights``: a ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` state-dict file to load instead of the default
    weights.  ``num_classes``: classifier width for torchvision models (inferred from ``weights`` when omitted,
    else 1000).  ``cifar_stem``: adapt a torchvision model to 32×32 inputs — ResNets get a 3×3 stride-1 stem
    and no max-pool; MobileNetV2's stem conv gets stride 1; VGG is unchanged (its adaptive average pool already
    accepts 32×32 inputs) — and use CIFAR normalisation; other families are rejected.  ``pretrained``: download
    torchvision's default weights (needs internet).  ``timm:NAME`` and ``py:FILE:FACTORY`` specs are loaded by
    :mod:`foldviz.sources`; ``trust_code`` allows running a ``py:`` factory (also when a folded directory was
    built from one).
    """
    if not isinstance(spec, (str, os.PathLike)) or not str(spec).strip():
        raise ModelLoadError("empty model spec; use demo:NAME, torchvision:ARCH, hf:DIR or file:DIR")
    s = str(spec).strip()
    if is_lm_spec(s):
        given = [f for f, v in (("weights", weights), ("num_classes", num_classes), ("cifar_stem", cifar_stem),
                                ("pretrained", pretrained)) if v]
        if given:
            raise ModelLoadError(f"{s} is a language model: {', '.join(given)} do(es) not apply to it")
        from .lm.io import load_lm

        return load_lm(s)
    if s.startswith("file:"):
        path = Path(s[5:].strip()).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"{s}: no such directory (file:DIR names a model saved by foldviz fold --out)")
        if weights is not None or num_classes is not None or cifar_stem or pretrained:
            raise ModelLoadError(f"{s} is a folded model with its own weights; --weights, --num-classes, "
                                 "--cifar-stem and --pretrained do not apply to it")
        loaded = persist.load_folded(path, trust_code=trust_code)
        loaded.spec = s   # the spec as the user wrote it: plans and reports name it
        return loaded
    if s.startswith("demo:"):
        if cifar_stem or pretrained:
            raise ModelLoadError("cifar_stem and pretrained only apply to torchvision:ARCH models")
        return _load_demo(s.split(":", 1)[1], weights, num_classes)
    if s.startswith(("timm:", "py:")):  # optional sources: timm models, the user's own factory (trusted only)
        from .sources import load_source

        return load_source(s, weights=weights, num_classes=num_classes, cifar_stem=cifar_stem,
                           pretrained=pretrained, trust_code=trust_code)
    if s.startswith("torchvision:"):
        arch = s.split(":", 1)[1].strip()
        if not arch:
            raise ModelLoadError("torchvision spec needs an architecture, e.g. torchvision:resnet18")
        return _load_torchvision(arch, weights, num_classes, cifar_stem, pretrained)
    path = Path(s).expanduser()
    if path.is_dir():
        if weights is not None or num_classes is not None or cifar_stem or pretrained:
            raise ModelLoadError(f"{s} is a folded model with its own weights; --weights, --num-classes, "
                                 "--cifar-stem and --pretrained do not apply to it")
        return persist.load_folded(path, trust_code=trust_code)
    if path.exists():
        raise ModelLoadError(
            f"{s} is a file; a model spec is demo:NAME, torchvision:ARCH or a folded-model directory "
            "(pass checkpoint files as weights=...)"
        )
    if ":" not in s and s in list_demos():
        return load_model(f"demo:{s}", weights=weights, num_classes=num_classes)
    demos = ", ".join(f"demo:{d}" for d in list_demos()) or "none bundled"
    raise ModelLoadError(
        f"cannot understand model spec {s!r}: use demo:NAME ({demos}), torchvision:ARCH (e.g. torchvision:resnet18), "
        "timm:NAME, py:FILE:FACTORY or the directory of a folded model"
    )
