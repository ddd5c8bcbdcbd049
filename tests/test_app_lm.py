"""The app with a language model loaded: every page shows the LM views (AppTest, no browser)."""
from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("streamlit")
pytest.importorskip("transformers")
from streamlit.testing.v1 import AppTest  # noqa: E402

from foldviz.lm.session import LMWorkbench  # noqa: E402
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
    return at


@pytest.fixture(scope="module")
def wb():
    return LMWorkbench.load(SPEC)


def test_model_page_shows_layers_heads_and_kv_groups(wb):
    at = lm_app()
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Decoder layers"] == "4" and metrics["Attention"] == "8 q / 2 kv heads"
    assert metrics["MLP neurons per layer"] == "512"
    heads = chart(at, "lm_head_layout")
    assert heads["layout"]["meta"] == {**heads["layout"]["meta"], "layers": 4, "heads": 8, "kv": 2}
    groups = at.dataframe(key="lm_groups").value if False else at.dataframe[0].value
    assert (groups["foldable"] == False).any()   # noqa: E712 — the hidden width, with its reason
    assert set(groups["KV groups"].dropna()) == {2}
    # a bad evaluation text: one line, nothing changes
    at.radio(key="lm_text_kind").set_value("a local UTF-8 text file").run()
    at.text_input(key="lm_text_path").set_value("/no/such/file.txt").run()
    at.button(key="lm_use_text").click().run()
    assert any("not found" in e.value for e in at.error) and "lm_text" not in at.session_state


def test_explorer_shows_the_folds_clusters_for_neurons_and_heads(wb):
    at = lm_app()
    goto(at, "layer_explorer")
    heat = chart(at, "similarity_heatmap")
    assert heat["layout"]["meta"]["channels"] == 512
    at.selectbox(key="lm_le_group").set_value("model.layers.1.self_attn").run()
    assert_clean(at)
    table = at.dataframe[0].value
    assert list(table["KV group"]) == [0, 0, 0, 0, 1, 1, 1, 1]
    plan = wb.plan_from(at.session_state["plan"])
    assert np.array_equal(table["folds into head"].to_numpy(), wb.cluster("model.layers.1.self_attn", plan))
    assert at.select_slider(key="lm_le_keep_model.layers.1.self_attn").options == ["1", "2", "3", "4"]


def test_plan_page_offers_valid_head_counts_and_previews_params(wb):
    at = lm_app()
    goto(at, "fold_plan")
    at.slider(key="lm_fp_global").set_value(0.5).run()
    assert_clean(at)
    p = at.session_state["plan"]
    assert p["default_ratio"] == 0.5 and p["repair"] == "none"
    removed = [m for m in at.metric if m.label == "Removed"][0].value
    assert removed == f"{100 * wb.preview(wb.plan_from(p))['removed_fraction']:.1f}%"
    table = at.dataframe[0]
    df = table.value
    assert list(df["heads kept per KV group"]) == [2, 2, 2, 2] and list(df["MLP neurons"]) == ["512 → 256"] * 4
    import json as _json

    cols = _json.loads(table.proto.columns)
    assert cols["heads kept per KV group"]["type_config"]["options"] == [1, 2, 3, 4]   # only valid head counts


def test_results_page_folds_compares_perplexity_generations_and_variance(wb):
    at = lm_app()
    goto(at, "fold_results")
    at.button(key="lm_fr_run").click().run()
    assert_clean(at)
    out = at.session_state["lm_outcome"]
    assert out["after"]["perplexity"] > out["before"]["perplexity"] > 1
    ppl = [m for m in at.metric if m.label == "Perplexity"][0]
    assert ppl.value == f"{out['after']['perplexity']:.2f}"
    before, after = at.text_area(key="lm_gen_before").value, at.text_area(key="lm_gen_after").value
    assert before and after and before != after
    var = chart(at, "variance_ratio_plot")
    assert len(var["data"][0]["x"]) == 4
    at.button(key="lm_fr_sweep").click().run()
    assert_clean(at)
    sw = chart(at, "lm_sweep_plot")
    assert {t["name"] for t in sw["data"]} >= {"Fold (k-means)", "Magnitude pruning", "Random pruning", "your plan"}


def test_learn_page_explains_and_a_link_restores_the_lm():
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params["s"] = encode_state({"spec": SPEC}, None, {"foldviz_plan": 1, "default_ratio": 0.4, "repair": "none"})
    at.run()
    assert_clean(at)
    assert at.session_state["model_source"]["spec"] == SPEC and at.session_state["plan"]["default_ratio"] == 0.4
    goto(at, "learn_folding")
    assert any("language model" in i.value for i in at.info)


def test_explorer_clusters_are_fold_lm_labels_for_every_group(wb):
    """One truth: what the LM explorer shows is what fold_lm merges (MLP neurons and query heads, any ratio)."""
    from foldviz.lm import fold_lm

    for ratio in (0.3, 0.5):
        plan = wb.default_plan(ratio, seed=3)
        res = fold_lm(wb.model, plan)
        for gid in wb.foldable_ids():
            assert np.array_equal(wb.cluster(gid, plan), res.labels[gid]), (ratio, gid)
    plan = wb.default_plan(0.0)
    assert wb.preview(plan)["params_after"] == wb.preview(plan)["params_before"]
    res = wb.fold(plan)
    assert wb.perplexity(res.model)["perplexity"] == wb.perplexity(None)["perplexity"]   # ratio 0 changes nothing
    assert all(r["ratio"] == pytest.approx(1.0) for r in wb.mlp_variance(res.model))
