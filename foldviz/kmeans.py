"""Clustering a group's channels: k-means on the Gram matrix, plus scikit-learn and Ward for comparison.

``kmeans`` is the one clustering entry point of the library; the fold, the Layer explorer and the Learn page all
call it (through :func:`foldviz.fold.cluster_group`) with the plan's settings, so what the app shows is what the
fold merges. Guarantees: exactly ``k`` non-empty clusters (duplicate or all-zero channels included), labels in
canonical order (cluster ids by first occurrence), deterministic for a seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

ALGORITHMS = ("kmeans", "sklearn", "ward")
DEFAULT_CLUSTERING = {"algorithm": "kmeans", "n_init": 10, "max_iter": 100}


@dataclass
class ClusterResult:
    labels: np.ndarray      # (n,) cluster id of each channel, ids 0..k-1 ordered by first occurrence
    centroids: np.ndarray | None  # (k, d) in the clustering's feature space (None: with_centroids=False)
    inertia: float          # sum of squared distances to the assigned centroid
    k: int
    n_iter: int = 0         # Lloyd iterations of the kept restart (0 for sklearn/ward/identity)

    @property
    def sizes(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.k)


def k_for_ratio(n: int, ratio: float) -> int:
    """Clusters kept when a fraction ``ratio`` of ``n`` channels is folded away (rounded, at least 1)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"fold ratio must be in [0, 1), got {ratio}")
    return max(1, min(n, int(round(n * (1.0 - ratio)))))


# largest column block of features centred and multiplied at once when building the Gram matrix
GRAM_CHUNK_BYTES = 64 * 1024 * 1024


