"""`reid identify-batch`: identify the animals of a folder of camera-trap photos against a store.

For every photo under --images (JPEG/PNG, any depth): its time (EXIF DateTimeOriginal, else the
file's mtime, said so in `datetime_source`), its encounter (photos of one camera folder less than
--gap-seconds apart), its detections (a MegaDetector JSON, else a detector run here), and for
each confident detection one result row: people `human`, vehicles `vehicle`, photos without any
`blank`, unreadable ones `failed`; animals get a species (SpeciesNet file, our classifier, or a
fixed name), are routed to that species' re-ID checkpoint (reid.species.routing) and searched in
the store's gallery of that species only: `match` / `uncertain` / `new` by the route's
thresholds, or `species-only` when there is no re-ID model for the species (or the box is too
small to re-identify). `matched_viewpoint` is the viewpoint (flank) recorded with the top
candidate's best-matching gallery image, empty when none was recorded.

The gallery of a route is the store's visible images of its species. Vectors the store holds from
another model (another checkpoint or TTA) are never mixed with this model's: those images are
embedded again here, from the store's files and bboxes exactly as the service re-embeds them
after a model change (`--stale-embeddings error` refuses instead). The run only reads the store;
enrolling stays a deliberate act through the service.

Results are appended per photo to OUT.partial (a JSON line per photo, flushed and fsynced), so
an interrupted run continues where it stopped when the same command is run again; the CSV is
written atomically from it at the end. Photos are processed in fixed chunks of the sorted list
(a chunk cut short is redone whole), so a resumed run computes exactly what an uninterrupted one
does.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import posixpath
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

RESULT_COLUMNS = ["file", "detection", "category", "conf", "x", "y", "w", "h", "species", "species_score",
                  "individual_id", "individual_name", "score", "matched_viewpoint", "decision", "encounter", "camera",
                  "datetime", "datetime_source", "model", "note"]
DECISIONS = ("match", "uncertain", "new", "species-only", "human", "vehicle", "blank", "failed")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
EXIF_IFD, DATETIME_ORIGINAL, OFFSET_TIME_ORIGINAL = 0x8769, 0x9003, 0x9011
EXIF_FORMAT = "%Y:%m:%d %H:%M:%S"
PARTIAL_KIND = "wildreid-identify-batch"
PARTIAL_FORMAT = f"{PARTIAL_KIND}-2"  # 2: rows with matched_viewpoint
TIMING_STAGES = ("setup", "io", "detection", "species", "embedding", "search")


# ------------------------------------------------------------------------------------ timings
class Timings:
    """Seconds spent per stage, and the wall time since `start()`; what is not in a stage is `other`."""

    def __init__(self):
        self.seconds = {stage: 0.0 for stage in TIMING_STAGES}
        self.started = time.perf_counter()
        self.stopped: float | None = None

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def stop(self) -> None:
        self.stopped = time.perf_counter()

    @property
    def wall(self) -> float:
        return (self.stopped or time.perf_counter()) - self.started

    def shares(self) -> dict[str, float]:
        """Each stage's share of the wall time, and `other` for the rest (they sum to 1)."""
        wall = max(self.wall, 1e-9)
        shares = {stage: round(seconds / wall, 4) for stage, seconds in self.seconds.items()}
        shares["other"] = round(max(0.0, 1 - sum(self.seconds.values()) / wall), 4)
        return shares

    def summary(self) -> str:
        return ", ".join(f"{stage} {share:.0%}" for stage, share in self.shares().items())


# ------------------------------------------------------------------------------------ photos
@dataclass
class Photo:
    file: str            # path under the images folder, with '/'
    path: Path
    camera: str          # the parent folder (Camtrap DP deployment)
    datetime: str        # ISO 8601 local time, seconds
    datetime_source: str  # exif or mtime
    utc_offset: str | None = None  # EXIF OffsetTimeOriginal, when the camera wrote one
    encounter: str = ""


def list_photos(images: Path) -> list[Photo]:
    """The JPEG/PNG files under `images` (suffixes in any case; hidden files and folders skipped), sorted."""
    found = []
    for folder, dirs, files in os.walk(images):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append(Path(folder) / name)
    photos = []
    for path in sorted(found, key=lambda p: p.relative_to(images).as_posix()):
        file = path.relative_to(images).as_posix()
        camera = posixpath.dirname(file) or images.resolve().name
        stamp, source, offset = photo_time(path)
        photos.append(Photo(file, path, camera, stamp, source, offset))
    return photos


def photo_time(path: Path) -> tuple[str, str, str | None]:
    """(ISO time, source, UTC offset): EXIF DateTimeOriginal, else the file's modification time."""
    from PIL import Image

    raw = offset = None
    try:
        with Image.open(path) as image:
            sub = image.getexif().get_ifd(EXIF_IFD)
            raw, offset = sub.get(DATETIME_ORIGINAL), sub.get(OFFSET_TIME_ORIGINAL)
    except Exception:  # noqa: BLE001 - an unreadable photo gets its mtime here and fails when decoded
        pass
    if isinstance(raw, str):
        try:
            when = datetime.strptime(raw.strip().rstrip("\x00").strip(), EXIF_FORMAT)
            offset = offset.strip().rstrip("\x00") if isinstance(offset, str) and offset.strip() else None
            return when.isoformat(timespec="seconds"), "exif", offset
        except ValueError:
            pass
    return datetime.fromtimestamp(path.stat().st_mtime).isoformat(timespec="seconds"), "mtime", None


