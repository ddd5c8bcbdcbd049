"""Plotly figure builders for foldviz (pure functions: numpy / dicts in, ``go.Figure`` out).

Nothing here imports streamlit or torch; every builder is unit-tested on its own
(``tests/test_figures.py``).  Conventions:

* every figure has a title, axis titles (with units where there are units) and a
  compact layout that stays readable on a laptop screen;
* ``meta`` on the layout carries a small machine-readable description
  (``{"figure": <builder name>, ...}``) so tests and the app can identify charts;
* repair / pruning methods are displayed with the paper's names
  (Fold-Naive, Fold-R, Fold-AR, Fold-DIR, L1/L2 pruning).
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .methods import METHODS, label

# --------------------------------------------------------------------------------------
# shared style
# --------------------------------------------------------------------------------------

def _style(method: str) -> dict:
    """Line colour and dash of a method, from the registry."""
    m = METHODS.get(str(method))
    return {"color": m.color if m else "#444444", "dash": m.dash if m else "solid"}


# qualitative palette for clusters (repeats after 20)
CLUSTER_COLORS: list[str] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
    "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
]

_HEIGHT = 420
_MARGIN = dict(l=60, r=20, t=60, b=55)


def fmt_count(n) -> str:
    """1234567 -> "1.23 M" (k, M, G); None -> "—"."""
    if n is None:
        return "—"
    n = float(n)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f}"


def method_label(method: str) -> str:
    """Display name of a method key (the registry's label; unknown keys unchanged)."""
    return label(method)


OTHER_COLOR = "#b8b8b8"   # clusters beyond the palette, and singletons (a channel that merges with nothing)


def cluster_color(c: int) -> str:
    return CLUSTER_COLORS[int(c) % len(CLUSTER_COLORS)]


def cluster_palette(labels: Sequence[int] | np.ndarray) -> dict[int, str]:
    """One categorical colour per cluster, the same in every Layer-explorer view.

    Multi-member clusters get the palette's distinct colours, largest first; singletons and clusters beyond the
    palette's 20 colours share :data:`OTHER_COLOR` (a continuous scale is unreadable past ~10 clusters)."""
    ids, counts = np.unique(np.asarray(labels), return_counts=True)
    out, free = {}, iter(CLUSTER_COLORS)
    for i in np.lexsort((ids, -counts)):
        out[int(ids[i])] = (next(free, OTHER_COLOR) if counts[i] > 1 else OTHER_COLOR)
    return out


def _layout(fig: go.Figure, *, title: str, x: str | None = None, y: str | None = None,
            height: int = _HEIGHT, figure: str, subtitle: str | None = None, **meta) -> go.Figure:
    # the modebar (top right) appears on hover: titles sit top left, and long ones wrap into a subtitle line so
    # that neither is cut off at half-page width
    if subtitle is None and len(title) > 52 and " — " in title:
        title, subtitle = title.split(" — ", 1)
    subplots = getattr(fig, "_grid_ref", None) is not None   # make_subplots: subplot titles sit at the paper top
    fig.update_layout(
        # the title sits just above the plot area (yref "paper"), so the top of the margin stays free for the
        # modebar: the toolbar never covers a title, whatever the chart's width
        title=dict(text=title, x=0.0, xanchor="left", font=dict(size=16),
                   # a subtitle is drawn below the title's anchor: lift both above the plot area
                   **(dict(y=1.0, yref="paper", yanchor="bottom", pad=dict(b=8 + (22 if subtitle else 0)))
                      if not subplots else
                      dict(y=1.0, yref="container", yanchor="top", pad=dict(t=36))),  # above the subplot titles
                   subtitle=dict(text=subtitle, font=dict(size=12, color="#555")) if subtitle else None),
        height=height,
        margin=dict(_MARGIN, t=_MARGIN["t"] + 30 + (22 if subtitle else 0)),
        template="plotly_white",
        meta={"figure": figure, **meta},
        legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0),
    )
    if x is not None:
        fig.update_xaxes(title_text=x)
    if y is not None:
        fig.update_yaxes(title_text=y)
    return fig


def empty_figure(message: str, *, title: str = "Nothing to show yet") -> go.Figure:
    """A blank figure with a centred message (used when there is no data)."""
    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font=dict(size=14, color="#666"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, title=title, height=260, figure="empty")


def _as_labels(labels: Sequence[int] | np.ndarray, n: int | None = None) -> np.ndarray:
    lab = np.asarray(labels, dtype=int).reshape(-1)
    if n is not None and lab.shape[0] != n:
        raise ValueError(f"labels has {lab.shape[0]} entries but there are {n} channels")
    return lab


