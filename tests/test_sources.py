"""Model sources: timm:NAME and py:FILE:FACTORY specs, their cards, folds, persistence and refusals."""
from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from torch import nn

from foldviz import cli
from foldviz.checkpoints import ModelLoadError, save_safetensors
from foldviz.fold import fold
from foldviz.foldcheck import duplicate_channel_check
from foldviz.groups import find_groups
from foldviz.kmeans import DEFAULT_CLUSTERING
from foldviz.metrics import count_params
from foldviz.models import load_model
from foldviz.persist import save_folded
from foldviz.plans import FoldPlan

FAST = {**DEFAULT_CLUSTERING, "n_init": 1}


def _plan(ratio, repair="none"):
    return FoldPlan(default_ratio=ratio, repair=repair, clustering=dict(FAST))


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------
# timm
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def timm():
    return pytest.importorskip("timm")


def test_timm_spec_card_groups_fold_and_round_trip(timm, tmp_path):
    # MobileNetV3 uses timm's BatchNormAct2d (a BatchNorm2d subclass with its activation inside): persisting the
    # folded model must resize those layers in place rather than replace them
    loaded = load_model("timm:mobilenetv3_small_050")
    cfg = loaded.model.pretrained_cfg
    assert loaded.spec == "timm:mobilenetv3_small_050"
    assert loaded.input_shape == tuple(cfg["input_size"]) == (3, 224, 224)
    assert loaded.card["normalization"] == {"mean": list(cfg["mean"]), "std": list(cfg["std"])}
    assert loaded.num_classes == 1000 and "Random initialisation" in loaded.note
    x = loaded.example_input(1)
    res = fold(loaded.model, _plan(0.5), example_input=x)
    assert sum(g["foldable"] for g in res.groups) == len(res.groups) == 26
    assert count_params(res.model) < 0.6 * count_params(loaded.model)
    out = save_folded(res, loaded, tmp_path / "f")
    back = load_model(str(out))
    bn_act = [n for n, m in back.model.named_modules() if type(m).__name__ == "BatchNormAct2d"]
    assert bn_act and all(hasattr(back.model.get_submodule(n), "act") for n in bn_act)
    xb = loaded.example_input(2, seed=3)
    with torch.no_grad():
        assert torch.allclose(back.model(xb), res.model(xb), atol=1e-6, rtol=1e-5)
    assert count_params(back.model) == count_params(res.model)
    assert back.card["arch"] == "timm:mobilenetv3_small_050"


def test_timm_ratio_zero_is_the_identity_and_duplicates_fold_exactly(timm):
    # a small ViT: MLP hidden units fold; attention qkv and the residual stream are refused with reasons
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    graph = find_groups(vit, x[:1])
    ids = {g.id: g for g in graph.groups}
    assert [g.id for g in graph.foldable] == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    assert "not one-to-one" in ids["blocks.0.attn.qkv"].reason
    assert "nn.Parameter" in ids["patch_embed.proj"].reason
    same = fold(vit, _plan(0.0), example_input=x[:1])
    with torch.no_grad():
        assert torch.equal(same.model(x), vit(x))
    chk = duplicate_channel_check(vit, x, ratio=0.5)
    assert chk["groups_folded"] == 2 and chk["rel_diff"] < 1e-5
    assert chk["params_after"] == chk["params_before"] - 2 * (2 * 192 * (768 // 2) + 768 // 2)


def test_dfr_repairs_a_model_without_batchnorm(timm):
    # tokens (N, L, C): the Linear layers' channels are the last axis. An exact fold (duplicated hidden units) leaves
    # nothing to repair, so Fold-DFR's rescaling of the Linear layers must keep the function
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    chk = duplicate_channel_check(vit, x, ratio=0.5, repair="dfr", repair_settings={"samples": 8}, num_classes=10)
    assert chk["groups_folded"] == 2 and chk["rel_diff"] < 1e-4


def test_split_outputs_are_refused_not_folded_wrongly():
    class Split(nn.Module):  # CSPNet-style: one conv's output split in two halves that go different ways
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(4, 4, 1)
            self.c = nn.Conv2d(8, 6, 1)

        def forward(self, x):
            left, right = self.a(x).split(4, dim=1)
            return self.c(torch.cat([left, self.b(right)], dim=1)).mean((2, 3))

    groups = find_groups(Split().eval(), torch.randn(1, 3, 5, 5)).groups
    split = [g for g in groups if g.id == "a"]
    assert split and all(not g.foldable and "split between several channel groups" in g.reason for g in split)


def test_timm_weights_file_sets_the_classes_and_pretrained_reads_only_the_cache(timm, tmp_path, monkeypatch):
    src = timm.create_model("resnet10t", num_classes=7)
    save_safetensors(src, tmp_path / "w.safetensors")
    loaded = load_model("timm:resnet10t", weights=tmp_path / "w.safetensors")
    assert loaded.num_classes == 7 and loaded.note is None
    x = loaded.example_input(1)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), src.eval()(x))
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache and foldviz never downloads"):
        load_model("timm:resnet10t", pretrained=True)
    # the hub's cache layout: models--ORG--NAME/{refs/main, snapshots/REV/FILE}
    repo = timm.create_model("resnet10t").pretrained_cfg["hf_hub_id"]
    base = cache / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text("abc123")
    full = timm.create_model("resnet10t")
    save_safetensors(full, base / "snapshots" / "abc123" / "model.safetensors")
    pre = load_model("timm:resnet10t", pretrained=True)
    assert pre.card["weights"] == f"hf-cache:{repo}" and pre.note is None
    with torch.no_grad():
        assert torch.equal(pre.model(x), full.eval()(x))
    with pytest.raises(ModelLoadError, match="either pretrained=True or weights=FILE"):
        load_model("timm:resnet10t", pretrained=True, weights=tmp_path / "w.safetensors")


