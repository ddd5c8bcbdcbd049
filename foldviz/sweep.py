"""Accuracy against parameter sparsity for several methods: the paper's main comparison.

A sweep is a list of *cells* (model, method, ratio, seed).  :func:`plan_cells` expands a
:class:`~foldviz.sweepspec.SweepSpec` into cells, :func:`run_cell` runs one (fold or prune, evaluate) and returns
its CSV row, an executor (:mod:`foldviz.executors`: in-process or Ray) runs many, and :func:`run_sweep` streams
every finished row into a CSV file at once, skipping the cells the file already holds (resume).
:func:`sweep` is the in-memory call the app and older callers use.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .apply import DEFAULT_REPAIR_SAMPLES, apply_method, repair_inputs
from .kinds import KIND_LABELS, kind_of, methods_for
from .methods import METHODS
from .metrics import count_params
from .plans import FoldPlan
from .sweepspec import ModelRef, SweepSpec, spec_from_args
from .utils import state_dict_hash
from .zoo import LoadedModel

# legacy in-memory columns (``to_csv``, the app)
FIELDS = ["method", "label", "ratio", "seed", "param_sparsity", "params", "accuracy", "loss", "seconds"]
# the streamed, resumable CSV written by ``run_sweep`` / ``foldviz sweep``
CSV_FIELDS = ["model", "kind", "weights_sha256", "plan_sha256", "settings_hash", "method", "label", "ratio", "seed",
              "param_sparsity", "params", "accuracy", "perplexity", "loss", "eval_samples", "seconds", "eval_seconds",
              "host", "data", "finished_at"]
KEY_FIELDS = ("model", "weights_sha256", "method", "ratio", "seed", "settings_hash")
ORIGINAL = "original"


class SweepError(ValueError):
    """A sweep that cannot start (bad output file, unknown method...): one line for the user."""


@dataclass(frozen=True)
class Cell:
    """One unit of work: fold/prune ``model`` with ``method`` at ``ratio`` with ``seed``, then evaluate."""

    model: ModelRef
    method: str  # a key of METHODS, or "original" (the unfolded baseline)
    ratio: float
    seed: int
    data: str
    eval_limit: int | None = None
    repair_samples: int = DEFAULT_REPAIR_SAMPLES
    clustering: dict = field(default_factory=dict, hash=False, compare=False)
    repair_settings: dict = field(default_factory=dict, hash=False, compare=False)
    kind: str = "cnn"
    calib: str | None = None              # language models: calibration text (methods that need data)
    calib_samples: int | None = None
    calib_seqlen: int | None = None

    def settings(self) -> dict:
        """The settings that change this cell's result (besides model, weights, method, ratio, seed)."""
        s = {"kind": self.kind, "data": self.data, "eval_limit": self.eval_limit}
        if self.method != ORIGINAL:
            if METHODS[self.method].needs_data and self.kind == "lm":
                s["calib"] = {"text": self.calib, "samples": self.calib_samples, "seqlen": self.calib_seqlen}
            elif METHODS[self.method].needs_data:
                s["repair_samples"] = self.repair_samples
            if not self.method.startswith("l"):
                s["clustering"] = self.clustering
            s["repair_settings"] = self.repair_settings
        return s

    def settings_hash(self) -> str:
        return _sha(json.dumps(self.settings(), sort_keys=True))[:16]

    def plan(self) -> FoldPlan | None:
        if self.method == ORIGINAL:
            return None
        return FoldPlan(default_ratio=float(self.ratio), repair="none", seed=int(self.seed),
                        clustering=dict(self.clustering), repair_settings=dict(self.repair_settings))

    def for_kind(self, kind: str, clustering: dict) -> "Cell":
        """This cell for a model of ``kind``, whose clustering defaults to ``clustering`` (the kind's)."""
        from dataclasses import replace

        if self.method != ORIGINAL and kind not in METHODS[self.method].applies_to:
            raise SweepError(f"{METHODS[self.method].label} does not apply to {self.model.spec} ({'an' if kind == 'cnn' else 'a'} "
                             f"{KIND_LABELS[kind]})")
        if kind == "cnn" and self.calib:
            raise SweepError(f"\"calib\" is for language models; {self.model.spec} (an image classifier) takes "
                             "repair data from \"data\"")
        if kind == "lm" and self.method != ORIGINAL and METHODS[self.method].needs_data and not self.calib:
            raise SweepError(f"{METHODS[self.method].label} needs calibration text for {self.model.spec}: set "
                             "\"calib\" in the sweep spec (--calib TEXT_SPEC), a text disjoint from \"data\"")
        return replace(self, kind=kind, clustering=dict(self.clustering or clustering))

    def key(self, weights_sha256: str) -> tuple:
        return (self.model.spec, weights_sha256, self.method, _ratio_text(self.ratio), str(int(self.seed)),
                self.settings_hash())

    def describe(self) -> str:
        if self.method == ORIGINAL:
            return f"{self.model.spec} original"
        return f"{self.model.spec} {METHODS[self.method].label} r={self.ratio:g} seed={self.seed}"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _ratio_text(r) -> str:
    return repr(float(r))


