"""Exporting a (folded) image classifier to deployment formats, each export checked against PyTorch.

Formats (``to``):

``onnx``
    ``torch.onnx.export`` with the ``torch.export``-based exporter (``dynamo=True``), opset :data:`DEFAULT_OPSET`
    unless ``opset`` is given, a dynamic batch axis. Checked by running ONNX Runtime (CPU) on a fixed batch.
    Needs the optional ``onnx``, ``onnxscript`` and ``onnxruntime`` packages.
``torchscript``
    ``torch.jit.trace`` (TorchScript is deprecated upstream in favour of ``torch.export``; it is kept for
    runtimes that still load it). Checked by loading the written bytes with ``torch.jit.load``.
``pt2``
    a ``torch.export`` program (``torch.export.save``), dynamic batch axis. Checked by ``torch.export.load``.

Every export is checked before anything is written: the exported program runs on a fixed seeded batch (and on a
single input, so a batch size frozen into the graph is caught) and its largest absolute difference from the
PyTorch model must be at most ``tolerance`` (default :data:`TOLERANCE`); otherwise :class:`ExportError` is raised
and nothing is written. The file is written atomically.

Language models folded by :mod:`foldviz.lm` are saved as Hugging Face directories; they are refused here with one
line naming the tool that exports them (Hugging Face Optimum).
"""
from __future__ import annotations

import argparse
import io
import math
import os
import time
import warnings
from pathlib import Path

from .argtypes import positive as _positive

# torch, numpy and the exporters are imported where they are used: registering the subcommand (``--help``) stays
# free of them

__all__ = ["FORMATS", "DEFAULT_OPSET", "TOLERANCE", "ExportError", "export_model", "export_bytes", "ort_session",
           "ort_latency_pair", "compare_ort_latency", "is_lm_dir", "cmd_export", "add_export_subparser"]

FORMATS = ("onnx", "torchscript", "pt2")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "pt2": ".pt2"}
#: ONNX opset written unless another is asked for (the default of torch 2.9+'s exporter).
DEFAULT_OPSET = 20
#: Largest |exported - PyTorch| accepted on the check batch.
TOLERANCE = 1e-4
#: Inputs in the check batch (plus a second run on one input).
CHECK_BATCH = 4
#: Largest batch the exported programs accept on their dynamic batch axis.
MAX_BATCH = 4096
#: Protobuf's limit for one ONNX file.
MAX_ONNX_BYTES = 2 * 1024 ** 3 - 1

_LM_HINT = ("export language models with Hugging Face Optimum on the saved directory, e.g. "
            "optimum-cli export onnx --model {d} {d}-onnx/ ; foldviz exports image classifiers")


class ExportError(ValueError):
    """An export that cannot be made or did not pass its check; the message is meant for the user."""


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__


# ----------------------------------------------------------------------------------------------------------------
# sources
# ----------------------------------------------------------------------------------------------------------------
def is_lm_dir(path) -> bool:
    """Whether ``path`` is a language-model directory (Hugging Face ``config.json`` or foldviz's LM card)."""
    p = Path(str(path)).expanduser()
    return p.is_dir() and ((p / "config.json").is_file() or (p / "foldviz_lm.json").is_file())


def _is_lm_spec(spec: str) -> bool:
    from .models import is_lm_spec

    return is_lm_spec(spec)


