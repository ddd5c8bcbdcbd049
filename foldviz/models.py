"""Model architectures, model specs and loading.

A *model spec* names what to load:

``demo:NAME``
    one of the bundled demo models in ``assets/models/`` (``NAME.safetensors`` + ``NAME.json`` card), trained on
    scikit-learn's 8×8 handwritten digits by :mod:`foldviz.train`.  A bare ``NAME`` is accepted too.
``torchvision:ARCH``
    any torchvision classification architecture (``torchvision.models.get_model``), random init unless
    ``weights=FILE`` or ``pretrained=True``.
a directory path
    a folded model saved by foldviz, loaded by ``foldviz.io.load_folded``.

Every user-facing failure raises :class:`ModelLoadError` (a ``ValueError``).
"""
from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoints import (
    MAX_CHECKPOINT_BYTES,
    ModelLoadError,
    apply_state_dict,
    load_state_dict_file,
)

__all__ = [
    "ModelLoadError",
    "LoadedModel",
    "BasicBlock",
    "DigitsResNet",
    "DigitsVGG",
    "DigitsMLP",
    "DEMO_ARCHS",
    "ASSETS_DIR",
    "MODELS_DIR",
    "IMAGENET_NORMALIZATION",
    "CIFAR10_NORMALIZATION",
    "RANDOM_INIT_NOTE",
    "list_demos",
    "demo_card",
    "load_model",
    "build_architecture",
    "torchvision_card",
    "count_params",
]

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
MODELS_DIR = ASSETS_DIR / "models"

IMAGENET_NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
CIFAR10_NORMALIZATION = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]}

RANDOM_INIT_NOTE = (
    "Random initialisation: no weights were loaded — an untrained network shows little redundancy."
)


