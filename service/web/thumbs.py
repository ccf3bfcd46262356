"""Thumbnails of stored images, made once and kept under STORE/cache/thumbs.

A thumbnail is named by the image file's SHA-256, its box and its size, so it never goes stale (the
file of an image never changes) and the same photo enrolled twice shares it. It shows the animal's
box when the image has one (what the model compared), else the whole photo. Written to a temporary
file and renamed into place, so a reader never sees half a JPEG and concurrent requests for the same
thumbnail simply both write it.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from PIL import Image, ImageOps

from reid.identify.photos import parse_bbox

SIZES = {"small": 240, "large": 720}
PADDING = 0.05  # of the box's size, on every side, as the model's crops are cut


def thumbnail_path(cache_dir: Path, sha256: str, bbox: str | None, size: int) -> Path:
    box = hashlib.sha256(bbox.encode()).hexdigest()[:12] if bbox else "whole"
    return cache_dir / sha256[:2] / f"{sha256}-{box}-{size}.jpg"


def make_thumbnail(source: Path, target: Path, bbox: str | None, size: int) -> Path:
    """The thumbnail of `source` (cut to `bbox`, normalised x,y,w,h) at most `size` px, written atomically."""
    with Image.open(source) as opened:
        opened.draft("RGB", (size * 4, size * 4))  # JPEGs: decoded at a reduced scale that still fits the crop
        image = ImageOps.exif_transpose(opened).convert("RGB")
    if bbox:
        x, y, w, h = parse_bbox(bbox)
        pad_w, pad_h = w * PADDING, h * PADDING
        width, height = image.size
        image = image.crop((max(0, round((x - pad_w) * width)), max(0, round((y - pad_h) * height)),
                            min(width, round((x + w + pad_w) * width)), min(height, round((y + h + pad_h) * height))))
    image.thumbnail((size, size))
    write_jpeg(image, target)
    return target


def write_jpeg(image: Image.Image, target: Path, quality: int = 85) -> None:
    """`image` as a JPEG at `target`: written to a temporary file beside it, then renamed into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".jpg")
    try:
        with os.fdopen(handle, "wb") as out:
            image.save(out, format="JPEG", quality=quality)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
