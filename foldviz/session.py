"""The app's memory, without Streamlit: one loaded model of any kind and what it is worth remembering about it.

    from foldviz.session import ModelSource, DataSource, Workbench
    wb = Workbench.load(ModelSource("demo:digits-resnet"))          # or "demo:shakespeare-llama", "hf:DIR", ...
    plan = wb.default_plan(0.3)
    detail = wb.group_detail("layer1.0.conv1", plan)                 # the clusters the fold will use
    outcome = wb.fold(plan, DataSource("digits"))                    # FoldOutcome: FoldResult + the one report

A Workbench memoises engine results: the groups, the weights hash, the model in each feature space, features,
similarities and clusterings, the cost model, evaluations and folds. Every number comes from the library
(:func:`foldviz.fold.cluster_group`, :class:`foldviz.plans.CostModel`, :func:`foldviz.apply.apply_method`,
:func:`foldviz.report.build_report`, the model kind's :mod:`foldviz.kinds` hooks), so what a page shows is what
the CLI computes. Background work runs in :mod:`foldviz.jobs`. The base model is read-only; folds work on copies.
User-facing failures raise :class:`WorkbenchError` (a ``ValueError``).
"""
from __future__ import annotations

import hashlib
import json
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from . import checkpoints, explain
from .apply import DEFAULT_REPAIR_SAMPLES, apply_method, repair_inputs
from .checkpoints import SAFETENSORS_SUFFIXES, TORCH_SUFFIXES
from .embedding import embed
from .executors import executor_from_env
from .features import cosine_similarity, group_features, redundancy
from .fold import cluster_group, feature_model, feature_scaling, fused_bns
from .groups import GroupGraph
from .jobs import Runner
from .kinds import kind_of
from .kmeans import ClusterResult, cluster_order, k_for_ratio
from .methods import METHODS, keys_for, plan_method
from .metrics import count_params, model_size_bytes
from .models import load_model
from .persist import folded_zip
from .plans import CostModel, FoldPlan, suggest, suggest_ratio
from .repair import REPAIRS
from .report import build_report
from .surgery import FoldResult
from .sweep import sweep
from .utils import Progress, atomic_write_bytes, resolve_device, state_dict_hash
from .zoo import LoadedModel

DEFAULT_MODEL = "demo:digits-resnet"


class WorkbenchError(ValueError):
    """Something the user asked for cannot be done; the message says why."""


@dataclass(frozen=True)
class ModelSource:
    """What to load: a model spec plus options (plain, hashable data: a cache key and session state)."""

    spec: str = DEFAULT_MODEL
    weights: str | None = None          # path to a checkpoint file (uploads are written to disk first)
    weights_name: str | None = None     # original file name, for display
    num_classes: int | None = None
    cifar_stem: bool = False

    @property
    def label(self) -> str:
        extra = []
        if self.weights_name or self.weights:
            extra.append(f"weights {self.weights_name or Path(self.weights).name}")
        if self.cifar_stem:
            extra.append("CIFAR stem")
        if self.num_classes:
            extra.append(f"{self.num_classes} classes")
        return self.spec + (f" ({', '.join(extra)})" if extra else "")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "ModelSource":
        return cls(**(d or {}))


@dataclass(frozen=True)
class DataSource:
    """Evaluation data: a dataset spec ("digits", "cifar10:ROOT", "imagefolder:DIR") or None."""

    spec: str | None = "digits"
    limit: int | None = 500                          # evaluation samples (language models: windows; None = all)
    repair_samples: int = DEFAULT_REPAIR_SAMPLES     # real training inputs for Fold-R / REPAIR
    calib: str | None = None                         # language models: calibration text for Wanda-sp / FLAP

    @property
    def label(self) -> str:
        if not self.spec:
            return "no evaluation data"
        return f"{self.spec} (up to {self.limit} test samples)" if self.limit else f"{self.spec} (all of it)"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "DataSource":
        return cls(**(d or {}))


#: the app evaluates language models on the first this many tokens (whole windows; the CLI scores everything)
LM_EVAL_TOKENS = 16_384