def order_by_cluster(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    """Stable permutation that lists channels cluster by cluster (largest cluster first)."""
    lab = _as_labels(labels)
    if lab.size == 0:
        return np.zeros(0, dtype=int)
    ids, counts = np.unique(lab, return_counts=True)
    rank = {int(c): r for r, c in enumerate(ids[np.lexsort((ids, -counts))])}
    keys = np.array([rank[int(c)] for c in lab])
    return np.argsort(keys, kind="stable")


# --------------------------------------------------------------------------------------
# Layer explorer
# --------------------------------------------------------------------------------------

def similarity_heatmap(sim: np.ndarray, labels: Sequence[int] | np.ndarray | None = None, *,
                       order: Sequence[int] | np.ndarray | None = None, group: str = "",
                       max_channels: int = 256, zrange: str = "auto", title: str | None = None,
                       highlight: int | None = None, axis_label: str | None = None, unit: str = "channel") -> go.Figure:
    """Cosine similarity between the channels of one group, ordered by cluster.

    ``sim`` is (n, n); ``labels`` (n,) cluster ids; ``order`` overrides the permutation
    (e.g. the engine's ``cluster_order``).  Every cluster with two or more members is outlined
    as a square block on the diagonal.  ``zrange="auto"`` scales the colours to the largest
    off-diagonal |cosine| (so weak structure stays visible; the diagonal saturates), ``"full"``
    uses [-1, 1].  Layers wider than ``max_channels`` are thinned evenly along the ordered axis
    so the browser stays responsive (the title says so). Block outlines take the clusters' colours
    (:func:`cluster_palette`); ``highlight`` draws a crosshair through one channel's row and column.
    """
    sim = np.asarray(sim, dtype=float)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"similarity matrix must be square, got shape {sim.shape}")
    n = sim.shape[0]
    lab = _as_labels(labels, n) if labels is not None else np.zeros(n, dtype=int)
    perm = np.asarray(order, dtype=int) if order is not None else order_by_cluster(lab)
    if sorted(perm.tolist()) != list(range(n)):
        raise ValueError("order must be a permutation of the channels")
    step = max(1, int(math.ceil(n / max_channels)))
    shown = perm[::step]
    s = sim[np.ix_(shown, shown)]
    lab_shown = lab[shown]
    m = len(shown)
    lim = 1.0
    if zrange == "auto" and m > 1:
        off = np.abs(s[~np.eye(m, dtype=bool)])
        lim = float(min(1.0, max(0.1, math.ceil(np.nanmax(off) * 10) / 10))) if off.size else 1.0
    ticks = np.arange(m)
    heat = go.Heatmap(
        z=s.astype(np.float32), x=ticks, y=ticks, zmin=-lim, zmax=lim, colorscale="RdBu_r", zmid=0.0,
        colorbar=dict(title=dict(text="cosine<br>similarity")),
        name="cosine similarity",
        customdata=np.stack([np.broadcast_to(shown[None, :], (m, m)), np.broadcast_to(shown[:, None], (m, m))],
                            axis=-1).astype(np.int32),
        hovertemplate="channel %{customdata[1]} vs channel %{customdata[0]}<br>cos = %{z:.3f}<extra></extra>",
    )
    fig = go.Figure(heat)
    # outline every multi-member cluster block on the diagonal
    blocks = []
    start = 0
    for i in range(1, m + 1):
        if i == m or lab_shown[i] != lab_shown[start]:
            if i - start >= 2:
                blocks.append((start, i - 1))
            start = i
    k = len(np.unique(lab))
    pal = cluster_palette(lab)
    # shapes as plain dicts set in one go: add_shape validates the whole layout on every call (slow per rerun)
    shapes, notes = [], []
    if len(blocks) <= 300:
        for a, b in blocks:
            c = pal[int(lab_shown[a])]
            shapes.append(dict(type="rect", x0=a - 0.5, x1=b + 0.5, y0=a - 0.5, y1=b + 0.5, xref="x", yref="y",
                               line=dict(color="rgba(20,20,20,0.85)" if c == OTHER_COLOR else c, width=2)))
    hl_pos = None
    if highlight is not None and 0 <= int(highlight) < n:
        where = np.where(shown == int(highlight))[0]
        # thinned: the nearest shown position along the cluster order
        hl_pos = int(where[0]) if where.size else int(np.where(perm == int(highlight))[0][0] // step)
        for kw in (dict(x0=hl_pos, x1=hl_pos, y0=-0.5, y1=m - 0.5), dict(x0=-0.5, x1=m - 0.5, y0=hl_pos, y1=hl_pos)):
            shapes.append(dict(type="line", line=dict(color="#111", width=1.5, dash="dot"), name="highlight",
                               xref="x", yref="y", **kw))
        notes.append(dict(x=hl_pos, y=-0.5, yanchor="bottom", text=f"channel {int(highlight)}", showarrow=False,
                          font=dict(size=11, color="#111"), bgcolor="rgba(255,255,255,0.8)", name="highlight"))
    fig.update_layout(shapes=shapes, annotations=notes)
    thin = f" (one {unit} in {step} shown)" if step > 1 else ""
    name = f" — {group}" if group else ""
    fig.update_yaxes(autorange="reversed", scaleanchor="x", constrain="domain")
    fig.update_xaxes(constrain="domain")
    what = "Filter" if unit == "channel" else unit.capitalize()
    return _layout(fig, title=title or f"{what} cosine similarity, ordered by cluster{name}{thin}",
                   x=axis_label or f"{unit} (ordered by cluster)", y=axis_label or f"{unit} (ordered by cluster)",
                   height=520, figure="similarity_heatmap", channels=n, clusters=k, step=step,
                   blocks=len(blocks), zlim=lim, highlight=None if highlight is None else int(highlight),
                   highlight_pos=hl_pos)


def embedding_scatter(coords: np.ndarray, labels: Sequence[int] | np.ndarray, *,
                      method: str = "PCA", group: str = "", channel_ids: Sequence[int] | None = None,
                      highlight: Sequence[int] | None = None, max_legend_clusters: int = len(CLUSTER_COLORS),
                      title: str | None = None, unit: str = "channel", select: str = "points") -> go.Figure:
    """Units of one group (channels, neurons, heads) in a 2-D embedding, coloured by k-means cluster.

    Hovering a point shows ``channel 17 · cluster 3`` (``unit`` names what a point is). ``select`` is the drag
    mode the chart opens in: ``"points"`` (a click selects one unit; dragging zooms), ``"box"`` or ``"lasso"``
    (dragging selects several). The largest multi-member clusters (up to
    ``max_legend_clusters``) get one trace and one distinct colour each (:func:`cluster_palette`, shared with the
    heatmap and the filter grid); the remaining clusters and the singletons share one grey trace.
    ``highlight`` channels get a black ring (trace "selected"). Points carry ``customdata = [channel, cluster]``,
    so a click or lasso selection in the app reads channel ids directly.
    """
    xy = np.asarray(coords, dtype=float)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"coords must be (n, 2), got {xy.shape}")
    n = xy.shape[0]
    lab = _as_labels(labels, n)
    ids = np.asarray(channel_ids if channel_ids is not None else np.arange(n), dtype=int)
    clusters = np.unique(lab)
    pal = cluster_palette(lab)
    Scatter = go.Scattergl if n > 1500 else go.Scatter
    fig = go.Figure()
    hover = f"{unit} %{{customdata[0]}} · cluster %{{customdata[1]}}<extra></extra>"
    short = {"channel": "ch", "neuron": "neurons", "head": "heads"}.get(unit, unit + "s")
    sizes = {int(c): int((lab == c).sum()) for c in clusters}
    coloured = [c for c in sorted(pal, key=lambda c: (-sizes[c], c)) if pal[c] != OTHER_COLOR][:max_legend_clusters]
    rest = np.where(~np.isin(lab, coloured))[0]
    if rest.size:  # drawn first, underneath
        singles = sum(1 for c in clusters if sizes[int(c)] == 1)
        fig.add_trace(Scatter(
            x=xy[rest, 0], y=xy[rest, 1], mode="markers", name=f"other ({singles} singletons, "
            f"{len(clusters) - len(coloured) - singles} small clusters)" if len(clusters) > len(coloured) else "other",
            marker=dict(size=7, color=OTHER_COLOR, line=dict(width=0.5, color="white")),
            customdata=np.stack([ids[rest], lab[rest]], axis=1), hovertemplate=hover))
    for c in coloured:
        idx = np.where(lab == c)[0]
        fig.add_trace(Scatter(
            x=xy[idx, 0], y=xy[idx, 1], mode="markers", name=f"cluster {int(c)} ({len(idx)} {short})",
            marker=dict(size=9, color=pal[c], line=dict(width=0.5, color="white")),
            customdata=np.stack([ids[idx], np.full(len(idx), int(c))], axis=1),
            hovertemplate=hover,
        ))
    if highlight is not None and len(highlight):
        h = np.asarray(list(highlight), dtype=int)
        pos = np.where(np.isin(ids, h))[0]
        fig.add_trace(Scatter(
            x=xy[pos, 0], y=xy[pos, 1], mode="markers", name="selected",
            marker=dict(size=16, color="rgba(0,0,0,0)", line=dict(width=2.5, color="black")),
            customdata=np.stack([ids[pos], lab[pos]], axis=1), hovertemplate=hover,
        ))
    name = f" — {group}" if group else ""
    _layout(fig, title=title or f"{unit.capitalize()}s in 2-D ({method}), coloured by cluster{name}",
            x=f"{method} 1 (a.u.)", y=f"{method} 2 (a.u.)", height=480,
            figure="embedding_scatter", method=method, channels=n, clusters=int(len(clusters)), coloured=len(coloured),
            unit=unit)
    # legend on the right (a long cluster list never covers the title); a click selects one point unless the
    # user chose box or lasso selection
    if select not in ("points", "box", "lasso"):
        raise ValueError(f"select must be points, box or lasso, not {select!r}")
    fig.update_layout(legend=dict(orientation="v", yanchor="top", y=1.0, xanchor="left", x=1.02),
                      dragmode={"points": "zoom", "box": "select", "lasso": "lasso"}[select], clickmode="event+select")
    return fig


