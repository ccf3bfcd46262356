"""Shared pieces of the routers: error responses for the OpenAPI schema and row -> model converters."""
from __future__ import annotations

from typing import Annotated

from fastapi import Path

from service.schemas import MAX_ID, ErrorBody, ImageBrief, IndividualOut, IndividualSummary, SightingOut

IndividualId = Annotated[int, Path(ge=1, le=MAX_ID, description="individual id")]
ImageId = Annotated[int, Path(ge=1, le=MAX_ID, description="image id")]


def errors(*statuses: int) -> dict:
    descriptions = {400: "malformed request", 401: "missing or unknown API key", 403: "revoked API key",
                    404: "not found", 409: "conflicts with the current state", 413: "upload too large",
                    415: "not an accepted image format", 422: "invalid input",
                    503: "not ready, or the database or image store did not answer (nothing was written)",
                    507: "the disk of the image store or database is full (nothing was written)"}
    return {status: {"model": ErrorBody, "description": descriptions.get(status, "error")} for status in statuses}


def file_url(image_id: int) -> str:
    return f"/v1/images/{image_id}/file"


def summary(row: dict) -> IndividualSummary:
    return IndividualSummary(id=row["id"], name=row["name"], species=row["species"], notes=row["notes"] or "",
                             created_at=row["created_at"], updated_at=row["updated_at"],
                             deleted=row["deleted_at"] is not None, deleted_at=row["deleted_at"],
                             image_count=row.get("image_count", 0))


def individual(row: dict) -> IndividualOut:
    return IndividualOut(
        **summary(row).model_dump(), merged_into=row["merged_into"], aliases=row["aliases"],
        images=[ImageBrief(**image, file_url=file_url(image["id"])) for image in row["images"]],
        sightings=[SightingOut(**sighting) for sighting in row["sightings"]])