def _resolve(source, input_shape, trust_code: bool):
    """(model, input_shape, name) for a LoadedModel, FoldResult, module or spec/directory."""
    from torch import nn

    from .surgery import FoldResult
    from .zoo import LoadedModel

    if isinstance(source, LoadedModel):
        return source.model, tuple(input_shape or source.input_shape), source.spec
    if isinstance(source, FoldResult):
        if input_shape is None:
            raise ExportError("exporting a FoldResult needs input_shape (the LoadedModel's input_shape)")
        return source.model, tuple(input_shape), source.label
    if isinstance(source, nn.Module):
        if input_shape is None:
            raise ExportError("exporting a module needs input_shape, e.g. (3, 224, 224)")
        return source, tuple(input_shape), type(source).__name__
    if isinstance(source, (str, os.PathLike)):
        spec = str(source).strip()
        if is_lm_dir(spec) or _is_lm_spec(spec):
            raise ExportError(f"{spec} is a language model: " + _LM_HINT.format(d=spec.rstrip('/')))
        from .models import load_model

        loaded = load_model(spec, trust_code=trust_code)
        return loaded.model, tuple(input_shape or loaded.input_shape), loaded.spec
    raise ExportError(f"cannot export a {type(source).__name__}; give a LoadedModel, FoldResult, module or "
                      "folded-model directory")


def _check_inputs(input_shape: tuple, batch: int, seed: int) -> list:
    import torch

    g = torch.Generator().manual_seed(int(seed))
    x = torch.randn((int(batch), *input_shape), generator=g)
    return [x, x[:1].clone()]


def _batch_dim():
    import torch

    return torch.export.Dim("batch", min=1, max=MAX_BATCH)


# ----------------------------------------------------------------------------------------------------------------
# one exporter per format: (bytes, runner) where runner(x) -> np.ndarray runs the written bytes
# ----------------------------------------------------------------------------------------------------------------
def _need_onnx():
    missing = []
    for pkg in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(pkg)
        except ImportError:
            missing.append(pkg)
    if missing:
        raise ExportError(f"ONNX export needs the optional packages {', '.join(missing)}: pip install "
                          f"{' '.join(missing)} (listed in requirements-extras.txt)")


def ort_session(onnx: bytes | str | os.PathLike, threads: int = 1):
    """An ONNX Runtime CPU session on ``threads`` intra-op threads (one inter-op thread, sequential)."""
    _need_onnx()
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    src = onnx if isinstance(onnx, bytes) else str(onnx)
    return ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])


def _export_onnx(model, x, opset: int):
    import torch

    _need_onnx()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(model, (x,), None, dynamo=True, opset_version=int(opset), verbose=False,
                                 input_names=["input"], output_names=["logits"],
                                 dynamic_shapes=({0: _batch_dim()},))
    proto = prog.model_proto
    if proto.ByteSize() > MAX_ONNX_BYTES:
        raise ExportError(f"the ONNX model is {proto.ByteSize()} bytes, over protobuf's 2 GiB limit for one file")
    data = proto.SerializeToString()
    sess = ort_session(data)
    name = sess.get_inputs()[0].name
    return data, lambda inp: sess.run(None, {name: inp.numpy()})[0]


def _export_torchscript(model, x, _opset):
    import torch

    with warnings.catch_warnings():  # deprecated upstream, still loadable by LibTorch runtimes
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (x,), check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
        data = buf.getvalue()
        back = torch.jit.load(io.BytesIO(data), map_location="cpu")
    back.eval()

    def run(inp):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return back(inp).numpy()

    return data, run


def _export_pt2(model, x, _opset):
    import torch

    ep = torch.export.export(model, (x,), dynamic_shapes=({0: _batch_dim()},))
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    data = buf.getvalue()
    back = torch.export.load(io.BytesIO(data)).module()

    def run(inp):
        with torch.no_grad():
            return back(inp).numpy()

    return data, run


_EXPORTERS = {"onnx": _export_onnx, "torchscript": _export_torchscript, "pt2": _export_pt2}


def _compare(run, model, inputs: list) -> tuple[float, float]:
    """(largest |run(x) - model(x)|, largest |model(x)|) over ``inputs``."""
    import numpy as np
    import torch

    worst, scale = 0.0, 0.0
    for x in inputs:
        with torch.no_grad():
            ref = model(x).float().numpy()
        got = np.asarray(run(x), dtype=np.float32)
        if got.shape != ref.shape:
            raise ExportError(f"the exported model returns shape {got.shape} for input {tuple(x.shape)}, "
                              f"PyTorch {ref.shape}")
        scale = max(scale, float(np.abs(ref).max()))
        if not np.isfinite(got).all():
            return float("inf"), scale
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst, scale


