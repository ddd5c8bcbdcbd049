"""Research panel for data-free repair: accuracy and BN variance ratios of every repair candidate.

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
from torch import nn  # noqa: E402

from foldviz.apply import apply_method  # noqa: E402
from foldviz.data import digits_arrays, sample_inputs, tensor_transform  # noqa: E402
from foldviz.fold import ClusterSelector  # noqa: E402
from foldviz.groups import BN_TYPES  # noqa: E402
from foldviz.repair import REPAIRS, DataFreeRepair, FoldAR, Repair, _bn_producers  # noqa: E402
from foldviz.surgery import compress  # noqa: E402
from foldviz.metrics import variance_ratios  # noqa: E402
from foldviz.models import load_model  # noqa: E402
from foldviz.plans import FoldPlan  # noqa: E402

class StatProp(Repair):
    """Research candidate (a): statistics propagation, no forward pass (see statprop_finish)."""

    key = "dfr"

    def finish(self, ctx):
        statprop_finish(ctx.original, ctx.work, ctx.channel_maps, ctx.example_input.cpu())


# label -> (plan repair key, the Repair that runs)
CANDIDATES = {
    "Fold-Naive": ("none", REPAIRS["none"]),
    "Fold-R (real data)": ("r", REPAIRS["r"]),
    "old AR (fan-in rows, per BN)": ("ar", FoldAR(estimate="fanin")),
    "Fold-AR (authors, whole group)": ("ar", FoldAR()),
    "DFR b: noise proxy": ("dfr", DataFreeRepair(proxy="noise", samples=256, linear_repair=False)),
    "DFR b: smoothed-noise proxy": ("dfr", DataFreeRepair(proxy="smooth", samples=256, linear_repair=False)),
    "DFR c: noise, not sequential": ("dfr", DataFreeRepair(proxy="noise", samples=256, sequential=False,
                                                           linear_repair=False)),
    "DFR a: stats propagation (no forward pass)": ("dfr", StatProp()),
    "Fold-DFR (default: DI-30 x32 proxy + BN-less layer repair)": ("dfr", REPAIRS["dfr"]),
    # variance calibration by the cluster's sum with the proxy's member correlations (research_proxy.py measures it
    # on shared merges: benchmarks/results/proxy_frontier.md)
    "DFR cov calibration": ("dfr", DataFreeRepair(calibration="cov")),
    # baselines run through foldviz.apply.apply_method (their own selectors): (method key, None)
    "IFM": ("ifm", None),
    "L1 + REPAIR (real data)": ("l1+r", None),
}
# the data-free repair panel (docs/BENCHMARKS.md 3b): the columns the issue names, Fold-DIR aside (minutes per fold on CPU)
MAIN_PANEL = ["Fold-Naive", "Fold-R (real data)", "Fold-AR (authors, whole group)",
              "Fold-DFR (default: DI-30 x32 proxy + BN-less layer repair)", "IFM", "L1 + REPAIR (real data)"]
MODELS = ("digits-mlp", "digits-vgg", "digits-resnet", "digits-resnet-2x", "digits-resnet18")


def _load(name: str):
    """A bundled demo, or an unshipped checkpoint of benchmarks/checkpoints.py (trained when missing)."""
    if name.startswith("digits-"):
        return load_model(f"demo:{name}")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from checkpoints import load_checkpoint

    return load_checkpoint(name)


def _rectified_var(gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Var(max(0, u)) for u ~ N(beta, gamma^2) (DFQ-style rectified-Gaussian moments)."""
    g = gamma.double().abs().clamp_min(1e-12)
    b = beta.double()
    t = b / g
    pdf = torch.exp(-0.5 * t * t) / (2 * torch.pi) ** 0.5
    cdf = 0.5 * (1 + torch.erf(t / 2 ** 0.5))
    m1 = b * cdf + g * pdf
    m2 = (b * b + g * g) * cdf + b * g * pdf
    return (m2 - m1 * m1).clamp_min(1e-12)


