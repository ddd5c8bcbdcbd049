"""The language-model kind: what a decoder LM supplies to foldviz's one pipeline.

Everything else (plans, clustering, the merge rule, pruning baselines, repairs, reports, persistence safety,
sweeps, the CLI and the app) is the engine's, shared with image classifiers. This module holds only what differs:

* :class:`DecoderStructure` — how the groups are found (:func:`foldviz.lm.groups.find_lm_groups`: MLP neurons and
  query heads per layer, described as ordinary channel groups) and how a decision is applied: the engine's merge
  rule (:func:`foldviz.surgery.merge_member`) followed by replacing each projection with a smaller ``nn.Linear``
  in the weights' own dtype, then the config and the attention modules are synchronised with the new sizes;
* :class:`LanguageModelKind` — evaluation (perplexity on a text spec), the per-layer variance measure, the cost
  model's example input (one token), what can be written as a transformers directory, and writing it.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from torch import nn

from ..kmeans import DEFAULT_CLUSTERING, k_for_ratio
from ..methods import DEFAULT_LM_REPAIR
from ..plans import FoldPlan, PlanError
from ..surgery import Decision, merge_member
from .groups import config_problem, find_lm_groups, is_uniform, layer_sizes, sync_config
from .io import FOLDVIZ_LM_FORMAT, hf_problem, write_lm

__all__ = ["DecoderStructure", "DECODER", "LanguageModelKind", "sizes_after", "nearest_expressible", "LM_FORMATS",
           "LM_CLUSTERING"]

#: formats a folded language model can be written in: a transformers directory, or foldviz's per-layer format
LM_FORMATS = ("hf", FOLDVIZ_LM_FORMAT)
# Ward (agglomerative, deterministic), the authors' LLM configuration: measured on four decoders at ratios 0.1-0.5
# (benchmarks/results/lm_research.md) it beats foldviz's k-means on average (k-means 1.025x Ward's perplexity), and
# with Fold + refit on top the two are within 0.5 % (Ward 0.719x, k-means 0.723x the Ward fold's perplexity).
# Memory: the condensed distance matrix of a group, n (n - 1) / 2 doubles (8192 MLP neurons: 268 MB).
LM_CLUSTERING = {**DEFAULT_CLUSTERING, "algorithm": "ward"}


def _shrink(lin: nn.Linear, side: str, idx: list[int]) -> nn.Linear:
    """A new Linear holding the rows (``side="out"``) or columns (``"in"``) ``idx`` of ``lin``, same dtype."""
    sel = torch.as_tensor(idx, dtype=torch.long, device=lin.weight.device)
    w = lin.weight.detach().index_select(0 if side == "out" else 1, sel)
    b = lin.bias
    if b is not None:
        b = b.detach().index_select(0, sel) if side == "out" else b.detach()
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
    new.weight = nn.Parameter(w.contiguous(), requires_grad=False)
    if b is not None:
        new.bias = nn.Parameter(b.contiguous(), requires_grad=False)
    return new


class LMSurgery:
    """Applies per-group decisions to a decoder and keeps the output-row maps of the projections it changes."""

    def __init__(self, work: nn.Module, graph):
        self.work, self.graph = work, graph
        self.maps: dict[str, np.ndarray] = {}   # projection -> new index of each original output row (-1 removed)

    def apply(self, gid: str, n: int, d: Decision) -> None:
        group = self.graph.by_id[gid]
        for mem in group.members:
            parent, _, attr = mem.module.rpartition(".")
            mod = self.work.get_submodule(mem.module)
            by_root: dict[int, list[int]] = defaultdict(list)   # unit -> this projection's rows (or columns)
            pos = []
            for i, r in zip(mem.idxs, mem.root_idxs):
                pos.append(len(by_root[r]))
                by_root[r].append(i)
            target = list(mem.idxs)
            if d.rep_of is not None:   # the engine's merge rule, in place on the representative rows
                target = [by_root[int(d.rep_of[r])][p] for r, p in zip(mem.root_idxs, pos)]
                merge_member(mod, mem.side, mem.idxs, target, d.rule)
            kept = sorted(i for r in d.keep for i in by_root[r])
            size = mod.out_features if mem.side == "out" else mod.in_features
            kept = sorted(set(kept) | (set(range(size)) - set(mem.idxs)))   # rows no unit owns stay
            setattr(self.work.get_submodule(parent), attr, _shrink(mod, mem.side, kept))
            if mem.side == "out":
                rank = np.full(size, -1, dtype=np.int64)
                rank[kept] = np.arange(len(kept))
                cmap = np.arange(size)
                cmap[mem.idxs] = rank[target]
                self.maps[mem.module] = rank[cmap]


class DecoderStructure:
    """How the engine finds and changes a decoder's groups (see the module docstring)."""

    def trace(self, model: nn.Module, example_input: torch.Tensor):
        return None, find_lm_groups(model)

    def surgery(self, work: nn.Module, dg, graph) -> LMSurgery:
        return LMSurgery(work, graph)

    def finish(self, ctx) -> list[str]:
        """Write the new sizes into the config and the attention modules; notes for the report."""
        notes = []
        if not sync_config(ctx.work):
            notes.append("layers have different sizes: transformers cannot load this model; it is saved in "
                         "foldviz's per-layer format")
        else:
            why = config_problem(ctx.work.config)
            if why:
                notes.append(f"transformers refuses this config ({why}): it is saved in foldviz's per-layer format")
        return notes


