"""Page 4 — Fold & results: run the plan, measure before/after, see why repair matters, sweep."""
from __future__ import annotations

import io
import zipfile

import numpy as np
import pandas as pd
import streamlit as st

from foldviz import figures as F
from foldviz.methods import METHODS
from foldviz.methods import label as method_label
from foldviz.proxy import describe_proxy
from foldviz.figures import fmt_count
from foldviz.report import report_csv, report_json
from foldviz.sweep import to_csv as sweep_csv
from pages import _ui

wb, plan = _ui.page("Fold & results", "Run the plan on a copy of the model, compare before and after, and see what "
                    "folding does to the activation statistics.")
data = _ui.data_source()
ss = st.session_state
pj = _ui.plan_json(plan.to_dict())
dkey = _ui.data_key(data)
LM = wb.kind.key == "lm"
METRIC = wb.kind.metric
main_method = wb.default_method(plan)

st.info(f"**Plan:** {method_label(main_method)} · global ratio {100 * plan.default_ratio:.0f}% · "
        f"{len(plan.ratios)} override(s) · {len(plan.skip)} skipped · seed {plan.seed} · data: {wb.data_label(data)}")

if LM:   # Wanda-sp and FLAP need calibration text, never the evaluation text (checked when they run)
    def _set_calib():
        text = (ss["fr_calib"] or "").strip() or None
        ss["data_source"] = {**ss["data_source"], "calib": text}

    ss = st.session_state
    suggested = "shakespeare:train" if data.spec == "shakespeare:test" else ""
    st.text_input("Calibration text for Wanda-sp and FLAP (a text spec that does not overlap the evaluation text)",
                  value=data.calib or suggested, key="fr_calib", on_change=_set_calib,
                  placeholder="shakespeare:train, text:FILE, wikitext2-train:DIR")
    if (ss.get("fr_calib") or "").strip() != (data.calib or ""):
        _set_calib()
        data = _ui.data_source()

# methods whose variance is compared with the plan's clusters: the repairs for networks, the baselines for LMs
available = [m for m in (wb.fold_methods if not LM else wb.methods)
             if not METHODS[m].needs_data or (data.calib if LM else data.spec)]
default_methods = [m for m in (("none", "r", "ar") if not LM else ("fold", "magnitude")) if m in available]
if main_method not in default_methods and main_method in available:
    default_methods.append(main_method)
c1, c2 = st.columns([3, 1])
methods = c1.multiselect("Methods to overlay in the variance plot" if LM else
                         "Repair methods to overlay in the variance plot", available, default=default_methods,
                         format_func=method_label, key="fr_methods",
                         help="The plan is run once per method (same ratios, same seed).")
run = c2.button("Run fold", type="primary", key="fr_run", width="stretch")

def _activations_section(outcome) -> None:
    """CNN-Explainer-style: one input's feature maps of a folded layer, before and after, cluster by cluster."""
    res = outcome.result
    folded = [g for g in outcome.report["groups"] if g.get("foldable", True) and g["id"] in res.labels]
    if not folded:
        return
    st.subheader("See activations: one input, before and after folding")
    most = max(folded, key=lambda g: (g["channels_before"] - g["channels_after"], -folded.index(g)))["id"]
    ids_ = [g["id"] for g in folded]
    c1, c2, c3 = st.columns([2, 2, 1])
    gid = c1.selectbox("Layer (channel group)", ids_, index=ids_.index(most), key="fr_act_group",
                       help="Default: the group that lost the most channels.")
    batch = wb.sample_batch(data, 32)
    idx = c2.slider("Input image", 0, int(batch.shape[0]) - 1, 0, key="fr_act_image",
                    help=("test images of " + data.spec) if data.spec else "standard-normal inputs (no data selected)")
    try:
        fm = wb.activations(res, gid, batch[idx:idx + 1])
    except Exception as exc:  # noqa: BLE001
        _ui.report_failure(exc, "Feature maps")
        return
    n_cl = len(fm["clusters"])
    start = 0
    if n_cl > 6:
        start = c3.number_input(f"First cluster (1 … {n_cl})", 1, n_cl, 1, step=6, key=f"fr_act_start_{gid}") - 1
    left, right = st.columns([1, 4])
    with left:
        img = batch[idx].detach().cpu().numpy()
        img = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        _ui.chart(F.input_image(img, title=f"input #{idx}"), key="fr_act_input")
    with right:
        _ui.chart(F.feature_map_grid(fm, start=int(start)), key="fr_act_maps")
    corr = [c["corr"] for c in fm["clusters"] if c["corr"] is not None and len(c["members"]) > 1]
    if corr:
        st.caption(f"Merged clusters of {gid}: the folded map correlates with its members' mean map at "
                   f"r = {np.mean(corr):.2f} on average (min {np.min(corr):.2f}). Rows show the output of "
                   f"{fm['module']}; singletons pass through unchanged except for what upstream folds changed.")


