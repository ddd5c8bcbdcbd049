"""The engine's invariants, written once over the registry of methods x model kinds.

For every method that applies to a kind, on a small model of that kind:

* ratio 0 is the identity (methods that re-estimate statistics from samples excepted: they change BatchNorm
  statistics by design);
* the parameter count after a fold is the one the cost model predicts without folding, and the one count
  (:func:`foldviz.metrics.count_params`);
* a fold saved by :func:`foldviz.persist.save_folded` loads back through the one loader with the same outputs;
* the input model is never modified.

And for every kind: a network of exact duplicates folds back exactly (the kind's data-free fold without repair).
"""
from __future__ import annotations

import copy

import pytest
import torch

from foldviz.apply import apply_method, repair_inputs
from foldviz.kinds import get_kind
from foldviz.methods import METHODS, MODEL_KINDS, keys_for
from foldviz.metrics import count_params
from foldviz.models import load_model
from foldviz.persist import save_folded
from foldviz.plans import CostModel
from foldviz.utils import state_dict_hash
from kinds_fixtures import duplicate_mlp_neurons, save_hf, tiny_llama, tokens

#: methods that recompute statistics from a batch of (real or synthesised) samples: not the identity at ratio 0
RESETS = {m for m, meth in METHODS.items() if meth.repair in ("r", "dir")}
#: kept small: the Deep-Inversion repairs synthesise this many samples for this many steps
FAST_SETTINGS = {"dir": {"iterations": 5, "batch_size": 8}}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """One loaded model per kind: the bundled digits MLP, a tiny random Llama (saved and loaded as hf:DIR)."""
    d = tmp_path_factory.mktemp("kinds")
    return {"cnn": load_model("demo:digits-vgg"),
            "lm": load_model(save_hf(tiny_llama(nq=8, nkv=2, inter=40, hidden=48, hd=12), d / "llama"))}


CASES = [(k, m) for k in MODEL_KINDS for m in keys_for(k)]


def _run(loaded, method, ratio):
    kind = get_kind(loaded.kind)
    plan = kind.default_plan(loaded, ratio, seed=0,
                             **({"repair_settings": FAST_SETTINGS[METHODS[method].repair]}
                                if METHODS[method].repair in FAST_SETTINGS else {}))
    data = None
    if METHODS[method].needs_data:   # a language model's data: calibration token windows
        data = tokens(4, 16, seed=7) if loaded.kind == "lm" else repair_inputs(loaded, "digits", 64)
    return apply_method(loaded, plan, method, repair_data=data), plan


def _outputs(loaded, model):
    with torch.no_grad():
        if loaded.kind == "lm":
            return model(input_ids=tokens(), use_cache=False).logits
        return model(loaded.example_input(4, seed=3))


def test_every_method_applies_to_at_least_one_kind_and_every_kind_has_a_fold():
    assert all(set(m.applies_to) <= set(MODEL_KINDS) and m.applies_to for m in METHODS.values())
    for kind in MODEL_KINDS:
        assert any(METHODS[k].family == "fold" for k in keys_for(kind)), kind


@pytest.mark.parametrize("kind,method", [c for c in CASES if c[1] not in RESETS], ids=lambda v: str(v))
def test_ratio_zero_is_the_identity(models, kind, method):
    loaded = models[kind]
    sha = state_dict_hash(loaded.model)
    res, _ = _run(loaded, method, 0.0)
    assert count_params(res.model) == count_params(loaded.model)
    torch.testing.assert_close(_outputs(loaded, res.model), _outputs(loaded, loaded.model), rtol=0, atol=1e-5)
    assert state_dict_hash(loaded.model) == sha


@pytest.mark.parametrize("kind,method", CASES, ids=lambda v: str(v))
def test_parameter_count_is_predicted_and_the_fold_round_trips_through_disk(models, kind, method, tmp_path):
    loaded = models[kind]
    sha = state_dict_hash(loaded.model)
    res, plan = _run(loaded, method, 0.3)
    k = get_kind(kind)
    predicted = CostModel(loaded.model, k.graph(loaded), k.cost_input(loaded)).estimate(plan)
    # FLAP adds biases (the tiny Llama had none) to carry its compensation: the only parameters a plan does not size
    added = sum(m.bias.numel() for m in res.model.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None) \
        if METHODS[method].repair == "flap" else 0
    assert count_params(res.model) - added == predicted["params_after"] < count_params(loaded.model)
    assert [g["channels_after"] for g in res.groups] == [g["channels_after"] for g in predicted["groups"]]
    out = save_folded(res, loaded, tmp_path / "out")
    back = load_model(f"file:{out}")
    assert back.kind == kind and count_params(back.model) == count_params(res.model)
    torch.testing.assert_close(_outputs(loaded, back.model), _outputs(loaded, res.model), rtol=0, atol=1e-5)
    assert state_dict_hash(loaded.model) == sha   # the input model is never modified


def test_a_network_of_exact_duplicates_folds_back_exactly_for_every_kind(tmp_path):
    from widen import duplicate_channels

    # image classifier: every channel of every group twice
    base = load_model("demo:digits-mlp")
    wide = copy.copy(base)
    wide.model = duplicate_channels(base.model, base.example_input(2))
    cnn = get_kind("cnn")
    res = apply_method(wide, cnn.default_plan(wide, 0.5, repair="none"), "none")
    assert count_params(res.model) == count_params(base.model)
    torch.testing.assert_close(_outputs(base, res.model), _outputs(base, base.model), rtol=1e-4, atol=1e-4)
    # language model: every MLP neuron twice
    ref = tiny_llama(nq=4, nkv=2, inter=24)
    lm = load_model(save_hf(duplicate_mlp_neurons(ref), tmp_path / "dup"))
    plan = get_kind("lm").default_plan(lm, 0.0, ratios={f"model.layers.{i}.mlp": 0.5 for i in range(2)})
    res = apply_method(lm, plan, "fold")
    assert count_params(res.model) == count_params(ref)
    with torch.no_grad():
        torch.testing.assert_close(res.model(input_ids=tokens()).logits, ref(input_ids=tokens()).logits,
                                   rtol=1e-5, atol=1e-5)
