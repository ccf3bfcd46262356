"""Query expansion and database augmentation (Radenović et al., "Fine-tuning CNN Image Retrieval
with No Human Annotation", TPAMI 2018; average QE: Chum et al. 2007, DBA: Arandjelović and
Zisserman 2012).

Each moves an embedding toward its nearest gallery neighbours, weighted by similarity^alpha, and
re-normalises it: matches the query shares with its neighbours gain, isolated false matches lose.
Neighbours come from an exact FAISS inner-product search run in chunks of queries, so no dense
query x gallery matrix exists beyond FAISS's own block.
"""
from __future__ import annotations

import numpy as np

from reid.rerank.kreciprocal import (check_embeddings, check_query_gallery, flat_index,
                                     search_inner_product)

GATHER_ELEMENTS = 1 << 22  # float32 elements of gathered neighbour vectors held at once (16 MiB)


def _check_count(n: int, gallery_size: int) -> int:
    """n clipped to the gallery size: a gallery smaller than n simply contributes all of itself."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return min(n, gallery_size)


def _expanded(vectors: np.ndarray, gallery: np.ndarray, similarities: np.ndarray, neighbours: np.ndarray,
              alpha: float) -> np.ndarray:
    """normalise(v + sum_k max(sim_k, 0)^alpha · g_k) for each row. 0^0 is 1, so alpha = 0 gives
    every neighbour weight 1 (the average, up to the normalisation)."""
    weights = np.power(np.clip(similarities, 0.0, None), alpha)
    expanded = vectors.astype(np.float32, copy=True)
    rows = max(1, GATHER_ELEMENTS // max(1, neighbours.shape[1] * gallery.shape[1]))
    for start in range(0, len(vectors), rows):
        part = slice(start, start + rows)
        expanded[part] += np.einsum("qn,qnd->qd", weights[part], gallery[neighbours[part]])
    expanded /= np.linalg.norm(expanded, axis=1, keepdims=True)
    return expanded


def alpha_query_expansion(query_emb: np.ndarray, gallery_emb: np.ndarray, n: int = 10,
                          alpha: float = 3.0) -> np.ndarray:
    """αQE: q' = normalise(q + sum over q's top-n gallery items of max(sim, 0)^alpha · g), float32 (Q, dim)."""
    query, gallery = check_query_gallery(query_emb, gallery_emb)
    similarities, neighbours = search_inner_product(flat_index(gallery), query, _check_count(n, len(gallery)))
    return _expanded(query, gallery, similarities, neighbours, alpha)


def average_query_expansion(query_emb: np.ndarray, gallery_emb: np.ndarray, n: int = 5) -> np.ndarray:
    """Average QE: q' = normalise(mean of q and its top-n gallery items); αQE with alpha = 0."""
    return alpha_query_expansion(query_emb, gallery_emb, n=n, alpha=0.0)


def database_augmentation(gallery_emb: np.ndarray, n: int = 5, alpha: float = 3.0) -> np.ndarray:
    """αDBA: each gallery vector replaced by normalise(g + sum over its top-n other gallery items of
    max(sim, 0)^alpha · g'), float32 (G, dim); alpha = 0 is plain average DBA.

    The item itself is dropped from its own neighbour list (it already has weight 1); when an exact
    duplicate outranks it, the list's last entry is dropped instead, so each keeps n neighbours.
    """
    gallery = check_embeddings("gallery_emb", gallery_emb)
    if len(gallery) < 2:
        raise ValueError(f"database augmentation needs at least 2 gallery vectors, got {len(gallery)}")
    n = _check_count(n, len(gallery) - 1)
    similarities, neighbours = search_inner_product(flat_index(gallery), gallery, n + 1)
    others = neighbours != np.arange(len(gallery))[:, None]
    others[others.all(axis=1), -1] = False
    similarities, neighbours = similarities[others].reshape(-1, n), neighbours[others].reshape(-1, n)
    return _expanded(gallery, gallery, similarities, neighbours, alpha)


def expand_with_neighbours(query: np.ndarray, neighbours: np.ndarray, similarities, alpha: float = 3.0) -> np.ndarray:
    """αQE of one query from its nearest gallery vectors already found (a service's search):
    normalise(q + sum of max(sim, 0)^alpha · g), float32 (dim,)."""
    neighbours = np.asarray(neighbours, dtype=np.float32)
    similarities = np.asarray(similarities, dtype=np.float32)[None, :]
    return _expanded(query[None, :], neighbours, similarities, np.arange(len(neighbours))[None, :], alpha)[0]
