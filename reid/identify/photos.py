"""Photos as the identification core takes them: decoded safely, within memory, as the models need them.

Decoding checks, in order: the file is not empty; Pillow recognises it as an allowed format; its
width x height (read from the header, before any pixel is decoded) is within `max_pixels`, which
stops decompression bombs; it decodes completely (a truncated JPEG is an error, not a grey
bottom). EXIF orientation is applied, as `reid.data.dataset.read_image` does. A photo taken
whole is decoded at a reduced DCT scale (JPEG) or reduced after decoding (other formats) down to
twice the model's input size (`draft_size`); one that boxes are cut from is kept at no more than
`kept_pixels`. Each decode's memory is reserved from the request's `Lease` of the decoding budget
(the service's budget, service/budget.py) before it starts; without a lease nothing is reserved.

Stored, a photo's file is STORE/images/ab/abcdef....ext, named by the SHA-256 of its bytes
(`Upload.relpath`; written by reid.store.files.store_file).
"""
from __future__ import annotations

import hashlib
import io
import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from reid.errors import InvalidInput, TooLarge, UnsupportedMedia

ORIENTATION = 0x0112
TRANSPOSING = {5, 6, 7, 8}  # EXIF orientations that swap width and height
# each EXIF orientation's transposition, as ImageOps.exif_transpose applies it
ORIENTING = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
             5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_90}
JPEG_SCALES = (8, 4, 2, 1)  # the DCT scales libjpeg decodes at, largest reduction first
REDUCIBLE_MODES = {"L", "RGB", "RGBA", "CMYK", "YCbCr", "LA", "I", "F"}  # what Image.reduce takes as it is
KEPT_COPY_BYTES = 4 + 4 + 4 + 3  # per kept pixel: reduced and resized images, their RGB conversion, the array
# uploads past max_pixels are refused explicitly; Pillow's warning between 1x and 2x its limit is noise here
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif", "GIF": ".gif"}
MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "BMP": "image/bmp",
               "TIFF": "image/tiff", "GIF": "image/gif"}


@dataclass(frozen=True)
class PhotoLimits:
    """What a photo may be: the service's settings, and identify-batch's defaults (the same)."""
    max_pixels: int = 50_000_000          # width x height of a file (decompression bombs)
    max_decoded_pixels: int = 12_000_000  # a photo boxes are cut from is kept at no more pixels
    allowed_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")


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


def _label(index: int | None, filename: str | None) -> str:
    """How messages name a photo: by its place in a request (index) and its file name."""
    return ("the photo" if index is None else f"images[{index}]") + (f" '{filename}'" if filename else "")