def _generations(outcome) -> None:
    """A language model's greedy continuation of a prompt, before and after the fold."""
    st.markdown("**Greedy generations**")
    prompt = st.text_input("Prompt", "ROMEO.\\n", key="fr_prompt",
                           help="\\n is a newline. 40 new tokens, greedy.").replace("\\n", "\n")
    left, right = st.columns(2)
    try:
        left.text_area("Before", wb.generate(None, prompt), height=160, disabled=True, key="fr_gen_before")
        right.text_area(f"After ({outcome.report['label']})", wb.generate(outcome.model, prompt), height=160,
                        disabled=True, key="fr_gen_after")
    except Exception as exc:  # noqa: BLE001
        _ui.report_failure(exc, "Generation")


def _deploy_section(outcome) -> None:
    """Export the folded model where users deploy it (ONNX Runtime, TorchScript, torch.export), checked against
    PyTorch on a fixed batch before it is offered (foldviz.export)."""
    from foldviz.export import FORMATS, ExportError, export_bytes

    c1, c2, c3 = st.columns([1, 1, 2])
    to = c1.selectbox("Export format", FORMATS, key="fr_export_to",
                      format_func={"onnx": "ONNX (ONNX Runtime)", "torchscript": "TorchScript",
                                   "pt2": "torch.export (.pt2)"}.get)
    tag = (ss.get("outcome_plan"), to)
    if c2.button("Export", key="fr_export"):
        try:
            with st.spinner(f"Exporting to {to} and checking it against PyTorch…"):
                data_, info = export_bytes(outcome.result, to, input_shape=tuple(wb.loaded.input_shape))
            ss["export"] = {"tag": tag, "bytes": data_, "info": info}
        except (ExportError, ValueError) as exc:
            st.error(f"Export failed: {exc}")
    exp = ss.get("export")
    if exp and exp["tag"] == tag:
        info = exp["info"]
        ext = {"onnx": "onnx", "torchscript": "pt", "pt2": "pt2"}[to]
        c3.download_button(f"Folded model (.{ext}, {len(exp['bytes']) / 1e6:.1f} MB)", exp["bytes"],
                           file_name=f"folded-model.{ext}", key="fr_export_dl")
        diff = info.get("max_abs_diff")
        c3.caption(f"Checked: largest difference from PyTorch {diff:.1e}" if isinstance(diff, float) else "Checked.")


def _export(outcome) -> bytes:
    try:
        return wb.export_folded(outcome)
    except ValueError:  # a fold transformers cannot hold: the per-layer format instead
        from foldviz.persist import folded_zip

        return folded_zip(outcome.result, wb.loaded, outcome.report, fmt="foldviz-lm") if LM else b""


if run:
    with st.status("Folding…", expanded=True) as status:
        try:
            status.write(f"Folding with {method_label(main_method)}")
            outcome = wb.fold(plan, data, progress=_ui.progress_reporter(status))
            ss["outcome"] = outcome
            ss["outcome_plan"] = pj
            if methods:
                status.write("Comparing methods: " + ", ".join(method_label(m) for m in methods))
                comp = wb.variance_comparison(plan, list(methods), data, progress=_ui.progress_reporter(status),
                                              known={main_method: outcome.result})
                ss["compare"] = {"plan": pj, "methods": list(methods), "data": comp}
            status.update(label=f"Folded in {outcome.report['seconds']['total']:.1f} s", state="complete",
                          expanded=False)
        except Exception as exc:  # noqa: BLE001
            status.update(label="Folding failed", state="error", expanded=False)
            _ui.report_failure(exc, "Folding")

outcome = ss.get("outcome")
if outcome is None:
    st.markdown("Nothing folded yet: press **Run fold**.")
