"""Service settings: one pydantic model, built by `reid serve` from its flags (and an optional file).

Everything the server reads at start is here, so `create_app(settings)` needs nothing else, and
uvicorn worker processes get the same settings as JSON in `WILDREID_SERVICE_SETTINGS`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from reid.errors import ConfigError, ReidError
from reid.identify.decision import DEFAULT_THRESHOLDS
from reid.identify.photos import PhotoLimits

ENV_VAR = "WILDREID_SERVICE_SETTINGS"
MB = 1024 * 1024


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    store_dir: Path = Field(description="folder of the store: database (SQLite by default) and image files")
    checkpoint: Path | None = Field(None, description="training checkpoint (best.pt, or its .onnx from `reid "
                                                     "export`) whose model embeds the photos of every species the "
                                                     "routes file does not list")
    routes: Path | None = Field(None, description="routes file: species -> re-ID checkpoint, TTA, thresholds "
                                                 "(reid/species/routing.py); to serve, give it, checkpoint or both")
    database_url: str | None = Field(None, description="SQLAlchemy URL, e.g. postgresql+psycopg://user:pw@host/db; "
                                                       "default: SQLite (WAL) at STORE/wildreid.db")
    tta: Literal["none", "hflip", "flip4"] | None = Field(
        None, description="test-time augmentation of `checkpoint` (default: what `reid calibrate` chose, else none)")
    require_key_for_reads: bool = Field(False, description="reads need `Authorization: Bearer KEY` too")

    # upload limits
    max_upload_bytes: int = Field(20 * MB, ge=1, description="largest single uploaded file")
    max_request_bytes: int = Field(64 * MB, ge=1, description="largest request body (refused before it is read)")
    header_timeout_s: float = Field(10.0, gt=0, description="a request's headers must be complete this long after "
                                                           "the connection opens or the request begins (else 408)")
    body_idle_timeout_s: float = Field(30.0, gt=0, description="longest wait for the next part of a request body "
                                                              "(else 408)")
    body_deadline_s: float = Field(600.0, gt=0, description="a request body must be complete this long after the "
                                                           "request begins (else 408)")
    max_pixels: int = Field(PhotoLimits.max_pixels, ge=1,
                            description="largest width x height of an upload (decompression bombs)")
    max_images_per_request: int = Field(10, ge=1)
    # decoding memory (service/budget.py): 32 clients sending 10 bomb-sized PNGs each stay within about
    # decode_budget_bytes above idle, and a photo too large for these is a 413 that names the limit
    decode_budget_bytes: int = Field(1024 * MB, ge=MB, description="memory that all decoding photos together may "
                                                                  "take; decodes past it wait for room")
    request_decode_budget_bytes: int = Field(768 * MB, ge=MB, description="memory that one request's photos may "
                                                                         "take decoded (each photo's decode and "
                                                                         "what the request keeps of them)")
    decode_wait_s: float = Field(120.0, gt=0, description="longest wait for room in decode_budget_bytes (then 503)")
    max_decoded_pixels: int = Field(PhotoLimits.max_decoded_pixels, ge=1,
                                    description="photos that boxes are cut from are kept at no more pixels "
                                                "(decoded at a reduced scale, or reduced); photos taken whole, "
                                                "at twice the model's input size")
    allowed_formats: tuple[str, ...] = PhotoLimits.allowed_formats

    # identification
    default_top_k: int = Field(5, ge=1)
    max_top_k: int = Field(100, ge=1)
    match_threshold: float = Field(DEFAULT_THRESHOLDS["match_threshold"],
                                   description="used when the checkpoint holds no calibration")
    new_threshold: float = Field(DEFAULT_THRESHOLDS["new_threshold"],
                                 description="used when the checkpoint holds no calibration")
    rerank: Literal["checkpoint", "settings", "off"] = Field(
        "checkpoint", description="re-ranking of each species' candidates: what `reid calibrate` chose for its "
                                  "checkpoint (plain cosine when it chose none), the rerank_* settings below for "
                                  "every species, or off")
    rerank_k1: int = Field(20, ge=1, description="k-reciprocal k1 (with rerank: settings)")
    rerank_k2: int = Field(6, ge=1, description="k-reciprocal k2, local query expansion (with rerank: settings)")
    rerank_lambda: float = Field(0.3, ge=0, le=1, description="weight of the cosine distance against the Jaccard "
                                                              "distance (with rerank: settings)")
    rerank_qe: int = Field(0, ge=0, description="alpha query expansion over this many neighbours, 0: none "
                                                "(with rerank: settings)")
    rerank_qe_alpha: float = Field(3.0, ge=0, description="alpha of the query expansion")
    rerank_candidates: int = Field(100, ge=1, le=10_000, description="gallery images re-ranked per query")
    rerank_snapshot_interval_s: float = Field(600.0, ge=0, description="seconds between snapshots of the changed "
                                                                      "re-ranking states (STORE/cache/rerank; also "
                                                                      "at start and at close), which the next start "
                                                                      "loads instead of building them; 0: only then")
    index_kind: Literal["flat", "hnsw", "auto"] = "flat"
    ann_threshold: int = Field(200_000, ge=1, description="with index_kind auto, larger galleries get HNSW")

    # camera-trap frames: detection, crops, species
    detector: Path | None = Field(None, description="MegaDetector v6 weights (.pt, needs wildreid[detector]): "
                                                   "identify finds the animals of full frames itself")
    detector_device: str | None = Field(None, description="device of the detector (default: cuda:0 if any, else cpu)")
    detection_thresholds: dict[str, float] = Field(
        default_factory=lambda: {"animal": 0.2, "person": 0.2, "vehicle": 0.2},
        description="lowest confidence kept per detection category")
    crop_padding: float = Field(0.05, ge=0, description="fraction of a box's size added around it before cropping")
    crop_square: bool = Field(True, description="crops are squares (more image, letterboxed at the edges)")
    min_crop_px: int = Field(32, ge=0, description="detections whose shorter side is smaller are not re-identified")
    species_classifier: Path | None = Field(None, description="species.pt of `reid train-species`: tells the "
                                                             "species when a request does not")
    species_threshold: float | None = Field(None, ge=0, le=1, description="classifier scores below it answer "
                                                                          "'unknown' (default: the trained one)")

    # micro-batching of model inference
    batch_window_ms: float = Field(2.0, ge=0, description="how long the model waits to gather more images")
    max_batch: int | None = Field(None, ge=1, description="most images per forward pass (default: the "
                                                          "checkpoint's eval batch size)")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's)")
    threadpool_size: int | None = Field(None, ge=1, description="threads that decode, crop and search for requests "
                                                               "at once (default: anyio's 40)")

    # batch jobs of the review app (service/web/jobs.py)
    batch_roots: list[Path] = Field(default_factory=list, description="server folders (and what is under them) "
                                                                     "that batch jobs may read photos from; none: "
                                                                     "jobs take uploaded photos only")
    max_job_upload_bytes: int = Field(2048 * MB, ge=1, description="largest unpacked zip of a batch job's upload")
    job_poll_s: float = Field(2.0, gt=0, description="how often an idle instance looks for a queued job")
    job_stale_s: float = Field(60.0, gt=0, description="a running job whose instance has not beaten for this long "
                                                       "(it stopped) is taken by the next instance that looks")

    # storage
    sqlite_synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = "FULL"
    page_size_max: int = Field(200, ge=1)
    orphan_grace_s: float = Field(3600.0, ge=0, description="image files that no database row names are removed "
                                                           "once this old (longer than any request takes between "
                                                           "storing a photo and committing its row)")
    orphan_sweep_interval_s: float = Field(3600.0, ge=0, description="seconds between sweeps of orphan files "
                                                                    "(one runs at start; 0: only then)")

    @field_validator("store_dir", "checkpoint", "routes", "detector", "species_classifier")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return None if value is None else Path(value).expanduser().absolute()

    @field_validator("batch_roots")
    @classmethod
    def _resolved(cls, value: list[Path]) -> list[Path]:
        return [Path(root).expanduser().resolve() for root in value]

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        if self.new_threshold > self.match_threshold:
            raise ValueError(f"new_threshold {self.new_threshold} is above match_threshold {self.match_threshold}")
        if self.default_top_k > self.max_top_k:
            raise ValueError("default_top_k is above max_top_k")
        if self.request_decode_budget_bytes > self.decode_budget_bytes:
            raise ValueError("request_decode_budget_bytes is above decode_budget_bytes")
        self.crop_settings()  # thresholds in 0..1
        return self

    def crop_settings(self):
        """How detections and bboxes become model inputs, as identify-batch cuts them."""
        from reid.species.crops import CropSettings

        try:
            return CropSettings(dict(self.detection_thresholds), padding=self.crop_padding,
                                min_size=self.min_crop_px, square=self.crop_square)
        except ReidError as exc:  # a threshold out of range
            raise ValueError(str(exc)) from None

    def rerank_options(self):
        """The re-ranking the rerank_* settings describe (used with rerank: settings)."""
        from reid.evaluation.evaluate import RerankOptions

        return RerankOptions(qe=self.rerank_qe, qe_alpha=self.rerank_qe_alpha, k_reciprocal=True, k1=self.rerank_k1,
                             k2=self.rerank_k2, lambda_value=self.rerank_lambda)

    def photo_limits(self) -> PhotoLimits:
        """The limits photos are decoded within (the store's images embedded again included)."""
        return PhotoLimits(self.max_pixels, self.max_decoded_pixels, tuple(self.allowed_formats))

    @property
    def url(self) -> str:
        return self.database_url or f"sqlite:///{self.store_dir / 'wildreid.db'}"

    @property
    def images_dir(self) -> Path:
        return self.store_dir / "images"

    def to_env(self) -> dict[str, str]:
        return {ENV_VAR: self.model_dump_json()}

    @classmethod
    def from_env(cls) -> "Settings":
        raw = os.environ.get(ENV_VAR)
        if not raw:
            raise ConfigError(f"{ENV_VAR} is not set: start the server with `reid serve`")
        return cls.model_validate_json(raw)

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> "Settings":
        """Settings from a YAML or JSON file, with command-line values (not None) on top."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"settings file '{path}' not found")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise ConfigError(f"settings file '{path}' must hold a mapping of setting: value")
        return build_settings(**{**data, **{k: v for k, v in overrides.items() if v is not None}})


def build_settings(**values) -> Settings:
    """Settings, with pydantic's complaints turned into one ConfigError a user can read."""
    try:
        return Settings(**values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid service settings: {problems}") from None
