"""Repairing activation statistics after a fold: the repair registry and the operations it uses.

Each repair is a :class:`Repair` with three hooks that :func:`foldviz.surgery.compress` calls: ``prepare`` (before
clustering: fuse BatchNorms, synthesise inputs), ``bn_scales`` (per group, while merging: variance corrections of
the merged channels' BatchNorms) and ``finish`` (after every merge: re-estimate statistics). ``REPAIRS`` maps the
plan's ``repair`` key to its behaviour; labels and descriptions live in :mod:`foldviz.methods`.

- ``fuse_batchnorms``: fold each BatchNorm's running statistics into the conv/linear that feeds it, so that the
  producer emits standardised channels (the basis of Fold-AR). The function is unchanged.
- ``reset_bn_stats``: recompute every BatchNorm's running statistics on a batch of inputs (Fold-R with real data,
  Fold-DIR with synthetic data).
- ``deep_inversion``: synthesise inputs from a trained model by matching its BatchNorm statistics (Fold-DIR).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .groups import _BN, _CONV
from .utils import Progress


def _bn_producers(dg, model: nn.Module) -> dict[nn.Module, nn.Module]:
    """Map each BatchNorm to the conv/linear whose output it normalises, when that output feeds only the BN."""
    pairs = {}
    for mod, node in dg.module2node.items():
        if not isinstance(mod, _BN) or len(node.inputs) != 1:
            continue
        prod = node.inputs[0].module
        if not isinstance(prod, (nn.Linear,) + _CONV) or len(node.inputs[0].outputs) != 1:
            continue
        out_ch = prod.out_features if isinstance(prod, nn.Linear) else prod.out_channels
        if out_ch == mod.num_features and mod.track_running_stats and mod.running_var is not None:
            pairs[mod] = prod
    return pairs


@torch.no_grad()
def fuse_batchnorms(model: nn.Module, dg) -> tuple[dict[str, str], set[str]]:
    """Fuse BN statistics into producers in place; returns ({bn_name: producer_name}, producers that had a bias).

    After fusion the producer computes (W x + b - mu) / sqrt(var + eps), and the BN keeps gamma, beta with
    running_mean = 0 and running_var = 1 - eps, so it applies exactly gamma * y + beta.
    """
    names = {m: n for n, m in model.named_modules()}
    fused, biased = {}, set()
    for bn, prod in _bn_producers(dg, model).items():
        if prod.bias is not None:
            biased.add(names[prod])
        inv = torch.rsqrt(bn.running_var.double() + bn.eps)
        shape = (-1,) + (1,) * (prod.weight.dim() - 1)
        prod.weight.copy_((prod.weight.double() * inv.view(shape)).to(prod.weight.dtype))
        bias = prod.bias.double() if prod.bias is not None else torch.zeros_like(inv)
        new_bias = ((bias - bn.running_mean.double()) * inv).to(prod.weight.dtype)
        if prod.bias is None:
            prod.bias = nn.Parameter(new_bias)
        else:
            prod.bias.copy_(new_bias)
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)
        fused[names[bn]] = names[prod]
    return fused, biased


@torch.no_grad()
def absorb_fused_biases(model: nn.Module, fused: dict[str, str], biased: set[str]) -> None:
    """Undo the bias that fusion added: with running stats (0, 1 - eps) the BN is the affine map gamma*y + beta,
    so gamma*b moves exactly into beta. Producers listed in ``biased`` had a bias of their own and keep it."""
    mods = dict(model.named_modules())
    for bn_name, prod_name in fused.items():
        bn, prod = mods[bn_name], mods[prod_name]
        if prod_name in biased or prod.bias is None or not bn.affine:
            continue
        bn.bias.add_(bn.weight * prod.bias)
        prod.bias = None


@torch.no_grad()
def reset_bn_stats(model: nn.Module, inputs: torch.Tensor | Iterable[torch.Tensor], *, batch_size: int = 256,
                   progress: Progress = None) -> int:
    """Recompute BatchNorm running statistics from ``inputs`` (a tensor or an iterable of batches).

    Only the BatchNorm layers run in training mode (dropout stays off), each accumulating an exact cumulative
    average (momentum=None). Returns the number of samples seen.
    """
    bns = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not bns:
        return 0
    device = next(model.parameters()).device
    batches = list(inputs.split(batch_size)) if torch.is_tensor(inputs) else list(inputs)
    if not batches:
        raise ValueError("BatchNorm repair needs at least one batch of inputs")
    saved = [(m, m.momentum) for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    seen = 0
    try:
        for i, xb in enumerate(batches):
            if xb.shape[0] < 2:
                continue
            model(xb.to(device))
            seen += xb.shape[0]
            if progress:
                progress("repair", i + 1, len(batches))
    finally:
        for m, mom in saved:
            m.momentum = mom
        model.eval()
    if seen == 0:
        raise ValueError("BatchNorm repair needs batches of at least 2 samples")
    return seen


def dir_defaults(input_shape) -> dict:
    """Deep-Inversion settings scaled to the input size (small inputs converge in a few hundred steps)."""
    h = input_shape[-1]
    if h <= 16:
        return {"batch_size": 128, "iterations": 100, "lr": 0.1, "bn_weight": 1.0, "tv_weight": 1e-4,
                "l2_weight": 1e-5, "jitter": 1}
    if h <= 64:
        return {"batch_size": 256, "iterations": 500, "lr": 0.1, "bn_weight": 1.0, "tv_weight": 2.5e-5,
                "l2_weight": 0.0, "jitter": 2}
    return {"batch_size": 64, "iterations": 1000, "lr": 0.2, "bn_weight": 0.05, "tv_weight": 1e-4,
            "l2_weight": 1e-5, "jitter": 30}


def deep_inversion(model: nn.Module, input_shape, *, num_classes: int | None = None, batch_size: int = 256,
                   iterations: int = 200, lr: float = 0.1, bn_weight: float = 1.0, tv_weight: float = 1e-4,
                   l2_weight: float = 1e-5, jitter: int = 1, seed: int = 0, device=None,
                   progress: Progress = None) -> torch.Tensor:
    """Synthesise ``batch_size`` inputs whose per-layer batch statistics match the model's BatchNorm statistics.

    Loss = CE(f(x), random targets) + bn_weight * sum_l (||mu_l - running_mean_l|| + ||var_l - running_var_l||)
    + tv_weight * total variation + l2_weight * ||x||, optimised with Adam on randomly jittered copies of x.
    The model is not modified (it runs in eval mode; gradients flow only to x).
    """
    device = device or next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn((batch_size, *input_shape), generator=gen).to(device).requires_grad_(True)
    bns = [m for m in model.modules() if isinstance(m, _BN) and m.running_mean is not None]
    losses: list[torch.Tensor] = []

    def hook(mod, inp, _out):
        a = inp[0]
        dims = [0] + list(range(2, a.dim()))
        mean = a.mean(dims)
        var = a.var(dims, unbiased=False)
        losses.append(torch.norm(mean - mod.running_mean, 2) + torch.norm(var - mod.running_var, 2))

    handles = [m.register_forward_hook(hook) for m in bns]
    was_training = model.training
    model.eval()
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam([x], lr=lr, betas=(0.5, 0.9))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, iterations))
    with torch.no_grad():
        logits = model(x)
    classes = num_classes or logits.shape[1]
    targets = torch.randint(classes, (batch_size,), generator=gen).to(device)
    try:
        with torch.enable_grad():
            for it in range(iterations):
                dx, dy = (torch.randint(-jitter, jitter + 1, (2,), generator=gen).tolist() if jitter else (0, 0))
                xj = torch.roll(x, shifts=(dx, dy), dims=(-2, -1)) if x.dim() == 4 else x
                losses.clear()
                out = model(xj)
                loss = F.cross_entropy(out, targets) + bn_weight * torch.stack(losses).sum()
                if x.dim() == 4 and tv_weight:
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
    return x.detach()


def ar_scale(rows: torch.Tensor, labels: np.ndarray, k: int) -> torch.Tensor:
    """Fold-AR variance correction per cluster: s_c = N_c / ||sum of unit-normalised member rows||.

    Equals sqrt(N_c / (1 + (N_c - 1) E[c])) with E[c] the mean pairwise cosine of the members (folding-spec §5.3):
    1 for identical members, sqrt(N_c) for orthogonal ones. ``rows`` is (n, d), ordered by group channel.
    """
    u = rows.reshape(rows.shape[0], -1).double()
    u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)
    lab = torch.as_tensor(labels)
    sums = torch.zeros(k, u.shape[1], dtype=u.dtype).index_add_(0, lab, u)
    sizes = torch.bincount(lab, minlength=k).double()
    norms = sums.norm(dim=1)
    return torch.where(norms > 1e-12, sizes / norms.clamp_min(1e-12), sizes.sqrt()).float()


# ----------------------------------------------------------------------------------------------------------------
# the registry
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class RepairContext:
    """What a repair's hooks may read and keep during one compression."""

    original: nn.Module            # the input model (never modified)
    work: nn.Module                # the working copy being folded
    dg: object                     # its Torch-Pruning dependency graph
    example_input: torch.Tensor
    plan: object                   # foldviz.plans.FoldPlan
    device: torch.device
    repair_data: torch.Tensor | None = None
    num_classes: int | None = None
    progress: Progress = None
    fused: dict[str, str] = field(default_factory=dict)    # BN name -> producer it was fused into
    biased: set[str] = field(default_factory=set)          # producers that had a bias before fusion
    synthetic: torch.Tensor | None = None                  # Fold-DIR's synthesised batch
    channel_maps: dict[str, np.ndarray] = field(default_factory=dict)  # module -> new index of each channel
    samples: int = 0                                       # inputs used to re-estimate statistics
    seconds: dict[str, float] = field(default_factory=dict)


