"""Page 3 — Fold plan: ratios per group, repair method, seed; live preview; import/export."""
from __future__ import annotations

import hashlib

import pandas as pd
import streamlit as st

from foldviz import figures as F
from foldviz.kmeans import ALGORITHMS, DEFAULT_CLUSTERING
from foldviz.methods import METHODS, fold_keys, plan_method
from foldviz.repair import REFIT_DEFAULTS
from foldviz.figures import fmt_count
from foldviz.repair import dir_defaults
from pages import _ui

K = _ui.pkey

wb, plan = _ui.page("Fold plan", "Decide how much of each group to fold and how to repair the statistics afterwards. "
                    "The plan is kept while you visit other pages, and can be exported as JSON, applied from the "
                    "command line (`python -m foldviz fold MODEL --plan plan.json`) and imported again.")
_ui.sync_plan_widgets()
ss = st.session_state
LM = wb.kind.key == "lm"
groups = wb.graph.groups
foldable = wb.foldable_ids()
data = _ui.data_source()
METRIC = wb.kind.metric


def _estimate_text(val: dict) -> tuple[str, str]:
    """(value, change vs. unfolded) of a live estimate, in the kind's metric."""
    if METRIC == "accuracy":
        return _ui.fmt_pct(val["value"]), f"{100 * (val['value'] - val['baseline']):+.1f} pts vs. unfolded"
    return f"{val['value']:.1f}", f"{val['value'] - val['baseline']:+.1f} vs. unfolded"


def _live_estimate(where, tag: str) -> None:
    """Playground-style: the current plan's metric on a small cached evaluation set, next to the controls. The fold
    runs in the background (the latest plan wins: a newer change supersedes an older estimate); while it runs, this
    part of the page polls and then refreshes the page."""
    label = f"{wb.kind.metric_label} (est.)"
    if not data.spec:
        where.metric(label, "—", help="Pick evaluation data on the Model & data page.")
        return
    p = _ui.current_plan(wb)
    slot = (_ui.session_id(), "estimate")
    job = (_ui.plan_json(p.to_dict()), _ui.data_key(data))

    def run(cancel):
        return wb.quick_metric(p, data, progress=cancel.progress)
    if not _ui.live_estimate_auto(wb) and not ss.get(f"fp_estimate_asked_{job}"):
        # a large model: every estimate is a real fold of it, so the user starts it
        where.metric(label, "—", help=f"{wb.spec} is large: estimating folds the whole model.")
        where.button(f"Estimate {METRIC}", key=f"fp_estimate_{tag}",
                     on_click=lambda: ss.__setitem__(f"fp_estimate_asked_{job}", True))
        return
    state, val = wb.jobs.status(slot, job, run)

    def show(state, val):
        if state == "done":
            value, delta = _estimate_text(val)
            where.metric(label, value, delta=delta, delta_color="normal" if METRIC == "accuracy" else "inverse",
                         help=f"This plan folded for real ({val['seconds']:.1f} s) and evaluated on the first "
                              f"{val['samples']} {'test samples' if METRIC == 'accuracy' else 'windows'} of "
                              f"{data.spec}; Run fold on the next page measures the full evaluation set.")
            where.caption(f"on {val['samples']} {'test samples' if METRIC == 'accuracy' else 'windows'}")
        elif state == "running":
            where.metric(label, "…", help="folding this plan and evaluating it")
            where.caption("estimating: folding this plan in the background…")
        else:
            where.metric(label, "—")
            where.caption(f"could not estimate: {str(val).splitlines()[0][:120]}")

    if state != "running":
        show(state, val)
        return

    @st.fragment(run_every=1.0)
    def poll():
        s2, v2 = wb.jobs.status(slot, job, run)
        if s2 != "running":
            st.rerun()  # the whole page, so that the timer goes away
        show(s2, v2)
    with where:
        poll()


def _set(field: str, widget: str, cast=float):
    def cb():
        _ui.update_plan(**{field: cast(ss[widget])})
    return cb


