"""MegaDetector batch-output JSON, read into and written from a detection table.

The format (https://lila.science/megadetector-output-format): `images[]`, each with `file` and
either `detections[]` (`category` id, `conf`, `bbox` = normalised [x_min, y_min, width, height])
or `failure`; `detection_categories` maps the ids to names; `info` describes the run. SpeciesNet,
the MegaDetector family and our synthetic scenes all produce it, so it is the one detection table
the rest of the pipeline reads.

The table has one row per detection: `file`, `detection` (its index in the image's list),
`category` (the name), `conf`, `x`, `y`, `w`, `h` (normalised) and `failure` (""). An image
without detections keeps one row with `detection` -1, an empty category and NaN numbers, so that
it can be reported as blank; an image that failed does too, with the reason in `failure`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from reid.errors import DataError
from reid.io import write_json
from reid.species.jsoncheck import Position, bbox, entries, field, load_json, unit_number

DEFAULT_CATEGORIES = {"1": "animal", "2": "person", "3": "vehicle"}
COLUMNS = ["file", "detection", "category", "conf", "x", "y", "w", "h", "failure"]
NO_DETECTION = -1  # `detection` of the row that stands for an image with no detection
FORMAT_VERSION = "1.4"
COORD_DIGITS, CONF_DIGITS = 4, 3  # MegaDetector's own rounding


def detection_table(rows: Iterable[tuple]) -> pd.DataFrame:
    """A typed detection table from tuples in COLUMNS order."""
    table = pd.DataFrame(list(rows), columns=COLUMNS)
    return table.astype({"file": str, "detection": np.int64, "category": str, "conf": np.float64, "x": np.float64,
                         "y": np.float64, "w": np.float64, "h": np.float64, "failure": str})


def image_row(file: str, failure: str = "") -> tuple:
    """The row of an image with no detection (blank, or failed with `failure`)."""
    return (file, NO_DETECTION, "", np.nan, np.nan, np.nan, np.nan, np.nan, failure)


def read_megadetector(path: str | Path) -> pd.DataFrame:
    """The detection table of a MegaDetector batch-output file; DataError names any malformed entry."""
    doc = load_json(path, "MegaDetector output")
    top = Position(path)
    if not isinstance(doc, dict):
        raise top.error("the top level must be an object with 'images' and 'detection_categories'")
    field(doc, "info", dict, top, required=False)
    categories = _categories(field(doc, "detection_categories", dict, top), top / "detection_categories")
    rows: list[tuple] = []
    seen: dict[str, int] = {}
    for index, image in enumerate(entries(field(doc, "images", list, top), top / "images", "images")):
        at = top / "images" / index
        file = field(image, "file", str, at)
        if file in seen:
            raise (at / "file").error(f"'{file}' is listed twice (also at images[{seen[file]}])")
        seen[file] = index
        rows += _image_rows(image, file, categories, at)
    return detection_table(rows)


def image_detections(detections, file: str, at: Position,
                     categories: dict[str, str] = DEFAULT_CATEGORIES) -> pd.DataFrame:
    """The detection table of one image from its `detections` list as MegaDetector writes it
    (`images[i].detections`; category ids as in `categories`); DataError names a malformed entry."""
    if not isinstance(detections, list):
        raise at.error("must be a list of detections [{\"category\": \"1\", \"conf\": 0.9, \"bbox\": [x, y, w, h]}]")
    return detection_table(_image_rows({"detections": detections}, file, categories, at))


def _categories(value: dict, at: Position) -> dict[str, str]:
    for key, name in value.items():
        if not isinstance(name, str) or not name:
            raise (at / key).error(f"category names must be non-empty strings, got {name!r}")
    return value


def _image_rows(image: dict, file: str, categories: dict[str, str], at: Position) -> list[tuple]:
    failure = field(image, "failure", (str, type(None)), at, required=False)
    detections = field(image, "detections", (list, type(None)), at, required=False)
    if failure:
        if detections:
            raise at.error("has both a 'failure' and detections; a failed image has none")
        return [image_row(file, failure)]
    if detections is None:
        raise at.error("has neither 'detections' (a list, empty for a blank image) nor 'failure'")
    rows = []
    for index, detection in enumerate(entries(detections, at / "detections", "detections")):
        where = at / "detections" / index
        category = field(detection, "category", str, where)
        if category not in categories:
            known = ", ".join(f"'{k}' ({v})" for k, v in categories.items())
            raise (where / "category").error(f"unknown category id '{category}'; detection_categories has {known}")
        rows.append((file, index, categories[category], unit_number(detection, "conf", where),
                     *bbox(detection, where), ""))
    return rows or [image_row(file)]


def write_megadetector_json(path: str | Path, table: pd.DataFrame, info: dict | None = None,
                            categories: dict[str, str] = DEFAULT_CATEGORIES) -> None:
    """Write a detection table (COLUMNS) as MegaDetector batch output, atomically.

    Images keep the table's order; `info` adds to {"format_version": "1.4"}; `categories` maps ids
    to the names used in the table's `category` column.
    """
    missing = [column for column in COLUMNS if column not in table.columns]
    if missing:
        raise DataError(f"cannot write '{path}': the detection table lacks columns {', '.join(missing)}")
    ids = {name: key for key, name in categories.items()}
    detected = table[table["detection"] != NO_DETECTION]
    unknown = sorted(set(detected["category"]) - set(ids))
    if unknown:
        raise DataError(f"cannot write '{path}': categories {', '.join(unknown)} are not in {categories}")
    images = []
    for file, rows in table.groupby("file", sort=False):
        failure = next((f for f in rows["failure"] if f), "")
        if failure:
            images.append({"file": file, "failure": failure, "detections": None})
            continue
        rows = rows[rows["detection"] != NO_DETECTION].sort_values("detection")
        images.append({"file": file, "detections": [
            {"category": ids[row.category], "conf": round(float(row.conf), CONF_DIGITS),
             "bbox": [round(float(v), COORD_DIGITS) for v in (row.x, row.y, row.w, row.h)]}
            for row in rows.itertuples()]})
    write_json(path, {"info": {"format_version": FORMAT_VERSION, **(info or {})},
                      "detection_categories": dict(categories), "images": images})