class Repair:
    """No repair (Fold-Naive): merge only. Subclasses override the hooks they need."""

    key = "none"
    needs_data = False        # needs real inputs (``repair_data``)
    feature_space = "raw"     # features the fold clusters in (foldviz.features.FEATURE_SPACES)

    def prepare(self, ctx: RepairContext) -> None:
        """Before clustering, on the unmerged working copy."""

    def bn_scales(self, ctx: RepairContext, group, labels: np.ndarray, k: int) -> dict[str, torch.Tensor]:
        """Per merged group, right before it merges: {BatchNorm name: (k,) factor for gamma of each cluster}."""
        return {}

    def finish(self, ctx: RepairContext) -> None:
        """After every group is merged and shrunk."""


class BNReset(Repair):
    """Fold-R: recompute every BatchNorm's statistics on real inputs."""

    key, needs_data = "r", True

    def finish(self, ctx):
        data = ctx.repair_data
        if data is None:
            raise ValueError("Fold-R (and REPAIR for pruning) needs repair data: pass a batch of real inputs")
        samples = ctx.plan.repair_settings.get("samples")
        data = data[:samples] if samples and torch.is_tensor(data) else data
        ctx.samples = reset_bn_stats(ctx.work, data, batch_size=ctx.plan.repair_settings.get("batch_size", 256),
                                     progress=ctx.progress)


