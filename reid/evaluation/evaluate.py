"""Evaluate embeddings as retrieval: optional re-ranking, closed-set metrics, open-set metrics.

Data flows as plain arrays and tables: the caller embeds (through the cache) and passes the query
and gallery embeddings with their tables; this module ranks, measures and picks report examples.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from reid.data.splits import encounter_ids
from reid.evaluation.metrics import QueryResults, _summarise, pair_auc, rank_queries
from reid.evaluation.open_set import open_set_metrics
from reid.rerank import KReciprocal, alpha_query_expansion, database_augmentation


@dataclass
class RerankOptions:
    """Re-ranking applied before scoring: database-side augmentation, alpha query expansion, k-reciprocal."""
    dba: int = 0
    qe: int = 0
    qe_alpha: float = 3.0
    k_reciprocal: bool = False
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3

    def describe(self) -> str:
        parts = [f"DBA n={self.dba}" if self.dba else "", f"alpha-QE n={self.qe} alpha={self.qe_alpha}" if self.qe else "",
                 f"k-reciprocal k1={self.k1} k2={self.k2} lambda={self.lambda_value}" if self.k_reciprocal else ""]
        return ", ".join(p for p in parts if p) or "none"


def rerank_scores(query_emb: np.ndarray, gallery_emb: np.ndarray, options: RerankOptions, same_set: bool = False):
    """(query embeddings, gallery embeddings, score_rows or None) after the re-ranking steps.

    With `same_set` the queries are the gallery images themselves: augmenting the gallery augments
    them too, and query expansion does not count a query as its own neighbour.
    """
    if options.dba:
        gallery_emb = database_augmentation(gallery_emb, n=options.dba)
        if same_set:
            query_emb = gallery_emb
    if options.qe and same_set:
        # αQE of a gallery image over the other gallery images is αDBA's formula (itself excluded)
        query_emb = database_augmentation(query_emb, n=options.qe, alpha=options.qe_alpha)
    elif options.qe:
        query_emb = alpha_query_expansion(query_emb, gallery_emb, n=options.qe, alpha=options.qe_alpha)
    if not options.k_reciprocal:
        return query_emb, gallery_emb, None
    joint_once = same_set and not options.qe  # the queries still are the gallery vectors themselves
    reranker = KReciprocal(query_emb, None if joint_once else gallery_emb, k1=options.k1, k2=options.k2,
                           lambda_value=options.lambda_value)
    return query_emb, gallery_emb, lambda start, stop: -reranker.distances(start, stop)


def best_balanced_threshold(results: QueryResults) -> float:
    """The best-score threshold that maximises the mean of known and new accuracy on these queries."""
    candidates = np.unique(results.top_scores)
    known, new = results.known, ~results.known
    right_known = np.sort(results.top_scores[known & results.top_correct])
    new_scores = np.sort(results.top_scores[new])
    # at threshold t: known right = correct best match scoring >= t; new right = new scoring < t
    known_accuracy = (len(right_known) - np.searchsorted(right_known, candidates)) / max(known.sum(), 1)
    new_accuracy = np.searchsorted(new_scores, candidates) / max(new.sum(), 1)
    weights = np.array([known.any(), new.any()], dtype=float)
    balanced = (weights[0] * known_accuracy + weights[1] * new_accuracy) / max(weights.sum(), 1)
    return float(candidates[np.argmax(balanced)]) if candidates.size else 0.0


def evaluate(query_emb: np.ndarray, query_table: pd.DataFrame, gallery_emb: np.ndarray,
             gallery_table: pd.DataFrame, same_set: bool, options: RerankOptions | None = None,
             thresholds: dict | None = None, topk=(1, 5, 10)) -> tuple[dict, QueryResults]:
    """Closed-set and open-set metrics; a query never scores images of its own encounter."""
    options = options or RerankOptions()
    q, g, score_rows = rerank_scores(query_emb, gallery_emb, options, same_set)
    groups_q, groups_g = encounter_ids(query_table), encounter_ids(gallery_table)
    if not same_set:  # rows without an encounter are their own, and row numbers of two tables differ
        groups_q = np.where(query_table.get("encounter", pd.Series([""] * len(query_table))).fillna("").eq("").to_numpy(),
                            "query" + groups_q.astype(str), groups_q)
    results = rank_queries(q, query_table["identity"].tolist(), g, gallery_table["identity"].tolist(),
                           groups_q, groups_g, same_set=same_set, score_rows=score_rows)
    metrics = {**_summarise(results.ranks, results.query_codes, topk),
               "pair_auc": pair_auc(results.positive_scores, results.negative_scores),
               "rerank": asdict(options)}
    if thresholds:
        threshold, source = thresholds["match_threshold"], "calibrated (stored in the checkpoint)"
    else:
        threshold, source = best_balanced_threshold(results), "best on this set (not calibrated: run reid calibrate)"
    metrics["open_set"] = {**open_set_metrics(results.top_scores, results.top_correct, results.known, threshold),
                           "threshold_source": source}
    return metrics, results
