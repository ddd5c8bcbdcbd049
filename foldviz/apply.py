"""Run any registered method on a loaded model of any kind: the dispatch behind the CLI, the app, sweeps and
benchmarks."""
from __future__ import annotations

import torch

from .data import sample_inputs
from .fold import fold
from .ifm import ifm
from .kinds import kind_of
from .methods import DEFAULT_CALIB_SAMPLES, DEFAULT_REPAIR_SAMPLES, get_method, keys_for, plan_method
from .plans import FoldPlan
from .prune import prune
from .surgery import FoldResult
from .utils import Progress
from .zoo import LoadedModel


def repair_inputs(loaded: LoadedModel, data_spec: str | None, n: int | None = None, seed: int = 0, *,
                  seqlen: int | None = None) -> torch.Tensor | None:
    """The real data a method that needs data gets as ``repair_data`` (None without a spec).

    Image classifiers: ``n`` inputs (default :data:`~foldviz.methods.DEFAULT_REPAIR_SAMPLES`) of ``data_spec``'s
    training split, (n, C, H, W). Language models: ``n`` calibration windows (default
    :data:`~foldviz.methods.DEFAULT_CALIB_SAMPLES`) of ``seqlen`` tokens (default: the model's context length) at
    seeded positions of the text ``data_spec`` (:func:`foldviz.lm.calib.calibration_windows`), (n, seqlen) long.
    """
    if not data_spec:
        return None
    if loaded.kind == "lm":
        from .lm.calib import calibration_windows

        if getattr(loaded, "tokenizer", None) is None:
            raise ValueError(f"{loaded.spec} has no tokenizer.json: calibration text needs one")
        seqlen = int(seqlen or loaded.context_length)
        if seqlen > loaded.context_length:
            raise ValueError(f"--calib-seqlen {seqlen} exceeds the model's context length {loaded.context_length}")
        return calibration_windows(loaded.tokenizer, data_spec, int(n or DEFAULT_CALIB_SAMPLES), seqlen, seed=seed)
    if seqlen is not None:
        raise ValueError("a calibration sequence length applies to language models only")
    return sample_inputs(data_spec, "train", int(n or DEFAULT_REPAIR_SAMPLES), card=loaded.card, seed=seed)


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
        raise ValueError(f"{m.label} needs calibration text: pass token windows of a text disjoint from the "
                         "evaluation text (--calib TEXT_SPEC)" if kind.key == "lm" else
                         f"{m.label} needs real data for its repair: pick a dataset (--data SPEC)")
    x = loaded.example_input(1)
    common = dict(example_input=x, progress=progress, device=device, kind=kind.structure, inplace=inplace)
    if m.family == "prune":
        return prune(loaded.model, plan, importance=m.importance, repair=m.repair, repair_data=repair_data,
                     method=m.key, **common)
    if m.family == "merge":
        return ifm(loaded.model, plan, example_input=x, progress=progress, device=device)
    return fold(loaded.model, plan, repair=m.repair, repair_data=repair_data, num_classes=loaded.num_classes,
                method=m.key, **common)