else:
    r = outcome.report
    if ss.get("outcome_plan") != pj:
        st.warning("These results come from an earlier version of the plan; press **Run fold** to update them.")
    b, a = ({k: r[f"{k}_{side}"] for k in (METRIC, "params", "flops", "size_bytes")} for side in ("before", "after"))
    st.subheader(f"Result — {r['label']}")
    m = st.columns(5)
    if a.get(METRIC) is not None and METRIC == "accuracy":
        m[0].metric("Accuracy", _ui.fmt_pct(a["accuracy"]), delta=f"{100 * (a['accuracy'] - b['accuracy']):+.1f} pts",
                    help=f"before: {_ui.fmt_pct(b['accuracy'])} (top-1 on {wb.data_label(data)})")
    elif a.get(METRIC) is not None:
        m[0].metric("Perplexity", f"{a['perplexity']:.2f}", delta=f"{a['perplexity'] - b['perplexity']:+.2f}",
                    delta_color="inverse", help=f"before: {b['perplexity']:.2f} ({wb.data_label(data)})")
    else:
        m[0].metric(wb.kind.metric_label, "—", help="pick evaluation data on the Model & data page")
    m[1].metric("Parameters", fmt_count(a["params"]), delta=f"{-100 * r['param_sparsity']:.1f}%", delta_color="inverse",
                help=f"before: {fmt_count(b['params'])}")
    if a.get("flops") and b.get("flops"):
        m[2].metric("FLOPs / token" if LM else "FLOPs / image", fmt_count(a["flops"]), delta=f"{100 * (a['flops'] / b['flops'] - 1):.1f}%",
                    delta_color="inverse", help=f"before: {fmt_count(b['flops'])}")
    m[3].metric("Size", f"{a['size_bytes'] / 1e6:.2f} MB", delta=f"{100 * (a['size_bytes'] / b['size_bytes'] - 1):.1f}%",
                delta_color="inverse", help=f"before: {b['size_bytes'] / 1e6:.2f} MB")
    lat = r["latency"]
    if lat:
        spread = max(lat["a"]["iqr_ms"] / lat["a"]["median_ms"], lat["b"]["iqr_ms"] / lat["b"]["median_ms"])
        m[4].metric(f"Latency (batch {lat['batch']})", f"{lat['b']['median_ms']:.2f} ms",
                    delta=f"{100 * (lat['ratio'] - 1):+.0f}%" if abs(lat["ratio"] - 1) > spread else "within noise",
                    delta_color="inverse" if abs(lat["ratio"] - 1) > spread else "off",
                    help=f"before {lat['a']['median_ms']:.2f} ± {lat['a']['iqr_ms']:.2f} ms, after "
                         f"{lat['b']['median_ms']:.2f} ± {lat['b']['iqr_ms']:.2f} ms (median ± IQR of alternating "
                         "runs on this machine); a change smaller than the spread is noise.")
    st.caption(f"{wb.kind.metric_label}{_ui.metric_change(r) or ': no evaluation data'} · parameter sparsity "
               f"{_ui.fmt_pct(r['param_sparsity'])} · " + " · ".join(f"{k} {v:.2f} s" for k, v in r["seconds"].items()))
    if r.get("proxy"):
        st.caption(describe_proxy(r["proxy"]).capitalize() + " (synthesised from the original model alone; "
                   "every fold of this model reuses it).")
    for note in r.get("notes") or []:
        st.caption(f"Note: {note}")
    _ui.chart(F.before_after_bars(b, a, labels={"flops": "FLOPs / token"} if LM else None,
                                  metrics=[k for k in (METRIC, "params", "flops", "size_bytes")
                                                 if b.get(k) is not None and a.get(k) is not None]),
              key="fr_before_after")
    _ui.chart(F.channels_per_group([g for g in r["groups"] if g.get("foldable", True)]), key="fr_channels")
    if LM:
        _generations(outcome)

    comp = ss.get("compare")
    if comp and comp["plan"] == ss.get("outcome_plan"):
        series = {m_: v["rows"] for m_, v in comp["data"].items() if v["rows"]}
        log_y = st.toggle("Log scale", value=True, key="fr_logy")
        if LM:
            st.subheader("MLP output variance per layer")
            _ui.chart(F.variance_ratio_plot(series, log_y=log_y, title="MLP output variance, folded / original",
                                            x_label="decoder layer"), key="fr_variance")
            st.caption("Each layer's MLP output on the same held-out tokens, after vs. before. Merging neurons "
                       "averages the gate/up rows and sums the down columns; below 1 the layer's contribution to the "
                       "residual stream shrank.")
        else:
            st.subheader("Why repair matters: activation variance per layer")
            _ui.chart(F.variance_ratio_plot(series, log_y=log_y), key="fr_variance")
            st.caption("Var(folded) / Var(original) of each layer's output channels on the same inputs. Merging "
                       "channels averages them, which shrinks the variance (below 1 = collapse); the error compounds "
                       "layer after layer. Fold-R and Fold-DIR re-estimate BatchNorm statistics; Fold-AR rescales each "
                       "merged channel from the weights alone.")
        rows = [{"method": method_label(m_),
                 METRIC: (_ui.fmt_pct(v["metric"]) if METRIC == "accuracy" else
                          (f"{v['metric']:.2f}" if v["metric"] is not None else "—")),
                 "mean variance ratio": (f"{sum(x['ratio'] for x in v['rows']) / len(v['rows']):.3f}" if v["rows"] else "—"),
                 "note": v["error"] or ""} for m_, v in comp["data"].items()]
        st.dataframe(pd.DataFrame(rows), hide_index=True, key="fr_compare_table")

    if not LM:
        _activations_section(outcome)

    st.subheader("Downloads")
    c1, c2, c3 = st.columns(3)
    c1.download_button("Folded model (.zip)", lambda: _export(outcome), file_name="folded-model.zip",
                       mime="application/zip", key="fr_dl_model",
                       help="A transformers directory (config.json, model.safetensors, tokenizer.json) with the plan "
                            "and the report" if LM else "model.safetensors, its card (the architecture, rebuilt "
                            "without pickle) and the plan")

    # read session state now: Streamlit calls the download callable outside this script run
    zip_compare = comp if comp and comp["plan"] == ss.get("outcome_plan") else None
    zip_sweep = ss.get("sweep")

    def _report_zip() -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("report.json", report_json(r))
            z.writestr("groups.csv", report_csv(r))
            z.writestr("plan.json", outcome.result.plan.to_json())
            figs = {"before_after": F.before_after_bars(b, a, labels={"flops": "FLOPs / token"} if LM else None),
                    "channels_per_group": F.channels_per_group([g for g in r["groups"] if g.get("foldable", True)])}
            if zip_compare:
                figs["variance_ratio"] = F.variance_ratio_plot({m_: v["rows"] for m_, v in zip_compare["data"].items()
                                                                if v["rows"]})
            sw = zip_sweep
            if sw and sw.get("rows"):
                z.writestr("sweep.csv", sweep_csv(sw["rows"]))
                figs["sweep"] = F.sweep_plot(sw["rows"], methods=sw["methods"], metric=METRIC)
            for name, fig in figs.items():   # offline: the plots load plotly.min.js from beside them, no CDN
                z.writestr(f"plots/{name}.html", fig.to_html(include_plotlyjs="directory", full_html=True))
                z.writestr(f"plots/{name}.json", fig.to_json())
            from plotly.offline import get_plotlyjs

            z.writestr("plots/plotly.min.js", get_plotlyjs())
        return buf.getvalue()
    c2.download_button("Report (.zip: JSON, CSV, plots)", _report_zip, file_name="fold-report.zip",
                       mime="application/zip", key="fr_dl_report")
    c3.download_button("Report (JSON)", report_json(r), file_name="fold-report.json", mime="application/json",
                       key="fr_dl_json")
    if not LM:
        _deploy_section(outcome)

