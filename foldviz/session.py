"""Streamlit-free "workbench": everything the app's pages compute, reproducible from plain Python.

    from foldviz.session import ModelSource, DataSource, Workbench
    wb = Workbench.load(ModelSource("demo:digits-resnet"))
    data = DataSource("digits", limit=300)
    wb.summary(); wb.group_rows(); wb.overview_rows()
    detail = wb.group_detail("layer1.0.conv1", ratio=0.5, seed=0)
    plan = wb.default_plan(0.3, "ar")
    wb.preview(plan)
    out = wb.fold(plan, data)                  # FoldOutcome: result + report (plain data)
    wb.variance_comparison(plan, ["none", "ar"], data)
    wb.sweep([0.1, 0.3, 0.5], ["none", "ar", "l1"], data)

The base model held by a Workbench is treated as read-only: folding/pruning always works on copies
(the engine's ``fold`` deep-copies; Deep-Inversion gets its own copy too), so a Workbench can be
cached and shared (``st.cache_resource``).  Every user-facing failure is raised as
:class:`WorkbenchError` (a ``ValueError``) with a message meant for the user.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import tempfile
import threading
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from .utils import json_default

Progress = Callable[[str, int, int], None] | None

REPAIR_METHODS = ("none", "r", "ar", "dir")
REPAIR_LABELS = {"none": "Fold-Naive", "r": "Fold-R", "ar": "Fold-AR", "dir": "Fold-DIR"}
SWEEP_METHODS = ("none", "r", "ar", "dir", "l1", "l2", "l1+r", "l2+r")
DEFAULT_MODEL = "demo:digits-resnet"


class WorkbenchError(ValueError):
    """Something the user asked for cannot be done; the message says why."""


# ------------------------------------------------------------------------------------------------
# sources (plain, hashable descriptions -> cache keys and session state)
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSource:
    """What to load: an engine model spec plus options (all plain data, hashable)."""

    spec: str = DEFAULT_MODEL
    weights: str | None = None          # path to a checkpoint file (uploaded files are written to disk)
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
    """Evaluation data: an engine dataset spec ("digits", "cifar10:ROOT", "imagefolder:DIR") or None."""

    spec: str | None = "digits"
    limit: int | None = 500           # evaluation samples (None = whole split)
    repair_samples: int = 256         # real inputs drawn from the train split for Fold-R

    @property
    def label(self) -> str:
        if not self.spec:
            return "no evaluation data"
        return f"{self.spec} (first {self.limit} test samples)" if self.limit else f"{self.spec} (full test split)"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "DataSource":
        return cls(**(d or {}))


def default_data_for(spec: str) -> DataSource:
    """Demos are evaluated on digits; other models start without data (the user picks a dataset)."""
    return DataSource("digits") if str(spec).startswith("demo:") else DataSource(None)


def save_upload(data: bytes, filename: str, directory: str | Path | None = None) -> str:
    """Write uploaded checkpoint bytes to a content-addressed temp file and return its path."""
    from .checkpoints import MAX_UPLOAD_BYTES

    if len(data) > MAX_UPLOAD_BYTES:
        raise WorkbenchError(f"{filename} is {len(data) / 1e6:.0f} MB; uploads are limited to "
                             f"{MAX_UPLOAD_BYTES / 1e6:.0f} MB (use the command line with --weights for larger files)")
    suffix = Path(filename).suffix.lower()
    if suffix not in (".safetensors", ".pt", ".pth", ".bin"):
        raise WorkbenchError(f"{filename}: upload a .safetensors file or a weights-only state dict (.pt/.pth/.bin)")
    d = Path(directory or Path(tempfile.gettempdir()) / "foldviz-uploads")
    d.mkdir(parents=True, exist_ok=True)
    path = d / (hashlib.sha256(data).hexdigest()[:32] + suffix)
    if not path.exists():  # atomic: a crash never leaves a truncated file under the content-addressed name
        from .utils import atomic_write_bytes

        atomic_write_bytes(path, data)
    return str(path)


# ------------------------------------------------------------------------------------------------
# results (plain data)
# ------------------------------------------------------------------------------------------------

@dataclass
class FoldOutcome:
    """A fold's result (the engine's FoldResult, with the folded model) plus a plain-data report."""

    result: object                # foldviz.fold.FoldResult
    report: dict                  # see Workbench.fold

    @property
    def model(self) -> nn.Module:
        return self.result.model


def _fmt_int(n: float) -> str:
    n = float(n)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f}"


# ------------------------------------------------------------------------------------------------
# the workbench
# ------------------------------------------------------------------------------------------------

class Workbench:
    """A loaded base model with its channel groups and cached per-group analyses."""

    def __init__(self, loaded, source: ModelSource | None = None):
        self.loaded = loaded
        self.source = source or ModelSource(loaded.spec)
        self._lock = threading.RLock()
        self._graph = None
        self._features: dict[tuple[str, bool], np.ndarray] = {}
        self._sims: dict[str, np.ndarray] = {}
        self._stats: dict[str, object] = {}
        from .utils import state_dict_hash

        self.weights_sha256 = state_dict_hash(loaded.model)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def load(cls, source: ModelSource | str) -> "Workbench":
        from . import models

        if isinstance(source, str):
            source = ModelSource(source)
        try:
            loaded = models.load_model(source.spec, weights=source.weights, num_classes=source.num_classes,
                                       cifar_stem=source.cifar_stem)
        except (ValueError, OSError, RuntimeError) as exc:
            raise WorkbenchError(f"could not load {source.label}: {exc}") from None
        return cls(loaded, source)

    # ---- basics -------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """The base model. Read-only by convention: never fold or train it in place."""
        return self.loaded.model

    @property
    def spec(self) -> str:
        return self.loaded.spec

    @property
    def is_demo(self) -> bool:
        return self.spec.startswith("demo:")

    def example_input(self, batch: int = 2) -> torch.Tensor:
        return self.loaded.example_input(batch)

    @property
    def graph(self):
        with self._lock:
            if self._graph is None:
                from .groups import find_groups

                self._graph = find_groups(self.model, self.example_input(2))
            return self._graph

    def _stat(self, key: str, fn):
        with self._lock:
            if key not in self._stats:
                self._stats[key] = fn()
            return self._stats[key]

    def params(self) -> int:
        return self._stat("params", lambda: int(sum(p.numel() for p in self.model.parameters())))

    def flops(self) -> int | None:
        def f():
            try:
                from .metrics import count_flops

                return int(count_flops(self.model, self.example_input(1)))
            except Exception:  # FLOPs are informative only; never break a page for them
                return None
        return self._stat("flops", f)

    def size_bytes(self) -> int:
        return self._stat("size", lambda: _size_bytes(self.model))

    def summary(self) -> dict:
        g = self.graph
        card = self.loaded.card
        return {
            "spec": self.spec,
            "label": self.source.label,
            "arch": card.get("arch") or type(self.model).__name__,
            "input_shape": list(self.loaded.input_shape),
            "num_classes": card.get("num_classes"),
            "params": self.params(),
            "flops": self.flops(),
            "size_bytes": self.size_bytes(),
            "groups": len(g.groups),
            "foldable_groups": len(g.foldable),
            "foldable_channels": int(sum(x.channels for x in g.foldable)),
            "note": self.loaded.note,
            "graph_error": g.error,
            "weights_sha256": self.weights_sha256,
            "card": {k: v for k, v in card.items() if k not in ("history",)},
        }

    def architecture_rows(self, max_rows: int = 400) -> list[dict]:
        """One row per leaf module: name, type, output shape (batch 1), parameters."""
        shapes: dict[str, list[int]] = {}
        hooks = []
        leaves = [(n, m) for n, m in self.model.named_modules() if n and not list(m.children())]
        for name, mod in leaves:
            def hook(_m, _i, out, name=name):
                if torch.is_tensor(out):
                    shapes[name] = list(out.shape[1:])
            hooks.append(mod.register_forward_hook(hook))
        try:
            with torch.no_grad():
                copy_model = self.model  # forward only; eval mode, no state change
                copy_model(self.example_input(1))
        except Exception:
            pass
        finally:
            for h in hooks:
                h.remove()
        rows = []
        for name, mod in leaves[:max_rows]:
            rows.append({"module": name, "type": type(mod).__name__,
                         "output shape": "×".join(str(s) for s in shapes.get(name, [])) or "—",
                         "parameters": int(sum(p.numel() for p in mod.parameters(recurse=False)))})
        return rows

    def group_rows(self) -> list[dict]:
        rows = []
        for i, g in enumerate(self.graph.groups):
            rows.append({"#": i, "group": g.id, "type": g.root_type, "channels": g.channels,
                         "foldable": bool(g.foldable), "reason": g.reason or "",
                         "producers": ", ".join(g.producers), "consumers": ", ".join(g.consumers),
                         "first conv": g.first_conv or ""})
        return rows

    def foldable_ids(self) -> list[str]:
        return [g.id for g in self.graph.foldable]

    def group(self, group_id: str):
        try:
            return self.graph.get(group_id)
        except Exception as exc:
            raise WorkbenchError(str(exc)) from None

    # ---- per-group analysis -------------------------------------------------------------------
    def features(self, group_id: str, *, scale: bool = False) -> np.ndarray:
        from .clustering import group_features

        key = (group_id, bool(scale))
        with self._lock:
            if key not in self._features:
                self._features[key] = np.asarray(group_features(self.model, self.graph, group_id, scale=scale),
                                                 dtype=np.float32)
            return self._features[key]

    def similarity(self, group_id: str) -> np.ndarray:
        from .clustering import cosine_similarity

        with self._lock:
            if group_id not in self._sims:
                self._sims[group_id] = cosine_similarity(self.features(group_id))
            return self._sims[group_id]

    def cluster(self, group_id: str, ratio: float, *, seed: int = 0, n_init: int = 4, scale: bool = False):
        from .clustering import k_for_ratio, kmeans

        x = self.features(group_id, scale=scale)
        k = k_for_ratio(len(x), float(ratio))
        return kmeans(x, k, seed=int(seed), n_init=int(n_init))

    def redundancy(self, group_id: str) -> dict:
        from .clustering import redundancy

        return redundancy(self.features(group_id))

    def overview_rows(self, target_ratio: float = 0.3) -> list[dict]:
        """One row per group: channels, mean/max cosine, redundancy score, suggested ratio."""
        from .clustering import suggest_ratio

        rows = []
        for g in self.graph.groups:
            row = {"id": g.id, "type": g.root_type, "channels": g.channels, "foldable": bool(g.foldable),
                   "reason": g.reason or ""}
            if g.foldable:
                red = self.redundancy(g.id)
                row.update(mean_cos=red["mean_cos"], max_cos=red["max_cos"], score=red["score"],
                           suggested_ratio=round(suggest_ratio(red["score"], target_ratio), 2))
            else:
                row.update(mean_cos=float("nan"), max_cos=float("nan"), score=float("nan"), suggested_ratio=0.0)
            rows.append(row)
        return rows

    def inertia_curve(self, group_id: str, ratios: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
                      *, seed: int = 0) -> list[tuple[float, int, float]]:
        from .clustering import inertia_curve

        pts = inertia_curve(self.features(group_id), list(ratios), seed=seed)
        out = []
        for p in pts:
            if isinstance(p, dict):
                out.append((float(p["ratio"]), int(p["k"]), float(p.get("relative_inertia", p["inertia"]))))
            else:
                out.append((float(p[0]), int(p[1]), float(p[2])))
        return out

    def producer_weight(self, group_id: str) -> tuple[str, np.ndarray] | None:
        """(module name, weight) of the producer whose filters are drawn: the group's first conv, else its
        first linear producer.  Rows are ordered by group channel."""
        g = self.group(group_id)
        modules = dict(self.model.named_modules())
        names = ([g.first_conv] if g.first_conv else []) + [p for p in g.producers
                                                             if isinstance(modules.get(p), (nn.Conv2d, nn.Linear))]
        for name in names:
            mem = next((m for m in g.members if m.module == name and m.side == "out"), None)
            mod = modules.get(name)
            if mod is None or getattr(mod, "weight", None) is None:
                continue
            w = mod.weight.detach().cpu().numpy()
            if mem is not None and len(mem.idxs) == g.channels:
                order = np.argsort(np.asarray(mem.root_idxs), kind="stable")
                w = w[np.asarray(mem.idxs)[order]]
            if w.shape[0] != g.channels:
                continue
            return name, w
        return None

    def group_detail(self, group_id: str, ratio: float, *, seed: int = 0, embed_method: str = "pca") -> dict:
        """Everything the layer explorer shows for one group at one ratio (numpy arrays + numbers)."""
        from .clustering import cluster_order
        from .embedding import embed

        g = self.group(group_id)
        if not g.foldable:
            raise WorkbenchError(f"group {group_id} is not foldable: {g.reason}")
        x = self.features(group_id)
        res = self.cluster(group_id, ratio, seed=seed)
        labels = np.asarray(res.labels)
        emb = embed(x, embed_method, seed=seed)
        pw = self.producer_weight(group_id)
        red = self.redundancy(group_id)
        return {
            "id": group_id, "channels": g.channels, "ratio": float(ratio), "k": int(res.k),
            "labels": labels, "order": np.asarray(cluster_order(labels)), "sizes": np.bincount(labels, minlength=res.k),
            "inertia": float(res.inertia), "similarity": self.similarity(group_id), "coords": emb.coords,
            "embedding": emb.label, "embedding_note": emb.note, "features_dim": int(x.shape[1]),
            "weight_module": pw[0] if pw else None, "weight": pw[1] if pw else None,
            "producers": list(g.producers), "consumers": list(g.consumers), **red,
        }

    def neighbours(self, group_id: str, channel: int, k: int = 5) -> list[dict]:
        sim = self.similarity(group_id)
        if not 0 <= channel < len(sim):
            raise WorkbenchError(f"channel {channel} does not exist in {group_id} (0..{len(sim) - 1})")
        row = sim[channel].copy()
        row[channel] = -np.inf
        idx = np.argsort(-row)[:k]
        return [{"channel": int(i), "cosine": float(sim[channel, i])} for i in idx]

    # ---- plans --------------------------------------------------------------------------------
    def default_plan(self, ratio: float = 0.3, repair: str = "ar", seed: int = 0):
        from .plans import FoldPlan

        return FoldPlan(default_ratio=float(ratio), repair=repair, seed=int(seed), model=self.spec,
                        weights_sha256=self.weights_sha256)

    def plan_from(self, plan_dict: dict):
        """FoldPlan from a plain dict, validated against this model's groups."""
        from .plans import FoldPlan

        try:
            plan = FoldPlan.from_dict(dict(plan_dict))
            plan.validate(self.graph)
        except ValueError as exc:
            raise WorkbenchError(str(exc)) from None
        return plan

    def import_plan(self, text: str | bytes):
        """Parse an exported plan JSON and check it fits this model. Returns (plan, warnings)."""
        from .plans import FoldPlan

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

    def plan_rows(self, plan) -> list[dict]:
        from .clustering import k_for_ratio

        rows = []
        for g in self.graph.groups:
            r = plan.ratio_for(g.id) if g.foldable else 0.0
            rows.append({"id": g.id, "channels_before": g.channels,
                         "channels_after": k_for_ratio(g.channels, r) if g.foldable else g.channels,
                         "ratio": r, "skip": g.id in plan.skip, "foldable": bool(g.foldable),
                         "override": g.id in plan.ratios})
        return rows

    def preview(self, plan) -> dict:
        """Predicted channels / params / FLOPs after folding, without folding.

        Uses the engine's ``plans.preview`` when it exists, else :meth:`estimate` (exact for conv/linear/BN
        parameters, conv/linear FLOPs scaled by the kept input/output fractions)."""
        try:
            from .plans import preview as engine_preview
        except ImportError:
            engine_preview = None
        if engine_preview is not None:
            try:
                out = dict(engine_preview(self.model, self.graph, plan, self.example_input(1)))
            except ValueError as exc:
                raise WorkbenchError(str(exc)) from None
            out.setdefault("params_before", self.params())
            out.setdefault("flops_before", self.flops())
            out.setdefault("groups", self.plan_rows(plan))
            return out
        return self.estimate(plan)

    def suggest(self, target_sparsity: float, *, repair: str = "ar", seed: int = 0):
        """A plan whose per-group ratios follow measured redundancy and whose predicted parameter sparsity is
        ``target_sparsity`` (engine ``plans.suggest_plan`` when available, else :meth:`suggest_by_redundancy`)."""
        from .plans import FoldPlan

        try:
            from .plans import suggest_plan
        except ImportError:
            suggest_plan = None
        if suggest_plan is None:
            plan = self.suggest_by_redundancy(target_sparsity, repair=repair, seed=seed)
        else:
            try:
                plan = suggest_plan(self.model, self.graph, float(target_sparsity),
                                    example_input=self.example_input(1))
            except TypeError:
                plan = suggest_plan(self.model, self.graph, float(target_sparsity))
            except ValueError as exc:
                raise WorkbenchError(str(exc)) from None
        d = plan.to_dict()
        d.update(repair=repair, seed=int(seed), model=self.spec, weights_sha256=self.weights_sha256)
        return FoldPlan.from_dict(d)

    # ---- app-side planning helpers (analytic; no folding) ---------------------------------------------
    def _module_costs(self) -> dict:
        """Per parametrised module: parameter tensors and conv/linear FLOPs for batch 1 (cached)."""
        def f():
            flops: dict[str, int] = {}
            hooks = []
            for name, mod in self.model.named_modules():
                if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                    def hook(m, _i, out, name=name):
                        per_out = m.weight[0].numel()  # in/groups * kernel (conv) or in_features (linear)
                        flops[name] = flops.get(name, 0) + 2 * int(out.numel() // out.shape[0]) * int(per_out)
                    hooks.append(mod.register_forward_hook(hook))
            try:
                with torch.no_grad():
                    self.model(self.example_input(1))
            finally:
                for h in hooks:
                    h.remove()
            return flops
        return self._stat("module_flops", f)

    def _keep_fractions(self, plan) -> tuple[dict, dict, list[dict]]:
        """Fraction of each module's output / input channels that survives ``plan``."""
        from .clustering import k_for_ratio

        modules = dict(self.model.named_modules())
        out_keep: dict[str, float] = {}
        in_keep: dict[str, list[tuple[int, float]]] = {}
        rows = []
        for g in self.graph.groups:
            r = plan.ratio_for(g.id) if g.foldable else 0.0
            k = k_for_ratio(g.channels, r) if g.foldable else g.channels
            keep = k / g.channels
            rows.append({"id": g.id, "channels_before": g.channels, "channels_after": k, "ratio": r,
                         "skip": g.id in plan.skip, "foldable": bool(g.foldable), "override": g.id in plan.ratios})
            for mem in g.members:
                mod = modules.get(mem.module)
                if mod is None:
                    continue
                if mem.side == "out":
                    out_keep[mem.module] = keep
                else:
                    in_keep.setdefault(mem.module, []).append((len(mem.idxs), keep))
        in_frac = {}
        for name, parts in in_keep.items():
            mod = modules[name]
            w = getattr(mod, "weight", None)
            if w is None or w.dim() < 2:
                continue
            total = w.shape[1] * (getattr(mod, "groups", 1) or 1)
            covered = sum(n for n, _ in parts)
            kept = sum(n * kp for n, kp in parts) + max(0, total - covered)
            in_frac[name] = kept / max(1, total)
        return out_keep, in_frac, rows

    def estimate(self, plan) -> dict:
        """Analytic preview of ``plan``: channels per group, parameters and FLOPs after folding."""
        out_keep, in_frac, rows = self._keep_fractions(plan)
        flops = self._module_costs()
        params_after = 0.0
        for name, mod in self.model.named_modules():
            depthwise = isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and mod.groups > 1
            for pname, p in mod.named_parameters(recurse=False):
                f = out_keep.get(name, 1.0)
                if pname == "weight" and p.dim() >= 2 and not depthwise:
                    f *= in_frac.get(name, 1.0)
                params_after += p.numel() * f
        total_flops = self.flops()
        conv_flops = sum(flops.values())
        flops_after = None
        if total_flops:
            scaled = sum(v * out_keep.get(n, 1.0) * (1.0 if getattr(dict(self.model.named_modules())[n], "groups", 1) > 1
                                                      else in_frac.get(n, 1.0)) for n, v in flops.items())
            flops_after = int(round(total_flops - conv_flops + scaled))
        pb = self.params()
        return {"params_before": pb, "params_after": int(round(params_after)), "flops_before": total_flops,
                "flops_after": flops_after, "param_sparsity": 1.0 - params_after / max(1, pb), "groups": rows,
                "estimated": True}

    def suggest_by_redundancy(self, target_sparsity: float, *, repair: str = "ar", seed: int = 0,
                              max_ratio: float = 0.9):
        """Ratios proportional to each group's redundancy score (``clustering.suggest_ratio``), scaled by a
        bisection so that the estimated parameter sparsity matches ``target_sparsity``."""
        from .clustering import suggest_ratio
        from .plans import FoldPlan

        target = float(target_sparsity)
        if not 0.0 < target < 1.0:
            raise WorkbenchError(f"target sparsity must be between 0 and 1, got {target}")
        scores = {g.id: self.redundancy(g.id)["score"] for g in self.graph.foldable}
        if not scores:
            raise WorkbenchError("this model has no foldable groups")

        def plan_for(t: float):
            ratios = {gid: round(min(max_ratio, suggest_ratio(sc, t)), 3) for gid, sc in scores.items()}
            return FoldPlan(default_ratio=0.0, ratios=ratios, repair=repair, seed=int(seed), model=self.spec,
                            weights_sha256=self.weights_sha256)

        lo, hi = 0.0, 2.0
        for _ in range(40):
            mid = (lo + hi) / 2
            if self.estimate(plan_for(mid))["param_sparsity"] < target:
                lo = mid
            else:
                hi = mid
        plan = plan_for(hi)
        got = self.estimate(plan)["param_sparsity"]
        if got < target - 0.02:
            raise WorkbenchError(f"cannot reach {100 * target:.0f}% parameter sparsity by folding alone (at most "
                                 f"{100 * got:.0f}% with every group at {100 * max_ratio:.0f}%)")
        return plan

    # ---- data ---------------------------------------------------------------------------------
    def _dataset(self, data: DataSource, split: str):
        from .data import load_dataset

        if not data.spec:
            raise WorkbenchError("no evaluation data selected: pick a dataset on the Model & data page")
        try:
            return load_dataset(data.spec, split, card=self.loaded.card)
        except ValueError as exc:
            raise WorkbenchError(str(exc)) from None

    def evaluate(self, model: nn.Module | None, data: DataSource, progress: Progress = None) -> dict:
        from .data import evaluate, make_loader

        ds = self._dataset(data, "test")
        loader = make_loader(ds, batch_size=256, limit=data.limit)
        cb = (lambda done, total: progress("evaluate", done, total)) if progress else None
        try:
            res = evaluate(model if model is not None else self.model, loader, progress=cb)
        except RuntimeError as exc:
            raise WorkbenchError(f"evaluation failed (does the data fit the model's input "
                                 f"{list(self.loaded.input_shape)}?): {str(exc).splitlines()[0]}") from None
        except ValueError as exc:
            raise WorkbenchError(str(exc)) from None
        return {"accuracy": float(res.accuracy), "loss": float(res.loss), "n": int(res.n)}

    def repair_inputs(self, data: DataSource, n: int | None = None, seed: int = 0) -> torch.Tensor:
        from .data import sample_inputs

        if not data.spec:
            raise WorkbenchError("Fold-R resets BatchNorm statistics with real data: pick evaluation data first "
                                 "(or use the data-free Fold-AR / Fold-DIR)")
        try:
            return sample_inputs(data.spec, "train", int(n or data.repair_samples), card=self.loaded.card, seed=seed)
        except ValueError as exc:
            raise WorkbenchError(str(exc)) from None

    def sample_batch(self, data: DataSource | None, n: int = 128, seed: int = 0) -> torch.Tensor:
        """Inputs for activation statistics: real test inputs when there is data, else the example input."""
        if data is not None and data.spec:
            try:
                from .data import sample_inputs

                return sample_inputs(data.spec, "test", n, card=self.loaded.card, seed=seed)
            except ValueError:
                pass
        g = torch.Generator().manual_seed(seed)
        return torch.randn((n, *self.loaded.input_shape), generator=g)

    # ---- folding ------------------------------------------------------------------------------
    def _fold_result(self, plan, data: DataSource | None, progress: Progress, method: str = "fold"):
        from . import fold as F

        repair_data = None
        if plan.repair == "r":
            repair_data = self.repair_inputs(data or DataSource(None), plan.repair_settings.get("samples"),
                                             seed=plan.seed)
        base = copy.deepcopy(self.model) if plan.repair == "dir" else self.model
        try:
            if method == "fold":
                return F.fold(base, plan, example_input=self.example_input(2), repair_data=repair_data,
                              progress=progress, num_classes=self.loaded.card.get("num_classes"))
            return F.run(base, plan, method=method, example_input=self.example_input(2), repair_data=repair_data,
                         progress=progress, num_classes=self.loaded.card.get("num_classes"))
        except ValueError as exc:
            raise WorkbenchError(str(exc)) from None

    def fold(self, plan, data: DataSource | None = None, progress: Progress = None, *,
             measure_latency: bool = True) -> FoldOutcome:
        """Fold a copy of the base model and measure it. ``report`` keys: before/after dicts with params,
        flops, size_bytes, latency_ms, accuracy (None without data), plus groups, seconds, plan."""
        t0 = time.perf_counter()
        res = self._fold_result(plan, data, progress)
        before = {"params": self.params(), "flops": self.flops(), "size_bytes": self.size_bytes()}
        after = {"params": int(sum(p.numel() for p in res.model.parameters())),
                 "flops": _flops(res.model, self.example_input(1)),
                 "size_bytes": _size_bytes(res.model)}
        if measure_latency:
            before["latency_ms"], after["latency_ms"] = self.latency_pair(self.model, res.model)
        if data is not None and data.spec:
            before["accuracy"] = self.evaluate(None, data)["accuracy"]
            ev = self.evaluate(res.model, data, progress)
            after["accuracy"], after["loss"] = ev["accuracy"], ev["loss"]
        sparsity = 1.0 - after["params"] / max(1, before["params"])
        report = {
            "model": self.spec, "model_label": self.source.label, "data": data.label if data else None,
            "plan": plan.to_dict(), "method": REPAIR_LABELS.get(plan.repair, plan.repair),
            "before": before, "after": after, "param_sparsity": sparsity,
            "flops_reduction": (1.0 - after["flops"] / before["flops"]) if before.get("flops") and after.get("flops") else None,
            "groups": [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in g.items()}
                       for g in res.groups],
            "seconds": {**{k: float(v) for k, v in res.seconds.items()}, "wall": time.perf_counter() - t0},
            "repair_samples": int(getattr(res, "repair_samples", 0) or 0),
        }
        return FoldOutcome(res, report)

    def latency_pair(self, a: nn.Module, b: nn.Module, batch: int = 8, rounds: int = 7) -> tuple[float, float]:
        """Median latency (ms per batch) of two models measured in alternation, so a busy machine slows
        both alike instead of whichever happened to run second."""
        x = self.example_input(batch)
        ta, tb = [], []
        with torch.no_grad():
            for m in (a, b):
                m(x)
            for _ in range(rounds):
                for m, acc in ((a, ta), (b, tb)):
                    t = time.perf_counter()
                    m(x)
                    acc.append((time.perf_counter() - t) * 1000.0)
        return float(np.median(ta)), float(np.median(tb))

    def latency(self, model: nn.Module, batch: int = 8) -> float:
        try:
            from .metrics import latency_ms

            return float(latency_ms(model, self.example_input(batch)))
        except ImportError:
            x = self.example_input(batch)
            with torch.no_grad():
                model(x)
                t = time.perf_counter()
                for _ in range(5):
                    model(x)
            return (time.perf_counter() - t) / 5 * 1000.0

    def variance_ratios(self, result, inputs: torch.Tensor) -> list[dict]:
        from .metrics import variance_ratios

        return [dict(r) for r in variance_ratios(self.model, result.model, inputs, result.channel_maps)]

    def variance_comparison(self, plan, methods: Sequence[str], data: DataSource | None,
                            progress: Progress = None, n: int = 128, known: dict | None = None) -> dict:
        """{method: {"rows": variance rows, "accuracy": float|None, "error": str|None}} for the plan
        folded with each repair method (same clustering, same seed). ``known`` maps a method to a FoldResult
        already computed for exactly this plan (e.g. the run the user just did), which is reused."""
        from .plans import FoldPlan

        inputs = self.sample_batch(data, n=n, seed=plan.seed)
        out = {}
        for i, m in enumerate(methods):
            d = plan.to_dict()
            d["repair"] = m
            p = FoldPlan.from_dict(d)
            try:
                res = (known or {}).get(m) or self._fold_result(p, data, progress)
                acc = self.evaluate(res.model, data)["accuracy"] if data is not None and data.spec else None
                out[m] = {"rows": self.variance_ratios(res, inputs), "accuracy": acc, "error": None}
            except WorkbenchError as exc:
                out[m] = {"rows": [], "accuracy": None, "error": str(exc)}
            if progress:
                progress("compare", i + 1, len(methods))
        return out

    def sweep(self, ratios: Sequence[float], methods: Sequence[str], data: DataSource, *,
              seeds: Sequence[int] = (0,), progress: Progress = None) -> list[dict]:
        """Accuracy vs. parameter sparsity for each (method, ratio, seed)."""
        if not data.spec:
            raise WorkbenchError("a sweep measures accuracy: pick evaluation data on the Model & data page")
        try:
            from .sweep import sweep as engine_sweep
        except ImportError:
            engine_sweep = None
        if engine_sweep is not None:
            try:
                cb = (lambda done, total, *_: progress("sweep", done, total)) if progress else None
                return [dict(r) for r in engine_sweep(self.loaded, list(ratios), list(methods), data.spec,
                                                      seeds=tuple(seeds), progress=cb,
                                                      **_sweep_kwargs(engine_sweep, data))]
            except ValueError as exc:
                raise WorkbenchError(str(exc)) from None
        return self._sweep_fallback(ratios, methods, data, seeds, progress)

    def _sweep_fallback(self, ratios, methods, data, seeds, progress) -> list[dict]:
        from .plans import FoldPlan

        rows, total, done = [], len(ratios) * len(methods) * len(seeds), 0
        for m in methods:
            base_m, _, rep = m.partition("+")
            for r in ratios:
                for s in seeds:
                    if base_m in ("l1", "l2"):
                        plan = FoldPlan(default_ratio=float(r), repair="r" if rep else "none", seed=int(s))
                        res = self._fold_result(plan, data, None, method=base_m)
                    else:
                        plan = FoldPlan(default_ratio=float(r), repair=m, seed=int(s))
                        res = self._fold_result(plan, data, None)
                    ev = self.evaluate(res.model, data)
                    params = sum(p.numel() for p in res.model.parameters())
                    rows.append({"method": m, "ratio": float(r), "seed": int(s),
                                 "param_sparsity": 1.0 - params / self.params(),
                                 "accuracy": ev["accuracy"], "loss": ev["loss"]})
                    done += 1
                    if progress:
                        progress("sweep", done, total)
        return rows

    # ---- teaching -----------------------------------------------------------------------------
    def activations(self, module_name: str, inputs: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """Output of ``module_name`` on ``inputs`` as (samples·positions, channels)."""
        model = model if model is not None else self.model
        mod = dict(model.named_modules())[module_name]
        store = {}
        h = mod.register_forward_hook(lambda _m, _i, o: store.__setitem__("out", o.detach()))
        try:
            with torch.no_grad():
                model(inputs)
        finally:
            h.remove()
        a = store["out"]
        if a.dim() == 4:
            a = a.permute(0, 2, 3, 1).reshape(-1, a.shape[1])
        return a.reshape(-1, a.shape[-1]) if a.dim() != 2 else a

    def cluster_variance(self, group_id: str, labels: np.ndarray, inputs: torch.Tensor) -> list[dict]:
        """Per cluster: Var(mean of the members' activations) / mean Var(member) at the group's normalised
        producer output (the BN after the first conv when there is one) — the shrinkage folding causes."""
        g = self.group(group_id)
        modules = dict(self.model.named_modules())
        bn = next((p for p in g.producers if isinstance(modules.get(p), (nn.BatchNorm1d, nn.BatchNorm2d))), None)
        where = bn or next(p for p in g.producers if isinstance(modules.get(p), (nn.Conv2d, nn.Linear)))
        a = self.activations(where, inputs).double()
        mem = next((m for m in g.members if m.module == where and m.side == "out"), None)
        if mem is not None:
            order = np.argsort(np.asarray(mem.root_idxs), kind="stable")
            a = a[:, torch.as_tensor(np.asarray(mem.idxs)[order])]
        var = a.var(0)
        out = []
        for c in range(int(labels.max()) + 1):
            idx = torch.as_tensor(np.flatnonzero(labels == c))
            merged = a[:, idx].mean(1).var()
            out.append({"cluster": c, "size": int(len(idx)), "ratio": float(merged / var[idx].mean().clamp_min(1e-12)),
                        "mean_cos": float(_mean_pairwise_cos(self.features(group_id)[idx.numpy()]))})
        return out

    def _consumer(self, group_id: str):
        """First conv/linear consumer whose input channels map one-to-one onto the group (or None)."""
        g = self.group(group_id)
        modules = dict(self.model.named_modules())
        for mem in g.members:
            mod = modules.get(mem.module)
            if mem.side == "in" and isinstance(mod, (nn.Conv2d, nn.Linear)) and len(mem.idxs) == g.channels \
                    and getattr(mod, "groups", 1) == 1:
                order = np.argsort(np.asarray(mem.root_idxs), kind="stable")
                return mem.module, mod, np.asarray(mem.idxs)[order]
        return None

    def consumer_columns(self, group_id: str, labels: np.ndarray, max_rows: int = 24) -> dict | None:
        """The next layer's weights seen from the group: (out, n) before and (out, k) after folding.

        Conv kernels are summed over their spatial taps (the response to a constant patch)."""
        found = self._consumer(group_id)
        if found is None:
            return None
        name, mod, idx = found
        w = mod.weight.detach().double()
        w = w.sum(dim=(2, 3)) if w.dim() == 4 else w
        cols = w[:, torch.as_tensor(idx)].numpy()[:max_rows]
        labels = np.asarray(labels)
        k = int(labels.max()) + 1
        merged = np.stack([cols[:, labels == c].sum(1) for c in range(k)], axis=1)
        return {"module": name, "before": cols, "after": merged, "rows": int(w.shape[0]),
                "kernel": list(mod.weight.shape[2:]) if mod.weight.dim() == 4 else []}

    def merge_error(self, group_id: str, labels: np.ndarray, inputs: torch.Tensor, seed: int = 0) -> dict | None:
        """Relative change of the next layer's output when each channel it reads is replaced by its cluster mean
        (what the merged channel feeds it), for the k-means clusters and for random clusters of the same sizes."""
        found = self._consumer(group_id)
        if found is None:
            return None
        name, mod, idx = found
        store = {}
        h = mod.register_forward_pre_hook(lambda _m, a: store.__setitem__("x", a[0].detach()))
        try:
            with torch.no_grad():
                self.model(inputs)
        finally:
            h.remove()
        x = store["x"]
        labels = np.asarray(labels)
        idx_t = torch.as_tensor(idx)

        def replaced(lab):
            xg = x[:, idx_t]
            out = x.clone()
            k = int(lab.max()) + 1
            lab_t = torch.as_tensor(lab)
            shape = (xg.shape[0], k) + tuple(xg.shape[2:])
            sums = torch.zeros(shape, dtype=xg.dtype).index_add_(1, lab_t, xg)
            means = sums / torch.bincount(lab_t, minlength=k).to(xg.dtype).view(1, k, *([1] * (xg.dim() - 2)))
            out[:, idx_t] = means[:, lab_t]
            return out

        with torch.no_grad():
            y = mod(x)
            err = float((mod(replaced(labels)) - y).norm() / y.norm().clamp_min(1e-12))
            rng = np.random.default_rng(seed)
            rerr = float((mod(replaced(rng.permutation(labels))) - y).norm() / y.norm().clamp_min(1e-12))
        return {"consumer": name, "error": err, "random_error": rerr}

    # ---- export -------------------------------------------------------------------------------
    def export_folded(self, outcome: FoldOutcome) -> bytes:
        """A zip with the folded model (safetensors + card + plan) and the report."""
        buf = io.BytesIO()
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "folded"
            try:
                from .io import save_folded

                save_folded(outcome.result, self.loaded, out)
            except ImportError:
                out.mkdir(parents=True)
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in outcome.model.state_dict().items()},
                          str(out / "model.safetensors"))
                (out / "plan.json").write_text(outcome.result.plan.to_json())
            (out / "report.json").write_text(json.dumps(outcome.report, indent=2, default=json_default))
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
                for p in sorted(out.rglob("*")):
                    if p.is_file():
                        z.write(p, p.relative_to(out.parent))
        return buf.getvalue()


