"""The service's networks: the re-ID model of each species, the detector and the species classifier.

A species is served by the route of the routes file that names it (reid/species/routing.py),
else by the default `checkpoint`; a species with neither has no re-ID model: identify answers its
animals `species-only` and enrolling it is refused. Routes that name the same checkpoint and TTA
share one network, and each network has its own micro-batcher thread. Every stored vector is
stamped with `embedding_model(fingerprint, crop settings)`, so vectors of another model, or of
crops cut another way, never share a gallery with this one's.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from reid.embedding.embedder import Embedder
from reid.errors import ConfigError
from reid.identify.decision import resolve_thresholds
from reid.identify.gallery import Layout, choose_rerank, rerank_description
from reid.species.crops import embedding_model
from service.batching import MicroBatcher, ModelRunner
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger("wildreid.service")


@dataclass
class Network:
    """One loaded re-ID network and the thread that batches its forward passes."""
    runner: ModelRunner
    batcher: MicroBatcher
    stamp: str  # embedding_model(): what the store records as the maker of its vectors
    checkpoint: Path
    tta: str


@dataclass
class SpeciesRoute:
    """How one species is identified: its network, its gallery's layout and its decision thresholds."""
    species: str
    network: Network
    thresholds: dict
    threshold_source: str  # route, checkpoint (calibrated), settings (fallback), or route+...
    layout: Layout


class SpeciesClassifierRunner:
    """The species classifier behind its own micro-batcher: probabilities of crops, batched across requests."""

    def __init__(self, path: Path, threshold: float | None, settings: Settings, metrics: Metrics):
        from reid.species.classifier import SpeciesClassifier

        self.path = path
        self.classifier = SpeciesClassifier.from_checkpoint(path, threshold)
        self.batcher = MicroBatcher(self.classifier.forward, settings.max_batch or 32, settings.batch_window_ms / 1000,
                                    observe=metrics.observe_batch)

    async def probabilities(self, crops: list[np.ndarray]) -> np.ndarray:
        from starlette.concurrency import run_in_threadpool

        tensors = await run_in_threadpool(lambda: [self.classifier.preprocess(c) for c in crops])
        return await self.batcher.embed(tensors)


class LockedDetector:
    """A detector called from the threadpool one request at a time (ultralytics models are not thread-safe)."""

    def __init__(self, detector, name: str):
        self.detector, self.name = detector, name
        self.lock = threading.Lock()

    def detect(self, image: np.ndarray):
        with self.lock:
            return self.detector.detect(image)


