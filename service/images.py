"""Uploads: read within the size limit, decode safely, store content-addressed.

Decoding checks, in order: the file is not empty; Pillow recognises it as an allowed format; its
width x height (read from the header, before any pixel is decoded) is within `max_pixels`, which
stops decompression bombs; it decodes completely (a truncated JPEG is an error, not a grey
bottom). EXIF orientation is applied, as `reid.data.dataset.read_image` does. Large JPEGs are
decoded at a reduced DCT scale still at least twice the model's input size (`draft`).

Files are stored under STORE/images/ab/abcdef....ext, named by the SHA-256 of their bytes, written
atomically (temporary file, fsync, rename) before the database row that references them commits.
"""
from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import UploadFile
from PIL import Image, ImageOps, UnidentifiedImageError

from reid.io import atomic_path
from service.errors import (ApiError, InsufficientStorage, InvalidInput, PayloadTooLarge, StorageUnavailable,
                            UnsupportedMedia)
from service.upkeep import MISSING, file_problem

log = logging.getLogger("wildreid.service")

READ_CHUNK = 1024 * 1024
ORIENTATION = 0x0112
TRANSPOSING = {5, 6, 7, 8}  # EXIF orientations that swap width and height
# uploads past max_pixels are refused explicitly; Pillow's warning between 1x and 2x its limit is noise here
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif", "GIF": ".gif"}
MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "BMP": "image/bmp",
               "TIFF": "image/tiff", "GIF": "image/gif"}


@dataclass
class Upload:
    data: bytes
    filename: str | None
    sha256: str
    format: str
    width: int
    height: int
    array: np.ndarray  # RGB uint8, EXIF orientation applied

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES.get(self.format, "application/octet-stream")

    @property
    def relpath(self) -> str:
        return f"images/{self.sha256[:2]}/{self.sha256}{EXTENSIONS.get(self.format, '.bin')}"


def _label(index: int, filename: str | None) -> str:
    return f"images[{index}]" + (f" ('{filename}')" if filename else "")


async def read_upload(file: UploadFile, index: int, max_bytes: int) -> bytes:
    """The bytes of one uploaded file, refused as soon as it passes `max_bytes`."""
    size = getattr(file, "size", None)
    if size is not None and size > max_bytes:
        raise PayloadTooLarge(f"{_label(index, file.filename)} is {size} bytes; the limit is {max_bytes} bytes",
                              code="file_too_large")
    chunks, total = [], 0
    while True:
        chunk = await file.read(READ_CHUNK)
        if not chunk:
            break
        total += len(chunk)
        if total > max_bytes:
            raise PayloadTooLarge(f"{_label(index, file.filename)} is larger than the limit of {max_bytes} bytes",
                                  code="file_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def decode_upload(data: bytes, index: int, filename: str | None, max_pixels: int, allowed_formats,
                  draft_size: int | None = None) -> Upload:
    label = _label(index, filename)
    if not data:
        raise InvalidInput(f"{label} is empty (0 bytes)", code="empty_file")
    try:
        # Image.open reads the header only; Pillow's own bomb check (MAX_IMAGE_PIXELS, set by the app to
        # max_pixels) raises past twice the limit, and the explicit check below refuses anything past it
        image = Image.open(io.BytesIO(data))
        fmt = image.format
        width, height = image.size
        if fmt not in allowed_formats:
            raise UnsupportedMedia(f"{label} is {fmt}; accepted formats: {', '.join(allowed_formats)}",
                                   code="unsupported_format")
        if width * height > max_pixels:
            raise PayloadTooLarge(f"{label} is {width}x{height} = {width * height} pixels; the limit is "
                                  f"{max_pixels} pixels", code="too_many_pixels")
        if width < 1 or height < 1:
            raise InvalidInput(f"{label} has no pixels ({width}x{height})", code="corrupt_image")
        if image.getexif().get(ORIENTATION) in TRANSPOSING:
            width, height = height, width  # the photo as shown, as the decoded array is
        if draft_size and fmt == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        image.load()
        image = ImageOps.exif_transpose(image).convert("RGB")
        array = np.asarray(image)
    except UnidentifiedImageError as exc:
        raise UnsupportedMedia(f"{label} is not an image Pillow can read ({type(exc).__name__})",
                               code="not_an_image") from None
    except Image.DecompressionBombError:
        raise PayloadTooLarge(f"{label} has too many pixels (a possible decompression bomb); the limit is "
                              f"{max_pixels} pixels", code="too_many_pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError) as exc:
        raise InvalidInput(f"{label} is truncated or corrupt and cannot be decoded ({exc})",
                           code="corrupt_image") from None
    # width and height are the file's own, not those of a reduced-scale (draft) decoding
    return Upload(data, filename, hashlib.sha256(data).hexdigest(), fmt, int(width), int(height), array)


def parse_bbox(text: str, index: int = 0) -> tuple[float, float, float, float]:
    """`x,y,w,h` (or `[x, y, w, h]`), normalised to the image: 0 <= x, y and x + w, y + h <= 1."""
    raw = text.strip().strip("[]()")
    try:
        values = tuple(float(v) for v in raw.replace(" ", ",").split(",") if v)
    except ValueError:
        values = ()
    if len(values) != 4:
        raise InvalidInput(f"bbox[{index}] '{text}' is not four numbers x,y,w,h (normalised to 0..1)",
                           code="invalid_bbox")
    x, y, w, h = values
    eps = 1e-6
    if not all(np.isfinite(values)) or w <= 0 or h <= 0 or x < -eps or y < -eps or x + w > 1 + eps or y + h > 1 + eps:
        raise InvalidInput(f"bbox[{index}] {text!r} is outside the image: need 0 <= x, y; w, h > 0; x + w <= 1; "
                           "y + h <= 1 (normalised)", code="invalid_bbox")
    return x, y, w, h


DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def store_file(store_dir: Path, upload: Upload) -> str:
    """Write the upload under its content address; return its path relative to the store.

    A file already there is kept when it is this photo (its SHA-256 checked: a file changed on disk
    is replaced) and its time refreshed, so that the orphan sweep (service/upkeep.py) does not take
    it before the row that names it commits. A full disk is a 507 and any other failing write a
    503; the temporary file of a write cut short is removed, so nothing half-written is left."""
    path = store_dir / upload.relpath
    try:
        problem = file_problem(path, upload.sha256)
        if problem is None:
            os.utime(path)
        else:
            if problem != MISSING:
                log.warning("replacing stored image file %s: %s", upload.relpath, problem)
            with atomic_path(path) as tmp:
                tmp.write_bytes(upload.data)
            _fsync_dir(path.parent)
    except OSError as exc:
        raise file_write_error(exc, upload.relpath) from None
    return upload.relpath


def file_write_error(exc: OSError, relpath: str) -> ApiError:
    if exc.errno in DISK_FULL:
        return InsufficientStorage("the disk of the image store is full: the photo could not be stored and nothing "
                                   "was recorded; free disk space and send the request again")
    return StorageUnavailable(f"the image store could not write {relpath} ({exc.strerror or exc}); nothing was "
                              "recorded, try again")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
