"""Repairing activation statistics after a fold: the repair registry and the operations it uses.

Each repair is a :class:`Repair` with three hooks that :func:`foldviz.surgery.compress` calls: ``prepare`` (before
clustering: fuse BatchNorms, synthesise inputs), ``bn_scales`` (per group, while merging: variance corrections of
the merged channels' BatchNorms) and ``finish`` (after every merge: re-estimate statistics). ``REPAIRS`` maps the
plan's ``repair`` key to its behaviour; labels and descriptions live in :mod:`foldviz.methods`.

- ``fuse_batchnorms``: fold each BatchNorm's running statistics into the conv/linear that feeds it, so that the
  producer emits standardised channels (the basis of Fold-AR). The function is unchanged.
- ``reset_bn_stats``: recompute every BatchNorm's running statistics on a batch of inputs (Fold-R with real data,
  Fold-DIR with synthetic data).
- Fold-DIR synthesises its inputs with :func:`foldviz.synth.deep_inversion`.
- ``ar_group_scales``: the authors' Fold-AR correction (one factor per cluster from the whole group's vectors).
- ``dfr_finish``: Fold-DFR, data-free REPAIR (the default): re-estimates every BN from the original model's
  running statistics, corrected by what folding changed on a cheap proxy batch (``proxy_batch``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
from torch import nn

from .features import group_features
from .groups import BN_TYPES, CONV_TYPES, build_dependency_graph
from .metrics import channel_axis
from .synth import deep_inversion
from .utils import Progress


def _bn_producers(dg, model: nn.Module) -> dict[nn.Module, nn.Module]:
    """Map each BatchNorm to the conv/linear whose output it normalises, when that output feeds only the BN."""
    pairs = {}
    for mod, node in dg.module2node.items():
        if not isinstance(mod, BN_TYPES) or len(node.inputs) != 1:
            continue
        prod = node.inputs[0].module
        if not isinstance(prod, (nn.Linear,) + CONV_TYPES) or len(node.inputs[0].outputs) != 1:
            continue
        out_ch = prod.out_features if isinstance(prod, nn.Linear) else prod.out_channels
        if out_ch == mod.num_features and mod.track_running_stats and mod.running_var is not None:
            pairs[mod] = prod
    return pairs


@torch.no_grad()
def fuse_batchnorms(model: nn.Module, dg, only: set[str] | None = None) -> tuple[dict[str, str], set[str]]:
    """Fuse BN statistics into producers in place (only the BNs named in ``only``, if given); returns
    ({bn_name: producer_name}, producers that had a bias).

    After fusion the producer computes (W x + b - mu) / sqrt(var + eps), and the BN keeps gamma, beta with
    running_mean = 0 and running_var = 1 - eps, so it applies exactly gamma * y + beta.
    """
    names = {m: n for n, m in model.named_modules()}
    fused, biased = {}, set()
    for bn, prod in _bn_producers(dg, model).items():
        if only is not None and names[bn] not in only:
            continue
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


def linear_bns(model: nn.Module, groups) -> set[str]:
    """Names of the BatchNorms in ``groups`` whose producers are all Linear layers (BatchNorm1d after a hidden FC
    layer): the layers Fold-DFR merges in the BN-fused space."""
    mods = dict(model.named_modules())
    out: set[str] = set()
    for g in groups:
        weighted = [mods[p] for p in g.producers if isinstance(mods.get(p), (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
        if weighted and all(isinstance(m, nn.Linear) for m in weighted):
            out |= {m.module for m in g.members if m.side == "out" and isinstance(mods.get(m.module), BN_TYPES)}
    return out


@torch.no_grad()
def unfuse_biases(model: nn.Module, fused: dict[str, str], biased: set[str]) -> None:
    """After the BN statistics were re-estimated on a fused model: move each fused producer's bias b into its BN's
    running mean (BN(y + b) with mean m equals BN(y) with mean m - b, exactly) and drop the bias again, unless
    the producer had one of its own."""
    mods = dict(model.named_modules())
    for bn_name, prod_name in fused.items():
        bn, prod = mods[bn_name], mods[prod_name]
        if prod_name in biased or prod.bias is None:
            continue
        bn.running_mean.sub_(prod.bias.detach().to(bn.running_mean.dtype))
        prod.bias = None


@torch.no_grad()
def reset_bn_stats(model: nn.Module, inputs: torch.Tensor | Iterable[torch.Tensor], *, batch_size: int = 256,
                   progress: Progress = None) -> int:
    """Recompute BatchNorm running statistics from ``inputs`` (a tensor or an iterable of batches).

    Only the BatchNorm layers run in training mode (dropout stays off), each accumulating an exact cumulative
    average (momentum=None). Returns the number of samples seen.
    """
    bns = [m for m in model.modules() if isinstance(m, BN_TYPES) and m.track_running_stats]
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
    """Deep-Inversion settings scaled to the input size, sized so a CPU fold finishes in minutes (a plan's
    ``repair_settings`` override them)."""
    h = input_shape[-1]
    if h <= 16:
        return {"batch_size": 128, "iterations": 100, "lr": 0.1, "bn_weight": 1.0, "tv_weight": 1e-4,
                "l2_weight": 1e-5, "jitter": 1}
    if h <= 64:  # 128 x 100 steps: ~2.6 s per step for a CIFAR ResNet-18 on 2 CPU cores, so minutes, not 50 min
        return {"batch_size": 128, "iterations": 100, "lr": 0.1, "bn_weight": 1.0, "tv_weight": 2.5e-5,
                "l2_weight": 0.0, "jitter": 2}
    return {"batch_size": 64, "iterations": 1000, "lr": 0.2, "bn_weight": 0.05, "tv_weight": 1e-4,
            "l2_weight": 1e-5, "jitter": 30}


SCALE_BLOCK_BYTES = 32 * 1024 * 1024


def cluster_scale(vectors: torch.Tensor, labels, k: int) -> torch.Tensor:
    """AR variance correction per cluster, s_c = sqrt(N_c / (1 + (N_c - 1) E[c])) = N_c / ||sum_i u_i||.

    ``vectors`` (n, d): one vector per channel; u_i = v_i / ||v_i||; E[c] = mean uncentred cosine over ordered pairs
    i != j of cluster c. Singletons give 1, identical members 1, mutually orthogonal members sqrt(N_c).
    """
    v = vectors.reshape(vectors.shape[0], -1).cpu()
    lab = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    # float64 one column block at a time: a 4096 x 29k classifier group never gets a float64 copy
    step = max(1, SCALE_BLOCK_BYTES // (8 * max(1, v.shape[0])))
    blocks = [slice(j, j + step) for j in range(0, v.shape[1], step)]
    inv = sum(v[:, b].double().pow(2).sum(1) for b in blocks).sqrt().clamp_min(1e-12).reciprocal()
    sq = torch.zeros(k, dtype=torch.float64)
    for b in blocks:  # ||sum_i u_i||^2, accumulated over column blocks
        u = v[:, b].double() * inv[:, None]
        sq += torch.zeros(k, u.shape[1], dtype=torch.float64).index_add_(0, lab, u).pow(2).sum(1)
    sizes = torch.bincount(lab, minlength=k).double()
    norms = sq.sqrt()
    return torch.where(norms > 1e-12, sizes / norms.clamp_min(1e-12), sizes.sqrt()).float()


def ar_group_scales(work: nn.Module, group, labels, k: int) -> dict[str, torch.Tensor]:
    """The authors' (HEAD) Fold-AR scale: one s_c per cluster from the group's WHOLE unscaled feature vectors
    (fused producer rows, fused biases, BN gamma and beta, consumer columns; running stats excluded), applied
    to gamma of every BN of the group. It is read on the unmerged model (the authors' code reads consumer columns
    already merged by earlier groups; with concatenations those indices shift, so foldviz does not).

    Returns {bn_name: (k,) scale}; ``surgery.GroupSurgery.apply`` multiplies the merged BN's gamma by it.
    """
    modules = dict(work.named_modules())
    bns = [m.module for m in group.members if m.side == "out" and isinstance(modules.get(m.module), BN_TYPES)]
    if not bns:  # nothing to rescale (e.g. VGG's hidden FC groups): skip reading the group's features
        return {}
    s = cluster_scale(group_features(work, group, scale=False), labels, k)
    return dict.fromkeys(bns, s)


def ar_fanin_scales(work: nn.Module, group, labels, k: int, fused: dict[str, str]) -> dict[str, torch.Tensor]:
    """Earlier foldviz estimate (the first "ar"): per BN, E[c] from that BN's own fused producer rows only."""
    modules = dict(work.named_modules())
    out = {}
    for mem in group.members:
        if mem.side == "out" and mem.module in fused:
            prod = modules[fused[mem.module]]
            order = np.argsort(np.asarray(mem.root_idxs), kind="stable")
            rows = prod.weight.detach().index_select(0, torch.as_tensor(np.asarray(mem.idxs)[order],
                                                                        device=prod.weight.device))
            out[mem.module] = cluster_scale(rows, labels, k)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Fold-DFR: data-free REPAIR by relative re-estimation on a proxy batch
