"""Question 2 — is the folded model really smaller and faster?

For every model and ratio: parameters, FLOPs (batch 1, ``foldviz.metrics.count_flops``), safetensors size
(``model_size_bytes``) and CPU latency at batch 1 and batch 64 of the folded model vs. the original. Latency is
measured side by side: original and folded alternate round by round (each round times a block of forward passes),
and the reported ratio is the median of the per-round ratios. The "ideal" is the FLOPs ratio: a model with x% of
the FLOPs should take about x% of the time; the target is latency ratio <= 1.3 x FLOPs ratio.
"""
from __future__ import annotations

import statistics
import time

import torch

from common import Config, Table, load, median, n_params


@torch.no_grad()
def latency_set(models: list, x, rounds: int, target_block_s: float = 0.15) -> dict:
    """Median ms per forward of each model on x, all models timed in every round (order alternating), plus the
    median over rounds of each model's time relative to models[0] in the same round."""
    for m in models:
        m.eval()
    for _ in range(2):
        for m in models:
            m(x)
    t = time.perf_counter()
    models[0](x)
    one = max(1e-5, time.perf_counter() - t)
    block = max(1, min(200, int(target_block_s / one)))
    times = [[] for _ in models]
    ratios = [[] for _ in models]
    idx = list(range(len(models)))
    for r in range(rounds):
        for i in (idx if r % 2 == 0 else idx[::-1]):
            t = time.perf_counter()
            for _ in range(block):
                models[i](x)
            times[i].append((time.perf_counter() - t) / block * 1e3)
        for i in idx:
            ratios[i].append(times[i][-1] / times[0][-1])
    return {"ms": [statistics.median(t) for t in times], "ratio": [statistics.median(q) for q in ratios],
            "block": block, "rounds": rounds}


def paired_latency(a, b, x, rounds: int) -> dict:
    d = latency_set([a, b], x, rounds)
    return {"a_ms": d["ms"][0], "b_ms": d["ms"][1], "ratio": d["ratio"][1], "block": d["block"], "rounds": rounds}


def round8_whatif(cfg: Config) -> Table:
    """Does rounding the kept channel counts to multiples of 8 bring latency closer to the FLOPs ratio?"""
    from foldviz.fold import fold
    from foldviz.groups import find_groups
    from foldviz.metrics import count_flops
    from foldviz.plans import FoldPlan

    rows = []
    ratio = 0.3
    for name in ("resnet18-cifar", "digits-resnet-2x"):
        loaded = load(name)
        x1 = loaded.example_input(1)
        graph = find_groups(loaded.model, x1)
        over = {}
        for g in graph.foldable:
            k = max(8, int(round(g.channels * (1 - ratio) / 8)) * 8)
            over[g.id] = 1 - k / g.channels
        plain = fold(loaded.model, FoldPlan(default_ratio=ratio, repair="none"), example_input=x1).model
        r8 = fold(loaded.model, FoldPlan(default_ratio=ratio, ratios=over, repair="none"), example_input=x1).model
        f0 = count_flops(loaded.model, x1)
        fp, f8 = count_flops(plain, x1) / f0, count_flops(r8, x1) / f0
        for batch in (1, 64):
            lat = latency_set([loaded.model, plain, r8], loaded.example_input(batch), 9 if batch == 1 else 5)
            rows.append({"model": name, "batch": batch, "flops_plain": fp, "lat_plain": lat["ratio"][1],
                         "over_plain": lat["ratio"][1] / fp, "flops_r8": f8, "lat_r8": lat["ratio"][2],
                         "over_r8": lat["ratio"][2] / f8})
        cfg.say(f"compression: round-to-8 what-if on {name} done")
    cols = ["model", "batch", "flops_plain", "lat_plain", "over_plain", "flops_r8", "lat_r8", "over_r8"]
    heads = ["model", "batch", "FLOPs ratio (k = round(0.7 n))", "latency ratio", "latency / FLOPs",
             "FLOPs ratio (k rounded to 8)", "latency ratio", "latency / FLOPs"]
    return Table("compression_round8", "What-if: kept channels rounded to a multiple of 8 (ratio 0.3)", cols, rows,
                 heads, ["Original, plain fold and rounded fold timed in the same rounds (alternating order), medians "
                         "of per-round ratios to the original. At ratio 0.3 the plain fold keeps 45/90/179/358 "
                         "channels on ResNet-18; the rounded plan keeps 48/88/176/360 (per-group ratio overrides)."])


