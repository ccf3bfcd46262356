import numpy as np
import pandas as pd
import pytest
from PIL import Image

from reid.data.synth import coat_pattern, make_synthetic_dataset, render_image
from reid.errors import DataError


def test_files_and_metadata(synth_csv):
    table = pd.read_csv(synth_csv)
    assert list(table.columns) == ["path", "identity", "viewpoint", "encounter", "width", "height"]
    assert len(table) == 48 and table["identity"].nunique() == 12
    assert set(table["viewpoint"]) == {"left", "right"}
    assert table.groupby("encounter")["identity"].nunique().max() == 1
    with Image.open(synth_csv.parent / table["path"][0]) as image:
        assert image.size == (64, 64)


def test_deterministic_by_seed(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", 2, 2, seed=3, image_size=48, progress=False)
    b = make_synthetic_dataset(tmp_path / "b", 2, 2, seed=3, image_size=48, progress=False)
    c = make_synthetic_dataset(tmp_path / "c", 2, 2, seed=4, image_size=48, progress=False)
    name = "images/synth_001/001.jpg"
    assert (a.parent / name).read_bytes() == (b.parent / name).read_bytes() != (c.parent / name).read_bytes()


def test_flanks_and_identities_have_their_own_coats():
    left, right, other = coat_pattern(0, 1, "left"), coat_pattern(0, 1, "right"), coat_pattern(0, 2, "left")
    assert np.abs(left - right).mean() > 0.05 and np.abs(left - other).mean() > 0.05
    assert np.abs(left - np.fliplr(right)).mean() > 0.05  # a flipped left flank is not the right one


def test_encounter_shares_background():
    same = [render_image(0, 5, "left", 0, i, 64).astype(float) for i in (0, 1)]
    other = render_image(0, 5, "left", 1, 2, 64).astype(float)
    corner = (slice(0, 10), slice(0, 10))
    assert np.abs(same[0][corner] - same[1][corner]).mean() < np.abs(same[0][corner] - other[corner]).mean()


def test_bad_arguments(tmp_path):
    with pytest.raises(DataError):
        make_synthetic_dataset(tmp_path, identities=0)
    with pytest.raises(DataError, match="at least 32"):
        make_synthetic_dataset(tmp_path, image_size=16)
