"""Shared helpers for the foldviz benchmarks: environment record, side-by-side timing, tables.

Timing philosophy (the benchmark machine is a shared 2-core box): absolute seconds are noisy, so every
comparison is measured *side by side in one run* — the two things being compared are interleaved round by
round — and medians of repeats are reported, plus the ratio of the two.
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import torch  # noqa: E402

from foldviz.metrics import count_params  # noqa: E402
from foldviz.utils import json_default  # noqa: E402


# ------------------------------------------------------------------------------------------------ config
@dataclass
class Config:
    quick: bool = False
    out: Path = BENCH_DIR / "results"
    seeds: tuple[int, ...] = (0, 1, 2)
    log: Callable[[str], None] = field(default=lambda s: print(s, flush=True))

    def say(self, msg: str) -> None:
        self.log(f"[{time.strftime('%H:%M:%S')}] {msg}")


# ------------------------------------------------------------------------------------------------ environment
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


def load_average() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3


def environment() -> dict:
    import numpy as np
    import sklearn

    try:
        import streamlit
        st_version = streamlit.__version__
    except Exception:  # noqa: BLE001
        st_version = None
    try:
        import torch_pruning
        tp_version = getattr(torch_pruning, "__version__", "?")
    except Exception:  # noqa: BLE001
        tp_version = None
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "machine": f"{_cpu_model()}, {os.cpu_count()} logical CPUs, {mem_gib} GiB RAM, no GPU used",
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "numpy": np.__version__,
        "sklearn": sklearn.__version__,
        "streamlit": st_version,
        "torch_pruning": tp_version,
        "load_average_at_start": [round(x, 2) for x in load_average()],
        "platform": platform.platform(),
    }


# ------------------------------------------------------------------------------------------------ timing
def now() -> float:
    return time.perf_counter()


def median(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(statistics.median(xs)) if xs else float("nan")


def iqr(xs: Sequence[float]) -> float:
    xs = sorted(xs)
    if len(xs) < 4:
        return float("nan")
    q = statistics.quantiles(xs, n=4)
    return float(q[2] - q[0])


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run every function once per round, alternating the order each round; seconds per call per function."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            t = time.perf_counter()
            fns[n]()
            out[n].append(time.perf_counter() - t)
    return out


def with_threads(n: int, fn: Callable[[], object]):
    """Call ``fn`` with torch intra-op threads set to ``n`` (restored afterwards)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


# ------------------------------------------------------------------------------------------------ tables
def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v):
            return "—"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 10 ** -(digits)):
            return f"{v:.{digits}g}"
        return f"{v:.{digits}f}"
    return str(v)


@dataclass
class Table:
    name: str                      # file stem, e.g. "cost_fold"
    title: str
    columns: list[str]             # keys of the rows, in display order
    rows: list[dict]
    headers: list[str] | None = None   # display names (default: the keys)
    notes: list[str] = field(default_factory=list)
    csv_rows: list[dict] | None = None  # full-precision rows for the CSV (default: rows)
    show: bool = True              # include in the printed / combined markdown

    def markdown(self) -> str:
        heads = self.headers or self.columns

        def numeric(c):
            vals = [r.get(c) for r in self.rows if r.get(c) is not None]
            return bool(vals) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)

        lines = [f"### {self.title}", "", "| " + " | ".join(heads) + " |",
                 "|" + "|".join("---:" if numeric(c) else "---" for c in self.columns) + "|"]
        for r in self.rows:
            lines.append("| " + " | ".join(fmt(r.get(c)) if not isinstance(r.get(c), str) else r.get(c)
                                           for c in self.columns) + " |")
        if self.notes:
            lines.append("")
            lines.extend(f"* {n}" for n in self.notes)
        return "\n".join(lines) + "\n"

    def write(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        rows = self.csv_rows if self.csv_rows is not None else self.rows
        keys: list[str] = []
        for r in rows:
            for k in r:
                if k not in keys:
                    keys.append(k)
        with open(out / f"{self.name}.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()})
        (out / f"{self.name}.md").write_text(self.markdown())


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=json_default))


# ------------------------------------------------------------------------------------------------ models
TORCHVISION = {
    "resnet18-cifar": dict(spec="torchvision:resnet18", num_classes=10, cifar_stem=True),
    "resnet50-cifar": dict(spec="torchvision:resnet50", num_classes=10, cifar_stem=True),
}
DEMOS = ("digits-resnet", "digits-resnet-2x", "digits-vgg", "digits-mlp")


def load(name: str):
    """A LoadedModel for a demo name or one of the TORCHVISION keys (random init, eval mode)."""
    from foldviz.models import load_model

    if name in TORCHVISION:
        kw = dict(TORCHVISION[name])
        spec = kw.pop("spec")
        return load_model(spec, **kw)
    return load_model(f"demo:{name}")


def n_params(model) -> int:
    return count_params(model)


@torch.no_grad()
def calibrate_batchnorms(model, shape, n: int = 32, seed: int = 0) -> int:
    """Set every BatchNorm's running statistics from one batch of noise (cumulative average), in place.

    A randomly initialised MobileNetV2 or EfficientNet shrinks its activations block by block (to ~1e-9 at the
    output), which makes an absolute agreement check meaningless; after this the outputs are O(1). Returns the
    number of BatchNorms set.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    model(torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed)))
    model.eval()
    return len(bns)
