"""The one fold report: what the CLI writes as ``report.json``, the app shows and downloads, benchmarks read.

Every report has every key of :data:`REPORT_KEYS` (``None`` where a measurement was not asked for or is not
possible, e.g. accuracy without data), so reports from different entry points compare key by key.
"""
from __future__ import annotations

import csv
import gc
import io
import json
import time

import torch

from .data import evaluate, load_dataset, make_loader, sample_inputs
from .methods import METHODS, VARIANCE_SAMPLES
from .metrics import compare, variance_ratios
from .surgery import FoldResult
from .utils import Progress, json_default, state_dict_hash
from .zoo import LoadedModel

REPORT_VERSION = 1
REPORT_KEYS = (
    "report_version", "model", "weights_sha256", "method", "label", "family", "plan", "data", "eval_samples",
    "params_before", "params_after", "param_sparsity", "flops_before", "flops_after", "flops_unit",
    "size_bytes_before", "size_bytes_after", "latency", "accuracy_before", "accuracy_after", "loss_before",
    "loss_after", "variance_inputs", "variance_ratio", "variance_notes", "groups", "seconds", "repair_samples",
    "perplexity_before", "perplexity_after",
)
# language models (foldviz.lm): ``data`` is the evaluation text spec, ``accuracy_*``/``flops_*``/``latency`` are None,
# ``perplexity_*`` are foldviz.lm.perplexity results ({"perplexity", "windows", "seq_len", "protocol", ...}),
# ``variance_ratio`` holds one row per decoder layer: Var(folded MLP output) / Var(original MLP output), and a
# group's ``channels_*`` count its units (MLP neurons or query heads)
GROUP_COLUMNS = ("id", "channels_before", "channels_after", "ratio", "inertia", "n_iter", "foldable", "reason")


def variance_inputs(loaded: LoadedModel, data_spec: str | None, n: int = VARIANCE_SAMPLES) -> tuple[torch.Tensor, str]:
    """Inputs on which activation variances are compared, and a sentence saying what they are."""
    if data_spec:
        x = sample_inputs(data_spec, "test", n, card=loaded.card, seed=1)
        return x, f"{len(x)} test samples of {data_spec}"
    return loaded.example_input(n, seed=1), f"{n} standard-normal inputs (no data given)"


def evaluate_on(model, loaded: LoadedModel, data_spec: str, eval_limit: int | None, progress=None) -> dict:
    """Accuracy, loss and sample count of ``model`` on the test split of ``data_spec``."""
    loader = make_loader(load_dataset(data_spec, "test", card=loaded.card), limit=eval_limit)
    ev = evaluate(model, loader, progress=progress)
    return {"accuracy": ev.accuracy, "loss": ev.loss, "samples": ev.n}


class _Skipped(Exception):
    """An optional measurement the caller switched off."""


