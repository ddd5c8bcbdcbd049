"""Deprecated alias (0.2): clustering now lives in :mod:`foldviz.kmeans` and features in :mod:`foldviz.features`.
This module goes away in the next release."""
from .features import cosine_similarity, group_features, redundancy, robust_scale  # noqa: F401
from .kmeans import ALGORITHMS, ClusterResult, cluster_order, inertia_curve, k_for_ratio, kmeans  # noqa: F401
