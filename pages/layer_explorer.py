"""Page 2 — Layer explorer: which groups are redundant, and what k-means does to one of them (channels of a network,
MLP neurons and query heads of a language model)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from foldviz import figures as F
from foldviz.methods import label as method_label
from pages import _ui

wb, plan = _ui.page("Layer explorer", "Overview first: how similar are the units of each group? Then one group in "
                    "detail: its similarity matrix, the fold's clusters and what each cluster merges.")
LM = wb.kind.key == "lm"
ids = wb.foldable_ids()
if not ids:
    st.warning("This model has no foldable channel groups (see the reasons on the Model & data page).")
    st.stop()

# ---------------------------------------------------------------------------- overview
st.subheader("Overview")
try:
    with st.spinner("Measuring redundancy per group…"), wb.foreground():
        rows = wb.overview_rows(float(plan.default_ratio))
except Exception as exc:  # noqa: BLE001
    _ui.report_failure(exc, "Measuring redundancy")
    st.stop()


def _pick_group() -> None:
    """A click on a bar of the overview selects that group in the detail view below."""
    pts = st.session_state["le_overview"]["selection"]["points"]
    gid = next((p.get("x") for p in pts if p.get("x") in ids), None)
    if gid is not None:
        st.session_state["le_group"] = gid
        st.session_state["le_group_value"] = gid


st.plotly_chart(F.group_overview(rows), key="le_overview", on_select=_pick_group, selection_mode="points",
                config={"displaylogo": False})
st.caption(f"Click a bar to open that group below. Bars: mean cosine similarity between the units' weight vectors; "
           f"diamonds: the most similar pair; green: a suggested fold ratio that scales the plan's "
           f"{100 * plan.default_ratio:.0f}% by redundancy (the redundancy score is the mean cosine of each channel to "
           "its nearest neighbour).")
df = pd.DataFrame([{"group": r["id"], "type": r["type"], "units": f"{r['channels']} {r['unit']}s", "foldable": r["foldable"],
                    "mean cos": r["mean_cos"], "max cos": r["max_cos"], "redundancy": r["score"],
                    "suggested ratio": r["suggested_ratio"], "plan ratio": plan.ratio_for(r["id"]) if r["foldable"] else 0.0}
                   for r in rows])
st.dataframe(df, hide_index=True, width="stretch", key="le_table",
             column_config={c: st.column_config.NumberColumn(format="%.2f")
                            for c in ("mean cos", "max cos", "redundancy", "suggested ratio", "plan ratio")})

# ---------------------------------------------------------------------------- one group
st.subheader("One group in detail")


def _select_channel(gid: str, ch: int | None) -> None:
    """Select one unit in every view; the filter grid pages to its cluster."""
    ss = st.session_state
    ss[f"le_sel_{gid}"] = None if ch is None else int(ch)
    labels = ss.get(f"le_labels_{gid}")
    if ch is not None and labels is not None and 0 <= int(ch) < len(labels):
        ss[f"le_grid_start_{gid}"] = F.grid_page_start(labels, int(ch)) + 1


def _from_scatter(gid: str, sel: str) -> None:
    """One point clicked: highlight that unit; several (box or lasso): show their cluster statistics."""
    pts = st.session_state[f"le_embedding_{gid}_{sel}"]["selection"]["points"]
    chans = F.selected_channels(pts)
    if len(chans) == 1:
        _select_channel(gid, chans[0])
    st.session_state[f"le_lasso_{gid}"] = chans if len(chans) > 1 else None


def _from_table(gid: str, rows: list[int]) -> None:
    sel = st.session_state[f"le_nbtable_{gid}"]["selection"]["rows"]
    if sel:
        _select_channel(gid, rows[sel[0]])


@st.fragment(run_every=1.0)
def _stops_progress(gid: str) -> None:
    """The background computation of the slider stops, as it goes (polls the memo once a second: no work here);
    when it is done, one rerun shows the finished state and the polling stops."""
    status = wb.path_status(gid, plan)
    if len(status["ready"]) >= status["total"]:
        st.rerun()
    st.caption(f"Slider stops ready: {len(status['ready'])}/{status['total']} (computing the rest in the background).")


@st.fragment
def _detail() -> None:
    """One group in detail. A fragment: moving the ratio, switching the group or selecting channels reruns only
    this part. Selecting a channel (search box, a click in the embedding or the neighbour table) highlights it in
    every view; a lasso in the embedding shows the selected channels' cluster statistics."""
    ss = st.session_state
    c1, c2, c3 = st.columns([2, 2, 1])
    default_gid = ss.get("le_group_value", ids[0])
    if ss.get("le_group") not in ids:
        ss["le_group"] = default_gid if default_gid in ids else ids[0]
    gid = c1.selectbox("Group", ids, key="le_group",
                       format_func=lambda i: f"{i} ({wb.group(i).channels} {wb.group(i).unit}s)")
    ss["le_group_value"] = gid
    g = wb.group(gid)
    unit = g.unit
    plan_ratio = plan.ratio_for(gid)
    if g.partitions > 1 or g.role == "heads":
        per = g.per_partition
        cur = max(1, min(per, per - int(round(per * plan_ratio)))) if plan_ratio else per
        kept = c2.select_slider("Query heads kept per KV group" if g.partitions > 1 else "Heads kept",
                                wb.kept_options(gid), value=int(cur), key=f"le_kept_{gid}",
                                help="Heads fold only within their KV group, and every KV group keeps the same "
                                     "number, so the folded model stays a plain grouped-query-attention model.")
        ratio = wb.ratio_for_kept(per, int(kept))
    else:
        ratio = c2.slider(f"Fold ratio (fraction of {unit}s removed)", 0.0, 0.95, value=float(round(plan_ratio, 2)),
                          step=0.05, key=f"le_ratio_{gid}",
                          help=f"k = round({unit}s × (1 − ratio)) clusters; each cluster becomes one {unit}. The "
                               "clusters for every stop are computed in the background, so moving the slider is "
                               "instant.")
    method = c3.radio("Embedding", ["PCA", "UMAP"], horizontal=False, key="le_embed",
                      help="PCA is instant; UMAP shows neighbourhoods better (its kernels compile in the background "
                           "when this page opens).")

    try:
        with st.spinner(f"Clustering {g.channels} {unit}s…" if method == "PCA"
                        else f"Clustering {g.channels} {unit}s and running UMAP…"):
            d = _ui.group_detail_live(wb, gid, float(ratio), plan, method.lower())
    except Exception as exc:  # noqa: BLE001
        _ui.report_failure(exc, f"Analysing {gid}")
        return
    status = _ui.precompute_stops(wb, gid, plan)

    m = st.columns([2, 1.2, 1.2, 1.2, 1.4])   # "2048 → 1434" needs the room at 1280 px
    m[0].metric(f"{unit.capitalize()}s → clusters", f"{g.channels} → {d['k']}")
    m[1].metric("Mean cosine", f"{round(d['mean_cos'], 3) + 0.0:.3f}")   # + 0.0: no "-0.000"
    m[2].metric("Max cosine", f"{round(d['max_cos'], 3) + 0.0:.3f}")
    m[3].metric("Redundancy score", f"{d['score']:.2f}")
    m[4].metric("Cluster inertia", f"{d['inertia']:.3g}",
                help="sum of squared distances to the cluster centres (what k-means minimises; Ward merges the "
                     "pair of clusters that increases it least)")
    what = {"mlp": "its gate row, up row and down column", "heads": "its q_proj rows and o_proj columns"
            + ("; MHA: also k and v" if g.info.get("mha") else "")}.get(
        g.role, "fan-in rows, biases, BatchNorm γ/β, fan-out columns"
        + (", BatchNorm-fused and robust-scaled" if d["features_fused"] else ""))
    st.caption(f"Producers: {', '.join(d['producers'])} · consumers: {', '.join(d['consumers']) or '—'} · "
               f"feature vector per {unit}: {d['features_dim']} numbers ({what}). These are the clusters "
               f"{method_label(wb.default_method(plan))} merges when you run the fold.")
    if len(status["ready"]) < status["total"]:
        _stops_progress(gid)
    else:
        st.caption("Every slider stop is precomputed.")
    if abs(ratio - plan_ratio) > 1e-9:
        if st.button(f"Use {100 * ratio:.0f}% for {gid} in the plan", key="le_apply"):
            p = dict(ss["plan"])
            p["ratios"] = {**p.get("ratios", {}), gid: float(ratio)}
            p["skip"] = [s for s in p.get("skip", []) if s != gid]
            _ui.replace_plan(p)
            _ui.flash("success", f"Plan updated: {gid} folds {100 * ratio:.0f}% of its {unit}s.")
            st.rerun()

    # ---- the selected channel, linked across every view
    labels = np.asarray(d["labels"])
    ss[f"le_labels_{gid}"] = labels
    f1, f2 = st.columns([1, 3])
    f1.number_input(f"Find {unit}", min_value=0, max_value=g.channels - 1, value=None, step=1,
                    key=f"le_find_{gid}", placeholder=f"0 … {g.channels - 1}",
                    on_change=lambda: _select_channel(gid, ss[f"le_find_{gid}"]),
                    help=f"Highlights the {unit} in the heatmap, the embedding, the filter grid and the neighbour "
                         "table. Clicking a point in the embedding does the same; a lasso selects several.")
    ch = ss.get(f"le_sel_{gid}")
    ch = int(ch) if ch is not None and 0 <= int(ch) < g.channels else None
    if ch is not None:
        members = np.where(labels == labels[ch])[0]
        f2.info(f"**{unit.capitalize()} {ch}** is in cluster {int(labels[ch])} with {len(members) - 1} other "
                f"{unit}(s)" + (f": {', '.join(str(int(x)) for x in members if x != ch)[:200]}" if len(members) > 1 else "")
                + f". After the fold it {'merges into one ' + unit + ' with them' if len(members) > 1 else 'stays as it is'}.")
        f2.button("Clear selection", key=f"le_clear_{gid}", on_click=lambda: (
            _select_channel(gid, None), ss.__setitem__(f"le_lasso_{gid}", None)))

    left, right = st.columns(2)
    with left:
        if g.partitions > 1:   # query heads: head order, KV groups outlined (heads fold only inside one)
            kv = np.arange(g.channels) // g.per_partition
            _ui.chart(F.similarity_heatmap(d["similarity"], kv, order=d["order"], group=gid, highlight=ch,
                                           zrange="full", axis_label="query head (KV group order)",
                                           title=f"Query-head cosine similarity by KV group — {gid}"),
                      key="le_heatmap")
        else:
            _ui.chart(F.similarity_heatmap(d["similarity"], d["labels"], order=d["order"], group=gid, highlight=ch,
                                           unit=unit),
                      key="le_heatmap")
    with right:
        mode = st.segmented_control("Select in the embedding", ["click a point", "box", "lasso"],
                                    default="click a point", key=f"le_select_mode_{gid}",
                                    help="A click selects one unit in every view; box or lasso select several and "
                                         "show their cluster statistics.") or "click a point"
        sel = {"click a point": "points", "box": "box", "lasso": "lasso"}[mode]
        st.plotly_chart(F.embedding_scatter(d["coords"], d["labels"], method=d["embedding"], group=gid,
                                            highlight=[ch] if ch is not None else None, unit=unit, select=sel),
                        key=f"le_embedding_{gid}_{sel}", on_select=lambda: _from_scatter(gid, sel),
                        selection_mode=("points",) if sel == "points" else ("points", sel),
                        config={"displaylogo": False})
        if d["embedding_note"]:
            st.caption(d["embedding_note"])
    lasso = ss.get(f"le_lasso_{gid}")
    if lasso:
        _lasso_panel(gid, lasso, float(ratio))

    if g.partitions > 1:
        st.dataframe(pd.DataFrame({"query head": np.arange(g.channels), "KV group": np.arange(g.channels) //
                                   g.per_partition, "cluster": labels}), hide_index=True, key=f"le_heads_{gid}")
        st.caption("Heads in the same cluster merge into one (q rows averaged, o columns summed).")
    if d["weight"] is not None:
        n_cl = int(labels.max()) + 1
        start = 0
        if n_cl > 12:
            if ss.get(f"le_grid_start_{gid}", 1) > n_cl:
                ss[f"le_grid_start_{gid}"] = 1
            start = st.number_input(f"Filter grid: first cluster shown (by size, 1 … {n_cl})", 1, n_cl, step=12,
                                    key=f"le_grid_start_{gid}", **_ui.wv(f"le_grid_start_{gid}", value=1)) - 1
        _ui.chart(F.filter_grid(d["weight"], d["labels"], group=gid, module=d["weight_module"], start=int(start),
                                highlight=ch), key="le_filters")
        st.caption("Each row is one cluster, largest first; the leftmost tile is the cluster mean — the single filter "
                   "that replaces the whole row after folding — followed by the member filters."
                   + (f" {n_cl} clusters: page through them with the number above." if n_cl > 12 else ""))

    st.markdown("**Nearest neighbours**" + (f" of {unit} {ch}" if ch is not None else
                                             f" (select a {unit} above, or click a point in the embedding)"))
    if ch is not None:
        nb = wb.neighbours(gid, ch, plan, k=min(8, g.channels - 1))
        rows_ = [n["channel"] for n in nb]
        st.dataframe(pd.DataFrame([{"channel": n["channel"], "cosine": round(n["cosine"], 4),
                                    "cluster": int(labels[n["channel"]]),
                                    "same cluster": bool(labels[n["channel"]] == labels[ch])} for n in nb]),
                     hide_index=True, key=f"le_nbtable_{gid}", on_select=lambda: _from_table(gid, rows_),
                     selection_mode="single-row")
        st.caption("Click a row to select that neighbour instead.")

    left, right = st.columns(2)
    with left:
        _ui.chart(F.cluster_size_histogram(d["labels"], group=gid, unit=unit), key="le_sizes")
    with right:
        try:  # the fold's own clusters at every slider stop computed so far (the background fills in the rest)
            pts = wb.inertia_curve(gid, plan, ready_only=True)
            _ui.chart(F.inertia_curve(pts, current_ratio=ratio, title=f"Cluster inertia vs. fold ratio — {gid}",
                                      unit=unit),
                      key="le_inertia")
            if len(pts) < status["total"]:
                st.caption(f"{len(pts)} of {status['total']} ratios so far; the rest appear as the background "
                           "clustering finishes (rerun the page or move the slider).")
        except Exception as exc:  # noqa: BLE001
            _ui.report_failure(exc, "Inertia curve")


