"""AppTest tests: drive every page of the Streamlit app without a browser.

Charts are checked through the PlotlyChart proto's JSON spec (``layout.meta.figure`` names the
foldviz.figures builder that made it).  Model loads are cached process-wide by st.cache_resource,
so only the first test pays for loading each demo.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from foldviz import figures as F  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "app.py")
TIMEOUT = 180


@pytest.fixture(scope="module", autouse=True)
def _demo_dir():
    """Use the bundled demos; FOLDVIZ_DEMO_DIR may point at another folder of demo cards (development)."""
    import foldviz.models as M

    old = M.MODELS_DIR
    if os.environ.get("FOLDVIZ_DEMO_DIR"):
        M.MODELS_DIR = Path(os.environ["FOLDVIZ_DEMO_DIR"])
    if not M.list_demos():
        pytest.fail(f"no bundled demo models in {M.MODELS_DIR} (run `make demos`)")
    yield
    M.MODELS_DIR = old


def demos() -> list[str]:
    import foldviz.models as M

    d = Path(os.environ["FOLDVIZ_DEMO_DIR"]) if os.environ.get("FOLDVIZ_DEMO_DIR") else M.MODELS_DIR
    return [f"demo:{n}" for n in M.list_demos(d)]


# ------------------------------------------------------------------------------------------------ helpers

def new_app() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    assert_clean(at)
    return at


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def goto(at: AppTest, page: str) -> AppTest:
    at.switch_page(f"pages/{page}.py").run()
    assert_clean(at)
    # the router (app.py) ran: sidebar with the model/plan summary is there
    assert len(at.sidebar.toggle) == 1 and at.sidebar.caption, f"{page} ran without the app router"
    return at


def charts(at: AppTest) -> list[dict]:
    out = []
    for el in at.get("plotly_chart"):
        spec = json.loads(el.proto.spec)
        out.append(spec)
    return out


def chart(at: AppTest, figure: str) -> dict:
    found = [c for c in charts(at) if c["layout"].get("meta", {}).get("figure") == figure]
    assert found, f"no {figure} chart; have {[c['layout'].get('meta', {}).get('figure') for c in charts(at)]}"
    return found[0]


def trace_names(spec: dict) -> list[str]:
    return [t.get("name") for t in spec["data"]]


def metric(at: AppTest, label: str) -> str:
    for m in at.metric:
        if m.label == label:
            return m.value
    raise AssertionError(f"no metric {label!r}; have {[m.label for m in at.metric]}")


def plan(at: AppTest) -> dict:
    return dict(at.session_state["plan"])


def pct(text: str) -> float:
    assert text.endswith("%"), text
    return float(text[:-1])


# ------------------------------------------------------------------------------------------------ tests

def test_starts_on_digits_resnet_with_summary():
    at = new_app()
    assert at.title[0].value == "Model & data"
    assert at.session_state["model_source"]["spec"] == "demo:digits-resnet"
    assert metric(at, "Parameters").endswith("k")
    assert "M" in metric(at, "FLOPs / image")
    acc = pct(metric(at, "Baseline accuracy"))
    assert 10.0 < acc <= 100.0
    # groups table lists every group with foldable flag
    df = at.dataframe[0].value
    assert {"group", "units", "unit", "foldable", "reason"} <= set(df.columns)
    assert "conv1" in set(df["group"])
    # sidebar shows the model and a default plan
    side = " ".join(c.value for c in at.sidebar.caption)
    assert "demo:digits-resnet" in side and "Fold-DFR" in side  # the default repair


@pytest.mark.parametrize("spec", demos())
def test_every_page_works_on_every_demo(spec):
    at = new_app()
    if spec != "demo:digits-resnet":
        at.selectbox(key="md_demo").set_value(spec).run()
        at.button(key="md_load_demo").click().run()
        assert_clean(at)
    assert at.session_state["model_source"]["spec"] == spec
    assert pct(metric(at, "Baseline accuracy")) > 10

    goto(at, "layer_explorer")
    for fig in ("group_overview", "similarity_heatmap", "embedding_scatter", "filter_grid",
                "cluster_size_histogram", "inertia_curve"):
        spec_ = chart(at, fig)
        assert spec_["layout"]["title"]["text"]
    heat = chart(at, "similarity_heatmap")
    assert heat["layout"]["xaxis"]["title"]["text"] == "channel (ordered by cluster)"

    goto(at, "fold_plan")
    assert chart(at, "plan_preview_bars")
    assert "→" in metric(at, "Foldable channels")

    goto(at, "fold_results")
    at.button(key="fr_run").click().run()
    assert_clean(at)
    rep = at.session_state["outcome"].report
    assert rep["model"] == spec and rep["params_after"] < rep["params_before"]
    assert pct(metric(at, "Accuracy")) == pytest.approx(100 * rep["accuracy_after"], abs=0.06)
    chart(at, "variance_ratio_plot")

    goto(at, "learn_folding")
    assert chart(at, "filter_gallery")


def test_layer_explorer_ratio_updates_view_and_plan():
    at = new_app()
    goto(at, "layer_explorer")
    assert at.selectbox(key="le_group").value == "conv1"
    at.slider(key="le_ratio_conv1").set_value(0.5).run()
    assert_clean(at)
    assert metric(at, "Channels → clusters") == "32 → 16"
    hist = chart(at, "cluster_size_histogram")
    sizes = F.decode_array(hist["data"][0]["x"])
    counts = F.decode_array(hist["data"][0]["y"])
    assert sum(int(s) * int(c) for s, c in zip(sizes, counts)) == 32  # every channel is in one cluster
    emb = chart(at, "embedding_scatter")
    assert "channel %{customdata[0]} · cluster %{customdata[1]}" in emb["data"][0]["hovertemplate"]
    assert emb["layout"]["meta"]["clusters"] == 16
    # push the explored ratio into the plan
    at.button(key="le_apply").click().run()
    assert_clean(at)
    assert plan(at)["ratios"] == {"conv1": 0.5}
    # another group
    at.selectbox(key="le_group").set_value("layer2.0.conv1").run()
    assert_clean(at)
    assert metric(at, "Channels → clusters").startswith("64 → ")


def test_plan_survives_page_switches():
    at = new_app()
    goto(at, "fold_plan")
    at.selectbox(key="fp_group").set_value("layer1.0.conv1").run()
    at.slider(key="planw_ratio_layer1.0.conv1").set_value(0.6).run()
    at.slider(key="planw_default_ratio").set_value(0.4).run()
    at.selectbox(key="planw_repair").set_value("none").run()
    assert_clean(at)
    p = plan(at)
    assert p["ratios"] == {"layer1.0.conv1": 0.6} and p["default_ratio"] == 0.4 and p["repair"] == "none"
    for page in ("layer_explorer", "fold_results", "model_data", "learn_folding"):
        goto(at, page)
        assert plan(at) == p
    goto(at, "fold_plan")
    assert at.slider(key="planw_default_ratio").value == 0.4
    assert at.selectbox(key="planw_repair").value == "none"
    at.selectbox(key="fp_group").set_value("layer1.0.conv1").run()
    assert at.slider(key="planw_ratio_layer1.0.conv1").value == 0.6
    side = " ".join(c.value for c in at.sidebar.caption)
    assert "Fold-Naive · ratio 40% · 1 override(s)" in side
    # the per-group table follows the plan: 32 channels at 0.6 -> 13
    table = {r["group"]: r for r in at.dataframe[0].value.to_dict("records")}
    assert table["layer1.0.conv1"]["channels after"] == 13
    assert table["conv1"]["channels after"] == 19


def test_export_and_import_plan():
    at = new_app()
    goto(at, "fold_plan")
    at.slider(key="planw_default_ratio").set_value(0.25).run()
    exported = json.loads(at.code[0].value)  # the "Show plan JSON" block = the download's content
    assert exported["foldviz_plan"] == 1 and exported["default_ratio"] == 0.25
    assert exported["model"] == "demo:digits-resnet"

    # import a modified plan through the file uploader
    new = dict(exported, default_ratio=0.55, repair="r", seed=7, ratios={"conv1": 0.7}, skip=["layer3.1.conv1"])
    at.file_uploader(key="fp_upload").set_value(("plan.json", json.dumps(new).encode(), "application/json")).run()
    at.button(key="fp_import").click().run()
    assert_clean(at)
    p = plan(at)
    assert (p["default_ratio"], p["repair"], p["seed"], p["ratios"], p["skip"]) == \
        (0.55, "r", 7, {"conv1": 0.7}, ["layer3.1.conv1"])
    assert any("Plan imported" in s.value for s in at.success)
    # widgets show the imported values
    assert at.slider(key="planw_default_ratio").value == 0.55
    assert at.selectbox(key="planw_repair").value == "r"
    assert at.number_input(key="planw_seed").value == 7

    # a bad plan is refused with a clear message and the current plan is kept
    bad = dict(exported, ratios={"no.such.layer": 0.5})
    at.radio(key="fp_import_src").set_value("pasted JSON").run()
    at.text_area(key="fp_paste").set_value(json.dumps(bad)).run()
    at.button(key="fp_import").click().run()
    assert not at.exception
    assert any("no.such.layer" in e.value for e in at.error)
    assert plan(at) == p
    at.text_area(key="fp_paste").set_value("{not json").run()
    at.button(key="fp_import").click().run()
    assert any("JSON" in e.value for e in at.error)
    assert plan(at) == p

    # the file still sitting in the uploader is not read while "pasted JSON" is selected, and vice versa
    at.text_area(key="fp_paste").set_value(json.dumps(dict(exported, default_ratio=0.15))).run()
    at.button(key="fp_import").click().run()
    assert plan(at)["default_ratio"] == 0.15 and any("pasted plan" in s.value for s in at.success)

    # a plan made for another model: nothing changes until the user confirms
    before = plan(at)
    other = dict(exported, model="demo:digits-vgg", default_ratio=0.65, ratios={})
    at.text_area(key="fp_paste").set_value(json.dumps(other)).run()
    at.button(key="fp_import").click().run()
    assert any("demo:digits-vgg" in w.value and "Replace your current plan" in w.value for w in at.warning)
    assert plan(at) == before
    at.button(key="fp_cancel").click().run()
    assert plan(at) == before and any("cancelled" in i.value for i in at.info)
    at.button(key="fp_import").click().run()
    at.button(key="fp_confirm").click().run()
    assert_clean(at)
    assert plan(at)["default_ratio"] == 0.65 and plan(at)["model"] == "demo:digits-resnet"


def test_suggest_plan_allocates_by_redundancy():
    at = new_app()
    goto(at, "fold_plan")
    at.toggle(key="planw_skip_conv1").set_value(True).run()
    at.slider(key="fp_target").set_value(40).run()
    at.button(key="fp_suggest").click().run()
    assert_clean(at)
    p = plan(at)
    assert p["ratios"], "suggestion should set per-group ratios"
    assert p["skip"] == ["conv1"] and "conv1" not in p["ratios"] and p["default_ratio"] > 0
    assert len(set(round(v, 3) for v in p["ratios"].values())) > 1
    assert any("Suggested plan" in s.value for s in at.success)


def test_run_fold_shows_results_and_repairs():
    at = new_app()
    goto(at, "fold_plan")
    at.slider(key="planw_default_ratio").set_value(0.5).run()
    goto(at, "fold_results")
    at.multiselect(key="fr_methods").set_value(["none", "r", "ar"]).run()
    at.button(key="fr_run").click().run()
    assert_clean(at)
    out = at.session_state["outcome"]
    rep = out.report
    assert rep["plan"]["default_ratio"] == 0.5
    assert rep["params_after"] < rep["params_before"]
    assert 0.5 < rep["param_sparsity"] < 0.9
    shown = pct(metric(at, "Accuracy"))
    assert shown == pytest.approx(100 * rep["accuracy_after"], abs=0.06)
    assert any(f"{100 * rep['accuracy_before']:.1f}%" in c.value for c in at.caption)
    ba = chart(at, "before_after_bars")
    assert ba["layout"]["meta"]["metrics"][:2] == ["accuracy", "params"]
    ch = chart(at, "channels_per_group")
    assert trace_names(ch) == ["before", "after"]
    var = chart(at, "variance_ratio_plot")
    assert trace_names(var) == ["Fold-Naive", "Fold-R", "Fold-AR", "ideal (ratio = 1)"]
    ideal = var["data"][-1]
    assert ideal["line"]["dash"] == "dash" and F.decode_array(ideal["y"]) == [1.0, 1.0]
    assert var["layout"]["yaxis"]["type"] == "log"
    # repair matters: the naive fold's variance collapses more than Fold-R's
    naive = [float(v) for v in F.decode_array(var["data"][0]["y"])]
    fold_r = [float(v) for v in F.decode_array(var["data"][1]["y"])]
    assert min(naive) < min(fold_r)
    # the result and plan survive a page switch
    goto(at, "model_data")
    goto(at, "fold_results")
    assert at.session_state["outcome"] is out
    assert chart(at, "variance_ratio_plot")


def test_sweep_panel_plots_methods_and_is_cached():

    at = new_app()
    goto(at, "fold_results")
    at.multiselect(key="fr_sweep_methods").set_value(["none", "ar", "l1"]).run()
    at.multiselect(key="fr_sweep_ratios").set_value([0.2, 0.5]).run()
    at.button(key="fr_sweep_run").click().run()
    assert_clean(at)
    sw = chart(at, "sweep_plot")
    assert trace_names(sw) == ["Fold-Naive", "Fold-AR", "L1 pruning", "unfolded"]
    assert sw["layout"]["xaxis"]["title"]["text"].startswith("parameter sparsity (%")
    assert sw["layout"]["yaxis"]["title"]["text"] == "accuracy (%)"
    xs = F.decode_array(sw["data"][0]["x"])
    assert len(xs) == 2 and 0 < float(xs[0]) < float(xs[1]) < 100
    assert not [t for t in sw["data"] if t["name"] == "your plan"]   # nothing folded yet
    rows = at.session_state["sweep"]["rows"]
    import foldviz.session as session

    calls = []
    real = session.sweep
    session.sweep = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    try:
        at.button(key="fr_sweep_run").click().run()
    finally:
        session.sweep = real
    assert_clean(at)
    assert at.session_state["sweep"]["rows"] == rows and calls == []   # served from the workbench's memory
    # after a fold, the user's plan is a star on the sweep plot at its own sparsity and accuracy
    at.button(key="fr_run").click().run()
    rep = at.session_state["outcome"].report
    star = [t for t in chart(at, "sweep_plot")["data"] if t["name"] == "your plan"]
    assert len(star) == 1
    assert F.decode_array(star[0]["x"])[0] == pytest.approx(100 * rep["param_sparsity"])
    assert F.decode_array(star[0]["y"])[0] == pytest.approx(100 * rep["accuracy_after"])


def test_failures_keep_model_plan_and_results():
    at = new_app()
    goto(at, "fold_plan")
    at.slider(key="planw_default_ratio").set_value(0.35).run()
    p = plan(at)
    goto(at, "model_data")
    # a checkpoint that is not a valid state dict
    at.radio(key="md_kind").set_value("Upload a checkpoint").run()
    at.file_uploader(key="md_upload").set_value(("broken.safetensors", b"not a checkpoint", "application/octet-stream")).run()
    at.button(key="md_load_up").click().run()
    assert not at.exception
    assert at.error and "previous model" in at.error[0].value
    assert at.session_state["model_source"]["spec"] == "demo:digits-resnet"
    assert plan(at) == p
    # a dataset folder that does not exist
    at.radio(key="md_kind").set_value("Bundled demo").run()
    at.radio(key="md_data_kind").set_value("ImageFolder").run()
    at.text_input(key="md_if_root").set_value("/nonexistent/folder").run()
    at.button(key="md_use_data").click().run()
    assert not at.exception
    assert any("/nonexistent/folder" in e.value for e in at.error)
    assert at.session_state["data_source"]["spec"] == "digits"
    assert plan(at) == p
    # Fold-R without data fails clearly and keeps the previous result
    at.radio(key="md_data_kind").set_value("none (data-free only)").run()
    at.button(key="md_use_data").click().run()
    assert_clean(at)
    goto(at, "fold_results")
    at.button(key="fr_run").click().run()
    assert_clean(at)
    first = at.session_state["outcome"]
    assert first is not None and first.report["accuracy_after"] is None
    goto(at, "fold_plan")
    at.selectbox(key="planw_repair").set_value("r").run()
    goto(at, "fold_results")
    at.button(key="fr_run").click().run()
    assert not at.exception
    assert any("Fold-R" in e.value and "data" in e.value for e in at.error)
    assert at.session_state["outcome"] is first
    assert plan(at)["repair"] == "r"


def test_learn_walkthrough_all_steps():
    at = new_app()
    goto(at, "learn_folding")
    expected = ["filter_gallery", "similarity_heatmap", "embedding_scatter", "filter_grid", "matrix_heatmap",
                "merged_variance_curve", "variance_ratio_plot"]
    for i, fig in enumerate(expected):
        assert at.session_state["learn_step"] == i
        assert chart(at, fig)
        if i < len(expected) - 1:
            at.button(key="learn_next").click().run()
            assert_clean(at)
    var = chart(at, "variance_ratio_plot")
    assert trace_names(var)[:4] == ["Fold-Naive", "Fold-AR", "Fold-DFR", "Fold-R"]
    table = at.dataframe[0].value
    assert list(table["method"]) == ["Fold-Naive", "Fold-AR", "Fold-DFR", "Fold-R"]
    assert all(v.endswith("%") for v in table["accuracy"])
    # the step survives a page switch
    goto(at, "fold_plan")
    goto(at, "learn_folding")
    assert at.session_state["learn_step"] == 6
    at.button(key="learn_back").click().run()
    assert at.session_state["learn_step"] == 5


@pytest.mark.slow
def test_upload_checkpoint_and_torchvision_model_data_free():
    at = new_app()
    # a weights-only checkpoint for a demo architecture
    weights = (Path(__file__).resolve().parent.parent / "assets" / "models" / "digits-vgg.safetensors").read_bytes()
    at.radio(key="md_kind").set_value("Upload a checkpoint").run()
    # the architecture offered for the checkpoint is the loaded model's, not the first in the list
    assert at.selectbox(key="md_up_arch").value == at.session_state["model_source"]["spec"] == "demo:digits-resnet"
    at.selectbox(key="md_up_arch").set_value("demo:digits-vgg").run()
    at.file_uploader(key="md_upload").set_value(("my-vgg.safetensors", weights, "application/octet-stream")).run()
    at.button(key="md_load_up").click().run()
    assert_clean(at)
    src = at.session_state["model_source"]
    assert src["spec"] == "demo:digits-vgg" and src["weights_name"] == "my-vgg.safetensors"
    assert pct(metric(at, "Baseline accuracy")) > 50
    assert "my-vgg.safetensors" in " ".join(c.value for c in at.sidebar.caption)

    # a torchvision architecture (random init) without data: data-free pages still work
    at.radio(key="md_kind").set_value("torchvision architecture").run()
    at.selectbox(key="md_arch").set_value("resnet18").run()
    at.number_input(key="md_ncls").set_value(10).run()
    at.checkbox(key="md_stem").check().run()
    at.button(key="md_load_tv").click().run()
    assert_clean(at)
    assert at.session_state["model_source"]["spec"] == "torchvision:resnet18"
    assert at.session_state["data_source"]["spec"] is None
    assert metric(at, "Baseline accuracy") == "—"
    assert any("Random initialisation" in i.value for i in at.info)
    goto(at, "layer_explorer")
    assert chart(at, "similarity_heatmap") and chart(at, "filter_grid")["layout"]["meta"]["mode"] == "rgb"
    goto(at, "fold_results")
    at.multiselect(key="fr_methods").set_value(["none"]).run()   # one comparison fold beside the plan's own
    at.button(key="fr_run").click().run(timeout=900)
    assert_clean(at)
    assert metric(at, "Accuracy") == "—"
    assert at.session_state["outcome"].report["params_after"] < at.session_state["outcome"].report["params_before"]
    assert any("pick evaluation data" in w.value for w in at.warning)  # the sweep needs data
    goto(at, "learn_folding")  # Learn falls back to the bundled demo
    assert any("demo:digits-resnet" in i.value for i in at.info)


def test_umap_embedding_in_explorer():
    at = new_app()
    goto(at, "layer_explorer")
    at.radio(key="le_embed").set_value("UMAP").run()
    assert_clean(at)
    emb = chart(at, "embedding_scatter")
    assert emb["layout"]["meta"]["method"] == "UMAP" and emb["layout"]["xaxis"]["title"]["text"] == "UMAP 1 (a.u.)"
