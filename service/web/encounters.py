"""Identification as the review app does it: an encounter's photos identified by the API's own flow,
kept on disk until a person has decided on each animal, and each decision carried out by the same
service code as the API's enroll and add-sighting (and stored as a review).

An encounter lives in STORE/cache/encounters/TOKEN: its photos as uploaded, each animal's crops and
query embeddings, and encounter.json (the animals, their candidates and the verdicts so far). The
photos are needed again when a verdict stores them; the embeddings let "more candidates" search again
without the model. Encounters are dropped after `KEEP_DAYS`, except those of batch jobs.
"""
from __future__ import annotations

import asyncio
import io
import json
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from fastapi import UploadFile
from PIL import Image
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from reid.errors import Conflict, InvalidInput, NotFound
from reid.identify.animals import Animal, plan_viewpoints
from reid.store import Review
from reid.store.jobs import JobQueue, review_count
from reid.store.database import now_iso
from service.budget import Lease
from service.core import Service
from service.schemas import EnrollForm, IdentifyForm
from service.web.thumbs import write_jpeg

KEEP_DAYS = 7
CROP_PX = 480
TOKEN_PATTERN = r"^[A-Za-z0-9_-]{16,64}$"
JOB_MARK = "job"  # a file in the folder of a batch job's encounter: kept as long as the job
VERDICTS = {"confirm": "confirmed", "new": "new", "reject": "rejected", "skip": "skipped"}


def encounters_dir(service: Service) -> Path:
    return service.settings.store_dir / "cache" / "encounters"


def write_json(data: dict, target: Path) -> None:
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(handle, "w") as out:
            json.dump(data, out)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load(service: Service, token: str) -> dict:
    path = encounters_dir(service) / token / "encounter.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(f"there is no encounter '{token}' (encounters are kept {KEEP_DAYS} days): upload its photos "
                       "again", code="encounter_not_found") from None


def photo_file(service: Service, token: str, index: int) -> tuple[Path, str]:
    """A photo of an encounter as uploaded, and its media type."""
    encounter = load(service, token)
    if not 0 <= index < len(encounter["photos"]):
        raise NotFound(f"encounter '{token}' has no photo {index}", code="photo_not_found")
    photo = encounter["photos"][index]
    return encounters_dir(service) / token / photo["file"], photo["media_type"]


def crop_file(service: Service, token: str, animal: int, view: int) -> Path:
    path = encounters_dir(service) / token / f"crop-{animal}-{view}.jpg"
    if not path.is_file():
        raise NotFound(f"encounter '{token}' has no crop {animal}-{view}", code="crop_not_found")
    return path


def drop_old(root: Path, now: float) -> None:
    """Remove encounters older than KEEP_DAYS, but never a batch job's (its review queue leads to them)."""
    for folder in root.iterdir() if root.is_dir() else ():
        if folder.is_dir() and now - folder.stat().st_mtime > KEEP_DAYS * 86400 and not (folder / JOB_MARK).exists():
            shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------- identify
