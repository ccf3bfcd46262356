"""Pydantic models of every request and response of the API (the OpenAPI schema at /docs)."""
from __future__ import annotations

from typing import Annotated, Literal

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from reid.species.names import normalise_species

# what a species field may hold as sent (stated in the OpenAPI schema): case and spaces are normalised away
SPECIES_INPUT = r"^[ \t]*[A-Za-z0-9][A-Za-z0-9 \t_.\-]*$"
OPTIONAL_SPECIES_INPUT = r"^[ \t]*([A-Za-z0-9][A-Za-z0-9 \t_.\-]*)?$"  # blank: not given
# what a viewpoint may hold as sent (reid.data.classes.normalise_viewpoint makes it the stored form); blank: unknown
VIEWPOINT_INPUT = r"^[ \t]*([A-Za-z0-9][A-Za-z0-9 \t_\-]*)?$"
# text of one line (names, places, times): no control characters, NUL included (PostgreSQL refuses it)
LINE = r"^[^\x00-\x1f\x7f]*$"
# a name: one line with at least one character that is not a space
NAME = r"^[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f][^\x00-\x1f\x7f]*$"
# free text (notes): line breaks and tabs, no other control character
TEXT = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"
MAX_ID = 2**31 - 1  # ids are 32-bit integers in PostgreSQL (and offsets are bounded alike)


