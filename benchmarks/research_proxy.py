"""Fold-DFR's proxy: cost x quality of the candidate proxies, the accuracy-vs-samples curve at larger inputs, and
what a default fold costs with a warm cache against Fold-AR.

``frontier``: for every model (bundled demos and the unshipped checkpoints of benchmarks/checkpoints.py) x proxy
candidate, the proxy is built once (CPU-seconds of this process, 1 thread, no cache) and every fold (ratios 0.25 /
0.5 / 0.7 x seeds 0-2, the clusters computed once per ratio and seed and shared by every candidate) is repaired on
it; Fold-R (512 real training images) and Fold-AR run beside them. ``resolution``: the same for a few proxy
sample counts on the larger-input checkpoints. ``cost``: a default fold with the proxy in the persistent cache
against a Fold-AR fold, alternating, in CPU-seconds. Each writes benchmarks/results/proxy_<part>.{md,json}.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/research_proxy.py frontier [--models ...]
    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/research_proxy.py resolution
    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/research_proxy.py cost
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from checkpoints import MAIN as CHECKPOINTS, load_checkpoint  # noqa: E402
from foldviz.data import digits_arrays, sample_inputs, tensor_transform  # noqa: E402
from foldviz.fold import ClusterSelector, fold  # noqa: E402
from foldviz.models import load_model  # noqa: E402
from foldviz.plans import FoldPlan  # noqa: E402
from foldviz.proxy import get_proxy, proxy_spec  # noqa: E402
from foldviz.repair import REPAIRS, DataFreeRepair  # noqa: E402
from foldviz.surgery import compress  # noqa: E402

DEMOS = ("digits-mlp", "digits-vgg", "digits-resnet", "digits-resnet-2x", "digits-resnet18")
RATIOS = (0.25, 0.5, 0.7)
SEEDS = (0, 1, 2)
OUT = ROOT / "benchmarks" / "results"

#: candidate -> proxy settings (foldviz.proxy.proxy_spec keys); "half" = synthesise at half the input side
VARIANTS: dict[str, dict] = {
    "noise x64": {"proxy": "noise", "samples": 64},
    "smooth x64": {"proxy": "smooth", "samples": 64},
    "DI-10 x64": {"proxy": "di", "samples": 64, "proxy_steps": 10},
    "DI-20 x64": {"proxy": "di", "samples": 64, "proxy_steps": 20},
    "DI-30 x64": {"proxy": "di", "samples": 64, "proxy_steps": 30},
    "DI-50 x64 (previous default)": {"proxy": "di", "samples": 64, "proxy_steps": 50},
    "DI-100 x64": {"proxy": "di", "samples": 64, "proxy_steps": 100},
    "DI-10 x64 lr 0.25": {"proxy": "di", "samples": 64, "proxy_steps": 10, "lr": 0.25},
    "DI-20 x64 lr 0.25": {"proxy": "di", "samples": 64, "proxy_steps": 20, "lr": 0.25},
    "DI-20 x32": {"proxy": "di", "samples": 32, "proxy_steps": 20},
    "DI-50 x32": {"proxy": "di", "samples": 32, "proxy_steps": 50},
    "DI-20 x64 half-res": {"proxy": "di", "samples": 64, "proxy_steps": 20, "proxy_resolution": "half"},
    "DI-20 x64 balanced": {"proxy": "di", "samples": 64, "proxy_steps": 20, "balanced": True},
    "DI-10 x64 normalized": {"proxy": "di", "samples": 64, "proxy_steps": 10, "normalized": True},
    "DI-20 x64 normalized": {"proxy": "di", "samples": 64, "proxy_steps": 20, "normalized": True},
    "DI-20 x32 normalized": {"proxy": "di", "samples": 32, "proxy_steps": 20, "normalized": True},
    "DI-50 x64 normalized": {"proxy": "di", "samples": 64, "proxy_steps": 50, "normalized": True},
    "DI-20 x32 lr 0.25": {"proxy": "di", "samples": 32, "proxy_steps": 20, "lr": 0.25},
    "DI-20 x64 lr 0.25 normalized": {"proxy": "di", "samples": 64, "proxy_steps": 20, "lr": 0.25, "normalized": True},
    "DI-20 x32 lr 0.25 normalized": {"proxy": "di", "samples": 32, "proxy_steps": 20, "lr": 0.25, "normalized": True},
    "DI-30 x32 lr 0.25 normalized": {"proxy": "di", "samples": 32, "proxy_steps": 30, "lr": 0.25, "normalized": True},
    "DI-40 x32 lr 0.25 normalized": {"proxy": "di", "samples": 32, "proxy_steps": 40, "lr": 0.25, "normalized": True},
    # larger inputs: 16 samples (the knee of proxy_resolution.md), synthesised at a fraction of the side
    "DI-20 x16 lr 0.25 normalized": {"proxy": "di", "samples": 16, "proxy_steps": 20, "lr": 0.25, "normalized": True},
    "DI-50 x16 lr 0.25 normalized": {"proxy": "di", "samples": 16, "proxy_steps": 50, "lr": 0.25, "normalized": True},
    "DI-20 x16 lr 0.25 normalized half-res": {"proxy": "di", "samples": 16, "proxy_steps": 20, "lr": 0.25,
                                               "normalized": True, "proxy_resolution": "half"},
    "DI-20 x16 lr 0.25 normalized quarter-res": {"proxy": "di", "samples": 16, "proxy_steps": 20, "lr": 0.25,
                                                  "normalized": True, "proxy_resolution": "quarter"},
    # repair candidates on the previous default's proxy (options of foldviz.repair.DataFreeRepair)
    "DI-50 x64 + cov calibration": {"proxy": "di", "samples": 64, "proxy_steps": 50, "repair": {"calibration": "cov"}},
    "DI-20 x64 + cov calibration": {"proxy": "di", "samples": 64, "proxy_steps": 20, "repair": {"calibration": "cov"}},
    "DI-50 x64, no BN-less layer repair": {"proxy": "di", "samples": 64, "proxy_steps": 50,
                                           "repair": {"linear_repair": False}},
}
BASELINE = "DI-50 x64 (previous default)"


def load(name: str):
    """A bundled demo, an unshipped checkpoint, or (cost only) "torchvision-resnet18-cifar": the full-width CIFAR
    ResNet-18 (11.2 M parameters, random init, 3x32x32) the proxy's cost was first measured on."""
    if name == "torchvision-resnet18-cifar":
        return load_model("torchvision:resnet18", num_classes=10, cifar_stem=True)
    return load_model(f"demo:{name}") if name.startswith("digits-") else load_checkpoint(name)