def test_timm_errors_are_one_line(timm, monkeypatch):
    with pytest.raises(ModelLoadError, match="unknown timm architecture 'resnet10x'.*Did you mean"):
        load_model("timm:resnet10x")
    with pytest.raises(ModelLoadError, match="needs a model name"):
        load_model("timm:")
    with pytest.raises(ModelLoadError, match="cifar_stem only applies"):
        load_model("timm:resnet10t", cifar_stem=True)
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ModelLoadError, match="optional timm package: pip install timm"):
        load_model("timm:resnet10t")


# ---------------------------------------------------------------------------------------------------------------
# py:FILE:FACTORY
# ---------------------------------------------------------------------------------------------------------------
USER_FILE = '''
import torch
from torch import nn

MARK = []


def build():
    MARK.append(1)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                      nn.Conv2d(12, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    m.input_shape = (3, 12, 12)
    m.normalization = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    return m


def not_a_model():
    return {"weights": 1}


def broken():
    raise RuntimeError("factory failed on purpose")


def no_shape():
    return nn.Linear(3, 2)
'''


@pytest.fixture
def user_file(tmp_path):
    f = tmp_path / "user_models.py"
    f.write_text(textwrap.dedent(USER_FILE))
    return f


def test_py_spec_is_refused_without_trust_before_the_file_is_read(tmp_path, capsys):
    missing = tmp_path / "does_not_exist.py"
    with pytest.raises(ModelLoadError, match="runs Python code from a file.*--trust-code") as exc:
        load_model(f"py:{missing}:build")
    assert "\n" not in str(exc.value) and "not found" not in str(exc.value)
    out = tmp_path / "o"
    assert cli.main(["fold", f"py:{missing}:build", "--ratio", "0.5", "--out", str(out)]) == 2
    _one_line_error(capsys, "--trust-code")
    assert not out.exists()