async def identify_encounter(service: Service, files: list[UploadFile], species: str | None, lease: Lease,
                             key_name: str | None, origin: dict | None = None) -> dict:
    """Identify the photos of one encounter as POST /v1/identify does; keep them as an encounter and return it
    (as encounter.json holds it, its `token` included). `origin` is the batch job photo it is
    (service/web/jobs.py), whose review queue its verdicts update."""
    files = [f for f in files if f.filename]  # a file input left empty sends one nameless, empty part
    if not files:
        raise InvalidInput("choose at least one photo of the encounter", code="no_images")
    try:
        form = IdentifyForm(images=files, species=(species or "").strip() or None)
    except ValidationError as exc:
        raise InvalidInput("the species may hold letters, digits, spaces, '_', '.' and '-' only "
                           f"({exc.errors()[0]['msg']})", code="invalid_species") from None
    if form.species is not None:
        await service.require_known_species(form.species)
    top_k = service.settings.default_top_k
    found = await service.find(form.images, [], [], multi_animal=True, species=form.species, lease=lease)
    await service.classify(found)
    models = [service.identifiable(animal) for animal in found.animals]
    searched = [(i, animal, model) for i, (animal, model) in enumerate(zip(found.animals, models)) if model]
    vectors = await asyncio.gather(*(service.embed(model, animal.views) for _, animal, model in searched))
    results = iter(await run_in_threadpool(service.search, [(a, m, v) for (_, a, m), v in zip(searched, vectors)],
                                           top_k))
    queries = dict(zip((i for i, _, _ in searched), vectors))
    animals = []
    for index, (animal, model) in enumerate(zip(found.animals, models)):
        result = next(results) if model is not None else {"decision": "species-only", "best_score": None,
                                                         "candidates": [], "gallery_size": 0}
        animals.append({
            "index": index, "species": animal.species, "species_source": animal.species_source,
            "species_score": animal.species_score, "detector": animal.source,
            "views": [{"image": v.image, "box": list(v.box) if v.box else None, "conf": v.conf} for v in animal.views],
            "decision": result["decision"], "best_score": result["best_score"], "model": result.get("model"),
            "thresholds": result.get("thresholds"), "gallery_size": result["gallery_size"],
            "candidates": result["candidates"], "top_k": top_k, "note": service.species_only_reason(animal),
            "rejected": [], "verdict": None})
    encounter = {"created_at": now_iso(), "key_name": key_name, "species": form.species, "animals": animals,
                 "origin": origin,
                 "photos": [{"index": p.index, "filename": p.filename, "outcome": p.outcome, "animals": p.animals,
                             "humans": p.humans, "vehicles": p.vehicles, "sha256": u.sha256,
                             "media_type": u.media_type, "width": u.width, "height": u.height,
                             "file": f"photo-{p.index}{Path(u.relpath).suffix}"}
                            for p, u in zip(found.photos, found.uploads)]}
    crops = [[view.crop for view in animal.views] for animal in found.animals]
    return await run_in_threadpool(_save, service, encounter, [u.data for u in found.uploads], crops, queries)


def _save(service: Service, encounter: dict, photos: list[bytes], crops: list[list[np.ndarray]],
          queries: dict[int, np.ndarray]) -> dict:
    """Write an encounter's folder whole under a temporary name, then rename it into place; returns the
    encounter with its token."""
    root = encounters_dir(service)
    root.mkdir(parents=True, exist_ok=True)
    drop_old(root, time.time())
    token = secrets.token_urlsafe(18)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        for photo, data in zip(encounter["photos"], photos):
            (staging / photo["file"]).write_bytes(data)
        for a, views in enumerate(crops):
            for v, crop in enumerate(views):
                image = Image.fromarray(np.ascontiguousarray(crop))
                image.thumbnail((CROP_PX, CROP_PX))
                write_jpeg(image, staging / f"crop-{a}-{v}.jpg", quality=88)
        for a, vectors in queries.items():
            np.save(staging / f"query-{a}.npy", np.asarray(vectors, dtype=np.float32))
        if encounter.get("origin"):
            (staging / JOB_MARK).write_text(str(encounter["origin"]["job"]))
        encounter = {**encounter, "token": token}
        write_json(encounter, staging / "encounter.json")
        staging.rename(root / token)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return encounter


async def more_candidates(service: Service, token: str, index: int) -> int:
    """Search the animal's stored query again for the next page of candidates; returns how many it has now."""
    async with _lock(token):
        encounter = load(service, token)
        animal = _animal(encounter, token, index)
        model = service.require_model(animal["species"]) if animal["model"] else None
        if model is None:
            raise Conflict(f"animal {index} was not identified ({animal['note']}): it has no candidates",
                           code="not_identified")
        top_k = min(animal["top_k"] + service.settings.default_top_k, service.settings.max_top_k)
        if top_k == animal["top_k"]:
            raise InvalidInput(f"animal {index} shows {top_k} candidates already, the most this server answers "
                               "(max_top_k)", code="top_k_too_large")
        vectors = np.load(encounters_dir(service) / token / f"query-{index}.npy")
        query = Animal([], animal["detector"], species=animal["species"])
        (result,) = await run_in_threadpool(service.search, [(query, model, vectors)], top_k)
        animal.update(top_k=top_k, candidates=result["candidates"], gallery_size=result["gallery_size"])
        await run_in_threadpool(write_json, encounter, encounters_dir(service) / token / "encounter.json")
        return len(animal["candidates"])