def _gram(x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Centred Gram matrix (n, n) in ``dtype``: k-means only needs inner products, and centring keeps them well
    conditioned. Features are centred, converted and multiplied one column block at a time (bounded scratch)."""
    mean = x.mean(dim=0, keepdim=True, dtype=dtype)
    step = max(1, GRAM_CHUNK_BYTES // max(1, x.shape[0] * 8))
    gram = None
    for j in range(0, x.shape[1], step):
        xc = x[:, j:j + step].to(dtype) - mean[:, j:j + step]
        gram = xc @ xc.T if gram is None else gram.addmm_(xc, xc.T)
    return gram


def _kmeanspp(gram: np.ndarray, diag: np.ndarray, k: int, rng: np.random.Generator, eps: float) -> np.ndarray:
    """Greedy k-means++ seeding on a Gram matrix; returns the indices of the k seed points.

    Each step samples 2 + log(k) candidates with probability proportional to the squared distance to the nearest
    seed and keeps the one that lowers the total potential most (scikit-learn's scheme). Once every remaining
    point coincides with a seed, further seeds are the lowest unused indices (duplicates become singletons).
    """
    n = len(diag)
    trials = 2 + int(np.log(k))
    centers = [int(rng.integers(n))]
    d2 = np.maximum(diag - 2 * gram[centers[0]] + diag[centers[0]], 0)
    d2[d2 < eps] = 0
    for _ in range(1, k):
        total = d2.sum()
        if total <= 0:
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


def _fill_empty(labels: torch.Tensor, dist: torch.Tensor, k: int) -> torch.Tensor:
    """Give every empty cluster one point, taken from clusters that keep at least one member.

    Donors are the points farthest from their own centre; a cluster never gives away its last member, so the
    result has exactly k non-empty clusters whenever n >= k (duplicate points become singletons at no cost).
    """
    sizes = torch.bincount(labels, minlength=k)
    empty = torch.nonzero(sizes == 0).flatten().tolist()
    if not empty:
        return labels
    labels = labels.clone()
    own = dist.gather(1, labels[:, None]).squeeze(1)
    for i in torch.argsort(own, descending=True, stable=True).tolist():
        if not empty:
            break
        c = int(labels[i])
        if sizes[c] > 1:
            sizes[c] -= 1
            labels[i] = empty.pop(0)
    return labels


def _assign(gram: torch.Tensor, diag: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distances (n, k) of every point to every centroid of ``labels``, and the inertia terms.

    dist(i, c) = G_ii - 2/|c| sum_{j in c} G_ij + 1/|c|^2 sum_{j,l in c} G_jl  (kernel k-means, linear kernel).
    """
    n = gram.shape[0]
    rows = torch.arange(n, device=gram.device)
    sizes = torch.bincount(labels, minlength=k).to(gram.dtype).clamp_min(1)
    s = torch.zeros(k, n, dtype=gram.dtype, device=gram.device).index_add_(0, labels, gram)  # (k, n), G symmetric
    cc = torch.zeros(k, dtype=gram.dtype, device=gram.device).index_add_(0, labels, s[labels, rows])
    dist = diag[:, None] - 2 * (s / sizes[:, None]).T + (cc / sizes**2)[None, :]
    return dist, cc / sizes


def _lloyd(gram: torch.Tensor, diag: torch.Tensor, seeds: np.ndarray, max_iter: int) -> tuple[torch.Tensor, float, int]:
    """Lloyd iterations written with the Gram matrix only; returns (labels, inertia, iterations)."""
    k = len(seeds)
    seeds_t = torch.as_tensor(seeds, device=gram.device)
    dist = diag[:, None] - 2 * gram[:, seeds_t] + diag[seeds_t][None, :]
    labels = dist.argmin(dim=1)
    labels[seeds_t] = torch.arange(k, device=gram.device)  # duplicates of a seed may tie: keep seeds in place
    labels = _fill_empty(labels, dist, k)
    it = 0
    for it in range(1, max_iter + 1):
        dist, _ = _assign(gram, diag, labels, k)
        new_labels = _fill_empty(dist.argmin(dim=1), dist, k)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    _, within = _assign(gram, diag, labels, k)
    return labels, float(diag.sum() - within.sum()), it


def _canonical(labels: np.ndarray) -> np.ndarray:
    """Relabel clusters by first occurrence so equal partitions give equal label arrays."""
    labels = np.asarray(labels)
    uniq, first = np.unique(labels, return_index=True)
    mapping = np.empty(labels.max() + 1, dtype=np.int64)
    mapping[uniq[np.argsort(first)]] = np.arange(len(uniq))
    return mapping[labels]


def _centroids(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    return sums.div_(torch.bincount(labels, minlength=k)[:, None].clamp_min(1).to(sums.dtype))  # k x d once


def kmeans(features, k: int, *, seed: int = 0, n_init: int = DEFAULT_CLUSTERING["n_init"],
           max_iter: int = DEFAULT_CLUSTERING["max_iter"], algorithm: str = "kmeans",
           device: str | torch.device | None = None, with_centroids: bool = True) -> ClusterResult:
    """Cluster the rows of ``features`` (n, d) into exactly ``k`` non-empty clusters.

    The default runs greedy k-means++ seeding and Lloyd iterations on the centred Gram matrix (exact, and
    independent of d after one matrix product), keeping the best of ``n_init`` restarts. ``"sklearn"`` runs
    scikit-learn's KMeans, ``"ward"`` agglomerative Ward linkage (the authors' paper-era choice).
    """
    x = torch.as_tensor(np.asarray(features) if not torch.is_tensor(features) else features, dtype=torch.float32)
    if device is not None:
        x = x.to(device)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the number of channels ({n}), got {k}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown clustering algorithm {algorithm!r}; choose one of {ALGORITHMS}")
    if not torch.isfinite(x).all():
        raise ValueError("channel features contain NaN or Inf; the weights are not finite")
    if k == n:
        return ClusterResult(np.arange(n), x.cpu().numpy(), 0.0, k)
    if algorithm in ("sklearn", "ward"):
        return _sklearn_cluster(x.cpu().numpy(), k, seed, n_init, max_iter, algorithm)
    gram = _gram(x, torch.float32)  # float32 Lloyd steps: half the (n, n) and (k, n) scratch of a wide group
    diag = gram.diagonal().clone()
    eps = 1e-6 * float(diag.mean().clamp_min(1e-30))
    gram_np, diag_np = gram.double().cpu().numpy(), diag.double().cpu().numpy()
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(max(1, n_init)):
        labels, err, it = _lloyd(gram, diag, _kmeanspp(gram_np, diag_np, k, rng, eps), max_iter)
        if best is None or err < best[1] - 1e-9 * max(1.0, abs(err)):
            best = (labels, err, it)
    canon = _canonical(best[0].cpu().numpy())
    if not with_centroids:  # folding needs only the labels: skip the k x d matrix (240 MB for VGG-16's classifier)
        return ClusterResult(canon, None, max(0.0, best[1]), k, best[2])
    centroids = _centroids(x, torch.as_tensor(canon, device=x.device), k)
    return ClusterResult(canon, centroids.cpu().numpy(), max(0.0, best[1]), k, best[2])


def _sklearn_cluster(x: np.ndarray, k: int, seed: int, n_init: int, max_iter: int, algorithm: str) -> ClusterResult:
    from sklearn.cluster import AgglomerativeClustering, KMeans

    if algorithm == "ward":
        labels = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(x)
    else:
        labels = KMeans(n_clusters=k, n_init=max(1, n_init), max_iter=max_iter, random_state=seed).fit(x).labels_
    labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    xt = torch.as_tensor(x, dtype=torch.float64)
    cents = _centroids(xt, labels, k)
    labels = _fill_empty(labels, torch.cdist(xt, cents) ** 2, k)  # sklearn may leave a cluster empty on duplicates
    canon = _canonical(labels.numpy())
    cents = _centroids(xt, torch.as_tensor(canon), k)
    inertia = float(((xt - cents[torch.as_tensor(canon)]) ** 2).sum())
    return ClusterResult(canon, cents.float().numpy(), inertia, k)


def cluster_order(labels: np.ndarray) -> np.ndarray:
    """Permutation listing channels cluster by cluster, largest clusters first (ties: lower cluster id first),
    channels in index order within a cluster. Heatmaps, filter grids and tables all use this one order."""
    labels = np.asarray(labels)
    sizes = np.bincount(labels)
    rank = np.argsort(-sizes, kind="stable")
    pos = np.empty_like(rank)
    pos[rank] = np.arange(len(rank))
    return np.lexsort((np.arange(len(labels)), pos[labels]))


def inertia_curve(features, ratios, *, seed: int = 0, n_init: int = 2) -> list[dict]:
    """k-means inertia (absolute and relative to the total variance) for each fold ratio."""
    x = np.asarray(features, dtype=np.float32)
    total = float(((x - x.mean(0)) ** 2).sum()) or 1.0
    out = []
    for r in ratios:
        k = k_for_ratio(len(x), r)
        res = kmeans(x, k, seed=seed, n_init=n_init)
        out.append({"ratio": float(r), "k": k, "inertia": res.inertia, "relative_inertia": res.inertia / total})
    return out


__all__ = ["ALGORITHMS", "DEFAULT_CLUSTERING", "ClusterResult", "k_for_ratio", "kmeans", "cluster_order",
           "inertia_curve"]
