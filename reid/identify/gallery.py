"""The galleries: one per species, built from the store's rows and kept in step with its change feed.

The database is the truth. A gallery remembers the change sequence it has applied; `sync()` reads
the sequence (one cheap query) and, when it moved, the image rows stamped since then, and applies
them: an image whose vector is unchanged and still visible only changes owner (a merge), any
other changed image leaves its gallery and comes back if it is visible (its individual is
neither deleted nor merged away). Applying a change twice gives the same result, so a crash
anywhere (after a commit, before the gallery update) loses nothing: the next start rebuilds
every gallery from the database, and other instances sharing the database catch up on their
next request.

A species whose re-ranking is on keeps its images in an `OnlineKReciprocal` state (each image's
exact neighbour lists and sparse k-reciprocal encoding, updated image by image as they are added
and removed), which also answers its cosine searches; one without keeps them in a `GalleryIndex`
(exact, or approximate for very large galleries). Either way a candidate is an individual, ranked
by its best image, and every candidate says both its ranking score and its raw cosine, and the
viewpoint (flank) its best image was enrolled with: which of its coat patterns matched.

Building a re-ranking state means every image's exact neighbours: minutes for 100,000 images on
two cores. So each state is also kept as a snapshot file (`save_snapshots`: at start once built,
periodically, and at close). A start loads the snapshot and applies the difference to the store's
rows (images gone, changed or new since the snapshot), so it answers exactly what a state built
from the store would, whatever happened after the snapshot was written (a SIGKILL included).
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from reid.errors import ConfigError
from reid.evaluation.evaluate import RerankOptions
from reid.index.gallery import GalleryIndex, choose_kind
from reid.rerank import OnlineKReciprocal
from reid.rerank.expansion import expand_with_neighbours
from reid.store import GalleryRow, Store, blob_to_vector, vector_to_blob

log = logging.getLogger("wildreid.identify")

IMAGES_PER_CANDIDATE = 5


@dataclass
class ImageHit:
    image_id: int
    score: float   # the ranking score: 1 - re-ranked distance, or the cosine without re-ranking
    cosine: float
    viewpoint: str | None  # as recorded with the gallery image; None: unknown


@dataclass
class Candidate:
    """An individual as answered: ranked by its best image, whose viewpoint (the flank that matched) it
    gives; `cosine` is the best cosine of its images."""
    individual_id: int
    score: float
    cosine: float
    viewpoint: str | None
    images: list[ImageHit] = field(default_factory=list)  # best first


@dataclass(frozen=True)
class Layout:
    """What a species' gallery holds: vectors of model `stamp`, of `dim` dimensions, re-ranked so."""
    stamp: str
    dim: int
    rerank: RerankOptions = field(default_factory=RerankOptions)
    rerank_source: str = "none"       # checkpoint, settings, or none
    candidates: int = 100             # images re-ranked per query


RERANK_MODES = ("checkpoint", "settings", "off")


def choose_rerank(mode: str, postprocessing: dict | None, configured: RerankOptions) -> tuple[RerankOptions, str]:
    """(re-ranking, source) of a species: what its checkpoint's calibration chose (`checkpoint`: plain
    cosine when it chose none or was never calibrated), `configured` for every species
    (`settings`), or none (`off`). Database augmentation is an offline step: never applied online."""
    from reid.evaluation.postprocessing import stored_options

    if mode not in RERANK_MODES:
        raise ConfigError(f"re-ranking '{mode}': use one of {', '.join(RERANK_MODES)}")
    if mode == "off":
        return RerankOptions(), "off"
    if mode == "settings":
        return check_rerank(configured), "settings"
    if not postprocessing:
        return RerankOptions(), "checkpoint (not calibrated: plain cosine)"
    chosen = stored_options(postprocessing)
    return check_rerank(RerankOptions(**{**asdict(chosen), "dba": 0})), "checkpoint"