# ---------------------------------------------------------------------- verdicts
_locks: dict[str, asyncio.Lock] = {}


def _lock(token: str) -> asyncio.Lock:
    """One decision at a time per encounter (in this process): a double-clicked confirm stores one sighting."""
    if len(_locks) > 1000:
        for stale in [t for t, lock in _locks.items() if not lock.locked()]:
            del _locks[stale]
    return _locks.setdefault(token, asyncio.Lock())


def _animal(encounter: dict, token: str, index: int) -> dict:
    if not 0 <= index < len(encounter["animals"]):
        raise NotFound(f"encounter '{token}' has no animal {index}", code="animal_not_found")
    return encounter["animals"][index]


def _candidate(animal: dict, candidate_id: int | None) -> dict:
    if candidate_id is None:
        raise InvalidInput("choose the candidate this verdict is about", code="candidate_required")
    for candidate in animal["candidates"]:
        if candidate["individual_id"] == candidate_id:
            return candidate
    raise InvalidInput(f"individual {candidate_id} is not a candidate of animal {animal['index']}",
                       code="not_a_candidate")


def _uploads(service: Service, token: str, encounter: dict, animal: dict) -> tuple[list[UploadFile], list[str]]:
    """The animal's photos as uploads again, with its box in each (none when it was seen whole)."""
    files, boxes = [], []
    for view in animal["views"]:
        photo = encounter["photos"][view["image"]]
        data = (encounters_dir(service) / token / photo["file"]).read_bytes()
        files.append(UploadFile(io.BytesIO(data), size=len(data), filename=photo["filename"] or photo["file"]))
        boxes.append(",".join(f"{v:.6g}" for v in view["box"] or (0.0, 0.0, 1.0, 1.0)))
    if all(view["box"] is None for view in animal["views"]):
        boxes = []
    return files, boxes


def parse_decision(text: str) -> tuple[str, int | None]:
    """A form's decision: 'confirm:ID' or 'reject:ID' (a candidate individual), 'new' or 'skip'."""
    action, _, candidate = text.partition(":")
    if not candidate:
        return action, None
    if not candidate.isdigit() or not 1 <= int(candidate) < 2**31:
        raise InvalidInput(f"'{candidate}' is not an individual id", code="invalid_candidate")
    return action, int(candidate)