def selected_channels(points: Sequence[Mapping]) -> list[int]:
    """Channel ids of the points a plotly click / box / lasso selection returned (their ``customdata[0]``),
    sorted and without duplicates; points without customdata (e.g. heatmap cells) are skipped."""
    out = set()
    for pt in points or []:
        cd = pt.get("customdata") if isinstance(pt, Mapping) else None
        if isinstance(cd, Mapping):  # the browser sends a typed-array row as {"0": channel, "1": cluster}
            cd = cd.get("0", cd.get(0))
        elif isinstance(cd, (list, tuple)) and cd:
            cd = cd[0]
        if cd is None:
            continue
        try:
            out.add(int(cd))
        except (TypeError, ValueError):
            continue
    return sorted(out)


def _near_square(d: int) -> tuple[int, int]:
    h = int(math.floor(math.sqrt(d)))
    while h > 1 and d % h:
        h -= 1
    w = d // h
    if w > 4 * h:  # awkward factorisation (e.g. primes): pad to a square instead
        h = int(math.ceil(math.sqrt(d)))
        w = int(math.ceil(d / h))
    return h, w


def filter_images(weight: np.ndarray) -> tuple[np.ndarray, str]:
    """Turn a producer weight into one small image per output channel.

    Returns ``(images, mode)`` where images is (n, h, w) for grey maps or (n, h, w, 3) for RGB:

    * conv with 1 input channel -> the kernel itself (``"kernel"``);
    * conv with 3 input channels -> the kernel as an RGB image, min-max scaled per filter (``"rgb"``);
    * conv with a spatial kernel and many input channels -> L2 norm over input channels (``"energy"``);
    * 1x1 conv / linear rows -> the fan-in vector folded into a near-square image (``"fan-in"``;
      a 64-wide MLP row on 8x8 digits becomes the 8x8 input template).
    """
    w = np.asarray(weight, dtype=float)
    if w.ndim == 4:
        n, c, kh, kw = w.shape
        if kh * kw > 1:
            if c == 1:
                return w[:, 0], "kernel"
            if c == 3:
                img = np.transpose(w, (0, 2, 3, 1))
                lo = img.reshape(n, -1).min(1)[:, None, None, None]
                hi = img.reshape(n, -1).max(1)[:, None, None, None]
                return (img - lo) / np.maximum(hi - lo, 1e-12), "rgb"
            return np.sqrt((w ** 2).sum(axis=1)), "energy"
        w = w.reshape(n, c)
    elif w.ndim != 2:
        w = w.reshape(w.shape[0], -1)
    n, d = w.shape
    h, ww = _near_square(d)
    out = np.full((n, h * ww), np.nan)
    out[:, :d] = w
    return out.reshape(n, h, ww), "fan-in"


def grid_rank(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    """Cluster ids in the filter grid's row order: largest first, ties by id."""
    ids, counts = np.unique(np.asarray(labels), return_counts=True)
    return ids[np.lexsort((ids, -counts))]


def grid_page_start(labels: Sequence[int] | np.ndarray, unit: int, per_page: int = 12) -> int:
    """The first row (0-based) of the filter-grid page that shows ``unit``'s cluster."""
    lab = np.asarray(labels)
    rank = int(np.flatnonzero(grid_rank(lab) == lab[int(unit)])[0])
    return rank - rank % per_page


def filter_grid(weight: np.ndarray, labels: Sequence[int] | np.ndarray, *, group: str = "",
                module: str = "", max_clusters: int = 12, max_per_cluster: int = 12,
                centroids: bool = True, title: str | None = None, start: int = 0,
                highlight: int | None = None) -> go.Figure:
    """Filters drawn as small images, one row per cluster (largest clusters first).

    With ``centroids`` the first (leftmost) tile of each row is the cluster mean, i.e. the merged filter
    folding produces, followed (after a gap) by up to ``max_per_cluster`` member filters. Rows show the
    clusters ranked ``start`` to ``start + max_clusters - 1`` by size (the title says which of how many);
    row labels take the clusters' colours (:func:`cluster_palette`). ``highlight`` outlines one channel's
    tile and its row's merged tile (its cluster's row is shown whatever ``start`` is).
    Hover names the channel and its cluster.
    """
    images, mode = filter_images(weight)
    n = images.shape[0]
    lab = _as_labels(labels, n)
    ids, counts = np.unique(lab, return_counts=True)
    ranked = grid_rank(lab)
    start = int(max(0, min(int(start), max(0, len(ranked) - 1))))
    order = ranked[start:start + max_clusters]
    if highlight is not None and 0 <= int(highlight) < n and lab[int(highlight)] not in order:
        order = np.concatenate([order[:max(0, max_clusters - 1)], [lab[int(highlight)]]])  # keep it visible
    pal = cluster_palette(lab)
    rgb = images.ndim == 4
    h, w = images.shape[1], images.shape[2]
    gap = 1
    widest = int(min(max_per_cluster, max((int(counts[ids == c][0]) for c in order), default=1)))
    first = 2 if centroids else 0          # merged tile + an empty separator column
    cols = widest + first
    H = len(order) * (h + gap) - gap
    W = cols * (w + gap) - gap
    canvas = np.full((H, W, 3) if rgb else (H, W), np.nan if not rgb else 1.0)
    ch_map = np.full((H, W), -1, dtype=int)
    cl_map = np.full((H, W), -1, dtype=int)
    shown = 0
    for r, c in enumerate(order):
        members = np.where(lab == c)[0]
        y0 = r * (h + gap)
        if centroids:
            canvas[y0:y0 + h, 0:w] = np.nanmean(images[members], axis=0)
            ch_map[y0:y0 + h, 0:w] = -2
            cl_map[y0:y0 + h, 0:w] = c
        for j, ch in enumerate(members[:max_per_cluster]):
            x0 = (first + j) * (w + gap)
            canvas[y0:y0 + h, x0:x0 + w] = images[ch]
            ch_map[y0:y0 + h, x0:x0 + w] = ch
            cl_map[y0:y0 + h, x0:x0 + w] = c
            shown += 1
    custom = np.stack([ch_map, cl_map], axis=-1).astype(np.int32)
    xs = first * (w + gap) if centroids else 0        # first column of the member tiles
    parts = [("members", slice(xs, W), "channel %{customdata[0]} · cluster %{customdata[1]}")]
    if centroids:
        parts.insert(0, ("merged", slice(0, w), "merged filter of cluster %{customdata[1]}"))
    fig = go.Figure()
    signed = mode in ("kernel", "fan-in")
    lim = float(np.nanmax(np.abs(canvas))) if (not rgb and np.isfinite(canvas).any()) else 1.0
    for name, cols_, hover in parts:
        if rgb:
            fig.add_trace(go.Image(z=np.nan_to_num(canvas[:, cols_], nan=1.0) * 255.0, customdata=custom[:, cols_],
                                   x0=cols_.start, dx=1, y0=0, dy=1, name=name,
                                   hovertemplate=hover + "<extra></extra>"))
        else:
            fig.add_trace(go.Heatmap(
                z=canvas[:, cols_].astype(np.float32), customdata=custom[:, cols_], x0=cols_.start, dx=1, y0=0, dy=1,
                coloraxis="coloraxis", name=name, hoverongaps=False,
                hovertemplate=hover + "<br>value %{z:.3f}<extra></extra>"))
    if not rgb:
        fig.update_layout(coloraxis=dict(colorscale="RdBu_r" if signed else "Viridis",
                                         cmin=-lim if signed else 0.0, cmax=lim,
                                         colorbar=dict(title=dict(text="weight" if signed else "‖w‖"))))
    fig.update_yaxes(autorange="reversed", showticklabels=True, scaleanchor="x", constrain="domain",
                     tickmode="array", tickvals=[r * (h + gap) + (h - 1) / 2 for r in range(len(order))],
                     ticktext=[f"<span style='color:{pal[int(c)] if pal[int(c)] != OTHER_COLOR else '#555'}'>"
                               f"<b>cluster {int(c)}</b> ({int(counts[ids == c][0])})</span>" for c in order],
                     showgrid=False, zeroline=False)
    hl = None
    if highlight is not None and 0 <= int(highlight) < n:
        ch = int(highlight)
        r = int(np.where(order == lab[ch])[0][0])
        members = np.where(lab == lab[ch])[0][:max_per_cluster]
        y0 = r * (h + gap)
        boxes = [0] if centroids else []
        if ch in members:
            boxes.append((first + int(np.where(members == ch)[0][0])) * (w + gap))
        for x0 in boxes:
            fig.add_shape(type="rect", x0=x0 - 0.5, x1=x0 + w - 0.5, y0=y0 - 0.5, y1=y0 + h - 0.5,
                          line=dict(color="#111", width=2.5), name="highlight")
        hl = {"channel": ch, "row": r, "tile_shown": ch in members}
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False, constrain="domain")
    if centroids and len(order):
        fig.add_annotation(x=(w - 1) / 2, y=0, yref="paper", xref="x", text="merged", showarrow=False,
                           yanchor="top", yshift=-2, font=dict(size=11))
        fig.add_annotation(x=(first * (w + gap) + (widest * (w + gap) - gap) / 2 - 0.5), y=0, yref="paper",
                           xref="x", text="members", showarrow=False, yanchor="top", yshift=-2, font=dict(size=11))
    mode_text = {"kernel": "kernels", "rgb": "RGB kernels", "energy": "kernel energy ‖w‖ over inputs",
                 "fan-in": "fan-in weights as images"}[mode]
    src = f" of {module}" if module else ""
    height = int(min(900, max(260, 90 + len(order) * 44)))
    which = (f"clusters {start + 1}–{start + len(order)} of {len(ranked)} by size" if len(order) < len(ranked)
             else f"all {len(ranked)} clusters by size")
    more = f"; at most {max_per_cluster} members per row" if int(counts.max()) > max_per_cluster else ""
    return _layout(fig, title=title or f"Filters{src} grouped by cluster",
                   subtitle=f"{mode_text}; leftmost tile = the merged filter; {which}{more}",
                   x=None, y="cluster (size)", height=height, figure="filter_grid", mode=mode, shown=shown,
                   clusters=int(len(order)), total_clusters=int(len(ranked)), start=start, group=group,
                   highlight=hl)


