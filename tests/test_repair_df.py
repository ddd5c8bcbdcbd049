"""Data-free repairs: the authors' Fold-AR and Fold-DFR (data-free REPAIR)."""

import numpy as np
import pytest
import torch
from torch import nn

from engine_models import random_demo
from foldviz.fold import fold
from foldviz.metrics import count_params
from foldviz.repair import cluster_scale
from foldviz.utils import state_dict_hash
from widen import duplicate_channels

X8 = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def test_cluster_scale_formula():
    v = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 2.0], [5.0, 5.0, 5.0]])
    s = cluster_scale(v, np.array([0, 0, 1, 2]), 3)
    assert s[0].item() == pytest.approx((2 / (1 + 0.6)) ** 0.5, abs=1e-6)  # E[c] = cos = 0.6
    assert s[1].item() == pytest.approx(1.0) and s[2].item() == pytest.approx(1.0)  # singletons
    same = cluster_scale(torch.ones(3, 4), np.zeros(3, dtype=int), 1)
    orth = cluster_scale(torch.eye(3), np.zeros(3, dtype=int), 1)
    assert same.item() == pytest.approx(1.0) and orth.item() == pytest.approx(3 ** 0.5)


def _cluster_net():
    """Linear(4->4) + BN + ReLU + Linear(4->3); channels 0 and 1 are similar (cosine < 1), 2 and 3 far apart,
    so folding 4 -> 3 channels merges exactly {0, 1}. The BN statistics are the exact statistics of X."""
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4, bias=False), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.5, 0.0, 0.2], [0.2, 1.2, 0.6, -0.4],
                                          [-3.0, 0.0, 4.0, 0.0], [0.0, -4.0, 0.0, -3.0]]))
        net[1].weight.copy_(torch.tensor([1.0, 1.4, 0.5, 2.0]))
        net[1].bias.copy_(torch.tensor([0.3, 0.1, -0.5, 0.4]))
        net[3].weight.copy_(torch.tensor([[1.0, 0.8, -2.0, 0.0], [0.5, 0.6, 0.0, 2.0], [0.2, 0.1, 1.0, -1.0]]))
    x = torch.randn(512, 4, generator=g) * torch.tensor([1.0, 2.0, 0.5, 1.5]) + 1.0
    with torch.no_grad():
        a = net[0](x)
        net[1].running_mean.copy_(a.mean(0))
        net[1].running_var.copy_(a.var(0, unbiased=False))
    return net.eval(), x


def test_ar_scale_applied_to_fused_gamma_and_mean_unchanged():
    net, x = _cluster_net()
    res = fold(net, 0.25, example_input=x[:1], repair="ar")
    assert res.labels["0"].tolist() == [0, 0, 1, 2]
    net.requires_grad_(False)  # after folding: tracing needs autograd
    bn = net[1]
    inv = torch.rsqrt(bn.running_var + bn.eps)
    # the authors' E[c]: whole-group feature vectors, UNSCALED: fused row | fused bias | gamma | beta | consumer column
    v = torch.cat([net[0].weight * inv[:, None], (-bn.running_mean * inv)[:, None], bn.weight[:, None],
                   bn.bias[:, None], net[3].weight.T], 1).detach()
    cos = float(torch.nn.functional.cosine_similarity(v[0], v[1], dim=0))
    s = (2 / (1 + cos)) ** 0.5
    assert s > 1.02  # a real correction
    c = int(res.channel_maps["1"][0])
    f = res.model
    assert f[1].weight[c].detach().item() == pytest.approx(float(bn.weight[:2].mean()) * s, rel=1e-5)
    # the merged channel's mean on the batch is unchanged by the scale: every fused z_i has mean 0 on x, so the
    # BN output has mean mean(beta) whatever s is (scaling gamma == scaling the fused row AND bias together)
    with torch.no_grad():
        h = f[1](f[0](x))[:, c]
        assert h.mean().item() == pytest.approx(float(bn.bias[:2].mean()), abs=1e-4)
        assert h.std(unbiased=False).item() > 1.0001 * float(bn.weight[:2].mean()) * \
            float(((net[0](x)[:, :2] - bn.running_mean[:2]) * inv[:2]).mean(1).std(unbiased=False))
        # the rejected variant, scaling only the merged fused ROW and not its fused bias, moves the mean by (s-1)*b
        w_bar = (net[0].weight[:2] * inv[:2, None]).mean(0)
        b_bar = float((-bn.running_mean[:2] * inv[:2]).mean())
        wrong = float(bn.weight[:2].mean()) * (s * (x @ w_bar) + b_bar).mean() + float(bn.bias[:2].mean())
        g_bar, beta_bar = float(bn.weight[:2].mean()), float(bn.bias[:2].mean())
        assert wrong.item() == pytest.approx(beta_bar - g_bar * (s - 1) * b_bar, abs=1e-4)
        assert abs(wrong.item() - beta_bar) > 0.01 > 100 * abs(h.mean().item() - beta_bar)


