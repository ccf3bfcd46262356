"""The gallery index: exact and approximate kinds, incremental add/remove, atomic save and load."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from reid.errors import ReidError
from reid.index import KINDS, GalleryIndex, build_gallery, choose_kind


def _unit(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    """Clustered like re-ID embeddings: several noisy views around each individual's centre."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 8), dim))
    x = (centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, dim))).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _meta(n: int) -> pd.DataFrame:
    return pd.DataFrame({"identity": [f"id{i % 40}" for i in range(n)], "path": [f"img{i}.jpg" for i in range(n)]})


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_finds_exact_neighbours_and_forgets_removed_ones(tmp_path, kind):
    x = _unit(12000)
    gallery = build_gallery(x, _meta(len(x)), kind=kind)
    exact = np.argsort(-(x[:50] @ x.T), axis=1)[:, :10]
    _, found = gallery.search(x[:50], 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)])
    assert recall >= (1.0 if kind == "flat" else 0.9)

    assert gallery.remove([0, 1, 99999]) == 2 and len(gallery) == len(x) - 2
    _, found = gallery.search(x[:2], 5)
    assert not {0, 1} & set(found.ravel().tolist())

    path = tmp_path / "g.index"
    gallery.save(path)
    loaded = GalleryIndex.load(path)
    _, again = loaded.search(x[2:5], 3)
    np.testing.assert_array_equal(again, gallery.search(x[2:5], 3)[1])
    assert loaded.metadata.loc[again[0, 0], "path"] == f"img{again[0, 0]}.jpg"
    assert not {0, 1} & set(loaded.search(x[:2], 5)[1].ravel().tolist())

    new_ids = loaded.add(_unit(3, seed=7), _meta(3))
    assert new_ids.tolist() == [len(x), len(x) + 1, len(x) + 2]  # ids are never reused
    assert loaded.search(_unit(3, seed=7), 1)[1].ravel().tolist() == new_ids.tolist()


def test_hidden_vectors_are_compacted_away():
    x = _unit(500)
    gallery = build_gallery(x, _meta(500), kind="hnsw")
    gallery.remove(range(0, 50))
    assert len(gallery.hidden) == 50
    gallery.remove(range(50, 150))  # over a fifth hidden: rebuilt without them
    assert not gallery.hidden and gallery.index.ntotal == 350
    np.testing.assert_allclose(gallery.vectors([200]), x[200:201], atol=1e-6)


def test_clear_errors():
    gallery = GalleryIndex(32)
    with pytest.raises(ReidError, match="empty"):
        gallery.search(_unit(1), 1)
    gallery.add(_unit(10), _meta(10))
    with pytest.raises(ReidError, match="dimension 16 does not match the gallery's 32"):
        gallery.search(_unit(1, dim=16), 1)
    with pytest.raises(ReidError, match="needs at least"):
        build_gallery(_unit(100), _meta(100), kind="ivfpq")
    with pytest.raises(ReidError, match="unknown index kind"):
        choose_kind("annoy", 10, 100)


def test_damaged_index_file_is_a_clear_error(tmp_path):
    path = tmp_path / "g.index"
    path.write_bytes(b"garbage")
    with pytest.raises(ReidError, match="rebuild it"):
        GalleryIndex.load(path)


def test_auto_kind_switches_to_ann_above_the_threshold():
    assert choose_kind("auto", 100, ann_threshold=1000) == "flat"
    assert choose_kind("auto", 5000, ann_threshold=1000) == "ivfpq"
