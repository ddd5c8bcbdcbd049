"""Folding invariants: identity at ratio 0, exact recovery of duplicated networks, real shrinking."""
import copy

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from foldviz.fold import fold
from foldviz.groups import find_groups
from foldviz.metrics import count_params
from foldviz.plans import FoldPlan, PlanError
from foldviz.prune import prune
from foldviz.utils import state_dict_hash
from engine_models import cifar_resnet18, random_demo
from widen import duplicate_channels

X8 = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ["resnet", "vgg", "mlp"])
@pytest.mark.parametrize("repair", ["none", "ar"])
def test_ratio_zero_is_identity(name, repair):
    m = random_demo(name)
    res = fold(m, 0.0, example_input=X8[:1], repair=repair)
    assert count_params(res.model) == count_params(m)
    assert torch.allclose(res.model(X8), m(X8), atol=1e-5)


@pytest.mark.parametrize("name", ["resnet", "vgg", "mlp"])
@pytest.mark.parametrize("repair", ["none", "ar"])
def test_duplicated_network_folds_back_exactly(name, repair):
    m = random_demo(name)
    wide = duplicate_channels(m, X8[:1])
    assert torch.allclose(wide(X8), m(X8), atol=1e-5)
    res = fold(wide, 0.5, example_input=X8[:1], repair=repair)
    assert count_params(res.model) == count_params(m)
    assert (res.model(X8) - m(X8)).abs().max().item() < 1e-4
    assert all(g["channels_after"] * 2 == g["channels_before"] for g in res.groups if g["foldable"])


def test_input_model_is_never_modified():
    m = random_demo("resnet")
    before = state_dict_hash(m)
    for repair in ("none", "ar", "r", "dir"):
        plan = FoldPlan(default_ratio=0.5, repair=repair, repair_settings={"iterations": 3, "batch_size": 16})
        fold(m, plan, example_input=X8[:1], repair_data=X8)
    assert state_dict_hash(m) == before


def test_resnet18_shapes_and_params_match_reference():
    m = cifar_resnet18()
    assert count_params(m) == 11_173_962
    res = fold(m, 0.5, example_input=torch.randn(1, 3, 32, 32), repair="none")
    f = res.model
    assert f.conv1.weight.shape == (32, 3, 3, 3) and f.conv1.out_channels == 32
    assert f.layer1[0].conv1.weight.shape == (32, 32, 3, 3)
    assert f.layer2[0].downsample[0].weight.shape == (64, 32, 1, 1)
    assert f.fc.weight.shape == (10, 256) and f.fc.in_features == 256
    assert f.bn1.num_features == 32 and f.bn1.running_mean.shape == (32,)
    assert abs(1 - count_params(f) / 11_173_962 - 0.7496) < 5e-4
    assert f(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "vgg11_bn", "vgg16_bn", "mobilenet_v2"])
