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

from .utils import all_finite

ALGORITHMS = ("kmeans", "sklearn", "ward")
REFINES = ("hartigan", "none")
DEFAULT_CLUSTERING = {"algorithm": "kmeans", "n_init": 10, "max_iter": 100, "refine": "hartigan"}


@dataclass
class ClusterResult:
    labels: np.ndarray      # (n,) cluster id of each channel, ids 0..k-1 ordered by first occurrence
    centroids: np.ndarray | None  # (k, d) in the clustering's feature space (None: with_centroids=False)
    inertia: float          # sum of squared distances to the assigned centroid
    k: int
    n_iter: int = 0         # Lloyd iterations + Hartigan sweeps of the kept restart (0 for sklearn/ward/identity)

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


def gram_cols(n: int) -> int:
    """Feature columns per block when accumulating the (n, n) Gram matrix (bounded scratch, see GRAM_CHUNK_BYTES)."""
    return max(1, GRAM_CHUNK_BYTES // max(1, n * 8))


def _gram_blocks(blocks, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Gram matrix (n, n) of the column-centred features given as column blocks (n, w_b), accumulated block by block.

    Each block is made contiguous before its column means are taken, so a block read from the full matrix and the
    same block built by :func:`foldviz.features.feature_blocks` give bit-identical Gram matrices (and clusters).
    """
    gram = None
    for blk in blocks:
        if not all_finite(blk):
            raise ValueError("channel features contain NaN or Inf; the weights are not finite")
        blk = blk.to(dtype).contiguous()
        xc = blk - blk.mean(dim=0, keepdim=True)
        gram = xc @ xc.T if gram is None else gram.addmm_(xc, xc.T)
    return gram


def _gram(x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Centred Gram matrix (n, n) in ``dtype``: k-means only needs inner products, and centring keeps them well
    conditioned. Features are centred, converted and multiplied one column block at a time (bounded scratch)."""
    step = gram_cols(x.shape[0])
    return _gram_blocks((x[:, j:j + step] for j in range(0, x.shape[1], step)), dtype)


def _kmeanspp(gram: np.ndarray, diag: np.ndarray, k: int, rng: np.random.Generator, eps: float) -> np.ndarray:
    """Greedy k-means++ seeding on a Gram matrix (n, n), float32 or float64; returns the indices of the k seeds.

    Each step samples 2 + log(k) candidates with probability proportional to the squared distance to the nearest
    seed and keeps the one that lowers the total potential most (scikit-learn's scheme). Once every remaining
    point coincides with a seed, further seeds are the lowest unused indices (duplicates become singletons).
    Distances are float64; only the candidates' rows are converted (exactly), never the whole matrix.
    """
    n = len(diag)
    trials = 2 + int(np.log(k))
    centers = [int(rng.integers(n))]
    d2 = np.maximum(diag - 2 * gram[centers[0]].astype(np.float64) + diag[centers[0]], 0)
    d2[d2 < eps] = 0
    cum, dc = np.empty(n), np.empty((trials, n))
    for _ in range(1, k):
        total = d2.sum()
        if total <= 0:
            centers.append(int(np.setdiff1d(np.arange(n), centers)[0]))
            continue
        np.cumsum(d2, out=cum)
        cand = np.minimum(np.searchsorted(cum, rng.random(trials) * total, side="right"), n - 1)
        # dc = max(diag - 2 G[cand] + diag[cand], 0), zeroed below eps, capped by d2: in place, same operations
        np.multiply(gram[cand], 2.0, out=dc, dtype=np.float64)
        np.subtract(diag[None, :], dc, out=dc)
        np.add(dc, diag[cand][:, None], out=dc)
        np.maximum(dc, 0, out=dc)
        dc *= dc >= eps
        np.minimum(dc, d2[None, :], out=dc)
        best = int(np.argmin(dc.sum(axis=1)))
        centers.append(int(cand[best]))
        d2 = dc[best].copy()
    return np.asarray(centers)


def _fill_empty(labels: torch.Tensor, dist: torch.Tensor, k: int) -> torch.Tensor:
    """Give every empty cluster one point, taken from clusters that keep at least one member.

    ``dist``: squared distances (n, k) to every centroid, or (n,) to each point's own centroid of ``labels``.
    Donors are the points farthest from their own centre; a cluster never gives away its last member, so the
    result has exactly k non-empty clusters whenever n >= k (duplicate points become singletons at no cost).
    """
    sizes = torch.bincount(labels, minlength=k)
    empty = torch.nonzero(sizes == 0).flatten().tolist()
    if not empty:
        return labels
    labels = labels.clone()
    own = dist if dist.dim() == 1 else dist.gather(1, labels[:, None]).squeeze(1)
    for i in torch.argsort(own, descending=True, stable=True).tolist():
        if not empty:
            break
        c = int(labels[i])
        if sizes[c] > 1:
            sizes[c] -= 1
            labels[i] = empty.pop(0)
    return labels


# elements of an (n, k) point-to-centroid distance block computed at once: the full matrix (215 MB for an
# 8192-neuron MLP at k = 6554, several temporaries) is never built; 4 Mi float32 = 16 MiB per temporary
DIST_BLOCK = 4 * 1024 * 1024


def _row_blocks(n: int, k: int):
    step = max(1, DIST_BLOCK // max(1, k))
    return ((i, min(n, i + step)) for i in range(0, n, step))


def _cluster_sums(gram: torch.Tensor, labels: torch.Tensor, k: int, out: torch.Tensor | None = None):
    """Cluster sums of the Gram rows s (k, n), s[c, j] = sum_{i in c} G_ij (G symmetric), written into ``out``
    when given (a reused buffer: no fresh 200 MB allocation per Lloyd iteration), and the cluster sizes (k,)."""
    s = torch.zeros(k, gram.shape[0], dtype=gram.dtype, device=gram.device) if out is None else out.zero_()
    s.index_add_(0, labels, gram)
    return s, torch.bincount(labels, minlength=k).to(gram.dtype).clamp_min(1)


def _within(s: torch.Tensor, labels: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """cc (k,): sum_{i,j in c} G_ij, from the cluster sums s (k, n)."""
    rows = torch.arange(s.shape[1], device=s.device)
    return torch.zeros(len(sizes), dtype=s.dtype, device=s.device).index_add_(0, labels, s[labels, rows])


def _assign(gram: torch.Tensor, diag: torch.Tensor, labels: torch.Tensor, k: int,
            out: torch.Tensor | None = None, nearest: bool = True):
    """Nearest centroid of every point for the clusters ``labels``, in row blocks: (new labels (n,), squared
    distance to that centroid (n,), within-cluster terms cc/|c| (k,)); ``nearest=False`` returns only the last.

    dist(i, c) = G_ii - 2/|c| sum_{j in c} G_ij + 1/|c|^2 sum_{j,l in c} G_jl  (kernel k-means, linear kernel).
    """
    s, sizes = _cluster_sums(gram, labels, k, out)
    cc = _within(s, labels, sizes)
    if not nearest:
        return None, None, cc / sizes
    n = gram.shape[0]
    new = torch.empty(n, dtype=torch.long, device=gram.device)
    best = torch.empty(n, dtype=gram.dtype, device=gram.device)
    cterm = (cc / sizes**2)[None, :]
    for i0, i1 in _row_blocks(n, k):
        dist = diag[i0:i1, None] - 2 * (s[:, i0:i1] / sizes[:, None]).T + cterm
        torch.min(dist, dim=1, out=(best[i0:i1], new[i0:i1]))
    return new, best, cc / sizes


def _lloyd(gram: torch.Tensor, diag: torch.Tensor, seeds: np.ndarray, max_iter: int) -> tuple[torch.Tensor, float, int]:
    """Lloyd iterations written with the Gram matrix only; returns (labels, inertia, iterations)."""
    n, k = gram.shape[0], len(seeds)
    seeds_t = torch.as_tensor(seeds, device=gram.device)
    labels = torch.empty(n, dtype=torch.long, device=gram.device)
    own = torch.empty(n, dtype=gram.dtype, device=gram.device)
    ds = diag[seeds_t][None, :]
    for i0, i1 in _row_blocks(n, k):
        torch.min(diag[i0:i1, None] - 2 * gram[i0:i1][:, seeds_t] + ds, dim=1, out=(own[i0:i1], labels[i0:i1]))
    labels[seeds_t] = torch.arange(k, device=gram.device)  # duplicates of a seed may tie: keep seeds in place
    own[seeds_t] = diag[seeds_t] - 2 * gram[seeds_t, seeds_t] + diag[seeds_t]
    labels = _fill_empty(labels, own, k)
    buf = torch.empty(k, n, dtype=gram.dtype, device=gram.device)
    it, current = 0, False   # current: buf holds the cluster sums of labels
    for it in range(1, max_iter + 1):
        new_labels, own, _ = _assign(gram, diag, labels, k, buf)
        new_labels = _fill_empty(new_labels, own, k)
        if torch.equal(new_labels, labels):
            current = True
            break
        labels = new_labels
    if current:
        sizes = torch.bincount(labels, minlength=k).to(gram.dtype).clamp_min(1)
        within = _within(buf, labels, sizes) / sizes
    else:
        within = _assign(gram, diag, labels, k, buf, nearest=False)[2]
    return labels, float(diag.sum() - within.sum()), it


def _hartigan(gram, labels: np.ndarray, k: int, max_sweeps: int = 20, block: int = 256) -> tuple[np.ndarray, int]:
    """Hartigan's single-point transfers on a Gram matrix (n, n) (NumPy or torch, float32 or float64), from
    ``labels``: move channel i from cluster a to b whenever that lowers the inertia, i.e.
    n_b/(n_b+1) d(i,b) < n_a/(n_a-1) d(i,a) (d: squared distance to a centroid). A Lloyd fixed point is usually
    not a Hartigan one; the authors' code uses Hartigan k-means, and its lower-inertia clusters are what Fold-AR's
    accuracy depends on (benchmarks/results/reference.md). Never empties a cluster and never raises the inertia.
    Returns (labels, sweeps).

    Points are visited in index order and every decision uses the statistics left by the moves before it, as in
    the textbook loop, with the same float64 arithmetic, so the result is the textbook one bit for bit. The work
    is vectorised: the (k, block) costs of a block of points are computed once; after a move only the two touched
    clusters' entries are recomputed for the rest of the block, and the next point that moves is found at once.
    """
    g = gram.detach().cpu().numpy() if torch.is_tensor(gram) else np.asarray(gram)
    gt = torch.as_tensor(g)
    n = len(labels)
    labels = np.array(labels, dtype=np.int64)
    diag = np.diag(g).astype(np.float64)
    tol = 1e-12 * max(1.0, float(diag.mean()))
    sweeps, bufs = 0, {}
    for sweeps in range(1, max_sweeps + 1):
        # The textbook loop rebuilds the cluster sums s[c, j] = sum_{i in c} G_ij (k, n) at each sweep start and
        # updates rows a, b at each move. Only a block of columns is needed at a time: it is rebuilt from the
        # sweep-start labels (same sums, same order) and the sweep's moves so far are replayed on it, in order,
        # which gives the textbook values bit for bit without the (k, n) float64 matrix (430 MB at n = 8192).
        lt0 = torch.as_tensor(labels.copy())
        sizes = np.bincount(labels, minlength=k).astype(np.float64)
        cc = np.bincount(labels, weights=_own_sums(g, gt, labels, k), minlength=k)  # (k,): sum_{i,j in c} G_ij
        log: list[tuple[int, int, int]] = []   # the sweep's moves (point, from, to)
        for start in range(0, n, block):
            stop = min(n, start + block)
            s = _column_sums(gt, lt0, k, start, stop, log, bufs)
            _hartigan_block(g, s.numpy(), cc, sizes, labels, diag, start, stop, tol, log)
        if not log:
            break
    return labels, sweeps


def _column_sums(gt: torch.Tensor, lt0: torch.Tensor, k: int, start: int, stop: int, log,
                 bufs: dict | None = None) -> torch.Tensor:
    """Columns start..stop-1 of the cluster sums (k, B) float64 of the sweep-start labels ``lt0``, with the logged
    moves (i, a, b) applied in order (s[a] -= G_i, s[b] += G_i: one index_add, row pairs interleaved). ``bufs``:
    scratch reused from block to block (fresh 10-20 MB arrays cost page faults each time)."""
    w = stop - start
    bufs = {} if bufs is None else bufs
    if "slab" not in bufs or bufs["slab"].shape[1] < w:
        bufs["slab"] = torch.empty(gt.shape[0], w, dtype=torch.float64)
        bufs["s"] = torch.empty(k, w, dtype=torch.float64)
    slab = bufs["slab"][:, :w].copy_(gt[:, start:stop])
    s = bufs["s"][:, :w].zero_().index_add_(0, lt0, slab)
    if log:
        mv = torch.as_tensor(log)
        rows = slab[mv[:, 0]]                                          # G[i, start:stop]
        idx = mv[:, 1:].reshape(-1)                                    # a0, b0, a1, b1, ...
        s.index_add_(0, idx, torch.stack([-rows, rows], dim=1).reshape(-1, stop - start))
    return s


def _own_sums(g: np.ndarray, gt: torch.Tensor, labels: np.ndarray, k: int) -> np.ndarray:
    """own[j] = s[labels[j], j] = sum_{i in cluster of j} G_ij (n,) float64, summed in increasing i from 0 as the
    (k, n) index_add does, from the same-cluster pairs only (few when k is close to n)."""
    n = len(labels)
    m = np.bincount(labels, minlength=k)
    per = m[labels]
    if int(per.sum()) > 4 * n + n * n // 16:   # large clusters: the column sums, block by block
        lt = torch.as_tensor(labels)
        step = max(1, DIST_BLOCK // max(1, k))
        return np.concatenate([_column_sums(gt, lt, k, j0, min(n, j0 + step), [])[lt[j0:j0 + step],
                               torch.arange(min(n, j0 + step) - j0)].numpy() for j0 in range(0, n, step)])
    order = np.argsort(labels, kind="stable")            # members cluster by cluster, increasing index
    first = np.cumsum(m) - m
    i_rep = np.repeat(np.arange(n), per)                 # increasing i: each j gets its terms in textbook order
    pos = np.arange(len(i_rep)) - np.repeat(np.cumsum(per) - per, per)
    j = order[first[labels[i_rep]] + pos]
    return np.bincount(j, weights=g[i_rep, j].astype(np.float64), minlength=n)


def _hartigan_block(g, s, cc, sizes, labels, diag, start: int, stop: int, tol: float, log: list) -> int:
    """Hartigan transfers of points start..stop-1 in order, updating s (their columns (k, B) of the cluster sums),
    cc, sizes, labels in place and appending the moves to ``log``; returns the number of moves. Costs are those of the textbook loop, d = diag[i] - 2 s[:, i] / sizes + cc / sizes**2 and
    add = sizes / (sizes + 1) * d, evaluated in the same order so that every comparison is the same."""
    cols = np.arange(stop - start)
    own = labels[start:stop].copy()          # a point changes cluster only when it is visited itself
    # block start, in torch: the same IEEE float64 operations as the textbook loop (a - x computed as -x + a,
    # exact), in place on one (k, B) array
    sz, cct = torch.from_numpy(sizes), torch.from_numpy(cc)
    ownt, colt = torch.from_numpy(own), torch.from_numpy(cols)
    d = (torch.from_numpy(s) * 2.0).div_(sz[:, None]).neg_()
    d.add_(torch.from_numpy(diag[start:stop])[None, :]).add_((cct / sz**2)[:, None])   # (k, B): d(i, c)
    d_own = d[ownt, colt].numpy()
    d.mul_((sz / (sz + 1.0))[:, None])      # add costs
    d[ownt, colt] = np.inf
    # best other cluster at the block start, first index among ties (a column-wise min, then the first row that
    # attains it: rows come out of nonzero in increasing order)
    v1 = d.amin(dim=0)
    rows, cols_hit = torch.nonzero(d == v1, as_tuple=True)
    b1 = np.empty(len(cols), dtype=np.int64)
    b1[cols_hit.flip(0).numpy()] = rows.flip(0).numpy()   # the last write (the first row) wins
    v1 = v1.numpy()
    del d, rows, cols_hit
    touched: list[int] = []                  # clusters changed since the block start, sorted
    moved, j = 0, 0
    while j < len(cols):
        a = own[j:]
        if touched:
            t = np.asarray(touched)
            dt = diag[None, start + j:stop] - 2.0 * s[t, j:] / sizes[t, None] + \
                (cc[t] / sizes[t] ** 2)[:, None]                                       # (|t|, rest), current
            at = (sizes[t] / (sizes[t] + 1.0))[:, None] * dt
            is_own = t[:, None] == a[None, :]
            da = np.where(is_own.any(axis=0), np.where(is_own, dt, 0.0).sum(axis=0), d_own[j:])
            at[is_own] = np.inf
            pos = at.argmin(axis=0)          # t is sorted: the lowest cluster id among ties
            vt, bt = at[pos, np.arange(len(a))], t[pos]
            vb, bb = v1[j:], b1[j:]
            take = (vt < vb) | ((vt == vb) & (bt < bb))
            vb, bb = np.where(take, vt, vb), np.where(take, bt, bb)
            stale = np.isin(b1[j:], t)       # the block-start best changed: the true best may be anywhere
        else:
            vb, bb, da, stale = v1[j:], b1[j:], d_own[j:], np.zeros(len(a), dtype=bool)
        sa = sizes[a]
        can = sa > 1
        with np.errstate(divide="ignore", invalid="ignore"):
            go = can & (vb < sa / (sa - 1.0) * da - tol)
        hit = np.flatnonzero(go | (stale & can))
        if not len(hit):
            break
        p = int(hit[0])
        i, ai = start + j + p, int(a[p])
        if stale[p]:                         # full row, as the textbook loop computes it
            di = diag[i] - 2.0 * s[:, i - start] / sizes + cc / sizes**2
            addi = sizes / (sizes + 1.0) * di
            addi[ai] = np.inf
            b = int(np.argmin(addi))
            do = addi[b] < sizes[ai] / (sizes[ai] - 1.0) * di[ai] - tol
        else:
            b, do = int(bb[p]), True
        if do:
            cc[ai] += diag[i] - 2.0 * s[ai, i - start]
            cc[b] += diag[i] + 2.0 * s[b, i - start]
            s[ai] -= g[i, start:stop]
            s[b] += g[i, start:stop]
            log.append((i, ai, b))
            sizes[ai] -= 1.0
            sizes[b] += 1.0
            labels[i] = b
            moved += 1
            touched = sorted(set(touched) | {ai, b})
        j += p + 1
    return moved


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
           refine: str = DEFAULT_CLUSTERING["refine"], device: str | torch.device | None = None,
           with_centroids: bool = True) -> ClusterResult:
    """Cluster the rows of ``features`` (n, d) into exactly ``k`` non-empty clusters.

    The default runs greedy k-means++ seeding and Lloyd iterations on the centred Gram matrix (exact, and
    independent of d after one matrix product), keeps the best of ``n_init`` restarts and, with
    ``refine="hartigan"``, improves it with Hartigan's single-point transfers (the authors' k-means; lower inertia
    than Lloyd's fixed point, and Fold-AR needs it). ``"sklearn"`` runs scikit-learn's KMeans, ``"ward"``
    agglomerative Ward linkage (the authors' paper-era choice).
    """
    x = torch.as_tensor(np.asarray(features) if not torch.is_tensor(features) else features, dtype=torch.float32)
    if device is not None:
        x = x.to(device)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the number of channels ({n}), got {k}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown clustering algorithm {algorithm!r}; choose one of {ALGORITHMS}")
    if refine not in REFINES:
        raise ValueError(f"unknown k-means refinement {refine!r}; choose one of {REFINES}")
    if not all_finite(x):
        raise ValueError("channel features contain NaN or Inf; the weights are not finite")
    if k == n:
        return ClusterResult(np.arange(n), x.cpu().numpy(), 0.0, k)
    if algorithm in ("sklearn", "ward"):
        return _sklearn_cluster(x.cpu().numpy(), k, seed, n_init, max_iter, algorithm)
    canon, inertia, n_iter = _kmeans_gram(_gram(x, torch.float32), k, seed, n_init, max_iter, refine)
    if not with_centroids:  # folding needs only the labels: skip the k x d matrix (240 MB for VGG-16's classifier)
        return ClusterResult(canon, None, inertia, k, n_iter)
    centroids = _centroids(x, torch.as_tensor(canon, device=x.device), k)
    return ClusterResult(canon, centroids.cpu().numpy(), inertia, k, n_iter)


def kmeans_blocks(blocks, n: int, k: int, *, seed: int = 0, n_init: int = DEFAULT_CLUSTERING["n_init"],
                  max_iter: int = DEFAULT_CLUSTERING["max_iter"], algorithm: str = "kmeans",
                  refine: str = DEFAULT_CLUSTERING["refine"], device: str | torch.device | None = None) -> ClusterResult:
    """:func:`kmeans` (default algorithm, no centroids) on features given as column blocks (n, w_b) of
    ``gram_cols(n)`` columns, never holding the (n, d) matrix. Same labels as ``kmeans(features, k)`` on the
    concatenated blocks, bit for bit."""
    if algorithm != "kmeans":
        raise ValueError(f"kmeans_blocks runs the Gram k-means only, not {algorithm!r}")
    if refine not in REFINES:
        raise ValueError(f"unknown k-means refinement {refine!r}; choose one of {REFINES}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the number of channels ({n}), got {k}")
    gram = _gram_blocks((b if device is None else b.to(device) for b in blocks), torch.float32)
    return _kmeans_on_gram(gram, n, k, seed, n_init, max_iter, refine)


def _kmeans_on_gram(gram: torch.Tensor | None, n: int, k: int, seed: int, n_init: int, max_iter: int,
                    refine: str, seeds: list[np.ndarray] | None = None) -> ClusterResult:
    """:func:`kmeans_blocks` from the centred float32 Gram matrix (n, n) it builds (None: no columns) and, when
    already drawn, the restarts' seeds (:func:`_seed_restarts`)."""
    if gram is None or k == n:
        return ClusterResult(np.arange(n), None, 0.0, k)
    canon, inertia, n_iter = _kmeans_gram(gram, k, seed, n_init, max_iter, refine, seeds)
    return ClusterResult(canon, None, inertia, k, n_iter)


def _seed_restarts(gram: torch.Tensor, k: int, seed: int, n_init: int) -> list[np.ndarray]:
    """k-means++ seeds (k,) of the ``n_init`` restarts, drawn in turn from one generator (Lloyd draws nothing, so
    seeding every restart first gives the seeds of the interleaved order)."""
    diag = gram.diagonal()
    eps = 1e-6 * float(diag.mean().clamp_min(1e-30))
    gram_np, diag_np = gram.cpu().numpy(), diag.double().cpu().numpy()  # float32 view: no float64 copy
    rng = np.random.default_rng(seed)
    return [_kmeanspp(gram_np, diag_np, k, rng, eps) for _ in range(max(1, n_init))]


def _kmeans_gram(gram: torch.Tensor, k: int, seed: int, n_init: int, max_iter: int,
                 refine: str = "hartigan", seeds: list[np.ndarray] | None = None) -> tuple[np.ndarray, float, int]:
    """Best of ``n_init`` k-means++ + Lloyd runs on a centred float32 Gram matrix, then (``refine="hartigan"``)
    Hartigan transfers from it: (canonical labels, inertia, iterations). Refining only the kept restart costs one
    refinement per group and matched refining every restart on the reference panel (reference.md). ``seeds``:
    the restarts' seeds when already drawn (:func:`_seed_restarts`)."""
    diag = gram.diagonal().clone()
    gram_np = gram.cpu().numpy()  # float32 view: no float64 copy
    best = None
    for seeds_r in (_seed_restarts(gram, k, seed, n_init) if seeds is None else seeds):
        labels, err, it = _lloyd(gram, diag, seeds_r, max_iter)
        if best is None or err < best[1] - 1e-9 * max(1.0, abs(err)):
            best = (labels, err, it)
    labels, err, it = best
    if refine == "hartigan":
        refined, sweeps = _hartigan(gram_np, labels.cpu().numpy(), k)
        labels = torch.as_tensor(refined, device=gram.device)
        within = _assign(gram, diag, labels, k, nearest=False)[2]
        err, it = float(diag.sum() - within.sum()), it + sweeps
    return _canonical(labels.cpu().numpy()), max(0.0, err), it


def gram_matrix(blocks) -> torch.Tensor:
    """The centred float32 Gram matrix (n, n) that :func:`kmeans_blocks` clusters, from feature column blocks
    (n, w_b); computing it apart lets a caller overlap it with other work (the next group's, on a second thread)."""
    return _gram_blocks(blocks, torch.float32)


def seed_restarts(gram: torch.Tensor, k: int, seed: int, n_init: int) -> list[np.ndarray]:
    """The k-means++ seeds of the ``n_init`` restarts :func:`kmeans_on_gram` draws from ``gram``."""
    return _seed_restarts(gram, k, seed, n_init)


def kmeans_on_gram(gram: torch.Tensor, k: int, *, seed: int = 0, n_init: int = DEFAULT_CLUSTERING["n_init"],
                   max_iter: int = DEFAULT_CLUSTERING["max_iter"], refine: str = DEFAULT_CLUSTERING["refine"],
                   seeds: list[np.ndarray] | None = None) -> ClusterResult:
    """:func:`kmeans_blocks` on a ready Gram matrix (:func:`gram_matrix`), with the restarts' seeds when already
    drawn (:func:`seed_restarts`): the same labels, bit for bit."""
    if refine not in REFINES:
        raise ValueError(f"unknown k-means refinement {refine!r}; choose one of {REFINES}")
    n = gram.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the number of channels ({n}), got {k}")
    return _kmeans_on_gram(gram, n, k, seed, n_init, max_iter, refine, seeds)


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


__all__ = ["ALGORITHMS", "DEFAULT_CLUSTERING", "ClusterResult", "k_for_ratio", "kmeans", "kmeans_blocks",
           "gram_matrix", "seed_restarts", "kmeans_on_gram", "cluster_order",
           "inertia_curve"]