def _lasso_panel(gid: str, chans: list[int], ratio: float) -> None:
    try:
        s = wb.selection_stats(gid, plan, chans, ratio)
    except Exception as exc:  # noqa: BLE001
        _ui.report_failure(exc, "Selection statistics")
        return
    with st.container(border=True):
        st.markdown(f"**Selection: {s['channels']} channels in {s['n_clusters']} cluster(s)**")
        m = st.columns(3)
        diff = s["mean_cos_selection"] - s["mean_cos_group"]
        # a sign and a colour only when the difference is more than rounding noise
        m[0].metric("Mean cosine inside the selection", f"{s['mean_cos_selection']:.3f}",
                    delta=f"{diff:+.3f} vs. the group" if abs(diff) >= 0.005 else "same as the group",
                    delta_color="normal" if abs(diff) >= 0.005 else "off",
                    help=f"mean over the whole group: {s['mean_cos_group']:.3f}")
        m[1].metric("Selected pairs in the same cluster", _ui.fmt_pct(s["same_cluster_pairs"]))
        m[2].metric("Clusters touched", s["n_clusters"])
        st.dataframe(pd.DataFrame([{"cluster": c["cluster"], "selected": c["selected"], "cluster size": c["size"],
                                    "share of the cluster": round(c["selected"] / c["size"], 3)}
                                   for c in s["clusters"]]), hide_index=True, key=f"le_lasso_table_{gid}")
        st.button("Clear the lasso selection", key=f"le_lasso_clear_{gid}",
                  on_click=lambda: st.session_state.__setitem__(f"le_lasso_{gid}", None))


_ui.warm_up_umap()
_detail()
