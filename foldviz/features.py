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


def _member_rows(module: nn.Module, side: str, idxs: list[int], root_idxs: list[int], n: int) -> list[torch.Tensor]:
    """Blocks of shape (n, d_b) contributed by one group member."""
    blocks = []
    order = torch.as_tensor(np.argsort(np.asarray(root_idxs), kind="stable"))
    idx = torch.as_tensor(idxs)[order]   # member indices sorted by group channel, stable within a channel
    if side == "out":
        for t in (module.weight, module.bias):  # conv/linear rows + bias, or BatchNorm gamma + beta
            if t is None:
                continue
            rows = t.detach().index_select(0, idx).reshape(len(idx), -1)
            blocks.append(rows.reshape(n, -1))
    else:
        w = module.weight.detach()
        cols = w.index_select(1, idx).transpose(0, 1).reshape(len(idx), -1)
        blocks.append(cols.reshape(n, -1))
    return blocks


def group_features(model: nn.Module, group: ChannelGroup, *, scale: bool = False) -> torch.Tensor:
    """Feature matrix (channels, d) of ``group`` read from ``model`` (whose module names must match the group).

    ``scale=True`` applies a robust per-column scaling (median / interquartile range), as the authors' code does
    for Fold-AR, so that no single tensor dominates the distances.
    """
    modules = dict(model.named_modules())
    blocks = []
    for mem in group.members:
        if mem.module in modules:
            blocks.extend(_member_rows(modules[mem.module], mem.side, mem.idxs, mem.root_idxs, group.channels))
    x = torch.cat(blocks, dim=1).float()
    return robust_scale(x) if scale else x


def robust_scale(x: torch.Tensor) -> torch.Tensor:
    med = x.median(dim=0).values
    q = torch.quantile(x, torch.tensor([0.25, 0.75], dtype=x.dtype, device=x.device), dim=0)
    iqr = q[1] - q[0]
    iqr = torch.where(iqr > 1e-12, iqr, torch.ones_like(iqr))
    return (x - med) / iqr


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
