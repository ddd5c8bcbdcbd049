"""k-means as the fold uses it: seeding, empty clusters, canonical labels, the sklearn and Ward paths, scaling."""
import numpy as np
import pytest
import torch

from foldviz.features import robust_scale
from foldviz.kmeans import _canonical, _fill_empty, _kmeanspp, cluster_order, k_for_ratio, kmeans


def _blobs(k=4, per=8, d=6, spread=0.01, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 10
    x = np.concatenate([c + spread * rng.normal(size=(per, d)) for c in centres])
    return x.astype(np.float32), np.repeat(np.arange(k), per)


def test_k_for_ratio_rounds_and_keeps_one():
    assert [k_for_ratio(64, r) for r in (0.0, 0.25, 0.5, 0.9)] == [64, 48, 32, 6]
    assert k_for_ratio(3, 0.95) == 1
    with pytest.raises(ValueError):
        k_for_ratio(8, 1.0)


def test_well_separated_blobs_are_found_exactly():
    x, truth = _blobs()
    res = kmeans(x, 4, seed=0)
    assert np.array_equal(res.labels, _canonical(truth))  # the same partition, canonically labelled
    assert res.inertia < 1.0 and res.n_iter >= 1 and (res.sizes == 8).all()


def test_kmeanspp_seeds_one_point_per_blob():
    x, truth = _blobs(k=5, per=6)
    xc = torch.as_tensor(x, dtype=torch.float64)
    xc = xc - xc.mean(0)
    gram = (xc @ xc.T).numpy()
    seeds = _kmeanspp(gram, np.diag(gram).copy(), 5, np.random.default_rng(3), 1e-9)
    assert sorted(truth[seeds].tolist()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("algorithm", ["kmeans", "sklearn", "ward"])
def test_exactly_k_non_empty_clusters_with_duplicate_and_zero_rows(algorithm):
    """300 dead (all-zero) channels and duplicates: fewer distinct rows than k must still give k clusters."""
    rng = np.random.default_rng(0)
    live = rng.normal(size=(20, 8)).astype(np.float32)
    x = np.concatenate([np.zeros((300, 8), np.float32), live, live[:5]])   # 21 distinct rows, 325 channels
    for k in (10, 21, 100, 324):
        res = kmeans(x, k, seed=1, algorithm=algorithm, n_init=2)
        assert len(np.unique(res.labels)) == k == res.k, (algorithm, k)
        assert (res.sizes > 0).all()
        if k >= 21:
            assert res.inertia == pytest.approx(0.0, abs=1e-6)  # every distinct row can have its own cluster


def test_fill_empty_never_empties_another_cluster():
    labels = torch.tensor([0, 0, 0, 1, 1, 1])   # clusters 2 and 3 empty
    dist = torch.rand(6, 4, generator=torch.Generator().manual_seed(0))
    out = _fill_empty(labels, dist, 4)
    assert torch.bincount(out, minlength=4).min() >= 1


def test_labels_are_canonical_and_seeded():
    x, _ = _blobs(k=6, per=5, spread=1.0, seed=2)
    a, b = kmeans(x, 6, seed=7), kmeans(x, 6, seed=7)
    assert np.array_equal(a.labels, b.labels)
    first = [int(np.flatnonzero(a.labels == c)[0]) for c in range(6)]
    assert first == sorted(first) and a.labels[0] == 0  # cluster ids by first occurrence
    assert np.array_equal(_canonical(np.array([5, 5, 2, 9, 2])), np.array([0, 0, 1, 2, 1]))


def test_more_restarts_never_increase_inertia_and_hartigan_never_hurts():
    x = np.random.default_rng(4).normal(size=(120, 10)).astype(np.float32)
    one = kmeans(x, 30, seed=0, n_init=1, refine="none").inertia
    ten = kmeans(x, 30, seed=0, n_init=10, refine="none").inertia
    assert ten <= one + 1e-6
    # Hartigan refines the kept Lloyd restart: never worse than it, and here strictly better
    for n_init, lloyd in ((1, one), (10, ten)):
        res = kmeans(x, 30, seed=0, n_init=n_init)
        assert res.inertia <= lloyd + 1e-6 and len(np.unique(res.labels)) == 30
    assert kmeans(x, 30, seed=0, n_init=1).inertia < one - 1e-3


def test_hartigan_moves_a_point_that_lloyd_leaves():
    """A Lloyd fixed point that is not a Hartigan one: points 0..3 on a line, clusters {0, 1, 2} and {3}. Lloyd
    keeps it (point 2 is as near its own centroid 1 as centroid 3: no strict gain), Hartigan moves 2 because the inertia drops:
    removing it saves 3/2 * 1^2 = 1.5, adding it to {3} costs 1/2 * 1^2 = 0.5."""
    from foldviz.kmeans import _hartigan

    x = np.array([[0.0], [1.0], [2.0], [3.0]])
    g = (x - x.mean()) @ (x - x.mean()).T
    labels, sweeps = _hartigan(g, np.array([0, 0, 0, 1]), 2)
    np.testing.assert_array_equal(labels, [0, 0, 1, 1])
    assert sweeps == 2  # one sweep that moves, one that confirms


def test_inertia_matches_its_definition():
    x = np.random.default_rng(5).normal(size=(40, 7)).astype(np.float32)
    for algorithm in ("kmeans", "sklearn", "ward"):
        res = kmeans(x, 9, seed=0, algorithm=algorithm)
        cents = np.stack([x[res.labels == c].mean(0) for c in range(9)])
        assert res.inertia == pytest.approx(float(((x - cents[res.labels]) ** 2).sum()), rel=1e-4), algorithm


def test_identity_and_argument_errors():
    x = np.random.default_rng(6).normal(size=(5, 3)).astype(np.float32)
    assert np.array_equal(kmeans(x, 5).labels, np.arange(5))
    with pytest.raises(ValueError, match="between 1"):
        kmeans(x, 6)
    with pytest.raises(ValueError, match="unknown clustering algorithm"):
        kmeans(x, 2, algorithm="magic")
    with pytest.raises(ValueError, match="NaN or Inf"):
        kmeans(np.array([[1.0, np.nan], [0.0, 1.0]], np.float32), 1)


def test_robust_scale_is_median_over_iqr_and_keeps_constant_columns_finite():
    x = torch.tensor([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0], [4.0, 5.0], [100.0, 5.0]])
    y = robust_scale(x)
    med, iqr = 3.0, 4.0 - 2.0
    assert torch.allclose(y[:, 0], (x[:, 0] - med) / iqr)
    assert torch.equal(y[:, 1], torch.zeros(5))  # IQR 0: only centred, never divided by 0


def test_cluster_order_lists_largest_clusters_first():
    labels = np.array([1, 0, 1, 2, 1, 0])
    assert cluster_order(labels).tolist() == [0, 2, 4, 1, 5, 3]


@pytest.mark.parametrize("name", ["vgg", "resnet", "mlp"])
@pytest.mark.parametrize("scale", [False, True])
def test_feature_blocks_and_block_gram_equal_the_full_matrix_bit_for_bit(name, scale):
    """The fold clusters from column blocks (never the whole (n, d) matrix, the memory bound); the Layer
    explorer clusters the full matrix. Blocks cut across sources and through multi-row members (VGG's flatten
    keeps the spatial extent) must give exactly the same features, Gram matrix and labels."""
    from engine_models import random_demo

    from foldviz.features import feature_blocks, group_features
    from foldviz.kmeans import _gram, _gram_blocks, gram_cols, kmeans_blocks
    from foldviz.surgery import trace

    model = random_demo(name)
    _, graph = trace(model, torch.randn(2, 1, 8, 8))
    checked = 0
    for g in graph.foldable:
        x = group_features(model, g, scale=scale)
        for cols in (7, 64, x.shape[1]):  # odd widths split member rows and straddle sources
            blocks = list(feature_blocks(model, g, cols, scale=scale))
            assert [b.shape[1] for b in blocks[:-1]] == [cols] * (len(blocks) - 1)
            assert torch.equal(torch.cat(blocks, dim=1), x)
        step = gram_cols(g.channels)
        assert torch.equal(_gram_blocks(feature_blocks(model, g, step, scale=scale), torch.float32),
                           _gram(x, torch.float32))
        k = max(1, g.channels // 2)
        res = kmeans_blocks(feature_blocks(model, g, step, scale=scale), g.channels, k, seed=3, n_init=3)
        full = kmeans(x, k, seed=3, n_init=3, with_centroids=False)
        np.testing.assert_array_equal(res.labels, full.labels)
        assert res.inertia == full.inertia and res.k == k and res.centroids is None
        checked += 1
    assert checked >= 2


def test_kmeans_blocks_refuses_non_finite_features_and_other_algorithms():
    from foldviz.kmeans import kmeans_blocks

    x = torch.randn(6, 5)
    x[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        kmeans_blocks([x[:, :2], x[:, 2:]], 6, 3)
    with pytest.raises(ValueError, match="Gram k-means only"):
        kmeans_blocks([x], 6, 3, algorithm="ward")


def _textbook_hartigan(gram, labels, k, max_sweeps=20):
    """The textbook per-point loop (foldviz <= 0.3), the oracle for the vectorised implementation."""
    gram = np.asarray(gram, dtype=np.float64)
    n, labels, diag = len(labels), labels.copy(), np.diag(gram).copy()
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):
        s = torch.zeros(k, n, dtype=torch.float64).index_add_(0, torch.as_tensor(labels), torch.as_tensor(gram)).numpy()
        sizes = np.bincount(labels, minlength=k).astype(np.float64)
        cc = np.bincount(labels, weights=s[labels, np.arange(n)], minlength=k)
        tol, moved = 1e-12 * max(1.0, float(diag.mean())), 0
        for i in range(n):
            a = labels[i]
            if sizes[a] <= 1:
                continue
            d = diag[i] - 2.0 * s[:, i] / sizes + cc / sizes**2
            add = sizes / (sizes + 1.0) * d
            add[a] = np.inf
            b = int(np.argmin(add))
            if add[b] < sizes[a] / (sizes[a] - 1.0) * d[a] - tol:
                cc[a] += diag[i] - 2.0 * s[a, i]
                cc[b] += diag[i] + 2.0 * s[b, i]
                s[a] -= gram[i]
                s[b] += gram[i]
                sizes[a], sizes[b], labels[i], moved = sizes[a] - 1, sizes[b] + 1, b, moved + 1
        if not moved:
            break
    return labels, sweeps


def _inertia(gram, labels, k):
    gram = np.asarray(gram, dtype=np.float64)
    return float(np.trace(gram) - sum(gram[np.ix_(labels == c, labels == c)].sum() / (labels == c).sum()
                                      for c in range(k)))


@pytest.mark.parametrize("case", ["random", "duplicates", "low_rank"])
@pytest.mark.parametrize("block", [1, 5, 256])
def test_vectorised_hartigan_is_the_textbook_loop_and_never_raises_inertia(case, block):
    """Same labels and sweeps as the per-point loop, bit for bit (float32 Gram given as torch or float64 NumPy),
    whatever the block size; every sweep lowers the inertia or leaves it; no cluster is emptied."""
    from foldviz.kmeans import _gram, _hartigan

    rng = np.random.default_rng(11)
    if case == "random":
        x, k = rng.normal(size=(90, 6)), 30
    elif case == "duplicates":   # ties everywhere: equal rows, zero rows
        live = rng.normal(size=(12, 4))
        x, k = np.concatenate([np.zeros((20, 4)), live, live[:6], live[:3]]), 9
    else:
        x, k = rng.normal(size=(150, 3)) @ rng.normal(size=(3, 20)) + 0.05 * rng.normal(size=(150, 20)), 25
    gram = _gram(torch.as_tensor(x, dtype=torch.float32), torch.float32)
    start = rng.integers(k, size=len(x))
    start[:k] = np.arange(k)                       # every cluster non-empty
    want, want_sweeps = _textbook_hartigan(gram.double().numpy(), start, k)
    for g in (gram, gram.double().numpy()):
        got, sweeps = _hartigan(g, start, k, block=block)
        np.testing.assert_array_equal(got, want)
        assert sweeps == want_sweeps >= 2
    assert (np.bincount(want, minlength=k) > 0).all()
    inertia = [_inertia(gram, start, k)] + [_inertia(gram, _hartigan(gram, start, k, max_sweeps=m)[0], k)
                                           for m in range(1, want_sweeps + 1)]
    assert all(b <= a + 1e-9 * inertia[0] for a, b in zip(inertia, inertia[1:]))
    assert inertia[-1] < inertia[0]