# ---------------------------------------------------------------------------- per-layer sensitivity (LMs)
def _sensitivity_section() -> None:
    """Perplexity with one decoder layer folded at a time by the plan (Workbench.sensitivity), as bars."""
    with st.expander("Per-layer sensitivity", expanded=bool(ss.get("sensitivity"))):
        st.caption("Folds one decoder layer at a time with this plan's method and ratios (every other layer "
                   "untouched) and measures perplexity: the tallest bars are the layers to spare.")
        if not data.spec:
            st.warning("Sensitivity measures perplexity: pick evaluation text on the Model & data page.")
            return
        key = (pj, dkey)
        if st.button("Compute per-layer sensitivity", key="fr_sens_run"):
            with st.status("Folding one layer at a time…", expanded=True) as status:
                try:
                    res = wb.sensitivity(plan, data, progress=_ui.progress_reporter(status))
                    ss["sensitivity"] = {"key": key, "result": res}
                    status.update(label=f"Sensitivity of {len(res['rows'])} layers", state="complete",
                                  expanded=False)
                except Exception as exc:  # noqa: BLE001
                    status.update(label="Sensitivity failed", state="error", expanded=False)
                    _ui.report_failure(exc, "Sensitivity")
        sens = ss.get("sensitivity")
        if sens:
            if sens["key"] != key:
                st.caption("Computed for an earlier plan or data; press the button to update it.")
            res = sens["result"]
            _ui.chart(F.sensitivity_plot(res["rows"], res["base"]), key="fr_sensitivity")
            st.caption(f"{method_label(res['method'])} on {res['data']} ({res['windows']} windows of "
                       f"{res['seq_len']} tokens); unfolded perplexity {res['base']:.2f}.")


