"""Coupled channel groups, discovered from the model's autograd graph with Torch-Pruning's DependencyGraph.

A *channel group* is a set of channels that must be folded together: the output channels of every producer
(conv/linear rows, BatchNorm, depthwise convs) joined by residual adds or concatenations, and the matching input
channels of every consumer. One group = one clustering problem. This module only describes groups; the
operations on them live in ``fold``/``prune``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch_pruning as tp
from torch import nn

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_SUPPORTED = CONV_TYPES + BN_TYPES + (nn.Linear,)


class GroupError(ValueError):
    """A group id or graph query that cannot be answered."""


@dataclass
class Member:
    """One module touched by a group. ``side`` is "out" (its output channels are the group's) or "in"."""

    module: str
    side: str
    type: str
    idxs: list[int] = field(repr=False)        # indices in this module's own channel axis
    root_idxs: list[int] = field(repr=False)   # the group channel each index belongs to


@dataclass
class ChannelGroup:
    """Units (channels, neurons or heads) that fold together, with every tensor slice they own.

    Every model kind describes its groups this way, so features, clustering and the merge rule are one code path:
    a conv channel owns a producer row and a consumer column; an MLP neuron owns a gate row, an up row and a down
    column; a query head owns ``head_dim`` q rows and ``head_dim`` o columns. ``partitions`` splits the units into
    that many equal contiguous blocks that are clustered separately with the same k each (the query heads of one
    KV group); 1 for everything else.
    """

    id: str
    channels: int                       # units in the group
    producers: list[str]
    consumers: list[str]
    foldable: bool
    reason: str | None
    root_type: str
    first_conv: str | None
    has_bn: bool
    members: list[Member] = field(default_factory=list, repr=False)
    unit: str = "channel"               # what one unit is: "channel", "neuron", "head"
    partitions: int = 1                 # equal contiguous blocks clustered separately (KV groups of query heads)
    layer: int | None = None            # decoder layer (language models)
    role: str = "conv"                  # "conv" (channel groups of a traced network), "mlp", "heads", "other"
    info: dict = field(default_factory=dict)   # kind-specific facts shown to users (head_dim, KV groups, ...)

    @property
    def per_partition(self) -> int:
        return self.channels // self.partitions

    def partition(self, j: int) -> "ChannelGroup":
        """The group restricted to partition ``j`` (units ``j*per .. (j+1)*per - 1``, renumbered from 0)."""
        if self.partitions == 1:
            return self
        per = self.per_partition
        lo, hi = j * per, (j + 1) * per
        members = []
        for m in self.members:
            keep = [(i, r - lo) for i, r in zip(m.idxs, m.root_idxs) if lo <= r < hi]
            members.append(Member(m.module, m.side, m.type, [i for i, _ in keep], [r for _, r in keep]))
        return ChannelGroup(f"{self.id}#{j}", per, self.producers, self.consumers, self.foldable, self.reason,
                            self.root_type, self.first_conv, self.has_bn, members, self.unit, 1, self.layer,
                            self.role, self.info)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("members")
        return d


@dataclass
class GroupGraph:
    """All channel groups of a model plus the traced dependency graph they came from."""

    groups: list[ChannelGroup]
    dg: tp.DependencyGraph | None = field(repr=False)   # None for kinds whose groups come from their layout
    model: nn.Module = field(repr=False)
    output_layers: list[str] = field(default_factory=list)
    error: str | None = None
    kind: str = "cnn"

    @property
    def by_id(self) -> dict[str, ChannelGroup]:
        return {g.id: g for g in self.groups}

    @property
    def foldable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.foldable]

    def get(self, group_id: str) -> ChannelGroup:
        try:
            return self.by_id[group_id]
        except KeyError:
            raise GroupError(f"unknown group id {group_id!r}; known ids: {', '.join(self.by_id) or '(none)'}") from None

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)


def _is_grouped(m: nn.Module) -> bool:
    return isinstance(m, CONV_TYPES) and 1 < m.groups


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, CONV_TYPES) and m.groups == m.in_channels == m.out_channels and m.groups > 1


def _output_layers(dg: tp.DependencyGraph, names: dict) -> list[nn.Module]:
    """Parametrised layers whose output reaches the model output without passing another parametrised layer."""
    out = []
    for mod, node in dg.module2node.items():
        if not isinstance(mod, (nn.Linear,) + CONV_TYPES) or mod not in names:
            continue
        stack, seen, reaches_param = list(node.outputs), set(), False
        while stack:
            n = stack.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            if isinstance(n.module, nn.Module) and n.module in names and any(True for _ in n.module.parameters(recurse=False)):
                reaches_param = True
                break
            stack.extend(n.outputs)
        if not reaches_param:
            out.append(mod)
    return out


def _out_width(m: nn.Module) -> int | None:
    if isinstance(m, nn.Linear):
        return m.out_features
    if isinstance(m, CONV_TYPES):
        return m.out_channels
    if isinstance(m, BN_TYPES):
        return m.num_features
    return None


