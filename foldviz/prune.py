"""Structured magnitude pruning baselines (L1 / L2), on the same channel groups and ratios as folding.

Channels are ranked by the Ln norm of their fan-in rows (summed over every conv/linear producer of the group)
and the lowest are removed physically, so folding and pruning are compared at equal parameter counts. With
``repair="r"`` the BatchNorm statistics are then recomputed on data (the paper's "SP + REPAIR").
"""
from __future__ import annotations

import torch
from torch import nn

from .fold import FoldResult, Progress, _as_plan, run
from .plans import FoldPlan  # noqa: F401  (type of ``plan``)


def prune(model: nn.Module, plan: FoldPlan | float = 0.5, *, norm: int = 1, example_input: torch.Tensor,
          repair: str | None = None, repair_data: torch.Tensor | None = None, progress: Progress = None,
          device=None) -> FoldResult:
    """Magnitude-prune a copy of ``model``: ``norm`` 1 or 2, ``repair`` "none" or "r"."""
    if norm not in (1, 2):
        raise ValueError(f"norm must be 1 or 2, got {norm}")
    return run(model, _as_plan(plan, repair), method=f"l{norm}", example_input=example_input, repair_data=repair_data,
               progress=progress, device=device)
