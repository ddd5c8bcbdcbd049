"""Export benchmark: folded models under ONNX Runtime, checked against PyTorch, timed against their originals.

For each model: fold it, export the folded model to ONNX, TorchScript and a torch.export program (each checked
on a fixed batch against PyTorch, tolerance 1e-4), export the original to ONNX too, then time both ONNX models under
ONNX Runtime (CPU, one intra-op thread) in alternation at batch 1 and 64; the eager-PyTorch batch-1 ratio is measured
the same way for comparison. Random-init torchvision/timm models are fine for latency (it does not depend on weight
values); the digits demos are trained.

Writes ``benchmarks/results/export.{md,json}``. Run: ``nice -n 5 python benchmarks/bench_export.py [--quick]``
(``--quick``: fewer timing rounds, no torch.export program for the 224x224 models).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from common import Table, calibrate_batchnorms, environment, load_average, write_json  # noqa: E402
from foldviz.export import DEFAULT_OPSET, export_bytes, ort_latency_pair  # noqa: E402
from foldviz.fold import fold  # noqa: E402
from foldviz.metrics import count_params, latency_pair  # noqa: E402
from foldviz.models import load_model  # noqa: E402
from foldviz.plans import FoldPlan  # noqa: E402

# (label, spec, ratio, repair): the digits demos fold with the default data-free repair; the 224x224 models are
# random init (latency only), folded without repair (a repair changes values, not shapes)
MODELS = [
    ("digits-resnet", "demo:digits-resnet", 0.5, "dfr"),
    ("digits-resnet-2x", "demo:digits-resnet-2x", 0.5, "dfr"),
    ("digits-vgg", "demo:digits-vgg", 0.5, "dfr"),
    ("digits-mlp", "demo:digits-mlp", 0.5, "dfr"),
    ("resnet18", "torchvision:resnet18", 0.5, "none"),
    ("mobilenet_v2", "torchvision:mobilenet_v2", 0.5, "none"),
    ("vit_tiny_patch16_224", "timm:vit_tiny_patch16_224", 0.5, "none"),
]
THREADS = 1


def bench_one(label: str, spec: str, ratio: float, repair: str, quick: bool, say) -> dict:
    loaded = load_model(spec)
    big = loaded.input_shape[-1] >= 128
    calibrated = calibrate_batchnorms(loaded.model, loaded.input_shape) if loaded.note else 0
    say(f"{label}: fold at {ratio} ({repair})")
    t = time.perf_counter()
    res = fold(loaded.model, FoldPlan(default_ratio=ratio, repair=repair), example_input=loaded.example_input(1),
               num_classes=loaded.num_classes)
    row = {"model": label, "spec": spec, "ratio": ratio, "repair": repair, "fold_s": time.perf_counter() - t,
           "params_before": count_params(loaded.model), "params_after": count_params(res.model),
           "input_shape": list(loaded.input_shape), "bns_calibrated": calibrated}
    shape = loaded.input_shape
    formats = ["onnx", "torchscript"] + ([] if quick and big else ["pt2"])
    onnx_folded = None
    for fmt in formats:
        say(f"{label}: export folded -> {fmt}")
        data, info = export_bytes(res, fmt, input_shape=shape)
        row[f"{fmt}_max_abs_diff"] = info["max_abs_diff"]
        row["output_scale"] = info["output_scale"]
        row[f"{fmt}_bytes"] = info["bytes"]
        row[f"{fmt}_export_s"] = info["seconds"]
        if fmt == "onnx":
            onnx_folded = data
    say(f"{label}: export original -> onnx")
    onnx_orig, info = export_bytes(loaded, "onnx")
    row["onnx_bytes_original"] = info["bytes"]
    row["onnx_max_abs_diff_original"] = info["max_abs_diff"]
    rounds = {1: 8 if quick else 20, 64: 3 if quick else 7}
    for batch in (1, 64):
        say(f"{label}: ONNX Runtime latency, batch {batch}, {rounds[batch]} rounds")
        lat = ort_latency_pair(onnx_orig, onnx_folded, shape, batch, threads=THREADS, rounds=rounds[batch])
        row[f"ort_b{batch}_original_ms"] = lat["a"]["median_ms"]
        row[f"ort_b{batch}_folded_ms"] = lat["b"]["median_ms"]
        row[f"ort_b{batch}_iqr_ms"] = [lat["a"]["iqr_ms"], lat["b"]["iqr_ms"]]
        row[f"ort_b{batch}_ratio"] = lat["ratio"]
    eager = latency_pair(loaded.model, res.model, loaded.example_input(1), rounds=rounds[1])
    row["eager_b1_ratio"] = eager["ratio"]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", nargs="+", help="labels to run (default: all)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(THREADS)
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

    def say(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    env = environment()
    import onnxruntime

    env.update(onnxruntime=onnxruntime.__version__, onnx_opset=DEFAULT_OPSET, ort_threads=THREADS,
               ort_provider="CPUExecutionProvider")
    rows = []
    t0 = time.perf_counter()
    for label, spec, ratio, repair in MODELS:
        if args.models and label not in args.models:
            continue
        rows.append(bench_one(label, spec, ratio, repair, args.quick, say))
    env["load_average_at_end"] = [round(x, 2) for x in load_average()]
    env["seconds"] = time.perf_counter() - t0
    out = Path(args.out)
    write_json(out / "export.json", {"environment": env, "quick": args.quick, "rows": rows})
    table = Table(
        "export", "Folded models under ONNX Runtime (folded / original latency; export checked against PyTorch)",
        ["model", "ratio", "params_before", "params_after", "output_scale", "onnx_max_abs_diff",
         "torchscript_max_abs_diff",
         "pt2_max_abs_diff", "ort_b1_original_ms", "ort_b1_folded_ms", "ort_b1_ratio", "ort_b64_original_ms",
         "ort_b64_folded_ms", "ort_b64_ratio", "eager_b1_ratio"],
        [{**r, "model": f"{r['model']} ({r['repair']})"} for r in rows],
        headers=["model (repair)", "ratio", "params before", "params after", "max abs output", "ONNX max abs diff",
                 "TorchScript max abs diff", "pt2 max abs diff", "ORT b1 orig ms", "ORT b1 folded ms",
                 "ORT b1 ratio", "ORT b64 orig ms", "ORT b64 folded ms", "ORT b64 ratio", "eager b1 ratio"],
        notes=[f"ONNX opset {DEFAULT_OPSET} (torch {env['torch']} exporter, dynamo=True), ONNX Runtime "
               f"{env['onnxruntime']} CPUExecutionProvider, {THREADS} intra-op thread, sequential; torch also "
               f"{THREADS} thread.",
               "Each export ran on a fixed batch (4 inputs, then 1) and was refused above 1e-4 max abs difference; "
               "a dash: not exported in --quick mode.",
               "Latency: medians of alternating runs (original, folded, original, ...), batch 1: "
               f"{8 if args.quick else 20} rounds, batch 64: {3 if args.quick else 7} rounds; ratio = folded / "
               "original (below 1: the folded model is faster).",
               f"Machine: {env['machine']}; load average {env['load_average_at_start']} at start, "
               f"{env['load_average_at_end']} at end; {env['seconds']:.0f} s in all.",
               "digits demos: trained, folded with Fold-DFR; resnet18/mobilenet_v2 (torchvision) and "
               "vit_tiny_patch16_224 (timm): random init with BatchNorm statistics set from one batch of noise (so "
               "outputs are O(1) and the agreement check means something), Fold-Naive; latency does not depend on "
               "weight values.",
               "TorchScript and pt2 run the same PyTorch kernels as the eager model: their difference is 0."])
    table.write(out)
    (out / "export.csv").unlink(missing_ok=True)  # the JSON holds the full record
    print(table.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
