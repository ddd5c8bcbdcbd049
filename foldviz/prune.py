"""Structured pruning baselines on the same channel groups and ratios as folding.

Channels are ranked by a pluggable :class:`Importance` and the lowest are removed physically, so folding and
pruning are compared at equal parameter counts. With ``repair="r"`` the BatchNorm statistics are then
recomputed on data (the paper's "SP + REPAIR").
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .fold import as_plan
from .features import feature_blocks
from .groups import CONV_TYPES, ChannelGroup
from .kmeans import gram_cols
from .plans import FoldPlan
from .repair import RepairContext
from .surgery import Decision, FoldResult, compress
from .utils import Progress


class Importance:
    """Scores the channels of a group; the ``k`` highest are kept. Subclass and register to add one."""

    key = "?"

    def __call__(self, model: nn.Module, group: ChannelGroup, seed: int) -> torch.Tensor:
        raise NotImplementedError

    def scores(self, ctx: RepairContext, group: ChannelGroup, seed: int) -> torch.Tensor:
        """(units,) scores of ``group`` during a compression (default: from the unmerged working copy's weights)."""
        return self(ctx.work, group, seed)


class MagnitudeImportance(Importance):
    """Ln norm of each channel's fan-in rows, summed over the group's conv/linear producers."""

    def __init__(self, p: int):
        self.p, self.key = p, f"l{p}"

    def __call__(self, model, group, seed):
        modules = dict(model.named_modules())
        imp = torch.zeros(group.channels, dtype=torch.float64)
        for mem in group.members:
            m = modules.get(mem.module)
            if mem.side != "out" or not isinstance(m, (nn.Linear,) + CONV_TYPES):
                continue
            rows = m.weight.detach().double().cpu().index_select(0, torch.as_tensor(mem.idxs)).flatten(1)
            norms = rows.abs().sum(1) if self.p == 1 else rows.pow(2).sum(1).sqrt()
            imp.index_add_(0, torch.as_tensor(mem.root_idxs), norms)
        return imp


class FeatureNormImportance(Importance):
    """L2 norm of each unit's whole feature vector: every row it owns on the producing side and every column on the
    consuming side (an MLP neuron's gate row, up row and down column), accumulated block by block."""

    key = "feature-l2"

    def __call__(self, model, group, seed):
        sq = torch.zeros(group.channels, dtype=torch.float64)
        for blk in feature_blocks(model, group, gram_cols(group.channels)):
            sq += blk.double().pow(2).sum(1).cpu()
        return sq.sqrt()


class RandomImportance(Importance):
    """Uniformly random scores (seeded): the floor any informed criterion must beat."""

    key = "random"

    def __call__(self, model, group, seed):
        rng = np.random.default_rng([seed, group.channels])
        return torch.as_tensor(rng.random(group.channels))


class CalibrationImportance(Importance):
    """A language model's units scored from their output projection's input on calibration text (the compression's
    ``repair_data``: token windows): ``"wanda-sp"`` or ``"flap"`` (:mod:`foldviz.lm.calib`). The statistics are
    measured once per compression, on the unmerged model, and shared with FLAP's bias compensation."""

    def __init__(self, key: str):
        self.key = key

    def __call__(self, model, group, seed):
        raise ValueError(f"importance {self.key!r} needs calibration statistics: it scores units inside a "
                         "compression (prune with repair_data = calibration token windows)")

    def scores(self, ctx, group, seed):
        from .lm.calib import CALIBRATION_SCORES, context_stats

        if self.key not in ctx.scores:   # every group's scores at once, from one pass over the unmerged model
            ctx.scores[self.key] = CALIBRATION_SCORES[self.key](ctx.work, context_stats(ctx))
        scores = ctx.scores[self.key]
        if group.id not in scores:
            raise ValueError(f"{self.key} scores MLP neurons and query heads of a language model; {group.id} is "
                             "neither")
        return torch.as_tensor(scores[group.id])


IMPORTANCES: dict[str, Importance] = {i.key: i for i in (MagnitudeImportance(1), MagnitudeImportance(2),
                                                         FeatureNormImportance(), RandomImportance(),
                                                         CalibrationImportance("wanda-sp"),
                                                         CalibrationImportance("flap"))}

#: the repairs a pruning baseline may run: none, REPAIR ("r", image classifiers), FLAP's bias compensation ("flap")
PRUNE_REPAIRS = ("none", "r", "flap")


def top_k(scores: torch.Tensor, group: ChannelGroup, k: int) -> list[int]:
    """The ``k`` highest-scoring units of each partition of ``group`` (ties: the lower index), sorted."""
    per, keep = group.per_partition, []
    for j in range(group.partitions):
        part = scores[j * per:(j + 1) * per]
        keep += (torch.argsort(part, descending=True, stable=True)[:k] + j * per).tolist()
    return sorted(keep)


def prune(model: nn.Module, plan: FoldPlan | float = 0.5, *, importance: str | Importance = "l1",
          example_input: torch.Tensor, repair: str = "none", repair_data: torch.Tensor | None = None,
          progress: Progress = None, device=None, method: str | None = None, norm: int | None = None, kind=None,
          inplace: bool = False) -> FoldResult:
    """Prune a copy of ``model`` with ``plan``'s ratios: ``importance`` "l1", "l2", "random" or an
    :class:`Importance`; ``repair`` "none" or "r". ``method`` is the registry key recorded in the result.
    ``norm`` (1 or 2) is the deprecated spelling of ``importance="l1"/"l2"``."""
    if norm is not None:
        if norm not in (1, 2):
            raise ValueError(f"norm must be 1 or 2, got {norm}")
        importance = f"l{norm}"
    imp = IMPORTANCES[importance] if isinstance(importance, str) else importance
    if repair not in PRUNE_REPAIRS:
        raise ValueError(f"repair: pruning baselines support {', '.join(map(repr, PRUNE_REPAIRS))}, not {repair!r}")

    def select(ctx: RepairContext, group: ChannelGroup, k: int) -> Decision:
        seed = ctx.plan.seed + int(group.info.get("seed_offset", 0))
        return Decision(keep=top_k(imp.scores(ctx, group, seed), group, k))

    key = method or imp.key + ("+r" if repair == "r" else "")
    return compress(model, as_plan(plan, repair), select, method=key, repair=repair, example_input=example_input,
                    repair_data=repair_data, progress=progress, device=device, kind=kind, inplace=inplace)