@torch.no_grad()
def statprop_finish(original: nn.Module, work: nn.Module, channel_maps: dict[str, np.ndarray], example_input,
                    alphas=tuple(np.linspace(0, 1, 21))) -> dict:
    """Candidate (a): predict each merged channel's pre-BN variance without any forward pass.

    For a BN fed by conv/linear W (rows w_i over input channels ch and kernel taps t), model the producer's
    input covariance as diag(v_ch) x [(1-alpha) I + alpha 11^T] over the taps of a channel (v_ch: rectified-Gaussian
    variance of the previous BN when the input is ReLU(BN), else 1), so
    cov_ij = sum_ch v_ch [(1-alpha) <w_i,ch, w_j,ch> + alpha S_i,ch S_j,ch] with S the tap sums; alpha per layer is
    fitted on a grid so that the predicted member variances are proportional to the known running_var. Then
    running_var_c = mean_{i,j in c} sqrt(RV_i RV_j) rho_ij and running_mean_c = mean RM_i. Only the merged
    producers' own BNs are changed (collapse only; summed consumers are left alone)."""
    from foldviz.groups import build_dependency_graph

    dg = build_dependency_graph(original, example_input)
    named = [(n, m) for n, m in original.named_modules() if n]
    pos = {m: i for i, (_, m) in enumerate(named)}
    names = {m: n for n, m in named}
    wmods = dict(work.named_modules())
    fitted = {}
    for bn, prod in _bn_producers(dg, original).items():
        name = names[bn]
        if name not in wmods or name not in channel_maps:
            continue
        w = prod.weight.detach().double()
        w = w.reshape(w.shape[0], w.shape[1], -1)
        prev = [m for _, m in named[:pos[prod]] if isinstance(m, BN_TYPES) and m.num_features == w.shape[1]]
        v = _rectified_var(prev[-1].weight, prev[-1].bias) if prev else torch.ones(w.shape[1], dtype=torch.float64)
        a = w * v.sqrt().view(1, -1, 1)
        g1 = a.flatten(1) @ a.flatten(1).T
        s = a.sum(2)
        g2 = s @ s.T
        rv = bn.running_var.double()
        best = None
        for al in alphas:
            pred = ((1 - al) * g1.diagonal() + al * g2.diagonal()).clamp_min(1e-30)
            score = float(torch.log(rv.clamp_min(1e-30) / pred).var())
            if best is None or score < best[0]:
                best = (score, float(al))
        al = best[1]
        cov = (1 - al) * g1 + al * g2
        d = cov.diagonal().clamp_min(1e-30).sqrt()
        rho = cov / d[:, None] / d[None, :]
        cmap = channel_maps[name]
        size = wmods[name].running_var.numel()
        onehot = torch.zeros(size, len(cmap), dtype=torch.float64)
        keep = np.flatnonzero(cmap >= 0)
        onehot[torch.as_tensor(cmap[keep]), torch.as_tensor(keep)] = 1.0
        onehot = onehot / onehot.sum(1, keepdim=True).clamp_min(1)
        sd = rv.sqrt()
        var = ((onehot @ (sd[:, None] * rho * sd[None, :])) * onehot).sum(1)
        wmods[name].running_var.copy_(var.to(wmods[name].running_var.dtype))
        fitted[name] = al
    return {"alpha": fitted}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.5, 0.7])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES))
    ap.add_argument("--main", action="store_true", help="only the issue's panel columns (MAIN_PANEL)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "repair_panel"))
    ap.add_argument("--append", action="store_true", help="keep the runs already in OUT.json, add the missing ones")
    args = ap.parse_args(argv)
    if args.main:
        args.candidates = MAIN_PANEL
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    t_start = time.time()
    out = Path(args.out)
    rows = json.loads(out.with_suffix(".json").read_text()) if args.append and out.with_suffix(".json").exists() else []
    have = {(r["model"], r["ratio"], r["candidate"], r["seed"]) for r in rows}
    for name in args.models:
        lm = _load(name)
        xt, yt = digits_arrays("test")
        x_test = tensor_transform(xt, tuple(lm.input_shape), lm.normalization)
        x_var = x_test[:256]
        real = sample_inputs("digits", "train", 512, card=lm.card, seed=0)
        bns = {n for n, m in lm.model.named_modules() if isinstance(m, BN_TYPES)}
        with torch.no_grad():
            base = float((lm.model(x_test).argmax(1) == yt).float().mean())
        for ratio in args.ratios:
            for label in args.candidates:
                key, repair = CANDIDATES[label]
                for seed in args.seeds:
                    if (name, ratio, label, seed) in have:
                        continue
                    t = time.perf_counter()
                    if repair is None:
                        res = apply_method(lm, FoldPlan(default_ratio=ratio, seed=seed), key, repair_data=real)
                    else:
                        select = ClusterSelector()   # the fold's selector, with a candidate Repair object
                        try:
                            res = compress(lm.model, FoldPlan(default_ratio=ratio, repair=key, seed=seed), select,
                                           method=key, repair=repair, example_input=lm.example_input(1),
                                           repair_data=real, num_classes=lm.num_classes)
                        finally:
                            select.close()
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
    lines = ["# Data-free repair panel", "",
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