def plan_cells(spec: SweepSpec) -> list[Cell]:
    """Every cell of ``spec`` in a stable order: per model its original row, then seed, method, ratio."""
    cells = []
    for m in spec.models:
        data = spec.data_for(m)
        common = dict(data=data, eval_limit=spec.eval_limit, repair_samples=spec.repair_samples, calib=spec.calib,
                      calib_samples=spec.calib_samples, calib_seqlen=spec.calib_seqlen,
                      clustering=dict(spec.clustering or {}), repair_settings=dict(spec.repair_settings))
        if spec.include_original:
            cells.append(Cell(m, ORIGINAL, 0.0, 0, **common))
        for seed in spec.seeds:
            for method in spec.methods:
                for r in spec.ratios:
                    cells.append(Cell(m, method, float(r), int(seed), **common))
    for c in cells:
        c.plan()  # FoldPlan validates repair_settings/clustering before any work starts
    return cells


# ------------------------------------------------------------------------------------------------ running cells
class TransientCellError(RuntimeError):
    """A cell failure worth retrying (a flaky filesystem, a worker hiccup): executors retry these."""


# per-process caches: a worker (or the local process) prepares an evaluation set once per setting
_EVAL: dict = {}
_REPAIR: dict = {}
_CACHE_MAX = 8


def _cached(cache: dict, key, make):
    if key not in cache:
        if len(cache) >= _CACHE_MAX:
            cache.pop(next(iter(cache)))
        cache[key] = make()
    return cache[key]


def run_cell(loaded: LoadedModel, cell: Cell, *, weights_sha256: str | None = None, device=None,
             n0: int | None = None) -> dict:
    """Run one cell on ``loaded`` (which it does not modify): fold or prune, then evaluate with the model kind's
    metric; returns its CSV row (see ``CSV_FIELDS``)."""
    kind = kind_of(loaded)
    card_key = (loaded.spec, json.dumps(loaded.card, sort_keys=True, default=str))
    prepared = _cached(_EVAL, (card_key, cell.data, cell.eval_limit),
                       lambda: kind.prepare_eval(loaded, cell.data, cell.eval_limit))
    n0 = n0 if n0 is not None else count_params(loaded.model)
    t = time.perf_counter()
    proxy = None  # Fold-DFR's proxy info (not a CSV column: rows handed to callbacks carry it)
    if cell.method == ORIGINAL:
        model, label = loaded.model, "Original"
    else:
        data = None
        if METHODS[cell.method].needs_data and kind.key == "lm":   # calibration windows, once per model and seed
            data = _cached(_REPAIR, (card_key, cell.calib, cell.calib_samples, cell.calib_seqlen, cell.seed),
                           lambda: repair_inputs(loaded, cell.calib, cell.calib_samples, seed=cell.seed,
                                                 seqlen=cell.calib_seqlen))
        elif METHODS[cell.method].needs_data:
            data = _cached(_REPAIR, (card_key, cell.data, cell.repair_samples, cell.seed),
                           lambda: repair_inputs(loaded, cell.data, cell.repair_samples, seed=cell.seed))
        res = apply_method(loaded, cell.plan(), cell.method, repair_data=data, device=device)
        model, label = res.model, METHODS[cell.method].label
        proxy = res.proxy
    fold_seconds = time.perf_counter() - t if cell.method != ORIGINAL else 0.0
    t = time.perf_counter()
    ev = kind.evaluate(loaded, model, cell.data, cell.eval_limit, prepared=prepared, device=device)
    n = count_params(model)
    plan = cell.plan()
    row = {"model": cell.model.spec, "kind": kind.key, "weights_sha256": weights_sha256 or state_dict_hash(loaded.model),
           "plan_sha256": _sha(plan.to_json()) if plan else "", "settings_hash": cell.settings_hash(),
           "method": cell.method, "ratio": float(cell.ratio), "seed": int(cell.seed), "host": socket.gethostname(),
           "data": cell.data, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "label": label,
           "param_sparsity": 1 - n / n0, "params": n, "accuracy": ev.get("accuracy"),
           "perplexity": ev.get("perplexity"), "loss": ev["loss"], "eval_samples": ev["samples"],
           "seconds": fold_seconds, "eval_seconds": time.perf_counter() - t,
           "proxy": proxy, "pid": os.getpid()}  # the last two are not CSV columns: callbacks see them
    return row


