"""Synthetic camera-trap scenes: the JSON boxes hold the drawn animals; frames, EXIF and truth agree."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from reid.data.dataset import read_image
from reid.errors import DataError
from reid.species.crops import CropSettings, image_outcomes
from reid.species.megadetector import NO_DETECTION, read_megadetector
from reid.species.scenes import make_synthetic_scenes, plan_scenes, render_frame

SIZE = (160, 120)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return make_synthetic_scenes(tmp_path_factory.mktemp("scenes"), frames=14, individuals_per_species=2, cameras=2,
                                 frame_size=SIZE, seed=5, progress=False)


def test_scenes_have_animals_of_each_species_people_vehicles_and_empty_frames(scenes):
    truth = pd.read_csv(scenes.ground_truth, keep_default_na=False)
    assert set(truth["category"]) == {"animal", "person", "vehicle", ""}
    animals = truth[truth["category"] == "animal"]
    assert set(animals["species"]) == {"spotted-cat", "striped-antelope"}
    assert set(animals["identity"]) <= {f"{s}-{i:02d}" for s in ("spotted-cat", "striped-antelope") for i in range(2)}
    files = sorted(str(p.relative_to(scenes.images)) for p in scenes.images.rglob("*.JPG"))
    assert files == sorted(truth["file"].unique()) and len(files) == 14
    assert all(f.startswith(("CAM01/IMG_", "CAM02/IMG_")) for f in files)
    # a burst: frames of one encounter, one camera, seconds apart
    times = pd.to_datetime(truth.drop_duplicates("file").set_index("file")["datetime"])
    for _, encounter in truth.drop_duplicates("file").groupby("encounter"):
        assert encounter["camera"].nunique() == 1
        stamps = times[encounter["file"]].sort_values()
        assert (stamps.diff().dropna() <= pd.Timedelta(seconds=3)).all()


def test_json_boxes_are_the_truth_and_hold_the_drawn_objects(scenes):
    detections = read_megadetector(scenes.detections)
    truth = pd.read_csv(scenes.ground_truth, keep_default_na=False)
    assert list(detections["file"]) == list(truth["file"])
    assert list(detections["detection"]) == list(truth["detection"])
    assert list(detections["category"]) == list(truth["category"])
    real = detections["detection"] != NO_DETECTION
    assert (detections.loc[real, "conf"] == 1.0).all()
    width, height = SIZE
    plans = {plan.file: plan for plan in plan_scenes(14, 2, cameras=2, seed=5)}
    for file, rows in detections.groupby("file"):
        frame = render_frame(plans[file], SIZE, seed=5)
        # the JPEG on disk is that frame, with its capture time in EXIF
        on_disk = read_image(str(scenes.images / file)).astype(int)
        assert np.abs(on_disk - frame.pixels).mean() < 8  # JPEG of a noisy frame
        with Image.open(scenes.images / file) as image:
            stamp = image.getexif().get_ifd(0x8769)[0x9003]
        assert pd.Timestamp(plans[file].time) == pd.to_datetime(stamp, format="%Y:%m:%d %H:%M:%S")
        boxes = rows[rows["detection"] != NO_DETECTION]
        assert len(boxes) == sum(box is not None for box in frame.boxes)
        for row, mask in zip(boxes.itertuples(), [m for m, b in zip(frame.masks, frame.boxes) if b is not None]):
            x0, y0 = round(row.x * width), round(row.y * height)
            x1, y1 = round((row.x + row.w) * width), round((row.y + row.h) * height)
            inside = mask[y0:y1, x0:x1]
            assert (mask > 0.5).sum() == (inside > 0.5).sum() > 0  # every opaque pixel in the box
            # and the box is tight: the object touches each of its sides
            assert inside[0].max() > 0.3 and inside[-1].max() > 0.3
            assert inside[:, 0].max() > 0.3 and inside[:, -1].max() > 0.3


def test_empty_frames_are_blank_and_people_and_vehicles_are_not_animals(scenes):
    outcomes = image_outcomes(read_megadetector(scenes.detections), CropSettings()).set_index("file")["outcome"]
    truth = pd.read_csv(scenes.ground_truth, keep_default_na=False)
    first = truth.groupby("file")["category"].agg(set)
    for file, categories in first.items():
        expected = ("animal" if "animal" in categories else "human" if "person" in categories
                    else "vehicle" if "vehicle" in categories else "blank")
        assert outcomes[file] == expected


def test_an_individual_wears_the_same_coat_in_every_frame():
    plans = plan_scenes(30, 2, cameras=2, seed=5)
    looks = {}
    for plan in plans:
        for obj in plan.objects:
            if obj.category == "animal":
                assert looks.setdefault(obj.identity, obj.look) == obj.look
    assert len(looks) >= 3


def test_bad_scene_arguments_are_refused(tmp_path):
    with pytest.raises(DataError, match="unknown scene species zebra; choose from spotted-cat, striped-antelope"):
        make_synthetic_scenes(tmp_path, frames=2, species=("zebra",), progress=False)
    with pytest.raises(DataError, match="frames must be at least 1"):
        make_synthetic_scenes(tmp_path, frames=0, progress=False)
