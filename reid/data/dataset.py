"""A dataset of labelled images whose augmentation is set by a per-item seed.

An item may be requested as `(index, seed)`: the augmentation then depends on that seed alone,
not on which worker process loads it or on any global RNG, which is what lets training resume
bit for bit.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from reid.errors import DataError


def read_image(path: str, longest_side: int | None = None) -> np.ndarray:
    """RGB uint8 array, EXIF orientation applied, optionally shrunk to `longest_side`."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
            if longest_side and max(image.size) > longest_side:
                image.thumbnail((longest_side, longest_side), Image.Resampling.BILINEAR)
            return np.asarray(image)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"cannot read image '{path}' ({exc}); replace or remove it") from None


class ReIDDataset(Dataset):
    """Returns `(image CxHxW float32, label, index)`.

    With `cache_images`, decoded images (shrunk to `cache_size`) stay in memory after first use:
    each loader worker holds its own copy, so use it for datasets that fit in RAM.
    """

    def __init__(self, paths: Sequence[str], labels: np.ndarray, transform, cache_images: bool = False,
                 cache_size: int | None = None):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths, self.labels, self.transform = list(paths), np.asarray(labels, dtype=np.int64), transform
        self.cache: dict[int, np.ndarray] | None = {} if cache_images else None
        self.cache_size = cache_size

    def __len__(self) -> int:
        return len(self.paths)

    def _image(self, index: int) -> np.ndarray:
        if self.cache is None:
            return read_image(self.paths[index])
        if index not in self.cache:
            self.cache[index] = read_image(self.paths[index], self.cache_size)
        return self.cache[index]

    def __getitem__(self, item: int | tuple[int, int]):
        index, seed = item if isinstance(item, tuple) else (item, None)
        if seed is not None:
            self.transform.set_random_seed(int(seed))
        image = self.transform(image=self._image(index))["image"]
        return image, int(self.labels[index]), index