def cell_proxy_spec(loaded: LoadedModel, cell: Cell):
    """The Fold-DFR proxy (:class:`foldviz.proxy.ProxySpec`) ``cell`` will use, or None when it uses none: lets
    an executor build each model's proxy once and hand it to every cell."""
    from .repair import REPAIRS

    if cell.method == ORIGINAL or cell.method not in methods_for(loaded) or METHODS[cell.method].repair != "dfr":
        return None
    return REPAIRS["dfr"].proxy_spec(tuple(loaded.input_shape), cell.repair_settings, loaded.num_classes)


def retryable_exceptions() -> tuple[type[BaseException], ...]:
    """Application exceptions worth another attempt: transient by nature, not a wrong input."""
    excs: list[type[BaseException]] = [TransientCellError, TimeoutError, ConnectionError]
    try:
        import torch

        excs.append(torch.cuda.OutOfMemoryError)  # another attempt may land on a less busy GPU
    except (ImportError, AttributeError):
        pass
    return tuple(excs)


class LocalExecutor:
    """Cells one after another in this process; transient failures are retried ``max_retries`` times. ``run``
    is the cell function (:func:`run_cell`; tests inject failures by wrapping it)."""

    name = "local"

    def __init__(self, max_retries: int = 2, device=None, run: Callable[..., dict] | None = None):
        self.max_retries = int(max_retries)
        self.device = device
        self.run_cell = run or run_cell

    def run(self, jobs, on_row, on_error) -> None:
        retry = retryable_exceptions()
        for job in jobs:
            n0 = count_params(job.loaded.model)
            for index, cell in job.cells:
                attempt = 0
                while True:
                    try:
                        row = self.run_cell(job.loaded, cell, weights_sha256=job.weights_sha256, device=self.device,
                                            n0=n0)
                    except retry as exc:
                        attempt += 1
                        if attempt <= self.max_retries:
                            continue
                        on_error(index, cell, exc)
                    except Exception as exc:  # noqa: BLE001 - reported per cell; the caller decides
                        on_error(index, cell, exc)
                    else:
                        on_row(index, cell, row)
                    break


# ------------------------------------------------------------------------------------------------ results file
def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    return str(v)