class Models:
    def __init__(self, settings: Settings, metrics: Metrics):
        from reid.species.routing import Router

        if settings.checkpoint is None and settings.routes is None:
            raise ConfigError("the service needs a re-ID model: --checkpoint CKPT (every species), --routes FILE "
                              "(a checkpoint per species), or both")
        self.settings, self.metrics = settings, metrics
        self.crop_settings = settings.crop_settings()
        self.networks: dict[str, Network] = {}
        self.routes: dict[str, SpeciesRoute] = {}
        self.default: SpeciesRoute | None = None
        self._defaulted: dict[str, SpeciesRoute] = {}
        fallback = {"match_threshold": settings.match_threshold, "new_threshold": settings.new_threshold}
        if settings.routes is not None:
            router = Router.from_file(settings.routes, defaults=fallback, defaults_source="settings")
            for species, route in router.routes.items():
                self.routes[species] = self._route(species, route.embedder, route.checkpoint, route.thresholds,
                                                   route.threshold_source)
        if settings.checkpoint is not None:
            embedder = Embedder.from_checkpoint(settings.checkpoint, tta=settings.tta, num_workers=0)
            thresholds, source = resolve_thresholds({}, embedder.thresholds, fallback, "settings",
                                                    f"--checkpoint {settings.checkpoint}")
            self.default = self._route("*", embedder, settings.checkpoint, thresholds, source)
        self.detector = self._detector(settings)
        # JPEGs taken whole are decoded down to twice the largest input of any network
        self.draft_size = 2 * max(n.runner.image_size for n in self.networks.values())
        self.classifier = (SpeciesClassifierRunner(settings.species_classifier, settings.species_threshold, settings,
                                                   metrics) if settings.species_classifier else None)

    def _route(self, species: str, embedder: Embedder, checkpoint: Path, thresholds: dict,
               threshold_source: str) -> SpeciesRoute:
        network = self._network(embedder, checkpoint)
        rerank, source = choose_rerank(self.settings.rerank, embedder.postprocessing, self.settings.rerank_options())
        layout = Layout(network.stamp, network.runner.dim, rerank, source, self.settings.rerank_candidates)
        return SpeciesRoute(species, network, thresholds, threshold_source, layout)

    def _network(self, embedder: Embedder, checkpoint: Path) -> Network:
        """The network of this embedder; an identical one (same weights, preprocessing, TTA) is shared."""
        if embedder.fingerprint not in self.networks:
            runner = ModelRunner(embedder)
            batcher = MicroBatcher(runner.forward, self.settings.max_batch or embedder.batch_size,
                                   self.settings.batch_window_ms / 1000, observe=self.metrics.observe_batch)
            self.networks[embedder.fingerprint] = Network(runner, batcher, embedding_model(
                embedder.fingerprint, self.crop_settings), Path(checkpoint).absolute(), embedder.tta)
        return self.networks[embedder.fingerprint]

    def _detector(self, settings: Settings) -> LockedDetector | None:
        if settings.detector is None:
            return None
        import torch

        from reid.species.detector import MegaDetector

        device = settings.detector_device or ("cuda:0" if torch.cuda.is_available() else "cpu")
        crops = self.crop_settings
        # boxes below every category's threshold would be dropped anyway: not worth the detector's NMS
        lowest = min([*crops.thresholds.values(), crops.default_threshold])
        return LockedDetector(MegaDetector(settings.detector, threshold=lowest, device=device), "megadetector")

    # ------------------------------------------------------------------ lookups
    def model(self, species: str) -> SpeciesRoute | None:
        """The re-ID model of a species, None when nothing serves it."""
        if species in self.routes:
            return self.routes[species]
        if self.default is None:
            return None
        if species not in self._defaulted:  # memoised: galleries ask once per stored image at start
            self._defaulted[species] = dataclasses.replace(self.default, species=species)
        return self._defaulted[species]

    def layout(self, species: str) -> Layout | None:
        """What a species' gallery holds and how it is re-ranked, None when it has no model (for Galleries)."""
        model = self.model(species)
        return model.layout if model else None

    def describe(self) -> dict:
        """What serves which species (for /ready)."""
        def entry(model: SpeciesRoute) -> dict:
            network = model.network
            return {"species": model.species, "model": network.stamp, "checkpoint": str(network.checkpoint),
                    "tta": network.tta, "embedding_dim": network.runner.dim,
                    "thresholds": {**model.thresholds, "source": model.threshold_source},
                    "rerank": rerank_description(model.layout)}

        models = [entry(m) for m in self.routes.values()] + ([entry(self.default)] if self.default else [])
        return {"models": models, "detector": self.detector.name if self.detector else None,
                "species_classifier": str(self.classifier.path) if self.classifier else None}

    def uncalibrated(self) -> list[str]:
        """Warnings for the models that decide with the settings' fallback thresholds."""
        models = list(self.routes.values()) + ([self.default] if self.default else [])
        return [f"{'every species' if m.species == '*' else m.species}: the checkpoint {m.network.checkpoint.name} "
                f"holds no calibration (run `reid calibrate`): decisions use match >= "
                f"{m.thresholds['match_threshold']}, new < {m.thresholds['new_threshold']}"
                for m in models if m.threshold_source == "settings"]

    # ------------------------------------------------------------------ threads
    @property
    def batchers(self) -> list[MicroBatcher]:
        return [n.batcher for n in self.networks.values()] + ([self.classifier.batcher] if self.classifier else [])

    def start(self) -> None:
        for batcher in self.batchers:
            batcher.start()

    def close(self) -> None:
        for batcher in self.batchers:
            batcher.close()

    def alive(self) -> bool:
        return all(batcher.thread.is_alive() for batcher in self.batchers)

    @contextmanager
    def incoming(self) -> Iterator[None]:
        """A request is preparing images: any batcher may wait a little for them."""
        with ExitStack() as stack:
            for batcher in self.batchers:
                stack.enter_context(batcher.incoming())
            yield
