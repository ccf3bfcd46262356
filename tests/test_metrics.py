import numpy as np
import pytest

from reid.evaluation import metrics
from reid.evaluation.metrics import chance_metrics, retrieval_metrics


def _unit(*angles: float) -> np.ndarray:
    """2-D unit embeddings: the smaller the angle gap, the higher the cosine similarity."""
    return np.array([[np.cos(a), np.sin(a)] for a in angles], dtype=np.float32)


def _random_unit(n: int, dim: int, seed: int) -> np.ndarray:
    emb = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def test_hand_computed_ap_cmc_minp():
    # the query at angle 0 ranks the gallery g0, g1, g2, g3
    q, g = _unit(0.0), _unit(0.1, 0.2, 0.3, 0.4)
    m = retrieval_metrics(q, ["a"], g, ["a", "b", "a", "b"])  # positives at ranks 1 and 3
    assert m["mAP"] == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert (m["top1"], m["top5"], m["top10"]) == (1.0, 1.0, 1.0)
    assert m["mINP"] == pytest.approx(2 / 3)
    m = retrieval_metrics(q, ["a"], g, ["b", "a", "b", "a"])  # positives at ranks 2 and 4
    assert m["mAP"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert m["top1"] == 0.0 and m["top5"] == 1.0 and m["mINP"] == pytest.approx(2 / 4)
    assert m["queries"] == 1 and m["skipped_queries"] == 0


def test_topk_counts_the_first_correct_match():
    q, g = _unit(0.0, 0.0), _unit(*np.linspace(0.1, 1.2, 12))
    ids_g = ["x"] * 12
    ids_g[2], ids_g[6] = "a", "b"  # query 'a' first matches at rank 3, query 'b' at rank 7
    m = retrieval_metrics(q, ["a", "b"], g, ids_g, topk=(1, 3, 5, 10))
    assert (m["top1"], m["top3"], m["top5"], m["top10"]) == (0.0, 0.5, 0.5, 1.0)
    assert m["mINP"] == pytest.approx((1 / 3 + 1 / 7) / 2)


def test_identity_balanced_differs_from_image_averaged():
    g = _unit(0.0, 1.5)
    q = _unit(0.01, 0.02, 0.03, 0.04)  # every query ranks g0 ('a') first
    m = retrieval_metrics(q, ["a", "a", "a", "b"], g, ["a", "b"])  # three APs of 1, one of 1/2
    assert m["mAP"] == pytest.approx((3 * 1 + 0.5) / 4)
    assert m["identity_balanced_mAP"] == pytest.approx((1 + 0.5) / 2)  # identity a: 1, identity b: 1/2


def test_own_encounter_never_counts():
    q, g = _unit(0.0), _unit(0.0, 0.5, 0.6)
    # the identical photo from the query's own encounter would be a perfect match; it is hidden
    m = retrieval_metrics(q, ["a"], g, ["a", "b", "a"], query_groups=["e1"], gallery_groups=["e1", "e2", "e3"])
    assert m["top1"] == 0.0 and m["mAP"] == pytest.approx(1 / 2)
    # with only same-encounter positives, the query is skipped
    m = retrieval_metrics(q, ["a"], g, ["a", "b", "b"], query_groups=["e1"], gallery_groups=["e1", "e2", "e3"])
    assert m["queries"] == 0 and m["skipped_queries"] == 1


def test_same_set_excludes_each_query_itself():
    emb = _unit(0.0, 0.1, 1.5)
    m = retrieval_metrics(emb, ["a", "a", "b"], emb, ["a", "a", "b"], same_set=True)
    assert m["queries"] == 2 and m["skipped_queries"] == 1 and m["mAP"] == 1.0
    # without same_set each query finds itself: the lone 'b' is then a (trivial) match
    assert retrieval_metrics(emb, ["a", "a", "b"], emb, ["a", "a", "b"])["queries"] == 3


def test_ties_go_to_the_lower_gallery_index():
    q, g = _unit(0.0), _unit(0.3, 0.3)
    assert retrieval_metrics(q, ["a"], g, ["a", "b"])["mAP"] == 1.0
    assert retrieval_metrics(q, ["a"], g, ["b", "a"])["mAP"] == 0.5


def test_perfect_embeddings_score_one():
    ids = np.repeat(np.arange(20), 5)
    perfect = np.eye(20, dtype=np.float32)[ids]
    m = retrieval_metrics(perfect, ids, perfect, ids, same_set=True)
    assert all(m[key] == 1.0 for key in ("mAP", "identity_balanced_mAP", "top1", "top5", "top10", "mINP"))
    assert m["queries"] == 100


def test_chunked_equals_unchunked(monkeypatch):
    emb = _random_unit(60, 8, seed=0)
    ids = np.random.default_rng(0).integers(0, 6, 60)
    groups = np.arange(60) // 2
    whole = retrieval_metrics(emb, ids, emb, ids, groups, groups, same_set=True)
    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", 7 * 60)  # 7 queries per chunk
    assert retrieval_metrics(emb, ids, emb, ids, groups, groups, same_set=True) == whole


def test_chance_is_near_the_positive_rate():
    ids = np.repeat(np.arange(20), 5)  # each query: 4 positives among 99 visible images
    chance = chance_metrics(ids, ids, same_set=True, repeats=20)
    assert chance["top1"] == pytest.approx(4 / 99, abs=0.01)
    assert 4 / 99 < chance["mAP"] < 0.15
    assert chance["queries"] == 100 and chance["skipped_queries"] == 0


def test_chance_matches_random_embeddings_under_the_protocol():
    rng = np.random.default_rng(1)
    ids, groups = rng.integers(0, 8, 80), rng.integers(0, 30, 80)
    chance = chance_metrics(ids, ids, groups, groups, same_set=True, repeats=50)
    random = [retrieval_metrics(e, ids, e, ids, groups, groups, same_set=True)
              for e in (_random_unit(80, 64, seed) for seed in range(50))]
    for key in ("mAP", "identity_balanced_mAP", "top1", "mINP"):
        assert chance[key] == pytest.approx(np.mean([m[key] for m in random]), abs=0.02), key
    assert chance["skipped_queries"] == random[0]["skipped_queries"]


def test_chance_is_reproducible():
    ids = np.repeat(np.arange(10), 3)
    assert chance_metrics(ids, ids, same_set=True, seed=3) == chance_metrics(ids, ids, same_set=True, seed=3)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="do not match"):
        retrieval_metrics(np.zeros((1, 4)), ["a"], np.zeros((2, 3)), ["a", "b"])
    with pytest.raises(ValueError, match="gallery_ids has 1 entries"):
        retrieval_metrics(_unit(0.0), ["a"], _unit(0.0, 1.0), ["a"])
    with pytest.raises(ValueError, match="together"):
        retrieval_metrics(_unit(0.0), ["a"], _unit(0.0), ["a"], query_groups=["e1"])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.full((1, 2), np.nan), ["a"], _unit(0.0), ["a"])
    with pytest.raises(ValueError, match="same_set"):
        chance_metrics(["a"], ["a", "b"], same_set=True)


