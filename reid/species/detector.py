"""Detectors: something that finds animals, people and vehicles in a photo.

`MegaDetector` runs a local weights file of the MegaDetector v6 family (ultralytics YOLOv9,
YOLOv10 and RT-DETR networks) through the `ultralytics` package, an optional dependency
(AGPL-3.0, and heavy): `pip install "wildreid[detector]"`. MegaDetector v5 files cannot be read
by it (they pickle classes of the old yolov5 repository); run MDv5 with the `megadetector`
package and pass its JSON output instead. `WholeImageDetector` stands in when photos are already
cropped to one animal.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np
import pandas as pd
from PIL import Image

from reid.data.dataset import read_image
from reid.errors import DataError, ReidError
from reid.species.megadetector import COORD_DIGITS, CONF_DIGITS, detection_table, image_row

# MegaDetector's classes in network order; its JSON ids are these positions plus one
MEGADETECTOR_CLASSES = ("animal", "person", "vehicle")
INSTALL_HINT = 'pip install "wildreid[detector]"'
# Set before ultralytics is first imported, which is when it reads them: never reach the network
# (it would otherwise look for weights, fonts and updates online, and send usage events), never
# pip-install a missing module on its own, and keep quiet. A caller's own settings are kept.
ULTRALYTICS_ENV = {"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "false", "YOLO_VERBOSE": "false"}


@dataclass(frozen=True)
class Detection:
    category: str                            # "animal", "person" or "vehicle"
    conf: float
    bbox: tuple[float, float, float, float]  # normalised x_min, y_min, width, height


class Detector(Protocol):
    def detect(self, image: np.ndarray) -> list[Detection]:
        """Detections in an RGB uint8 HxWx3 image."""
        ...


class WholeImageDetector:
    """Every photo is one animal filling the frame: for collections already cropped to the animal."""

    def detect(self, image: np.ndarray) -> list[Detection]:
        return [Detection("animal", 1.0, (0.0, 0.0, 1.0, 1.0))]


def _ultralytics():
    for name, value in ULTRALYTICS_ENV.items():
        os.environ.setdefault(name, value)
    try:
        import ultralytics
    except ImportError:
        raise ReidError(f"running MegaDetector needs the ultralytics package: {INSTALL_HINT}") from None
    # ultralytics replaces PIL.Image.open with a version that, on any file Pillow cannot identify, tries
    # to install a HEIF plugin (and raises ModuleNotFoundError where it cannot): an upload that is not an
    # image must stay a clear 4xx, so Pillow's own function is put back
    patches = sys.modules.get("ultralytics.utils.patches")
    if patches is not None and hasattr(patches, "_image_open"):
        Image.open = patches._image_open
    return ultralytics


class MegaDetector:
    """A MegaDetector v6 network from a local `.pt` file, on `device`.

    `threshold` is the lowest confidence kept (MegaDetector keeps down to 0.005-0.01 in its JSON and
    leaves the decision to the reader; crops.CropSettings applies the per-category thresholds).
    `image_size` is the network's input side; None uses the size the file was trained at.
    """

    def __init__(self, weights: str | Path, threshold: float = 0.01, device: str = "cpu",
                 image_size: int | None = None):
        weights = Path(weights)
        # ultralytics downloads a file it cannot find by that name: check first, and keep it offline
        if not weights.is_file():
            raise ReidError(f"MegaDetector weights file '{weights}' not found; give the path of a local "
                            "MegaDetector v6 .pt file")
        if weights.suffix != ".pt":
            raise ReidError(f"MegaDetector weights file '{weights}' is not a .pt file (ultralytics checkpoint)")
        if not 0.0 <= threshold <= 1.0:
            raise ReidError(f"detection threshold {threshold} is not between 0 and 1")
        self.model = _load(weights, _ultralytics())
        classes = len(self.model.names)
        if classes != len(MEGADETECTOR_CLASSES):
            names = ", ".join(map(str, self.model.names.values()))
            raise ReidError(f"'{weights}' detects {classes} classes ({names}); a MegaDetector network detects 3: "
                            "animal, person, vehicle")
        self.weights, self.threshold, self.device, self.image_size = weights, threshold, device, image_size

    def detect(self, image: np.ndarray) -> list[Detection]:
        options = {"imgsz": self.image_size} if self.image_size else {}
        # ultralytics reads numpy images as OpenCV does, in BGR order
        bgr = np.ascontiguousarray(image[..., ::-1])
        result = self.model.predict(bgr, conf=self.threshold, device=self.device, verbose=False, save=False,
                                    **options)[0]
        boxes = result.boxes
        corners = boxes.xyxyn.cpu().numpy().clip(0, 1)
        return [Detection(MEGADETECTOR_CLASSES[int(cls)], float(conf), (x0, y0, x1 - x0, y1 - y0))
                for (x0, y0, x1, y1), cls, conf in zip(corners.tolist(), boxes.cls.cpu().numpy(),
                                                         boxes.conf.cpu().numpy())]


def _load(weights: Path, ultralytics):
    try:
        # YOLO() recognises an RT-DETR checkpoint by its head and switches to RT-DETR's predictor
        model = ultralytics.YOLO(str(weights))
    except (TypeError, ModuleNotFoundError) as exc:
        cause = exc.__cause__
        if isinstance(cause, ModuleNotFoundError) and cause.name and cause.name.split(".")[0] == "models":
            raise ReidError(f"'{weights}' is a MegaDetector v5 (yolov5 repository) file, which ultralytics cannot "
                            "load; use a MegaDetector v6 file, or run MDv5 with the megadetector package and "
                            "give its JSON output") from None
        raise ReidError(f"'{weights}' is not an ultralytics detection checkpoint: {exc}") from None
    if model.task != "detect":
        raise ReidError(f"'{weights}' is an ultralytics {model.task} model; MegaDetector is a detection model")
    return model


def detection_rows(file: str, found: list[Detection]) -> pd.DataFrame:
    """The detection table of one image's detections, rounded as MegaDetector's JSON rounds them, so
    that detections run here and those read from its files are cropped alike."""
    rows = [(file, index, d.category, round(d.conf, CONF_DIGITS), *(round(v, COORD_DIGITS) for v in d.bbox), "")
            for index, d in enumerate(found)]
    return detection_table(rows or [image_row(file)])


def detect_images(detector: Detector, files: Iterable[str], root: str | Path | None = None) -> pd.DataFrame:
    """Run `detector` on image files: the MegaDetector detection table (unreadable images fail).

    `files` are named in the table as given; relative ones are read from `root` if given.
    """
    tables = []
    for file in files:
        try:
            image = read_image(os.path.join(root, file) if root else file)
        except DataError as exc:
            tables.append(detection_table([image_row(file, str(exc))]))
            continue
        tables.append(detection_rows(file, detector.detect(image)))
    return pd.concat(tables, ignore_index=True) if tables else detection_table([])