@pytest.mark.parametrize("name", ["resnet", "vgg", "mlp"])
@pytest.mark.parametrize("repair", ["ar", "dfr"])
def test_duplicates_fold_back_exactly(name, repair):
    m = random_demo(name)
    wide = duplicate_channels(m, X8[:1])
    res = fold(wide, 0.5, example_input=X8[:1], repair=repair, num_classes=10)
    assert count_params(res.model) == count_params(m)
    assert (res.model(X8) - m(X8)).abs().max().item() < 1e-3 * max(1.0, m(X8).abs().max().item())


@pytest.mark.parametrize("name", ["resnet", "vgg", "mlp"])
def test_dfr_ratio_zero_changes_nothing(name):
    m = random_demo(name)
    res = fold(m, 0.0, example_input=X8[:1], repair="dfr")
    assert state_dict_hash(res.model) == state_dict_hash(m)
    assert torch.equal(res.model(X8), m(X8))


@pytest.mark.slow
def test_dfr_deterministic_and_input_untouched():
    m = random_demo("resnet")
    before = state_dict_hash(m)
    a = fold(m, 0.5, example_input=X8[:1], repair="dfr", num_classes=10)
    b = fold(m, 0.5, example_input=X8[:1], repair="dfr", num_classes=10)
    assert state_dict_hash(a.model) == state_dict_hash(b.model)
    assert state_dict_hash(m) == before
    c = fold(m, 0.5, example_input=X8[:1], repair="ar")
    d = fold(m, 0.5, example_input=X8[:1], repair="ar")
    assert state_dict_hash(c.model) == state_dict_hash(d.model)


def test_dfr_sets_every_bn_from_original_statistics():
    """A BN whose input is unchanged by folding (the stem BN, its conv is not a consumer of any folded group)
    gets back exactly the original running statistics, whatever the proxy."""
    m = random_demo("resnet")
    res = fold(m, 0.5, example_input=X8[:1], repair="dfr", num_classes=10)
    cmap = res.channel_maps["bn1"]
    for c in range(res.model.bn1.num_features):
        members = np.flatnonzero(cmap == c)
        assert res.model.bn1.running_mean[c].item() == pytest.approx(float(m.bn1.running_mean[members].mean()), abs=1e-4)


def _digits_acc(model, loaded):
    from foldviz.data import tensor_transform, digits_arrays

    xt, yt = digits_arrays("test")
    x = tensor_transform(xt, tuple(loaded.input_shape), loaded.normalization)
    with torch.no_grad():
        return float((model(x).argmax(1) == yt).float().mean())


def test_dfr_near_fold_r_on_digits_resnet():
    from foldviz.data import sample_inputs
    from foldviz.models import load_model

    lm = load_model("demo:digits-resnet")
    x1 = lm.example_input(1)
    real = sample_inputs("digits", "train", 512, card=lm.card, seed=0)
    acc_r = _digits_acc(fold(lm.model, 0.25, example_input=x1, repair="r", repair_data=real).model, lm)
    acc_dfr = _digits_acc(fold(lm.model, 0.25, example_input=x1, repair="dfr", num_classes=10).model, lm)
    acc_naive = _digits_acc(fold(lm.model, 0.25, example_input=x1, repair="none").model, lm)
    # panel (benchmarks/results/repair_panel.md), seed 0: Fold-R ~0.97, Fold-DFR ~0.96, Fold-Naive ~0.75
    assert acc_dfr >= acc_r - 0.05
    assert acc_dfr >= acc_naive + 0.1


class _ConcatNet(nn.Module):
    """DenseNet-style: a consumer reads two groups through a concatenation, so its column indices depend on both."""

    def __init__(self):
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(14, 10, 3, padding=1, bias=False), nn.BatchNorm2d(10)
        self.fc = nn.Linear(10, 4)

    def forward(self, x):
        a = torch.relu(self.bn0(self.conv0(x)))
        b = torch.relu(self.bn1(self.conv1(a)))
        y = torch.relu(self.bn2(self.conv2(torch.cat([a, b], 1))))
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("repair", ["ar", "dfr", "none"])
def test_concatenated_groups_fold_with_every_data_free_repair(repair):
    torch.manual_seed(0)
    m = _ConcatNet().eval()
    with torch.no_grad():
        for bn in (m.bn0, m.bn1, m.bn2):
            bn.running_var.uniform_(0.5, 2.0)
            bn.running_mean.normal_()
    x = torch.randn(16, 1, 8, 8)
    res = fold(m, 0.5, example_input=x[:1], repair=repair, num_classes=4)
    assert res.model.conv2.in_channels == res.model.conv0.out_channels + res.model.conv1.out_channels == 4 + 3
    out = res.model(x)
    assert out.shape == (16, 4) and torch.isfinite(out).all()


def test_dfr_proxy_samples_shrink_above_32x32():
    """Inputs larger than 32x32 get 16 proxy samples up to 128x128 (the knee measured at 64 and 128 px), then as
    many positions per channel as that (at least 4), unless the plan sets them; fewer when fewer are asked for."""
    from foldviz.plans import FoldPlan
    from foldviz.proxy import default_samples as dfr_samples

    shapes = [(64,), (1, 8, 8), (3, 32, 32), (3, 64, 64), (3, 128, 128), (3, 224, 224), (3, 512, 512)]
    assert [dfr_samples(s) for s in shapes] == [32, 32, 32, 16, 16, 5, 4]
    assert dfr_samples((3, 64, 64), 64) == 16 and dfr_samples((3, 64, 64), 8) == 8 and dfr_samples((3, 32, 32), 12) == 12

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    x = torch.randn(2, 3, 64, 64)
    assert fold(net, FoldPlan(default_ratio=0.5), example_input=x, num_classes=4).repair_samples == 16
    chosen = FoldPlan(default_ratio=0.5, repair_settings={"samples": 24})
    assert fold(net, chosen, example_input=x, num_classes=4).repair_samples == 24


def test_deep_inversion_in_chunks_bounds_the_batch_and_is_deterministic():
    """The DFR proxy at large inputs is synthesised in independent chunks (bounded backward memory)."""
    from foldviz.synth import deep_inversion

    net = random_demo("resnet")
    kw = dict(num_classes=10, batch_size=5, iterations=2, seed=3)
    a = deep_inversion(net, (1, 8, 8), chunk=2, **kw)
    assert a.shape == (5, 1, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, deep_inversion(net, (1, 8, 8), chunk=2, **kw))
    first = deep_inversion(net, (1, 8, 8), num_classes=10, batch_size=2, iterations=2, seed=3 * 1009)
    assert torch.equal(a[:2], first)  # chunk i is the run of its own size with seed * 1009 + i
