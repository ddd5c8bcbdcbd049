"""Research panel for issue #12 (data-free repair): accuracy and BN variance ratios of every repair candidate.

For every bundled digits demo x channel ratio x seed it folds the model with each candidate, evaluates it on the
digits test split and measures mean |log2 variance ratio| over the BatchNorm layers (foldviz.metrics.variance_ratios
on 256 test images; 0 is ideal). Writes benchmarks/results/repair_panel.md (+ .json with every run).

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/research_repair.py [--models ...] [--ratios ...]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from foldviz.data import _tensor_transform, digits_arrays, sample_inputs  # noqa: E402
from foldviz.fold import run  # noqa: E402
from foldviz.groups import _BN  # noqa: E402
from foldviz.metrics import variance_ratios  # noqa: E402
from foldviz.models import load_model  # noqa: E402
from foldviz.plans import FoldPlan  # noqa: E402

# label -> (repair key, research options)
CANDIDATES = {
    "Fold-Naive": ("none", {}),
    "Fold-R (real data)": ("r", {}),
    "old AR (fan-in rows, per BN)": ("ar", {"ar_estimate": "fanin"}),
    "Fold-AR (authors, whole group)": ("ar", {"ar_estimate": "group"}),
    "DFR b: noise proxy": ("dfr", {"proxy": "noise", "samples": 256, "linear_repair": False}),
    "DFR b: smoothed-noise proxy": ("dfr", {"proxy": "smooth", "samples": 256, "linear_repair": False}),
    "DFR c: noise, not sequential": ("dfr", {"proxy": "noise", "samples": 256, "sequential": False,
                                             "linear_repair": False}),
    "DFR a: stats propagation (no forward pass)": ("dfr", {"dfr_estimate": "statprop"}),
    "Fold-DFR (default: DI-50 x64 proxy + BN-less layer repair)": ("dfr", {}),
}
MODELS = ("digits-mlp", "digits-vgg", "digits-resnet", "digits-resnet-2x", "digits-resnet18")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.5, 0.7])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "repair_panel"))
    ap.add_argument("--append", action="store_true", help="keep the runs already in OUT.json, add the missing ones")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    t_start = time.time()
    out = Path(args.out)
    rows = json.loads(out.with_suffix(".json").read_text()) if args.append and out.with_suffix(".json").exists() else []
    have = {(r["model"], r["ratio"], r["candidate"], r["seed"]) for r in rows}
    for name in args.models:
        lm = load_model(f"demo:{name}")
        xt, yt = digits_arrays("test")
        x_test = _tensor_transform(xt, tuple(lm.input_shape), lm.normalization)
        x_var = x_test[:256]
        real = sample_inputs("digits", "train", 512, card=lm.card, seed=0)
        bns = {n for n, m in lm.model.named_modules() if isinstance(m, _BN)}
        with torch.no_grad():
            base = float((lm.model(x_test).argmax(1) == yt).float().mean())
        for ratio in args.ratios:
            for label in args.candidates:
                key, opts = CANDIDATES[label]
                for seed in args.seeds:
                    if (name, ratio, label, seed) in have:
                        continue
                    t = time.perf_counter()
                    res = run(lm.model, FoldPlan(default_ratio=ratio, repair=key, seed=seed),
                              example_input=lm.example_input(1), repair_data=real, repair_options=opts,
                              num_classes=lm.num_classes)
                    secs = time.perf_counter() - t
                    with torch.no_grad():
                        acc = float((res.model(x_test).argmax(1) == yt).float().mean())
                    vr = [r for r in variance_ratios(lm.model, res.model, x_var, res.channel_maps) if r["layer"] in bns]
                    lv = float(np.mean([abs(np.log2(max(r["ratio"], 1e-12))) for r in vr])) if vr else float("nan")
                    rows.append({"model": name, "base": base, "ratio": ratio, "candidate": label, "seed": seed,
                                 "accuracy": acc, "abs_log2_var": lv, "seconds": secs})
                    print(f"{name:17s} r={ratio:.2f} {label:32s} seed {seed}: acc {acc:.3f}  |log2 vr| {lv:.3f}  "
                          f"{secs:.1f}s", flush=True)
        out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    load_after = os.getloadavg()
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    out.with_suffix(".md").write_text(markdown(rows, args, load_before, load_after, time.time() - t_start))
    print(out.with_suffix(".md").read_text())
    return 0


def markdown(rows, args, load_before, load_after, wall) -> str:
    lines = ["# Data-free repair panel (issue #12)", "",
             f"Seeds {args.seeds}; accuracy on the digits test split (450 images) as mean ± half-range over seeds; "
             "|log2 vr| = mean over BN layers of |log2 (folded/original activation variance)| on 256 test images "
             "(mean over seeds; 0 is ideal). Fold-R uses 512 real training images; every other column is data-free.",
             f"os.getloadavg() before {tuple(round(v, 2) for v in load_before)}, after "
             f"{tuple(round(v, 2) for v in load_after)}; wall {wall / 60:.1f} min on 1 thread.", ""]
    cands = [c for c in CANDIDATES if any(r["candidate"] == c for r in rows)]
    lines.append("| model (orig acc) | ratio | " + " | ".join(cands) + " |")
    lines.append("|---|---|" + "---|" * len(cands))
    for name in dict.fromkeys(r["model"] for r in rows):
        for ratio in dict.fromkeys(r["ratio"] for r in rows if r["model"] == name):
            cells = []
            for c in cands:
                sel = [r for r in rows if r["model"] == name and r["ratio"] == ratio and r["candidate"] == c]
                if not sel:
                    cells.append("")
                    continue
                a = np.array([r["accuracy"] for r in sel]) * 100
                v = np.mean([r["abs_log2_var"] for r in sel])
                s = np.mean([r["seconds"] for r in sel])
                cells.append(f"{a.mean():.1f} ± {(a.max() - a.min()) / 2:.1f} (vr {v:.2f}, {s:.1f}s)")
            base = sel[0]["base"] * 100 if sel else float("nan")
            lines.append(f"| {name} ({base:.1f}) | {ratio} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
