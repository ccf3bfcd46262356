"""Retrieval metrics for re-identification, from embeddings and labels (plain numpy in, plain dict out).

Each query ranks the gallery by cosine similarity. Gallery images of the query's own group
(encounter) are hidden first: they share the scene, and matching them says nothing about
recognising the animal. Every metric here depends only on the ranks of a query's positives, so a
ranking is reduced to those ranks, and the chance level can draw them directly.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

CHUNK_ELEMENTS = 1 << 22  # query x gallery float32 scores held at once (16 MiB)

_EMPTY = np.zeros(0, dtype=np.int64)


def _codes(*labels: Sequence) -> tuple[list[np.ndarray], int]:
    """Integer codes shared across label arrays: integer compares are far cheaper than object ones."""
    joined = np.concatenate([np.asarray(values, dtype=object).ravel() for values in labels])
    uniques, codes = np.unique(joined, return_inverse=True)
    return np.split(codes, np.cumsum([len(values) for values in labels])[:-1]), len(uniques)


def _members(codes: np.ndarray, n_codes: int) -> list[np.ndarray]:
    """For each code, the ascending indices that carry it."""
    order = np.argsort(codes, kind="stable")
    return np.split(order, np.cumsum(np.bincount(codes, minlength=n_codes))[:-1])


FLANK_SPLITS = ("same_flank", "cross_flank")


@dataclass
class FlankViews:
    """A flank split of the protocol: each query sees only gallery images of its own viewpoint
    (`same_flank`) or only of another named one (`cross_flank`).

    Same-flank scores measure pattern matching. Cross-flank positives show another pattern, so a
    model that scores well there matches what flanks share (body shape, sex, background): the
    split exposes shortcuts the overall figure hides. Images without a named viewpoint ('') take
    part in neither split.
    """
    query_views: Sequence
    gallery_views: Sequence
    split: str

    def __post_init__(self) -> None:
        if self.split not in FLANK_SPLITS:
            raise ValueError(f"flank split {self.split!r}: use one of {', '.join(FLANK_SPLITS)}")
        (self._query, gallery, blank), _ = _codes(_view_names(self.query_views), _view_names(self.gallery_views), [""])
        self._n_gallery = len(gallery)
        # per query viewpoint, the gallery images it may not see: few viewpoints, so computed once each
        self._hidden = {}
        for view in np.unique(self._query):
            other = gallery != view if self.split == "same_flank" else gallery == view
            self._hidden[view] = np.flatnonzero(other | (gallery == blank[0]) | (view == blank[0]))

    def check(self, n_queries: int, n_gallery: int) -> None:
        if len(self._query) != n_queries or self._n_gallery != n_gallery:
            raise ValueError(f"flank views cover {len(self._query)} queries and {self._n_gallery} gallery images; "
                             f"the ranking has {n_queries} and {n_gallery}")

    def hidden(self, query: int) -> np.ndarray:
        return self._hidden[self._query[query]]


def _view_names(values: Sequence) -> np.ndarray:
    """Viewpoints as stripped text, '' for a missing one (None or NaN)."""
    return np.array(["" if v is None or v != v else str(v).strip() for v in values], dtype=object)


class _Protocol:
    """What each query may see and must find, built once from the labels.

    Iterating yields, per query in order, (hidden gallery indices, positive gallery indices):
    hidden are the query's own group and, with `same_set`, the query itself; positives are the
    other gallery images of its identity.
    """

    def __init__(self, query_ids: Sequence, gallery_ids: Sequence, query_groups: Sequence | None,
                 gallery_groups: Sequence | None, same_set: bool, views: FlankViews | None = None):
        if (query_groups is None) != (gallery_groups is None):
            raise ValueError("give query_groups and gallery_groups together, or neither")
        for name, values, n in (("query_groups", query_groups, len(query_ids)),
                                ("gallery_groups", gallery_groups, len(gallery_ids))):
            if values is not None and len(values) != n:
                raise ValueError(f"{name} has {len(values)} entries for {n} images")
        if same_set and len(query_ids) != len(gallery_ids):
            raise ValueError(f"same_set needs the query set to be the gallery: {len(query_ids)} queries, "
                             f"{len(gallery_ids)} gallery images")
        (self.query_codes, gallery_codes), n_ids = _codes(query_ids, gallery_ids)
        self.gallery_size = len(gallery_codes)
        self._by_id = _members(gallery_codes, n_ids)
        self._query_groups: np.ndarray | None = None
        if query_groups is not None:
            (self._query_groups, gallery_group_codes), n_groups = _codes(query_groups, gallery_groups)
            self._by_group = _members(gallery_group_codes, n_groups)
        self._same_set = same_set
        self._views = views
        if views is not None:
            views.check(len(query_ids), len(gallery_ids))

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i, code in enumerate(self.query_codes):
            hidden = self._by_group[self._query_groups[i]] if self._query_groups is not None else _EMPTY
            if self._same_set:
                hidden = np.union1d(hidden, [i])
            if self._views is not None:
                hidden = np.union1d(hidden, self._views.hidden(i))
            positives = self._by_id[code]
            yield hidden, positives[~np.isin(positives, hidden)]


def _ranks(row: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """Ascending 1-based ranks of `positives` when `row` is sorted by descending score.

    Ties go to the lower gallery index, as in a stable sort, so results never depend on sort
    internals. Sorting the values and binary-searching the few positives is several times faster
    than a stable argsort of the whole row.
    """
    ascending = np.sort(row)
    scores = row[positives]
    right = np.searchsorted(ascending, scores, side="right")
    ranks = len(row) - right + 1
    tied = right - np.searchsorted(ascending, scores, side="left") > 1
    for m in np.flatnonzero(tied):
        ranks[m] += np.count_nonzero(row[:positives[m]] == scores[m])
    return np.sort(ranks)


def _summarise(ranks: list[np.ndarray], query_codes: np.ndarray, topk: Sequence[int]) -> dict:
    """The metrics from each query's ascending positive ranks; an empty array is a skipped query."""
    kept = np.array([r.size > 0 for r in ranks], dtype=bool)
    evaluated = [r for r in ranks if r.size]
    if not evaluated:
        return {"mAP": 0.0, "identity_balanced_mAP": 0.0, **{f"top{k}": 0.0 for k in topk}, "mINP": 0.0,
                "queries": 0, "skipped_queries": len(ranks)}
    ap = np.array([np.mean(np.arange(1, r.size + 1) / r) for r in evaluated])
    first = np.array([r[0] for r in evaluated])
    inp = np.array([r.size / r[-1] for r in evaluated])  # positives / rank of the hardest positive
    codes = query_codes[kept]
    present = np.unique(codes)
    per_identity = np.bincount(codes, weights=ap)[present] / np.bincount(codes)[present]
    return {
        "mAP": float(ap.mean()),
        "identity_balanced_mAP": float(per_identity.mean()),
        **{f"top{k}": float((first <= k).mean()) for k in topk},
        "mINP": float(inp.mean()),
        "queries": len(evaluated),
        "skipped_queries": len(ranks) - len(evaluated),
    }


