"""Repairs of a folded (or pruned) Llama-layout decoder that need no outside data.

Every repair takes ``(original, folded, unit_maps)`` — the model before folding, the folded model (changed in
place) and ``{group id: (units,) int}`` giving each original unit's new index (-1 = removed), the convention of
``FoldResult.unit_maps`` — plus its own options, and returns a small dict describing what it changed.

Inputs the repairs can use, none of them outside data:

* the weights alone (:func:`weighted_merge`; :func:`rescale_outputs` and :func:`refit_outputs` with
  ``tokens=None``, which probe with Gaussian input embeddings of the embedding matrix's scale);
* text sampled from the original model itself (:func:`self_generate`): the model's own distribution, so nothing
  is learnt from data the model has not already absorbed.

Repairs (applied to the groups' output projections, ``mlp.down_proj`` and ``self_attn.o_proj``, and norms):

``weighted_merge``   re-merges each cluster's producing rows (gate/up rows; q, and k/v for MHA) as a mean weighted
                     by the squared norm of each member's consuming column (down / o block): the merged unit
                     then matches the members that contribute most to the output instead of the plain average.
``rescale_outputs``  RMSNorm-aware: every folded sublayer's output is scaled by one scalar per layer so that its
                     variance (what the next RMSNorms normalise) equals the original sublayer's on the same input.
``refit_outputs``    least-squares refit of each folded output projection (ridge-regularised), so that on the
                     same input the folded sublayer reproduces the original sublayer's output as well as a linear
                     map of the merged units can; layer by layer, each on the inputs left by the layers before.
``tune_norms``       fine-tunes only the RMSNorm weights of the folded model to match the original's next-token
                     distribution (KL divergence) on the given tokens (the paper's "fold + fine-tuned norms" row,
                     here on self-generated text).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .groups import attn_shape, decoder_layers

__all__ = ["self_generate", "weighted_merge", "rescale_outputs", "refit_outputs", "tune_norms", "norm_parameters"]


# ---------------------------------------------------------------------------------------------------------------
# self-generated text
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def self_generate(model: nn.Module, n_samples: int, seqlen: int, *, seed: int = 0, temperature: float = 1.0,
                  top_k: int | None = None, start_token_id: int | None = None, batch_size: int = 16) -> torch.Tensor:
    """(n_samples, seqlen) token ids sampled from ``model`` itself, each sequence starting from ``start_token_id``
    (default ``config.eos_token_id``, the document separator) and continued by ancestral sampling at
    ``temperature`` (``top_k``: sample among the k most likely tokens). Seeded; the start token is included."""
    if n_samples < 1 or seqlen < 2:
        raise ValueError(f"need n_samples >= 1 and seqlen >= 2, got {n_samples} and {seqlen}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    start = start_token_id if start_token_id is not None else getattr(model.config, "eos_token_id", None)
    if isinstance(start, (list, tuple)):
        start = start[0] if start else None
    if start is None:
        raise ValueError("the model config has no eos_token_id; pass start_token_id=")
    ctx = int(getattr(model.config, "max_position_embeddings", seqlen))
    dev = next(model.parameters()).device
    # one uniform number per sampled token, drawn up front: the samples do not depend on batch_size
    u = torch.rand(n_samples, seqlen - 1, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)
    was = model.training
    model.eval()
    out = []
    try:
        for b in range(0, n_samples, batch_size):
            nb = min(batch_size, n_samples - b)
            seq = torch.full((nb, 1), int(start), dtype=torch.long, device=dev)
            cache = None
            for t in range(seqlen - 1):
                if t < ctx - 1:
                    res = model(input_ids=seq[:, -1:] if cache is not None else seq, cache=cache, use_cache=True)
                    cache = getattr(res, "cache", None) or getattr(res, "past_key_values", None)
                else:   # past the context length: a fresh window of the last ctx - 1 tokens
                    res = model(input_ids=seq[:, -(ctx - 1):], use_cache=False)
                logits = res.logits[:, -1].double().cpu() / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(int(top_k), logits.shape[-1]), dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                cdf = torch.cumsum(F.softmax(logits, dim=-1), dim=-1)
                nxt = torch.searchsorted(cdf, (u[b:b + nb, t] * cdf[:, -1])[:, None]).clamp_max(cdf.shape[1] - 1)
                seq = torch.cat([seq, nxt.to(dev)], dim=1)
            out.append(seq.cpu())
    finally:
        model.train(was)
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------------
# weights only
# ---------------------------------------------------------------------------------------------------------------
def _parse(gid: str) -> tuple[int, str]:
    parts = gid.split(".")
    if len(parts) != 4 or parts[0] != "model" or parts[1] != "layers" or parts[3] not in ("mlp", "self_attn"):
        raise ValueError(f"unknown group id {gid!r}; expected model.layers.I.mlp or model.layers.I.self_attn")
    return int(parts[2]), parts[3]


def _weighted_rows(rows: torch.Tensor, labels: np.ndarray, weights: torch.Tensor, k: int) -> torch.Tensor:
    """Per cluster, the ``weights``-weighted mean of ``rows`` (n, ...) (clusters of zero weight: plain mean)."""
    lab = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    keep = lab >= 0
    lab, x, w = lab[keep], rows.detach().double()[keep], weights.double()[keep]
    flat = x.reshape(x.shape[0], -1)
    tot = torch.zeros(k, dtype=torch.float64).index_add_(0, lab, w)
    cnt = torch.bincount(lab, minlength=k).double()
    w = torch.where(tot[lab] > 0, w, torch.ones_like(w))
    tot = torch.where(tot > 0, tot, cnt)
    out = torch.zeros(k, flat.shape[1], dtype=torch.float64).index_add_(0, lab, flat * w[:, None]) / tot[:, None]
    return out.reshape((k,) + tuple(x.shape[1:]))


@torch.no_grad()
def weighted_merge(original: nn.Module, folded: nn.Module, unit_maps: dict[str, np.ndarray]) -> dict:
    """Re-merge every folded cluster's producing rows as a mean weighted by the members' squared consuming-column
    norms (module docstring). Pruned units (-1) are ignored; clusters of one unit are unchanged. Returns
    ``{"groups": number of groups re-merged}``."""
    lo, lf = decoder_layers(original), decoder_layers(folded)
    done = 0
    for gid, labels in unit_maps.items():
        i, kind = _parse(gid)
        labels = np.asarray(labels)
        k = int(labels.max()) + 1
        if kind == "mlp":
            mo, mf = lo[i].mlp, lf[i].mlp
            if mf.gate_proj.out_features != k:
                raise ValueError(f"{gid}: the folded MLP has {mf.gate_proj.out_features} neurons, the map {k}")
            w = mo.down_proj.weight.detach().double().pow(2).sum(0)             # (n,) ||d_j||^2
            for nm in ("gate_proj", "up_proj"):
                src, dst = getattr(mo, nm), getattr(mf, nm)
                dst.weight.copy_(_weighted_rows(src.weight, labels, w, k).to(dst.weight.dtype))
                if src.bias is not None and dst.bias is not None:
                    dst.bias.copy_(_weighted_rows(src.bias, labels, w, k).to(dst.bias.dtype))
        else:
            ao, af = lo[i].self_attn, lf[i].self_attn
            nq, nkv, hd = attn_shape(ao, original.config)
            if af.q_proj.out_features != k * hd:
                raise ValueError(f"{gid}: the folded attention has {af.q_proj.out_features // hd} heads, the map {k}")
            o = ao.o_proj.weight.detach().double().reshape(-1, nq, hd)
            w = o.pow(2).sum((0, 2))                                                # (nq,) ||o block||^2
            names = ("q_proj", "k_proj", "v_proj") if nq == nkv else ("q_proj",)
            for nm in names:
                src, dst = getattr(ao, nm), getattr(af, nm)
                rows = src.weight.detach().reshape(nq, hd, -1)
                dst.weight.copy_(_weighted_rows(rows, labels, w, k).reshape(dst.weight.shape).to(dst.weight.dtype))
                if src.bias is not None and dst.bias is not None:
                    b = _weighted_rows(src.bias.reshape(nq, hd), labels, w, k).reshape(-1)
                    dst.bias.copy_(b.to(dst.bias.dtype))
        done += 1
    return {"groups": done}


# ---------------------------------------------------------------------------------------------------------------
# sublayer probing (shared by rescale_outputs and refit_outputs)
# ---------------------------------------------------------------------------------------------------------------
def _feed(model: nn.Module, tokens: torch.Tensor | None, *, n_probe: int, seqlen: int, seed: int, batch_size: int):
    """Batches of keyword inputs for ``model``: token windows, or (``tokens=None``) Gaussian input embeddings with
    the per-entry standard deviation of the embedding matrix (a weights-only probe)."""
    dev = next(model.parameters()).device
    if tokens is not None:
        t = torch.as_tensor(tokens, dtype=torch.long)
        t = t[None] if t.dim() == 1 else t
        return [{"input_ids": t[b:b + batch_size].to(dev)} for b in range(0, len(t), batch_size)]
    emb = model.get_input_embeddings().weight
    sd = float(emb.detach().float().std())
    g = torch.Generator().manual_seed(int(seed))
    out = []
    for b in range(0, n_probe, batch_size):
        nb = min(batch_size, n_probe - b)
        x = torch.randn(nb, seqlen, emb.shape[1], generator=g) * sd
        out.append({"inputs_embeds": x.to(dev, emb.dtype)})
    return out


def _first(out):
    return out[0] if isinstance(out, tuple) else out


class _Stop(Exception):
    """Raised by a hook once the sublayer of interest has run: the layers after it are not needed."""


@torch.no_grad()
def _sublayer_pass(original: nn.Module, folded: nn.Module, layer: int, kind: str, feed, consume,
                   target: str = "same-input") -> None:
    """Run ``folded`` on every batch of ``feed``; at decoder layer ``layer``'s sublayer ``kind`` ("mlp" or
    "self_attn") call ``consume(proj_input, folded_output, original_output)``: the folded output projection's input
    (tokens, in), the folded sublayer's output and the original sublayer's output (tokens, hidden), all float64.

    ``target="same-input"``: the original sublayer applied to the folded model's input there;
    ``"original-stream"``: the original sublayer's output in the original model's own forward pass (so a fit also
    undoes the drift accumulated in the layers before). Each forward pass stops once that sublayer has run.
    Cost: one partial pass per sublayer, O(layers^2) sublayer evaluations in all — fine for small models; a
    layer-by-layer cache of hidden states would make it O(layers).
    """
    if target not in ("same-input", "original-stream"):
        raise ValueError(f"unknown refit target {target!r}; use 'same-input' or 'original-stream'")
    sub_f = getattr(decoder_layers(folded)[layer], kind)
    sub_o = getattr(decoder_layers(original)[layer], kind)
    proj = sub_f.down_proj if kind == "mlp" else sub_f.o_proj
    box = {}

    def pre(_m, args):
        box["in"] = args[0].detach().double().reshape(-1, args[0].shape[-1])

    def post(_m, args, kwargs, out):
        ref = box.pop("ref") if target == "original-stream" else _first(sub_o(*args, **kwargs))
        got = _first(out)
        consume(box.pop("in"), got.detach().double().reshape(-1, got.shape[-1]),
                ref.detach().double().reshape(-1, ref.shape[-1]))
        raise _Stop

    def grab(_m, _args, out):
        box["ref"] = _first(out)
        raise _Stop

    hooks = [proj.register_forward_pre_hook(pre), sub_f.register_forward_hook(post, with_kwargs=True)]
    was_f, was_o = folded.training, original.training
    folded.eval()
    original.eval()
    try:
        for kw in feed:
            if target == "original-stream":
                h = sub_o.register_forward_hook(grab)
                try:
                    original(**kw, use_cache=False)
                except _Stop:
                    pass
                finally:
                    h.remove()
            try:
                folded(**kw, use_cache=False)
            except _Stop:
                pass
    finally:
        for h in hooks:
            h.remove()
        folded.train(was_f)
        original.train(was_o)


def _targets(kinds):
    for k in kinds:
        if k not in ("mlp", "self_attn"):
            raise ValueError(f"unknown sublayer {k!r}; use 'mlp' and/or 'self_attn'")
    return kinds


@torch.no_grad()
def rescale_outputs(original: nn.Module, folded: nn.Module, unit_maps: dict | None = None, *,
                    tokens: torch.Tensor | None = None, n_probe: int = 16, seqlen: int | None = None,
                    seed: int = 0, batch_size: int = 8, kinds=("self_attn", "mlp"), max_scale: float = 4.0) -> dict:
    """Scale each folded sublayer's output projection so that the sublayer's output variance matches the original
    sublayer's on the same input, layer by layer (attention, then MLP, then the next layer).

    ``tokens`` (windows, seqlen): e.g. :func:`self_generate` output; ``None``: ``n_probe`` Gaussian embedding
    windows of ``seqlen`` (default: the context length). ``unit_maps``: only layers with a group in it are scaled
    (None: every layer). Scales are clipped to [1/max_scale, max_scale]. Returns ``{"scales": {group id: s}}``.
    """
    kinds = _targets(kinds)
    seqlen = int(seqlen or getattr(original.config, "max_position_embeddings", 128))
    feed = _feed(folded, tokens, n_probe=n_probe, seqlen=seqlen, seed=seed, batch_size=batch_size)
    scales = {}
    for i in range(len(decoder_layers(folded))):
        for kind in kinds:
            gid = f"model.layers.{i}.{kind}"
            if unit_maps is not None and gid not in unit_maps:
                continue
            acc = {"f": 0.0, "o": 0.0}

            def consume(_x, got, ref, acc=acc):
                acc["f"] += float(((got - got.mean(0)) ** 2).sum())
                acc["o"] += float(((ref - ref.mean(0)) ** 2).sum())

            _sublayer_pass(original, folded, i, kind, feed, consume)
            s = math.sqrt(acc["o"] / acc["f"]) if acc["f"] > 0 else 1.0
            s = min(max(s, 1.0 / max_scale), max_scale)
            sub = getattr(decoder_layers(folded)[i], kind)
            proj = sub.down_proj if kind == "mlp" else sub.o_proj
            proj.weight.mul_(s)
            if proj.bias is not None:
                proj.bias.mul_(s)
            scales[gid] = s
    return {"scales": scales}


@torch.no_grad()
def refit_outputs(original: nn.Module, folded: nn.Module, unit_maps: dict | None = None, *,
                  tokens: torch.Tensor | None = None, n_probe: int = 16, seqlen: int | None = None, seed: int = 0,
                  batch_size: int = 8, ridge: float = 1e-2, kinds=("self_attn", "mlp"),
                  target: str = "same-input") -> dict:
    """Least-squares refit of each folded output projection W' (out, k) on the same input x as the original
    sublayer: ``W' = argmin sum_x ||y_orig(x) - b - W' a(x)||^2 + ridge * tr(A)/k * ||W'||^2`` with ``a(x)`` the
    folded projection's input (the merged units) and A their Gram matrix; running sums only (memory O(k^2)).

    Layer by layer (attention before MLP), each fit on the inputs the already-refitted layers produce. ``target``:
    ``"same-input"`` fits the original sublayer applied to those inputs; ``"original-stream"`` fits the original
    sublayer's output in the original model's own forward pass (also absorbing the drift of earlier layers).
    ``tokens`` / ``n_probe`` / ``seqlen`` as in :func:`rescale_outputs`. Returns ``{"relative_error": {group id: (before,
    after)}}``, the fitted objective relative to ``sum ||y_orig - mean||^2``.
    """
    kinds = _targets(kinds)
    seqlen = int(seqlen or getattr(original.config, "max_position_embeddings", 128))
    feed = _feed(folded, tokens, n_probe=n_probe, seqlen=seqlen, seed=seed, batch_size=batch_size)
    report = {}
    for i in range(len(decoder_layers(folded))):
        for kind in kinds:
            gid = f"model.layers.{i}.{kind}"
            if unit_maps is not None and gid not in unit_maps:
                continue
            sub = getattr(decoder_layers(folded)[i], kind)
            proj = sub.down_proj if kind == "mlp" else sub.o_proj
            bias = proj.bias.detach().double() if proj.bias is not None else None
            acc = {"aa": None, "ya": None, "yy": 0.0, "ey": 0.0, "n": 0, "ysum": None}

            def consume(a, got, ref, acc=acc, bias=bias):
                y = ref - bias if bias is not None else ref
                acc["aa"] = a.T @ a if acc["aa"] is None else acc["aa"] + a.T @ a
                acc["ya"] = y.T @ a if acc["ya"] is None else acc["ya"] + y.T @ a
                acc["yy"] += float((y * y).sum())
                acc["ey"] += float(((ref - got) ** 2).sum())
                acc["ysum"] = y.sum(0) if acc["ysum"] is None else acc["ysum"] + y.sum(0)
                acc["n"] += y.shape[0]

            _sublayer_pass(original, folded, i, kind, feed, consume, target)
            aa, ya = acc["aa"], acc["ya"]
            k = aa.shape[0]
            lam = ridge * float(torch.trace(aa)) / k
            w = torch.linalg.solve(aa + lam * torch.eye(k, dtype=aa.dtype), ya.T).T      # (out, k)
            var = acc["yy"] - float((acc["ysum"] ** 2).sum()) / max(1, acc["n"])
            after = acc["yy"] - 2 * float((w * ya).sum()) + float(((w @ aa) * w).sum())
            if after < acc["ey"]:   # never worse than the fold itself (an exact fold stays exact: ridge would bias it)
                proj.weight.copy_(w.to(proj.weight.dtype))
            else:
                after = acc["ey"]
            report[gid] = (acc["ey"] / var if var > 0 else 0.0, after / var if var > 0 else 0.0)
    return {"relative_error": report}


# ---------------------------------------------------------------------------------------------------------------
# norm tuning
# ---------------------------------------------------------------------------------------------------------------
def norm_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The weights of every normalisation module (RMSNorm / LayerNorm: input, post-attention, final, q/k norms)."""
    out = []
    for _name, mod in model.named_modules():
        if "norm" in type(mod).__name__.lower() and getattr(mod, "weight", None) is not None:
            out.append(mod.weight)
    return out