# ---------------------------------------------------------------------------------------------------------------
# proxy settings (kind, samples, steps, proxy seed, resolution) live in foldviz.proxy.PROXY_DEFAULTS; a plan's
# repair_settings override them; these are the repair's own switches
DFR_DEFAULTS = {"proxy": "di", "samples": 32, "sequential": True, "linear_repair": True, "calibration": "members",
                "proxy_steps": 30, "proxy_seed": 0, "proxy_resolution": None, "lr": 0.25, "balanced": False,
                "normalized": True}
def _layers_without_bn(model: nn.Module) -> list[str]:
    """Conv/linear layers whose next module (in definition order) is not a BatchNorm: nothing re-normalises them."""
    named = [(n, m) for n, m in model.named_modules() if n]
    out = []
    for i, (n, m) in enumerate(named):
        if isinstance(m, (nn.Linear,) + CONV_TYPES):
            nxt = named[i + 1][1] if i + 1 < len(named) else None
            if not isinstance(nxt, BN_TYPES):
                out.append(n)
    return out


@torch.no_grad()
def _output_stats(model: nn.Module, layers: list[str], x: torch.Tensor) -> dict:
    mods = dict(model.named_modules())
    stats: dict = {}
    def make(name):
        def hook(m, _i, out):
            ax = channel_axis(m, out)
            if ax is not None:  # returns None: the output is not replaced
                stats.setdefault(name, _bn_input_stats(out.movedim(ax, 1)))
        return hook

    _forward_with(model, x, [mods[n].register_forward_hook(make(n)) for n in layers if n in mods])
    return stats


