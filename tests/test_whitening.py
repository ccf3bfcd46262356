"""Learned whitening: the closed form, the neck it is loaded into, and a training run that fits it."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from reid.embedding import Embedder
from reid.errors import ConfigError
from reid.evaluation.metrics import retrieval_metrics
from reid.model.build import build_model
from reid.model.whitening import PooledFeatures, learned_whitening, load_into_neck
from reid.checkpoint import load_checkpoint
from reid.train.trainer import FoldTrainer
from tests.conftest import tiny_config


def _photos(identities: int, per_identity: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Features whose identity lies in 8 quiet dimensions while 24 loud ones change from photo to
    photo (pose, light, background), as pooled CNN features of camera-trap photos do."""
    rng = np.random.default_rng(seed)
    ids = np.repeat(np.arange(identities), per_identity)
    identity = rng.standard_normal((identities, 8))[ids]
    nuisance = 4.0 * rng.standard_normal((len(ids), 24))
    return np.concatenate([identity + 0.3 * rng.standard_normal(identity.shape), nuisance], axis=1) + 5.0, ids


def _map(features: np.ndarray, ids: np.ndarray) -> float:
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    return retrieval_metrics(unit, ids, unit, ids, same_set=True)["mAP"]


def test_whitening_fitted_on_some_individuals_finds_others_that_cosine_misses():
    train, train_ids = _photos(60, 4, seed=0)
    test, test_ids = _photos(30, 4, seed=1)  # individuals the whitening never saw
    # little shrinkage: here the nuisance is 200x louder than the identity, and the default (1.0)
    # would add it to the identity's dimensions too
    mean, projection = learned_whitening(train, train_ids, dim=16, shrink=0.01)
    assert projection.shape == (32, 16)
    before, after = _map(test, test_ids), _map((test - mean) @ projection, test_ids)
    assert before < 0.2 and after > 0.6, (before, after)


def test_whitening_errors_name_the_setting():
    features, ids = _photos(4, 2, seed=0)
    with pytest.raises(ConfigError, match="embedding_dim 64 exceeds the backbone.s 32"):
        learned_whitening(features, ids, dim=64)
    with pytest.raises(ConfigError, match="at least two training photos"):
        learned_whitening(features[::2], ids[::2], dim=8)
    with pytest.raises(ConfigError, match="whitening_shrink"):
        learned_whitening(features, ids, dim=8, shrink=0)


def test_the_neck_computes_the_projection_once_loaded():
    model = build_model(tiny_config()).eval()
    d = model.backbone.num_features
    rng = np.random.default_rng(0)
    mean, projection = rng.standard_normal(d).astype(np.float32), rng.standard_normal((d, 32)).astype(np.float32)
    load_into_neck(model.neck, mean, projection)
    x = rng.standard_normal((5, d)).astype(np.float32)
    with torch.no_grad():
        out = model.neck(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, (x - mean) @ projection, rtol=1e-4, atol=1e-4)


def test_a_run_with_whitening_keeps_it_in_best_pt_and_the_embedder_applies_it(tmp_path, synth_csv):
    table = pd.read_csv(synth_csv)
    table["path"] = [str(synth_csv.parent / p) for p in table["path"]]
    cfg = tiny_config("train.epochs=1", "train.whitening=true", "cv.split=disjoint")
    ids = table["identity"].to_numpy()
    val = np.isin(ids, np.unique(ids)[:4])
    trainer = FoldTrainer(cfg, table, np.where(~val)[0], np.where(val)[0], tmp_path / "run", progress=False)
    summary = trainer.fit()

    whitening = summary["whitening"]
    assert whitening["images"] == int((~val).sum())
    assert summary["best_metrics"] == whitening["after"]
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["metrics"] == whitening["after"] and best["whitening"]["before"] == whitening["before"]

    # what the embedder serves is the whitening of the best weights' pooled training features, as
    # training computed them: refitted on the embedder's own features (equal to 1e-7, normalised from
    # uint8 a batch at a time) the eigenvectors of the 32 photos' degenerate covariance could turn
    embedder = Embedder.from_checkpoint(tmp_path / "run" / "best.pt", tta="none")
    paths = table["path"].tolist()
    features = trainer.embed(np.arange(len(table)), "features", PooledFeatures(embedder.model), normalize=False)
    mean, projection = learned_whitening(features[~val], ids[~val], cfg["model"]["embedding_dim"])
    expected = (features - mean) @ projection
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(embedder.embed_paths(paths), expected, atol=2e-3)


def test_an_impossible_whitening_is_refused_before_training(tmp_path, synth_csv):
    table = pd.read_csv(synth_csv)
    cfg = tiny_config("train.whitening=true", "model.embedding_dim=4096")
    with pytest.raises(ConfigError, match="set model.embedding_dim="):
        FoldTrainer(cfg, table, np.arange(0, 30), np.arange(30, 48), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
