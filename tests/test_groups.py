"""Channel groups found from the graph match the authors' hand-written specs (folding-spec §2.1, §12)."""
import pytest
import torch
import torchvision
from torch import nn

from foldviz.groups import find_groups
from engine_models import cifar_resnet18, random_demo


def test_resnet18_stem_group_matches_spec():
    graph = find_groups(cifar_resnet18(), torch.randn(1, 3, 32, 32))
    g = graph.get("conv1")
    assert g.channels == 64 and g.foldable
    assert {"conv1", "bn1", "layer1.0.conv2", "layer1.0.bn2", "layer1.1.conv2", "layer1.1.bn2"} == set(g.producers)
    assert {"layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0"} == set(g.consumers)
    stage2 = graph.get("layer2.0.conv2")
    assert {"layer2.0.downsample.0", "layer2.0.downsample.1", "layer2.1.conv2"} <= set(stage2.producers)
    assert "fc" in graph.get("layer4.0.conv2").consumers
    # 1 stem/stage-1 stream + 3 stage streams + 8 inner block groups; the classifier output is never a group
    assert len(graph.groups) == 12 and graph.output_layers == ["fc"]
    assert all("fc" not in g.producers for g in graph.groups)


def test_group_ids_are_stable_and_in_model_order():
    model = cifar_resnet18()
    ids1 = [g.id for g in find_groups(model, torch.randn(1, 3, 32, 32)).groups]
    ids2 = [g.id for g in find_groups(model, torch.randn(2, 3, 32, 32)).groups]
    assert ids1 == ids2
    assert ids1[:3] == ["conv1", "layer1.0.conv1", "layer1.1.conv1"]


def test_vgg_flatten_consumer_and_hidden_fc_group():
    graph = find_groups(random_demo("vgg"), torch.randn(1, 1, 8, 8))
    last_conv = graph.groups[-2]
    assert last_conv.consumers == ["classifier.0"]
    fc = graph.get("classifier.0")
    assert fc.foldable and fc.consumers == ["classifier.3"] and not fc.has_bn
    # flatten: each channel feeds 2x2 = 4 columns of classifier.0
    member = next(m for m in last_conv.members if m.module == "classifier.0")
    assert len(member.idxs) == 4 * last_conv.channels


def test_grouped_convs_reported_not_foldable_rest_still_foldable():
    model = torchvision.models.resnext50_32x4d(num_classes=10).eval()
    graph = find_groups(model, torch.randn(1, 3, 64, 64))
    bad = [g for g in graph.groups if not g.foldable]
    assert bad and all("grouped convolution" in g.reason for g in bad)
    assert graph.get("conv1").foldable and len(graph.foldable) >= 4


def test_depthwise_conv_is_foldable_member():
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    graph = find_groups(model, torch.randn(1, 3, 32, 32))
    g = graph.get("features.2.conv.0.0")
    assert g.foldable and "features.2.conv.1.0" in g.producers  # the depthwise conv shares the channels


def test_untraceable_model_reports_error_instead_of_raising():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x).shape[1]  # not a tensor: the graph cannot be traced

    graph = find_groups(Bad(), torch.randn(1, 3, 8, 8))
    assert graph.groups == [] and "could not trace" in graph.error


def test_shufflenet_fold_fails_with_a_clear_message():
    from foldviz.fold import fold
    from foldviz.groups import GroupError

    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()
    with pytest.raises(GroupError, match="could not trace the model"):
        fold(model, 0.3, example_input=torch.randn(1, 3, 64, 64))
