"""Architectures: the bundled demo networks, torchvision builders, and :class:`LoadedModel`.

A *card* (plain JSON) names an architecture (``arch`` + ``kwargs``), its input shape, classes and normalisation;
:func:`build_architecture` turns a card into a randomly initialised module. Loading weights for a spec lives in
:mod:`foldviz.models`; saving and loading folded models in :mod:`foldviz.persist`.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from .checkpoints import ModelLoadError

IMAGENET_NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


CIFAR10_NORMALIZATION = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]}


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


@dataclass
class LoadedModel:
    """A ready-to-use model: ``model`` is in eval mode, float32, on CPU."""

    model: nn.Module
    spec: str
    card: dict
    input_shape: tuple
    note: str | None = None
    kind: str = "cnn"          # the model kind (foldviz.kinds): "cnn" image classifier, "lm" language model

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


#: the widest classifier foldviz builds (ImageNet-21k has 21,841 classes): a larger count is a typo or a hostile
#: link, refused before anything is allocated (10 million classes would be a 20 GB head on a ResNet-50)
MAX_CLASSES = 100_000


def build_torchvision(arch: str, num_classes: int = 1000, cifar_stem: bool = False) -> nn.Module:
    from torchvision import models as tvm

    if not 1 <= int(num_classes) <= MAX_CLASSES:
        raise ModelLoadError(f"num_classes={num_classes} is outside 1..{MAX_CLASSES:,}")
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


def build_architecture(card: dict) -> nn.Module:
    """A randomly initialised module for a card's ``arch`` + ``kwargs``.

    ``arch`` is a demo class name (``DigitsResNet``, ``DigitsVGG``, ``DigitsMLP``) or ``torchvision:ARCH`` with
    kwargs ``num_classes`` and ``cifar_stem``. The cards of the optional sources (``timm:NAME``, ``py``) are built
    by :func:`foldviz.sources.build_any`.
    """
    arch = card.get("arch")
    kwargs = dict(card.get("kwargs") or {})
    if not arch:
        raise ModelLoadError("model card has no 'arch'")
    if str(arch).startswith("torchvision:"):
        name = str(arch).split(":", 1)[1]
        return build_torchvision(name, int(kwargs.get("num_classes", card.get("num_classes") or 1000)),
                                  bool(kwargs.get("cifar_stem", False)))
    cls = DEMO_ARCHS.get(str(arch))
    if cls is None:
        raise ModelLoadError(
            f"unknown architecture {arch!r}; expected one of {', '.join(DEMO_ARCHS)}, torchvision:ARCH, timm:NAME or py"
        )
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ModelLoadError(f"bad kwargs for {arch}: {exc}") from None

