"""GPU benchmark: CPU and CUDA folds side by side — do they agree, and how long does each take?

For each model: the same plan folded on the CPU and on the GPU. Recorded: groups whose cluster labels agree,
max |CPU fold(x) - GPU fold(x)| on 64 inputs (both folded models evaluated on the CPU), fold seconds on each device
(median of ``--repeats`` runs, alternating devices), and for the digits demos the test accuracy of both folds and
the evaluation time on each device. Needs a CUDA GPU; without one it says so in one line and exits with code 2.

Writes ``benchmarks/results/gpu.{md,json}``. Run on a GPU machine:
``python benchmarks/bench_gpu.py [--quick]`` (``--quick``: the digits demos only, one repeat).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import Table, environment, load_average, write_json  # noqa: E402
from foldviz.data import evaluate, load_dataset, make_loader  # noqa: E402
from foldviz.fold import fold  # noqa: E402
from foldviz.metrics import count_params  # noqa: E402
from foldviz.models import load_model  # noqa: E402
from foldviz.plans import FoldPlan  # noqa: E402

MODELS = [  # (spec, ratio, repair, options)
    ("demo:digits-resnet", 0.5, "dfr", {}),
    ("demo:digits-resnet-2x", 0.5, "dfr", {}),
    ("demo:digits-vgg", 0.5, "ar", {}),
    ("demo:digits-mlp", 0.5, "dfr", {}),
    ("torchvision:resnet18", 0.5, "ar", {}),
    ("torchvision:resnet50", 0.5, "ar", {}),
]


def _timed_fold(loaded, plan, device):
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    res = fold(loaded.model, plan, example_input=loaded.example_input(1), device=device,
               num_classes=loaded.num_classes)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, res


def bench_one(spec: str, ratio: float, repair: str, repeats: int, say) -> dict:
    loaded = load_model(spec)
    plan = FoldPlan(default_ratio=ratio, repair=repair)
    times = {"cpu": [], "cuda": []}
    results = {}
    for r in range(repeats):
        for dev in (("cpu", "cuda") if r % 2 == 0 else ("cuda", "cpu")):
            say(f"{spec}: fold on {dev} ({r + 1}/{repeats})")
            s, results[dev] = _timed_fold(loaded, plan, dev)
            times[dev].append(s)
    cpu, gpu = results["cpu"], results["cuda"]
    same = sum(np.array_equal(cpu.labels[g], gpu.labels.get(g)) for g in cpu.labels)
    x = loaded.example_input(64, seed=1)
    with torch.no_grad():
        a, b = cpu.model(x), gpu.model(x)
    row = {"model": spec, "ratio": ratio, "repair": repair, "params_before": count_params(loaded.model),
           "params_after": count_params(cpu.model), "groups": len(cpu.labels), "labels_agree": int(same),
           "max_abs_diff": float((a - b).abs().max()), "output_scale": float(a.abs().max()),
           "cpu_fold_s": statistics.median(times["cpu"]), "gpu_fold_s": statistics.median(times["cuda"])}
    row["speedup"] = row["cpu_fold_s"] / max(row["gpu_fold_s"], 1e-9)
    if spec.startswith("demo:"):
        loader = make_loader(load_dataset("digits", "test", card=loaded.card))
        for dev in ("cpu", "cuda"):
            t = time.perf_counter()
            ev = evaluate(gpu.model, loader, device=dev)
            if dev == "cuda":
                torch.cuda.synchronize()
            row[f"eval_{dev}_s"] = time.perf_counter() - t
            row[f"acc_gpu_fold_on_{dev}"] = ev.accuracy
        row["acc_cpu_fold"] = evaluate(cpu.model, loader).accuracy
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: bench_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2

    def say(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    env = environment()
    env["machine"] = env["machine"].replace("no GPU used", torch.cuda.get_device_name(0))
    env["cuda"] = torch.version.cuda
    repeats = 1 if args.quick else max(1, args.repeats)
    rows = []
    for spec, ratio, repair, _ in MODELS:
        if args.quick and not spec.startswith("demo:"):
            continue
        rows.append(bench_one(spec, ratio, repair, repeats, say))
    env["load_average_at_end"] = [round(v, 2) for v in load_average()]
    out = Path(args.out)
    write_json(out / "gpu.json", {"environment": env, "repeats": repeats, "rows": rows})
    table = Table("gpu", "CPU vs GPU folds: agreement and time",
                  ["model", "repair", "params_before", "params_after", "labels_agree", "groups", "max_abs_diff",
                   "output_scale", "cpu_fold_s", "gpu_fold_s", "speedup", "acc_cpu_fold", "acc_gpu_fold_on_cuda",
                   "eval_cpu_s", "eval_cuda_s"], rows,
                  headers=["model", "repair", "params before", "params after", "groups with equal labels", "groups",
                           "max abs diff (64 inputs)", "max abs output", "CPU fold s", "GPU fold s", "speedup",
                           "accuracy (CPU fold)", "accuracy (GPU fold)", "eval CPU s", "eval GPU s"],
                  notes=[f"Machine: {env['machine']}, CUDA {env['cuda']}, torch {env['torch']}; load average "
                         f"{env['load_average_at_start']} at start, {env['load_average_at_end']} at end.",
                         f"Fold seconds: median of {repeats} run(s) per device, devices alternating."])
    table.write(out)
    (out / "gpu.csv").unlink(missing_ok=True)
    print(table.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
