"""Synthetic camera-trap frames: several species, several animals per frame, people, vehicles and
empty frames, shot in bursts by cameras at fixed sites, with the true boxes in MegaDetector format.

Animals are reid.data.synth's individuals, rendered by its code: an individual wears the same coat
in every frame, as in the re-ID dataset with the same seed. A species is a coat family (all
"spotted-cat" individuals have spots, all "striped-antelope" ones stripes) and a size. Camera k
stands at synth's site k (mod SITES), so it always shows that background. An encounter is a burst
of frames a few seconds apart in which the animals walk on a little and keep their flank; between
encounters a camera waits minutes to hours. Frames are JPEGs with EXIF DateTimeOriginal, in
`images/CAMnn/IMG_nnnn.JPG`, as camera-trap card dumps are organised.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from reid.data import synth
from reid.errors import DataError
from reid.io import atomic_path
from reid.species.megadetector import NO_DETECTION, detection_table, image_row, write_megadetector_json

SPECIES_COATS = {"spotted-cat": "spots", "striped-antelope": "stripes"}
# body-canvas width as a share of the frame width, per species
SPECIES_SIZES = {"spotted-cat": (0.22, 0.34), "striped-antelope": (0.3, 0.45)}
KINDS = ("animals", "blank", "person", "vehicle")
KIND_SHARES = (0.65, 0.15, 0.12, 0.08)
START = datetime(2024, 5, 1, 6, 0, 0)
BOX_ALPHA = 0.3  # a pixel belongs to an object's box where its opacity passes this
# our random streams, apart from synth.py's (0..6)
_PLAN, _FRAME, _LIGHT, _LOOK = range(101, 105)
EXIF_IFD, DATETIME, DATETIME_ORIGINAL, MAKE, MODEL = 0x8769, 0x0132, 0x9003, 0x010F, 0x0110
GROUND_TRUTH_COLUMNS = ["file", "detection", "category", "species", "identity", "viewpoint", "encounter", "camera",
                        "datetime", "x", "y", "w", "h"]


@dataclass(frozen=True)
class SceneObject:
    """Something in a frame. `look`: the synth.py identity whose coat an animal wears; for people
    and vehicles, the seed of their colours. `size`: an animal's body-canvas width or a vehicle's
    width (share of the frame width), a person's height (share of the frame height)."""
    category: str                  # animal, person or vehicle
    species: str                   # the animal's species; "human" or "vehicle"
    identity: str                  # the individual's name; "" for people and vehicles
    look: int
    flank: str                     # the side shown: left or right
    centre: tuple[float, float]    # normalised position in the frame
    size: float
    angle: float                   # degrees


@dataclass(frozen=True)
class FramePlan:
    file: str                      # CAMnn/IMG_nnnn.JPG
    camera: int                    # from 0
    encounter: int
    time: datetime
    shot: int                      # the frame's number, which seeds its rendering
    objects: tuple[SceneObject, ...]


@dataclass(frozen=True)
class RenderedFrame:
    """uint8 RGB pixels; per object its opacity mask in the frame and its normalised box
    (x_min, y_min, width, height), None when the object is out of frame."""
    pixels: np.ndarray
    masks: list[np.ndarray]
    boxes: list[tuple[float, float, float, float] | None]


@dataclass(frozen=True)
class ScenePaths:
    images: Path         # the camera folders
    detections: Path     # MegaDetector JSON of the true boxes (conf 1), files relative to `images`
    ground_truth: Path   # CSV: GROUND_TRUTH_COLUMNS, one row per box, a detection -1 row per empty frame


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def _check_arguments(frames: int, individuals_per_species: int, species: tuple[str, ...], cameras: int,
                     burst: int, frame_size: tuple[int, int]) -> None:
    unknown = [name for name in species if name not in SPECIES_COATS]
    if unknown or not species:
        raise DataError(f"unknown scene species {', '.join(unknown) or '(none given)'}; choose from "
                        f"{', '.join(SPECIES_COATS)}")
    for name, value, least in (("frames", frames, 1), ("individuals_per_species", individuals_per_species, 1),
                               ("cameras", cameras, 1), ("burst", burst, 1)):
        if value < least:
            raise DataError(f"{name} must be at least {least} (got {value})")
    if min(frame_size) < 64:
        raise DataError(f"frame size {frame_size[0]}x{frame_size[1]} is too small for several animals; use at "
                        "least 64 pixels on each side")


