"""Test-time augmentation by flips: each image is embedded in several mirrored views, averaged.

Flips are applied to the batch tensor as the model takes it, so a view costs one forward pass and no decoding.
"""
from __future__ import annotations

import pandas as pd
import torch

from reid.data.classes import flank_count

# dims of an NCHW batch to flip for each view: W is 3 (horizontal), H is 2 (vertical)
TTA_VIEWS: dict[str, tuple[tuple[int, ...], ...]] = {
    "none": ((),),
    "hflip": ((), (3,)),
    "flip4": ((), (3,), (2,), (2, 3)),
}


def check_tta(name: str) -> str:
    if name not in TTA_VIEWS:
        raise ValueError(f"unknown TTA '{name}'; use one of {', '.join(TTA_VIEWS)}")
    return name


def views(images: torch.Tensor, tta: str) -> list[torch.Tensor]:
    """The batch in each view of `tta`."""
    return [images.flip(dims) if dims else images for dims in TTA_VIEWS[check_tta(tta)]]


def flank_warning(table: pd.DataFrame, tta: str) -> str | None:
    """A warning when horizontal flips would average a left flank with a fake right one."""
    if 3 not in {d for dims in TTA_VIEWS[check_tta(tta)] for d in dims} or flank_count(table) < 2:
        return None
    return (f"TTA '{tta}' flips images horizontally, but the viewpoint column tells flanks apart: a flipped "
            "left flank looks like a right one, which can blur identities; consider --tta none")