def assign_encounters(photos: list[Photo], gap_seconds: float) -> None:
    """Encounter ids CAMERA-Ennnn: a camera's photos in time order, a new encounter after a longer gap."""
    by_camera: dict[str, list[Photo]] = {}
    for photo in photos:
        by_camera.setdefault(photo.camera, []).append(photo)
    for camera, members in by_camera.items():
        members.sort(key=lambda p: (p.datetime, p.file))
        number, previous = 0, None
        for photo in members:
            when = datetime.fromisoformat(photo.datetime)
            if previous is not None and (when - previous).total_seconds() > gap_seconds:
                number += 1
            photo.encounter, previous = f"{camera}-E{number:04d}", when


# ------------------------------------------------------------------------------------ detections
def _relative(file: str, root: Path) -> str:
    text = file.replace("\\", "/")
    if os.path.isabs(text):
        text = os.path.relpath(text, root).replace(os.sep, "/")
    return posixpath.normpath(text)


class DetectionsFile:
    """A MegaDetector JSON whose `file` paths are relative to the images folder (absolute ones are
    made relative to it)."""

    def __init__(self, path: str | Path, images: Path):
        from reid.species.megadetector import read_megadetector

        self.path = Path(path)
        table = read_megadetector(self.path)
        table["file"] = [_relative(f, images.resolve()) for f in table["file"]]
        self.by_file = {file: rows for file, rows in table.groupby("file", sort=False)}
        self.digest = hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]

    def check(self, photos: list[Photo]) -> list[str]:
        """Warnings; a ReidError when the file names none of the photos (paths from another root)."""
        from reid.errors import ReidError

        files = {p.file for p in photos}
        missing = [p.file for p in photos if p.file not in self.by_file]
        extra = [f for f in self.by_file if f not in files]
        if photos and len(missing) == len(photos):
            raise ReidError(f"{self.path} names none of the {len(photos)} photos under --images (e.g. it lists "
                            f"'{next(iter(self.by_file), '')}', the folder has '{photos[0].file}'); its paths "
                            "must be relative to the --images folder")
        warnings = []
        if missing:
            warnings.append(f"{len(missing)} photos have no entry in {self.path} (e.g. '{missing[0]}'): they are "
                            "reported as failed")
        if extra:
            warnings.append(f"{len(extra)} entries of {self.path} are not under --images (e.g. '{extra[0]}')")
        return warnings

    def describe(self) -> dict:
        return {"file": str(self.path.resolve()), "sha256": self.digest}


class RunDetector:
    """Detections from a detector run on each decoded photo (MegaDetector weights, or whole images)."""

    def __init__(self, weights: str | Path | None = None, device: str | None = None):
        from reid.species.detector import MegaDetector, WholeImageDetector

        if weights:
            import torch

            # "cuda:0" rather than "cuda": older ultralytics releases did not accept an indexless "cuda"
            self.detector = MegaDetector(weights, device=device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
        else:
            self.detector = WholeImageDetector()
        self.weights = str(Path(weights).resolve()) if weights else None
        self.whole = not weights  # each photo is its one animal, taken whole

    def detect(self, file: str, image):
        from reid.species.detector import detection_rows

        return detection_rows(file, self.detector.detect(image))

    def describe(self) -> dict:
        return {"detector": "megadetector" if self.weights else "whole-image", "weights": self.weights}


# ------------------------------------------------------------------------------------ species
class FixedSpecies:
    """Every animal is of one species."""

    def __init__(self, name: str):
        self.name = name.strip()

    def species(self, items: list[AnimalRow]) -> list[tuple[str, float | None]]:
        return [(self.name, None)] * len(items)

    def describe(self) -> dict:
        return {"fixed": self.name}


class SpeciesNetFile:
    """SpeciesNet's per-photo species (its paths relative to the images folder, or absolute)."""

    def __init__(self, path: str | Path, images: Path, naming: str = "common", threshold: float = 0.0):
        from reid.species.speciesnet import SpeciesNetSpecies

        self.path = Path(path)
        self.source = SpeciesNetSpecies(path, naming, threshold, root=images.resolve())
        self.images = images.resolve()
        self.options = {"file": str(self.path.resolve()), "naming": naming, "threshold": threshold,
                        "sha256": hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]}

    def species(self, items: list[AnimalRow]) -> list[tuple[str, float | None]]:
        from reid.errors import ReidError
        from reid.species.speciesnet import UNKNOWN

        out = []
        for item in items:
            try:
                out.append(self.source.species_for(str(self.images / item.file)))
            except ReidError:
                out.append((UNKNOWN, None))
                item.notes.append(f"no SpeciesNet prediction in {self.path.name}")
        return out

    def describe(self) -> dict:
        return {"speciesnet": self.options}


class ClassifierSpecies:
    """Our species classifier on each animal's box (cut as it was trained), batched per chunk."""

    def __init__(self, path: str | Path, threshold: float | None = None):
        from reid.species.classifier import SpeciesClassifier

        self.classifier = SpeciesClassifier.from_checkpoint(path, threshold)
        self.options = {"file": str(Path(path).resolve()), "threshold": self.classifier.threshold}

    def cut(self, image, box):
        return self.classifier.cut(image, box)

    def species(self, items: list[AnimalRow]) -> list[tuple[str, float | None]]:
        if not items:
            return []
        names, scores = self.classifier.predict([item.species_crop for item in items])
        return [(name, float(score)) for name, score in zip(names, scores)]

    def describe(self) -> dict:
        return {"classifier": self.options}


# ------------------------------------------------------------------------------------ galleries
@dataclass
class AnimalRow:
    """An animal of a photo in the chunk being processed, and its result row being filled."""
    file: str
    row: dict
    animal: object               # reid.identify.animals.Animal (one view)
    species_crop: object | None = None
    notes: list[str] = field(default_factory=list)


