"""Procedural synthetic individuals: spotted or striped animals photographed in the field.

Generative model. Each identity owns a coat: a base colour drawn from a few shared palettes (so
colour alone does not identify) and a pattern of spots or stripes, drawn anew for each flank (a
mirrored left flank is not the right one). The pattern lives in body coordinates, on torso and
neck. A photo draws the body in a random gait, warps body and coat together into the scene (facing
left for a left-flank view, rotation, scale, position), composites it over the encounter's
cluttered background (one of a few camera sites shared by all individuals), hides at most a
quarter of it behind grass, branches or posts, applies the encounter's lighting and sometimes blur,
and adds sensor noise. Photos of one encounter share background and lighting, as a camera-trap
burst does; the animal, occluders and noise change.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from reid.errors import DataError

BODY_W, BODY_H = 200, 120      # body canvas, in body units; the animal faces +x (right)
TORSO = (98, 64, 58, 27)       # torso ellipse: centre x, centre y, half-width, half-height
NECK = ((140, 52), (172, 24))  # neck segment: shoulder to head
NECK_WIDTH = 17
IMAGES_PER_ENCOUNTER = 2
MAX_OCCLUDED = 0.25            # share of the body that occluders may hide
FRAMING = 1.05                 # body canvas width / image width at scale 1

# Independent random streams, so that changing one part of the model leaves the others as they were.
_COLOUR, _STYLE, _PATTERN, _SCENE, _SHOT, _FLANKS, _SITE = range(7)
# Camera sites, each with its fixed background, shared by all individuals: as at real camera
# traps, the scene says where a photo was taken, not who is in it, so a model must learn coats.
SITES = 6


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def _thick(size: int, units: float) -> int:
    """Line thickness for a 128 px image scaled to this image size."""
    return max(1, int(round(units * size / 128)))


# ----------------------------------------------------------------------------------- coats
@dataclass(frozen=True, eq=False)
class CoatStyle:
    """What an individual shows on both flanks; where its markings lie differs between flanks."""
    kind: str                # "spots" or "stripes"
    base: np.ndarray         # RGB coat colour
    marking: np.ndarray      # RGB colour of spots, stripes, dorsal line and socks
    count: int               # spots or stripes per flank
    size: float              # spot radius or stripe half-width, body units
    shape: float             # spots: length / width; stripes: waviness amplitude (body units)
    slant: float             # spots: main axis angle (degrees); stripes: slope
    dorsal_line: bool        # a dark (or light) line along the back
    socks: bool              # lower legs in the marking colour


@lru_cache(maxsize=256)
def coat_style(seed: int, identity: int) -> CoatStyle:
    """An individual's coat traits. They vary widely between individuals, as spot size or stripe width do in
    real species, so that a network can learn descriptors that carry over to individuals it never saw."""
    rng = _rng(seed, identity, _STYLE)
    base, marking = coat_colours(seed, identity)
    kind = "spots" if rng.random() < 0.5 else "stripes"
    if kind == "spots":
        size = rng.uniform(6, 13)
        shape = rng.uniform(1.0, 2.2)
        # few large patches (giraffe) to many small spots (cheetah), at a similar share of the torso
        cover = rng.uniform(0.2, 0.38) * np.pi * TORSO[2] * TORSO[3]
        count = int(np.clip(round(cover / (np.pi * size * size)), 4, 24))
        slant = rng.uniform(0, 180)
    else:
        size, shape = rng.uniform(3, 7.5), rng.uniform(0, 7)
        count, slant = int(rng.integers(4, 10)), rng.uniform(-0.4, 0.4)
    return CoatStyle(kind, base, marking, count, float(size), float(shape), float(slant),
                     bool(rng.random() < 0.35), bool(rng.random() < 0.35))


def coat_colours(seed: int, identity: int) -> tuple[np.ndarray, np.ndarray]:
    """Base and marking colours (RGB floats): a few palettes shared by many identities, slightly varied."""
    rng = _rng(seed, identity, _COLOUR)
    palettes = np.array([[190, 140, 80], [150, 110, 70], [205, 175, 125], [125, 95, 70], [170, 150, 120]],
                        dtype=np.float32)
    base = palettes[rng.integers(len(palettes))] + rng.normal(0, 8, 3)
    # mostly dark markings; light ones (as on nyala or chital) where they still contrast with the coat
    light = base.mean() < 160 and rng.random() < 0.3
    marking = np.full(3, 240.0) - rng.uniform(0, 20, 3) if light else base * rng.uniform(0.12, 0.3)
    return _frozen(base.clip(0, 255).astype(np.float32)), _frozen(marking.clip(0, 255).astype(np.float32))


@lru_cache(maxsize=256)  # every photo of a flank paints the same coat
def coat_pattern(seed: int, identity: int, flank: str) -> np.ndarray:
    """The flank's markings as a read-only mask in [0, 1], shape (BODY_H, BODY_W), in body coordinates."""
    style = coat_style(seed, identity)
    rng = _rng(seed, identity, _PATTERN, 0 if flank == "left" else 1)
    mask = _spots(rng, style) if style.kind == "spots" else _stripes(rng, style)
    if style.dorsal_line:
        cx, cy, rx, ry = TORSO
        cv2.ellipse(mask, (cx, cy), (rx - 2, ry - 2), 0, 200, 340, 1.0, 5)
    return _frozen(cv2.GaussianBlur(mask, (3, 3), 0))


