"""The one registry of compression methods: key, label, family, repair, whether it needs data, and the kind of
model it applies to (``"cnn"``: the channel-group engine; ``"lm"``: :mod:`foldviz.lm`'s decoder folding).

Every part of foldviz that names a method reads it here: plans (the ``repair`` field takes the keys of the
``fold`` family), the CLI's choices, the app's widgets and legends, figures, sweeps, reports and benchmarks.
Running a method is :func:`foldviz.apply.apply_method`. This module imports nothing heavy, so anything may import it.
"""
from __future__ import annotations

from dataclasses import dataclass

FAMILIES = ("fold", "prune", "merge")


@dataclass(frozen=True)
class Method:
    key: str                 # stable identifier used in plans, CLI flags, reports, CSVs
    label: str               # what people read
    family: str              # "fold" (cluster and merge), "prune" (rank and remove), "merge" (other merging baselines)
    repair: str              # key of foldviz.repair.REPAIRS run after the merge
    needs_data: bool         # needs real inputs (repair data)
    description: str
    importance: str | None = None   # prune family: foldviz.prune.IMPORTANCES key
    color: str = "#444444"
    dash: str = "solid"
    applies_to: tuple[str, ...] = ("cnn",)   # model kinds: "cnn" (channel groups), "lm" (Llama-layout decoders)


METHODS: dict[str, Method] = {m.key: m for m in (
    Method("none", "Fold-Naive", "fold", "none", False,
           "cluster and merge; no statistics repair (variance collapses)", color="#d62728"),
    Method("r", "Fold-R", "fold", "r", True,
           "merge, then recompute every BatchNorm's statistics on real inputs (REPAIR)", color="#1f77b4"),
    Method("ar", "Fold-AR", "fold", "ar", False,
           "data-free, as the authors' code: fuse BatchNorms, cluster fused features, rescale each cluster by the "
           "AR factor",
           color="#2ca02c"),
    Method("dfr", "Fold-DFR", "fold", "dfr", False,
           "data-free REPAIR: re-estimate every BatchNorm from the original's statistics, corrected on a synthetic "
           "proxy batch (foldviz's default)", color="#e377c2"),
    Method("dir", "Fold-DIR", "fold", "dir", False,
           "data-free: recompute BatchNorm statistics on inputs synthesised by Deep Inversion", color="#9467bd"),
    Method("ifm", "IFM", "merge", "none", False,
           "Iterative Feature Merging (Chen et al., ICLR 2024): greedily merge the closest pair of channels, "
           "summing producers and averaging consumers; no repair (variance overshoots)", color="#ff7f0e",
           dash="longdash"),
    Method("l1", "L1 pruning", "prune", "none", False, "remove the channels with the smallest L1 norm",
           importance="l1", color="#7f7f7f", dash="dot"),
    Method("l2", "L2 pruning", "prune", "none", False, "remove the channels with the smallest L2 norm",
           importance="l2", color="#bcbd22", dash="dot"),
    Method("l1+r", "L1 pruning + REPAIR", "prune", "r", True,
           "L1 pruning, then recompute BatchNorm statistics on real inputs", importance="l1", color="#17becf",
           dash="dashdot"),
    Method("l2+r", "L2 pruning + REPAIR", "prune", "r", True,
           "L2 pruning, then recompute BatchNorm statistics on real inputs", importance="l2", color="#8c564b",
           dash="dashdot"),
    Method("fold", "Fold (no repair)", "fold", "none", False,
           "language models: cluster the MLP neurons of each layer and the query heads within each KV group (Ward by "
           "default, the plan's clustering), merge each cluster (mean on the producing side, sum on the consuming "
           "side); no repair",
           color="#2ca02c", applies_to=("lm",)),
    Method("refit", "Fold + refit", "fold", "refit", False,
           "language models: fold as above, then refit each layer's output projections by least squares so that the "
           "folded layer reproduces the original's output on text the original model generates itself (data-free; "
           "foldviz's default for language models)", color="#e377c2", applies_to=("lm",)),
    Method("magnitude", "Magnitude pruning", "prune", "none", False,
           "language models: keep the units whose whole feature vector (the rows and columns they own) has the "
           "largest L2 norm", importance="feature-l2", color="#7f7f7f", dash="dot", applies_to=("lm",)),
    Method("wanda_sp", "Wanda-sp", "prune", "none", True,
           "language models: keep the units whose output-projection columns, weighted by the L2 norm of their input "
           "on calibration text, have the largest total |weight x activation| (Wanda's metric per structured unit)",
           importance="wanda-sp", color="#393b79", dash="dashdot", applies_to=("lm",)),
    Method("flap", "FLAP", "prune", "flap", True,
           "language models: keep the units whose input fluctuates most on calibration text (variance x squared "
           "column norm), and add the removed inputs' calibration mean to the output projection as a bias",
           importance="flap", color="#637939", dash="dashdot", applies_to=("lm",)),
    Method("random", "Random pruning", "prune", "none", False, "remove randomly chosen channels or units (seeded)",
           importance="random", color="#bbbbbb", dash="dash", applies_to=("cnn", "lm")),
)}

