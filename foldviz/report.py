"""One call that folds (or prunes) a loaded model and measures everything a user asks about."""
from __future__ import annotations

import time
from typing import Callable

import torch

from .data import evaluate, load_dataset, make_loader, sample_inputs
from .fold import FoldResult, fold
from .metrics import compare, variance_ratios
from .models import LoadedModel
from .plans import FoldPlan
from .prune import prune

METHODS = ("none", "r", "ar", "dir", "l1", "l2", "l1+r", "l2+r")
METHOD_LABELS = {"none": "Fold-Naive", "r": "Fold-R", "ar": "Fold-AR", "dir": "Fold-DIR", "l1": "L1 pruning",
                 "l2": "L2 pruning", "l1+r": "L1 pruning + REPAIR", "l2+r": "L2 pruning + REPAIR"}


def needs_data(method: str) -> bool:
    return method in ("r", "l1+r", "l2+r")


def repair_inputs(loaded: LoadedModel, data_spec: str | None, n: int = 512, seed: int = 0) -> torch.Tensor | None:
    """Real inputs for Fold-R / REPAIR: a fixed sample of the training split (None without data)."""
    if not data_spec:
        return None
    return sample_inputs(data_spec, "train", n, card=loaded.card, seed=seed)


def apply_method(loaded: LoadedModel, plan: FoldPlan, method: str, *, repair_data=None, progress=None,
                 device=None) -> FoldResult:
    """Run ``method`` (a repair for folding, or a pruning baseline) with the ratios of ``plan``."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    x = loaded.example_input(1)
    if method.startswith("l"):
        norm = int(method[1])
        return prune(loaded.model, plan, norm=norm, example_input=x, repair="r" if method.endswith("+r") else "none",
                     repair_data=repair_data, progress=progress, device=device)
    return fold(loaded.model, plan, example_input=x, repair=method, repair_data=repair_data, progress=progress,
                device=device, num_classes=loaded.num_classes)


def fold_report(loaded: LoadedModel, result: FoldResult, *, data_spec: str | None = None,
                eval_limit: int | None = None, variance_samples: int = 256, latency: bool = True,
                progress: Callable | None = None) -> dict:
    """JSON-ready report: params/FLOPs/size/latency before and after, accuracy, variance ratios, groups."""
    t = time.perf_counter()
    x = loaded.example_input(1)
    cmp = compare(loaded.model, result.model, x, latency=latency)
    report = {
        "model": loaded.spec, "method": result.method, "label": result.label, "plan": result.plan.to_dict(),
        "params_before": cmp["before"]["params"], "params_after": cmp["after"]["params"],
        "param_sparsity": cmp["param_sparsity"],
        "flops_before": cmp["before"]["flops"], "flops_after": cmp["after"]["flops"], "flops_unit": "FLOPs (2 per MAC), batch 1",
        "size_bytes_before": cmp["before"]["size_bytes"], "size_bytes_after": cmp["after"]["size_bytes"],
        "groups": result.groups, "seconds": dict(result.seconds),
    }
    if latency:
        report.update(latency_ms_before=cmp["before"]["latency_ms"], latency_ms_after=cmp["after"]["latency_ms"])
    if data_spec:
        loader = make_loader(load_dataset(data_spec, "test", card=loaded.card), limit=eval_limit)
        before = evaluate(loaded.model, loader, progress=(lambda d, n: progress("eval", d, 2 * n)) if progress else None)
        after = evaluate(result.model, loader, progress=(lambda d, n: progress("eval", n + d, 2 * n)) if progress else None)
        report.update(accuracy_before=before.accuracy, accuracy_after=after.accuracy, loss_before=before.loss,
                      loss_after=after.loss, eval_samples=after.n, data=data_spec)
        inputs = sample_inputs(data_spec, "test", variance_samples, card=loaded.card, seed=1)
        report["variance_inputs"] = f"{len(inputs)} test samples of {data_spec}"
    else:
        inputs = loaded.example_input(variance_samples, seed=1)
        report["variance_inputs"] = f"{variance_samples} standard-normal inputs (no data given)"
    notes: list = []
    try:  # optional measurement: a failure is recorded in the report, never loses the fold
        report["variance_ratio"] = variance_ratios(loaded.model, result.model, inputs, result.channel_maps,
                                                   notes=notes)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:
        report["variance_ratio"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
    if notes:
        report["variance_notes"] = notes[:50]
    for side in ("before", "after"):  # failed FLOPs / latency: {"error": ...} in place of the number
        for key, msg in cmp[side].get("errors", {}).items():
            report[f"{key}_{side}"] = {"error": msg}
    report["seconds"]["report"] = time.perf_counter() - t
    return report
