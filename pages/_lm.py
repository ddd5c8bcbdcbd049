"""The language-model views of the five pages (a Llama-layout decoder is loaded). Thin: every number comes from
``foldviz.lm.session.LMWorkbench``; each page calls one function here and stops."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import streamlit as st

from foldviz import figures as F
from foldviz.lm.session import DEFAULT_EVAL_TOKENS, DEFAULT_TEXT, SWEEP_RATIOS, LMWorkbenchError
from foldviz.methods import METHODS, keys_for
from foldviz.session import fmt_count
from pages import _ui

PROMPT = "ROMEO.\n"


def _wb():
    return _ui.workbench_or_stop()


def text_spec() -> str:
    return st.session_state.get("lm_text", DEFAULT_TEXT)


def _plan(wb):
    return _ui.current_plan(wb)


# ------------------------------------------------------------------------------------------------ model page

def model_page(wb) -> None:
    """Model & data for a language model: structure (layers, heads, KV groups) and the evaluation text."""
    s = wb.summary()
    st.subheader(f"3 · {s['spec']} — {s['arch']}")
    m = st.columns(5)
    m[0].metric("Parameters", fmt_count(s["params"]), help=f"{fmt_count(s['params_non_embedding'])} without the "
                "embedding" + (" (tied with the output layer)" if s["tied_embeddings"] else ""))
    m[1].metric("Decoder layers", s["layers"])
    m[2].metric("Attention", f"{s['heads']} q / {s['kv_heads']} kv heads", help=s["attention"])
    m[3].metric("MLP neurons per layer", s["mlp"])
    m[4].metric("Foldable groups", f"{s['foldable_groups']} of {s['groups']}")
    st.caption(f"{s['model_type']} · hidden {s['hidden']} · head_dim {s['head_dim']} · vocabulary {s['vocab']} · "
               f"context {s['context']} tokens · {s['attention']}. The hidden (residual) width is never folded; per "
               "layer the MLP neurons fold, and the query heads fold within each KV group (the same number kept in "
               "every group, so the model stays a plain GQA model and RoPE is untouched).")
    _ui.chart(F.lm_head_layout(s["layers"], s["heads"], s["kv_heads"]), key="lm_heads_layout")
    card = s["card"] or {}
    if card.get("heldout_perplexity"):
        st.info(f"Bundled demo trained by `foldviz.lm.train` on {len(card.get('train_plays', []))} Shakespeare works; "
                f"held-out perplexity {card['heldout_perplexity']:.1f} on {', '.join(card.get('test_plays', []))} "
                f"(whole plays never seen in training). {card.get('attribution', '')}")
    st.markdown("#### Channel groups")
    st.dataframe(pd.DataFrame(wb.group_rows()), hide_index=True, width="stretch", key="lm_groups")

    with st.container(border=True):
        st.subheader("Evaluation text")
        cur = text_spec()
        kind = st.radio("Text", ["held-out plays (shakespeare:test)", "a local UTF-8 text file"],
                        index=0 if cur == DEFAULT_TEXT else 1, horizontal=True, key="lm_text_kind")
        new = DEFAULT_TEXT
        if kind != "held-out plays (shakespeare:test)":
            path = st.text_input("Path of a text file (at most 20 MiB)", value=cur[5:] if cur.startswith("text:") else "",
                                 key="lm_text_path")
            new = f"text:{path.strip()}" if path.strip() else None
        if new and new != cur and st.button("Use this text", key="lm_use_text"):
            try:
                toks = wb.tokens(new)
            except LMWorkbenchError as exc:
                st.error(f"{exc}. Keeping {cur}.")
            else:
                st.session_state["lm_text"] = new
                st.session_state["lm_outcome"] = None
                _ui.flash("success", f"Evaluating on {new}: {toks.numel():,} tokens.")
                st.rerun()
        st.caption(f"Perplexity: Wanda's protocol (non-overlapping windows of the context length, each scored on its "
                   f"own); the app scores the first {DEFAULT_EVAL_TOKENS:,} tokens, the command line all of them.")


# ------------------------------------------------------------------------------------------------ explorer

def explorer_page() -> None:
    wb = _wb()
    st.title("Layer explorer")
    st.caption("How similar are the MLP neurons of each layer, and the query heads within each KV group? These are "
               "the clusters the fold merges.")
    plan = _plan(wb)
    ids = wb.foldable_ids()
    c1, c2 = st.columns([2, 2])
    gid = c1.selectbox("Group", ids, key="lm_le_group",
                       format_func=lambda i: f"{i} ({wb.group(i).n} {wb.group(i).unit}s)")
    g = wb.group(gid)
    if g.kind == "mlp":
        ratio = c2.slider("Fold ratio (fraction of neurons removed)", 0.0, 0.95, float(round(plan.ratio_for(gid), 2)),
                          0.05, key=f"lm_le_ratio_{gid}")
    else:
        per = g.n if g.mha else g.heads_per_kv
        cur = per - round(per * plan.ratio_for(gid)) if plan.ratio_for(gid) else per
        keep = c2.select_slider("Query heads kept per KV group" if not g.mha else "Heads kept", wb.head_options(gid),
                                value=int(min(max(cur, 1), per)), key=f"lm_le_keep_{gid}")
        ratio = wb.ratio_for_heads(per, int(keep))
    try:
        with st.spinner("Clustering…"):
            d = wb.group_detail(gid, plan, ratio)
    except Exception as exc:  # noqa: BLE001
        _ui.report_failure(exc, f"Analysing {gid}")
        return
    m = st.columns(4)
    m[0].metric(f"{g.unit.capitalize()}s → clusters", f"{g.n} → {d['k']}")
    m[1].metric("Mean cosine", f"{d['mean_cos']:.3f}")
    m[2].metric("Max cosine", f"{d['max_cos']:.3f}")
    m[3].metric("Redundancy score", f"{d['score']:.2f}")
    labels = np.asarray(d["labels"])
    if g.kind == "mlp":
        st.caption(f"Feature per neuron: its gate row, up row and down column ({d['features_dim']} numbers). Folding "
                   "averages the gate and up rows of a cluster and sums its down columns.")
        left, right = st.columns(2)
        with left:
            _ui.chart(F.similarity_heatmap(d["similarity"], labels, order=d["order"], group=gid,
                                           title=f"Neuron cosine similarity, ordered by cluster — {gid}"),
                      key="lm_le_heat")
        with right:
            _ui.chart(F.embedding_scatter(d["coords"], labels, method="PCA", group=gid), key="lm_le_embed")
        _ui.chart(F.cluster_size_histogram(labels, group=gid), key="lm_le_sizes")
    else:
        kv = np.arange(g.n) // (g.n if g.mha else g.heads_per_kv)
        st.caption(f"Feature per query head: its q_proj rows and o_proj columns ({d['features_dim']} numbers"
                   + ("; MHA: also k and v" if g.mha else "") + "). Outlined blocks: KV groups — heads fold only "
                   "within their KV group.")
        left, right = st.columns([3, 2])
        with left:
            _ui.chart(F.similarity_heatmap(d["similarity"], kv, order=np.arange(g.n), group=gid, zrange="full",
                                           axis_label="query head (KV group order)",
                                           title=f"Query-head cosine similarity by KV group — {gid}"),
                      key="lm_le_heads")
        with right:
            st.dataframe(pd.DataFrame({"query head": np.arange(g.n), "KV group": kv,
                                       "folds into head": labels}), hide_index=True, key="lm_le_head_table")
            st.caption("Heads with the same 'folds into head' merge into one (q averaged, o summed).")


# ------------------------------------------------------------------------------------------------ plan

def plan_page() -> None:
    wb = _wb()
    ss = st.session_state
    st.title("Fold plan")
    st.caption("MLP neurons removed per layer and query heads kept per KV group. No data, no repair: language models "
               "fold as in the paper's LLaMA experiments.")
    plan = _plan(wb)

    def _set(**kw):
        _ui.update_plan(**kw)

    with st.container(border=True):
        st.subheader("Global settings")
        c1, c2, c3 = st.columns([2, 2, 1])
        c1.slider("Global ratio (fraction of MLP neurons and query heads removed in every layer)", 0.0, 0.9,
                  float(plan.default_ratio), 0.05, key="lm_fp_global",
                  on_change=lambda: _set(default_ratio=float(ss["lm_fp_global"])))
        algos = ["kmeans", "ward"]
        c2.selectbox("Clustering", algos, index=algos.index(plan.clustering.get("algorithm", "kmeans"))
                     if plan.clustering.get("algorithm", "kmeans") in algos else 0, key="lm_fp_algo",
                     format_func=lambda a: {"kmeans": "k-means (Hartigan-refined)", "ward": "Ward (the authors')"}[a],
                     on_change=lambda: _set(clustering={**ss["plan"].get("clustering", {}),
                                                        "algorithm": ss["lm_fp_algo"]}))
        c3.number_input("Seed", 0, 2**31 - 1, int(plan.seed), key="lm_fp_seed",
                        on_change=lambda: _set(seed=int(ss["lm_fp_seed"])))
    plan = _plan(wb)
    st.subheader("Per layer")
    rows = []
    layers = sorted({g.layer for g in wb.groups if g.foldable})
    for i in layers:
        mlp = next((g for g in wb.groups if g.kind == "mlp" and g.layer == i and g.foldable), None)
        att = next((g for g in wb.groups if g.kind == "heads" and g.layer == i and g.foldable), None)
        row = {"layer": i}
        if mlp:
            r = 0.0 if mlp.id in plan.skip else plan.ratio_for(mlp.id)
            row["MLP ratio"] = r
        if att:
            per = att.n if att.mha else att.heads_per_kv
            r = 0.0 if att.id in plan.skip else plan.ratio_for(att.id)
            row["heads kept per KV group"] = per - int(round(per * r)) if r else per
        rows.append(row)
    sizes = {r["id"]: r for r in wb.sizes(plan)}
    for row in rows:
        mid = f"model.layers.{row['layer']}.mlp"
        if mid in sizes:
            row["MLP neurons"] = f"{sizes[mid]['n_before']} → {sizes[mid]['n_after']}"
    df = pd.DataFrame(rows)
    heads_g = next((g for g in wb.groups if g.kind == "heads" and g.foldable), None)
    opts = wb.head_options(heads_g.id) if heads_g else [1]
    edited = st.data_editor(
        df, hide_index=True, width="stretch", key="lm_fp_table_" + _ui.plan_json(ss["plan"])[-12:].encode().hex(),
        disabled=["layer", "MLP neurons"],
        column_config={"MLP ratio": st.column_config.NumberColumn(min_value=0.0, max_value=0.95, step=0.05,
                                                                  format="%.2f"),
                       "heads kept per KV group": st.column_config.SelectboxColumn(options=opts, required=True)})
    changed, ratios = False, dict(plan.ratios)
    for (_, old), (_, new) in zip(df.iterrows(), edited.iterrows()):
        i = int(old["layer"])
        if "MLP ratio" in df and abs(float(new["MLP ratio"]) - float(old["MLP ratio"])) > 1e-9:
            ratios[f"model.layers.{i}.mlp"] = float(min(0.95, max(0.0, new["MLP ratio"])))
            changed = True
        if "heads kept per KV group" in df and int(new["heads kept per KV group"]) != int(old["heads kept per KV group"]):
            att = wb.group(f"model.layers.{i}.self_attn")
            ratios[att.id] = wb.ratio_for_heads(att.n if att.mha else att.heads_per_kv, int(new["heads kept per KV group"]))
            changed = True
    if changed:
        _ui.replace_plan({**ss["plan"], "ratios": ratios})
        st.rerun()
    if plan.ratios and st.button("Clear per-layer overrides", key="lm_fp_clear"):
        _ui.replace_plan({**ss["plan"], "ratios": {}, "skip": []})
        st.rerun()
    st.caption(f"Head counts are restricted to valid values: 1 … {max(opts)} query heads per KV group (every KV group "
               "keeps the same number, so the folded model loads as a standard GQA model).")

    pv = wb.preview(plan)
    m = st.columns(3)
    m[0].metric("Parameters", f"{fmt_count(pv['params_before'])} → {fmt_count(pv['params_after'])}")
    m[1].metric("Removed", _ui.fmt_pct(pv["removed_fraction"]))
    m[2].metric("Groups folded", sum(1 for r in pv["groups"] if r["n_after"] < r["n_before"]))
    st.download_button("Download plan (JSON)", plan.to_json(), file_name="lm-fold-plan.json",
                       mime="application/json", key="lm_fp_download", type="primary")
    with st.expander("Show plan JSON"):
        st.code(plan.to_json(), language="json")


# ------------------------------------------------------------------------------------------------ results

def results_page() -> None:
    wb = _wb()
    ss = st.session_state
    st.title("Fold & results")
    st.caption("Fold the language model with the plan, compare perplexity and generations, and see how the MLP "
               "outputs' variance changes per layer.")
    plan = _plan(wb)
    pj = _ui.plan_json(plan.to_dict())
    text = text_spec()
    lm_methods = list(keys_for("lm"))
    c1, c2, c3 = st.columns([2, 2, 1])
    method = c1.selectbox("Method", lm_methods, key="lm_fr_method", format_func=lambda k: METHODS[k].label,
                          help="\n".join(f"- **{METHODS[k].label}**: {METHODS[k].description}" for k in lm_methods))
    c2.caption(f"Evaluation text: **{text}**, first {DEFAULT_EVAL_TOKENS:,} tokens.")
    if c3.button("Run fold", type="primary", key="lm_fr_run", width="stretch"):
        try:
            with st.spinner(f"Folding ({METHODS[method].label}) and measuring perplexity…"):
                res = wb.fold(plan, method)
                before = wb.perplexity(None, text)
                after = wb.perplexity(res.model, text)
                var = wb.mlp_variance(res.model, text)
            ss["lm_outcome"] = {"plan": pj, "method": method, "result": res, "before": before, "after": after,
                                "variance": var}
        except Exception as exc:  # noqa: BLE001
            _ui.report_failure(exc, "Folding")
    out = ss.get("lm_outcome")
    if out:
        res = out["result"]
        if out["plan"] != pj:
            st.warning("These results come from an earlier version of the plan; press **Run fold** to update them.")
        st.subheader(f"Result — {METHODS[out['method']].label}")
        m = st.columns(3)
        m[0].metric("Perplexity", f"{out['after']['perplexity']:.2f}",
                    delta=f"{out['after']['perplexity'] - out['before']['perplexity']:+.2f}", delta_color="inverse",
                    help=f"before: {out['before']['perplexity']:.2f} ({out['before']['windows']} windows of "
                         f"{out['before']['seq_len']} tokens)")
        m[1].metric("Parameters", fmt_count(res.params_after), delta=f"{-100 * res.removed_fraction:.1f}%",
                    delta_color="inverse", help=f"before: {fmt_count(res.params_before)}")
        m[2].metric("Fold time", f"{res.seconds['total']:.2f} s")
        st.markdown("**Greedy generations**")
        prompt = st.text_input("Prompt", PROMPT.strip() + "\\n", key="lm_fr_prompt",
                               help="\\n is a newline. 40 new tokens, greedy.").replace("\\n", "\n")
        left, right = st.columns(2)
        try:
            left.text_area("Before", wb.generate(None, prompt), height=160, disabled=True, key="lm_gen_before")
            right.text_area(f"After ({METHODS[out['method']].label})", wb.generate(res.model, prompt), height=160,
                            disabled=True, key="lm_gen_after")
        except Exception as exc:  # noqa: BLE001
            _ui.report_failure(exc, "Generation")
        st.subheader("MLP output variance per layer")
        _ui.chart(F.variance_ratio_plot({out["method"]: out["variance"]}, title="Var(folded MLP output) / "
                                        "Var(original MLP output)"), key="lm_fr_variance")
        st.caption("Each layer's MLP output on the same held-out tokens, after vs. before. Merging neurons averages "
                   "the gate/up rows and sums the down columns; a ratio below 1 means the layer's contribution to the "
                   "residual stream shrank.")
        st.download_button("Fold summary (JSON)", json.dumps(res.summary(), indent=2, default=str),
                           file_name="lm-fold.json", mime="application/json", key="lm_fr_dl")

    st.divider()
    st.subheader("Sweep: perplexity vs. parameters removed")
    st.caption(f"Every method at uniform ratios {', '.join(f'{100 * r:.0f}%' for r in SWEEP_RATIOS)} of the units "
               "(the same units and counts for each method); random removal with the plan's seed.")
    if st.button("Run sweep", key="lm_fr_sweep"):
        with st.status("Sweeping…", expanded=True) as status:
            try:
                rows = _ui.cached_job("lm_sweep", (wb.spec, text, plan.seed, json.dumps(plan.clustering, sort_keys=True)),
                                      lambda: wb.sweep(text=text, seed=plan.seed, base_plan=plan,
                                                       progress=_ui.progress_reporter(status)))
                ss["lm_sweep"] = rows
                status.update(label=f"Sweep done: {len(rows) - 1} points", state="complete", expanded=False)
            except Exception as exc:  # noqa: BLE001
                status.update(label="Sweep failed", state="error")
                _ui.report_failure(exc, "The sweep")
    rows = ss.get("lm_sweep")
    if rows:
        mine = None
        if out and out["method"] == "fold":
            mine = {"removed_fraction": out["result"].removed_fraction, "perplexity": out["after"]["perplexity"]}
        _ui.chart(F.lm_sweep_plot(rows, user_point=mine), key="lm_fr_sweep_plot")
        st.dataframe(pd.DataFrame([{**r, "removed_fraction": round(r["removed_fraction"], 4),
                                    "perplexity": round(r["perplexity"], 2)} for r in rows]).drop(
            columns=["seconds"], errors="ignore"), hide_index=True, key="lm_fr_sweep_table")


def learn_page() -> None:
    st.title("Learn: how folding works")
    st.info("The step-by-step walkthrough uses a CNN (filters, BatchNorm statistics). For the loaded language model, "
            "the Layer explorer shows the MLP neurons and query heads the fold merges, and Fold & results compares "
            "perplexity and generations. The walkthrough below uses the bundled CNN demo.")
