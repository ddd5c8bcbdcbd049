"""Unit tests for the plotly figure builders (no streamlit, no torch)."""
from __future__ import annotations

import json

import re

import numpy as np
import plotly.graph_objects as go
import pytest

from foldviz import figures as F


def _decode(obj):
    if isinstance(obj, dict):
        if "bdata" in obj and "dtype" in obj:
            return F.decode_array(obj).tolist()
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


def _spec(fig: go.Figure) -> dict:
    """Round-trip through JSON like st.plotly_chart does (typed arrays decoded to lists)."""
    return _decode(json.loads(fig.to_json()))


def _titles(spec: dict) -> tuple[str, str, str]:
    lay = spec["layout"]
    t = lay["title"]  # what a person reads: the title and its subtitle line (long titles wrap into it)
    return (t["text"] + (" — " + t["subtitle"]["text"] if t.get("subtitle", {}).get("text") else ""),
            lay.get("xaxis", {}).get("title", {}).get("text", ""),
            lay.get("yaxis", {}).get("title", {}).get("text", ""))


def _rand_features(n=24, d=10, k=4, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d))
    labels = np.arange(n) % k
    x = centers[labels] + 0.1 * rng.normal(size=(n, d))
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    return x, xn @ xn.T, labels


def test_method_labels():
    assert F.method_label("ar") == "Fold-AR"
    assert F.method_label("none") == "Fold-Naive"
    assert F.method_label("l2") == "L2 pruning"
    assert F.method_label("whatever") == "whatever"


def test_order_by_cluster_groups_members_largest_first():
    labels = np.array([2, 0, 1, 0, 2, 0])
    order = F.order_by_cluster(labels)
    assert sorted(order.tolist()) == list(range(6))
    ordered = labels[order]
    assert ordered.tolist() == [0, 0, 0, 2, 2, 1]


def test_similarity_heatmap_orders_and_draws_boundaries():
    _, sim, labels = _rand_features()
    fig = F.similarity_heatmap(sim, labels, group="layer1.0.conv1")
    spec = _spec(fig)
    assert spec["data"][0]["type"] == "heatmap"
    z = np.array(spec["data"][0]["z"], dtype=float)
    assert z.shape == (24, 24)
    order = F.order_by_cluster(labels)
    assert np.allclose(z, sim[np.ix_(order, order)])
    # within-cluster blocks are bright: mean of diagonal blocks > off-diagonal
    lab = labels[order]
    same = lab[:, None] == lab[None, :]
    assert z[same].mean() > z[~same].mean() + 0.3
    # 4 clusters of 6 -> 4 outlined diagonal blocks
    assert len(spec["layout"]["shapes"]) == 4
    assert {(sh["x0"], sh["x1"]) for sh in spec["layout"]["shapes"]} == {(-0.5, 5.5), (5.5, 11.5), (11.5, 17.5),
                                                                            (17.5, 23.5)}
    title, x, y = _titles(spec)
    assert "layer1.0.conv1" in title and "cluster" in x and "cluster" in y
    assert spec["layout"]["meta"]["figure"] == "similarity_heatmap"
    assert spec["data"][0]["zmin"] == -spec["data"][0]["zmax"]
    full = _spec(F.similarity_heatmap(sim, labels, zrange="full"))
    assert full["data"][0]["zmin"] == -1 and full["data"][0]["zmax"] == 1
    singletons = _spec(F.similarity_heatmap(sim, np.arange(24)))
    assert not singletons["layout"].get("shapes")  # no block for single-channel clusters


def test_similarity_heatmap_thins_wide_layers_and_validates():
    n = 1000
    rng = np.random.default_rng(1)
    sim = np.corrcoef(rng.normal(size=(n, 20)))
    labels = rng.integers(0, 50, size=n)
    spec = _spec(F.similarity_heatmap(sim, labels, max_channels=200))
    z = np.array(spec["data"][0]["z"], dtype=float)
    assert z.shape[0] <= 200 and spec["layout"]["meta"]["step"] == 5
    assert "one channel in 5 shown" in spec["layout"]["title"]["text"]
    with pytest.raises(ValueError):
        F.similarity_heatmap(np.zeros((3, 4)), [0, 0, 0])
    with pytest.raises(ValueError):
        F.similarity_heatmap(np.eye(3), [0, 1])


