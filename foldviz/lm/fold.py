"""Data-free folding (and magnitude / random pruning baselines) of Llama-layout decoders.

``fold_lm(model, plan)`` reuses foldviz's :class:`~foldviz.plans.FoldPlan` (``default_ratio`` = fraction of units
removed per group, per-group ``ratios`` keyed by the ids of :func:`~foldviz.lm.groups.find_lm_groups`, ``skip``,
``seed`` and ``clustering`` = ``{"algorithm": "kmeans"|"ward"|"sklearn", "n_init", "max_iter"}``) and the k rule
:func:`~foldviz.kmeans.k_for_ratio`. LM folding has no repair step (as in the paper), so the plan's ``repair``
must be ``"none"``; :func:`lm_plan` builds such a plan.

Methods (same units, same counts per group):

``fold``       k-means (or Ward) on the unit features, then merge each cluster: mean on the producing side
               (gate/up rows, q rows; q/k/v rows for MHA), sum on the consuming side (down / o_proj columns).
``magnitude``  keep the k units with the largest L2 norm of their feature vector (per KV group for heads).
``random``     keep k units chosen uniformly at random (seeded; per KV group for heads).

The model is changed layer by layer (modules are replaced by smaller ``nn.Linear``s, computed in float32 and cast
back to the weights' dtype), so peak memory stays close to the model's own size when ``inplace=True``.
Module attributes (``intermediate_size``, ``num_key_value_groups``) and the config (``intermediate_size``,
``num_attention_heads``, ``num_key_value_heads``, explicit ``head_dim``) are updated; when layers end up with
different sizes the config keeps the largest sizes and ``config.foldviz_layers`` records the per-layer sizes.
"""
from __future__ import annotations

import copy
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..kmeans import (DEFAULT_CLUSTERING, _gram_blocks, _kmeans_on_gram, _seed_restarts, gram_cols, k_for_ratio, kmeans,
                      kmeans_blocks)
from ..plans import FoldPlan, PlanError
from ..methods import keys_for
from .groups import LMGroup, attn_shape, decoder_layers, find_lm_groups

__all__ = ["LM_METHODS", "LMFoldResult", "lm_plan", "fold_lm", "layer_sizes", "sync_config", "is_uniform",
           "count_params", "check_plan", "config_problem"]

#: the registry's language-model methods (foldviz.methods, applies_to "lm"): ("fold", "magnitude", "random")
LM_METHODS = keys_for("lm")
METHOD_LABELS = {"fold": "Model folding (data-free)", "magnitude": "Magnitude pruning (L2)",
                 "random": "Random pruning"}


@dataclass
class LMFoldResult:
    model: nn.Module
    plan: FoldPlan
    method: str
    groups: list[dict]                      # per group: id, kind, layer, n_before, n_after, ratio, inertia, seconds
    labels: dict[str, np.ndarray]           # group id -> new unit index of each original unit (-1 = removed)
    seconds: dict[str, float]
    params_before: int = 0
    params_after: int = 0
    uniform: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return METHOD_LABELS[self.method]

    @property
    def removed_fraction(self) -> float:
        return 1.0 - self.params_after / max(1, self.params_before)

    def summary(self) -> dict:
        return {"method": self.method, "label": self.label, "params_before": self.params_before,
                "params_after": self.params_after, "removed_fraction": round(self.removed_fraction, 6),
                "uniform": self.uniform, "seconds": self.seconds, "plan": self.plan.to_dict(),
                "groups": self.groups, "notes": self.notes}


