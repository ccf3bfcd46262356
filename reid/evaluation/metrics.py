"""Retrieval metrics for re-identification, from embeddings and labels (plain numpy).

Each query ranks the gallery by cosine similarity. Gallery images of the query's own group
(encounter) are removed first: they share the scene, and matching them says nothing about
recognising the animal.
"""
from __future__ import annotations

import numpy as np

CHUNK_ELEMENTS = 1 << 22  # query x gallery scores held at once


def _as_array(values, n: int) -> np.ndarray:
    return np.asarray(values, dtype=object) if values is not None else np.arange(n).astype(str).astype(object)


def retrieval_metrics(query_emb: np.ndarray, query_ids, gallery_emb: np.ndarray, gallery_ids,
                      query_groups=None, gallery_groups=None, topk: tuple[int, ...] = (1, 5, 10),
                      same_set: bool = False) -> dict:
    """mAP, identity-balanced mAP, CMC top-k and mINP.

    `same_set`: the query set is the gallery, so each query is excluded from its own ranking
    even without groups. Queries with no positive left in the gallery are skipped and counted.
    """
    query_emb, gallery_emb = np.asarray(query_emb, np.float32), np.asarray(gallery_emb, np.float32)
    if query_emb.ndim != 2 or gallery_emb.ndim != 2 or query_emb.shape[1] != gallery_emb.shape[1]:
        raise ValueError(f"embedding shapes do not match: queries {query_emb.shape}, gallery {gallery_emb.shape}")
    query_ids, gallery_ids = np.asarray(query_ids, dtype=object), np.asarray(gallery_ids, dtype=object)
    qg = np.asarray(query_groups, dtype=object) if query_groups is not None else None
    gg = np.asarray(gallery_groups, dtype=object) if gallery_groups is not None else None
    n_gallery = len(gallery_ids)
    chunk = max(1, CHUNK_ELEMENTS // max(n_gallery, 1))
    ap, first_hit, inp, kept = [], [], [], []
    for start in range(0, len(query_ids), chunk):
        rows = slice(start, start + chunk)
        scores = query_emb[rows] @ gallery_emb.T
        excluded = np.zeros(scores.shape, dtype=bool)
        if qg is not None and gg is not None:
            excluded |= qg[rows, None] == gg[None, :]
        if same_set:
            idx = np.arange(start, start + scores.shape[0])
            excluded[np.arange(len(idx)), idx] = True
        scores[excluded] = -np.inf  # sorts after every real score
        order = np.argsort(-scores, axis=1, kind="stable")
        hits = (gallery_ids[order] == query_ids[rows, None]) & ~np.take_along_axis(excluded, order, axis=1)
        positives = hits.sum(axis=1)
        ranks = np.arange(1, n_gallery + 1)
        precision = np.cumsum(hits, axis=1) / ranks
        with np.errstate(invalid="ignore", divide="ignore"):
            ap.append((precision * hits).sum(axis=1) / positives)
            last = n_gallery - np.argmax(hits[:, ::-1], axis=1)
            inp.append(positives / last)
        first_hit.append(np.argmax(hits, axis=1) + 1)
        kept.append(positives > 0)
    kept_all = np.concatenate(kept) if kept else np.zeros(0, bool)
    ap_all = np.concatenate(ap)[kept_all] if kept else np.zeros(0)
    first = np.concatenate(first_hit)[kept_all] if kept else np.zeros(0)
    inp_all = np.concatenate(inp)[kept_all] if kept else np.zeros(0)
    ids = query_ids[kept_all]
    result = {
        "mAP": float(ap_all.mean()) if len(ap_all) else 0.0,
        "identity_balanced_mAP": float(np.mean([ap_all[ids == i].mean() for i in np.unique(ids)])) if len(ids) else 0.0,
        **{f"top{k}": float((first <= k).mean()) if len(first) else 0.0 for k in topk},
        "mINP": float(inp_all.mean()) if len(inp_all) else 0.0,
        "queries": int(kept_all.sum()),
        "skipped_queries": int((~kept_all).sum()),
    }
    return result


def chance_metrics(query_ids, gallery_ids, query_groups=None, gallery_groups=None, same_set: bool = False,
                   seed: int = 0, repeats: int = 5, topk: tuple[int, ...] = (1, 5, 10)) -> dict:
    """The metrics of random embeddings under the same protocol: the floor to compare against."""
    rng = np.random.default_rng(seed)
    runs = []
    for _ in range(repeats):
        # in 256 dimensions random unit vectors give practically random rankings
        q = rng.standard_normal((len(query_ids), 256)).astype(np.float32)
        g = q if same_set else rng.standard_normal((len(gallery_ids), 256)).astype(np.float32)
        runs.append(retrieval_metrics(q, query_ids, g, gallery_ids, query_groups, gallery_groups, topk, same_set))
    return {key: float(np.mean([r[key] for r in runs])) for key in runs[0]}
