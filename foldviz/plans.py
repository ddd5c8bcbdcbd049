"""Fold plans: a versioned, schema-validated JSON document saying how to fold a model.

A plan names the model (spec + weights hash), a default ratio (fraction of channels removed per group),
per-group overrides keyed by group id, skipped groups, the repair method with its settings, and the
clustering settings and seed. Saving then loading gives an identical plan.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import jsonschema
import torch
from torch import nn

from .kmeans import ALGORITHMS, DEFAULT_CLUSTERING, REFINES, k_for_ratio
from .methods import DEFAULT_REPAIR, METHODS, fold_keys, label
from .metrics import count_flops, count_params

PLAN_VERSION = 1
# every repair a registered method runs (a pruning baseline's result records its own, e.g. FLAP's bias)
REPAIRS = tuple(dict.fromkeys([*fold_keys(), *(m.repair for m in METHODS.values())]))
MAX_PLAN_BYTES = 5 * 1024 * 1024

_RATIO = {"type": "number", "minimum": 0, "exclusiveMaximum": 1}
SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "foldviz fold plan",
    "type": "object",
    "required": ["foldviz_plan", "default_ratio", "repair"],
    "additionalProperties": False,
    "properties": {
        "foldviz_plan": {"const": PLAN_VERSION},
        "model": {"type": ["string", "null"]},
        "weights_sha256": {"type": ["string", "null"], "pattern": "^[0-9a-f]{64}$"},
        "default_ratio": _RATIO,
        "ratios": {"type": "object", "additionalProperties": _RATIO},
        "skip": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
        "repair": {"enum": list(REPAIRS)},
        "repair_settings": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "samples": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
                "batch_size": {"type": "integer", "minimum": 1, "maximum": 65536},
                "iterations": {"type": "integer", "minimum": 1, "maximum": 100_000},
                "lr": {"type": "number", "exclusiveMinimum": 0},
                "bn_weight": {"type": "number", "minimum": 0},
                "tv_weight": {"type": "number", "minimum": 0},
                "l2_weight": {"type": "number", "minimum": 0},
                "jitter": {"type": "integer", "minimum": 0},
                # Fold-DFR's data-free proxy (foldviz.proxy.PROXY_DEFAULTS; "samples" above is its sample count)
                "proxy": {"enum": ["noise", "smooth", "di"]},
                "proxy_steps": {"type": "integer", "minimum": 1, "maximum": 100_000},
                "proxy_seed": {"type": "integer", "minimum": 0},
                "proxy_resolution": {"type": ["integer", "null"], "minimum": 2, "maximum": 4096},
                # Fold + refit (language models; foldviz.repair.REFIT_DEFAULTS; "samples" above: generated sequences)
                "ridge": {"type": "number", "minimum": 0, "maximum": 1000},
                "seqlen": {"type": "integer", "minimum": 2, "maximum": 1_000_000},
            },
        },
        "clustering": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "algorithm": {"enum": list(ALGORITHMS)},
                "n_init": {"type": "integer", "minimum": 1, "maximum": 100},
                "max_iter": {"type": "integer", "minimum": 1, "maximum": 10000},
                "refine": {"enum": list(REFINES)},
            },
        },
        "seed": {"type": "integer", "minimum": 0},
        "note": {"type": "string"},
    },
}


class PlanError(ValueError):
    """A plan that does not validate; the message names the offending field."""


@dataclass
class FoldPlan:
    default_ratio: float = 0.5
    repair: str = DEFAULT_REPAIR
    ratios: dict[str, float] = field(default_factory=dict)
    skip: list[str] = field(default_factory=list)
    repair_settings: dict = field(default_factory=dict)
    clustering: dict = field(default_factory=lambda: dict(DEFAULT_CLUSTERING))
    seed: int = 0
    model: str | None = None
    weights_sha256: str | None = None
    note: str = ""

    def __post_init__(self):
        self.check()

    # -- queries -------------------------------------------------------------------------------------------
    def ratio_for(self, group_id: str) -> float:
        if group_id in self.skip:
            return 0.0
        return float(self.ratios.get(group_id, self.default_ratio))

    @property
    def repair_name(self) -> str:
        return label(self.repair)

    def with_changes(self, **changes) -> "FoldPlan":
        """A validated copy with some fields replaced."""
        return FoldPlan.from_dict({**self.to_dict(), **changes})

    # -- (de)serialisation -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        out = {"foldviz_plan": PLAN_VERSION}
        for key in ("model", "weights_sha256", "default_ratio", "ratios", "skip", "repair", "repair_settings",
                    "clustering", "seed", "note"):
            out[key] = d[key]
        out["ratios"] = dict(sorted(out["ratios"].items()))
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def save(self, path) -> Path:
        from .utils import atomic_write_text

        path = Path(path)
        atomic_write_text(path, self.to_json())  # temp file + fsync + os.replace: never a partial plan
        return path

    @classmethod
    def from_dict(cls, data: dict) -> "FoldPlan":
        validate_plan_dict(data)
        kwargs = {k: v for k, v in data.items() if k != "foldviz_plan"}
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str | bytes) -> "FoldPlan":
        if isinstance(text, bytes):
            if len(text) > MAX_PLAN_BYTES:
                raise PlanError(f"plan file is {len(text)} bytes; the limit is {MAX_PLAN_BYTES}")
            text = text.decode("utf-8", errors="replace")
        try:
            data = json.loads(text)
        except RecursionError:
            raise PlanError("plan is not valid JSON: nested too deeply") from None
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path) -> "FoldPlan":
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan file not found: {path}")
        if path.stat().st_size > MAX_PLAN_BYTES:
            raise PlanError(f"plan file {path} is larger than {MAX_PLAN_BYTES} bytes")
        return cls.from_json(path.read_bytes())

    # -- validation ------------------------------------------------------------------------------------------
    def check(self) -> None:
        validate_plan_dict(self.to_dict())

    def validate(self, graph) -> None:
        """Check every group id against ``graph`` (a GroupGraph); unknown or unfoldable ids are errors."""
        by_id = graph.by_id
        for field_name, ids in (("ratios", self.ratios), ("skip", self.skip)):
            for gid in ids:
                if gid not in by_id:
                    raise PlanError(f"{field_name}: unknown group id {gid!r} (this model's groups: "
                                    f"{', '.join(list(by_id)[:12])}{', ...' if len(by_id) > 12 else ''})")
        for gid, r in self.ratios.items():
            if r > 0 and not by_id[gid].foldable and gid not in self.skip:
                raise PlanError(f"ratios.{gid}: group is not foldable ({by_id[gid].reason})")


_INT_FIELDS = {("seed",), ("foldviz_plan",)} | {("repair_settings", k) for k in ("samples", "batch_size", "iterations",
                                                                                  "jitter", "proxy_steps", "proxy_seed",
                                                                                  "proxy_resolution", "seqlen")} \
    | {("clustering", k) for k in ("n_init", "max_iter")}


def _check_numbers(obj, where: tuple = ()) -> None:
    """Finite numbers only (NaN passes no comparison, so a schema alone lets it through), integers as integers."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_numbers(v, where + (str(k),))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_numbers(v, where + (str(i),))
    elif isinstance(obj, float):
        name = ".".join(where) or "(top level)"
        if not math.isfinite(obj):
            raise PlanError(f"invalid plan field {name}: {obj} is not a finite number")
        if where in _INT_FIELDS:
            raise PlanError(f"invalid plan field {name}: {obj!r} is not an integer (write {int(obj)})"
                            if obj.is_integer() else f"invalid plan field {name}: {obj!r} is not an integer")