DECODER = DecoderStructure()


# ---------------------------------------------------------------------------------------------------------------
# what a plan gives, before folding
# ---------------------------------------------------------------------------------------------------------------
def sizes_after(model: nn.Module, graph, plan: FoldPlan) -> list[dict]:
    """Per decoder layer, the sizes ``plan`` leaves (read from the groups, nothing is folded)."""
    sizes = [dict(s) for s in layer_sizes(model)]
    for g in graph.foldable:
        r = plan.ratio_for(g.id)
        if r <= 0:
            continue
        k = k_for_ratio(g.per_partition, r)
        s = sizes[g.layer]
        if g.role == "mlp":
            s["intermediate_size"] = k
        elif g.role == "heads":
            s["num_attention_heads"] = k * g.partitions
            if g.info.get("mha"):
                s["num_key_value_heads"] = k
    return sizes


def _valid_heads(config, s: dict, per_kv: int, kv: int, mha: bool) -> list[int]:
    """Query heads per KV group (MHA: heads) that transformers accepts for this config, 1..per_kv."""
    ok = []
    for h in range(1, per_kv + 1):
        nq, nkv = (h, h) if mha else (h * kv, kv)
        if not config_problem(config, num_attention_heads=nq, num_key_value_heads=nkv, head_dim=s["head_dim"],
                              intermediate_size=s["intermediate_size"]):
            ok.append(h)
    return ok


def nearest_expressible(model: nn.Module, graph, plan: FoldPlan) -> tuple[FoldPlan, str]:
    """The plan nearest to ``plan`` whose folded model one transformers config can hold: every layer the same
    sizes (the mean kept count of the plan's layers) and a head count the config accepts (the nearest one, more
    heads on a tie). Returns (plan, a short description)."""
    mlp = [g for g in graph.foldable if g.role == "mlp"]
    heads = [g for g in graph.foldable if g.role == "heads"]
    ratios: dict[str, float] = {}
    desc = []
    if mlp:
        n = mlp[0].channels
        k = int(round(np.mean([k_for_ratio(n, plan.ratio_for(g.id)) for g in mlp])))
        ratios.update({g.id: round(1.0 - k / n, 6) for g in mlp})
        desc.append(f"{k} of {n} MLP neurons")
    if heads:
        g0 = heads[0]
        per, kv, mha = g0.per_partition, g0.partitions, bool(g0.info.get("mha"))
        want = float(np.mean([k_for_ratio(per, plan.ratio_for(g.id)) for g in heads]))
        base = sizes_after(model, graph, plan.with_changes(ratios={**plan.ratios, **ratios}))[0]
        valid = _valid_heads(model.config, base, per, kv, mha) or [per]
        h = min(valid, key=lambda v: (abs(v - want), -v))
        ratios.update({g.id: round(1.0 - h / per, 6) for g in heads})
        desc.append(f"{h} of {per} query heads" + ("" if mha else " per KV group"))
    near = plan.with_changes(ratios=ratios, skip=[])
    return near, " and ".join(desc) + " in every layer"