if LM:
    _sensitivity_section()

# ---------------------------------------------------------------------------- sweep
st.divider()
st.subheader(f"Sweep: {METRIC} vs. parameter sparsity")
st.caption("The paper's main figure: fold (or prune) the whole model at several uniform ratios and measure it. "
           + ("Magnitude and random pruning remove the same units instead of merging clusters." if LM else
              "L1/L2 magnitude pruning removes the channels with the smallest weights instead of merging clusters."))
if not data.spec:
    st.warning(f"A sweep measures {METRIC}: pick evaluation data on the Model & data page.")
else:
    sweep_methods = [m for m in wb.methods if not (LM and METHODS[m].needs_data and not data.calib)]
    c1, c2, c3 = st.columns([3, 3, 1])
    sm = c1.multiselect("Methods", sweep_methods, default=["refit", "fold", "magnitude"] if LM else ["none", "ar", "l1"],
                        key="fr_sweep_methods", format_func=F.method_label)
    ratio_opts = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    sr = c2.multiselect("Per-group ratios", ratio_opts, default=[0.1, 0.2, 0.3, 0.5] if LM else [0.1, 0.3, 0.5, 0.7],
                        key="fr_sweep_ratios", format_func=lambda x: f"{100 * x:.0f}%")
    seeds = c3.number_input("Seeds", 1, 5, 1, key="fr_sweep_seeds")
    skey = (wb.spec, wb.weights_sha256, dkey, tuple(sorted(sr)), tuple(sm), tuple(range(int(seeds))))
    st.caption(f"Cells run in {wb.sweep_target()} (set FOLDVIZ_RAY_ADDRESS before starting the app to use a "
               "Ray cluster); the progress bar counts finished cells.")
    if st.button("Run sweep", key="fr_sweep_run", disabled=not (sm and sr)):
        with st.status(f"Sweeping {len(sm)} method(s) × {len(sr)} ratio(s) × {int(seeds)} seed(s)…",
                       expanded=True) as status:
            try:
                rows = wb.sweep(sorted(sr), list(sm), data, seeds=range(int(seeds)), plan=plan,
                                progress=_ui.progress_reporter(status))
                ss["sweep"] = {"key": skey, "rows": rows, "methods": list(sm)}
                status.update(label=f"Sweep done: {len(rows) - 1} points", state="complete", expanded=False)
                _ui.flash("success", f"Sweep done: {len(rows) - 1} points (also in the report download above).")
                st.rerun()  # the Downloads section above was drawn before the sweep: redraw it with the sweep
            except Exception as exc:  # noqa: BLE001
                status.update(label="Sweep failed", state="error", expanded=False)
                _ui.report_failure(exc, "The sweep")
    sw = ss.get("sweep")
    if sw and sw.get("rows"):
        if sw["key"] != skey:
            st.caption("Showing the last sweep; press **Run sweep** for the current selection.")
        mine = None
        if outcome is not None and outcome.report.get(f"{METRIC}_after") is not None:
            rep = outcome.report
            mine = {"param_sparsity": rep["param_sparsity"], METRIC: rep[f"{METRIC}_after"],
                    "label": "your plan" + (" (earlier version)" if ss.get("outcome_plan") != pj else "")}
        _ui.chart(F.sweep_plot(sw["rows"], methods=sw["methods"], metric=METRIC, user_point=mine), key="fr_sweep")
        st.caption("The star is your plan as last folded (its own per-group ratios), against uniform ratios."
                   if mine else "Run the fold above to mark your plan on this plot.")
        st.download_button("Sweep (CSV)", sweep_csv(sw["rows"]), file_name="sweep.csv", mime="text/csv",
                           key="fr_dl_sweep")
