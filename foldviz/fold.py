"""Folding: cluster each channel group in the repair's feature space and merge every cluster into one channel.

:func:`cluster_group` is the one place where a group is clustered: :func:`fold` calls it for every group, and the
Layer explorer and Learn page (through :class:`foldviz.session.Workbench`) call it too, with the same plan,
so the clusters a user looks at are the clusters the fold merges.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from .features import feature_blocks, group_features
from .groups import ChannelGroup
from .kmeans import (DEFAULT_CLUSTERING, ClusterResult, gram_cols, gram_matrix, kmeans, kmeans_blocks, kmeans_on_gram,
                     seed_restarts)
from .methods import DEFAULT_REPAIR
from .plans import FoldPlan
from .repair import REPAIRS, RepairContext, fuse_batchnorms, linear_bns
from .surgery import Decision, FoldResult, compress, folded_groups, merge_decision, trace
from .utils import Progress

__all__ = ["fold", "FoldResult", "cluster_group", "gram_and_seeds", "ClusterSelector", "feature_model", "feature_scaling",
           "fused_bns", "as_plan"]


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


# groups at least this large have their Gram matrix computed on a second thread while the previous group is
# clustered (Lloyd and Hartigan are mostly sequential, so the matrix product gets the other core)
PREFETCH_MIN_CHANNELS = 1024


def _seed(plan: FoldPlan, group: ChannelGroup, j: int = 0) -> int:
    """The clustering seed of partition ``j`` of ``group`` (a kind may offset it per group, e.g. per LM layer)."""
    return int(plan.seed) + int(group.info.get("seed_offset", 0)) + j


def _gram_input(model: nn.Module, group: ChannelGroup, plan: FoldPlan):
    """(feature column blocks of ``group`` in the plan's feature space, channels) for the Gram k-means."""
    scale = feature_scaling(model, group, plan.repair)
    return feature_blocks(model, group, gram_cols(group.channels), scale=scale)


def _cluster_one(model, group, k, plan, seed, *, device, features, with_centroids, gram) -> ClusterResult:
    clustering = {**DEFAULT_CLUSTERING, **plan.clustering}
    if gram is not None and features is None and clustering["algorithm"] == "kmeans":
        g, seeds = gram
        return kmeans_on_gram(g, k, seed=seed, n_init=clustering["n_init"], max_iter=clustering["max_iter"],
                              refine=clustering["refine"], seeds=seeds)
    if features is None and not with_centroids and clustering["algorithm"] == "kmeans":
        # labels only: accumulate the Gram matrix from column blocks, never the (n, d) matrix (same labels)
        return kmeans_blocks(_gram_input(model, group, plan), group.channels, k, seed=seed, device=device,
                             **plan.clustering)
    if features is None:
        features = group_features(model, group, scale=feature_scaling(model, group, plan.repair))
    return kmeans(features, k, seed=seed, device=device, with_centroids=with_centroids, **plan.clustering)


def cluster_group(model: nn.Module, group: ChannelGroup, k: int, plan: FoldPlan, *, device=None,
                  features: torch.Tensor | None = None, with_centroids: bool = True, gram=None) -> ClusterResult:
    """Cluster ``group``'s units as :func:`fold` does for ``plan``: ``k`` clusters in each of its partitions.

    ``model`` must already be in the plan's feature space (see :func:`feature_model`); pass ``features`` to reuse
    a matrix computed with ``group_features(model, group, scale=...)``, or ``gram`` = (Gram matrix, restart seeds)
    from :func:`gram_and_seeds`. A partitioned group (the query heads of each KV group) is clustered partition by
    partition with seeds ``seed + j``; its labels number the clusters of partition j from ``j * k``.
    """
    if group.partitions == 1:
        return _cluster_one(model, group, k, plan, _seed(plan, group), device=device, features=features,
                            with_centroids=with_centroids, gram=gram)
    per = group.per_partition
    parts = [_cluster_one(model, group.partition(j), k, plan, _seed(plan, group, j), device=device,
                          features=None if features is None else features[j * per:(j + 1) * per],
                          with_centroids=with_centroids, gram=None) for j in range(group.partitions)]
    labels = np.concatenate([p.labels + j * k for j, p in enumerate(parts)])  # (channels,)
    cents = None if not with_centroids else np.concatenate([p.centroids for p in parts])
    return ClusterResult(labels, cents, float(sum(p.inertia for p in parts)), k * group.partitions,
                         int(max(p.n_iter for p in parts)))


def gram_and_seeds(model: nn.Module, group: ChannelGroup, k: int, plan: FoldPlan):
    """(Gram matrix, k-means++ seeds of every restart) of a one-partition group: what :func:`cluster_group`
    computes first; safe to run on another thread (grad mode is per thread)."""
    with torch.no_grad():
        gram = gram_matrix(_gram_input(model, group, plan))
        n_init = {**DEFAULT_CLUSTERING, **plan.clustering}["n_init"]
        return gram, seed_restarts(gram, k, _seed(plan, group), n_init)


class ClusterSelector:
    """The fold's selector: cluster each group (:func:`cluster_group`) and merge every cluster into its first
    member. While one group is clustered, :meth:`lookahead` may compute the next large group's Gram matrix on a
    second thread (same numbers: the matrix is computed exactly as :func:`cluster_group` would)."""

    def __init__(self):
        self._pool = None
        self._pending: dict[str, object] = {}

    def _eligible(self, ctx: RepairContext, group: ChannelGroup) -> bool:
        return (group.partitions == 1 and group.channels >= PREFETCH_MIN_CHANNELS and torch.get_num_threads() >= 2
                and {**DEFAULT_CLUSTERING, **ctx.plan.clustering}["algorithm"] == "kmeans")

    def lookahead(self, ctx: RepairContext, group: ChannelGroup, k: int) -> None:
        if not self._eligible(ctx, group) or group.id in self._pending:
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="foldviz-gram")
        self._pending[group.id] = self._pool.submit(gram_and_seeds, ctx.work, group, k, ctx.plan)

    def __call__(self, ctx: RepairContext, group: ChannelGroup, k: int) -> Decision:
        fut = self._pending.pop(group.id, None)
        res = cluster_group(ctx.work, group, k, ctx.plan, device=ctx.device, with_centroids=False,
                            gram=fut.result() if fut is not None else None)
        d = merge_decision(res.labels, res.k)
        d.inertia, d.n_iter = res.inertia, res.n_iter
        return d

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending.clear()


