"""Per-channel feature vectors, similarity and k-means clustering of a channel group.

The feature vector of channel i concatenates everything the group stores for it (folding-spec §3.1): the
producers' fan-in rows and biases, BatchNorm gamma/beta, and the consumers' fan-out columns. Running statistics
are left out. k-means runs in torch (vectorised Lloyd with k-means++ seeding and several restarts), so the
same code serves the CPU and a GPU; ``algorithm="sklearn"`` and ``"ward"`` are available for comparison.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .groups import ChannelGroup, GroupGraph

ALGORITHMS = ("kmeans", "sklearn", "ward")


@dataclass
class ClusterResult:
    labels: np.ndarray      # (n,) cluster id of each channel, ids 0..k-1 ordered by first occurrence
    centroids: np.ndarray | None  # (k, d) in the (possibly scaled) feature space; None if not asked for
    inertia: float          # sum of squared distances to the assigned centroid
    k: int

    @property
    def sizes(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.k)


def k_for_ratio(n: int, ratio: float) -> int:
    """Clusters kept when a fraction ``ratio`` of ``n`` channels is folded away (at least 1)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"fold ratio must be in [0, 1), got {ratio}")
    return max(1, min(n, int(round(n * (1.0 - ratio)))))


def _member_sources(module: nn.Module, side: str, idxs: list[int], root_idxs: list[int]):
    """(tensor whose dim-0 rows are the member's slices, member indices sorted by group channel) per block."""
    order = torch.as_tensor(np.argsort(np.asarray(root_idxs), kind="stable"))
    idx = torch.as_tensor(idxs)[order]   # member indices sorted by group channel, stable within a channel
    if side == "out":
        return [(t.detach(), idx) for t in (module.weight, module.bias) if t is not None]
    return [(module.weight.detach().transpose(0, 1), idx)]  # in side: column idx of the weight, as rows


def _member_rows(module: nn.Module, side: str, idxs: list[int], root_idxs: list[int], n: int) -> list[torch.Tensor]:
    """Blocks of shape (n, d_b) contributed by one group member."""
    return [src.index_select(0, idx).reshape(len(idx), -1).reshape(n, -1)
            for src, idx in _member_sources(module, side, idxs, root_idxs)]


#: Scratch bytes used while copying one member block into the feature matrix.
_FILL_CHUNK_BYTES = 32 * 1024 * 1024


def group_features(model: nn.Module, graph: GroupGraph, group_id: str, *, scale: bool = False) -> np.ndarray:
    """Feature matrix (channels, d) of ``group_id`` read from ``model`` (which must match ``graph``).

    ``scale=True`` applies a robust per-column scaling (median / interquartile range), as the authors' code does
    for Fold-AR, so that no single tensor dominates the distances.
    """
    return group_features_tensor(model, graph.get(group_id), scale=scale).cpu().numpy()