def _individuals(seed: int, species: tuple[str, ...], count: int) -> dict[str, list[tuple[str, int]]]:
    """(name, synth identity) of each species' individuals: the first synth identities whose coat
    is of the species' family, so that they look as they do in synth's dataset."""
    chosen: dict[str, list[tuple[str, int]]] = {name: [] for name in species}
    identity = 0
    while any(len(members) < count for members in chosen.values()):
        kind = synth.coat_style(seed, identity).kind
        for name, members in chosen.items():
            if SPECIES_COATS[name] == kind and len(members) < count:
                members.append((f"{name}-{len(members):02d}", identity))
        identity += 1
    return chosen


def plan_scenes(frames: int = 60, individuals_per_species: int = 4,
                species: tuple[str, ...] = ("spotted-cat", "striped-antelope"), cameras: int = 3, burst: int = 3,
                seed: int = 0) -> list[FramePlan]:
    """What each frame shows, in shooting order. The first encounters show each kind (animals,
    blank, person, vehicle) once, in random order, so that even a short set has them all."""
    species = tuple(species)
    rng = _rng(seed, _PLAN)
    individuals = _individuals(seed, species, individuals_per_species)
    clocks = [START + timedelta(minutes=17 * camera) for camera in range(cameras)]
    counters = [0] * cameras
    kinds = list(rng.permutation(KINDS))
    plans: list[FramePlan] = []
    encounter = 0
    while len(plans) < frames:
        kind = kinds.pop(0) if kinds else str(rng.choice(KINDS, p=KIND_SHARES))
        camera = int(rng.integers(cameras))
        clocks[camera] += timedelta(seconds=int(rng.integers(600, 6 * 3600)))
        objects = _encounter_objects(kind, rng, individuals, encounter)
        velocities = rng.uniform(-0.05, 0.05, len(objects))
        for step in range(min(int(rng.integers(1, burst + 1)), frames - len(plans))):
            counters[camera] += 1
            moved = tuple(replace(obj, centre=(obj.centre[0] + step * v, obj.centre[1]))
                          for obj, v in zip(objects, velocities))
            plans.append(FramePlan(f"CAM{camera + 1:02d}/IMG_{counters[camera]:04d}.JPG", camera, encounter,
                                   clocks[camera], len(plans), moved))
            clocks[camera] += timedelta(seconds=int(rng.integers(1, 4)))
        encounter += 1
    return plans


def _encounter_objects(kind: str, rng: np.random.Generator, individuals: dict[str, list[tuple[str, int]]],
                       encounter: int) -> tuple[SceneObject, ...]:
    if kind == "blank":
        return ()
    if kind == "person":
        return (SceneObject("person", "human", "", encounter, "right", (float(rng.uniform(0.2, 0.8)),
                            float(rng.uniform(0.5, 0.6))), float(rng.uniform(0.45, 0.7)), 0.0),)
    if kind == "vehicle":
        return (SceneObject("vehicle", "vehicle", "", encounter, "right", (float(rng.uniform(0.25, 0.75)),
                            float(rng.uniform(0.55, 0.65))), float(rng.uniform(0.45, 0.75)), 0.0),)
    name = str(rng.choice(list(individuals)))
    members = individuals[name]
    count = min(int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1])), len(members))
    animals = []
    for member in rng.choice(len(members), count, replace=False):
        identity, look = members[int(member)]
        centre = (float(rng.uniform(0.15, 0.85)), float(rng.uniform(0.5, 0.75)))
        animals.append(SceneObject("animal", name, identity, look, str(rng.choice(["left", "right"])), centre,
                                   float(rng.uniform(*SPECIES_SIZES[name])), float(rng.uniform(-8, 8))))
    return tuple(sorted(animals, key=lambda a: a.centre[1]))  # nearer (lower) animals drawn last, in front