def test_data(lm):
    xt, yt = digits_arrays("test")
    return tensor_transform(xt, tuple(lm.input_shape), lm.normalization), yt


@torch.no_grad()
def accuracy(model, x, y) -> float:
    return float(sum((model(x[i:i + 256]).argmax(1) == y[i:i + 256]).sum() for i in range(0, len(x), 256)) / len(x))


class Capture(DataFreeRepair):
    """Fold-DFR up to the repair: keeps the merged context so that every proxy candidate repairs the same merge."""

    def finish(self, ctx):
        self.ctx = ctx


def merged(lm, ratio: float, seed: int):
    cap = Capture()
    plan = FoldPlan(default_ratio=ratio, seed=seed)
    select = ClusterSelector()
    try:
        compress(lm.model, plan, select, method="dfr", repair=cap, example_input=lm.example_input(1),
                 num_classes=lm.num_classes)
    finally:
        select.close()
    return cap.ctx


def repaired(ctx, x, options: dict | None = None):
    c = dataclasses.replace(ctx, work=copy.deepcopy(ctx.work), channel_maps=copy.deepcopy(ctx.channel_maps))
    (DataFreeRepair(**options) if options else REPAIRS["dfr"]).apply_proxy(c, x)
    return c.work.eval()


def settings_for(lm, settings: dict) -> dict:
    """Explicit settings (the objective of the previous default where a candidate does not say): candidates
    measure the same thing whatever the library's current default is."""
    full = min(lm.input_shape[1:]) if len(lm.input_shape) == 3 else None  # synthesised at the input's size
    s = {"lr": 0.1, "normalized": False, "balanced": False, "proxy_seed": 0, "proxy_resolution": full,
         **settings} if settings else {}
    if s.get("proxy_resolution") in ("half", "quarter"):
        side = min(lm.input_shape[1:]) if len(lm.input_shape) == 3 else None
        div = 2 if s["proxy_resolution"] == "half" else 4
        s["proxy_resolution"] = side // div if side and side // div >= 8 else None
    return s


