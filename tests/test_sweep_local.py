"""Sweeps with the in-process executor: specs, streamed/resumable CSV, interruption, retries, progress, CLI."""
import csv
import io
import json
import os

import pytest

from foldviz import sweep as S
from foldviz.cli import main
from foldviz.executors import LocalExecutor
from foldviz.sweepspec import ModelRef, SpecError, load_spec, spec_from_args, spec_from_dict, spec_from_json

MODEL = "demo:digits-mlp"


def small_spec(**kw):
    args = dict(seeds=(0,), eval_limit=60)
    args.update(kw.pop("extra", {}))
    return spec_from_args(ModelRef(MODEL), kw.pop("ratios", [0.3, 0.5]), kw.pop("methods", ["none", "l1"]),
                          "digits", **args)


def rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def spec_doc(**over):
    d = {"foldviz_sweep": 1, "models": [MODEL], "methods": ["none"], "ratios": [0.3], "seeds": [0], "data": "digits"}
    d.update(over)
    return d


# ------------------------------------------------------------------------------------------------ specs
@pytest.mark.parametrize("over, field", [
    ({"ratios": [0.3, 1.5]}, "ratios.1"),
    ({"seeds": [0, 1.0]}, "seeds.1"),                      # integers must be JSON integers
    ({"eval_limit": 2.5}, "eval_limit"),
    ({"methods": ["none", "magic"]}, "methods.1"),
    ({"models": [MODEL, {"spec": "torchvision:resnet18", "num_classes": "ten"}]}, "models.1.num_classes"),
    ({"models": [{"spec": MODEL, "colour": "red"}]}, "models.0"),
    ({"clustering": {"n_init": 0}}, "clustering.n_init"),
    ({"data": None}, "models.0"),                            # no evaluation data anywhere
    ({"ratio": [0.3]}, "(top level)"),                      # unknown key
    ({"foldviz_sweep": 2}, "foldviz_sweep"),
])
def test_bad_spec_names_the_field(over, field):
    with pytest.raises(SpecError) as exc:
        spec_from_dict(spec_doc(**over))
    msg = str(exc.value)
    assert f"field {field}:" in msg and "\n" not in msg, msg


def test_non_finite_numbers_and_bad_json_are_rejected(tmp_path):
    with pytest.raises(SpecError, match="finite"):
        spec_from_json('{"foldviz_sweep": 1, "models": ["demo:digits-mlp"], "methods": ["none"], "ratios": [NaN]}')
    with pytest.raises(SpecError, match="finite"):
        spec_from_dict(spec_doc(ratios=[float("inf")]))
    with pytest.raises(SpecError, match="not valid JSON"):
        spec_from_json("{nope")
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "missing.json")


def test_spec_file_expands_to_cells_per_model(tmp_path):
    p = tmp_path / "sweep.json"
    p.write_text(json.dumps(spec_doc(models=[MODEL, {"spec": "demo:digits-vgg", "data": "digits"}],
                                     methods=["none", "r"], ratios=[0.2, 0.4], seeds=[0, 1])))
    cells = S.plan_cells(load_spec(p))
    assert len(cells) == 2 * (1 + 2 * 2 * 2)
    assert [c.method for c in cells[:3]] == ["original", "none", "none"]
    assert {c.model.spec for c in cells} == {MODEL, "demo:digits-vgg"}
    # the settings hash follows what changes a result: repair samples matter to Fold-R only
    a = {c.method: c.settings_hash() for c in S.plan_cells(small_spec(methods=["none", "r"]))}
    b = {c.method: c.settings_hash() for c in S.plan_cells(small_spec(methods=["none", "r"],
                                                                      extra={"repair_samples": 64}))}
    assert a["none"] == b["none"] and a["r"] != b["r"]