# --------------------------------------------------------------------------------- rendering
@lru_cache(maxsize=8)
def _site(seed: int, camera: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Camera `camera`'s background and vegetation colour: synth's site camera % SITES, drawn as
    synth.encounter_scene draws it."""
    site = synth._rng(seed, synth._SITE, camera % synth.SITES)
    ground = np.array([105, 115, 65], dtype=np.float32) + site.normal(0, 22, 3).astype(np.float32)
    background = synth._background(site, side, ground)
    return synth._frozen(background), synth._frozen(ground.clip(0, 255))


@lru_cache(maxsize=4)
def _scene(seed: int, camera: int, encounter: int, side: int) -> synth.Scene:
    """The background and the lighting that the frames of an encounter share."""
    background, ground = _site(seed, camera, side)
    rng = _rng(seed, _LIGHT, encounter)
    gain, contrast = float(rng.uniform(0.8, 1.15)), float(rng.uniform(0.85, 1.1))
    cast = rng.normal(1.0, 0.04, 3).astype(np.float32)
    direction, strength = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.2)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side - 0.5
    shade = (1 + strength * (x * np.cos(direction) + y * np.sin(direction))).astype(np.float32)
    return synth.Scene(background, ground, gain, contrast, synth._frozen(cast), synth._frozen(shade))


def render_frame(plan: FramePlan, frame_size: tuple[int, int] = (320, 240), seed: int = 0) -> RenderedFrame:
    """Render a planned frame of `frame_size` (width, height).

    Everything is drawn on a square canvas (synth's backgrounds, occluders and lighting are square)
    and the frame is cut from its middle.
    """
    width, height = frame_size
    side = max(width, height)
    left, top = (side - width) // 2, (side - height) // 2
    scene = _scene(seed, plan.camera, plan.encounter, side)
    rng = _rng(seed, _FRAME, plan.shot)
    picture = scene.background.copy()
    masks = []
    for obj in plan.objects:
        centre = (left + obj.centre[0] * width, top + obj.centre[1] * height)
        layer, mask = _draw(obj, centre, width, height, side, rng, seed)
        picture = picture * (1 - mask[..., None]) + layer * mask[..., None]
        masks.append(mask)
    animals = [mask for obj, mask in zip(plan.objects, masks) if obj.category == "animal"]
    synth._occlude(picture, np.max(animals, axis=0) if animals else np.zeros((side, side), np.float32), rng,
                   scene.ground)
    picture = synth._degrade(synth._light(picture, scene, rng), rng)
    window = np.s_[top:top + height, left:left + width]
    masks = [mask[window] for mask in masks]
    return RenderedFrame(picture[window].clip(0, 255).astype(np.uint8), masks, [_box(mask) for mask in masks])


def _draw(obj: SceneObject, centre: tuple[float, float], width: int, height: int, side: int,
          rng: np.random.Generator, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The object's RGB layer and opacity on the canvas."""
    if obj.category == "animal":
        return _animal(obj, centre, width, side, rng, seed)
    parts = np.zeros((side, side), np.uint8)  # which part (palette entry) covers each pixel; 0: none
    colours = _rng(seed, _LOOK, obj.look)
    if obj.category == "person":
        palette = _person(parts, centre, obj.size * height, colours)
    else:
        palette = _vehicle(parts, centre, obj.size * width, colours)
    mask = cv2.GaussianBlur((parts > 0).astype(np.float32), (0, 0), 0.7)  # soft edges, as a lens draws them
    return palette[parts], mask


def _animal(obj: SceneObject, centre: tuple[float, float], width: int, side: int, rng: np.random.Generator,
            seed: int) -> tuple[np.ndarray, np.ndarray]:
    """synth's body of the individual, in a new gait each frame, placed like synth._pose places it."""
    body, alpha = synth._body(seed, obj.look, obj.flank, rng)
    scale = obj.size * width / synth.BODY_W
    matrix = cv2.getRotationMatrix2D((synth.BODY_W / 2, synth.BODY_H / 2), obj.angle, scale)
    matrix[:, 2] += np.array(centre) - np.array([synth.BODY_W / 2, synth.BODY_H / 2])
    if obj.flank == "left":  # facing left: mirror about the vertical through the animal's centre
        matrix = np.array([[-1, 0, 2 * centre[0]], [0, 1, 0]]) @ np.vstack([matrix, [0, 0, 1]])
    return synth._place(body, alpha, matrix, scale, side)


def _person(parts: np.ndarray, centre: tuple[float, float], tall: float,
            colours: np.random.Generator) -> np.ndarray:
    """A standing silhouette (legs, torso, arms, head) drawn as part numbers; returns the palette:
    trousers, shirt and skin in the person's colours."""
    cx, cy = centre
    top, feet = cy - tall / 2, cy + tall / 2
    hip, shoulder = top + 0.52 * tall, top + 0.2 * tall
    limb = max(2, int(tall * 0.07))
    for side in (-1, 1):
        cv2.line(parts, _pt((cx + side * tall * 0.05, hip)), _pt((cx + side * tall * 0.07, feet)), 1, limb)
        cv2.line(parts, _pt((cx + side * tall * 0.13, shoulder + limb)), _pt((cx + side * tall * 0.17, hip)), 2, limb)
    cv2.rectangle(parts, _pt((cx - tall * 0.12, shoulder)), _pt((cx + tall * 0.12, hip)), 2, -1)
    cv2.circle(parts, _pt((cx, top + 0.09 * tall)), max(2, int(0.09 * tall)), 3, -1)
    skin = np.array([200, 160, 130]) * colours.uniform(0.5, 1.05)
    return np.array([(0, 0, 0), colours.uniform(30, 120, 3), colours.uniform(40, 200, 3), skin], np.float32)


def _vehicle(parts: np.ndarray, centre: tuple[float, float], long: float, colours: np.random.Generator) -> np.ndarray:
    """A side view (body, cabin, windows, two wheels) drawn as part numbers; returns the palette."""
    cx, cy = centre
    body_top, bottom = cy - 0.08 * long, cy + 0.12 * long
    cv2.rectangle(parts, _pt((cx - long / 2, body_top)), _pt((cx + long / 2, bottom)), 1, -1)
    cv2.rectangle(parts, _pt((cx - long * 0.25, cy - 0.25 * long)), _pt((cx + long * 0.2, body_top)), 1, -1)
    cv2.rectangle(parts, _pt((cx - long * 0.21, cy - 0.22 * long)), _pt((cx + long * 0.16, body_top - 0.02 * long)),
                  2, -1)
    for side in (-1, 1):
        cv2.circle(parts, _pt((cx + side * long * 0.3, bottom)), max(3, int(0.1 * long)), 3, -1)
    return np.array([(0, 0, 0), colours.uniform(30, 230, 3), (60, 70, 80), (25, 25, 25)], np.float32)


def _pt(xy: tuple[float, float]) -> tuple[int, int]:
    return int(round(xy[0])), int(round(xy[1]))


def _box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Normalised xywh around the object's visible pixels; None when it is out of frame."""
    ys, xs = np.nonzero(mask > BOX_ALPHA)
    if len(xs) == 0:
        return None
    height, width = mask.shape
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    return x0 / width, y0 / height, (x1 - x0) / width, (y1 - y0) / height


# ------------------------------------------------------------------------------------ files
def _write_frame(pixels: np.ndarray, path: Path, time: datetime) -> None:
    exif = Image.Exif()
    stamp = time.strftime("%Y:%m:%d %H:%M:%S")
    exif[DATETIME], exif[MAKE], exif[MODEL] = stamp, "wildreid", "synthetic camera trap"
    exif.get_ifd(EXIF_IFD)[DATETIME_ORIGINAL] = stamp
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90, exif=exif)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())


