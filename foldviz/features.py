"""Per-channel feature vectors of a channel group, their similarity and redundancy.

The feature vector of channel i concatenates everything the group stores for it: the
producers' fan-in rows and biases, BatchNorm gamma/beta, and the consumers' fan-out columns. Running statistics
are left out. Which *feature space* a fold clusters in depends on its repair (see
:attr:`foldviz.repair.Repair.feature_space`): ``"raw"`` reads the model as it is; ``"fused"`` reads it after BatchNorm
fusion with robust per-column scaling (the authors' Fold-AR features); ``"fused-linear"`` fuses and scales only
groups whose producers are Linear layers with a BatchNorm (Fold-DFR) and reads convolutions raw.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .groups import ChannelGroup

FEATURE_SPACES = ("raw", "fused", "fused-linear")


def _member_sources(module: nn.Module, side: str, idxs: list[int], root_idxs: list[int]):
    """(tensor whose dim-0 rows are the member's slices, member indices sorted by group channel) per block."""
    order = torch.as_tensor(np.argsort(np.asarray(root_idxs), kind="stable"))
    idx = torch.as_tensor(idxs)[order].to(module.weight.device)  # sorted by group channel, stable within one
    if side == "out":  # conv/linear rows + bias, or BatchNorm gamma + beta
        return [(t.detach(), idx) for t in (module.weight, module.bias) if t is not None]
    return [(module.weight.detach().transpose(0, 1), idx)]  # consumer: its input columns, as rows


# scratch bytes for copying one member block into the feature matrix / for one block of in-place scaling
FILL_CHUNK_BYTES = 32 * 1024 * 1024
SCALE_CHUNK_BYTES = 8 * 1024 * 1024


def _sources(model: nn.Module, group: ChannelGroup) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """Per feature block of ``group``: (source whose dim-0 slices are member rows, member row indices sorted by group
    channel, member rows per group channel)."""
    modules = dict(model.named_modules())
    out = []
    for mem in group.members:
        if mem.module in modules:
            for src, idx in _member_sources(modules[mem.module], mem.side, mem.idxs, mem.root_idxs):
                out.append((src, idx, len(idx) // group.channels))
    return out


def group_features(model: nn.Module, group: ChannelGroup, *, scale: bool = False) -> torch.Tensor:
    """Feature matrix (channels, d) of ``group`` read from ``model`` (whose module names must match the group).

    ``scale=True`` applies a robust per-column scaling (median / interquartile range), as the authors' code does
    for Fold-AR, so that no single tensor dominates the distances. The matrix is filled block by block (no list
    of copies and no concatenation: VGG-16's 4096-wide classifier group alone is 0.5 GB).
    """
    n = group.channels
    sources = _sources(model, group)
    widths = [m * src[0].numel() for src, _idx, m in sources]
    x = torch.empty((n, sum(widths)), dtype=torch.float32, device=sources[0][0].device if sources else None)
    col = 0
    for (src, idx, m), w in zip(sources, widths):  # m: member rows per channel (e.g. 49 for a conv -> Linear)
        step = max(1, FILL_CHUNK_BYTES // max(1, w * 4))
        for c0 in range(0, n, step):
            c1 = min(n, c0 + step)
            x[c0:c1, col:col + w] = src.index_select(0, idx[c0 * m:c1 * m]).reshape(c1 - c0, -1)
        col += w
    return _robust_scale_(x) if scale else x


def feature_blocks(model: nn.Module, group: ChannelGroup, cols: int, *, scale: bool = False):
    """The columns of ``group_features(model, group, scale=scale)`` as contiguous float32 blocks (n, <= cols), left
    to right, without ever holding the whole matrix: the fold's k-means needs only the Gram matrix, which these
    blocks accumulate (VGG-16's classifier group would otherwise be a 0.5 GB matrix). Every value equals the
    corresponding entry of :func:`group_features` exactly (scaling is per column)."""
    n = group.channels
    sources = _sources(model, group)
    width = sum(m * src[0].numel() for src, _idx, m in sources)
    # (first global column, last global column) of each source, to cut the global block [j0, j1) from them
    spans, col = [], 0
    for src, idx, m in sources:
        spans.append((col, col + m * src[0].numel()))
        col += m * src[0].numel()
    # (rows, row width): a view for Linear weights and contiguous convs; transposed conv consumers copy once here
    flats = [src.reshape(src.shape[0], -1) for src, _idx, _m in sources]
    for j0 in range(0, width, cols):
        j1 = min(width, j0 + cols)
        blk = torch.empty((n, j1 - j0), dtype=torch.float32, device=sources[0][0].device)
        for (_src, idx, m), flat, (a, b) in zip(sources, flats, spans):
            lo, hi = max(a, j0), min(b, j1)
            if lo >= hi:
                continue
            rw = flat.shape[1]
            per_channel = idx.view(n, m)          # (n, m): the member rows of each group channel
            for r in range((lo - a) // rw, (hi - a - 1) // rw + 1):  # member rows this cut touches
                c_lo, c_hi = max(lo, a + r * rw), min(hi, a + (r + 1) * rw)  # global columns inside row r
                # slice the columns first, then gather rows: copies (n, c_hi - c_lo), never whole rows
                blk[:, c_lo - j0:c_hi - j0] = flat[:, c_lo - a - r * rw:c_hi - a - r * rw].index_select(
                    0, per_channel[:, r])
        yield _robust_scale_(blk) if scale else blk


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


__all__ = ["FEATURE_SPACES", "group_features", "feature_blocks", "robust_scale", "cosine_similarity",
           "redundancy"]