def report_csv(report: dict) -> str:
    """Per-group CSV of a fold report."""
    cols = ["id", "channels_before", "channels_after", "ratio", "inertia", "foldable", "reason"]
    lines = [",".join(cols)]
    for g in report.get("groups", []):
        vals = []
        for c in cols:
            v = g.get(c)
            s = "" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))
            vals.append('"' + s.replace('"', "'") + '"' if ("," in s or " " in s) else s)
        lines.append(",".join(vals))
    return "\n".join(lines) + "\n"


def sweep_csv(rows: Sequence[dict]) -> str:
    cols = ["method", "ratio", "seed", "param_sparsity", "accuracy", "loss"]
    lines = [",".join(cols)]
    for r in rows:
        lines.append(",".join("" if r.get(c) is None else (f"{r[c]:.6g}" if isinstance(r[c], float) else str(r[c]))
                              for c in cols))
    return "\n".join(lines) + "\n"


def report_json(report: dict) -> str:
    return json.dumps(report, indent=2, default=json_default)



def _size_bytes(model: nn.Module) -> int:
    try:
        from .metrics import model_size_bytes

        return int(model_size_bytes(model))
    except ImportError:
        return int(sum(t.numel() * t.element_size() for t in model.state_dict().values()))


def _flops(model: nn.Module, x: torch.Tensor) -> int | None:
    try:
        from .metrics import count_flops

        return int(count_flops(model, x))
    except Exception:
        return None


def _sweep_kwargs(fn, data: DataSource) -> dict:
    import inspect

    params = inspect.signature(fn).parameters
    kw = {}
    if "limit" in params:
        kw["limit"] = data.limit
    if "eval_limit" in params:
        kw["eval_limit"] = data.limit
    if "repair_samples" in params:
        kw["repair_samples"] = data.repair_samples
    return kw


def _mean_pairwise_cos(x: np.ndarray) -> float:
    if len(x) < 2:
        return 1.0
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    s = xn @ xn.T
    n = len(x)
    return float((s.sum() - np.trace(s)) / (n * (n - 1)))


def fmt_count(n) -> str:
    return "—" if n is None else _fmt_int(n)


__all__ = ["ModelSource", "DataSource", "Workbench", "WorkbenchError", "FoldOutcome", "save_upload",
           "default_data_for", "report_csv", "sweep_csv", "report_json", "fmt_count", "REPAIR_LABELS",
           "REPAIR_METHODS", "SWEEP_METHODS", "DEFAULT_MODEL"]
_ = field
