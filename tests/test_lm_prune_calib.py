"""Wanda-sp and FLAP as registry methods of the one engine: calibration windows as ``repair_data``, the fold's unit
counts, the top-scoring units kept, FLAP's bias compensation through ``compress``, and the CLI's --calib contract."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from foldviz.apply import apply_method, repair_inputs  # noqa: E402
from foldviz.cli import main  # noqa: E402
from foldviz.kinds import get_kind  # noqa: E402
from foldviz.lm.calib import flap_scores, unit_input_stats, unit_maps_from_scores, wanda_sp_scores  # noqa: E402
from foldviz.lm.io import LoadedLM  # noqa: E402
from foldviz.models import load_model  # noqa: E402
from kinds_fixtures import V, logits, tiny_llama, tokens  # noqa: E402

CALIB = {"wanda_sp": wanda_sp_scores, "flap": flap_scores}


def loaded_lm(model) -> LoadedLM:
    return LoadedLM(model, "tiny", {}, (16,))


def windows(n=8, seed=5) -> torch.Tensor:
    return torch.randint(0, V, (n, 16), generator=torch.Generator().manual_seed(seed))


def kept(result) -> dict[str, int]:
    return {g["id"]: g["channels_after"] for g in result.groups}


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_wanda_sp_and_flap_keep_exactly_the_folds_counts_and_the_top_scoring_units(ratio):
    model = tiny_llama(nq=8, nkv=2, inter=24)
    lm = loaded_lm(model)
    plan = get_kind("lm").default_plan(lm, ratio)
    fold = apply_method(lm, plan, "fold")
    stats = unit_input_stats(model, windows(), max_tokens=10 ** 6)
    for method, score in CALIB.items():
        res = apply_method(lm, plan, method, repair_data=windows())
        assert res.method == method and kept(res) == kept(fold)
        expected = unit_maps_from_scores(model, score(model, stats), ratio)
        assert set(res.unit_maps) == set(expected)
        for gid, labels in expected.items():
            np.testing.assert_array_equal(res.unit_maps[gid], labels, err_msg=f"{method} {gid}")
        # query heads: the same number in every KV group
        heads = res.unit_maps["model.layers.0.self_attn"].reshape(2, 4)
        assert len({int((row >= 0).sum()) for row in heads}) == 1


def test_a_neuron_whose_input_is_always_zero_is_removed_first():
    model = tiny_llama(nq=4, nkv=2, inter=24)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[7] = 0.0      # down_proj's input 7 is silu(gate) * 0 on every token
    lm = loaded_lm(model)
    plan = get_kind("lm").default_plan(lm, 0.0, ratios={f"model.layers.{i}.mlp": 0.04 for i in range(2)})
    for method in CALIB:
        res = apply_method(lm, plan, method, repair_data=windows())
        for i in range(2):
            labels = res.unit_maps[f"model.layers.{i}.mlp"]
            assert np.flatnonzero(labels < 0).tolist() == [7], (method, i)


def test_flap_bias_makes_the_pruned_model_equal_the_original_when_removed_inputs_sit_at_their_mean():
    # neuron 3 of every layer has a constant, non-zero input: silu(gate bias) * up bias, whatever the token
    model = tiny_llama(nq=4, nkv=2, inter=24, mlp_bias=True)
    with torch.no_grad():
        for layer in model.model.layers:
            mlp = layer.mlp
            for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                lin.bias.normal_(0, 0.3)
            mlp.gate_proj.weight[3] = 0.0
            mlp.up_proj.weight[3] = 0.0
            mlp.gate_proj.bias[3], mlp.up_proj.bias[3] = 1.5, 2.0
    lm = loaded_lm(model)
    plan = get_kind("lm").default_plan(lm, 0.0, ratios={f"model.layers.{i}.mlp": 0.04 for i in range(2)})
    x = tokens(2, 16, seed=9)
    flap = apply_method(lm, plan, "flap", repair_data=windows())
    assert all(np.flatnonzero(flap.unit_maps[f"model.layers.{i}.mlp"] < 0).tolist() == [3] for i in range(2))
    torch.testing.assert_close(logits(flap.model, x), logits(model, x), rtol=1e-5, atol=1e-5)
    c = torch.nn.functional.silu(torch.tensor(1.5)) * 2.0          # the removed input's calibration mean
    for i, layer in enumerate(model.model.layers):
        down = layer.mlp.down_proj
        added = flap.model.model.layers[i].mlp.down_proj.bias - down.bias
        torch.testing.assert_close(added, down.weight[:, 3] * c, rtol=1e-5, atol=1e-6)
        assert added.abs().max() > 0.1   # without it the pruned model would differ


def test_flap_adds_a_bias_the_saved_config_holds_and_refuses_an_architecture_that_cannot():
    model = tiny_llama(nq=4, nkv=2, inter=24)
    lm = loaded_lm(model)
    res = apply_method(lm, get_kind("lm").default_plan(lm, 0.3), "flap", repair_data=windows())
    assert res.model.config.mlp_bias and res.model.config.attention_bias
    assert res.model.model.layers[0].mlp.down_proj.bias is not None
    assert res.model.model.layers[1].self_attn.o_proj.bias is not None
    assert model.model.layers[0].mlp.down_proj.bias is None      # the input model is never modified
    from transformers import MistralConfig

    mistral = loaded_lm(tiny_llama(nq=4, nkv=2, inter=24, config_cls=MistralConfig))
    with pytest.raises(ValueError, match="cannot hold a bias"):
        apply_method(mistral, get_kind("lm").default_plan(mistral, 0.3), "flap", repair_data=windows())


def test_without_calibration_windows_both_refuse_with_one_line_and_images_are_refused():
    lm = loaded_lm(tiny_llama())
    plan = get_kind("lm").default_plan(lm, 0.3)
    for method in CALIB:
        with pytest.raises(ValueError, match="needs calibration text") as exc:
            apply_method(lm, plan, method)
        assert "\n" not in str(exc.value)
    with pytest.raises(ValueError, match="token ids"):
        apply_method(lm, plan, "wanda_sp", repair_data=torch.randn(4, 16))


def test_repair_inputs_of_a_language_model_are_seeded_calibration_windows():
    lm = load_model("demo:shakespeare-llama")
    w = repair_inputs(lm, "shakespeare:train", 5, seed=3, seqlen=24)
    assert w.dtype == torch.long and w.shape == (5, 24)
    assert torch.equal(w, repair_inputs(lm, "shakespeare:train", 5, seed=3, seqlen=24))
    assert repair_inputs(lm, "shakespeare:train", 2).shape == (2, lm.context_length)
    with pytest.raises(ValueError, match="context length"):
        repair_inputs(lm, "shakespeare:train", 2, seqlen=lm.context_length + 1)


# ----------------------------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------------------------
def run(capsys, *args) -> tuple[int, str]:
    try:
        rc = main([str(a) for a in args])
    except SystemExit as exc:
        rc = exc.code
    return rc, capsys.readouterr().err


FOLD = ["fold", "demo:shakespeare-llama", "--ratio", "0.2", "--no-latency", "--quiet", "--variance-samples", "0"]


def test_cli_refuses_overlapping_calibration_text_and_a_missing_calib(capsys, tmp_path):
    rc, err = run(capsys, *FOLD, "--method", "wanda_sp", "--data", "shakespeare:test", "--calib", "shakespeare:test",
                  "--out", tmp_path / "a")
    assert rc == 2 and err.startswith("error: ") and "is the evaluation text" in err and err.count("\n") == 1
    rc, err = run(capsys, *FOLD, "--method", "flap", "--data", "shakespeare:test", "--out", tmp_path / "b")
    assert rc == 2 and "needs calibration text: pass --calib TEXT_SPEC" in err and err.count("\n") == 1
    rc, err = run(capsys, "sweep", "demo:shakespeare-llama", "--ratios", "0.2", "--methods", "flap", "--data",
                  "shakespeare:test", "--calib", "test", "--out", tmp_path / "s.csv")
    assert rc == 2 and "is the evaluation text" in err
    rc, err = run(capsys, "fold", "demo:digits-mlp", "--ratio", "0.2", "--repair", "none", "--calib",
                  "shakespeare:train", "--out", tmp_path / "c")
    assert rc == 2 and "--calib is for language models; image classifiers take repair data from --data" in err
    assert not any((tmp_path / d).exists() for d in "abc")


def test_cli_fold_with_wanda_sp_reports_the_method_and_flap_round_trips_through_disk(capsys, tmp_path):
    calib = ["--calib", "shakespeare:train", "--calib-samples", "4", "--calib-seqlen", "32"]
    rc, err = run(capsys, *FOLD, "--method", "wanda_sp", "--data", "shakespeare:test", "--eval-limit", "2", *calib,
                  "--out", tmp_path / "w")
    assert rc == 0, err
    report = json.loads((tmp_path / "w" / "report.json").read_text())
    assert (report["method"], report["label"], report["family"]) == ("wanda_sp", "Wanda-sp", "prune")
    assert report["params_after"] < report["params_before"]
    rc, err = run(capsys, *FOLD, "--method", "flap", *calib, "--out", tmp_path / "f")
    assert rc == 0, err
    assert json.loads((tmp_path / "f" / "report.json").read_text())["method"] == "flap"
    back = load_model(f"file:{tmp_path / 'f'}")
    assert back.model.config.mlp_bias and back.model.model.layers[0].mlp.down_proj.bias is not None


def test_a_sweep_runs_wanda_sp_and_flap_on_calibration_windows(capsys, tmp_path):
    out = tmp_path / "s.csv"
    rc, err = run(capsys, "sweep", "demo:shakespeare-llama", "--ratios", "0.2", "--methods", "wanda_sp", "flap",
                  "--data", "shakespeare:test", "--eval-limit", "2", "--calib", "shakespeare:train",
                  "--calib-samples", "4", "--calib-seqlen", "32", "--quiet", "--out", out)
    assert rc == 0, err
    import csv

    rows = list(csv.DictReader(out.open()))
    assert [r["method"] for r in rows] == ["original", "wanda_sp", "flap"]
    assert all(float(r["perplexity"]) > 0 for r in rows)
    rc, err = run(capsys, "sweep", "demo:shakespeare-llama", "--ratios", "0.2", "--methods", "flap", "--data",
                  "shakespeare:test", "--out", tmp_path / "t.csv")
    assert rc == 2 and "--calib" in err
