"""Question 3 — how much accuracy does folding cost?

Accuracy on the digits test split (450 images) vs. parameter sparsity 10/25/50/70 % for the bundled demo models,
with Fold-Naive, Fold-R, Fold-AR, Fold-DIR and L1/L2 structured magnitude pruning with and without REPAIR, mean and
spread over 3 seeds. A uniform channel ratio r per model is solved so that the *measured* parameter sparsity is
closest to each target (sparsity ~ 1 - (1 - r)^2). Also: wider (digits-resnet-2x) vs. narrower (digits-resnet).

Seeds change the k-means initialisation (folding), the real repair batch (Fold-R, REPAIR) and the Deep-Inversion
batch (Fold-DIR). L1/L2 pruning without repair has no randomness: it is run once.

Fold-DIR's synthetic batch depends only on the original model and the seed, not on the ratio, so it is
synthesised once per (model, seed) by a real ``fold(..., repair="dir")`` at the first sparsity, and reused for the
other sparsities by folding with ``repair="r"`` on that batch (the same code path; checked bit-for-bit below).
"""
from __future__ import annotations

import math
import statistics

import torch

from common import Config, Table, load, n_params, timed

TARGETS = (0.10, 0.25, 0.50, 0.70)
ALL_METHODS = ("none", "r", "ar", "dir", "l1", "l2", "l1+r", "l2+r")
DETERMINISTIC = ("l1", "l2")


def _measured_sparsity(loaded, ratio: float) -> float:
    from foldviz.prune import prune

    if ratio <= 0:
        return 0.0
    res = prune(loaded.model, ratio, norm=1, example_input=loaded.example_input(1))
    return 1 - n_params(res.model) / n_params(loaded.model)


def solve_ratio(loaded, target: float, steps: int = 8) -> tuple[float, float]:
    """Uniform channel ratio whose measured parameter sparsity is closest to ``target`` (bisection)."""
    r0 = 1 - math.sqrt(1 - target)
    lo, hi = max(0.0, r0 - 0.15), min(0.95, r0 + 0.15)
    s_lo, s_hi = _measured_sparsity(loaded, lo), _measured_sparsity(loaded, hi)
    for _ in range(steps):
        mid = (lo + hi) / 2
        s = _measured_sparsity(loaded, mid)
        if s < target:
            lo, s_lo = mid, s
        else:
            hi, s_hi = mid, s
    return (lo, s_lo) if abs(s_lo - target) <= abs(s_hi - target) else (hi, s_hi)


def _fmt_ms(vals: list[float]) -> str:
    if not vals:
        return "—"
    m = statistics.mean(vals) * 100
    if len(vals) == 1:
        return f"{m:.1f}"
    return f"{m:.1f} ± {statistics.stdev(vals) * 100:.1f}"


