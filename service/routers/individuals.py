"""Individuals: enroll, list, read, rename, merge, delete / restore, add sightings."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query
from starlette.concurrency import run_in_threadpool

from service.deps import LeaseDep, ReaderDep, ServiceDep, WriterDep
from reid.errors import InvalidInput
from reid.identify.animals import plan_viewpoints
from service.forms import StrictRoute
from service.routers.common import IndividualId, errors, individual, summary
from service.schemas import (LINE, MAX_ID, OPTIONAL_SPECIES_INPUT, EnrollForm, IndividualOut, IndividualPage,
                             IndividualPatch, MergeRequest, MergeResult, SightingCreated, SightingForm,
                             normalise_species)

router = APIRouter(prefix="/v1/individuals", tags=["individuals"], route_class=StrictRoute)

WRITE_ERRORS = errors(400, 401, 403, 404, 409, 413, 415, 422, 503, 507)


@router.post("", status_code=201, response_model=IndividualOut, responses=WRITE_ERRORS,
             summary="Enroll a new individual with its first photos")
async def create_individual(service: ServiceDep, caller: WriterDep, lease: LeaseDep,
                            form: Annotated[EnrollForm, Form(media_type="multipart/form-data")]) -> IndividualOut:
    viewpoints = plan_viewpoints(form.viewpoint, len(form.images))
    found, views, vectors, model = await service.embed_individual(form.species, form.images, form.bbox,
                                                                  form.detections, lease)
    result = await run_in_threadpool(service.enroll, form.name, form.species, found, views, vectors, viewpoints,
                                     model, caller.key_name, form.notes, form.observed_at, form.location)
    return individual(await run_in_threadpool(service.store.get_individual, result["individual_id"]))


@router.get("", response_model=IndividualPage, responses=errors(401, 403, 422),
            summary="List individuals (paged; filter by species and by name or alias)")
async def list_individuals(service: ServiceDep, caller: ReaderDep,
                           species: Annotated[str | None, Query(max_length=100,
                                                                pattern=OPTIONAL_SPECIES_INPUT)] = None,
                           name: Annotated[str | None, Query(max_length=200, pattern=LINE,
                                                             description="case-insensitive part of a name or alias")] = None,
                           page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
                           per_page: Annotated[int, Query(ge=1, le=MAX_ID)] = 50,
                           include_deleted: bool = False) -> IndividualPage:
    if per_page > service.settings.page_size_max:
        raise InvalidInput(f"per_page is {per_page}; the most is {service.settings.page_size_max}",
                           code="page_too_large")
    species = normalise_species(species)  # the pattern above let through only what this accepts
    total, rows = await run_in_threadpool(service.store.list_individuals, species, name, page, per_page,
                                          include_deleted)
    return IndividualPage(items=[summary(r) for r in rows], total=total, page=page, per_page=per_page)


@router.get("/{individual_id}", response_model=IndividualOut, responses=errors(401, 403, 404, 422),
            summary="One individual with its images, sightings and aliases")
async def get_individual(individual_id: IndividualId, service: ServiceDep, caller: ReaderDep) -> IndividualOut:
    return individual(await run_in_threadpool(service.store.get_individual, individual_id))


@router.patch("/{individual_id}", response_model=IndividualOut, responses=WRITE_ERRORS,
              summary="Rename an individual or change its notes")
async def update_individual(individual_id: IndividualId, patch: IndividualPatch, service: ServiceDep,
                            caller: WriterDep) -> IndividualOut:
    await run_in_threadpool(service.store.update_individual, individual_id, caller.key_name, patch.name, patch.notes)
    return individual(await run_in_threadpool(service.store.get_individual, individual_id))


@router.post("/{individual_id}/merge", response_model=MergeResult, responses=WRITE_ERRORS,
             summary="Merge another individual into this one (atomically; its name stays as an alias)")
async def merge_individual(individual_id: IndividualId, body: MergeRequest, service: ServiceDep,
                           caller: WriterDep) -> MergeResult:
    result = await run_in_threadpool(service.store.merge, individual_id, body.source_id, caller.key_name)
    await run_in_threadpool(service.after_write)
    return MergeResult(images_moved=result["images_moved"],
                       individual=individual(await run_in_threadpool(service.store.get_individual, individual_id)))


@router.delete("/{individual_id}", response_model=IndividualOut, responses=WRITE_ERRORS,
               summary="Delete an individual (soft: POST .../restore brings it back)")
async def delete_individual(individual_id: IndividualId, service: ServiceDep, caller: WriterDep) -> IndividualOut:
    return await _set_deleted(service, individual_id, True, caller)


@router.post("/{individual_id}/restore", response_model=IndividualOut, responses=WRITE_ERRORS,
             summary="Restore a deleted individual")
async def restore_individual(individual_id: IndividualId, service: ServiceDep, caller: WriterDep) -> IndividualOut:
    return await _set_deleted(service, individual_id, False, caller)


async def _set_deleted(service, individual_id: int, deleted: bool, caller) -> IndividualOut:
    await run_in_threadpool(service.store.set_deleted, individual_id, deleted, caller.key_name)
    await run_in_threadpool(service.after_write)
    return individual(await run_in_threadpool(service.store.get_individual, individual_id))


@router.post("/{individual_id}/images", status_code=201, response_model=SightingCreated, responses=WRITE_ERRORS,
             summary="Add a sighting (photos) of a known individual")
async def add_sighting(individual_id: IndividualId, service: ServiceDep, caller: WriterDep, lease: LeaseDep,
                       form: Annotated[SightingForm, Form(media_type="multipart/form-data")]) -> SightingCreated:
    row = await run_in_threadpool(service.store.require_live, individual_id, "add images to")  # 404 / 409 first
    viewpoints = plan_viewpoints(form.viewpoint, len(form.images))
    found, views, vectors, model = await service.embed_individual(row["species"], form.images, form.bbox,
                                                                  form.detections, lease)
    result = await run_in_threadpool(service.add_sighting, individual_id, found, views, vectors, viewpoints, model,
                                     caller.key_name, form.notes, form.observed_at, form.location)
    return SightingCreated(sighting_id=result["sighting_id"], image_ids=result["image_ids"],
                           individual=individual(await run_in_threadpool(service.store.get_individual, individual_id)))
