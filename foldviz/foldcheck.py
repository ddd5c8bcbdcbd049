"""Checks that a fold is exact where it must be, for any architecture the dependency graph handles.

:func:`duplicate_channel_check` builds a copy of a model in which, in every foldable group, each channel beyond
the first ``k`` is an exact duplicate of channel ``c mod k`` on the producing side (conv/linear rows, biases,
BatchNorm parameters and statistics, depthwise rows, gates such as squeeze-excitation expansions). Merging those
clusters (mean of identical rows, sum of consumer columns) must then leave the function unchanged up to rounding.
A group whose channels do not map one-to-one through the layers between producer and consumer (a wrongly traced
group) breaks this identity, so the check catches groups that would be folded wrongly.

Freshly initialised networks often hold constant parameters (zero classifier heads, layer scales of 1e-6,
BatchNorm gammas of 1) that would hide a wrong merge; the check first redraws every constant parameter of its
copy (:func:`redraw_constants`), so every branch contributes to the output it compares.
"""
from __future__ import annotations

import copy
from collections import defaultdict

import numpy as np
import torch
from torch import nn

from .kmeans import k_for_ratio
from .plans import FoldPlan
from .surgery import Decision, compress, merge_decision, trace

__all__ = ["duplicate_channel_check", "duplicate_labels", "redraw_constants"]

_OUT_TENSORS = ("weight", "bias", "running_mean", "running_var")


@torch.no_grad()
def redraw_constants(model: nn.Module, seed: int = 0) -> int:
    """Redraw every constant floating parameter, in place: vectors (scales, biases, gammas) uniformly in
    [0.5, 1.5], matrices and kernels (zero-initialised heads) uniformly in +-1/sqrt(fan-in), so outputs stay O(1).
    Returns how many parameters were redrawn."""
    g = torch.Generator().manual_seed(int(seed))
    n = 0
    for p in model.parameters():
        if p.is_floating_point() and p.numel() > 1 and bool((p == p.flatten()[0]).all()):
            u = torch.rand(p.shape, generator=g, dtype=p.dtype)
            p.copy_(u + 0.5 if p.dim() < 2 else (2 * u - 1) / (p[0].numel() ** 0.5))
            n += 1
    return n


def duplicate_labels(n: int, k: int) -> np.ndarray:
    """Cluster labels that pair channel ``c`` with channel ``c mod k``: shape ``(n,)``, values in ``[0, k)``."""
    return np.arange(int(n)) % int(k)


@torch.no_grad()
def _duplicate_group(model: nn.Module, dg, group_id: str, n: int, labels: np.ndarray) -> None:
    """In place: every producing-side tensor of channel ``c`` becomes a copy of channel ``labels[c]``'s."""
    from .groups import root_handler

    names = {m: nm for nm, m in model.named_modules() if nm}
    root = model.get_submodule(group_id)
    group = dg.get_pruning_group(root, root_handler(dg, root), list(range(n)))
    for item in group:
        mod = item.dep.target.module
        if not isinstance(mod, nn.Module) or mod not in names or not dg.is_out_channel_pruning_fn(item.dep.handler):
            continue
        by_root: dict[int, list[int]] = defaultdict(list)
        for i, r in zip(item.idxs, item.root_idxs):
            by_root[r].append(i)
        for r, idxs in by_root.items():
            rep = by_root[int(labels[r])]
            if rep is idxs:
                continue
            for name in _OUT_TENSORS:
                t = getattr(mod, name, None)
                if isinstance(t, torch.Tensor):
                    t.data[idxs] = t.data[rep]


def duplicate_channel_check(model: nn.Module, example_input: torch.Tensor, *, ratio: float = 0.5,
                            seed: int = 0, repair: str = "none", repair_settings: dict | None = None,
                            num_classes: int | None = None) -> dict:
    """Fold a duplicated-channel copy of ``model`` at ``ratio`` and compare it with that copy.

    Parameters
    ----------
    model : nn.Module
        Any model foldviz can trace; it is not modified.
    example_input : torch.Tensor
        Input batch, shape ``(B, *input_shape)``; the comparison runs on it.
    ratio : float
        Fraction of channels removed in every foldable group (``k = k_for_ratio(n, ratio)`` clusters).
    seed : int
        Seed of the redrawn constant parameters and of the plan (the clusters are fixed by
        :func:`duplicate_labels`).
    repair : str
        Repair run after the merge (a key of :data:`foldviz.repair.REPAIRS`). An exact merge leaves nothing to
        repair, so a repair that changes the function here is wrong for the architecture.
    repair_settings : dict, optional
        The plan's ``repair_settings`` (e.g. ``{"samples": 8}`` for a cheap Fold-DFR proxy batch).
    num_classes : int, optional
        Classes of the model's output (for repairs that synthesise inputs).

    Returns
    -------
    dict
        ``max_abs_diff`` (largest ``|folded(x) - duplicated(x)|``), ``scale`` (largest ``|duplicated(x)|``),
        ``rel_diff`` (their ratio), ``groups_folded``, ``redrawn`` (constant parameters redrawn) and
        ``params_before``/``params_after`` of the duplicated copy and its fold.
    """
    from .metrics import count_params

    work = copy.deepcopy(model).eval()
    redrawn = redraw_constants(work, seed)
    x = example_input
    dg, graph = trace(work, x)
    plan = FoldPlan(default_ratio=float(ratio), repair=repair, seed=int(seed), repair_settings=dict(repair_settings or {}))
    chosen = {}
    for g in graph.foldable:
        k = k_for_ratio(g.channels, plan.ratio_for(g.id))
        if k < g.channels:
            chosen[g.id] = duplicate_labels(g.channels, k)
            _duplicate_group(work, dg, g.id, g.channels, chosen[g.id])
    del dg, graph

    def select(_ctx, group, k) -> Decision:
        return merge_decision(chosen[group.id], k)

    with torch.no_grad():
        ref = work(x)
    result = compress(work, plan, select, method=repair, repair=repair, example_input=x, num_classes=num_classes)
    with torch.no_grad():
        out = result.model(x)
    diff, scale = float((out - ref).abs().max()), float(ref.abs().max())
    return {"max_abs_diff": diff, "scale": scale, "rel_diff": diff / scale if scale > 0 else float("inf"),
            "groups_folded": len(chosen), "redrawn": redrawn, "params_before": count_params(work),
            "params_after": count_params(result.model)}
