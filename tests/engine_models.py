"""Small models with realistic BatchNorm statistics for engine tests (no training needed)."""
from __future__ import annotations

import torch
import torchvision

from foldviz.models import DigitsMLP, DigitsResNet, DigitsVGG


@torch.no_grad()
def warm_bn(model, shape, steps: int = 4, seed: int = 0):
    """Give every BatchNorm non-trivial running statistics by forwarding random data in train mode."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    for _ in range(steps):
        model(torch.randn((64, *shape), generator=g) * 2 + 0.5)
    return model.eval()


def random_demo(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = {"resnet": DigitsResNet, "vgg": DigitsVGG, "mlp": DigitsMLP}[name]()
    return warm_bn(model, (1, 8, 8), seed=seed)


def cifar_resnet18(seed: int = 0):
    torch.manual_seed(seed)
    m = torchvision.models.resnet18(num_classes=10)
    m.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    m.maxpool = torch.nn.Identity()
    return m.eval()
