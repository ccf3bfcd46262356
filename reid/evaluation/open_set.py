"""Open set: is the best match a known individual, or someone never seen before?

A query whose identity has no visible gallery image is *new*. Everything here is decided by the
best gallery score of each query: at or above the match threshold the answer is the best match,
below the new threshold it is a new individual, in between it is uncertain.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def open_set_metrics(top_scores: np.ndarray, top_correct: np.ndarray, known: np.ndarray, threshold: float) -> dict:
    """AUROC of known versus new by best score, and accuracy at `threshold` on each side.

    A known query is right when its best score reaches the threshold and names its identity; a new
    query is right when its best score stays below the threshold.
    """
    top_scores, top_correct, known = np.asarray(top_scores), np.asarray(top_correct, bool), np.asarray(known, bool)
    accepted = top_scores >= threshold
    both = known.any() and (~known).any()
    return {
        "known_queries": int(known.sum()),
        "new_queries": int((~known).sum()),
        "auroc_known_vs_new": float(roc_auc_score(known, top_scores)) if both else float("nan"),
        "threshold": float(threshold),
        "known_accuracy": float((accepted & top_correct)[known].mean()) if known.any() else float("nan"),
        "new_accuracy": float((~accepted)[~known].mean()) if (~known).any() else float("nan"),
    }


def calibrate_thresholds(top_scores: np.ndarray, top_correct: np.ndarray, known: np.ndarray,
                         precision: float = 0.95) -> dict:
    """The match and new-individual thresholds for a target precision.

    match: the lowest score at which "this is the best-matching individual" is right at least
    `precision` of the time (over every query scoring at least that much). new: the highest score
    below which "this is a new individual" is right at least `precision` of the time. Between them
    the answer is uncertain; if they cross, both become their midpoint.
    """
    if not 0 < precision < 1:
        raise ValueError(f"precision must be between 0 and 1, got {precision}")
    scores = np.asarray(top_scores, dtype=np.float64)
    right_match = np.asarray(top_correct, bool) & np.asarray(known, bool)
    is_new = ~np.asarray(known, bool)
    if scores.size == 0:
        raise ValueError("no queries to calibrate on")
    order = np.argsort(-scores, kind="stable")
    # precision of accepting the top-n scores as matches, for every n
    match_precision = np.cumsum(right_match[order]) / np.arange(1, scores.size + 1)
    ok = np.flatnonzero(match_precision >= precision)
    match = float(scores[order][ok[-1]]) if ok.size else float(scores.max() + 1e-6)
    ascending = order[::-1]
    new_precision = np.cumsum(is_new[ascending]) / np.arange(1, scores.size + 1)
    ok = np.flatnonzero(new_precision >= precision)
    # "below new" is strict: the threshold sits just above the last score that keeps the precision
    new = float(np.nextafter(scores[ascending][ok[-1]], np.inf)) if ok.size else float(scores.min())
    if new > match:
        new = match = (new + match) / 2
    return {"match_threshold": match, "new_threshold": new, "precision": precision,
            "queries": int(scores.size), "new_queries": int(is_new.sum())}
