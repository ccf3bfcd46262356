"""Identification: which known individual is in these photos, or is it a new one?"""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form
from starlette.concurrency import run_in_threadpool

from service.deps import ReaderDep, ServiceDep
from service.errors import InvalidInput
from service.routers.common import errors
from service.schemas import Animal, Candidate, IdentifyForm, IdentifyResponse, Thresholds

router = APIRouter(prefix="/v1", tags=["identify"])


@router.post("/identify", response_model=IdentifyResponse, responses=errors(400, 401, 403, 404, 409, 413, 415, 422),
             summary="Identify the animal in one encounter's photos")
async def identify(service: ServiceDep, caller: ReaderDep,
                   form: Annotated[IdentifyForm, Form(media_type="multipart/form-data")]) -> IdentifyResponse:
    """The photos are embedded and fused (mean of their embeddings, normalised again) into one query per
    animal; each candidate individual is scored by its best gallery image. No detector runs yet: each
    photo (or each `bbox` crop of it) is taken to show the animal (`detector: "whole-image"` / `"bbox"`)."""
    settings = service.settings
    top_k = form.top_k or settings.default_top_k
    if top_k > settings.max_top_k:
        raise InvalidInput(f"top_k is {top_k}; the most is {settings.max_top_k}", code="top_k_too_large")
    species = await run_in_threadpool(service.resolve_species, form.species)
    prepared, animals = await service.prepare(form.images, form.bbox, multi_animal=True)
    vectors = await service.embed(prepared)
    results = await run_in_threadpool(service.search, species, vectors, animals, top_k)
    out = []
    for index, result in enumerate(results):
        boxes = [prepared.bboxes[i] for i in result["members"]]
        out.append(Animal(index=index, species=species, detector="bbox" if any(boxes) else "whole-image",
                          bboxes=[list(b) for b in boxes] if any(boxes) else None,
                          query_images=len(result["members"]), decision=result["decision"],
                          best_score=result["best_score"],
                          candidates=[Candidate(**c) for c in result["candidates"]]))
    return IdentifyResponse(animals=out, thresholds=Thresholds(**service.thresholds, source=service.threshold_source),
                            model=service.runner.fingerprint, gallery_size=service.galleries.sizes().get(species, 0))