@torch.no_grad()
def _forward_with(model: nn.Module, x: torch.Tensor, handles: list) -> None:
    """One eval-mode forward pass of ``x`` with hooks ``handles`` installed; removes them and restores the mode."""
    was = model.training
    model.eval()
    try:
        model(x.to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        model.train(was)


def proxy_batch(input_shape, n: int = 256, *, kind: str = "noise", seed: int = 0, model: nn.Module | None = None,
                num_classes: int | None = None, progress: Progress = None, **settings) -> torch.Tensor:
    """A deterministic proxy input batch (no data): "noise" = N(0, 1) in the model's (normalised) input space;
    "smooth" = the same noise blurred spatially (3x3 box, twice) and re-standardised, so neighbouring pixels
    correlate as in images; "di" = a short Deep Inversion from noise (needs ``model``; "di20" = 20 steps).
    ``settings``: further :data:`foldviz.proxy.PROXY_DEFAULTS` keys. Deep-Inversion batches are reused from
    memory or the persistent cache (:func:`foldviz.proxy.get_proxy`)."""
    from .proxy import get_proxy, proxy_spec

    spec = proxy_spec(tuple(input_shape), {**settings, "proxy": kind, "samples": int(n), "proxy_seed": int(seed)},
                      num_classes=num_classes)
    if spec.kind == "di" and model is None:
        raise ValueError("a Deep-Inversion proxy needs the model")
    x, _info = get_proxy(model if model is not None else nn.Identity(), spec, progress=progress)
    return x


def _bn_input_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, unbiased variance) of a BN input, returned in float64; reduced in the input's dtype so
    that no float64 copy of a large activation is made."""
    dims = [0] + list(range(2, x.dim()))
    var, mean = torch.var_mean(x.detach(), dims, correction=1)
    return mean.double(), var.double()


@torch.no_grad()
def bn_proxy_stats(model: nn.Module, proxy: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per BN: (mean, var) of its input channels on ``proxy`` (model in eval mode, first call of each BN)."""
    stats: dict = {}
    names = {m: n for n, m in model.named_modules()}

    def hook(mod, inp):
        stats.setdefault(names[mod], _bn_input_stats(inp[0]))

    _forward_with(model, proxy, [m.register_forward_pre_hook(hook) for m in model.modules()
                                 if isinstance(m, BN_TYPES) and m.track_running_stats and m.running_var is not None])
    return stats