# the repair every entry point uses when none is named (library, CLI, app, plans)
DEFAULT_REPAIR = "dfr"

# real training inputs drawn for Fold-R / REPAIR when a plan does not say (app, CLI and sweeps alike)
DEFAULT_REPAIR_SAMPLES = 512

# calibration windows drawn for a language model's calibration-based pruning (Wanda-sp, FLAP) when not said
DEFAULT_CALIB_SAMPLES = 128

# inputs of the report's per-layer variance measurement (one hooked forward pass of each model; 0 skips it)
VARIANCE_SAMPLES = 128


MODEL_KINDS = ("cnn", "lm")
KIND_NAMES = {"cnn": "image classifier", "lm": "language model"}
# the repair a language model's plan uses when none is named (benchmarks/results/lm_research.md)
DEFAULT_LM_REPAIR = "refit"


def keys_for(kind: str) -> tuple[str, ...]:
    """Keys of the methods that apply to a model kind ("cnn" or "lm"), in registry order."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {MODEL_KINDS}")
    return tuple(k for k, m in METHODS.items() if kind in m.applies_to)


def fold_keys(kind: str | None = None) -> tuple[str, ...]:
    """The values a plan's ``repair`` field takes: the repairs of the fold family, for one model kind or any."""
    keys: list[str] = []
    for m in METHODS.values():
        if m.family == "fold" and (kind is None or kind in m.applies_to) and m.repair not in keys:
            keys.append(m.repair)
    return tuple(keys)


def plan_method(kind: str, repair: str) -> str:
    """The registry key of the method that a plan with ``repair`` runs on a model of ``kind``: the repair itself
    for image classifiers ("dfr" -> Fold-DFR), "fold" or "refit" for language models."""
    for k, m in METHODS.items():
        if m.family == "fold" and kind in m.applies_to and m.repair == repair:
            return k
    raise ValueError(f"repair {repair!r} does not apply to {KIND_NAMES.get(kind, kind)}s; choose one of "
                     f"{', '.join(fold_keys(kind))}")


def get_method(key: str) -> Method:
    try:
        return METHODS[key]
    except KeyError:
        raise ValueError(f"unknown method {key!r}; choose from {', '.join(METHODS)}") from None


def label(key: str) -> str:
    """Display label of a method key (unknown keys are shown as they are)."""
    m = METHODS.get(str(key))
    return m.label if m else ("Original" if key == "original" else str(key))


__all__ = ["FAMILIES", "MODEL_KINDS", "keys_for", "Method", "METHODS", "DEFAULT_REPAIR", "DEFAULT_LM_REPAIR", "DEFAULT_REPAIR_SAMPLES", "DEFAULT_CALIB_SAMPLES", "plan_method", "KIND_NAMES", "VARIANCE_SAMPLES", "fold_keys", "get_method", "label"]
