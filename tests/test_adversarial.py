"""Issue #13: nothing lost, no traceback. Every bad input is written here, in tmp_path, and must give a one-line
error (CLI: ``error: ...`` on stderr, exit 2) or a ModelLoadError/PlanError/DataError -- never a traceback, never
a lost or half-written model, never a silently wrong result."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from foldviz import cli
from foldviz.checkpoints import ModelLoadError
from foldviz.data import DataError, evaluate, load_dataset, make_loader
from foldviz.models import load_model
from foldviz.plans import FoldPlan, PlanError

REPO = Path(__file__).resolve().parent.parent
FAST = ["--no-latency", "--quiet"]


def run(*args):
    return cli.main([str(a) for a in args])


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def snapshot(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def folded(tmp_path_factory) -> Path:
    """A folded demo MLP, written once; tests copy it before damaging it."""
    out = tmp_path_factory.mktemp("base") / "F"
    assert cli.main(["fold", "demo:digits-mlp", "--ratio", "0.3", *FAST, "--out", str(out)]) == 0
    return out


@pytest.fixture
def copy_of(folded, tmp_path):
    def _copy(name="G") -> Path:
        dst = tmp_path / name
        shutil.copytree(folded, dst)
        return dst
    return _copy


def rewrite_meta(d: Path, fn) -> None:
    meta = json.loads((d / "foldviz-model.json").read_text())
    fn(meta)
    (d / "foldviz-model.json").write_text(json.dumps(meta))


# ------------------------------------------------------------------------------------------------------------
# data loss
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("force", [False, True])
def test_fold_never_writes_into_its_own_input(copy_of, capsys, force):
    f = copy_of()
    before = snapshot(f)
    assert run("fold", f, "--ratio", 0.3, *FAST, "--out", f, *(["--force"] if force else [])) == 2
    one_line_error(capsys, "input model")
    assert snapshot(f) == before
    sub = f / "inner"  # inside the input is refused too
    assert run("fold", f, "--ratio", 0.3, *FAST, "--out", sub) == 2
    assert not sub.exists() and snapshot(f) == before


def test_out_holding_another_model_needs_force_and_is_swapped_atomically(copy_of, tmp_path, capsys):
    other = copy_of("other")
    before = snapshot(other)
    assert run("fold", "demo:digits-mlp", "--ratio", 0.5, *FAST, "--out", other) == 2
    one_line_error(capsys, "--force")
    assert snapshot(other) == before
    assert run("fold", "demo:digits-mlp", "--ratio", 0.5, *FAST, "--force", "--out", other) == 0
    assert snapshot(other) != before
    assert json.loads((other / "plan.json").read_text())["default_ratio"] == 0.5
    load_model(str(other))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]  # no temp or backup siblings left


def test_out_holding_other_files_is_refused_even_with_force(tmp_path, capsys):
    d = tmp_path / "photos"
    d.mkdir()
    (d / "cat.jpg").write_bytes(b"meow")
    assert run("fold", "demo:digits-mlp", "--ratio", 0.3, *FAST, "--force", "--out", d) == 2
    one_line_error(capsys, "not a foldviz model")
    assert [p.name for p in d.iterdir()] == ["cat.jpg"]


def test_crash_between_weights_and_metadata_keeps_the_old_model(copy_of, tmp_path, capsys, monkeypatch):
    out = copy_of("out")
    before = snapshot(out)
    import foldviz.persist as fio

    def boom(*_a, **_k):  # called after model.safetensors is written, for foldviz-model.json
        raise KeyboardInterrupt

    monkeypatch.setattr(fio, "dumps_json", boom)
    assert run("fold", "demo:digits-mlp", "--ratio", 0.5, *FAST, "--force", "--out", out) == 130
    assert capsys.readouterr().err == ""  # Ctrl+C is quiet
    assert snapshot(out) == before
    load_model(str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_ctrl_c_during_fold_leaves_no_output(tmp_path, capsys, monkeypatch):
    import foldviz.report as report

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "build_report", interrupted)
    assert run("fold", "demo:digits-mlp", "--ratio", 0.3, *FAST, "--out", tmp_path / "new") == 130
    assert capsys.readouterr().err == ""
    assert list(tmp_path.iterdir()) == []


def test_sweep_validates_out_before_any_work(tmp_path, capsys, monkeypatch):
    import foldviz.sweep as sweep_mod

    def never(*_a, **_k):
        raise AssertionError("the sweep must not start")

    monkeypatch.setattr(sweep_mod, "run_sweep", never)
    assert run("sweep", "demo:digits-mlp", "--ratios", 0.3, "--data", "digits", "--out", tmp_path) == 2
    one_line_error(capsys, "is a directory")
    existing = tmp_path / "r.csv"
    existing.write_text("keep me")
    assert run("sweep", "demo:digits-mlp", "--ratios", 0.3, "--data", "digits", "--out", existing) == 2
    one_line_error(capsys, "not a foldviz sweep")  # an existing results file is resumed; anything else is refused
    assert existing.read_text() == "keep me"


def test_plan_out_dir_and_fold_out_file_are_one_line_errors(tmp_path, capsys):
    assert run("plan", "demo:digits-mlp", "--ratio", 0.3, "--out", tmp_path) == 2
    one_line_error(capsys, "is a directory")
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert run("fold", "demo:digits-mlp", "--ratio", 0.3, *FAST, "--out", f) == 2
    one_line_error(capsys, "is a file")
    assert f.read_text() == "x"
    assert run("plan", "demo:digits-mlp", "--ratio", 0.3, "--out", f) == 2  # existing file: --force
    one_line_error(capsys, "--force")
    assert run("plan", "demo:digits-mlp", "--ratio", 0.3, "--force", "--out", f) == 0
    assert json.loads(f.read_text())["default_ratio"] == 0.3


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    from foldviz import utils

    p = tmp_path / "plan.json"
    p.write_text("old")

    def fail(*_a):
        raise OSError("disk full")

    monkeypatch.setattr(utils.os, "replace", fail)
    with pytest.raises(OSError):
        utils.atomic_write_text(p, "new")
    assert p.read_text() == "old" and [x.name for x in tmp_path.iterdir()] == ["plan.json"]


# ------------------------------------------------------------------------------------------------------------
# damaged folded-model directories
# ------------------------------------------------------------------------------------------------------------
def _garbage(d):
    (d / "model.safetensors").write_bytes(b"\x00garbage" * 16)


def _truncated(d):
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def _tiny(d):
    (d / "model.safetensors").write_bytes(b"abc")


def _symlink(d):
    target = d.parent / "elsewhere.safetensors"
    shutil.move(d / "model.safetensors", target)
    (d / "model.safetensors").symlink_to(target)


def _first_layer(meta):
    return next(iter(meta["layers"]))


DAMAGE = {
    "garbage weights": (_garbage, "not a valid safetensors"),
    "truncated weights": (_truncated, "outside the file"),
    "3-byte weights": (_tiny, "not a safetensors file"),
    "symlinked weights": (_symlink, "symlink"),
    "missing weights": (lambda d: (d / "model.safetensors").unlink(), "missing"),
    "missing key": (lambda d: rewrite_meta(d, lambda m: m.pop("layers")), "'layers' is a required property"),
    "mistyped key": (lambda d: rewrite_meta(d, lambda m: m.update(base_card="resnet")), "base_card"),
    "mistyped layers": (lambda d: rewrite_meta(d, lambda m: m.update(layers=[1, 2])), "layers"),
    "mistyped arg": (lambda d: rewrite_meta(d, lambda m: m["layers"][_first_layer(m)]["args"].update(in_features="64")),
                     "in_features"),
    "negative size": (lambda d: rewrite_meta(d, lambda m: m["layers"][_first_layer(m)]["args"].update(out_features=-3)),
                      "out_features"),
    "unknown layer type": (lambda d: rewrite_meta(d, lambda m: m["layers"][_first_layer(m)].update(type="Module")),
                           "type"),
    "device arg": (lambda d: rewrite_meta(d, lambda m: m["layers"][_first_layer(m)]["args"].update(device="meta")),
                   "'device' was unexpected"),
    "unknown layer name": (lambda d: rewrite_meta(d, lambda m: m["layers"].update(
        {"nope": {"type": "Linear", "args": {"in_features": 2, "out_features": 2}}})), "nope"),
    "sizes do not match weights": (lambda d: rewrite_meta(
        d, lambda m: m["layers"][_first_layer(m)]["args"].update(out_features=7)), "do not match the weights"),
    "deep json": (lambda d: (d / "foldviz-model.json").write_text("[" * 100_000 + "]" * 100_000), "levels deep"),
    "not json": (lambda d: (d / "foldviz-model.json").write_text("{nope"), "not valid JSON"),
    "NaN token": (lambda d: (d / "foldviz-model.json").write_text(
        (d / "foldviz-model.json").read_text().replace('"version": 1', '"version": 1, "x": NaN')), "not valid JSON"),
    "wrong version": (lambda d: rewrite_meta(d, lambda m: m.update(version=99)), "unsupported format"),
    "missing metadata": (lambda d: (d / "foldviz-model.json").unlink(), "not a folded-model directory"),
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_damaged_folded_dir_is_a_one_line_error(copy_of, capsys, name):
    damage, needle = DAMAGE[name]
    d = copy_of()
    damage(d)
    with pytest.raises(ModelLoadError, match=None) as exc:
        load_model(str(d))
    assert needle in str(exc.value), str(exc.value)
    assert run("inspect", d) == 2
    one_line_error(capsys, needle)


def test_workbench_load_reports_damage_instead_of_raising_safetensor_error(copy_of):
    from foldviz.session import Workbench, WorkbenchError

    d = copy_of()
    _garbage(d)
    with pytest.raises(WorkbenchError, match="safetensors"):
        Workbench.load(str(d))


def test_huge_layer_in_small_metadata_is_refused_before_allocating(copy_of):
    d = copy_of()
    rewrite_meta(d, lambda m: m["layers"][_first_layer(m)]["args"].update(in_features=25000, out_features=25000))
    assert (d / "foldviz-model.json").stat().st_size < 10_000
    import resource

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ModelLoadError, match=r"25000, 25000"):
        load_model(str(d))
    # a 25000x25000 float32 Linear is 2.5 GB: the check runs on the meta device and the safetensors header
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 500_000  # KiB


def test_huge_base_architecture_kwargs_are_never_allocated(copy_of):
    d = copy_of()
    rewrite_meta(d, lambda m: m["base_card"]["kwargs"].update(hidden=[100_000, 100_000, 128]))
    # the 40 GB base architecture is only ever built on the meta device; the recorded layers replace it, and
    # what is finally allocated is what the (small) weights file holds
    loaded = load_model(str(d))
    assert loaded.model.fc1.out_features < 1000


def test_oversized_metadata_is_not_read(copy_of):
    d = copy_of()
    with open(d / "foldviz-model.json", "r+b") as f:
        f.truncate(600 * 1024 * 1024)  # sparse: costs no disk
    with pytest.raises(ModelLoadError, match="larger than the limit"):
        load_model(str(d))


def _rewrite_weights(d: Path, fn) -> None:
    from safetensors.torch import load_file

    state = load_file(str(d / "model.safetensors"))
    fn(state)
    save_file(state, str(d / "model.safetensors"))


@pytest.mark.parametrize("fn, needle", [
    (lambda s: s["fc1.weight"].__setitem__((0, 0), float("nan")), "NaN or Inf"),
    (lambda s: s.update({"fc1.weight": s["fc1.weight"].to(torch.int8)}), "wrong dtype"),
])
def test_folded_dir_with_bad_weight_values(copy_of, fn, needle):
    d = copy_of()
    _rewrite_weights(d, fn)
    with pytest.raises(ModelLoadError, match=needle):
        load_model(str(d))


def test_folded_dir_with_weights_option_is_an_error(folded, capsys):
    assert run("inspect", folded, "--weights", "other.safetensors") == 2
    one_line_error(capsys, "--weights")


@pytest.mark.parametrize("name", ["../../x", "../models/digits-mlp", "/etc/passwd", "digits-mlp/..", "a\\b"])
def test_demo_names_cannot_escape_assets(name):
    with pytest.raises(ModelLoadError, match="demo"):
        load_model(f"demo:{name}")


# ------------------------------------------------------------------------------------------------------------
# checkpoints: dtypes and non-finite values
# ------------------------------------------------------------------------------------------------------------
def _demo_state(name="digits-mlp"):
    return {k: v.clone() for k, v in load_model(f"demo:{name}").model.state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.complex64])
def test_checkpoint_with_non_float_weights_is_refused(tmp_path, dtype):
    state = _demo_state()
    state["fc1.weight"] = state["fc1.weight"].to(dtype)
    path = tmp_path / "w.pt"
    torch.save(state, path)
    with pytest.raises(ModelLoadError, match=r"fc1\.weight"):
        load_model("demo:digits-mlp", weights=str(path))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_checkpoint_with_non_finite_weights_names_the_tensors(tmp_path, capsys, bad):
    state = _demo_state()
    for k in ("fc1.weight", "fc2.bias"):
        state[k].view(-1)[0] = bad
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelLoadError, match=r"NaN or Inf.*fc1\.weight.*fc2\.bias"):
        load_model("demo:digits-mlp", weights=str(path))
    assert run("inspect", "demo:digits-mlp", "--weights", path) == 2
    one_line_error(capsys, "fc1.weight")


def test_checkpoint_in_half_precision_with_integer_counters_is_fine(tmp_path):
    state = _demo_state("digits-resnet")
    assert any(k.endswith("num_batches_tracked") for k in state)
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    assert load_model("demo:digits-resnet", weights=str(path)).model.fc.weight.dtype == torch.float32


# ------------------------------------------------------------------------------------------------------------
# plans
# ------------------------------------------------------------------------------------------------------------
BASE_PLAN = {"foldviz_plan": 1, "default_ratio": 0.3, "repair": "ar"}


@pytest.mark.parametrize("patch, needle", [
    ({"default_ratio": float("nan")}, "default_ratio"),
    ({"default_ratio": float("inf")}, "default_ratio"),
    ({"ratios": {"fc1": float("nan")}}, "ratios.fc1"),
    ({"seed": 1.0}, "seed"),
    ({"clustering": {"n_init": 2.0}}, "clustering.n_init"),
    ({"repair_settings": {"samples": 64.0}}, "repair_settings.samples"),
])
def test_plan_numbers_must_be_finite_and_integers_integers(patch, needle):
    with pytest.raises(PlanError, match=needle):
        FoldPlan.from_dict({**BASE_PLAN, **patch})


def test_plan_dataclass_rejects_nan_and_writes_strict_json(tmp_path):
    with pytest.raises(PlanError, match="finite"):
        FoldPlan(default_ratio=float("nan"))
    plan = FoldPlan(default_ratio=0.25)
    plan.default_ratio = float("nan")  # mutated after construction: still never written as a NaN token
    with pytest.raises(ValueError):
        plan.save(tmp_path / "p.json")
    assert not (tmp_path / "p.json").exists()
    with pytest.raises(PlanError, match="finite"):
        FoldPlan.from_json(b'{"foldviz_plan": 1, "default_ratio": NaN, "repair": "ar"}')


def test_cli_fold_with_nan_plan_is_an_error(tmp_path, capsys):
    p = tmp_path / "plan.json"
    p.write_text('{"foldviz_plan": 1, "default_ratio": NaN, "repair": "ar"}')
    assert run("fold", "demo:digits-mlp", "--plan", p, *FAST, "--out", tmp_path / "o") == 2
    one_line_error(capsys, "default_ratio")
    assert not (tmp_path / "o").exists()


def test_plan_for_another_model_is_refused_unless_forced(tmp_path, capsys):
    p = tmp_path / "plan.json"
    assert run("plan", "demo:digits-vgg", "--ratio", 0.3, "--out", p) == 0
    capsys.readouterr()
    assert run("fold", "demo:digits-mlp", "--plan", p, *FAST, "--out", tmp_path / "o") == 2
    one_line_error(capsys, "demo:digits-vgg", "--force")
    assert not (tmp_path / "o").exists()
    assert run("fold", "demo:digits-mlp", "--plan", p, *FAST, "--force", "--out", tmp_path / "o") == 0
    assert "made for model" in capsys.readouterr().err


def test_plan_with_other_weights_or_no_hash_warns(tmp_path, capsys):
    plan = FoldPlan(default_ratio=0.3, model="demo:digits-mlp", weights_sha256="0" * 64)
    p = tmp_path / "plan.json"
    plan.save(p)
    assert run("fold", "demo:digits-mlp", "--plan", p, *FAST, "--out", tmp_path / "a") == 0
    assert "these differ" in capsys.readouterr().err
    FoldPlan(default_ratio=0.3).save(p)
    assert run("fold", "demo:digits-mlp", "--plan", p, *FAST, "--out", tmp_path / "b") == 0
    assert "cannot check" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
# CLI: one line, exit codes, pipes
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, needle", [
    (["fold", "demo:digits-mlp", "--ratio", "0.3", "--device", "bogus", "--out", "x"], "bogus"),
    (["fold", "demo:digits-mlp", "--ratio", "0.3", "--device", "meta", "--out", "x"], "meta"),
    (["fold", "demo:digits-mlp", "--ratio", "nan", "--out", "x"], "ratio"),
    (["inspect", "demo:../../x"], "invalid demo name"),
    (["nosuchcommand"], "invalid choice"),
])
def test_bad_arguments_are_one_line_errors(capsys, argv, needle):
    try:
        rc = cli.main(argv)
    except SystemExit as exc:  # argparse's own errors (still one line, exit 2)
        rc = exc.code
    assert rc == 2
    one_line_error(capsys, needle)


def test_unexpected_exception_is_one_line_with_debug_hint(capsys, monkeypatch):
    def bug(_args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cli, "cmd_inspect", bug)
    monkeypatch.delenv("FOLDVIZ_DEBUG", raising=False)
    assert run("inspect", "demo:digits-mlp") == 2
    one_line_error(capsys, "ZeroDivisionError", "FOLDVIZ_DEBUG=1")
    monkeypatch.setenv("FOLDVIZ_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        run("inspect", "demo:digits-mlp")


def test_closed_pipe_ends_quietly():
    code = ("import subprocess, sys\n"
            "p = subprocess.Popen([sys.executable, '-m', 'foldviz', 'inspect', 'demo:digits-resnet'],"
            " stdout=subprocess.PIPE, stderr=subprocess.PIPE)\n"
            "p.stdout.readline(); p.stdout.close()\n"
            "err = p.stderr.read().decode(); rc = p.wait()\n"
            "print(rc); print(repr(err))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout.splitlines()
    assert out[1] == "''", out  # no BrokenPipeError traceback, no "Exception ignored" message
    assert out[0] in ("0", "1"), out


# ------------------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------------------
def _image_folder(root: Path, n_classes: int, corrupt: bool = False) -> Path:
    from PIL import Image

    for c in range(n_classes):
        d = root / f"class{c:02d}"
        d.mkdir(parents=True)
        Image.fromarray((np.random.default_rng(c).random((8, 8)) * 255).astype(np.uint8)).save(d / "a.png")
    if corrupt:
        (root / "class00" / "broken.png").write_bytes(b"not an image at all")
    return root


def test_image_folder_with_more_classes_than_the_model(tmp_path, capsys):
    root = _image_folder(tmp_path / "imgs", 11)
    card = load_model("demo:digits-mlp").card
    with pytest.raises(DataError, match="11 classes.*10 outputs"):
        load_dataset(f"imagefolder:{root}", card=card)
    assert run("fold", "demo:digits-mlp", "--ratio", 0.3, "--data", f"imagefolder:{root}", "--allow-overlap", *FAST,
               "--out", tmp_path / "o") == 2
    one_line_error(capsys, "11 classes", "10 outputs")
    assert not (tmp_path / "o").exists()


def test_labels_beyond_the_logits_are_an_error_not_an_index_error():
    model = nn.Linear(4, 3)
    ds = torch.utils.data.TensorDataset(torch.randn(6, 4), torch.tensor([0, 1, 2, 5, 0, 1]))
    with pytest.raises(DataError, match="3 outputs"):
        evaluate(model, make_loader(ds, batch_size=6))


def test_corrupt_image_names_the_file(tmp_path):
    root = _image_folder(tmp_path / "imgs", 10, corrupt=True)
    loaded = load_model("demo:digits-mlp")
    ds = load_dataset(f"imagefolder:{root}", card=loaded.card)
    with pytest.raises(DataError, match="broken.png"):
        evaluate(loaded.model, make_loader(ds, batch_size=4))


# ------------------------------------------------------------------------------------------------------------
# measurements: channel axis, chunking, failures recorded
# ------------------------------------------------------------------------------------------------------------
class ChannelsLast(nn.Module):
    """ConvNeXt-like: a conv, then Linear layers applied to (N, H, W, C), then back to (N, C, H, W)."""

    def __init__(self, c=6, hidden=10):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.norm = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, hidden)
        self.fc2 = nn.Linear(hidden, c)
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        x = self.conv(x).permute(0, 2, 3, 1)
        x = self.fc2(torch.relu(self.fc1(self.norm(x)))).permute(0, 3, 1, 2)
        return self.head(x.mean((2, 3)))


def test_variance_uses_the_axis_each_layer_really_uses():
    from foldviz.metrics import channel_variances, variance_ratios

    torch.manual_seed(0)
    model = ChannelsLast().eval()
    x = torch.randn(9, 3, 7, 5)  # H*W = 35: no dim equals a channel count by accident
    v = channel_variances(model, x, ["conv", "fc1", "fc2", "head"], batch_size=4)
    assert {k: len(a) for k, a in v.items()} == {"conv": 6, "fc1": 10, "fc2": 6, "head": 4}
    with torch.no_grad():
        h = model.fc1(model.norm(model.conv(x).permute(0, 2, 3, 1))).reshape(-1, 10).double().numpy()
    np.testing.assert_allclose(v["fc1"], h.var(0, ddof=1), rtol=1e-4)
    with torch.no_grad():
        c = model.conv(x).transpose(0, 1).reshape(6, -1).double().numpy()
    np.testing.assert_allclose(v["conv"], c.var(1, ddof=1), rtol=1e-4)
    rows = variance_ratios(model, model, x)
    assert rows and all(abs(r["ratio"] - 1) < 1e-6 for r in rows)


def test_unmappable_layer_is_skipped_with_a_note():
    from foldviz.metrics import channel_variances

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 5)

        def forward(self, x):
            return self.fc(x)

    m = Odd()
    notes: list = []
    v = channel_variances(m, torch.randn(3, 2, 4), ["fc"], notes=notes)  # (N, 2, 5): last dim is right
    assert len(v["fc"]) == 5 and not notes
    m.fc.out_features = 7  # now neither axis has the layer's width
    v = channel_variances(m, torch.randn(3, 2, 4), ["fc"], notes=notes)
    assert "fc" not in v and notes and "fc" in notes[0]


def test_failed_optional_measurements_are_recorded_and_the_fold_is_kept(tmp_path, capsys, monkeypatch):
    import foldviz.kinds as kinds
    import foldviz.metrics as metrics

    def broken(*_a, **_k):
        raise ValueError("operands could not be broadcast together with shapes (384,) (56,)")

    monkeypatch.setattr(kinds, "variance_ratios", broken)
    monkeypatch.setattr(metrics, "count_flops", broken)
    out = tmp_path / "o"
    assert run("fold", "demo:digits-mlp", "--ratio", 0.3, *FAST, "--out", out) == 0
    rep = json.loads((out / "report.json").read_text())
    assert "broadcast" in rep["variance_ratio"]["error"]
    assert "broadcast" in rep["flops_before"]["error"] and "broadcast" in rep["flops_after"]["error"]
    load_model(str(out))


def test_model_size_is_computed_without_serialising_and_matches_safetensors():
    from safetensors.torch import save as st_save

    from foldviz.metrics import model_size_bytes

    for spec in ("demo:digits-resnet", "demo:digits-vgg"):
        m = load_model(spec).model
        assert model_size_bytes(m) == len(st_save({k: v.contiguous() for k, v in m.state_dict().items()}))
