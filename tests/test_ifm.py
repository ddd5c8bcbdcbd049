"""IFM (Iterative Feature Merging) baseline: registry, greedy selection, its sum/mean merge rule, the preset plan."""
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from foldviz.apply import apply_method
from foldviz.data import sample_inputs
from foldviz.fold import fold
from foldviz.groups import BN_TYPES, find_groups
from foldviz.ifm import greedy_merge, ifm, ifm_labels
from foldviz.methods import METHODS, fold_keys
from foldviz.metrics import count_params, variance_ratios
from foldviz.models import DigitsMLP, load_model
from foldviz.plans import FoldPlan, PlanError, preset_plan
from foldviz.surgery import Decision
from engine_models import random_demo, warm_bn
from widen import duplicate_channels

X8 = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(3))


def strip_bn(model: nn.Module) -> nn.Module:
    """The same network with every BatchNorm replaced by Identity (a BN-free ReLU network)."""
    m = copy.deepcopy(model)
    for name, mod in list(m.named_modules()):
        if isinstance(mod, BN_TYPES):
            parent, _, leaf = name.rpartition(".")
            setattr(m.get_submodule(parent) if parent else m, leaf, nn.Identity())
    return m.eval()


def test_registry_entry():
    m = METHODS["ifm"]
    assert (m.label, m.family, m.repair, m.needs_data) == ("IFM", "merge", "none", False)
    assert "ifm" not in fold_keys()  # not a plan repair
    with pytest.raises(ValueError, match="merge rule"):
        Decision(keep=[0], rule="nope")


@pytest.mark.parametrize("name", ["resnet", "vgg", "mlp"])
def test_ratio_zero_changes_nothing(name):
    m = random_demo(name)
    res = ifm(m, 0.0, example_input=X8[:1])
    assert count_params(res.model) == count_params(m)
    assert torch.equal(res.model(X8), m(X8))


@pytest.mark.parametrize("name", ["resnet", "vgg", "mlp"])
def test_duplicates_without_batchnorm_fold_back_exactly(name):
    """Without BN, IFM's rule is exact for duplicates: rows summed give N*h (ReLU is positively homogeneous,
    max/avg pooling too), and the averaged consumer column times N*h is the members' original sum."""
    m = strip_bn(random_demo(name))
    wide = duplicate_channels(m, X8[:1])
    assert torch.allclose(wide(X8), m(X8), atol=1e-5)
    res = ifm(wide, 0.5, example_input=X8[:1])
    assert count_params(res.model) == count_params(m)
    assert all(g["channels_after"] * 2 == g["channels_before"] for g in res.groups if g["foldable"])
    assert (res.model(X8) - m(X8)).abs().max().item() < 1e-4
    # the duplicates were paired: each cluster is one channel and its copy
    for gid, labels in res.labels.items():
        n = len(labels) // 2
        assert np.array_equal(labels[:n], labels[n:])


@pytest.mark.parametrize("name", ["resnet", "vgg", "mlp"])
def test_duplicates_with_batchnorm_overshoot_by_sqrt_n(name):
    """With BN, IFM sums running_var too: a merged pair sees input 2y normalised by sqrt(2 var + eps), so the
    centred part grows by sqrt(2). Exactly: the IFM-merged duplicate equals the original network with every
    folded BN's gamma times sqrt(2) and eps halved (IFM's variance overshoot), and not the original."""
    m = random_demo(name)
    wide = duplicate_channels(m, X8[:1])
    res = ifm(wide, 0.5, example_input=X8[:1])
    expected = copy.deepcopy(m)
    graph = find_groups(expected, X8[:1])
    bns = {mem.module for g in graph.foldable for mem in g.members if mem.side == "out"}
    with torch.no_grad():
        for name_, mod in expected.named_modules():
            if isinstance(mod, BN_TYPES) and name_ in bns:
                mod.weight.mul_(math.sqrt(2.0))
                mod.eps = mod.eps / 2
    assert (res.model(X8) - expected(X8)).abs().max().item() < 1e-4
    assert (res.model(X8) - m(X8)).abs().max().item() > 1e-2


def test_greedy_merge_closest_pair_first_on_merged_weights():
    # a-b at distance 1, c-d at 0.25 (closest), e far from c and d but next to their *sum* [10, 0.5]
    rows = torch.tensor([[0.0, 0.0], [0.0, 1.0], [5.0, 0.0], [5.0, 0.5], [10.0, 0.6]], dtype=torch.float64)
    labels, merges = greedy_merge(rows, torch.zeros(5, 0, dtype=torch.float64), 3)
    assert [(i, j) for i, j, _ in merges] == [(2, 3), (2, 4)]
    assert merges[0][2] == pytest.approx(0.25) and merges[1][2] == pytest.approx(0.01)
    assert labels.tolist() == [0, 1, 2, 2, 2]
    labels, merges = greedy_merge(rows, torch.zeros(5, 0, dtype=torch.float64), 2)
    assert [(i, j) for i, j, _ in merges][-1] == (0, 1)
    # consumer columns are averaged (weighted by merge counts), not summed: c, d and e' collapse at distance 0
    cols = torch.tensor([[0.0], [3.0], [1.0], [1.0], [1.0]], dtype=torch.float64)
    rows2 = torch.tensor([[0.0], [0.0], [0.0], [0.0], [0.0]], dtype=torch.float64)
    _, merges = greedy_merge(rows2, cols, 2)
    assert [m_[2] for m_ in merges[:2]] == [0.0, 0.0]


