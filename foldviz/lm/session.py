"""The app's facade for a language model: what every page shows for an LM, computed by the code the fold uses.

:class:`LMWorkbench` mirrors :class:`foldviz.session.Workbench` for Llama-layout decoders: the model's structure
(layers, heads, KV groups), per-group similarity and the fold's own clusters (:func:`foldviz.lm.fold.group_labels`,
the same features and seeds :func:`~foldviz.lm.fold.fold_lm` uses), plan previews, folds for the registry's LM
methods, perplexity on held-out text, generations, sweeps and the per-layer variance of the MLP outputs.
No Streamlit import; everything is memoised per workbench and thread-safe.
"""
from __future__ import annotations

import threading
import time
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..embedding import embed
from ..features import cosine_similarity, redundancy
from ..kmeans import k_for_ratio
from ..methods import label as method_label
from ..plans import FoldPlan, PlanError
from .corpus import TextError, split_text
from .evaluate import generate, mlp_variance_ratios, mlp_variances, perplexity
from .fold import LMFoldResult, check_plan, count_params, fold_lm, group_labels, head_features, lm_plan, mlp_features
from .groups import LMGroup, decoder_layers, find_lm_groups
from .io import LMLoadError, LoadedLM, list_lm_demos, load_lm

__all__ = ["LMWorkbench", "LMWorkbenchError", "is_lm_spec", "DEFAULT_TEXT", "DEFAULT_EVAL_TOKENS", "SWEEP_RATIOS"]

#: held-out text of the bundled demos
DEFAULT_TEXT = "shakespeare:test"
#: tokens scored per perplexity in the app (whole windows of the context length; the CLI scores everything)
DEFAULT_EVAL_TOKENS = 16_384
#: the results page's perplexity-vs-removed-parameters sweep
SWEEP_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)


class LMWorkbenchError(ValueError):
    """A one-line, user-facing problem (bad spec, invalid plan, unreadable text)."""


def is_lm_spec(spec: str | None) -> bool:
    """``hf:DIR`` or a bundled LM demo (``demo:NAME`` with a causal-LM card)."""
    if not spec:
        return False
    s = str(spec)
    return s.startswith("hf:") or (s.startswith("demo:") and s[5:] in list_lm_demos())