@torch.no_grad()
def _cluster_ratios(original: nn.Module, x: torch.Tensor, channel_maps: dict[str, np.ndarray]) -> dict:
    """Per merged BN: data-to-proxy variance ratio of each cluster's sum, Var(sum s_i z_i) / Var(sum z_i) with
    s_i = sqrt(RV_i / v_o[i]), z the original's BN inputs on the proxy (see ``dfr_finish(calibration="cov")``)."""
    out: dict = {}
    names = {m: n for n, m in original.named_modules()}

    def hook(mod, inp):
        name = names[mod]
        cmap = channel_maps.get(name)
        if name in out or cmap is None or (cmap == np.arange(len(cmap))).all():
            return
        a = inp[0].detach().double().transpose(0, 1).reshape(inp[0].shape[1], -1)   # (C, samples x positions)
        a = a - a.mean(1, keepdim=True)
        s = (mod.running_var.double().cpu() / a.var(1).cpu().clamp_min(1e-30)).sqrt().to(a.device)
        keep = torch.as_tensor(cmap >= 0)
        size = int(cmap.max()) + 1
        idx = torch.as_tensor(cmap, dtype=torch.long)[keep].to(a.device)
        pool = torch.zeros(size, a.shape[1], dtype=a.dtype, device=a.device)
        den = pool.clone().index_add_(0, idx, a[keep.to(a.device)]).var(1)
        num = pool.index_add_(0, idx, (s[:, None] * a)[keep.to(a.device)]).var(1)
        out[name] = torch.where(den > 1e-30, num / den.clamp_min(1e-30), torch.full_like(den, float("nan"))).cpu()

    _forward_with(original, x, [m.register_forward_pre_hook(hook) for m in original.modules()
                                if isinstance(m, BN_TYPES) and m.track_running_stats and m.running_var is not None])
    return out