# ----------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------
def export_bytes(source, to: str, *, input_shape=None, opset: int | None = None, check: bool = True,
                 batch: int = CHECK_BATCH, tolerance: float = TOLERANCE, seed: int = 0,
                 trust_code: bool = False) -> tuple[bytes, dict]:
    """Export ``source`` to format ``to`` in memory and check it; the app's download button serves the bytes.

    Parameters
    ----------
    source : LoadedModel | FoldResult | nn.Module | str | os.PathLike
        The model; a string is a folded-model directory or any model spec (:func:`foldviz.models.load_model`).
    to : {"onnx", "torchscript", "pt2"}
        Output format.
    input_shape : tuple, optional
        Per-sample input shape ``(C, H, W)``; required for a FoldResult or bare module.
    opset : int, optional
        ONNX opset (default :data:`DEFAULT_OPSET`).
    check : bool
        Run the exported program on a fixed batch and refuse a difference above ``tolerance``.
    batch : int
        Inputs in the check batch, shape ``(batch, *input_shape)`` (a second check runs one input).
    tolerance : float
        Largest accepted absolute difference from PyTorch.
    trust_code : bool
        Allow rebuilding a ``py:`` model (see :mod:`foldviz.sources`).

    Returns
    -------
    (bytes, dict)
        The file's bytes and the record: format, opset, bytes, max_abs_diff (None unchecked), output_scale
        (largest |PyTorch output| on the check batches), tolerance, check_batch, input_shape, dynamic_batch,
        runtime, torch version, seconds.
    """
    import torch

    if to not in FORMATS:
        raise ExportError(f"unknown export format {to!r}; choose from {', '.join(FORMATS)}")
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        raise ExportError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    if not 1 <= int(batch) <= MAX_BATCH:
        raise ExportError(f"check batch must be between 1 and {MAX_BATCH}, got {batch}")
    if opset is not None and to != "onnx":
        raise ExportError("--opset applies to ONNX exports only")
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if to == "onnx" and not 18 <= opset <= 23:
        raise ExportError(f"ONNX opset {opset} is not supported by torch's exporter; use 18 to 23")
    model, shape, name = _resolve(source, input_shape, trust_code)
    model = model.float().cpu().eval()
    inputs = _check_inputs(shape, batch, seed)
    t = time.perf_counter()
    try:
        data, run = _EXPORTERS[to](model, inputs[0], opset)
    except ExportError:
        raise
    except Exception as exc:  # an operator the exporter does not support, a trace failure
        raise ExportError(f"{to} export of {name} failed: {_first_line(exc)}") from None
    diff, scale = _compare(run, model, inputs) if check else (None, None)
    if diff is not None and not diff <= tolerance:
        raise ExportError(f"{to} export of {name} disagrees with PyTorch: max abs difference {diff:.3g} > tolerance "
                          f"{tolerance:g}; nothing was written")
    runtime = {"onnx": "onnxruntime", "torchscript": "torch.jit.load", "pt2": "torch.export.load"}[to]
    if to == "onnx":
        import onnxruntime

        runtime += f" {onnxruntime.__version__} (CPUExecutionProvider)"
    info = {"format": to, "model": name, "opset": opset if to == "onnx" else None, "bytes": len(data),
            "max_abs_diff": diff, "output_scale": scale, "tolerance": float(tolerance), "check_batch": [int(batch), 1],
            "input_shape": list(shape), "dynamic_batch": [1, MAX_BATCH], "runtime": runtime,
            "torch": torch.__version__, "seconds": time.perf_counter() - t}
    return data, info


