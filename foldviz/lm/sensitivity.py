"""Per-layer sensitivity of a decoder LM: perplexity when one decoder layer at a time is compressed.

:func:`layer_sensitivity` is independent of how a layer is compressed: it calls ``compress(model, group_ids)``
(which must return a compressed copy with only those groups changed, e.g. a fold at the plan's ratios restricted to
them) once per decoder layer with that layer's foldable groups (``model.layers.{i}.mlp`` and
``model.layers.{i}.self_attn``), and measures perplexity with :func:`foldviz.lm.evaluate.perplexity` on the same
windows each time.

:func:`plan_sensitivity` is the engine's entry point: for a loaded model and a :class:`~foldviz.plans.FoldPlan` it
compresses one layer at a time with the plan's own method (:func:`foldviz.apply.apply_method`, the code every fold
runs) and a plan restricted to that layer (:func:`restrict_plan`), on a text spec's evaluation windows.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .evaluate import perplexity
from .groups import find_lm_groups

__all__ = ["layer_sensitivity", "restrict_plan", "plan_sensitivity", "SensitivityError", "SENSITIVITY_COLUMNS"]

#: the columns of a sensitivity table (CLI ``--out FILE.csv``)
SENSITIVITY_COLUMNS = ("layer", "groups", "perplexity", "delta", "relative")


class SensitivityError(ValueError):
    """A sensitivity measurement that cannot be made (wrong model kind, no data)."""


def layer_sensitivity(model: nn.Module, tokens, compress: Callable[[nn.Module, list[str]], nn.Module], *,
                      max_windows: int | None = None, base: float | None = None, progress=None) -> list[dict]:
    """Rows ``{"layer", "groups", "perplexity", "delta", "relative"}`` per decoder layer with a foldable group, in
    layer order: perplexity with only that layer compressed, its difference from the uncompressed model's
    (``base``, measured here when not given) and their ratio. ``progress(done, total)`` after each layer."""
    by_layer: dict[int, list[str]] = {}
    for g in find_lm_groups(model).groups:
        if g.foldable and g.layer is not None:
            by_layer.setdefault(g.layer, []).append(g.id)
    if base is None:
        base = perplexity(model, tokens, max_windows=max_windows)["perplexity"]
    rows = []
    for n, (layer, gids) in enumerate(sorted(by_layer.items())):
        ppl = perplexity(compress(model, gids), tokens, max_windows=max_windows)["perplexity"]
        rows.append({"layer": layer, "groups": gids, "perplexity": ppl, "delta": ppl - base,
                     "relative": ppl / base if base else float("nan")})
        if progress is not None:
            progress(n + 1, len(by_layer))
    return rows


def restrict_plan(plan, group_ids):
    """``plan`` changing only ``group_ids``: their ratios as ``plan`` gives them (0 for skipped groups), every
    other group's ratio 0 (``default_ratio`` 0); method settings, clustering and seed unchanged.

    Parameters
    ----------
    plan : FoldPlan
    group_ids : iterable of str

    Returns
    -------
    FoldPlan
    """
    return plan.with_changes(default_ratio=0.0, ratios={g: plan.ratio_for(g) for g in group_ids})


def plan_sensitivity(loaded, plan, text: str, *, method: str | None = None, limit: int | None = None,
                     progress=None, device=None) -> dict:
    """Perplexity on ``text`` when only one decoder layer is folded, for every layer.

    Each layer's foldable groups (MLP neurons, query heads) are folded at ``plan``'s ratios with ``method``
    (default: the plan's own, e.g. Fold + refit) through :func:`foldviz.apply.apply_method` with
    :func:`restrict_plan`; perplexity follows :data:`foldviz.lm.evaluate.PROTOCOL` on the same windows each time.

    Parameters
    ----------
    loaded : LoadedModel
        A language model (``loaded.kind == "lm"``) with a tokenizer.
    plan : FoldPlan
        Validated against the model's groups here.
    text : str
        A text spec (``shakespeare:test``, ``text:FILE``, ``wikitext2:DIR``, ...).
    limit : int, optional
        At most this many windows of the context length.
    progress : callable, optional
        ``progress("sensitivity", done, total)`` after each layer.

    Returns
    -------
    dict
        ``{"rows", "base", "method", "data", "windows", "seq_len"}``; ``rows`` as :func:`layer_sensitivity`
        (one per decoder layer with a foldable group, in layer order), each with the ``ratios`` it folded.
    """
    from ..apply import apply_method
    from ..kinds import kind_of
    from ..methods import plan_method

    kind = kind_of(loaded)
    if kind.key != "lm":
        raise SensitivityError("sensitivity is for language models")
    plan.validate(kind.graph(loaded))
    method = method or plan_method(kind.key, plan.repair)
    kind.check_data(loaded, text)
    tokens = kind.prepare_eval(loaded, text, limit)
    base = kind.evaluate(loaded, loaded.model, text, limit, prepared=tokens, device=device)

    def compress(_model, gids):
        return apply_method(loaded, restrict_plan(plan, gids), method, device=device).model

    cb = (lambda done, total: progress("sensitivity", done, total)) if progress else None
    rows = layer_sensitivity(loaded.model, tokens, compress, max_windows=limit, base=base["perplexity"],
                             progress=cb)
    for r in rows:
        r["ratios"] = {g: plan.ratio_for(g) for g in r["groups"]}
    return {"rows": rows, "base": base["perplexity"], "method": method, "data": text, "windows": base["samples"],
            "seq_len": base["seq_len"]}