def test_torchvision_architectures_fold_and_run(arch):
    torch.manual_seed(0)
    m = torchvision.models.get_model(arch, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    plan = FoldPlan(default_ratio=0.3, repair="none", clustering={"algorithm": "kmeans", "n_init": 1, "max_iter": 20})
    res = fold(m, plan, example_input=x)
    assert res.model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert count_params(res.model) < count_params(m)
    mods = dict(res.model.named_modules())
    graph = find_groups(m, x)
    for rep in res.groups:
        g = graph.get(rep["id"])
        if rep["foldable"]:
            assert rep["channels_after"] == max(1, round(g.channels * 0.7))
        for name in g.producers:
            mod = mods[name]
            size = mod.num_features if isinstance(mod, nn.modules.batchnorm._BatchNorm) else mod.weight.shape[0]
            # producers only belonging to this group shrink to exactly the group's new size
            if all(name not in o.producers for o in graph.groups if o.id != g.id):
                assert size == rep["channels_after"], (arch, name)


def test_per_group_ratios_and_skip():
    m = random_demo("resnet")
    graph = find_groups(m, X8[:1])
    ids = [g.id for g in graph.foldable]
    plan = FoldPlan(default_ratio=0.5, repair="none", ratios={ids[1]: 0.25}, skip=[ids[2]])
    res = fold(m, plan, example_input=X8[:1])
    by = {g["id"]: g for g in res.groups}
    assert by[ids[0]]["channels_after"] == graph.get(ids[0]).channels // 2
    assert by[ids[1]]["channels_after"] == round(graph.get(ids[1]).channels * 0.75)
    assert by[ids[2]]["channels_after"] == graph.get(ids[2]).channels


def test_unknown_group_id_is_an_error():
    with pytest.raises(PlanError, match="unknown group id 'nope'"):
        fold(random_demo("mlp"), FoldPlan(default_ratio=0.5, ratios={"nope": 0.2}), example_input=X8[:1])


def test_fold_is_deterministic_for_a_seed_and_a_saved_plan():
    m = random_demo("vgg")
    plan = FoldPlan(default_ratio=0.5, repair="ar", seed=3, ratios={"classifier.0": 0.3})
    a = fold(m, plan, example_input=X8[:1])
    b = fold(m, FoldPlan.from_json(plan.to_json()), example_input=X8[:1])
    assert state_dict_hash(a.model) == state_dict_hash(b.model)
    c = fold(m, plan.with_changes(seed=4), example_input=X8[:1])
    assert state_dict_hash(c.model) != state_dict_hash(a.model)


@pytest.mark.parametrize("name", ["resnet", "vgg", "mlp"])
def test_identity_merge_through_surgery_changes_nothing(name):
    """k = n with the identity assignment, applied to every group by the merge code itself."""
    from foldviz.surgery import GroupSurgery, merge_decision, trace

    m = random_demo(name)
    work = copy.deepcopy(m)
    dg, graph = trace(work, X8[:1])
    surgery = GroupSurgery(work, dg)
    for g in graph.foldable:
        surgery.apply(g.id, g.channels, merge_decision(np.arange(g.channels), g.channels))
    assert torch.allclose(work(X8), m(X8), atol=1e-6)
    assert count_params(work) == count_params(m)
    assert all(np.array_equal(cmap, np.arange(len(cmap))) for cmap in surgery.maps.values())


def test_one_default_repair_for_every_entry_point(tmp_path):
    from foldviz.cli import main
    from foldviz.methods import DEFAULT_REPAIR
    from foldviz.session import Workbench

    assert fold(random_demo("mlp"), 0.3, example_input=X8[:1]).plan.repair == DEFAULT_REPAIR
    assert FoldPlan().repair == DEFAULT_REPAIR
    assert main(["plan", "demo:digits-mlp", "--ratio", "0.3", "--out", str(tmp_path / "x.json")]) == 0
    assert FoldPlan.load(tmp_path / "x.json").repair == DEFAULT_REPAIR
    from foldviz.models import load_model
    assert Workbench(load_model("demo:digits-mlp")).default_plan().repair == DEFAULT_REPAIR


def test_kmeans_clusters_are_never_empty_on_dead_channels():
    """A trained model with many dead (all-zero) channels folds with every repair."""
    m = random_demo("mlp")
    with torch.no_grad():
        m.fc1.weight[:300] = 0
        m.fc1.bias[:300] = 0
    for repair in ("none", "ar", "dir"):
        for ratio in (0.3, 0.5):
            plan = FoldPlan(default_ratio=ratio, repair=repair, repair_settings={"iterations": 2, "batch_size": 8}
                            if repair == "dir" else {})
            res = fold(m, plan, example_input=X8[:1])
            assert res.model.fc1.out_features == round(512 * (1 - ratio))
            assert len(np.unique(res.labels["fc1"])) == res.model.fc1.out_features
            assert torch.isfinite(res.model(X8)).all()


def test_channel_maps_follow_the_clusters():
    m = random_demo("mlp")
    res = fold(m, 0.5, example_input=X8[:1], repair="none")
    labels = res.labels["fc1"]
    cmap = res.channel_maps["fc1"]
    # channels in the same cluster map to the same new channel, different clusters to different ones
    for c in range(labels.max() + 1):
        assert len(set(cmap[labels == c])) == 1
    assert len(set(cmap)) == labels.max() + 1 == res.model.fc1.out_features


def test_pruning_keeps_largest_channels_and_shrinks_equally():
    m = random_demo("mlp")
    res = prune(m, 0.5, norm=1, example_input=X8[:1])
    folded = fold(m, 0.5, example_input=X8[:1], repair="none")
    assert count_params(res.model) == count_params(folded.model)
    norms = m.fc1.weight.abs().sum(1)
    kept = np.flatnonzero(res.channel_maps["fc1"] >= 0)
    assert set(kept) == set(torch.argsort(norms, descending=True)[:256].tolist())
    assert torch.equal(res.model.fc1.weight, m.fc1.weight[sorted(kept)])


def test_device_argument_cpu_and_clear_error_without_cuda():
    m = random_demo("mlp")
    res = fold(m, 0.5, example_input=X8[:1], repair="ar", device="cpu")
    assert next(res.model.parameters()).device.type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            fold(m, 0.5, example_input=X8[:1], device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_and_cpu_agree():
    m = random_demo("resnet")
    for repair in ("none", "ar", "r"):
        plan = FoldPlan(default_ratio=0.5, repair=repair)
        cpu = fold(m, plan, example_input=X8[:1], repair_data=X8, device="cpu")
        gpu = fold(m, plan, example_input=X8[:1], repair_data=X8, device="cuda")
        assert all(np.array_equal(cpu.labels[g], gpu.labels[g]) for g in cpu.labels)
        # same clusters; the weights differ only by float32 rounding (cuDNN may use TF32 for convolutions)
        assert torch.allclose(cpu.model(X8), gpu.model(X8), rtol=1e-3, atol=1e-3)