def fold(model: nn.Module, plan: FoldPlan | float = 0.5, *, example_input: torch.Tensor, repair: str | None = None,
         repair_data: torch.Tensor | None = None, progress: Progress = None, device=None,
         num_classes: int | None = None, kind=None, method: str | None = None, inplace: bool = False) -> FoldResult:
    """Fold a copy of ``model``; ``plan`` is a FoldPlan or a uniform ratio (fraction of channels removed).

    ``repair`` overrides the plan's repair (a fold-family key of :data:`foldviz.methods.METHODS`: "none"
    Fold-Naive, "r" Fold-R with ``repair_data``, "ar" Fold-AR, "dir" Fold-DIR); a bare ratio uses
    ``DEFAULT_REPAIR``. ``kind`` is the model kind's adapter (:mod:`foldviz.kinds`; default: a traced image
    classifier), ``method`` the registry key recorded (default: the repair's). The input model is never modified,
    unless ``inplace`` (the caller gives up the model to save its memory).
    """
    plan = as_plan(plan, repair)
    select = ClusterSelector()
    try:
        return compress(model, plan, select, method=method or plan.repair, repair=plan.repair,
                        example_input=example_input, repair_data=repair_data, progress=progress, device=device,
                        num_classes=num_classes, kind=kind, inplace=inplace)
    finally:
        select.close()