def threads_whatif(cfg: Config) -> Table:
    """Folded/original latency with torch's default thread count vs. one thread (per-op overhead vs. FLOPs)."""
    from common import with_threads
    from foldviz.fold import fold
    from foldviz.metrics import count_flops

    rows = []
    default = torch.get_num_threads()
    for name in ("digits-resnet", "digits-resnet-2x", "resnet18-cifar"):
        loaded = load(name)
        x1 = loaded.example_input(1)
        folded = fold(loaded.model, 0.5, example_input=x1, repair="none").model
        fr = count_flops(folded, x1) / count_flops(loaded.model, x1)
        for batch in (1, 64):
            xb = loaded.example_input(batch)
            row = {"model": name, "ratio": 0.5, "batch": batch, "flops_ratio": fr}
            for label, n in (("tdef", default), ("t1", 1)):
                lat = with_threads(n, lambda: latency_set([loaded.model, folded], xb, 9 if batch == 1 else 5))
                row[f"{label}_orig_ms"], row[f"{label}_fold_ms"] = lat["ms"]
                row[f"{label}_ratio"] = lat["ratio"][1]
                row[f"{label}_over"] = lat["ratio"][1] / fr
            rows.append(row)
        cfg.say(f"compression: thread what-if on {name} done")
    cols = ["model", "batch", "flops_ratio", "tdef_orig_ms", "tdef_fold_ms", "tdef_over", "t1_orig_ms", "t1_fold_ms",
            "t1_over"]
    heads = ["model", "batch", "FLOPs ratio", f"orig ms ({default} threads)", "folded ms", "latency÷FLOPs ratio",
             "orig ms (1 thread)", "folded ms", "latency÷FLOPs ratio"]
    return Table("compression_threads", "What-if: latency with one torch thread (ratio 0.5)", cols, rows, heads,
                 [f"Same models measured with torch's default {default} threads and with 1 thread (original and "
                  "folded alternating within each setting). Where one thread is faster than two, per-operator "
                  "overhead (thread wake-ups, dispatch), not arithmetic, dominates, and no channel reduction can "
                  "reach the FLOPs ratio."])