def input_image(img: np.ndarray, *, title: str = "input") -> go.Figure:
    """One input image: (H, W) grey (a heatmap, as the network sees it) or (H, W, 3) RGB (scaled to 0..255)."""
    a = np.asarray(img, dtype=float)
    if a.ndim == 3:
        lo, hi = float(a.min()), float(a.max())
        fig = go.Figure(go.Image(z=(a - lo) / max(hi - lo, 1e-12) * 255.0))
    else:
        fig = go.Figure(go.Heatmap(z=a.astype(np.float32), colorscale="Greys", showscale=False,
                                   hovertemplate="value %{z:.2f}<extra></extra>"))
        fig.update_yaxes(autorange="reversed", scaleanchor="x")
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False)
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False)
    return _layout(fig, title=title, height=260, figure="input_image")


def feature_map_grid(fm: Mapping, image: np.ndarray | None = None, *, start: int = 0, max_clusters: int = 6,
                     max_members: int = 8, title: str | None = None) -> go.Figure:
    """Feature maps of one input before and after folding, one row per cluster (largest first).

    ``fm`` is :func:`foldviz.explain.feature_maps`' result. Each row: the folded channel's map (leftmost, "after"),
    a gap, then up to ``max_members`` of the original members' maps ("before"). Every row shares one symmetric
    colour range (its largest |value|), so before and after compare directly; hover gives the raw values. Row
    labels give the correlation of the folded map with the members' mean map. ``image`` (H, W) or (H, W, 3)
    is drawn above the grid as the input.
    """
    before, after, cl = np.asarray(fm["before"]), np.asarray(fm["after"]), list(fm["clusters"])
    rows = cl[start:start + max_clusters]
    h, w = before.shape[1], before.shape[2]
    widest = max([min(max_members, len(r["members"])) for r in rows], default=1)
    gap = 1
    cols = 2 + widest
    H, W = max(1, len(rows) * (h + gap) - gap), cols * (w + gap) - gap
    z = np.full((H, W), np.nan)
    raw = np.full((H, W), np.nan)
    ch = np.full((H, W), -1, dtype=np.int32)
    for r, row in enumerate(rows):
        y0 = r * (h + gap)
        tiles = [(0, after[row["folded"]], -2)] + [((2 + j) * (w + gap), before[m], m)
                                                   for j, m in enumerate(row["members"][:max_members])]
        lim = max(float(np.abs(t).max()) for _x, t, _c in tiles) or 1.0
        for x0, t, c in tiles:
            z[y0:y0 + h, x0:x0 + w] = t / lim
            raw[y0:y0 + h, x0:x0 + w] = t
            ch[y0:y0 + h, x0:x0 + w] = c
    fig = go.Figure(go.Heatmap(
        z=z.astype(np.float32), customdata=np.stack([raw, ch], axis=-1).astype(np.float32), zmin=-1, zmax=1,
        colorscale="RdBu_r", hoverongaps=False, name="feature maps",
        colorbar=dict(title=dict(text="value / row max"), len=0.8),
        hovertemplate="value %{customdata[0]:.3f}<br>channel %{customdata[1]} (-2 = folded)<extra></extra>"))
    fig.update_yaxes(autorange="reversed", scaleanchor="x", constrain="domain", showgrid=False, zeroline=False,
                     tickmode="array", tickvals=[r * (h + gap) + (h - 1) / 2 for r in range(len(rows))],
                     ticktext=[f"cluster {row['cluster']} ({len(row['members'])} ch)"
                               + (f" · r={row['corr']:.2f}" if row["corr"] is not None else "") for row in rows])
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False, constrain="domain")
    if rows:
        fig.add_annotation(x=(w - 1) / 2, y=0, yref="paper", text="after (folded)", showarrow=False, yanchor="top",
                           yshift=-2, font=dict(size=11))
        fig.add_annotation(x=2 * (w + gap) + (widest * (w + gap) - gap) / 2 - 0.5, y=0, yref="paper",
                           text="before (the cluster's channels)", showarrow=False, yanchor="top", yshift=-2,
                           font=dict(size=11))
    which = (f"clusters {start + 1}–{start + len(rows)} of {len(cl)} by size" if len(rows) < len(cl)
             else f"all {len(cl)} clusters")
    return _layout(fig, title=title or f"Feature maps of {fm['module']}, before and after folding",
                   subtitle=f"one input; {which}; each row on its own colour scale", x=None, y=None,
                   height=int(min(900, max(280, 110 + len(rows) * 70))), figure="feature_map_grid",
                   module=fm["module"], rows=len(rows), clusters=len(cl), start=start)


