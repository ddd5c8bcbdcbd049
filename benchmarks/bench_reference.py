"""foldviz beside the authors' own code (marza96/ModelFolding) on the same weights.

    python benchmarks/bench_reference.py --authors-src /path/to/ModelFolding [--extra-path DIR] [--out FILE.md]

Without ``--authors-src`` it prints one line saying it is skipped and exits 0. The authors' code is never vendored:
it is imported from the local checkout DIR, and the CPU patches below are applied at import time by monkeypatching.
It needs IBM's ``hkmeans`` (pip ``hartigan-kmeans``) importable; ``--extra-path`` adds a directory to ``sys.path``.

Model: ``demo:digits-resnet18`` (ResNet-18, CIFAR stem, 1/4 width 16-32-64-128, digits upsampled to 3x32x32)
loaded into *the authors' ResNet class* (their ``model.resnet.BasicBlock`` / ``ResNet``; only the hard-coded
64-512 widths are scaled by 1/4 in a subclass constructor), with names mapped ``downsample -> shortcut`` and
``fc -> linear``; the two models' logits are checked equal before anything runs.

Methods, same weights, same k per group (the authors' ``k = int(n(1-r))`` equals foldviz's ``round(n(1-r))`` for
n in {16, 32, 64, 128} at r = 0.25 and 0.5, and the script checks the resulting widths agree):
Fold-Naive (both), Fold-AR (authors' DF_REPAIR: fuse BNs, approx-repair merge; foldviz "ar"), Fold-R (both,
the same 512 real training images, forwarded in batches of 256 in train mode with momentum=None), Fold-DFR
(foldviz only). Per-layer variance: for every BatchNorm output, mean channel variance folded / original over the
digits test split; reported as the mean |log2 ratio| over layers (0 is ideal). Seeds: the authors' HKMeans uses
numpy's global RNG (``random_state=None``), so ``np.random.seed(seed)`` is set before each of their runs.

CPU patches (each applied only by this script, at import time or around the authors' calls):
1. ``torch.nn.modules.module.ModuleAttributeError`` (removed from torch) is set to ``AttributeError``; their
   ``fuse_block`` catches it for blocks without ``bn3``.
2. Their ``WeightClustering.__call__`` allocates ``torch.zeros(..., device="cuda")`` and ``get_average_correlation``
   calls ``.to("cuda")``: around every call into their code, ``torch.zeros`` and ``torch.Tensor.to`` rewrite the
   device ``"cuda"`` to ``"cpu"``.
3. ``HKMeans(n_jobs=-1)`` is replaced by ``n_jobs=1`` in their module (same algorithm; no worker processes on a
   shared 2-core machine).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from foldviz.apply import apply_method, repair_inputs  # noqa: E402
from foldviz.data import evaluate, load_dataset, make_loader  # noqa: E402
from foldviz.metrics import channel_variances  # noqa: E402
from foldviz.models import load_model  # noqa: E402
from foldviz.plans import FoldPlan  # noqa: E402

MODEL = "demo:digits-resnet18"
WIDTHS = (16, 32, 64, 128)


# -- the authors' code, patched for CPU -------------------------------------------------------------------------
def _to_cpu_device(dev):
    if isinstance(dev, str) and dev.startswith("cuda"):
        return "cpu"
    if isinstance(dev, torch.device) and dev.type == "cuda":
        return torch.device("cpu")
    return dev


@contextlib.contextmanager
def on_cpu():
    """Patch 2: "cuda" becomes "cpu" in torch.zeros(device=...) and Tensor.to(...) while their code runs."""
    zeros, to = torch.zeros, torch.Tensor.to

    @functools.wraps(zeros)
    def zeros_cpu(*a, **k):
        if "device" in k:
            k["device"] = _to_cpu_device(k["device"])
        return zeros(*a, **k)

    @functools.wraps(to)
    def to_cpu(self, *a, **k):
        a = tuple(_to_cpu_device(x) for x in a)
        if "device" in k:
            k["device"] = _to_cpu_device(k["device"])
        return to(self, *a, **k)

    torch.zeros, torch.Tensor.to = zeros_cpu, to_cpu
    try:
        yield
    finally:
        torch.zeros, torch.Tensor.to = zeros, to


def import_authors(src: Path, extra: list[str]):
    for p in [*extra, str(src)]:
        if p not in sys.path:
            sys.path.insert(0, p)
    torch.nn.modules.module.ModuleAttributeError = AttributeError          # patch 1
    import model.resnet as a_resnet
    import utils.utils as a_utils
    import utils.weight_clustering as a_wc
    from hkmeans import HKMeans

    a_wc.HKMeans = functools.partial(HKMeans, n_jobs=1)                      # patch 3 (keyword wins over n_jobs=-1)
    return a_resnet, a_utils, a_wc


def authors_model(a_resnet, loaded) -> nn.Module:
    """The authors' ResNet class at 1/4 width, holding the demo's weights."""

    class QuarterResNet18(a_resnet.ResNet):
        def __init__(self, num_classes=10):
            nn.Module.__init__(self)
            block = a_resnet.BasicBlock
            self.in_planes = WIDTHS[0]
            self.conv1 = nn.Conv2d(3, WIDTHS[0], kernel_size=3, stride=1, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(WIDTHS[0])
            self.relu_conv = nn.ReLU(inplace=True)
            self.layer1 = self._make_layer(block, WIDTHS[0], 2, stride=1)
            self.layer2 = self._make_layer(block, WIDTHS[1], 2, stride=2)
            self.layer3 = self._make_layer(block, WIDTHS[2], 2, stride=2)
            self.layer4 = self._make_layer(block, WIDTHS[3], 2, stride=2)
            self.linear = nn.Linear(WIDTHS[3], num_classes)

    m = QuarterResNet18(loaded.num_classes)
    sd = {k.replace("downsample", "shortcut").replace("fc.", "linear."): v for k, v in loaded.model.state_dict().items()}
    m.load_state_dict(sd, strict=True)
    m.eval()
    x = loaded.example_input(8)
    with torch.no_grad():
        assert torch.allclose(m(x), loaded.model(x), atol=1e-5), "the authors' class does not reproduce the demo"
    return m


# -- measurements -------------------------------------------------------------------------------------------------
def bn_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


def mean_abs_log2(orig_var: dict, model: nn.Module, x: torch.Tensor, rename=lambda n: n) -> float:
    names = bn_layers(model)
    for m in model.modules():  # the authors' merge assigns .data of a BN without updating num_features
        if isinstance(m, nn.BatchNorm2d):
            m.num_features = m.weight.shape[0]
    v = channel_variances(model, x, names)
    logs = []
    for n in names:
        o = orig_var[rename(n)]
        logs.append(abs(np.log2(float(np.mean(v[n])) / float(np.mean(o)))))
    return float(np.mean(logs))


def bn_reset(model: nn.Module, data: torch.Tensor, batch: int = 256) -> None:
    """The authors' test_merge REPAIR branch: reset_running_stats, momentum=None, train-mode forwards, eval."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(0, len(data), batch):
            model(data[i:i + batch])
    model.eval()