def test_py_spec_with_trust_loads_folds_saves_and_needs_trust_to_reload(user_file, tmp_path, capsys):
    loaded = load_model(f"py:{user_file}:build", trust_code=True)
    assert loaded.input_shape == (3, 12, 12) and loaded.num_classes == 5
    assert loaded.card["arch"] == "py" and loaded.card["kwargs"]["factory"] == "build"
    assert loaded.card["normalization"] == {"mean": [0.5] * 3, "std": [0.25] * 3}
    out = tmp_path / "folded"
    rc = cli.main(["fold", f"py:{user_file}:build", "--trust-code", "--ratio", "0.5", "--repair", "none",
                   "--no-latency", "--variance-samples", "0", "--quiet", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    with pytest.raises(ModelLoadError, match="built by build\\(\\) in .*--trust-code"):
        load_model(str(out))
    back = load_model(str(out), trust_code=True)
    assert count_params(back.model) < count_params(loaded.model)
    res = fold(loaded.model, _plan(0.5), example_input=loaded.example_input(1))
    x = loaded.example_input(3)
    with torch.no_grad():
        assert back.model(x).shape == res.model(x).shape == (3, 5)
    user_file.write_text(user_file.read_text() + "\n# edited\n")  # the same layers, but not the same file
    with pytest.raises(ModelLoadError, match="changed since the model was saved"):
        load_model(str(out), trust_code=True)


def test_py_spec_weights_come_from_a_state_dict_file(user_file, tmp_path):
    ref = load_model(f"py:{user_file}:build", trust_code=True)
    with torch.no_grad():
        for p in ref.model.parameters():
            p.mul_(2)
    save_safetensors(ref.model, tmp_path / "w.safetensors")
    got = load_model(f"py:{user_file}:build", trust_code=True, weights=tmp_path / "w.safetensors")
    x = ref.example_input(2)
    with torch.no_grad():
        assert torch.equal(got.model(x), ref.model(x))
    assert got.card["weights"] == str(tmp_path / "w.safetensors")


@pytest.mark.parametrize("factory, message", [
    ("not_a_model", r"not_a_model\(\) in .* returned a dict, not a torch.nn.Module"),
    ("broken", r"broken\(\) in .* raised RuntimeError: factory failed on purpose"),
    ("missing", "has no callable 'missing' \\(its callables: broken, build, no_shape, not_a_model\\)"),
    ("no_shape", "no usable input_shape attribute"),
    ("1bad", "not a Python identifier"),
])
def test_py_spec_bad_factories_are_one_line_errors(user_file, factory, message):
    with pytest.raises(ModelLoadError, match=message) as exc:
        load_model(f"py:{user_file}:{factory}", trust_code=True)
    assert "\n" not in str(exc.value)


def test_py_spec_bad_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad_syntax.py"
    bad.write_text("def build(:\n    pass\n")
    with pytest.raises(ModelLoadError, match="importing .*bad_syntax.py failed: SyntaxError"):
        load_model(f"py:{bad}:build", trust_code=True)
    with pytest.raises(ModelLoadError, match="file not found"):
        load_model(f"py:{tmp_path / 'nope.py'}:build", trust_code=True)
    txt = tmp_path / "model.txt"
    txt.write_text("x = 1")
    with pytest.raises(ModelLoadError, match="not a Python file"):
        load_model(f"py:{txt}:build", trust_code=True)
    with pytest.raises(ModelLoadError, match="must be py:FILE:FACTORY"):
        load_model("py:justafile.py", trust_code=True)
    with pytest.raises(ModelLoadError, match="do not apply to py:FILE:FACTORY"):
        load_model(f"py:{bad}:build", trust_code=True, num_classes=3)


def test_sweeps_carry_trust_from_the_command_line_only(user_file, tmp_path, capsys):
    from foldviz.sweepspec import ModelRef, grant_trust, spec_from_args, spec_from_dict

    spec = spec_from_args(ModelRef(spec=f"py:{user_file}:build", trust_code=True), [0.3], ["none"], "digits")
    assert spec.models[0].trust_code and "trust_code" not in spec.to_dict()["models"][0]
    assert spec.models[0].load().input_shape == (3, 12, 12)
    again = spec_from_dict(spec.to_dict())  # a spec file cannot grant trust: it must come from the caller
    assert not again.models[0].trust_code
    with pytest.raises(ModelLoadError, match="--trust-code"):
        again.models[0].load()
    assert grant_trust(again, True).models[0].trust_code
    bad = {**spec.to_dict(), "models": [{"spec": f"py:{user_file}:build", "trust_code": True}]}
    with pytest.raises(ValueError, match="trust_code"):
        spec_from_dict(bad)
    out = tmp_path / "s.csv"
    assert cli.main(["sweep", f"py:{user_file}:build", "--ratios", "0.3", "--methods", "none", "--data", "digits",
                     "--quiet", "--out", str(out)]) == 2
    _one_line_error(capsys, "--trust-code")


def test_py_factory_may_import_sibling_modules(tmp_path):
    (tmp_path / "blocks_for_test.py").write_text("from torch import nn\n\ndef head(n):\n    return nn.Linear(6, n)\n")
    (tmp_path / "net.py").write_text(
        "from torch import nn\nfrom blocks_for_test import head\n\n"
        "def build():\n    m = nn.Sequential(nn.Flatten(), nn.Linear(8, 6), nn.ReLU(), head(3))\n"
        "    m.input_shape = (8,)\n    return m\n")
    import sys as _sys

    before = list(_sys.path)
    loaded = load_model(f"py:{tmp_path / 'net.py'}:build", trust_code=True)
    assert loaded.input_shape == (8,) and loaded.num_classes == 3 and _sys.path == before
    res = fold(loaded.model, _plan(0.5), example_input=loaded.example_input(1))
    assert res.model[1].out_features == 3