def run(cfg: Config) -> tuple[list[Table], dict]:
    from foldviz.fold import fold
    from foldviz.metrics import count_flops, model_size_bytes
    from foldviz.plans import FoldPlan

    if cfg.quick:
        models, ratios = ["digits-resnet", "digits-resnet-2x", "digits-vgg", "digits-mlp", "resnet18-cifar"], (0.3, 0.5)
    else:
        models = ["digits-resnet", "digits-resnet-2x", "digits-vgg", "digits-mlp", "resnet18-cifar", "resnet50-cifar"]
        ratios = (0.1, 0.3, 0.5, 0.7)
    rows, lat_rows = [], []
    for name in models:
        loaded = load(name)
        orig = loaded.model
        x1 = loaded.example_input(1)
        p0, f0, s0 = n_params(orig), count_flops(orig, x1), model_size_bytes(orig)
        big = name == "resnet50-cifar"
        for ratio in ratios:
            res = fold(orig, FoldPlan(default_ratio=ratio, repair="ar"), example_input=x1)
            m = res.model
            p1, f1, s1 = n_params(m), count_flops(m, x1), model_size_bytes(m)
            row = {"model": name, "ratio": ratio, "params": p0, "params_after": p1, "param_ratio": p1 / p0,
                   "flops": f0, "flops_after": f1, "flops_ratio": f1 / f0, "ideal_flops_ratio": (1 - ratio) ** 2,
                   "size_mb": s0 / 1e6, "size_mb_after": s1 / 1e6, "size_ratio": s1 / s0}
            for batch in (1, 64):
                rounds = (7 if batch == 1 else 5) if cfg.quick else (15 if batch == 1 else (5 if big else 9))
                xb = loaded.example_input(batch)
                lat = paired_latency(orig, m, xb, rounds)
                row[f"lat{batch}_ms"] = lat["a_ms"]
                row[f"lat{batch}_ms_after"] = lat["b_ms"]
                row[f"lat{batch}_ratio"] = lat["ratio"]
                row[f"lat{batch}_over_flops"] = lat["ratio"] / row["flops_ratio"]
                lat_rows.append({"model": name, "ratio": ratio, "batch": batch, "latency_ratio": lat["ratio"],
                                 "flops_ratio": row["flops_ratio"], "lat_over_flops": lat["ratio"] / row["flops_ratio"],
                                 "orig_ms": lat["a_ms"], "folded_ms": lat["b_ms"], "rounds": lat["rounds"],
                                 "block": lat["block"]})
            rows.append(row)
            cfg.say(f"compression: {name} r={ratio}: params x{row['param_ratio']:.2f}, FLOPs x{row['flops_ratio']:.2f}, "
                    f"latency b1 x{row['lat1_ratio']:.2f}, b64 x{row['lat64_ratio']:.2f}")
    size_cols = ["model", "ratio", "params_after", "param_ratio", "flops_after", "flops_ratio", "ideal_flops_ratio",
                 "size_mb_after", "size_ratio"]
    size_heads = ["model", "ratio", "params", "params ratio", "FLOPs (batch 1)", "FLOPs ratio", "ideal (1−r)²",
                  "file MB", "file ratio"]
    orig_rows = {}
    for r in rows:
        orig_rows.setdefault(r["model"], {"model": r["model"], "ratio": 0.0, "params_after": r["params"],
                                          "param_ratio": 1.0, "flops_after": r["flops"], "flops_ratio": 1.0,
                                          "ideal_flops_ratio": 1.0, "size_mb_after": r["size_mb"], "size_ratio": 1.0})
    size_table_rows = []
    for name in dict.fromkeys(r["model"] for r in rows):
        size_table_rows.append(orig_rows[name])
        size_table_rows.extend(r for r in rows if r["model"] == name)
    t_size = Table("compression_size", "Compression: parameters, FLOPs and file size (Fold-AR; ratio 0 = original)",
                   size_cols, size_table_rows, size_heads,
                   ["FLOPs: `foldviz.metrics.count_flops`, 2 per multiply-add, batch 1. File: safetensors bytes of the "
                    "state dict (`model_size_bytes`). `ideal (1−r)²`: what a layer whose input and output are both "
                    "folded by r keeps; stems, classifiers and non-foldable groups keep more.",
                    "Every fold method gives the same architecture at a given ratio, so these numbers hold for "
                    "Fold-Naive/R/AR/DIR and for L1/L2 pruning alike."], csv_rows=rows)
    lat_cols = ["model", "ratio", "flops_ratio", "lat1_ms", "lat1_ms_after", "lat1_ratio", "lat1_over_flops",
                "lat64_ms", "lat64_ms_after", "lat64_ratio", "lat64_over_flops"]
    lat_heads = ["model", "ratio", "FLOPs ratio", "b1 orig ms", "b1 folded ms", "b1 latency ratio",
                 "b1 ratio / FLOPs ratio", "b64 orig ms", "b64 folded ms", "b64 latency ratio",
                 "b64 ratio / FLOPs ratio"]
    t_lat = Table("compression_latency", "Compression: CPU latency, folded vs. original (side by side)", lat_cols,
                  rows, lat_heads,
                  [f"torch {torch.__version__}, {torch.get_num_threads()} threads, eval mode, `torch.no_grad`, float32. "
                   "Original and folded alternate round by round; ms = median per forward pass; latency ratio = "
                   "median of the per-round folded/original ratios.",
                   "Target: latency ratio ≤ 1.3 × FLOPs ratio (last column of each batch ≤ 1.3).",
                   "The demo models see 8×8 inputs: at batch 1 a forward pass is a few hundred µs of per-layer "
                   "dispatch overhead that does not shrink with channel count."], csv_rows=rows)
    within = {b: [r for r in lat_rows if r["batch"] == b and r["lat_over_flops"] <= 1.3] for b in (1, 64)}
    facts = {"latency_rows": lat_rows, "within_1_3": {b: f"{len(v)}/{sum(r['batch'] == b for r in lat_rows)}"
                                                      for b, v in within.items()},
             "median_lat64_over_flops": median([r["lat_over_flops"] for r in lat_rows if r["batch"] == 64])}
    tables = [t_size, t_lat]
    if not cfg.quick:
        tables.append(threads_whatif(cfg))
        tables.append(round8_whatif(cfg))
    return tables, facts
