"""A dataset of labelled images whose augmentation is set by a per-item seed.

An item may be requested as `(index, seed)`: the augmentation then depends on that seed alone,
not on which worker process loads it or on any global RNG, which is what lets training resume
bit for bit.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from reid.data.table import DECODE_ERRORS
from reid.data.transforms import seed_transform
from reid.errors import DataError


def read_image(path: str, longest_side: int | None = None, draft_size: int | None = None) -> np.ndarray:
    """RGB uint8 array, EXIF orientation applied, optionally shrunk to `longest_side`.

    A JPEG is decoded at a reduced DCT scale still at least `longest_side` (or `draft_size`, which
    shrinks nothing further) on each side: much faster than decoding it whole."""
    try:
        with Image.open(path) as image:
            if longest_side or draft_size:
                side = longest_side or draft_size
                image.draft("RGB", (side, side))
            ImageOps.exif_transpose(image, in_place=True)  # in place: a copy of every upright photo costs
            if image.mode != "RGB":  # a quarter of its decoding, and so would converting an RGB one
                image = image.convert("RGB")
            if longest_side and max(image.size) > longest_side:
                image.thumbnail((longest_side, longest_side), Image.Resampling.BILINEAR)
            return np.asarray(image)
    except DECODE_ERRORS as exc:
        raise DataError(f"cannot read image '{path}' ({exc}); replace the file or remove its row") from None


class ReIDDataset(Dataset):
    """Items are `(image CxHxW float32, label, index)`, asked for by `index` or `(index, seed)`.

    With a seed, the transform's randomness is reset from that seed alone; a plain index draws
    from the transform's own random stream (fine for deterministic evaluation transforms).

    With `cache_images`, decoded images, shrunk so their longest side is `cache_size` (a little
    above the training size, e.g. 1.15 x), stay in memory after first use. The cache is per
    process: every DataLoader worker fills its own copy (and loses it when the worker ends, so
    use persistent workers), so it suits datasets whose shrunk images fit in RAM several times.
    """

    def __init__(self, paths: Sequence[str], labels: np.ndarray, transform, cache_images: bool = False,
                 cache_size: int | None = None, draft_size: int | None = None):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths, self.labels, self.transform = list(paths), np.asarray(labels, dtype=np.int64), transform
        self.cache: dict[int, np.ndarray] | None = {} if cache_images else None
        self.cache_size = cache_size
        self.draft_size = draft_size  # uncached JPEGs decode at a reduced scale still this size on each side

    def __len__(self) -> int:
        return len(self.paths)

    def _image(self, index: int) -> np.ndarray:
        if self.cache is None:
            return read_image(self.paths[index], draft_size=self.draft_size)
        if index not in self.cache:
            self.cache[index] = read_image(self.paths[index], self.cache_size)
        return self.cache[index]

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        if seed is not None:
            seed_transform(self.transform, int(seed))
        image = self.transform(image=self._image(index))["image"]
        return image, int(self.labels[index]), int(index)