def test_bad_spec_on_the_command_line_is_one_line(tmp_path, capsys):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(spec_doc(seeds=[0.5])))
    assert main(["sweep", "--spec", str(p), "--out", str(tmp_path / "o.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid sweep spec field seeds.0") and err.count("\n") == 1
    assert not (tmp_path / "o.csv").exists()
    assert main(["sweep", MODEL, "--out", str(tmp_path / "o.csv")]) == 2
    assert "needs --ratios and --data" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ output file
def test_out_is_validated_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(S, "plan_cells", lambda *a: pytest.fail("work started"))
    base = ["sweep", MODEL, "--ratios", "0.3", "--data", "digits", "--out"]
    assert main(base + [str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main(base + [str(tmp_path / "no" / "such" / "x.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(base + ["/proc/foldviz-sweep.csv"]) == 2  # unwritable even for root
    assert "not writable" in capsys.readouterr().err
    other = tmp_path / "other.csv"
    other.write_text("a,b,c\n1,2,3\n")
    assert main(base + [str(other)]) == 2
    err = capsys.readouterr().err
    assert "different columns" in err and err.count("\n") == 1


def test_rows_stream_and_rerun_skips_finished_cells(tmp_path):
    out = tmp_path / "s.csv"
    seen = []

    def callback(done, total, row):  # each row is on disk when the callback runs
        seen.append(len(rows(out)))

    s1 = S.run_sweep(small_spec(), out, progress=False, callback=callback)
    assert (s1.total, s1.executed, s1.skipped) == (5, 5, 0) and seen == [1, 2, 3, 4, 5]
    got = rows(out)
    assert list(got[0]) == S.CSV_FIELDS
    assert [r["method"] for r in got] == ["original", "none", "none", "l1", "l1"]
    r = got[1]
    assert len(r["weights_sha256"]) == 64 and len(r["plan_sha256"]) == 64 and r["perplexity"] == ""
    assert r["host"] and float(r["param_sparsity"]) > 0.3 and r["model"] == MODEL and r["eval_samples"] == "60"
    s2 = S.run_sweep(small_spec(), out, progress=False)
    assert (s2.executed, s2.skipped) == (0, 5) and len(rows(out)) == 5
    # more ratios and seeds: only the new cells run
    s3 = S.run_sweep(small_spec(ratios=[0.3, 0.5, 0.7], extra={"seeds": (0, 1)}), out, progress=False)
    assert (s3.total, s3.skipped, s3.executed) == (13, 5, 8) and len(rows(out)) == 13
    # other settings (eval subset) are other cells
    s4 = S.run_sweep(small_spec(extra={"eval_limit": 40}), out, progress=False)
    assert s4.executed == 5


def test_interrupt_keeps_finished_cells_and_resume_runs_only_the_rest(tmp_path):
    out = tmp_path / "s.csv"
    spec = small_spec(methods=["none", "ar", "l1"])  # 7 cells

    def stop_after_3(done, total, row):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        S.run_sweep(spec, out, progress=False, callback=stop_after_3)
    assert len(rows(out)) == 3
    s = S.run_sweep(spec, out, progress=False)
    assert (s.skipped, s.executed, s.total) == (3, 4, 7)
    assert len({(r["method"], r["ratio"]) for r in rows(out)}) == 7


def test_cli_ctrl_c_exits_130_and_a_torn_line_is_rerun(tmp_path, capsys, monkeypatch):
    out = tmp_path / "s.csv"
    real, calls = S.run_cell, []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(S, "run_cell", flaky)   # the executor the CLI builds runs this
    argv = ["sweep", MODEL, "--ratios", "0.3", "0.5", "--methods", "none", "l1", "--data", "digits",
            "--eval-limit", "60", "--out", str(out)]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "resume" in err
    assert len(rows(out)) == 2
    with out.open("a") as fh:  # a crash in the middle of writing a row
        fh.write("demo:digits-mlp,cnn,abc")
    monkeypatch.setattr(S, "run_cell", real)
    assert main(argv) == 0
    assert "3 new cell(s), 2 already there" in capsys.readouterr().out
    assert len([r for r in rows(out) if r["accuracy"]]) == 5


def fail_once(marker):
    """A cell function that fails with a transient error the first time any process sees ``marker`` (injected
    into the executor by the test; the library reads no test hook)."""
    def run(loaded, cell, **kw):
        try:
            os.unlink(marker)   # only one caller can remove it: exactly one failure
        except FileNotFoundError:
            return S.run_cell(loaded, cell, **kw)
        raise S.TransientCellError("injected failure")
    return run


def test_transient_failure_is_retried_locally(tmp_path):
    marker = tmp_path / "fail-once"
    marker.touch()
    s = S.run_sweep(small_spec(ratios=[0.3]), tmp_path / "s.csv",
                    executor=LocalExecutor(max_retries=1, run=fail_once(marker)), progress=False)
    assert not marker.exists() and s.executed == 3 and not s.failed


def test_persistent_failure_is_reported_and_the_rest_completes(tmp_path):
    def broken(loaded, cell, **kw):
        if cell.method == "l1":
            raise RuntimeError("boom")
        return S.run_cell(loaded, cell, **kw)

    s = S.run_sweep(small_spec(), tmp_path / "s.csv", executor=LocalExecutor(run=broken), progress=False)
    assert s.executed == 3 and len(s.failed) == 2 and s.failed[0][1] == "boom"


def test_user_errors_stop_the_sweep(tmp_path):
    spec = spec_from_args(ModelRef(MODEL), [0.3], ["none"], "cifar10:/definitely/not/here", eval_limit=10)
    with pytest.raises(ValueError, match="cifar"):
        S.run_sweep(spec, tmp_path / "s.csv", progress=False)


def test_a_language_model_sweeps_through_the_same_cells_with_perplexity(tmp_path):
    """Same spec, CSV, resume and executor; the kind decides the metric column and the default clustering."""
    spec = spec_from_args(ModelRef("demo:shakespeare-llama"), [0.3], ["fold", "random"], "shakespeare:test",
                          eval_limit=4)
    out = tmp_path / "lm.csv"
    s = S.run_sweep(spec, out, progress=False)
    got = rows(out)
    assert s.executed == 3 and {r["kind"] for r in got} == {"lm"}
    assert all(r["perplexity"] and not r["accuracy"] and r["eval_samples"] == "4" for r in got)
    orig = next(r for r in got if r["method"] == "original")
    assert all(float(r["perplexity"]) > float(orig["perplexity"]) for r in got if r["method"] != "original")
    assert S.run_sweep(spec, out, progress=False).skipped == 3
    bad = spec_from_args(ModelRef("demo:shakespeare-llama"), [0.3], ["l1"], "shakespeare:test")
    with pytest.raises(ValueError, match="L1 pruning does not apply to demo:shakespeare-llama"):
        S.run_sweep(bad, tmp_path / "bad.csv", progress=False)


def test_progress_is_one_line_per_cell_without_a_tty(tmp_path):
    buf = io.StringIO()
    S.run_sweep(small_spec(), tmp_path / "s.csv", progress=S.ProgressLine(0, stream=buf))
    lines = buf.getvalue().splitlines()
    assert len(lines) == 5 and lines[0].startswith("[1/5]") and lines[-1].startswith("[5/5] 100% ETA")
    assert "\r" not in buf.getvalue()


def test_in_memory_sweep_keeps_its_signature_and_order():
    loaded = ModelRef(MODEL).load()
    seen = []
    out = S.sweep(loaded, [0.3], ["l1", "none"], "digits", seeds=(0, 1), eval_limit=50,
                  progress=lambda d, t, row: seen.append((d, t)))
    assert [(r["method"], r["seed"]) for r in out] == [("original", 0), ("l1", 0), ("none", 0), ("l1", 1), ("none", 1)]
    assert seen[-1] == (4, 4) and S.to_csv(out).splitlines()[0] == ",".join(S.FIELDS)
    with pytest.raises(ValueError, match=r"\['magic'\] do not apply to an image classifier; choose from none"):
        S.sweep(loaded, [0.3], ["magic"], "digits")


def test_executors_import_neither_ray_nor_streamlit():
    import subprocess
    import sys

    code = "import sys, foldviz.executors, foldviz.cli; print('ray' in sys.modules, 'streamlit' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_progress_rewrites_one_line_on_a_tty(tmp_path):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    buf = Tty()
    S.run_sweep(small_spec(ratios=[0.3]), tmp_path / "s.csv", progress=S.ProgressLine(0, stream=buf))
    text = buf.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1 and "[3/3] 100%" in text