def _check_foldable(members: list[Member], modules: dict[str, nn.Module], n: int) -> str | None:
    for mem in members:
        m = modules[mem.module]
        if not isinstance(m, _SUPPORTED):
            return f"member {mem.module} is a {type(m).__name__}, which foldviz cannot merge"
        if mem.side == "out" and len(set(mem.idxs)) != _out_width(m):
            # e.g. torch.split/chunk of a conv's output (CSPNet): the forward pass slices by fixed sizes and the
            # surgery addresses a group through its whole first producer
            return (f"the output of {mem.module} is split between several channel groups (torch.split/chunk); "
                    "foldviz folds whole layer outputs only")
        if _is_grouped(m) and not _is_depthwise(m):
            return f"{mem.module} is a grouped convolution (groups={m.groups}): clusters would cross groups"
        if isinstance(m, CONV_TYPES) and getattr(m, "transposed", False):
            return f"{mem.module} is a transposed convolution"
        counts: dict[int, int] = {}
        for r in mem.root_idxs:
            counts[r] = counts.get(r, 0) + 1
        if len(counts) != n or len(set(counts.values())) != 1:
            return f"channel mapping into {mem.module} is not one-to-one per channel (shuffle or reshape)"
    return None


def _members(group, names: dict, dg: tp.DependencyGraph) -> list[Member]:
    seen, members = set(), []
    for item in group:
        mod = item.dep.target.module
        if not isinstance(mod, nn.Module) or mod not in names:
            if isinstance(mod, nn.Parameter):
                members.append(Member("<parameter>", "out", "Parameter", list(item.idxs), list(item.root_idxs)))
            continue
        side = "out" if dg.is_out_channel_pruning_fn(item.dep.handler) else "in"
        key = (names[mod], side)
        if key in seen:
            continue
        seen.add(key)
        members.append(Member(names[mod], side, type(mod).__name__, list(item.idxs), list(item.root_idxs)))
    return members


def _drop_saved(_tensor: torch.Tensor) -> None:
    return None


def _no_backward(_packed) -> None:
    raise RuntimeError("foldviz traces the model for its structure only; no backward pass through the trace")


def build_dependency_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """Trace ``model``; any failure becomes a GroupError that says the model cannot be folded as a whole."""
    try:
        # the graph keeps the autograd nodes it needs (shapes, dims), but never backpropagates: drop the saved
        # activations as they are recorded, so a 224x224 trace does not hold every layer's output in memory
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_drop_saved, _no_backward):
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_input, verbose=False)
    except Exception as exc:  # tracing can fail on exotic models (channel shuffles, dynamic control flow)
        raise GroupError(f"could not trace the model's channel dependencies ({type(exc).__name__}: {exc}); "
                         "no group of it can be folded") from exc


def find_groups(model: nn.Module, example_input: torch.Tensor, dg: tp.DependencyGraph | None = None) -> GroupGraph:
    """Trace ``model`` on ``example_input`` and return its channel groups, in model order.

    Groups touching the model input or the classifier outputs are never listed as foldable; groups that cannot
    be merged safely (grouped convs, channel shuffles, unsupported layers) are listed with the reason.
    """
    names = {m: n for n, m in model.named_modules() if n}
    order = {n: i for i, n in enumerate(names.values())}
    was_training = model.training
    model.eval()
    try:
        dg = dg or build_dependency_graph(model, example_input)
    except GroupError as exc:
        model.train(was_training)
        return GroupGraph([], None, model, [], error=str(exc))
    model.train(was_training)
    outputs = _output_layers(dg, names)
    modules = dict(model.named_modules())
    groups: list[ChannelGroup] = []
    for g in dg.get_all_groups(ignored_layers=outputs, root_module_types=(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        members = _members(g, names, dg)
        n = len(g[0].idxs)
        producers = sorted({m.module for m in members if m.side == "out"}, key=lambda s: order.get(s, 1e9))
        consumers = sorted({m.module for m in members if m.side == "in"}, key=lambda s: order.get(s, 1e9))
        weighted = [p for p in producers if isinstance(modules.get(p), (nn.Linear,) + CONV_TYPES)]
        gid = weighted[0] if weighted else producers[0]
        reason = None if "<parameter>" not in producers else "a bare nn.Parameter is coupled to these channels"
        reason = reason or _check_foldable(members, modules, n)
        if n < 2 and reason is None:
            reason = "a single channel cannot be folded"
        first_conv = next((p for p in weighted if isinstance(modules[p], nn.Conv2d) and not _is_grouped(modules[p])), None)
        groups.append(ChannelGroup(
            id=gid, channels=n, producers=producers, consumers=consumers, foldable=reason is None, reason=reason,
            root_type=type(modules[gid]).__name__ if gid in modules else "Parameter", first_conv=first_conv,
            has_bn=any(isinstance(modules.get(p), BN_TYPES) for p in producers), members=members,
        ))
    groups.sort(key=lambda grp: order.get(grp.id, 1e9))
    return GroupGraph(groups, dg, model, [names[m] for m in outputs])


def root_handler(dg: tp.DependencyGraph, module: nn.Module):
    """The out-channel pruning function Torch-Pruning uses for ``module``."""
    if _is_depthwise(module):
        return tp.prune_depthwise_conv_out_channels
    return dg.get_pruner_of_module(module).prune_out_channels