async def decide(service: Service, token: str, index: int, action: str, candidate_id: int | None, name: str,
                 viewpoint: str, key_name: str, lease: Lease) -> tuple[str, dict]:
    """Carry out a reviewer's verdict on one animal and store it as a review; returns what was done, in words,
    and the encounter as it stands now.

    confirm: its photos become a sighting of the candidate (the API's add-sighting); new: they are enrolled as
    a new individual named `name` (the API's enroll); reject: the candidate is not it (the animal stays open);
    skip: no verdict on it."""
    if action not in VERDICTS:
        raise InvalidInput(f"unknown action '{action}': one of {', '.join(VERDICTS)}", code="invalid_action")
    async with _lock(token):
        encounter = load(service, token)
        animal = _animal(encounter, token, index)
        done = animal["verdict"]
        if done is not None:
            raise Conflict(f"animal {index} was reviewed already ({done['verdict']} by {done['key_name']} at "
                           f"{done['at']})", code="already_reviewed")
        if action != "skip" and animal["model"] is None:
            raise Conflict(f"animal {index} was not identified ({animal['note']}): it can only be skipped",
                           code="not_identified")
        top = animal["candidates"][0] if animal["candidates"] else None
        candidate = _candidate(animal, candidate_id) if action in ("confirm", "reject") else top
        if action == "reject" and candidate["individual_id"] in animal["rejected"]:
            raise Conflict(f"{candidate['name']} was rejected for animal {index} already", code="already_rejected")
        image_ids, individual_id, message = [], None, ""
        if action in ("confirm", "new"):
            files, boxes = _uploads(service, token, encounter, animal)
            if action == "new":
                name = _new_name(name, animal["species"], files)
            viewpoints = plan_viewpoints([viewpoint] if viewpoint.strip() else [], len(files))
            found, views, vectors, model = await service.embed_individual(animal["species"], files, boxes, [], lease)
            if action == "confirm":
                individual_id = candidate["individual_id"]
                result = await run_in_threadpool(service.add_sighting, individual_id, found, views, vectors,
                                                 viewpoints, model, key_name, "", None, None)
                message = f"Confirmed: the photos are now sighting {result['sighting_id']} of {candidate['name']}"
            else:
                result = await run_in_threadpool(service.enroll, name, animal["species"], found, views, vectors,
                                                 viewpoints, model, key_name, "", None, None)
                individual_id = result["individual_id"]
                message = f"Enrolled {name} (individual {individual_id}), a new {animal['species']}"
            image_ids = result["image_ids"]
        elif action == "reject":
            message = f"Rejected: {candidate['name']} is not animal {index}"
        else:
            message = f"Skipped animal {index}"
        review = _review(encounter, token, animal, VERDICTS[action], candidate, individual_id, image_ids)
        review_id = await run_in_threadpool(service.store.record_review, review, key_name)
        if action == "reject":
            animal["rejected"].append(candidate["individual_id"])
        else:
            animal["verdict"] = {"verdict": VERDICTS[action], "key_name": key_name, "at": now_iso(),
                                 "individual_id": individual_id, "name": name if action == "new" else
                                 candidate["name"] if action == "confirm" else None, "review_id": review_id}
        await run_in_threadpool(write_json, encounter, encounters_dir(service) / token / "encounter.json")
        if encounter.get("origin"):
            await run_in_threadpool(JobQueue(service.store).set_to_review, encounter["origin"]["item"],
                                    still_to_review(encounter))
        return message, encounter


def still_to_review(encounter: dict) -> int:
    """How many animals of a batch job's encounter are in the job's review queue and undecided."""
    review_all = encounter["origin"]["review_all"]
    return sum(animal["verdict"] is None for animal in encounter["animals"]
               if review_count([animal["decision"]], review_all))


def _new_name(name: str, species: str, files: list[UploadFile]) -> str:
    """The name of a new individual, checked as the API's enroll form checks it."""
    if not name.strip():
        raise InvalidInput("type the name of the new individual", code="name_required")
    try:
        return EnrollForm(name=name, species=species, images=files).name
    except ValidationError as exc:
        raise InvalidInput(f"the name is not usable: {exc.errors()[0]['msg']} (one line of at most 200 "
                           "characters)", code="invalid_name") from None


def _review(encounter: dict, token: str, animal: dict, verdict: str, candidate: dict | None,
            individual_id: int | None, image_ids: list[int]) -> Review:
    thresholds = animal["thresholds"] or {}
    return Review(
        species=animal["species"] or "", verdict=verdict,
        query_sha256=[encounter["photos"][view["image"]]["sha256"] for view in animal["views"]],
        image_ids=image_ids, encounter=token, animal_index=animal["index"],
        candidate_id=candidate["individual_id"] if candidate else None,
        candidate_rank=candidate["rank"] if candidate else None,
        score=candidate["score"] if candidate else None, cosine=candidate["cosine"] if candidate else None,
        best_score=animal["best_score"], decision=animal["decision"], individual_id=individual_id,
        model=animal["model"], match_threshold=thresholds.get("match_threshold"),
        new_threshold=thresholds.get("new_threshold"), thresholds_source=thresholds.get("source"))
