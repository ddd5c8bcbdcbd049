"""Tests for foldviz.embedding (PCA default, seeded UMAP, tiny-input fallbacks)."""
from __future__ import annotations

import numpy as np
import pytest

from foldviz.embedding import embed


def _clusters(n_per=12, k=3, d=16, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 3
    labels = np.repeat(np.arange(k), n_per)
    return centers[labels] + 0.05 * rng.normal(size=(k * n_per, d)), labels


def _separated(coords, labels):
    cents = np.stack([coords[labels == c].mean(0) for c in np.unique(labels)])
    within = max(np.linalg.norm(coords[labels == c] - cents[c], axis=1).max() for c in np.unique(labels))
    between = min(np.linalg.norm(cents[i] - cents[j]) for i in range(len(cents)) for j in range(i))
    return between > within


def test_pca_shape_deterministic_and_separates():
    x, labels = _clusters()
    a = embed(x)
    b = embed(x)
    assert a.coords.shape == (36, 2) and a.method == "pca" and a.label == "PCA"
    assert np.array_equal(a.coords, b.coords)
    assert len(a.explained) == 2 and sum(a.explained) <= 1 + 1e-9
    assert _separated(a.coords, labels)


def test_pca_is_scale_invariant_per_row_when_normalised():
    x, _ = _clusters()
    scaled = x * np.linspace(0.5, 5, len(x))[:, None]
    assert np.allclose(embed(x).coords, embed(scaled).coords, atol=1e-8)


def test_tiny_and_degenerate_inputs():
    one = embed(np.ones((1, 4)))
    assert one.coords.shape == (1, 2) and one.method == "trivial" and one.note
    two = embed(np.eye(2), method="umap")
    assert two.coords.shape == (2, 2)
    same = embed(np.ones((5, 3)))
    assert same.coords.shape == (5, 2) and np.allclose(same.coords, 0)
    few = embed(np.random.default_rng(0).normal(size=(4, 3)), method="umap")
    assert few.method == "pca" and "UMAP" in few.note
    narrow = embed(np.random.default_rng(0).normal(size=(10, 1)))  # d < 2
    assert narrow.coords.shape == (10, 2)
    with pytest.raises(ValueError):
        embed(np.ones((4, 4)), method="tsne")


def test_umap_seeded_reproducible():
    x, labels = _clusters(n_per=10)
    a = embed(x, method="umap", seed=3)
    b = embed(x, method="umap", seed=3)
    assert a.method == "umap" and a.coords.shape == (30, 2)
    assert np.allclose(a.coords, b.coords)
    assert _separated(a.coords, labels)


def test_shared_columns_add_no_similarity():
    """Columns every channel shares (an untrained BatchNorm's gamma=1, beta=0) must not make channels look alike."""
    import torch

    from foldviz.features import cosine_similarity, redundancy

    w = torch.randn(64, 9, generator=torch.Generator().manual_seed(0)) * 0.1
    x = torch.cat([w, torch.ones(64, 1), torch.zeros(64, 1)], dim=1).numpy()
    plain = cosine_similarity(x, centred=False)
    centred = cosine_similarity(x)
    off = ~np.eye(64, dtype=bool)
    assert plain[off].mean() > 0.5                      # the constant column dominates the raw cosine
    assert abs(centred[off].mean()) < 0.05              # centred: no spurious similarity
    assert np.allclose(np.diag(centred), 1, atol=1e-5)
    assert redundancy(x)["mean_cos"] == pytest.approx(float(centred[off].mean()), abs=1e-6)
