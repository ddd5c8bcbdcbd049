"""Per-layer sensitivity of a decoder LM: perplexity when one decoder layer at a time is compressed.

:func:`layer_sensitivity` is independent of how a layer is compressed: it calls ``compress(model, group_ids)``
(which must return a compressed copy with only those groups changed, e.g. a fold at the plan's ratios restricted to
them) once per decoder layer with that layer's foldable groups (``model.layers.{i}.mlp`` and
``model.layers.{i}.self_attn``), and measures perplexity with :func:`foldviz.lm.evaluate.perplexity` on the same
windows each time.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .evaluate import perplexity
from .groups import find_lm_groups

__all__ = ["layer_sensitivity"]


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
