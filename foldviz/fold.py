"""Folding: cluster each channel group, merge every cluster into one channel, shrink the model for real.

Merge rule (folding-spec §0): tensors indexed by the group on their output axis (conv/linear rows, biases,
BatchNorm parameters) take the cluster *mean*; consumers' input columns take the cluster *sum*. A cluster of
identical channels therefore collapses without changing the function. The merged values are written into one
representative channel per cluster and Torch-Pruning then removes the others, which keeps module attributes
(``out_channels``, ``num_features`` ...) correct.

All clusterings are computed on the weights before any merge, so the result does not depend on group order.
"""
from __future__ import annotations

import copy
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch_pruning.dependency.group import Group

from .clustering import ar_scale, group_features_tensor, k_for_ratio, kmeans
from .groups import _BN, _CONV, build_dependency_graph, find_groups, root_handler
from .plans import FoldPlan, PlanError
from .repair import absorb_fused_biases, deep_inversion, dir_defaults, fuse_batchnorms, reset_bn_stats
from .utils import resolve_device

Progress = Callable[[str, int, int], None] | None
METHODS = ("fold", "l1", "l2")


@dataclass
class FoldResult:
    """A folded (or pruned) model and everything needed to explain it."""

    model: nn.Module
    plan: FoldPlan
    method: str                                   # "fold" or a pruning baseline "l1"/"l2"
    groups: list[dict]                            # per group: id, channels_before/after, ratio, inertia
    labels: dict[str, np.ndarray]                 # group id -> cluster label of each original channel
    channel_maps: dict[str, np.ndarray]           # module -> new index of each original output channel (-1 removed)
    seconds: dict[str, float]
    fused: dict[str, str] = field(default_factory=dict)   # Fold-AR: BN -> producer it was fused into
    synthetic: torch.Tensor | None = None         # Fold-DIR: the synthesised repair batch
    repair_samples: int = 0

    @property
    def repair(self) -> str:
        return self.plan.repair

    @property
    def label(self) -> str:
        if self.method == "fold":
            return self.plan.repair_name
        return f"{self.method.upper()} pruning" + (" + REPAIR" if self.plan.repair == "r" else "")


def _as_plan(plan, repair) -> FoldPlan:
    if isinstance(plan, FoldPlan):
        if repair is not None and repair != plan.repair:
            d = plan.to_dict()
            d["repair"] = repair
            return FoldPlan.from_dict(d)
        return plan
    return FoldPlan(default_ratio=float(plan), repair=repair or "none")


def _out_size(m: nn.Module) -> int:
    if isinstance(m, _BN):
        return m.num_features
    return m.weight.shape[0]


#: Bytes of float64 scratch that one step of :func:`_combine` may use (larger tensors are merged in column chunks).
COMBINE_CHUNK_BYTES = 32 * 1024 * 1024


