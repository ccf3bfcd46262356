"""`reid calibrate` choosing the post-processing on out-of-fold embeddings: taken where it helps,
refused where it hurts."""
import numpy as np

from reid.evaluation.postprocessing import NONE, choose, stored_options
from tests.conftest import clustered_embeddings


def _oof_clusters():
    """Individuals as loose clusters of 6 photos: neighbours of neighbours are the same animal, the
    case query expansion and k-reciprocal re-ranking were made for."""
    emb, ids = clustered_embeddings(20, 6, dim=16, noise=1.2, seed=0)
    return emb, ids.astype(str), np.arange(len(ids)).astype(str), ids % 2


def _oof_scenes():
    """Each individual photographed at two different scenes, and the embedding mostly says which
    scene: a query's neighbourhood is its scene, so re-ranking by shared neighbours favours
    strangers from the same bush (what fine-tuning on nyala left behind)."""
    rng = np.random.default_rng(0)
    scene_centres, id_centres = rng.standard_normal((4, 32)), rng.standard_normal((40, 32))
    ids = np.repeat(np.arange(40), 2)
    scenes = np.stack([rng.choice(4, 2, replace=False) for _ in range(40)]).ravel()
    emb = scene_centres[scenes] + id_centres[ids] + 0.3 * rng.standard_normal((80, 32))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb.astype(np.float32), ids.astype(str), np.arange(80).astype(str), ids % 2


def test_reranking_is_chosen_where_it_raises_out_of_fold_map():
    emb, ids, encounters, folds = _oof_clusters()
    chosen = choose({"none": emb}, ids, encounters, folds)
    assert chosen["describe"] != "none"
    assert chosen["oof_mAP"] > chosen["baseline_mAP"] + 0.02
    assert chosen["oof_top1"] >= chosen["baseline_top1"]
    assert stored_options(chosen) != NONE
    assert len(chosen["candidates"]) >= 9


def test_reranking_is_refused_where_it_lowers_out_of_fold_map():
    emb, ids, encounters, folds = _oof_scenes()
    chosen = choose({"none": emb}, ids, encounters, folds)
    baseline = chosen["candidates"][0]
    # every re-ranking candidate scores below plain cosine here, so none is applied
    assert all(row["mAP"] < baseline["mAP"] for row in chosen["candidates"][1:])
    assert chosen["describe"] == "none" and chosen["tta"] == "none"
    assert stored_options(chosen) == NONE and stored_options(None) == NONE


def test_flip_tta_is_a_candidate_like_any_other():
    emb, ids, encounters, folds = _oof_clusters()
    worse = emb + 0.8 * np.random.default_rng(1).standard_normal(emb.shape).astype(np.float32)
    worse /= np.linalg.norm(worse, axis=1, keepdims=True)
    assert choose({"none": emb, "hflip": worse}, ids, encounters, folds)["tta"] == "none"
    assert choose({"none": worse, "hflip": emb}, ids, encounters, folds)["tta"] == "hflip"