def decode_upload(data: bytes, index: int | None, filename: str | None, max_pixels: int, allowed_formats,
                  draft_size: int | None = None, kept_pixels: int | None = None, lease=None) -> Upload:
    """The photo decoded to RGB, checked as the module says.

    `draft_size`: the photo is taken whole, so it is decoded (JPEG) or reduced (other formats) down to
    no less than this on its shorter side. `kept_pixels`: what is kept is at most this many pixels
    (boxes are cut from it). `lease`: the request's share of the decoding memory budget, which the
    decode's bytes are reserved from (waiting for room; 413 past the limits)."""
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
            raise TooLarge(f"{label} is {width}x{height} = {width * height} pixels; the limit is "
                                  f"{max_pixels} pixels", code="too_many_pixels")
        if width < 1 or height < 1:
            raise InvalidInput(f"{label} has no pixels ({width}x{height})", code="corrupt_image")
        array, orientation = _decode(image, draft_size, kept_pixels, lease, label)
        if orientation in TRANSPOSING:
            width, height = height, width  # the photo as shown, as the decoded array is
    except UnidentifiedImageError as exc:
        raise UnsupportedMedia(f"{label} is not an image Pillow can read ({type(exc).__name__})",
                               code="not_an_image") from None
    except Image.DecompressionBombError:
        raise TooLarge(f"{label} has too many pixels (a possible decompression bomb); the limit is "
                              f"{max_pixels} pixels", code="too_many_pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError) as exc:
        raise InvalidInput(f"{label} is truncated or corrupt and cannot be decoded ({exc})",
                           code="corrupt_image") from None
    # width and height are the file's own, not those of a reduced-scale (draft) decoding
    return Upload(data, filename, hashlib.sha256(data).hexdigest(), fmt, int(width), int(height), array)


def _kept_size(width: int, height: int, draft_size: int | None, kept_pixels: int | None) -> tuple[int, int]:
    """The size a photo is reduced to: its shorter side no less than `draft_size` (by an integer factor,
    as a JPEG draft decodes it), and at most `kept_pixels` pixels."""
    if draft_size:
        factor = max(1, min(width // draft_size, height // draft_size))
        width, height = max(1, width // factor), max(1, height // factor)
    if kept_pixels and width * height > kept_pixels:
        scale = math.sqrt(kept_pixels / (width * height))
        width, height = max(1, int(width * scale)), max(1, int(height * scale))
    return width, height


def _decode(image: Image.Image, draft_size: int | None, kept_pixels: int | None, lease,
            label: str) -> tuple[np.ndarray, int | None]:
    """Decode (at a reduced DCT scale for JPEG), reduce to the kept size, orient, convert to RGB, all
    within the bytes reserved from the lease: Pillow's decoded image, one converted full-size copy
    when the mode cannot be reduced as it is, and the kept copies (reduced, RGB, array). Returns the
    array and the EXIF orientation, read once the pixels are (a PNG's EXIF may follow them: Pillow
    decodes the whole image to find it)."""
    if image.format == "JPEG":
        _draft_within(image, draft_size, kept_pixels, lease.allowance() if lease else None)
        kept = _kept_size(*image.size, None, kept_pixels)
    else:
        kept = _kept_size(*image.size, draft_size, kept_pixels)
    cost = _decode_cost(image.size, image.mode, kept)
    width, height = image.size
    convert = image.mode not in REDUCIBLE_MODES
    with lease.decoding(cost, label) if lease else nullcontext(lambda _: None) as keep:
        image.load()
        orientation = image.getexif().get(ORIENTATION)
        if convert:
            image = _replace(image, image.convert("RGBA" if "transparency" in image.info or "A" in image.mode
                                                  else "RGB"))
        factors = (max(1, width // kept[0]), max(1, height // kept[1]))
        if factors != (1, 1):
            image = _replace(image, image.reduce(factors))
        if kept_pixels and image.width * image.height > kept_pixels:
            image = _replace(image, image.resize(kept, Image.Resampling.BOX))
        if orientation in ORIENTING:
            image = image.transpose(ORIENTING[orientation])
        array = np.asarray(image.convert("RGB"))
        keep(array.nbytes)
    return array, orientation


def _decode_cost(size: tuple[int, int], mode: str, kept: tuple[int, int]) -> int:
    """Bytes a decode takes at its peak (see `_decode`)."""
    convert = mode not in REDUCIBLE_MODES
    return size[0] * size[1] * (_pixel_bytes(mode) + 4 * convert) + kept[0] * kept[1] * KEPT_COPY_BYTES


def _draft_within(image: Image.Image, draft_size: int | None, kept_pixels: int | None,
                  allowance: int | None) -> None:
    """Set a JPEG's DCT scale: the smallest still at least the size wanted (twice the model input, or
    the kept bound); larger scales still when that decode would not fit the budget's `allowance`."""
    width, height = image.size
    wanted = (draft_size, draft_size) if draft_size else _kept_size(width, height, None, kept_pixels)
    scale = next(s for s in JPEG_SCALES if s <= max(1, min(width // wanted[0], height // wanted[1])))
    for larger in (s for s in reversed(JPEG_SCALES) if s >= scale):
        size = (-(-width // larger), -(-height // larger))
        scale = larger
        if allowance is None or _decode_cost(size, image.mode, _kept_size(*size, None, kept_pixels)) <= allowance:
            break
    image.draft("RGB", (width // scale, height // scale))


def _replace(image: Image.Image, smaller: Image.Image) -> Image.Image:
    image.close()  # its pixels are freed now, not when the caller's reference goes
    return smaller


def _pixel_bytes(mode: str) -> int:
    """Bytes per pixel of a decoded image in Pillow's memory (multi-band modes take 4)."""
    return 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4


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
