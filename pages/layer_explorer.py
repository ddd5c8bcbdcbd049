"""Page 2 — Layer explorer: which channel groups are redundant, and what k-means does to one of them."""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from foldviz import figures as F
from foldviz.methods import label as method_label
from pages import _ui

wb, key, plan = _ui.page("Layer explorer", "Overview first: how similar are the channels of each group? Then one "
                         "group in detail: its similarity matrix, the fold's clusters and the filters each cluster "
                         "merges.")
ids = wb.foldable_ids()
if not ids:
    st.warning("This model has no foldable channel groups (see the reasons on the Model & data page).")
    st.stop()

# ---------------------------------------------------------------------------- overview
st.subheader("Overview")
try:
    with st.spinner("Measuring redundancy per group…"):
        rows = _ui.overview_rows(key, float(plan.default_ratio))
except Exception as exc:  # noqa: BLE001
    _ui.report_failure(exc, "Measuring redundancy")
    st.stop()
_ui.chart(F.group_overview(rows), key="le_overview")
st.caption(f"Bars: mean cosine similarity between the channels' weight vectors; diamonds: the most similar pair; "
           f"green: a suggested fold ratio that scales the plan's {100 * plan.default_ratio:.0f}% by redundancy "
           "(the redundancy score is the mean cosine of each channel to its nearest neighbour).")
df = pd.DataFrame([{"group": r["id"], "type": r["type"], "channels": r["channels"], "foldable": r["foldable"],
                    "mean cos": r["mean_cos"], "max cos": r["max_cos"], "redundancy": r["score"],
                    "suggested ratio": r["suggested_ratio"], "plan ratio": plan.ratio_for(r["id"]) if r["foldable"] else 0.0}
                   for r in rows])
st.dataframe(df, hide_index=True, width="stretch", key="le_table",
             column_config={c: st.column_config.NumberColumn(format="%.2f")
                            for c in ("mean cos", "max cos", "redundancy", "suggested ratio", "plan ratio")})

# ---------------------------------------------------------------------------- one group
st.subheader("One group in detail")


@st.fragment
def _detail() -> None:
    """One group in detail. A fragment: moving the ratio or switching the group reruns only this part."""
    c1, c2, c3 = st.columns([2, 2, 1])
    default_gid = st.session_state.get("le_group_value", ids[0])
    gid = c1.selectbox("Channel group", ids, index=ids.index(default_gid) if default_gid in ids else 0, key="le_group")
    st.session_state["le_group_value"] = gid
    g = wb.group(gid)
    plan_ratio = plan.ratio_for(gid)
    ratio = c2.slider("Fold ratio (fraction of channels removed)", 0.0, 0.95, value=float(round(plan_ratio, 2)),
                      step=0.05, key=f"le_ratio_{gid}",
                      help="k = round(channels × (1 − ratio)) clusters; each cluster becomes one channel.")
    method = c3.radio("Embedding", ["PCA", "UMAP"], horizontal=False, key="le_embed",
                      help="PCA is instant; UMAP shows neighbourhoods better (first use compiles, ~20 s).")

    try:
        with st.spinner("Clustering…" if method == "PCA" else "Clustering and running UMAP…"):
            d = _ui.group_detail(key, gid, float(ratio), _ui.plan_json(plan.to_dict()), method.lower())
    except Exception as exc:  # noqa: BLE001
        _ui.report_failure(exc, f"Analysing {gid}")
        return

    m = st.columns(5)
    m[0].metric("Channels → clusters", f"{g.channels} → {d['k']}")
    m[1].metric("Mean cosine", f"{d['mean_cos']:.3f}")
    m[2].metric("Max cosine", f"{d['max_cos']:.3f}")
    m[3].metric("Redundancy score", f"{d['score']:.2f}")
    m[4].metric("k-means inertia", f"{d['inertia']:.3g}", help="sum of squared distances to the cluster centres")
    st.caption(f"Producers: {', '.join(d['producers'])} · consumers: {', '.join(d['consumers']) or '—'} · "
               f"feature vector per channel: {d['features_dim']} numbers (fan-in rows, biases, BatchNorm γ/β, fan-out columns"
               + (", BatchNorm-fused and robust-scaled" if d["features_fused"] else "")
               + f"). These are the clusters {method_label(plan.repair)} merges when you run the fold.")
    if abs(ratio - plan_ratio) > 1e-9:
        if st.button(f"Use {100 * ratio:.0f}% for {gid} in the plan", key="le_apply"):
            p = dict(st.session_state["plan"])
            p["ratios"] = {**p.get("ratios", {}), gid: float(ratio)}
            p["skip"] = [s for s in p.get("skip", []) if s != gid]
            _ui.replace_plan(p)
            _ui.flash("success", f"Plan updated: {gid} folds {100 * ratio:.0f}% of its channels.")
            st.rerun()

    left, right = st.columns(2)
    with left:
        _ui.chart(F.similarity_heatmap(d["similarity"], d["labels"], order=d["order"], group=gid), key="le_heatmap")
    with right:
        _ui.chart(F.embedding_scatter(d["coords"], d["labels"], method=d["embedding"], group=gid), key="le_embedding")
        if d["embedding_note"]:
            st.caption(d["embedding_note"])

    if d["weight"] is not None:
        _ui.chart(F.filter_grid(d["weight"], d["labels"], group=gid, module=d["weight_module"]), key="le_filters")
        st.caption("Each row is one cluster (largest first); the leftmost tile is the cluster mean — "
                   "the single filter that replaces the whole row after folding.")

    left, right = st.columns(2)
    with left:
        _ui.chart(F.cluster_size_histogram(d["labels"], group=gid), key="le_sizes")
    with right:
        try:
            pts = _ui.inertia_curve(key, gid, _ui.plan_json(plan.to_dict()))
            _ui.chart(F.inertia_curve(pts, current_ratio=ratio, title=f"k-means inertia vs. fold ratio — {gid}"),
                      key="le_inertia")
        except Exception as exc:  # noqa: BLE001
            _ui.report_failure(exc, "Inertia curve")

    with st.expander("Nearest neighbours of one channel"):
        ch = st.number_input("Channel", min_value=0, max_value=g.channels - 1, value=0, step=1, key="le_channel")
        nb = wb.neighbours(gid, int(ch), plan, k=min(8, g.channels - 1))
        labels = np.asarray(d["labels"])
        st.dataframe(pd.DataFrame([{"channel": n["channel"], "cosine": round(n["cosine"], 4),
                                    "same cluster": bool(labels[n["channel"]] == labels[int(ch)])} for n in nb]),
                     hide_index=True)
        st.caption(f"Channel {int(ch)} is in cluster {int(labels[int(ch)])} with "
                   f"{int((labels == labels[int(ch)]).sum()) - 1} other channel(s).")


_detail()
