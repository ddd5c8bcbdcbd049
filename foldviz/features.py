"""Per-channel feature vectors of a channel group, their similarity and redundancy.

The feature vector of channel i concatenates everything the group stores for it (folding-spec §3.1): the
producers' fan-in rows and biases, BatchNorm gamma/beta, and the consumers' fan-out columns. Running statistics
are left out. Which *feature space* a fold clusters in depends on its repair (see
:attr:`foldviz.repair.Repair.feature_space`): ``"raw"`` reads the model as it is; ``"fused"`` reads it after BatchNorm
fusion with robust per-column scaling (the authors' Fold-AR features).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .groups import ChannelGroup

FEATURE_SPACES = ("raw", "fused")


def _member_sources(module: nn.Module, side: str, idxs: list[int], root_idxs: list[int]):
    """(tensor whose dim-0 rows are the member's slices, member indices sorted by group channel) per block."""
    order = torch.as_tensor(np.argsort(np.asarray(root_idxs), kind="stable"))
    idx = torch.as_tensor(idxs)[order]   # member indices sorted by group channel, stable within a channel
    if side == "out":  # conv/linear rows + bias, or BatchNorm gamma + beta
        return [(t.detach(), idx) for t in (module.weight, module.bias) if t is not None]
    return [(module.weight.detach().transpose(0, 1), idx)]  # consumer: its input columns, as rows


# scratch bytes for copying one member block into the feature matrix / for one block of in-place scaling
FILL_CHUNK_BYTES = 32 * 1024 * 1024
SCALE_CHUNK_BYTES = 8 * 1024 * 1024


def group_features(model: nn.Module, group: ChannelGroup, *, scale: bool = False) -> torch.Tensor:
    """Feature matrix (channels, d) of ``group`` read from ``model`` (whose module names must match the group).

    ``scale=True`` applies a robust per-column scaling (median / interquartile range), as the authors' code does
    for Fold-AR, so that no single tensor dominates the distances. The matrix is filled block by block (no list
    of copies and no concatenation: VGG-16's 4096-wide classifier group alone is 0.5 GB).
    """
    modules = dict(model.named_modules())
    n = group.channels
    sources = []
    for mem in group.members:
        if mem.module in modules:
            sources.extend(_member_sources(modules[mem.module], mem.side, mem.idxs, mem.root_idxs))
    widths = [len(idx) * src[0].numel() // n for src, idx in sources]
    x = torch.empty((n, sum(widths)), dtype=torch.float32, device=sources[0][0].device if sources else None)
    col = 0
    for (src, idx), w in zip(sources, widths):
        m = len(idx) // n  # member rows per group channel (e.g. 49 for a conv flattened into a Linear)
        step = max(1, FILL_CHUNK_BYTES // max(1, w * 4))
        for c0 in range(0, n, step):
            c1 = min(n, c0 + step)
            x[c0:c1, col:col + w] = src.index_select(0, idx[c0 * m:c1 * m]).reshape(c1 - c0, -1)
        col += w
    return _robust_scale_(x) if scale else x


def _robust_scale_(x: torch.Tensor) -> torch.Tensor:
    """:func:`robust_scale` in place, one column block at a time (identical values, bounded scratch memory)."""
    qs = torch.tensor([0.25, 0.75], dtype=x.dtype, device=x.device)
    step = max(1, SCALE_CHUNK_BYTES // max(1, x.shape[0] * x.element_size()))
    for j in range(0, x.shape[1], step):
        part = x[:, j:j + step]
        med = part.median(dim=0).values
        q = torch.quantile(part, qs, dim=0)
        iqr = q[1] - q[0]
        part.sub_(med).div_(torch.where(iqr > 1e-12, iqr, torch.ones_like(iqr)))
    return x


def robust_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-column (x - median) / IQR; columns with IQR <= 1e-12 are only centred."""
    return _robust_scale_(x.clone())


def cosine_similarity(features: np.ndarray | torch.Tensor, *, centred: bool = True) -> np.ndarray:
    """(n, n) cosine similarity of the channels' feature vectors.

    ``centred`` (default) first subtracts the mean channel, the geometry k-means works in: columns every channel
    shares (e.g. an untrained BatchNorm's gamma = 1, beta = 0) then add no similarity, so a random network no
    longer looks redundant. ``centred=False`` is the plain cosine of the raw vectors.
    """
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    if centred:
        x = x - x.mean(dim=0, keepdim=True)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (x @ x.T).clamp(-1, 1).numpy()


def redundancy(features) -> dict:
    """Summary of how similar a group's channels are: mean/max off-diagonal cosine and a 0..1 score.

    The score is the mean over channels of the cosine to their nearest neighbour (clipped at 0): 1 means every
    channel has an exact duplicate, 0 means all channels are orthogonal.
    """
    s = cosine_similarity(features)
    n = len(s)
    if n < 2:
        return {"mean_cos": 0.0, "max_cos": 0.0, "score": 0.0}
    off = s[~np.eye(n, dtype=bool)]
    np.fill_diagonal(s, -np.inf)
    nearest = s.max(axis=1)
    return {"mean_cos": float(off.mean()), "max_cos": float(off.max()), "score": float(np.clip(nearest, 0, 1).mean())}


__all__ = ["FEATURE_SPACES", "group_features", "robust_scale", "cosine_similarity",
           "redundancy"]