def validate_plan_dict(data) -> None:
    if not isinstance(data, dict):
        raise PlanError("plan must be a JSON object")
    _check_numbers(data)
    validator = jsonschema.Draft202012Validator(SCHEMA)
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        if err.validator == "additionalProperties":
            where = where if where != "(top level)" else "plan"
        raise PlanError(f"invalid plan field {where}: {err.message}")



# ----------------------------------------------------------------------------------------------------------------
# analytic preview and suggestion (no folding)
# ----------------------------------------------------------------------------------------------------------------
class CostModel:
    """Exact parameter counts and conv/linear FLOPs of ``model`` after a plan, computed without folding.

    One forward pass records each conv/linear layer's FLOPs; a plan then scales every parameter tensor and
    every layer's FLOPs by the fractions of its output and input channels that survive.
    """

    def __init__(self, model: nn.Module, graph, example_input: torch.Tensor):
        self.model, self.graph = model, graph
        self.modules = dict(model.named_modules())
        self.params = count_params(model)
        self.flops = count_flops(model, example_input[:1])
        self.layer_flops: dict[str, int] = {}
        hooks = []
        for name, mod in self.modules.items():
            if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                def hook(m, _i, out, name=name):  # 2 FLOPs per MAC: outputs x (in/groups x kernel) per output
                    self.layer_flops[name] = self.layer_flops.get(name, 0) + 2 * (out.numel() // out.shape[0]) * m.weight[0].numel()
                hooks.append(mod.register_forward_hook(hook))
        try:
            with torch.no_grad():
                model(example_input[:1])
        finally:
            for h in hooks:
                h.remove()

    def _keep(self, plan: FoldPlan) -> tuple[dict, dict, list[dict]]:
        """Fraction of each module's output / input channels that survives ``plan``, and one row per group."""
        out_keep: dict[str, float] = {}
        in_parts: dict[str, list[tuple[int, float]]] = {}
        rows = []
        for g in self.graph.groups:
            r = plan.ratio_for(g.id) if g.foldable else 0.0
            parts = getattr(g, "partitions", 1)   # query heads: the same k in each KV group
            k = parts * k_for_ratio(g.channels // parts, r) if g.foldable else g.channels
            rows.append({"id": g.id, "channels_before": g.channels, "channels_after": k, "ratio": r,
                         "skip": g.id in plan.skip, "foldable": bool(g.foldable), "override": g.id in plan.ratios})
            for mem in g.members:
                if mem.module not in self.modules:
                    continue
                if mem.side == "out":
                    out_keep[mem.module] = k / g.channels
                else:
                    in_parts.setdefault(mem.module, []).append((len(mem.idxs), k / g.channels))
        in_keep = {}
        for name, parts in in_parts.items():
            w = getattr(self.modules[name], "weight", None)
            if w is None or w.dim() < 2:
                continue
            total = w.shape[1] * getattr(self.modules[name], "groups", 1)
            covered = sum(n for n, _ in parts)
            in_keep[name] = (sum(n * f for n, f in parts) + max(0, total - covered)) / max(1, total)
        return out_keep, in_keep, rows

    def estimate(self, plan: FoldPlan) -> dict:
        """Channels per group, parameters and FLOPs after folding with ``plan`` (exact for conv/linear/BN)."""
        out_keep, in_keep, rows = self._keep(plan)
        params, seen = 0.0, set()
        for name, mod in self.modules.items():
            grouped = getattr(mod, "groups", 1) > 1   # depthwise: the input side shrinks with the output
            for pname, p in mod.named_parameters(recurse=False):
                if id(p) in seen:   # a tied weight (an LM's embedding and output layer) counts once
                    continue
                seen.add(id(p))
                f = out_keep.get(name, 1.0)
                if pname == "weight" and p.dim() >= 2 and not grouped:
                    f *= in_keep.get(name, 1.0)
                params += p.numel() * f
        scaled = sum(v * out_keep.get(n, 1.0) * (1.0 if getattr(self.modules[n], "groups", 1) > 1 else in_keep.get(n, 1.0))
                     for n, v in self.layer_flops.items())
        flops_after = int(round(self.flops - sum(self.layer_flops.values()) + scaled))
        return {"params_before": self.params, "params_after": int(round(params)), "flops_before": self.flops,
                "flops_after": flops_after, "param_sparsity": 1.0 - params / max(1, self.params), "groups": rows}


def suggest_ratio(score: float, level: float, max_ratio: float = 0.9) -> float:
    """A group's ratio proportional to its redundancy ``score`` (0..1) around ``level``."""
    return float(min(max_ratio, max(0.0, level * (0.5 + score))))


def suggest(cost: CostModel, scores: dict[str, float], target_sparsity: float, base: FoldPlan, *,
            max_ratio: float = 0.9) -> FoldPlan:
    """A plan whose per-group ratios follow redundancy ``scores`` and whose parameter sparsity is the target.

    Keeps everything else of ``base`` (repair, seed, clustering, skipped groups); per-group ratios are replaced
    and the default ratio becomes the mean suggested ratio (to 5 %). A bisection on the common level finds the target.
    """
    target = float(target_sparsity)
    if not 0.0 < target < 1.0:
        raise PlanError(f"target sparsity must be between 0 and 1, got {target}")
    scores = {gid: sc for gid, sc in scores.items() if gid not in base.skip}
    if not scores:
        raise PlanError("no foldable group is left to suggest ratios for (all are skipped)")

    def plan_at(level: float) -> FoldPlan:
        # whole percents: what a plan holds is exactly what the sliders and tables show
        ratios = {gid: round(suggest_ratio(sc, level, max_ratio), 2) for gid, sc in scores.items()}
        mean = round(20 * sum(ratios.values()) / len(ratios)) / 20   # the global ratio, on a 5 % grid
        return base.with_changes(ratios=ratios, default_ratio=min(mean, 0.95))

    lo, hi = 0.0, 2.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost.estimate(plan_at(mid))["param_sparsity"] < target else (lo, mid)
    plan = plan_at(hi)
    got = cost.estimate(plan)["param_sparsity"]
    if got < target - 0.02:
        raise PlanError(f"cannot reach {100 * target:.0f}% parameter sparsity by folding alone (at most "
                        f"{100 * got:.0f}% with every group at {100 * max_ratio:.0f}%)")
    return plan


# -- presets: plans that reproduce an experimental protocol ------------------------------------------------------
_STAGE = re.compile(r"^(layer(\d+))\.")


def last_stages_groups(graph, stages: int = 2) -> list[str]:
    """Ids of the foldable groups whose producers all lie in the last ``stages`` ResNet stages (``layerN.*``).

    A group that feeds a later stage counts (its consumers may lie anywhere); one produced partly by an earlier
    stage does not, so the residual stream entering the first selected stage stays whole."""
    found = {int(m.group(2)) for g in graph.groups for p in g.producers if (m := _STAGE.match(p))}
    if len(found) < stages:
        raise PlanError(f"preset needs a ResNet with at least {stages} stages named layer1, layer2, ...; "
                        f"this model has {len(found)}")
    wanted = {f"layer{i}" for i in sorted(found)[-stages:]}
    out = []
    for g in graph.foldable:
        owners = {(m.group(1) if (m := _STAGE.match(p)) else None) for p in g.producers}
        if owners and owners <= wanted:
            out.append(g.id)
    return out


def preset_plan(graph, name: str, ratio: float, **fields) -> FoldPlan:
    """A FoldPlan reproducing a named protocol at channel ratio ``ratio``; ``fields`` set other plan fields.

    Presets (:data:`PRESETS`):

    * ``"uniform"``: every foldable group at ``ratio`` (the paper's main protocol).
    * ``"ifm-last-two-stages"``: the IFM / INN protocol (Model Folding paper, Fig. 7; paper-numbers §5.2):
      only the groups produced inside the last two ResNet stages (``layer3``/``layer4`` of a ResNet18) are
      folded at ``ratio``; every other group keeps all its channels (default ratio 0).
    """
    if name not in PRESETS:
        raise PlanError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    if name == "uniform":
        return FoldPlan(**{"default_ratio": float(ratio), **fields})
    ids = last_stages_groups(graph, 2)
    return FoldPlan(**{"default_ratio": 0.0, "ratios": {gid: float(ratio) for gid in ids},
                       "note": f"preset {name}", **fields})


PRESETS = ("uniform", "ifm-last-two-stages")