def seeding_ab(cfg: Config, ratios_used: dict) -> Table:
    """Does a lower k-means inertia give a more accurate fold? Plain vs. greedy k-means++ seeding, same Lloyd."""
    import contextlib

    import foldviz.fold as Fo
    from candidates import kmeans_fast
    from foldviz.data import evaluate, load_dataset, make_loader
    from foldviz.fold import fold
    from foldviz.plans import FoldPlan

    def adapter(trials):
        def km(features, k, *, seed=0, n_init=4, max_iter=100, algorithm="kmeans", device=None):
            x = features.detach().cpu() if torch.is_tensor(features) else features
            return kmeans_fast(x, k, seed=seed, n_init=n_init, max_iter=max_iter, trials=trials)
        return km

    @contextlib.contextmanager
    def use(fn):
        old = Fo.kmeans
        Fo.kmeans = fn if fn is not None else old
        try:
            yield
        finally:
            Fo.kmeans = old

    variants = [("library (greedy k-means++)", None), ("plain k-means++ seeding", adapter(1)),
                ("greedy k-means++ seeding", adapter(None))]
    models = ("digits-resnet-2x",) if cfg.quick else ("digits-resnet", "digits-resnet-2x", "digits-vgg")
    targets = (0.5,) if cfg.quick else (0.5, 0.7)
    methods = ("ar",) if cfg.quick else ("none", "ar")
    rows = []
    for name in models:
        loaded = load(name)
        loader = make_loader(load_dataset("digits", "test", card=loaded.card))
        for t in targets:
            ratio = ratios_used.get(name, {}).get(t, {}).get("ratio") or solve_ratio(loaded, t)[0]
            for method in methods:
                row = {"model": name, "target": f"{int(t * 100)}%", "method": {"none": "Fold-Naive", "ar": "Fold-AR"}[method]}
                for vi, (label, fn) in enumerate(variants):
                    accs, inert = [], []
                    with use(fn):
                        for seed in cfg.seeds:
                            res = fold(loaded.model, FoldPlan(default_ratio=float(ratio), repair=method, seed=int(seed)),
                                       example_input=loaded.example_input(1))
                            accs.append(evaluate(res.model, loader).accuracy)
                            inert.append(sum(g["inertia"] or 0.0 for g in res.groups))
                    row[f"acc{vi}"] = _fmt_ms(accs)
                    row[f"inertia{vi}"] = statistics.mean(inert)
                for vi in (0, 2):
                    row[f"rel_inertia{vi}"] = row[f"inertia{vi}"] / row["inertia1"] - 1
                rows.append(row)
        cfg.say(f"accuracy: seeding A/B on {name} done")
    cols = ["model", "target", "method", "acc1", "acc2", "rel_inertia2", "acc0", "rel_inertia0"]
    heads = ["model", "sparsity", "method", "accuracy %, plain seeding", "accuracy %, greedy seeding",
             "inertia greedy vs plain", "accuracy %, library", "inertia library vs plain"]
    return Table("accuracy_seeding", "Does lower k-means inertia mean higher accuracy? Plain vs. greedy k-means++",
                 cols, rows, heads,
                 [f"Same folds ({len(cfg.seeds)} seed(s)), only the k-means seeding differs: "
                  "`benchmarks/candidates.py:kmeans_fast` with 1 candidate per step (plain k-means++, what the library "
                  "did before commit b389338) or 2 + ln k candidates (greedy, what it does now); same NumPy Lloyd "
                  "loop. The library's own k-means is shown for reference. Inertia = summed over the folded groups, "
                  "in the feature space the method clusters in (Fold-AR: robust-scaled)."])


