"""Page 5 — Learn: a guided walkthrough of model folding with live numbers from a bundled demo."""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from foldviz import figures as F
from foldviz.kmeans import k_for_ratio
from foldviz.session import DEFAULT_MODEL, ModelSource
from pages import _ui

STEPS = [
    "1 · Filters",
    "2 · Similarity",
    "3 · Clusters",
    "4 · Merged filters",
    "5 · The next layer",
    "6 · Variance collapse",
    "7 · Repair",
]

st.title("Learn: how folding works")
st.caption("A step-by-step walkthrough on a small layer of a bundled demo network. Every number and picture is "
           "computed live; change the fold ratio and watch it all update.")

ss = st.session_state
ss.setdefault("learn_step", 0)

# the Learn page always uses a demo (the current model when it is one)
cur = _ui.model_source()
cur_is_lm = _ui.kind() == "lm"
src = cur if cur.spec.startswith("demo:") and not cur.weights and not cur_is_lm else ModelSource(DEFAULT_MODEL)
if cur_is_lm:
    st.info("The walkthrough explains folding on a CNN (filters and BatchNorm statistics). For your language model, "
            "the Layer explorer shows the MLP neurons and query heads the fold merges, and Fold & results compares "
            "perplexity and generations.")
try:
    wb = _ui.get_workbench(src)
except Exception as exc:  # noqa: BLE001
    _ui.report_failure(exc, f"Loading {src.spec}")
    st.stop()
data = _ui.data_source() if src == cur else wb.default_data()
if src != cur:
    st.info(f"The walkthrough uses the bundled demo **{src.spec}** (your model, {cur.label}, is unchanged).")

ids = wb.foldable_ids()
if not ids:
    st.warning(f"{src.spec} has no foldable channel groups to walk through.")
    st.stop()
seed = int((ss.get("plan") or {}).get("seed", 0))
try:  # default: the most redundant group (where folding has the most to show), not simply the first conv
    with wb.foreground():
        scores = {r["id"]: r["score"] for r in wb.overview_rows(0.3) if r["foldable"]}
    most = max(ids, key=lambda i: (scores.get(i, -1.0), -ids.index(i)))
except Exception:  # noqa: BLE001
    most = ids[0]
gid = st.selectbox("Layer to walk through (channel group)", ids, index=ids.index(most), key=f"learn_group_{src.spec}",
                   format_func=lambda i: f"{i} ({wb.group(i).channels} channels"
                                         + (", most redundant)" if i == most else ")"),
                   help="Default: the group whose channels are most redundant (highest mean nearest-neighbour "
                        "cosine). Every step below follows this choice.")
g = wb.group(gid)

c1, c2 = st.columns([3, 2])


def _go(delta: int) -> None:
    """Next/Back: move the step and the radio together (callbacks run before the widgets exist)."""
    ss["learn_step"] = min(len(STEPS) - 1, max(0, int(ss["learn_step"]) + delta))
    ss["learn_step_radio"] = ss["learn_step"]


step = c1.radio("Step", list(range(len(STEPS))), **_ui.wv("learn_step_radio", index=int(ss["learn_step"])),
                format_func=lambda i: STEPS[i], horizontal=True, key="learn_step_radio")
ss["learn_step"] = int(step)
ratio = c2.slider("Fold ratio for this walkthrough", 0.1, 0.9, 0.5, step=0.1, key="learn_ratio",
                  help="Fraction of channels that folding removes: in this layer for steps 1-5, in every layer of "
                       "the network for steps 6 and 7 (variance collapse compounds from layer to layer).")
k = k_for_ratio(g.channels, ratio)
# the walkthrough folds with Fold-Naive: its clusters are the ones shown on every step
learn_plan = wb.default_plan(float(ratio), "none", seed)
pj = _ui.plan_json(learn_plan.to_dict())



def _bundle(what: str) -> dict:
    """The walkthrough's numbers for this group (consumer columns, merge error, cluster variance), on the fold's
    own clusters; memoised in the workbench."""
    def compute():
        labels_ = wb.cluster(gid, learn_plan, float(ratio)).labels
        inputs = wb.sample_batch(data, n=256)
        return {"consumer": wb.consumer_columns(gid, labels_),
                "merge_error": wb.merge_error(gid, labels_, inputs, seed=learn_plan.seed),
                "cluster_variance": wb.cluster_variance(gid, labels_, inputs)}
    try:
        return wb.memo(("learn", gid, float(ratio), pj, data.spec), compute)
    except Exception as exc:  # noqa: BLE001
        _ui.report_failure(exc, what)
        st.stop()


try:
    with wb.foreground():
        d = wb.group_detail(gid, learn_plan, float(ratio))
except Exception as exc:  # noqa: BLE001
    _ui.report_failure(exc, "Clustering")
    st.stop()
labels = np.asarray(d["labels"])
module = d["weight_module"] or gid

st.markdown(f"#### {STEPS[step]}")

