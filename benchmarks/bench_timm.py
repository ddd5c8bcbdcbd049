"""timm architecture sweep: does each family fold, shrink, stay exact where it must, and still export?

One model per family, the smallest variant, random init (nothing is downloaded), at the model's default input
size. Per model: channel groups (foldable / total, the reasons of the refused ones), a fold at ratio 0.3 with a
cheap data-free repair (Fold-AR; Fold-DFR's deep-inversion proxy costs minutes per model at 224x224 on two busy
cores), parameters before/after, whether the folded model runs (finite outputs), ratio 0 = identity, the
duplicated-channel exactness check (:func:`foldviz.foldcheck.duplicate_channel_check`: channels made exact copies
must fold without changing the function) and a checked ONNX export of the folded model.

Writes ``benchmarks/results/timm.{md,json}``. Run: ``nice -n 5 python benchmarks/bench_timm.py [--quick]``
(``--quick``: no ONNX export).
"""
from __future__ import annotations

import argparse
import re
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from common import Table, calibrate_batchnorms, environment, load_average, write_json  # noqa: E402
from foldviz.export import export_bytes  # noqa: E402
from foldviz.fold import fold  # noqa: E402
from foldviz.foldcheck import duplicate_channel_check, redraw_constants  # noqa: E402
from foldviz.groups import find_groups  # noqa: E402
from foldviz.metrics import count_params  # noqa: E402
from foldviz.models import load_model  # noqa: E402
from foldviz.plans import FoldPlan  # noqa: E402

FAMILIES = [  # (family, smallest timm variant)
    ("ResNet", "resnet10t"),
    ("EfficientNet", "efficientnet_b0"),
    ("ConvNeXt", "convnext_atto"),
    ("RegNet", "regnetx_002"),
    ("MobileNetV3", "mobilenetv3_small_050"),
    ("ViT", "vit_tiny_patch16_224"),
    ("DeiT", "deit_tiny_patch16_224"),
    ("Swin", "swin_tiny_patch4_window7_224"),
    ("MLP-Mixer", "mixer_s16_224"),
    ("CSPNet", "cs3darknet_s"),
]
EXTRA = [("CSPNet", "cspresnet50")]  # the classic CSPNet, since its smallest variant cannot be traced
RATIO, REPAIR = 0.3, "ar"


_LAYER = re.compile(r"\b(?!torch\.|nn\.)\w+(?:\.\w+)+\b")


def _reasons(graph) -> str:
    """Refusal reasons with layer names and group counts blanked, counted: '12x channel mapping into … ...'."""
    counts = Counter(re.sub(r"groups=\d+", "groups=N", _LAYER.sub("…", g.reason)) for g in graph.groups
                     if not g.foldable)
    return "; ".join(f"{n}x {r}" for r, n in counts.most_common())