def _embeddings(values: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D (images, dim), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return array


@dataclass
class QueryResults:
    """Per query: ascending positive ranks (empty: no positive visible), best score and whether the
    best-scored gallery image is of the query's identity; plus sampled pair scores for the pair AUC."""
    ranks: list[np.ndarray]
    query_codes: np.ndarray
    top_scores: np.ndarray
    top_correct: np.ndarray
    top_lists: np.ndarray  # (Q, n) best gallery indices, best first
    top_list_scores: np.ndarray
    positive_scores: np.ndarray
    negative_scores: np.ndarray

    @property
    def known(self) -> np.ndarray:
        """Queries whose identity has a visible gallery image (the others are new individuals)."""
        return np.array([r.size > 0 for r in self.ranks], dtype=bool)


ScoreRows = Callable[[int, int], np.ndarray]


def rank_queries(query_emb: np.ndarray, query_ids: Sequence, gallery_emb: np.ndarray, gallery_ids: Sequence,
                 query_groups: Sequence | None = None, gallery_groups: Sequence | None = None,
                 same_set: bool = False, score_rows: ScoreRows | None = None,
                 negatives_per_query: int = 64, seed: int = 0, list_length: int = 5,
                 views: FlankViews | None = None) -> QueryResults:
    """Rank the gallery for each query, chunk by chunk, and keep what every metric needs.

    Scores are cosine similarities, or `score_rows(start, stop)` (higher is better) for queries
    start:stop, which is how re-ranked scores are evaluated without a (Q, G) matrix in memory.
    """
    queries, gallery = _embeddings(query_emb, "query_emb"), _embeddings(gallery_emb, "gallery_emb")
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"embedding shapes do not match: queries {queries.shape}, gallery {gallery.shape}")
    if len(gallery) == 0:
        raise ValueError("the gallery is empty: nothing to rank")
    if len(queries) == 0:
        raise ValueError("there are no queries to rank the gallery for")
    for name, ids, n in (("query_ids", query_ids, len(queries)), ("gallery_ids", gallery_ids, len(gallery))):
        if len(ids) != n:
            raise ValueError(f"{name} has {len(ids)} entries for {n} embeddings")
    protocol = _Protocol(query_ids, gallery_ids, query_groups, gallery_groups, same_set, views)
    gallery_codes = _codes(query_ids, gallery_ids)[0][1]
    rng = np.random.default_rng(seed)
    sets = iter(protocol)
    ranks, top_lists, top_list_scores, pos_scores, neg_scores = [], [], [], [], []
    list_length = min(list_length, len(gallery))
    chunk = max(1, CHUNK_ELEMENTS // len(gallery))
    for start in range(0, len(queries), chunk):
        stop = min(start + chunk, len(queries))
        rows = score_rows(start, stop) if score_rows else queries[start:stop] @ gallery.T
        # a copy: hiding writes -inf, and score_rows may hand out views of a matrix it keeps
        for row, (hidden, positives) in zip(np.array(rows, dtype=np.float32), sets):
            row[hidden] = -np.inf  # below every real score: a hidden image never outranks a positive
            ranks.append(_ranks(row, positives) if positives.size else _EMPTY)
            best = np.argpartition(-row, list_length - 1)[:list_length]
            best = best[np.lexsort((best, -row[best]))]  # best first, ties to the lower index
            top_lists.append(best)
            top_list_scores.append(row[best])
            pos_scores.append(row[positives])
            negatives = np.flatnonzero(np.isfinite(row))
            negatives = negatives[gallery_codes[negatives] != protocol.query_codes[len(ranks) - 1]]
            if negatives.size > negatives_per_query:
                negatives = rng.choice(negatives, negatives_per_query, replace=False)
            neg_scores.append(row[negatives])
    top_lists, top_list_scores = np.array(top_lists, dtype=np.int64), np.array(top_list_scores, dtype=np.float64)
    return QueryResults(ranks, protocol.query_codes, top_list_scores[:, 0],
                        gallery_codes[top_lists[:, 0]] == protocol.query_codes, top_lists, top_list_scores,
                        np.concatenate(pos_scores) if pos_scores else np.zeros(0),
                        np.concatenate(neg_scores) if neg_scores else np.zeros(0))


def pair_auc(positive_scores: np.ndarray, negative_scores: np.ndarray) -> float:
    """Probability that a same-identity pair outscores a different-identity pair (ties count half)."""
    if positive_scores.size == 0 or negative_scores.size == 0:
        return float("nan")
    scores = np.concatenate([positive_scores, negative_scores])
    ranks = rankdata(scores)
    n_pos, n_neg = positive_scores.size, negative_scores.size
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def retrieval_metrics(query_emb: np.ndarray, query_ids: Sequence, gallery_emb: np.ndarray, gallery_ids: Sequence,
                      query_groups: Sequence | None = None, gallery_groups: Sequence | None = None,
                      topk: Sequence[int] = (1, 5, 10), same_set: bool = False,
                      score_rows: ScoreRows | None = None, query_views: Sequence | None = None,
                      gallery_views: Sequence | None = None) -> dict:
    """mAP, identity-balanced mAP, CMC top-k, mINP and pair AUC of ranking the gallery for each query.

    Embeddings are L2-normalised, so the dot product is the cosine similarity. A query never sees
    gallery images of its own group; with `same_set` (the query set is the gallery) it never sees
    itself either. Queries left without a positive are skipped and counted in `skipped_queries`.
    `identity_balanced_mAP` averages each identity's mean query AP, so common individuals do not
    dominate. `mINP` (Ye et al. 2021) averages positives / rank of the last positive. `pair_auc`
    compares every same-identity pair with a sample of different-identity pairs. With viewpoints
    (`query_views`, `gallery_views`), `same_flank` and `cross_flank` hold the same metrics with each
    query seeing only its own flank, or only the other (see `FlankViews`).
    """
    results = rank_queries(query_emb, query_ids, gallery_emb, gallery_ids, query_groups, gallery_groups,
                           same_set, score_rows)
    metrics = {**_summarise(results.ranks, results.query_codes, topk),
               "pair_auc": pair_auc(results.positive_scores, results.negative_scores)}
    if (query_views is None) != (gallery_views is None):
        raise ValueError("give query_views and gallery_views together, or neither")
    if query_views is not None:
        for split in FLANK_SPLITS:
            flank = rank_queries(query_emb, query_ids, gallery_emb, gallery_ids, query_groups, gallery_groups,
                                 same_set, score_rows, views=FlankViews(query_views, gallery_views, split))
            metrics[split] = _summarise(flank.ranks, flank.query_codes, topk)
    return metrics


def chance_metrics(query_ids: Sequence, gallery_ids: Sequence, query_groups: Sequence | None = None,
                   gallery_groups: Sequence | None = None, same_set: bool = False, seed: int = 0,
                   repeats: int = 5, topk: Sequence[int] = (1, 5, 10), views: FlankViews | None = None) -> dict:
    """The metrics of random scores under the same protocol, averaged over `repeats` draws.

    Random scores order a query's visible gallery uniformly at random, so its positives land on a
    uniformly random set of ranks: drawing those ranks directly gives the same distribution without
    scoring any image pair.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    protocol = _Protocol(query_ids, gallery_ids, query_groups, gallery_groups, same_set, views)
    visible = [(protocol.gallery_size - hidden.size, positives.size) for hidden, positives in protocol]
    rng = np.random.default_rng(seed)
    runs = [_summarise([np.sort(rng.choice(n, size=p, replace=False, shuffle=False)) + 1 for n, p in visible],
                       protocol.query_codes, topk)
            for _ in range(repeats)]
    # the query counts are the same in every draw; only the scores vary
    return {key: value if isinstance(value, int) else float(np.mean([run[key] for run in runs]))
            for key, value in runs[0].items()}