def make_synthetic_scenes(out: str | Path, frames: int = 60, individuals_per_species: int = 4,
                          species: tuple[str, ...] = ("spotted-cat", "striped-antelope"), cameras: int = 3,
                          burst: int = 3, frame_size: tuple[int, int] = (320, 240), seed: int = 0,
                          progress: bool = True) -> ScenePaths:
    """Write out/images/CAMnn/IMG_nnnn.JPG, out/detections.json and out/ground_truth.csv.

    The JSON and CSV are written last and atomically, so a folder that has them is complete.
    """
    species = tuple(species)
    _check_arguments(frames, individuals_per_species, species, cameras, burst, frame_size)
    out = Path(out)
    paths = ScenePaths(out / "images", out / "detections.json", out / "ground_truth.csv")
    for stale in (paths.detections, paths.ground_truth):  # they must not vouch for a folder being rewritten
        stale.unlink(missing_ok=True)
    truth: list[tuple] = []
    boxes: list[tuple] = []  # the detection table of the true boxes
    for plan in tqdm(plan_scenes(frames, individuals_per_species, species, cameras, burst, seed), desc="scenes",
                     unit="frame", disable=not progress):
        frame = render_frame(plan, frame_size, seed)
        _write_frame(frame.pixels, paths.images / plan.file, plan.time)
        visible = [(obj, box) for obj, box in zip(plan.objects, frame.boxes) if box is not None]
        shot = (f"E{plan.encounter:04d}", f"CAM{plan.camera + 1:02d}", plan.time.isoformat(sep=" "))
        for index, (obj, box) in enumerate(visible):
            flank = obj.flank if obj.category == "animal" else ""
            truth.append((plan.file, index, obj.category, obj.species, obj.identity, flank, *shot, *box))
            boxes.append((plan.file, index, obj.category, 1.0, *box, ""))
        if not visible:
            truth.append((plan.file, NO_DETECTION, "", "", "", "", *shot, *(np.nan,) * 4))
            boxes.append(image_row(plan.file))
    detections = detection_table(boxes)
    write_megadetector_json(paths.detections, detections, info={"detector": "ground truth (wildreid synthetic scenes)"})
    with atomic_path(paths.ground_truth) as tmp:
        pd.DataFrame(truth, columns=GROUND_TRUTH_COLUMNS).to_csv(tmp, index=False)
    return paths
