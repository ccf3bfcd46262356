"""Open-set metrics, threshold calibration and pair AUC on hand-computed cases."""
from __future__ import annotations

import numpy as np
import pytest

from reid.evaluation.calibration import oof_thresholds
from reid.evaluation.metrics import pair_auc, rank_queries
from reid.evaluation.open_set import calibrate_thresholds, open_set_metrics
from reid.identify.decision import decide
from tests.conftest import clustered_embeddings


def test_open_set_metrics_by_hand():
    scores = np.array([0.9, 0.8, 0.4, 0.7, 0.3])
    correct = np.array([True, False, True, False, False])
    known = np.array([True, True, True, False, False])
    m = open_set_metrics(scores, correct, known, threshold=0.6)
    # known: 0.9 right & accepted; 0.8 accepted but wrong; 0.4 rejected -> 1/3
    assert m["known_accuracy"] == pytest.approx(1 / 3)
    # new: 0.7 accepted (wrong), 0.3 rejected (right) -> 1/2
    assert m["new_accuracy"] == pytest.approx(0.5)
    # AUROC known vs new: known {0.9, 0.8, 0.4} vs new {0.7, 0.3}: 5 of 6 pairs ordered
    assert m["auroc_known_vs_new"] == pytest.approx(5 / 6)


def test_calibrated_thresholds_reach_the_precision():
    scores = np.array([0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    correct = np.array([1, 1, 1, 0, 1, 0, 0, 0, 0, 0], bool)
    known = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], bool)
    t = calibrate_thresholds(scores, correct, known, precision=0.75)
    # accepting >= 0.7: 4 right of 5 = 0.8; >= 0.6: 4 of 6 < 0.75 -> match threshold 0.7
    assert t["match_threshold"] == pytest.approx(0.7)
    # "new" below t: from the bottom, 0.2..0.5 are all new (4/4), 0.6 makes 4/5 = 0.8, 0.7 makes 4/6
    assert 0.6 < t["new_threshold"] <= 0.6 + 1e-6
    assert [decide(s, t) for s in (0.75, 0.65, 0.55)] == ["match", "uncertain", "new"]


def test_crossing_thresholds_collapse_to_one():
    # at precision 0.5 every score is a fine match threshold and a fine new threshold: they cross
    scores, known = np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0], bool)
    t = calibrate_thresholds(scores, known, known, 0.5)
    assert t["match_threshold"] == t["new_threshold"] == pytest.approx((0.6 + 0.9) / 2)


def test_pair_auc_by_hand():
    assert pair_auc(np.array([0.9, 0.5]), np.array([0.6, 0.1])) == pytest.approx(3 / 4)
    assert pair_auc(np.array([0.5]), np.array([0.5])) == pytest.approx(0.5)


def test_queries_without_a_visible_match_are_new():
    emb = np.eye(4, dtype=np.float32)
    results = rank_queries(emb, ["a", "a", "b", "c"], emb, ["a", "a", "b", "c"],
                           ["e1", "e2", "e3", "e4"], ["e1", "e2", "e3", "e4"], same_set=True)
    assert results.known.tolist() == [True, True, False, False]


def test_oof_calibration_separates_known_from_new():
    emb, ids = clustered_embeddings(30, 4, noise=0.3)
    t = oof_thresholds(emb, ids.astype(str), np.arange(120).astype(str), precision=0.9)
    assert t["new_queries"] == 120 and t["match_threshold"] >= t["new_threshold"]
    known = rank_queries(emb, ids, emb, ids, np.arange(120), np.arange(120), same_set=True)
    accepted = known.top_scores >= t["match_threshold"]
    assert known.top_correct[accepted].mean() >= 0.9
