"""Sweep specs: a versioned, schema-validated JSON document naming many models x methods x ratios x seeds.

Example (``sweep.json``)::

    {
      "foldviz_sweep": 1,
      "models": ["demo:digits-resnet",
                 {"spec": "torchvision:resnet18", "weights": "r18.pth", "num_classes": 10, "cifar_stem": true,
                  "data": "cifar10:/data/cifar"}],
      "methods": ["none", "r", "ar", "l1", "l2"],
      "ratios": [0.1, 0.3, 0.5],
      "seeds": [0, 1, 2],
      "data": "digits",
      "eval_limit": null,
      "repair_samples": 512
    }

Language models take the calibration text of Wanda-sp / FLAP from ``"calib"`` (a text spec disjoint from
``"data"``), with ``"calib_samples"`` windows (default 128) of ``"calib_seqlen"`` tokens (default: the context).

``python -m foldviz sweep --spec sweep.json --out sweep.csv`` runs every cell; the single-model command line
(``foldviz sweep MODEL --ratios ... --methods ...``) builds the same spec with :func:`spec_from_args`.

Every problem raises :class:`SpecError` (a ``ValueError``) with a one-line message naming the field.
Numbers must be finite (``NaN``/``Infinity`` are rejected) and integer fields must be JSON integers (``2``,
not ``2.0``).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import jsonschema

from .apply import DEFAULT_REPAIR_SAMPLES
from .kmeans import DEFAULT_CLUSTERING
from .methods import METHODS
from .plans import SCHEMA as PLAN_SCHEMA

SPEC_VERSION = 1
MAX_SPEC_BYTES = 1024 * 1024

_RATIO = {"type": "number", "minimum": 0, "exclusiveMaximum": 1}
_MODEL_OBJECT = {
    "type": "object",
    "required": ["spec"],
    "additionalProperties": False,
    "properties": {
        "spec": {"type": "string", "minLength": 1},
        "weights": {"type": ["string", "null"]},
        "num_classes": {"type": ["integer", "null"], "minimum": 1},
        "cifar_stem": {"type": "boolean"},
        "pretrained": {"type": "boolean"},
        "data": {"type": "string", "minLength": 1},
    },
}


class SpecError(ValueError):
    """A sweep spec that does not validate; the message names the offending field."""


def _schema() -> dict:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "foldviz sweep spec",
        "type": "object",
        "required": ["foldviz_sweep", "models", "methods", "ratios"],
        "additionalProperties": False,
        "properties": {
            "foldviz_sweep": {"const": SPEC_VERSION},
            "models": {"type": "array", "minItems": 1,
                       "items": {"type": ["string", "object"], "if": {"type": "object"}, "then": _MODEL_OBJECT,
                                 "else": {"minLength": 1}}},
            "methods": {"type": "array", "minItems": 1, "uniqueItems": True, "items": {"enum": list(METHODS)}},
            "ratios": {"type": "array", "minItems": 1, "uniqueItems": True, "items": _RATIO},
            "seeds": {"type": "array", "minItems": 1, "uniqueItems": True,
                      "items": {"type": "integer", "minimum": 0}},
            "data": {"type": ["string", "null"]},
            "eval_limit": {"type": ["integer", "null"], "minimum": 1},
            "repair_samples": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
            "calib": {"type": ["string", "null"]},
            "calib_samples": {"type": ["integer", "null"], "minimum": 1, "maximum": 1_000_000},
            "calib_seqlen": {"type": ["integer", "null"], "minimum": 2},
            "include_original": {"type": "boolean"},
            "clustering": PLAN_SCHEMA["properties"]["clustering"],
            "repair_settings": {"type": "object"},  # checked by FoldPlan when the cells are planned
            "note": {"type": "string"},
        },
    }


def _is_strict_int(checker, instance) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_strict_int),
)


@dataclass(frozen=True)
class ModelRef:
    """How to load one model of a sweep (the arguments of :func:`foldviz.models.load_model`)."""

    spec: str
    weights: str | None = None
    num_classes: int | None = None
    cifar_stem: bool = False
    pretrained: bool = False
    data: str | None = None  # evaluation/repair data for this model; defaults to the spec's "data"
    # allows py:FILE:FACTORY models; granted by the command line (--trust-code), never read from a spec file
    trust_code: bool = field(default=False, compare=False)

    def load(self):
        from .models import load_model

        return load_model(self.spec, weights=self.weights, num_classes=self.num_classes,
                          cifar_stem=self.cifar_stem, pretrained=self.pretrained, trust_code=self.trust_code)


@dataclass
class SweepSpec:
    models: list[ModelRef]
    methods: list[str]
    ratios: list[float]
    seeds: list[int] = field(default_factory=lambda: [0])
    data: str | None = None
    eval_limit: int | None = None
    repair_samples: int = DEFAULT_REPAIR_SAMPLES
    # language models: calibration text of the methods that need data (wanda_sp, flap), windows and their length
    calib: str | None = None
    calib_samples: int | None = None        # None: foldviz.methods.DEFAULT_CALIB_SAMPLES
    calib_seqlen: int | None = None         # None: the model's context length
    include_original: bool = True
    clustering: dict | None = None          # None: each model kind's default (foldviz.kinds)
    repair_settings: dict = field(default_factory=dict)
    note: str = ""

    def data_for(self, model: ModelRef) -> str | None:
        return model.data or self.data

    def to_dict(self) -> dict:
        d = asdict(self)
        d["models"] = [{k: v for k, v in asdict(m).items() if v not in (None, False) and k != "trust_code"}
                       for m in self.models]
        for k in ("clustering", "calib", "calib_samples", "calib_seqlen"):
            if d[k] is None:
                d.pop(k)
        return {"foldviz_sweep": SPEC_VERSION, **d}


def _reject_constant(name: str):
    raise SpecError(f"sweep spec: {name} is not allowed; numbers must be finite")


def _check_finite(data, path="") -> None:
    if isinstance(data, float) and not math.isfinite(data):
        raise SpecError(f"invalid sweep spec field {path or '(top level)'}: {data} is not a finite number")
    if isinstance(data, dict):
        for k, v in data.items():
            _check_finite(v, f"{path}.{k}" if path else str(k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            _check_finite(v, f"{path}.{i}" if path else str(i))


def validate_spec_dict(data) -> None:
    if not isinstance(data, dict):
        raise SpecError("sweep spec must be a JSON object")
    _check_finite(data)
    errors = sorted(_Validator(_schema()).iter_errors(data), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    if errors:
        err = jsonschema.exceptions.best_match(errors) if len(errors) > 1 else errors[0]
        # descend into oneOf errors so "models.1.num_classes" is named rather than "models.1"
        while err.context:
            err = jsonschema.exceptions.best_match(err.context)
        where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        raise SpecError(f"invalid sweep spec field {where}: {err.message}")
    for i, m in enumerate(data["models"]):
        if not (isinstance(m, dict) and m.get("data")) and not data.get("data"):
            raise SpecError(f"invalid sweep spec field models.{i}: no evaluation data; set \"data\" for the sweep "
                            "or for this model (e.g. \"digits\", \"cifar10:ROOT\", \"imagefolder:DIR\")")


def spec_from_dict(data) -> SweepSpec:
    validate_spec_dict(data)
    models = [ModelRef(spec=m) if isinstance(m, str) else ModelRef(**m) for m in data["models"]]
    kw = {k: v for k, v in data.items() if k not in ("foldviz_sweep", "models")}
    spec = SweepSpec(models=models, **kw)
    spec.ratios = [float(r) for r in spec.ratios]
    if spec.clustering is not None:
        spec.clustering = {**DEFAULT_CLUSTERING, **spec.clustering}
    return spec


def spec_from_json(text: str | bytes) -> SweepSpec:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise SpecError(f"sweep spec is not valid JSON: {exc}") from None
    return spec_from_dict(data)


def load_spec(path) -> SweepSpec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"sweep spec not found: {path}")
    if path.stat().st_size > MAX_SPEC_BYTES:
        raise SpecError(f"sweep spec {path} is larger than {MAX_SPEC_BYTES} bytes")
    return spec_from_json(path.read_bytes())


def spec_from_args(model: ModelRef, ratios, methods, data: str | None, *, seeds=(0,), eval_limit=None,
                   repair_samples: int = DEFAULT_REPAIR_SAMPLES, clustering: dict | None = None, repair_settings: dict | None = None,
                   include_original: bool = True, calib: str | None = None, calib_samples: int | None = None,
                   calib_seqlen: int | None = None) -> SweepSpec:
    """The spec the single-model command line (and :func:`foldviz.sweep.sweep`) stands for, validated."""
    d = {"foldviz_sweep": SPEC_VERSION,
         "models": [{k: v for k, v in asdict(model).items() if v is not None and k != "trust_code"}],
         "methods": list(dict.fromkeys(methods)), "ratios": list(dict.fromkeys(float(r) for r in ratios)),
         "seeds": list(dict.fromkeys(int(s) for s in seeds)), "data": data, "eval_limit": eval_limit,
         "repair_samples": int(repair_samples), "include_original": include_original,
         "repair_settings": repair_settings or {}, "calib": calib, "calib_samples": calib_samples,
         "calib_seqlen": calib_seqlen}
    if clustering:
        d["clustering"] = clustering
    return grant_trust(spec_from_dict(d), model.trust_code)


def grant_trust(spec: SweepSpec, trust_code: bool) -> SweepSpec:
    """``spec`` with every model allowed (or not) to run its ``py:`` factory: the user's decision on the command
    line, which a spec file cannot make for them."""
    from dataclasses import replace

    spec.models = [replace(m, trust_code=bool(trust_code)) for m in spec.models]
    return spec


def check_spec_overlap(spec: SweepSpec, *, allow_overlap: bool = False) -> None:
    """Refuse a model whose data would repair and test on the same image folder (see foldviz.data.check_overlap),
    and calibration text that overlaps a model's evaluation text (:func:`foldviz.lm.calib.check_no_overlap`)."""
    from .data import check_overlap

    for m in spec.models:
        data = spec.data_for(m)
        if data and spec.calib:
            from .lm.calib import check_no_overlap

            check_no_overlap(spec.calib, data)
        elif data:
            check_overlap(data, data, allow_overlap=allow_overlap)