_BUILT: dict = {}


def build(lm, settings: dict):
    """(proxy batch, CPU-seconds, wall seconds): built fresh, no cache (once per model and spec in this run: a
    repair candidate on the same proxy reuses it and reports its cost)."""
    settings = {k: v for k, v in settings.items() if k != "repair"}
    spec = proxy_spec(tuple(lm.input_shape), settings_for(lm, settings), num_classes=lm.num_classes)
    memo = (id(lm.model), spec)
    if memo in _BUILT:
        return _BUILT[memo]
    from foldviz.proxy import clear_memory

    clear_memory()  # a build, not a memory hit
    c, w = time.process_time(), time.perf_counter()
    x, _info = get_proxy(lm.model, spec, cache=None)
    assert _info.source == "built"
    cpu, wall = time.process_time() - c, time.perf_counter() - w
    clear_memory()
    if any(k[0] != memo[0] for k in _BUILT):
        _BUILT.clear()  # one model's proxies at a time
    _BUILT[memo] = (x, cpu, wall)
    return x, cpu, wall


def timed_fold(lm, key: str, ratio: float, seed: int, real=None):
    c = time.process_time()
    res = fold(lm.model, FoldPlan(default_ratio=ratio, repair=key, seed=seed), example_input=lm.example_input(1),
               repair_data=real, num_classes=lm.num_classes, method=key)
    return res.model, time.process_time() - c


def environment() -> dict:
    return {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()}


# ---------------------------------------------------------------------------------------------------------------
def run_frontier(args) -> list[dict]:
    path = OUT / f"{args.out}.json"
    rows = json.loads(path.read_text())["rows"] if args.append and path.exists() else []
    if not args.append and path.exists():
        path.unlink()  # a fresh panel: no earlier runs
    have = {(r["model"], r["candidate"]) for r in rows}
    for name in args.models:
        lm = load(name)
        x_test, y_test = test_data(lm)
        base = accuracy(lm.model, x_test, y_test)
        real = sample_inputs("digits", "train", 512, card=lm.card, seed=0)
        todo = [v for v in args.variants if (name, v) not in have]
        if not todo:
            continue
        for key, label in (("r", "Fold-R (real data)"), ("ar", "Fold-AR (authors)")):
            if (name, label) in have:
                continue
            for ratio in RATIOS:
                for seed in SEEDS:
                    model, cpu = timed_fold(lm, key, ratio, seed, real if key == "r" else None)
                    rows.append({"model": name, "base": base, "candidate": label, "ratio": ratio, "seed": seed,
                                 "accuracy": accuracy(model, x_test, y_test), "fold_cpu_s": cpu})
        ctxs = {(r, s): merged(lm, r, s) for r in RATIOS for s in SEEDS}
        for v in todo:
            x, cpu, wall = build(lm, VARIANTS[v])
            for (ratio, seed), ctx in ctxs.items():
                rows.append({"model": name, "base": base, "candidate": v, "ratio": ratio, "seed": seed,
                             "accuracy": accuracy(repaired(ctx, x, VARIANTS[v].get("repair")), x_test, y_test),
                             "proxy_cpu_s": cpu,
                             "proxy_wall_s": wall})
            sel = [r["accuracy"] for r in rows if r["model"] == name and r["candidate"] == v]
            print(f"{name:18s} {v:30s} proxy {cpu:6.1f} CPU-s  mean acc {100 * np.mean(sel):5.1f}", flush=True)
            save(path, rows, args)
    return rows


_RUN = {"argv": sys.argv[1:], "started": time.strftime("%Y-%m-%d %H:%M"), "load_before": os.getloadavg()}


def save(path: Path, rows, args) -> None:
    """Rows so far, and one record per invocation (an --append run keeps the earlier ones)."""
    runs = []
    if path.exists():
        try:
            runs = [r for r in json.loads(path.read_text()).get("runs", []) if r.get("started") != _RUN["started"]
                    or r.get("argv") != _RUN["argv"]]
        except (ValueError, AttributeError):
            runs = []
    runs.append({**_RUN, "load_now": os.getloadavg(), "environment": environment()})
    path.write_text(json.dumps({"runs": runs, "rows": rows}, indent=1))


