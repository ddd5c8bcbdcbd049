"""Demo models, torchvision specs and the model-spec dispatcher."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from foldviz import models as M
from foldviz.data import evaluate, load_dataset, make_loader
from foldviz.models import LoadedModel, ModelLoadError, build_architecture, list_demos, load_model
from foldviz.utils import state_dict_hash

DEMO_NAMES = list_demos()
TV_ARCHS = ["resnet18", "resnet34", "resnet50", "vgg11_bn", "vgg16_bn", "mobilenet_v2"]


def test_list_demos_has_the_bundled_models():
    assert list_demos() == ["digits-mlp", "digits-resnet", "digits-resnet-2x", "digits-resnet18", "digits-vgg"]
    assert DEMO_NAMES == list_demos()


@pytest.mark.parametrize("name", DEMO_NAMES)
def test_demo_loads_and_reproduces_its_card(name):
    lm = load_model(f"demo:{name}")
    card = lm.card
    assert isinstance(lm, LoadedModel)
    assert lm.spec == f"demo:{name}"
    assert lm.note is None
    assert lm.input_shape == tuple(card["input_shape"])
    assert lm.input_shape == ((3, 32, 32) if name == "digits-resnet18" else (1, 8, 8))  # resnet18: upsampled RGB
    assert not lm.model.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in lm.model.parameters())
    for key in ("name", "arch", "kwargs", "input_shape", "num_classes", "normalization", "data", "split", "recipe",
                "seed", "test_accuracy", "test_loss", "params", "weights_sha256", "torch_version",
                "trained_seconds"):
        assert key in card, key
    assert card["data"] == "digits"
    assert card["split"] == {"seed": 0, "test_fraction": 0.25, "stratified": True, "n_train": 1347, "n_test": 450}
    assert card["params"] == sum(p.numel() for p in lm.model.parameters())
    assert card["weights_sha256"] == state_dict_hash(lm.model)
    res = evaluate(lm.model, make_loader(load_dataset("digits", "test", card=card)))
    assert res.n == 450
    assert res.accuracy == pytest.approx(card["test_accuracy"], abs=1e-6)
    assert res.loss == pytest.approx(card["test_loss"], abs=1e-4)
    assert res.accuracy >= 0.95


def test_bare_demo_name_is_accepted():
    assert load_model("digits-mlp").spec == "demo:digits-mlp"


def test_example_input_is_seeded():
    lm = load_model("demo:digits-mlp")
    a, b, c = lm.example_input(4), lm.example_input(4), lm.example_input(4, seed=1)
    assert a.shape == (4, 1, 8, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_demo_architectures_use_torchvision_like_names():
    r = M.DigitsResNet()
    names = dict(r.named_modules())
    for n in ("conv1", "bn1", "layer1.0.conv1", "layer1.1.bn2", "layer2.0.downsample.0", "layer2.0.downsample.1",
              "layer3.0.downsample.0", "fc"):
        assert n in names, n
    assert r.layer1[0].downsample is None
    assert r.layer2[0].conv1.stride == (2, 2) and r.layer2[0].downsample[0].kernel_size == (1, 1)
    assert (r.conv1.in_channels, r.conv1.out_channels, r.conv1.stride) == (1, 32, (1, 1))
    assert r.fc.in_features == 128 and r.fc.out_features == 10
    assert M.DigitsResNet(widths=(64, 128, 256)).fc.in_features == 256

    v = M.DigitsVGG()
    assert v.classifier[0].in_features == 128 * 2 * 2 and v.classifier[0].out_features == 256
    assert [type(m) for m in v.classifier] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert sum(isinstance(m, nn.MaxPool2d) for m in v.features) == 2

    mlp = M.DigitsMLP()
    assert [n for n, _ in mlp.named_children()][:4] == ["flatten", "fc1", "bn1", "relu1"]
    assert (mlp.fc1.in_features, mlp.fc1.out_features, mlp.fc4.out_features) == (64, 512, 10)
    for model in (r, v, mlp):
        assert model.eval()(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_demo_models_are_traceable_by_torch_pruning():
    tp = pytest.importorskip("torch_pruning")
    model = M.DigitsResNet().eval()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 1, 8, 8))
    group = dg.get_pruning_group(model.conv1, tp.prune_conv_out_channels, idxs=[0])
    touched = {dep.target.name.split(" ")[0] for dep, _ in group}
    assert "layer1.0.conv2" in touched and "layer2.0.downsample.0" in touched


@pytest.mark.parametrize("arch", TV_ARCHS)
def test_torchvision_archs_build_with_cifar_stem(arch):
    lm = load_model(f"torchvision:{arch}", num_classes=10, cifar_stem=True)
    assert lm.spec == f"torchvision:{arch}"
    assert lm.input_shape == (3, 32, 32)
    assert lm.note == M.RANDOM_INIT_NOTE
    assert lm.card["weights"] == "random-init"
    assert lm.card["kwargs"] == {"num_classes": 10, "cifar_stem": True}
    assert lm.card["normalization"] == M.CIFAR10_NORMALIZATION
    with torch.no_grad():
        assert lm.model(lm.example_input(2)).shape == (2, 10)
    # the card rebuilds the same architecture
    rebuilt = build_architecture(lm.card)
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == \
           {k: tuple(v.shape) for k, v in lm.model.state_dict().items()}


def test_resnet_cifar_stem_replaces_stem_and_maxpool():
    plain = load_model("torchvision:resnet18", num_classes=10)
    assert plain.input_shape == (3, 224, 224)
    assert plain.card["normalization"] == M.IMAGENET_NORMALIZATION
    assert plain.model.conv1.kernel_size == (7, 7) and isinstance(plain.model.maxpool, nn.MaxPool2d)
    cifar = load_model("torchvision:resnet18", num_classes=10, cifar_stem=True).model
    assert (cifar.conv1.kernel_size, cifar.conv1.stride) == ((3, 3), (1, 1))
    assert isinstance(cifar.maxpool, nn.Identity)
    mb = load_model("torchvision:mobilenet_v2", num_classes=10, cifar_stem=True).model
    assert mb.features[0][0].stride == (1, 1)


def test_cifar_stem_rejected_for_unsupported_family():
    with pytest.raises(ModelLoadError, match="cifar_stem is supported for ResNet-family, VGG and MobileNetV2"):
        load_model("torchvision:squeezenet1_0", num_classes=10, cifar_stem=True)


def test_default_torchvision_model_has_1000_classes():
    lm = load_model("torchvision:mobilenet_v2")
    assert lm.card["num_classes"] == 1000 and lm.model.classifier[-1].out_features == 1000


def test_pretrained_without_internet_gives_clear_message(no_network):
    with pytest.raises(ModelLoadError) as exc:
        load_model("torchvision:resnet18", pretrained=True)
    msg = str(exc.value)
    assert "could not download torchvision weights for resnet18 (no internet?)" in msg
    assert "--weights FILE" in msg and "random initialisation" in msg


def test_pretrained_with_cached_weights_builds_card(monkeypatch):
    import torchvision

    state = torchvision.models.resnet18().state_dict()
    monkeypatch.setattr(M, "_fetch_torchvision_state_dict", lambda w: state)
    lm = load_model("torchvision:resnet18", pretrained=True)
    assert lm.card["weights"] == "ResNet18_Weights.IMAGENET1K_V1"
    assert lm.card["num_classes"] == 1000 and lm.note is None
    assert torch.equal(lm.model.fc.weight, state["fc.weight"])


def test_pretrained_rejects_cifar_stem_and_class_mismatch():
    with pytest.raises(ModelLoadError, match="cifar_stem"):
        load_model("torchvision:resnet18", pretrained=True, cifar_stem=True)
    with pytest.raises(ModelLoadError, match="1000 classes"):
        load_model("torchvision:resnet18", pretrained=True, num_classes=10)


@pytest.mark.parametrize("spec, fragment", [
    ("demo:nope", "unknown demo model 'nope'; available demos: digits-mlp"),
    ("torchvision:resnet19", "unknown torchvision classification architecture 'resnet19'"),
    ("torchvision:", "needs an architecture"),
    ("resnet18", "cannot understand model spec 'resnet18'"),
    ("", "empty model spec"),
])
def test_bad_specs_raise_model_load_error(spec, fragment):
    with pytest.raises(ModelLoadError) as exc:
        load_model(spec)
    assert fragment in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_file_as_spec_points_to_weights(tmp_path):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="weights="):
        load_model(str(f))


def test_directory_spec_dispatches_to_load_folded(tmp_path, monkeypatch):
    import foldviz.persist as fio

    seen = {}

    def fake_load_folded(path, trust_code=False):
        seen["path"] = path
        return "folded!"

    monkeypatch.setattr(fio, "load_folded", fake_load_folded)
    assert load_model(str(tmp_path)) == "folded!"
    assert str(seen["path"]) == str(tmp_path)


def test_build_architecture_errors():
    with pytest.raises(ModelLoadError, match="unknown architecture 'Nope'"):
        build_architecture({"arch": "Nope"})
    with pytest.raises(ModelLoadError, match="bad kwargs for DigitsMLP"):
        build_architecture({"arch": "DigitsMLP", "kwargs": {"depth": 3}})
    m = build_architecture({"arch": "DigitsResNet", "kwargs": {"widths": [8, 16], "blocks": [1, 1]}})
    assert m.fc.in_features == 16 and math.isclose(float(m.bn1.weight.detach().mean()), 1.0)
