"""What the review app's pages show and do, as plain functions of the service (no HTTP here)."""
from __future__ import annotations

from pathlib import Path

from fastapi import UploadFile
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from reid.errors import InvalidInput
from reid.identify.animals import plan_viewpoints
from service.budget import Lease
from service.core import Service
from reid.species.names import normalise_species
from service.schemas import EnrollForm
from service.web.thumbs import make_thumbnail, thumbnail_path

VIEWPOINTS = ("left", "right", "front", "back", "top")  # offered; any other is typed into the API


def species_choices(service: Service) -> list[str]:
    """The species a form offers: those of the store and those the routes serve."""
    return sorted(set(service.store.species()) | set(service.models.routes))


def individual_list(service: Service, q: str, species: str, page: int, per_page: int, deleted: bool) -> dict:
    try:
        wanted = normalise_species(species)
    except ValueError as exc:
        raise InvalidInput(f"species '{species}': {exc}", code="invalid_species") from None
    total, rows = service.store.list_individuals(wanted, q.strip() or None, page, per_page, deleted)
    flanks = service.store.representative_images(row["id"] for row in rows)
    for row in rows:
        row["flanks"] = flanks.get(row["id"], [])
    return {"rows": rows, "total": total, "page": page, "pages": max(1, -(-total // per_page)), "q": q,
            "species": species, "deleted": deleted, "species_choices": service.store.all_species()}


def individual_details(service: Service, individual_id: int) -> dict:
    """An individual with its photos by sighting (newest first), its history and whom it could be merged with."""
    row = service.store.get_individual(individual_id)
    by_id = {image["id"]: image for image in row["images"]}
    sightings = sorted(row["sightings"], key=lambda s: (s["observed_at"] or s["created_at"], s["id"]), reverse=True)
    for sighting in sightings:
        sighting["images"] = [by_id[i] for i in sighting["image_ids"] if i in by_id]
    flanks = service.store.representative_images([individual_id]).get(individual_id, [])
    others = []
    if row["merged_into"] is None and row["deleted_at"] is None:
        _, live = service.store.list_individuals(row["species"], None, 1, service.settings.page_size_max)
        others = [other for other in live if other["id"] != individual_id]
    return {"individual": row, "sightings": sightings, "flanks": flanks, "others": others,
            "history": service.store.audit_of("individual", individual_id)}


def merge_pair(service: Service, target_id: int, source_id: int) -> tuple[dict, dict]:
    """The two individuals of a merge, for a side-by-side look before it is done."""
    if target_id == source_id:
        raise InvalidInput(f"cannot merge individual {target_id} into itself", code="merge_into_self")
    return service.store.get_individual(target_id), service.store.get_individual(source_id)


def set_deleted(service: Service, individual_id: int, deleted: bool, key_name: str) -> None:
    service.store.set_deleted(individual_id, deleted, key_name)
    service.after_write()


def thumbnail(service: Service, image_id: int, size: int) -> Path:
    """The cached thumbnail of a stored image, made from its (checked) file the first time it is asked for."""
    row = service.store.get_image(image_id)
    path = thumbnail_path(service.settings.store_dir / "cache" / "thumbs", row["sha256"], row["bbox"], size)
    if path.is_file():
        return path
    return make_thumbnail(service.image_path(row), path, row["bbox"], size)


async def enroll(service: Service, name: str, species: str, files: list[UploadFile], viewpoint: str, notes: str,
                 observed_at: str, location: str, lease: Lease, key_name: str) -> dict:
    """Enroll a new individual from the app's form, checked and stored as POST /v1/individuals does."""
    files = [f for f in files if f.filename]  # a file input left empty sends one nameless, empty part
    if not files:
        raise InvalidInput("choose at least one photo of the individual", code="no_images")
    try:
        form = EnrollForm(name=name, species=species, images=files, notes=notes.replace("\r\n", "\n"),
                          observed_at=observed_at.strip() or None, location=location.strip() or None,
                          viewpoint=[viewpoint] if viewpoint.strip() else [])
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise InvalidInput(f"the form is not complete: {problems}", code="invalid_form") from None
    viewpoints = plan_viewpoints(form.viewpoint, len(form.images))
    found, views, vectors, model = await service.embed_individual(form.species, form.images, [], [], lease)
    result = await run_in_threadpool(service.enroll, form.name, form.species, found, views, vectors, viewpoints,
                                     model, key_name, form.notes, form.observed_at, form.location)
    return {"id": result["individual_id"], "name": form.name}
