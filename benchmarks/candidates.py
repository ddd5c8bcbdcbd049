"""Candidate speed-ups for the folding hot path (benchmark-side prototypes; the library does not use them).

The benchmarks measure them side by side with the library so the lead can decide whether to adopt them:

1. ``kmeans_fast``: a replacement for ``foldviz.kmeans.kmeans`` with the same Gram-matrix formulation and
   two changes:

* **greedy k-means++ seeding**: at every step ``2 + floor(ln k)`` candidates are drawn with D^2 weighting and the
  one that lowers the potential most is kept (the library draws a single candidate);
* **single-threaded NumPy Lloyd loop** in float64: the per-iteration work is O(n^2) small operations, which on a
  shared 2-core machine suffer badly from intra-op thread hand-offs in torch; NumPy runs them in one thread.

The Gram matrix itself is still one matrix product (torch, all threads). Returns ``foldviz.kmeans.ClusterResult``
so results are directly comparable.

2. ``robust_scale_fast``: ``foldviz.features.robust_scale`` (the Fold-AR feature scaling) computed with one
   ``np.partition`` instead of ``torch.median`` + ``torch.quantile`` (two full sorts); bit-identical output.

``patched()`` swaps both into the library for the duration of a ``with`` block (used for what-if timings).
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from foldviz.kmeans import ClusterResult, _canonical, _centroids


def _greedy_kmeanspp(gram: np.ndarray, diag: np.ndarray, k: int, rng: np.random.Generator, eps: float,
                     trials: int | None = None) -> np.ndarray:
    n = len(diag)
    trials = trials or (2 + int(np.log(k)))
    first = int(rng.integers(n))
    centers = [first]
    d2 = np.maximum(diag - 2 * gram[first] + diag[first], 0)
    d2[d2 < eps] = 0
    for _ in range(1, k):
        total = d2.sum()
        if total <= 0:
            chosen = np.ones(n, bool)
            chosen[centers] = False
            nxt = int(np.flatnonzero(chosen)[0])
            new = np.maximum(diag - 2 * gram[nxt] + diag[nxt], 0)
        else:
            cand = np.searchsorted(np.cumsum(d2), rng.random(trials) * total, side="right")
            cand = np.minimum(cand, n - 1)
            dc = np.maximum(diag[None, :] - 2 * gram[cand] + diag[cand][:, None], 0)   # (trials, n)
            dc[dc < eps] = 0
            pot = np.minimum(d2[None, :], dc).sum(1)
            j = int(np.argmin(pot))
            nxt, new = int(cand[j]), dc[j]
        centers.append(nxt)
        np.minimum(d2, new, out=d2)
    return np.asarray(centers)


def _lloyd_np(gram: np.ndarray, diag: np.ndarray, seeds: np.ndarray, max_iter: int) -> tuple[np.ndarray, float, int]:
    n, k = gram.shape[0], len(seeds)
    rows = np.arange(n)
    dist = diag[:, None] - 2 * gram[:, seeds] + diag[seeds][None, :]
    labels = dist.argmin(1)
    labels[seeds] = np.arange(k)
    it = 0

    def stats(lab):
        sizes = np.bincount(lab, minlength=k).astype(np.float64)
        order = np.argsort(lab, kind="stable")
        starts = np.searchsorted(lab[order], np.arange(k))
        s = np.zeros((k, n))
        nonempty = sizes > 0
        s[nonempty] = np.add.reduceat(gram[order], starts[nonempty], axis=0)
        cc = np.bincount(lab, weights=s[lab, rows], minlength=k)
        return np.maximum(sizes, 1), s, cc

    for it in range(1, max_iter + 1):
        sizes, s, cc = stats(labels)
        dist = diag[:, None] - 2 * (s / sizes[:, None]).T + (cc / sizes**2)[None, :]
        new = dist.argmin(1)
        counts = np.bincount(new, minlength=k)
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            mind = dist[rows, new]
            new[np.argsort(-mind, kind="stable")[: len(empty)]] = empty
        if np.array_equal(new, labels):
            break
        labels = new
    sizes, s, cc = stats(labels)
    return labels, float(diag.sum() - (cc / sizes).sum()), it


def kmeans_fast(features, k: int, *, seed: int = 0, n_init: int = 4, max_iter: int = 100,
                trials: int | None = None) -> ClusterResult:
    x = features if torch.is_tensor(features) else torch.as_tensor(np.asarray(features))
    x = x.float()
    n = x.shape[0]
    if k >= n:
        return ClusterResult(np.arange(n), x.numpy(), 0.0, n)
    xc = x - x.mean(0, keepdim=True)
    gram = (xc @ xc.T).double().numpy()
    diag = gram.diagonal().copy()
    eps = 1e-6 * max(float(diag.mean()), 1e-30)
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(max(1, n_init)):
        labels, err, _it = _lloyd_np(gram, diag, _greedy_kmeanspp(gram, diag, k, rng, eps, trials), max_iter)
        if best is None or err < best[1] - 1e-9 * max(1.0, abs(err)):
            best = (labels, err)
    canon = _canonical(best[0])
    cents = _centroids(x, torch.as_tensor(canon), k)
    return ClusterResult(canon, cents.numpy(), max(0.0, best[1]), k)


def robust_scale_fast(x: torch.Tensor) -> torch.Tensor:
    """Same result as ``foldviz.features.robust_scale`` (lower median, linearly interpolated quartiles)."""
    if x.device.type != "cpu" or x.shape[0] < 2:
        from foldviz.features import robust_scale

        return robust_scale(x)
    a = x.detach().numpy()
    n = a.shape[0]
    lo = (n - 1) // 2
    pos = (0.25 * (n - 1), 0.75 * (n - 1))
    idx = {lo}
    for p in pos:
        f = int(np.floor(p))
        idx.update((f, min(f + 1, n - 1)))
    part = np.partition(a, sorted(idx), axis=0)

    def quant(p: float) -> np.ndarray:
        f = int(np.floor(p))
        c = min(f + 1, n - 1)
        return part[f] + (part[c] - part[f]) * np.float32(p - f)

    iqr = quant(pos[1]) - quant(pos[0])
    iqr = np.where(iqr > 1e-12, iqr, np.float32(1)).astype(a.dtype)
    return torch.from_numpy((a - part[lo]) / iqr)


def _kmeans_adapter(features, k, *, seed=0, n_init=4, max_iter=100, algorithm="kmeans", device=None):
    if algorithm != "kmeans" or (device is not None and torch.device(device).type != "cpu"):
        from foldviz.kmeans import kmeans

        return kmeans(features, k, seed=seed, n_init=n_init, max_iter=max_iter, algorithm=algorithm, device=device)
    x = features.detach().cpu() if torch.is_tensor(features) else features
    return kmeans_fast(x, k, seed=seed, n_init=n_init, max_iter=max_iter)


@contextlib.contextmanager
def patched(kmeans: bool = True, scale: bool = True):
    """Temporarily route the library's fold through the candidates (restored on exit)."""
    import foldviz.features as C
    import foldviz.fold as Fo

    old_k, old_s = Fo.kmeans, C.robust_scale
    try:
        if kmeans:
            Fo.kmeans = _kmeans_adapter
        if scale:
            C.robust_scale = robust_scale_fast
        yield
    finally:
        Fo.kmeans, C.robust_scale = old_k, old_s


def pca_gram(features) -> np.ndarray:
    """2-D PCA coordinates of the L2-normalised rows, from the eigen-decomposition of the (n, n) Gram matrix.

    Same result as ``foldviz.embedding._pca`` (scikit-learn ``PCA(svd_solver="full")``) up to the sign of each
    axis, but costs one (n, d) x (d, n) product plus an n x n ``eigh`` instead of a full SVD of the (n, d) matrix,
    which matters when d >> n (a 512-channel ResNet-18 group has d = 14,096).
    """
    from foldviz.embedding import _normalise

    x = _normalise(features)
    xc = x - x.mean(0)
    w, v = np.linalg.eigh(xc @ xc.T)
    idx = np.argsort(w)[::-1][:2]
    out = np.zeros((x.shape[0], 2))
    out[:, : len(idx)] = v[:, idx] * np.sqrt(np.maximum(w[idx], 0))
    return out
