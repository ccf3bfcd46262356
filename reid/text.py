"""Free-text labels (species names, viewpoints) in the one form they are stored and compared in."""
from __future__ import annotations

import re


def normalise_label(value: str | None, pattern: re.Pattern, rule: str) -> str | None:
    """Lower case, inner runs of spaces made one, outer spaces removed; None for None or blank.
    ValueError(`rule`) for a value outside `pattern` once normalised."""
    if value is None:
        return None
    value = " ".join(value.strip().lower().split())
    if not value:
        return None
    if not pattern.match(value):
        raise ValueError(rule)
    return value
