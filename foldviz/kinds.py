"""Model kinds: what an image classifier or a decoder language model supplies to the one folding pipeline.

A kind adapter supplies only what differs between kinds:

==================  ==========================================  ===============================================
hook                image classifier (``"cnn"``)                 language model (``"lm"``)
==================  ==========================================  ===============================================
``structure``       groups from the traced dependency graph,     MLP neurons and query heads per layer; merges
                    merges by Torch-Pruning surgery              replace projections (:mod:`foldviz.lm.kind`)
``evaluate``        top-1 accuracy and loss on a dataset spec    perplexity on a text spec
``variance``        per-channel activation variance ratio        per-layer MLP output variance ratio
``default_plan``    ratio 0.3, Fold-DFR                          ratio 0.2, Fold + refit, Ward clustering
``cost_input``      one example image                            one token (FLOPs per token)
``check_output``    (foldviz format, always writable)            transformers-expressible sizes, or refused
==================  ==========================================  ===============================================

Loading a spec is :func:`foldviz.models.load_model` (every spec form); writing a fold is
:func:`foldviz.persist.save_folded`; running a method is :func:`foldviz.apply.apply_method`; the report is
:func:`foldviz.report.build_report`. All of them serve every kind.
"""
from __future__ import annotations

import torch
from torch import nn

from .metrics import variance_ratios
from .methods import KIND_NAMES, MODEL_KINDS, keys_for
from .plans import FoldPlan, PlanError
from .surgery import TRACED

__all__ = ["ImageClassifierKind", "get_kind", "kind_of", "KIND_LABELS", "SPEC_FORMS"]

KIND_LABELS = KIND_NAMES

#: every model spec form, with an example (the CLI's --help and the app list these)
SPEC_FORMS = (
    ("demo:NAME", "demo:digits-resnet (bundled image classifiers) or demo:shakespeare-llama (bundled LMs)"),
    ("torchvision:ARCH", "torchvision:resnet18 --num-classes 10 --cifar-stem --weights ckpt.pth"),
    ("hf:DIR", "hf:./TinyLlama (a local save_pretrained directory of a Llama-layout LM; offline)"),
    ("file:DIR", "file:./folded (a model saved by foldviz fold --out; a plain directory path works too)"),
)


class ImageClassifierKind:
    """An image classifier traced with Torch-Pruning (conv nets, MLPs, ResNets, MobileNets, ...)."""

    key = "cnn"
    label = KIND_LABELS["cnn"]
    a_label = "an image classifier"
    units = "channels"
    metric = "accuracy"
    metric_label = "Accuracy"
    higher_is_better = True
    data_label = "dataset"
    structure = TRACED
    output_formats = ("foldviz",)
    default_ratio = 0.3
    flops_unit = "FLOPs (2 per MAC), batch 1"

    def graph(self, loaded):
        from .groups import find_groups

        return find_groups(loaded.model, loaded.example_input(2))

    def default_plan(self, loaded, ratio: float | None = None, **fields) -> FoldPlan:
        return FoldPlan(default_ratio=self.default_ratio if ratio is None else float(ratio), **fields)

    def default_data(self, loaded) -> str | None:
        """The bundled demos are evaluated on the bundled digits; other models start without data."""
        return "digits" if str(loaded.spec).startswith("demo:") or loaded.card.get("dataset") == "digits" else None

    def cost_input(self, loaded) -> torch.Tensor:
        return loaded.example_input(1)

    def check_data(self, loaded, spec: str) -> None:
        from .data import load_dataset

        load_dataset(spec, "test", card=loaded.card)

    def prepare_eval(self, loaded, spec: str, limit: int | None = None):
        """What :meth:`evaluate` reads, loaded once (a sweep evaluates many folds on it): the test loader."""
        from .data import load_dataset, make_loader

        return make_loader(load_dataset(spec, "test", card=loaded.card), limit=limit)

    def evaluate(self, loaded, model: nn.Module, spec: str, limit: int | None = None, progress=None, *,
                 prepared=None, device=None) -> dict:
        """Top-1 accuracy and mean cross-entropy on the test split of dataset ``spec`` (at most ``limit``)."""
        from .data import evaluate

        loader = prepared if prepared is not None else self.prepare_eval(loaded, spec, limit)
        ev = evaluate(model, loader, progress=progress, device=device)
        return {"accuracy": ev.accuracy, "loss": ev.loss, "samples": ev.n}

    def variance(self, loaded, original: nn.Module, folded: nn.Module, result, spec: str | None, n: int,
                 notes: list | None = None):
        """Per-layer activation-variance ratios on ``n`` test inputs of ``spec`` (standard-normal without data)."""
        from .data import sample_inputs

        if spec:
            x, desc = sample_inputs(spec, "test", n, card=loaded.card, seed=1), f"{n} test samples of {spec}"
        else:
            x, desc = loaded.example_input(n, seed=1), f"{n} standard-normal inputs (no data given)"
        return variance_ratios(original, folded, x, result.channel_maps, notes=notes), desc

    def check_output(self, loaded, graph, plan: FoldPlan, fmt: str | None = None) -> None:
        if fmt not in (None, "foldviz"):
            raise PlanError(f"image classifiers are saved in the foldviz format, not {fmt!r}")


_KINDS: dict[str, object] = {"cnn": ImageClassifierKind()}


def get_kind(key: str):
    """The adapter of model kind ``key`` (``"cnn"`` or ``"lm"``)."""
    if key not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {key!r}; choose one of {', '.join(MODEL_KINDS)}")
    if key not in _KINDS:  # the language-model adapter imports transformers' configs: only when needed
        from .lm.kind import LanguageModelKind

        _KINDS[key] = LanguageModelKind()
    return _KINDS[key]


def kind_of(loaded_or_result):
    """The adapter of a loaded model, a fold result or anything with a ``kind`` attribute."""
    return get_kind(getattr(loaded_or_result, "kind", "cnn"))


def methods_for(loaded) -> tuple[str, ...]:
    """Registry keys of the methods that apply to ``loaded``'s kind."""
    return keys_for(getattr(loaded, "kind", "cnn"))
