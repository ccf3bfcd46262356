"""What the review app's pages show and do, as plain functions of the service (no HTTP here)."""
from __future__ import annotations

from pathlib import Path

from fastapi import UploadFile
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from reid.errors import Conflict, InvalidInput, NotFound
from reid.identify.animals import plan_viewpoints
from reid.identify.decision import decide
from reid.identify.duplicates import DuplicatePair, duplicate_pairs
from reid.store import Review
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


def merge_suggestions(service: Service, species: str, top_n: int) -> dict:
    """Per species (or only `species`), the pairs of individuals whose photos match each other at or above
    its match threshold, best first (at most `top_n`), without the pairs a reviewer said are not the same."""
    wanted = _species(species)
    service.galleries.sync()
    sizes = service.galleries.sizes()
    if wanted and wanted not in sizes and wanted not in species_choices(service):
        raise NotFound(f"unknown species '{wanted}' (species of this store: {', '.join(sorted(sizes)) or 'none yet'})",
                       code="unknown_species")
    sections = []
    for name in [wanted] if wanted else sorted(sizes):
        model = service.models.model(name)
        section = {"species": name, "gallery_size": sizes.get(name, 0), "pairs": [], "threshold": None,
                   "source": None, "note": None, "dismissed": 0}
        sections.append(section)
        if model is None:
            section["note"] = f"no re-ID model serves species '{name}': its photos are not compared"
            continue
        threshold = model.thresholds["match_threshold"]
        dismissed = _dismissed_pairs(service, name)
        section.update(threshold=threshold, source=model.threshold_source, dismissed=len(dismissed))
        arrays = service.galleries.arrays(name)
        pairs = [p for p in duplicate_pairs(arrays.vectors, arrays.individual_ids, arrays.image_ids, threshold,
                                            top_n + len(dismissed))
                 if (p.individual_a, p.individual_b) not in dismissed][:top_n]
        names = service.store.names([i for p in pairs for i in (p.individual_a, p.individual_b)])
        section["pairs"] = [{"a": {"id": p.individual_a, "name": names.get(p.individual_a, "")},
                             "b": {"id": p.individual_b, "name": names.get(p.individual_b, "")},
                             "cosine": p.cosine, "image_a": p.image_a, "image_b": p.image_b} for p in pairs]
    return {"sections": sections, "species": species, "species_choices": sorted(sizes), "top_n": top_n}


def dismiss_suggestion(service: Service, species: str, first: int, second: int, key_name: str) -> str:
    """Record that two suggested individuals are not the same animal (a review `rejected`: the photo of one
    that matched best is not the other), so that they are no longer suggested; returns what was done."""
    wanted = _species(species)
    if not wanted:
        raise InvalidInput("say which species the two individuals are of", code="species_required")
    if first == second:
        raise InvalidInput(f"individual {first} is the same as itself: nothing to dismiss", code="same_individual")
    a, b = sorted((first, second))
    model = service.models.model(wanted)
    if model is None:
        raise Conflict(f"no re-ID model serves species '{wanted}': it has no suggestions", code="no_reid_model")
    if (a, b) in _dismissed_pairs(service, wanted):
        raise Conflict(f"individuals {a} and {b} were marked as not the same already", code="already_dismissed")
    pair = _best_pair(service, wanted, a, b)
    thresholds = model.thresholds
    names = service.store.names([a, b])
    service.store.record_review(Review(
        species=wanted, verdict="rejected", query_sha256=[service.store.get_image(pair.image_a)["sha256"]],
        image_ids=[], candidate_id=b, individual_id=a, score=pair.cosine, cosine=pair.cosine,
        best_score=pair.cosine, decision=decide(pair.cosine, thresholds), model=model.network.stamp,
        match_threshold=thresholds["match_threshold"], new_threshold=thresholds["new_threshold"],
        thresholds_source=model.threshold_source), key_name)
    return f"Not the same: {names.get(a, a)} and {names.get(b, b)} are no longer suggested for a merge"


def _species(species: str) -> str | None:
    try:
        return normalise_species(species)
    except ValueError as exc:
        raise InvalidInput(f"species '{species}': {exc}", code="invalid_species") from None


def _best_pair(service: Service, species: str, a: int, b: int) -> DuplicatePair:
    """The best-matching photos of two individuals of a species' gallery (their cosine, whatever the threshold)."""
    service.galleries.sync()
    arrays = service.galleries.arrays(species)
    rows = (arrays.individual_ids == a) | (arrays.individual_ids == b)
    for individual in (a, b):
        if not (arrays.individual_ids == individual).any():
            raise NotFound(f"individual {individual} has no searchable {species} photos (it does not exist, is of "
                           "another species, or was merged or deleted)", code="individual_not_in_gallery")
    return duplicate_pairs(arrays.vectors[rows], arrays.individual_ids[rows], arrays.image_ids[rows], -1.0, 1)[0]


def _dismissed_pairs(service: Service, species: str) -> set[tuple[int, int]]:
    """The pairs of individuals (smaller id first) a reviewer said are not the same: the reviews `rejected`
    outside an encounter that name both individuals (`dismiss_suggestion`)."""
    out: set[tuple[int, int]] = set()
    after, page = 0, 10_000
    while True:
        rows = service.store.reviews_of(species, after, page)
        for row in rows:
            if (row["verdict"] == "rejected" and row["encounter"] is None and row["candidate_id"] is not None
                    and row["individual_id"] is not None):
                out.add(tuple(sorted((row["candidate_id"], row["individual_id"]))))
        if len(rows) < page:
            return out
        after = rows[-1]["id"]


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