def check_rerank(options: RerankOptions) -> RerankOptions:
    """`options`, or a ConfigError naming the setting out of range."""
    problems = [f"k1 {options.k1} (>= 1)" if options.k1 < 1 else "",
                f"k2 {options.k2} (>= 1)" if options.k2 < 1 else "",
                f"lambda {options.lambda_value} (0 to 1)" if not 0 <= options.lambda_value <= 1 else "",
                f"qe {options.qe} (>= 0)" if options.qe < 0 else ""]
    problems = [p for p in problems if p]
    if problems:
        raise ConfigError(f"re-ranking settings out of range: {', '.join(problems)}")
    return options


def rerank_description(layout: Layout) -> dict:
    """The re-ranking an answer used (what and where the settings came from)."""
    return {**asdict(layout.rerank), "describe": layout.rerank.describe(), "source": layout.rerank_source,
            "candidates": layout.candidates if layout.rerank.k_reciprocal else None}


def single_threaded_blas():
    """Keep the searches' BLAS (OpenBLAS) to one thread until the returned limiter's
    `restore_original_limits()`.

    An idle OpenBLAS worker spins for a while after each product, and on two cores that stole the
    model's: a forward pass beside a 100,000-image search took 2.5 times as long. A server runs many
    requests at once, so one thread a search loses nothing; torch's own threads are left as they are."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def individuals_of(hits: list[tuple[int, float, float]], owner: dict[int, int], viewpoint_of: dict[int, str | None],
                   top_k: int) -> list[Candidate]:
    """Image hits (image id, score, cosine), best first, grouped into the first `top_k` individuals
    (`owner` and `viewpoint_of`: each image's individual and viewpoint)."""
    found: dict[int, Candidate] = {}
    for image_id, score, cosine in hits:
        individual = owner[image_id]
        candidate = found.get(individual)
        if candidate is None:
            if len(found) == top_k:
                continue
            candidate = found[individual] = Candidate(individual, score, cosine, viewpoint_of[image_id])
        candidate.cosine = max(candidate.cosine, cosine)
        if len(candidate.images) < IMAGES_PER_CANDIDATE:
            candidate.images.append(ImageHit(image_id, score, cosine, viewpoint_of[image_id]))
    return list(found.values())


class SpeciesGallery:
    """One species' visible images: vectors by image id, and each image's individual and viewpoint."""

    def __init__(self, layout: Layout, kind: str):
        self.layout = layout
        self.changed = True  # since the last snapshot
        self.owner: dict[int, int] = {}         # image id -> individual id
        self.viewpoint_of: dict[int, str | None] = {}  # image id -> the viewpoint recorded with it
        options = layout.rerank
        if options.k_reciprocal:
            self.state = OnlineKReciprocal(k1=options.k1, k2=options.k2, lambda_value=options.lambda_value,
                                           dim=layout.dim)
            self.index = None
        else:
            self.state = None
            self.index = GalleryIndex(layout.dim, kind)
            self.vector_of: dict[int, int] = {}  # image id -> the index's vector id
            self.image_of: dict[int, int] = {}   # vector id -> image id

    def __len__(self) -> int:
        return len(self.owner)

    def restore(self, path: Path, rows: list[GalleryRow]) -> bool:
        """The re-ranking state from its snapshot, brought to `rows` (the store's visible images of this
        species) by removing, replacing and adding what differs; False when the snapshot does not fit."""
        options = self.layout.rerank
        try:
            state = OnlineKReciprocal.load(path)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("re-ranking snapshot %s is unusable (%s): building the state from the store", path, exc)
            return False
        if (state.k1, state.k2, state.lambda_value, state.dim) != (options.k1, options.k2, options.lambda_value,
                                                                    self.layout.dim):
            return False
        ids = np.array([r.image_id for r in rows], dtype=np.int64)
        present = np.isin(ids, state.keys)
        current = np.frombuffer(b"".join(r.embedding for r, here in zip(rows, present) if here), dtype="<f4")
        changed = ids[present][np.any(state.vectors_of(ids[present]) != current.reshape(-1, state.dim), axis=1)]
        gone = np.setdiff1d(state.keys, ids)
        if len(gone) or len(changed):
            state.remove(np.concatenate([gone, changed]))
        self.state = state
        fresh = [r for r in rows if r.image_id not in state]
        self.add(fresh)
        self.owner = {r.image_id: r.individual_id for r in rows}
        self.viewpoint_of = {r.image_id: r.viewpoint for r in rows}
        log.info("re-ranking state of %d images loaded from %s (%d removed, %d replaced or added since)", len(rows),
                 path, len(gone), len(fresh))
        return True

    def remove(self, image_ids: list[int]) -> None:
        gone = [i for i in image_ids if i in self.owner]
        if not gone:
            return
        self.changed = True
        if self.state is not None:
            self.state.remove(np.array(gone, dtype=np.int64))
        else:
            vector_ids = [self.vector_of.pop(i) for i in gone]
            self.index.remove(vector_ids)
            for vector_id in vector_ids:
                del self.image_of[vector_id]
        for image_id in gone:
            del self.owner[image_id]
            del self.viewpoint_of[image_id]

    def add(self, rows: list[GalleryRow]) -> None:
        if not rows:
            return
        self.changed = True
        vectors = np.stack([blob_to_vector(r.embedding) for r in rows])
        ids = np.array([r.image_id for r in rows], dtype=np.int64)
        if self.state is not None:
            self.state.add(vectors, ids)
        else:
            for image_id, vector_id in zip(ids, self.index.add(vectors, pd.DataFrame({"image_id": ids}))):
                self.vector_of[int(image_id)] = int(vector_id)
                self.image_of[int(vector_id)] = int(image_id)
        for row in rows:
            self._describe(row)

    def _describe(self, row: GalleryRow) -> None:
        """Keep an image's individual and viewpoint as the row says."""
        self.owner[row.image_id] = row.individual_id
        self.viewpoint_of[row.image_id] = row.viewpoint

    def apply(self, rows: list[GalleryRow], usable: Callable[[GalleryRow], bool]) -> None:
        """Changed rows of this species: owners of unchanged vectors move, the rest leave and come back."""
        present = [r for r in rows if r.visible and r.image_id in self.owner and usable(r)]
        stored = self._vectors([r.image_id for r in present]) if present else []
        moved = [r for r, vector in zip(present, stored) if vector_to_blob(vector) == r.embedding]
        for row in moved:
            self._describe(row)
        kept = {r.image_id for r in moved}
        self.remove([r.image_id for r in rows if r.image_id not in kept])
        self.add([r for r in rows if r.image_id not in kept and r.visible and usable(r)])

    def search(self, queries: np.ndarray, top_k: int) -> list[list[Candidate]]:
        """The top_k individuals for each L2-normalised query, a row of `queries` (alpha-QE first when
        the layout says so). A query's answer does not depend on the others searched with it: one
        pass over the gallery's vectors serves them all."""
        if not self.owner:
            return [[] for _ in queries]
        queries = self._expanded(queries)
        if self.state is not None:
            return self._reranked(queries, top_k)
        return self._by_cosine(queries, top_k)

    def _expanded(self, queries: np.ndarray) -> np.ndarray:
        options = self.layout.rerank
        if not options.qe:
            return queries
        hits = self._cosine_hits(queries, min(options.qe, len(self)))
        return np.stack([expand_with_neighbours(query, self._vectors(ids), cosines, options.qe_alpha)
                         for query, (cosines, ids) in zip(queries, hits)])

    def _reranked(self, queries: np.ndarray, top_k: int) -> list[list[Candidate]]:
        shown = min(len(self), max(self.layout.candidates, top_k))
        distances, keys, cosines = self.state.rerank(queries, candidates=shown)
        return [individuals_of([(int(k), 1.0 - float(d), float(c)) for d, k, c in zip(*row)], self.owner,
                               self.viewpoint_of, top_k)
                for row in zip(distances, keys, cosines)]

    def _by_cosine(self, queries: np.ndarray, top_k: int) -> list[list[Candidate]]:
        """Exact for a flat index: hits come best first, so asking for more neighbours until top_k
        distinct individuals appear gives exactly the top_k."""
        size = len(self)
        k = min(size, max(8 * top_k, 64))
        answers: list[list[Candidate]] = [[] for _ in queries]
        pending = np.arange(len(queries))
        while pending.size:
            short = []
            for row, (cosines, ids) in zip(pending, self._cosine_hits(queries[pending], k)):
                answers[row] = individuals_of([(i, c, c) for i, c in zip(ids, cosines)], self.owner,
                                              self.viewpoint_of, top_k)
                if len(answers[row]) < top_k and k < size:
                    short.append(row)
            pending, k = np.array(short, dtype=np.int64), min(size, k * 4)
        return answers

    def _cosine_hits(self, queries: np.ndarray, k: int) -> list[tuple[list[float], list[int]]]:
        """(cosines, image ids) of the k images most similar to each query, best first."""
        if self.state is not None:
            cosines, keys = self.state.search(queries, k)
            return [([float(c) for c in row], [int(i) for i in ids]) for row, ids in zip(cosines, keys)]
        scores, vector_ids = self.index.search(queries, k)
        out = []
        for row, ids in zip(scores, vector_ids):
            hits = [(float(s), self.image_of[int(v)]) for s, v in zip(row, ids) if v >= 0]
            out.append(([s for s, _ in hits], [i for _, i in hits]))
        return out

    def _vectors(self, image_ids: list[int]) -> np.ndarray:
        if self.state is not None:
            return self.state.vectors_of(np.array(image_ids, dtype=np.int64))
        return self.index.vectors([self.vector_of[i] for i in image_ids])


@dataclass(frozen=True)
class GalleryArrays:
    """A species' gallery as plain arrays, copied at the galleries' change sequence `seq`."""
    seq: int
    vectors: np.ndarray          # float32 (n, dim), L2-normalised
    image_ids: np.ndarray        # int64 (n,)
    individual_ids: np.ndarray   # int64 (n,)


@dataclass
class QueuedQuery:
    """A search waiting for the galleries' lock, answered by whichever caller takes it first."""
    species: str
    vector: np.ndarray
    top_k: int
    answer: list[Candidate] = field(default_factory=list)
    error: Exception | None = None
    done: threading.Event = field(default_factory=threading.Event)


LayoutOf = Callable[[str], "Layout | None"]  # species -> its gallery's layout, None: no model serves it


class Galleries:
    """Every species' gallery; `layout(species)` says what each holds (service/networks.py, or the
    routes of identify-batch)."""

    def __init__(self, store: Store, layout: LayoutOf, kind: str = "flat", ann_threshold: int = 200_000,
                 snapshot_dir: Path | None = None):
        self.store, self.layout = store, layout
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir else None
        self.kind, self.ann_threshold = kind, ann_threshold
        self.by_species: dict[str, SpeciesGallery] = {}
        self.seq = -1
        # rows embedded by another model (another instance's checkpoint) or of a species no model serves
        self.foreign = 0
        self.lock = threading.RLock()
        self._queue: list[QueuedQuery] = []  # searches waiting for the lock (`search`)
        self._queue_lock = threading.Lock()

    def _new(self, species: str, size: int) -> SpeciesGallery:
        kind = choose_kind("auto", size, self.ann_threshold) if self.kind == "auto" else self.kind
        return SpeciesGallery(self.layout(species), kind)

    def _usable(self, row: GalleryRow) -> bool:
        layout = self.layout(row.species)
        return layout is not None and row.embedding_model == layout.stamp

    def rebuild(self, rows: list[GalleryRow] | None = None, seq: int | None = None) -> None:
        """Every gallery afresh from the database's visible images (or from `rows` read at `seq`)."""
        if rows is None:
            seq, rows = self.store.gallery_rows(None)
        grouped: dict[str, list[GalleryRow]] = {}
        foreign = 0
        for row in rows:
            if self._usable(row):
                grouped.setdefault(row.species, []).append(row)
            else:
                foreign += 1
        fresh = {}
        for species, species_rows in grouped.items():
            gallery = self._new(species, len(species_rows))
            snapshot = self.snapshot_path(species)
            if not (snapshot and snapshot.is_file() and gallery.restore(snapshot, species_rows)):
                gallery.add(species_rows)
            fresh[species] = gallery
        with self.lock:
            self.by_species, self.seq, self.foreign = fresh, seq, foreign
        if foreign:
            log.warning("%d images were embedded by another model (or are of a species no model serves) and are not "
                        "searchable with these models", foreign)

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
                gallery.apply(species_rows, self._usable)
            self.seq = seq
            return len(rows)

    def snapshot_path(self, species: str) -> Path | None:
        """Where a species' re-ranking state is kept: named by what it depends on (species, model, settings)."""
        layout = self.layout(species)
        if self.snapshot_dir is None or layout is None or not layout.rerank.k_reciprocal:
            return None
        spec = json.dumps([species, layout.stamp, asdict(layout.rerank)], sort_keys=True)
        return self.snapshot_dir / f"rerank-{hashlib.sha256(spec.encode()).hexdigest()[:16]}.npz"

    def save_snapshots(self) -> int:
        """Write the re-ranking state of each gallery changed since its last snapshot; return how many."""
        written = 0
        with self.lock:
            for species, gallery in self.by_species.items():
                path = self.snapshot_path(species)
                if path is None or gallery.state is None or not gallery.changed:
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                gallery.state.save(path)
                gallery.changed = False
                written += 1
        return written

    def search(self, species: str, query: np.ndarray, top_k: int) -> list[Candidate]:
        """The top_k individuals for one L2-normalised query in a species' gallery.

        Searches take the galleries' lock one at a time, and a 100,000-image gallery's vectors are
        read from memory whole for each: concurrent searches are memory-bound. So a caller queues its
        query, and whoever holds the lock answers every query queued by then, those of one species
        and top_k in one pass over the vectors (flat combining: no thread of its own, and a lone
        query waits for nobody). The answers are those of each query searched alone."""
        waiting = QueuedQuery(species, query, top_k)
        with self._queue_lock:
            self._queue.append(waiting)
        with self.lock:
            if not waiting.done.is_set():
                with self._queue_lock:
                    queued, self._queue = self._queue, []
                self._answer(queued)
        if waiting.error is not None:
            raise waiting.error
        return waiting.answer

    def _answer(self, queued: list["QueuedQuery"]) -> None:
        """Answer queued queries, grouped by (species, top_k); a failing group fails its own queries only."""
        groups: dict[tuple[str, int], list[QueuedQuery]] = {}
        for query in queued:
            groups.setdefault((query.species, query.top_k), []).append(query)
        for (species, top_k), group in groups.items():
            gallery = self.by_species.get(species)
            try:
                answers = (gallery.search(np.stack([q.vector for q in group]), top_k) if gallery is not None
                           else [[] for _ in group])
            except Exception as exc:  # noqa: BLE001 - handed to the callers, each raises it
                for query in group:
                    query.error = exc
            else:
                for query, answer in zip(group, answers):
                    query.answer = answer
            for query in group:
                query.done.set()

    def arrays(self, species: str) -> GalleryArrays:
        """A copy of a species' searchable images (vectors, image ids, individual ids) and the change sequence
        they are of, taken under the lock every search and sync holds, so that a concurrent sync never shows
        half a change and work on the copy does not hold the lock; empty when the species has no gallery."""
        with self.lock:
            gallery = self.by_species.get(species)
            image_ids = list(gallery.owner) if gallery is not None else []
            if not image_ids:
                dim = gallery.layout.dim if gallery is not None else 0
                return GalleryArrays(self.seq, np.zeros((0, dim), np.float32), np.zeros(0, np.int64),
                                     np.zeros(0, np.int64))
            owners = np.array([gallery.owner[i] for i in image_ids], dtype=np.int64)
            vectors = np.array(gallery._vectors(image_ids), dtype=np.float32)  # a copy, whichever store holds them
            return GalleryArrays(self.seq, vectors, np.array(image_ids, dtype=np.int64), owners)

    def sizes(self) -> dict[str, int]:
        with self.lock:
            return {species: len(g) for species, g in sorted(self.by_species.items())}

    def image_ids(self, species: str | None = None) -> set[int]:
        """Searchable image ids (for checks and tests)."""
        with self.lock:
            galleries = [self.by_species.get(species)] if species else list(self.by_species.values())
            return {image_id for g in galleries if g for image_id in g.owner}