def test_flank_splits_on_a_hand_computed_case():
    # one query (a, left) against a: left 0.5, right 0.8 and b: left 0.9, right 0.1
    scores = np.array([[0.5, 0.9, 0.8, 0.1]], dtype=np.float32)
    metrics = retrieval_metrics(np.zeros((1, 2)), ["a"], np.zeros((4, 2)), ["a", "b", "a", "b"],
                                score_rows=lambda start, stop: scores[start:stop].copy(),
                                query_views=["left"], gallery_views=["left", "left", "right", "right"])
    # all: b-left, a-right, a-left, b-right -> positives at ranks 2 and 3
    assert metrics["mAP"] == pytest.approx((1 / 2 + 2 / 3) / 2) and metrics["top1"] == 0
    # same flank sees a-left and b-left only: the positive at rank 2
    assert metrics["same_flank"]["mAP"] == pytest.approx(0.5) and metrics["same_flank"]["top1"] == 0
    # cross flank sees a-right and b-right only: the positive first
    assert metrics["cross_flank"]["mAP"] == pytest.approx(1.0) and metrics["cross_flank"]["top1"] == 1


def test_flank_splits_skip_queries_without_a_viewpoint_and_need_both_view_lists():
    scores = np.array([[0.9, 0.1], [0.2, 0.8]], dtype=np.float32)
    metrics = retrieval_metrics(np.zeros((2, 2)), ["a", "b"], np.zeros((2, 2)), ["a", "b"],
                                score_rows=lambda start, stop: scores[start:stop].copy(),
                                query_views=["left", None], gallery_views=["left", "left"])
    assert metrics["queries"] == 2
    assert metrics["same_flank"]["queries"] == 1 and metrics["same_flank"]["skipped_queries"] == 1
    with pytest.raises(ValueError, match="together"):
        retrieval_metrics(np.eye(2), ["a", "b"], np.eye(2), ["a", "b"], query_views=["left", "left"])


def test_score_rows_may_hand_out_views_of_a_matrix_it_keeps():
    # a fused score matrix served by slicing: hiding a query's own encounter must not write into it,
    # or the flank splits, ranked after the overall scores, would see the first pass's -inf
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((12, 4)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ids, groups = np.repeat(np.arange(4), 3), np.arange(12) // 2
    views = np.tile(["left", "right"], 6)
    kept = emb @ emb.T
    before = kept.copy()
    by_slices = retrieval_metrics(emb, ids, emb, ids, groups, groups, same_set=True,
                                  score_rows=lambda start, stop: kept[start:stop], query_views=views,
                                  gallery_views=views)
    by_cosine = retrieval_metrics(emb, ids, emb, ids, groups, groups, same_set=True, query_views=views,
                                  gallery_views=views)
    np.testing.assert_array_equal(kept, before)
    for split in ("same_flank", "cross_flank"):
        assert by_slices[split]["mAP"] == pytest.approx(by_cosine[split]["mAP"])
    assert by_slices["mAP"] == pytest.approx(by_cosine["mAP"])