# ---------------------------------------------------------------------------- global settings
with st.container(border=True):
    st.subheader("Global settings")
    c1, c2, c3, c4 = st.columns([2, 2, 1, 1.4])
    c1.slider("Global fold ratio (fraction of units removed in every group)" if LM else
              "Global fold ratio (fraction of channels removed in every group)", 0.0, 0.95,
              **_ui.wv(K("default_ratio"), value=float(plan.default_ratio)), step=0.05, key=K("default_ratio"),
              on_change=_set("default_ratio", K("default_ratio")))
    repairs = list(fold_keys(wb.kind.key))      # the plan's repair values for this kind of model

    def _rlabel(r: str) -> str:
        m = METHODS[plan_method(wb.kind.key, r)]
        return m.label + ("" if m.needs_data else " (data-free)")

    c2.selectbox("Repair method", repairs, **_ui.wv(K("repair"), index=repairs.index(plan.repair)),
                 key=K("repair"), format_func=_rlabel,
                 help="\n".join(f"- **{_rlabel(r)}**: {METHODS[plan_method(wb.kind.key, r)].description}"
                                 for r in repairs),
                 on_change=_set("repair", K("repair"), str))
    c3.number_input("Seed", min_value=0, max_value=2**31 - 1, **_ui.wv(K("seed"), value=int(plan.seed)), step=1,
                    key=K("seed"),
                    on_change=_set("seed", K("seed"), int))
    _live_estimate(c4.container(), "global")
    rs = dict(plan.repair_settings)
    if plan.repair == "refit":
        def _refit_samples():
            _ui.update_plan(repair_settings={**ss["plan"].get("repair_settings", {}), "samples": int(ss[K("samples")])})
        st.number_input("Sequences the original model generates for the refit (no outside data)", min_value=4,
                        max_value=4096, **_ui.wv(K("samples"), value=int(rs.get("samples", REFIT_DEFAULTS["samples"]))),
                        step=16, key=K("samples"), on_change=_refit_samples)
    if plan.repair == "r":
        if not data.spec:
            st.warning("Fold-R needs real data: pick a dataset on the Model & data page, or choose Fold-AR / Fold-DIR.")

        def _samples():
            _ui.update_plan(repair_settings={**ss["plan"].get("repair_settings", {}), "samples": int(ss[K("samples")])})
        st.number_input("Real samples used to reset BatchNorm statistics", min_value=8, max_value=100000,
                        **_ui.wv(K("samples"), value=int(rs.get("samples", data.repair_samples))), step=64,
                        key=K("samples"),
                        on_change=_samples)
    elif plan.repair == "dir":
        dd = dir_defaults(tuple(wb.loaded.input_shape))
        c1, c2, c3 = st.columns(3)

        def _dir(field, widget, cast):
            def cb():
                _ui.update_plan(repair_settings={**ss["plan"].get("repair_settings", {}), field: cast(ss[widget])})
            return cb
        c1.number_input("Deep-Inversion iterations", 1, 100000,
                        **_ui.wv(K("dir_it"), value=int(rs.get("iterations", dd["iterations"]))),
                        step=50, key=K("dir_it"), on_change=_dir("iterations", K("dir_it"), int))
        c2.number_input("Synthetic batch size", 2, 4096,
                        **_ui.wv(K("dir_bs"), value=int(rs.get("batch_size", dd["batch_size"]))), step=32,
                        key=K("dir_bs"), on_change=_dir("batch_size", K("dir_bs"), int))
        if not _ui.teaching():
            c3.number_input("Learning rate", 1e-4, 10.0, **_ui.wv(K("dir_lr"), value=float(rs.get("lr", dd["lr"]))),
                            step=0.05, format="%.4f", key=K("dir_lr"), on_change=_dir("lr", K("dir_lr"), float))
        st.caption("Fold-DIR synthesises inputs whose BatchNorm statistics match the original model, then resets "
                   "the folded model's statistics on them: no real data, but slower.")
    if not _ui.teaching():
        with st.expander("Clustering settings"):
            cl = {**DEFAULT_CLUSTERING, **plan.clustering}

            def _cl(field, widget, cast):
                def cb():
                    _ui.update_plan(clustering={**ss["plan"].get("clustering", {}), field: cast(ss[widget])})
                return cb
            algos = list(ALGORITHMS)
            c1, c2, c3 = st.columns(3)
            c1.selectbox("Algorithm", algos, **_ui.wv(K("algo"), index=algos.index(cl["algorithm"])),
                         key=K("algo"),
                         on_change=_cl("algorithm", K("algo"), str),
                         format_func=lambda a: {"kmeans": "k-means (torch, k-means++)", "sklearn": "k-means (scikit-learn)",
                                                "ward": "Ward agglomerative"}[a])
            c2.number_input("Restarts (n_init)", 1, 100, **_ui.wv(K("ninit"), value=int(cl["n_init"])),
                            key=K("ninit"),
                            on_change=_cl("n_init", K("ninit"), int))
            c3.number_input("Max iterations", 1, 10000, **_ui.wv(K("maxit"), value=int(cl["max_iter"])),
                            key=K("maxit"),
                            on_change=_cl("max_iter", K("maxit"), int))