def export_model(source, to: str, out, *, force: bool = False, input_shape=None, opset: int | None = None,
                 check: bool = True, batch: int = CHECK_BATCH, tolerance: float = TOLERANCE, seed: int = 0,
                 trust_code: bool = False) -> dict:
    """Export and check like :func:`export_bytes`, then write ``out`` atomically.

    ``out`` must not exist unless ``force``, and may not lie inside the source directory. Returns the record of
    :func:`export_bytes` with ``path`` added.
    """
    from .utils import atomic_write_bytes, check_output_file

    protected = [str(source)] if isinstance(source, (str, os.PathLike)) and Path(str(source)).is_dir() else []
    out = check_output_file(out, force, protected=protected)
    data, info = export_bytes(source, to, input_shape=input_shape, opset=opset, check=check, batch=batch,
                              tolerance=tolerance, seed=seed, trust_code=trust_code)
    atomic_write_bytes(out, data)
    return {**info, "path": str(out)}


# ----------------------------------------------------------------------------------------------------------------
# ONNX Runtime latency
# ----------------------------------------------------------------------------------------------------------------
def ort_latency_pair(a: bytes, b: bytes, input_shape, batch: int, *, threads: int = 1, rounds: int = 15,
                     warmup: int = 2, seed: int = 0) -> dict:
    """Milliseconds per run of two ONNX models under ONNX Runtime, timed in alternation (a, b, a, b, ...).

    Returns ``{"a": {"median_ms", "iqr_ms"}, "b": {...}, "ratio": b/a, "batch", "threads"}``; compare the ratio,
    and treat a difference inside the spread as noise.
    """
    import numpy as np
    import torch

    sa, sb = ort_session(a, threads), ort_session(b, threads)
    g = torch.Generator().manual_seed(int(seed))
    x = torch.randn((int(batch), *input_shape), generator=g).numpy()
    feeds = {"a": (sa, {sa.get_inputs()[0].name: x}), "b": (sb, {sb.get_inputs()[0].name: x})}
    for s, f in feeds.values():
        for _ in range(warmup):
            s.run(None, f)
    times: dict[str, list[float]] = {"a": [], "b": []}
    for _ in range(int(rounds)):
        for key, (s, f) in feeds.items():
            t = time.perf_counter()
            s.run(None, f)
            times[key].append((time.perf_counter() - t) * 1e3)
    out: dict = {}
    for key, ts in times.items():
        q1, med, q3 = np.percentile(ts, [25, 50, 75])
        out[key] = {"median_ms": float(med), "iqr_ms": float(q3 - q1)}
    out["ratio"] = out["b"]["median_ms"] / max(out["a"]["median_ms"], 1e-9)
    out.update(batch=int(batch), threads=int(threads), rounds=int(rounds))
    return out


def compare_ort_latency(original, folded, input_shape, *, batches=(1, 64), threads: int = 1,
                        rounds: int = 15, opset: int | None = None) -> dict:
    """ONNX Runtime latency of ``folded`` against ``original`` (both exported and checked here) per batch size.

    Returns ``{"opset", "threads", "batches": {batch: ort_latency_pair(...)}}`` with ``a`` the original and ``b``
    the folded model: a ratio below 1 means the folded model is faster.
    """
    shape = tuple(input_shape)
    a, _ = export_bytes(original, "onnx", input_shape=shape, opset=opset)
    b, _ = export_bytes(folded, "onnx", input_shape=shape, opset=opset)
    res = {str(n): ort_latency_pair(a, b, shape, n, threads=threads, rounds=rounds) for n in batches}
    return {"opset": DEFAULT_OPSET if opset is None else int(opset), "threads": int(threads), "batches": res}


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------
def _original_of(path: str, trust_code: bool):
    """The unfolded architecture a folded directory was made from (random weights: latency only)."""
    from .persist import read_meta
    from .sources import build_any

    meta = read_meta(Path(path))
    return build_any(meta["base_card"], trust_code=trust_code).float().eval()