class LanguageModelKind:
    """A decoder language model (Llama layout): the kind adapter :mod:`foldviz.kinds` registers as ``"lm"``."""

    key = "lm"
    label = "language model"
    a_label = "a language model"
    units = "units"                 # MLP neurons and query heads
    metric = "perplexity"
    metric_label = "Perplexity"
    higher_is_better = False
    data_label = "text"
    structure = DECODER
    output_formats = LM_FORMATS
    default_ratio = 0.2

    def graph(self, loaded):
        return find_lm_groups(loaded.model)

    def default_plan(self, loaded, ratio: float | None = None, **fields) -> FoldPlan:
        fields.setdefault("repair", DEFAULT_LM_REPAIR)
        fields.setdefault("clustering", dict(LM_CLUSTERING))
        return FoldPlan(default_ratio=self.default_ratio if ratio is None else float(ratio), **fields)

    def default_data(self, loaded) -> str | None:
        return "shakespeare:test" if getattr(loaded, "source", None) == "demo" else None

    def cost_input(self, loaded) -> torch.Tensor:
        """One token: the cost model and the report count FLOPs per token (linear layers)."""
        return loaded.example_input(1)[:, :1]

    flops_unit = "FLOPs per token (2 per MAC; linear layers, attention over the context not counted)"

    def tokens(self, loaded, text: str) -> torch.Tensor:
        from .corpus import split_text

        return loaded.encode_documents(split_text(text))

    def check_data(self, loaded, text: str) -> None:
        """One-line error when ``text`` cannot be read or is shorter than one window."""
        n = self.tokens(loaded, text).numel()
        if n < loaded.context_length:
            raise PlanError(f"{text} has {n} tokens, fewer than one window of the model's context "
                            f"({loaded.context_length} tokens)")

    def prepare_eval(self, loaded, text: str, limit: int | None = None) -> torch.Tensor:
        """What :meth:`evaluate` reads, tokenised once: the token stream of ``text``."""
        return self.tokens(loaded, text)

    def evaluate(self, loaded, model: nn.Module, text: str, limit: int | None = None, progress=None, *,
                 prepared: torch.Tensor | None = None, device=None) -> dict:
        """Perplexity on ``text`` (``limit``: at most that many windows of the context length)."""
        from .evaluate import perplexity

        toks = self.tokens(loaded, text) if prepared is None else prepared
        try:
            res = perplexity(model, toks, max_windows=limit, device=device, progress=progress)
        except ValueError as e:
            raise PlanError(f"{text}: {e}") from None
        return {"perplexity": res["perplexity"], "loss": res["nll"], "samples": res["windows"],
                "tokens": res["tokens_scored"], "seq_len": res["seq_len"], "protocol": res["protocol"]}

    def variance(self, loaded, original: nn.Module, folded: nn.Module, result, text: str | None, n: int,
                 notes: list | None = None):
        """Per decoder layer: Var(folded MLP output) / Var(original MLP output) on the same ``n * 32`` tokens."""
        from .evaluate import mlp_variance_ratios

        n = int(n) * 32   # a variance "sample" of an LM: 32 tokens (128 samples: 4096 tokens)
        if text:
            toks, desc = self.tokens(loaded, text), f"up to {n} tokens of {text}"
        else:
            g = torch.Generator().manual_seed(1)
            toks = torch.randint(0, int(loaded.model.config.vocab_size), (n,), generator=g)
            desc = f"{n} random tokens (no text given)"
        return mlp_variance_ratios(original, folded, toks, max_tokens=n), desc

    def check_output(self, loaded, graph, plan: FoldPlan, fmt: str | None = None) -> None:
        """Refuse, before folding, a plan whose result cannot be written as ``fmt`` (default ``"hf"``); name the
        nearest plan that can."""
        fmt = fmt or "hf"
        if fmt not in LM_FORMATS:
            raise PlanError(f"unknown format {fmt!r} for a language model; choose one of {', '.join(LM_FORMATS)}")
        if fmt != "hf":
            return
        sizes = sizes_after(loaded.model, graph, plan)
        why = ""
        if not is_uniform(sizes):
            why = "it leaves layers of different sizes, which one transformers config cannot hold"
        else:
            s = sizes[0]
            why = config_problem(loaded.model.config, **s)
        if why:
            near, desc = nearest_expressible(loaded.model, graph, plan)
            raise PlanError(f"this plan cannot be saved as a transformers model: {why}; the nearest plan that can "
                            f"keeps {desc} (ratios {sorted(set(near.ratios.values()))}), or save it with "
                            f"--format {FOLDVIZ_LM_FORMAT} (loads with foldviz only)")

    def write(self, out, result, loaded, fmt: str = "hf") -> dict:
        why = hf_problem(result.model) if fmt == "hf" else ""
        if why:
            raise PlanError(f"cannot save this fold as a transformers model: {why}; save it with "
                            f"format {FOLDVIZ_LM_FORMAT!r} (loads with foldviz only)")
        written = write_lm(out, result.model, tokenizer=getattr(loaded, "tokenizer", None), fmt=fmt,
                           card=loaded.card)
        return {"lm_format": written}
