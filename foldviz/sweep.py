"""Accuracy against parameter sparsity for several methods: the paper's main comparison."""
from __future__ import annotations

import csv
import io
import time
from typing import Callable

from .data import evaluate, load_dataset, make_loader
from .metrics import count_params
from .models import LoadedModel
from .kmeans import DEFAULT_CLUSTERING
from .plans import FoldPlan
from .apply import DEFAULT_REPAIR_SAMPLES, apply_method, repair_inputs
from .methods import METHODS

FIELDS = ["method", "label", "ratio", "seed", "param_sparsity", "params", "accuracy", "loss", "seconds"]


def sweep(loaded: LoadedModel, ratios, methods, data_spec: str, *, seeds=(0,), eval_limit: int | None = None,
          repair_samples: int = DEFAULT_REPAIR_SAMPLES, clustering: dict | None = None, repair_settings: dict | None = None,
          progress: Callable[[int, int, dict | None], None] | None = None) -> list[dict]:
    """Fold/prune ``loaded`` at every ratio with every method and seed; evaluate each on ``data_spec``'s test split.

    Returns one row per (method, ratio, seed) plus one "original" row. ``progress(done, total, last_row)``.
    """
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    loader = make_loader(load_dataset(data_spec, "test", card=loaded.card), limit=eval_limit)
    base = evaluate(loaded.model, loader)
    n0 = count_params(loaded.model)
    rows = [{"method": "original", "label": "Original", "ratio": 0.0, "seed": 0, "param_sparsity": 0.0,
             "params": n0, "accuracy": base.accuracy, "loss": base.loss, "seconds": 0.0}]
    total = len(ratios) * len(methods) * len(seeds)
    done = 0
    for seed in seeds:
        data = repair_inputs(loaded, data_spec, repair_samples, seed=seed) if any(METHODS[m].needs_data for m in methods) else None
        for method in methods:
            for r in ratios:
                plan = FoldPlan(default_ratio=float(r), repair="none", seed=int(seed),
                                clustering=clustering or dict(DEFAULT_CLUSTERING), repair_settings=repair_settings or {})
                t = time.perf_counter()
                res = apply_method(loaded, plan, method, repair_data=data)
                seconds = time.perf_counter() - t
                ev = evaluate(res.model, loader)
                n = count_params(res.model)
                row = {"method": method, "label": METHODS[method].label, "ratio": float(r), "seed": int(seed),
                       "param_sparsity": 1 - n / n0, "params": n, "accuracy": ev.accuracy, "loss": ev.loss,
                       "seconds": seconds}
                rows.append(row)
                done += 1
                if progress:
                    progress(done, total, row)
    return rows


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()