@torch.no_grad()
def _combine(t: torch.Tensor, axis: int, src: torch.Tensor, dst: torch.Tensor, mean: bool) -> None:
    """In place: slot dst[j] of ``t`` along ``axis`` becomes the sum (or mean) of the slots src that map to it.

    Only slots receiving more than one source change, so singleton clusters cost nothing.  Sums are taken in
    float64; for large tensors (e.g. a 4096x25088 Linear) the other axis is processed in chunks so the float64
    scratch stays under :data:`COMBINE_CHUNK_BYTES` (the result is identical: every column is independent).
    """
    uniq, inverse, counts = dst.unique(return_inverse=True, return_counts=True)
    busy = counts[inverse] > 1
    if not bool(busy.any()):
        return
    src, inverse = src[busy], inverse[busy]
    tm = t.data.movedim(axis, 0)
    hit = counts > 1
    targets = uniq[hit]
    div = counts.double().view((-1,) + (1,) * (tm.dim() - 1)) if mean else None
    if tm.dim() == 1:
        parts = [tm]
    else:
        per_col = (len(src) + len(uniq)) * 8 * max(1, tm[0, 0].numel() if tm.dim() > 1 else 1)
        step = max(1, COMBINE_CHUNK_BYTES // max(1, per_col))
        parts = [tm[:, j:j + step] for j in range(0, tm.shape[1], step)]
    for part in parts:  # views: writes go straight into t
        vals = part.index_select(0, src).double()
        acc = torch.zeros((len(uniq),) + part.shape[1:], dtype=torch.float64, device=t.device).index_add_(0, inverse, vals)
        del vals
        if mean:
            acc = acc / div
        part[targets] = acc[hit].to(t.dtype)
        del acc


def _merge_member(mod: nn.Module, side: str, src, dst) -> None:
    s = torch.as_tensor(src, device=mod.weight.device)
    d = torch.as_tensor(dst, device=mod.weight.device)
    if side == "in":
        _combine(mod.weight, 1, s, d, mean=False)
        return
    for name in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(mod, name, None)
        if t is not None:
            _combine(t, 0, s, d, mean=True)


class _Folder:
    """Applies per-group channel assignments to a working copy and keeps the channel maps up to date."""

    def __init__(self, work: nn.Module, dg):
        self.work, self.dg = work, dg
        self.names = {m: n for n, m in work.named_modules() if n}
        self.maps = {n: np.arange(_out_size(m)) for m, n in self.names.items()
                     if isinstance(m, (nn.Linear,) + _CONV + _BN)}

    def apply(self, gid: str, n: int, rep_of: np.ndarray | None, keep: list[int], bn_scale: dict | None = None,
              labels: np.ndarray | None = None) -> None:
        """Merge (``rep_of[r]`` = representative of channel r) or prune (rep_of None) group ``gid`` down to ``keep``."""
        root = self.work.get_submodule(gid)
        fn = root_handler(self.dg, root)
        group = self.dg.get_pruning_group(root, fn, list(range(n)))
        keep_set = set(keep)
        drop = [r for r in range(n) if r not in keep_set]
        updates = []
        for item in group:
            mod = item.dep.target.module
            if not isinstance(mod, nn.Module) or mod not in self.names:
                continue
            side = "out" if self.dg.is_out_channel_pruning_fn(item.dep.handler) else "in"
            by_root: dict[int, list[int]] = defaultdict(list)
            pos = []
            for i, r in zip(item.idxs, item.root_idxs):
                pos.append(len(by_root[r]))
                by_root[r].append(i)
            assign = {}
            if rep_of is not None:
                src, dst = list(item.idxs), [by_root[rep_of[r]][p] for r, p in zip(item.root_idxs, pos)]
                _merge_member(mod, side, src, dst)
                assign = dict(zip(src, dst))
                name = self.names[mod]
                if side == "out" and bn_scale and name in bn_scale and labels is not None:
                    s = bn_scale[name]
                    with torch.no_grad():
                        for r in keep:
                            mod.weight.data[by_root[r][0]] *= float(s[labels[r]])
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


def _repair_batches(plan: FoldPlan, repair_data, synthetic):
    data = synthetic if synthetic is not None else repair_data
    if data is None:
        raise PlanError("repair: Fold-R (and REPAIR for pruning) needs repair data: pass a batch of real inputs")
    samples = plan.repair_settings.get("samples")
    if samples and torch.is_tensor(data):
        data = data[:samples]
    return data


def run(model: nn.Module, plan: FoldPlan, *, method: str = "fold", example_input: torch.Tensor,
        repair_data: torch.Tensor | None = None, progress: Progress = None, device=None,
        num_classes: int | None = None) -> FoldResult:
    """Fold (``method="fold"``) or magnitude-prune (``"l1"``/``"l2"``) a copy of ``model`` as ``plan`` says."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if method != "fold" and plan.repair not in ("none", "r"):
        raise PlanError(f"repair: pruning baselines support 'none' or 'r', not {plan.repair!r}")
    dev = resolve_device(device)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    work = copy.deepcopy(model).to(dev).eval()
    x = example_input.to(dev)
    dg = build_dependency_graph(work, x)
    graph = find_groups(work, x, dg=dg)
    if graph.error:
        raise PlanError(graph.error)
    plan.validate(graph)
    seconds["graph"] = time.perf_counter() - t0

    synthetic = None
    if plan.repair == "dir":
        t = time.perf_counter()
        settings = {**dir_defaults(tuple(x.shape[1:])), **plan.repair_settings}
        settings.pop("samples", None)
        # the working copy is still identical to the input model here
        synthetic = deep_inversion(work, tuple(x.shape[1:]), num_classes=num_classes, seed=plan.seed,
                                   device=dev, progress=progress, **settings)
        seconds["dir"] = time.perf_counter() - t

    fused, biased = fuse_batchnorms(work, dg) if method == "fold" and plan.repair == "ar" else ({}, set())

    # 1. cluster every group on the unmerged weights
    t = time.perf_counter()
    todo = [g for g in graph.foldable if plan.ratio_for(g.id) > 0]
    modules = dict(work.named_modules())
    decisions, reports, labels_out = {}, [], {}
    for i, g in enumerate(todo):
        r = plan.ratio_for(g.id)
        k = k_for_ratio(g.channels, r)
        if k == g.channels:
            continue
        if method == "fold":
            feats = group_features_tensor(work, g, scale=plan.repair == "ar")
            res = kmeans(feats, k, seed=plan.seed, device=dev, with_centroids=False,
                         **{k_: v for k_, v in plan.clustering.items()})
            labels = res.labels
            reps = np.array([np.flatnonzero(labels == c)[0] for c in range(k)])
            rep_of = reps[labels]
            scales = {}
            for mem in g.members:
                if mem.side == "out" and mem.module in fused:
                    prod = modules[fused[mem.module]]
                    order = np.argsort(np.asarray(mem.root_idxs), kind="stable")
                    rows = prod.weight.detach().index_select(0, torch.as_tensor(np.asarray(mem.idxs)[order], device=dev))
                    scales[mem.module] = ar_scale(rows.cpu(), labels, k)
            decisions[g.id] = (rep_of, sorted(reps.tolist()), scales, labels)
            labels_out[g.id] = labels
            inertia = res.inertia
            del feats, res  # free this group's features and centroids before the next group's are built
        else:
            imp = _magnitude(work, g, p=1 if method == "l1" else 2)
            keep = sorted(torch.argsort(imp, descending=True)[:k].tolist())
            decisions[g.id] = (None, keep, None, None)
            inertia = None
        reports.append({"id": g.id, "channels_before": g.channels, "channels_after": k, "ratio": r, "inertia": inertia})
        if progress:
            progress("cluster", i + 1, len(todo))
    seconds["cluster"] = time.perf_counter() - t

    # 2. merge and physically shrink, one group after another
    t = time.perf_counter()
    folder = _Folder(work, dg)
    for i, g in enumerate([g for g in todo if g.id in decisions]):
        rep_of, keep, scales, labels = decisions[g.id]
        folder.apply(g.id, g.channels, rep_of, keep, scales, labels)
        if progress:
            progress("merge", i + 1, len(decisions))
    absorb_fused_biases(work, fused, biased)
    seconds["merge"] = time.perf_counter() - t

    # 3. repair statistics
    samples = 0
    if plan.repair in ("r", "dir"):
        t = time.perf_counter()
        data = _repair_batches(plan, repair_data, synthetic)
        samples = reset_bn_stats(work, data, batch_size=plan.repair_settings.get("batch_size", 256), progress=progress)
        seconds["repair"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0

    untouched = [{"id": g.id, "channels_before": g.channels, "channels_after": g.channels, "ratio": 0.0,
                  "inertia": None} for g in graph.groups if g.id not in decisions]
    order = {g.id: i for i, g in enumerate(graph.groups)}
    reports = sorted(reports + untouched, key=lambda d: order[d["id"]])
    for rep in reports:
        grp = graph.by_id[rep["id"]]
        rep.update(foldable=grp.foldable, reason=grp.reason)
    work = work.cpu().eval()
    for p in work.parameters():
        p.requires_grad_(False)
    return FoldResult(work, plan, method, reports, labels_out, folder.maps, seconds, fused,
                      synthetic.cpu() if synthetic is not None else None, samples)


def _magnitude(work: nn.Module, g, p: int) -> torch.Tensor:
    """Ln norm of each channel's fan-in rows summed over the group's conv/linear producers."""
    modules = dict(work.named_modules())
    imp = torch.zeros(g.channels, dtype=torch.float64)
    for mem in g.members:
        m = modules.get(mem.module)
        if mem.side != "out" or not isinstance(m, (nn.Linear,) + _CONV):
            continue
        rows = m.weight.detach().double().cpu().index_select(0, torch.as_tensor(mem.idxs)).flatten(1)
        norms = rows.abs().sum(1) if p == 1 else rows.pow(2).sum(1).sqrt()
        imp.index_add_(0, torch.as_tensor(mem.root_idxs), norms)
    return imp


def fold(model: nn.Module, plan: FoldPlan | float = 0.5, *, example_input: torch.Tensor, repair: str | None = None,
         repair_data: torch.Tensor | None = None, progress: Progress = None, device=None,
         num_classes: int | None = None) -> FoldResult:
    """Fold a copy of ``model``; ``plan`` is a FoldPlan or a uniform ratio (fraction of channels removed).

    ``repair`` overrides the plan's repair method: "none" (Fold-Naive), "r" (Fold-R, needs ``repair_data``),
    "ar" (Fold-AR, data-free) or "dir" (Fold-DIR, synthesises its own data). The input model is never modified.
    """
    return run(model, _as_plan(plan, repair), method="fold", example_input=example_input, repair_data=repair_data,
               progress=progress, device=device, num_classes=num_classes)

