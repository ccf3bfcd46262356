"""Stored images as model inputs again, for a model that did not embed them.

One routine for the service (at start, after a model or crop change: the vectors are written back
to the store) and identify-batch (read only: the vectors are used for its run). A stored image is
its file, verified against its SHA-256, decoded as an upload is (a box is cut from the photo kept
at up to `max_decoded_pixels`; a whole photo is decoded down to twice the model's input), and cut
by its box with the same crop settings as a query.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np

from reid.errors import ReidError
from reid.identify.photos import PhotoLimits, decode_upload, parse_bbox
from reid.species.crops import CropSettings
from reid.store import FileIntegrity, Store

log = logging.getLogger("wildreid.identify")

Embed = Callable[[list[np.ndarray]], np.ndarray]  # model inputs (RGB arrays) -> L2-normalised vectors


def stored_view(store_dir: Path, row: dict, crops: CropSettings, limits: PhotoLimits, image_size: int,
                integrity: FileIntegrity | None = None) -> np.ndarray | None:
    """The model input of a stored image (row: id, path, sha256, bbox); None when its file is corrupt,
    missing or undecodable (logged, and recorded in `integrity`)."""
    integrity = integrity or FileIntegrity()
    if integrity.check(store_dir, row["path"], row["sha256"], row["id"]):
        return None
    box = parse_bbox(row["bbox"]) if row["bbox"] else None
    try:
        data = (store_dir / row["path"]).read_bytes()
        upload = decode_upload(data, 0, row["path"], limits.max_pixels, limits.allowed_formats,
                               None if box else 2 * image_size, limits.max_decoded_pixels)
    except (OSError, ReidError) as exc:
        log.error("stored image %d (%s) cannot be embedded again: %s", row["id"], row["path"], exc)
        return None
    return crops.cut(upload.array, box) if box else upload.array


def reembed_stale(store: Store, species: str, stamp: str, embed: Embed,
                  view: Callable[[dict], np.ndarray | None],
                  keep: Callable[[dict[int, np.ndarray]], None], batch_size: int = 32) -> tuple[int, int]:
    """Embed the images of `species` whose vectors another model made (`stamp` is this model's),
    `batch_size` at a time; `keep` receives each batch's {image id: vector}. Returns (embedded,
    skipped): skipped images' files could not be read (see `stored_view`)."""
    done = skipped = after = 0
    while rows := store.stale_images(species, stamp, after, limit=batch_size):
        after = rows[-1]["id"]
        arrays = {row["id"]: view(row) for row in rows}
        usable = {image_id: array for image_id, array in arrays.items() if array is not None}
        skipped += len(arrays) - len(usable)
        if usable:
            keep(dict(zip(usable, embed(list(usable.values())))))
        done += len(usable)
    return done, skipped
