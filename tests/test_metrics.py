import numpy as np
import pytest

from reid.evaluation import metrics
from reid.evaluation.metrics import chance_metrics, retrieval_metrics


def _unit(*angles):
    return np.array([[np.cos(a), np.sin(a)] for a in angles], dtype=np.float32)


def test_hand_computed_ap_cmc_minp():
    # gallery ranked by similarity to the query at angle 0: g0, g1, g2, g3; positives at ranks 1 and 3
    q, g = _unit(0.0), _unit(0.1, 0.2, 0.3, 0.4)
    m = retrieval_metrics(q, ["a"], g, ["a", "b", "a", "b"])
    assert m["mAP"] == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert m["top1"] == 1.0 and m["mINP"] == pytest.approx(2 / 3)
    # positives at ranks 2 and 4
    m = retrieval_metrics(q, ["a"], g, ["b", "a", "b", "a"])
    assert m["mAP"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert m["top1"] == 0.0 and m["top5"] == 1.0 and m["mINP"] == pytest.approx(2 / 4)


def test_identity_balanced_differs_from_image_averaged():
    g = _unit(0.0, 1.5)
    q = _unit(0.01, 0.02, 0.03, 1.49)  # three 'a' queries right, one 'b' query right
    ids_g = ["a", "b"]
    m = retrieval_metrics(q, ["a", "a", "a", "a"], g, ids_g)  # 3 right (AP 1), 1 wrong (AP 1/2)
    assert m["mAP"] == pytest.approx((3 + 0.5) / 4)
    m2 = retrieval_metrics(q, ["a", "a", "a", "b"], g, ids_g)
    assert m2["identity_balanced_mAP"] == pytest.approx(1.0)
    unbalanced = retrieval_metrics(q, ["a", "a", "a", "b"], g, ["b", "a"])
    assert unbalanced["mAP"] == pytest.approx((3 * 0.5 + 0.5) / 4)
    assert unbalanced["identity_balanced_mAP"] == pytest.approx((0.5 + 0.5) / 2)


def test_own_encounter_never_counts():
    q, g = _unit(0.0), _unit(0.0, 0.5, 0.6)
    # the identical same-encounter photo would be a perfect match; it is removed
    m = retrieval_metrics(q, ["a"], g, ["a", "b", "a"], query_groups=["e1"], gallery_groups=["e1", "e2", "e3"])
    assert m["top1"] == 0.0 and m["mAP"] == pytest.approx(1 / 2)
    # with only same-encounter positives, the query is skipped
    m = retrieval_metrics(q, ["a"], g, ["a", "b", "b"], query_groups=["e1"], gallery_groups=["e1", "e2", "e3"])
    assert m["queries"] == 0 and m["skipped_queries"] == 1


def test_same_set_excludes_self():
    emb = _unit(0.0, 0.1, 1.5)
    m = retrieval_metrics(emb, ["a", "a", "b"], emb, ["a", "a", "b"], same_set=True)
    assert m["queries"] == 2 and m["mAP"] == 1.0 and m["skipped_queries"] == 1


def test_chunked_equals_unchunked(monkeypatch):
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((60, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ids = rng.integers(0, 6, 60)
    whole = retrieval_metrics(emb, ids, emb, ids, same_set=True)
    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", 7 * 60)
    assert retrieval_metrics(emb, ids, emb, ids, same_set=True) == whole


def test_chance_is_near_the_positive_rate_and_perfect_is_one():
    ids = np.repeat(np.arange(20), 5)
    chance = chance_metrics(ids, ids, same_set=True, repeats=10)
    assert chance["mAP"] < 0.15 and chance["top1"] == pytest.approx(4 / 99, abs=0.04)
    perfect = np.eye(20, dtype=np.float32)[ids]
    assert retrieval_metrics(perfect, ids, perfect, ids, same_set=True)["mAP"] == 1.0


def test_mismatched_dimensions():
    with pytest.raises(ValueError, match="do not match"):
        retrieval_metrics(np.zeros((1, 4)), ["a"], np.zeros((2, 3)), ["a", "b"])
