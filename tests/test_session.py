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
    save_upload,
)
from foldviz.report import report_csv
from foldviz.sweep import to_csv


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
    plan = wb.default_plan(0.5, "none")
    d = wb.group_detail("conv1", plan)
    assert d["k"] == 16 and d["labels"].shape == (32,) and d["sizes"].sum() == 32 and (d["sizes"] > 0).all()
    assert sorted(d["order"].tolist()) == list(range(32))
    assert d["similarity"].shape == (32, 32) and np.allclose(np.diag(d["similarity"]), 1, atol=1e-5)
    assert d["coords"].shape == (32, 2) and d["weight_module"] == "conv1" and d["weight"].shape == (32, 1, 3, 3)
    assert np.array_equal(d["labels"], wb.group_detail("conv1", plan)["labels"])  # seeded
    nb = wb.neighbours("conv1", 3, plan, k=4)
    assert len(nb) == 4 and nb[0]["cosine"] >= nb[-1]["cosine"] and all(n["channel"] != 3 for n in nb)


@pytest.mark.parametrize("repair", ["none", "ar", "dfr", "dir", "r"])
def test_explorer_shows_the_clusters_the_fold_merges(wb, repair):
    """What the Layer explorer (group_detail) and the Learn page (cluster) show is what fold() merges."""
    from foldviz.fold import fold

    plan = wb.default_plan(0.3, repair, seed=1)
    if repair == "dir":  # Deep Inversion only changes statistics after the merge: keep it cheap
        plan = plan.with_changes(repair_settings={"iterations": 2, "batch_size": 8})
    res = fold(wb.model, plan, example_input=wb.example_input(2),
               repair_data=wb.repair_inputs(DATA) if repair == "r" else None)
    assert set(res.labels) == set(wb.foldable_ids())
    for gid, labels in res.labels.items():
        assert np.array_equal(wb.group_detail(gid, plan)["labels"], labels), gid
        assert np.array_equal(wb.cluster(gid, plan).labels, labels), gid


def test_feature_space_follows_the_repair(wb):
    raw = wb.features("layer1.0.conv1", "none")
    fused = wb.features("layer1.0.conv1", "ar")
    assert raw.shape[0] == fused.shape[0] == 32 and fused.shape[1] == raw.shape[1] + 1  # + the fused bias
    assert wb.group_detail("layer1.0.conv1", wb.default_plan(0.3, "ar"))["feature_space"] == "fused"


def test_preview_matches_a_real_fold(wb):
    from foldviz import fold as F
    from foldviz.metrics import count_flops, count_params

    ids = wb.foldable_ids()
    plan = wb.plan_from({**wb.default_plan(0.4, "none").to_dict(), "ratios": {ids[0]: 0.7}, "skip": [ids[-1]]})
    est = wb.preview(plan)
    res = F.fold(wb.model, plan, example_input=wb.example_input(2))
    assert est["params_after"] == count_params(res.model)
    assert est["flops_after"] == count_flops(res.model, wb.example_input(1))
    after = {g["id"]: g["channels_after"] for g in res.groups}
    assert {r["id"]: r["channels_after"] for r in est["groups"]} == after


