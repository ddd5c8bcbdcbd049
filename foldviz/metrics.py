"""What folding did to a model: size, cost, speed and activation statistics.

Units: FLOPs count 2 per multiply-add (torch's FlopCounterMode convention); MACs = FLOPs / 2.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from safetensors.torch import save as st_save
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .groups import _BN, _CONV


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


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict saved as safetensors."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    return len(st_save(state))


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
        if isinstance(m, _BN):
            out.append(n)
        elif isinstance(m, (nn.Linear,) + _CONV):
            nxt = mods[names[i + 1]] if i + 1 < len(names) else None
            if not isinstance(nxt, _BN):
                out.append(n)
    return out


@torch.no_grad()
def channel_variances(model: nn.Module, inputs: torch.Tensor, layers: list[str], batch_size: int = 256) -> dict:
    """Per-channel output variance of each named layer over ``inputs`` (pooled over batch and space)."""
    mods = dict(model.named_modules())
    sums: dict[str, list] = {}

    def make(name):
        def hook(_m, _i, out):
            a = out.detach().double()
            a = a.transpose(0, 1).reshape(a.shape[1], -1)
            s = sums.setdefault(name, [0, 0.0, 0.0])
            s[0] += a.shape[1]
            s[1] = s[1] + a.sum(1)
            s[2] = s[2] + (a * a).sum(1)
        return hook

    handles = [mods[n].register_forward_hook(make(n)) for n in layers if n in mods]
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    try:
        for xb in inputs.split(batch_size):
            model(xb.to(dev))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    out = {}
    for n, (cnt, s1, s2) in sums.items():
        mean = s1 / cnt
        out[n] = ((s2 / cnt - mean * mean) * cnt / max(1, cnt - 1)).clamp_min(0).cpu().numpy()
    return out


def variance_ratios(original: nn.Module, folded: nn.Module, inputs: torch.Tensor,
                    channel_maps: dict[str, np.ndarray] | None = None, *, layers: list[str] | None = None) -> list[dict]:
    """Per-layer activation-variance ratio, the paper's collapse/explosion measure.

    For each layer: mean over original channels i of Var(folded channel that i was merged into) / Var(original
    channel i). Channels removed by pruning and channels with zero original variance are left out. 1 is ideal,
    below 1 is variance collapse, above 1 is explosion.
    """
    layers = layers or _measured_layers(original)
    v_orig = channel_variances(original, inputs, layers)
    v_fold = channel_variances(folded, inputs, layers)
    maps = channel_maps or {}
    rows = []
    for n in layers:
        if n not in v_orig or n not in v_fold:
            continue
        vo, vf = v_orig[n], v_fold[n]
        cmap = maps.get(n, np.arange(len(vo)) if len(vf) == len(vo) else None)
        if cmap is None:
            continue
        keep = (cmap >= 0) & (vo > 1e-12)
        if not keep.any():
            continue
        ratio = vf[cmap[keep]] / vo[keep]
        rows.append({"layer": n, "ratio": float(ratio.mean()), "median": float(np.median(ratio)),
                     "channels_before": int(len(vo)), "channels_after": int(len(vf))})
    return rows


def summary(model: nn.Module, example_input: torch.Tensor) -> dict:
    """Parameters, FLOPs (batch 1) and safetensors size of ``model``."""
    return {"params": count_params(model), "flops": count_flops(model, example_input[:1]),
            "size_bytes": model_size_bytes(model)}


def compare(original: nn.Module, folded: nn.Module, example_input: torch.Tensor, *, latency: bool = True,
            latency_batch: int = 8) -> dict:
    """Side-by-side summary of the original and folded model, with the ratios users ask about."""
    before, after = summary(original, example_input), summary(folded, example_input)
    out = {"before": before, "after": after, "param_sparsity": 1 - after["params"] / before["params"],
           "flops_ratio": after["flops"] / before["flops"] if before["flops"] else None,
           "size_ratio": after["size_bytes"] / before["size_bytes"]}
    if latency:
        xb = example_input[:1].expand(latency_batch, *example_input.shape[1:]).contiguous()
        out["latency"] = latency_pair(original, folded, xb)
    return out
