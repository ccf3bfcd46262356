"""Procedural synthetic individuals: spotted or striped animals photographed in the field.

Generative model. Each identity owns a coat: a base colour (shared loosely with others, so colour
alone does not identify) and a pattern of spots or stripes, drawn anew for each flank. A photo
paints the flank's coat onto a body silhouette in body coordinates, warps body and coat together
into the scene (pose: facing direction from the flank, rotation, scale, position), composites it
over the encounter's cluttered background under the encounter's lighting, and adds foreground
grass over part of the body and sometimes blur. Photos of one encounter share background and
lighting, as a camera-trap burst does.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from reid.errors import DataError

BODY_W, BODY_H = 200, 120      # body canvas, in body coordinates
COAT_W, COAT_H = 120, 56       # coat texture covering the torso
TORSO = (100, 62, 60, 28)      # torso ellipse: centre x, centre y, half-width, half-height
IMAGES_PER_ENCOUNTER = 2


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


# ----------------------------------------------------------------------------------- coats
def coat_colours(seed: int, identity: int) -> tuple[np.ndarray, np.ndarray]:
    """Base and pattern colours: a few palettes shared by many identities, slightly varied."""
    rng = _rng(seed, identity, 0)
    palettes = np.array([[190, 140, 80], [150, 110, 70], [200, 170, 120], [120, 95, 70]], dtype=float)
    base = palettes[rng.integers(len(palettes))] + rng.normal(0, 10, 3)
    pattern = base * rng.uniform(0.15, 0.35) if rng.random() < 0.75 else np.full(3, 235.0)
    return base.clip(0, 255), pattern.clip(0, 255)


def coat_kind(seed: int, identity: int) -> str:
    return "spots" if _rng(seed, identity, 1).random() < 0.5 else "stripes"


def coat_pattern(seed: int, identity: int, flank: str) -> np.ndarray:
    """The flank's pattern as a float mask in [0, 1] of shape (COAT_H, COAT_W); each flank its own."""
    rng = _rng(seed, identity, 2, 0 if flank == "left" else 1)
    mask = np.zeros((COAT_H, COAT_W), dtype=np.float32)
    if coat_kind(seed, identity) == "spots":
        for _ in range(rng.integers(7, 13)):
            centre = (int(rng.integers(4, COAT_W - 4)), int(rng.integers(4, COAT_H - 4)))
            axes = (int(rng.integers(4, 11)), int(rng.integers(3, 8)))
            cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
    else:
        y, x = np.mgrid[0:COAT_H, 0:COAT_W].astype(np.float32)
        for _ in range(rng.integers(4, 8)):
            # a wavy, slanted vertical stripe with its own width
            x0, slant = rng.uniform(0, COAT_W), rng.uniform(-0.6, 0.6)
            amplitude, wavelength = rng.uniform(0, 6), rng.uniform(20, 60)
            width = rng.uniform(2.5, 6)
            centre = x0 + slant * (y - COAT_H / 2) + amplitude * np.sin(2 * np.pi * y / wavelength)
            mask = np.maximum(mask, (np.abs(x - centre) < width).astype(np.float32))
    return cv2.GaussianBlur(mask, (3, 3), 0)


