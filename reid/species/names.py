"""Species names, compared in one form everywhere: the store, routes files, requests and identify-batch.

"Spotted-Cat " in a routes file, "spotted-cat" in the store and "Spotted-cat" from a classifier are
one species: lower case, inner runs of spaces made one, outer spaces removed.
"""
from __future__ import annotations

import re

from reid.text import normalise_label

SPECIES_PATTERN = re.compile(r"^[a-z0-9][a-z0-9 _.\-]{0,99}$")
SPECIES_RULE = "species must be 1-100 characters: letters, digits, space, '_', '.', '-'"


def normalise_species(value: str | None) -> str | None:
    """The compared form of a species name (None for None or blank); ValueError for a name outside
    SPECIES_PATTERN once normalised."""
    return normalise_label(value, SPECIES_PATTERN, SPECIES_RULE)
