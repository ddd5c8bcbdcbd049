"""Sweeps on a real local Ray instance (2 CPUs, no dashboard): same rows as in-process, retries, resume, CLI.

One Ray instance serves the whole module; it is shut down in the fixture's teardown whatever the tests do.
"""
import csv
import os

import pytest

ray = pytest.importorskip("ray")

from foldviz import sweep as S  # noqa: E402
from foldviz.cli import main  # noqa: E402
from foldviz.executors import LocalExecutor, RayExecutor, init_ray  # noqa: E402
from foldviz.sweepspec import ModelRef, spec_from_args  # noqa: E402

pytestmark = pytest.mark.slow  # run by `make test`; skipped by the quick subset (-m 'not slow')

MODEL = "demo:digits-mlp"
SAME = ("method", "label", "ratio", "seed", "param_sparsity", "params", "accuracy", "eval_samples",
        "weights_sha256", "plan_sha256", "settings_hash")


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    marker = tmp_path_factory.mktemp("ray") / "fail-once"
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH",)}  # init_ray extends PYTHONPATH
    try:
        if ray.is_initialized():
            ray.shutdown()
        init_ray(num_cpus=2)
        yield marker
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def spec(methods, ratios=(0.3,), seeds=(0,)):
    return spec_from_args(ModelRef(MODEL), list(ratios), list(methods), "digits", seeds=seeds, eval_limit=80,
                          repair_samples=64)


def test_ray_gives_the_same_rows_as_local(ray_local, tmp_path, capsys):
    methods = ["ar", "l1+r"]  # a fold without data, a prune with data (one worker start costs more than a cell)
    local, remote = tmp_path / "local.csv", tmp_path / "ray.csv"
    s = S.run_sweep(spec(methods, seeds=(0, 1)), local, executor=LocalExecutor(), progress=False)
    assert s.executed == 5   # the original once, then each method at each seed
    # the Ray run goes through the command line (joins the running instance)
    assert main(["sweep", MODEL, "--ratios", "0.3", "--methods", *methods, "--data", "digits", "--seeds", "0", "1",
                 "--eval-limit", "80", "--repair-samples", "64", "--executor", "ray", "--out", str(remote)]) == 0
    assert "5 new cell(s)" in capsys.readouterr().out

    def table(path):
        return sorted(tuple(r[k] for k in SAME) for r in rows(path))

    assert table(local) == table(remote)
    assert len(table(remote)) == 5
    assert ray.is_initialized()  # an instance the executor did not start is left running


def fail_once(marker):
    """A cell function that fails with a transient error in the first task that sees ``marker`` (shipped to the
    workers by value; the library reads no test hook)."""
    def run(loaded, cell, **kw):
        import os as _os

        from foldviz import sweep as _S
        try:
            _os.unlink(marker)
        except FileNotFoundError:
            return _S.run_cell(loaded, cell, **kw)
        raise _S.TransientCellError("injected failure")
    return run


def test_failed_task_is_retried_and_the_sweep_completes(ray_local, tmp_path):
    ray_local.touch()  # the first task to see it fails once
    s = S.run_sweep(spec(["none", "l1"]), tmp_path / "s.csv",
                    executor=RayExecutor(max_retries=2, run=fail_once(str(ray_local))), progress=False)
    assert not ray_local.exists(), "no task consumed the injected failure"
    assert (s.executed, s.failed) == (3, []) and len(rows(tmp_path / "s.csv")) == 3


def test_failure_without_retries_is_reported_then_resumed(ray_local, tmp_path):
    out = tmp_path / "s.csv"
    ray_local.touch()
    s = S.run_sweep(spec(["none"]), out, executor=RayExecutor(max_retries=0, run=fail_once(str(ray_local))),
                    progress=False)
    assert s.executed == 1 and len(s.failed) == 1 and "injected failure" in s.failed[0][1]
    s = S.run_sweep(spec(["none"]), out, executor=RayExecutor(), progress=False)
    assert (s.skipped, s.executed) == (1, 1)


def test_interrupted_ray_sweep_resumes_with_only_the_missing_cells(ray_local, tmp_path):
    out = tmp_path / "s.csv"
    sp = spec(["none", "l1", "ar"], ratios=(0.3, 0.5))  # 7 cells

    def stop_after_2(done, total, row):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        S.run_sweep(sp, out, executor=RayExecutor(), progress=False, callback=stop_after_2)
    assert len(rows(out)) == 2
    s = S.run_sweep(sp, out, executor=RayExecutor(), progress=False)
    assert (s.skipped, s.executed, s.total) == (2, 5, 7)
    assert len({(r["method"], r["ratio"]) for r in rows(out)}) == 7


def test_app_sweep_runs_on_the_cluster_named_by_the_environment(ray_local, monkeypatch):
    """The app's sweep panel (Workbench.sweep) submits to Ray when FOLDVIZ_RAY_ADDRESS is set: same rows."""
    from foldviz.session import DataSource, ModelSource, Workbench

    wb = Workbench.load(ModelSource(MODEL))
    data = DataSource("digits", limit=80, repair_samples=64)
    monkeypatch.delenv("FOLDVIZ_RAY_ADDRESS", raising=False)
    local = wb.sweep([0.3], ["none", "l1"], data)
    assert wb.sweep_target() == "this process"
    import foldviz.executors as executors

    made = []
    monkeypatch.setattr(executors, "make_executor", lambda *a, **k: made.append(RayExecutor(**k)) or made[-1])
    monkeypatch.setenv("FOLDVIZ_RAY_ADDRESS", "auto")   # the running instance; a real cluster address in use
    assert "Ray cluster at auto" in wb.sweep_target()
    # a fresh workbench: the first one memoises its local rows (same cells, same numbers) and would not resubmit
    remote = Workbench.load(ModelSource(MODEL)).sweep([0.3], ["none", "l1"], data)
    assert len(made) == 1 and made[0].address == "auto"
    key = ("method", "ratio", "seed", "params", "accuracy", "param_sparsity")
    assert [{k: r[k] for k in key} for r in remote] == [{k: r[k] for k in key} for r in local]
    assert ray.is_initialized()