def widths(model: nn.Module) -> list[int]:
    return [m.weight.shape[0] for m in model.modules() if isinstance(m, nn.Conv2d)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--authors-src", help="local checkout of marza96/ModelFolding")
    ap.add_argument("--extra-path", action="append", default=[], help="added to sys.path (e.g. where hkmeans is)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", help="write the results as Markdown here")
    args = ap.parse_args(argv)
    if not args.authors_src:
        print("bench_reference: skipped (no --authors-src DIR given: a checkout of marza96/ModelFolding)")
        return 0
    src = Path(args.authors_src).resolve()
    a_resnet, a_utils, _ = import_authors(src, args.extra_path)
    try:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown (not a git checkout)"

    torch.set_num_threads(1)
    loaded = load_model(MODEL)
    theirs0 = authors_model(a_resnet, loaded)
    test = load_dataset("digits", "test", card=loaded.card)
    loader = make_loader(test, 256)
    x_var = torch.stack([test[i][0] for i in range(len(test))])
    real = repair_inputs(loaded, "digits", 512, seed=0)
    ours_var = channel_variances(loaded.model, x_var, bn_layers(loaded.model))
    rename = lambda n: n.replace("shortcut", "downsample")  # noqa: E731
    base_acc = evaluate(loaded.model, loader).accuracy
    assert abs(evaluate(theirs0, loader).accuracy - base_acc) < 1e-9

    rows = []
    for ratio in args.ratios:
        for seed in args.seeds:
            for label, ours_key, their_kind in (("Fold-Naive", "none", "naive"), ("Fold-AR", "ar", "ar"),
                                                ("Fold-R", "r", "r"), ("Fold-DFR", "dfr", None)):
                row = {"method": label, "ratio": ratio, "seed": seed}
                t = time.perf_counter()
                res = apply_method(loaded, FoldPlan(default_ratio=ratio, repair=ours_key, seed=seed), ours_key,
                                   repair_data=real)
                row["ours_s"] = time.perf_counter() - t
                row["ours_acc"] = evaluate(res.model, loader).accuracy
                row["ours_log2"] = mean_abs_log2(ours_var, res.model, x_var)
                if their_kind is not None:
                    m = copy.deepcopy(theirs0)
                    np.random.seed(seed)
                    torch.manual_seed(seed)
                    t = time.perf_counter()
                    with on_cpu(), contextlib.redirect_stdout(io.StringIO()):   # their per-group prints
                        if their_kind == "ar":
                            a_utils.fuse_bnorms_resnet(m, [2, 2, 2, 2], override=True)
                            fn = a_resnet.merge_channel_ResNet18_clustering_approx_repair
                        else:
                            fn = a_resnet.merge_channel_ResNet18_clustering
                        m = fn(m, copy.deepcopy(m).state_dict(), max_ratio=ratio, hooks=None)
                        if their_kind == "r":
                            bn_reset(m, real)
                    row["theirs_s"] = time.perf_counter() - t
                    m.eval()
                    row["theirs_acc"] = evaluate(m, loader).accuracy
                    row["theirs_log2"] = mean_abs_log2(ours_var, m, x_var, rename)
                    row["same_k"] = sorted(widths(m)) == sorted(widths(res.model))
                rows.append(row)
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)

    load = os.getloadavg()
    lines = [
        "# foldviz beside the authors' code (marza96/ModelFolding)",
        "",
        f"Written by `benchmarks/bench_reference.py`. Authors' code: marza96/ModelFolding commit "
        f"`{commit}`, imported from a local checkout with the CPU patches listed in the script's docstring "
        "(nothing of it is in this repository). Model: `demo:digits-resnet18` weights in the authors' ResNet class "
        f"(1/4 width), original accuracy {100 * base_acc:.1f} % on the 450-image digits test split. Same k per group "
        "in both codes (checked: `same k`). Variance: mean over BatchNorm outputs of |log2(mean channel variance "
        "folded / original)| on the test split (0 = no collapse or explosion). CPU, 1 torch thread, "
        f"`os.getloadavg()` at the end: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (shared 2-core machine: "
        "seconds are indicative only).",
        "",
        "| ratio | seed | method | foldviz acc | authors acc | foldviz mean abs log2 var | authors mean abs log2 var | "
        "foldviz s | authors s | same k |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    def fmt(r, key, scale=1.0, digits=1):
        return f"{scale * r[key]:.{digits}f}" if key in r else "-"

    for r in rows:
        lines.append(f"| {r['ratio']:g} | {r['seed']} | {r['method']} | {fmt(r, 'ours_acc', 100)} | "
                     f"{fmt(r, 'theirs_acc', 100)} | {fmt(r, 'ours_log2', digits=2)} | "
                     f"{fmt(r, 'theirs_log2', digits=2)} | {fmt(r, 'ours_s', digits=2)} | "
                     f"{fmt(r, 'theirs_s', digits=2)} | {r.get('same_k', '-')} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