def filter_gallery(weight: np.ndarray, *, module: str = "", columns: int = 8, max_filters: int = 64,
                   title: str | None = None) -> go.Figure:
    """All filters of a layer as small images in channel order (before any clustering).

    Same image rules as :func:`filter_images`; hover names the channel.
    """
    images, mode = filter_images(weight)
    n = min(images.shape[0], max_filters)
    rgb = images.ndim == 4
    h, w = images.shape[1], images.shape[2]
    gap = 1
    cols = max(1, min(columns, n))
    rows = int(math.ceil(n / cols))
    H, W = rows * (h + gap) - gap, cols * (w + gap) - gap
    canvas = np.full((H, W, 3) if rgb else (H, W), 1.0 if rgb else np.nan)
    ch_map = np.full((H, W), -1, dtype=int)
    for i in range(n):
        y0, x0 = (i // cols) * (h + gap), (i % cols) * (w + gap)
        canvas[y0:y0 + h, x0:x0 + w] = images[i]
        ch_map[y0:y0 + h, x0:x0 + w] = i
    if rgb:
        trace = go.Image(z=canvas * 255.0, customdata=ch_map[..., None],
                         hovertemplate="channel %{customdata[0]}<extra></extra>", name="filters")
    else:
        lim = float(np.nanmax(np.abs(canvas))) if np.isfinite(canvas).any() else 1.0
        signed = mode in ("kernel", "fan-in")
        trace = go.Heatmap(z=canvas, customdata=ch_map, zmin=-lim if signed else 0.0, zmax=lim,
                           colorscale="RdBu_r" if signed else "Viridis", hoverongaps=False, name="filters",
                           colorbar=dict(title=dict(text="weight" if signed else "‖w‖")),
                           hovertemplate="channel %{customdata}<br>value %{z:.3f}<extra></extra>")
    fig = go.Figure(trace)
    fig.update_yaxes(autorange="reversed", showticklabels=False, scaleanchor="x", constrain="domain",
                     showgrid=False, zeroline=False)
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False, constrain="domain")
    src = f" of {module}" if module else ""
    more = f" (first {n} of {images.shape[0]})" if images.shape[0] > n else ""
    return _layout(fig, title=title or f"The {images.shape[0]} filters{src}{more}",
                   x=f"filters in channel order, {cols} per row", y="", height=int(min(700, max(240, 60 + rows * 55))),
                   figure="filter_gallery", mode=mode, shown=n)


def cluster_size_histogram(labels_or_sizes: Sequence[int] | np.ndarray, *, from_labels: bool = True,
                           group: str = "", title: str | None = None, unit: str = "channel") -> go.Figure:
    """How many clusters have 1, 2, 3, ... members (singletons are channels kept as they are)."""
    arr = np.asarray(labels_or_sizes, dtype=int)
    sizes = np.unique(arr, return_counts=True)[1] if from_labels else arr
    sizes = sizes[sizes > 0]
    vals, cnt = np.unique(sizes, return_counts=True)
    fig = go.Figure(go.Bar(
        x=vals, y=cnt, name="clusters", marker_color="#4c78a8",
        hovertemplate="%{y} cluster(s) of size %{x}<extra></extra>",
    ))
    fig.update_xaxes(dtick=1 if len(vals) and vals.max() <= 20 else None)
    name = f" — {group}" if group else ""
    return _layout(fig, title=title or f"Cluster sizes{name}", x=f"cluster size ({unit}s merged)",
                   y="number of clusters", height=320, figure="cluster_size_histogram",
                   clusters=int(sizes.size))


def group_overview(rows: Sequence[Mapping], *, title: str | None = None) -> go.Figure:
    """Redundancy per group (model order).

    ``rows``: dicts with ``id``, ``channels``, ``mean_cos``, ``max_cos`` and optional ``unit``,
    ``score``, ``suggested_ratio`` / ``ratio``, ``foldable``.  Bars = mean cosine similarity (labelled with their
    value, and never thinner than a hairline, so a mean near 0 stays visible), diamonds = max, line = suggested
    fold ratio; unfoldable groups are grey.
    """
    if not rows:
        return empty_figure("No channel groups", title=title or "Channel groups")
    ids = [str(r["id"]) for r in rows]
    foldable = [bool(r.get("foldable", True)) for r in rows]
    mean = [float(r.get("mean_cos", np.nan)) for r in rows]
    mx = [float(r.get("max_cos", np.nan)) for r in rows]
    ch = [int(r.get("channels", 0)) for r in rows]
    units = {str(r.get("unit", "channel")) for r in rows if r.get("foldable", True)}
    unit = units.pop() + "s" if len(units) == 1 else "units"
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.06, row_heights=[0.6, 0.4],
                        specs=[[{}], [{"secondary_y": True}]])
    # a bar of height ~0 is invisible: draw at least a hairline (0.01 of the axis) and label the real value
    shown = [m if not np.isfinite(m) else (m if abs(m) >= 0.01 else (0.01 if m >= 0 else -0.01)) for m in mean]
    fig.add_trace(go.Bar(
        x=ids, y=shown, name="mean cosine similarity",
        marker_color=["#4c78a8" if f else "#c7c7c7" for f in foldable],
        text=[f"{m:.2f}" if np.isfinite(m) else "" for m in mean], textposition="outside", cliponaxis=False,
        textfont=dict(size=10),
        customdata=np.array([[c, "yes" if f else "no", m] for c, f, m in zip(ch, foldable, mean)], dtype=object),
        hovertemplate="%{x}<br>mean cos %{customdata[2]:.3f}<br>%{customdata[0]} " + unit
                      + " · foldable %{customdata[1]}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Scatter(x=ids, y=mx, mode="markers", name="max cosine similarity",
                             marker=dict(symbol="diamond", size=8, color="#f58518"),
                             hovertemplate="%{x}<br>max cos %{y:.3f}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Bar(x=ids, y=ch, name=unit, marker_color="rgba(120,120,120,0.35)",
                         hovertemplate="%{x}<br>%{y} " + unit + "<extra></extra>"), row=2, col=1, secondary_y=False)
    ratio_key = "suggested_ratio" if any("suggested_ratio" in r for r in rows) else "ratio"
    if any(ratio_key in r for r in rows):
        fig.add_trace(go.Scatter(
            x=ids, y=[100.0 * float(r.get(ratio_key, np.nan)) for r in rows], mode="lines+markers",
            name="suggested fold ratio" if ratio_key == "suggested_ratio" else "fold ratio",
            line=dict(color="#54a24b"), hovertemplate="%{x}<br>ratio %{y:.0f}%<extra></extra>"),
            row=2, col=1, secondary_y=True)
    lo = min([0.0] + [m for m in mean if np.isfinite(m)])
    fig.update_yaxes(title_text="cosine similarity", row=1, col=1, range=[min(0.0, lo - 0.08), 1.1])
    fig.update_yaxes(title_text=unit, row=2, col=1, secondary_y=False)
    fig.update_yaxes(title_text="ratio (%)", row=2, col=1, secondary_y=True, range=[0, 100], showgrid=False,
                     tickmode="linear", tick0=0, dtick=25)
    fig.update_xaxes(title_text="group (model order)", row=2, col=1, tickangle=-45)
    return _layout(fig, title=title or "Redundancy per group", height=520, figure="group_overview",
                   groups=len(rows), unit=unit)


