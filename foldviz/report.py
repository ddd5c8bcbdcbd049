"""The one fold report, for every model kind: what the CLI writes as ``report.json``, the app shows and downloads,
benchmarks read.

Every report has every key of :data:`REPORT_KEYS` (``None`` where a measurement was not asked for or is not
possible, e.g. accuracy without data), so reports from different entry points compare key by key.
"""
from __future__ import annotations

import csv
import gc
import io
import json
import time


from .kinds import kind_of
from .methods import METHODS, VARIANCE_SAMPLES
from .metrics import compare, summary
from .surgery import FoldResult
from .utils import Progress, json_default, state_dict_hash
from .zoo import LoadedModel

REPORT_VERSION = 2
REPORT_KEYS = (
    "report_version", "kind", "model", "weights_sha256", "method", "label", "family", "plan", "data", "eval_samples",
    "eval_protocol", "params_before", "params_after", "param_sparsity", "flops_before", "flops_after", "flops_unit",
    "size_bytes_before", "size_bytes_after", "latency", "accuracy_before", "accuracy_after", "loss_before",
    "loss_after", "perplexity_before", "perplexity_after", "variance_inputs", "variance_ratio", "variance_notes",
    "notes", "groups", "seconds", "repair_samples", "proxy",
)
# image classifiers fill accuracy_*; language models perplexity_* (loss_* is the mean cross-entropy for both), and
# their variance_ratio rows are per decoder layer: Var(folded MLP output) / Var(original MLP output); a group's
# channels_* count its units (channels, MLP neurons or query heads, see "unit")
GROUP_COLUMNS = ("id", "unit", "channels_before", "channels_after", "ratio", "inertia", "n_iter", "foldable", "reason")


def evaluate_on(model, loaded: LoadedModel, data_spec: str, eval_limit: int | None, progress=None) -> dict:
    """The kind's evaluation of ``model`` on ``data_spec``: {"accuracy" or "perplexity", "loss", "samples", ...}."""
    return kind_of(loaded).evaluate(loaded, model, data_spec, eval_limit, progress=progress)


class _Skipped(Exception):
    """An optional measurement the caller switched off."""


def measure_before(loaded: LoadedModel) -> dict:
    """What the report needs of the original model (parameters, FLOPs, size): measured before an in-place fold."""
    return summary(loaded.model, kind_of(loaded).cost_input(loaded))


def build_report(loaded: LoadedModel, result: FoldResult, *, data_spec: str | None = None,
                 eval_limit: int | None = None, variance_samples: int = VARIANCE_SAMPLES, latency: bool = True,
                 baseline: dict | None = None, progress: Progress = None, weights_sha256: str | None = None,
                 before: dict | None = None) -> dict:
    """The report of one fold, for a model of any kind. ``baseline`` (an :func:`evaluate_on` result for the
    original model on the same data) and ``weights_sha256`` (of the original) save recomputing them;
    ``latency=False`` skips the timing. ``before`` (:func:`measure_before`) is given when the model was folded in
    place: ``loaded.model`` is then the folded model, so latency and variance (which need both) must be off."""
    t = time.perf_counter()
    kind = kind_of(loaded)
    gc.collect()  # the fold's traced dependency graphs are reference cycles holding tensors: free them first
    if before is not None:
        if latency or variance_samples > 0 or baseline is None and data_spec:
            raise ValueError("a fold made in place has no original model: pass latency=False, variance_samples=0 "
                             "and the baseline evaluation")
        after = summary(result.model, kind.cost_input(loaded))
        cmp = {"before": before, "after": after, "param_sparsity": 1 - after["params"] / before["params"]}
    else:
        cmp = compare(loaded.model, result.model, kind.cost_input(loaded), latency=latency)
    m = METHODS[result.method]
    report = dict.fromkeys(REPORT_KEYS)
    report.update({
        "report_version": REPORT_VERSION, "kind": kind.key, "model": loaded.spec,
        "weights_sha256": weights_sha256 or (state_dict_hash(loaded.model) if before is None else None), "method": m.key, "label": m.label,
        "family": m.family, "plan": result.plan.to_dict(), "data": data_spec,
        "params_before": cmp["before"]["params"], "params_after": cmp["after"]["params"],
        "param_sparsity": cmp["param_sparsity"], "flops_before": cmp["before"]["flops"],
        "flops_after": cmp["after"]["flops"], "flops_unit": kind.flops_unit,
        "size_bytes_before": cmp["before"]["size_bytes"], "size_bytes_after": cmp["after"]["size_bytes"],
        "latency": cmp.get("latency"), "groups": [{c: g.get(c) for c in GROUP_COLUMNS} for g in result.groups],
        "seconds": dict(result.seconds), "repair_samples": result.repair_samples, "notes": list(result.notes),
        "proxy": dict(result.proxy) if result.proxy else None,  # Fold-DFR: what its data-free proxy was, where from
    })
    if data_spec:
        cb = (lambda d, n: progress("evaluate", d, n)) if progress else None
        before = baseline or evaluate_on(loaded.model, loaded, data_spec, eval_limit)
        after = evaluate_on(result.model, loaded, data_spec, eval_limit, progress=cb)
        report.update({f"{kind.metric}_before": before[kind.metric], f"{kind.metric}_after": after[kind.metric],
                       "loss_before": before["loss"], "loss_after": after["loss"], "eval_samples": after["samples"],
                       "eval_protocol": after.get("protocol")})
    notes: list[str] = []
    if variance_samples <= 0:
        notes.append("variance measurement skipped (variance_samples=0)")
    try:  # an optional measurement: a failure is recorded in the report and never loses the fold
        if variance_samples <= 0:
            raise _Skipped
        rows, report["variance_inputs"] = kind.variance(loaded, loaded.model, result.model, result, data_spec,
                                                        variance_samples, notes=notes)
        report["variance_ratio"] = rows
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
