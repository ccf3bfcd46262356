"""Crops land where the boxes say; thresholds per category; blank, human and vehicle images."""
from __future__ import annotations

import numpy as np
import pytest

from reid.errors import ReidError
from reid.species.crops import CropSettings, animal_crops, crop, crop_region, image_outcomes
from reid.species.megadetector import detection_table, image_row

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _picture() -> np.ndarray:
    """A grey 200 x 100 (w x h) image with a red rectangle at x 40..80, y 20..50 and a blue one at x 150..190."""
    image = np.full((100, 200, 3), 128, np.uint8)
    image[20:50, 40:80] = RED
    image[10:90, 150:190] = BLUE
    return image


def _box(x0, y0, x1, y1, width=200, height=100) -> tuple[float, float, float, float]:
    return x0 / width, y0 / height, (x1 - x0) / width, (y1 - y0) / height


def test_a_crop_shows_exactly_the_box():
    pixels, region = crop(_picture(), _box(40, 20, 80, 50))
    assert region == (40, 20, 80, 50)
    assert pixels.shape == (30, 40, 3) and (pixels == RED).all()


def test_padding_adds_a_share_of_the_box_on_each_side():
    pixels, region = crop(_picture(), _box(40, 20, 80, 50), padding=0.25)
    assert region == (30, 12, 90, 58)  # 10 px left and right (0.25 x 40), 7.5 -> 8 px up and down
    assert (pixels[8:38, 10:50] == RED).all() and (pixels[:8] == 128).all()


def test_square_crops_take_more_image_where_it_has_more_and_letterbox_only_past_the_edge():
    # 40 x 30 box: the square takes 5 more rows above and below, from the image
    pixels, region = crop(_picture(), _box(40, 20, 80, 50), square=True)
    assert region == (40, 15, 80, 55) and pixels.shape == (40, 40, 3)
    assert (pixels[5:35] == RED).all() and (pixels[:5] == 128).all()
    # near the right edge the square shifts inside the image instead of padding
    pixels, region = crop(_picture(), _box(150, 10, 190, 90), square=True)
    assert region == (120, 10, 200, 90) and pixels.shape == (80, 80, 3)
    assert (pixels[:, 30:70] == BLUE).all()
    # a square taller than the image: wider from the image, letterboxed above and below, centred
    pixels, region = crop(_picture(), _box(90, 0, 110, 100), padding=0.2, square=True, fill=7)
    assert region == (30, 0, 170, 100) and pixels.shape == (140, 140, 3)
    assert (pixels[:20] == 7).all() and (pixels[120:] == 7).all() and (pixels[20:120] == _picture()[:, 30:170]).all()
    pixels, region = crop(_picture(), (0.0, 0.0, 1.0, 1.0), square=True, fill=7)
    assert region == (0, 0, 200, 100) and pixels.shape == (200, 200, 3)
    assert (pixels[:50] == 7).all() and (pixels[150:] == 7).all() and (pixels[50:150] == _picture()).all()


def test_crop_regions_stay_inside_the_image_and_are_never_empty():
    assert crop_region((0.99, 0.99, 0.01, 0.01), 200, 100, padding=1.0, square=False) == (196, 98, 200, 100)
    assert crop_region((1.0, 1.0, 0.0, 0.0), 200, 100, padding=0.0, square=False) == (199, 99, 200, 100)


def _detections():
    return detection_table([
        ("a.jpg", 0, "animal", 0.9, *_box(40, 20, 80, 50), ""),
        ("a.jpg", 1, "animal", 0.15, *_box(150, 10, 190, 90), ""),  # below the animal threshold
        ("a.jpg", 2, "person", 0.3, *_box(0, 0, 20, 60), ""),
        ("b.jpg", 0, "person", 0.3, *_box(0, 0, 20, 60), ""),
        ("b.jpg", 1, "vehicle", 0.9, *_box(100, 0, 200, 60), ""),
        ("c.jpg", 0, "vehicle", 0.6, *_box(100, 0, 200, 60), ""),
        ("c.jpg", 1, "person", 0.1, *_box(0, 0, 20, 60), ""),
        ("d.jpg", 0, "animal", 0.1, *_box(40, 20, 80, 50), ""),
        image_row("e.jpg"),
        image_row("f.jpg", "Failure image access"),
    ])


def test_animal_crops_skip_people_vehicles_unsure_and_small_boxes():
    settings = CropSettings(thresholds={"animal": 0.2, "person": 0.05}, padding=0.0, min_size=10, square=False)
    detections = _detections()
    crops = animal_crops(_picture(), detections[detections["file"] == "a.jpg"], settings)
    assert [(c.detection, c.box) for c in crops] == [(0, (40, 20, 80, 50))]
    assert (crops[0].image == RED).all() and crops[0].conf == 0.9
    assert animal_crops(_picture(), detections[detections["file"] == "a.jpg"],
                        CropSettings(thresholds={"animal": 0.2}, min_size=31, square=False)) == []
    lower = animal_crops(_picture(), detections[detections["file"] == "a.jpg"],
                         CropSettings(thresholds={"animal": 0.1}, padding=0.0, min_size=0, square=False))
    assert [c.detection for c in lower] == [0, 1] and (lower[1].image == BLUE).all()


def test_image_outcomes_count_each_category_against_its_own_threshold():
    settings = CropSettings(thresholds={"animal": 0.2, "person": 0.25, "vehicle": 0.5})
    outcomes = image_outcomes(_detections(), settings).set_index("file")
    assert outcomes["outcome"].to_dict() == {"a.jpg": "animal", "b.jpg": "human", "c.jpg": "vehicle",
                                             "d.jpg": "blank", "e.jpg": "blank", "f.jpg": "failed"}
    assert outcomes.loc["a.jpg", ["animals", "humans", "vehicles"]].tolist() == [1, 1, 0]
    assert outcomes.loc["b.jpg", ["animals", "humans", "vehicles"]].tolist() == [0, 1, 1]
    assert outcomes.loc["f.jpg", "failure"] == "Failure image access"
    stricter = image_outcomes(_detections(), CropSettings(thresholds={"person": 0.5}, default_threshold=0.95))
    assert stricter.set_index("file")["outcome"].to_dict()["b.jpg"] == "blank"


def test_settings_out_of_range_are_refused():
    with pytest.raises(ReidError, match="threshold for 'animal' is 1.5"):
        CropSettings(thresholds={"animal": 1.5})
    with pytest.raises(ReidError, match="crop padding is -0.1"):
        CropSettings(padding=-0.1)