class StoreGalleries:
    """Read-only galleries of the store (reid.identify.gallery), one per routed species, built at start.

    Images another model embedded are embedded again here, in memory, by the one routine the service
    uses at start (reid.identify.reembed); the store is not written."""

    def __init__(self, store_dir: Path, database_url: str | None, router, stale: str, timings: Timings,
                 crop_settings, rerank: str = "checkpoint", limits=None):
        from reid.errors import ReidError
        from reid.identify.photos import PhotoLimits
        from reid.store import Store

        self.store_dir = Path(store_dir).expanduser().absolute()
        self.url = database_url or f"sqlite:///{self.store_dir / 'wildreid.db'}"
        if database_url is None and not (self.store_dir / "wildreid.db").is_file():
            raise ReidError(f"no store at '{store_dir}' (it has no wildreid.db): give the --store folder of "
                            "`reid serve`, where individuals were enrolled")
        self.store = Store(self.url, create=False)
        self.router, self.stale, self.timings, self.crop_settings = router, stale, timings, crop_settings
        self.rerank, self.limits = rerank, limits or PhotoLimits()
        self.reembedded = 0
        with timings("setup"):
            try:
                self.store.check_schema()  # read only: a store of an older schema is not upgraded here
                self.seq, rows = self.store.gallery_rows(None)
            except Exception as exc:  # noqa: BLE001 - SQLAlchemy errors of a database that is not a store
                self.store.close()
                raise ReidError(f"cannot read the store '{store_dir}': {exc}") from None
            self._layouts: dict[str, object] = {}
            rows = [r for r in rows if router.route(r.species) is not None]
            self.names = self.store.names({r.individual_id for r in rows})
        self.galleries = self._build(rows)

    def close(self) -> None:
        self.store.close()

    def layout(self, species: str):
        """What the species' gallery holds (its route's model and re-ranking), None without a route."""
        from reid.identify.gallery import Layout, choose_rerank
        from reid.evaluation.evaluate import RerankOptions
        from reid.species.crops import embedding_model

        route = self.router.route(species)
        if route is None:
            return None
        if route.species not in self._layouts:
            embedder = route.embedder
            rerank, source = choose_rerank(self.rerank, embedder.postprocessing, RerankOptions())
            self._layouts[route.species] = Layout(embedding_model(embedder.fingerprint, self.crop_settings),
                                                  embedder.embedding_dim, rerank, source)
        return self._layouts[route.species]

    def _build(self, rows):
        from reid.identify.gallery import Galleries

        with self.timings("setup"):
            for species in {r.species for r in rows}:
                self.layout(species)  # loads each checkpoint (and its calibration) now, not mid-search
        with self.timings("embedding"):
            rows = self._current(rows)
        with self.timings("setup"):
            # the service's re-ranking snapshots (read only), so a large store's states are not built again
            galleries = Galleries(self.store, self.layout, snapshot_dir=self.store_dir / "cache" / "rerank")
            galleries.rebuild(rows, self.seq)
        return galleries

    def _current(self, rows):
        """The rows with this run's models' vectors: stale ones embedded again (or refused)."""
        from reid.errors import ReidError
        from reid.identify.reembed import reembed_stale, stored_view
        from reid.store import vector_to_blob

        stale = [r for r in rows if r.embedding_model != self.layout(r.species).stamp]
        if not stale:
            return rows
        if self.stale == "error":
            species = stale[0].species
            route, layout = self.router.route(species), self.layout(species)
            of_species = [r for r in stale if r.species == species]
            models = ", ".join(sorted({r.embedding_model for r in of_species}))
            raise ReidError(f"{len(of_species)} of the store's {sum(r.species == species for r in rows)} '{species}' "
                            f"images were embedded by model {models}, not by {route.checkpoint} (model "
                            f"{layout.stamp}, tta {route.embedder.tta}); serve the store with that checkpoint, or use "
                            "--stale-embeddings reembed")
        fresh: dict[int, bytes] = {}
        for species in sorted({r.species for r in stale}):
            embedder = self.router.route(species).embedder

            def view(row: dict):
                array = stored_view(self.store_dir, row, self.crop_settings, self.limits, embedder.image_size)
                if array is None:
                    raise ReidError(f"cannot embed stored image {row['id']} ({row['path']}) with this model: its file "
                                    "is missing, corrupt or undecodable (see the log)")
                return array

            def keep(vectors: dict) -> None:
                fresh.update({image_id: vector_to_blob(vector) for image_id, vector in vectors.items()})

            done, _ = reembed_stale(self.store, species, self.layout(species).stamp, embedder.embed_images, view, keep,
                                    embedder.batch_size)
            self.reembedded += done
        return [replace(r, embedding=fresh[r.image_id], embedding_model=self.layout(r.species).stamp)
                if r.image_id in fresh else r for r in rows]

    def identify(self, species: str, vector, thresholds: dict):
        from reid.identify.identify import identify

        return identify(self.galleries, self.router.route(species).species, vector[None, :], thresholds, top_k=1)

    def size(self, species: str) -> int:
        return self.galleries.sizes().get(self.router.route(species).species, 0)


def _preload() -> None:
    """Import what the run needs up front, so the stage timings do not include import time."""
    import reid.identify.animals  # noqa: F401
    import reid.identify.gallery  # noqa: F401
    import reid.identify.identify  # noqa: F401
    import reid.species.crops  # noqa: F401
    import tqdm.auto  # noqa: F401


