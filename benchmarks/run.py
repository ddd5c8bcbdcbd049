#!/usr/bin/env python
"""Run the foldviz benchmarks and write markdown + CSV tables.

    .venv/bin/python benchmarks/run.py --quick            # < 5 min, writes benchmarks/results/quick/
    .venv/bin/python benchmarks/run.py                    # full run (~30-40 min), writes benchmarks/results/
    .venv/bin/python benchmarks/run.py --only cost,app    # a subset: cost, compression, accuracy, app

Four questions, one module each: ``bench_cost`` (how long does folding take), ``bench_compression`` (is it smaller
and faster), ``bench_accuracy`` (what does it cost in accuracy), ``bench_app`` (is the app responsive).
Every comparison is measured side by side in one run (interleaved rounds, medians), because the machine is shared.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH_DIR, Config, Table, environment, load_average, write_json  # noqa: E402

SUITES = ("cost", "compression", "accuracy", "app")


def _targets(facts: dict) -> list[dict]:
    rows = []
    cost = facts.get("cost", {})
    variants = cost.get("target_variants", {})
    ref = cost.get("target_reference")
    if variants and ref in variants:
        tv = variants[ref]
        spin = variants.get("library, OpenMP default wait policy")
        others = ", ".join(f"{k}: {v:.2f} s" for k, v in variants.items() if k not in (ref,))
        status = "MET" if tv < 2.0 else "MISSED"
        if spin is not None and (spin < 2.0) != (tv < 2.0):
            status += f" (OMP_WAIT_POLICY=PASSIVE); {'MET' if spin < 2.0 else 'MISSED'} with the OpenMP default"
        rows.append({"target": "Fold CIFAR ResNet-18 at 0.5 with Fold-AR in < 2 s (excluding evaluation)",
                     "measured": f"library {tv:.2f} s (median; {ref}); {others}", "status": status})
    comp = facts.get("compression", {})
    if comp.get("latency_rows"):
        for batch in (1, 64):
            rs = [r for r in comp["latency_rows"] if r["batch"] == batch]
            if not rs:
                continue
            ok = [r for r in rs if r["lat_over_flops"] <= 1.3]
            worst = max(rs, key=lambda r: r["lat_over_flops"])
            rows.append({
                "target": f"Folded latency within 1.3x of its FLOPs ratio (batch {batch})",
                "measured": f"{len(ok)}/{len(rs)} model×ratio cases within; worst {worst['model']} @{worst['ratio']}: "
                            f"latency ratio {worst['latency_ratio']:.2f} vs FLOPs ratio {worst['flops_ratio']:.2f} "
                            f"({worst['lat_over_flops']:.2f}x)",
                "status": "MET" if len(ok) == len(rs) else ("PARTLY MISSED" if ok else "MISSED")})
    app = facts.get("app", {})
    if app.get("cached"):
        worst = max(app["cached"], key=lambda r: r["seconds"])
        n_ok = sum(r["seconds"] < 2.0 for r in app["cached"])
        rows.append({"target": "Every page < 2 s once cached",
                     "measured": f"{n_ok}/{len(app['cached'])} page renders < 2 s; slowest cached: {worst['page']} "
                                 f"{worst['seconds']:.2f} s",
                     "status": "MET" if n_ok == len(app["cached"]) else "MISSED"})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small version (< 5 min)")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default benchmarks/results, or benchmarks/results/quick with --quick)")
    ap.add_argument("--only", default=",".join(SUITES), help=f"comma-separated subset of {','.join(SUITES)}")
    ap.add_argument("--omp-as-is", action="store_true",
                    help="do not set OMP_WAIT_POLICY=PASSIVE (by default the run re-executes itself with it, because "
                         "spinning OpenMP threads make timings on a shared CPU erratic; see the cost_target table)")
    args = ap.parse_args(argv)
    if not args.omp_as_is and "OMP_WAIT_POLICY" not in os.environ and argv is None:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    out = args.out or (BENCH_DIR / "results" / ("quick" if args.quick else ""))
    out = Path(out)
    cfg = Config(quick=args.quick, out=out, seeds=(0,) if args.quick else (0, 1, 2))
    suites = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in suites if s not in SUITES]
    if bad:
        ap.error(f"unknown suite(s) {bad}; choose from {SUITES}")

    env = environment()
    env["mode"] = "quick" if args.quick else "full"
    env["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "(unset: OpenMP default)")
    cfg.say(f"foldviz benchmarks ({env['mode']}): torch {env['torch']}, {env['torch_threads']} threads, "
            f"load average {env['load_average_at_start']}, out {out}")
    t0 = time.perf_counter()
    # a partial run (--only) updates the suites it ran and keeps the others' results from the same folder
    manifest_p, facts_p = out / "manifest.json", out / "facts.json"
    manifest = json.loads(manifest_p.read_text()) if manifest_p.exists() else {}
    facts: dict = json.loads(facts_p.read_text()) if facts_p.exists() else {}
    failures = []
    for name in suites:
        ts = time.perf_counter()
        load0 = [round(x, 2) for x in load_average()]
        try:
            mod = __import__(f"bench_{name}")
            tbls, f = mod.run(cfg)
            facts[name] = f
            for t in tbls:
                t.write(out)
                if t.show:
                    print("\n" + t.markdown(), flush=True)
            manifest[name] = {"tables": [t.name for t in tbls if t.show], "mode": env["mode"],
                              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git_commit": env["git_commit"],
                              "load_average_at_start": load0,
                              "load_average_at_end": [round(x, 2) for x in load_average()],
                              "seconds": round(time.perf_counter() - ts, 1)}
        except Exception:  # noqa: BLE001 — one failing suite must not hide the others
            failures.append(name)
            traceback.print_exc()
        cfg.say(f"{name} done in {time.perf_counter() - ts:.0f} s")
    env["seconds"] = round(time.perf_counter() - t0, 1)
    env["load_average_at_end"] = [round(x, 2) for x in load_average()]
    env["suites"] = suites
    env["failed"] = failures

    targets = _targets(facts)
    tt = Table("targets", "Targets", ["target", "measured", "status"], targets)
    tt.write(out)
    head = (f"_{env['mode']} run, {env['date']}, commit {env['git_commit']}; {env['machine']}; torch {env['torch']}, "
            f"{env['torch_threads']} intra-op threads, OMP_WAIT_POLICY {env['omp_wait_policy']}; load average at "
            f"start {env['load_average_at_start']}, at end {env['load_average_at_end']}; wall time "
            f"{env['seconds']:.0f} s for the suite(s) run last: {', '.join(suites)}._\n")
    per_suite = "\n".join(f"* `{n}`: {m['mode']} run {m['date']}, commit {m['git_commit']}, {m['seconds']:.0f} s, "
                          f"load average {m['load_average_at_start'][0]} → {m['load_average_at_end'][0]}"
                          for n, m in ((n, manifest[n]) for n in SUITES if n in manifest))
    parts = ["# foldviz benchmark results", "", head, "Suites in this folder:", "", per_suite, "", tt.markdown()]
    for n in SUITES:
        for tname in manifest.get(n, {}).get("tables", []):
            p = out / f"{tname}.md"
            if p.exists():
                parts.append(p.read_text())
    (out / "RESULTS.md").write_text("\n".join(parts))
    env["suites_in_folder"] = manifest
    write_json(out / "environment.json", env)
    write_json(facts_p, facts)
    write_json(manifest_p, manifest)
    print("\n" + head + "\n" + tt.markdown(), flush=True)
    cfg.say(f"all done in {env['seconds']:.0f} s; tables in {out}")
    if failures:
        print(f"FAILED suites: {failures}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