def test_embedding_scatter_one_trace_per_cluster_with_hover():
    rng = np.random.default_rng(0)
    coords = rng.normal(size=(20, 2))
    labels = np.arange(20) % 3
    spec = _spec(F.embedding_scatter(coords, labels, method="PCA", group="g", highlight=[17]))
    traces = spec["data"]
    assert [t["name"] for t in traces[:3]] == ["cluster 0 (7 ch)", "cluster 1 (7 ch)", "cluster 2 (6 ch)"]
    assert "channel %{customdata[0]} · cluster %{customdata[1]}" in traces[0]["hovertemplate"]
    # channel 17 is in cluster 2; its customdata names it
    cd = np.array(traces[2]["customdata"])
    assert [17, 2] in cd.tolist()
    assert traces[-1]["name"] == "selected"
    title, x, y = _titles(spec)
    assert "PCA" in title and x.startswith("PCA 1") and y.startswith("PCA 2")


def test_embedding_scatter_many_clusters_categorical_colours_and_grey_rest():
    rng = np.random.default_rng(0)
    coords = rng.normal(size=(200, 2))
    labels = np.arange(200) % 40                          # 40 clusters of 5
    labels[150:] = np.arange(150, 200)                    # ... plus 50 singletons
    spec = _spec(F.embedding_scatter(coords, labels, method="UMAP"))
    assert spec["layout"]["meta"]["clusters"] == 90
    named = [t for t in spec["data"] if t["name"].startswith("cluster ")]
    colours = [t["marker"]["color"] for t in named]
    assert len(named) == 20 and len(set(colours)) == 20 and F.OTHER_COLOR not in colours   # distinct, categorical
    other = [t for t in spec["data"] if t["name"].startswith("other")]
    assert len(other) == 1 and other[0]["marker"]["color"] == F.OTHER_COLOR and "50 singletons" in other[0]["name"]
    # every point is drawn exactly once, with its channel id and cluster for hover and selection
    pts = [tuple(c) for t in spec["data"] for c in np.asarray(F.decode_array(t["customdata"])).tolist()]
    assert sorted(p[0] for p in pts) == list(range(200)) and all(labels[ch] == c for ch, c in pts)
    # the same colours as the heatmap outlines and the filter-grid rows
    pal = F.cluster_palette(labels)
    assert all(t["marker"]["color"] == pal[int(t["name"].split()[1])] for t in named)
    with pytest.raises(ValueError):
        F.embedding_scatter(np.zeros((3, 3)), [0, 0, 0])


def test_linked_highlight_in_heatmap_scatter_and_filter_grid():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(6), 4)                    # 6 clusters of 4
    x = rng.normal(size=(24, 8))
    sim = np.corrcoef(x)
    heat = _spec(F.similarity_heatmap(sim, labels, highlight=9))
    lines = [sh for sh in heat["layout"]["shapes"] if sh["type"] == "line"]
    pos = heat["layout"]["meta"]["highlight_pos"]
    assert len(lines) == 2 and {lines[0]["x0"], lines[1]["y0"]} == {pos} and pos == 9
    assert any("channel 9" in a["text"] for a in heat["layout"]["annotations"])
    sc = _spec(F.embedding_scatter(rng.normal(size=(24, 2)), labels, highlight=[9]))
    sel = [t for t in sc["data"] if t["name"] == "selected"]
    assert len(sel) == 1 and np.asarray(F.decode_array(sel[0]["customdata"])).tolist() == [[9, 2]]
    grid = _spec(F.filter_grid(rng.normal(size=(24, 1, 3, 3)), labels, max_clusters=2, highlight=21))
    meta = grid["layout"]["meta"]
    assert meta["highlight"] == {"channel": 21, "row": 1, "tile_shown": True}     # cluster 5 kept visible
    assert len([sh for sh in grid["layout"].get("shapes", []) if sh["type"] == "rect"]) == 2  # merged + member
    assert "of 6 by size" in grid["layout"]["title"]["subtitle"]["text"]
    assert "leftmost tile = the merged filter" in grid["layout"]["title"]["subtitle"]["text"]


@pytest.mark.parametrize("shape,mode,img", [
    ((6, 1, 3, 3), "kernel", (3, 3)),
    ((6, 3, 5, 5), "rgb", (5, 5, 3)),
    ((6, 16, 3, 3), "energy", (3, 3)),
    ((6, 64, 1, 1), "fan-in", (8, 8)),
    ((6, 64), "fan-in", (8, 8)),
    ((6, 7), "fan-in", (3, 3)),
])
def test_filter_images_modes(shape, mode, img):
    w = np.random.default_rng(0).normal(size=shape)
    images, m = F.filter_images(w)
    assert m == mode
    assert images.shape == (6, *img)
    if mode == "rgb":
        assert images.min() >= 0 and images.max() <= 1