def build_report(loaded: LoadedModel, result: FoldResult, *, data_spec: str | None = None,
                 eval_limit: int | None = None, variance_samples: int = VARIANCE_SAMPLES, latency: bool = True,
                 baseline: dict | None = None, progress: Progress = None) -> dict:
    """The report of one fold. ``baseline`` (an :func:`evaluate_on` result for the original model on the same
    data) saves re-evaluating it; ``latency=False`` skips the timing."""
    t = time.perf_counter()
    gc.collect()  # the fold's traced dependency graphs are reference cycles holding tensors: free them first
    cmp = compare(loaded.model, result.model, loaded.example_input(1), latency=latency)
    m = METHODS[result.method]
    report = dict.fromkeys(REPORT_KEYS)
    report.update({
        "report_version": REPORT_VERSION, "model": loaded.spec, "weights_sha256": state_dict_hash(loaded.model),
        "method": m.key, "label": m.label, "family": m.family, "plan": result.plan.to_dict(), "data": data_spec,
        "params_before": cmp["before"]["params"], "params_after": cmp["after"]["params"],
        "param_sparsity": cmp["param_sparsity"], "flops_before": cmp["before"]["flops"],
        "flops_after": cmp["after"]["flops"], "flops_unit": "FLOPs (2 per MAC), batch 1",
        "size_bytes_before": cmp["before"]["size_bytes"], "size_bytes_after": cmp["after"]["size_bytes"],
        "latency": cmp.get("latency"), "groups": [{c: g.get(c) for c in GROUP_COLUMNS} for g in result.groups],
        "seconds": dict(result.seconds), "repair_samples": result.repair_samples,
    })
    if data_spec:
        cb = (lambda d, n: progress("evaluate", d, n)) if progress else None
        before = baseline or evaluate_on(loaded.model, loaded, data_spec, eval_limit)
        after = evaluate_on(result.model, loaded, data_spec, eval_limit, progress=cb)
        report.update(accuracy_before=before["accuracy"], accuracy_after=after["accuracy"],
                      loss_before=before["loss"], loss_after=after["loss"], eval_samples=after["samples"])
    notes: list[str] = []
    if variance_samples <= 0:
        notes.append("variance measurement skipped (variance_samples=0)")
    try:  # an optional measurement: a failure is recorded in the report and never loses the fold
        if variance_samples <= 0:
            raise _Skipped
        inputs, report["variance_inputs"] = variance_inputs(loaded, data_spec, variance_samples)
        report["variance_ratio"] = variance_ratios(loaded.model, result.model, inputs, result.channel_maps,
                                                   notes=notes)
    except (KeyboardInterrupt, MemoryError):
        raise
    except _Skipped:
        report["variance_ratio"] = None
    except Exception as exc:  # noqa: BLE001
        report["variance_ratio"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
    report["variance_notes"] = notes[:50]
    for side in ("before", "after"):  # a failed FLOPs count: {"error": ...} in place of the number
        for key, msg in cmp[side].get("errors", {}).items():
            report[f"{key}_{side}"] = {"error": msg}
    report["seconds"]["report"] = time.perf_counter() - t
    return report


def build_lm_report(spec: str, weights_sha256: str, result, *, text: str | None = None,
                    ppl_before: dict | None = None, ppl_after: dict | None = None,
                    variance: list[dict] | None = None, size_bytes: tuple[int, int] | None = None) -> dict:
    """The report of one language-model fold (a :class:`foldviz.lm.LMFoldResult`), in the same schema."""
    m = METHODS[result.method]
    report = dict.fromkeys(REPORT_KEYS)
    report.update({
        "report_version": REPORT_VERSION, "model": spec, "weights_sha256": weights_sha256, "method": m.key,
        "label": m.label, "family": m.family, "plan": result.plan.to_dict(), "data": text,
        "params_before": result.params_before, "params_after": result.params_after,
        "param_sparsity": result.removed_fraction, "flops_unit": "not measured for language models",
        "size_bytes_before": size_bytes[0] if size_bytes else None,
        "size_bytes_after": size_bytes[1] if size_bytes else None,
        "groups": [{"id": g["id"], "channels_before": g["n_before"], "channels_after": g["n_after"],
                    "ratio": g["ratio"], "inertia": g["inertia"], "n_iter": None, "foldable": True, "reason": None}
                   for g in result.groups],
        "seconds": dict(result.seconds), "repair_samples": 0, "perplexity_before": ppl_before,
        "perplexity_after": ppl_after, "variance_ratio": variance,
        "variance_inputs": f"tokens of {text}" if variance is not None and text else None,
        "variance_notes": list(result.notes),
    })
    if ppl_after is not None:
        report["eval_samples"] = ppl_after.get("tokens_scored")
    return report


def report_json(report: dict) -> str:
    return json.dumps(report, indent=2, default=json_default, allow_nan=False) + "\n"


def report_csv(report: dict) -> str:
    """Per-group CSV of a report."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=GROUP_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for g in report["groups"]:
        w.writerow({c: ("" if g.get(c) is None else g.get(c)) for c in GROUP_COLUMNS})
    return buf.getvalue()