if step == 0:
    st.markdown(
        f"We look at **{module}** in **{src.spec}**: it has **{g.channels} output channels**, one *filter* each. "
        "A filter is the little weight pattern a channel matches against its input. If two filters look alike, "
        "the two channels compute almost the same thing — that is redundancy, and folding exploits it.")
    if d["weight"] is not None:
        _ui.chart(F.filter_gallery(d["weight"], module=module), key="learn_gallery")
    st.markdown("Look for filters that are near copies of each other (or of each other's negative).")

elif step == 1:
    st.markdown(
        "To compare two channels we stack everything the network stores about each one into a vector "
        "(its incoming weights, bias, BatchNorm scale/shift, and the weights the *next* layer reads it with), "
        f"here **{d['features_dim']} numbers per channel**, and measure the angle between the vectors:")
    st.latex(r"\cos(a, b) = \frac{\langle a, b\rangle}{\lVert a\rVert \, \lVert b\rVert} \in [-1, 1]")
    _ui.chart(F.similarity_heatmap(d["similarity"], np.zeros(g.channels, dtype=int), order=np.arange(g.channels),
                                   group=gid, title=f"Cosine similarity of the {g.channels} channels (original order)",
                                   axis_label="channel (original order)"),
              key="learn_sim_raw")
    st.markdown(f"Mean similarity **{d['mean_cos']:.3f}**, most similar pair **{d['max_cos']:.3f}**. "
                "Red blocks off the diagonal are groups of look-alike channels, but in the original order "
                "they are scattered.")

elif step == 2:
    st.markdown(
        f"**k-means** groups the {g.channels} vectors into **k = {k}** clusters "
        f"(k = round(n·(1 − ratio)) = round({g.channels}·{1 - ratio:.1f})), choosing the clusters that make the "
        "members closest to their cluster centre:")
    st.latex(r"\min_{C_1..C_k} \sum_{c=1}^{k} \sum_{i \in C_c} \lVert w_i - \mu_c \rVert^2, \qquad "
             r"\mu_c = \frac{1}{|C_c|}\sum_{i\in C_c} w_i")
    left, right = st.columns(2)
    with left:
        _ui.chart(F.similarity_heatmap(d["similarity"], labels, order=d["order"], group=gid), key="learn_sim_sorted")
    with right:
        _ui.chart(F.embedding_scatter(d["coords"], labels, method=d["embedding"], group=gid), key="learn_embed")
    st.markdown(f"Sorted by cluster, the similar channels line up in blocks on the diagonal. The leftover distance "
                f"(k-means *inertia*) is **{d['inertia']:.3g}**: what folding will lose.")

elif step == 3:
    st.markdown(
        "Folding replaces every cluster by **one channel whose incoming weights are the mean** of its members' "
        "weights (biases and BatchNorm parameters are averaged too):")
    st.latex(r"W'_{c} = \frac{1}{|C_c|} \sum_{i \in C_c} W_i")
    if d["weight"] is not None:
        _ui.chart(F.filter_grid(d["weight"], labels, group=gid, module=module), key="learn_merged")
    sizes = np.bincount(labels)
    st.markdown(f"{g.channels} channels → **{k} merged channels**: {int((sizes == 1).sum())} cluster(s) keep a single "
                f"channel unchanged, the largest cluster merges **{int(sizes.max())}** channels.")

elif step == 4:
    b = _bundle("Next-layer analysis")
    cons = b["consumer"]
    st.markdown(
        "The next layer read each original channel with its own column of weights. After the merge it reads the "
        "single merged channel, so the columns of a cluster are **added up**:")
    st.latex(r"W^{next}_{:,c} = \sum_{i \in C_c} W^{next}_{:,i}")
    st.markdown("If the members were identical (hᵢ = h), nothing changes at all: "
                r"$\sum_i W^{next}_{:,i} h_i = (\sum_i W^{next}_{:,i})\, h$. Mean on the producing side, "
                "sum on the consuming side — that pairing is what makes folding exact for duplicates.")
    if cons is None:
        st.info("This group's next layer does not read the channels one-to-one; nothing to draw here.")
    else:
        order = np.asarray(d["order"])
        before = cons["before"][:, order]
        lab_sorted = labels[order]
        left, right = st.columns(2)
        unit = "weight summed over the kernel" if cons["kernel"] else "weight"
        with left:
            _ui.chart(F.matrix_heatmap(before, title=f"{cons['module']}: columns before (ordered by cluster)",
                                       x="input channel (cluster)", y="output channel", zlabel=unit,
                                       col_labels=[f"{int(i)} (c{int(c)})" for i, c in zip(order, lab_sorted)]),
                      key="learn_next_before")
        with right:
            _ui.chart(F.matrix_heatmap(cons["after"], title=f"{cons['module']}: after (one summed column per cluster)",
                                       x="merged channel (cluster)", y="output channel", zlabel=unit,
                                       col_labels=[f"c{c}" for c in range(cons["after"].shape[1])]),
                      key="learn_next_after")
        me = b["merge_error"]
        if me:
            m = st.columns(2)
            m[0].metric("Change of the next layer's output (k-means clusters)", f"{100 * me['error']:.1f}%")
            m[1].metric("…with random clusters of the same sizes", f"{100 * me['random_error']:.1f}%")
            st.caption(f"Relative L2 change of {me['consumer']}'s output on {('real' if data.spec else 'random')} "
                       "inputs when every channel it reads is replaced by its cluster mean. Clustering similar "
                       "channels is what keeps this small.")

