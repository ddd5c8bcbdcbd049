"""Surgery on channel groups, and the one compression loop that folding and pruning share.

Merge rule (the model-folding paper's): tensors indexed by the group on their output axis (conv/linear rows, biases,
BatchNorm parameters) take the cluster *mean*; consumers' input columns take the cluster *sum*. A cluster of
identical channels therefore collapses without changing the function. A :class:`Decision` may name another rule
(``Decision.rule``, keys of :data:`MERGE_RULES`): ``"ifm"`` is IFM's inverse rule (output side summed, input side
averaged; see :mod:`foldviz.ifm`). Merged values are written into one
representative channel per cluster and Torch-Pruning then removes the others, which keeps module attributes
(``out_channels``, ``num_features`` ...) correct. Pruning is the same operation with no merge.

:func:`compress` runs a method end to end: trace, ask a *selector* what to keep in each group (``fold`` clusters,
``prune`` ranks by importance), apply every decision, run the repair's hooks. All decisions are taken on the
unmerged weights, so the result does not depend on group order.
"""
from __future__ import annotations

import copy
import gc
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch_pruning.dependency.group import Group

from .groups import BN_TYPES, CONV_TYPES, ChannelGroup, GroupGraph, build_dependency_graph, find_groups, root_handler
from .kmeans import k_for_ratio
from .methods import METHODS
from .plans import FoldPlan, PlanError
from .repair import REPAIRS, Repair, RepairContext
from .utils import Progress, resolve_device


@dataclass
class Decision:
    """What to do with one group: ``keep`` channel indices survive; with ``rep_of`` (merge), channel r is merged
    into ``rep_of[r]``; ``labels`` are the clusters (fold) shown to users; ``bn_scales`` rescale merged gammas;
    ``rule`` (a key of :data:`MERGE_RULES`) says how each side combines a cluster."""

    keep: list[int]
    rep_of: np.ndarray | None = None
    labels: np.ndarray | None = None
    inertia: float | None = None
    n_iter: int | None = None
    bn_scales: dict = field(default_factory=dict)
    rule: str = "fold"

    def __post_init__(self):
        if self.rule not in MERGE_RULES:
            raise ValueError(f"unknown merge rule {self.rule!r}; choose from {', '.join(MERGE_RULES)}")


# merge rule -> (output side takes the mean?, input side takes the mean?); False means a plain sum
MERGE_RULES: dict[str, tuple[bool, bool]] = {
    "fold": (True, False),   # model folding: producers' rows/biases/BN tensors averaged, consumers' columns summed
    "ifm": (False, True),    # IFM: producers' rows/biases/BN tensors summed, consumers' columns averaged
}


@dataclass
class FoldResult:
    """A folded (or pruned) model and everything needed to explain it."""

    model: nn.Module
    plan: FoldPlan
    method: str                                   # key in foldviz.methods.METHODS ("ar", "l1+r", ...)
    groups: list[dict]                            # per group: id, channels_before/after, ratio, inertia, n_iter
    labels: dict[str, np.ndarray]                 # group id -> cluster label of each original channel
    channel_maps: dict[str, np.ndarray]           # module -> new index of each original output channel (-1 removed)
    seconds: dict[str, float]
    fused: dict[str, str] = field(default_factory=dict)   # BN -> producer it was fused into (fused feature space)
    synthetic: torch.Tensor | None = None         # Fold-DIR: the synthesised repair batch
    repair_samples: int = 0
    unit_maps: dict[str, np.ndarray] = field(default_factory=dict)  # group -> new index of each unit (-1 removed)
    kind: str = "cnn"                             # the model kind (foldviz.kinds) the result belongs to
    notes: list[str] = field(default_factory=list)
    proxy: dict | None = None                     # Fold-DFR: where its proxy came from (foldviz.proxy.ProxyInfo)

    @property
    def label(self) -> str:
        return METHODS[self.method].label


def _out_size(m: nn.Module) -> int:
    return m.num_features if isinstance(m, BN_TYPES) else m.weight.shape[0]