class ResultsCSV:
    """The streamed output file: checked before any work, one fsync'd row per finished cell, resumable."""

    def __init__(self, path, fields=CSV_FIELDS):
        self.path = Path(path).expanduser()
        self.fields = list(fields)
        self._fh = None

    def check(self) -> set[tuple]:
        """Validate the path and return the keys of the rows already there.  Raises SweepError."""
        p = self.path
        if p.is_dir():
            raise SweepError(f"--out {p} is a directory; give a CSV file path")
        parent = p.parent if str(p.parent) else Path(".")
        if not parent.is_dir():
            raise SweepError(f"--out {p}: folder {parent} does not exist")
        try:  # really try (os.access says yes to root on a read-only mount)
            if p.exists():
                with p.open("a"):
                    pass
            else:
                os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                p.unlink()
        except OSError as exc:
            raise SweepError(f"--out {p} is not writable: {exc.strerror or exc}") from None
        if not p.exists() or p.stat().st_size == 0:
            return set()
        try:
            with p.open(newline="") as fh:
                reader = csv.reader(fh)
                header = next(reader, [])
                if header != self.fields:
                    raise SweepError(
                        f"--out {p} exists with different columns ({','.join(header[:6])}...); it is not a foldviz "
                        f"sweep file of this version: choose another --out or remove it")
                idx = [self.fields.index(k) for k in KEY_FIELDS]
                keys = set()
                for rec in reader:
                    if len(rec) != len(self.fields):
                        continue  # a torn last line (crash mid-write): that cell runs again
                    keys.add(tuple(_canon(k, rec[i]) for k, i in zip(KEY_FIELDS, idx)))
                return keys
        except UnicodeDecodeError:
            raise SweepError(f"--out {p} exists and is not a text CSV file") from None

    def open(self) -> "ResultsCSV":
        new = not self.path.exists() or self.path.stat().st_size == 0
        if not new:
            with self.path.open("rb") as fh:
                fh.seek(-1, os.SEEK_END)
                torn = fh.read(1) != b"\n"
        self._fh = self.path.open("a", newline="")
        if new:
            self._write(self.fields)
        elif torn:
            self._fh.write("\n")
        return self

    def _write(self, values) -> None:
        csv.writer(self._fh).writerow(values)
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def append(self, row: dict) -> None:
        self._write([_fmt(row.get(k)) for k in self.fields])

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()


def _canon(key: str, text: str) -> str:
    if key == "ratio":
        try:
            return _ratio_text(float(text))
        except ValueError:
            return text
    return text


def read_rows(path) -> list[dict]:
    with Path(path).open(newline="") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------------------------------ progress
def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class ProgressLine:
    """``[done/total] pct ETA`` on stderr: rewritten in place on a TTY, else one line per finished cell."""

    def __init__(self, total: int, already: int = 0, stream=None, quiet: bool = False):
        self.total, self.done, self.already = total, already, already
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.t_first = time.monotonic()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def start(self) -> None:
        if not self.quiet and self.already:
            print(f"resuming: {self.already} of {self.total} cells already in the output file", file=self.stream)

    def update(self, cell: Cell, row: dict | None, error: str | None = None) -> None:
        self.done += 1
        if self.quiet:
            return
        ran = self.done - self.already
        left = self.total - self.done
        now = time.monotonic()
        if ran == 1:
            self.t_first = now  # the ETA leaves out start-up (Ray, worker imports, first dataset load)
        eta = _hms((now - self.t_first) / (ran - 1) * left) if ran > 1 else ("0m00s" if not left else "?")
        what = f"FAILED {cell.describe()}: {error}" if error else (
            f"{cell.describe()}: " + (f"acc {row['accuracy']:.2%}" if row.get("accuracy") is not None else
                                      f"ppl {row.get('perplexity')}") + f", sparsity {row['param_sparsity']:.1%}")
        line = f"[{self.done}/{self.total}] {self.done / max(self.total, 1):.0%} ETA {eta}  {what}"
        if self.tty:
            end = "\n" if left == 0 or error else ""
            self.stream.write("\r\x1b[2K" + line[:200] + end)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


# ------------------------------------------------------------------------------------------------ whole sweeps
@dataclass
class SweepJob:
    """One model of a sweep, loaded in the driver, with its pending cells."""

    loaded: LoadedModel
    weights_sha256: str
    cells: list[tuple[int, Cell]]  # (index in the plan, cell)


@dataclass
class SweepSummary:
    total: int = 0
    skipped: int = 0      # already in the output file
    executed: int = 0     # finished and written in this run
    failed: list = field(default_factory=list)  # (cell, error message)