def run(cfg: Config) -> tuple[list[Table], dict]:
    from foldviz.data import evaluate, load_dataset, make_loader
    from foldviz.plans import FoldPlan
    from foldviz.apply import apply_method, repair_inputs
    from foldviz.methods import label

    if cfg.quick:
        models = ("digits-resnet", "digits-resnet-2x")
        methods = ("none", "r", "ar", "l1", "l1+r")
    else:
        models = ("digits-resnet", "digits-resnet-2x", "digits-vgg", "digits-mlp")
        methods = ALL_METHODS
    seeds = cfg.seeds
    raw, ratios_used, checks = [], {}, {}
    for name in models:
        loaded = load(name)
        loader = make_loader(load_dataset("digits", "test", card=loaded.card))
        base = evaluate(loaded.model, loader)
        raw.append({"model": name, "method": "original", "label": "Original", "target": 0.0, "ratio": 0.0, "seed": 0,
                    "sparsity": 0.0, "accuracy": base.accuracy, "loss": base.loss, "seconds": 0.0})
        t_solve, solved = timed(lambda: [solve_ratio(loaded, t) for t in TARGETS])
        ratios_used[name] = {t: {"ratio": r, "sparsity": s} for t, (r, s) in zip(TARGETS, solved)}
        cfg.say(f"accuracy: {name}: base {base.accuracy:.3f}; ratios " +
                ", ".join(f"{t:.0%}->r={r:.3f} ({s:.1%})" for t, (r, s) in zip(TARGETS, solved)) +
                f" [{t_solve:.0f}s]")
        for seed in seeds:
            data = repair_inputs(loaded, "digits", 512, seed=seed)
            synthetic = None
            for method in methods:
                if method in DETERMINISTIC and seed != seeds[0]:
                    continue
                for ti, (target, (ratio, _)) in enumerate(zip(TARGETS, solved)):
                    plan = FoldPlan(default_ratio=float(ratio), repair="none", seed=int(seed))
                    if method == "dir" and synthetic is not None:
                        secs, res = timed(lambda: apply_method(loaded, plan, "r", repair_data=synthetic))
                    else:
                        secs, res = timed(lambda: apply_method(loaded, plan, method, repair_data=data))
                    if method == "dir" and synthetic is None:
                        synthetic = res.synthetic
                        if seed == seeds[0]:   # the reuse shortcut must give the very same model
                            again = apply_method(loaded, plan, "r", repair_data=synthetic)
                            sd1, sd2 = res.model.state_dict(), again.model.state_dict()
                            checks[name] = max(float((sd1[k].float() - sd2[k].float()).abs().max()) for k in sd1)
                    ev = evaluate(res.model, loader)
                    raw.append({"model": name, "method": method, "label": label(method), "target": target,
                                "ratio": ratio, "seed": seed, "sparsity": 1 - n_params(res.model) / n_params(loaded.model),
                                "accuracy": ev.accuracy, "loss": ev.loss, "seconds": secs})
            cfg.say(f"accuracy: {name} seed {seed} done")
    # ---- tables
    tables = []
    summary = {}
    for name in models:
        rows_m = [r for r in raw if r["model"] == name]
        base = next(r for r in rows_m if r["method"] == "original")
        trow = {"method": "ratio r → measured sparsity"}
        for t in TARGETS:
            u = ratios_used[name][t]
            trow[f"s{int(t * 100)}"] = f"r={u['ratio']:.3f} → {u['sparsity'] * 100:.1f}%"
        rows = [trow]
        for method in methods:
            row = {"method": label(method)}
            for t in TARGETS:
                vals = [r["accuracy"] for r in rows_m if r["method"] == method and r["target"] == t]
                row[f"s{int(t * 100)}"] = _fmt_ms(vals)
                summary[(name, method, t)] = vals
            rows.append(row)
        cols = ["method"] + [f"s{int(t * 100)}" for t in TARGETS]
        heads = ["method"] + [f"{int(t * 100)}% sparsity" for t in TARGETS]
        n_seeds = len(seeds)
        spread = (f"mean ± std over {n_seeds} seeds (L1/L2 without repair are deterministic: 1 run)."
                  if n_seeds > 1 else "one seed (--quick).")
        notes = [f"Top-1 accuracy (%) on the 450 digits test images; original {base['accuracy'] * 100:.2f}%; " + spread +
                 " Fold-R and REPAIR use 512 real training images; Fold-DIR synthesises 128 (defaults, 100 steps)."]
        if name in checks:
            notes.append(f"Fold-DIR batch reuse check: max |Δ| between fold(repair='dir') and fold(repair='r', "
                         f"synthetic batch) = {checks[name]:.1e}.")
        tables.append(Table(f"accuracy_{name}", f"Accuracy vs. parameter sparsity — {name}", cols, rows, heads, notes,
                            csv_rows=rows_m))
    # ---- wider vs narrower
    if "digits-resnet" in models and "digits-resnet-2x" in models:
        b1 = next(r["accuracy"] for r in raw if r["model"] == "digits-resnet" and r["method"] == "original")
        b2 = next(r["accuracy"] for r in raw if r["model"] == "digits-resnet-2x" and r["method"] == "original")
        wide, wide_rows = [], []
        for method in methods:
            row = {"method": label(method)}
            for t in TARGETS:
                a1 = summary.get(("digits-resnet", method, t), [])
                a2 = summary.get(("digits-resnet-2x", method, t), [])
                if a1 and a2:
                    m1, m2 = statistics.mean(a1), statistics.mean(a2)
                    row[f"s{int(t * 100)}"] = f"{m1 * 100:.1f} / {m2 * 100:.1f} ({(m2 - m1) * 100:+.1f})"
                    wide.append({"method": method, "target": t, "acc_1x": m1, "acc_2x": m2,
                                 "drop_1x": b1 - m1, "drop_2x": b2 - m2})
            wide_rows.append(row)
        cols = ["method"] + [f"s{int(t * 100)}" for t in TARGETS]
        heads = ["method"] + [f"{int(t * 100)}% sparsity" for t in TARGETS]
        n_better = sum(w["acc_2x"] > w["acc_1x"] for w in wide)
        n_less_drop = sum(w["drop_2x"] < w["drop_1x"] for w in wide)
        tables.append(Table("accuracy_wider", "Wider vs. narrower: digits-resnet (1x) / digits-resnet-2x (2x)", cols,
                            wide_rows, heads,
                            [f"Cells: accuracy % of 1x / 2x (2x − 1x in points), mean over seeds; originals "
                             f"{b1 * 100:.2f}% (1x) and {b2 * 100:.2f}% (2x). At equal parameter sparsity the 2x "
                             f"model is more accurate in {n_better}/{len(wide)} cells and loses less accuracy "
                             f"relative to its own original in {n_less_drop}/{len(wide)}."],
                            csv_rows=wide))
    facts = {"ratios": {m: {str(t): v for t, v in d.items()} for m, d in ratios_used.items()},
             "dir_reuse_check": checks, "runs": len(raw)}
    tables.append(seeding_ab(cfg, ratios_used))
    tables.append(Table("accuracy_raw", "all accuracy runs (CSV only)", list(raw[0].keys()), raw, show=False))
    return tables, facts