def test_suggest_reaches_target_keeps_skips_and_follows_redundancy(wb):
    ids = wb.foldable_ids()
    base = wb.default_plan(0.3, "ar", seed=3).with_changes(skip=[ids[2]], ratios={ids[0]: 0.8})
    plan = wb.suggest(0.4, base)
    assert wb.preview(plan)["param_sparsity"] == pytest.approx(0.4, abs=0.02)
    assert plan.repair == "ar" and plan.seed == 3 and plan.model == wb.spec
    assert plan.skip == [ids[2]] and ids[2] not in plan.ratios      # skipped groups stay skipped
    assert 0 < plan.default_ratio < 0.9                             # never the 0 the old suggestion left
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
    out = wb.fold(plan, DATA, latency=False)
    assert all(torch.equal(a, b) for a, b in zip(before, wb.model.parameters())), "base model must not change"
    r = out.report
    assert r["params_after"] == sum(p.numel() for p in out.model.parameters()) < r["params_before"]
    assert r["param_sparsity"] == pytest.approx(1 - r["params_after"] / r["params_before"])
    assert r["accuracy_before"] == pytest.approx(wb.evaluate(None, DATA)["accuracy"]) and r["accuracy_before"] > 0.9
    assert r["accuracy_after"] == pytest.approx(wb.evaluate(out.model, DATA)["accuracy"])
    assert r["eval_samples"] == 200 and r["method"] == "ar" and r["label"] == "Fold-AR"
    assert r["groups"][0]["id"] == "conv1" and r["variance_ratio"]
    assert report_csv(r).splitlines()[0] == "id,unit,channels_before,channels_after,ratio,inertia,n_iter,foldable,reason"
    z = zipfile.ZipFile(io.BytesIO(wb.export_folded(out, {"sweep.csv": b"a,b\n"})))
    names = set(z.namelist())
    assert {"folded/model.safetensors", "folded/report.json", "folded/plan.json", "folded/sweep.csv"} <= names


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
    labels = wb.cluster("conv1", wb.default_plan(0.5, "none")).labels
    inputs = wb.sample_batch(DATA, 64)
    cons = wb.consumer_columns("conv1", labels)
    assert cons["before"].shape[1] == 32 and cons["after"].shape[1] == 16
    assert np.allclose(cons["before"].sum(1), cons["after"].sum(1))  # columns are summed per cluster
    err = wb.merge_error("conv1", labels, inputs)
    assert 0 <= err["error"] < err["random_error"]  # clustering similar channels beats random merging
    cv = wb.cluster_variance("conv1", labels, inputs)
    assert len(cv) == 16 and all(c["ratio"] == pytest.approx(1.0) for c in cv if c["size"] == 1)
    merged = [c for c in cv if c["size"] > 1]
    assert merged and min(c["ratio"] for c in merged) < 0.95  # averaging correlated channels loses variance


def test_sweep_rows_and_csv(wb):
    rows = wb.sweep([0.3], ["none", "l1"], DATA)
    assert [(r["method"], r["ratio"]) for r in rows] == [("original", 0.0), ("none", 0.3), ("l1", 0.3)]
    original = rows[0]["accuracy"]
    assert original == pytest.approx(wb.evaluate(None, DATA)["accuracy"])
    assert rows[1]["param_sparsity"] == pytest.approx(rows[2]["param_sparsity"])  # same channel counts
    assert to_csv(rows).splitlines()[0].startswith("method,label,ratio,seed,param_sparsity")
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


@pytest.mark.parametrize("skip", [[], ["fc2"]])
def test_explorer_matches_the_fold_in_dfr_fused_linear_space(skip):
    """Fold-DFR fuses the BatchNorm1d of the hidden FC groups it folds (and only those): on the MLP demo the
    explorer's clusters equal the fold's, with and without a skipped group, and a skipped group's weights are
    left exactly as they were."""
    from foldviz.fold import fold

    wb = Workbench.load("demo:digits-mlp")
    plan = wb.default_plan(0.4, "dfr", seed=2).with_changes(skip=skip)
    res = fold(wb.model, plan, example_input=wb.example_input(2))
    assert set(res.labels) == set(wb.foldable_ids()) - set(skip)
    for gid, labels in res.labels.items():
        assert np.array_equal(wb.group_detail(gid, plan)["labels"], labels), gid
        assert wb.group_detail(gid, plan)["features_fused"]
    before, after = dict(wb.model.named_modules()), dict(res.model.named_modules())
    for name in skip:  # a skipped group is not re-parametrised: its own bias and BN affine stay exactly
        bn = name.replace("fc", "bn")
        assert torch.equal(after[name].bias, before[name].bias)
        assert torch.equal(after[bn].weight, before[bn].weight) and torch.equal(after[bn].bias, before[bn].bias)


def test_concurrent_folds_on_one_workbench_are_safe_and_identical(wb):
    """The app folds in a background thread (live estimate) while a page folds too: the repairs hook the base
    model, so the workbench runs them one at a time; both give the fold's usual result."""
    import threading

    plan = wb.default_plan(0.4, "dfr")
    out, errors = {}, []

    def go(i):
        try:
            out[i] = wb.run(plan, "dfr", None).model.state_dict()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(torch.equal(out[0][k], out[i][k]) for i in (1, 2) for k in out[0])


