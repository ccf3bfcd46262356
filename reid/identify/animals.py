"""The animals in photos: one implementation for the service's requests and `reid identify-batch`.

Boxes come from the request (`bbox`, or `detections` in MegaDetector's format), else from the
detector the service runs (MegaDetector weights in its settings), else each photo is taken whole
as one animal. Detections are kept above their category's threshold: people and vehicles are
counted, never cropped; a photo with nothing confident is blank. Each animal box is cut with the
crop settings (padding, square) that also cut a stored image when it is embedded again, so that
queries and gallery are cut alike.

Photos of one request are one encounter: when each photo holds at most one animal, those animals
are one individual seen several times, fused into one query; a photo with several animals makes
each detection an animal of its own.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from reid.data.classes import normalise_viewpoint
from reid.errors import DataError, InvalidInput
from reid.species.crops import ANIMAL, HUMAN_CATEGORIES, VEHICLE, CropSettings, confident
from reid.species.jsoncheck import Position
from reid.species.megadetector import image_detections
from reid.identify.photos import Upload, parse_bbox

Box = tuple[float, float, float, float]


@dataclass
class View:
    """One photo's view of an animal: the photo, the box (None: the whole photo), the crop, and the
    crop preprocessed for the model of the animal's species."""
    image: int
    box: Box | None
    conf: float | None
    crop: np.ndarray
    tensor: object | None = None


@dataclass
class Animal:
    views: list[View]
    source: str                      # bbox, megadetector (request's detections), a detector's name, whole-image
    too_small: bool = False
    species: str | None = None
    species_score: float | None = None
    species_source: str | None = None  # request, classifier, store


@dataclass
class PhotoSummary:
    index: int
    filename: str | None
    outcome: str  # animal, blank, human, vehicle
    animals: int = 0
    humans: int = 0
    vehicles: int = 0


def parse_detections(texts: list[str], n_images: int) -> list | None:
    """The request's `detections`: one MegaDetector `detections` list (JSON) per photo, as tables."""
    if not texts:
        return None
    if len(texts) != n_images:
        raise InvalidInput(f"{len(texts)} detections fields for {n_images} images: give one per image (the "
                           "'detections' list of MegaDetector's output for it, [] for a blank photo)",
                           code="invalid_detections")
    tables = []
    for index, text in enumerate(texts):
        at = Position(f"detections[{index}]")
        try:
            tables.append(image_detections(_load_json(text, f"detections[{index}]"), str(index), at))
        except DataError as exc:
            raise InvalidInput(str(exc), code="invalid_detections") from None
    return tables