# ------------------------------------------------------------------------------------ the run
@dataclass
class BatchResult:
    out: Path
    rows: object                 # DataFrame of RESULT_COLUMNS
    photos: int                  # photos in the folder
    processed: int               # photos identified by this run (the rest came from the .partial)
    timings: Timings
    reembedded: int = 0
    warnings: list[str] = field(default_factory=list)
    exported: tuple[Path, ...] = ()

    @property
    def frames_per_s(self) -> float:
        return self.processed / max(self.timings.wall, 1e-9)

    def decisions(self) -> dict[str, int]:
        counts = self.rows["decision"].value_counts()
        return {d: int(counts.get(d, 0)) for d in DECISIONS if counts.get(d, 0)}

    def summary(self) -> str:
        resumed = f", {self.photos - self.processed} from the interrupted run" if self.processed < self.photos else ""
        decisions = ", ".join(f"{n} {d}" for d, n in self.decisions().items())
        return (f"{self.out}: {len(self.rows)} rows for {self.photos} photos{resumed} ({decisions}); "
                f"{self.processed} photos in {self.timings.wall:.1f} s ({self.frames_per_s:.2f} frames/s; "
                f"{self.timings.summary()})")


class BatchRun:
    def __init__(self, images: str | Path, out: str | Path, router, store: str | Path,
                 species_source=None, detections: str | Path | None = None, detector: RunDetector | None = None,
                 crop_settings=None, gap_seconds: float = 120.0, database_url: str | None = None,
                 stale: str = "reembed", chunk: int = 8, progress: bool = True, restart: bool = False,
                 on_image: Callable[[str, int], None] | None = None, rerank: str = "checkpoint"):
        from reid.errors import ReidError
        from reid.species.crops import CropSettings

        self.timings = Timings()
        self.images, self.out = Path(images), Path(out)
        if not self.images.is_dir():
            raise ReidError(f"--images '{self.images}' is not a folder")
        if gap_seconds < 0:
            raise ReidError(f"--gap-seconds is {gap_seconds}; give 0 or more seconds")
        if chunk < 1:
            raise ReidError(f"--batch-images is {chunk}; give 1 or more")
        if stale not in ("reembed", "error"):
            raise ReidError(f"--stale-embeddings '{stale}': use reembed or error")
        if species_source is None:
            if len(router.species) != 1:
                raise ReidError("say how to tell the species (a SpeciesNet file, a species classifier or a fixed "
                                f"species): the routes name {len(router.species)} species")
            species_source = FixedSpecies(router.species[0])
        self.router, self.species_source = router, species_source
        self.crop_settings = crop_settings or CropSettings()
        self.gap_seconds, self.chunk, self.progress, self.restart = gap_seconds, chunk, progress, restart
        self.on_image = on_image
        self.warnings: list[str] = []
        with self.timings("io"):
            self.photos = list_photos(self.images)
        if not self.photos:
            raise ReidError(f"no JPEG or PNG photos under '{self.images}'")
        assign_encounters(self.photos, gap_seconds)
        with self.timings("detection"):
            self.detections = DetectionsFile(detections, self.images) if detections else None
            if self.detections:
                self.warnings += self.detections.check(self.photos)
            self.detector = None if self.detections else (detector or RunDetector())
        with self.timings("setup"):
            _preload()
        # times its own stages: loading the store and models (setup), embedding stale images again
        self.galleries = StoreGalleries(Path(store), database_url, router, stale, self.timings, self.crop_settings,
                                        rerank)
        with self.timings("setup"):
            # photos taken whole are decoded down to twice the largest input of the routed models
            self.draft_size = 2 * max(r.embedder.image_size for r in router.routes.values())
        self.partial = self.out.with_name(self.out.name + ".partial")

    # ------------------------------------------------------------------ options and the .partial file
    def options(self) -> dict:
        routes = {name: {"checkpoint": str(r.checkpoint.resolve()), "tta": r.tta,
                         "match_threshold": r.match_threshold, "new_threshold": r.new_threshold}
                  for name, r in self.router.routes.items()}
        s = self.crop_settings
        return {"images": str(self.images.resolve()), "routes": routes, "store": self.galleries.url,
                "rerank": {name: self.galleries.layout(name).rerank.describe() for name in self.router.routes},
                "species": self.species_source.describe(),
                "detections": self.detections.describe() if self.detections else self.detector.describe(),
                "gap_seconds": self.gap_seconds,
                "crop": {"thresholds": dict(s.thresholds), "default_threshold": s.default_threshold,
                         "padding": s.padding, "min_size": s.min_size, "square": s.square, "fill": s.fill}}

    def _read_partial(self) -> dict[str, list]:
        """Rows of the photos an earlier run finished; a torn last line (a kill mid-write) is cut off."""
        from reid.errors import ReidError

        if self.restart or not self.partial.exists():
            self._start_partial()
            return {}
        done: dict[str, list] = {}
        good = 0
        with open(self.partial, "rb") as handle:
            lines = handle.read().split(b"\n")
        try:
            header = json.loads(lines[0])
        except ValueError:
            header = None
        written_as = header.get("format") if isinstance(header, dict) else None
        if written_as != PARTIAL_FORMAT:
            if isinstance(written_as, str) and written_as.startswith(PARTIAL_KIND):
                raise ReidError(f"'{self.partial}' is the progress file of a run by another version of wildreid "
                                f"({written_as}, not {PARTIAL_FORMAT}: its rows have other columns); pass --restart "
                                "to start over")
            raise ReidError(f"'{self.partial}' is not the progress file of `reid identify-batch`; remove it or "
                            "pass --restart")
        if header.get("options") != json.loads(json.dumps(self.options())):
            changed = sorted(k for k in self.options() if header["options"].get(k) != json.loads(
                json.dumps(self.options()[k])))
            raise ReidError(f"'{self.partial}' belongs to a run with other options ({', '.join(changed)} "
                            "differ): run the same command again to continue it, or pass --restart to start over")
        good = len(lines[0]) + 1
        for line in lines[1:]:
            if not line.endswith(b"}"):
                break
            try:
                entry = json.loads(line)
            except ValueError:
                break
            done[entry["file"]] = entry["rows"]
            good += len(line) + 1
        if good < os.path.getsize(self.partial):
            with open(self.partial, "r+b") as handle:
                handle.truncate(good)
                os.fsync(handle.fileno())
        if done and header.get("store_seq") != self.galleries.seq:
            self.warnings.append(f"the store changed since the interrupted run (change {header.get('store_seq')} "
                                 f"-> {self.galleries.seq}): its {len(done)} finished photos were identified "
                                 "against the older gallery; --restart redoes them")
        return done

    def _start_partial(self) -> None:
        header = {"format": PARTIAL_FORMAT, "options": self.options(), "store_seq": self.galleries.seq}
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        with open(self.partial, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(header) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    # ------------------------------------------------------------------ running
    def run(self) -> BatchResult:
        from tqdm.auto import tqdm

        from reid.identify.gallery import single_threaded_blas

        with self.timings("setup"):
            blas = single_threaded_blas()  # searches between the chunks' forward passes, as in the service
        try:
            return self._run(tqdm)
        finally:
            blas.restore_original_limits()

    def _run(self, tqdm) -> BatchResult:
        try:
            with self.timings("io"):
                done = self._read_partial()
        except BaseException:
            self.galleries.close()
            raise
        pending = sum(p.file not in done for p in self.photos)
        processed = 0
        bar = tqdm(total=len(self.photos), initial=len(self.photos) - pending, unit="photo", desc="identify-batch",
                   disable=not self.progress, dynamic_ncols=True)
        try:
            with open(self.partial, "a", encoding="utf-8") as handle:
                for start in range(0, len(self.photos), self.chunk):
                    chunk = self.photos[start:start + self.chunk]
                    if all(p.file in done for p in chunk):
                        continue
                    results = self._process(chunk)  # a chunk cut short is redone whole, for the same batches
                    for photo in chunk:
                        if photo.file in done:
                            continue
                        with self.timings("io"):
                            handle.write(json.dumps({"file": photo.file, "rows": results[photo.file]}) + "\n")
                            handle.flush()
                            os.fsync(handle.fileno())
                        done[photo.file] = results[photo.file]
                        processed += 1
                        bar.update(1)
                        if self.on_image:
                            self.on_image(photo.file, processed)
        finally:
            bar.close()
            self.galleries.close()
        return self._finish(done, processed)

    def _finish(self, done: dict[str, list], processed: int) -> BatchResult:
        import pandas as pd

        from reid.io import atomic_path

        with self.timings("io"):
            rows = [row for photo in self.photos for row in done[photo.file]]
            table = pd.DataFrame(rows, columns=RESULT_COLUMNS)
            with atomic_path(self.out) as tmp:
                table.to_csv(tmp, index=False)
            self.partial.unlink()
        self.timings.stop()
        return BatchResult(self.out, table, len(self.photos), processed, self.timings, self.galleries.reembedded,
                           self.warnings)

    def _process(self, photos: list[Photo]) -> dict[str, list]:
        """Result rows (lists in RESULT_COLUMNS order) of each photo of a chunk."""
        out: dict[str, list[dict]] = {}
        animals: list[AnimalRow] = []
        for photo in photos:
            out[photo.file] = self._photo_rows(photo, animals)
        with self.timings("species"):
            named = self.species_source.species(animals)
        by_species: dict[str, list[AnimalRow]] = {}
        for item, (species, score) in zip(animals, named):
            item.row.update(species=species, species_score=_round(score, 6))
            route = self.router.route(species)
            if route is None:
                item.notes.append(f"no re-ID model for species '{species}'")
            elif item.animal.too_small:
                item.notes.append(f"box under {self.crop_settings.min_size} px: too small to re-identify")
            else:
                by_species.setdefault(route.species, []).append(item)
                continue
            item.row["decision"] = "species-only"
        for species, members in by_species.items():
            self._identify(self.router.route(species), members)
        for item in animals:
            item.row["note"] = "; ".join(item.notes)
        return {file: [[row[c] for c in RESULT_COLUMNS] for row in rows] for file, rows in out.items()}

    def _decode(self, photo: Photo, whole: bool):
        """The photo as the service decodes an upload (reid.identify.photos): whole, down to twice the
        models' input; else kept at up to max_decoded_pixels for its boxes to be cut from."""
        from reid.identify.photos import decode_upload

        limits = self.galleries.limits
        return decode_upload(photo.path.read_bytes(), None, photo.file, limits.max_pixels, limits.allowed_formats,
                             self.draft_size if whole else None, limits.max_decoded_pixels)

    def _photo_rows(self, photo: Photo, animals: list[AnimalRow]) -> list[dict]:
        from reid.errors import ReidError
        from reid.identify.animals import detected_animals, given_animals
        from reid.species.crops import HUMAN_CATEGORIES, confident

        base = {c: "" for c in RESULT_COLUMNS}
        base.update(file=photo.file, detection=-1, encounter=photo.encounter, camera=photo.camera,
                    datetime=photo.datetime, datetime_source=photo.datetime_source)
        detections = None
        if self.detections is not None:
            detections = self.detections.by_file.get(photo.file)
            if detections is None:
                return [{**base, "decision": "failed", "note": f"no entry in {self.detections.path.name}"}]
            failure = next((f for f in detections["failure"] if f), "")
            if failure:
                return [{**base, "decision": "failed", "note": f"detector: {failure}"}]
        whole = detections is None and self.detector.whole
        with self.timings("io"):
            try:
                upload = self._decode(photo, whole)
            except (OSError, ReidError) as exc:
                return [{**base, "decision": "failed", "note": str(exc)}]
        image = upload.array
        if detections is None:
            with self.timings("detection"):
                detections = self.detector.detect(photo.file, image)
        kept = confident(detections, self.crop_settings).sort_values("detection")
        if kept.empty:
            return [{**base, "decision": "blank"}]
        with self.timings("io"):
            if whole:  # the photo is the animal, taken whole as the service takes a photo without boxes
                found, _ = given_animals([upload], [[(0, None)]], self.crop_settings)
            else:
                found, _ = detected_animals([upload], [kept], self.crop_settings, "detections", fuse=False)
        found = iter(found)
        rows = []
        for det in kept.itertuples():
            row = {**base, "detection": int(det.detection), "category": det.category, "conf": _round(det.conf, 3),
                   "x": _round(det.x, 4), "y": _round(det.y, 4), "w": _round(det.w, 4), "h": _round(det.h, 4)}
            rows.append(row)
            if det.category == "animal":
                item = AnimalRow(photo.file, row, next(found))
                if isinstance(self.species_source, ClassifierSpecies):
                    with self.timings("species"):
                        item.species_crop = self.species_source.cut(image, (det.x, det.y, det.w, det.h))
                animals.append(item)
            elif det.category in HUMAN_CATEGORIES:
                row.update(decision="human", species="human")
            elif det.category == "vehicle":
                row.update(decision="vehicle")
            else:
                row.update(decision="species-only", note=f"detection category '{det.category}'")
        return rows

    def _identify(self, route, items: list[AnimalRow]) -> None:
        import numpy as np

        embedder = route.embedder
        with self.timings("embedding"):
            crops = [item.animal.views[0].crop for item in items]
            vectors = np.concatenate([embedder.embed_images(crops[i:i + embedder.batch_size])
                                      for i in range(0, len(crops), embedder.batch_size)])
        with self.timings("search"):
            if self.galleries.size(route.species) == 0:
                for item in items:
                    item.row.update(decision="new", model=embedder.fingerprint)
                    item.notes.append(f"no '{route.species}' individual in the store")
                return
            for item, vector in zip(items, vectors):
                result = self.galleries.identify(route.species, vector, route.thresholds)
                best = result.candidates[0]
                item.row.update(individual_id=best.individual_id,
                                individual_name=self.galleries.names.get(best.individual_id, ""),
                                score=result.best_score, matched_viewpoint=best.viewpoint or "",
                                decision=result.decision, model=embedder.fingerprint)


def _round(value, digits: int):
    import math

    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return round(float(value), digits)


def identify_batch(images: str | Path, out: str | Path, router, store: str | Path, export: str | None = None,
                   export_dir: str | Path | None = None, utc_offset: str | None = None,
                   deployments: str | Path | None = None, contributors: list[dict] | None = None,
                   project_title: str | None = None, **options) -> BatchResult:
    """Run identify-batch (see BatchRun for the options) and write the Camtrap DP package if asked
    (`deployments`: the user's deployments CSV; `contributors`: camtrap.parse_contributor dicts)."""
    run = BatchRun(images, out, router, store, **options)
    if export == "camtrap-dp" and deployments is not None:
        from reid.species.camtrap import read_deployments, require_every_camera

        # a malformed or incomplete file stops the run before hours of identification, not after
        require_every_camera(read_deployments(deployments), {p.camera for p in run.photos}, deployments)
    result = run.run()
    if export == "camtrap-dp":
        from reid.species.camtrap import write_camtrap_dp

        folder = Path(export_dir) if export_dir else default_export_dir(run.out)
        offsets = {p.utc_offset for p in run.photos}
        offset = utc_offset or (offsets.pop() if len(offsets) == 1 else None)
        if offset is None:
            result.warnings.append("Camtrap DP timestamps need a UTC offset; the photos' EXIF has none (or several): "
                                   "pass --utc-offset, e.g. +02:00")
        package = write_camtrap_dp(folder, result.rows, run.images, offset, deployments=deployments,
                                   contributors=contributors, project_title=project_title,
                                   identity=f"{run.images.resolve()}|{run.out.resolve()}")
        result.warnings.extend(package.warnings)
        result.exported = package.paths
    return result


def default_export_dir(out: Path) -> Path:
    return out.with_name(out.stem + "-camtrap-dp")


# ------------------------------------------------------------------------------------ command line
def add_identify_batch_parser(subparsers) -> dict:
    """Add `identify-batch` to an argparse sub-parsers object; return {command name: function}."""
    p = subparsers.add_parser(
        "identify-batch", help="identify the animals in a folder of camera-trap photos against a store "
                               "(one CSV row per detection; resumable; optional Camtrap DP export)",
        description="Identify every animal in a folder of camera-trap photos against the individuals of a "
                    "store (read only). Rerun the same command after an interruption to continue.")
    p.add_argument("--images", required=True, help="folder of photos (JPEG/PNG, searched recursively; the parent "
                                                   "folder of each photo is its camera)")
    found = p.add_mutually_exclusive_group()
    found.add_argument("--detections", help="MegaDetector batch-output JSON, paths relative to --images")
    found.add_argument("--detector-weights", help="MegaDetector v6 .pt file to run here (default without "
                                                  "--detections: each photo is one animal filling the frame)")
    p.add_argument("--detector-device", help="device for --detector-weights (default: cuda if available)")
    p.add_argument("--detection-threshold", type=float, default=0.2,
                   help="lowest confidence of a detection that counts (default 0.2)")
    p.add_argument("--min-size", type=int, default=32, help="animal boxes with a shorter side below this many "
                                                           "pixels get a species-only answer (default 32)")
    named = p.add_mutually_exclusive_group()
    named.add_argument("--speciesnet", help="SpeciesNet predictions JSON: the species of each photo")
    named.add_argument("--species-model", help="species classifier checkpoint (species.pt of `reid train-species`)")
    p.add_argument("--species", help="every animal is of this species; with --checkpoint: the species that "
                                     "checkpoint identifies")
    p.add_argument("--species-naming", choices=["common", "scientific"], default="common",
                   help="SpeciesNet names to use (must match the routes and the store)")
    p.add_argument("--species-threshold", type=float, help="below this species score the species is unknown")
    routes = p.add_mutually_exclusive_group(required=True)
    routes.add_argument("--routes", help="YAML mapping each species to its re-ID checkpoint (see "
                                         "reid/species/routing.py)")
    routes.add_argument("--checkpoint", help="one re-ID checkpoint, for the species given by --species")
    p.add_argument("--tta", choices=["none", "hflip", "flip4"],
                   help="TTA of --checkpoint (default: what `reid calibrate` chose for it, else none)")
    p.add_argument("--store", required=True, help="store folder of `reid serve` (read only)")
    p.add_argument("--database-url", help="the store's database URL when it is not STORE/wildreid.db")
    p.add_argument("--rerank", choices=["checkpoint", "off"], default="checkpoint",
                   help="re-ranking of the candidates: what `reid calibrate` chose for each checkpoint (default; "
                        "plain cosine when it chose none), or off")
    p.add_argument("--stale-embeddings", choices=["reembed", "error"], default="reembed",
                   help="store images embedded by another model: embed them again here (default) or stop")
    p.add_argument("--out", required=True, help="results CSV (progress is kept in OUT.partial until done)")
    p.add_argument("--gap-seconds", type=float, default=120.0,
                   help="photos of one camera further apart than this start a new encounter (default 120)")
    p.add_argument("--export", choices=["camtrap-dp"],
                   help="also write a Camtrap DP 1.0 package: deployments.csv, media.csv, observations.csv and "
                        "datapackage.json")
    p.add_argument("--export-dir", help="folder for --export (default: OUT without .csv, plus -camtrap-dp)")
    p.add_argument("--deployments", metavar="FILE",
                   help="CSV of the cameras for Camtrap DP: deploymentID (or camera: the camera folder), latitude, "
                        "longitude, optionally deploymentStart/End and other Camtrap DP deployments columns "
                        "(without it coordinates are left empty and the package says so)")
    p.add_argument("--contributor", action="append", metavar="NAME[:ROLE]",
                   help="Camtrap DP contributor, repeatable; ROLE one of contact, principalInvestigator, "
                        "rightsHolder, publisher, contributor (default: the user running it, as contributor)")
    p.add_argument("--project-title", help="Camtrap DP project title (default: from the export folder's name)")
    p.add_argument("--utc-offset", help="UTC offset of the cameras' clocks for Camtrap DP, e.g. +02:00 "
                                        "(default: EXIF OffsetTimeOriginal)")
    p.add_argument("--batch-images", type=int, default=8, help="photos whose crops are embedded together")
    p.add_argument("--restart", action="store_true", help="discard OUT.partial of an interrupted run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return {"identify-batch": cmd_identify_batch}


def build_run_options(args: argparse.Namespace) -> dict:
    """identify_batch's arguments from the parsed command line; ReidError for a bad combination."""
    from reid.errors import ReidError
    from reid.species.camtrap import valid_utc_offset
    from reid.species.crops import CropSettings
    from reid.species.routing import Router

    if args.checkpoint:
        if not args.species:
            raise ReidError("--checkpoint needs --species NAME: the species its model identifies")
        router = Router.single(args.checkpoint, args.species, args.tta)
    else:
        if args.tta is not None:
            raise ReidError("--tta goes with --checkpoint; in a routes file set tta per species")
        router = Router.from_file(args.routes)
    if args.speciesnet and args.species and not args.checkpoint:
        raise ReidError("give one source of species: --speciesnet, --species-model or --species")
    if args.utc_offset and not valid_utc_offset(args.utc_offset):
        raise ReidError(f"--utc-offset '{args.utc_offset}': write it as +HH:MM or -HH:MM, e.g. +02:00")
    camtrap_only = [name for name, value in (("--deployments", args.deployments), ("--contributor", args.contributor),
                                             ("--project-title", args.project_title)) if value]
    if camtrap_only and args.export != "camtrap-dp":
        raise ReidError(f"{', '.join(camtrap_only)} describe the Camtrap DP package: add --export camtrap-dp")
    if args.deployments and not Path(args.deployments).is_file():
        raise ReidError(f"--deployments '{args.deployments}': no such file")
    from reid.species.camtrap import parse_contributor

    contributors = [parse_contributor(text) for text in args.contributor or []] or None
    images = Path(args.images)
    if args.speciesnet:
        source = SpeciesNetFile(args.speciesnet, images, args.species_naming, args.species_threshold or 0.0)
    elif args.species_model:
        if args.species and not args.checkpoint:
            raise ReidError("give one source of species: --speciesnet, --species-model or --species")
        source = ClassifierSpecies(args.species_model, args.species_threshold)
    elif args.species:
        source = FixedSpecies(args.species)
    else:
        raise ReidError("say how to tell the species: --speciesnet FILE, --species-model species.pt or "
                        "--species NAME")
    threshold = args.detection_threshold
    if not 0 <= threshold <= 1:
        raise ReidError(f"--detection-threshold {threshold} is not between 0 and 1")
    settings = CropSettings(thresholds={}, default_threshold=threshold, min_size=args.min_size)
    detector = None if args.detections else RunDetector(args.detector_weights, args.detector_device)
    return dict(images=images, out=Path(args.out), router=router, store=Path(args.store), species_source=source,
                detections=args.detections, detector=detector, crop_settings=settings, gap_seconds=args.gap_seconds,
                database_url=args.database_url, stale=args.stale_embeddings, chunk=args.batch_images,
                progress=not args.no_progress, restart=args.restart, export=args.export, export_dir=args.export_dir,
                utc_offset=args.utc_offset, deployments=args.deployments, contributors=contributors,
                project_title=args.project_title, rerank=args.rerank)


def cmd_identify_batch(args: argparse.Namespace) -> None:
    options = build_run_options(args)
    try:
        result = identify_batch(**options)
    except KeyboardInterrupt:
        print(f"\nreid identify-batch: interrupted; finished photos are kept in {options['out']}.partial: run "
              "the same command again to continue", file=sys.stderr)
        raise SystemExit(130) from None
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if result.reembedded:
        print(f"note: {result.reembedded} store images were embedded by another model and were embedded again "
              "with the routed checkpoints for this run (the store is unchanged)", file=sys.stderr)
    for path in result.exported:
        print(f"wrote {path}")
    print(result.summary())


# ------------------------------------------------------------------------------------ demos and tests
def enroll_ground_truth(scenes: str | Path, store: str | Path, router, per_individual: int = 1,
                        crop_settings=None, key_name: str = "demo-enroll",
                        identities: set[str] | None = None) -> dict[str, dict]:
    """Enroll each individual of synthetic scenes (make_synthetic_scenes' folder; only those in
    `identities` when given) into a store, from its first `per_individual` ground-truth boxes, cut
    as identify-batch cuts them.

    For demos, tests and benchmarks only; identify-batch itself never writes to the store. Each crop
    is stored as a PNG file with the embedding of its species' route and the box's ground-truth
    viewpoint, as the service stores an upload without bbox (`POST /v1/individuals`). Returns
    {identity: {"individual_id", "files"}}.
    """
    import io

    import pandas as pd
    from PIL import Image

    from reid.data.classes import normalise_viewpoint
    from reid.data.dataset import read_image
    from reid.errors import ReidError
    from reid.identify.photos import PhotoLimits, decode_upload
    from reid.species.crops import CropSettings, animal_crops, embedding_model
    from reid.species.megadetector import detection_table, read_megadetector
    from reid.store import NewImage, Store, store_file

    store_dir, limits = Path(store).expanduser().absolute(), PhotoLimits()
    crop_settings = crop_settings or CropSettings()
    truth = pd.read_csv(Path(scenes) / "ground_truth.csv", keep_default_na=False)
    # boxes as detections.json has them (MegaDetector's 4-digit rounding), which identify-batch reads:
    # the CSV's unrounded boxes can give crops a pixel off
    boxes = read_megadetector(Path(scenes) / "detections.json").set_index(["file", "detection"])
    animals = truth[truth["category"] == "animal"]
    db = Store(f"sqlite:///{store_dir / 'wildreid.db'}")
    enrolled = {}
    try:
        for identity, rows in animals.groupby("identity", sort=True):
            species = rows["species"].iloc[0]
            route = router.route(species)
            if route is None or (identities is not None and identity not in identities):
                continue
            crops, files, viewpoints = [], [], []
            for row in rows.itertuples():
                if len(crops) == per_individual:
                    break
                image = read_image(str(Path(scenes) / "images" / row.file))
                box = boxes.loc[(row.file, int(row.detection)), ["x", "y", "w", "h"]].astype(float)
                table = detection_table([(row.file, int(row.detection), "animal", 1.0, *box, "")])
                found = animal_crops(image, table, crop_settings)
                if found:
                    crops.append(found[0].image)
                    files.append(row.file)
                    viewpoints.append(normalise_viewpoint(row.viewpoint))
            if not crops:
                raise ReidError(f"no box of {identity} is large enough to enroll")
            vectors = route.embedder.embed_images(crops)
            new_images = []
            for crop, file, viewpoint, vector in zip(crops, files, viewpoints, vectors):
                buffer = io.BytesIO()
                Image.fromarray(crop).save(buffer, format="PNG")
                upload = decode_upload(buffer.getvalue(), 0, Path(file).name, limits.max_pixels,
                                       limits.allowed_formats)
                path = store_file(store_dir, upload.relpath, upload.data, upload.sha256)
                new_images.append(NewImage(upload.sha256, path, upload.media_type, upload.width, upload.height,
                                           len(upload.data), vector, upload.filename, viewpoint=viewpoint))
            result = db.enroll(identity, species, new_images, embedding_model(route.fingerprint, crop_settings),
                               key_name)
            enrolled[identity] = {"individual_id": result["individual_id"], "files": files}
    finally:
        db.close()
    return enrolled


def main(argv: list[str] | None = None) -> int:
    """`python -m reid.species.batch identify-batch ...` (the command before it is wired into `reid`),
    and `demo-enroll` (a store of synthetic scenes' individuals, for trying the command)."""
    from reid.errors import ReidError

    parser = argparse.ArgumentParser(prog="python -m reid.species.batch")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = add_identify_batch_parser(sub)
    demo = sub.add_parser("demo-enroll", help="enroll the individuals of synthetic scenes into a store (demo)")
    demo.add_argument("--scenes", required=True, help="folder written by `reid synth --scenes`")
    demo.add_argument("--store", required=True)
    demo.add_argument("--checkpoint", required=True, help="re-ID checkpoint for every species of the scenes")
    demo.add_argument("--per-individual", type=int, default=1, help="boxes enrolled per individual")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo-enroll":
            import pandas as pd

            from reid.species.routing import Router

            species = sorted(set(pd.read_csv(Path(args.scenes) / "ground_truth.csv", keep_default_na=False)
                                 .query("category == 'animal'")["species"]))
            router = Router({name: {"checkpoint": args.checkpoint} for name in species}, source="--checkpoint")
            enrolled = enroll_ground_truth(args.scenes, args.store, router, args.per_individual)
            print(f"enrolled {len(enrolled)} individuals ({', '.join(species)}) into {args.store}")
        else:
            commands[args.command](args)
    except ReidError as exc:
        print(f"reid {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