def default_data_for(loaded: LoadedModel) -> DataSource:
    """The evaluation data a freshly loaded model starts with: the bundled digits for the vision demos, the
    held-out plays for the language-model demos, none otherwise."""
    spec = kind_of(loaded).default_data(loaded)
    if spec is None:
        return DataSource(None)
    if loaded.kind == "lm":
        return DataSource(spec, max(1, LM_EVAL_TOKENS // loaded.context_length))
    return DataSource(spec)


def save_upload(data: bytes, filename: str, directory: str | Path | None = None) -> str:
    """Write uploaded checkpoint bytes to a content-addressed temp file and return its path."""
    limit = checkpoints.MAX_UPLOAD_BYTES
    if len(data) > limit:
        raise WorkbenchError(f"{filename} is {len(data) / 2**20:.0f} MiB; uploads are limited to "
                             f"{limit / 2**20:.0f} MiB (use the command line with --weights for larger files)")
    suffix = Path(filename).suffix.lower()
    if suffix not in SAFETENSORS_SUFFIXES + TORCH_SUFFIXES:
        raise WorkbenchError(f"{filename}: upload a .safetensors file or a weights-only state dict "
                             f"({', '.join(TORCH_SUFFIXES)})")
    d = Path(directory or Path(tempfile.gettempdir()) / "foldviz-uploads")
    d.mkdir(parents=True, exist_ok=True)
    path = d / (hashlib.sha256(data).hexdigest()[:32] + suffix)
    if not path.exists():  # atomic: a crash never leaves a truncated file under the content-addressed name
        atomic_write_bytes(path, data)
    return str(path)


@dataclass
class FoldOutcome:
    """A fold's result (with the folded model) and its report (:data:`foldviz.report.REPORT_KEYS`)."""

    result: FoldResult
    report: dict

    @property
    def model(self) -> nn.Module:
        return self.result.model


def _space(repair: str) -> str:
    return REPAIRS[repair].feature_space


def _exclusive(method):
    """Run a Workbench method under the workbench's model lock (see ``Workbench._model_lock``)."""
    import functools

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._model_lock:
            return method(self, *args, **kwargs)
    return wrapper


#: test samples behind the plan page's live accuracy estimate
QUICK_EVAL_SAMPLES = 256

#: the Layer explorer's ratio slider stops (0 to 0.95 in steps of 0.05)
SLIDER_RATIOS = tuple(round(0.05 * i, 2) for i in range(20))


class Workbench:
    """A loaded base model of any kind with its groups and memoised per-group analyses."""

    def __init__(self, loaded: LoadedModel, source: ModelSource | None = None):
        self.loaded = loaded
        self.kind = kind_of(loaded)
        self.source = source or ModelSource(loaded.spec)
        self.weights_sha256 = state_dict_hash(loaded.model)
        # one device for the explorer's clusterings and the fold: a GPU's float32 Gram rounds differently from
        # the CPU's, so clustering on one and folding on the other could break near-ties differently
        self.device = resolve_device(None)
        self._lock = threading.RLock()
        self._memo: dict[tuple, object] = {}
        self._pending: dict[tuple, threading.Event] = {}   # keys being computed (by another thread)
        self.jobs = Runner()                                 # background work (live estimates, precomputations)
        # folds, repairs and measurements put forward hooks on the base model: one at a time per model (a
        # background estimate may fold while a page folds too)
        self._model_lock = threading.RLock()

    @classmethod
    def load(cls, source: ModelSource | str) -> "Workbench":
        source = ModelSource(source) if isinstance(source, str) else source
        try:
            loaded = load_model(source.spec, weights=source.weights, num_classes=source.num_classes,
                                cifar_stem=source.cifar_stem)
        except (ValueError, OSError, RuntimeError) as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if source.weights and source.weights_name:  # name the user's file, never foldviz's temp copy
                msg = msg.replace(str(source.weights), source.weights_name).replace(
                    Path(source.weights).name, source.weights_name)
            raise WorkbenchError(f"could not load {source.label}: {msg}") from None
        return cls(loaded, source)

    def _locked(self, fn):
        with self._model_lock:
            return fn()

    def _get(self, key: tuple, fn):
        """Memoised ``fn()``. The lock is not held while computing, so a background precomputation never blocks
        the page; a key already being computed elsewhere is waited for, never computed twice."""
        while True:
            with self._lock:
                if key in self._memo:
                    return self._memo[key]
                ev = self._pending.get(key)
                owner = ev is None
                if owner:
                    ev = self._pending[key] = threading.Event()
            if not owner:
                ev.wait()
                continue  # computed (or failed: then this thread tries itself)
            try:
                value = fn()
                with self._lock:
                    self._memo[key] = value
                return value
            finally:
                with self._lock:
                    self._pending.pop(key, None)
                ev.set()

    def memo(self, key: tuple, fn):
        """Memoise ``fn()`` under ``key`` in this workbench (for views that combine several engine results)."""
        return self._get(("view",) + tuple(key), fn)

    def cached(self, key: tuple):
        """A memoised value if it is already there (None otherwise): lets a page show what is ready at once."""
        with self._lock:
            return self._memo.get(key)

    # ---- the model ------------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """The base model. Read-only: never fold or train it in place."""
        return self.loaded.model

    @property
    def spec(self) -> str:
        return self.loaded.spec

    @property
    def methods(self) -> tuple[str, ...]:
        """Registry keys of the methods that apply to this model's kind."""
        return keys_for(self.kind.key)

    @property
    def fold_methods(self) -> tuple[str, ...]:
        """The fold-family methods (the plan's repairs for image classifiers; "fold" for language models)."""
        return tuple(k for k in self.methods if METHODS[k].family == "fold")

    def default_method(self, plan: FoldPlan) -> str:
        """The method a plan's fold runs (:func:`foldviz.methods.plan_method`)."""
        try:
            return plan_method(self.kind.key, plan.repair)
        except ValueError as exc:
            raise WorkbenchError(str(exc)) from None

    def example_input(self, batch: int = 2) -> torch.Tensor:
        return self.loaded.example_input(batch)

    @property
    def graph(self) -> GroupGraph:
        return self._get(("graph",), lambda: self._locked(lambda: self.kind.graph(self.loaded)))

    @property
    def cost(self) -> CostModel:
        graph = self.graph
        return self._get(("cost",), lambda: self._locked(
            lambda: CostModel(self.model, graph, self.kind.cost_input(self.loaded))))

    def summary(self) -> dict:
        g, card = self.graph, self.loaded.card
        out = {
            "spec": self.spec, "kind": self.kind.key, "kind_label": self.kind.label, "label": self.source.label,
            "arch": card.get("arch") or type(self.model).__name__, "input_shape": list(self.loaded.input_shape),
            "num_classes": card.get("num_classes"), "params": count_params(self.model), "flops": self.cost.flops,
            "flops_unit": self.kind.flops_unit, "size_bytes": self._get(("size",), lambda: model_size_bytes(self.model)),
            "groups": len(g.groups), "foldable_groups": len(g.foldable),
            "foldable_units": int(sum(x.channels for x in g.foldable)), "note": self.loaded.note,
            "graph_error": g.error, "weights_sha256": self.weights_sha256,
            "card": {k: v for k, v in card.items() if k != "history"},
        }
        if self.kind.key == "lm":
            out.update(self._lm_facts())
        return out

    def _lm_facts(self) -> dict:
        c = self.model.config
        heads = [g for g in self.graph.groups if g.role == "heads"]
        nq = int(getattr(c, "num_attention_heads", 0))
        nkv = int(getattr(c, "num_key_value_heads", nq) or nq)
        emb = self.model.get_input_embeddings().weight.numel()
        return {"model_type": getattr(c, "model_type", "?"), "layers": int(c.num_hidden_layers),
                "hidden": int(c.hidden_size), "heads": nq, "kv_heads": nkv, "heads_per_kv": nq // max(1, nkv),
                "head_dim": int(heads[0].info["head_dim"]) if heads else int(getattr(c, "head_dim", 0) or 0),
                "mlp": int(getattr(c, "intermediate_size", 0)), "vocab": int(c.vocab_size),
                "context": self.loaded.context_length, "params_non_embedding": count_params(self.model) - emb,
                "tied_embeddings": bool(getattr(c, "tie_word_embeddings", False)), "dtype": str(self.loaded.dtype),
                "attention": "MHA" if nq == nkv else f"GQA ({nq // max(1, nkv)} query heads per KV head)"}

    @_exclusive
    def architecture_rows(self, max_rows: int = 400) -> list[dict]:
        """One row per leaf module: name, type, output shape (batch 1), parameters."""
        shapes: dict[str, list[int]] = {}
        leaves = [(n, m) for n, m in self.model.named_modules() if n and not list(m.children())]
        hooks = [mod.register_forward_hook(lambda _m, _i, out, name=name: shapes.__setitem__(name, list(out.shape[1:]))
                                           if torch.is_tensor(out) else None) for name, mod in leaves]
        try:
            with torch.no_grad():
                self.model(self.kind.cost_input(self.loaded))
        finally:
            for h in hooks:
                h.remove()
        return [{"module": name, "type": type(mod).__name__,
                 "output shape": "×".join(str(s) for s in shapes.get(name, [])) or "—",
                 "parameters": int(sum(p.numel() for p in mod.parameters(recurse=False)))}
                for name, mod in leaves[:max_rows]]

    def group_rows(self) -> list[dict]:
        rows = []
        for i, g in enumerate(self.graph.groups):
            row = {"#": i, "group": g.id, "units": g.channels, "unit": g.unit, "foldable": bool(g.foldable),
                   "reason": g.reason or "", "producers": ", ".join(g.producers), "consumers": ", ".join(g.consumers)}
            if self.kind.key == "cnn":
                row.update({"type": g.root_type, "first conv": g.first_conv or ""})
            else:
                row.update({"layer": g.layer, "KV groups": g.partitions if g.role == "heads" else None,
                            "params per unit": g.info.get("params_per_unit")})
            rows.append(row)
        return rows

    def foldable_ids(self, role: str | None = None) -> list[str]:
        return [g.id for g in self.graph.foldable if role is None or g.role == role]

    def group(self, group_id: str):
        try:
            return self.graph.get(group_id)
        except ValueError as exc:
            raise WorkbenchError(str(exc)) from None

    def kept_options(self, group_id: str) -> list[int]:
        """Valid numbers of units kept in each partition of a group (query heads per KV group: 1..heads)."""
        return list(range(1, self.group(group_id).per_partition + 1))

    @staticmethod
    def ratio_for_kept(per: int, kept: int) -> float:
        """A ratio whose k = round(per (1 - r)) is exactly ``kept`` (plans store ratios)."""
        return round(1.0 - kept / per, 6)

    # ---- features and clusters, in the fold's own feature space -------------------------------------
    def _bns(self, group_id: str, plan: FoldPlan | None, repair: str) -> frozenset | None:
        """The BNs fused before clustering ``group_id`` (Fold-DFR's "fused-linear" space), as the fold under
        ``plan`` fuses them; without a plan, those of every foldable Linear group. None in the other spaces."""
        if _space(repair) != "fused-linear":
            return None
        if plan is None:
            return fused_bns(self.model, self.graph, FoldPlan(default_ratio=0.5, repair=repair), extra=group_id)
        return fused_bns(self.model, self.graph, plan if plan.repair == repair else plan.with_changes(repair=repair),
                         extra=group_id)

    def feature_model(self, repair: str, bns: frozenset | None = None) -> nn.Module:
        return self._get(("fmodel", _space(repair), bns),
                         lambda: feature_model(self.model, self.example_input(1), repair, bns))

    def features(self, group_id: str, repair: str = "none", plan: FoldPlan | None = None) -> np.ndarray:
        """(units, d) features of a group in the space ``repair`` clusters in (under ``plan``, which decides
        the fused BNs of Fold-DFR's space)."""
        bns = self._bns(group_id, plan, repair)

        def compute():
            fm, g = self.feature_model(repair, bns), self.group(group_id)
            return group_features(fm, g, scale=feature_scaling(fm, g, repair)).numpy()

        return self._get(("features", group_id, _space(repair), bns), compute)

    def similarity(self, group_id: str, repair: str = "none", plan: FoldPlan | None = None) -> np.ndarray:
        return self._get(("sim", group_id, _space(repair), self._bns(group_id, plan, repair)),
                         lambda: cosine_similarity(self.features(group_id, repair, plan)))

    def _k(self, group_id: str, plan: FoldPlan, ratio: float | None) -> int:
        """Units kept per partition at ``ratio`` (default: the plan's ratio for the group)."""
        g = self.group(group_id)
        return k_for_ratio(g.per_partition, plan.ratio_for(group_id) if ratio is None else float(ratio))

    def cluster(self, group_id: str, plan: FoldPlan, ratio: float | None = None) -> ClusterResult:
        """The clusters :func:`foldviz.fold.fold` forms for this group under ``plan`` (at ``ratio``, default the
        plan's ratio for the group)."""
        g = self.group(group_id)
        k = self._k(group_id, plan, ratio)
        bns = self._bns(group_id, plan, plan.repair)
        return self._get(self._cluster_key(group_id, plan, ratio), lambda: cluster_group(
            self.feature_model(plan.repair, bns), g, k, plan,
            features=torch.as_tensor(self.features(group_id, plan.repair, plan)), device=self.device))

    def slider_ks(self, group_id: str, ratios: Sequence[float] = SLIDER_RATIOS) -> dict[float, int]:
        """k per partition at each slider stop ``r`` (several stops can share one k)."""
        per = self.group(group_id).per_partition
        return {round(float(r), 4): k_for_ratio(per, float(r)) for r in ratios}

    def cluster_path(self, group_id: str, plan: FoldPlan, ratios: Sequence[float] = SLIDER_RATIOS, *,
                     background: bool = False, owner: str = "local") -> dict:
        """The fold's clusters at every slider stop, so that moving the ratio is instant once they exist.

        Each k is computed once by :meth:`cluster` (the same code and cache the explorer uses), the plan's own ratio
        first. ``background=True`` computes them in the background lane of :attr:`jobs` (superseding the path of
        another group) and returns at once. Returns ``{"ready": [ratios done], "total": stops}``.
        """
        stops = self.slider_ks(group_id, ratios)
        first = round(float(plan.ratio_for(group_id)), 4)
        todo = sorted(stops, key=lambda r: (r != first, abs(r - first)))
        steps = [lambda r=r: self.cluster(group_id, plan, r) for r in todo]
        if background:
            self.jobs.precompute((owner, "path"), (group_id, plan.to_json()), steps)
        else:
            for step in steps:
                step()
        return self.path_status(group_id, plan, ratios)

    def warm_groups(self, plan: FoldPlan, *, max_units: int = 512, owner: str = "local") -> None:
        """In the background: each foldable group's detail at the plan's ratio (features, similarity, the fold's
        clusters, embedding), so that opening another group in the explorer is quick. Groups wider than
        ``max_units`` are left for when they are opened."""
        ids = [g.id for g in self.graph.foldable if g.channels <= max_units]
        self.jobs.precompute((owner, "warm"), plan.to_json(),
                             [lambda gid=gid: self.group_detail(gid, plan) for gid in ids])

    def foreground(self):
        """Mark a page request in flight (background precomputations pause meanwhile); a context manager."""
        return self.jobs.foreground()

    def path_status(self, group_id: str, plan: FoldPlan, ratios: Sequence[float] = SLIDER_RATIOS) -> dict:
        """Which slider stops of ``group_id`` already have their clusters cached."""
        ready = [r for r in self.slider_ks(group_id, ratios) if self._cluster_key(group_id, plan, r) in self._memo]
        return {"ready": ready, "total": len(ratios)}

    def _cluster_key(self, group_id: str, plan: FoldPlan, ratio: float | None) -> tuple:
        return ("cluster", group_id, self._k(group_id, plan, ratio), _space(plan.repair),
                self._bns(group_id, plan, plan.repair), plan.seed, json.dumps(plan.clustering, sort_keys=True))

    def selection_stats(self, group_id: str, plan: FoldPlan, channels: Sequence[int], ratio: float | None = None) -> dict:
        """Cluster statistics of a set of units (a lasso in the embedding); see :func:`explain.selection_stats`."""
        try:
            return explain.selection_stats(self.cluster(group_id, plan, ratio).labels,
                                           self.similarity(group_id, plan.repair, plan), channels)
        except ValueError as exc:
            raise WorkbenchError(str(exc)) from None

    def redundancy(self, group_id: str) -> dict:
        return self._get(("redundancy", group_id), lambda: redundancy(self.features(group_id)))

    def overview_rows(self, level: float = 0.3) -> list[dict]:
        """One row per group: units, mean/max cosine, a 0..1 redundancy score, and the ratio
        :func:`foldviz.plans.suggest` would give it around ``level``."""
        rows = []
        for g in self.graph.groups:
            red = self.redundancy(g.id) if g.foldable else dict.fromkeys(("mean_cos", "max_cos", "score"), float("nan"))
            rows.append({"id": g.id, "type": g.root_type, "channels": g.channels, "unit": g.unit,
                         "foldable": bool(g.foldable), "reason": g.reason or "", **red,
                         "suggested_ratio": round(suggest_ratio(red["score"], level), 2) if g.foldable else 0.0})
        return rows

    def inertia_curve(self, group_id: str, plan: FoldPlan, ratios: Sequence[float] = SLIDER_RATIOS,
                      *, ready_only: bool = False) -> list[tuple[float, int, float]]:
        """(ratio, k, inertia / total variance) of the fold's own clusters at each ratio (the clusters
        :meth:`cluster` caches). ``ready_only``: only the ratios already computed (no waiting)."""
        x = self.features(group_id, plan.repair, plan)
        total = self._get(("total_var", group_id, _space(plan.repair), self._bns(group_id, plan, plan.repair)),
                          lambda: float(((x - x.mean(0)) ** 2).sum()) or 1.0)
        ready = set(self.path_status(group_id, plan, ratios)["ready"]) if ready_only else None
        out = []
        for r in ratios:
            r = round(float(r), 4)
            if ready is not None and r not in ready:
                continue
            res = self.cluster(group_id, plan, r)
            out.append((r, int(res.k), float(res.inertia) / total))
        return out

    def group_detail(self, group_id: str, plan: FoldPlan, ratio: float | None = None, *,
                     embed_method: str = "pca") -> dict:
        """Everything the Layer explorer shows for one group: the fold's clusters and their context."""
        g = self.group(group_id)
        if not g.foldable:
            raise WorkbenchError(f"group {group_id} is not foldable: {g.reason}")
        ratio = plan.ratio_for(group_id) if ratio is None else float(ratio)
        x = self.features(group_id, plan.repair, plan)
        res = self.cluster(group_id, plan, ratio)
        emb = self._get(("embed", group_id, _space(plan.repair), self._bns(group_id, plan, plan.repair), embed_method,
                         plan.seed),
                        lambda: embed(x, embed_method, seed=plan.seed))
        pw = explain.producer_weight(self.model, g) if self.kind.key == "cnn" else None
        # query heads stay in head order (KV group by KV group: clusters live inside one); the rest by cluster
        order = np.arange(g.channels) if g.partitions > 1 else cluster_order(res.labels)
        return {
            "id": group_id, "channels": g.channels, "unit": g.unit, "role": g.role, "partitions": g.partitions,
            "per_partition": g.per_partition, "ratio": ratio, "k": int(res.k), "labels": res.labels, "order": order,
            "sizes": res.sizes, "inertia": float(res.inertia), "n_iter": res.n_iter,
            "similarity": self.similarity(group_id, plan.repair, plan), "coords": emb.coords,
            "embedding": emb.label, "embedding_note": emb.note, "features_dim": int(x.shape[1]),
            "feature_space": _space(plan.repair), "features_fused": bool(self._bns(group_id, plan, plan.repair) and
                                                                         feature_scaling(self.model, g, plan.repair))
            or _space(plan.repair) == "fused", "weight_module": pw[0] if pw else None,
            "weight": pw[1] if pw else None, "producers": list(g.producers), "consumers": list(g.consumers),
            **self.redundancy(group_id),
        }

    def neighbours(self, group_id: str, channel: int, plan: FoldPlan, k: int = 5) -> list[dict]:
        try:
            return explain.neighbours(self.similarity(group_id, plan.repair, plan), channel, k)
        except ValueError as exc:
            raise WorkbenchError(str(exc)) from None

    # ---- plans ------------------------------------------------------------------------------------------
    def default_plan(self, ratio: float | None = None, repair: str | None = None, seed: int = 0) -> FoldPlan:
        fields = {"seed": int(seed), "model": self.spec, "weights_sha256": self.weights_sha256}
        if repair is not None:
            fields["repair"] = repair
        return self.kind.default_plan(self.loaded, ratio, **fields)

    def plan_from(self, plan_dict: dict) -> FoldPlan:
        """A FoldPlan from a plain dict, validated against this model's groups."""
        try:
            plan = FoldPlan.from_dict(dict(plan_dict))
            plan.validate(self.graph)
        except (ValueError, TypeError) as exc:
            raise WorkbenchError(str(exc)) from None
        return plan

    def import_plan(self, text: str | bytes) -> tuple[FoldPlan, list[str]]:
        """Parse an exported plan and check it fits this model: (plan, reasons it may not be meant for it)."""
        try:
            plan = FoldPlan.from_json(text)
            plan.validate(self.graph)
        except ValueError as exc:
            raise WorkbenchError(f"cannot import this plan: {exc}") from None
        warnings = []
        if plan.model and plan.model != self.spec:
            warnings.append(f"the plan was made for {plan.model}, the loaded model is {self.spec}")
        elif plan.weights_sha256 and plan.weights_sha256 != self.weights_sha256:
            warnings.append("the plan was made for different weights of this architecture")
        return plan, warnings

    def preview(self, plan: FoldPlan) -> dict:
        """Units per group, parameters and FLOPs after ``plan``, computed without folding."""
        return self.cost.estimate(plan)

    def output_problem(self, plan: FoldPlan, fmt: str | None = None) -> str:
        """Why a fold with ``plan`` could not be saved as ``fmt`` (a language model's transformers directory), ""
        when it can; the message names the nearest plan that can."""
        try:
            self.kind.check_output(self.loaded, self.graph, plan, fmt)
        except ValueError as exc:
            return str(exc)
        return ""

    def suggest(self, target_sparsity: float, base: FoldPlan) -> FoldPlan:
        """``base`` with per-group ratios that follow redundancy and reach ``target_sparsity`` (skips kept)."""
        scores = {g.id: self.redundancy(g.id)["score"] for g in self.graph.foldable}
        try:
            return suggest(self.cost, scores, target_sparsity, base)
        except ValueError as exc:
            raise WorkbenchError(str(exc)) from None

    # ---- data -----------------------------------------------------------------------------------------
    def default_data(self) -> DataSource:
        return default_data_for(self.loaded)

    def evaluate(self, model: nn.Module | None, data: DataSource, progress: Progress = None) -> dict:
        """The kind's metric of ``model`` (None: the base model, memoised) on ``data``: {"accuracy" or
        "perplexity", "loss", "samples", ...}."""
        if not data.spec:
            raise WorkbenchError("no evaluation data selected")
        cb = (lambda d, n: progress("evaluate", d, n)) if progress else None
        prepared = self._get(("evalset", data.spec, data.limit),
                             lambda: self.kind.prepare_eval(self.loaded, data.spec, data.limit))
        try:
            if model is None:
                return self._get(("baseline", data.spec, data.limit), lambda: self.kind.evaluate(
                    self.loaded, self.model, data.spec, data.limit, prepared=prepared))
            return self.kind.evaluate(self.loaded, model, data.spec, data.limit, progress=cb, prepared=prepared)
        except (ValueError, OSError) as exc:
            raise WorkbenchError(f"cannot evaluate on {data.label}: {exc}") from None

    def check_data(self, data: DataSource) -> None:
        """One-line WorkbenchError when ``data`` cannot be read for this model."""
        try:
            self.kind.check_data(self.loaded, data.spec)
        except (ValueError, OSError) as exc:
            raise WorkbenchError(str(exc)) from None

    def data_label(self, data: DataSource) -> str:
        """``data.label`` with the real number of test samples once the baseline was evaluated (a limit of 500 on
        the 450-sample digits test split evaluates 450)."""
        hit = self._memo.get(("baseline", data.spec, data.limit)) if data.spec else None
        if hit and self.kind.key == "lm":
            return f"{data.spec} ({hit['samples']} windows of {hit['seq_len']} tokens)"
        return f"{data.spec} ({hit['samples']} test samples)" if hit else data.label

    def quick_metric(self, plan: FoldPlan, data: DataSource, n: int = QUICK_EVAL_SAMPLES, *,
                     progress: Progress = None) -> dict:
        """The metric of ``plan``'s fold on the first ``n`` test samples of ``data`` (language models: 1/8 of the
        evaluation windows), next to the baseline on the same samples: a quick estimate while editing a plan (the
        fold is the real one; only the evaluation is small). Returns ``{"metric", "value", "baseline", "samples",
        "param_sparsity", "seconds"}``."""
        if not data.spec:
            raise WorkbenchError("no evaluation data selected")
        import time

        t0 = time.perf_counter()
        small = DataSource(data.spec, int(n) if self.kind.key == "cnn" else max(1, (data.limit or 64) // 8),
                           data.repair_samples)
        res = self.run(plan, self.default_method(plan), data, progress)
        value = self.evaluate(res.model, small)
        base = self.evaluate(None, small)
        pb, pa = count_params(self.model), count_params(res.model)
        metric = self.kind.metric
        return {"metric": metric, "value": value[metric], "baseline": base[metric], "samples": value["samples"],
                "param_sparsity": 1.0 - pa / pb, "seconds": time.perf_counter() - t0}

    def repair_inputs(self, data: DataSource | None, seed: int = 0) -> torch.Tensor | None:
        """The ``repair_data`` of methods that need data: training inputs of ``data.spec`` (image classifiers), or
        calibration windows of ``data.calib``, checked disjoint from the evaluation text (language models)."""
        if data is None:
            return None
        if self.kind.key == "lm":
            return self._calibration(data, seed)
        if not data.spec:
            return None
        try:
            return self._get(("repair_inputs", data.spec, data.repair_samples, seed),
                             lambda: repair_inputs(self.loaded, data.spec, data.repair_samples, seed=seed))
        except (ValueError, OSError) as exc:
            raise WorkbenchError(f"cannot read repair data from {data.label}: {exc}") from None

    def sample_batch(self, data: DataSource | None, n: int = 128) -> torch.Tensor:
        """The inputs variance measurements and the Learn page use (test samples of ``data``, else
        standard-normal inputs)."""
        def make():
            from .data import sample_inputs

            if data is not None and data.spec:
                return sample_inputs(data.spec, "test", n, card=self.loaded.card, seed=1)
            return self.loaded.example_input(n, seed=1)
        return self._get(("vinputs", data.spec if data else None, n), make)

    @_exclusive
    def activations(self, result: FoldResult, group_id: str, image: torch.Tensor) -> dict:
        """Feature maps of ``group_id`` for one input before and after the fold ``result`` (its own clusters and
        channel map); see :func:`foldviz.explain.feature_maps`."""
        g = self.group(group_id)
        module = explain.map_module(self.model, g)
        if module is None:
            raise WorkbenchError(f"{group_id} has no layer whose output shows its channels one by one")
        # a group the plan left alone (skipped, ratio 0) keeps every channel where it was
        labels = result.labels.get(group_id, np.arange(g.channels))
        n_out = dict(self.model.named_modules())[module].weight.shape[0]
        cmap = result.channel_maps.get(module, np.arange(n_out))
        try:
            return explain.feature_maps(self.model, result.model, g, labels, cmap, image, module)
        except ValueError as exc:
            raise WorkbenchError(str(exc)) from None

    def generate(self, model: nn.Module | None, prompt: str, max_new_tokens: int = 40) -> str:
        """Greedy continuation of ``prompt`` by ``model`` (None: the base model); language models only."""
        from .lm.evaluate import generate

        if self.kind.key != "lm":
            raise WorkbenchError("text generation applies to language models")
        if getattr(self.loaded, "tokenizer", None) is None:
            raise WorkbenchError(f"{self.spec} has no tokenizer.json: generation needs one")
        if not prompt:
            raise WorkbenchError("the prompt is empty")
        with self._model_lock:
            return generate(model if model is not None else self.model, self.loaded.tokenizer, prompt,
                            max_new_tokens=int(max_new_tokens))

    def _calibration(self, data: DataSource, seed: int) -> torch.Tensor | None:
        if not data.calib:
            return None
        from .lm.calib import check_no_overlap

        try:
            if data.spec:
                self._get(("calib_overlap", data.calib, data.spec), lambda: check_no_overlap(data.calib, data.spec))
            return self._get(("calib_inputs", data.calib, seed),
                             lambda: repair_inputs(self.loaded, data.calib, None, seed=seed))
        except (ValueError, OSError) as exc:
            msg = str(exc)
            raise WorkbenchError(msg if "calibration" in msg else f"calibration text {data.calib}: {msg}") from None

    # ---- folding --------------------------------------------------------------------------------------
    @_exclusive
    def run(self, plan: FoldPlan, method: str, data: DataSource | None, progress: Progress = None) -> FoldResult:
        """Run registered ``method`` with ``plan``'s ratios (real repair data drawn from ``data`` if needed)."""
        if METHODS[method].needs_data and self.kind.key == "lm" and (data is None or not data.calib):
            raise WorkbenchError(f"{METHODS[method].label} needs calibration text: enter a text spec under "
                                 "\"Calibration text\" on the Fold & results page (e.g. shakespeare:train)")
        if METHODS[method].needs_data and (data is None or not data.spec):
            raise WorkbenchError(f"{METHODS[method].label} needs real data: pick a dataset on the Model & data page")
        try:   # not memoised: a fold holds a whole model, and every plan a user tries would stay in memory
            repair_data = self.repair_inputs(data, plan.seed) if METHODS[method].needs_data else None
            return apply_method(self.loaded, plan, method, repair_data=repair_data, progress=progress,
                                device=self.device)
        except ValueError as exc:
            raise WorkbenchError(str(exc)) from None

    @_exclusive
    def fold(self, plan: FoldPlan, data: DataSource | None = None, progress: Progress = None, *,
             method: str | None = None, latency: bool = True) -> FoldOutcome:
        """Fold with ``plan`` (or run ``method`` with its ratios) and build the report the CLI writes."""
        res = self.run(plan, method or self.default_method(plan), data, progress)
        spec = data.spec if data is not None else None
        baseline = self.evaluate(None, data) if spec else None
        report = build_report(self.loaded, res, data_spec=spec, eval_limit=data.limit if spec else None,
                              baseline=baseline, latency=latency, progress=progress,
                              weights_sha256=self.weights_sha256)
        return FoldOutcome(res, report)

    @_exclusive
    def variance_comparison(self, plan: FoldPlan, methods: Sequence[str], data: DataSource | None,
                            progress: Progress = None, known: dict | None = None) -> dict:
        """{method: {"rows", "metric", "error"}}: per-layer variance ratios with the plan's clusters for each
        method; ``known`` maps methods to FoldResults already computed for this plan."""
        out = {}
        for i, m in enumerate(methods):
            try:
                res = (known or {}).get(m) or self.run(plan, m, data, progress)
                value = self.evaluate(res.model, data)[self.kind.metric] if data is not None and data.spec else None
                rows, _desc = self.kind.variance(self.loaded, self.model, res.model, res,
                                                 data.spec if data is not None else None, 128)
                out[m] = {"rows": rows, "metric": value, "error": None}
            except WorkbenchError as exc:
                out[m] = {"rows": [], "metric": None, "error": str(exc)}
            if progress:
                progress("compare", i + 1, len(methods))
        return out

    def sensitivity(self, plan: FoldPlan, data: DataSource, progress: Progress = None) -> dict:
        """Per decoder layer, perplexity with only that layer folded by ``plan`` (its method, its ratios) on
        ``data`` (memoised): :func:`foldviz.lm.sensitivity.plan_sensitivity`."""
        from .lm.sensitivity import plan_sensitivity

        if self.kind.key != "lm":
            raise WorkbenchError("sensitivity is for language models")
        if not data.spec:
            raise WorkbenchError("sensitivity measures perplexity: pick evaluation text on the Model & data page")
        key = ("sensitivity", json.dumps(plan.to_dict(), sort_keys=True), data.spec, data.limit)

        def compute():
            with self._model_lock:   # each fold puts hooks on the base model
                return plan_sensitivity(self.loaded, plan, data.spec, limit=data.limit, progress=progress,
                                        device=self.device)
        try:
            return self._get(key, compute)
        except ValueError as exc:
            raise WorkbenchError(str(exc)) from None

    @_exclusive
    def sweep(self, ratios: Sequence[float], methods: Sequence[str], data: DataSource, *,
              seeds: Sequence[int] = (0,), plan: FoldPlan | None = None, progress: Progress = None) -> list[dict]:
        """The metric vs. parameter sparsity for each (method, ratio, seed): the CLI's ``sweep`` rows."""
        if not data.spec:
            raise WorkbenchError("a sweep measures the model on data: pick evaluation data on the Model & data page")
        clustering = plan.clustering if plan else None
        key = ("sweep", tuple(float(r) for r in ratios), tuple(methods), tuple(int(s) for s in seeds), data.spec,
               data.limit, data.repair_samples, data.calib, json.dumps(clustering, sort_keys=True))
        calib = data.calib if self.kind.key == "lm" and any(METHODS[m].needs_data for m in methods) else None
        try:
            return self._get(key, lambda: sweep(
                self.loaded, list(ratios), list(methods), data.spec, seeds=tuple(seeds), eval_limit=data.limit,
                repair_samples=data.repair_samples, clustering=clustering, executor=executor_from_env(), calib=calib,
                progress=(lambda done, total, *_: progress("sweep", done, total)) if progress else None))
        except ValueError as exc:
            raise WorkbenchError(str(exc)) from None

    @staticmethod
    def sweep_target() -> str:
        """Where a sweep runs: this process, or the Ray cluster named by the environment."""
        from .executors import ADDRESS_ENV
        import os

        address = os.environ.get(ADDRESS_ENV)
        return f"the Ray cluster at {address}" if address else "this process"

    # ---- teaching (explain.*) on the fold's clusters -------------------------------------------------------
    @_exclusive
    def cluster_variance(self, group_id: str, labels: np.ndarray, inputs: torch.Tensor) -> list[dict]:
        return explain.cluster_variance(self.model, self.group(group_id), np.asarray(labels), inputs,
                                        self.features(group_id))

    def consumer_columns(self, group_id: str, labels: np.ndarray) -> dict | None:
        return explain.consumer_columns(self.model, self.group(group_id), np.asarray(labels))

    @_exclusive
    def merge_error(self, group_id: str, labels: np.ndarray, inputs: torch.Tensor, seed: int = 0) -> dict | None:
        return explain.merge_error(self.model, self.group(group_id), np.asarray(labels), inputs, seed=seed)

    # ---- export ---------------------------------------------------------------------------------------
    def export_folded(self, outcome: FoldOutcome, extra: dict[str, bytes] | None = None) -> bytes:
        """A zip: the folded model directory (weights, plan, report, and its kind's files) plus ``extra`` files."""
        return folded_zip(outcome.result, self.loaded, outcome.report, extra)


__all__ = ["ModelSource", "DataSource", "Workbench", "WorkbenchError", "FoldOutcome", "save_upload",
           "default_data_for", "DEFAULT_MODEL", "SLIDER_RATIOS", "QUICK_EVAL_SAMPLES", "LM_EVAL_TOKENS"]
