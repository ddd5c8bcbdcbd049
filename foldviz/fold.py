"""Folding: cluster each channel group in the repair's feature space and merge every cluster into one channel.

:func:`cluster_group` is the one place where a group is clustered: :func:`fold` calls it for every group, and the
Layer explorer and Learn page (through :class:`foldviz.session.Workbench`) call it too, with the same plan,
so the clusters a user looks at are the clusters the fold merges.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .features import feature_blocks, group_features
from .groups import ChannelGroup
from .kmeans import ClusterResult, gram_cols, kmeans, kmeans_blocks
from .methods import DEFAULT_REPAIR
from .plans import FoldPlan
from .repair import REPAIRS, RepairContext, fuse_batchnorms, linear_bns
from .surgery import Decision, FoldResult, compress, folded_groups, merge_decision, trace
from .utils import Progress

__all__ = ["fold", "FoldResult", "cluster_group", "feature_model", "feature_scaling", "fused_bns", "as_plan"]


def as_plan(plan: FoldPlan | float, repair: str | None = None) -> FoldPlan:
    """A FoldPlan from a plan or a uniform ratio; ``repair`` overrides the plan's (default: DEFAULT_REPAIR)."""
    if isinstance(plan, FoldPlan):
        return plan if repair is None or repair == plan.repair else plan.with_changes(repair=repair)
    return FoldPlan(default_ratio=float(plan), repair=repair or DEFAULT_REPAIR)


@torch.no_grad()
def feature_model(model: nn.Module, example_input: torch.Tensor, repair: str,
                  bns: frozenset[str] | None = None) -> nn.Module:
    """``model`` as the fold reads features for ``repair``: itself for the raw space, a BatchNorm-fused copy for
    the fused space (module names and channel order unchanged). In the "fused-linear" space only the BNs
    ``bns`` are fused (see :func:`fused_bns`; default: those of every foldable group)."""
    space = REPAIRS[repair].feature_space
    if space == "raw":
        return model
    work = copy.deepcopy(model).eval()
    dg, graph = trace(work, example_input)
    if space == "fused-linear":
        bns = linear_bns(work, graph.foldable) if bns is None else set(bns)
        if not bns:
            return model
    fuse_batchnorms(work, dg, only=None if space == "fused" else set(bns))
    return work


def fused_bns(model: nn.Module, graph, plan: FoldPlan, extra: str | None = None) -> frozenset[str] | None:
    """The BNs a fold under ``plan`` fuses before clustering in the "fused-linear" space (those of the Linear
    groups it folds, plus group ``extra``, e.g. the one the explorer shows); None in the other spaces."""
    if REPAIRS[plan.repair].feature_space != "fused-linear":
        return None
    groups = [g for g, _k in folded_groups(graph, plan)] + [g for g in graph.groups if g.id == extra]
    return frozenset(linear_bns(model, groups))


def feature_scaling(model: nn.Module, group: ChannelGroup, repair: str) -> bool:
    """Whether ``group``'s features are robust-scaled in ``repair``'s feature space."""
    space = REPAIRS[repair].feature_space
    return space == "fused" or (space == "fused-linear" and bool(linear_bns(model, [group])))


def cluster_group(model: nn.Module, group: ChannelGroup, k: int, plan: FoldPlan, *, device=None,
                  features: torch.Tensor | None = None, with_centroids: bool = True) -> ClusterResult:
    """Cluster ``group``'s channels into ``k`` clusters exactly as :func:`fold` does for ``plan``.

    ``model`` must already be in the plan's feature space (see :func:`feature_model`); pass ``features`` to reuse
    a matrix computed with ``group_features(model, group, scale=...)``.
    """
    scale = feature_scaling(model, group, plan.repair)
    if features is None and not with_centroids and plan.clustering.get("algorithm", "kmeans") == "kmeans":
        # labels only: accumulate the Gram matrix from column blocks, never the (n, d) matrix (same labels)
        blocks = feature_blocks(model, group, gram_cols(group.channels), scale=scale)
        return kmeans_blocks(blocks, group.channels, k, seed=plan.seed, device=device, **plan.clustering)
    if features is None:
        features = group_features(model, group, scale=scale)
    return kmeans(features, k, seed=plan.seed, device=device, with_centroids=with_centroids, **plan.clustering)


def _cluster_selector(ctx: RepairContext, group: ChannelGroup, k: int) -> Decision:
    res = cluster_group(ctx.work, group, k, ctx.plan, device=ctx.device, with_centroids=False)
    d = merge_decision(res.labels, k)
    d.inertia, d.n_iter = res.inertia, res.n_iter
    return d


def fold(model: nn.Module, plan: FoldPlan | float = 0.5, *, example_input: torch.Tensor, repair: str | None = None,
         repair_data: torch.Tensor | None = None, progress: Progress = None, device=None,
         num_classes: int | None = None) -> FoldResult:
    """Fold a copy of ``model``; ``plan`` is a FoldPlan or a uniform ratio (fraction of channels removed).

    ``repair`` overrides the plan's repair (a fold-family key of :data:`foldviz.methods.METHODS`: "none"
    Fold-Naive, "r" Fold-R with ``repair_data``, "ar" Fold-AR, "dir" Fold-DIR); a bare ratio uses
    ``DEFAULT_REPAIR``. The input model is never modified.
    """
    plan = as_plan(plan, repair)
    return compress(model, plan, _cluster_selector, method=plan.repair, repair=plan.repair,
                    example_input=example_input, repair_data=repair_data, progress=progress, device=device,
                    num_classes=num_classes)

