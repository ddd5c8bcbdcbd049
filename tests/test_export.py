"""Export of folded models: ONNX (checked with ONNX Runtime), TorchScript and torch.export programs."""
from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import pytest
import torch

from foldviz import cli
from foldviz import export as ex
from foldviz.export import ExportError, export_bytes, export_model
from foldviz.fold import fold
from foldviz.kmeans import DEFAULT_CLUSTERING
from foldviz.plans import FoldPlan
from foldviz.models import load_model
from foldviz.persist import save_folded


def _onnx():
    for pkg in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(pkg)


@pytest.fixture(scope="module")
def folded(tmp_path_factory):
    """demo:digits-resnet folded at 0.5 (Fold-Naive), saved; returns (dir, FoldResult, LoadedModel)."""
    loaded = load_model("demo:digits-resnet")
    plan = FoldPlan(default_ratio=0.5, repair="none", clustering={**DEFAULT_CLUSTERING, "n_init": 1})
    res = fold(loaded.model, plan, example_input=loaded.example_input(1))
    out = save_folded(res, loaded, tmp_path_factory.mktemp("export") / "folded")
    return out, res, loaded


def _x(n=5):
    return torch.randn((n, 1, 8, 8), generator=torch.Generator().manual_seed(7))


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_onnx_export_agrees_with_pytorch_and_ort_runs_the_file(folded, tmp_path):
    _onnx()
    import onnx
    import onnxruntime as ort

    d, res, _ = folded
    out = tmp_path / "m.onnx"
    info = export_model(d, "onnx", out)
    assert info["max_abs_diff"] < 1e-4 and info["opset"] == ex.DEFAULT_OPSET and info["output_scale"] > 1
    assert info["bytes"] == out.stat().st_size and info["check_batch"] == [ex.CHECK_BATCH, 1]
    model = onnx.load(str(out))
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {ex.DEFAULT_OPSET}
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = _x(5)  # a batch size the check did not use: the batch axis is dynamic
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = res.model(x).numpy()
    assert got.shape == (5, 10) and np.abs(got - ref).max() < 1e-4
    lat = ex.ort_latency_pair(out.read_bytes(), out.read_bytes(), (1, 8, 8), 2, threads=1, rounds=3, warmup=1)
    assert lat["batch"] == 2 and lat["threads"] == 1 and lat["rounds"] == 3
    assert lat["a"]["median_ms"] > 0 and lat["b"]["median_ms"] > 0
    assert lat["ratio"] == pytest.approx(lat["b"]["median_ms"] / lat["a"]["median_ms"])


def test_torchscript_and_pt2_exports_load_back_and_agree(folded, tmp_path):
    d, res, _ = folded
    x = _x(3)
    with torch.no_grad():
        ref = res.model(x)
    info = export_model(d, "torchscript", tmp_path / "m.pt")
    assert info["max_abs_diff"] < 1e-4 and info["opset"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts = torch.jit.load(str(tmp_path / "m.pt"))
        assert (ts(x) - ref).abs().max() < 1e-4
    info = export_model(d, "pt2", tmp_path / "m.pt2")
    assert info["max_abs_diff"] < 1e-4
    prog = torch.export.load(str(tmp_path / "m.pt2")).module()
    with torch.no_grad():
        assert (prog(x) - ref).abs().max() < 1e-4


def test_export_refuses_a_disagreeing_export_and_writes_nothing(folded, tmp_path, monkeypatch):
    d, _, _ = folded
    out = tmp_path / "m.pt2"
    out.write_bytes(b"previous export")
    monkeypatch.setattr(ex, "_compare", lambda run, model, inputs: (3e-3, 1.0))
    with pytest.raises(ExportError, match=r"max abs difference 0\.003 > tolerance 0\.0001; nothing was written"):
        export_model(d, "pt2", out, force=True)
    assert out.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt2"]  # no temp file left behind
    info = export_model(d, "pt2", out, force=True, tolerance=1e-2)  # a looser tolerance accepts it
    assert info["max_abs_diff"] == 3e-3 and out.read_bytes() != b"previous export"


def test_export_of_fold_results_modules_and_bad_arguments(folded):
    _, res, loaded = folded
    data, info = export_bytes(res, "pt2", input_shape=loaded.input_shape)
    assert len(data) == info["bytes"] > 0 and info["input_shape"] == [1, 8, 8]
    with pytest.raises(ExportError, match="needs input_shape"):
        export_bytes(res, "pt2")
    with pytest.raises(ExportError, match="unknown export format 'tflite'"):
        export_bytes(loaded, "tflite")
    with pytest.raises(ExportError, match="--opset applies to ONNX"):
        export_bytes(loaded, "pt2", opset=17)
    with pytest.raises(ExportError, match="tolerance"):
        export_bytes(loaded, "pt2", tolerance=float("nan"))


def test_language_model_directories_are_refused_with_one_line(tmp_path, capsys):
    lm = tmp_path / "lm-folded"
    lm.mkdir()
    (lm / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ExportError, match="optimum-cli export onnx --model") as exc:
        export_model(lm, "onnx", tmp_path / "lm.onnx")
    assert "\n" not in str(exc.value)
    assert cli.main(["export", str(lm), "--to", "onnx", "--out", str(tmp_path / "lm.onnx")]) == 2
    _one_line_error(capsys, "language model", "optimum-cli export onnx")
    assert not (tmp_path / "lm.onnx").exists()


def test_cli_export_exit_codes_and_errors(folded, tmp_path, capsys):
    d, _, _ = folded
    out = tmp_path / "m.pt2"
    assert cli.main(["export", str(d), "--to", "pt2", "--out", str(out)]) == 0
    line = capsys.readouterr().out
    assert f"wrote {out}" in line and "max abs difference" in line
    first = out.read_bytes()
    assert cli.main(["export", str(d), "--to", "pt2", "--out", str(out)]) == 2
    _one_line_error(capsys, "already exists", "--force")
    assert out.read_bytes() == first
    assert cli.main(["export", str(d), "--to", "pt2", "--out", str(d / "inside.pt2")]) == 2
    _one_line_error(capsys, "inside the input model")
    with pytest.raises(SystemExit) as exc:
        cli.main(["export", str(d), "--to", "tflite", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    _one_line_error(capsys, "invalid choice")
    assert cli.main(["export", str(d), "--to", "torchscript", "--latency", "--out", str(tmp_path / "t.pt")]) == 2
    _one_line_error(capsys, "--latency", "--to onnx")
    assert cli.main(["export", str(tmp_path / "absent"), "--to", "pt2", "--out", str(tmp_path / "a.pt2")]) == 2
    _one_line_error(capsys)


def test_missing_onnx_packages_are_named(monkeypatch, folded):
    _, _, loaded = folded
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(ExportError, match=r"optional packages .*onnxruntime.*requirements-extras\.txt"):
        export_bytes(loaded, "onnx")


def test_export_subcommand_help_does_not_import_torch():
    import subprocess

    code = ("import sys, foldviz.cli as c; p = c.build_parser(); "
            "print('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(_root()))
    assert res.stdout.strip() == "False", res.stderr


def _root():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent
