"""From detections to what happens to each image: animal crops for re-identification, or a count
of people and vehicles, or "blank".

People and vehicles are counted and never cropped: they are not individuals to enroll, and a
person's picture is not something to keep. Thresholds are per category because detectors are
calibrated differently for each (MegaDetector v5 suggests 0.2 for animals; people are often
detected with lower confidence and are worth catching for privacy).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Mapping

import cv2
import numpy as np
import pandas as pd

from reid.errors import ReidError
from reid.species.megadetector import NO_DETECTION

ANIMAL, PERSON, VEHICLE = "animal", "person", "vehicle"
HUMAN_CATEGORIES = {"person", "human"}  # MegaDetector says person, SpeciesNet's labels say human

Box = tuple[float, float, float, float]  # normalised x_min, y_min, width, height


@dataclass(frozen=True)
class CropSettings:
    """How detections become crops.

    thresholds: minimum confidence per category name; `default_threshold` for categories not named.
    padding: fraction of the box's width (height) added on the left and right (top and bottom), for context.
    min_size: boxes whose shorter side is below this many pixels are too small to re-identify.
    square: extend the padded box to a square with more of the image where it has more, and
        letterbox (pad with `fill`) only where the square passes the image edge. The model input is
        square, and a square crop keeps the animal's proportions without stretching its coat.
    """
    thresholds: Mapping[str, float] = field(default_factory=lambda: {ANIMAL: 0.2, PERSON: 0.2, VEHICLE: 0.2})
    default_threshold: float = 0.2
    padding: float = 0.05
    min_size: int = 32
    square: bool = True
    fill: int = 0

    def __post_init__(self):
        for name, value in {**self.thresholds, "default_threshold": self.default_threshold}.items():
            if not 0.0 <= value <= 1.0:
                raise ReidError(f"detection threshold for '{name}' is {value}; use a value between 0 and 1")
        if self.padding < 0:
            raise ReidError(f"crop padding is {self.padding}; use a fraction of the box size, 0 or more")
        if self.min_size < 0:
            raise ReidError(f"minimum crop size is {self.min_size}; use a number of pixels, 0 or more")

    def threshold(self, category: str) -> float:
        return self.thresholds.get(category, self.default_threshold)

    def too_small(self, box: Box, width: int, height: int) -> bool:
        """Whether the box's shorter side in a width x height image is under `min_size` pixels."""
        return min(box[2] * width, box[3] * height) < self.min_size

    @property
    def digest(self) -> str:
        """Hash of what shapes a crop's pixels (not which boxes are kept): padding, square, fill."""
        spec = {"padding": self.padding, "square": self.square, "fill": self.fill}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]

    def cut(self, image: np.ndarray, box: Box) -> np.ndarray:
        """The re-ID crop of `box` (normalised xywh) from `image`."""
        return crop(image, box, self.padding, self.square, self.fill)[0]


def embedding_model(fingerprint: str, settings: CropSettings) -> str:
    """What a stored vector of a cropped image was made by: the model's fingerprint and the crops'
    shape. A store compares it to tell vectors to re-embed, so vectors of differently cut crops
    (another padding) never share a gallery."""
    return f"{fingerprint}-{settings.digest}"


@dataclass
class Crop:
    """An animal crop: `box` is the pixel region of the image it shows (x0, y0, x1, y1, exclusive,
    after padding and clipped to the image); `image` may be larger where it was letterboxed."""
    file: str
    detection: int
    conf: float
    box: tuple[int, int, int, int]
    image: np.ndarray


def confident(detections: pd.DataFrame, settings: CropSettings) -> pd.DataFrame:
    """The detections (not the rows of images without any) at or above their category's threshold."""
    real = detections[detections["detection"] != NO_DETECTION]
    keep = real["conf"].to_numpy() >= real["category"].map(settings.threshold).to_numpy(dtype=float)
    return real[keep]


