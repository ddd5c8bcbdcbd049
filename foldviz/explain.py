"""What the Layer explorer and the Learn page compute to explain a fold, for one group and its clusters.

Every function takes the base model, a :class:`~foldviz.groups.ChannelGroup` and cluster ``labels`` produced by
:func:`foldviz.fold.cluster_group` (the clusters the fold merges), and returns plain numbers and arrays.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .groups import BN_TYPES, ChannelGroup


def _member_order(group: ChannelGroup, module: str, side: str) -> np.ndarray | None:
    """``module``'s own indices for the group's channels 0..n-1 (None when the mapping is not one-to-one)."""
    mem = next((m for m in group.members if m.module == module and m.side == side), None)
    if mem is None or len(mem.idxs) != group.channels:
        return None
    return np.asarray(mem.idxs)[np.argsort(np.asarray(mem.root_idxs), kind="stable")]


def producer_weight(model: nn.Module, group: ChannelGroup) -> tuple[str, np.ndarray] | None:
    """(module name, weight) of the producer whose filters are drawn: the group's first conv, else its first
    linear producer; rows ordered by group channel."""
    modules = dict(model.named_modules())
    names = ([group.first_conv] if group.first_conv else []) + [
        p for p in group.producers if isinstance(modules.get(p), (nn.Conv2d, nn.Linear))]
    for name in names:
        idx = _member_order(group, name, "out")
        if idx is not None:
            return name, modules[name].weight.detach().cpu().numpy()[idx]
    return None


def neighbours(sim: np.ndarray, channel: int, k: int = 5) -> list[dict]:
    """The ``k`` channels most similar (cosine) to ``channel``."""
    if not 0 <= channel < len(sim):
        raise ValueError(f"channel {channel} does not exist in this group (0..{len(sim) - 1})")
    row = sim[channel].copy()
    row[channel] = -np.inf
    return [{"channel": int(i), "cosine": float(sim[channel, i])} for i in np.argsort(-row)[:k]]


@torch.no_grad()
def selection_stats(labels: np.ndarray, sim: np.ndarray, channels) -> dict:
    """Cluster statistics of a selected set of channels (e.g. lassoed in the embedding).

    ``labels`` (n,) the fold's clusters, ``sim`` (n, n) cosine similarity, ``channels`` the selected ids.
    Returns the selection size, the clusters it touches with how many selected / total members each (largest
    share first), the mean pairwise cosine inside the selection and over the whole group, and the fraction of
    selected pairs that share a cluster (1.0: the selection merges only among itself).
    """
    lab = np.asarray(labels)
    n = len(lab)
    sel = np.unique(np.asarray(list(channels), dtype=np.int64))
    if sel.size == 0:
        raise ValueError("select at least one channel")
    if sel.min() < 0 or sel.max() >= n:
        raise ValueError(f"selected channels must be between 0 and {n - 1}")
    ids, cnt = np.unique(lab[sel], return_counts=True)
    total = np.bincount(lab, minlength=int(lab.max()) + 1)
    order = np.lexsort((ids, -cnt))
    clusters = [{"cluster": int(ids[i]), "selected": int(cnt[i]), "size": int(total[ids[i]])} for i in order]
    off = ~np.eye(n, dtype=bool)
    sub = sim[np.ix_(sel, sel)]
    pairs = sel.size * (sel.size - 1)
    same = int((lab[sel][:, None] == lab[sel][None, :]).sum() - sel.size)
    return {"channels": int(sel.size), "clusters": clusters, "n_clusters": len(clusters),
            "mean_cos_selection": float(sub[~np.eye(sel.size, dtype=bool)].mean()) if pairs else None,
            "mean_cos_group": float(sim[off].mean()) if n > 1 else None,
            "same_cluster_pairs": same / pairs if pairs else None}


def activations(model: nn.Module, module_name: str, inputs: torch.Tensor) -> torch.Tensor:
    """Output of ``module_name`` on ``inputs`` as (samples x positions, channels)."""
    store = {}
    h = model.get_submodule(module_name).register_forward_hook(lambda _m, _i, o: store.__setitem__("out", o.detach()))
    try:
        model(inputs)
    finally:
        h.remove()
    a = store["out"]
    if a.dim() == 4:
        a = a.permute(0, 2, 3, 1)
    return a.reshape(-1, a.shape[-1])


def map_module(model: nn.Module, group: ChannelGroup) -> str | None:
    """The module whose output shows ``group``'s channels as feature maps: its first BatchNorm producer (the
    normalised maps the next layer reads, before the activation), else its first conv/linear producer; only
    modules that hold every group channel once."""
    modules = dict(model.named_modules())
    cands = [p for p in group.producers if isinstance(modules.get(p), BN_TYPES)] + \
            [p for p in group.producers if isinstance(modules.get(p), (nn.Conv2d, nn.Linear))]
    return next((p for p in cands if _member_order(group, p, "out") is not None), None)


@torch.no_grad()
def feature_maps(original: nn.Module, folded: nn.Module, group: ChannelGroup, labels: np.ndarray,
                 channel_map: np.ndarray, image: torch.Tensor, module: str | None = None) -> dict:
    """One input's feature maps of ``group`` before and after a fold, cluster by cluster.

    ``image`` (1, C, H, W) or (1, D); ``labels`` (n,) the fold's clusters of the group's channels;
    ``channel_map`` the fold's map of ``module``'s output channels (old index -> new index, -1 removed; a
    :class:`~foldviz.surgery.FoldResult`'s ``channel_maps[module]``). Returns ``{"module", "before" (n, h, w),
    "after" (n_after, h, w), "clusters"}`` with, per cluster (largest first), its members, the folded channel
    and how faithful the folded map is: Pearson correlation with the mean of the members' maps, and the ratio
    of its variance (over positions) to the members' mean variance. Linear layers give 1 x 1 "maps".
    """
    module = module or map_module(original, group)
    if module is None:
        raise ValueError(f"group {group.id} has no producer whose output holds each channel once")
    idx = _member_order(group, module, "out")           # group channel i -> module's own output index

    def run(model):
        store = {}
        h = model.get_submodule(module).register_forward_hook(lambda _m, _i, o: store.__setitem__("o", o.detach()))
        try:
            model.eval()(image.to(next(model.parameters()).device))
        finally:
            h.remove()
        o = store["o"][0].float().cpu()
        return (o if o.dim() == 3 else o.reshape(-1, 1, 1)).numpy()   # (channels, h, w)

    before_all, after_all = run(original), run(folded)
    before = before_all[idx]                              # (n, h, w) in group-channel order
    new = np.asarray(channel_map)[idx]                    # (n,) folded index of each group channel
    lab = np.asarray(labels)
    ids, counts = np.unique(lab, return_counts=True)
    clusters = []
    for c in ids[np.lexsort((ids, -counts))]:
        members = np.flatnonzero(lab == c)
        j = int(new[members[0]])
        ref, out = before[members].mean(axis=0).ravel(), after_all[j].ravel()
        corr = None
        if ref.size > 1 and ref.std() > 1e-12 and out.std() > 1e-12:
            corr = float(np.corrcoef(ref, out)[0, 1])
        var_b = float(before[members].reshape(len(members), -1).var(axis=1).mean())
        clusters.append({"cluster": int(c), "members": members.tolist(), "folded": j, "corr": corr,
                         "var_ratio": float(out.var() / var_b) if var_b > 1e-12 else None})
    return {"module": module, "before": before, "after": after_all, "clusters": clusters}


def mean_pairwise_cos(x: np.ndarray) -> float:
    """Mean cosine over ordered pairs i != j of the rows of ``x`` (1 for a single row)."""
    if len(x) < 2:
        return 1.0
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    s = xn @ xn.T
    return float((s.sum() - np.trace(s)) / (len(x) * (len(x) - 1)))


def cluster_variance(model: nn.Module, group: ChannelGroup, labels: np.ndarray, inputs: torch.Tensor,
                     features: np.ndarray) -> list[dict]:
    """Per cluster: Var(mean of the members' activations) / mean Var(member), at the group's normalised producer
    output (its first BatchNorm, else its first conv/linear): the variance collapse a plain merge causes."""
    modules = dict(model.named_modules())
    where = next((p for p in group.producers if isinstance(modules.get(p), BN_TYPES)), None) or next(
        p for p in group.producers if isinstance(modules.get(p), (nn.Conv2d, nn.Linear)))
    a = activations(model, where, inputs).double()
    idx = _member_order(group, where, "out")
    if idx is not None:
        a = a[:, torch.as_tensor(idx)]
    var = a.var(0)
    out = []
    for c in range(int(labels.max()) + 1):
        members = torch.as_tensor(np.flatnonzero(labels == c))
        merged = a[:, members].mean(1).var()
        out.append({"cluster": c, "size": int(len(members)),
                    "ratio": float(merged / var[members].mean().clamp_min(1e-12)),
                    "mean_cos": mean_pairwise_cos(features[members.numpy()])})
    return out


def _consumer(model: nn.Module, group: ChannelGroup):
    """First conv/linear consumer whose input channels map one-to-one onto the group (or None)."""
    modules = dict(model.named_modules())
    for mem in group.members:
        mod = modules.get(mem.module)
        if mem.side == "in" and isinstance(mod, (nn.Conv2d, nn.Linear)) and getattr(mod, "groups", 1) == 1:
            idx = _member_order(group, mem.module, "in")
            if idx is not None:
                return mem.module, mod, idx
    return None


def consumer_columns(model: nn.Module, group: ChannelGroup, labels: np.ndarray, max_rows: int = 24) -> dict | None:
    """The next layer's weights seen from the group: (out, n) before and (out, k) after folding (columns of a
    cluster summed). Conv kernels are summed over their spatial taps (the response to a constant patch)."""
    found = _consumer(model, group)
    if found is None:
        return None
    name, mod, idx = found
    w = mod.weight.detach().double()
    w = w.sum(dim=(2, 3)) if w.dim() == 4 else w
    cols = w[:, torch.as_tensor(idx)].numpy()[:max_rows]
    k = int(labels.max()) + 1
    merged = np.stack([cols[:, labels == c].sum(1) for c in range(k)], axis=1)
    return {"module": name, "before": cols, "after": merged, "rows": int(w.shape[0]),
            "kernel": list(mod.weight.shape[2:]) if mod.weight.dim() == 4 else []}


@torch.no_grad()
def merge_error(model: nn.Module, group: ChannelGroup, labels: np.ndarray, inputs: torch.Tensor,
                seed: int = 0) -> dict | None:
    """Relative change of the next layer's output when each channel it reads is replaced by its cluster mean
    (what the merged channel feeds it), for these clusters and for random clusters of the same sizes."""
    found = _consumer(model, group)
    if found is None:
        return None
    name, mod, idx = found
    store = {}
    h = mod.register_forward_pre_hook(lambda _m, a: store.__setitem__("x", a[0].detach()))
    try:
        model(inputs)
    finally:
        h.remove()
    x, idx_t = store["x"], torch.as_tensor(idx)

    def replaced(lab: np.ndarray) -> torch.Tensor:
        xg, out = x[:, idx_t], x.clone()            # xg: (batch, n, ...)
        k, lab_t = int(lab.max()) + 1, torch.as_tensor(lab)
        sums = torch.zeros((xg.shape[0], k) + tuple(xg.shape[2:]), dtype=xg.dtype).index_add_(1, lab_t, xg)
        means = sums / torch.bincount(lab_t, minlength=k).to(xg.dtype).view(1, k, *([1] * (xg.dim() - 2)))
        out[:, idx_t] = means[:, lab_t]
        return out

    y = mod(x)
    err = float((mod(replaced(labels)) - y).norm() / y.norm().clamp_min(1e-12))
    shuffled = np.random.default_rng(seed).permutation(labels)
    rerr = float((mod(replaced(shuffled)) - y).norm() / y.norm().clamp_min(1e-12))
    return {"consumer": name, "error": err, "random_error": rerr}