def group_features_tensor(model: nn.Module, group: ChannelGroup, *, scale: bool = False) -> torch.Tensor:
    modules = dict(model.named_modules())
    n = group.channels
    sources = []
    for mem in group.members:
        if mem.module in modules:
            sources.extend(_member_sources(modules[mem.module], mem.side, mem.idxs, mem.root_idxs))
    # one (n, d) float32 matrix, filled block by block and channel chunk by channel chunk: no list of copies
    # and no concatenation (which would hold the features twice; 2 x 480 MB for VGG-16's 4096-wide group)
    widths = [len(idx) * src[0].numel() // n for src, idx in sources]
    device = sources[0][0].device if sources else None
    x = torch.empty((n, sum(widths)), dtype=torch.float32, device=device)
    col = 0
    for (src, idx), w in zip(sources, widths):
        m = len(idx) // n  # member rows per group channel (e.g. 49 for a conv flattened into a Linear)
        step = max(1, _FILL_CHUNK_BYTES // max(1, w * 4))
        for c0 in range(0, n, step):
            c1 = min(n, c0 + step)
            x[c0:c1, col:col + w] = src.index_select(0, idx[c0 * m:c1 * m]).reshape(c1 - c0, -1)
        col += w
    return _robust_scale_(x) if scale else x


#: Largest column block that robust scaling / Gram products handle at once (bytes of float32 features).
FEATURE_CHUNK_BYTES = 64 * 1024 * 1024


#: Column block of the in-place robust scaling (median/quantile sort copies of one block are its scratch).
SCALE_CHUNK_BYTES = 8 * 1024 * 1024


def _col_chunks(x: torch.Tensor, nbytes: int | None = None):
    step = max(1, (nbytes or FEATURE_CHUNK_BYTES) // max(1, x.shape[0] * x.element_size()))
    return [slice(j, j + step) for j in range(0, x.shape[1], step)]


def _robust_scale_(x: torch.Tensor) -> torch.Tensor:
    """:func:`robust_scale` in place, column block by column block (identical values, bounded scratch memory)."""
    qs = torch.tensor([0.25, 0.75], dtype=x.dtype, device=x.device)
    for sl in _col_chunks(x, SCALE_CHUNK_BYTES):
        part = x[:, sl]
        med = part.median(dim=0).values
        q = torch.quantile(part, qs, dim=0)
        iqr = q[1] - q[0]
        iqr = torch.where(iqr > 1e-12, iqr, torch.ones_like(iqr))
        part.sub_(med).div_(iqr)
    return x


def robust_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-column (x - median) / IQR; columns with IQR <= 1e-12 are only centred."""
    return _robust_scale_(x.clone())


def cosine_similarity(features: np.ndarray | torch.Tensor) -> np.ndarray:
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (x @ x.T).clamp(-1, 1).numpy()


def _gram(x: torch.Tensor) -> torch.Tensor:
    """Centred Gram matrix: k-means only needs inner products, and centring keeps them well conditioned."""
    if x.numel() * x.element_size() <= FEATURE_CHUNK_BYTES:
        xc = x - x.mean(dim=0, keepdim=True)
        return xc @ xc.T
    mean = x.mean(dim=0, keepdim=True)  # large features: centre and multiply one column block at a time
    gram = None
    for sl in _col_chunks(x):
        xc = x[:, sl] - mean[:, sl]
        gram = xc @ xc.T if gram is None else gram.addmm_(xc, xc.T)
    return gram


def _kmeanspp(gram: np.ndarray, diag: np.ndarray, k: int, rng: np.random.Generator, eps: float) -> np.ndarray:
    """Greedy k-means++ seeding on a Gram matrix; returns the indices of the k seed points.

    Each step samples 2 + log(k) candidates with probability proportional to the squared distance to the nearest
    seed and keeps the one that lowers the total potential most (the scheme scikit-learn uses); plain k-means++
    leaves noticeably worse local minima on weight features.
    """
    n = len(diag)
    trials = 2 + int(np.log(k))
    centers = [int(rng.integers(n))]
    d2 = np.maximum(diag - 2 * gram[centers[0]] + diag[centers[0]], 0)
    d2[d2 < eps] = 0
    for _ in range(1, k):
        total = d2.sum()
        if total <= 0:  # every remaining point coincides with a chosen seed
            centers.append(int(np.setdiff1d(np.arange(n), centers)[0]))
            continue
        cand = np.minimum(np.searchsorted(np.cumsum(d2), rng.random(trials) * total, side="right"), n - 1)
        dc = np.maximum(diag[None, :] - 2 * gram[cand] + diag[cand][:, None], 0)
        dc[dc < eps] = 0
        np.minimum(dc, d2[None, :], out=dc)
        best = int(np.argmin(dc.sum(axis=1)))
        centers.append(int(cand[best]))
        d2 = dc[best]
    return np.asarray(centers)


def _lloyd(gram: torch.Tensor, diag: torch.Tensor, seeds: np.ndarray, max_iter: int) -> tuple[torch.Tensor, float]:
    """Lloyd iterations written with the Gram matrix only (kernel k-means with a linear kernel).

    dist(i, c) = G_ii - 2/|c| sum_{j in c} G_ij + 1/|c|^2 sum_{j,l in c} G_jl; each step costs O(n^2).
    """
    n, k = gram.shape[0], len(seeds)
    seeds_t = torch.as_tensor(seeds, device=gram.device)
    dist = diag[:, None] - 2 * gram[:, seeds_t] + diag[seeds_t][None, :]
    labels = dist.argmin(dim=1)
    labels[seeds_t] = torch.arange(k, device=gram.device)  # duplicates of a seed may tie: keep seeds in place
    rows = torch.arange(n, device=gram.device)
    for _ in range(max_iter):
        sizes = torch.bincount(labels, minlength=k).to(gram.dtype).clamp_min(1)
        s = torch.zeros(k, n, dtype=gram.dtype, device=gram.device).index_add_(0, labels, gram)  # G symmetric
        cc = torch.zeros(k, dtype=gram.dtype, device=gram.device).index_add_(0, labels, s[labels, rows])
        dist = diag[:, None] - 2 * (s / sizes[:, None]).T + (cc / sizes**2)[None, :]
        new_labels = dist.argmin(dim=1)
        empty = torch.nonzero(torch.bincount(new_labels, minlength=k) == 0).flatten()
        if len(empty):  # re-seed empty clusters with the points farthest from their centre
            mind = dist.gather(1, new_labels[:, None]).squeeze(1)
            new_labels[torch.argsort(mind, descending=True)[: len(empty)]] = empty
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    sizes = torch.bincount(labels, minlength=k).to(gram.dtype).clamp_min(1)
    s = torch.zeros(k, n, dtype=gram.dtype, device=gram.device).index_add_(0, labels, gram)
    cc = torch.zeros(k, dtype=gram.dtype, device=gram.device).index_add_(0, labels, s[labels, rows])
    return labels, float(diag.sum() - (cc / sizes).sum())


def _canonical(labels: np.ndarray, k: int) -> np.ndarray:
    """Relabel clusters by first occurrence so equal partitions give equal label arrays."""
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(first)
    mapping = np.empty(labels.max() + 1, dtype=np.int64)
    mapping[np.unique(labels)[order]] = np.arange(len(order))
    return mapping[labels]


def kmeans(features, k: int, *, seed: int = 0, n_init: int = 4, max_iter: int = 100,
           algorithm: str = "kmeans", device: str | torch.device | None = None,
           with_centroids: bool = True) -> ClusterResult:
    """Cluster the rows of ``features`` into ``k`` clusters, deterministically for a given ``seed``.

    The default runs k-means++ seeding and Lloyd iterations on the Gram matrix (exact, and independent of the
    feature dimension after one matrix product), keeping the best of ``n_init`` restarts.
    """
    x = torch.as_tensor(np.asarray(features) if not torch.is_tensor(features) else features, dtype=torch.float32)
    if device is not None:
        x = x.to(device)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the number of channels ({n}), got {k}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown clustering algorithm {algorithm!r}; choose one of {ALGORITHMS}")
    if k == n:
        return ClusterResult(np.arange(n), x.cpu().numpy(), 0.0, k)
    if algorithm in ("sklearn", "ward"):
        return _sklearn_cluster(x.cpu().numpy(), k, seed, n_init, max_iter, algorithm)
    gram = _gram(x)
    diag = gram.diagonal().clone()
    eps = 1e-6 * float(diag.mean().clamp_min(1e-30))
    gram_np, diag_np = gram.double().cpu().numpy(), diag.double().cpu().numpy()
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(max(1, n_init)):
        labels, err = _lloyd(gram, diag, _kmeanspp(gram_np, diag_np, k, rng, eps), max_iter)
        if best is None or err < best[1] - 1e-9 * max(1.0, abs(err)):
            best = (labels, err)
    canon = _canonical(best[0].cpu().numpy(), k)
    if not with_centroids:  # folding only needs the labels: skip the k x d matrix (240 MB for VGG-16's classifier)
        return ClusterResult(canon, None, max(0.0, best[1]), k)
    centroids = _centroids(x, torch.as_tensor(canon, device=x.device), k)
    return ClusterResult(canon, centroids.cpu().numpy(), max(0.0, best[1]), k)


def _centroids(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    return sums.div_(torch.bincount(labels, minlength=k)[:, None].clamp_min(1).to(sums.dtype))  # in place: k x d once


def _sklearn_cluster(x: np.ndarray, k: int, seed: int, n_init: int, max_iter: int, algorithm: str) -> ClusterResult:
    from sklearn.cluster import AgglomerativeClustering, KMeans

    if algorithm == "ward":
        labels = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(x)
    else:
        labels = KMeans(n_clusters=k, n_init=max(1, n_init), max_iter=max_iter, random_state=seed).fit(x).labels_
    canon = _canonical(np.asarray(labels), k)
    xt = torch.as_tensor(x)
    cents = _centroids(xt, torch.as_tensor(canon), k)
    inertia = float(((xt - cents[torch.as_tensor(canon)]) ** 2).sum())
    return ClusterResult(canon, cents.numpy(), inertia, k)


def cluster_order(labels: np.ndarray) -> np.ndarray:
    """Permutation that lists channels cluster by cluster (largest clusters first), for heatmaps."""
    labels = np.asarray(labels)
    sizes = np.bincount(labels)
    rank = np.argsort(-sizes, kind="stable")
    pos = np.empty_like(rank)
    pos[rank] = np.arange(len(rank))
    return np.lexsort((np.arange(len(labels)), pos[labels]))


def inertia_curve(features, ratios, *, seed: int = 0, n_init: int = 2) -> list[dict]:
    """k-means inertia (relative to the total variance) for each fold ratio."""
    x = np.asarray(features, dtype=np.float32)
    total = float(((x - x.mean(0)) ** 2).sum()) or 1.0
    out = []
    for r in ratios:
        k = k_for_ratio(len(x), r)
        res = kmeans(x, k, seed=seed, n_init=n_init)
        out.append({"ratio": float(r), "k": k, "inertia": res.inertia, "relative_inertia": res.inertia / total})
    return out


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


def ar_scale(rows: torch.Tensor, labels: np.ndarray, k: int) -> torch.Tensor:
    """Fold-AR variance correction per cluster: s_c = N_c / ||sum of unit-normalised member rows||.

    Equals sqrt(N_c / (1 + (N_c - 1) E[c])) with E[c] the mean pairwise cosine of the members (folding-spec §5.3):
    1 for identical members, sqrt(N_c) for orthogonal ones.
    """
    r = rows.reshape(rows.shape[0], -1)
    lab = torch.as_tensor(labels)
    sizes = torch.bincount(lab, minlength=k).double()
    if r.numel() * 8 <= FEATURE_CHUNK_BYTES:
        u = r.double()
        u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)
        sums = torch.zeros(k, u.shape[1], dtype=u.dtype).index_add_(0, lab, u)
        norms = sums.norm(dim=1)
    else:  # large rows: the same sums, one column block at a time (float64 scratch stays bounded)
        row_norm = torch.zeros(r.shape[0], dtype=torch.float64)
        chunks = [slice(j, j + max(1, FEATURE_CHUNK_BYTES // (8 * r.shape[0])))
                  for j in range(0, r.shape[1], max(1, FEATURE_CHUNK_BYTES // (8 * r.shape[0])))]
        for sl in chunks:
            row_norm += r[:, sl].double().pow(2).sum(1)
        inv = 1.0 / row_norm.sqrt().clamp_min(1e-12)
        sq = torch.zeros(k, dtype=torch.float64)
        for sl in chunks:
            part = r[:, sl].double() * inv[:, None]
            sums = torch.zeros(k, part.shape[1], dtype=torch.float64).index_add_(0, lab, part)
            sq += sums.pow(2).sum(1)
        norms = sq.sqrt()
    s = torch.where(norms > 1e-12, sizes / norms.clamp_min(1e-12), sizes.sqrt())
    return s.float()


def suggest_ratio(score: float, target: float) -> float:
    """Per-group ratio proportional to redundancy around a target mean ratio (clipped to [0, 0.9])."""
    return float(min(0.9, max(0.0, target * (0.5 + score))))


__all__ = [
    "ClusterResult", "k_for_ratio", "group_features", "group_features_tensor", "cosine_similarity", "kmeans",
    "cluster_order", "inertia_curve", "redundancy", "ar_scale", "robust_scale", "ALGORITHMS",
]
