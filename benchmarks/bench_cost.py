"""Question 1 — how long does folding take?

* ``cost_fold``: seconds to inspect (``find_groups``), trace, cluster, merge and repair, per model, ratio and
  repair method (``FoldResult.seconds``; evaluation is never included).
* ``cost_target``: the target case (CIFAR ResNet-18, ratio 0.5, Fold-AR) measured side by side with two what-ifs:
  torch limited to one thread, and the candidate clustering of ``benchmarks/candidates.py``.
* ``cost_scaling``: the same DigitsResNet at width 1x/2x/4x (random init): how cost grows with channel count.
* ``cost_kmeans``: the library's torch k-means vs scikit-learn ``KMeans`` (and the candidate) on the same
  ``group_features``, same k, same n_init/max_iter: time and relative inertia difference per group.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from common import Config, Table, interleaved, load, median, n_params, now, timed
from foldviz.methods import label

RATIOS = (0.3, 0.5)
STAGES = ("graph", "cluster", "merge", "dir", "repair", "total")


def _repair_data(name: str, loaded, n: int = 512):
    """Real digits for the demos (as the app and sweep do); standard-normal inputs for untrained torchvision nets."""
    if name.startswith("digits"):
        from foldviz.apply import repair_inputs

        return repair_inputs(loaded, "digits", n, seed=0), f"{n} real digits"
    return loaded.example_input(n, seed=0), f"{n} N(0,1) inputs"


def _fold(loaded, ratio: float, method: str, data, settings: dict | None = None, seed: int = 0):
    from foldviz.fold import fold
    from foldviz.plans import FoldPlan

    plan = FoldPlan(default_ratio=ratio, repair=method, seed=seed, repair_settings=settings or {})
    return fold(loaded.model, plan, example_input=loaded.example_input(1), repair_data=data,
                num_classes=loaded.num_classes)


def _inspect_seconds(loaded, repeats: int) -> float:
    from foldviz.groups import find_groups

    x = loaded.example_input(1)
    return median([timed(lambda: find_groups(loaded.model, x))[0] for _ in range(repeats)])


# ------------------------------------------------------------------------------------------------ fold cost
def fold_cost(cfg: Config) -> tuple[Table, dict]:
    from foldviz.repair import dir_defaults

    models = ["digits-resnet", "digits-resnet-2x", "digits-vgg", "digits-mlp", "resnet18-cifar"]
    if not cfg.quick:
        models.append("resnet50-cifar")
    rows, raw, facts = [], [], {}
    for name in models:
        loaded = load(name)
        tv = not name.startswith("digits")
        data, data_note = _repair_data(name, loaded, 512)
        if cfg.quick:
            methods = ("none", "ar")
        else:
            methods = ("none", "r", "ar", "dir")
        big = name == "resnet50-cifar"
        reps_default = 1 if cfg.quick else (2 if big else 3)
        inspect = _inspect_seconds(loaded, 1 if cfg.quick else 3)
        default_iters = dir_defaults(tuple(loaded.input_shape))["iterations"]
        cfg.say(f"cost: {name} ({n_params(loaded.model):,} params), inspect {inspect:.2f}s")
        for ratio in RATIOS:
            for method in methods:
                reps = reps_default
                settings = None
                est_iters = None
                if method == "dir":
                    reps = 1
                    if tv:   # full Deep Inversion on 32x32 (256 x 500 Adam steps) is hours on 2 cores: extrapolate
                        est_iters = 1 if big else 2
                        settings = {"iterations": est_iters}
                if method == "r" and big and cfg.quick:
                    continue
                secs = []
                for rep in range(reps):
                    res = _fold(loaded, ratio, method, data, settings)
                    s = dict(res.seconds)
                    secs.append(s)
                    raw.append({"model": name, "ratio": ratio, "method": method, "rep": rep, **s})
                row = {"model": name, "params": n_params(loaded.model), "ratio": ratio,
                       "method": label(method), "inspect": inspect, "repeats": reps}
                for st in STAGES:
                    vals = [s.get(st) for s in secs if s.get(st) is not None]
                    row[st] = median(vals) if vals else None
                row["note"] = ""
                if method in ("r",):
                    row["note"] = f"repair on {data_note}"
                if method == "dir":
                    if est_iters:
                        per_it = row["dir"] / est_iters
                        est = per_it * default_iters
                        row["total"] = row["total"] - row["dir"] + est
                        row["dir"] = est
                        row["note"] = (f"DIR estimated: {per_it:.2f} s/step measured over {est_iters} step(s) "
                                       f"x {default_iters} default steps")
                    else:
                        row["note"] = f"DIR {default_iters} steps (defaults), 1 repeat"
                rows.append(row)
                cfg.say(f"  {name} r={ratio} {label(method)}: total {row['total']:.2f}s "
                        f"(cluster {row['cluster']:.2f}s)")
                if name == "resnet18-cifar" and ratio == 0.5 and method == "ar":
                    facts["r18_ar_05_total"] = row["total"]
                    facts["r18_ar_05_stages"] = {k: row[k] for k in STAGES if row.get(k) is not None}
    notes = [
        "Seconds, median over `repeats` folds (Fold-DIR: 1). `inspect` = `find_groups` alone; `graph` = the "
        "fold's own trace (deepcopy + DepGraph + groups); `total` = the whole `fold()` call, no evaluation.",
        "Demo models: trained weights, 8×8 inputs, Fold-R uses 512 real digits. torchvision models: random init, "
        "32×32 inputs (CIFAR stem), Fold-R uses 512 N(0,1) inputs.",
        "Fold-DIR on the 32×32 models is extrapolated from 1–2 measured Adam steps (the 256×500-step default "
        "would take hours on this CPU); the demo models run the full 128×100-step default.",
    ]
    if cfg.quick:
        notes.append("--quick: 1 repeat, only Fold-Naive and Fold-AR, no ResNet-50.")
    cols = ["model", "ratio", "method", "inspect", "graph", "cluster", "merge", "dir", "repair", "total", "repeats",
            "note"]
    heads = ["model", "ratio", "method", "inspect s", "graph s", "cluster s", "merge s", "DIR s", "repair s",
             "total s", "reps", "note"]
    return Table("cost_fold", "Folding cost (seconds, 2-core CPU)", cols, rows, heads, notes, csv_rows=rows), \
        {**facts, "raw": raw}


# ------------------------------------------------------------------------------------------------ target + what-ifs
TARGET_VARIANTS = [
    # name, env changes (None = remove), torch threads (0 = torch default), candidate clustering
    ("library, OpenMP default wait policy", {"OMP_WAIT_POLICY": None}, 0, False),
    ("library, OMP_WAIT_POLICY=PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"}, 0, False),
    ("library, 1 torch thread", {"OMP_WAIT_POLICY": "PASSIVE"}, 1, False),
    ("candidate clustering", {"OMP_WAIT_POLICY": "PASSIVE"}, 0, True),
    ("candidate clustering, 1 torch thread", {"OMP_WAIT_POLICY": "PASSIVE"}, 1, True),
]


def target_cost(cfg: Config) -> tuple[Table, dict]:
    """ResNet-18 @0.5 Fold-AR: the library as is vs. thread/OpenMP settings and the candidate clustering.

    Each variant lives in its own worker process (thread count and OpenMP policy are per process); the workers
    fold one after another, round by round in alternating order, so load changes hit all variants alike.
    """
    import json
    import os
    import subprocess
    import sys

    rounds = 2 if cfg.quick else 5
    variants = TARGET_VARIANTS[:3] if cfg.quick else TARGET_VARIANTS
    worker = str(__import__("pathlib").Path(__file__).with_name("_fold_worker.py"))
    procs = {}
    for name, env_add, threads, cand in variants:
        env = dict(os.environ)
        for k, v in env_add.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        procs[name] = subprocess.Popen([sys.executable, worker, "resnet18-cifar", "0.5", "ar", str(threads),
                                        "1" if cand else "0"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True, env=env, cwd=str(__import__("common").ROOT))
    results: dict[str, list[dict]] = {n: [] for n in procs}
    try:
        for name, p in procs.items():
            line = p.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"fold worker {name!r} failed to start: {line!r}")
        cfg.say(f"cost: ResNet-18 @0.5 Fold-AR, {len(procs)} variants x {rounds} interleaved rounds")
        names = list(procs)
        for r in range(rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                p = procs[name]
                p.stdin.write("run\n")
                p.stdin.flush()
                results[name].append(json.loads(p.stdout.readline()))
    finally:
        for p in procs.values():
            try:
                p.stdin.write("quit\n")
                p.stdin.flush()
            except OSError:
                pass
            p.wait(timeout=60)
    ref = names[1]  # the benchmark's own setting: OMP_WAIT_POLICY=PASSIVE, default threads
    base = median([r["seconds"]["total"] for r in results[ref]])
    base_inertia = float(np.mean([r["inertia"] for r in results[ref]]))
    rows = []
    for name, res in results.items():
        tot = median([r["seconds"]["total"] for r in res])
        rows.append({"variant": name, "threads": res[0]["threads"], "total": tot,
                     "total_min": min(r["seconds"]["total"] for r in res),
                     "graph": median([r["seconds"]["graph"] for r in res]),
                     "cluster": median([r["seconds"]["cluster"] for r in res]),
                     "merge": median([r["seconds"]["merge"] for r in res]),
                     "vs_library": tot / base,
                     "inertia_vs_library": float(np.mean([r["inertia"] for r in res])) / base_inertia - 1,
                     "target_met": tot < 2.0, "rounds": len(res)})
    notes = [f"Each variant runs in its own worker process; {rounds} rounds, variants interleaved (order alternating "
             "each round) so machine load hits them alike. `total` = median `FoldResult.seconds['total']` "
             "(trace + cluster + merge, no evaluation); `min` = fastest round.",
             "`vs library` / `inertia vs library`: relative to the library with OMP_WAIT_POLICY=PASSIVE and default "
             "threads (the setting every other table uses); inertia = summed k-means inertia over the 12 groups "
             "(negative = tighter clusters, i.e. better; thread count changes float rounding, hence tiny differences).",
             "Candidate = `benchmarks/candidates.py` (greedy k-means++, single-threaded NumPy Lloyd, "
             "`np.partition` robust scaling), patched into `foldviz.fold` for this what-if only.",
             "OMP_WAIT_POLICY=PASSIVE makes waiting OpenMP threads sleep instead of spin; with the default policy on "
             "this shared, oversubscribed 2-core CPU, torch's many small parallel regions stall."]
    cols = ["variant", "threads", "total", "total_min", "graph", "cluster", "merge", "vs_library",
            "inertia_vs_library", "target_met", "rounds"]
    heads = ["variant", "torch threads", "total s", "min s", "graph s", "cluster s", "merge s", "total vs library",
             "inertia vs library", "< 2 s", "rounds"]
    facts = {"target_variants": {r["variant"]: r["total"] for r in rows}, "target_reference": ref}
    return Table("cost_target", "Target case: fold CIFAR ResNet-18 at ratio 0.5 with Fold-AR", cols, rows, heads,
                 notes), facts


# ------------------------------------------------------------------------------------------------ width scaling
def scaling(cfg: Config) -> Table:
    from candidates import patched
    from foldviz.models import DigitsResNet

    rows = []
    reps = 1 if cfg.quick else 3
    x = torch.randn(1, 1, 8, 8)

    class _L:  # minimal LoadedModel stand-in
        def __init__(self, m):
            self.model, self.num_classes = m.eval(), 10

        def example_input(self, b=1, seed=0):
            return torch.randn(b, 1, 8, 8, generator=torch.Generator().manual_seed(seed))

    base = None
    for w in (1, 2, 4):
        torch.manual_seed(0)
        m = DigitsResNet(widths=(32 * w, 64 * w, 128 * w))
        L = _L(m)
        from foldviz.groups import find_groups

        graph = find_groups(m, x)
        chans = sum(g.channels for g in graph.foldable)
        res = {"lib": [], "cand": []}

        def lib():
            res["lib"].append(_fold(L, 0.5, "ar", None))

        def cand():
            with patched():
                res["cand"].append(_fold(L, 0.5, "ar", None))

        interleaved({"lib": lib} if cfg.quick else {"lib": lib, "cand": cand}, rounds=reps, warmup=0)
        inspect = _inspect_seconds(L, reps)
        row = {"width": f"{w}x", "widths": f"{32 * w}-{64 * w}-{128 * w}", "params": n_params(m),
               "channels": chans, "max_group": max(g.channels for g in graph.foldable), "inspect": inspect}
        for st in ("graph", "cluster", "merge", "total"):
            row[st] = median([r.seconds[st] for r in res["lib"]])
        row["cluster_candidate"] = median([r.seconds["cluster"] for r in res["cand"]]) if res["cand"] else None
        row["total_candidate"] = median([r.seconds["total"] for r in res["cand"]]) if res["cand"] else None
        if base is None:
            base = row
            row["cluster_exp"] = row["total_exp"] = None
        else:
            f = math.log(row["channels"] / base["channels"])
            row["cluster_exp"] = math.log(row["cluster"] / base["cluster"]) / f
            row["total_exp"] = math.log(row["total"] / base["total"]) / f
        rows.append(row)
        cfg.say(f"cost: width {w}x: total {row['total']:.2f}s cluster {row['cluster']:.2f}s")
    notes = ["DigitsResNet (BasicBlocks 2-2-2, 8×8 input), random init, ratio 0.5, Fold-AR; library and candidate "
             f"clustering interleaved, median of {reps}.",
             "`exp` = log-log slope of the time against the total foldable channel count relative to 1x "
             "(1 = linear, 2 = quadratic). Parameters grow ~4x per doubling; Gram k-means is O(n²d) per group."]
    cols = ["width", "widths", "params", "channels", "max_group", "inspect", "graph", "cluster", "merge", "total",
            "cluster_exp", "total_exp", "cluster_candidate", "total_candidate"]
    heads = ["width", "channels per stage", "params", "foldable channels", "largest group", "inspect s", "graph s",
             "cluster s", "merge s", "total s", "cluster exp", "total exp", "cluster s (candidate)",
             "total s (candidate)"]
    return Table("cost_scaling", "Cost vs. width (ratio 0.5, Fold-AR)", cols, rows, heads, notes)


# ------------------------------------------------------------------------------------------------ k-means quality
def kmeans_quality(cfg: Config) -> tuple[Table, Table]:
    from sklearn.cluster import KMeans

    from candidates import kmeans_fast
    from foldviz.features import group_features
    from foldviz.kmeans import k_for_ratio, kmeans
    from foldviz.groups import find_groups

    if cfg.quick:
        plan = [("digits-vgg", (0.5,), (True,), 256)]
    else:
        plan = [(m, (0.3, 0.5), (False, True), 4096) for m in ("digits-resnet", "digits-resnet-2x", "digits-vgg",
                                                                "digits-mlp")]
        plan.append(("resnet18-cifar", (0.5,), (True,), 512))
    n_init, max_iter = 4, 100
    per_group = []
    for name, ratios, scales, max_n in plan:
        L = load(name)
        graph = find_groups(L.model, L.example_input(1))
        for g in graph.foldable:
            if g.channels > max_n:
                continue
            if name == "resnet18-cifar" and g.channels < 512:
                continue
            for scale in scales:
                f = group_features(L.model, graph.get(g.id), scale=scale).numpy()
                for r in ratios:
                    k = k_for_ratio(len(f), r)
                    out = {}

                    def lib():
                        out["lib"] = kmeans(f, k, seed=0, n_init=n_init, max_iter=max_iter)

                    def cand():
                        out["cand"] = kmeans_fast(f, k, seed=0, n_init=n_init, max_iter=max_iter)

                    def sk():
                        out["sk"] = KMeans(n_clusters=k, n_init=n_init, max_iter=max_iter, random_state=0).fit(f)

                    t = interleaved({"lib": lib, "cand": cand, "sk": sk}, rounds=1, warmup=0)
                    isk = float(out["sk"].inertia_)
                    per_group.append({
                        "model": name, "group": g.id, "n": len(f), "d": f.shape[1], "k": k, "ratio": r,
                        "features": "Fold-AR (scaled)" if scale else "plain",
                        "t_lib": t["lib"][0], "t_cand": t["cand"][0], "t_sklearn": t["sk"][0],
                        "inertia_lib": out["lib"].inertia, "inertia_cand": out["cand"].inertia, "inertia_sklearn": isk,
                        "rel_lib": out["lib"].inertia / isk - 1 if isk > 0 else 0.0,
                        "rel_cand": out["cand"].inertia / isk - 1 if isk > 0 else 0.0,
                    })
        cfg.say(f"cost: k-means vs sklearn on {name}: {sum(1 for p in per_group if p['model'] == name)} cases")
    summary = []
    for name in dict.fromkeys(p["model"] for p in per_group):
        ps = [p for p in per_group if p["model"] == name]
        summary.append(_kq_row(name, ps))
    summary.append(_kq_row("all", per_group))
    notes = [f"Same features, same k, n_init={n_init}, max_iter={max_iter}, seed/random_state 0 for all three; the "
             "three calls interleaved per case. `rel` = inertia / sklearn inertia − 1 (positive = worse clusters).",
             f"torch threads {torch.get_num_threads()}; sklearn uses its own OpenMP threads. Cases: each foldable "
             "group × ratio × feature kind (plain / Fold-AR robust-scaled); ResNet-18: its three 512-channel groups.",
             "Candidate = `benchmarks/candidates.py:kmeans_fast` (greedy k-means++, single-threaded NumPy Lloyd)."]
    cols = ["model", "cases", "t_lib", "t_cand", "t_sklearn", "speed_vs_sk", "rel_lib_med", "rel_lib_max",
            "rel_cand_med", "rel_cand_max", "lib_worse_1pct"]
    heads = ["model", "cases", "library s (sum)", "candidate s (sum)", "sklearn s (sum)", "library speed-up vs sklearn",
             "library rel. inertia (median)", "library rel. inertia (max)", "candidate rel. inertia (median)",
             "candidate rel. inertia (max)", "library >1% worse (cases)"]
    t1 = Table("cost_kmeans", "k-means: library (torch) vs scikit-learn vs candidate, same features", cols, summary,
               heads, notes)
    t2 = Table("cost_kmeans_groups", "k-means per group (CSV only)", list(per_group[0].keys()) if per_group else [],
               per_group, show=False)
    return t1, t2


def _kq_row(name: str, ps: list[dict]) -> dict:
    return {"model": name, "cases": len(ps), "t_lib": sum(p["t_lib"] for p in ps),
            "t_cand": sum(p["t_cand"] for p in ps), "t_sklearn": sum(p["t_sklearn"] for p in ps),
            "speed_vs_sk": sum(p["t_sklearn"] for p in ps) / max(1e-9, sum(p["t_lib"] for p in ps)),
            "rel_lib_med": median([p["rel_lib"] for p in ps]), "rel_lib_max": max(p["rel_lib"] for p in ps),
            "rel_cand_med": median([p["rel_cand"] for p in ps]), "rel_cand_max": max(p["rel_cand"] for p in ps),
            "lib_worse_1pct": f"{sum(p['rel_lib'] > 0.01 for p in ps)}/{len(ps)}"}


def run(cfg: Config) -> tuple[list[Table], dict]:
    t0 = now()
    fold_t, facts = fold_cost(cfg)
    target_t, tfacts = target_cost(cfg)
    scale_t = scaling(cfg)
    kq, kq_groups = kmeans_quality(cfg)
    facts.update(tfacts)
    facts["seconds"] = now() - t0
    facts.pop("raw", None)
    return [target_t, fold_t, scale_t, kq, kq_groups], facts