def inertia_curve(points: Sequence[Sequence[float]] | Mapping[str, Sequence[Sequence[float]]], *,
                  current_ratio: float | None = None, normalize: bool = True,
                  title: str | None = None, unit: str = "channel") -> go.Figure:
    """Cluster inertia (k-means' objective) vs. fold ratio for one group (list of (ratio, k, inertia)) or several (dict).

    With ``normalize`` the inertia is divided by the group's total sum of squares at k=1 (the
    largest value), so curves of different groups are comparable: 0 = nothing lost, 1 = everything.
    """
    series = points if isinstance(points, Mapping) else {"": points}
    fig = go.Figure()
    for name, pts in series.items():
        arr = np.asarray([[float(p[0]), float(p[1]), float(p[2])] for p in pts], dtype=float)
        if arr.size == 0:
            continue
        arr = arr[np.argsort(arr[:, 0])]
        y = arr[:, 2]
        if normalize:
            y = y / max(float(np.max(y)), 1e-12)
        fig.add_trace(go.Scatter(
            x=100.0 * arr[:, 0], y=y, mode="lines+markers", name=name or "inertia",
            customdata=arr[:, 1:2].astype(int),
            hovertemplate="ratio %{x:.0f}% · k = %{customdata[0]}<br>inertia %{y:.3g}<extra></extra>"))
    if current_ratio is not None:
        # labelled inside the plot, low: a label at the top would run into the title
        fig.add_vline(x=100.0 * float(current_ratio), line=dict(color="#d62728", dash="dash"),
                      annotation_text="current", annotation_position="bottom right")
    return _layout(fig, title=title or "Cluster inertia vs. fold ratio",
                   x=f"fold ratio (% of {unit}s removed)",
                   y="inertia (fraction of max)" if normalize else "inertia (sum of squares)",
                   height=340, figure="inertia_curve")


# --------------------------------------------------------------------------------------
# Plan / results
# --------------------------------------------------------------------------------------

def channels_per_group(groups: Sequence[Mapping], *, title: str | None = None) -> go.Figure:
    """Units before and after folding per group (``id``, ``channels_before``, ``channels_after``, optional ``unit``).

    Groups of one unit ("channel") read "channels"; mixed units (a decoder's MLP neurons and query heads) are named
    on the axis, and a log axis keeps 8 heads visible beside 512 neurons.
    """
    if not groups:
        return empty_figure("No groups", title=title or "Units per group")
    ids = [str(g["id"]) for g in groups]
    before = [int(g["channels_before"]) for g in groups]
    after = [int(g["channels_after"]) for g in groups]
    units = sorted({str(g.get("unit") or "channel") for g in groups})
    word = "channels" if units == ["channel"] else " / ".join(f"{u}s" for u in units)
    fig = go.Figure([
        go.Bar(x=ids, y=before, name="before", marker_color="#c7c7c7",
               hovertemplate="%{x}<br>%{y} before<extra></extra>"),
        go.Bar(x=ids, y=after, name="after", marker_color="#4c78a8",
               hovertemplate="%{x}<br>%{y} after<extra></extra>"),
    ])
    fig.update_layout(barmode="group")
    fig.update_xaxes(tickangle=-45)
    if max(before) > 20 * max(1, min(before)):
        fig.update_yaxes(type="log")
    return _layout(fig, title=title or f"{word.capitalize()} per group: before vs. after",
                   x="group (model order)", y=word + (" (log scale)" if max(before) > 20 * max(1, min(before)) else ""),
                   height=380, figure="channels_per_group")


_METRIC_UNITS = {  # key: (panel title, y-axis unit, scale)
    "params": ("Parameters", "millions", 1e-6),
    "flops": ("FLOPs / image", "millions", 1e-6),
    "size": ("Size", "MB", 1e-6),
    "size_bytes": ("Size", "MB", 1e-6),
    "latency_ms": ("Latency", "ms", 1.0),
    "latency": ("Latency", "ms", 1.0),
    "accuracy": ("Accuracy", "%", 100.0),
}


def before_after_bars(before: Mapping[str, float], after: Mapping[str, float], *,
                      metrics: Sequence[str] | None = None, title: str | None = None,
                      labels: Mapping[str, str] | None = None) -> go.Figure:
    """One small panel per metric with a "before" and an "after" bar, each in its own units.

    Known metric keys: params, flops, size_bytes, latency_ms, accuracy (fraction 0-1, shown in %).
    Unknown keys are plotted as-is. ``labels`` renames panels (a language model's FLOPs are per token).
    """
    keys = [m for m in (metrics or list(before)) if m in before and m in after]
    if not keys:
        return empty_figure("No metrics to compare", title=title or "Before vs. after")
    names = {k: (labels or {}).get(k, _METRIC_UNITS.get(k, (k, k, 1.0))[0]) for k in keys}
    fig = make_subplots(rows=1, cols=len(keys),
                        subplot_titles=[names[k] for k in keys],
                        horizontal_spacing=0.09)
    for i, k in enumerate(keys, start=1):
        name, unit, scale = _METRIC_UNITS.get(k, (k, k, 1.0))
        b, a = float(before[k]) * scale, float(after[k]) * scale
        change = (a / b - 1.0) * 100.0 if b else float("nan")
        fig.add_trace(go.Bar(
            x=["before", "after"], y=[b, a], marker_color=["#c7c7c7", "#4c78a8"], name=name,
            text=[f"{b:.3g}", f"{a:.3g}"], textposition="outside", showlegend=False,
            hovertemplate=f"{name}: %{{y:.4g}} {unit}<extra></extra>", cliponaxis=False), row=1, col=i)
        fig.update_yaxes(title_text=unit, row=1, col=i, rangemode="tozero",
                         range=[0, max(a, b) * 1.2 if max(a, b) > 0 else 1])
        fig.update_xaxes(title_text=f"{change:+.1f}%" if math.isfinite(change) else "", row=1, col=i)
    return _layout(fig, title=title or "Before vs. after folding", height=340, figure="before_after_bars",
                   metrics=list(keys))


def log_ticks(lo: float, hi: float, at_least: int = 3) -> list[float]:
    """Readable tick values for a log axis covering [lo, hi]: 1-2-5 per decade, or a finer 1-1.2-1.5-2-3-5-7
    series when the range is narrow, so at least ``at_least`` ticks are shown."""
    lo, hi = float(min(lo, hi)), float(max(lo, hi))
    for mantissas in ((1, 2, 5), (1, 1.5, 2, 3, 5, 7), (1, 1.1, 1.2, 1.3, 1.5, 1.7, 2, 2.5, 3, 4, 5, 6, 7, 8, 9)):
        ticks = [round(m * 10.0 ** e, 12) for e in range(int(math.floor(math.log10(lo))) - 1,
                                                         int(math.ceil(math.log10(hi))) + 1)
                 for m in mantissas if lo / 1.25 <= m * 10.0 ** e <= hi * 1.25]
        if len(ticks) >= at_least:
            return ticks
    return ticks


