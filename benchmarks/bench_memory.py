"""Peak memory (RSS) of folding torchvision classification models.

Each case runs ``python -m foldviz fold torchvision:ARCH --ratio 0.5 --repair REPAIR --no-latency --out TMP`` (REPAIR: ar, the issue's case, and dfr, the default) in its own
subprocess (random init, 224x224) and reads the child's peak RSS from ``resource.getrusage(RUSAGE_CHILDREN)``
(``ru_maxrss``, KiB on Linux).  The bound is ``2 x (model weights) + 1.5 GiB``.

    python benchmarks/bench_memory.py [--models resnet50 vgg16_bn ...] [--timeout 900] [--out benchmarks/results/memory.md]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["resnet50", "vgg16_bn", "densenet121", "efficientnet_b0"]
GIB = 1024 ** 3


def weights_bytes(arch: str) -> int:
    """Bytes of the model's float32 state dict (built on the meta device: no allocation)."""
    code = ("import torch, torchvision.models as m, sys\n"
            "with torch.device('meta'):\n"
            f"    net = m.get_model({arch!r}, weights=None)\n"
            "print(sum(t.numel() * t.element_size() for t in net.state_dict().values()))\n")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              cwd=ROOT).stdout.strip())


def run_case(arch: str, ratio: float, timeout: float, repair: str = "ar") -> dict:
    """Fold in a fresh process (via a tiny wrapper so that ru_maxrss belongs to that process alone)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "folded"
        wrapper = ("import resource, subprocess, sys, json\n"
                   "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
                   "ru = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
                   "print(json.dumps({'rc': p.returncode, 'maxrss_kib': ru.ru_maxrss, 'err': p.stderr[-400:]}))\n")
        cmd = [sys.executable, "-c", wrapper, sys.executable, "-m", "foldviz", "fold", f"torchvision:{arch}",
               "--ratio", str(ratio), "--repair", repair, "--no-latency", "--quiet", "--device", "cpu",
               "--out", str(out)]
        t = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                               env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        except subprocess.TimeoutExpired:
            return {"arch": arch, "repair": repair, "rc": None, "error": f"timed out after {timeout:.0f} s",
                    "seconds": time.perf_counter() - t}
        res = json.loads(p.stdout.strip().splitlines()[-1])
        res.update(arch=arch, repair=repair, seconds=time.perf_counter() - t)
        return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--repairs", nargs="+", default=["ar", "dfr"],
                    help="ar: the issue's case; dfr: the default repair (Deep Inversion proxy)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory.md"))
    args = ap.parse_args()
    rows = []
    load_before = os.getloadavg()
    for repair, arch in [(r, a) for r in args.repairs for a in args.models]:
        wb = weights_bytes(arch)
        bound = 2 * wb + 1.5 * GIB
        res = run_case(arch, args.ratio, args.timeout, repair)
        peak = res.get("maxrss_kib", 0) * 1024
        met = res.get("rc") == 0 and peak <= bound
        row = {**res, "weights_bytes": wb, "bound_bytes": bound, "peak_bytes": peak, "met": met,
               "loadavg": os.getloadavg()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = [
        "# Peak memory of folding",
        "",
        f"`python -m foldviz fold torchvision:ARCH --ratio {args.ratio} --repair REPAIR --no-latency --device cpu` "
        "(random init, 224x224 inputs, report with 128 variance samples), one subprocess per case, peak RSS from "
        "`ru_maxrss`. Bound: 2 x (float32 weights) + 1.5 GiB.",
        "",
        f"Machine: {os.cpu_count()} CPU cores (shared), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
        f"load average before the run {load_before[0]:.2f} / {load_before[1]:.2f} / {load_before[2]:.2f}.",
        "",
        "| model | repair | weights | bound | peak RSS | met | seconds | load avg (1 min) after |",
        "|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        status = ("met" if r["met"] else "MISSED") if r.get("rc") == 0 else f"failed ({r.get('error') or r.get('err', '')[-120:].strip()})"
        lines.append(f"| {r['arch']} | {r['repair']} | {r['weights_bytes'] / GIB:.2f} GiB | {r['bound_bytes'] / GIB:.2f} GiB | "
                     f"{r['peak_bytes'] / GIB:.2f} GiB | {status} | {r['seconds']:.0f} | {r['loadavg'][0]:.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