def _body(seed: int, identity: int, flank: str) -> tuple[np.ndarray, np.ndarray]:
    """RGB body canvas and its alpha mask, facing right, in body coordinates."""
    base, pattern_colour = coat_colours(seed, identity)
    alpha = np.zeros((BODY_H, BODY_W), dtype=np.float32)
    cx, cy, rx, ry = TORSO
    cv2.ellipse(alpha, (cx, cy), (rx, ry), 0, 0, 360, 1.0, -1)
    cv2.line(alpha, (cx + 45, cy - 10), (cx + 70, cy - 40), 1.0, 14)            # neck
    cv2.ellipse(alpha, (cx + 80, cy - 44), (16, 10), -20, 0, 360, 1.0, -1)       # head
    for leg_x in (cx - 45, cx - 30, cx + 30, cx + 45):
        cv2.line(alpha, (leg_x, cy + 15), (leg_x + 2, BODY_H - 4), 1.0, 7)        # legs
    cv2.line(alpha, (cx - rx + 2, cy - 10), (cx - rx - 22, cy + 20), 1.0, 4)     # tail
    rgb = np.empty((BODY_H, BODY_W, 3), dtype=np.float32)
    rgb[:] = base * 0.85
    coat = base[None, None] * (1 - coat_pattern(seed, identity, flank)[..., None]) + \
        pattern_colour[None, None] * coat_pattern(seed, identity, flank)[..., None]
    top, left = cy - COAT_H // 2, cx - COAT_W // 2
    torso = np.zeros((BODY_H, BODY_W), dtype=np.float32)
    cv2.ellipse(torso, (cx, cy), (rx, ry), 0, 0, 360, 1.0, -1)
    region = torso[top:top + COAT_H, left:left + COAT_W, None]
    rgb[top:top + COAT_H, left:left + COAT_W] = region * coat + (1 - region) * rgb[top:top + COAT_H, left:left + COAT_W]
    # shading: the belly darker than the back, so the body reads as a volume
    rgb *= np.linspace(1.1, 0.75, BODY_H, dtype=np.float32)[:, None, None]
    return rgb.clip(0, 255), alpha


