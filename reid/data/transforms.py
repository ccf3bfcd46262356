"""Albumentations pipelines: letterboxed to a square, mild geometric and photometric augmentation.

Letterboxing (resize the longest side, pad the rest) keeps the animal's proportions: coat patterns
are the identity, and stretching them changes them.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, fields
from typing import Sequence

import albumentations as A
import cv2
import numpy as np
import pandas as pd
from albumentations.pytorch import ToTensorV2

from reid.data.classes import flank_count
from reid.errors import ConfigError


def _letterbox(size: int) -> list:
    # area interpolation when shrinking: plain bilinear aliases thin stripes and small spots away
    return [A.LongestMaxSize(max_size=size, area_for_downscale="image"),
            A.PadIfNeeded(min_height=size, min_width=size, border_mode=cv2.BORDER_CONSTANT, fill=0)]


@dataclass(frozen=True)
class Augmentation:
    """How strongly training images are varied; every field is a `data.*` config key.

    The geometric and photometric ranges should cover how photos of one individual differ between
    encounters (pose, distance, camera tilt, light): a network trained on few encounters otherwise
    learns those encounters instead of the coat.
    """
    augment_p: float = 1.0         # share of photos augmented at all; each step below then draws its own p
    crop_scale: float = 1.0        # < 1: random resized crops keeping at least this share of the area
    grayscale_p: float = 0.0       # random grayscale (stripes, not coat colour)
    erasing_p: float = 0.3         # random erasing of one or two patches (occluding branches)
    rotate_deg: float = 10.0       # random rotation within +- this angle
    scale_min: float = 0.85        # random zoom range
    scale_max: float = 1.1
    jitter: float = 0.25           # brightness and contrast jitter (saturation 0.8x, hue 0.12x of it)

    @classmethod
    def from_config(cls, data_cfg: dict) -> "Augmentation":
        return cls(**{f.name: float(data_cfg[f.name]) for f in fields(cls)})

    def check(self) -> None:
        for name, low, high in (("augment_p", 0.0, 1.0), ("crop_scale", 0.05, 1.0), ("grayscale_p", 0.0, 1.0),
                                ("erasing_p", 0.0, 1.0), ("rotate_deg", 0.0, 180.0), ("scale_min", 0.1, 1.0),
                                ("scale_max", 1.0, 4.0), ("jitter", 0.0, 1.0)):
            value = getattr(self, name)
            if not low <= value <= high:
                raise ConfigError(f"data.{name} is {value}; it must lie in [{low}, {high}]")


def build_transforms(image_size: int, mean: Sequence[float], std: Sequence[float], train: bool,
                     hflip: bool, augmentation: Augmentation = Augmentation(), normalize: bool = True) -> A.Compose:
    """Square `image_size` tensors, normalised; `train` adds `augmentation`, `hflip` mirror images.
    With `normalize` off they stay uint8, for `reid.embedding.compute.model_input` to normalise a
    whole batch at once."""
    aug = augmentation
    aug.check()
    steps = _letterbox(image_size)
    if train:
        varied = []
        if aug.crop_scale < 1.0:
            varied.append(A.RandomResizedCrop(size=(image_size, image_size), scale=(aug.crop_scale, 1.0),
                                              ratio=(0.8, 1.25), p=0.5))
        varied += [
            A.Affine(scale=(aug.scale_min, aug.scale_max), keep_ratio=True, translate_percent=(-0.06, 0.06),
                     rotate=(-aug.rotate_deg, aug.rotate_deg), border_mode=cv2.BORDER_CONSTANT, fill=0, p=0.8),
            A.ColorJitter(brightness=aug.jitter, contrast=aug.jitter, saturation=0.8 * aug.jitter,
                          hue=0.12 * aug.jitter, p=0.8),
            A.ToGray(p=aug.grayscale_p),
            A.GaussianBlur(blur_limit=(3, 5), p=0.1),
            A.CoarseDropout(num_holes_range=(1, 2), hole_height_range=(0.1, 0.25),
                            hole_width_range=(0.1, 0.25), fill=0, p=aug.erasing_p),
        ]
        steps.append(A.Sequential(varied, p=aug.augment_p))
        if hflip:
            steps.append(A.HorizontalFlip(p=0.5))
    if normalize:
        steps.append(A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0))
    steps.append(ToTensorV2())
    return A.Compose(steps)


def seed_transform(pipeline: A.BaseCompose, seed: int) -> None:
    """Reset `pipeline`'s randomness from `seed` alone, with one NumPy and one Python random stream that
    all its steps draw from in turn. Albumentations' own `set_random_seed` gives every step a
    generator of that same seed, so each step's first draw is the same number: whether a step
    applies (`u < p`) was decided by one shared `u`, and a photo that skipped the affine warp skipped
    the colour jitter and every rarer step too. Building two generators a step also took a quarter
    of an 80 px photo's augmentation."""
    numpy_random, python_random = np.random.default_rng(seed), random.Random(seed)
    steps = [pipeline]
    while steps:
        step = steps.pop()
        step.seed, step.random_generator, step.py_random = seed, numpy_random, python_random
        steps.extend(getattr(step, "transforms", ()))


def use_hflip(setting: str | bool, table: pd.DataFrame) -> tuple[bool, str]:
    """Whether training flips images horizontally, and why (for the log)."""
    if isinstance(setting, bool):
        return setting, f"data.hflip is {str(setting).lower()}"
    if setting != "auto":
        raise ConfigError(f"data.hflip is {setting!r}; use auto, true or false")
    if flank_count(table) > 1:
        return False, ("the viewpoint column tells flanks apart and a flipped left flank is a fake right flank "
                       "(data.hflip: auto; set true to force)")
    return True, "no viewpoint column distinguishes flanks (data.hflip: auto)"
