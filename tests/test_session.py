"""Tests for foldviz.session: the streamlit-free Workbench behind the app's pages."""
from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
import torch

from foldviz.session import (
    DataSource,
    ModelSource,
    Workbench,
    WorkbenchError,
    report_csv,
    save_upload,
    sweep_csv,
)


@pytest.fixture(scope="module")
def wb() -> Workbench:
    return Workbench.load(ModelSource("demo:digits-resnet"))


DATA = DataSource("digits", limit=200, repair_samples=128)


def test_summary_and_groups(wb):
    s = wb.summary()
    assert s["spec"] == "demo:digits-resnet" and s["params"] > 0 and s["flops"] > 0
    assert s["foldable_groups"] == len(wb.foldable_ids()) > 0
    rows = wb.group_rows()
    assert rows[0]["group"] == "conv1" and {"foldable", "reason", "producers", "consumers"} <= set(rows[0])
    arch = wb.architecture_rows()
    assert any(r["module"] == "conv1" and r["output shape"] == "32×8×8" for r in arch)


def test_load_errors_are_user_messages():
    with pytest.raises(WorkbenchError, match="could not load"):
        Workbench.load(ModelSource("demo:no-such-model"))
    with pytest.raises(WorkbenchError, match="safetensors"):
        save_upload(b"x", "model.pkl")


def test_group_detail_is_consistent(wb):
    d = wb.group_detail("conv1", 0.5, seed=0)
    assert d["k"] == 16 and d["labels"].shape == (32,) and d["sizes"].sum() == 32
    assert sorted(d["order"].tolist()) == list(range(32))
    assert d["similarity"].shape == (32, 32) and np.allclose(np.diag(d["similarity"]), 1, atol=1e-5)
    assert d["coords"].shape == (32, 2) and d["weight_module"] == "conv1" and d["weight"].shape == (32, 1, 3, 3)
    again = wb.group_detail("conv1", 0.5, seed=0)
    assert np.array_equal(d["labels"], again["labels"])  # seeded
    nb = wb.neighbours("conv1", 3, k=4)
    assert len(nb) == 4 and nb[0]["cosine"] >= nb[-1]["cosine"] and all(n["channel"] != 3 for n in nb)


def test_estimate_matches_a_real_fold(wb):
    from foldviz import fold as F
    from foldviz.metrics import count_flops

    ids = wb.foldable_ids()
    plan = wb.plan_from({**wb.default_plan(0.4, "none").to_dict(), "ratios": {ids[0]: 0.7}, "skip": [ids[-1]]})
    est = wb.estimate(plan)
    res = F.fold(wb.model, plan, example_input=wb.example_input(2))
    assert est["params_after"] == sum(p.numel() for p in res.model.parameters())
    assert est["flops_after"] == count_flops(res.model, wb.example_input(1))
    after = {g["id"]: g["channels_after"] for g in res.groups}
    assert {r["id"]: r["channels_after"] for r in est["groups"]} == after


def test_suggest_reaches_target_and_follows_redundancy(wb):
    plan = wb.suggest(0.4, repair="ar", seed=3)
    est = wb.estimate(plan)
    assert est["param_sparsity"] == pytest.approx(0.4, abs=0.02)
    assert plan.repair == "ar" and plan.seed == 3 and plan.model == wb.spec
    scores = {g: wb.redundancy(g)["score"] for g in plan.ratios}
    hi, lo = max(scores, key=scores.get), min(scores, key=scores.get)
    assert plan.ratios[hi] >= plan.ratios[lo]


def test_import_plan_checks_model(wb):
    plan = wb.default_plan(0.2, "r")
    got, warnings = wb.import_plan(plan.to_json())
    assert got.to_dict() == plan.to_dict() and warnings == []
    other = {**plan.to_dict(), "model": "demo:digits-vgg", "weights_sha256": None}
    _, warnings = wb.import_plan(json.dumps(other))
    assert warnings and "digits-vgg" in warnings[0]
    with pytest.raises(WorkbenchError, match="nope"):
        wb.import_plan(json.dumps({**plan.to_dict(), "skip": ["nope"]}))


def test_fold_report_and_exports(wb):
    plan = wb.default_plan(0.3, "ar")
    before = [p.clone() for p in wb.model.parameters()]
    out = wb.fold(plan, DATA, measure_latency=False)
    assert all(torch.equal(a, b) for a, b in zip(before, wb.model.parameters())), "base model must not change"
    r = out.report
    assert r["after"]["params"] < r["before"]["params"] and 0 < r["param_sparsity"] < 1
    assert 0 <= r["after"]["accuracy"] <= 1 and r["before"]["accuracy"] > 0.5
    assert r["groups"][0]["id"] == "conv1"
    csv = report_csv(r)
    assert csv.splitlines()[0].startswith("id,channels_before,channels_after")
    z = zipfile.ZipFile(io.BytesIO(wb.export_folded(out)))
    names = z.namelist()
    assert any(n.endswith("model.safetensors") for n in names) and any(n.endswith("report.json") for n in names)


def test_variance_comparison_shows_collapse_and_repair(wb):
    plan = wb.default_plan(0.5, "none")
    comp = wb.variance_comparison(plan, ["none", "r", "ar"], DATA)
    assert set(comp) == {"none", "r", "ar"} and all(v["error"] is None for v in comp.values())
    naive = [x["ratio"] for x in comp["none"]["rows"]]
    fold_r = [x["ratio"] for x in comp["r"]["rows"]]
    assert min(naive) < 0.9 and min(naive) < min(fold_r)
    no_data = wb.variance_comparison(plan, ["r"], DataSource(None))
    assert "real data" in no_data["r"]["error"]


def test_teaching_numbers(wb):
    labels = wb.cluster("conv1", 0.5, seed=0).labels
    inputs = wb.sample_batch(DATA, 64)
    cons = wb.consumer_columns("conv1", labels)
    assert cons["before"].shape[1] == 32 and cons["after"].shape[1] == 16
    assert np.allclose(cons["before"].sum(1), cons["after"].sum(1))  # columns are summed per cluster
    err = wb.merge_error("conv1", labels, inputs)
    assert 0 <= err["error"] < err["random_error"]  # clustering similar channels beats random merging
    cv = wb.cluster_variance("conv1", labels, inputs)
    assert len(cv) == 16 and all(c["ratio"] == pytest.approx(1.0) for c in cv if c["size"] == 1)
    assert all(c["ratio"] <= 1.0 + 1e-6 for c in cv)


def test_sweep_rows_and_csv(wb):
    rows = wb.sweep([0.3], ["none", "l1"], DATA)
    methods = {r["method"] for r in rows}
    assert {"none", "l1"} <= methods
    assert all(0 <= r["accuracy"] <= 1 for r in rows)
    assert sweep_csv(rows).splitlines()[0] == "method,ratio,seed,param_sparsity,accuracy,loss"
    with pytest.raises(WorkbenchError):
        wb.sweep([0.3], ["none"], DataSource(None))


def test_upload_is_bounded_and_keeps_nothing(tmp_path, monkeypatch):
    import foldviz.checkpoints as C
    from foldviz.session import WorkbenchError, save_upload

    monkeypatch.setattr(C, "MAX_UPLOAD_BYTES", 1000)
    with pytest.raises(WorkbenchError, match="uploads are limited to"):
        save_upload(b"x" * 1001, "big.safetensors", tmp_path)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(WorkbenchError, match="upload a .safetensors file"):
        save_upload(b"x" * 10, "model.pkl", tmp_path)
