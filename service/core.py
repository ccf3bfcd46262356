"""The running service: store, models, galleries and the request flows, opened once by the app's lifespan.

Routers stay thin: they validate the request and call these methods. Blocking work (decoding,
detection, database, FAISS) runs in the threadpool; model inference runs in the batchers' threads.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image
from starlette.concurrency import run_in_threadpool

from reid.errors import Conflict, InvalidInput, NotFound
from reid.identify.animals import (Animal, Found, View, detected_animals, enrollable, given_animals, parse_detections,
                                   plan_bboxes)
from reid.identify.gallery import Galleries, rerank_description, single_threaded_blas
from reid.identify.identify import identify
from reid.identify.photos import Upload, decode_upload
from reid.identify.reembed import reembed_stale, stored_view
from reid.species.detector import detection_rows
from reid.species.speciesnet import UNKNOWN
from reid.store import MISSING, FileIntegrity, NewImage, Store, SweepResult, store_file, sweep_orphans
from service.budget import Lease, MemoryBudget, return_large_frees_to_the_os
from service.forms import read_upload
from service.metrics import Metrics
from service.networks import Models, SpeciesRoute
from service.periodic import Periodic
from service.settings import Settings

log = logging.getLogger("wildreid.service")


class Service:
    def __init__(self, settings: Settings, store: Store, models: Models, galleries: Galleries, metrics: Metrics):
        self.settings, self.store, self.models, self.galleries = settings, store, models, galleries
        self.metrics = metrics
        self.crops = models.crop_settings
        self.warnings: list[str] = models.uncalibrated()
        self._cache: dict = {"seq": None}
        self.integrity = FileIntegrity(on_change=metrics.corrupt_files.set)
        self.decode_budget = MemoryBudget(settings.decode_budget_bytes, settings.request_decode_budget_bytes,
                                          settings.decode_wait_s, on_change=metrics.decode_bytes.set)
        self.blas = None  # the BLAS thread limit while the service runs (set by open)
        self.sweeper = Periodic(self._sweep_periodically, settings.orphan_sweep_interval_s, "wildreid-orphan-sweep")
        self.snapshotter = Periodic(self._snapshot_periodically, settings.rerank_snapshot_interval_s,
                                    "wildreid-rerank-snapshots")

    # ------------------------------------------------------------------ life cycle
    @classmethod
    def open(cls, settings: Settings, metrics: Metrics) -> "Service":
        import torch

        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        Image.MAX_IMAGE_PIXELS = settings.max_pixels
        return_large_frees_to_the_os()  # decoded photos' memory goes back when freed (service/budget.py)
        blas = single_threaded_blas()  # gallery searches must not spin threads beside the model's
        settings.store_dir.mkdir(parents=True, exist_ok=True)
        models = Models(settings, metrics)
        store = Store(settings.url, settings.sqlite_synchronous)
        galleries = Galleries(store, models.layout, settings.index_kind, settings.ann_threshold,
                              settings.store_dir / "cache" / "rerank")
        service = cls(settings, store, models, galleries, metrics)
        service.blas = blas
        service.sweep_orphans()
        service.reembed_stale()
        galleries.rebuild()
        galleries.save_snapshots()  # a state built now is not built again at the next start
        models.start()
        service.sweeper.start()
        service.snapshotter.start()
        served = "; ".join(f"{m['species']}: model {m['model']}, thresholds from {m['thresholds']['source']}"
                           for m in models.describe()["models"])
        log.info("wildreid service ready (%s); galleries %s", served, galleries.sizes())
        return service

    def close(self) -> None:
        self.sweeper.stop()
        self.snapshotter.stop()
        self.models.close()
        self._snapshot_periodically()
        self.store.close()
        if self.blas is not None:
            self.blas.restore_original_limits()

    def sweep_orphans(self) -> SweepResult:
        """Remove the image files no row names (older than the grace period) and cut-short temporary files."""
        images_dir = self.settings.images_dir
        result = sweep_orphans(images_dir, images_dir.name, self.store.referenced_paths, self.settings.orphan_grace_s)
        self.metrics.orphans_removed.inc(result.orphans)
        if result.orphans or result.temporary:
            log.warning("orphan sweep: removed %d image files that no database row names (older than %g s) and %d "
                        "temporary files of cut-short writes", result.orphans, self.settings.orphan_grace_s,
                        result.temporary)
        return result

    def _sweep_periodically(self) -> None:
        try:
            self.sweep_orphans()
        except Exception:  # noqa: BLE001 - a failed sweep (database away) is retried at the next interval
            log.exception("orphan sweep failed")

    def _snapshot_periodically(self) -> None:
        try:
            self.galleries.sync()
            self.galleries.save_snapshots()
        except Exception:  # noqa: BLE001 - a failed snapshot (disk full) only makes the next start slower
            log.exception("re-ranking snapshot failed")

    def reembed_stale(self) -> int:
        """Embed again, from their stored files and boxes, the images another model (or crop shape) embedded;
        those whose files are corrupt are skipped (the service starts without them)."""
        done = skipped = 0
        for species in self.store.all_species():
            model = self.models.model(species)
            if model is None:
                continue  # kept as they are: searchable again once a model serves the species
            network = model.network
            runner = network.runner

            def view(row: dict) -> np.ndarray | None:
                return stored_view(self.settings.store_dir, row, self.crops, self.settings.photo_limits(),
                                   runner.image_size, self.integrity)

            def embed(arrays: list[np.ndarray]) -> np.ndarray:
                return runner.forward([runner.preprocess(array) for array in arrays])

            embedded, unreadable = reembed_stale(self.store, species, network.stamp, embed, view,
                                                 lambda vectors: self.store.set_embeddings(vectors, network.stamp),
                                                 runner.embedder.batch_size)
            done, skipped = done + embedded, skipped + unreadable
        if done:
            log.warning("embedded %d stored images again with the current models", done)
        if skipped:
            log.warning("%d stored images could not be embedded again (their files are corrupt or missing: see the "
                        "errors above); they stay out of the gallery until their photos are uploaded again", skipped)
        return done

    # ------------------------------------------------------------------ photos to animals
    async def find(self, files: list, bbox_texts: list[str], detection_texts: list[str], multi_animal: bool,
                   species: str | None, lease: Lease) -> Found:
        """Read and decode a request's photos and find its animals (given boxes, detections, or whole photos).

        Their species is `species`, else the store's only one when no classifier is configured (else
        `classify` names it next); animals with a species and a model are preprocessed for it here, in
        the same thread hop as decoding. The decoded photos' memory is reserved from `lease`, which the
        request holds until it ends."""
        limit = self.settings.max_images_per_request
        if len(files) > limit:
            raise InvalidInput(f"{len(files)} images in one request; the limit is {limit}", code="too_many_images")
        if len(bbox_texts) > limit:
            raise InvalidInput(f"{len(bbox_texts)} bboxes in one request; the limit is {limit}", code="invalid_bbox")
        if bbox_texts and detection_texts:
            raise InvalidInput("give either 'bbox' or 'detections', not both", code="invalid_detections")
        plan = plan_bboxes(bbox_texts, len(files), multi_animal) if bbox_texts else None
        tables = parse_detections(detection_texts, len(files))
        datas = [await read_upload(f, i, self.settings.max_upload_bytes) for i, f in enumerate(files)]
        names = [f.filename for f in files]
        with self.models.incoming():
            return await run_in_threadpool(self._find, datas, names, plan, tables, multi_animal, species, lease)

    def decode(self, data: bytes, index: int, name: str | None, cropped: bool, lease: Lease | None = None) -> Upload:
        """A photo decoded as the model needs it: taken whole, reduced (JPEG: decoded at a reduced scale)
        down to twice the largest model input; cropped, kept at up to max_decoded_pixels, whose pixels
        the crops are cut from."""
        settings = self.settings
        return decode_upload(data, index, name, settings.max_pixels, settings.allowed_formats,
                             None if cropped else self.models.draft_size, settings.max_decoded_pixels, lease)

    def _find(self, datas: list[bytes], names: list, plan: list | None, tables: list | None, multi_animal: bool,
              species: str | None, lease: Lease) -> Found:
        detector, source = self.models.detector, "detections"
        cropped = tables is not None or detector is not None or any(box for a in plan or [] for _, box in a)
        uploads = [self.decode(data, i, name, cropped, lease) for i, (data, name) in enumerate(zip(datas, names))]
        if plan is None and tables is None and detector is not None:
            tables = [detection_rows(str(i), detector.detect(u.array)) for i, u in enumerate(uploads)]
            source = detector.name
        if tables is None:
            animals, photos = given_animals(uploads, plan or plan_bboxes([], len(uploads), multi_animal), self.crops)
        else:
            animals, photos = detected_animals(uploads, tables, self.crops, source, fuse=multi_animal)
            if not multi_animal:
                animals = enrollable(animals, photos)
        if animals and (species is not None or self.models.classifier is None):
            named, source = (species, "request") if species is not None else (self.store_species(), "store")
            for animal in animals:
                animal.species, animal.species_source = named, source
            self._preprocess(animals)
        return Found(uploads, animals, photos)

    def _preprocess(self, animals: list[Animal]) -> None:
        """The model inputs of the animals that their species' model will identify."""
        for animal in animals:
            model = self.identifiable(animal)
            if model is not None:
                for view in animal.views:
                    view.tensor = model.network.runner.preprocess(view.crop)

    # ------------------------------------------------------------------ species
    def _cached(self) -> dict:
        """Species lists and individual names as of the galleries' change sequence (reread when it moves)."""
        self.galleries.sync()
        cache = self._cache
        if cache["seq"] != self.galleries.seq:
            seq = self.galleries.seq
            cache = {"seq": seq, "active": self.store.species(), "all": self.store.all_species(), "names": {}}
            self._cache = cache
        return cache

    async def require_known_species(self, species: str) -> None:
        """404 for a species that no route names and that was never enrolled (answered from the cache,
        without a query or a thread hop, when it knows the species)."""
        if species in self.models.routes or species in self._cache.get("all", ()):
            return
        await run_in_threadpool(self._check_species, species)

    def _check_species(self, species: str) -> None:
        cache = self._cached()
        if species not in cache["all"] and species not in self.models.routes:
            known = ", ".join(sorted(set(cache["active"]) | set(self.models.routes))) or "none yet"
            raise NotFound(f"unknown species '{species}': no individual of it was ever enrolled and no route names it "
                           f"(species of this service: {known})", code="unknown_species")

    def store_species(self) -> str:
        """The one species of the store, when a request names none and no classifier can tell."""
        active = self._cached()["active"]
        if not active:
            raise Conflict("the gallery is empty: enroll individuals (POST /v1/individuals) before identifying",
                           code="empty_gallery")
        if len(active) > 1:
            raise InvalidInput(f"this store holds several species ({', '.join(active)}): say which one in the "
                               "'species' field" + ("" if self.models.classifier else " (or run the service with a "
                                                    "species classifier)"), code="species_required")
        return active[0]

    async def classify(self, found: Found) -> None:
        """The classifier's species (fused over each animal's views) for the animals `find` left unnamed."""
        animals = [animal for animal in found.animals if animal.species is None]
        if not animals:
            return
        classifier = self.models.classifier
        crops = [classifier.classifier.cut(found.uploads[v.image].array, v.box) for a in animals for v in a.views]
        probabilities = await classifier.probabilities(crops)
        start = 0
        for animal in animals:
            fused = probabilities[start:start + len(animal.views)].mean(axis=0, keepdims=True)
            start += len(animal.views)
            names, scores = classifier.classifier.decide(fused)
            animal.species, animal.species_source = names[0], "classifier"
            animal.species_score = round(float(scores[0]), 6)
        with self.models.incoming():
            await run_in_threadpool(self._preprocess, animals)

    def require_model(self, species: str) -> SpeciesRoute:
        model = self.models.model(species)
        if model is None:
            served = ", ".join(self.models.routes) or "none"
            raise Conflict(f"no re-ID model serves species '{species}' (the routes name {served}): its individuals "
                           "cannot be enrolled or identified", code="no_reid_model")
        return model

    # ------------------------------------------------------------------ embedding
    async def embed(self, model: SpeciesRoute, views: list[View]) -> np.ndarray:
        """Embeddings of preprocessed views by a species' network, batched across requests."""
        return await model.network.batcher.embed([view.tensor for view in views])

    def identifiable(self, animal: Animal) -> SpeciesRoute | None:
        """The model that identifies an animal, None when it gets a species-only answer."""
        if animal.too_small or animal.species in (None, UNKNOWN):
            return None
        return self.models.model(animal.species)

    def species_only_reason(self, animal: Animal) -> str | None:
        if animal.too_small:
            return f"its box is under {self.crops.min_size} px: too small to re-identify"
        if animal.species == UNKNOWN:
            return "the species classifier is not confident of its species"
        if self.models.model(animal.species) is None:
            return f"no re-ID model serves species '{animal.species}'"
        return None

    async def embed_individual(self, species: str, files: list, bbox_texts: list[str], detection_texts: list[str],
                               lease: Lease) -> tuple[Found, list[View], np.ndarray, SpeciesRoute]:
        """The photos of one individual to store: each shows it once (404/409/422 otherwise), embedded by
        its species' model."""
        model = self.require_model(species)
        found = await self.find(files, bbox_texts, detection_texts, multi_animal=False, species=species, lease=lease)
        views = [view for animal in found.animals for view in animal.views]
        return found, views, await self.embed(model, views), model

    # ------------------------------------------------------------------ identify
    def search(self, animals: list[tuple[Animal, SpeciesRoute, np.ndarray]], top_k: int) -> list[dict]:
        """Each animal identified in its species' gallery (reid.identify): candidates and decision."""
        cache = self._cached()  # brings the galleries up to date first
        results = [identify(self.galleries, animal.species, vectors, model.thresholds, top_k)
                   for animal, model, vectors in animals]
        wanted = {c.individual_id for result in results for c in result.candidates}
        missing = wanted - cache["names"].keys()
        if missing:
            cache["names"].update(self.store.names(missing))
        names, sizes = cache["names"], self.galleries.sizes()
        out = []
        for (animal, model, _), result in zip(animals, results):
            self.metrics.decisions.labels(result.decision).inc()
            out.append({"decision": result.decision, "best_score": result.best_score, "model": model.network.stamp,
                        "gallery_size": sizes.get(animal.species, 0),
                        "thresholds": {**model.thresholds, "source": model.threshold_source},
                        "rerank": rerank_description(model.layout),
                        "candidates": [
                            {"rank": rank, "individual_id": c.individual_id, "name": names.get(c.individual_id, ""),
                             "score": c.score, "cosine": c.cosine, "viewpoint": c.viewpoint,
                             "images": [vars(i) for i in c.images]}
                            for rank, c in enumerate(result.candidates, 1)]})
        return out

    # ------------------------------------------------------------------ writes
    def new_images(self, found: Found, views: list[View], vectors: np.ndarray,
                   viewpoints: list[str | None]) -> list[NewImage]:
        """Store the files (content-addressed, atomic) and describe the rows to insert (`viewpoints`: the
        flank each photo shows)."""
        out = []
        for view, vector in zip(views, vectors):
            upload = found.uploads[view.image]
            path = store_file(self.settings.store_dir, upload.relpath, upload.data, upload.sha256)
            self.integrity.intact(path)  # verified or written afresh
            out.append(NewImage(upload.sha256, path, upload.media_type, upload.width, upload.height,
                                len(upload.data), vector, upload.filename,
                                ",".join(f"{v:.6g}" for v in view.box) if view.box else None,
                                viewpoints[view.image]))
        return out

    def enroll(self, name: str, species: str, found: Found, views: list[View], vectors: np.ndarray,
               viewpoints: list[str | None], model: SpeciesRoute, key_name: str | None, notes: str,
               observed_at: str | None, location: str | None) -> dict:
        rows = self.new_images(found, views, vectors, viewpoints)
        result = self.store.enroll(name, species, rows, model.network.stamp, key_name, notes, observed_at, location)
        self.galleries.sync()
        return result

    def add_sighting(self, individual_id: int, found: Found, views: list[View], vectors: np.ndarray,
                     viewpoints: list[str | None], model: SpeciesRoute, key_name: str | None, notes: str,
                     observed_at: str | None, location: str | None) -> dict:
        self.store.require_live(individual_id, "add images to")  # 404 / 409 before any file is written
        rows = self.new_images(found, views, vectors, viewpoints)
        result = self.store.add_sighting(individual_id, rows, model.network.stamp, key_name, notes, observed_at,
                                         location)
        self.galleries.sync()
        return result

    def after_write(self) -> None:
        self.galleries.sync()

    def image_path(self, image: dict) -> Path:
        """The stored file of an image, checked against its SHA-256 (404 when it is missing or changed)."""
        problem = self.integrity.check(self.settings.store_dir, image["path"], image["sha256"], image["id"])
        if problem is not None:
            missing = problem == MISSING
            raise NotFound(f"the file of image {image['id']} is {'missing from' if missing else 'corrupt in'} the "
                           f"store ({problem}); upload the photo again to restore it",
                           code="image_file_missing" if missing else "image_file_corrupt")
        return (self.settings.store_dir / image["path"]).resolve()