def _load_json(text: str, what: str):
    """JSON a client sent, or a DataError that says why not: malformed, nested deeper than the parser
    recurses, or a number of more digits than Python converts (all of them plain client errors)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{what} is not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise DataError(f"{what} is nested too deeply to be MegaDetector detections") from None
    except ValueError as exc:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        raise DataError(f"{what} is not usable JSON ({exc})") from None


def plan_bboxes(texts: list[str], n_images: int, multi_animal: bool) -> list[list[tuple[int, Box | None]]]:
    """Animals, each a list of (image index, bbox or None) to embed and fuse.

    No bbox: every image whole, one animal. One bbox: applied to every image. One per image: each
    image its own. Several bboxes for a single image (identify only): one animal per bbox.
    """
    boxes = [parse_bbox(text, i) for i, text in enumerate(texts)]
    if not boxes:
        return [[(i, None) for i in range(n_images)]]
    if len(boxes) == 1:
        return [[(i, boxes[0]) for i in range(n_images)]]
    if len(boxes) == n_images:
        return [[(i, box) for i, box in enumerate(boxes)]]
    if n_images == 1 and multi_animal:
        return [[(0, box)] for box in boxes]
    raise InvalidInput(f"{len(boxes)} bboxes for {n_images} images: give none, one for every image, or one per "
                       "image" + (" (or several for a single image)" if multi_animal else ""), code="invalid_bbox")


def plan_viewpoints(texts: list[str], n_images: int) -> list[str | None]:
    """The viewpoint (flank) each photo shows, normalised (None: unknown): none given, every photo's is
    unknown; one, every photo shows it; else one per photo."""
    viewpoints = []
    for index, text in enumerate(texts):
        try:
            viewpoints.append(normalise_viewpoint(text))
        except ValueError as exc:
            raise InvalidInput(f"viewpoint[{index}] {text!r}: {exc}", code="invalid_viewpoint") from None
    if not viewpoints:
        return [None] * n_images
    if len(viewpoints) == 1:
        return viewpoints * n_images
    if len(viewpoints) == n_images:
        return viewpoints
    raise InvalidInput(f"{len(viewpoints)} viewpoints for {n_images} images: give none, one for every image, or one "
                       "per image", code="invalid_viewpoint")


def _view(upload: Upload, index: int, box: Box | None, conf: float | None, crops: CropSettings) -> View:
    return View(index, box, conf, crops.cut(upload.array, box) if box else upload.array)


def given_animals(uploads: list[Upload], plan: list, crops: CropSettings) -> tuple[list[Animal], list[PhotoSummary]]:
    """The animals the request's bboxes (or whole photos) say."""
    source = "bbox" if any(box for animal in plan for _, box in animal) else "whole-image"
    animals = [Animal([_view(uploads[i], i, box, None, crops) for i, box in animal], source) for animal in plan]
    counts = [0] * len(uploads)
    for animal in animals:
        for view in animal.views:
            counts[view.image] += 1
    summaries = [PhotoSummary(i, u.filename, "animal", counts[i]) for i, u in enumerate(uploads)]
    return animals, summaries


def detected_animals(uploads: list[Upload], tables: list, crops: CropSettings, source: str,
                     fuse: bool) -> tuple[list[Animal], list[PhotoSummary]]:
    """The confident animal detections of each photo (its detection table), and what each photo holds.

    With `fuse`, when no photo holds more than one animal, those animals are one (the encounter's)."""
    per_photo: list[list[Animal]] = []
    summaries = []
    for index, (upload, table) in enumerate(zip(uploads, tables)):
        kept = confident(table, crops).sort_values("detection")
        height, width = upload.array.shape[:2]
        found = []
        for row in kept[kept["category"] == ANIMAL].itertuples():
            box = (float(row.x), float(row.y), float(row.w), float(row.h))
            found.append(Animal([_view(upload, index, box, float(row.conf), crops)], source,
                                too_small=crops.too_small(box, width, height)))
        humans = int(kept["category"].isin(HUMAN_CATEGORIES).sum())
        vehicles = int((kept["category"] == VEHICLE).sum())
        outcome = "animal" if found else "human" if humans else "vehicle" if vehicles else "blank"
        summaries.append(PhotoSummary(index, upload.filename, outcome, len(found), humans, vehicles))
        per_photo.append(found)
    animals = [a for found in per_photo for a in found]
    if fuse and len(animals) > 1 and all(len(found) <= 1 for found in per_photo):
        usable = [a for a in animals if not a.too_small]
        if usable:
            animals = [Animal([a.views[0] for a in usable], source)]
    return animals, summaries


def enrollable(animals: list[Animal], summaries: list[PhotoSummary]) -> list[Animal]:
    """The request's animals when each photo shows exactly one, large enough to re-identify; else a 422
    that says which photos do not and what to send instead."""
    problems = [f"image {s.index} ({s.filename or 'no name'}) shows "
                + ("no animal" if s.animals == 0 else f"{s.animals} animals")
                for s in summaries if s.animals != 1]
    problems += [f"image {a.views[0].image}: the animal's box is under the minimum crop size"
                 for a in animals if a.too_small]
    if problems:
        raise InvalidInput("to enroll, every photo must show one animal: " + "; ".join(problems)
                           + ". Send a 'bbox' per photo to say which animal it is", code="not_one_animal")
    return animals


@dataclass
class Found:
    """The decoded photos of a request, the animals in them, and what each photo holds."""
    uploads: list[Upload]
    animals: list[Animal]
    photos: list[PhotoSummary]