class DeepInversionRepair(BNReset):
    """Fold-DIR: recompute BatchNorm statistics on inputs synthesised from the unfolded model."""

    key, needs_data = "dir", False

    def prepare(self, ctx):
        settings = {**dir_defaults(tuple(ctx.example_input.shape[1:])), **ctx.plan.repair_settings}
        settings.pop("samples", None)
        # the working copy is still identical to the input model here
        ctx.synthetic = deep_inversion(ctx.work, tuple(ctx.example_input.shape[1:]), num_classes=ctx.num_classes,
                                       seed=ctx.plan.seed, device=ctx.device, progress=ctx.progress, **settings)
        ctx.repair_data = ctx.synthetic


class FoldAR(Repair):
    """Fold-AR: fuse BatchNorms into their producers, cluster robust-scaled fused features, and rescale each
    merged channel's gamma by the AR factor of its cluster (variance of a mean of correlated unit-variance
    channels)."""

    key, feature_space = "ar", "fused"

    def prepare(self, ctx):
        ctx.fused, ctx.biased = fuse_batchnorms(ctx.work, ctx.dg)

    def bn_scales(self, ctx, group, labels, k):
        modules = dict(ctx.work.named_modules())
        scales = {}
        for mem in group.members:
            if mem.side == "out" and mem.module in ctx.fused:
                prod = modules[ctx.fused[mem.module]]
                order = np.argsort(np.asarray(mem.root_idxs), kind="stable")
                idx = torch.as_tensor(np.asarray(mem.idxs)[order], device=prod.weight.device)
                scales[mem.module] = ar_scale(prod.weight.detach().index_select(0, idx).cpu(), labels, k)
        return scales

    def finish(self, ctx):
        absorb_fused_biases(ctx.work, ctx.fused, ctx.biased)


REPAIRS: dict[str, Repair] = {r.key: r for r in (Repair(), BNReset(), FoldAR(), DeepInversionRepair())}
