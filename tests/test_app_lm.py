"""The app with a language model loaded: every page shows the LM views (AppTest, no browser)."""
from __future__ import annotations

from pathlib import Path


import numpy as np
import pytest

pytest.importorskip("streamlit")
pytest.importorskip("transformers")
from streamlit.testing.v1 import AppTest  # noqa: E402

from foldviz.apply import apply_method  # noqa: E402
from foldviz.session import DataSource, Workbench  # noqa: E402
from foldviz.share import encode_state  # noqa: E402
from test_app import APP, TIMEOUT, assert_clean, chart, goto  # noqa: E402

SPEC = "demo:shakespeare-llama"


def lm_app() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    at.radio(key="md_kind").set_value("Bundled demo").run()
    at.selectbox(key="md_demo").set_value(SPEC).run()
    at.button(key="md_load_demo").click().run()
    assert_clean(at)
    assert at.session_state["model_source"]["spec"] == SPEC
    assert at.session_state["data_source"]["spec"] == "shakespeare:test"   # the LM demos' own held-out text
    at.session_state["data_source"] = {**at.session_state["data_source"], "limit": 8}   # quick perplexities
    at.run()
    return at


@pytest.fixture(scope="module")
def wb():
    return Workbench.load(SPEC)


def metric_value(at, label):
    return next(m.value for m in at.metric if m.label == label)


def test_model_page_shows_layers_heads_kv_groups_and_the_baseline_perplexity(wb):
    at = lm_app()
    assert metric_value(at, "Foldable groups") == "8 of 9"
    assert float(metric_value(at, "Baseline perplexity")) == pytest.approx(
        wb.evaluate(None, DataSource("shakespeare:test", 8))["perplexity"], abs=0.01)
    heads = chart(at, "lm_head_layout")
    assert heads["layout"]["meta"] == {**heads["layout"]["meta"], "layers": 4, "heads": 8, "kv": 2}
    groups = next(d.value for d in at.dataframe if "KV groups" in d.value)
    assert (groups["foldable"] == False).any()   # noqa: E712 — the hidden width, with its reason
    assert set(groups["KV groups"].dropna()) == {2} and set(groups["unit"]) == {"channel", "neuron", "head"}
    # a bad evaluation text: one line, nothing changes
    at.radio(key="md_text_kind").set_value("a local UTF-8 text file").run()
    at.text_input(key="md_text_path").set_value("/no/such/file.txt").run()
    at.button(key="md_use_text").click().run()
    assert any("not found" in e.value for e in at.error)
    assert at.session_state["data_source"]["spec"] == "shakespeare:test"


def test_model_page_evaluates_on_a_local_wikitext2_copy(wb, tmp_path):
    plays = (Path(__file__).resolve().parent.parent / "assets" / "text" / "shakespeare")
    text = next(iter(sorted(plays.glob("[a-z]*.txt"))), None)   # a play, not the licence
    body = text.read_text(encoding="utf-8", errors="replace")[:60_000] if text else "To be, or not to be. " * 4000
    (tmp_path / "wiki.test.raw").write_text(body, encoding="utf-8")
    at = lm_app()
    at.radio(key="md_text_kind").set_value("a local WikiText-2 copy").run()
    at.text_input(key="md_wikitext_dir").set_value(str(tmp_path / "missing")).run()
    at.button(key="md_use_text").click().run()
    assert any("wiki.test.raw" in e.value for e in at.error)               # one line naming what it looked for
    assert at.session_state["data_source"]["spec"] == "shakespeare:test"
    at.text_input(key="md_wikitext_dir").set_value(str(tmp_path)).run()
    at.button(key="md_use_text").click().run()
    assert_clean(at)
    assert at.session_state["data_source"]["spec"] == f"wikitext2:{tmp_path}"
    want = wb.evaluate(None, DataSource(f"wikitext2:{tmp_path}", at.session_state["data_source"]["limit"]))
    assert float(metric_value(at, "Baseline perplexity")) == pytest.approx(want["perplexity"], abs=0.01)


def test_explorer_shows_the_folds_clusters_for_neurons_and_heads(wb):
    at = lm_app()
    goto(at, "layer_explorer")
    heat = chart(at, "similarity_heatmap")
    assert heat["layout"]["meta"]["channels"] == 512
    at.selectbox(key="le_group").set_value("model.layers.1.self_attn").run()
    assert_clean(at)
    table = next(d.value for d in at.dataframe if "KV group" in d.value)
    assert list(table["KV group"]) == [0, 0, 0, 0, 1, 1, 1, 1]
    plan = wb.plan_from(at.session_state["plan"])
    kept = at.select_slider(key="le_kept_model.layers.1.self_attn")
    assert kept.options == ["1", "2", "3", "4"]
    ratio = wb.ratio_for_kept(4, int(kept.value))
    assert np.array_equal(table["cluster"].to_numpy(), wb.cluster("model.layers.1.self_attn", plan, ratio).labels)


def test_plan_page_offers_valid_head_counts_previews_params_and_says_whether_transformers_can_load_it(wb):
    at = lm_app()
    goto(at, "fold_plan")
    at.slider(key="planw_default_ratio").set_value(0.5).run()
    assert_clean(at)
    p = at.session_state["plan"]
    assert p["default_ratio"] == 0.5 and p["repair"] == "refit"          # the LM default: Fold + refit
    assert at.selectbox(key="planw_repair").options == ["Fold (no repair) (data-free)", "Fold + refit (data-free)"]
    assert at.number_input(key="planw_samples").value == 64
    assert metric_value(at, "Parameter sparsity") == f"{100 * wb.preview(wb.plan_from(p))['param_sparsity']:.1f}%"
    df = next(d.value for d in at.dataframe if "heads kept per KV group" in d.value)   # the data editor
    assert list(df["heads kept per KV group"]) == [2, 2, 2, 2] and list(df["MLP neurons"]) == ["512 → 256"] * 4
    assert any("AutoModelForCausalLM" in s.value for s in at.success)   # 4 heads: transformers can hold it