def variance_ratio_plot(series: Mapping[str, Sequence[Mapping]], *, log_y: bool = True,
                        title: str | None = None, x_label: str | None = None) -> go.Figure:
    """Per-layer activation variance ratio Var(folded)/Var(original), one trace per method.

    ``series`` maps a method key ("none", "r", "ar", "dir", ...) to the engine's
    ``variance_ratios`` rows (``layer``, ``ratio``).  A dashed line marks the ideal ratio 1:
    below = variance collapse, above = explosion.  Layers keep the order of first appearance.
    """
    layers: list[str] = []
    for rows in series.values():
        for r in rows:
            if str(r["layer"]) not in layers:
                layers.append(str(r["layer"]))
    fig = go.Figure()
    for method, rows in series.items():
        d = {str(r["layer"]): float(r["ratio"]) for r in rows}
        xs = [lay for lay in layers if lay in d]
        ys = [d[lay] for lay in xs]
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="lines+markers", name=method_label(method),
            line=_style(method),
            hovertemplate=f"{method_label(method)}<br>%{{x}}<br>Var ratio %{{y:.3g}}<extra></extra>"))
    if layers:
        fig.add_trace(go.Scatter(x=[layers[0], layers[-1]], y=[1.0, 1.0], mode="lines",
                                 name="ideal (ratio = 1)", line=dict(color="black", dash="dash", width=1.5),
                                 hoverinfo="skip"))
    fig.update_xaxes(type="category", tickangle=-45, categoryorder="array", categoryarray=layers)
    if log_y:
        vals = [float(r["ratio"]) for rows in series.values() for r in rows if float(r["ratio"]) > 0] + [1.0]
        ticks = log_ticks(min(vals), max(vals))
        pad = 1.25
        fig.update_yaxes(type="log", tickvals=ticks, ticktext=[f"{t:g}" for t in ticks],
                         range=[math.log10(min(min(vals), ticks[0]) / pad), math.log10(max(max(vals), ticks[-1]) * pad)])
    fig.add_annotation(text="explosion ↑", xref="paper", yref="paper", x=1.0, y=1.0, showarrow=False,
                       xanchor="right", yanchor="top", font=dict(size=11, color="#888"))
    fig.add_annotation(text="collapse ↓", xref="paper", yref="paper", x=1.0, y=0.0, showarrow=False,
                       xanchor="right", yanchor="bottom", font=dict(size=11, color="#888"))
    return _layout(fig, title=title or "Activation variance after folding, per layer",
                   x=x_label or "layer (model order)",
                   y="Var(folded) / Var(original)" + (" (log scale)" if log_y else ""),
                   height=440, figure="variance_ratio_plot", methods=list(series))


def sweep_plot(rows: Sequence[Mapping], *, methods: Sequence[str] | None = None, metric: str = "accuracy",
               baseline: float | None = None, title: str | None = None,
               user_point: Mapping | None = None) -> go.Figure:
    """The metric vs. parameter sparsity, one trace per method (the paper's main figure).

    ``rows``: the engine's sweep rows (``method``, ``ratio``, ``seed``, ``param_sparsity`` as a fraction and the
    ``metric`` column: ``"accuracy"`` (a fraction, drawn in %) or ``"perplexity"`` (drawn on a log axis)). Several
    seeds are averaged with min-max error bars. A row with method ``"original"`` is the unfolded model: it becomes
    a reference line across the plot (drawn as data, valid on a log axis), not a trace. ``user_point``
    (``param_sparsity``, the metric, optional ``label``) marks the user's own plan as a star ("your plan").
    """
    acc = metric == "accuracy"
    scale = 100.0 if acc else 1.0
    by: dict[str, dict[float, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get(metric) in (None, ""):
            continue
        if str(r["method"]) == "original":  # the engine's unfolded reference row
            if baseline is None:
                baseline = float(r[metric])
            continue
        by[str(r["method"])][float(r["ratio"])].append((float(r["param_sparsity"]), float(r[metric])))
    order = list(methods) if methods else list(by)
    fig = go.Figure()
    unit = "%" if acc else ""
    for m in order:
        if m not in by:
            continue
        pts = []
        for ratio, vals in by[m].items():
            sp = np.mean([v[0] for v in vals])
            val = np.array([v[1] for v in vals])
            pts.append((sp, val.mean(), val.max() - val.mean(), val.mean() - val.min(), ratio, len(val)))
        pts.sort()
        p = np.array(pts, dtype=float)
        err = dict(type="data", array=scale * p[:, 2], arrayminus=scale * p[:, 3], visible=True) \
            if np.any(p[:, 5] > 1) else None
        fig.add_trace(go.Scatter(
            x=100 * p[:, 0], y=scale * p[:, 1], mode="lines+markers", name=method_label(m), error_y=err,
            line=_style(m),
            customdata=np.stack([100 * p[:, 4], p[:, 5]], axis=1),
            hovertemplate=f"{method_label(m)}<br>sparsity %{{x:.1f}}%<br>{metric} %{{y:.{1 if acc else 2}f}}{unit}"
                          "<br>per-group ratio %{customdata[0]:.0f}% · %{customdata[1]} seed(s)<extra></extra>"))
    if baseline is not None:   # a data trace, not a shape: correct on linear and log axes alike
        fig.add_trace(go.Scatter(x=[0, 100], y=[scale * float(baseline)] * 2, mode="lines", name="unfolded",
                                 line=dict(color="#444", dash="dot", width=1.5),
                                 hovertemplate=f"unfolded: {metric} %{{y:.{1 if acc else 2}f}}{unit}<extra></extra>"))
    if user_point is not None and user_point.get(metric) is not None:
        lab = str(user_point.get("label") or "your plan")
        fig.add_trace(go.Scatter(
            x=[100 * float(user_point["param_sparsity"])], y=[scale * float(user_point[metric])],
            mode="markers+text", name="your plan", text=[lab], textposition="top center",
            marker=dict(symbol="star", size=18, color="#e45756", line=dict(width=1, color="black")),
            hovertemplate=f"{lab}<br>sparsity %{{x:.1f}}%<br>{metric} %{{y:.2f}}{unit}<extra></extra>"))
    fig.update_xaxes(range=[0, 100])
    if acc:
        fig.update_yaxes(rangemode="tozero")
        ylab = "accuracy (%)"
    else:
        fig.update_yaxes(type="log", dtick="D1")   # readable ticks (1, 2, 5 per decade) on the log axis
        ylab = "perplexity (log scale; lower is better)"
    return _layout(fig, title=title or f"{metric.capitalize()} vs. parameter sparsity",
                   x="parameter sparsity (% of parameters removed)", y=ylab, height=440,
                   figure="sweep_plot", methods=[m for m in order if m in by], metric=metric)


def sensitivity_plot(rows: Sequence[Mapping], base: float, *, title: str | None = None) -> go.Figure:
    """Perplexity with one decoder layer folded at a time, one bar per layer, and the unfolded perplexity ``base``
    as a dashed reference line (a data trace spanning the bars).

    ``rows``: :func:`foldviz.lm.sensitivity.layer_sensitivity` rows (``layer``, ``perplexity``, ``delta``,
    ``relative``). The most sensitive layers are the tallest bars: a plan can spare them.
    """
    xs = [f"layer {r['layer']}" for r in rows]
    ys = [float(r["perplexity"]) for r in rows]
    rel = [float(r.get("relative", y / base if base else float("nan"))) for r, y in zip(rows, ys)]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=xs, y=ys, name="only this layer folded", marker_color=CLUSTER_COLORS[0],
                         customdata=np.array([[y - float(base), q] for y, q in zip(ys, rel)]).reshape(-1, 2),
                         hovertemplate="%{x}<br>perplexity %{y:.2f}<br>%{customdata[0]:+.2f} vs. unfolded "
                                       "(×%{customdata[1]:.3f})<extra></extra>"))
    if xs:
        fig.add_trace(go.Scatter(x=[xs[0], xs[-1]], y=[float(base)] * 2, mode="lines", name="unfolded",
                                 line=dict(color="#444", dash="dash", width=1.5),
                                 hovertemplate=f"unfolded: perplexity {float(base):.2f}<extra></extra>"))
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=xs)
    lo = min(ys + [float(base)]) if ys else float(base)
    hi = max(ys + [float(base)]) if ys else float(base)
    pad = 0.1 * (hi - lo) or 0.05 * hi or 1.0
    # the bars start near the unfolded value, not at 0: the differences between layers are what matters
    fig.update_yaxes(range=[max(0.0, lo - pad), hi + pad])
    return _layout(fig, title=title or "Per-layer sensitivity: perplexity with one layer folded",
                   x="decoder layer (the only one folded)", y="perplexity (lower is better)", height=420,
                   figure="sensitivity_plot", base=float(base), layers=len(xs))


