"""2-D embeddings of per-channel feature vectors (for the layer explorer scatter).

* ``"pca"`` (default, fast, deterministic): scikit-learn PCA on the L2-normalised rows, so the
  picture reflects the cosine geometry that k-means/similarity use.
* ``"umap"``: umap-learn with the cosine metric, seeded (``random_state`` makes it single-threaded
  and reproducible); the first call pays numba's JIT compile (~10-30 s), later calls are fast.

Tiny inputs never fail: with fewer than 3 channels the points are laid out on a line, and UMAP
falls back to PCA when there are too few channels for a neighbourhood graph (the result says so).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

METHODS = ("pca", "umap")


@dataclass
class Embedding:
    coords: np.ndarray          # (n, 2) float64
    method: str                 # method actually used: "pca" | "umap" | "trivial"
    requested: str              # method asked for
    seed: int
    note: str = ""              # why a fallback happened, if it did
    explained: list[float] = field(default_factory=list)  # PCA explained variance ratios

    @property
    def label(self) -> str:
        return {"pca": "PCA", "umap": "UMAP", "trivial": "index"}[self.method]


def _normalise(features: np.ndarray) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        x = x.reshape(x.shape[0], -1)
    x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


#: above this many matrix entries PCA goes through the smaller of the two Gram matrices and an eigensolver for the
#: top two eigenpairs (exact, and 7x faster than a full SVD on ResNet-50's 2048-channel groups)
PCA_FULL_MAX = 2_000_000


def _pca(x: np.ndarray, seed: int = 0) -> tuple[np.ndarray, list[float]]:
    n, d = x.shape
    comps = min(2, n, d)
    out = np.zeros((n, 2))
    if comps == 0 or np.allclose(x, x[:1]):
        return out, []
    if n * d <= PCA_FULL_MAX or comps < 2:
        from sklearn.decomposition import PCA

        pca = PCA(n_components=comps, svd_solver="full")
        out[:, :comps] = pca.fit_transform(x)
        return out, [float(v) for v in pca.explained_variance_ratio_]
    from scipy.sparse.linalg import eigsh

    xc = x - x.mean(axis=0)
    total = float((xc * xc).sum())

    def top2(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Lanczos for the two largest eigenpairs from a fixed start vector: deterministic, ~10x faster than a
        # dense subset eigh at n = 2048
        w, v = eigsh(g, k=2, which="LA", v0=np.ones(len(g)), tol=0)
        o = np.argsort(w)[::-1]
        return w[o], v[:, o]

    xs = xc.astype(np.float32)   # the Gram product in float32 (a picture, not a fold); eigenpairs in float64
    if n <= d:   # (n, n): its eigenvectors scaled by sqrt(eigenvalue) are the principal coordinates
        w, v = top2((xs @ xs.T).astype(np.float64))
        coords = v * np.sqrt(np.clip(w, 0, None))
    else:        # (d, d) covariance: project on its top eigenvectors
        w, v = top2((xs.T @ xs).astype(np.float64))
        coords = xc @ v
    coords *= np.where(coords[np.abs(coords).argmax(axis=0), range(2)] < 0, -1.0, 1.0)  # a fixed sign per axis
    out[:] = coords
    return out, [float(v) / total for v in w] if total > 0 else []


def embed(features: np.ndarray, method: str = "pca", *, seed: int = 0, normalize: bool = True,
          n_neighbors: int = 15, min_dist: float = 0.1) -> Embedding:
    """Embed ``features`` (n, d) into 2-D. Deterministic for a given ``seed``."""
    method = str(method).lower()
    if method not in METHODS:
        raise ValueError(f"unknown embedding method {method!r}; choose one of {', '.join(METHODS)}")
    x = np.asarray(features, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    n = x.shape[0]
    if normalize:
        x = _normalise(x)
    if n < 3:
        coords = np.stack([np.arange(n, dtype=float), np.zeros(n)], axis=1)
        return Embedding(coords, "trivial", method, seed, note=f"only {n} channel(s): laid out on a line")
    if method == "umap":
        if n < 6:
            coords, ev = _pca(x, seed)
            return Embedding(coords, "pca", method, seed, note=f"UMAP needs more than 5 channels (got {n}); used PCA",
                             explained=ev)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import umap

            reducer = umap.UMAP(n_components=2, n_neighbors=int(max(2, min(n_neighbors, n - 1))),
                                min_dist=float(min_dist), metric="cosine" if normalize else "euclidean",
                                random_state=int(seed), init="spectral" if n > 10 else "random",
                                n_jobs=1)
            coords = np.asarray(reducer.fit_transform(x), dtype=np.float64)
        return Embedding(coords, "umap", method, seed)
    coords, ev = _pca(x, seed)
    return Embedding(coords, "pca", method, seed, explained=ev)


def warm_up() -> None:
    """Compile UMAP's numba kernels on a tiny input (~10-30 s once per process; numba's disk cache makes later
    processes faster). The app calls this in a background thread when the Layer explorer opens, so the first
    real UMAP does not pay for the compilation."""
    embed(np.random.default_rng(0).normal(size=(40, 6)), "umap")
