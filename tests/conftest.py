"""Shared fixtures: tiny configs, synthetic data made once per session, the shared real data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from reid.config import load_config

SHARED = Path(__file__).resolve().parents[2] / "shared"


def tiny_config(*overrides: str) -> dict:
    """A random-init test model at 64 px: seconds per epoch on 2 CPU cores."""
    return load_config(None, [
        "model.backbone=test_resnet", "model.pretrained=false", "model.embedding_dim=32",
        "data.image_size=64", "data.num_workers=0", "sampler.p=4", "sampler.k=2",
        "train.epochs=2", "train.lr=1e-3", "train.warmup_epochs=0", "cv.folds=3", "eval.batch_size=32",
        *overrides,
    ])


@pytest.fixture(scope="session")
def synth_csv(tmp_path_factory) -> Path:
    from reid.data.synth import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synth"), identities=12, images_per_identity=4,
                                  seed=1, image_size=64, progress=False)


@pytest.fixture(scope="session")
def nyala_csv() -> Path:
    csv = SHARED / "data" / "nyala-dev" / "metadata.csv"
    if not csv.exists():
        pytest.skip("../shared/data/nyala-dev is not present")
    return csv


def clustered_embeddings(identities: int, per_identity: int, dim: int = 16, noise: float = 0.5,
                         seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors in clusters, one per identity, like re-ID embeddings; and the identity of each."""
    rng = np.random.default_rng(seed)
    ids = np.repeat(np.arange(identities), per_identity)
    emb = rng.standard_normal((identities, dim))[ids] + noise * rng.standard_normal((len(ids), dim))
    return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32), ids


def write_checkpoint(path: Path, *overrides: str, seed: int = 0) -> Path:
    """An inference checkpoint (what `best.pt` holds) of a random-init tiny model."""
    from reid.checkpoint import save_untrained

    return save_untrained(path, tiny_config(*overrides), seed)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt")
