"""The running service: store, model, micro-batcher and galleries, opened once by the app's lifespan.

Routers stay thin: they validate the request and call these methods. Blocking work (decoding,
database, FAISS) runs in the threadpool; model inference runs in the batcher's thread.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from starlette.concurrency import run_in_threadpool

from reid.embedding.embedder import Embedder
from reid.errors import ConfigError, ReidError
from reid.evaluation.open_set import decide
from service.batching import MicroBatcher, ModelRunner
from service.errors import Conflict, InvalidInput, NotFound
from service.gallery import Galleries
from service.images import Upload, crop, decode_upload, parse_bbox, read_upload, store_file
from service.metrics import Metrics
from service.settings import Settings
from service.store import NewImage, Store

log = logging.getLogger("wildreid.service")


@dataclass
class Prepared:
    """The uploads of one request, decoded, and the model inputs cut from them."""
    uploads: list[Upload]
    bboxes: list[tuple[float, float, float, float] | None]  # one per model input
    sources: list[int]  # the upload each model input was cut from
    tensors: list


def load_thresholds(embedder: Embedder, settings: Settings) -> tuple[dict, str]:
    """The checkpoint's calibrated thresholds (from `reid calibrate`), else the settings' fallback."""
    if embedder.thresholds:
        return dict(embedder.thresholds), "checkpoint"
    return {"match_threshold": settings.match_threshold, "new_threshold": settings.new_threshold}, "settings"


def plan_bboxes(texts: list[str], n_images: int, multi_animal: bool) -> list[list[tuple[int, tuple | None]]]:
    """Animals, each a list of (image index, bbox or None) to embed and fuse.

    No bbox: every image whole, one animal. One bbox: applied to every image. One per image: each
    image its own. Several bboxes for a single image (identify only): one animal per bbox.
    """
    boxes = [parse_bbox(text, i) for i, text in enumerate(texts)]
    if not boxes:
        return [[(i, None) for i in range(n_images)]]
    if len(boxes) == 1:
        return [[(i, boxes[0]) for i in range(n_images)]]
    if len(boxes) == n_images:
        return [[(i, box) for i, box in enumerate(boxes)]]
    if n_images == 1 and multi_animal:
        return [[(0, box)] for box in boxes]
    raise InvalidInput(f"{len(boxes)} bboxes for {n_images} images: give none, one for every image, or one per "
                       "image" + (" (or several for a single image)" if multi_animal else ""), code="invalid_bbox")


def _score(value: float) -> float:
    """A cosine similarity as answered: float32 rounding can put an identical image at 1.0000001."""
    return round(min(1.0, max(-1.0, float(value))), 6)


class Service:
    def __init__(self, settings: Settings, store: Store, runner: ModelRunner, batcher: MicroBatcher,
                 galleries: Galleries, thresholds: dict, threshold_source: str, metrics: Metrics):
        self.settings, self.store, self.runner, self.batcher = settings, store, runner, batcher
        self.galleries, self.thresholds, self.threshold_source = galleries, thresholds, threshold_source
        self.metrics = metrics
        self.warnings: list[str] = []
        self._cache: dict = {"seq": None}
        if threshold_source == "settings":
            self.warnings.append("the checkpoint holds no calibration (run `reid calibrate`): decisions use the "
                                 f"settings' thresholds match >= {thresholds['match_threshold']}, "
                                 f"new < {thresholds['new_threshold']}")

    # ------------------------------------------------------------------ life cycle
    @classmethod
    def open(cls, settings: Settings, metrics: Metrics) -> "Service":
        import torch

        if settings.checkpoint is None:
            raise ConfigError("the service needs a checkpoint (settings.checkpoint / --checkpoint)")
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        Image.MAX_IMAGE_PIXELS = settings.max_pixels
        settings.store_dir.mkdir(parents=True, exist_ok=True)
        embedder = Embedder.from_checkpoint(settings.checkpoint, tta=settings.tta, num_workers=0)
        thresholds, source = load_thresholds(embedder, settings)
        runner = ModelRunner(embedder)
        store = Store(settings.url, settings.sqlite_synchronous)
        batcher = MicroBatcher(runner.forward, settings.max_batch or embedder.batch_size,
                               settings.batch_window_ms / 1000, observe=metrics.observe_batch)
        galleries = Galleries(store, runner.dim, runner.fingerprint, settings.index_kind, settings.ann_threshold)
        service = cls(settings, store, runner, batcher, galleries, thresholds, source, metrics)
        service.remove_stale_temporary_files()
        service.reembed_stale()
        galleries.rebuild()
        batcher.start()
        log.info("wildreid service ready: model %s, galleries %s, thresholds from %s", runner.fingerprint,
                 galleries.sizes(), source)
        return service

    def close(self) -> None:
        self.batcher.close()
        self.store.close()

    def remove_stale_temporary_files(self, older_than_s: float = 600.0) -> int:
        """Temporary files of image writes cut short by a crash (never referenced by the database)."""
        import time

        removed, cutoff = 0, time.time() - older_than_s
        for path in self.settings.images_dir.glob("*/.*.tmp"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except OSError:
                pass
        return removed

    def reembed_stale(self) -> int:
        """Embed again, from their stored files, the images a previous checkpoint embedded."""
        done = 0
        while True:
            rows = self.store.stale_images(self.runner.fingerprint)
            if not rows:
                break
            vectors = {}
            for row in rows:
                try:
                    data = (self.settings.store_dir / row["path"]).read_bytes()
                    upload = decode_upload(data, 0, row["path"], self.settings.max_pixels,
                                           self.settings.allowed_formats, self._draft)
                except (OSError, ReidError) as exc:
                    raise ReidError(f"cannot embed stored image {row['id']} ({row['path']}) with the new model: "
                                    f"{exc}") from None
                array = crop(upload.array, parse_bbox(row["bbox"])) if row["bbox"] else upload.array
                vectors[row["id"]] = self.runner.forward([self.runner.preprocess(array)])[0]
            self.store.set_embeddings(vectors, self.runner.fingerprint)
            done += len(vectors)
        if done:
            log.warning("embedded %d stored images again with model %s", done, self.runner.fingerprint)
        return done

    @property
    def _draft(self) -> int:
        return 2 * self.runner.image_size

    # ------------------------------------------------------------------ uploads
    async def prepare(self, files: list, bbox_texts: list[str], multi_animal: bool) -> tuple[Prepared, list]:
        """Read, decode, crop and preprocess a request's uploads; the animals as lists of input indices."""
        limit = self.settings.max_images_per_request
        if len(files) > limit:
            raise InvalidInput(f"{len(files)} images in one request; the limit is {limit}", code="too_many_images")
        if len(bbox_texts) > limit:
            raise InvalidInput(f"{len(bbox_texts)} bboxes in one request; the limit is {limit}", code="invalid_bbox")
        plan = plan_bboxes(bbox_texts, len(files), multi_animal)
        datas = [await read_upload(f, i, self.settings.max_upload_bytes) for i, f in enumerate(files)]
        names = [f.filename for f in files]
        with self.batcher.incoming():
            prepared = await run_in_threadpool(self._decode, datas, names, plan)
        animals, position = [], 0
        for animal in plan:
            animals.append(list(range(position, position + len(animal))))
            position += len(animal)
        return prepared, animals

    def _decode(self, datas: list[bytes], names: list, plan: list) -> Prepared:
        uploads = [decode_upload(data, i, name, self.settings.max_pixels, self.settings.allowed_formats, self._draft)
                   for i, (data, name) in enumerate(zip(datas, names))]
        bboxes, sources, tensors = [], [], []
        for animal in plan:
            for index, box in animal:
                array = crop(uploads[index].array, box) if box else uploads[index].array
                bboxes.append(box)
                sources.append(index)
                tensors.append(self.runner.preprocess(array))
        return Prepared(uploads, bboxes, sources, tensors)

    async def embed(self, prepared: Prepared) -> np.ndarray:
        return await self.batcher.embed(prepared.tensors)

    # ------------------------------------------------------------------ identify
    def _cached(self) -> dict:
        """Species lists and individual names as of the galleries' change sequence (reread when it moves)."""
        self.galleries.sync()
        cache = self._cache
        if cache["seq"] != self.galleries.seq:
            seq = self.galleries.seq
            cache = {"seq": seq, "active": self.store.species(), "all": self.store.all_species(), "names": {}}
            self._cache = cache
        return cache

    def resolve_species(self, species: str | None) -> str:
        cache = self._cached()
        active = cache["active"]
        if species is not None:
            if species not in active and species not in cache["all"]:
                known = ", ".join(active) or "none yet"
                raise NotFound(f"unknown species '{species}': no individual of it was ever enrolled (species in "
                               f"this store: {known})", code="unknown_species")
            return species
        if not active:
            raise Conflict("the gallery is empty: enroll individuals (POST /v1/individuals) before identifying",
                           code="empty_gallery")
        if len(active) > 1:
            raise InvalidInput(f"this store holds several species ({', '.join(active)}): say which one in the "
                               "'species' field", code="species_required")
        return active[0]

    def search(self, species: str, vectors: np.ndarray, animals: list[list[int]], top_k: int) -> list[dict]:
        cache = self._cached()  # brings the galleries up to date first
        results = []
        for members in animals:
            query = vectors[members].mean(axis=0)
            norm = float(np.linalg.norm(query))
            query = (query / norm if norm > 0 else query).astype(np.float32)
            matches = self.galleries.search(species, query, top_k)
            results.append(matches)
        wanted = {m.individual_id for matches in results for m in matches}
        missing = wanted - cache["names"].keys()
        if missing:
            cache["names"].update(self.store.names(missing))
        names = cache["names"]
        out = []
        for members, matches in zip(animals, results):
            best = _score(matches[0].score) if matches else None
            decision = decide(best, self.thresholds) if best is not None else "new"
            self.metrics.decisions.labels(decision).inc()
            out.append({"members": members, "decision": decision, "best_score": best, "candidates": [
                {"rank": rank, "individual_id": m.individual_id, "name": names.get(m.individual_id, ""),
                 "score": _score(m.score), "images": [{"image_id": i, "score": _score(s)} for i, s in m.images]}
                for rank, m in enumerate(matches, 1)]})
        return out

    # ------------------------------------------------------------------ writes
    def new_images(self, prepared: Prepared, vectors: np.ndarray) -> list[NewImage]:
        """Store the files (content-addressed, atomic) and describe the rows to insert."""
        out = []
        for upload, box, vector in zip((prepared.uploads[i] for i in prepared.sources), prepared.bboxes, vectors):
            path = store_file(self.settings.store_dir, upload)
            out.append(NewImage(upload.sha256, path, upload.media_type, upload.width, upload.height,
                                len(upload.data), vector, upload.filename,
                                ",".join(f"{v:.6g}" for v in box) if box else None))
        return out

    def enroll(self, name: str, species: str, prepared: Prepared, vectors: np.ndarray, key_name: str | None,
               notes: str, observed_at: str | None, location: str | None) -> dict:
        rows = self.new_images(prepared, vectors)
        result = self.store.enroll(name, species, rows, self.runner.fingerprint, key_name, notes, observed_at, location)
        self.galleries.sync()
        return result

    def add_sighting(self, individual_id: int, prepared: Prepared, vectors: np.ndarray, key_name: str | None,
                     notes: str, observed_at: str | None, location: str | None) -> dict:
        self.store.require_live(individual_id, "add images to")  # 404 / 409 before any file is written
        rows = self.new_images(prepared, vectors)
        result = self.store.add_sighting(individual_id, rows, self.runner.fingerprint, key_name, notes, observed_at,
                                         location)
        self.galleries.sync()
        return result

    def after_write(self) -> None:
        self.galleries.sync()

    def image_path(self, image: dict) -> Path:
        path = (self.settings.store_dir / image["path"]).resolve()
        if not path.is_file():
            raise NotFound(f"the file of image {image['id']} is missing from the store", code="image_file_missing")
        return path
