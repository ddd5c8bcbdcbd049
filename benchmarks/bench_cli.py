"""Command-line responsiveness and the report's cost ("The command line too").

    python benchmarks/bench_cli.py [--repeats 5] [--out benchmarks/results/cli.md]

* ``--help`` / ``fold --help`` / an argument error: wall seconds of a fresh ``python -m foldviz ...`` process,
  median of ``--repeats`` runs. Target: under 1 s.
* ``fold DEMO --ratio 0.3 --data digits`` with the default repair, one fresh process per demo: wall seconds, the
  fold's own seconds and the report's seconds (both read from ``report.json``). Target: the report's measurements
  (accuracy before and after, variance ratios, latency) cost no more than the fold.

Every row records ``os.getloadavg()``: the machine is a shared 2-core box, so seconds are indicative; the
report/fold ratio is measured within one process and is the number to compare.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMOS = ["digits-mlp", "digits-vgg", "digits-resnet", "digits-resnet-2x", "digits-resnet18"]


def _wall(cmd: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    return time.perf_counter() - t, p


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--demos", nargs="+", default=DEMOS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cli.md"))
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    py = [sys.executable, "-m", "foldviz"]

    quick = []
    for name, argv, want_rc in (("python -m foldviz --help", ["--help"], 0),
                                ("python -m foldviz fold --help", ["fold", "--help"], 0),
                                ("argument error (fold --ratio 2)", ["fold", "demo:digits-resnet", "--ratio", "2",
                                                                     "--out", "x"], 2)):
        times = []
        for _ in range(args.repeats):
            s, p = _wall(py + argv, env)
            if p.returncode != want_rc:
                raise SystemExit(f"{name}: exit {p.returncode}: {p.stderr[-300:]}")
            times.append(s)
        quick.append((name, statistics.median(times), min(times), max(times), os.getloadavg()[0]))

    folds = []
    for demo in args.demos:
        with tempfile.TemporaryDirectory() as tmp:
            s, p = _wall(py + ["fold", f"demo:{demo}", "--ratio", "0.3", "--data", "digits", "--quiet",
                               "--out", str(Path(tmp) / "f")], env)
            if p.returncode != 0:
                raise SystemExit(f"fold {demo}: exit {p.returncode}: {p.stderr[-300:]}")
            rep = json.loads((Path(tmp) / "f" / "report.json").read_text())
        sec = rep["seconds"]
        folds.append((demo, rep["method"], s, sec["total"], sec["report"], sec["report"] / sec["total"],
                      os.getloadavg()[0]))
        print(folds[-1], flush=True)

    lines = ["# Command line: responsiveness and the report's cost", "",
             f"`python benchmarks/bench_cli.py --repeats {args.repeats}`; fresh process per run, "
             f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, 2 shared CPU cores.", "",
             "| command | median s | min s | max s | target < 1 s | load avg (1 min) |", "|---|---:|---:|---:|---|---:|"]
    lines += [f"| `{n}` | {m:.2f} | {lo:.2f} | {hi:.2f} | {'met' if m < 1 else 'MISSED'} | {la:.2f} |"
              for n, m, lo, hi, la in quick]
    lines += ["", "`python -m foldviz fold demo:NAME --ratio 0.3 --data digits` (default repair; the report = "
              "accuracy of both models on the 450 test images, per-layer variance ratios on 128 inputs, latency):", "",
              "| demo | method | wall s | fold s | report s | report / fold | report <= fold | load avg (1 min) |",
              "|---|---|---:|---:|---:|---:|---|---:|"]
    lines += [f"| {d} | {m} | {w:.1f} | {f:.2f} | {r:.2f} | {q:.2f} | {'met' if q <= 1 else 'MISSED'} | {la:.2f} |"
              for d, m, w, f, r, q, la in folds]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