# bytes of float64 scratch one step of _combine may use (larger tensors are merged in column chunks)
COMBINE_CHUNK_BYTES = 32 * 1024 * 1024


@torch.no_grad()
def _combine(t: torch.Tensor, axis: int, src: torch.Tensor, dst: torch.Tensor, mean: bool) -> None:
    """In place: slot dst[j] of ``t`` along ``axis`` becomes the sum (or mean) of the slots src that map to it.

    Only slots receiving more than one source change, so singleton clusters cost nothing. Sums are taken in
    float64, column chunk by column chunk for large tensors (a 4096x25088 Linear), so the scratch stays under
    COMBINE_CHUNK_BYTES; every column is independent, so the result is identical.
    """
    uniq, inverse, counts = dst.unique(return_inverse=True, return_counts=True)
    busy = counts[inverse] > 1
    if not bool(busy.any()):
        return
    src, inverse = src[busy], inverse[busy]
    tm = t.data.movedim(axis, 0)                       # (slots, ...)
    hit = counts > 1
    div = counts.double().view((-1,) + (1,) * (tm.dim() - 1)) if mean else None
    if tm.dim() == 1:
        parts = [tm]
    else:
        per_col = (len(src) + len(uniq)) * 8 * max(1, tm[0, 0].numel())
        step = max(1, COMBINE_CHUNK_BYTES // per_col)
        parts = [tm[:, j:j + step] for j in range(0, tm.shape[1], step)]
    for part in parts:  # views: writes go straight into t
        acc = torch.zeros((len(uniq),) + part.shape[1:], dtype=torch.float64, device=t.device)
        acc.index_add_(0, inverse, part.index_select(0, src).double())
        if mean:
            acc /= div
        part[uniq[hit]] = acc[hit].to(t.dtype)


def merge_member(mod: nn.Module, side: str, src, dst, rule: str = "fold") -> None:
    out_mean, in_mean = MERGE_RULES[rule]
    s = torch.as_tensor(src, device=mod.weight.device)
    d = torch.as_tensor(dst, device=mod.weight.device)
    if side == "in":
        _combine(mod.weight, 1, s, d, mean=in_mean)
        return
    for name in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(mod, name, None)
        if t is not None:
            _combine(t, 0, s, d, mean=out_mean)


class GroupSurgery:
    """Applies per-group decisions to a working copy and keeps the channel maps up to date."""

    def __init__(self, work: nn.Module, dg):
        self.work, self.dg = work, dg
        self.names = {m: n for n, m in work.named_modules() if n}
        self.maps = {n: np.arange(_out_size(m)) for m, n in self.names.items()
                     if isinstance(m, (nn.Linear,) + CONV_TYPES + BN_TYPES)}

    def apply(self, gid: str, n: int, d: Decision) -> None:
        """Merge (``d.rep_of`` given) or prune group ``gid`` down to ``d.keep``."""
        root = self.work.get_submodule(gid)
        group = self.dg.get_pruning_group(root, root_handler(self.dg, root), list(range(n)))
        keep_set = set(d.keep)
        drop = [r for r in range(n) if r not in keep_set]
        updates = []
        for item in group:
            mod = item.dep.target.module
            if not isinstance(mod, nn.Module) or mod not in self.names:
                continue
            side = "out" if self.dg.is_out_channel_pruning_fn(item.dep.handler) else "in"
            by_root: dict[int, list[int]] = defaultdict(list)   # group channel -> this module's indices
            pos = []
            for i, r in zip(item.idxs, item.root_idxs):
                pos.append(len(by_root[r]))
                by_root[r].append(i)
            assign = {}
            if d.rep_of is not None:
                src = list(item.idxs)
                dst = [by_root[d.rep_of[r]][p] for r, p in zip(item.root_idxs, pos)]
                merge_member(mod, side, src, dst, d.rule)
                assign = dict(zip(src, dst))
                scale = d.bn_scales.get(self.names[mod]) if side == "out" else None
                if scale is not None:
                    with torch.no_grad():
                        for r in d.keep:
                            mod.weight.data[by_root[r][0]] *= float(scale[d.labels[r]])
            if side == "out" and self.names[mod] in self.maps:
                dropped = {i for r in drop for i in by_root[r]}
                updates.append((self.names[mod], _out_size(mod), dropped, assign))
        if drop:  # the shrinking group is the full group restricted to the dropped channels
            drop_set = set(drop)
            shrink = Group()
            shrink._DG = self.dg
            for item in group:
                idxs = [i for i, r in zip(item.idxs, item.root_idxs) if r in drop_set]
                if idxs:
                    shrink.add_dep(item.dep, idxs)
            shrink.prune(record_history=False)
        for name, size, dropped, assign in updates:
            kept = [j for j in range(size) if j not in dropped]
            rank = {j: p for p, j in enumerate(kept)}
            cmap = self.maps[name]
            for o, cur in enumerate(cmap):
                if cur < 0:
                    continue
                if cur in dropped:
                    cmap[o] = rank[assign[cur]] if cur in assign else -1
                else:
                    cmap[o] = rank[cur]


def merge_decision(labels: np.ndarray, k: int, rule: str = "fold") -> Decision:
    """The merge that folds each cluster of ``labels`` into its first member with ``rule``."""
    labels = np.asarray(labels)
    reps = np.array([np.flatnonzero(labels == c)[0] for c in range(k)])
    return Decision(keep=sorted(reps.tolist()), rep_of=reps[labels], labels=labels, rule=rule)


# select(ctx, group, k) -> Decision: what a method keeps in one group (fold: clusters; prune: importance). k is
# the number kept in each partition of the group. A selector may also have ``lookahead(ctx, group, k)``, called with
# the next group before the current one is decided (to overlap work), and ``close()``.
Selector = Callable[[RepairContext, ChannelGroup, int], Decision]


def trace(model: nn.Module, example_input: torch.Tensor) -> tuple[object, GroupGraph]:
    """Dependency graph and channel groups of ``model`` (raises PlanError when it cannot be traced)."""
    dg = build_dependency_graph(model, example_input)
    graph = find_groups(model, example_input, dg=dg)
    if graph.error:
        raise PlanError(graph.error)
    return dg, graph


class TracedStructure:
    """How the engine finds and changes the groups of a network it can trace (the image classifiers): groups from
    Torch-Pruning's dependency graph, merges by :class:`GroupSurgery`. A model kind with another layout supplies
    an object with the same three methods (``foldviz.lm.kind.DecoderStructure``)."""

    def trace(self, model: nn.Module, example_input: torch.Tensor) -> tuple[object, GroupGraph]:
        return trace(model, example_input)

    def surgery(self, work: nn.Module, dg, graph: GroupGraph) -> GroupSurgery:
        return GroupSurgery(work, dg)

    def finish(self, ctx: RepairContext) -> None:
        """After the repair: nothing to synchronise for a traced network."""


TRACED = TracedStructure()


def group_k(group: ChannelGroup, ratio: float) -> int:
    """Units kept in each partition of ``group`` at ``ratio`` (the k of :func:`foldviz.kmeans.k_for_ratio`)."""
    return k_for_ratio(group.per_partition, ratio)


def folded_groups(graph: GroupGraph, plan: FoldPlan) -> list[tuple[ChannelGroup, int]]:
    """(group, k per partition) for every group ``plan`` shrinks: foldable, ratio > 0 and k below the units."""
    todo = [(g, group_k(g, plan.ratio_for(g.id))) for g in graph.foldable if plan.ratio_for(g.id) > 0]
    return [(g, k) for g, k in todo if k < g.per_partition]


def unit_map(decision: Decision, n: int) -> np.ndarray:
    """(n,) new index of each unit after ``decision`` (kept units in their original order; -1: removed)."""
    rank = np.full(n, -1, dtype=np.int64)
    rank[np.asarray(decision.keep, dtype=np.int64)] = np.arange(len(decision.keep))
    return rank[np.asarray(decision.rep_of)] if decision.rep_of is not None else rank


def compress(model: nn.Module, plan: FoldPlan, select: Selector, *, method: str, repair: str | Repair,
             example_input: torch.Tensor, repair_data: torch.Tensor | None = None, progress: Progress = None,
             device=None, num_classes: int | None = None, kind=None, inplace: bool = False) -> FoldResult:
    """Compress ``model`` as ``plan`` says: ``select`` decides per group, ``repair`` (a key of
    :data:`foldviz.repair.REPAIRS`, or a :class:`~foldviz.repair.Repair` to try a variant) repairs the statistics.

    ``kind`` finds and changes the groups (``trace``, ``surgery``, ``finish``; default :data:`TRACED`). The input
    model is never modified: the work is done on a copy, unless ``inplace`` (then ``model`` itself is folded, to
    save memory on large models; the caller gives it up; a repair that reads the unfolded model still gets a
    copy).
    """
    kind = kind or TRACED
    rep = REPAIRS[repair] if isinstance(repair, str) else repair
    dev = resolve_device(device)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    inplace = inplace and not rep.needs_original
    work = (model if inplace else copy.deepcopy(model)).to(dev).eval()
    x = example_input.to(dev)
    dg, graph = kind.trace(work, x)
    plan.validate(graph)
    ctx = RepairContext(model, work, dg, x, plan, dev, repair_data, num_classes, progress)
    todo = folded_groups(graph, plan)
    ctx.folded = [g for g, _k in todo]
    seconds["graph"] = time.perf_counter() - t0

    t = time.perf_counter()
    rep.prepare(ctx)
    seconds["prepare"] = time.perf_counter() - t

    # 1. decide every group on the unmerged weights
    t = time.perf_counter()
    decisions: dict[str, Decision] = {}
    ahead = getattr(select, "lookahead", None)
    with torch.no_grad():
        for i, (g, k) in enumerate(todo):
            if ahead is not None and i + 1 < len(todo):
                ahead(ctx, *todo[i + 1])
            d = decisions[g.id] = select(ctx, g, k)
            if d.rep_of is not None:  # read from the unmerged model, like every other decision: group indices into
                d.bn_scales = rep.bn_scales(ctx, g, d.labels, k)  # shared (concatenated) consumers stay valid
            if progress:
                progress("cluster", i + 1, len(todo))
    seconds["cluster"] = time.perf_counter() - t
    ctx.unit_maps = {g.id: unit_map(decisions[g.id], g.channels) for g, _k in todo}

    # 2. merge and physically shrink, one group after another
    t = time.perf_counter()
    surgery = kind.surgery(work, dg, graph)
    ctx.channel_maps = surgery.maps
    for i, (g, _k) in enumerate(todo):
        surgery.apply(g.id, g.channels, decisions[g.id])
        if progress:
            progress("merge", i + 1, len(todo))
    seconds["merge"] = time.perf_counter() - t

    # 3. repair statistics
    gc.collect()  # traced graphs (reference cycles) of the selection phase still hold tensors
    t = time.perf_counter()
    notes = kind.finish(ctx) or []   # first: a decoder's attention modules learn their new head counts here
    rep.finish(ctx)
    seconds["repair"] = time.perf_counter() - t + seconds.pop("prepare")
    seconds["total"] = time.perf_counter() - t0

    rows = []
    for g in graph.groups:
        d = decisions.get(g.id)
        rows.append({"id": g.id, "unit": g.unit, "channels_before": g.channels,
                     "channels_after": len(d.keep) if d else g.channels, "ratio": plan.ratio_for(g.id) if d else 0.0,
                     "inertia": d.inertia if d else None, "n_iter": d.n_iter if d else None, "foldable": g.foldable,
                     "reason": g.reason})
    work = work.cpu().eval()
    for p in work.parameters():
        p.requires_grad_(False)
    labels = {gid: d.labels for gid, d in decisions.items() if d.labels is not None}
    units = ctx.unit_maps
    synthetic = ctx.synthetic.cpu() if ctx.synthetic is not None else None
    return FoldResult(work, plan, method, rows, labels, surgery.maps, seconds, ctx.fused, synthetic, ctx.samples,
                      units, graph.kind, list(notes), ctx.proxy)