def _name(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


# where the animals are, instead of a bbox (the same field on every form that takes photos)
Detections = Annotated[list[str], Field(description="one per image: the 'detections' list MegaDetector wrote for it "
                                                    "(JSON), instead of a bbox")]
# the flank each photo shows, kept with its image (the same field on every form that stores photos)
Viewpoints = Annotated[list[Annotated[str, Field(max_length=50, pattern=VIEWPOINT_INPUT)]],
                       Field(description="the viewpoint (flank) the photos show, e.g. left or right (case and outer "
                                         "spaces are ignored; blank: unknown): one for every photo or one per photo")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------- requests (multipart forms)
# the photos of a request (at least one); their size and number are checked as they are read
Images = Annotated[list[UploadFile], Field(min_length=1)]
Notes = Annotated[str, Field(max_length=10_000, pattern=TEXT)]
ObservedAt = Annotated[str | None, Field(max_length=64, pattern=LINE, description="when the photos were taken "
                                                                               "(free text, ISO 8601 advised)")]
Location = Annotated[str | None, Field(max_length=200, pattern=LINE)]


class IdentifyForm(Strict):
    """`images`: one or more photos of one encounter (fused into one query)."""
    images: Images = Field(description="photos of one encounter (one animal, or one per bbox when a single photo "
                                       "has several bboxes)")
    species: str | None = Field(None, max_length=100, pattern=OPTIONAL_SPECIES_INPUT,
                                description="species gallery to search; required when the store holds more than "
                                            "one species")
    top_k: int | None = Field(None, ge=1, le=MAX_ID, description="candidate individuals to return")
    bbox: list[str] = Field(default_factory=list, description="x,y,w,h normalised to 0..1: one for every photo, "
                                                              "one per photo, or several for a single photo")
    detections: Detections = []

    @field_validator("species")
    @classmethod
    def check_species(cls, value: str | None) -> str | None:
        return normalise_species(value)


class EnrollForm(Strict):
    name: str = Field(min_length=1, max_length=200, pattern=NAME)
    species: str = Field(min_length=1, max_length=100, pattern=SPECIES_INPUT)
    images: Images
    notes: Notes = ""
    observed_at: ObservedAt = None
    location: Location = None
    bbox: list[str] = Field(default_factory=list, description="x,y,w,h normalised: one for every photo or one per "
                                                              "photo (default: the detector's box, else the whole image)")
    detections: Detections = []
    viewpoint: Viewpoints = []

    @field_validator("name")
    @classmethod
    def check_name(cls, value: str) -> str:
        return _name(value)

    @field_validator("species")
    @classmethod
    def check_species(cls, value: str) -> str:
        return normalise_species(value)


class SightingForm(Strict):
    images: Images
    notes: Notes = ""
    observed_at: ObservedAt = None
    location: Location = None
    bbox: list[str] = Field(default_factory=list)
    detections: Detections = []
    viewpoint: Viewpoints = []


# ---------------------------------------------------------------------- requests (JSON)
class IndividualPatch(Strict):
    """At least one of `name`, `notes` (neither may be null)."""
    model_config = ConfigDict(extra="forbid", json_schema_extra={"minProperties": 1})

    # typed str with a default of None: the schema (and the validation) refuse null, and an absent field is None
    name: str = Field(None, min_length=1, max_length=200, pattern=NAME)
    notes: str = Field(None, max_length=10_000, pattern=TEXT)

    @field_validator("name")
    @classmethod
    def check_name(cls, value: str) -> str:
        return _name(value)

    @model_validator(mode="after")
    def check_not_empty(self) -> "IndividualPatch":
        if self.name is None and self.notes is None:
            raise ValueError("give at least one of name, notes")
        return self


class MergeRequest(Strict):
    # strict: JSON true is not individual 1, nor "1" or 1.0 an id
    source_id: int = Field(ge=1, le=MAX_ID, strict=True,
                           description="the individual merged into this one (it becomes an alias)")


# ---------------------------------------------------------------------- responses
class ErrorDetail(BaseModel):
    code: str
    message: str
    details: dict | list | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


ImageViewpoint = Annotated[str | None, Field(description="the viewpoint (flank) the photo shows, as recorded when it "
                                                        "was stored; null when none was recorded")]


class ImageOut(BaseModel):
    id: int
    individual_id: int
    enrolled_as: int = Field(description="the individual it was first enrolled under (before merges)")
    sighting_id: int
    species: str
    sha256: str
    width: int
    height: int
    media_type: str
    size_bytes: int
    filename: str | None = None
    bbox: str | None = None
    viewpoint: ImageViewpoint = None
    created_at: str
    file_url: str


class ImageBrief(BaseModel):
    id: int
    sighting_id: int
    enrolled_as: int
    sha256: str
    width: int
    height: int
    media_type: str
    bbox: str | None = None
    viewpoint: ImageViewpoint = None
    created_at: str
    file_url: str


class SightingOut(BaseModel):
    id: int
    observed_at: str | None = None
    location: str | None = None
    notes: str = ""
    created_at: str
    key_name: str | None = None
    image_ids: list[int]


class AliasOut(BaseModel):
    name: str
    former_id: int
    created_at: str


class IndividualSummary(BaseModel):
    id: int
    name: str
    species: str
    notes: str = ""
    created_at: str
    updated_at: str
    deleted: bool
    deleted_at: str | None = None
    image_count: int


class IndividualOut(IndividualSummary):
    merged_into: int | None = Field(None, description="set when this individual was merged into another")
    aliases: list[AliasOut] = []
    images: list[ImageBrief] = []
    sightings: list[SightingOut] = []


class IndividualPage(BaseModel):
    items: list[IndividualSummary]
    total: int
    page: int
    per_page: int


class SightingCreated(BaseModel):
    sighting_id: int
    image_ids: list[int]
    individual: IndividualOut


class MergeResult(BaseModel):
    images_moved: int
    individual: IndividualOut


class Thresholds(BaseModel):
    match_threshold: float
    new_threshold: float
    source: str = Field(description="checkpoint: calibrated by `reid calibrate`; route: set in the routes file; "
                                    "settings: the service's fallback defaults")


class ImageMatch(BaseModel):
    image_id: int
    score: float = Field(description="its ranking score: 1 - re-ranked distance, or the cosine without re-ranking")
    cosine: float = Field(description="cosine similarity of the fused query to this image")
    viewpoint: str | None = Field(description="the flank of this gallery image, as recorded at enrollment; null when "
                                              "none was recorded")


class Candidate(BaseModel):
    rank: int
    individual_id: int
    name: str
    score: float = Field(description="the individual's ranking score, its best image's: 1 - its k-reciprocal "
                                     "re-ranked distance when re-ranking is on, else its cosine")
    cosine: float = Field(description="cosine similarity of the fused query to the individual's most similar "
                                      "image among the candidates")
    viewpoint: str | None = Field(description="the flank of the individual's best-matching gallery image, as recorded "
                                              "at enrollment; null when none was recorded")
    images: list[ImageMatch] = Field(description="its gallery images among the nearest neighbours, best first")


class Rerank(BaseModel):
    """The re-ranking an answer used, and where its settings came from."""
    describe: str = Field(description="'none', or the steps: alpha-QE, k-reciprocal with k1, k2, lambda")
    source: str = Field(description="checkpoint (chosen by `reid calibrate`), settings, or off")
    k_reciprocal: bool
    k1: int
    k2: int
    lambda_value: float
    qe: int
    qe_alpha: float
    dba: int
    candidates: int | None = Field(None, description="gallery images re-ranked per query")


class AnimalOut(BaseModel):
    index: int
    species: str
    species_score: float | None = Field(None, description="the species classifier's confidence")
    species_source: Literal["request", "classifier", "store"] = Field(
        description="request: the 'species' field; classifier: the service's species classifier; store: the only "
                    "species of the store")
    detector: Literal["whole-image", "bbox", "detections", "megadetector"] = Field(
        description="where the animal's boxes come from: the whole photo, the request's bbox or detections, or the "
                    "service's MegaDetector")
    images: list[int] = Field(description="the photos (upload indices) it was seen in, fused into one query")
    bboxes: list[list[float]] | None = Field(None, description="its box in each of those photos (x, y, w, h "
                                                                "normalised)")
    detection_conf: list[float] | None = None
    query_images: int
    decision: Literal["match", "new", "uncertain", "species-only"] = Field(
        description="species-only: no re-ID model for its species, species unknown, or its box too small")
    best_score: float | None = Field(description="the first candidate's cosine, which the thresholds apply to")
    candidates: list[Candidate]
    note: str | None = None
    model: str | None = Field(None, description="the model that embedded it (weights, preprocessing, TTA, crops)")
    thresholds: Thresholds | None = None
    rerank: Rerank | None = None
    gallery_size: int = Field(0, description="images in its species' gallery")


class PhotoOut(BaseModel):
    index: int
    filename: str | None = None
    outcome: Literal["animal", "blank", "human", "vehicle"]
    animals: int
    humans: int
    vehicles: int


class IdentifyResponse(BaseModel):
    animals: list[AnimalOut]
    photos: list[PhotoOut] = Field(description="what each photo holds (people and vehicles are counted, not kept)")


class Health(BaseModel):
    status: Literal["ok"]
    version: str


class ModelOut(BaseModel):
    species: str = Field(description="the species it serves ('*': every species the routes do not name)")
    model: str
    checkpoint: str
    tta: str
    embedding_dim: int
    thresholds: Thresholds
    rerank: Rerank


class ReadyBrief(BaseModel):
    """Readiness without its details (require_key_for_reads, no key sent)."""
    model_config = ConfigDict(extra="forbid")

    status: Literal["ready", "not ready"]


class Ready(BaseModel):
    status: Literal["ready", "not ready"]
    models: list[ModelOut]
    detector: str | None
    species_classifier: str | None
    database: str
    change_seq: int
    galleries: dict[str, int]
    foreign_images: int = Field(description="images embedded by another model, not searchable by this one")
    corrupt_files: int = Field(0, description="stored image files found corrupt or missing (served or embedded "
                                              "again): upload those photos again to replace them")
    warnings: list[str]


class ApiKeyOut(BaseModel):
    id: int
    name: str
    created_at: str
    revoked_at: str | None = None


class AuditEntry(BaseModel):
    id: int
    at: str
    key_name: str | None
    action: str
    target_type: str | None
    target_id: int | None
    detail: dict