def test_filter_grid_rows_per_cluster_and_merged_column():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(10, 1, 3, 3))
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 3])
    spec = _spec(F.filter_grid(w, labels, module="conv1", max_per_cluster=8))
    merged, members = spec["data"]
    assert merged["type"] == members["type"] == "heatmap"
    assert (merged["name"], members["name"]) == ("merged", "members")
    zm = np.array(merged["z"], dtype=float)
    z = np.array(members["z"], dtype=float)
    # 4 clusters of 3 rows + gaps; merged tile (3 wide) at x=0, members from x=8 (tile + gap + separator)
    assert zm.shape == (4 * 4 - 1, 3) and merged["x0"] == 0
    assert z.shape == (4 * 4 - 1, 4 * 4 - 1) and members["x0"] == 8
    assert np.allclose(zm[0:3], w[:4, 0].mean(0))          # merged filter of cluster 0 = mean of members
    assert np.allclose(z[0:3, 0:3], w[0, 0]) and np.allclose(z[0:3, 4:7], w[1, 0])
    assert np.isnan(z[4:7, 12:15]).all()                     # cluster 1 has only 3 members
    assert spec["layout"]["meta"]["shown"] == 10
    ticks = spec["layout"]["yaxis"]["ticktext"]
    assert re.sub("<[^>]+>", "", ticks[0]) == "cluster 0 (4)" and len(ticks) == 4
    assert "channel %{customdata[0]} · cluster %{customdata[1]}" in members["hovertemplate"]
    assert "merged filter of cluster" in merged["hovertemplate"]
    assert "conv1" in spec["layout"]["title"]["text"]
    assert spec["layout"]["coloraxis"]["cmin"] == -spec["layout"]["coloraxis"]["cmax"]


def test_filter_grid_rgb_uses_image_trace():
    w = np.random.default_rng(0).normal(size=(8, 3, 3, 3))
    spec = _spec(F.filter_grid(w, np.arange(8) % 2))
    assert spec["data"][0]["type"] == "image"


def test_cluster_size_histogram():
    labels = [0, 0, 0, 1, 1, 2, 3, 4]  # sizes 3,2,1,1,1
    spec = _spec(F.cluster_size_histogram(labels))
    tr = spec["data"][0]
    assert tr["type"] == "bar"
    assert dict(zip(tr["x"], tr["y"])) == {1: 3, 2: 1, 3: 1}
    t, x, y = _titles(spec)
    assert "size" in x and "clusters" in y
    spec2 = _spec(F.cluster_size_histogram([3, 2, 1, 1, 1], from_labels=False))
    assert dict(zip(spec2["data"][0]["x"], spec2["data"][0]["y"])) == {1: 3, 2: 1, 3: 1}


def test_group_overview():
    rows = [dict(id="conv1", channels=16, mean_cos=0.3, max_cos=0.9, suggested_ratio=0.4, foldable=True),
            dict(id="fc", channels=10, mean_cos=0.1, max_cos=0.2, suggested_ratio=0.0, foldable=False)]
    spec = _spec(F.group_overview(rows))
    names = [t["name"] for t in spec["data"]]
    assert names == ["mean cosine similarity", "max cosine similarity", "channels", "suggested fold ratio"]
    assert spec["data"][0]["x"] == ["conv1", "fc"]
    assert spec["data"][3]["y"] == [40.0, 0.0]
    assert spec["layout"]["title"]["text"]
    assert F.group_overview([]).layout.meta["figure"] == "empty"


def test_inertia_curve_normalised_and_marker():
    pts = [(0.0, 10, 0.0), (0.5, 5, 2.0), (0.9, 1, 8.0)]
    spec = _spec(F.inertia_curve(pts, current_ratio=0.5))
    tr = spec["data"][0]
    assert tr["x"] == [0.0, 50.0, 90.0]
    assert tr["y"] == [0.0, 0.25, 1.0]
    assert any(s.get("x0") == 50.0 for s in spec["layout"]["shapes"])
    multi = _spec(F.inertia_curve({"a": pts, "b": pts}))
    assert [t["name"] for t in multi["data"]] == ["a", "b"]