def test_results_page_folds_compares_perplexity_generations_variance_and_sweeps(wb):
    at = lm_app()
    goto(at, "fold_results")
    at.button(key="fr_run").click().run()
    assert_clean(at)
    r = at.session_state["outcome"].report
    assert r["kind"] == "lm" and r["perplexity_after"] > r["perplexity_before"] > 1
    assert metric_value(at, "Perplexity") == f"{r['perplexity_after']:.2f}"
    before, after = at.text_area(key="fr_gen_before").value, at.text_area(key="fr_gen_after").value
    assert before and after and before != after
    var = chart(at, "variance_ratio_plot")
    assert len(var["data"][0]["x"]) == 4 and var["layout"]["xaxis"]["title"]["text"] == "decoder layer"
    at.multiselect(key="fr_sweep_ratios").set_value([0.1, 0.3]).run()
    at.button(key="fr_sweep_run").click().run()
    assert_clean(at)
    sw = chart(at, "sweep_plot")
    assert sw["layout"]["meta"]["metric"] == "perplexity" and sw["layout"]["yaxis"]["type"] == "log"
    names = {t["name"] for t in sw["data"]}
    assert names >= {"Fold + refit", "Fold (no repair)", "Magnitude pruning", "unfolded", "your plan"}
    # the reference line is data on the log axis: every y value is a perplexity, none is 1e77
    from foldviz.figures import decode_array

    rows = at.session_state["sweep"]["rows"]
    base = next(r["perplexity"] for r in rows if r["method"] == "original")
    for t in sw["data"]:
        ys = [float(y) for y in decode_array(t["y"])]
        if t["name"] == "unfolded":   # the reference line at the unfolded model's own perplexity
            assert ys == pytest.approx([base, base])
        elif t["name"] == "Fold + refit":   # one point per ratio, the sweep's own numbers
            assert sorted(ys) == pytest.approx(sorted(r["perplexity"] for r in rows if r["method"] == "refit"))


def test_learn_page_explains_and_a_link_restores_the_lm():
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params["s"] = encode_state({"spec": SPEC}, None, {"foldviz_plan": 1, "default_ratio": 0.4, "repair": "none"})
    at.run()
    assert_clean(at)
    assert at.session_state["model_source"]["spec"] == SPEC and at.session_state["plan"]["default_ratio"] == 0.4
    goto(at, "learn_folding")
    assert any("language model" in i.value for i in at.info)


def test_explorer_clusters_are_the_folds_for_every_group(wb):
    """One truth: what the explorer shows is what the fold merges (MLP neurons and query heads, any ratio)."""
    for ratio in (0.3, 0.5):
        plan = wb.default_plan(ratio, seed=3)
        res = apply_method(wb.loaded, plan, "fold")
        for gid in wb.foldable_ids():
            assert np.array_equal(wb.cluster(gid, plan).labels, res.labels[gid]), (ratio, gid)
    plan = wb.default_plan(0.0)
    assert wb.preview(plan)["params_after"] == wb.preview(plan)["params_before"]
    out = wb.fold(plan, DataSource("shakespeare:test", 4), latency=False)
    assert out.report["perplexity_after"] == out.report["perplexity_before"]   # ratio 0 changes nothing
    assert all(r["ratio"] == pytest.approx(1.0) for r in out.report["variance_ratio"])


def test_results_page_draws_per_layer_sensitivity(wb):
    at = lm_app()
    at.session_state["plan"] = {**at.session_state["plan"], "default_ratio": 0.3, "repair": "none"}   # quick folds
    goto(at, "fold_results")
    at.button(key="fr_sens_run").click().run()
    assert_clean(at)
    fig = chart(at, "sensitivity_plot")
    want = wb.sensitivity(wb.plan_from(at.session_state["plan"]), DataSource("shakespeare:test", 8))
    bars = fig["data"][0]
    assert bars["x"] == ["layer 0", "layer 1", "layer 2", "layer 3"]
    from foldviz.figures import decode_array

    assert [float(y) for y in decode_array(bars["y"])] == pytest.approx([r["perplexity"] for r in want["rows"]])
    assert fig["layout"]["meta"]["base"] == pytest.approx(want["base"])


def test_calibration_baselines_run_in_the_app_on_calibration_text_disjoint_from_the_evaluation_text(wb):
    at = lm_app()
    goto(at, "fold_results")
    assert at.text_input(key="fr_calib").value == "shakespeare:train"      # suggested for the held-out plays
    assert at.session_state["data_source"]["calib"] == "shakespeare:train"
    assert {"Wanda-sp", "FLAP"} <= set(at.multiselect(key="fr_methods").options)
    at.multiselect(key="fr_methods").set_value(["wanda_sp"]).run()
    at.button(key="fr_run").click().run()
    assert_clean(at)
    comp = at.session_state["compare"]["data"]
    assert comp["wanda_sp"]["error"] is None and comp["wanda_sp"]["metric"] > 1
    # calibrating on the evaluation text itself is refused, in one line, and nothing else is lost
    at.text_input(key="fr_calib").set_value("shakespeare:test").run()
    at.button(key="fr_run").click().run()
    err = at.session_state["compare"]["data"]["wanda_sp"]["error"]
    assert err and "is the evaluation text" in err and "\n" not in err
    assert at.session_state["outcome"] is not None
