"""Albumentations pipelines: letterboxed to a square, mild geometric and photometric augmentation.

Letterboxing (resize the longest side, pad the rest) keeps the animal's proportions: coat patterns
are the identity, and stretching them changes them.
"""
from __future__ import annotations

from typing import Sequence

import albumentations as A
import cv2
import pandas as pd
from albumentations.pytorch import ToTensorV2

from reid.data.classes import flank_count
from reid.errors import ConfigError


def _letterbox(size: int) -> list:
    # area interpolation when shrinking: plain bilinear aliases thin stripes and small spots away
    return [A.LongestMaxSize(max_size=size, area_for_downscale="image"),
            A.PadIfNeeded(min_height=size, min_width=size, border_mode=cv2.BORDER_CONSTANT, fill=0)]


def build_transforms(image_size: int, mean: Sequence[float], std: Sequence[float], train: bool,
                     hflip: bool, crop_scale: float = 1.0, grayscale_p: float = 0.0,
                     erasing_p: float = 0.3) -> A.Compose:
    """Square `image_size` tensors, normalised; `train` adds augmentation, `hflip` mirror images.

    `crop_scale` < 1 adds random resized crops keeping that share of the area at least (a partly
    framed animal), `grayscale_p` random grayscale (stripes, not coat colour), `erasing_p` random
    erasing of one or two patches (occluding branches).
    """
    for name, value, low in (("data.crop_scale", crop_scale, 0.05), ("data.grayscale_p", grayscale_p, 0.0),
                             ("data.erasing_p", erasing_p, 0.0)):
        if not low <= value <= 1.0:
            raise ConfigError(f"{name} is {value}; it must lie in [{low}, 1]")
    steps = _letterbox(image_size)
    if train:
        if crop_scale < 1.0:
            steps.append(A.RandomResizedCrop(size=(image_size, image_size), scale=(crop_scale, 1.0),
                                             ratio=(0.8, 1.25), p=0.5))
        steps += [
            A.Affine(scale=(0.85, 1.1), keep_ratio=True, translate_percent=(-0.06, 0.06), rotate=(-10, 10),
                     border_mode=cv2.BORDER_CONSTANT, fill=0, p=0.8),
            A.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.2, hue=0.03, p=0.8),
            A.ToGray(p=grayscale_p),
            A.GaussianBlur(blur_limit=(3, 5), p=0.1),
            A.CoarseDropout(num_holes_range=(1, 2), hole_height_range=(0.1, 0.25),
                            hole_width_range=(0.1, 0.25), fill=0, p=erasing_p),
        ]
        if hflip:
            steps.append(A.HorizontalFlip(p=0.5))
    steps += [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()]
    return A.Compose(steps)


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
