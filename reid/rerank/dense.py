"""Dense reference of k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification
with k-reciprocal Encoding", CVPR 2017), for tests and benchmarks only.

It follows torchreid's `re_ranking` step by step on the full (Q+G)^2 matrices of the joint
query+gallery set, so it is easy to check by eye and needs O((Q+G)^2) memory and time: keep it to
a few thousand embeddings. `reid.rerank.kreciprocal.KReciprocal` must equal it. One deliberate
difference from torchreid: the distance is d = 1 - cos (float64, from L2-normalised embeddings),
not squared Euclidean divided by each column's maximum, which depends on the whole set and cannot
be computed online.
"""
from __future__ import annotations

import numpy as np

from reid.rerank.kreciprocal import check_parameters, check_query_gallery, half_k


def _k_reciprocal_neighbours(initial_rank: np.ndarray, i: int, k: int) -> np.ndarray:
    """R(i, k): the members of i's top-(k+1) list whose own top-(k+1) list holds i."""
    forward = initial_rank[i, : k + 1]
    backward = initial_rank[forward, : k + 1]
    return forward[np.where(backward == i)[0]]


def _encoding(distance: np.ndarray, initial_rank: np.ndarray, k1: int) -> np.ndarray:
    """V: each row's expanded k-reciprocal set weighted by exp(-d), normalised to sum 1."""
    v = np.zeros_like(distance)
    for i in range(len(distance)):
        reciprocal = _k_reciprocal_neighbours(initial_rank, i, k1)
        expansion = reciprocal
        for candidate in reciprocal:
            candidate_reciprocal = _k_reciprocal_neighbours(initial_rank, candidate, half_k(k1))
            if len(np.intersect1d(candidate_reciprocal, reciprocal)) > 2.0 / 3 * len(candidate_reciprocal):
                expansion = np.append(expansion, candidate_reciprocal)
        expansion = np.unique(expansion)
        weight = np.exp(-distance[i, expansion])
        v[i, expansion] = weight / np.sum(weight)
    return v


def _jaccard(v_query: np.ndarray, v_gallery: np.ndarray) -> np.ndarray:
    """1 - sum(min)/sum(max) for every (query, gallery) pair.

    min(a, b) is 0 wherever a is, so sum(min) needs only the query row's non-zero columns; and
    min + max = a + b gives sum(max) without another pass over all columns.
    """
    gallery_mass = v_gallery.sum(axis=1)
    jaccard = np.empty((len(v_query), len(v_gallery)))
    for i, row in enumerate(v_query):
        columns = np.flatnonzero(row)
        shared = np.minimum(row[columns], v_gallery[:, columns]).sum(axis=1)
        jaccard[i] = 1.0 - shared / (row.sum() + gallery_mass - shared)
    return jaccard


def dense_k_reciprocal(query_emb: np.ndarray, gallery_emb: np.ndarray, k1: int = 20, k2: int = 6,
                       lambda_value: float = 0.3) -> np.ndarray:
    """Re-ranked (Q, G) float64 distances: (1 - lambda)·jaccard + lambda·(1 - cos)."""
    query, gallery = check_query_gallery(query_emb, gallery_emb)
    check_parameters(k1, k2, lambda_value)
    embeddings = np.concatenate([query, gallery]).astype(np.float64)
    distance = 1.0 - embeddings @ embeddings.T
    initial_rank = np.argsort(distance, axis=1, kind="stable")
    v = _encoding(distance, initial_rank, k1)
    if k2 != 1:  # local query expansion; torchreid skips it for k2 == 1
        v = np.stack([v[initial_rank[i, :k2]].mean(axis=0) for i in range(len(v))])
    n_query = len(query)
    jaccard = _jaccard(v[:n_query], v[n_query:])
    return jaccard * (1 - lambda_value) + distance[:n_query, n_query:] * lambda_value