# ----------------------------------------------------------------------------------------------------------------
# Demo architectures (plain modules, torchvision-like names, traceable by torch-pruning)
# ----------------------------------------------------------------------------------------------------------------
def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, ReLU after the add (torchvision names)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class DigitsResNet(nn.Module):
    """CIFAR-style ResNet for small images: 3×3 stride-1 stem, no max-pool, BasicBlock stages."""

    def __init__(self, widths=(32, 64, 128), blocks=(2, 2, 2), num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        widths, blocks = tuple(int(w) for w in widths), tuple(int(b) for b in blocks)
        if len(widths) != len(blocks) or not widths:
            raise ValueError("widths and blocks must be non-empty and of equal length")
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_planes = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            layers = []
            for j in range(n):
                layers.append(BasicBlock(in_planes, w, stride if j == 0 else 1))
                in_planes = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


class DigitsVGG(nn.Module):
    """VGG-style net like torchvision's ``vgg*_bn``: ``features`` then a flatten that keeps the spatial extent
    (channel-major columns) and ``classifier`` = Linear-ReLU-Dropout-Linear."""

    def __init__(self, cfg=(32, 32, "M", 64, 64, "M", 128, 128), hidden: int = 256, num_classes: int = 10,
                 in_channels: int = 1, input_size: int = 8, dropout: float = 0.3):
        super().__init__()
        layers: list[nn.Module] = []
        c, size = in_channels, int(input_size)
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                size //= 2
            else:
                layers += [nn.Conv2d(c, int(v), kernel_size=3, padding=1), nn.BatchNorm2d(int(v)),
                           nn.ReLU(inplace=True)]
                c = int(v)
        if size < 1:
            raise ValueError(f"too many max-pools for input size {input_size}")
        self.features = nn.Sequential(*layers)
        self.flat_features = c * size * size
        self.classifier = nn.Sequential(
            nn.Linear(self.flat_features, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


class DigitsMLP(nn.Sequential):
    """Flatten, then (Linear, BatchNorm1d, ReLU) per hidden layer, then a final Linear.

    Module names: ``flatten``, ``fc1``, ``bn1``, ``relu1``, ..., ``fcN`` (the classifier).
    """

    def __init__(self, hidden=(512, 256, 128), num_classes: int = 10, in_features: int = 64):
        mods: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
        prev = int(in_features)
        for i, h in enumerate(hidden, start=1):
            mods += [(f"fc{i}", nn.Linear(prev, int(h))), (f"bn{i}", nn.BatchNorm1d(int(h))),
                     (f"relu{i}", nn.ReLU(inplace=True))]
            prev = int(h)
        mods.append((f"fc{len(hidden) + 1}", nn.Linear(prev, num_classes)))
        super().__init__(OrderedDict(mods))


DEMO_ARCHS: dict[str, type[nn.Module]] = {
    "DigitsResNet": DigitsResNet,
    "DigitsVGG": DigitsVGG,
    "DigitsMLP": DigitsMLP,
}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------------
# LoadedModel
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A ready-to-use model: ``model`` is in eval mode, float32, on CPU."""

    model: nn.Module
    spec: str
    card: dict
    input_shape: tuple
    note: str | None = None

    def example_input(self, batch: int = 1, seed: int = 0) -> torch.Tensor:
        """A reproducible standard-normal batch shaped ``(batch, *input_shape)``."""
        g = torch.Generator().manual_seed(int(seed))
        return torch.randn((int(batch), *self.input_shape), generator=g)

    @property
    def num_classes(self) -> int | None:
        return self.card.get("num_classes")

    @property
    def normalization(self) -> dict | None:
        return self.card.get("normalization")


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
def _torchvision_arch_names() -> list[str]:
    from torchvision import models as tvm

    return sorted(tvm.list_models(module=tvm))


def _apply_cifar_stem(model: nn.Module, arch: str) -> nn.Module:
    """Adapt a torchvision model to 32×32 inputs (see :func:`load_model` for what changes per family)."""
    from torchvision.models import VGG, MobileNetV2, ResNet

    if isinstance(model, ResNet):
        out = model.conv1.out_channels
        model.conv1 = nn.Conv2d(3, out, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    elif isinstance(model, MobileNetV2):
        stem_conv = model.features[0][0]
        stem_conv.stride = (1, 1)
    elif isinstance(model, VGG):
        pass  # architecture unchanged: only the input size (32×32) and normalisation (CIFAR) change
    else:
        raise ModelLoadError(
            f"cifar_stem is supported for ResNet-family, VGG and MobileNetV2 architectures, not {arch!r}"
        )
    return model


def torchvision_card(arch: str, *, num_classes: int | None = None, cifar_stem: bool = False,
                     weights: str = "random-init") -> dict:
    """The card foldviz builds for ``torchvision:ARCH`` models."""
    n = 1000 if num_classes is None else int(num_classes)
    return {
        "name": f"torchvision:{arch}",
        "arch": f"torchvision:{arch}",
        "kwargs": {"num_classes": n, "cifar_stem": bool(cifar_stem)},
        "input_shape": [3, 32, 32] if cifar_stem else [3, 224, 224],
        "num_classes": n,
        "normalization": dict(CIFAR10_NORMALIZATION if cifar_stem else IMAGENET_NORMALIZATION),
        "weights": weights,
    }


def _build_torchvision(arch: str, num_classes: int = 1000, cifar_stem: bool = False) -> nn.Module:
    from torchvision import models as tvm

    names = _torchvision_arch_names()
    if arch not in names:
        close = [n for n in names if arch.lower().replace("-", "_") in n][:8]
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ModelLoadError(f"unknown torchvision classification architecture {arch!r}.{hint}")
    try:
        model = tvm.get_model(arch, weights=None, num_classes=int(num_classes))
    except Exception as exc:
        raise ModelLoadError(f"could not build torchvision:{arch}: {str(exc).splitlines()[0]}") from None
    if cifar_stem:
        model = _apply_cifar_stem(model, arch)
    return model


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
    model = _build_torchvision(arch, n_cat, False)
    apply_state_dict(model, state, label=f"torchvision weights {weights_enum}")
    return model, f"{type(weights_enum).__name__}.{weights_enum.name}"


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------
def build_architecture(card: dict) -> nn.Module:
    """A randomly initialised module for a card's ``arch`` + ``kwargs``.

    ``arch`` is a demo class name (``DigitsResNet``, ``DigitsVGG``, ``DigitsMLP``) or ``torchvision:ARCH`` with
    kwargs ``num_classes`` and ``cifar_stem``.
    """
    arch = card.get("arch")
    kwargs = dict(card.get("kwargs") or {})
    if not arch:
        raise ModelLoadError("model card has no 'arch'")
    if str(arch).startswith("torchvision:"):
        name = str(arch).split(":", 1)[1]
        return _build_torchvision(name, int(kwargs.get("num_classes", card.get("num_classes") or 1000)),
                                  bool(kwargs.get("cifar_stem", False)))
    cls = DEMO_ARCHS.get(str(arch))
    if cls is None:
        raise ModelLoadError(
            f"unknown architecture {arch!r}; expected one of {', '.join(DEMO_ARCHS)} or torchvision:ARCH"
        )
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ModelLoadError(f"bad kwargs for {arch}: {exc}") from None


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
        model = _build_torchvision(arch, n, cifar_stem)
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
            ref = _build_torchvision(arch, 1000, False).state_dict()
    except Exception:
        return None
    heads = [k for k, v in ref.items() if v.ndim == 2 and v.shape[0] == 1000 and k.endswith("weight")]
    for k in heads:
        if k in state and state[k].ndim == 2:
            return int(state[k].shape[0])
    return None


def load_model(spec: str, *, weights: str | os.PathLike | None = None, num_classes: int | None = None,
               cifar_stem: bool = False, pretrained: bool = False) -> LoadedModel:
    """Load a model from a spec (see module docstring).

    ``weights``: a ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` state-dict file to load instead of the default
    weights.  ``num_classes``: classifier width for torchvision models (inferred from ``weights`` when omitted,
    else 1000).  ``cifar_stem``: adapt a torchvision model to 32×32 inputs — ResNets get a 3×3 stride-1 stem
    and no max-pool; MobileNetV2's stem conv gets stride 1; VGG is unchanged (its adaptive average pool already
    accepts 32×32 inputs) — and use CIFAR normalisation; other families are rejected.  ``pretrained``: download
    torchvision's default weights (needs internet).
    """
    if not isinstance(spec, (str, os.PathLike)) or not str(spec).strip():
        raise ModelLoadError("empty model spec; use demo:NAME, torchvision:ARCH or a folded-model directory")
    s = str(spec).strip()
    if s.startswith("demo:"):
        if cifar_stem or pretrained:
            raise ModelLoadError("cifar_stem and pretrained only apply to torchvision:ARCH models")
        return _load_demo(s.split(":", 1)[1], weights, num_classes)
    if s.startswith("torchvision:"):
        arch = s.split(":", 1)[1].strip()
        if not arch:
            raise ModelLoadError("torchvision spec needs an architecture, e.g. torchvision:resnet18")
        return _load_torchvision(arch, weights, num_classes, cifar_stem, pretrained)
    path = Path(s).expanduser()
    if path.is_dir():
        from . import io as fio  # owned elsewhere; imported lazily

        if weights is not None or num_classes is not None or cifar_stem or pretrained:
            raise ModelLoadError(f"{s} is a folded model with its own weights; --weights, --num-classes, "
                                 "--cifar-stem and --pretrained do not apply to it")

        return fio.load_folded(path)
    if path.exists():
        raise ModelLoadError(
            f"{s} is a file; a model spec is demo:NAME, torchvision:ARCH or a folded-model directory "
            "(pass checkpoint files as weights=...)"
        )
    if ":" not in s and s in list_demos():
        return load_model(f"demo:{s}", weights=weights, num_classes=num_classes)
    demos = ", ".join(f"demo:{d}" for d in list_demos()) or "none bundled"
    raise ModelLoadError(
        f"cannot understand model spec {s!r}: use demo:NAME ({demos}), torchvision:ARCH (e.g. torchvision:resnet18) "
        "or the directory of a folded model"
    )