def test_variance_ratio_plot_traces_and_ideal_line():
    series = {
        "none": [dict(layer="bn1", ratio=0.4), dict(layer="layer1.0.bn1", ratio=0.2)],
        "ar": [dict(layer="bn1", ratio=0.95), dict(layer="layer1.0.bn1", ratio=1.1)],
        "r": [dict(layer="bn1", ratio=1.0), dict(layer="layer1.0.bn1", ratio=1.0)],
    }
    spec = _spec(F.variance_ratio_plot(series))
    names = [t["name"] for t in spec["data"]]
    assert names == ["Fold-Naive", "Fold-AR", "Fold-R", "ideal (ratio = 1)"]
    ideal = spec["data"][-1]
    assert ideal["y"] == [1.0, 1.0] and ideal["line"]["dash"] == "dash"
    assert spec["layout"]["yaxis"]["type"] == "log"
    # 1-2-5 ticks span the data (0.2 .. 1.1) and nothing far outside it
    assert spec["layout"]["yaxis"]["ticktext"] == ["0.2", "0.5", "1"]
    assert spec["data"][0]["x"] == ["bn1", "layer1.0.bn1"]
    _, x, y = _titles(spec)
    assert "layer" in x and "Var" in y
    lin = _spec(F.variance_ratio_plot(series, log_y=False))
    assert lin["layout"]["yaxis"].get("type") != "log"


def test_sweep_plot_one_trace_per_method_in_percent():
    rows = []
    for m in ("none", "ar", "l1"):
        for ratio in (0.1, 0.5):
            for seed in (0, 1):
                rows.append(dict(method=m, ratio=ratio, seed=seed, param_sparsity=ratio * 1.5,
                                 accuracy=0.9 - ratio - 0.01 * seed, loss=0.1))
    spec = _spec(F.sweep_plot(rows, methods=["ar", "none", "l1", "dir"], baseline=0.95))
    names = [t["name"] for t in spec["data"]]
    assert names == ["Fold-AR", "Fold-Naive", "L1 pruning", "unfolded"]
    tr = spec["data"][0]
    assert np.allclose(tr["x"], [15.0, 75.0])
    assert np.allclose(tr["y"], [79.5, 39.5])
    assert tr["error_y"]["visible"]
    _, x, y = _titles(spec)
    assert x.startswith("parameter sparsity (%") and y == "accuracy (%)"
    assert list(spec["data"][-1]["y"]) == pytest.approx([95.0, 95.0])  # the unfolded line, in data coordinates


def test_before_after_bars_units():
    before = dict(params=2_000_000, flops=50_000_000, size_bytes=8_000_000, latency_ms=3.0, accuracy=0.95)
    after = dict(params=1_000_000, flops=20_000_000, size_bytes=4_000_000, latency_ms=2.0, accuracy=0.9)
    spec = _spec(F.before_after_bars(before, after))
    assert len(spec["data"]) == 5
    assert spec["data"][0]["y"] == [2.0, 1.0]
    assert spec["data"][4]["y"] == pytest.approx([95.0, 90.0])
    assert spec["layout"]["yaxis"]["title"]["text"] == "millions"
    assert spec["layout"]["annotations"][0]["text"] == "Parameters"
    assert spec["layout"]["xaxis"]["title"]["text"] == "-50.0%"


def test_channels_per_group_and_plan_preview():
    groups = [dict(id="a", channels_before=16, channels_after=8, ratio=0.5),
              dict(id="b", channels_before=32, channels_after=32, ratio=0.0, skip=True)]
    spec = _spec(F.channels_per_group(groups))
    assert [t["name"] for t in spec["data"]] == ["before", "after"]
    assert spec["data"][1]["y"] == [8, 32]
    assert spec["layout"]["yaxis"]["title"]["text"] == "channels" and spec["layout"]["yaxis"].get("type") != "log"
    # a decoder: 512 MLP neurons beside 8 query heads, named, on a log axis where 8 stays visible
    lm = _spec(F.channels_per_group([dict(id="l0.mlp", unit="neuron", channels_before=512, channels_after=358),
                                     dict(id="l0.attn", unit="head", channels_before=8, channels_after=6)]))
    assert lm["layout"]["yaxis"]["type"] == "log" and lm["layout"]["yaxis"]["title"]["text"].startswith("heads / neurons")
    assert "Heads / neurons per group" in lm["layout"]["title"]["text"]
    p = _spec(F.plan_preview_bars(groups))
    assert p["data"][0]["y"] == [50.0, 0.0]
    assert p["data"][0]["text"] == ["16→8", "32→32"]