elif step == 5:
    b = _bundle("Variance analysis")
    st.markdown(
        "Averaging channels that are similar but not identical also averages away part of their *variation*. "
        "For N unit-variance channels with pairwise correlation ρ:")
    st.latex(r"\operatorname{Var}\Big(\frac{1}{N}\sum_{i=1}^N h_i\Big) = \frac{1 + (N-1)\rho}{N}")
    cv = [c for c in b["cluster_variance"] if c["size"] > 1]
    _ui.chart(F.merged_variance_curve(max(4, max([c["size"] for c in cv], default=4)), measured=cv),
              key="learn_var_curve")
    if cv:
        mean_ratio = float(np.mean([c["ratio"] for c in cv]))
        st.markdown(f"Measured on {gid}'s {len(cv)} merged clusters: the merged channel keeps on average "
                    f"**{100 * mean_ratio:.0f}%** of its members' variance. The next BatchNorm still uses the "
                    "old statistics, so the signal shrinks — and it shrinks again in every folded layer: "
                    "**variance collapse**.")
    st.markdown(f"To see the collapse compound, the next chart folds **every layer of the network** at "
                f"{100 * ratio:.0f}% (not only {gid}), without repair, and measures each layer's output variance.")
    try:
        with st.spinner("Folding the whole demo without repair…"):
            comp = wb.variance_comparison(learn_plan, ["none"], data)
        _ui.chart(F.variance_ratio_plot({"none": comp["none"]["rows"]}), key="learn_var_naive")
        acc = comp["none"]["metric"]
        if acc is not None:
            base = wb.evaluate(None, data)["accuracy"]
            st.markdown(f"Fold-Naive at {100 * ratio:.0f}% per layer: accuracy **{_ui.fmt_pct(base)} → "
                        f"{_ui.fmt_pct(acc)}**.")
    except Exception as exc:  # noqa: BLE001
        _ui.report_failure(exc, "Folding the demo")

elif step == 6:
    st.markdown(
        "- **Fold-R** (REPAIR): run some real images through the folded model and re-estimate every BatchNorm's "
        "mean and variance, so each layer is standardised again.\n"
        "- **Fold-DIR**: the same, but with images *synthesised* from the original model (Deep Inversion: optimise "
        "random inputs until their BatchNorm statistics match the stored ones) — no real data needed.\n"
        "- **Fold-AR** (approximate repair, data-free): fold BatchNorm into the convolution, then scale each merged "
        "channel by the factor that undoes the shrinkage, estimated from the weights alone:")
    st.latex(r"s_c = \sqrt{\frac{N_c}{1 + (N_c - 1)\,\bar\rho_c}}, \quad "
             r"\bar\rho_c = \text{mean pairwise cosine of the members' weights}")
    st.markdown(
        "- **Fold-DFR** (foldviz's default, data-free): keep the original model's stored BatchNorm statistics and "
        "correct each one by how much folding changed it on a small synthetic batch — every layer, including the "
        "ones that *sum* merged channels (which can explode instead of collapse).")
    st.markdown(f"Each method below folds **every layer of the network** at {100 * ratio:.0f}%, with the same "
                "clusters, then repairs the statistics its own way.")
    methods = ["none", "ar", "dfr"] + (["r"] if data.spec else [])
    with_dir = st.checkbox("Include Fold-DIR (slower: synthesises inputs first)", value=False, key="learn_dir")
    if with_dir:
        methods.append("dir")
    try:
        with st.status("Folding the demo with each repair method…", expanded=False) as status:
            comp = wb.variance_comparison(learn_plan, list(methods), data, progress=_ui.progress_reporter(status))
            status.update(label="Repair methods compared", state="complete")
        _ui.chart(F.variance_ratio_plot({m: v["rows"] for m, v in comp.items() if v["rows"]}), key="learn_var_all")
        rows = []
        base = wb.evaluate(None, data)["accuracy"] if data.spec else None
        for m, v in comp.items():
            vr = [x["ratio"] for x in v["rows"]]
            rows.append({"method": F.method_label(m), "accuracy": _ui.fmt_pct(v["metric"]),
                         "mean variance ratio": f"{np.mean(vr):.3f}" if vr else "—",
                         "last layer variance ratio": f"{vr[-1]:.3f}" if vr else "—", "note": v["error"] or ""})
        st.dataframe(pd.DataFrame(rows), hide_index=True, key="learn_table")
        if base is not None:
            st.caption(f"Unfolded accuracy: {_ui.fmt_pct(base)} on {data.label}. Ratio {100 * ratio:.0f}% in every group.")
    except Exception as exc:  # noqa: BLE001
        _ui.report_failure(exc, "Comparing repairs")

c1, _, c3 = st.columns([1, 4, 1])
if step > 0:
    c1.button("← Back", key="learn_back", on_click=_go, args=(-1,))
if step < len(STEPS) - 1:
    c3.button("Next →", key="learn_next", type="primary", on_click=_go, args=(1,))