plan = _ui.current_plan(wb)

# ---------------------------------------------------------------------------- suggestion
with st.container(border=True):
    st.subheader("Suggest ratios from redundancy")
    c1, c2 = st.columns([3, 1])
    target = c1.slider("Target parameter sparsity (% of parameters removed)", 5, 95, 50, step=5, key="fp_target")
    if c2.button("Suggest a plan", key="fp_suggest", type="secondary"):
        try:
            with st.spinner("Allocating ratios by measured redundancy…"):
                sug = wb.suggest(target / 100.0, plan)
            _ui.replace_plan(sug.to_dict())
            kept = f" {len(plan.skip)} skipped group(s) stay skipped." if plan.skip else ""
            replaced = f" It replaced your {len(plan.ratios)} per-group override(s)." if plan.ratios else ""
            _ui.flash("success", f"Suggested plan for {target}% parameter sparsity: more redundant groups fold "
                                 f"more.{kept}{replaced}")
            st.rerun()
        except Exception as exc:  # noqa: BLE001
            _ui.report_failure(exc, "Suggesting a plan")

# ---------------------------------------------------------------------------- per-layer (language models)
def _per_layer() -> None:
    """MLP ratio and query heads kept per KV group, one row per decoder layer (head counts restricted to valid
    values: every KV group keeps the same number)."""
    st.subheader("Per layer")
    rows = []
    for i in sorted({g.layer for g in wb.graph.foldable}):
        row = {"layer": i}
        for g in wb.graph.foldable:
            if g.layer != i:
                continue
            r = 0.0 if g.id in plan.skip else plan.ratio_for(g.id)
            if g.role == "mlp":
                row["MLP ratio"] = r
            elif g.role == "heads":
                per = g.per_partition
                row["heads kept per KV group"] = max(1, min(per, per - int(round(per * r)))) if r else per
        rows.append(row)
    sizes = {r["id"]: r for r in wb.preview(plan)["groups"]}
    for row in rows:
        mid = f"model.layers.{row['layer']}.mlp"
        if mid in sizes:
            row["MLP neurons"] = f"{sizes[mid]['channels_before']} → {sizes[mid]['channels_after']}"
    df = pd.DataFrame(rows)
    heads_g = next((g for g in wb.graph.foldable if g.role == "heads"), None)
    opts = wb.kept_options(heads_g.id) if heads_g else [1]
    edited = st.data_editor(
        df, hide_index=True, width="stretch",
        key="fp_lm_table_" + hashlib.md5(_ui.plan_json(ss["plan"]).encode()).hexdigest()[:10],
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
            ratios[att.id] = wb.ratio_for_kept(att.per_partition, int(new["heads kept per KV group"]))
            changed = True
    if changed:
        _ui.replace_plan({**ss["plan"], "ratios": ratios})
        st.rerun()
    if plan.ratios and st.button("Clear per-layer overrides", key="fp_lm_clear"):
        _ui.replace_plan({**ss["plan"], "ratios": {}, "skip": []})
        st.rerun()
    st.caption(f"Head counts are restricted to valid values: 1 … {max(opts)} query heads per KV group (every KV group "
               "keeps the same number, so the folded model stays a standard GQA model).")


if LM:
    with st.container(border=True):
        c1, c2 = st.columns([3, 1.4])
        with c1:
            _per_layer()
        _live_estimate(c2.container(), "layers")

# ---------------------------------------------------------------------------- per-group overrides (networks)
def _per_group() -> None:
    """Per-group ratio and skip, one group at a time or in the table."""
    with st.container(border=True):
        st.subheader("Per-group ratios")
        c1, c2, c3, c4 = st.columns([2, 2, 1, 1.4])
        gid = c1.selectbox("Group", foldable, key="fp_group")
        has = gid in plan.ratios
        c2.slider(f"Ratio for {gid}", 0.0, 0.95,
                  **_ui.wv(K("ratio", gid), value=round(float(plan.ratios.get(gid, plan.default_ratio)), 2)),
                  step=0.01,
                  key=K("ratio", gid), on_change=lambda g=gid: _ui.update_plan(
                      ratios={**ss["plan"].get("ratios", {}), g: float(ss[K("ratio", g)])}))

        def _skip(g=gid):
            skip = [s for s in ss["plan"].get("skip", []) if s != g]
            if ss[K("skip", g)]:
                skip.append(g)
            _ui.update_plan(skip=skip)
        c3.toggle("Skip", **_ui.wv(K("skip", gid), value=gid in plan.skip), key=K("skip", gid), on_change=_skip,
                  help="A skipped group keeps all of its channels.")
        _live_estimate(c4.container(), "group")
        if has and st.button(f"Reset {gid} to the global ratio", key="fp_reset_one"):
            _ui.replace_plan({**ss["plan"], "ratios": {g: r for g, r in plan.ratios.items() if g != gid}})
            st.rerun()

        rows = wb.preview(plan)["groups"]
        table = pd.DataFrame([{"group": r["id"], "channels": r["channels_before"],
                               "ratio": r["ratio"] if not r["skip"] else plan.ratios.get(r["id"], plan.default_ratio),
                               "skip": r["skip"], "override": r["override"], "channels after": r["channels_after"]}
                              for r in rows if r["foldable"]])
        edited = st.data_editor(
            table, hide_index=True, width="stretch", key="fp_table_" + hashlib.md5(_ui.plan_json(ss["plan"]).encode()).hexdigest()[:10],
            disabled=["group", "channels", "override", "channels after"],
            column_config={"ratio": st.column_config.NumberColumn("ratio", min_value=0.0, max_value=0.95, step=0.05,
                                                                  format="%.2f"),
                           "skip": st.column_config.CheckboxColumn("skip")})
        changed = False
        ratios, skip = dict(plan.ratios), list(plan.skip)
        for (_, old), (_, new) in zip(table.iterrows(), edited.iterrows()):
            g = old["group"]
            if abs(float(new["ratio"]) - float(old["ratio"])) > 1e-9:
                ratios[g] = float(min(0.95, max(0.0, new["ratio"])))
                changed = True
            if bool(new["skip"]) != bool(old["skip"]):
                skip = [s for s in skip if s != g] + ([g] if new["skip"] else [])
                changed = True
        if changed:
            _ui.replace_plan({**ss["plan"], "ratios": ratios, "skip": skip})
            st.rerun()
        if plan.ratios and st.button("Clear all overrides", key="fp_clear"):
            _ui.replace_plan({**ss["plan"], "ratios": {}, "skip": []})
            st.rerun()



if not LM:
    _per_group()

# ---------------------------------------------------------------------------- live preview
plan = _ui.current_plan(wb)
st.subheader("Preview (nothing is folded yet)")
try:
    pv = wb.preview(plan)
except Exception as exc:  # noqa: BLE001
    _ui.report_failure(exc, "Preview")
    pv = None
if pv:
    pb, pa = pv.get("params_before"), pv.get("params_after")
    fb, fa = pv.get("flops_before"), pv.get("flops_after")
    sp = pv.get("param_sparsity", (1 - pa / pb) if pa and pb else None)
    ch_b = sum(r["channels_before"] for r in pv["groups"] if r.get("foldable", True))
    ch_a = sum(r["channels_after"] for r in pv["groups"] if r.get("foldable", True))
    m = st.columns(4)
    m[0].metric("Foldable units" if LM else "Foldable channels", f"{ch_b} → {ch_a}")
    m[1].metric("Parameters", f"{fmt_count(pb)} → {fmt_count(pa)}" if pa else fmt_count(pb))
    m[2].metric("Parameter sparsity", _ui.fmt_pct(sp))
    m[3].metric("FLOPs / token" if LM else "FLOPs / image", f"{fmt_count(fb)} → {fmt_count(fa)}" if fa else fmt_count(fb),
                delta=f"{100 * (fa / fb - 1):.1f}%" if fa and fb else None, delta_color="inverse")
    _ui.chart(F.plan_preview_bars([r for r in pv["groups"] if r.get("foldable", True)]), key="fp_preview")
    if LM:
        problem = wb.output_problem(plan)
        if problem:
            st.warning(f"Saving: {problem}.")
        else:
            st.success("This plan folds into a standard transformers model: `AutoModelForCausalLM.from_pretrained` "
                       "loads what `python -m foldviz fold` writes.")

# ---------------------------------------------------------------------------- import / export
with st.container(border=True):
    st.subheader("Export / import")
    c1, c2 = st.columns(2)
    with c1:
        st.download_button("Download plan (JSON)", plan.to_json(), file_name="fold-plan.json",
                           help="Apply it headlessly with `python -m foldviz fold MODEL --plan fold-plan.json --out DIR`.",
                           mime="application/json", key="fp_download", type="primary")
        with st.expander("Show plan JSON"):
            st.code(plan.to_json(), language="json")
    with c2:
        src = st.radio("Import a plan from", ["a file", "pasted JSON"], horizontal=True, key="fp_import_src",
                       help="Only the source selected here is read, so what you import is what you see.")
        if src == "a file":
            up = st.file_uploader("Plan file (foldviz plan JSON)", type=["json"], key="fp_upload")
            text, what = (up.getvalue() if up is not None else None), (f"file {up.name}" if up is not None else "")
        else:
            text = st.text_area("Plan JSON", key="fp_paste", height=100) or None
            text, what = (text if text and text.strip() else None), "pasted plan"
        if st.button("Import plan", key="fp_import", disabled=text is None):
            try:
                new, warnings = wb.import_plan(text)
            except _ui.LOAD_ERRORS as exc:
                st.error(f"{exc} ({what}) — your current plan is unchanged.")
            else:
                d = new.to_dict()
                d["model"], d["weights_sha256"] = wb.spec, wb.weights_sha256
                ss["fp_pending"] = {"plan": d, "warnings": warnings, "what": what,
                                    "summary": f"{METHODS[wb.default_method(new)].label}, global ratio {100 * new.default_ratio:.0f}%, "
                                               f"{len(new.ratios)} override(s), {len(new.skip)} skipped, seed {new.seed}"}
        pend = ss.get("fp_pending")
        if pend and pend["warnings"]:  # made for another model or other weights: ask before replacing
            st.warning(f"The {pend['what']} may not be meant for this model: {'; '.join(pend['warnings'])}. "
                       f"Replace your current plan with it ({pend['summary']})?")
            b1, b2 = st.columns(2)
            if b1.button("Replace my plan", key="fp_confirm", type="primary"):
                ss["fp_pending"]["warnings"] = []
                st.rerun()
            if b2.button("Cancel", key="fp_cancel"):
                ss.pop("fp_pending")
                _ui.flash("info", "Import cancelled: your plan is unchanged.")
                st.rerun()
        elif pend:
            ss.pop("fp_pending")
            _ui.replace_plan(pend["plan"])
            _ui.flash("success", f"Plan imported from the {pend['what']}: {pend['summary']}.")
            st.rerun()