# ------------------------------------------------------------------------------- scenes
def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Savanna-like clutter: a colour gradient, blotchy low-frequency noise and branches."""
    ground = np.array([110, 120, 70], dtype=np.float32) + rng.normal(0, 20, 3)
    sky = np.array([150, 160, 130], dtype=np.float32) + rng.normal(0, 20, 3)
    t = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    image = sky * (1 - t) + ground * t + np.zeros((size, size, 3), np.float32)
    # mostly light/dark blotches (shade, soil, bushes) with only a little colour in them
    light = cv2.resize(rng.normal(0, 1, (8, 8)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    tint = cv2.resize(rng.normal(0, 1, (6, 6, 3)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    image += 30 * light[..., None] + 8 * tint + rng.normal(0, 6, (size, size, 3)).astype(np.float32)
    for _ in range(rng.integers(3, 8)):
        start = rng.integers(0, size, 2)
        end = start + rng.integers(-size // 2, size // 2, 2)
        colour = tuple(float(c) for c in ground * rng.uniform(0.4, 0.8))
        cv2.line(image, tuple(int(v) for v in start), tuple(int(v) for v in end), colour, int(rng.integers(1, 4)))
    return image


def _pose(rng: np.random.Generator, size: int, flank: str) -> np.ndarray:
    """Affine map from body coordinates to the image: facing left for a left-flank view."""
    scale = rng.uniform(0.7, 1.1) * size / BODY_W * 0.9
    angle = rng.uniform(-20, 20)
    centre = np.array([size / 2, size / 2]) + rng.uniform(-0.1, 0.1, 2) * size
    matrix = cv2.getRotationMatrix2D((BODY_W / 2, BODY_H / 2), angle, scale)
    matrix[:, 2] += centre - np.array([BODY_W / 2, BODY_H / 2])
    if flank == "left":  # mirror about the vertical through the image centre
        matrix = np.array([[-1, 0, 2 * centre[0]], [0, 1, 0]]) @ np.vstack([matrix, [0, 0, 1]])
    return matrix


def _occlude(image: np.ndarray, alpha: np.ndarray, rng: np.random.Generator, colour: np.ndarray) -> None:
    """Grass blades in front of the animal, stopping once about a quarter of the body is hidden."""
    size = image.shape[0]
    cover = np.zeros_like(alpha)
    body = max(alpha.sum(), 1.0)
    for _ in range(rng.integers(0, 14)):
        x = int(rng.integers(0, size))
        top = (x + int(rng.integers(-size // 6, size // 6)), int(rng.integers(size // 3, size)))
        blade = np.zeros_like(alpha)
        cv2.line(blade, (x, size), top, 1.0, int(rng.integers(1, 3)))
        if ((np.maximum(cover, blade) * alpha).sum() / body) > 0.25:
            break
        cover = np.maximum(cover, blade)
        shade = tuple(float(c) for c in colour * rng.uniform(0.6, 1.1))
        cv2.line(image, (x, size), top, shade, int(rng.integers(1, 3)))


def render_image(seed: int, identity: int, flank: str, encounter: int, image: int, size: int) -> np.ndarray:
    """One photo, uint8 RGB (size, size, 3)."""
    scene = _rng(seed, identity, 3, encounter)     # shared by the encounter's photos
    shot = _rng(seed, identity, 4, encounter, image)
    background = _background(scene, size)
    gain, cast = scene.uniform(0.7, 1.2), scene.normal(1.0, 0.06, 3).astype(np.float32)
    body, alpha = _body(seed, identity, flank)
    matrix = _pose(shot, size, flank)
    warped = cv2.warpAffine(body, matrix, (size, size), flags=cv2.INTER_LINEAR)
    mask = cv2.warpAffine(alpha, matrix, (size, size), flags=cv2.INTER_LINEAR)[..., None]
    picture = background * (1 - mask) + warped * mask
    _occlude(picture, mask[..., 0], shot, np.array([90, 120, 50], np.float32))
    picture = picture * gain * cast * shot.uniform(0.9, 1.1)
    if shot.random() < 0.3:
        picture = cv2.GaussianBlur(picture, (0, 0), shot.uniform(0.5, 1.2))
    return picture.clip(0, 255).astype(np.uint8)


def _encounter_flanks(rng: np.random.Generator, count: int) -> list[str]:
    """Mostly one photo per flank, as when an animal walks past; sometimes both of one flank."""
    if count >= 2 and rng.random() < 0.8:
        flanks = ["left", "right"] + [str(f) for f in rng.choice(["left", "right"], count - 2)]
    else:
        flanks = [str(rng.choice(["left", "right"]))] * count
    return flanks


def make_synthetic_dataset(out: str | Path, identities: int = 40, images_per_identity: int = 8, seed: int = 0,
                           image_size: int = 128, progress: bool = True) -> Path:
    """Writes out/images/<identity>/<n>.jpg and out/metadata.csv (written last); returns the CSV path."""
    if identities < 1 or images_per_identity < 1:
        raise DataError(f"need at least 1 identity and 1 image each (got {identities} x {images_per_identity})")
    if image_size < 32:
        raise DataError(f"image_size {image_size} is too small to show a coat; use at least 32")
    out = Path(out)
    rows = []
    bar = tqdm(total=identities * images_per_identity, desc="rendering", unit="img", disable=not progress)
    for identity in range(identities):
        name = f"synth_{identity:03d}"
        folder = out / "images" / name
        folder.mkdir(parents=True, exist_ok=True)
        for encounter in range(-(-images_per_identity // IMAGES_PER_ENCOUNTER)):
            first = encounter * IMAGES_PER_ENCOUNTER
            count = min(IMAGES_PER_ENCOUNTER, images_per_identity - first)
            for offset, flank in enumerate(_encounter_flanks(_rng(seed, identity, 5, encounter), count)):
                n = first + offset
                pixels = render_image(seed, identity, flank, encounter, n, image_size)
                path = folder / f"{n:03d}.jpg"
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="JPEG", quality=92)
                path.write_bytes(buffer.getvalue())
                rows.append((f"images/{name}/{n:03d}.jpg", name, flank, f"{name}_enc{encounter:02d}",
                             image_size, image_size))
                bar.update(1)
    bar.close()
    csv = out / "metadata.csv"
    table = pd.DataFrame(rows, columns=["path", "identity", "viewpoint", "encounter", "width", "height"])
    tmp = csv.with_name(f".{csv.name}.tmp")
    table.to_csv(tmp, index=False)
    os.replace(tmp, csv)
    return csv