def cmd_export(args) -> int:
    """``python -m foldviz export MODEL --to FORMAT --out FILE``: export, check, write; optionally time it."""
    from .utils import check_output_file, is_folded_model_dir

    src = str(args.model)
    if is_lm_dir(src) or _is_lm_spec(src):
        raise ExportError(f"{src} is a language model: " + _LM_HINT.format(d=src.rstrip('/')))
    protected = [src] if Path(src).is_dir() else []
    check_output_file(args.out, args.force, protected=protected)
    if args.json:
        check_output_file(args.json, args.force, protected=protected)
    if args.latency and args.to != "onnx":
        raise ExportError("--latency measures ONNX Runtime: use it with --to onnx")
    if args.latency and not is_folded_model_dir(src):
        raise ExportError("--latency compares a folded model with its original: give a folded-model directory")
    from .models import load_model

    loaded = load_model(src, trust_code=args.trust_code)
    info = export_model(loaded, args.to, args.out, force=args.force, opset=args.opset, batch=args.batch,
                        tolerance=args.tolerance, trust_code=args.trust_code)
    diff = info["max_abs_diff"]
    what = f"opset {info['opset']}, " if info["opset"] else ""
    print(f"wrote {info['path']} ({args.to}, {what}{info['bytes']:,} bytes); {info['runtime']} agrees with "
          f"PyTorch: max abs difference {diff:.3g} on outputs up to {info['output_scale']:.3g} (tolerance "
          f"{info['tolerance']:g}, batches {info['check_batch'][0]} and 1)")
    if args.latency:
        lat = compare_ort_latency(_original_of(src, args.trust_code), loaded.model, loaded.input_shape,
                                  batches=tuple(args.latency_batches), threads=args.threads, opset=args.opset)
        for n, r in lat["batches"].items():
            print(f"ONNX Runtime, batch {n}, {args.threads} thread(s): original {r['a']['median_ms']:.2f} ms, "
                  f"folded {r['b']['median_ms']:.2f} ms (ratio {r['ratio']:.2f}, IQR {r['a']['iqr_ms']:.2f}/"
                  f"{r['b']['iqr_ms']:.2f} ms)")
        info["ort_latency"] = lat
    if args.json:
        from .utils import atomic_write_text, dumps_json

        atomic_write_text(args.json, dumps_json(info))
    return 0


def _tolerance(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"tolerance must be a finite number >= 0, got {text}")
    return v


def add_export_subparser(sub) -> argparse.ArgumentParser:
    """Register ``export`` on the CLI's subparsers (``sub`` from ``add_subparsers``)."""
    p = sub.add_parser("export", help="export a folded model to ONNX, TorchScript or a torch.export program",
                       description="Export a model (usually a folded-model directory) and check the export: it runs "
                                   "on a fixed batch and must agree with PyTorch within --tolerance, else nothing "
                                   "is written.")
    p.add_argument("model", help="a folded-model directory (or any image-model spec: demo:NAME, torchvision:ARCH, "
                                 "timm:NAME, py:FILE:FACTORY)")
    p.add_argument("--to", required=True, choices=FORMATS, help="onnx (ONNX Runtime), torchscript (torch.jit), "
                                                                 "pt2 (torch.export program)")
    p.add_argument("--out", required=True, help="file to write (must not exist unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file (atomically)")
    p.add_argument("--opset", type=int, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--tolerance", type=_tolerance, default=TOLERANCE,
                   help=f"largest accepted |export - PyTorch| on the check batch (default {TOLERANCE:g})")
    p.add_argument("--batch", type=_positive, default=CHECK_BATCH, help="inputs in the check batch")
    p.add_argument("--latency", action="store_true",
                   help="also time the folded and the original model under ONNX Runtime (--to onnx)")
    p.add_argument("--latency-batches", type=_positive, nargs="+", default=[1, 64], metavar="N")
    p.add_argument("--threads", type=_positive, default=1, help="ONNX Runtime CPU threads for --latency")
    p.add_argument("--json", help="also write the export record (and latencies) to this JSON file")
    p.add_argument("--trust-code", action="store_true",
                   help="allow a model built by py:FILE:FACTORY (runs that file's code; your decision)")
    p.set_defaults(func=cmd_export)
    return p
