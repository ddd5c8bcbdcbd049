"""IFM (Iterative Feature Merging, Chen, Zhou & Yan, ICLR 2024): the paper's data-free merging competitor.

Selection. Per channel group, the weight vector of channel i is the concatenation of the
group's tensors with at least two dimensions only: the producers' fan-in rows (conv/linear weights indexed by
the group on axis 0) and the consumers' fan-out columns (weights indexed on axis 1). Biases and BatchNorm tensors
(1-D) are left out of the distance, as in IFM. In every round the pair of (current) channels with the smallest
squared L2 distance ``||w_a - w_b||^2`` (read from the Gram matrix) is merged, one pair per round, until
``k = kmeans.k_for_ratio(n, ratio)`` channels are left, the same k as every fold method. As in IFM, distances in
later rounds are measured on the *merged* weights: a merged channel's producer part is the sum of its members'
rows and its consumer part their count-weighted mean, so :func:`greedy_merge` updates one row of the distance
matrix per round instead of recomputing the Gram matrix.

Merge rule (``Decision.rule = "ifm"``, :data:`foldviz.surgery.MERGE_RULES`). Merging a pair (a, b) with merge
counts (n_a, n_b): every tensor indexed by the group on its **output** axis is **summed**: conv/linear rows,
biases, and BatchNorm gamma, beta, running_mean and running_var (IFM's axis maps list all four BN tensors); every
consumer's **input** column becomes the mean weighted by merge counts, ``(n_a c_a + n_b c_b) / (n_a + n_b)``.
Over a finished cluster C this is: output side = sum over the original members, input side = plain mean over
the original members (a count-weighted mean of means is the mean of all members), which is how
:class:`foldviz.surgery.GroupSurgery` applies it in one step. It is the inverse of folding's mean/sum.

Why it can work: ReLU is positively homogeneous. Without BatchNorm, a cluster of N identical channels h gives a
merged pre-activation N*(w.x + b), so the merged channel carries N*h and the averaged consumer column times N*h
equals the original sum over the N members: the function is exact. With BatchNorm it is not: conv output N*y is
normalised by the summed statistics (mean N*mu, variance N*var), so the centred part is scaled by sqrt(N)
too much, i.e. the merged network equals the original with every affected BatchNorm's gamma multiplied by
sqrt(N) (and eps divided by N). This is the variance *overshoot* the Model Folding paper attributes to IFM.

No repair runs. Deviations from IFM's code, stated: (1) IFM interleaves groups round by round, so one group's
distances see other groups' merges; here, as for every foldviz method, every group is decided on the unmerged
weights (result independent of group order). (2) IFM's threshold beta (stop when the closest pair is farther than
beta times the largest distance) is not used: the ratio alone sets the number of merges (beta = 1). (3) Ties are
broken by the lowest (i, j) index pair.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .fold import as_plan
from .groups import BN_TYPES, ChannelGroup
from .plans import FoldPlan
from .repair import RepairContext
from .surgery import Decision, FoldResult, compress, merge_decision
from .utils import Progress

__all__ = ["ifm", "ifm_features", "greedy_merge", "ifm_labels"]


def ifm_features(model: nn.Module, group: ChannelGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """IFM's weight vectors of ``group``'s channels: (producer rows (n, dp), consumer columns (n, dc)), float64.

    Only tensors with at least two dimensions take part (no biases, no BatchNorm tensors)."""
    modules = dict(model.named_modules())
    n = group.channels
    prod, cons = [], []
    for mem in group.members:
        mod = modules.get(mem.module)
        if mod is None or isinstance(mod, BN_TYPES) or getattr(mod, "weight", None) is None or mod.weight.dim() < 2:
            continue
        order = np.argsort(np.asarray(mem.root_idxs), kind="stable")
        idx = torch.as_tensor(np.asarray(mem.idxs)[order])
        w = mod.weight.detach().double().cpu()
        if mem.side == "out":
            prod.append(w.index_select(0, idx).reshape(n, -1))
        else:
            cons.append(w.index_select(1, idx).transpose(0, 1).reshape(n, -1))
    empty = torch.zeros((n, 0), dtype=torch.float64)
    return (torch.cat(prod, 1) if prod else empty), (torch.cat(cons, 1) if cons else empty)


def greedy_merge(prod: torch.Tensor, cons: torch.Tensor, k: int) -> tuple[np.ndarray, list[tuple[int, int, float]]]:
    """Merge the closest pair of channels, one pair per round, until ``k`` are left.

    ``prod`` rows are summed on merging and ``cons`` rows averaged weighted by merge counts (IFM's rule), and the
    distances of the merged channel are updated before the next round. Returns the cluster label of every
    channel (clusters numbered by their first member) and the merges as (kept channel, merged channel, squared
    distance), in order.
    """
    n = prod.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    dp = prod.shape[1]
    feats = torch.cat([prod.double(), cons.double()], 1)   # current channels: [summed rows | averaged columns]
    counts = torch.ones(n, dtype=torch.float64)
    sq = (feats * feats).sum(1)
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    dist = (sq[:, None] + sq[None, :] - 2.0 * feats @ feats.T).clamp_min(0)
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    dist = torch.where(upper & ~torch.isnan(dist), dist, inf)  # only pairs i < j
    active = torch.ones(n, dtype=torch.bool)
    parent = np.arange(n)
    merges = []
    for _ in range(n - k):
        i, j = divmod(int(torch.argmin(dist)), n)   # i < j; the lowest flat index wins ties
        merges.append((i, j, float(dist[i, j])))
        feats[i, :dp] += feats[j, :dp]
        feats[i, dp:] = (counts[i] * feats[i, dp:] + counts[j] * feats[j, dp:]) / (counts[i] + counts[j])
        counts[i] += counts[j]
        active[j] = False
        parent[parent == j] = i
        dist[j, :] = inf
        dist[:, j] = inf
        sq[i] = feats[i] @ feats[i]
        row = (sq + sq[i] - 2.0 * feats @ feats[i]).clamp_min(0)
        row = torch.where(active, row, inf)
        dist[:i, i] = row[:i]
        dist[i, i + 1:] = row[i + 1:]
    _, labels = np.unique(parent, return_inverse=True)   # roots ascending = clusters by their first member
    return labels.astype(np.int64), merges


def ifm_labels(model: nn.Module, group: ChannelGroup, k: int) -> np.ndarray:
    """The clusters IFM forms in ``group`` when ``k`` channels are kept."""
    prod, cons = ifm_features(model, group)
    return greedy_merge(prod, cons, k)[0]


def _ifm_selector(ctx: RepairContext, group: ChannelGroup, k: int) -> Decision:
    prod, cons = ifm_features(ctx.work, group)
    labels, merges = greedy_merge(prod, cons, k)
    d = merge_decision(labels, k, rule="ifm")
    d.inertia = float(sum(m[2] for m in merges))   # total squared distance of the merged pairs
    d.n_iter = len(merges)
    return d


def ifm(model: nn.Module, plan: FoldPlan | float = 0.5, *, example_input: torch.Tensor, progress: Progress = None,
        device=None) -> FoldResult:
    """IFM on a copy of ``model`` with ``plan``'s per-group ratios (a FoldPlan or a uniform ratio): greedy
    pairwise merging with IFM's sum/weighted-mean rule, no repair. The plan's ``repair`` field is ignored.
    The input model is never modified."""
    plan = as_plan(plan)
    return compress(model, plan, _ifm_selector, method="ifm", repair="none", example_input=example_input,
                    progress=progress, device=device)