def cell(rows, model, cand, ratio=None):
    sel = [r["accuracy"] for r in rows if r["model"] == model and r["candidate"] == cand
           and (ratio is None or r["ratio"] == ratio)]
    return 100 * float(np.mean(sel)) if sel else float("nan")


def frontier_md(rows, load_before=None, load_after=None, wall=None, runs=()) -> str:
    models = list(dict.fromkeys(r["model"] for r in rows))
    cands = [c for c in ["Fold-R (real data)", "Fold-AR (authors)", *VARIANTS] if any(r["candidate"] == c for r in rows)]
    out = ["# Fold-DFR proxy candidates: cost x quality", "",
           "Accuracy % on the 450 held-out digits, mean over seeds 0-2 (k-means seeds; the proxy's own seed is 0), "
           "per channel ratio; `mean` over the three ratios. Proxy cost = CPU-seconds to build it on 1 thread, "
           "no cache (it is built once per model and reused by every ratio and seed). Fold-R uses 512 real "
           "training images. Same clusters for every candidate of a (model, ratio, seed).",
           "Every run on 1 torch thread (OMP_NUM_THREADS=1, nice 5) on a shared 2-core AMD EPYC VM; "
           "os.getloadavg() before and after each invocation:", ""]
    out += [f"- run {r.get('started')}: `{' '.join(r.get('argv', []))[:160]}`, load {tuple(round(v, 2) for v in r.get('load_before', ()))}"
            f" -> {tuple(round(v, 2) for v in r.get('load_now', ()))}" for r in runs] + [""]
    for m in models:
        base = next(r["base"] for r in rows if r["model"] == m)
        out += [f"## {m} (original {100 * base:.1f} %)", "",
                "| candidate | proxy CPU-s | 0.25 | 0.5 | 0.7 | mean | vs Fold-R at 0.25 / 0.5 / 0.7 |",
                "|---|---:|---:|---:|---:|---:|---|"]
        for c in cands:
            if not any(r["model"] == m and r["candidate"] == c for r in rows):
                continue
            cost = [r.get("proxy_cpu_s") for r in rows if r["model"] == m and r["candidate"] == c]
            cost_s = f"{cost[0]:.1f}" if cost[0] is not None else "-"
            accs = [cell(rows, m, c, r) for r in RATIOS]
            diff = " / ".join(f"{a - cell(rows, m, 'Fold-R (real data)', r):+.1f}" for a, r in zip(accs, RATIOS))
            out.append(f"| {c} | {cost_s} | " + " | ".join(f"{a:.1f}" for a in accs) +
                       f" | {np.mean(accs):.1f} | {diff} |")
        out.append("")
    out += summary_md(rows, models), ""
    out += targets_md(rows, models), ""
    return "\n".join(out)


DEFAULT = "DI-30 x32 lr 0.25 normalized"   # the library's default proxy (foldviz.proxy.PROXY_DEFAULTS, DI_OBJECTIVE)


def targets_md(rows, models, candidate: str = DEFAULT) -> str:
    """Per model: the default against Fold-R and Fold-AR at each ratio, and whether it is within 1 point of Fold-R
    at ratio <= 0.5 and within 5 points at 0.7 (the targets)."""
    lines = [f"## Targets: `{candidate}` (the default) against Fold-R, per model", "",
             "| model | Fold-R 0.25 / 0.5 / 0.7 | Fold-AR 0.25 / 0.5 / 0.7 | default 0.25 / 0.5 / 0.7 | gap to Fold-R | "
             "within 1 pt (<= 0.5) and 5 pts (0.7) |", "|---|---|---|---|---|---|"]
    met = 0
    for m in models:
        if not any(r["model"] == m and r["candidate"] == candidate for r in rows):
            continue
        fr = [cell(rows, m, "Fold-R (real data)", r) for r in RATIOS]
        ar = [cell(rows, m, "Fold-AR (authors)", r) for r in RATIOS]
        d = [cell(rows, m, candidate, r) for r in RATIOS]
        gap = [a - b for a, b in zip(d, fr)]
        ok = gap[0] >= -1 and gap[1] >= -1 and gap[2] >= -5
        met += ok
        f = lambda v: " / ".join(f"{x:.1f}" for x in v)  # noqa: E731
        lines.append(f"| {m} | {f(fr)} | {f(ar)} | {f(d)} | " + " / ".join(f"{g:+.1f}" for g in gap) +
                     f" | {'yes' if ok else 'no'} |")
    lines += ["", f"Met on {met} of {len(lines) - 4} models."]
    return "\n".join(lines)


