"""Run any registered method on a loaded model of any kind: the dispatch behind the CLI, the app, sweeps and
benchmarks."""
from __future__ import annotations

import torch

from .data import sample_inputs
from .fold import fold
from .ifm import ifm
from .kinds import kind_of
from .methods import DEFAULT_REPAIR_SAMPLES, get_method, keys_for, plan_method
from .plans import FoldPlan
from .prune import prune
from .surgery import FoldResult
from .utils import Progress
from .zoo import LoadedModel


def repair_inputs(loaded: LoadedModel, data_spec: str | None, n: int = DEFAULT_REPAIR_SAMPLES,
                  seed: int = 0) -> torch.Tensor | None:
    """Real inputs for Fold-R / REPAIR: a fixed sample of the training split (None without data)."""
    if not data_spec or loaded.kind != "cnn":
        return None
    return sample_inputs(data_spec, "train", n, card=loaded.card, seed=seed)


def apply_method(loaded: LoadedModel, plan: FoldPlan, method: str | None = None, *,
                 repair_data: torch.Tensor | None = None, progress: Progress = None, device=None,
                 inplace: bool = False) -> FoldResult:
    """Run ``method`` (a key of :data:`foldviz.methods.METHODS`; default: the fold ``plan`` names, i.e. its repair,
    :func:`foldviz.methods.plan_method`) with the ratios, seed and settings of ``plan`` on a model of any kind.
    ``inplace`` folds ``loaded.model`` itself (to save memory; the caller gives it up)."""
    kind = kind_of(loaded)
    m = get_method(plan_method(kind.key, plan.repair) if method is None else method)
    if kind.key not in m.applies_to:
        raise ValueError(f"{m.label} does not apply to {kind.a_label}; methods for it: "
                         f"{', '.join(keys_for(kind.key))}")
    if m.needs_data and repair_data is None:
        raise ValueError(f"{m.label} needs real data for its repair: pick a dataset (--data SPEC)")
    x = loaded.example_input(1)
    common = dict(example_input=x, progress=progress, device=device, kind=kind.structure, inplace=inplace)
    if m.family == "prune":
        return prune(loaded.model, plan, importance=m.importance, repair=m.repair, repair_data=repair_data,
                     method=m.key, **common)
    if m.family == "merge":
        return ifm(loaded.model, plan, example_input=x, progress=progress, device=device)
    return fold(loaded.model, plan, repair=m.repair, repair_data=repair_data, num_classes=loaded.num_classes,
                method=m.key, **common)