def test_learn_helpers():
    spec = _spec(F.merged_variance_curve(4, correlations=(0.0, 1.0), measured=[dict(size=2, ratio=0.6)]))
    assert spec["data"][0]["y"] == pytest.approx([1.0, 0.5, 1 / 3, 0.25])
    assert spec["data"][1]["y"] == pytest.approx([1.0, 1.0, 1.0, 1.0])
    assert spec["data"][2]["name"] == "measured clusters"
    m = _spec(F.matrix_heatmap(np.eye(3), title="W", x="in", y="out"))
    assert m["layout"]["title"]["text"] == "W"


def test_empty_figure():
    spec = _spec(F.empty_figure("nothing"))
    assert spec["layout"]["annotations"][0]["text"] == "nothing"


def test_filter_gallery_channel_order():
    w = np.random.default_rng(0).normal(size=(10, 1, 3, 3))
    spec = _spec(F.filter_gallery(w, module="conv1", columns=4))
    z = np.array(spec["data"][0]["z"], dtype=float)
    assert z.shape == (3 * 4 - 1, 4 * 4 - 1)
    assert np.allclose(z[0:3, 4:7], w[1, 0])       # channel 1 is the second tile of row 0
    assert np.allclose(z[4:7, 0:3], w[4, 0])       # channel 4 starts row 1
    assert spec["layout"]["meta"]["shown"] == 10
    assert "10 filters of conv1" in spec["layout"]["title"]["text"]


def test_sweep_plot_original_row_is_baseline():
    rows = [dict(method="original", ratio=0.0, seed=0, param_sparsity=0.0, accuracy=0.97),
            dict(method="ar", ratio=0.5, seed=0, param_sparsity=0.7, accuracy=0.9)]
    spec = _spec(F.sweep_plot(rows))
    assert [t["name"] for t in spec["data"]] == ["Fold-AR", "unfolded"]
    assert list(spec["data"][1]["y"]) == pytest.approx([97.0, 97.0])   # a data line across the plot


def test_perplexity_sweep_is_on_a_log_axis_with_a_reference_line_in_data_coordinates():
    rows = [dict(method="original", ratio=0.0, seed=0, param_sparsity=0.0, perplexity=60.0),
            dict(method="fold", ratio=0.3, seed=0, param_sparsity=0.2, perplexity=80.0),
            dict(method="magnitude", ratio=0.3, seed=0, param_sparsity=0.2, perplexity=170.0)]
    spec = _spec(F.sweep_plot(rows, metric="perplexity"))
    assert spec["layout"]["yaxis"]["type"] == "log" and "perplexity" in spec["layout"]["yaxis"]["title"]["text"]
    ys = [float(y) for t in spec["data"] for y in F.decode_array(t["y"])]
    assert min(ys) == 60.0 and max(ys) == 170.0            # nothing drawn at 1 or 1e77
    assert not spec["layout"].get("shapes")


def test_selected_channels_reads_browser_and_python_selections():
    pts = [{"customdata": {"0": 7, "1": 2}}, {"customdata": [3, 1]}, {"customdata": (7, 2)}, {"x": 1, "y": 2},
           {"customdata": None}, {"customdata": {"0": "x"}}]
    assert F.selected_channels(pts) == [3, 7]
    assert F.selected_channels([]) == [] and F.selected_channels(None) == []


def test_sensitivity_plot_bars_reference_line_and_titles():
    rows = [{"layer": 0, "perplexity": 70.5, "delta": 6.5, "relative": 70.5 / 64.0},
            {"layer": 1, "perplexity": 64.2, "delta": 0.2, "relative": 64.2 / 64.0},
            {"layer": 2, "perplexity": 67.3, "delta": 3.3, "relative": 67.3 / 64.0}]
    fig = F.sensitivity_plot(rows, 64.0)
    bars, ref = fig.data
    assert bars.type == "bar" and list(bars.x) == ["layer 0", "layer 1", "layer 2"]
    assert list(bars.y) == [70.5, 64.2, 67.3]
    assert np.allclose(np.asarray(bars.customdata)[:, 0], [6.5, 0.2, 3.3])
    assert ref.name == "unfolded" and list(ref.y) == [64.0, 64.0] and list(ref.x) == ["layer 0", "layer 2"]
    assert fig.layout.xaxis.title.text.startswith("decoder layer") and "perplexity" in fig.layout.yaxis.title.text
    assert "sensitivity" in fig.layout.title.text.lower()
    assert fig.layout.meta["figure"] == "sensitivity_plot" and fig.layout.meta["base"] == 64.0
    lo, hi = fig.layout.yaxis.range
    assert lo < 64.0 and hi > 70.5                         # the reference line and every bar are in view
    assert len(F.sensitivity_plot([], 5.0).data) == 1      # no layers: no reference line to span