def image_outcomes(detections: pd.DataFrame, settings: CropSettings) -> pd.DataFrame:
    """One row per image: file, outcome, animals, humans, vehicles (confident detections), failure.

    The outcome is "animal" when any animal is confident (people or vehicles beside it are still
    counted), else "human", else "vehicle", else "blank"; "failed" when the detector could not read it.
    """
    kept = confident(detections, settings)
    counts = pd.DataFrame({
        "animals": kept["category"].eq(ANIMAL).groupby(kept["file"]).sum(),
        "humans": kept["category"].isin(HUMAN_CATEGORIES).groupby(kept["file"]).sum(),
        "vehicles": kept["category"].eq(VEHICLE).groupby(kept["file"]).sum(),
    })
    images = detections.groupby("file", sort=False)["failure"].agg(lambda f: next((x for x in f if x), ""))
    table = images.to_frame().join(counts).fillna(0).astype({"animals": int, "humans": int, "vehicles": int})
    table["outcome"] = np.select(
        [table["failure"] != "", table["animals"] > 0, table["humans"] > 0, table["vehicles"] > 0],
        ["failed", "animal", "human", "vehicle"], default="blank")
    return table.reset_index()[["file", "outcome", "animals", "humans", "vehicles", "failure"]]


def crop_region(box: Box, width: int, height: int, padding: float, square: bool) -> tuple[int, int, int, int]:
    """The pixel region (x0, y0, x1, y1) of the image that a crop of `box` shows: padded, made
    square with more image where possible, clipped to the image, at least one pixel."""
    x, y, w, h = box
    x0, x1 = (x - padding * w) * width, (x + w + padding * w) * width
    y0, y1 = (y - padding * h) * height, (y + h + padding * h) * height
    if square:
        side = max(x1 - x0, y1 - y0)
        x0, x1 = _centred_span((x0 + x1) / 2, side, width)
        y0, y1 = _centred_span((y0 + y1) / 2, side, height)
    left, top = min(max(math.floor(x0), 0), width - 1), min(max(math.floor(y0), 0), height - 1)
    right, bottom = max(min(math.ceil(x1), width), left + 1), max(min(math.ceil(y1), height), top + 1)
    return left, top, right, bottom


def _centred_span(centre: float, side: float, limit: int) -> tuple[float, float]:
    """A span of length `side` around `centre`, shifted inside [0, limit] when it fits there."""
    start = centre - side / 2
    if side <= limit:
        start = min(max(start, 0.0), limit - side)
    return start, start + side


def crop(image: np.ndarray, box: Box, padding: float = 0.0, square: bool = False,
         fill: int = 0) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The crop of `box` (normalised xywh) from an HxWxC image, and the pixel region it shows.

    With `square`, the part of the square that lies outside the image is letterboxed with `fill`,
    the image content centred, so the crop is square even for an animal as tall as the frame.
    """
    height, width = image.shape[:2]
    left, top, right, bottom = crop_region(box, width, height, padding, square)
    pixels = image[top:bottom, left:right]
    if square and pixels.shape[0] != pixels.shape[1]:
        side = max(pixels.shape[:2])
        dy, dx = side - pixels.shape[0], side - pixels.shape[1]
        pixels = cv2.copyMakeBorder(pixels, dy // 2, dy - dy // 2, dx // 2, dx - dx // 2, cv2.BORDER_CONSTANT,
                                    value=(fill,) * (pixels.shape[2] if pixels.ndim == 3 else 1))
    return np.ascontiguousarray(pixels), (left, top, right, bottom)


def animal_crops(image: np.ndarray, detections: pd.DataFrame, settings: CropSettings) -> list[Crop]:
    """Crops of the confident animal detections in `detections` (the rows of this image), skipping
    boxes whose shorter side is under `settings.min_size` pixels."""
    height, width = image.shape[:2]
    animals = confident(detections, settings)
    animals = animals[animals["category"] == ANIMAL]
    crops = []
    for row in animals.itertuples():
        if settings.too_small((row.x, row.y, row.w, row.h), width, height):
            continue
        pixels, region = crop(image, (row.x, row.y, row.w, row.h), settings.padding, settings.square, settings.fill)
        crops.append(Crop(row.file, int(row.detection), float(row.conf), region, pixels))
    return crops