def _frozen(array: np.ndarray) -> np.ndarray:
    """Cached arrays are shared between photos: make writing to one an error, not a silent corruption."""
    array.flags.writeable = False
    return array


def _spots(rng: np.random.Generator, style: CoatStyle) -> np.ndarray:
    """Irregular blotches (each one or two overlapping ellipses) scattered over torso and neck."""
    mask = np.zeros((BODY_H, BODY_W), dtype=np.float32)
    cx, cy, rx, ry = TORSO
    # uniform in the ellipse, kept off the outline so a spot is not mostly clipped away
    radius, angle = np.sqrt(rng.uniform(0, 1, style.count)), rng.uniform(0, 2 * np.pi, style.count)
    centres = np.stack([cx + (rx - 6) * radius * np.cos(angle), cy + (ry - 5) * radius * np.sin(angle)], 1)
    t = rng.uniform(0.15, 0.85, int(rng.integers(1, 4)))
    (x0, y0), (x1, y1) = NECK
    centres = np.concatenate([centres, np.stack([x0 + t * (x1 - x0), y0 + t * (y1 - y0)], 1)])
    for x, y in centres:
        size = style.size * rng.uniform(0.7, 1.3)
        for _ in range(int(rng.integers(1, 3))):
            offset = rng.normal(0, size * 0.3, 2)
            stretch = np.sqrt(style.shape) * rng.uniform(0.85, 1.15)
            axes = (max(1, int(size * stretch)), max(1, int(size / stretch)))
            cv2.ellipse(mask, _pt((x + offset[0], y + offset[1])), axes, style.slant + rng.normal(0, 25),
                        0, 360, 1.0, -1)
    return mask


def _stripes(rng: np.random.Generator, style: CoatStyle) -> np.ndarray:
    """Wavy, slanted, tapering vertical stripes at irregular spacing, some stopping short of the belly."""
    y, x = np.mgrid[0:BODY_H, 0:BODY_W].astype(np.float32)
    mask = np.zeros((BODY_H, BODY_W), dtype=np.float32)
    gap = 2 * style.size + 6
    for x0 in _spaced(rng, low=TORSO[0] - TORSO[2] + 4, high=NECK[1][0] - 4, gap=gap, count=style.count):
        slant = style.slant + rng.normal(0, 0.12)
        amplitude = style.shape * rng.uniform(0.6, 1.4)
        wavelength, phase = rng.uniform(25, 70), rng.uniform(0, 2 * np.pi)
        top, bottom = rng.uniform(0, 40), rng.uniform(75, BODY_H)
        width = style.size * rng.uniform(0.8, 1.2) * (1 - 0.5 * np.clip((y - top) / (bottom - top), 0, 1))
        centre = x0 + slant * (y - TORSO[1]) + amplitude * np.sin(2 * np.pi * y / wavelength + phase)
        mask = np.maximum(mask, ((np.abs(x - centre) < width) & (y >= top) & (y <= bottom)).astype(np.float32))
    return mask


def _spaced(rng: np.random.Generator, low: float, high: float, gap: float, count: int) -> list[float]:
    """Up to `count` random positions in [low, high], each at least `gap` from the others."""
    chosen: list[float] = []
    for candidate in rng.uniform(low, high, count * 4):
        if len(chosen) == count:
            break
        if all(abs(candidate - c) >= gap for c in chosen):
            chosen.append(float(candidate))
    return sorted(chosen)