def summary_md(rows, models) -> str:
    """Across models: mean accuracy per ratio, mean gap to Fold-R, cost relative to the previous default, and
    whether a candidate is on the cost x quality frontier (no other is both cheaper and more accurate)."""
    cands = [c for c in VARIANTS if all(any(r["model"] == m and r["candidate"] == c for r in rows) for m in models)]
    stats = {}
    for c in cands:
        rel = []
        for m in models:
            mine = [r["proxy_cpu_s"] for r in rows if r["model"] == m and r["candidate"] == c][0]
            ref = [r["proxy_cpu_s"] for r in rows if r["model"] == m and r["candidate"] == BASELINE]
            if ref and ref[0] > 0:
                rel.append(mine / ref[0])
        accs = [np.mean([cell(rows, m, c, r) for m in models]) for r in RATIOS]
        gaps = [np.mean([cell(rows, m, c, r) - cell(rows, m, "Fold-R (real data)", r) for m in models]) for r in RATIOS]
        stats[c] = (float(np.mean(rel)) if rel else float("nan"), accs, gaps)
    lines = [f"## Summary over {len(models)} models ({', '.join(models)})", "",
             "| candidate | cost vs previous default | 0.25 | 0.5 | 0.7 | mean | gap to Fold-R 0.25 / 0.5 / 0.7 | frontier |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for c, (cost, accs, gaps) in stats.items():
        mean = float(np.mean(accs))
        dominated = any(o != c and oc <= cost and float(np.mean(oa)) >= mean and (oc < cost or float(np.mean(oa)) > mean)
                        for o, (oc, oa, _g) in stats.items())
        lines.append(f"| {c} | {cost:.2f}x | " + " | ".join(f"{a:.1f}" for a in accs) + f" | {mean:.1f} | "
                     + " / ".join(f"{g:+.1f}" for g in gaps) + f" | {'' if dominated else 'yes'} |")
    for label in ("Fold-R (real data)", "Fold-AR (authors)"):
        accs = [np.mean([cell(rows, m, label, r) for m in models]) for r in RATIOS]
        lines.append(f"| {label} | - | " + " | ".join(f"{a:.1f}" for a in accs) + f" | {np.mean(accs):.1f} | | |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
def run_resolution(args) -> list[dict]:
    rows = []
    for name in args.models:
        lm = load(name)
        x_test, y_test = test_data(lm)
        base = accuracy(lm.model, x_test, y_test)
        real = sample_inputs("digits", "train", 512, card=lm.card, seed=0)
        for ratio in args.ratios:
            for seed in SEEDS:
                model, cpu = timed_fold(lm, "r", ratio, seed, real)
                rows.append({"model": name, "base": base, "candidate": "Fold-R (real data)", "samples": 512,
                             "ratio": ratio, "seed": seed, "accuracy": accuracy(model, x_test, y_test)})
        ctxs = {(r, s): merged(lm, r, s) for r in args.ratios for s in SEEDS}
        for n in args.samples:
            x, cpu, wall = build(lm, {"proxy": "di", "samples": n, "proxy_steps": args.steps, "lr": args.lr,
                                      "normalized": not args.raw_loss})
            for (ratio, seed), ctx in ctxs.items():
                rows.append({"model": name, "base": base, "candidate": f"DI-{args.steps}", "samples": n,
                             "ratio": ratio, "seed": seed, "accuracy": accuracy(repaired(ctx, x), x_test, y_test),
                             "proxy_cpu_s": cpu})
            sel = [r["accuracy"] for r in rows if r["model"] == name and r.get("samples") == n and "DI" in r["candidate"]]
            print(f"{name:18s} DI-{args.steps} x{n:<4d} proxy {cpu:6.1f} CPU-s  mean acc {100 * np.mean(sel):5.1f}",
                  flush=True)
    return rows


def resolution_md(rows, args, load_before, load_after, wall) -> str:
    out = ["# Fold-DFR: accuracy against proxy sample count at larger inputs", "",
           f"DI-{args.steps} proxy (lr {args.lr}, {'raw' if args.raw_loss else 'normalised'} BN loss, seed 0), accuracy % mean over seeds 0-2 on the 450 held-out digits (upsampled); "
           "proxy cost in CPU-seconds on 1 thread.",
           f"os.getloadavg() before {load_before}, after {load_after}; wall {wall / 60:.1f} min; {environment()}.", ""]
    for m in dict.fromkeys(r["model"] for r in rows):
        shape = load(m).input_shape
        out += [f"## {m} (input {'x'.join(map(str, shape))}, original {100 * rows[[r['model'] for r in rows].index(m)]['base']:.1f} %)", "",
                "| proxy samples | proxy CPU-s | " + " | ".join(f"ratio {r}" for r in args.ratios) + " |",
                "|---:|---:|" + "---:|" * len(args.ratios)]
        for n in list(dict.fromkeys(r["samples"] for r in rows if r["model"] == m and "DI" in r["candidate"])):
            sel = [r for r in rows if r["model"] == m and r["samples"] == n and "DI" in r["candidate"]]
            accs = [100 * np.mean([r["accuracy"] for r in sel if r["ratio"] == ra]) for ra in args.ratios]
            out.append(f"| {n} | {sel[0]['proxy_cpu_s']:.1f} | " + " | ".join(f"{a:.1f}" for a in accs) + " |")
        fr = [100 * np.mean([r["accuracy"] for r in rows if r["model"] == m and r["candidate"].startswith("Fold-R")
                             and r["ratio"] == ra]) for ra in args.ratios]
        out += ["| Fold-R (512 real) | - | " + " | ".join(f"{a:.1f}" for a in fr) + " |", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------
def run_cost(args) -> str:
    """A default fold (the proxy read from a warm persistent cache, memory cleared every time as in a new process)
    against a Fold-AR fold, alternating, CPU-seconds; and the cold proxy: new default against the previous one."""
    from foldviz import cache as C
    from foldviz.fold import fold
    from foldviz.proxy import clear_memory

    lines = ["# Fold-DFR cost: warm cache against Fold-AR, cold proxy against the previous default", "",
             f"os.getloadavg() before {tuple(round(v, 2) for v in os.getloadavg())}; {environment()}.", "",
             "| model | ratio | Fold-AR fold CPU-s | default fold, warm cache CPU-s | ratio DFR/AR | cold proxy CPU-s (new default) | cold proxy CPU-s (previous DI-50 x64) | new/previous |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        C.configure(directory=tmp, enabled=True)
        for name in args.models:
            lm = load(name)
            x = lm.example_input(1)
            clear_memory()
            fold(lm.model, FoldPlan(default_ratio=0.5), example_input=x, num_classes=lm.num_classes)  # fills the cache
            ar, dfr = [], []
            for i in range(args.rounds):
                for key, acc in (("ar", ar), ("dfr", dfr)) if i % 2 == 0 else (("dfr", dfr), ("ar", ar)):
                    clear_memory()
                    c = time.process_time()
                    res = fold(lm.model, FoldPlan(default_ratio=0.5, repair=key, seed=i), example_input=x,
                               num_classes=lm.num_classes)
                    acc.append(time.process_time() - c)
                    assert key == "ar" or res.proxy["source"] == "cache"
            _x, new_cpu, _w = build(lm, {})
            _x, old_cpu, _w = build(lm, VARIANTS[BASELINE])
            row = {"model": name, "ar_cpu_s": float(np.median(ar)), "dfr_warm_cpu_s": float(np.median(dfr)),
                   "proxy_new_cpu_s": new_cpu, "proxy_previous_cpu_s": old_cpu, "rounds": args.rounds}
            rows.append(row)
            lines.append(f"| {name} | 0.5 | {row['ar_cpu_s']:.2f} | {row['dfr_warm_cpu_s']:.2f} | "
                         f"{row['dfr_warm_cpu_s'] / row['ar_cpu_s']:.2f}x | {new_cpu:.1f} | {old_cpu:.1f} | "
                         f"{new_cpu / old_cpu:.2f}x |")
            print(lines[-1], flush=True)
    lines += ["", f"In-process `fold()` calls, medians over {args.rounds} alternating rounds (the DFR proxy read from the "
              "cache and validated every time, memory cleared).", ""]
    lines += cli_cost(args.cli_model, args.rounds)
    lines += ["", f"os.getloadavg() after {tuple(round(v, 2) for v in os.getloadavg())}.", ""]
    (OUT / "proxy_cost.json").write_text(json.dumps({"environment": environment(), "rows": rows}, indent=1))
    return "\n".join(lines)


def cli_cost(model: str, rounds: int) -> list[str]:
    """``python -m foldviz fold MODEL --ratio 0.5`` with the default repair (warm cache) and with ``--repair ar``,
    alternating, in CPU-seconds of the child processes (interpreter start, loading, report, saving included)."""
    import resource
    import subprocess

    def cpu() -> float:
        u = resource.getrusage(resource.RUSAGE_CHILDREN)
        return u.ru_utime + u.ru_stime

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = {"default": [], "ar": []}
    with tempfile.TemporaryDirectory() as tmp:
        env["FOLDVIZ_CACHE_DIR"] = str(Path(tmp) / "cache")
        base = [sys.executable, "-m", "foldviz", "fold", model, "--ratio", "0.5", "--no-latency", "--quiet"]
        subprocess.run([*base, "--out", str(Path(tmp) / "warm")], cwd=ROOT, env=env, check=True)  # fills the cache
        for i in range(rounds):
            for key in (("default", "ar") if i % 2 == 0 else ("ar", "default")):
                extra = ["--repair", "ar"] if key == "ar" else []
                c = cpu()
                subprocess.run([*base, *extra, "--out", str(Path(tmp) / f"{key}{i}")], cwd=ROOT, env=env, check=True)
                out[key].append(cpu() - c)
    d, a = float(np.median(out["default"])), float(np.median(out["ar"]))
    return ["| command line, CPU-s of the process | Fold-AR (`--repair ar`) | default (Fold-DFR, warm cache) | ratio |",
            "|---|---:|---:|---:|",
            f"| `python -m foldviz fold {model} --ratio 0.5 --no-latency` | {a:.2f} | {d:.2f} | {d / a:.2f}x |", "",
            f"Medians over {rounds} alternating runs of each (1 torch thread)."]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=["frontier", "resolution", "cost", "render"])
    ap.add_argument("--models", nargs="+")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--samples", nargs="+", type=int, default=[4, 8, 16, 32, 64])
    ap.add_argument("--steps", type=int, default=20, help="resolution: Deep-Inversion steps of the proxy")
    ap.add_argument("--lr", type=float, default=0.25, help="resolution: Deep-Inversion learning rate")
    ap.add_argument("--raw-loss", action="store_true", help="resolution: the unnormalised BN-matching loss")
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.7])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cli-model", default="demo:digits-resnet")
    ap.add_argument("--out", default=None)
    ap.add_argument("--append", action="store_true", help="keep the rows already in OUT.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    lb, t0 = tuple(round(v, 2) for v in os.getloadavg()), time.time()
    if args.part == "frontier":
        args.models = args.models or [*DEMOS, *CHECKPOINTS]
        args.out = args.out or "proxy_frontier"
        rows = run_frontier(args)
        path = OUT / f"{args.out}.json"
        runs = json.loads(path.read_text()).get("runs", []) if path.exists() else []
        text = frontier_md(rows, runs=runs)
    elif args.part == "resolution":
        args.models = args.models or ["digits-resnet18", "x-vgg-64px", "x-vgg-128px"]
        args.out = args.out or "proxy_resolution"
        rows = run_resolution(args)
        (OUT / f"{args.out}.json").write_text(json.dumps({"environment": environment(), "rows": rows}, indent=1))
        text = resolution_md(rows, args, lb, tuple(round(v, 2) for v in os.getloadavg()), time.time() - t0)
    elif args.part == "render":  # the markdown of an existing frontier JSON (e.g. after changing DEFAULT)
        args.out = args.out or "proxy_frontier"
        data = json.loads((OUT / f"{args.out}.json").read_text())
        text = frontier_md(data["rows"], runs=data.get("runs", []))
    else:
        args.models = args.models or ["digits-resnet", "digits-resnet18", "torchvision-resnet18-cifar"]
        args.out = args.out or "proxy_cost"
        text = run_cost(args)
    (OUT / f"{args.out}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