def bench_one(family: str, name: str, quick: bool, say) -> dict:
    row = {"family": family, "model": name}
    loaded = load_model(f"timm:{name}")
    m, x1 = loaded.model, loaded.example_input(1)
    # zero heads and 1e-6 layer scales would make every comparison below trivially pass; vanishing activations
    # of untrained BN nets too: redraw constant parameters, then set BN statistics from a batch of noise
    row["redrawn"] = redraw_constants(m)
    row["bns_calibrated"] = calibrate_batchnorms(m, loaded.input_shape)
    x = loaded.example_input(2, seed=1)
    row.update(input=f"{loaded.input_shape[1]}x{loaded.input_shape[2]}", params_before=count_params(m))
    graph = find_groups(m, x1)
    row.update(groups=len(graph.groups), foldable=len(graph.foldable), refused=_reasons(graph) or None,
               trace_error=graph.error)
    if graph.error or not graph.foldable:
        row.update(folds=False, shrinks=False)
        return row
    say(f"{name}: fold at {RATIO} ({REPAIR}), {len(graph.foldable)}/{len(graph.groups)} groups foldable")
    t = time.perf_counter()
    res = fold(m, FoldPlan(default_ratio=RATIO, repair=REPAIR), example_input=x1, num_classes=loaded.num_classes)
    row["fold_s"] = time.perf_counter() - t
    with torch.no_grad():
        out = res.model(x)
        row["output_scale"] = float(m(x).abs().max())
    row.update(params_after=count_params(res.model), runs=bool(torch.isfinite(out).all()) and out.shape[0] == 2)
    row["param_reduction"] = 1 - row["params_after"] / row["params_before"]
    zero = fold(m, FoldPlan(default_ratio=0.0, repair="none"), example_input=x1)
    with torch.no_grad():
        row["ratio0_max_abs_diff"] = float((zero.model(x) - m(x)).abs().max())
    say(f"{name}: duplicated-channel check")
    chk = duplicate_channel_check(m, x, ratio=0.5)
    row["dup_rel_diff"] = chk["rel_diff"]
    row["folds"] = row["runs"] and row["ratio0_max_abs_diff"] == 0.0 and chk["rel_diff"] < 1e-4
    row["shrinks"] = row["params_after"] < row["params_before"]
    if not quick:
        say(f"{name}: ONNX export of the folded model")
        try:
            _, info = export_bytes(res, "onnx", input_shape=loaded.input_shape)
            row.update(onnx_ok=True, onnx_max_abs_diff=info["max_abs_diff"])
        except Exception as exc:  # noqa: BLE001 - recorded, the sweep goes on
            row.update(onnx_ok=False, onnx_error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="skip the ONNX export")
    ap.add_argument("--models", nargs="+", help="timm names to run (default: all)")
    ap.add_argument("--update", action="store_true", help="replace only the rows of --models in the existing results")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    def say(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    import timm

    env = environment()
    env["timm"] = timm.__version__
    rows, t0 = [], time.perf_counter()
    for family, name in FAMILIES + EXTRA:
        if args.models and name not in args.models:
            continue
        say(f"{family}: {name}")
        try:
            rows.append(bench_one(family, name, args.quick, say))
        except Exception as exc:  # noqa: BLE001 - one model's failure is a result, not the end of the sweep
            traceback.print_exc()
            rows.append({"family": family, "model": name, "folds": False, "shrinks": False,
                         "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
    env["load_average_at_end"] = [round(v, 2) for v in load_average()]
    env["seconds"] = time.perf_counter() - t0
    if args.update and (Path(args.out) / "timm.json").exists():  # keep the other models' rows and run record
        import json

        old = json.loads((Path(args.out) / "timm.json").read_text())
        new = {r["model"]: r for r in rows}
        rows = [new.pop(r["model"], r) for r in old["rows"]] + list(new.values())
        env = {**old["environment"], "updated": {"models": args.models, "date": env["date"],
                                                  "load_average_at_start": env["load_average_at_start"],
                                                  "load_average_at_end": env["load_average_at_end"]}}
    main_rows = [r for r in rows if (r["family"], r["model"]) in FAMILIES]
    ok = sum(bool(r.get("folds") and r.get("shrinks")) for r in main_rows)
    out = Path(args.out)
    write_json(out / "timm.json", {"environment": env, "ratio": RATIO, "repair": REPAIR, "quick": args.quick,
                                   "families_folding_and_shrinking": ok, "families": len(main_rows), "rows": rows})
    shown = []
    for r in rows:
        why = r.get("trace_error") or r.get("error") or r.get("refused") or ""
        shown.append({**r, "why": why.replace("|", "/")[:400] or "—",
                      "onnx": None if "onnx_ok" not in r else r["onnx_ok"]})
    table = Table(
        "timm", f"timm families folded at ratio {RATIO} ({REPAIR}, random init): {ok} of {len(main_rows)} fold and "
                "shrink",
        ["family", "model", "input", "params_before", "params_after", "param_reduction", "foldable", "groups",
         "runs", "output_scale", "ratio0_max_abs_diff", "dup_rel_diff", "onnx", "onnx_max_abs_diff", "fold_s",
         "why"],
        shown,
        headers=["family", "timm model", "input", "params before", "params after", "params removed",
                 "foldable groups", "groups", "runs", "max abs output", "ratio 0: max abs diff",
                 "duplicates: rel diff", "ONNX ok",
                 "ONNX max abs diff", "fold s", "groups refused (count x reason) / error"],
        notes=[f"Fold-AR ({REPAIR}) at ratio {RATIO} on every foldable group; random init from timm "
               f"{env['timm']} (no weights are downloaded), so accuracy is not measured here. Constant parameters "
               "(zero heads, layer scales, BN gammas) are redrawn first (foldviz.foldcheck.redraw_constants) and "
               "BatchNorm statistics set from one batch of noise, so the outputs compared below are O(1) rather "
               "than 0 or 1e-9.",
               "ratio 0: folding nothing must return the same function (max abs difference on 2 inputs). "
               "duplicates: every foldable group's channels made exact copies in pairs, folded at 0.5 with the "
               "pairs as clusters; relative max difference to that copy (0 up to rounding when every group is "
               "merged correctly).",
               "A family counts as folding and shrinking when the folded model runs, ratio 0 is exact, the "
               "duplicate check is below 1e-4 and parameters drop. ONNX: the folded model exported (opset 20) and "
               "checked with ONNX Runtime within 1e-4.",
               "cs3darknet_s cannot be traced by Torch-Pruning (a concat of split outputs); cspresnet50, the "
               "classic CSPNet, is listed below it. Groups whose conv output is split (CSPNet's cross-stage "
               "split) are refused rather than folded.",
               f"Machine: {env['machine']}; 1 torch thread; load average {env['load_average_at_start']} at start, "
               f"{env['load_average_at_end']} at end; {env['seconds']:.0f} s in all."
               + (f" Rerun of {', '.join(env['updated']['models'])} on {env['updated']['date']} (load average "
                  f"{env['updated']['load_average_at_start']})." if "updated" in env else "")])
    table.write(out)
    (out / "timm.csv").unlink(missing_ok=True)
    print(table.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
