"""The in-memory galleries, one `GalleryIndex` per species, kept in step with the database.

The database is the truth. A gallery remembers the change sequence it has applied; `sync()` reads
the sequence (one cheap query) and, when it moved, the image rows stamped since then, and applies
them: each changed image leaves its gallery and comes back if it is visible (its individual is
neither deleted nor merged away). Applying a change twice gives the same result, so a crash
anywhere (after a commit, before the index update) loses nothing: the next start rebuilds every
gallery from the database, and other instances sharing the database catch up on their next request.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd

from reid.index.gallery import GalleryIndex, choose_kind
from service.store import GalleryRow, Store, blob_to_vector

log = logging.getLogger("wildreid.service")


@dataclass
class Match:
    individual_id: int
    score: float
    images: list[tuple[int, float]] = field(default_factory=list)  # (image id, similarity), best first


class SpeciesGallery:
    """One species: a GalleryIndex whose vector ids map to (image id, individual id)."""

    def __init__(self, dim: int, kind: str):
        self.index = GalleryIndex(dim, kind)
        self.vector_of: dict[int, int] = {}  # image id -> vector id
        self.owner: dict[int, tuple[int, int]] = {}  # vector id -> (image id, individual id)

    def __len__(self) -> int:
        return len(self.owner)

    def remove(self, image_ids: list[int]) -> None:
        vector_ids = [self.vector_of.pop(i) for i in image_ids if i in self.vector_of]
        if vector_ids:
            self.index.remove(vector_ids)
            for v in vector_ids:
                del self.owner[v]

    def add(self, rows: list[GalleryRow]) -> None:
        if not rows:
            return
        vectors = np.stack([blob_to_vector(r.embedding) for r in rows])
        table = pd.DataFrame({"image_id": [r.image_id for r in rows], "individual_id": [r.individual_id for r in rows]})
        for row, vector_id in zip(rows, self.index.add(vectors, table)):
            self.vector_of[row.image_id] = int(vector_id)
            self.owner[int(vector_id)] = (row.image_id, row.individual_id)

    def search(self, query: np.ndarray, top_k: int, images_per_match: int = 5) -> list[Match]:
        """The top_k individuals by their best image's similarity to the query (exact for a flat index).

        Results come best first, so an individual's first appearance is its best image: asking for
        more neighbours until top_k distinct individuals appear gives exactly the top_k.
        """
        size = len(self)
        if size == 0:
            return []
        k = min(size, max(8 * top_k, 64))
        while True:
            scores, ids = self.index.search(query[None, :], k)
            matches: dict[int, Match] = {}
            for score, vector_id in zip(scores[0], ids[0]):
                if vector_id < 0:
                    continue
                image_id, individual_id = self.owner[int(vector_id)]
                match = matches.setdefault(individual_id, Match(individual_id, float(score)))
                if len(match.images) < images_per_match:
                    match.images.append((image_id, float(score)))
            if len(matches) >= top_k or k >= size:
                return list(matches.values())[:top_k]
            k = min(size, k * 4)


Layout = Callable[[str], "tuple[str, int] | None"]  # species -> (vector stamp, dimension), None: no model


class Galleries:
    """`layout(species)` says which model's vectors a species' gallery holds (service/models.py)."""

    def __init__(self, store: Store, layout: Layout, kind: str = "flat", ann_threshold: int = 200_000):
        self.store, self.layout = store, layout
        self.kind, self.ann_threshold = kind, ann_threshold
        self.by_species: dict[str, SpeciesGallery] = {}
        self.seq = -1
        # rows embedded by another model (another instance's checkpoint) or of a species no model serves
        self.foreign = 0
        self.lock = threading.RLock()

    def _new(self, species: str, size: int) -> SpeciesGallery:
        kind = choose_kind("auto", size, self.ann_threshold) if self.kind == "auto" else self.kind
        return SpeciesGallery(self.layout(species)[1], kind)

    def _usable(self, row: GalleryRow) -> bool:
        layout = self.layout(row.species)
        if layout is None or row.embedding_model != layout[0]:
            self.foreign += 1
            return False
        return True

    def rebuild(self) -> None:
        """Every gallery afresh from the database's visible images."""
        seq, rows = self.store.gallery_rows(None)
        self.foreign = 0
        grouped: dict[str, list[GalleryRow]] = {}
        for row in rows:
            if self._usable(row):
                grouped.setdefault(row.species, []).append(row)
        fresh = {}
        for species, species_rows in grouped.items():
            gallery = self._new(species, len(species_rows))
            gallery.add(species_rows)
            fresh[species] = gallery
        with self.lock:
            self.by_species, self.seq = fresh, seq
        if self.foreign:
            log.warning("%d images were embedded by another model and are not searchable with this one",
                        self.foreign)

    def sync(self) -> int:
        """Apply the database's changes since the last sync; return how many image rows changed."""
        if self.store.change_seq() <= self.seq:
            return 0
        with self.lock:
            seq, rows = self.store.gallery_rows(self.seq)
            if seq <= self.seq:
                return 0
            by_species: dict[str, list[GalleryRow]] = {}
            for row in rows:
                by_species.setdefault(row.species, []).append(row)
            for species, species_rows in by_species.items():
                gallery = self.by_species.get(species)
                if gallery is None:
                    if self.layout(species) is None:
                        self.foreign += sum(r.visible for r in species_rows)
                        continue
                    gallery = self.by_species[species] = self._new(species, len(species_rows))
                gallery.remove([r.image_id for r in species_rows])
                gallery.add([r for r in species_rows if r.visible and self._usable(r)])
            self.seq = seq
            return len(rows)

    def search(self, species: str, query: np.ndarray, top_k: int) -> list[Match]:
        with self.lock:
            gallery = self.by_species.get(species)
            return gallery.search(query, top_k) if gallery is not None else []

    def sizes(self) -> dict[str, int]:
        with self.lock:
            return {species: len(g) for species, g in sorted(self.by_species.items())}

    def image_ids(self, species: str | None = None) -> set[int]:
        """Searchable image ids (for checks and tests)."""
        with self.lock:
            galleries = [self.by_species.get(species)] if species else list(self.by_species.values())
            return {image_id for g in galleries if g for image_id in g.vector_of}
