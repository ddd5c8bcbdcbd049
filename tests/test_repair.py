"""Repairs: BN fusion keeps the function, the AR scale formula, Fold-R statistics, Deep Inversion."""
import numpy as np
import torch
from torch import nn

from foldviz.repair import cluster_scale as ar_scale
from foldviz.fold import fold
from foldviz.groups import build_dependency_graph
from foldviz.repair import fuse_batchnorms, reset_bn_stats
from foldviz.synth import deep_inversion
from engine_models import cifar_resnet18, random_demo, warm_bn

X8 = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(2))


def test_ar_scale_limits():
    rows = torch.tensor([[1.0, 2.0, 3.0]] * 3 + [[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    labels = np.array([0, 0, 0, 1, 1, 1])
    s = ar_scale(rows, labels, 2)
    assert torch.allclose(s, torch.tensor([1.0, 3 ** 0.5]), atol=1e-6)  # duplicates -> 1, orthogonal -> sqrt(N)
    # matches sqrt(N / (1 + (N-1) E)) with E the mean pairwise cosine
    r = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    e = 0.6
    assert abs(float(ar_scale(r, np.array([0, 0]), 1)[0]) - (2 / (1 + e)) ** 0.5) < 1e-6


def test_fusion_preserves_function_and_standardises():
    m = cifar_resnet18()
    warm_bn(m, (3, 32, 32))
    x = torch.randn(4, 3, 32, 32)
    ref = m(x)
    fused, biased = fuse_batchnorms(m, build_dependency_graph(m, x[:1]))
    assert len(fused) == 20 and not biased  # every BN of ResNet-18 follows a bias-free conv
    assert (m(x) - ref).abs().max().item() < 1e-4
    assert torch.all(m.bn1.running_mean == 0)


def test_fold_r_sets_empirical_statistics():
    m = random_demo("mlp")
    data = torch.randn(300, 1, 8, 8)
    res = fold(m, 0.5, example_input=data[:1], repair="r", repair_data=data)
    f = res.model
    with torch.no_grad():
        x = f.fc1(f.flatten(data))  # the input of bn1
    # cumulative average over batches of 256 + 44 samples, as BatchNorm's momentum=None accumulates
    b1, b2 = x[:256], x[256:]
    mean = (b1.mean(0) + b2.mean(0)) / 2
    var = (b1.var(0, unbiased=True) + b2.var(0, unbiased=True)) / 2
    assert torch.allclose(f.bn1.running_mean, mean, atol=1e-5)
    assert torch.allclose(f.bn1.running_var, var, rtol=1e-4, atol=1e-5)
    assert res.repair_samples == 300


def test_reset_keeps_dropout_off():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.9)
            self.bn = nn.BatchNorm1d(8)

        def forward(self, x):
            return self.bn(self.drop(x))

    net = Net()
    x = torch.randn(512, 8) + 3
    reset_bn_stats(net, x)
    assert torch.allclose(net.bn.running_mean, x.mean(0), atol=0.05)  # dropout would have scaled/zeroed inputs


def test_deep_inversion_matches_bn_statistics_better_than_noise():
    m = random_demo("resnet")
    x0 = torch.randn(64, 1, 8, 8)
    syn = deep_inversion(m, (1, 8, 8), batch_size=64, iterations=40, seed=0)
    assert syn.shape == (64, 1, 8, 8) and torch.isfinite(syn).all()

    def bn_gap(inputs):
        gaps = []
        hooks = [b.register_forward_hook(lambda mod, i, o: gaps.append(
            float((i[0].mean((0, 2, 3)) - mod.running_mean).norm()))) for b in m.modules()
            if isinstance(b, nn.BatchNorm2d)]
        with torch.no_grad():
            m(inputs)
        for h in hooks:
            h.remove()
        return sum(gaps)

    assert bn_gap(syn) < 0.5 * bn_gap(x0)