# ------------------------------------------------------------------------------------ body
@lru_cache(maxsize=1)
def _coat_region() -> np.ndarray:
    """Where the pattern is painted: torso and neck, the parts that do not move with the gait."""
    region = np.zeros((BODY_H, BODY_W), dtype=np.float32)
    cx, cy, rx, ry = TORSO
    cv2.ellipse(region, (cx, cy), (rx, ry), 0, 0, 360, 1.0, -1)
    cv2.line(region, NECK[0], NECK[1], 1.0, NECK_WIDTH)
    return _frozen(region)


def _limbs(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Head, legs and tail in this photo's gait (legs swing, head and tail turn a little), and the
    lower legs on their own, for socks."""
    limbs = np.zeros((BODY_H, BODY_W), dtype=np.float32)
    socks = np.zeros_like(limbs)
    cx, cy, rx, _ = TORSO
    hx, hy = NECK[1]
    tilt = float(rng.uniform(-15, 15))
    cv2.ellipse(limbs, (hx + 8, hy + 2), (17, 9), -15 + tilt, 0, 360, 1.0, -1)          # head
    cv2.ellipse(limbs, (hx - 4, hy - 9), (3, 7), -30 + tilt, 0, 360, 1.0, -1)            # ear
    for hip_x in (cx - 42, cx - 28, cx + 30, cx + 44):
        swing = np.deg2rad(rng.uniform(-18, 18))
        knee = (hip_x + 24 * np.sin(swing), cy + 12 + 24 * np.cos(swing))
        foot = (knee[0] + 22 * np.sin(swing * 0.3), knee[1] + 22 * np.cos(swing * 0.3))
        cv2.line(limbs, (hip_x, cy + 10), _pt(knee), 1.0, 8)
        cv2.line(limbs, _pt(knee), _pt(foot), 1.0, 6)
        cv2.line(socks, _pt(knee), _pt(foot), 1.0, 6)
    tail = np.deg2rad(rng.uniform(20, 70))
    root = (cx - rx + 3, cy - 12)
    cv2.line(limbs, root, _pt((root[0] - 32 * np.cos(tail), root[1] + 32 * np.sin(tail))), 1.0, 4)
    return limbs, socks


def _body(seed: int, identity: int, flank: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """RGB body canvas and its alpha, facing right, in body coordinates."""
    style = coat_style(seed, identity)
    region = _coat_region()
    limbs, socks = _limbs(rng)
    alpha = np.maximum(region, limbs)
    pattern = coat_pattern(seed, identity, flank) * region
    if style.socks:
        pattern = np.maximum(pattern, socks * (1 - region))
    rgb = np.empty((BODY_H, BODY_W, 3), dtype=np.float32)
    rgb[:] = style.base * 0.85                  # limbs a shade darker than the flank
    rgb[region > 0] = style.base
    rgb = rgb * (1 - pattern[..., None]) + style.marking * pattern[..., None]
    # light from above: back brighter than belly, and a dark rim, so the body reads as a volume
    rgb *= np.linspace(1.12, 0.72, BODY_H, dtype=np.float32)[:, None, None]
    rim = alpha - cv2.erode(alpha, np.ones((5, 5), np.uint8))
    rgb *= (1 - 0.35 * rim)[..., None]
    cv2.circle(rgb, (NECK[1][0] + 16, NECK[1][1] - 1), 2, (20.0, 15.0, 10.0), -1)        # eye
    return rgb.clip(0, 255), alpha


# ---------------------------------------------------------------------------------- scenes
@dataclass
class Scene:
    """What the photos of one encounter share."""
    background: np.ndarray   # float32 RGB (size, size, 3)
    ground: np.ndarray       # RGB of the vegetation, for foreground grass and branches
    gain: float
    contrast: float
    cast: np.ndarray         # per-channel colour cast
    shade: np.ndarray        # (size, size) multiplicative illumination gradient


@lru_cache(maxsize=4)  # the photos of an encounter are rendered one after another
def encounter_scene(seed: int, identity: int, encounter: int, size: int) -> Scene:
    """Background and lighting of one encounter (arrays read-only: they are cached and shared)."""
    rng = _rng(seed, identity, _SCENE, encounter)
    site = _rng(seed, _SITE, int(rng.integers(SITES)))
    ground = np.array([105, 115, 65], dtype=np.float32) + site.normal(0, 22, 3).astype(np.float32)
    background = _background(site, size, ground)
    # moderate on purpose: with stronger light changes a small network trained from scratch for
    # minutes spends its capacity on them, and the trainer adds colour jitter on top
    gain, contrast = float(rng.uniform(0.8, 1.15)), float(rng.uniform(0.85, 1.1))
    cast = rng.normal(1.0, 0.04, 3).astype(np.float32)
    direction, strength = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.2)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    shade = 1 + strength * (x * np.cos(direction) + y * np.sin(direction))
    return Scene(_frozen(background), _frozen(ground.clip(0, 255)), gain, contrast, _frozen(cast),
                 _frozen(shade.astype(np.float32)))


def _background(rng: np.random.Generator, size: int, ground: np.ndarray) -> np.ndarray:
    """Savanna-like clutter: far vegetation over ground, blotches, bushes and rocks, branches, grass."""
    far = ground * rng.uniform(1.0, 1.4) + rng.normal(0, 15, 3).astype(np.float32)
    horizon = rng.uniform(0.15, 0.5) * size
    rows = np.arange(size, dtype=np.float32)[:, None, None]
    t = 1 / (1 + np.exp(-(rows - horizon) / (0.06 * size)))
    image = (far * (1 - t) + ground * t) * np.ones((1, size, 3), np.float32)
    image += 22 * _noise(rng, size, 6)[..., None] + 10 * _noise(rng, size, 20)[..., None]
    image += 8 * np.stack([_noise(rng, size, 5) for _ in range(3)], -1)
    image = _bushes(rng, size, ground, image)
    for _ in range(int(rng.integers(3, 8))):  # branches and trunks
        start = rng.integers(0, size, 2)
        end = start + rng.integers(-size // 2, size // 2, 2)
        colour = tuple(float(c) for c in ground * rng.uniform(0.3, 0.8))
        cv2.line(image, _pt(start), _pt(end), colour, _thick(size, rng.uniform(1, 4)))
    for _ in range(int(rng.integers(15, 50))):  # grass in the lower part
        x, y = rng.uniform(0, size), rng.uniform(horizon, size)
        tip = (x + rng.normal(0, 0.03 * size), y - rng.uniform(0.03, 0.12) * size)
        colour = tuple(float(c) for c in ground * rng.uniform(0.6, 1.4))
        cv2.line(image, _pt((x, y)), _pt(tip), colour, 1)
    # out of focus behind the animal (the camera focuses on it), which also keeps clutter from
    # competing with the coat at the scale of its markings
    return cv2.GaussianBlur(image, (0, 0), 1.6 * size / 128)


def _bushes(rng: np.random.Generator, size: int, ground: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Soft-edged darker or lighter clumps (bushes, rocks, termite mounds), each a cluster of blobs."""
    layer = np.zeros_like(image)
    weight = np.zeros(image.shape[:2], np.float32)
    for _ in range(int(rng.integers(2, 7))):
        centre = rng.uniform(0, size, 2)
        colour = tuple(float(c) for c in ground * rng.uniform(0.5, 1.4))
        for _ in range(int(rng.integers(2, 6))):
            xy = _pt(centre + rng.normal(0, 0.06 * size, 2))
            axes = _pt(rng.uniform(0.03, 0.1, 2) * size)
            cv2.ellipse(layer, xy, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
            cv2.ellipse(weight, xy, axes, 0.0, 0, 360, 1.0, -1)
    # blurred so they sit out of focus behind the animal and are not mistaken for its spots
    sigma = 2.0 * size / 128
    layer, weight = cv2.GaussianBlur(layer, (0, 0), sigma), cv2.GaussianBlur(weight, (0, 0), sigma)
    return image * (1 - 0.8 * weight[..., None]) + 0.8 * layer


def _noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise with about `cells` blobs across the image, roughly in [-1, 1]."""
    return cv2.resize(rng.normal(0, 1, (cells, cells)).astype(np.float32), (size, size),
                      interpolation=cv2.INTER_CUBIC)


def _pt(xy) -> tuple[int, int]:
    return int(round(float(xy[0]))), int(round(float(xy[1])))


# ---------------------------------------------------------------------------------- photos
def _pose(rng: np.random.Generator, size: int, flank: str) -> tuple[np.ndarray, float]:
    """Affine map from body coordinates to the image, and its scale; facing left for a left-flank view."""
    scale = rng.uniform(0.7, 1.1) * size / BODY_W * FRAMING
    angle = rng.uniform(-20, 20)
    centre = np.array([size / 2, size / 2]) + rng.uniform(-0.08, 0.08, 2) * size
    matrix = cv2.getRotationMatrix2D((BODY_W / 2, BODY_H / 2), angle, scale)
    matrix[:, 2] += centre - np.array([BODY_W / 2, BODY_H / 2])
    if flank == "left":  # mirror about the vertical through the body's centre
        matrix = np.array([[-1, 0, 2 * centre[0]], [0, 1, 0]]) @ np.vstack([matrix, [0, 0, 1]])
    return matrix, float(scale)


def _place(body: np.ndarray, alpha: np.ndarray, matrix: np.ndarray, scale: float, size: int):
    """Warp body and alpha into the image; low-pass first, since the warp shrinks them 2-6x."""
    sigma = 0.45 / scale
    body, alpha = cv2.GaussianBlur(body, (0, 0), sigma), cv2.GaussianBlur(alpha, (0, 0), sigma)
    warped = cv2.warpAffine(body, matrix, (size, size), flags=cv2.INTER_LINEAR)
    mask = cv2.warpAffine(alpha, matrix, (size, size), flags=cv2.INTER_LINEAR)
    return warped, mask


def _occluder(rng: np.random.Generator, size: int, aim: tuple[float, float]) -> np.ndarray:
    """One foreground object as a mask: a tuft of grass blades, a branch, or a post; near `aim`."""
    mask = np.zeros((size, size), dtype=np.float32)
    x = aim[0] + rng.normal(0, 0.25 * size)
    kind = rng.choice(["grass", "branch", "post"], p=[0.6, 0.25, 0.15])
    if kind == "grass":
        for _ in range(int(rng.integers(2, 7))):
            root = (x + rng.normal(0, 0.04 * size), size)
            tip = (root[0] + rng.normal(0, 0.12 * size), rng.uniform(0.35, 0.85) * size)
            cv2.line(mask, _pt(root), _pt(tip), 1.0, _thick(size, rng.uniform(1, 2.5)))
    elif kind == "branch":
        y = aim[1] + rng.normal(0, 0.2 * size)
        start, end = (-5, y + rng.normal(0, 0.2 * size)), (size + 5, y + rng.normal(0, 0.2 * size))
        cv2.line(mask, _pt(start), _pt(end), 1.0, _thick(size, rng.uniform(2, 5)))
        for _ in range(int(rng.integers(1, 4))):  # twigs
            s = rng.uniform(0, 1)
            base = (start[0] + s * (end[0] - start[0]), start[1] + s * (end[1] - start[1]))
            tip = (base[0] + rng.normal(0, 0.12 * size), base[1] + rng.normal(0, 0.12 * size))
            cv2.line(mask, _pt(base), _pt(tip), 1.0, _thick(size, 1.5))
    else:
        width = rng.uniform(0.05, 0.12) * size
        top = rng.uniform(0.2, 0.7) * size
        cv2.rectangle(mask, _pt((x - width / 2, top)), _pt((x + width / 2, size)), 1.0, -1)
    return cv2.GaussianBlur(mask, (3, 3), 0.6)


def _occlude(picture: np.ndarray, body: np.ndarray, rng: np.random.Generator, colour: np.ndarray) -> np.ndarray:
    """Paint foreground objects in place, skipping any that would hide more than MAX_OCCLUDED of the body;
    returns the combined cover mask."""
    size = picture.shape[0]
    cover = np.zeros_like(body)
    area = max(float(body.sum()), 1.0)
    ys, xs = np.nonzero(body > 0.5)
    aim = (float(xs.mean()), float(ys.mean())) if len(xs) else (size / 2, size / 2)
    for _ in range(int(rng.integers(0, 5))):
        mask = _occluder(rng, size, aim)
        shade = colour * rng.uniform(0.5, 1.2)
        if (np.maximum(cover, mask) * body).sum() / area > MAX_OCCLUDED:
            continue
        cover = np.maximum(cover, mask)
        picture *= 1 - mask[..., None]
        picture += mask[..., None] * shade
    return cover


def _light(picture: np.ndarray, scene: Scene, rng: np.random.Generator) -> np.ndarray:
    exposure = rng.uniform(0.95, 1.05)  # auto-exposure drifts a little within a burst
    picture = (picture - 128) * scene.contrast + 128
    return picture * (scene.gain * exposure) * scene.cast * scene.shade[..., None]


def _degrade(picture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sometimes defocus or motion blur; always some sensor noise."""
    size = picture.shape[0]
    roll = rng.random()
    if roll < 0.2:
        picture = cv2.GaussianBlur(picture, (0, 0), rng.uniform(0.5, 1.3) * size / 128)
    elif roll < 0.3:
        length = max(2, int(rng.uniform(2, 5) * size / 128))
        kernel = np.zeros((length, length), np.float32)
        kernel[length // 2] = 1 / length
        rotation = cv2.getRotationMatrix2D(((length - 1) / 2, (length - 1) / 2), rng.uniform(0, 180), 1.0)
        kernel = cv2.warpAffine(kernel, rotation, (length, length))
        picture = cv2.filter2D(picture, -1, kernel / max(kernel.sum(), 1e-6))
    return picture + rng.uniform(1, 5) * rng.standard_normal(picture.shape, dtype=np.float32)


def render_image(seed: int, identity: int, flank: str, encounter: int, image: int, size: int) -> np.ndarray:
    """One photo of `identity` showing `flank`, in `encounter`: uint8 RGB (size, size, 3)."""
    scene = encounter_scene(seed, identity, encounter, size)
    shot = _rng(seed, identity, _SHOT, encounter, image)
    body, alpha = _body(seed, identity, flank, shot)
    matrix, scale = _pose(shot, size, flank)
    warped, mask = _place(body, alpha, matrix, scale, size)
    picture = scene.background * (1 - mask[..., None]) + warped * mask[..., None]
    _occlude(picture, mask, shot, scene.ground)
    picture = _degrade(_light(picture, scene, shot), shot)
    return picture.clip(0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------- dataset
def encounter_flanks(seed: int, identity: int, encounter: int, count: int) -> list[str]:
    """Mostly one photo per flank, as when an animal walks past; sometimes all of one flank."""
    rng = _rng(seed, identity, _FLANKS, encounter)
    if count >= 2 and rng.random() < 0.8:
        first = str(rng.choice(["left", "right"]))
        other = "right" if first == "left" else "left"
        return [first, other] + [str(f) for f in rng.choice(["left", "right"], count - 2)]
    return [str(rng.choice(["left", "right"]))] * count


def _check_arguments(identities: int, images_per_identity: int, image_size: int) -> None:
    if identities < 1:
        raise DataError(f"identities must be at least 1 (got {identities})")
    if images_per_identity < 1:
        raise DataError(f"images_per_identity must be at least 1 (got {images_per_identity})")
    if image_size < 32:
        raise DataError(f"image_size {image_size} is too small to show a coat pattern; use at least 32")


def _write_jpeg(pixels: np.ndarray, path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    path.write_bytes(buffer.getvalue())


def _write_csv_atomically(rows: list[tuple], csv: Path) -> None:
    table = pd.DataFrame(rows, columns=["path", "identity", "viewpoint", "encounter", "width", "height"])
    tmp = csv.with_name(f".{csv.name}.{os.getpid()}.tmp")
    table.to_csv(tmp, index=False)
    os.replace(tmp, csv)


def make_synthetic_dataset(out: str | Path, identities: int = 40, images_per_identity: int = 8, seed: int = 0,
                           image_size: int = 128, progress: bool = True) -> Path:
    """Writes out/images/<identity>/<n>.jpg and out/metadata.csv; returns the CSV path.

    metadata.csv is written last and atomically, so a folder that has one is complete.
    """
    _check_arguments(identities, images_per_identity, image_size)
    out = Path(out)
    csv = out / "metadata.csv"
    csv.unlink(missing_ok=True)  # a stale table must not vouch for a folder being rewritten
    rows = []
    with tqdm(total=identities * images_per_identity, desc="rendering", unit="img", disable=not progress) as bar:
        for identity in range(identities):
            name = f"synth_{identity:03d}"
            folder = out / "images" / name
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(images_per_identity):
                encounter, offset = divmod(n, IMAGES_PER_ENCOUNTER)
                count = min(IMAGES_PER_ENCOUNTER, images_per_identity - encounter * IMAGES_PER_ENCOUNTER)
                flank = encounter_flanks(seed, identity, encounter, count)[offset]
                _write_jpeg(render_image(seed, identity, flank, encounter, n, image_size), folder / f"{n:03d}.jpg")
                rows.append((f"images/{name}/{n:03d}.jpg", name, flank, f"{name}_enc{encounter:02d}",
                             image_size, image_size))
                bar.update(1)
    _write_csv_atomically(rows, csv)
    return csv
