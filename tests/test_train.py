"""Training the demo presets (short runs) and the consistency of the bundled assets with the presets."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from foldviz import train as T
from foldviz.data import evaluate, load_dataset, make_loader
from foldviz.models import list_demos, load_model
from foldviz.utils import state_dict_hash


def test_short_training_learns_and_writes_loadable_files(tmp_path):
    seen = []
    card = T.train_preset("digits-mlp", out_dir=tmp_path, epochs=2, progress=lambda e, n, s: seen.append((e, n, s)))
    assert [(e, n) for e, n, _ in seen] == [(1, 2), (2, 2)]
    assert set(seen[-1][2]) == {"loss", "train_accuracy", "lr"}
    assert card["test_accuracy"] > 0.5  # chance is 0.1
    assert card["recipe"]["epochs"] == 2 and card["name"] == "digits-mlp"
    weights, card_file = tmp_path / "digits-mlp.safetensors", tmp_path / "digits-mlp.json"
    assert weights.is_file() and card_file.is_file()
    assert json.loads(card_file.read_text()) == card

    lm = load_model("demo:digits-mlp", weights=weights)
    assert state_dict_hash(lm.model) == card["weights_sha256"]
    res = evaluate(lm.model, make_loader(load_dataset("digits", "test", card=card)))
    assert res.accuracy == pytest.approx(card["test_accuracy"], abs=1e-6)
    assert res.loss == pytest.approx(card["test_loss"], abs=1e-5)


def test_training_is_deterministic_and_restores_global_state(tmp_path):
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    a = T.train_preset("digits-mlp", out_dir=tmp_path / "a", epochs=1)
    b = T.train_preset("digits-mlp", out_dir=tmp_path / "b", epochs=1)
    assert a["weights_sha256"] == b["weights_sha256"]
    assert torch.get_num_threads() == threads and torch.are_deterministic_algorithms_enabled() == det


def test_unknown_preset_and_bad_epochs(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'digits-foo'"):
        T.train_preset("digits-foo", out_dir=tmp_path)
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        T.train_preset("digits-mlp", out_dir=tmp_path, epochs=0)


def test_train_subparser_and_run_train(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    T.add_train_subparser(sub)
    args = parser.parse_args(["train", "--preset", "digits-mlp", "--epochs", "1", "--out", str(tmp_path)])
    assert args.func is T.run_train
    assert T.run_train(args) == 0
    out = capsys.readouterr().out
    assert "[digits-mlp] epoch   1/1" in out and "test accuracy" in out
    assert (tmp_path / "digits-mlp.json").is_file()
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--preset", "nope"])


def test_bundled_assets_match_presets(demo_card):
    assert sorted(T.PRESETS) == list_demos()
    for name, preset in T.PRESETS.items():
        card = demo_card(name)
        assert card["arch"] == preset["arch"]
        assert card["kwargs"] == preset["kwargs"]
        assert card["recipe"] == {**T.DEFAULT_RECIPE, **preset.get("recipe", {})}
        assert card["seed"] == T.SEED
        assert card["test_accuracy"] >= 0.95


def test_shift_augmentation_moves_whole_image_by_at_most_one_pixel():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(50, 1, 8, 8)
    x[:, 0, 3:5, 3:5] = 1.0  # a blob away from the border survives every shift
    out = T._shift_batch(x, g)
    assert out.shape == x.shape
    assert torch.allclose(out.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)))
    offsets = set()
    for img in out[:, 0]:
        ys, xs = torch.nonzero(img, as_tuple=True)
        offsets.add((int(ys.min()) - 3, int(xs.min()) - 3))
    assert offsets <= {(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)} and len(offsets) > 3


def test_lr_schedule_warms_up_then_anneals():
    f = [T._lr_factor(s, 10, 100) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] < 0.01