def count_params(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def lm_plan(ratio: float = 0.2, **kw) -> FoldPlan:
    """A FoldPlan for LMs: ``repair="none"``, k-means clustering unless ``clustering=`` is given."""
    kw.setdefault("repair", "none")
    # fewer restarts than the CNN default: an 8192-neuron MLP group of a 1B model costs ~12 s of CPU with one
    # restart (Gram matrix 5 s, Hartigan 4 s, seeding + Lloyd ~3 s per restart).
    # Hartigan refinement stays on: at k close to n Lloyd stops in poor minima (demo perplexity at r = 0.3: 127.9
    # plain, 91.6 refined, Ward 86.9; at r = 0.5: 251.7, 134.8, 141.0), for about 4 s of CPU per 8192-neuron layer.
    kw.setdefault("clustering", {**DEFAULT_CLUSTERING, "n_init": 4})
    return FoldPlan(default_ratio=ratio, **kw)


def _as_plan(plan) -> FoldPlan:
    if isinstance(plan, FoldPlan):
        return plan
    if isinstance(plan, (int, float)):
        return lm_plan(float(plan))
    if isinstance(plan, dict):
        return FoldPlan.from_dict(plan)
    raise PlanError(f"plan must be a FoldPlan, a dict or a ratio, got {type(plan).__name__}")


def check_plan(plan: FoldPlan, groups: list[LMGroup]) -> None:
    """Unknown group ids, ratios on non-foldable groups and repairs are errors (one-line messages)."""
    if plan.repair != "none":
        raise PlanError(f"repair={plan.repair!r}: language-model folding is data-free without repair; "
                        "use repair='none' (foldviz.lm.lm_plan does)")
    by_id = {g.id: g for g in groups}
    for field_name, ids in (("ratios", plan.ratios), ("skip", plan.skip)):
        for gid in ids:
            if gid not in by_id:
                some = ", ".join(g.id for g in groups if g.foldable)
                raise PlanError(f"{field_name}: unknown group id {gid!r} (foldable groups: "
                                f"{some[:300]}{'...' if len(some) > 300 else ''})")
    for gid, r in plan.ratios.items():
        if r > 0 and not by_id[gid].foldable and gid not in plan.skip:
            raise PlanError(f"ratios.{gid}: group is not foldable ({by_id[gid].reason})")


# -------------------------------------------------------------------------------------------------------------
# merge helpers
# -------------------------------------------------------------------------------------------------------------
def _reduce_rows(t: torch.Tensor, labels: torch.Tensor, k: int, mean: bool) -> torch.Tensor:
    """Rows of ``t`` (n, ...) combined per label: mean or sum. Computed in float32."""
    x = t.detach().float().reshape(t.shape[0], -1)
    out = torch.zeros(k, x.shape[1], dtype=torch.float32).index_add_(0, labels, x)
    if mean:
        out /= torch.bincount(labels, minlength=k).clamp_min(1).to(out.dtype)[:, None]
    return out.reshape(k, *t.shape[1:])


def _select_rows(t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return t.detach().float().index_select(0, keep)


def _new_linear(old: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.to(old.weight.dtype).contiguous(), requires_grad=old.weight.requires_grad)
    if bias is not None:
        lin.bias = nn.Parameter(bias.to(old.bias.dtype).contiguous(), requires_grad=old.bias.requires_grad)
    return lin


def _column_blocks(parts: list[torch.Tensor], cols: int):
    """Contiguous float32 column blocks (n, <= cols) of ``torch.cat([p.float() for p in parts], dim=1)``, left to
    right, without ever building that matrix (the MLP features of a 1B model are 200 MB in float32)."""
    spans, col = [], 0
    for p in parts:
        spans.append((col, col + p.shape[1]))
        col += p.shape[1]
    for j0 in range(0, col, cols):
        j1 = min(col, j0 + cols)
        pieces = [p[:, max(a, j0) - a:min(b, j1) - a] for p, (a, b) in zip(parts, spans) if max(a, j0) < min(b, j1)]
        yield torch.cat([q.float() for q in pieces], dim=1) if len(pieces) > 1 else pieces[0].float().contiguous()


def _mlp_parts(mlp: nn.Module) -> list[torch.Tensor]:
    """The MLP unit features [gate | up | down^T | biases] as (n, d_p) views of the weights."""
    g, u, d = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    parts = [g.weight.detach(), u.weight.detach(), d.weight.detach().T]
    return parts + [b.detach()[:, None] for b in (g.bias, u.bias) if b is not None]


def _mlp_gram(mlp: nn.Module, k: int | None = None, seed: int = 0, n_init: int = 1):
    """(Centred float32 Gram matrix (n, n) of the MLP unit features, exactly as :func:`kmeans_blocks` builds it,
    and, when ``k`` is given, the k-means++ seeds of its ``n_init`` restarts, else None)."""
    with torch.no_grad():    # grad mode is per thread: this also runs on the prefetch thread
        parts = _mlp_parts(mlp)
        gram = _gram_blocks(_column_blocks(parts, gram_cols(parts[0].shape[0])), torch.float32)
        return gram, (None if k is None else _seed_restarts(gram, k, seed, n_init))


def _uses_gram(plan: FoldPlan, method: str) -> bool:
    return method == "fold" and {**DEFAULT_CLUSTERING, **plan.clustering}["algorithm"] == "kmeans"


def _cluster(feat, k: int, plan: FoldPlan, method: str, seed: int, gram=None) -> tuple[np.ndarray, float]:
    """Labels (new index of each unit, -1 = removed) and inertia (fold only). ``feat``: the unit features (n, d),
    or a list of (n, d_p) parts of them (concatenated along columns) that the Gram k-means streams block by block,
    bit for bit as on the concatenation; ``gram``: (their Gram matrix, the restarts' seeds or None), when already
    computed (:func:`_mlp_gram`)."""
    clustering = {**DEFAULT_CLUSTERING, **plan.clustering}
    if isinstance(feat, list):
        n = feat[0].shape[0]
        if k < n and _uses_gram(plan, method) and gram is not None:
            res = _kmeans_on_gram(gram[0], n, k, seed, clustering["n_init"], clustering["max_iter"],
                                  clustering["refine"], gram[1])
            return np.asarray(res.labels), float(res.inertia)
        if k < n and _uses_gram(plan, method):
            res = kmeans_blocks(_column_blocks(feat, gram_cols(n)), n, k, seed=seed, **clustering)
            return np.asarray(res.labels), float(res.inertia)
        feat = torch.cat([p.float() for p in feat], dim=1)
    n = feat.shape[0]
    if k >= n:
        return np.arange(n), 0.0
    if method == "fold":
        res = kmeans(feat, k, seed=seed, with_centroids=False, **clustering)
        return np.asarray(res.labels), float(res.inertia)
    if method == "magnitude":
        score = feat.norm(dim=1)
        keep = torch.argsort(score, descending=True, stable=True)[:k]
    else:
        g = torch.Generator().manual_seed(seed)
        keep = torch.randperm(n, generator=g)[:k]
    keep = torch.sort(keep).values
    labels = np.full(n, -1, dtype=np.int64)
    labels[keep.numpy()] = np.arange(k)
    return labels, 0.0


def _apply(t: torch.Tensor, labels: np.ndarray, k: int, method: str, mean: bool) -> torch.Tensor:
    """Fold (mean/sum per cluster) or prune (keep labelled rows in label order) along axis 0."""
    lab = torch.as_tensor(labels)
    if method == "fold":
        return _reduce_rows(t, lab, k, mean)
    keep = torch.nonzero(lab >= 0).flatten()
    keep = keep[torch.argsort(lab[keep])]
    return _select_rows(t, keep)


# -------------------------------------------------------------------------------------------------------------
def mlp_features(mlp: nn.Module) -> torch.Tensor:
    """(intermediate, d) feature of each MLP neuron: gate row | up row | down column (| gate, up bias), float32.
    The fold never builds this matrix (it streams :func:`_mlp_parts` into the Gram matrix); the explorer draws it."""
    return torch.cat([p.float() for p in _mlp_parts(mlp)], dim=1)


def _fold_mlp(mlp: nn.Module, k: int, plan: FoldPlan, method: str, seed: int, gram=None):
    g, u, d = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    # features as views of the weights: k-means streams them into the Gram matrix (or gets it ready-made)
    labels, inertia = _cluster(_mlp_parts(mlp), k, plan, method, seed, gram)
    del gram
    k_eff = k if method == "fold" else int((labels >= 0).sum())
    new = {}
    for name, lin in (("gate_proj", g), ("up_proj", u)):
        w = _apply(lin.weight, labels, k_eff, method, mean=True)
        b = _apply(lin.bias, labels, k_eff, method, mean=True) if lin.bias is not None else None
        new[name] = _new_linear(lin, w, b)
    wd = _apply(d.weight.T, labels, k_eff, method, mean=False).T
    new["down_proj"] = _new_linear(d, wd, d.bias.detach().float() if d.bias is not None else None)
    for name, lin in new.items():
        setattr(mlp, name, lin)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = k_eff
    return labels, inertia


def _head_features(blocks: dict, ow: torch.Tensor, sl: slice) -> torch.Tensor:
    """(heads in ``sl``, d): each query head's q block (| q bias; MHA: | k, v blocks and biases) | o columns."""
    per = sl.stop - sl.start
    return torch.cat([b[sl].reshape(per, -1) for b in blocks.values()] + [ow[sl].reshape(per, -1)], dim=1)


def _head_blocks(attn: nn.Module, config) -> tuple[dict, torch.Tensor, int, int, int, bool]:
    """The per-head weight blocks the fold merges: (blocks, o columns (nq, out, hd), nq, nkv, hd, mha)."""
    nq, nkv, hd = attn_shape(attn, config)
    q, k_, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
    mha = nq == nkv
    blocks = {"q": q.weight.detach().float().reshape(nq, hd, -1)}
    if q.bias is not None:
        blocks["qb"] = q.bias.detach().float().reshape(nq, hd)
    if mha:
        blocks["k"] = k_.weight.detach().float().reshape(nq, hd, -1)
        blocks["v"] = v.weight.detach().float().reshape(nq, hd, -1)
        for nm, lin in (("kb", k_), ("vb", v)):
            if lin.bias is not None:
                blocks[nm] = lin.bias.detach().float().reshape(nq, hd)
    ow = o.weight.detach().float().reshape(o.out_features, nq, hd).permute(1, 0, 2)
    return blocks, ow, nq, nkv, hd, mha


def head_features(attn: nn.Module, config) -> tuple[torch.Tensor, int]:
    """(query heads, d) features of every head, in head order, and the heads per clustering unit (the KV group;
    MHA: all heads). The fold clusters rows ``j*per .. (j+1)*per`` together, with seed ``plan.seed + j``."""
    blocks, ow, nq, nkv, _hd, mha = _head_blocks(attn, config)
    per = nq if mha else nq // nkv
    return _head_features(blocks, ow, slice(0, nq)), per


def _fold_heads(attn: nn.Module, config, r: float, plan: FoldPlan, method: str, seed: int):
    q, k_, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
    hidden_out = o.out_features
    blocks, ow, nq, nkv, hd, mha = _head_blocks(attn, config)   # the same blocks head_features() reads
    if mha:
        kv_groups, per = 1, nq
    else:
        kv_groups, per = nkv, nq // nkv
    kk = k_for_ratio(per, r)
    all_labels = np.full(nq, -1, dtype=np.int64)
    inertia = 0.0
    merged = {nm: [] for nm in list(blocks) + ["o"]}
    for j in range(kv_groups):
        sl = slice(j * per, (j + 1) * per)
        feat = _head_features(blocks, ow, sl)
        labels, ine = _cluster(feat, kk, plan, method, seed + j)
        inertia += ine
        for nm, b in blocks.items():
            merged[nm].append(_apply(b[sl], labels, kk, method, mean=True))
        merged["o"].append(_apply(ow[sl], labels, kk, method, mean=False))
        lab = labels.copy()
        lab[lab >= 0] += j * kk
        all_labels[sl] = lab
    cat = {nm: torch.cat(v_, dim=0) for nm, v_ in merged.items()}
    new_nq = kv_groups * kk if not mha else kk
    attn.q_proj = _new_linear(q, cat["q"].reshape(new_nq * hd, -1), cat["qb"].reshape(-1) if "qb" in cat else None)
    attn.o_proj = _new_linear(o, cat["o"].permute(1, 0, 2).reshape(hidden_out, new_nq * hd),
                              o.bias.detach().float() if o.bias is not None else None)
    if mha:
        attn.k_proj = _new_linear(k_, cat["k"].reshape(new_nq * hd, -1), cat["kb"].reshape(-1) if "kb" in cat else None)
        attn.v_proj = _new_linear(v, cat["v"].reshape(new_nq * hd, -1), cat["vb"].reshape(-1) if "vb" in cat else None)
    new_nkv = new_nq if mha else nkv
    attn.num_key_value_groups = new_nq // new_nkv
    attn.head_dim = hd
    for attr, val in (("num_heads", new_nq), ("num_attention_heads", new_nq), ("num_key_value_heads", new_nkv)):
        if hasattr(attn, attr):
            setattr(attn, attr, val)
    return all_labels, inertia, new_nq


def layer_sizes(model: nn.Module) -> list[dict]:
    """Per decoder layer: intermediate_size, num_attention_heads, num_key_value_heads (read from the weights)."""
    out = []
    for layer in decoder_layers(model):
        nq, nkv, hd = attn_shape(layer.self_attn, model.config)
        out.append({"intermediate_size": int(layer.mlp.gate_proj.out_features), "num_attention_heads": int(nq),
                    "num_key_value_heads": int(nkv), "head_dim": int(hd)})
    return out


def is_uniform(sizes: list[dict]) -> bool:
    return all(s == sizes[0] for s in sizes)


def config_problem(config) -> str:
    """Why transformers would refuse to save/load ``config`` ("" when it validates).

    transformers' ``LlamaConfig`` requires ``hidden_size % num_attention_heads == 0`` even with an explicit
    ``head_dim``; folding heads can break that (e.g. 32 → 24 heads at hidden 2048). Such models run fine but are
    saved in the foldviz format.
    """
    validate = getattr(config, "validate", None)
    if validate is None:
        return ""
    try:
        validate()
    except Exception as e:  # noqa: BLE001 - huggingface_hub's StrictDataclassClassValidationError and friends
        msg = str(e).strip().splitlines()
        return (msg[-1].strip() if msg else type(e).__name__)[:200]
    return ""


def sync_config(model: nn.Module) -> bool:
    """Write the layers' sizes into ``model.config``; returns True when every layer has the same sizes."""
    sizes = layer_sizes(model)
    cfg = model.config
    uniform = is_uniform(sizes)
    cfg.intermediate_size = max(s["intermediate_size"] for s in sizes)
    cfg.num_attention_heads = max(s["num_attention_heads"] for s in sizes)
    cfg.num_key_value_heads = max(s["num_key_value_heads"] for s in sizes)
    cfg.head_dim = sizes[0]["head_dim"]
    if uniform:
        if hasattr(cfg, "foldviz_layers"):
            delattr(cfg, "foldviz_layers")
    else:
        cfg.foldviz_layers = sizes
    return uniform


def group_seed(plan: FoldPlan, g: LMGroup) -> int:
    """The clustering seed fold_lm uses for group ``g`` (KV group j of a heads group adds j)."""
    return plan.seed + 1009 * (g.layer or 0) + (0 if g.kind == "mlp" else 500)


def group_labels(model: nn.Module, g: LMGroup, plan: FoldPlan, ratio: float | None = None,
                 method: str = "fold") -> tuple[np.ndarray, float]:
    """The units' new indices (-1 = removed) and inertia that :func:`fold_lm` produces for group ``g`` at
    ``ratio`` (default: the plan's), computed on the same features with the same seeds, without folding."""
    r = plan.ratio_for(g.id) if ratio is None else float(ratio)
    layer = decoder_layers(model)[g.layer]
    seed = group_seed(plan, g)
    if r <= 0:
        return np.arange(g.n), 0.0
    if g.kind == "mlp":
        return _cluster(_mlp_parts(layer.mlp), k_for_ratio(g.n, r), plan, method, seed)  # fold_lm's own path
    feat, per = head_features(layer.self_attn, model.config)
    kk = k_for_ratio(per, r)
    out, inertia = np.full(g.n, -1, dtype=np.int64), 0.0
    for j in range(g.n // per):
        lab, ine = _cluster(feat[j * per:(j + 1) * per], kk, plan, method, seed + j)
        lab = lab.copy()
        lab[lab >= 0] += j * kk
        out[j * per:(j + 1) * per] = lab
        inertia += ine
    return out, inertia

@contextmanager
def _prefetcher(enabled: bool):
    """A one-worker thread pool (None when not ``enabled``) with torch single-threaded while it lives."""
    if not enabled:
        yield None
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="foldviz-gram")
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)


def fold_lm(model: nn.Module, plan=0.2, method: str = "fold", *, inplace: bool = False,
            progress=None) -> LMFoldResult:
    """Fold (or prune, ``method="magnitude"|"random"``) a Llama-layout decoder according to ``plan``.

    ``plan``: a FoldPlan (``repair="none"``), a plan dict or a ratio. ``inplace=False`` works on a deep copy.
    ``progress(message, done, total)`` is called after each group. Returns :class:`LMFoldResult`.
    """
    if method not in LM_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {LM_METHODS}")
    plan = _as_plan(plan)
    t0 = time.perf_counter()
    groups = find_lm_groups(model)
    check_plan(plan, groups)
    params_before = count_params(model)
    work = model if inplace else copy.deepcopy(model)
    layers = decoder_layers(work)
    todo = [g for g in groups if g.foldable]
    out_groups, labels_out = [], {}
    notes = []
    # MLP groups whose k-means starts from the Gram matrix: with >= 2 torch threads, the next one's Gram matrix
    # (a large matrix product) and k-means++ seeds are computed on a second thread while the current group runs
    # Lloyd and Hartigan (both mostly sequential); torch runs single-threaded meanwhile, so the two threads use
    # two cores and the results are those of a single-threaded fold, bit for bit
    gram_groups = [g for g in todo if g.kind == "mlp" and _uses_gram(plan, method)
                   and k_for_ratio(g.n, plan.ratio_for(g.id)) < g.n and plan.ratio_for(g.id) > 0]
    overlap = torch.get_num_threads() >= 2 and len(gram_groups) >= 2
    pending = {}
    with torch.no_grad(), _prefetcher(overlap) as pool:
        for idx, g in enumerate(todo):
            r = plan.ratio_for(g.id)
            tg = time.perf_counter()
            seed = group_seed(plan, g)
            if r <= 0:
                labels, inertia, n_after = np.arange(g.n), 0.0, g.n
            elif g.kind == "mlp":
                k = k_for_ratio(g.n, r)
                gram = None
                if pool is not None and g in gram_groups:
                    mine = pending.pop(g.id, None)
                    nxt = gram_groups.index(g) + 1
                    if nxt < len(gram_groups):   # at most one Gram matrix computed ahead (256 MB at n = 8192);
                        g2 = gram_groups[nxt]    # submitted first: the first group's runs side by side with it
                        pending[g2.id] = pool.submit(_mlp_gram, layers[g2.layer].mlp, k_for_ratio(g2.n, plan.ratio_for(
                            g2.id)), group_seed(plan, g2), {**DEFAULT_CLUSTERING, **plan.clustering}["n_init"])
                    gram = mine.result() if mine is not None else _mlp_gram(layers[g.layer].mlp)
                labels, inertia = _fold_mlp(layers[g.layer].mlp, k, plan, method, seed, gram)
                del gram
                n_after = k
            else:
                labels, inertia, n_after = _fold_heads(layers[g.layer].self_attn, work.config, r, plan, method, seed)
            labels_out[g.id] = labels
            out_groups.append({"id": g.id, "kind": g.kind, "layer": g.layer, "unit": g.unit, "n_before": g.n,
                               "n_after": int(n_after), "ratio": r, "inertia": inertia,
                               "params_removed": int((g.n - n_after) * g.params_per_unit),
                               "seconds": round(time.perf_counter() - tg, 4)})
            if progress is not None:
                progress(f"{g.id}: {g.n} → {n_after} {g.unit}s", idx + 1, len(todo))
    uniform = sync_config(work)
    if not uniform:
        notes.append("layers have different sizes: save with foldviz.lm.save_lm (foldviz format), "
                     "not plain save_pretrained")
    elif config_problem(work.config):
        notes.append(f"transformers refuses this config ({config_problem(work.config)}): save_lm writes the "
                     "foldviz format")
    total = time.perf_counter() - t0
    return LMFoldResult(work, plan, method, out_groups, labels_out,
                        {"total": round(total, 4), "groups": round(sum(g["seconds"] for g in out_groups), 4)},
                        params_before, count_params(work), uniform, notes)
