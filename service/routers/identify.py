"""Identification: which known individual is in these photos, or is it a new one?"""
from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Form
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from reid.errors import InvalidInput
from service.deps import LeaseDep, ReaderDep, ServiceDep
from service.forms import StrictRoute
from service.routers.common import errors
from service.schemas import AnimalOut, Candidate, IdentifyForm, IdentifyResponse, PhotoOut, Rerank, Thresholds

router = APIRouter(prefix="/v1", tags=["identify"], route_class=StrictRoute)


@router.post("/identify", response_model=IdentifyResponse, responses=errors(400, 401, 403, 404, 409, 413, 415, 422, 503),
             summary="Identify the animals in one encounter's photos")
async def identify(service: ServiceDep, caller: ReaderDep, lease: LeaseDep,
                   form: Annotated[IdentifyForm, Form(media_type="multipart/form-data")]) -> JSONResponse:
    """The animals are the request's `bbox` boxes or `detections` (MegaDetector's), else those the service's
    detector finds, else each photo whole. When no photo shows more than one animal, the photos are one
    animal seen several times: their embeddings are fused (mean, normalised again) into one query. Each
    animal's species is the request's `species`, else the species classifier's, else the store's only one;
    it is searched in that species' gallery with that species' model, re-ranked as its `rerank` says (the
    k-reciprocal re-ranking and query expansion `reid calibrate` chose for the checkpoint, by default), and
    each candidate individual is ranked by its best gallery image; the decision applies the thresholds to the
    first candidate's cosine. People and vehicles are counted per photo, never kept."""
    settings = service.settings
    top_k = form.top_k or settings.default_top_k
    if top_k > settings.max_top_k:
        raise InvalidInput(f"top_k is {top_k}; the most is {settings.max_top_k}", code="top_k_too_large")
    if form.species is not None:
        await service.require_known_species(form.species)
    found = await service.find(form.images, form.bbox, form.detections, multi_animal=True, species=form.species,
                               lease=lease)
    await service.classify(found)
    models = [service.identifiable(animal) for animal in found.animals]
    searched = [(animal, model) for animal, model in zip(found.animals, models) if model is not None]
    vectors = await asyncio.gather(*(service.embed(model, animal.views) for animal, model in searched))
    results = iter(await run_in_threadpool(service.search, [(a, m, v) for (a, m), v in zip(searched, vectors)],
                                           top_k))
    out = []
    for index, (animal, model) in enumerate(zip(found.animals, models)):
        boxes = [view.box for view in animal.views]
        result = next(results) if model is not None else {"decision": "species-only", "best_score": None,
                                                         "candidates": [], "gallery_size": 0}
        confs = [view.conf for view in animal.views]
        out.append(AnimalOut(
            index=index, species=animal.species, species_score=animal.species_score,
            species_source=animal.species_source, detector=animal.source, images=[v.image for v in animal.views],
            bboxes=[list(b) for b in boxes] if any(boxes) else None,
            detection_conf=confs if any(c is not None for c in confs) else None, query_images=len(animal.views),
            decision=result["decision"], best_score=result["best_score"],
            candidates=[Candidate(**c) for c in result["candidates"]], note=service.species_only_reason(animal),
            model=result.get("model"), gallery_size=result["gallery_size"],
            thresholds=Thresholds(**result["thresholds"]) if "thresholds" in result else None,
            rerank=Rerank(**result["rerank"]) if "rerank" in result else None))
    answer = IdentifyResponse(animals=out, photos=[PhotoOut(**vars(photo)) for photo in found.photos])
    # built and checked once here: returned as a model, FastAPI would validate it a second time
    return JSONResponse(answer.model_dump(mode="json"))
