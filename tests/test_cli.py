"""The command line end to end: inspect, plan, fold (with report and reload), sweep, errors."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from foldviz.cli import main
from foldviz.models import load_model

ROOT = Path(__file__).resolve().parent.parent


def run(*args):
    return main([str(a) for a in args])


def test_inspect_json_lists_groups(capsys):
    assert run("inspect", "demo:digits-resnet", "--json") == 0
    info = json.loads(capsys.readouterr().out)
    ids = [g["id"] for g in info["groups"]]
    assert ids[0] == "conv1" and len(ids) == 9 and all(g["foldable"] for g in info["groups"])
    assert info["params"] == 696042 and len(info["weights_sha256"]) == 64


def test_plan_then_fold_with_plan_writes_model_plan_and_report(tmp_path, capsys):
    plan_path = tmp_path / "plan.json"
    assert run("plan", "demo:digits-vgg", "--ratio", 0.5, "--repair", "ar", "--out", plan_path) == 0
    plan = json.loads(plan_path.read_text())
    plan["ratios"] = {"classifier.0": 0.25}
    plan_path.write_text(json.dumps(plan))
    out = tmp_path / "folded"
    assert run("fold", "demo:digits-vgg", "--plan", plan_path, "--data", "digits", "--eval-limit", 200,
               "--no-latency", "--out", out) == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("params_before", "params_after", "flops_before", "flops_after", "accuracy_before", "accuracy_after",
                "variance_ratio", "groups", "seconds"):
        assert key in report, key
    assert report["params_after"] < report["params_before"] and report["eval_samples"] == 200
    groups = {g["id"]: g for g in report["groups"]}
    assert groups["classifier.0"]["channels_after"] == 192 and groups["features.0"]["channels_after"] == 16
    assert json.loads((out / "plan.json").read_text())["ratios"] == {"classifier.0": 0.25}

    # the saved model loads back through the normal model spec, without pickle, with the same outputs
    original = load_model("demo:digits-vgg")
    reloaded = load_model(str(out))
    x = torch.randn(5, 1, 8, 8)
    from foldviz.fold import fold
    from foldviz.plans import FoldPlan
    again = fold(original.model, FoldPlan.load(out / "plan.json"), example_input=x[:1])
    assert torch.allclose(reloaded.model(x), again.model(x), atol=1e-5)
    assert "Folded model" in reloaded.note
    assert run("inspect", out) == 0  # a folded model is a valid MODEL argument
    assert "classifier.0" in capsys.readouterr().out


def test_fold_r_without_data_is_a_clear_error(tmp_path, capsys):
    assert run("fold", "demo:digits-mlp", "--ratio", 0.3, "--repair", "r", "--out", tmp_path / "x") == 2
    assert "needs real data" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_bad_plan_and_bad_model_errors(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"foldviz_plan": 1, "default_ratio": 0.5, "repair": "ar", "ratios": {"nope": 0.2}}))
    assert run("fold", "demo:digits-mlp", "--plan", bad, "--out", tmp_path / "o") == 2
    assert "unknown group id 'nope'" in capsys.readouterr().err
    assert run("inspect", "demo:no-such-model") == 2
    assert "unknown demo model" in capsys.readouterr().err


def test_sweep_writes_csv(tmp_path):
    out = tmp_path / "s.csv"
    assert run("sweep", "demo:digits-mlp", "--ratios", 0.25, 0.5, "--methods", "none", "l1", "--data", "digits",
               "--eval-limit", 100, "--out", out) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["method"] for r in rows] == ["original", "none", "none", "l1", "l1"]
    assert float(rows[2]["param_sparsity"]) > float(rows[1]["param_sparsity"]) > 0.3


def test_module_entry_point_help(capsys):
    out = subprocess.run([sys.executable, "-m", "foldviz", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and all(s in out.stdout for s in ("inspect", "plan", "fold", "sweep", "train"))
    for sub in ("inspect", "plan", "fold", "sweep", "train"):
        with pytest.raises(SystemExit) as exc:
            main([sub, "--help"])
        assert exc.value.code == 0 and "usage" in capsys.readouterr().out


@pytest.mark.parametrize("ratio", ["1.0", "-0.1"])
def test_ratio_out_of_range_rejected(ratio, capsys):
    with pytest.raises(SystemExit):
        main(["plan", "demo:digits-mlp", "--ratio", ratio, "--out", "x.json"])
    assert "ratio must be in [0, 1)" in capsys.readouterr().err


def test_cli_and_workbench_reports_agree(tmp_path):
    """One report schema: the CLI's report.json and the app's report have the same keys and the same numbers."""
    from foldviz.report import REPORT_KEYS
    from foldviz.session import DataSource, ModelSource, Workbench

    out = tmp_path / "f"
    assert run("fold", "demo:digits-mlp", "--ratio", 0.3, "--repair", "ar", "--data", "digits", "--eval-limit", 150,
               "--no-latency", "--quiet", "--out", out) == 0
    cli = json.loads((out / "report.json").read_text())
    wb = Workbench.load(ModelSource("demo:digits-mlp"))
    app = json.loads(json.dumps(wb.fold(wb.default_plan(0.3, "ar"), DataSource("digits", limit=150),
                                        latency=False).report))
    assert set(cli) == set(app) == set(REPORT_KEYS)
    for key in REPORT_KEYS:
        if key != "seconds":
            assert cli[key] == app[key], key


@pytest.mark.parametrize("argv", [["--help"], ["fold", "--help"], ["train", "--help"], ["sweep", "--help"],
                                  ["fold", "demo:digits-resnet", "--ratio", "2", "--out", "x"],
                                  ["fold", "demo:digits-resnet", "--ratio", "0.3", "--device", "gpu0", "--out", "x"]])
def test_help_and_argument_errors_never_import_torch(argv):
    """Issue #9: `--help` and argument errors answer in well under a second, so the engine (torch, torchvision,
    the demo models) is imported only by a command that runs."""
    code = ("import sys\nfrom foldviz.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in ('torch', 'torchvision', 'numpy', 'sklearn', 'foldviz.models') if m in sys.modules)\n"
            "print('HEAVY', heavy)\n")
    p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "HEAVY []" in p.stdout, p.stdout + p.stderr
    if "--help" not in argv:
        assert p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1


def test_variance_samples_zero_skips_the_measurement_and_says_so(tmp_path, capsys):
    out = tmp_path / "f"
    assert run("fold", "demo:digits-mlp", "--ratio", "0.3", "--repair", "none", "--variance-samples", "0",
               "--no-latency", "--quiet", "--out", out) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["variance_ratio"] is None and rep["variance_inputs"] is None
    assert rep["variance_notes"] == ["variance measurement skipped (variance_samples=0)"]
    assert rep["latency"] is None and rep["params_after"] < rep["params_before"]
    with pytest.raises(SystemExit) as e:
        run("fold", "demo:digits-mlp", "--ratio", "0.3", "--variance-samples", "-1", "--out", tmp_path / "g")
    assert e.value.code == 2
    assert "whole number >= 0" in capsys.readouterr().err


def test_main_cli_folds_a_language_model_into_the_one_report_schema(tmp_path, capsys):
    """`python -m foldviz fold demo:<LM>` goes through the one engine and writes report.json with every REPORT_KEY."""
    pytest.importorskip("transformers")
    from foldviz.cli import main
    from foldviz.report import REPORT_KEYS

    out = tmp_path / "lm"
    assert main(["fold", "demo:shakespeare-llama", "--ratio", "0.25", "--data", "shakespeare:test",
                 "--eval-limit", "8", "--out", str(out), "--prompt", "ROMEO.", "--no-latency"]) == 0
    printed = capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    assert set(rep) == set(REPORT_KEYS) and rep["kind"] == "lm" and rep["method"] == "refit"
    assert rep["label"] == "Fold + refit" and rep["eval_samples"] == 8        # the language models' default
    assert rep["perplexity_after"] > rep["perplexity_before"] > 1 and rep["accuracy_after"] is None
    assert rep["param_sparsity"] == pytest.approx(1 - rep["params_after"] / rep["params_before"])
    assert [g["id"] for g in rep["groups"]][:3] == ["model.hidden", "model.layers.0.mlp", "model.layers.0.self_attn"]
    assert len(rep["variance_ratio"]) == 4 and "windows" in rep["eval_protocol"]
    assert f"perplexity {rep['perplexity_before']:.2f} -> {rep['perplexity_after']:.2f}" in printed
    assert any(n.startswith("prompt 'ROMEO.' after:") for n in rep["notes"])
    assert main(["inspect", "demo:shakespeare-llama"]) == 0 and "model.layers.3.mlp" in capsys.readouterr().out