def run_sweep(spec: SweepSpec, out, *, executor=None, progress: ProgressLine | bool | None = True,
              callback: Callable[[int, int, dict], None] | None = None, loaded: dict | None = None) -> SweepSummary:
    """Run every cell of ``spec`` not yet in ``out`` (a CSV path), appending each finished row at once.

    ``executor``: a :mod:`foldviz.executors` executor (default: in-process).  ``callback(done, total, row)`` runs
    after each row is safely on disk (an exception there, e.g. KeyboardInterrupt, stops the sweep; finished rows
    stay).  ``loaded``: already-loaded models by spec string (skips loading them again).
    """
    results = ResultsCSV(out)
    existing = results.check()  # before any work
    cells = plan_cells(spec)
    summary = SweepSummary(total=len(cells))
    jobs = []
    by_model: dict[ModelRef, list[tuple[int, Cell]]] = {}
    for i, c in enumerate(cells):
        by_model.setdefault(c.model, []).append((i, c))
    for ref, items in by_model.items():
        lm = (loaded or {}).get(ref.spec) or ref.load()
        wh = state_dict_hash(lm.model)
        kind = kind_of(lm)
        clustering = kind.default_plan(lm).clustering
        items = [(i, c.for_kind(kind.key, clustering)) for i, c in items]
        for i, c in items:
            kind.check_data(lm, c.data)   # a wrong data spec is one line before any cell runs
            break
        todo = []
        for i, c in items:
            if c.key(wh) not in existing:
                existing.add(c.key(wh))  # a model listed twice runs its cells once
                todo.append((i, c))
        summary.skipped += len(items) - len(todo)
        if todo:
            jobs.append(SweepJob(lm, wh, todo))
    if progress is True:
        progress = ProgressLine(summary.total, summary.skipped)
    elif progress is False:
        progress = None
    elif progress is not None:
        progress.total, progress.done, progress.already = summary.total, summary.skipped, summary.skipped
    if progress:
        progress.start()
    executor = executor or LocalExecutor()

    with results:
        def on_row(index: int, cell: Cell, row: dict) -> None:
            results.append(row)
            summary.executed += 1
            if progress:
                progress.update(cell, row)
            if callback:
                callback(summary.skipped + summary.executed, summary.total, row)

        def on_error(index: int, cell: Cell, exc: BaseException) -> None:
            if isinstance(exc, ValueError):  # a wrong input (data spec, settings) fails every cell alike: stop
                raise exc
            msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            summary.failed.append((cell, msg))
            if progress:
                progress.update(cell, None, error=msg)

        if jobs:
            executor.run(jobs, on_row, on_error)
    return summary


def sweep(loaded: LoadedModel, ratios, methods, data_spec: str, *, seeds=(0,), eval_limit: int | None = None,
          repair_samples: int = DEFAULT_REPAIR_SAMPLES, clustering: dict | None = None,
          repair_settings: dict | None = None, progress: Callable[[int, int, dict | None], None] | None = None,
          executor=None, calib: str | None = None, calib_samples: int | None = None,
          calib_seqlen: int | None = None) -> list[dict]:
    """Fold/prune ``loaded`` at every ratio with every method and seed; evaluate each on ``data_spec``'s test split.

    Returns one row per (method, ratio, seed) plus one "original" row first (in plan order whatever the
    executor).  ``progress(done, total, last_row)`` counts the folded cells.
    """
    kind = kind_of(loaded)
    bad = [m for m in methods if m not in METHODS or kind.key not in METHODS[m].applies_to]
    if bad:
        from .methods import keys_for

        raise ValueError(f"method(s) {bad} do not apply to {kind.a_label}; choose from {', '.join(keys_for(kind.key))}")
    spec = spec_from_args(ModelRef(spec=loaded.spec or "model"), ratios, methods, data_spec, seeds=seeds,
                          eval_limit=eval_limit, repair_samples=repair_samples, clustering=clustering,
                          repair_settings=repair_settings, calib=calib, calib_samples=calib_samples,
                          calib_seqlen=calib_seqlen)
    default = kind.default_plan(loaded).clustering
    cells = [c.for_kind(kind.key, default) for c in plan_cells(spec)]
    job = SweepJob(loaded, state_dict_hash(loaded.model), list(enumerate(cells)))
    rows: dict[int, dict] = {}
    total, done = len(cells) - 1, 0

    def on_row(i, cell, row):
        nonlocal done
        rows[i] = row
        if cell.method != ORIGINAL:
            done += 1
            if progress:
                progress(done, total, row)

    def on_error(i, cell, exc):
        raise exc

    (executor or LocalExecutor()).run([job], on_row, on_error)
    return [rows[i] for i in sorted(rows)]


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()