def lm_head_layout(n_layers: int, n_heads: int, n_kv: int, kept: Sequence[int] | None = None, *,
                   title: str | None = None) -> go.Figure:
    """Query heads of every decoder layer as a grid (rows: layers, columns: heads), coloured by the KV group
    (key/value head) they read; ``kept`` (per layer, heads kept per KV group after a plan) greys out the rest."""
    per = max(1, n_heads // max(1, n_kv))
    z = np.tile(np.arange(n_heads) // per, (n_layers, 1)).astype(float)
    text = [[f"q{h}→kv{h // per}" for h in range(n_heads)] for _ in range(n_layers)]
    if kept is not None:
        for i, k in enumerate(kept):
            for h in range(n_heads):
                if h % per >= k:
                    z[i, h] = np.nan
    colors = [CLUSTER_COLORS[i % len(CLUSTER_COLORS)] for i in range(max(1, n_kv))]
    scale = [[i / max(1, n_kv - 1), c] for i, c in enumerate(colors)] if n_kv > 1 else [[0, colors[0]], [1, colors[0]]]
    fig = go.Figure(go.Heatmap(z=z, text=text, texttemplate="%{text}" if n_heads <= 16 else None, colorscale=scale,
                               zmin=0, zmax=max(1, n_kv - 1), showscale=False, xgap=2, ygap=2, hoverongaps=False,
                               hovertemplate="layer %{y} · query head %{x}<br>%{text}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", tickmode="array", tickvals=list(range(n_layers)),
                     ticktext=[f"layer {i}" for i in range(n_layers)])
    fig.update_xaxes(tickmode="array", tickvals=list(range(n_heads)), ticktext=[str(h) for h in range(n_heads)])
    return _layout(fig, title=title or f"Query heads per layer, coloured by KV group ({n_kv} KV heads, {per} query "
                   "heads each)", x="query head", y=None, height=int(min(700, 140 + 34 * n_layers)),
                   figure="lm_head_layout", layers=n_layers, heads=n_heads, kv=n_kv)


def plan_preview_bars(groups: Sequence[Mapping], *, title: str | None = None) -> go.Figure:
    """Per-group fold ratio of a plan (``id``, ``ratio``, ``channels_before``, ``channels_after``, ``skip``)."""
    if not groups:
        return empty_figure("No groups", title=title or "Plan")
    ids = [str(g["id"]) for g in groups]
    ratio = [100.0 * float(g.get("ratio", 0.0)) for g in groups]
    colors = ["#c7c7c7" if g.get("skip") or not g.get("foldable", True) else "#4c78a8" for g in groups]
    text = [f"{int(g.get('channels_before', 0))}→{int(g.get('channels_after', 0))}" for g in groups]
    fig = go.Figure(go.Bar(x=ids, y=ratio, marker_color=colors, text=text, textposition="outside",
                           name="fold ratio",
                           hovertemplate="%{x}<br>ratio %{y:.0f}%<br>channels %{text}<extra></extra>"))
    fig.update_xaxes(tickangle=-45)
    fig.update_yaxes(range=[0, 110])
    return _layout(fig, title=title or "Fold ratio per group (channels before→after)",
                   x="channel group (model order)", y="fold ratio (% of channels removed)", height=360,
                   figure="plan_preview_bars")


# --------------------------------------------------------------------------------------
# Learn page helpers
# --------------------------------------------------------------------------------------

def matrix_heatmap(mat: np.ndarray, *, title: str, x: str, y: str, zlabel: str = "weight",
                   row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
                   symmetric: bool = True, height: int = 320) -> go.Figure:
    """A plain annotated heatmap of a (small) matrix, e.g. the next layer's weight columns."""
    m = np.asarray(mat, dtype=float)
    if m.ndim == 1:
        m = m[None, :]
    lim = float(np.nanmax(np.abs(m))) if m.size and np.isfinite(m).any() else 1.0
    fig = go.Figure(go.Heatmap(
        z=m, x=list(col_labels) if col_labels is not None else None,
        y=list(row_labels) if row_labels is not None else None,
        zmin=-lim if symmetric else None, zmax=lim if symmetric else None,
        colorscale="RdBu_r" if symmetric else "Viridis", colorbar=dict(title=dict(text=zlabel)),
        hovertemplate="%{y} · %{x}<br>%{z:.3f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, title=title, x=x, y=y, height=height, figure="matrix_heatmap")


def merged_variance_curve(max_size: int = 8, correlations: Iterable[float] = (0.0, 0.25, 0.5, 0.9, 1.0), *,
                          measured: Sequence[Mapping] | None = None, title: str | None = None) -> go.Figure:
    """Why averaging collapses variance: Var(mean of N channels) / Var(one channel) = (1 + (N-1)ρ) / N.

    One curve per correlation ρ (unit-variance channels with equal pairwise correlation).
    ``measured``: optional points (``size``, ``ratio``) from a real layer.
    """
    ns = np.arange(1, max(2, int(max_size)) + 1)
    fig = go.Figure()
    for rho in correlations:
        y = (1.0 + (ns - 1) * float(rho)) / ns
        fig.add_trace(go.Scatter(x=ns, y=y, mode="lines+markers", name=f"ρ = {rho:g}",
                                 hovertemplate=f"ρ={rho:g}<br>N=%{{x}} → variance × %{{y:.3f}}<extra></extra>"))
    if measured:
        fig.add_trace(go.Scatter(x=[float(p["size"]) for p in measured], y=[float(p["ratio"]) for p in measured],
                                 mode="markers", name="measured clusters",
                                 marker=dict(symbol="x", size=10, color="black"),
                                 hovertemplate="cluster of %{x}: variance × %{y:.3f}<extra></extra>"))
    fig.update_xaxes(dtick=1)
    fig.update_yaxes(range=[0, 1.1])
    return _layout(fig, title=title or "Averaging N channels shrinks the variance (unless they are identical)",
                   x="channels merged into one (N)", y="variance of the merged channel (× one channel)",
                   height=360, figure="merged_variance_curve")


# --------------------------------------------------------------------------------------
# reading figures back (tests, exports)
# --------------------------------------------------------------------------------------

def decode_array(value):
    """Decode a plotly JSON array value: plain lists pass through, typed arrays
    (``{"dtype": "f8", "bdata": "...", "shape": "3, 4"}``, plotly >= 6) become numpy arrays."""
    import base64

    if isinstance(value, Mapping) and "bdata" in value:
        arr = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        shape = value.get("shape")
        if shape:
            arr = arr.reshape([int(s) for s in str(shape).split(",")])
        return arr
    if isinstance(value, list):
        return [decode_array(v) if isinstance(v, Mapping) else v for v in value] \
            if any(isinstance(v, Mapping) for v in value) else value
    return value
