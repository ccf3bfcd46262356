"""SpeciesNet predictions JSON: per-image species, and its detections as a MegaDetector table.

SpeciesNet (github.com/google/cameratrapai) writes `predictions[]`, each with `filepath`, optional
`failures`, `detections` (MegaDetector's boxes, with `label` animal/human/vehicle), `classifications`
(top-5 raw classifier output) and the ensemble's `prediction` with `prediction_score`. A taxon is a
string `uuid;class;order;family;genus;species;common name`; the ensemble rolls up to higher taxa
when unsure, and uses the special taxa blank, animal, human, vehicle and "no cv result".
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import pandas as pd

from reid.errors import ReidError
from reid.species.jsoncheck import Position, bbox, entries, field, load_json, unit_number, unit_value
from reid.species.megadetector import detection_table, image_row

UNKNOWN = "unknown"  # species name when no source can tell
FAILED = "failed"    # species name of an image SpeciesNet could not process
NO_RESULT = "no cv result"  # every field of SpeciesNet's "unknown" taxon
# SpeciesNet detection categories, named as MegaDetector tables name them (its label says "human")
DETECTION_LABELS = {"1": ("animal", "animal"), "2": ("human", "person"), "3": ("vehicle", "vehicle")}
RANKS = ("class", "order", "family", "genus", "species")
Naming = Literal["common", "scientific"]


class SpeciesSource(Protocol):
    """Anything that names the species in an image, or in a box of it: SpeciesNet's predictions
    file, our own classifier. `bbox` is normalised [x_min, y_min, width, height]; None: whole image."""

    def species_for(self, file: str, bbox: tuple[float, float, float, float] | None = None) -> tuple[str, float]:
        ...


@dataclass(frozen=True)
class Taxon:
    uuid: str
    class_: str
    order: str
    family: str
    genus: str
    species: str
    common_name: str

    @property
    def rank(self) -> str:
        """The most specific rank named ("species" ... "class"); "" for blank, animal, vehicle, unknown."""
        named = [rank for rank, value in zip(RANKS, self.ranks()) if value]
        return named[-1] if named and self.common_name != NO_RESULT else ""

    def ranks(self) -> tuple[str, ...]:
        return self.class_, self.order, self.family, self.genus, self.species

    @property
    def scientific_name(self) -> str:
        if self.common_name == NO_RESULT:
            return ""
        if self.species:
            return f"{self.genus} {self.species}"
        return next((value for value in reversed(self.ranks()) if value), "")

    def name(self, naming: Naming = "common") -> str:
        """The species name we report: the special taxa by their own words, others by common or
        scientific name (falling back to the other when one is missing)."""
        if self.common_name == NO_RESULT:
            return UNKNOWN
        if (self.genus, self.species) == ("homo", "sapiens"):
            return "human"
        if not self.rank:  # blank, animal, vehicle: only the common name is set
            return self.common_name
        preferred = self.common_name if naming == "common" else self.scientific_name
        return preferred or self.common_name or self.scientific_name


def parse_taxon(text: str, at: Position) -> Taxon:
    parts = text.split(";")
    if len(parts) != 7:
        raise at.error(f"'{text[:80]}' has {len(parts)} ';'-separated fields; a SpeciesNet taxon has 7 "
                       "(uuid;class;order;family;genus;species;common name)")
    return Taxon(*(part.strip() for part in parts))


@dataclass(frozen=True)
class SpeciesNetPredictions:
    """`images`: one row per image (file, species, score, rank, common_name, scientific_name, taxon,
    source, failures); `detections`: its boxes as a MegaDetector detection table."""
    images: pd.DataFrame
    detections: pd.DataFrame


def read_speciesnet(path: str | Path, naming: Naming = "common") -> SpeciesNetPredictions:
    """Parse and check a SpeciesNet predictions file; DataError names any malformed entry."""
    if naming not in ("common", "scientific"):
        raise ReidError(f"species naming '{naming}' is not known; use common or scientific")
    doc = load_json(path, "SpeciesNet predictions")
    top = Position(path)
    if not isinstance(doc, dict):
        raise top.error("the top level must be an object with a 'predictions' list")
    images, detections = [], []
    seen: dict[str, int] = {}
    for index, item in enumerate(entries(field(doc, "predictions", list, top), top / "predictions", "predictions")):
        at = top / "predictions" / index
        file = field(item, "filepath", str, at)
        if file in seen:
            raise (at / "filepath").error(f"'{file}' is listed twice (also at predictions[{seen[file]}])")
        seen[file] = index
        failures = field(item, "failures", list, at, required=False) or []
        if not all(isinstance(f, str) for f in failures):
            raise (at / "failures").error("must be a list of strings such as \"CLASSIFIER\"")
        images.append(_image(item, file, failures, naming, at))
        detections += _detections(item, file, failures, at)
    columns = ["file", "species", "score", "rank", "common_name", "scientific_name", "taxon", "source", "failures"]
    return SpeciesNetPredictions(pd.DataFrame(images, columns=columns), detection_table(detections))


def _image(item: dict, file: str, failures: list[str], naming: Naming, at: Position) -> tuple:
    text, score, source, where = _prediction(item, at)
    if text is None:
        return file, FAILED if failures else UNKNOWN, np.nan, "", "", "", "", "", ",".join(failures)
    taxon = parse_taxon(text, where)
    return (file, taxon.name(naming), score, taxon.rank, taxon.common_name, taxon.scientific_name, text, source,
            ",".join(failures))


def _prediction(item: dict, at: Position) -> tuple[str | None, float, str, Position]:
    """The ensemble's prediction (taxon, score, source, position); a classifier-only run has none,
    so its top classification stands in."""
    top = _top_classification(item, at)
    text = field(item, "prediction", str, at, required=False)
    if text is not None:
        source = field(item, "prediction_source", str, at, required=False) or ""
        return text, unit_number(item, "prediction_score", at), source, at / "prediction"
    if top is None:
        return None, np.nan, "", at
    return top


def _top_classification(item: dict, at: Position) -> tuple[str, float, str, Position] | None:
    """The first of `classifications` (checked whole), or None."""
    classifications = field(item, "classifications", dict, at, required=False)
    if classifications is None:
        return None
    at = at / "classifications"
    classes, scores = field(classifications, "classes", list, at), field(classifications, "scores", list, at)
    if len(classes) != len(scores):
        raise at.error(f"has {len(classes)} classes but {len(scores)} scores")
    for index, (text, score) in enumerate(zip(classes, scores)):
        if not isinstance(text, str):
            raise (at / "classes" / index).error("must be a taxon string")
        parse_taxon(text, at / "classes" / index)
        unit_value(score, at / "scores" / index)
    if not classes:
        return None
    return classes[0], float(scores[0]), "classifier", at / "classes" / 0


def _detections(item: dict, file: str, failures: list[str], at: Position) -> list[tuple]:
    detections = field(item, "detections", list, at, required=False)
    if detections is None:  # a classifier-only run, or the detector failed
        return [image_row(file, ",".join(failures) if "DETECTOR" in failures else "")]
    rows = []
    for index, detection in enumerate(entries(detections, at / "detections", "detections")):
        where = at / "detections" / index
        category = field(detection, "category", str, where)
        if category not in DETECTION_LABELS:
            raise (where / "category").error(f"unknown category '{category}'; SpeciesNet uses \"1\" (animal), "
                                             "\"2\" (human) and \"3\" (vehicle)")
        label, name = DETECTION_LABELS[category]
        given = field(detection, "label", str, where, required=False)
        if given is not None and given != label:
            raise (where / "label").error(f"'{given}' does not match category '{category}' ({label})")
        rows.append((file, index, name, unit_number(detection, "conf", where), *bbox(detection, where), ""))
    return rows or [image_row(file)]


class SpeciesNetSpecies:
    """Per-image species from a SpeciesNet predictions file, behind the SpeciesSource interface.

    SpeciesNet's ensemble names one species per image, so every box of an image gets it. Files are
    matched by normalised path, as written in the file (relative paths start at `root` if given).
    Below `threshold` the species is "unknown", as with our own classifier.
    """

    def __init__(self, path: str | Path, naming: Naming = "common", threshold: float = 0.0,
                 root: str | Path | None = None):
        self.path, self.threshold = Path(path), threshold
        images = read_speciesnet(path, naming).images
        files = [os.path.normpath(os.path.join(root, f) if root else f) for f in images["file"]]
        self.by_file = dict(zip(files, zip(images["species"], images["score"])))

    def species_for(self, file: str, bbox: tuple[float, float, float, float] | None = None) -> tuple[str, float]:
        key = os.path.normpath(file)
        if key not in self.by_file:
            raise ReidError(f"'{file}' has no prediction in {self.path}; run SpeciesNet on the same images "
                            "(paths are matched as written there)")
        species, score = self.by_file[key]
        if species not in (FAILED, UNKNOWN) and score < self.threshold:
            species = UNKNOWN
        return species, float(score)
