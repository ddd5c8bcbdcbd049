"""Fold plans: a versioned, schema-validated JSON document saying how to fold a model.

A plan names the model (spec + weights hash), a default ratio (fraction of channels removed per group),
per-group overrides keyed by group id, skipped groups, the repair method with its settings, and the
clustering settings and seed. Saving then loading gives an identical plan.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import jsonschema

PLAN_VERSION = 1
REPAIRS = ("none", "r", "ar", "dir")
REPAIR_NAMES = {"none": "Fold-Naive", "r": "Fold-R", "ar": "Fold-AR", "dir": "Fold-DIR"}
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
            },
        },
        "clustering": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "algorithm": {"enum": ["kmeans", "sklearn", "ward"]},
                "n_init": {"type": "integer", "minimum": 1, "maximum": 100},
                "max_iter": {"type": "integer", "minimum": 1, "maximum": 10000},
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
    repair: str = "ar"
    ratios: dict[str, float] = field(default_factory=dict)
    skip: list[str] = field(default_factory=list)
    repair_settings: dict = field(default_factory=dict)
    clustering: dict = field(default_factory=lambda: {"algorithm": "kmeans", "n_init": 4, "max_iter": 100})
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
        return REPAIR_NAMES[self.repair]

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
                                                                                  "jitter")} \
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

