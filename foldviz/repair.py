"""Repairing activation statistics after a fold.

- ``fuse_batchnorms``: fold each BatchNorm's running statistics into the conv/linear that feeds it, so that the
  producer emits standardised channels (the basis of Fold-AR). The function is unchanged.
- ``reset_bn_stats``: recompute every BatchNorm's running statistics on a batch of inputs (Fold-R with real data,
  Fold-DIR with synthetic data).
- ``deep_inversion``: synthesise inputs from a trained model by matching its BatchNorm statistics (Fold-DIR).
- Fold-AR (the authors' data-free approximate REPAIR): ``ar_prepare`` / ``ar_group_scales`` / ``ar_finish``.
- Fold-DFR (data-free REPAIR, the default): ``dfr_finish`` re-estimates every BN from the original model's
  running statistics, corrected by what folding changed on a cheap proxy batch (``proxy_batch``).
The hooks and the order ``fold.run`` calls them in are listed above ``ar_prepare`` below.
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

import torch
import torch.nn.functional as F
from torch import nn

from .groups import _BN, _CONV

Progress = Callable[[str, int, int], None] | None


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


# ================================================================================================================
# Data-free repairs plugged into foldviz.fold.run (issue #12).  The interface, in call order inside ``run``:
#
#   state = ar_prepare(work, dg)                        before clustering   (Fold-AR only: fuse BNs)
#   scales = ar_group_scales(work, group, labels, k)    per group, right before that group is merged (Fold-AR)
#   ar_finish(work, state)                              after all merges    (Fold-AR: undo the fused biases)
#   info = dfr_finish(original, work, channel_maps, seed=...)   after all merges (Fold-DFR)
#
# ``ar_fanin_scales`` is the earlier foldviz estimate (each BN's own fused producer rows), kept for comparison.
# ================================================================================================================
@torch.no_grad()
def ar_prepare(work: nn.Module, dg) -> dict:
    """Fold-AR step 1: fuse every BN into its producer (W/sigma, (b - mu)/sigma); BN keeps gamma, beta, stats (0, 1).

    Returns the state the later Fold-AR hooks need: ``{"fused": {bn: producer}, "biased": {producers with a bias}}``.
    """
    fused, biased = fuse_batchnorms(work, dg)
    return {"fused": fused, "biased": biased}


def cluster_scale(vectors: torch.Tensor, labels, k: int) -> torch.Tensor:
    """AR variance correction per cluster, s_c = sqrt(N_c / (1 + (N_c - 1) E[c])) = N_c / ||sum_i u_i||.

    ``vectors`` (n, d): one vector per channel; u_i = v_i / ||v_i||; E[c] = mean uncentred cosine over ordered pairs
    i != j of cluster c. Singletons give 1, identical members 1, mutually orthogonal members sqrt(N_c).
    """
    u = vectors.reshape(vectors.shape[0], -1).double().cpu()
    u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)
    lab = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    sums = torch.zeros(k, u.shape[1], dtype=u.dtype).index_add_(0, lab, u)
    sizes = torch.bincount(lab, minlength=k).double()
    norms = sums.norm(dim=1)
    return torch.where(norms > 1e-12, sizes / norms.clamp_min(1e-12), sizes.sqrt()).float()


def ar_group_scales(work: nn.Module, group, labels, k: int) -> dict[str, torch.Tensor]:
    """The authors' (HEAD) Fold-AR scale: one s_c per cluster from the group's WHOLE unscaled feature vectors
    (fused producer rows, fused biases, BN gamma and beta, consumer columns; running stats excluded), applied
    to gamma of every BN of the group. Call it just before the group is merged, on the current (partly folded)
    model, as the authors' code does: consumer columns already merged by earlier groups are read merged.

    Returns {bn_name: (k,) scale}; ``fold._Folder.apply`` multiplies the merged BN's gamma by it.
    """
    from .clustering import group_features_tensor

    modules = dict(work.named_modules())
    s = cluster_scale(group_features_tensor(work, group, scale=False), labels, k)
    return {m.module: s for m in group.members if m.side == "out" and isinstance(modules.get(m.module), _BN)}


def ar_fanin_scales(work: nn.Module, group, labels, k: int, state: dict) -> dict[str, torch.Tensor]:
    """Earlier foldviz estimate (pre-issue-#12 "ar"): per BN, E[c] from that BN's own fused producer rows only."""
    modules = dict(work.named_modules())
    out = {}
    for mem in group.members:
        if mem.side == "out" and mem.module in state["fused"]:
            prod = modules[state["fused"][mem.module]]
            order = np.argsort(np.asarray(mem.root_idxs), kind="stable")
            rows = prod.weight.detach().index_select(0, torch.as_tensor(np.asarray(mem.idxs)[order],
                                                                        device=prod.weight.device))
            out[mem.module] = cluster_scale(rows, labels, k)
    return out


def ar_finish(work: nn.Module, state: dict) -> None:
    """Fold-AR last step: move the fused biases into beta (exact, since the BN stats are (0, 1))."""
    absorb_fused_biases(work, state["fused"], state["biased"])


# ---------------------------------------------------------------------------------------------------------------
# Fold-DFR: data-free REPAIR by relative re-estimation on a proxy batch
# ---------------------------------------------------------------------------------------------------------------
DFR_DEFAULTS = {"proxy": "di", "samples": 64, "sequential": True, "linear_repair": True}


def _layers_without_bn(model: nn.Module) -> list[str]:
    """Conv/linear layers whose next module (in definition order) is not a BatchNorm: nothing re-normalises them."""
    named = [(n, m) for n, m in model.named_modules() if n]
    out = []
    for i, (n, m) in enumerate(named):
        if isinstance(m, (nn.Linear,) + _CONV):
            nxt = named[i + 1][1] if i + 1 < len(named) else None
            if not isinstance(nxt, _BN):
                out.append(n)
    return out


@torch.no_grad()
def _output_stats(model: nn.Module, layers: list[str], x: torch.Tensor) -> dict:
    mods = dict(model.named_modules())
    stats: dict = {}
    def make(name):
        def hook(_m, _i, out):
            stats.setdefault(name, _bn_input_stats(out))  # returns None: the output is not replaced
        return hook

    handles = [mods[n].register_forward_hook(make(n)) for n in layers if n in mods]
    was = model.training
    model.eval()
    try:
        model(x.to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return stats


def proxy_batch(input_shape, n: int = 256, *, kind: str = "noise", seed: int = 0, model: nn.Module | None = None,
                num_classes: int | None = None) -> torch.Tensor:
    """A cheap, deterministic proxy input batch (no data): "noise" = N(0, 1) in the model's (normalised) input
    space; "smooth" = the same noise blurred spatially (3x3 box, twice) and re-standardised, so neighbouring
    pixels correlate as in images; "di" = a short Deep Inversion from noise (needs ``model``)."""
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.randn((int(n), *input_shape), generator=gen)
    if kind == "noise" or x.dim() < 4:
        return x
    if kind == "smooth":
        c = x.shape[1]
        k = torch.ones(c, 1, 3, 3) / 9.0
        for _ in range(2):
            x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=c)
        return (x - x.mean()) / x.std()
    if kind.startswith("di"):  # "di" = 50 steps, "di20" = 20 steps ...
        steps = int(kind[2:] or 50)
        return deep_inversion(model, tuple(input_shape), num_classes=num_classes, batch_size=int(n), iterations=steps,
                              lr=0.1, bn_weight=1.0, tv_weight=1e-4, l2_weight=1e-5, jitter=1, seed=seed)
    raise ValueError(f"unknown proxy kind {kind!r}")


def _bn_input_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [0] + list(range(2, x.dim()))
    a = x.detach().double()
    return a.mean(dims), a.var(dims, unbiased=True)


@torch.no_grad()
def bn_proxy_stats(model: nn.Module, proxy: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per BN: (mean, var) of its input channels on ``proxy`` (model in eval mode, first call of each BN)."""
    stats: dict = {}
    names = {m: n for n, m in model.named_modules()}

    def hook(mod, inp):
        stats.setdefault(names[mod], _bn_input_stats(inp[0]))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if isinstance(m, _BN) and m.track_running_stats and m.running_var is not None]
    was = model.training
    model.eval()
    try:
        model(proxy.to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return stats


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
               linear_repair: bool = True, num_classes: int | None = None) -> dict:
    """Fold-DFR: set every BN of the folded ``work`` model from the ORIGINAL model's running statistics,
    corrected by how folding changed that BN's input on a proxy batch. For folded channel c of a BN with
    original members i in c (from ``channel_maps``; identity for unfolded BNs), with RM/RV the original running
    stats, (m_o, v_o) the original's proxy input stats and (m_f, v_f) the folded model's:

        running_var_c  = v_f[c] * sum_i RV_i / sum_i v_o[i]        (proxy-to-data calibration of the members)
        running_mean_c = m_f[c] + mean_i (RM_i - m_o[i])

    With ``sequential`` (default) the BNs are reset in one forward pass of the folded model in topological order
    (forward pre-hooks), so each BN sees its inputs already corrected upstream. Collapse (merged producers) and
    explosion (summed consumers, residual adds) are handled alike. Returns {"proxy": kind, "samples": n, "bns": count}.
    """
    dev = next(work.parameters()).device
    if torch.is_tensor(proxy):
        x, kind = proxy, "given"
    else:
        x, kind = proxy_batch(tuple(input_shape), samples, kind=proxy, seed=seed, model=original, num_classes=num_classes), proxy
    x = x.to(dev)
    ref = bn_proxy_stats(original, x.to(next(original.parameters()).device))
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
        mean = m_f.cpu() + dm / cnt
        mod.running_var.copy_(var.clamp_min(0).to(mod.running_var.dtype))
        mod.running_mean.copy_(mean.to(mod.running_mean.dtype))

    bns = [m for m in work.modules() if isinstance(m, _BN) and m.track_running_stats and m.running_var is not None]
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
            m_f, v_f = _bn_input_stats(out)
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
            view = (1, -1) + (1,) * (out.dim() - 2)
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



# ---------------------------------------------------------------------------------------------------------------
# Research candidate (a), not a public repair: statistics propagation through an input-covariance model
# ---------------------------------------------------------------------------------------------------------------
def _rectified_var(gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Var(max(0, u)) for u ~ N(beta, gamma^2) (DFQ-style rectified-Gaussian moments)."""
    g = gamma.double().abs().clamp_min(1e-12)
    b = beta.double()
    t = b / g
    pdf = torch.exp(-0.5 * t * t) / (2 * torch.pi) ** 0.5
    cdf = 0.5 * (1 + torch.erf(t / 2 ** 0.5))
    m1 = b * cdf + g * pdf
    m2 = (b * b + g * g) * cdf + b * g * pdf
    return (m2 - m1 * m1).clamp_min(1e-12)


@torch.no_grad()
def statprop_finish(original: nn.Module, work: nn.Module, channel_maps: dict[str, np.ndarray], example_input,
                    alphas=tuple(np.linspace(0, 1, 21))) -> dict:
    """Candidate (a): predict each merged channel's pre-BN variance without any forward pass.

    For a BN fed by conv/linear W (rows w_i over input channels ch and kernel taps t), model the producer's
    input covariance as diag(v_ch) x [(1-alpha) I + alpha 11^T] over the taps of a channel (v_ch: rectified-Gaussian
    variance of the previous BN when the input is ReLU(BN), else 1), so
    cov_ij = sum_ch v_ch [(1-alpha) <w_i,ch, w_j,ch> + alpha S_i,ch S_j,ch] with S the tap sums; alpha per layer is
    fitted on a grid so that the predicted member variances are proportional to the known running_var. Then
    running_var_c = mean_{i,j in c} sqrt(RV_i RV_j) rho_ij and running_mean_c = mean RM_i. Only the merged
    producers' own BNs are changed (collapse only; summed consumers are left alone)."""
    from .groups import build_dependency_graph

    dg = build_dependency_graph(original, example_input)
    named = [(n, m) for n, m in original.named_modules() if n]
    pos = {m: i for i, (_, m) in enumerate(named)}
    names = {m: n for n, m in named}
    wmods = dict(work.named_modules())
    fitted = {}
    for bn, prod in _bn_producers(dg, original).items():
        name = names[bn]
        if name not in wmods or name not in channel_maps:
            continue
        w = prod.weight.detach().double()
        w = w.reshape(w.shape[0], w.shape[1], -1)
        prev = [m for _, m in named[:pos[prod]] if isinstance(m, _BN) and m.num_features == w.shape[1]]
        v = _rectified_var(prev[-1].weight, prev[-1].bias) if prev else torch.ones(w.shape[1], dtype=torch.float64)
        a = w * v.sqrt().view(1, -1, 1)
        g1 = a.flatten(1) @ a.flatten(1).T
        s = a.sum(2)
        g2 = s @ s.T
        rv = bn.running_var.double()
        best = None
        for al in alphas:
            pred = ((1 - al) * g1.diagonal() + al * g2.diagonal()).clamp_min(1e-30)
            score = float(torch.log(rv.clamp_min(1e-30) / pred).var())
            if best is None or score < best[0]:
                best = (score, float(al))
        al = best[1]
        cov = (1 - al) * g1 + al * g2
        d = cov.diagonal().clamp_min(1e-30).sqrt()
        rho = cov / d[:, None] / d[None, :]
        cmap = channel_maps[name]
        size = wmods[name].running_var.numel()
        onehot = torch.zeros(size, len(cmap), dtype=torch.float64)
        keep = np.flatnonzero(cmap >= 0)
        onehot[torch.as_tensor(cmap[keep]), torch.as_tensor(keep)] = 1.0
        onehot = onehot / onehot.sum(1, keepdim=True).clamp_min(1)
        sd = rv.sqrt()
        var = ((onehot @ (sd[:, None] * rho * sd[None, :])) * onehot).sum(1)
        wmods[name].running_var.copy_(var.to(wmods[name].running_var.dtype))
        fitted[name] = al
    return {"alpha": fitted}
