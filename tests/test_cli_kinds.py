"""One command-line contract for every model kind and spec form: the same subcommands, flags, errors and safety.

Spec forms: ``demo:`` (an image classifier and a language model), ``torchvision:``, ``hf:`` and ``file:``. Hostile
inputs to the language-model path each give exit code 2, one ``error:`` line, and change no file outside ``--out``.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch

from foldviz.cli import main
from kinds_fixtures import save_hf, tiny_llama


def run(capsys, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the command line; argument errors exit through argparse (SystemExit)."""
    try:
        rc = main([str(a) for a in args])
    except SystemExit as exc:
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with the hash of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hf") / "llama"
    save_hf(tiny_llama(nq=8, nkv=2, inter=40, hidden=48, hd=12), d)
    return d


@pytest.fixture(scope="module")
def folded_cnn(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cnn") / "folded"
    assert main(["fold", "demo:digits-mlp", "--ratio", "0.3", "--repair", "none", "--no-latency", "--quiet",
                 "--out", str(out)]) == 0
    return out


# ----------------------------------------------------------------------------------------------------------------
# the same commands and flags for every spec form
# ----------------------------------------------------------------------------------------------------------------
def _specs(hf_dir, folded_cnn):
    return {"demo (image)": ("demo:digits-mlp", "digits"), "demo (LM)": ("demo:shakespeare-llama", "shakespeare:test"),
            "torchvision": ("torchvision:resnet18", None), "hf": (f"hf:{hf_dir}", None),
            "file": (f"file:{folded_cnn}", "digits")}


@pytest.mark.parametrize("form", ["demo (image)", "demo (LM)", "torchvision", "hf", "file"])
def test_inspect_plan_fold_and_eval_take_the_same_flags_for_every_spec_form(form, hf_dir, folded_cnn, tmp_path,
                                                                           capsys):
    spec, data = _specs(hf_dir, folded_cnn)[form]
    extra = ["--num-classes", "10", "--cifar-stem"] if form == "torchvision" else []
    rc, out, _ = run(capsys, "inspect", spec, "--json", *extra)
    info = json.loads(out)
    assert rc == 0 and info["kind"] in ("cnn", "lm") and info["groups"] and len(info["weights_sha256"]) == 64
    rc, _, err = run(capsys, "plan", spec, "--ratio", "0.5", "--out", tmp_path / "plan.json", *extra)
    assert rc == 0, err
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["model"] == spec and plan["default_ratio"] == 0.5
    args = ["fold", spec, "--plan", tmp_path / "plan.json", "--out", tmp_path / "out", "--no-latency", "--quiet",
            "--variance-samples", "4", *extra]
    if data:
        args += ["--data", data, "--eval-limit", "8"]
    rc, out, err = run(capsys, *args)
    assert rc == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["kind"] == info["kind"] and report["params_after"] < report["params_before"]
    assert json.loads((tmp_path / "out" / "plan.json").read_text())["default_ratio"] == 0.5
    if data:
        metric = "accuracy" if info["kind"] == "cnn" else "perplexity"
        assert report[f"{metric}_after"] is not None and report["eval_samples"] == 8
        rc, out, err = run(capsys, "eval", f"file:{tmp_path / 'out'}", "--data", data, "--eval-limit", "8", "--json")
        assert rc == 0, err
        assert json.loads(out)[metric] == pytest.approx(report[f"{metric}_after"], rel=1e-6)
    # the folded model is a model spec too
    rc, out, _ = run(capsys, "inspect", f"file:{tmp_path / 'out'}", "--json")
    assert rc == 0 and json.loads(out)["params"] == report["params_after"]


def test_help_names_every_spec_form_with_an_example(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for form, example in (("demo:NAME", "demo:shakespeare-llama"), ("torchvision:ARCH", "torchvision:resnet18"),
                          ("hf:DIR", "hf:"), ("file:DIR", "file:")):
        assert form in out and example in out
    assert "shakespeare:test" in out and "perplexity" in out


def test_a_method_of_another_kind_is_a_one_line_error(capsys, tmp_path):
    rc, _, err = run(capsys, "fold", "demo:shakespeare-llama", "--ratio", "0.3", "--method", "l1", "--out",
                     tmp_path / "o")
    assert rc == 2 and err.count("\n") == 1 and "does not apply to a language model" in err
    rc, _, err = run(capsys, "fold", "demo:digits-mlp", "--ratio", "0.3", "--method", "magnitude", "--out",
                     tmp_path / "o")
    assert rc == 2 and "does not apply to an image classifier" in err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------------------------
# hostile inputs to the language-model path
# ----------------------------------------------------------------------------------------------------------------
def _tamper(src: Path, dst: Path, how: str) -> Path:
    """A copy of the HF directory ``src`` damaged in one way."""
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    weights = dst / "model.safetensors"
    cfg = json.loads((dst / "config.json").read_text())
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "huge header":
        raw = weights.read_bytes()
        weights.write_bytes(struct.pack("<Q", 8 * 1024**3) + raw[8:])
    elif how == "nan weights":
        from safetensors.torch import load_file, save_file

        state = load_file(str(weights))
        k = next(k for k in state if k.endswith("down_proj.weight"))
        state[k][0, 0] = float("nan")
        save_file(state, str(weights), metadata={"format": "pt"})
    elif how == "a million layers":
        cfg["num_hidden_layers"] = 1_000_000
    elif how == "three layers":
        cfg["num_hidden_layers"] = 3
    elif how == "wider config":
        cfg["intermediate_size"] = 80
    elif how == "mixture of experts":
        cfg.update(model_type="mixtral", num_local_experts=8, num_experts_per_tok=2)
    elif how == "config not json":
        (dst / "config.json").write_text("{not json")
        return dst
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("how,message", [
    ("truncated", "data offsets outside the file|not a valid safetensors"),
    ("huge header", "not a valid safetensors file"),
    ("nan weights", "NaN or Inf"),
    ("a million layers", "num_hidden_layers=1000000 is not a whole number between 1 and 1024"),
    ("three layers", "config.json says 3 layers but the weights hold 2"),
    ("wider config", "gate_proj.weight is \\[40, 48\\], the config says \\[80, 48\\]"),
    ("mixture of experts", "mixture-of-experts"),
    ("config not json", "not valid JSON"),
])
def test_damaged_language_models_are_one_line_errors_and_change_nothing(how, message, hf_dir, tmp_path, capsys):
    bad = _tamper(hf_dir, tmp_path / "in" / "bad", how)
    before = snapshot(tmp_path)
    rc, out, err = run(capsys, "fold", f"hf:{bad}", "--ratio", "0.3", "--out", tmp_path / "out", "--quiet")
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    import re

    assert re.search(message, err), err
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


def test_bad_text_and_bad_counts_are_one_line_errors(hf_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("To be.")
    rc, _, err = run(capsys, "fold", "demo:shakespeare-llama", "--ratio", "0.3", "--data", f"text:{short}",
                     "--out", tmp_path / "o")
    assert rc == 2 and err.count("\n") == 1 and "fewer than one window" in err and not (tmp_path / "o").exists()
    rc, _, err = run(capsys, "eval", "demo:shakespeare-llama", "--data", "shakespeare:test", "--eval-limit", "0")
    assert rc == 2 and err.count("\n") == 1 and ">= 1" in err
    rc, _, err = run(capsys, "eval", "demo:shakespeare-llama", "--data", "nonsense:spec")
    assert rc == 2 and err.count("\n") == 1 and "unknown text spec" in err


@pytest.mark.parametrize("target", ["input", "inside input", "existing file", "unrelated dir", "other model",
                                    "bundled demo"])
def test_out_never_overwrites_what_foldviz_did_not_write(target, hf_dir, tmp_path, capsys, folded_cnn):
    work = tmp_path / "w"
    src = work / "model"
    src.mkdir(parents=True)
    for p in hf_dir.iterdir():
        (src / p.name).write_bytes(p.read_bytes())
    out = {"input": src, "inside input": src / "sub", "existing file": work / "file.txt",
           "unrelated dir": work / "notes", "other model": work / "other",
           "bundled demo": Path(__file__).resolve().parent.parent / "assets" / "models" / "shakespeare-llama"}[target]
    if target == "existing file":
        out.write_text("keep me")
    if target == "unrelated dir":
        out.mkdir()
        (out / "todo.txt").write_text("keep me")
    if target == "other model":
        save_hf(tiny_llama(), out)   # a Hugging Face directory foldviz did not write
    before = snapshot(work)
    assets = snapshot(Path(__file__).resolve().parent.parent / "assets" / "models")
    for force in ([], ["--force"]):
        rc, _, err = run(capsys, "fold", f"hf:{src}", "--ratio", "0.5", "--out", out, "--quiet", "--no-latency",
                         *force)
        assert rc == 2 and err.count("\n") == 1, err
    assert snapshot(work) == before
    assert snapshot(Path(__file__).resolve().parent.parent / "assets" / "models") == assets


def test_an_earlier_fold_is_replaced_only_with_force_and_atomically(hf_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(capsys, "fold", f"hf:{hf_dir}", "--ratio", "0.5", "--out", out, "--quiet", "--no-latency")[0] == 0
    first = snapshot(out)
    rc, _, err = run(capsys, "fold", f"hf:{hf_dir}", "--ratio", "0.25", "--out", out, "--quiet")
    assert rc == 2 and "--force" in err and snapshot(out) == first
    assert run(capsys, "fold", f"hf:{hf_dir}", "--ratio", "0.25", "--out", out, "--quiet", "--no-latency",
               "--force")[0] == 0
    assert json.loads((out / "plan.json").read_text())["default_ratio"] == 0.25
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]   # no temp or backup left behind


def test_an_app_plan_round_trips_through_a_file_to_the_cli_identically(tmp_path, capsys):
    """A per-layer LM plan made with the app's Workbench, exported, then applied headlessly: the same model."""
    from foldviz.session import Workbench

    wb = Workbench.load("demo:shakespeare-llama")
    plan = wb.default_plan(0.25).with_changes(ratios={"model.layers.0.mlp": 0.5, "model.layers.3.self_attn": 0.5},
                                              skip=["model.layers.2.mlp"])
    (tmp_path / "plan.json").write_text(plan.to_json())   # what the plan page's download button gives
    outcome = wb.fold(plan, latency=False)
    rc, _, err = run(capsys, "fold", "demo:shakespeare-llama", "--plan", tmp_path / "plan.json", "--out",
                     tmp_path / "out", "--format", "foldviz-lm", "--quiet", "--no-latency")
    assert rc == 0, err
    from foldviz.models import load_model

    cli = load_model(str(tmp_path / "out")).model.state_dict()
    app = outcome.model.state_dict()
    assert cli.keys() == app.keys()
    assert all(torch.equal(cli[k], app[k]) for k in app)
