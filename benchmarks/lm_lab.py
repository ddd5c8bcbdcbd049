"""Research helpers for Llama-layout LMs: clustering candidates on unit features and applying unit maps.

``apply_maps(model, maps, mode)`` folds (``mode="fold"``: cluster ids, mean on the producing side, sum on the
consuming side, the engine's merge rule for decoders) or prunes (``mode="prune"``: new index or -1) every group of
``maps`` on a deep copy. ``candidate_maps(model, cand, ratio, seed)`` gives the unit maps of a clustering candidate
at folding's counts (``k_for_ratio`` per MLP, per KV group for heads) with the engine's per-group seeds. Used by
``research_lm.py`` only.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

# Hartigan transfers from given labels have no public entry point (the engine runs them only after its own
# Lloyd restarts): the "ward+h" candidate calls the private helpers directly.
from foldviz.kmeans import _canonical, _gram, _hartigan, k_for_ratio, kmeans
from foldviz.lm.groups import attn_shape, decoder_layers, find_lm_groups, sync_config
from foldviz.plans import FoldPlan


# ----------------------------------------------------------------------------------------------------------------
# applying maps
# ----------------------------------------------------------------------------------------------------------------
def _lin(old: nn.Linear, w: torch.Tensor, b: torch.Tensor | None) -> nn.Linear:
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    return new.to(old.weight.dtype)


def _combine(t: torch.Tensor, labels: np.ndarray, mode: str, mean: bool) -> torch.Tensor:
    """Rows of ``t`` (n, ...) merged per cluster (fold) or selected in new-index order (prune), in float32."""
    lab = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    x = t.detach().float()
    if mode == "prune":
        keep = torch.nonzero(lab >= 0).flatten()
        return x[keep[torch.argsort(lab[keep])]]
    k = int(lab.max()) + 1
    out = torch.zeros((k,) + tuple(x.shape[1:])).index_add_(0, lab, x)
    if mean:
        out /= torch.bincount(lab, minlength=k).float().view(-1, *([1] * (x.dim() - 1)))
    return out


@torch.no_grad()
def apply_maps(model: nn.Module, maps: dict[str, np.ndarray], mode: str = "fold") -> nn.Module:
    """A deep copy of ``model`` with every group of ``maps`` folded (cluster ids) or pruned (new index / -1)."""
    work = copy.deepcopy(model)
    layers = decoder_layers(work)
    for gid, labels in maps.items():
        i, kind = int(gid.split(".")[2]), gid.rsplit(".", 1)[1]
        if kind == "mlp":
            mlp = layers[i].mlp
            for nm in ("gate_proj", "up_proj"):
                lin = getattr(mlp, nm)
                b = _combine(lin.bias, labels, mode, True) if lin.bias is not None else None
                setattr(mlp, nm, _lin(lin, _combine(lin.weight, labels, mode, True), b))
            d = mlp.down_proj
            mlp.down_proj = _lin(d, _combine(d.weight.T, labels, mode, False).T,
                                 d.bias.detach().float() if d.bias is not None else None)
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = mlp.gate_proj.out_features
            continue
        attn = layers[i].self_attn
        nq, nkv, hd = attn_shape(attn, work.config)
        mha = nq == nkv
        q, k_, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj

        def heads(lin, lab=labels):
            w = _combine(lin.weight.view(nq, hd, -1), lab, mode, True)
            b = _combine(lin.bias.view(nq, hd), lab, mode, True).reshape(-1) if lin.bias is not None else None
            return _lin(lin, w.reshape(-1, lin.in_features), b)

        attn.q_proj = heads(q)
        if mha:
            attn.k_proj, attn.v_proj = heads(k_), heads(v)
        ow = o.weight.view(o.out_features, nq, hd).permute(1, 0, 2)
        new_o = _combine(ow, labels, mode, False)
        new_nq = new_o.shape[0]
        attn.o_proj = _lin(o, new_o.permute(1, 0, 2).reshape(o.out_features, new_nq * hd),
                           o.bias.detach().float() if o.bias is not None else None)
        new_nkv = new_nq if mha else nkv
        attn.num_key_value_groups = new_nq // new_nkv
        attn.head_dim = hd
        for attr, val in (("num_heads", new_nq), ("num_attention_heads", new_nq), ("num_key_value_heads", new_nkv)):
            if hasattr(attn, attr):
                setattr(attn, attr, val)
    sync_config(work)
    return work


# ----------------------------------------------------------------------------------------------------------------
# features and clustering candidates
# ----------------------------------------------------------------------------------------------------------------
def mlp_parts(model, i: int, *, normw: bool = False) -> list[torch.Tensor]:
    """(n, d_p) parts of the MLP unit features of layer i: gate rows, up rows, down columns (float32).
    ``normw``: gate/up rows scaled by the post-attention RMSNorm weight (the weights acting on the normed input)."""
    layer = decoder_layers(model)[i]
    g, u, d = (layer.mlp.gate_proj.weight.detach().float(), layer.mlp.up_proj.weight.detach().float(),
               layer.mlp.down_proj.weight.detach().float().T)
    if normw:
        w = layer.post_attention_layernorm.weight.detach().float()
        g, u = g * w, u * w
    return [g, u, d]


def head_parts(model, i: int, *, normw: bool = False) -> tuple[list[torch.Tensor], int]:
    """((nq, d_p) parts of the head features of layer i: q blocks (| k, v blocks for MHA) | o column blocks, and the
    heads per clustering unit (KV group; MHA: all heads)."""
    layer = decoder_layers(model)[i]
    attn = layer.self_attn
    nq, nkv, hd = attn_shape(attn, model.config)
    w = layer.input_layernorm.weight.detach().float() if normw else None

    def rows(lin):
        x = lin.weight.detach().float()
        x = x * w if w is not None else x
        return x.reshape(nq, -1)

    parts = [rows(attn.q_proj)]
    if nq == nkv:
        parts += [rows(attn.k_proj), rows(attn.v_proj)]
    o = attn.o_proj.weight.detach().float().reshape(-1, nq, hd).permute(1, 0, 2).reshape(nq, -1)
    parts.append(o)
    return parts, (nq if nq == nkv else nq // nkv)


def transform(parts: list[torch.Tensor], how: str, kind: str) -> torch.Tensor:
    """Feature matrix (n, d) from the parts: ``raw`` (concatenation), ``partscale`` (each part centred-Frobenius
    normalised: equal weight per part), ``cos`` (rows L2-normalised), ``producer`` (producing parts only)."""
    if how == "producer":
        parts = parts[:-1]
    if how == "partscale":
        parts = [p / max(float((p - p.mean(0)).norm()), 1e-12) for p in parts]
    x = torch.cat(parts, dim=1)
    if how == "cos":
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return x


def cluster(x: torch.Tensor, k: int, algo: str, seed: int) -> np.ndarray:
    """Cluster ids (n,) of the rows of ``x`` into k clusters: ``kmeans`` (k-means++ / Lloyd, 4 restarts, Hartigan),
    ``kmeans10`` (10 restarts), ``ward``, ``ward+h`` (Ward, then Hartigan transfers), ``kmeans-lloyd``."""
    n = x.shape[0]
    if k >= n:
        return np.arange(n)
    if algo == "kmeans":
        return np.asarray(kmeans(x, k, seed=seed, n_init=4, with_centroids=False).labels)
    if algo == "kmeans10":
        return np.asarray(kmeans(x, k, seed=seed, n_init=10, with_centroids=False).labels)
    if algo == "kmeans-lloyd":
        return np.asarray(kmeans(x, k, seed=seed, n_init=4, refine="none", with_centroids=False).labels)
    ward = np.asarray(kmeans(x, k, algorithm="ward").labels)
    if algo == "ward":
        return ward
    if algo == "ward+h":
        lab, _ = _hartigan(_gram(x, torch.float64).numpy(), ward, k)
        return _canonical(lab)
    raise ValueError(f"unknown algorithm {algo!r}")


def group_seed(plan: FoldPlan, group) -> int:
    """The clustering seed the engine uses for ``group`` (a decoder group's ``seed_offset``: per layer, heads apart
    from the MLP); KV group j of a heads group adds j, as in :func:`foldviz.fold.cluster_group`."""
    return int(plan.seed) + int(group.info.get("seed_offset", 0))


def candidate_maps(model, cand: dict, ratio: float, seed: int = 0) -> dict[str, np.ndarray]:
    """Unit maps (cluster ids) of every foldable group for a candidate ``{"algo", "features", "normw"}`` at
    ``ratio`` with the engine's seeds."""
    plan = FoldPlan(default_ratio=ratio, seed=seed, repair="none")
    maps = {}
    for g in find_lm_groups(model).foldable:
        if g.role not in ("mlp", "heads"):
            continue
        s = group_seed(plan, g)
        if g.role == "mlp":
            x = transform(mlp_parts(model, g.layer, normw=cand.get("normw", False)), cand["features"], "mlp")
            maps[g.id] = cluster(x, k_for_ratio(g.channels, ratio), cand["algo"], s)
            continue
        parts, per = head_parts(model, g.layer, normw=cand.get("normw", False))
        kk = k_for_ratio(per, ratio)
        lab = np.zeros(g.channels, dtype=np.int64)
        for j in range(g.channels // per):
            x = transform([p[j * per:(j + 1) * per] for p in parts], cand["features"], "heads")
            lab[j * per:(j + 1) * per] = cluster(x, kk, cand["algo"], s + j) + j * kk
        maps[g.id] = lab
    return maps


@torch.no_grad()
def balance(model: nn.Module) -> nn.Module:
    """Function-preserving rescaling (a deep copy): each MLP neuron's up row and down column get equal norms
    (u *= a, d /= a); for MHA each head's v block and o block get equal Frobenius norms. SwiGLU and attention are
    linear in u and v, so the model computes the same function; folding's mean/sum merge then treats neurons that
    differ only by this scale as equal."""
    work = copy.deepcopy(model)
    for layer in decoder_layers(work):
        mlp = layer.mlp
        u, d = mlp.up_proj.weight, mlp.down_proj.weight
        a = (d.float().norm(dim=0) / u.float().norm(dim=1).clamp_min(1e-12)).sqrt()
        u.mul_(a[:, None].to(u.dtype))
        d.div_(a[None, :].to(d.dtype))
        if mlp.up_proj.bias is not None:
            mlp.up_proj.bias.mul_(a.to(u.dtype))
        attn = layer.self_attn
        nq, nkv, hd = attn_shape(attn, work.config)
        if nq == nkv:
            v, o = attn.v_proj.weight, attn.o_proj.weight
            vn = v.float().view(nq, hd, -1).flatten(1).norm(dim=1)
            on = o.float().view(-1, nq, hd).permute(1, 0, 2).flatten(1).norm(dim=1)
            a = (on / vn.clamp_min(1e-12)).sqrt()
            v.mul_(a.repeat_interleave(hd)[:, None].to(v.dtype))
            if attn.v_proj.bias is not None:
                attn.v_proj.bias.mul_(a.repeat_interleave(hd).to(v.dtype))
            o.div_(a.repeat_interleave(hd)[None, :].to(o.dtype))
    return work
