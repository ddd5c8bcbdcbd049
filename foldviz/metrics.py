"""What folding did to a model: size, cost, speed and activation statistics.

Units: FLOPs count 2 per multiply-add (torch's FlopCounterMode convention); MACs = FLOPs / 2.
"""
from __future__ import annotations

import json
import time

import numpy as np
import torch
from safetensors.torch import save as st_save
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .groups import BN_TYPES, CONV_TYPES


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def param_sparsity(original: nn.Module, folded: nn.Module) -> float:
    """Fraction of parameters removed (the paper's 'sparsity')."""
    return 1.0 - count_params(folded) / count_params(original)


@torch.no_grad()
def count_flops(model: nn.Module, example_input: torch.Tensor) -> int:
    """FLOPs of one forward pass on ``example_input`` (2 per multiply-add; batch included)."""
    was = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(example_input)
    model.train(was)
    return int(counter.get_total_flops())


_ST_ORDER = ["BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16",
             "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64"]
_ST_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict saved as safetensors.

    Computed from names, shapes and dtypes (the header safetensors would write, padded to 8 bytes, plus the raw
    data), so no serialised copy of the model is made (that copy alone is 2x the weights in memory).
    """
    state = model.state_dict()
    if any(v.dtype not in _ST_NAMES for v in state.values()):
        return len(st_save({k: v.detach().contiguous().cpu() for k, v in state.items()}))
    rank = {d: i for i, d in enumerate(_ST_ORDER)}
    items = sorted(((k, _ST_NAMES[v.dtype], list(v.shape), v.numel() * v.element_size()) for k, v in state.items()),
                   key=lambda t: (-rank[t[1]], t[0]))
    header, off = {}, 0
    for k, dt, shape, nbytes in items:
        header[k] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + nbytes]}
        off += nbytes
    n = len(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    return 8 + n + (-n % 8) + off


@torch.no_grad()
def latency_pair(a: nn.Module, b: nn.Module, example_input: torch.Tensor, *, rounds: int = 15,
                 warmup: int = 2) -> dict:
    """Wall-clock milliseconds per forward pass of two models, measured in alternation (a, b, a, b, ...) so that
    a busy machine slows both alike. Returns medians and interquartile ranges: compare the ratio, and treat a
    difference inside the spread as noise."""
    dev = next(a.parameters()).device
    x = example_input.to(dev)
    times: dict[str, list[float]] = {"a": [], "b": []}
    for m in (a, b):
        m.eval()
        for _ in range(warmup):
            m(x)
    for _ in range(rounds):
        for key, m in (("a", a), ("b", b)):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            m(x)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times[key].append((time.perf_counter() - t) * 1e3)
    out = {}
    for key, ts in times.items():
        q1, med, q3 = np.percentile(ts, [25, 50, 75])
        out[key] = {"median_ms": float(med), "iqr_ms": float(q3 - q1)}
    out["ratio"] = out["b"]["median_ms"] / max(out["a"]["median_ms"], 1e-9)
    out["batch"] = int(x.shape[0])
    return out


def _measured_layers(model: nn.Module) -> list[str]:
    """Layers whose outputs we compare: every BatchNorm, and every conv/linear not directly followed by one."""
    names = [n for n, m in model.named_modules() if n]
    mods = dict(model.named_modules())
    out = []
    for i, n in enumerate(names):
        m = mods[n]
        if isinstance(m, BN_TYPES):
            out.append(n)
        elif isinstance(m, (nn.Linear,) + CONV_TYPES):
            nxt = mods[names[i + 1]] if i + 1 < len(names) else None
            if not isinstance(nxt, BN_TYPES):
                out.append(n)
    return out


def _expected_channels(m: nn.Module) -> int | None:
    if isinstance(m, nn.Linear):
        return m.out_features
    if isinstance(m, CONV_TYPES):
        return m.out_channels
    if isinstance(m, BN_TYPES):
        return m.num_features
    if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) >= 1:
        return int(m.normalized_shape[-1])
    return None


def channel_axis(m: nn.Module, out: torch.Tensor) -> int | None:
    """The axis of ``out`` that holds ``m``'s channels, or None when it cannot be mapped.

    Convs and BatchNorms put channels on dim 1; Linear and LayerNorm on the last dim (e.g. ConvNeXt's Linear
    layers see ``(N, H, W, C)``); the other axis is tried when the natural one does not have the layer's width
    (e.g. torchvision's LayerNorm2d, which permutes back to ``(N, C, H, W)``).
    """
    if not torch.is_tensor(out) or out.dim() < 2:
        return None
    n = _expected_channels(m)
    natural = [out.dim() - 1, 1] if isinstance(m, (nn.Linear, nn.LayerNorm)) else [1, out.dim() - 1]
    for ax in natural:
        if n is None or out.shape[ax] == n:
            return ax
    return None


#: Target bytes of one layer's activation per chunk when channel_variances picks the batch size itself.
VARIANCE_CHUNK_BYTES = 64 * 1024 * 1024


@torch.no_grad()
def channel_variances(model: nn.Module, inputs: torch.Tensor, layers: list[str], batch_size: int | None = None,
                      notes: list | None = None) -> dict:
    """Per-channel output variance of each named layer over ``inputs`` (pooled over batch and space).

    Memory is bounded: inputs run in chunks (``batch_size``, or chosen so that the largest activation of one
    chunk stays near :data:`VARIANCE_CHUNK_BYTES`, at most 32 samples), each chunk is reduced per channel in the
    activation's own dtype (``torch.var_mean``) and only the per-channel results are combined in float64 (Chan's
    parallel update).  Channels are read on the axis each layer really uses (see :func:`channel_axis`); a layer
    whose channels cannot be mapped is skipped and, if ``notes`` is a list, a note is appended to it.
    """
    mods = dict(model.named_modules())
    stats: dict[str, list] = {}
    skipped: dict[str, str] = {}
    peak = [0]

    def make(name):
        def hook(m, _i, out):
            if name in skipped:
                return
            if not torch.is_tensor(out):
                skipped[name] = f"{name}: output is not a tensor ({type(out).__name__}); skipped"
                return
            peak[0] = max(peak[0], out.numel() * out.element_size() // max(1, out.shape[0]))
            ax = channel_axis(m, out)
            if ax is None:
                skipped[name] = (f"{name}: cannot tell which axis of its output {tuple(out.shape)} holds its "
                                 f"{_expected_channels(m)} channels; skipped")
                return
            a = out.detach()
            if not a.is_floating_point():
                a = a.float()
            dims = [d for d in range(a.dim()) if d != ax]
            var, mean = torch.var_mean(a, dim=dims, correction=0)
            cnt = a.numel() // a.shape[ax]
            var, mean = var.double().cpu(), mean.double().cpu()
            s = stats.get(name)
            if s is None:
                stats[name] = [cnt, mean, var * cnt]
                return
            if len(mean) != len(s[1]):
                skipped[name] = f"{name}: channel count changed between batches; skipped"
                return
            n_a, mean_a, m2_a = s
            n = n_a + cnt
            delta = mean - mean_a
            s[1] = mean_a + delta * (cnt / n)
            s[2] = m2_a + var * cnt + delta * delta * (n_a * cnt / n)
            s[0] = n
        return hook

    handles = [mods[n].register_forward_hook(make(n)) for n in layers if n in mods]
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    try:
        start = 0
        if batch_size is None:  # probe with one sample, then size the chunks by the largest activation seen
            model(inputs[:1].to(dev))
            start = 1
            batch_size = int(max(1, min(32, VARIANCE_CHUNK_BYTES // max(1, peak[0]))))
        for xb in inputs[start:].split(int(batch_size)):
            model(xb.to(dev))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    if notes is not None:
        notes.extend(skipped.values())
    out = {}
    for n, (cnt, _mean, m2) in stats.items():
        if n in skipped:
            continue
        out[n] = (m2 / max(1, cnt - 1)).clamp_min(0).numpy()
    return out


def variance_ratios(original: nn.Module, folded: nn.Module, inputs: torch.Tensor,
                    channel_maps: dict[str, np.ndarray] | None = None, *, layers: list[str] | None = None,
                    notes: list | None = None) -> list[dict]:
    """Per-layer activation-variance ratio, the paper's collapse/explosion measure.

    For each layer: mean over original channels i of Var(folded channel that i was merged into) / Var(original
    channel i). Channels removed by pruning and channels with zero original variance are left out. 1 is ideal,
    below 1 is variance collapse, above 1 is explosion.
    """
    layers = layers or _measured_layers(original)
    v_orig = channel_variances(original, inputs, layers, notes=notes)
    v_fold = channel_variances(folded, inputs, layers, notes=notes)
    maps = channel_maps or {}
    rows = []
    for n in layers:
        if n not in v_orig or n not in v_fold:
            continue
        vo, vf = v_orig[n], v_fold[n]
        cmap = maps.get(n, np.arange(len(vo)) if len(vf) == len(vo) else None)
        if cmap is None or len(cmap) != len(vo) or (len(cmap) and int(np.max(cmap)) >= len(vf)):
            if notes is not None:
                notes.append(f"{n}: channel map does not fit {len(vo)} -> {len(vf)} channels; skipped")
            continue
        keep = (cmap >= 0) & (vo > 1e-12)
        if not keep.any():
            continue
        ratio = vf[cmap[keep]] / vo[keep]
        rows.append({"layer": n, "ratio": float(ratio.mean()), "median": float(np.median(ratio)),
                     "channels_before": int(len(vo)), "channels_after": int(len(vf))})
    return rows


def summary(model: nn.Module, example_input: torch.Tensor) -> dict:
    """Parameters, FLOPs (batch 1) and safetensors size of ``model``; a failed FLOPs count is recorded in
    ``errors`` instead of raising."""
    d = {"params": count_params(model), "size_bytes": model_size_bytes(model)}
    d["flops"] = _optional(d, "flops", lambda: count_flops(model, example_input[:1]))
    return d


def _optional(d: dict, key: str, fn):
    """Run an optional measurement; on failure return None and record ``d["errors"][key]`` (never raise)."""
    try:
        return fn()
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        d.setdefault("errors", {})[key] = f"{type(exc).__name__}: {msg[:300]}"
        return None


def compare(original: nn.Module, folded: nn.Module, example_input: torch.Tensor, *, latency: bool = True,
            latency_batch: int = 8) -> dict:
    """Side-by-side summary of the original and folded model, with the ratios users ask about; ``latency`` adds
    an alternating :func:`latency_pair` measurement (None when it fails)."""
    before, after = summary(original, example_input), summary(folded, example_input)
    out = {"before": before, "after": after, "param_sparsity": 1 - after["params"] / before["params"],
           "flops_ratio": after["flops"] / before["flops"] if before["flops"] and after["flops"] is not None else None,
           "size_ratio": after["size_bytes"] / before["size_bytes"]}
    if latency:
        xb = example_input[:1].expand(latency_batch, *example_input.shape[1:]).contiguous()
        out["latency"] = _optional(out, "latency", lambda: latency_pair(original, folded, xb))
    return out