class LMWorkbench:
    """A loaded language model with its foldable groups and memoised analyses (never folded in place)."""

    def __init__(self, lm: LoadedLM):
        self.lm = lm
        self.groups: list[LMGroup] = find_lm_groups(lm.model)
        self._lock = threading.RLock()
        self._model_lock = threading.RLock()   # hooks and folds on the base model: one at a time
        self._memo: dict[tuple, object] = {}

    @classmethod
    def load(cls, spec: str) -> "LMWorkbench":
        try:
            return cls(load_lm(spec))
        except (LMLoadError, ValueError, OSError) as exc:
            raise LMWorkbenchError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None

    def _get(self, key: tuple, fn):
        with self._lock:
            if key in self._memo:
                return self._memo[key]
        value = fn()
        with self._lock:
            return self._memo.setdefault(key, value)

    # ---- structure ------------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self.lm.model

    @property
    def spec(self) -> str:
        return self.lm.spec

    @property
    def source(self):
        """The app's ModelSource for this model (imported here: the library never depends on the app's memory)."""
        from ..session import ModelSource

        return ModelSource(self.spec)

    @staticmethod
    def data_label(_data=None) -> str:
        return "held-out text (see the Model & data page)"

    @property
    def weights_sha256(self) -> str:
        from ..utils import state_dict_hash

        return self._get(("sha",), lambda: state_dict_hash(self.model))

    def foldable_ids(self, kind: str | None = None) -> list[str]:
        return [g.id for g in self.groups if g.foldable and (kind is None or g.kind == kind)]

    def group(self, group_id: str) -> LMGroup:
        for g in self.groups:
            if g.id == group_id:
                return g
        raise LMWorkbenchError(f"unknown group {group_id!r}")

    def summary(self) -> dict:
        """Architecture numbers for the model page."""
        c = self.model.config
        heads = [g for g in self.groups if g.kind == "heads"]
        nq = int(getattr(c, "num_attention_heads", 0))
        nkv = int(getattr(c, "num_key_value_heads", nq) or nq)
        emb = self.model.get_input_embeddings().weight.numel()
        return {"spec": self.spec, "arch": type(self.model).__name__, "model_type": getattr(c, "model_type", "?"),
                "layers": len(decoder_layers(self.model)), "hidden": int(c.hidden_size),
                "heads": nq, "kv_heads": nkv, "heads_per_kv": nq // max(1, nkv),
                "head_dim": int(heads[0].head_dim) if heads else int(getattr(c, "head_dim", 0) or 0),
                "mlp": int(getattr(c, "intermediate_size", 0)), "vocab": int(c.vocab_size),
                "context": self.lm.context_length, "params": count_params(self.model),
                "params_non_embedding": count_params(self.model) - emb,
                "tied_embeddings": bool(getattr(c, "tie_word_embeddings", False)),
                "attention": "MHA" if nq == nkv else f"GQA ({nq // max(1, nkv)} query heads per KV head)",
                "foldable_groups": len(self.foldable_ids()), "groups": len(self.groups), "card": self.lm.card}

    def group_rows(self) -> list[dict]:
        return [{"group": g.id, "kind": g.kind, "layer": g.layer, "units": g.n, "unit": g.unit,
                 "foldable": g.foldable, "KV groups": g.kv_groups if g.kind == "heads" else None,
                 "heads per KV group": g.heads_per_kv if g.kind == "heads" else None,
                 "params per unit": g.params_per_unit, "why not foldable": g.reason} for g in self.groups]

    # ---- plans ------------------------------------------------------------------------------------------
    def default_plan(self, ratio: float = 0.2, seed: int = 0) -> FoldPlan:
        return lm_plan(float(ratio), seed=int(seed), model=self.spec)

    def plan_from(self, plan_dict: dict) -> FoldPlan:
        try:
            plan = FoldPlan.from_dict(dict(plan_dict))
            check_plan(plan, self.groups)
        except (PlanError, ValueError, TypeError) as exc:
            raise LMWorkbenchError(str(exc)) from None
        return plan

    def head_options(self, group_id: str) -> list[int]:
        """Valid numbers of query heads kept per KV group (MHA: heads kept in the layer)."""
        g = self.group(group_id)
        per = g.n if g.mha else g.heads_per_kv
        return list(range(1, per + 1))

    @staticmethod
    def ratio_for_heads(per: int, keep: int) -> float:
        """A ratio whose k = round(per (1 - r)) is exactly ``keep`` (the plan stores ratios)."""
        return round(1.0 - keep / per, 6)

    def sizes(self, plan: FoldPlan) -> list[dict]:
        """Units before/after and parameters removed per foldable group under ``plan`` (no folding)."""
        rows = []
        for g in self.groups:
            if not g.foldable:
                continue
            r = 0.0 if g.id in plan.skip else plan.ratio_for(g.id)
            if g.kind == "heads" and not g.mha:
                after = g.kv_groups * k_for_ratio(g.heads_per_kv, r)
            else:
                after = k_for_ratio(g.n, r)
            rows.append({"id": g.id, "kind": g.kind, "layer": g.layer, "n_before": g.n, "n_after": after,
                         "ratio": r, "params_removed": (g.n - after) * g.params_per_unit})
        return rows

    def preview(self, plan: FoldPlan) -> dict:
        rows = self.sizes(plan)
        before = count_params(self.model)
        removed = sum(r["params_removed"] for r in rows)
        return {"params_before": before, "params_after": before - removed, "removed_fraction": removed / before,
                "groups": rows}

    # ---- one group ----------------------------------------------------------------------------------------
    def features(self, group_id: str) -> np.ndarray:
        """(units, d) features the fold clusters (MLP: gate | up | down column; heads: q block | o columns)."""
        g = self.group(group_id)
        layer = decoder_layers(self.model)[g.layer]

        def compute():
            if g.kind == "mlp":
                return mlp_features(layer.mlp).numpy()
            return head_features(layer.self_attn, self.model.config)[0].numpy()
        return self._get(("features", group_id), compute)

    def similarity(self, group_id: str) -> np.ndarray:
        return self._get(("sim", group_id), lambda: cosine_similarity(self.features(group_id)))

    def cluster(self, group_id: str, plan: FoldPlan, ratio: float | None = None) -> np.ndarray:
        """The fold's clusters: new unit index of each unit (``fold_lm``'s labels for this group)."""
        g = self.group(group_id)
        r = plan.ratio_for(group_id) if ratio is None else float(ratio)
        key = ("cluster", group_id, round(r, 6), plan.seed, repr(sorted(plan.clustering.items())))
        return self._get(key, lambda: group_labels(self.model, g, plan, r)[0])

    def group_detail(self, group_id: str, plan: FoldPlan, ratio: float | None = None) -> dict:
        """What the explorer draws for one group: similarity, the fold's clusters, a PCA embedding."""
        g = self.group(group_id)
        labels = self.cluster(group_id, plan, ratio)
        x = self.features(group_id)
        emb = self._get(("embed", group_id), lambda: embed(x, "pca", seed=plan.seed))
        # MLP neurons by cluster; query heads in head order, i.e. KV group by KV group (clusters live inside one)
        order = np.arange(g.n) if g.kind == "heads" else np.lexsort((np.arange(g.n), labels))
        return {"id": group_id, "kind": g.kind, "n": g.n, "k": int(len(np.unique(labels))), "labels": labels,
                "order": order, "similarity": self.similarity(group_id), "coords": emb.coords,
                "features_dim": int(x.shape[1]), "kv_groups": g.kv_groups if g.kind == "heads" else 1,
                "heads_per_kv": g.heads_per_kv if g.kind == "heads" else None, **redundancy(x)}

    # ---- folding and measuring --------------------------------------------------------------------------
    def fold(self, plan: FoldPlan, method: str = "fold") -> LMFoldResult:
        with self._model_lock:
            try:
                return fold_lm(self.model, plan, method=method)
            except (PlanError, ValueError) as exc:
                raise LMWorkbenchError(str(exc)) from None

    def tokens(self, text: str = DEFAULT_TEXT) -> torch.Tensor:
        """The evaluation token stream of a text spec (``shakespeare:test`` or ``text:FILE``)."""
        def compute():
            try:
                return self.lm.encode_documents(split_text(text))
            except (TextError, LMLoadError) as exc:
                raise LMWorkbenchError(str(exc)) from None
        return self._get(("tokens", text), compute)

    def _windows(self, text: str, max_tokens: int | None) -> tuple[torch.Tensor, int | None]:
        toks = self.tokens(text)
        seq = self.lm.context_length
        return toks, (None if not max_tokens else max(1, int(max_tokens) // seq))

    def perplexity(self, model: nn.Module | None, text: str = DEFAULT_TEXT,
                   max_tokens: int | None = DEFAULT_EVAL_TOKENS) -> dict:
        """Perplexity (:data:`foldviz.lm.PROTOCOL`) on the first ``max_tokens`` tokens (whole windows)."""
        toks, windows = self._windows(text, max_tokens)

        def run(m):
            try:
                return perplexity(m, toks, max_windows=windows)
            except ValueError as exc:
                raise LMWorkbenchError(f"{text}: {exc}") from None
        if model is None:
            return self._get(("ppl", text, max_tokens), lambda: run(self.model))
        return run(model)

    def generate(self, model: nn.Module | None, prompt: str, max_new_tokens: int = 40) -> str:
        if self.lm.tokenizer is None:
            raise LMWorkbenchError(f"{self.spec} has no tokenizer.json: generation needs one")
        if not prompt:
            raise LMWorkbenchError("the prompt is empty")
        return generate(model if model is not None else self.model, self.lm.tokenizer, prompt,
                        max_new_tokens=int(max_new_tokens))

    def mlp_variance(self, folded: nn.Module, text: str = DEFAULT_TEXT, max_tokens: int = 4096) -> list[dict]:
        """Per decoder layer: Var(folded MLP output) / Var(original MLP output) on the same held-out tokens
        (:func:`foldviz.lm.evaluate.mlp_variance_ratios`)."""
        toks = self.tokens(text)
        with self._model_lock:
            base = self._get(("mlpvar", text, max_tokens),
                             lambda: mlp_variances(self.model, toks, max_tokens=max_tokens))
            return mlp_variance_ratios(self.model, folded, toks, max_tokens=max_tokens, base=base)

    def sweep(self, ratios: Sequence[float] = SWEEP_RATIOS, methods: Sequence[str] = ("fold", "magnitude", "random"),
              *, seed: int = 0, text: str = DEFAULT_TEXT, max_tokens: int | None = DEFAULT_EVAL_TOKENS,
              base_plan: FoldPlan | None = None, progress=None) -> list[dict]:
        """Perplexity vs. fraction of parameters removed: every method at every uniform ratio (same units)."""
        rows = [{"method": "original", "ratio": 0.0, "removed_fraction": 0.0,
                 "perplexity": self.perplexity(None, text, max_tokens)["perplexity"],
                 "params": count_params(self.model)}]
        base_plan = base_plan or self.default_plan()
        todo = [(m, r) for m in methods for r in ratios]
        for i, (m, r) in enumerate(todo):
            t = time.perf_counter()
            res = self.fold(base_plan.with_changes(default_ratio=float(r), ratios={}, skip=[], seed=seed), m)
            ppl = self.perplexity(res.model, text, max_tokens)["perplexity"]
            rows.append({"method": m, "ratio": float(r), "removed_fraction": res.removed_fraction,
                         "perplexity": ppl, "params": res.params_after, "seconds": time.perf_counter() - t})
            if progress:
                progress("sweep", i + 1, len(todo))
        return rows

    @staticmethod
    def method_label(key: str) -> str:
        return method_label(key)
