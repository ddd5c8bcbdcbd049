"""Inputs synthesised from a trained model alone: Deep Inversion (Yin et al., 2020).

Fold-DIR re-estimates BatchNorm statistics on such a batch; Fold-DFR's proxy (:mod:`foldviz.proxy`) is a short,
cached one. The synthesis matches, at every BatchNorm, the batch's per-channel mean and variance to the running
statistics, plus a cross-entropy towards random targets and small image priors (total variation, L2, jitter).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .groups import BN_TYPES
from .utils import Progress


def input_pixels(input_shape) -> int:
    """Spatial positions of one input of ``input_shape`` ((C, H, W, ...), or 1 for a feature vector)."""
    return int(np.prod(input_shape[1:])) if len(input_shape) >= 3 else 1


def deep_inversion(model: nn.Module, input_shape, *, num_classes: int | None = None, batch_size: int = 256,
                   iterations: int = 200, lr: float = 0.1, bn_weight: float = 1.0, tv_weight: float = 1e-4,
                   l2_weight: float = 1e-5, jitter: int = 1, seed: int = 0, device=None,
                   progress: Progress = None, chunk: int | None = None, resolution: int | None = None,
                   balanced: bool = False, normalized: bool = False, stage: str = "dir") -> torch.Tensor:
    """Synthesise ``batch_size`` inputs whose per-layer batch statistics match the model's BatchNorm statistics.

    Loss = CE(f(x), targets) + bn_weight * sum_l (||mu_l - running_mean_l|| + ||var_l - running_var_l||)
    + tv_weight * total variation + l2_weight * ||x||, optimised with Adam (cosine learning rate) on randomly
    jittered copies of x. Targets are drawn at random, or with ``balanced`` in equal shares per class (shuffled).
    With ``resolution`` r the optimised variable is (C, r, r) and is upsampled bilinearly to the input size
    before the model, which costs the same per step but has fewer unknowns (returns the upsampled batch).
    ``normalized`` measures each BN's mismatch in its own standardised units,
    ||(mu_l - rm_l) / sqrt(rv_l)|| + ||var_l / rv_l - 1||, so every layer weighs alike whatever its scale.
    The model is not modified (it runs in eval mode; gradients flow only to x). ``chunk`` synthesises the batch
    in independent groups of at most that many inputs (each matching the statistics on its own), which bounds
    the memory of the backward pass: 4 inputs at 224x224 through VGG-16 hold about 0.85 GB of activations.
    ``progress(stage, step, total)`` counts steps over all chunks.
    """
    kw = dict(num_classes=num_classes, iterations=iterations, lr=lr, bn_weight=bn_weight, tv_weight=tv_weight,
              l2_weight=l2_weight, jitter=jitter, device=device, resolution=resolution, balanced=balanced,
              normalized=normalized)
    if chunk is not None and 0 < chunk < batch_size:
        starts = list(range(0, batch_size, chunk))
        total = len(starts) * iterations

        def chunk_progress(i):
            return (lambda _s, d, _t: progress(stage, i * iterations + d, total)) if progress else None

        return torch.cat([_invert(model, input_shape, batch_size=min(chunk, batch_size - b), seed=seed * 1009 + b,
                                  progress=chunk_progress(i), **kw) for i, b in enumerate(starts)])
    return _invert(model, input_shape, batch_size=batch_size, seed=seed,
                   progress=(lambda _s, d, t: progress(stage, d, t)) if progress else None, **kw)


def bn_mismatch(a: torch.Tensor, bn: nn.Module, normalized: bool = False) -> torch.Tensor:
    """Deep Inversion's statistics loss for one BatchNorm fed ``a`` (N, C, ...): ||mu - rm|| + ||var - rv|| over
    channels (biased batch variance), or with ``normalized`` the same in units of the running standard deviation,
    ||(mu - rm) / sqrt(rv + eps)|| + ||var / (rv + eps) - 1||."""
    dims = [0] + list(range(2, a.dim()))
    mean, var = a.mean(dims), a.var(dims, unbiased=False)
    if normalized:
        inv = torch.rsqrt(bn.running_var + bn.eps)
        return torch.norm((mean - bn.running_mean) * inv, 2) + torch.norm(var * inv * inv - 1, 2)
    return torch.norm(mean - bn.running_mean, 2) + torch.norm(var - bn.running_var, 2)


def _invert(model: nn.Module, input_shape, *, num_classes, batch_size, iterations, lr, bn_weight, tv_weight,
            l2_weight, jitter, seed, device, progress, resolution, balanced, normalized) -> torch.Tensor:
    """One Deep-Inversion batch (see :func:`deep_inversion`)."""
    device = device or next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shape = tuple(input_shape)
    low = len(shape) == 3 and resolution is not None and 0 < int(resolution) < min(shape[1:])
    var_shape = (shape[0], int(resolution), int(resolution)) if low else shape
    x = torch.randn((batch_size, *var_shape), generator=gen).to(device).requires_grad_(True)

    def lift(v):
        return F.interpolate(v, size=shape[1:], mode="bilinear", align_corners=False) if low else v

    bns = [m for m in model.modules() if isinstance(m, BN_TYPES) and m.running_mean is not None]
    losses: list[torch.Tensor] = []

    def hook(mod, inp, _out):
        losses.append(bn_mismatch(inp[0], mod, normalized))

    handles = [m.register_forward_hook(hook) for m in bns]
    was_training = model.training
    model.eval()
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam([x], lr=lr, betas=(0.5, 0.9))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, iterations))
    try:
        with torch.no_grad():
            classes = num_classes or model(lift(x[:1])).shape[1]
        if balanced:
            targets = (torch.arange(batch_size) % classes)[torch.randperm(batch_size, generator=gen)].to(device)
        else:
            targets = torch.randint(classes, (batch_size,), generator=gen).to(device)
        losses.clear()
        with torch.enable_grad():
            for it in range(iterations):
                dx, dy = (torch.randint(-jitter, jitter + 1, (2,), generator=gen).tolist() if jitter else (0, 0))
                xl = lift(x)
                xj = torch.roll(xl, shifts=(dx, dy), dims=(-2, -1)) if xl.dim() == 4 else xl
                losses.clear()
                out = model(xj)
                # a model without BatchNorm has no statistics to match: targets (and priors) only
                bn_term = torch.stack(losses).sum() if losses else out.new_zeros(())
                loss = F.cross_entropy(out, targets) + bn_weight * bn_term
                if xj.dim() == 4 and tv_weight:
                    tv = (xj[..., 1:, :] - xj[..., :-1, :]).norm() + (xj[..., :, 1:] - xj[..., :, :-1]).norm()
                    loss = loss + tv_weight * tv
                if l2_weight:
                    loss = loss + l2_weight * xj.norm()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if progress:
                    progress("dir", it + 1, iterations)
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
        model.train(was_training)
    with torch.no_grad():
        return lift(x.detach())