def test_feature_maps_before_and_after_a_fold(wb):
    x = wb.sample_batch(DATA, 4)[:1]
    # ratio 0: the folded model is the original, map for map
    res0 = wb.run(wb.default_plan(0.0, "none"), "none", None)
    fm = wb.activations(res0, "layer1.0.conv1", x)
    assert fm["module"] == "layer1.0.bn1" and fm["before"].shape == (32, 8, 8) == fm["after"].shape
    assert np.allclose(fm["before"], fm["after"])
    assert all(c["corr"] == pytest.approx(1.0) and c["var_ratio"] == pytest.approx(1.0) for c in fm["clusters"])
    # a real fold: one folded map per cluster, in the fold's own channel order
    res = wb.run(wb.default_plan(0.5, "none"), "none", None)
    fm = wb.activations(res, "layer1.0.conv1", x)
    assert fm["after"].shape == (16, 8, 8) and len(fm["clusters"]) == 16
    assert sorted(c["folded"] for c in fm["clusters"]) == list(range(16))
    assert sorted(m for c in fm["clusters"] for m in c["members"]) == list(range(32))
    assert [len(c["members"]) for c in fm["clusters"]] == sorted((len(c["members"]) for c in fm["clusters"]),
                                                                  reverse=True)


@pytest.mark.parametrize("demo, gid", [("digits-resnet", "layer1.0.conv1"), ("digits-vgg", None),
                                       ("digits-mlp", None)])
@pytest.mark.parametrize("repair", ["none", "ar", "dfr"])
def test_feature_maps_of_exact_duplicates_fold_back_exactly(demo, gid, repair):
    """Every channel duplicated: each cluster is a pair of copies and its folded map equals both originals
    (convolutions: 8x8 maps; MLPs: 1x1), whatever the repair."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from widen import duplicate_channels

    from foldviz.models import load_model
    from foldviz.session import Workbench

    base = load_model(f"demo:{demo}")
    x = base.example_input(1)
    base.model = duplicate_channels(base.model, x)
    wb2 = Workbench(base)
    gid = gid or wb2.foldable_ids()[0]
    res = wb2.run(wb2.default_plan(0.5, repair), repair, None)
    fm = wb2.activations(res, gid, torch.randn(1, *x.shape[1:]))
    for c in fm["clusters"]:
        assert len(c["members"]) == 2
        assert np.allclose(fm["after"][c["folded"]], fm["before"][c["members"]], atol=1e-4)
        if fm["before"].shape[1] * fm["before"].shape[2] > 1:
            assert c["var_ratio"] == pytest.approx(1.0, abs=1e-3)


def test_background_precomputation_waits_for_the_foreground(wb):
    """While a page request is in flight, the background worker does not start its next step."""
    import threading

    plan = wb.default_plan(0.3, "none", seed=11)
    done = threading.Event()
    with wb.foreground():
        wb.cluster_path("layer3.1.conv1", plan, background=True)
        started = wb.jobs.precompute(("other",), "probe", [done.set])
        assert not done.wait(1.0)   # paused before its first step (an event, not a timing: it never fires)
        status = wb.path_status("layer3.1.conv1", plan)
        assert len(status["ready"]) == 0
    assert done.wait(300) and started.result(10) is None
    # the background lane runs its jobs in order: the probe ran after every slider stop was computed
    assert len(wb.path_status("layer3.1.conv1", plan)["ready"]) == 20


def test_cluster_path_and_inertia_curve_are_the_folds_clusters(wb):
    from foldviz.fold import fold
    from foldviz.session import SLIDER_RATIOS

    plan = wb.default_plan(0.3, "ar")
    gid = "layer2.0.conv2"
    status = wb.cluster_path(gid, plan)
    assert status == {"ready": [round(r, 4) for r in SLIDER_RATIOS], "total": 20}
    res = fold(wb.model, plan.with_changes(ratios={gid: 0.55}), example_input=wb.example_input(2))
    assert np.array_equal(wb.cluster(gid, plan, 0.55).labels, res.labels[gid])
    curve = wb.inertia_curve(gid, plan)
    assert [r for r, _k, _i in curve] == [round(r, 4) for r in SLIDER_RATIOS]
    rel = [i for _r, _k, i in curve]
    assert rel[0] == 0.0 and all(0 <= a <= b + 1e-9 for a, b in zip(rel, rel[1:])) and rel[-1] < 1.0
    x = wb.features(gid, "ar", plan)
    total = float(((x - x.mean(0)) ** 2).sum())
    assert rel[10] == pytest.approx(wb.cluster(gid, plan, 0.5).inertia / total)