def _pooled(values: torch.Tensor, cmap: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of ``values`` over the original channels mapped to each folded channel, and the member counts."""
    keep = torch.as_tensor(cmap >= 0)
    idx = torch.as_tensor(cmap, dtype=torch.long)[keep]
    v = values.double().cpu()[keep]
    return (torch.zeros(size, dtype=torch.float64).index_add_(0, idx, v),
            torch.zeros(size, dtype=torch.float64).index_add_(0, idx, torch.ones_like(v)))


@torch.no_grad()
def dfr_finish(original: nn.Module, work: nn.Module, channel_maps: dict[str, np.ndarray], input_shape, *, seed: int = 0,
               proxy: str | torch.Tensor = "di", samples: int = 64, sequential: bool = True,
               linear_repair: bool = True, num_classes: int | None = None, proxy_model: nn.Module | None = None,
               calibration: str = "members", **proxy_settings) -> dict:
    """Fold-DFR: set every BN of the folded ``work`` model from the ORIGINAL model's running statistics,
    corrected by how folding changed that BN's input on a proxy batch. For folded channel c of a BN with
    original members i in c (from ``channel_maps``; identity for unfolded BNs), with RM/RV the original running
    stats, (m_o, v_o) the original's proxy input stats and (m_f, v_f) the folded model's:

        running_var_c  = v_f[c] * sum_i RV_i / sum_i v_o[i]        (proxy-to-data calibration of the members)
        running_mean_c = m_f[c] + mean_i (RM_i - m_o[i])

    With ``sequential`` (default) the BNs are reset in one forward pass of the folded model in topological order
    (forward pre-hooks), so each BN sees its inputs already corrected upstream. Collapse (merged producers) and
    explosion (summed consumers, residual adds) are handled alike. ``calibration="cov"`` (research) replaces the
    members' variance sum by the variance of the cluster's sum, each member rescaled to its data variance, on the
    original's proxy activations: Var(sum_i sqrt(RV_i / v_o[i]) z_i) / Var(sum_i z_i), which keeps the proxy's
    correlations between members. ``proxy`` is the batch itself, or a kind for
    :func:`proxy_batch` (synthesised from ``proxy_model``, default ``original``, with ``seed``, ``samples`` and
    ``proxy_settings``). Returns {"proxy": kind, "samples": n, "bns": count}.
    """
    dev = next(work.parameters()).device
    if torch.is_tensor(proxy):
        x, kind = proxy, "given"
    else:
        x = proxy_batch(tuple(input_shape), samples, kind=proxy, seed=seed, num_classes=num_classes,
                        model=proxy_model if proxy_model is not None else original, **proxy_settings)
        kind = proxy
    x = x.to(dev)
    ref = bn_proxy_stats(original, x.to(next(original.parameters()).device))
    if calibration not in ("members", "cov"):
        raise ValueError(f"unknown Fold-DFR calibration {calibration!r}; choose members or cov")
    ratios = _cluster_ratios(original, x, channel_maps) if calibration == "cov" else {}
    orig_mods = dict(original.named_modules())
    names = {m: n for n, m in work.named_modules()}
    done: set[str] = set()

    def correct(name: str, mod: nn.Module, m_f: torch.Tensor, v_f: torch.Tensor) -> None:
        if name in done or name not in ref or name not in orig_mods:
            return
        done.add(name)
        o = orig_mods[name]
        m_o, v_o = ref[name]
        size = mod.running_var.numel()
        cmap = channel_maps.get(name)
        if cmap is None:
            if size != len(v_o):
                return
            cmap = np.arange(size)
        rv, cnt = _pooled(o.running_var, cmap, size)
        vo, _ = _pooled(v_o, cmap, size)
        dm, _ = _pooled(o.running_mean.double().cpu() - m_o.cpu(), cmap, size)
        cnt = cnt.clamp_min(1)
        ok = vo > 1e-12 * rv.clamp_min(1e-30)
        var = torch.where(ok, v_f.cpu() * rv / vo.clamp_min(1e-30), rv / cnt)
        if name in ratios and len(ratios[name]) == size:
            var = torch.where(ok & torch.isfinite(ratios[name]), v_f.cpu() * ratios[name], var)
        mean = m_f.cpu() + dm / cnt
        mod.running_var.copy_(var.clamp_min(0).to(mod.running_var.dtype))
        mod.running_mean.copy_(mean.to(mod.running_mean.dtype))

    bns = [m for m in work.modules() if isinstance(m, BN_TYPES) and m.track_running_stats and m.running_var is not None]
    bare = _layers_without_bn(work) if linear_repair else []
    goals = _output_stats(original, bare, x) if bare else {}
    was = work.training
    work.eval()
    if sequential:
        def hook(mod, inp):
            correct(names[mod], mod, *_bn_input_stats(inp[0]))

        def out_hook(mod, _inp, out):  # REPAIR for a layer with no BN after it: match the members' proxy stats
            name = names[mod]
            if name in done or name not in goals:
                return None
            done.add(name)
            ax = channel_axis(mod, out)  # a Linear on tokens (N, L, C) has its channels last
            if ax is None:
                return None
            m_f, v_f = _bn_input_stats(out.movedim(ax, 1))
            m_o, v_o = goals[name]
            size = m_f.numel()
            cmap = channel_maps.get(name, np.arange(size))
            mo, cnt = _pooled(m_o, cmap, size)
            vo, _ = _pooled(v_o, cmap, size)
            cnt = cnt.clamp_min(1)
            a = torch.where(v_f.cpu() > 1e-12, (vo / cnt / v_f.cpu().clamp_min(1e-30)).sqrt(), torch.ones_like(vo))
            shift = mo / cnt - a * m_f.cpu()
            shape = (-1,) + (1,) * (mod.weight.dim() - 1)
            mod.weight.mul_(a.to(mod.weight).view(shape))
            b = mod.bias.double().cpu() if mod.bias is not None else torch.zeros_like(a)
            new_b = (a * b + shift).to(mod.weight)
            if mod.bias is None:
                mod.bias = nn.Parameter(new_b, requires_grad=False)
            else:
                mod.bias.copy_(new_b)
            view = [1] * out.dim()
            view[ax] = -1
            return out * a.to(out).view(view) + shift.to(out).view(view)

        handles = [m.register_forward_pre_hook(hook) for m in bns]
        handles += [dict(work.named_modules())[n].register_forward_hook(out_hook) for n in bare]
        try:
            work(x)
        finally:
            for h in handles:
                h.remove()
    else:
        folded = bn_proxy_stats(work, x)
        for m in bns:
            if names[m] in folded:
                correct(names[m], m, *folded[names[m]])
    work.train(was)
    return {"proxy": kind, "samples": int(x.shape[0]), "bns": len(done)}


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
    folded: list = field(default_factory=list)             # the ChannelGroups this compression folds
    unit_maps: dict[str, np.ndarray] = field(default_factory=dict)  # group -> new index of each unit (-1 removed),
    #                                                        known once every group is decided (before the merge)
    calibration: dict | None = None                        # language models: foldviz.lm.calib.unit_input_stats of
    #                                                        the unmerged model on repair_data (computed once)
    scores: dict = field(default_factory=dict)             # importance key -> {group id: (units,) scores}
    proxy: dict | None = None                              # Fold-DFR: foldviz.proxy.ProxyInfo.as_dict()


class Repair:
    """No repair (Fold-Naive): merge only. Subclasses override the hooks they need."""

    key = "none"
    needs_data = False        # needs real inputs (``repair_data``)
    needs_original = False    # reads the unfolded model in ``finish`` (so a fold in place works on a copy anyway)
    feature_space = "raw"     # features the fold clusters in (foldviz.features.FEATURE_SPACES)

    def prepare(self, ctx: RepairContext) -> None:
        """Before clustering, on the unmerged working copy."""

    def bn_scales(self, ctx: RepairContext, group, labels: np.ndarray, k: int) -> dict[str, torch.Tensor]:
        """Per merged group, on the unmerged model: {BatchNorm name: (k,) factor for gamma of each cluster}."""
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
    """Fold-AR, as the authors' code does it: fuse BatchNorms into their producers, cluster robust-scaled fused
    features, and multiply gamma of every BatchNorm of a merged group by one factor per cluster,
    s_c = sqrt(N_c / (1 + (N_c - 1) E[c])), E[c] the mean cosine of the members' whole unscaled feature vectors
    read just before the group merges. ``estimate="fanin"`` is foldviz's earlier per-BN fan-in estimate (research).
    """

    key, feature_space = "ar", "fused"

    def __init__(self, estimate: str = "group"):
        if estimate not in ("group", "fanin"):
            raise ValueError(f"unknown Fold-AR estimate {estimate!r}")
        self.estimate = estimate

    def prepare(self, ctx):
        ctx.fused, ctx.biased = fuse_batchnorms(ctx.work, ctx.dg)

    def bn_scales(self, ctx, group, labels, k):
        if self.estimate == "fanin":
            return ar_fanin_scales(ctx.work, group, labels, k, ctx.fused)
        return ar_group_scales(ctx.work, group, labels, k)

    def finish(self, ctx):
        absorb_fused_biases(ctx.work, ctx.fused, ctx.biased)


class DataFreeRepair(Repair):
    """Fold-DFR (foldviz's data-free REPAIR, the default): after a plain merge, every BatchNorm is re-estimated from
    the original model's running statistics, corrected by what folding changed on a cheap synthetic proxy batch
    (see :func:`dfr_finish`); layers with no BatchNorm after them are rescaled the same way."""

    # BatchNorm1d layers after hidden FC layers are fused before their group merges (clustered robust-scaled, as
    # Fold-AR does), conv BNs are merged as they are: measured on the repair panel (README 3b), the fused space is
    # better for FC layers (digits-mlp 0.5: 91.0 % vs 82.0 %) and worse for convolutions (digits-resnet 0.5: 84.9 %
    # vs 91.7 %).
    key, feature_space = "dfr", "fused-linear"
    needs_original = True

    def __init__(self, **options):
        unknown = set(options) - set(DFR_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown Fold-DFR option(s) {sorted(unknown)}; known: {sorted(DFR_DEFAULTS)}")
        self.options = {**DFR_DEFAULTS, **options}
        self.explicit = set(options)  # options the caller chose (never scaled by foldviz.proxy.default_samples)

    def prepare(self, ctx):
        only = linear_bns(ctx.work, ctx.folded)
        if only:
            ctx.fused, ctx.biased = fuse_batchnorms(ctx.work, ctx.dg, only=only)

    def proxy_spec(self, input_shape, repair_settings: dict, num_classes: int | None = None):
        """The :class:`foldviz.proxy.ProxySpec` a fold with a plan's ``repair_settings`` uses (the plan's proxy
        settings over this repair's options). It does not depend on the plan's ratios, fused layers or seed."""
        from .proxy import PROXY_DEFAULTS, proxy_spec

        chosen = {k: v for k, v in repair_settings.items() if k in PROXY_DEFAULTS}  # what a plan may set
        settings = {**self.options, **chosen}
        if "samples" not in chosen and "samples" not in self.explicit:
            settings.pop("samples")  # proxy_spec scales the default sample count to the input size
        return proxy_spec(tuple(input_shape), settings, num_classes=num_classes)

    def proxy_for(self, ctx: RepairContext):
        """The proxy batch and its :class:`foldviz.proxy.ProxyInfo` for this fold, synthesised from the input
        model as given (unfused), so every fold of the model reuses it."""
        from .proxy import get_proxy

        spec = self.proxy_spec(tuple(ctx.example_input.shape[1:]), ctx.plan.repair_settings, ctx.num_classes)
        return get_proxy(ctx.original, spec, progress=ctx.progress, device=ctx.device)

    def finish(self, ctx):
        if not any((cmap != np.arange(len(cmap))).any() for cmap in ctx.channel_maps.values()):
            unfuse_biases(ctx.work, ctx.fused, ctx.biased)
            return  # nothing was folded: the statistics are already right
        x, info = self.proxy_for(ctx)
        ctx.proxy = info.as_dict()
        self.apply_proxy(ctx, x)

    def apply_proxy(self, ctx: RepairContext, x: torch.Tensor) -> None:
        """Re-estimate the merged ``ctx.work``'s statistics on proxy batch ``x`` (:func:`dfr_finish`)."""
        original = ctx.original  # never moved: a copy goes to the device when it is not there already
        if next(original.parameters()).device != ctx.device or ctx.fused:
            original = copy.deepcopy(original).to(ctx.device).eval()
        if ctx.fused:  # the reference statistics in the same (partly fused) space as the folded model
            fuse_batchnorms(original, build_dependency_graph(original, ctx.example_input), only=set(ctx.fused))
        res = dfr_finish(original, ctx.work, ctx.channel_maps, tuple(ctx.example_input.shape[1:]), proxy=x,
                         sequential=self.options["sequential"], linear_repair=self.options["linear_repair"],
                         calibration=self.options["calibration"], num_classes=ctx.num_classes)
        unfuse_biases(ctx.work, ctx.fused, ctx.biased)
        ctx.samples = res["samples"]


#: Fold + refit's defaults (benchmarks/results/lm_research.md: 64 self-generated sequences, ridge 1e-2). The sequence
#: length is the context length up to ``REFIT_MAX_SEQLEN`` (the measured demos have a context of 128; longer
#: contexts are capped so that generating and probing stay affordable on a CPU).
REFIT_DEFAULTS = {"samples": 64, "batch_size": 32, "ridge": 1e-2}  # batch 32: generation 3x faster than 8
REFIT_MAX_SEQLEN = 256


class SelfRefit(Repair):
    """Fold + refit, for language models (the LM default): after the merge, the original model samples
    ``samples`` sequences of its own (no outside data), and each folded output projection (``mlp.down_proj``,
    ``self_attn.o_proj``) is refitted by ridge least squares so that, on the same input, the folded sublayer
    reproduces the original sublayer's output (:func:`foldviz.lm.repair.refit_outputs`), layer by layer."""

    key = "refit"
    needs_original = True

    def finish(self, ctx):
        if not ctx.folded or not any((cmap != np.arange(len(cmap))).any() for cmap in ctx.channel_maps.values()):
            return  # nothing was folded
        from .lm.repair import refit_outputs, self_generate

        unknown = set(ctx.plan.repair_settings) - {"samples", "batch_size", "ridge", "seqlen"}
        if unknown:
            raise ValueError(f"Fold + refit does not take {', '.join(sorted(unknown))} in repair_settings; it takes "
                             "samples, batch_size, ridge and seqlen")
        opts = {**REFIT_DEFAULTS, **ctx.plan.repair_settings}
        context = int(getattr(ctx.original.config, "max_position_embeddings", REFIT_MAX_SEQLEN))
        seqlen = int(opts.get("seqlen") or min(context, REFIT_MAX_SEQLEN))
        original = ctx.original  # never modified: a copy goes to the device when it is not there already
        if next(original.parameters()).device != ctx.device:
            original = copy.deepcopy(original).to(ctx.device).eval()
        n = int(opts["samples"])
        if ctx.progress:
            ctx.progress("repair", 0, 2)
        tokens = self_generate(original, n, seqlen, seed=int(ctx.plan.seed), batch_size=int(opts["batch_size"]))
        if ctx.progress:
            ctx.progress("repair", 1, 2)
        refit_outputs(original, ctx.work, {g.id: None for g in ctx.folded}, tokens=tokens,
                      batch_size=int(opts["batch_size"]), ridge=float(opts["ridge"]))
        if ctx.progress:
            ctx.progress("repair", 2, 2)
        ctx.samples = n


class FlapBias(Repair):
    """FLAP's bias compensation, for language models pruned on calibration text (``repair_data``: token windows):
    each pruned output projection (``mlp.down_proj``, ``self_attn.o_proj``) gets the bias
    ``W[:, removed] @ mean(X[removed])`` (:func:`foldviz.lm.calib.flap_bias`), so the pruned sublayer equals the
    original whenever the removed inputs sit at their calibration mean. Architectures whose saved config cannot
    hold such a bias are refused before anything is pruned."""

    key, needs_data = "flap", True
    needs_original = True     # the bias reads the removed columns of the original projections

    def prepare(self, ctx):
        from .lm.calib import context_stats, require_output_bias

        blocks = {"mlp" if g.role == "mlp" else "self_attn" for g in ctx.folded}
        require_output_bias(ctx.work, blocks)
        if ctx.folded:
            context_stats(ctx)   # on the still unmerged working copy

    def finish(self, ctx):
        if not ctx.folded:
            return
        from .lm.calib import add_output_bias, context_stats, flap_bias

        maps = {g.id: ctx.unit_maps[g.id] for g in ctx.folded}
        add_output_bias(ctx.work, flap_bias(ctx.original, context_stats(ctx), maps))


REPAIRS: dict[str, Repair] = {r.key: r for r in (Repair(), BNReset(), FoldAR(), DeepInversionRepair(),
                                                  DataFreeRepair(), SelfRefit(), FlapBias())}
