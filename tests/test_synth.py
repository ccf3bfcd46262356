import random

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from reid.data import synth
from reid.data.synth import coat_pattern, coat_style, encounter_scene, make_synthetic_dataset, render_image
from reid.errors import DataError

COLUMNS = ["path", "identity", "viewpoint", "encounter", "width", "height"]


def test_files_and_metadata(synth_csv):
    table = pd.read_csv(synth_csv)
    assert list(table.columns) == COLUMNS
    assert len(table) == 48 and table["identity"].nunique() == 12
    assert (table.groupby("identity").size() == 4).all()
    assert table["identity"].str.fullmatch(r"synth_\d{3}").all()
    assert set(table["viewpoint"]) == {"left", "right"}
    assert (table[["width", "height"]] == 64).all().all()
    # encounters of about two photos, each of one individual, named after it
    assert table.groupby("encounter")["identity"].nunique().max() == 1
    assert table.groupby("encounter").size().between(1, 2).all()
    assert (table["encounter"].str.rsplit("_enc", n=1).str[0] == table["identity"]).all()
    for path in table["path"]:
        assert "\\" not in path and not path.startswith("/")
        with Image.open(synth_csv.parent / path) as image:
            image.load()
            assert image.size == (64, 64) and image.mode == "RGB"
    assert not list(synth_csv.parent.glob("*.tmp"))


def test_same_seed_same_bytes_whatever_the_global_rng(tmp_path):
    np.random.seed(1), random.seed(1)
    a = make_synthetic_dataset(tmp_path / "a", 3, 3, seed=3, image_size=48, progress=False)
    np.random.seed(2), random.seed(2)
    b = make_synthetic_dataset(tmp_path / "b", 3, 3, seed=3, image_size=48, progress=False)
    c = make_synthetic_dataset(tmp_path / "c", 3, 3, seed=4, image_size=48, progress=False)
    assert a.read_bytes() == b.read_bytes()
    paths = pd.read_csv(a)["path"]
    assert all((a.parent / p).read_bytes() == (b.parent / p).read_bytes() for p in paths)
    assert all((a.parent / p).read_bytes() != (c.parent / p).read_bytes() for p in paths)


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two marking masks, on the painted part of the body."""
    region = synth._coat_region() > 0
    a, b = a[region] > 0.5, b[region] > 0.5
    return (a & b).sum() / max((a | b).sum(), 1)


@pytest.mark.parametrize("identity", range(8))
def test_each_flank_and_each_individual_has_its_own_coat(identity):
    left, right = coat_pattern(0, identity, "left"), coat_pattern(0, identity, "right")
    other = coat_pattern(0, identity + 8, "left")
    assert left.shape == (synth.BODY_H, synth.BODY_W) and 0 <= left.min() and left.max() <= 1
    assert 0.05 < (left[synth._coat_region() > 0] > 0.5).mean() < 0.7  # bold markings, not a blank coat
    assert _overlap(left, right) < 0.5
    # the left view is the body mirrored, so the right flank mirrored must not pass for the left flank
    assert _overlap(left, np.fliplr(right)) < 0.5
    assert _overlap(left, other) < 0.5


def test_both_kinds_and_colour_alone_does_not_identify():
    styles = [coat_style(0, i) for i in range(40)]
    assert {s.kind for s in styles} == {"spots", "stripes"}
    bases = np.stack([s.base for s in styles])
    distance = np.linalg.norm(bases[:, None] - bases[None], axis=-1) + np.eye(40) * 1e9
    assert (distance.min(axis=1) < 20).mean() > 0.8  # most have a look-alike in colour


def test_encounter_shares_background_and_light_others_do_not():
    a, b = encounter_scene(0, 5, 0, 64), encounter_scene(0, 5, 1, 64)
    encounter_scene.cache_clear()
    assert np.array_equal(a.background, encounter_scene(0, 5, 0, 64).background)
    assert np.abs(a.background - b.background).mean() > 5
    # photos: the animal moves and covers under half the frame, so the median pixel is background
    same = [render_image(0, 5, flank, 0, i, 64).astype(float) for i, flank in enumerate(["left", "right"])]
    other = render_image(0, 5, "left", 1, 2, 64).astype(float)
    assert np.median(np.abs(same[0] - same[1])) * 3 < np.median(np.abs(same[0] - other))


@pytest.mark.parametrize("flank", ["left", "right"])
def test_animal_faces_its_flank_direction(flank):
    for shot in range(20):
        matrix, _ = synth._pose(np.random.default_rng(shot), 128, flank)
        head = matrix @ np.array([*synth.NECK[1], 1.0])
        tail = matrix @ np.array([synth.TORSO[0] - synth.TORSO[2], synth.TORSO[1], 1.0])
        assert (head[0] < tail[0]) == (flank == "left")


def test_occluders_hide_at_most_a_quarter_of_the_body():
    body = np.zeros((96, 96), np.float32)
    body[30:70, 20:80] = 1
    for shot in range(30):
        picture = np.zeros((96, 96, 3), np.float32)
        cover = synth._occlude(picture, body, np.random.default_rng(shot), np.array([90, 120, 50], np.float32))
        assert (cover * body).sum() / body.sum() <= synth.MAX_OCCLUDED


def test_metadata_only_for_a_complete_folder(tmp_path, monkeypatch):
    out = tmp_path / "data"
    make_synthetic_dataset(out, 2, 2, image_size=32, progress=False)
    calls = []

    def failing(*args):
        calls.append(args)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return np.zeros((32, 32, 3), np.uint8)

    monkeypatch.setattr(synth, "render_image", failing)
    with pytest.raises(RuntimeError):
        make_synthetic_dataset(out, 2, 2, image_size=32, progress=False)
    assert not (out / "metadata.csv").exists()  # the old table no longer vouches for the folder


@pytest.mark.parametrize("kwargs, message", [
    ({"identities": 0}, "identities"),
    ({"images_per_identity": 0}, "images_per_identity"),
    ({"image_size": 31}, "at least 32"),
])
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(DataError, match=message):
        make_synthetic_dataset(tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()