def test_model_group_merges_closest_pair_with_ifm_rule():
    torch.manual_seed(0)
    m = warm_bn(DigitsMLP(hidden=(8, 6)), (1, 8, 8))
    with torch.no_grad():  # channel 5 of fc1's group is channel 2 plus a small perturbation
        m.fc1.weight[5] = m.fc1.weight[2] + 0.01
        m.fc2.weight[:, 5] = m.fc2.weight[:, 2] - 0.01
    graph = find_groups(m, X8[:1])
    g = graph.get("fc1")
    labels = ifm_labels(m, g, 7)
    assert labels[2] == labels[5] and len(set(labels.tolist())) == 7
    plan = FoldPlan(default_ratio=0.0, ratios={"fc1": 1 / 8})  # k_for_ratio(8, 1/8) = 7
    f = ifm(m, plan, example_input=X8[:1]).model
    assert f.fc1.out_features == 7 and f.fc2.weight.shape[1] == 7
    keep = [0, 1, 2, 3, 4, 6, 7]   # channel 5 merged into 2, which stays at position 2
    for t_new, t_old in ((f.fc1.weight, m.fc1.weight), (f.fc1.bias, m.fc1.bias), (f.bn1.weight, m.bn1.weight),
                         (f.bn1.bias, m.bn1.bias), (f.bn1.running_mean, m.bn1.running_mean),
                         (f.bn1.running_var, m.bn1.running_var)):
        assert torch.allclose(t_new[2], t_old[2] + t_old[5], atol=1e-6)  # output side: summed
        assert torch.equal(t_new[[0, 1, 3, 4, 5, 6]], t_old[[k for k in keep if k != 2]])
    assert torch.allclose(f.fc2.weight[:, 2], (m.fc2.weight[:, 2] + m.fc2.weight[:, 5]) / 2, atol=1e-6)  # mean


@pytest.mark.parametrize("name", ["resnet", "vgg", "mlp"])
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_shapes_match_fold_naive(name, ratio):
    m = random_demo(name)
    a = ifm(m, ratio, example_input=X8[:1]).model
    b = fold(m, ratio, example_input=X8[:1], repair="none").model
    assert count_params(a) == count_params(b) < count_params(m)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert torch.isfinite(a(X8)).all()


@pytest.fixture(scope="module")
def digits_resnet():
    return load_model("demo:digits-resnet")


def test_apply_method_runs_ifm_on_demo(digits_resnet):
    loaded = digits_resnet
    res = apply_method(loaded, FoldPlan(default_ratio=0.5), "ifm")
    assert res.method == "ifm" and res.label == "IFM"
    assert count_params(res.model) < count_params(loaded.model)
    assert torch.isfinite(res.model(loaded.example_input(4))).all()
    assert all(g["n_iter"] == g["channels_before"] - g["channels_after"] for g in res.groups if g["n_iter"])


def test_variance_overshoots_where_fold_naive_collapses(digits_resnet):
    """Paper Fig. 4: IFM overshoots (>1), Fold-Naive collapses (<1). Measured on the demo at 0.5 (mean ratio over
    layers): IFM 15.5 (deterministic, seed-free), Fold-Naive 0.19-0.21 for seeds 0-2."""
    loaded = digits_resnet
    x = sample_inputs("digits", "test", 300, card=loaded.card, seed=0)

    def mean_ratio(method, seed):
        r = apply_method(loaded, FoldPlan(default_ratio=0.5, seed=seed), method)
        rows = variance_ratios(loaded.model, r.model, x, r.channel_maps)
        assert rows and all(np.isfinite(row["ratio"]) for row in rows)
        return float(np.mean([row["ratio"] for row in rows]))

    ifm_ratio = mean_ratio("ifm", 0)
    assert ifm_ratio > 4.0
    for seed in (0, 1, 2):
        assert mean_ratio("none", seed) < 0.5


def test_ifm_last_two_stages_preset():
    loaded = load_model("demo:digits-resnet18")
    x = loaded.example_input(1)
    graph = find_groups(loaded.model, x)
    plan = preset_plan(graph, "ifm-last-two-stages", 0.5)
    assert sorted(plan.ratios) == ["layer3.0.conv1", "layer3.0.conv2", "layer3.1.conv1", "layer4.0.conv1",
                                   "layer4.0.conv2", "layer4.1.conv1"]
    assert plan.default_ratio == 0.0
    res = ifm(loaded.model, plan, example_input=x)
    after = {g["id"]: g["channels_after"] for g in res.groups}
    before = {g.id: g.channels for g in graph.groups}
    for gid in before:
        assert after[gid] == (before[gid] // 2 if gid in plan.ratios else before[gid])
    assert preset_plan(graph, "uniform", 0.3).default_ratio == 0.3
    with pytest.raises(PlanError):
        preset_plan(find_groups(random_demo("mlp"), X8[:1]), "ifm-last-two-stages", 0.5)
