#!/usr/bin/env python
"""Print the README "Benchmarks" tables from a results folder (default benchmarks/results).

    .venv/bin/python benchmarks/readme_section.py [RESULTS_DIR] > /tmp/bench.md

Condenses the per-stage tables into the few the README shows; the full tables stay in RESULTS.md / *.csv.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _csv(d: Path, name: str) -> list[dict]:
    p = d / f"{name}.csv"
    if not p.exists():
        return []
    with open(p) as fh:
        return list(csv.DictReader(fh))


def _f(v, nd=2) -> str:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return "—" if v in (None, "") else str(v)
    return f"{x:.{nd}f}"


def _md(d: Path, name: str, drop_title: bool = True) -> str:
    p = d / f"{name}.md"
    if not p.exists():
        return f"_({name} not measured)_\n"
    text = p.read_text()
    if drop_title and text.startswith("### "):
        text = text.split("\n", 2)[2]
    return text


def table(heads: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    right = right if right is not None else set(range(1, len(heads)))
    out = ["| " + " | ".join(heads) + " |", "|" + "|".join("---:" if i in right else "---" for i in range(len(heads))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def fold_cost(d: Path) -> str:
    rows = _csv(d, "cost_fold")
    models = list(dict.fromkeys(r["model"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    out = []
    for m in models:
        for meth in methods:
            rs = {r["ratio"]: r for r in rows if r["model"] == m and r["method"] == meth}
            if not rs:
                continue
            r3, r5 = rs.get("0.3"), rs.get("0.5")
            ref = r5 or r3
            params = f"{int(ref['params']) / 1e6:.2f} M"
            share = ""
            if r5 and r5.get("cluster") and r5.get("total"):
                share = f"{100 * float(r5['cluster']) / float(r5['total']):.0f} %"
            est = " (est.)" if "estimated" in (ref.get("note") or "") else ""
            out.append([m, params, meth, _f(ref["inspect"]), (_f(r3["total"]) if r3 else "—") + est,
                        (_f(r5["total"]) if r5 else "—") + est, share])
    return table(["model", "params", "method", "inspect s", "fold s @0.3", "fold s @0.5", "cluster share @0.5"], out,
                 right={1, 3, 4, 5, 6})


def compression(d: Path) -> str:
    rows = _csv(d, "compression_size")
    out = []
    for r in rows:
        out.append([r["model"], _f(r["ratio"], 1), f"{int(r['params_after']) / 1e6:.3f} M", _f(r["param_ratio"]),
                    _f(r["flops_ratio"]), _f(r["ideal_flops_ratio"]), f"{float(r['size_mb_after']):.2f}",
                    _f(r["lat1_ratio"]), _f(r["lat1_over_flops"]), _f(r["lat64_ratio"]), _f(r["lat64_over_flops"])])
    return table(["model", "ratio", "params", "params ×", "FLOPs ×", "ideal (1−r)²", "file MB", "latency × (b1)",
                  "÷ FLOPs × (b1)", "latency × (b64)", "÷ FLOPs × (b64)"], out)


def main(argv=None) -> None:
    argv = argv if argv is not None else sys.argv[1:]
    d = Path(argv[0]) if argv else HERE / "results"
    env = json.loads((d / "environment.json").read_text())
    suites = env.get("suites_in_folder") or {}
    minutes = sum(m["seconds"] for m in suites.values()) / 60 if suites else env["seconds"] / 60
    loads = [x for m in suites.values() for x in (m["load_average_at_start"][0], m["load_average_at_end"][0])] or \
        [env["load_average_at_start"][0], env["load_average_at_end"][0]]
    commits = sorted({m["git_commit"] for m in suites.values()}) or [env["git_commit"]]
    print(f"_Results of `benchmarks/run.py` ({env['mode']} run, {minutes:.0f} min in all), {env['date'][:10]}, "
          f"commit `{', '.join(commits)}`: {env['machine']}; Python {env['python']}, torch {env['torch']} "
          f"({env['torch_threads']} intra-op threads), scikit-learn {env['sklearn']}, Streamlit {env['streamlit']}; "
          f"OMP_WAIT_POLICY={env['omp_wait_policy']}; 1-minute load average between {min(loads)} and {max(loads)} "
          f"(other jobs shared the two cores)._\n")
    sections = {
        "targets": _md(d, "targets"),
        "target": _md(d, "cost_target"),
        "fold": fold_cost(d),
        "scaling": _md(d, "cost_scaling"),
        "kmeans": _md(d, "cost_kmeans"),
        "compression": compression(d),
        "round8": _md(d, "compression_round8"),
        "wider": _md(d, "accuracy_wider"),
        "seeding": _md(d, "accuracy_seeding"),
        "threads": _md(d, "compression_threads"),
        "app": _md(d, "app_pages"),
        "explorer": _md(d, "app_explorer512"),
    }
    for name in ("digits-resnet", "digits-resnet-2x", "digits-vgg", "digits-mlp"):
        sections[f"acc_{name}"] = _md(d, f"accuracy_{name}")
    for k, v in sections.items():
        print(f"<!-- {k} -->\n{v}")


if __name__ == "__main__":
    main()
