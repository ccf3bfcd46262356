"""What a training class is: an individual, or one flank of an individual.

Left and right flanks carry different patterns. Trained as one class, the two flanks of an animal
can only be pulled together by what they share (body shape, sex, pose, the bush it stands in), so
the embedding learns exactly the shortcuts re-identification must avoid. Trained as
(identity, viewpoint) classes, as MiewID trains its name keys, each class is one pattern. The
individual is restored at retrieval time: galleries and answers are per individual, so a photo of
either flank still finds its animal (see `reid.evaluation.metrics` for the flank-split scores).
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

from reid.errors import ConfigError
from reid.text import normalise_label

MODES = ("auto", "identity", "identity_viewpoint")
SEPARATOR = "|"
# a viewpoint as the store keeps it with each image, and as answers give the flank that matched
VIEWPOINT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9 _\-]{0,49}$")
VIEWPOINT_RULE = ("a viewpoint must be 1-50 characters: letters, digits, space, '_', '-', starting with a letter or "
                  "digit (e.g. left, right)")


def normalise_viewpoint(value: str | None) -> str | None:
    """The stored form of a photo's viewpoint (reid.text.normalise_label); None (unknown) for None or
    blank; ValueError for one outside VIEWPOINT_PATTERN once normalised."""
    return normalise_label(value, VIEWPOINT_PATTERN, VIEWPOINT_RULE)


def named_viewpoints(table: pd.DataFrame) -> pd.Series | None:
    """The viewpoint of each row as text ('' where none is named), or None without such a column."""
    if "viewpoint" not in table.columns:
        return None
    return table["viewpoint"].fillna("").astype(str).str.strip()


def flank_count(table: pd.DataFrame) -> int:
    """How many distinct viewpoints the table names (empty cells name none)."""
    views = named_viewpoints(table)
    return 0 if views is None else int(views[views != ""].nunique())


def resolve_mode(mode: str, table: pd.DataFrame) -> tuple[str, str]:
    """The class mode to train with, and why (for the log)."""
    if mode not in MODES:
        raise ConfigError(f"loss.classes is {mode!r}; use one of {', '.join(MODES)}")
    flanks = flank_count(table)
    if mode == "auto":
        if flanks > 1:
            return "identity_viewpoint", ("the viewpoint column names flanks, so each (identity, viewpoint) is a class "
                                          "(loss.classes: auto; set identity to train one class per individual)")
        return "identity", "one class per individual (loss.classes: auto; no viewpoint column names flanks)"
    if mode == "identity_viewpoint" and flanks < 2:
        raise ConfigError("loss.classes is identity_viewpoint but the table names fewer than two viewpoints; "
                          "add a viewpoint column (left/right) or set loss.classes to identity")
    return mode, f"loss.classes: {mode}"


def class_keys(table: pd.DataFrame, mode: str) -> np.ndarray:
    """The class key of every row: its identity, or 'identity|viewpoint' (rows without a named
    viewpoint stay a class of their own identity)."""
    identity = table["identity"].astype(str).to_numpy()
    if mode == "identity":
        return identity.astype(object)
    views = named_viewpoints(table).to_numpy()
    return np.where(views == "", identity, np.char.add(np.char.add(identity, SEPARATOR), views.astype(str))).astype(object)


def encode(keys: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Sorted class names and each row's integer label."""
    names, labels = np.unique(keys.astype(str), return_inverse=True)
    return names.tolist(), labels.astype(np.int64)
