import pytest
import torch
import torch.nn.functional as F

from reid.config import DEFAULTS
from reid.errors import ConfigError
from reid.train.losses import ReIDLoss


def _batch(p=4, k=2, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(p * k, dim, generator=g), dim=1), torch.arange(p).repeat_interleave(k)


def test_both_terms_and_weights():
    emb, labels = _batch()
    loss_cfg = dict(DEFAULTS["loss"], arcface_weight=1.0, triplet_weight=2.0)
    total, parts = ReIDLoss(4, 16, loss_cfg)(emb, labels)
    assert set(parts) == {"arcface", "triplet"}
    assert total.item() == pytest.approx(parts["arcface"] + 2 * parts["triplet"], rel=1e-5)


def test_triplet_only_has_no_class_head_and_subcenters():
    emb, labels = _batch()
    triplet_only = ReIDLoss(4, 16, dict(DEFAULTS["loss"], arcface_weight=0.0))
    assert triplet_only.arcface is None and not list(triplet_only.parameters())
    _, parts = triplet_only(emb, labels)
    assert set(parts) == {"triplet"}
    sub = ReIDLoss(4, 16, dict(DEFAULTS["loss"], subcenters=3))
    assert sub.arcface.W.shape == (16, 12)


def test_loss_falls_when_embeddings_separate_identities():
    emb, labels = _batch()
    loss = ReIDLoss(4, 16, DEFAULTS["loss"])
    random_total, _ = loss(emb, labels)
    centres = F.normalize(loss.arcface.W.detach().T, dim=1)  # embeddings on their class centres
    perfect_total, _ = loss(centres[labels], labels)
    assert perfect_total < random_total


def test_nothing_to_train_is_a_config_error():
    with pytest.raises(ConfigError):
        ReIDLoss(4, 16, dict(DEFAULTS["loss"], arcface_weight=0.0, triplet_weight=0.0))