def tune_norms(original: nn.Module, folded: nn.Module, unit_maps: dict | None = None, *, tokens: torch.Tensor,
               steps: int = 100, lr: float = 5e-3, batch_size: int = 8, seed: int = 0) -> dict:
    """Fine-tune only the norm weights of ``folded`` (everything else frozen) to minimise the KL divergence from the
    original's next-token distribution on ``tokens`` (windows, seqlen), Adam, ``steps`` steps of ``batch_size``
    windows drawn with a seeded generator. Returns ``{"params": tuned parameter count, "kl": [first, last]}``."""
    t = torch.as_tensor(tokens, dtype=torch.long)
    t = t[None] if t.dim() == 1 else t
    params = norm_parameters(folded)
    if not params:
        raise ValueError("the folded model has no norm weights to tune")
    dev = next(folded.parameters()).device
    flags = [(p, p.requires_grad) for p in folded.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(int(seed))
    was_f, was_o = folded.training, original.training
    original.eval()
    folded.train()
    kls = []
    try:
        for _ in range(int(steps)):
            x = t[torch.randint(0, len(t), (min(batch_size, len(t)),), generator=g)].to(dev)
            with torch.no_grad():
                ref = F.log_softmax(original(input_ids=x, use_cache=False).logits.float(), -1)
            out = F.log_softmax(folded(input_ids=x, use_cache=False).logits.float(), -1)
            kl = F.kl_div(out.flatten(0, 1), ref.flatten(0, 1), log_target=True, reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            kl.backward()
            opt.step()
            kls.append(float(kl.detach()))
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        folded.train(was_f)
        original.train(was_o)
    return {"params": int(sum(p.numel() for p in params)), "kl": [kls[0], kls[-1]] if kls else []}
