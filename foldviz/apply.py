"""Run any registered method on a loaded model: the dispatch behind the CLI, the app, sweeps and benchmarks."""
from __future__ import annotations

import torch

from .data import sample_inputs
from .fold import fold
from .ifm import ifm
from .methods import DEFAULT_REPAIR_SAMPLES, get_method
from .plans import FoldPlan
from .prune import prune
from .surgery import FoldResult
from .utils import Progress
from .zoo import LoadedModel



def repair_inputs(loaded: LoadedModel, data_spec: str | None, n: int = DEFAULT_REPAIR_SAMPLES,
                  seed: int = 0) -> torch.Tensor | None:
    """Real inputs for Fold-R / REPAIR: a fixed sample of the training split (None without data)."""
    if not data_spec:
        return None
    return sample_inputs(data_spec, "train", n, card=loaded.card, seed=seed)


def apply_method(loaded: LoadedModel, plan: FoldPlan, method: str, *, repair_data: torch.Tensor | None = None,
                 progress: Progress = None, device=None) -> FoldResult:
    """Run ``method`` (a key of :data:`foldviz.methods.METHODS`) with the ratios, seed and settings of ``plan``."""
    m = get_method(method)
    if "cnn" not in m.applies_to:
        raise ValueError(f"{m.label} is a language-model method: fold LMs with foldviz.lm.fold_lm")
    if m.needs_data and repair_data is None:
        raise ValueError(f"{m.label} needs real data for its repair: pick a dataset (--data SPEC)")
    x = loaded.example_input(1)
    if m.family == "prune":
        return prune(loaded.model, plan, importance=m.importance, repair=m.repair, example_input=x,
                     repair_data=repair_data, progress=progress, device=device, method=m.key)
    if m.family == "merge":
        return ifm(loaded.model, plan, example_input=x, progress=progress, device=device)
    return fold(loaded.model, plan, example_input=x, repair=m.repair, repair_data=repair_data, progress=progress,
                device=device, num_classes=loaded.num_classes)
