"""Batch jobs of the review app: many photos identified in the background, then reviewed one at a time.

A job's photos are an upload (several files, or one zip, unpacked under STORE/cache/jobs), a folder of
the server under one of `batch_roots`, or the photos an identify-batch results file found doubtful. The
`JobRunner` of each instance takes queued jobs from the store (reid/store/jobs.py: one instance per job)
and identifies each photo as one encounter, with the review app's own flow (service/web/encounters.py):
its animals' verdicts are then given on the encounter's page, the job's review queue leading from one
to the next. Results download as identify-batch's CSV columns or as a Camtrap DP package.
"""
from __future__ import annotations

import asyncio
import io
import logging
import secrets
import shutil
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

import pandas as pd
from fastapi import UploadFile
from starlette.concurrency import run_in_threadpool

from reid.errors import InvalidInput, ReidError, RequestError
from reid.species.batch import IMAGE_SUFFIXES, RESULT_COLUMNS, list_photos, photo_time
from reid.species.camtrap import read_deployments, require_every_camera, valid_utc_offset, write_camtrap_dp
from reid.store.jobs import QUEUED_DECISIONS, Claimed, JobQueue, review_count
from service.core import Service
from service.web import encounters

log = logging.getLogger("wildreid.jobs")

JOB_COLUMNS = RESULT_COLUMNS + ["verdict", "reviewed_by"]
BEAT_S = 10.0
MAX_RESULTS_FILE_BYTES = 64 * 1024 * 1024


def queue_of(service: Service) -> JobQueue:
    return JobQueue(service.store, service.settings.job_stale_s)


def uploads_dir(service: Service) -> Path:
    return service.settings.store_dir / "cache" / "jobs"


# ---------------------------------------------------------------------- creating jobs
def _unpack_zip(archive: zipfile.ZipFile, target: Path, limit: int) -> int:
    """The archive's JPEG and PNG members under `target` (its folders kept, nothing outside `target`);
    returns how many. Refused past `limit` bytes unpacked (a zip bomb)."""
    total, count = 0, 0
    for member in archive.infolist():
        name = PurePosixPath(member.filename.replace("\\", "/"))
        if member.is_dir() or name.suffix.lower() not in IMAGE_SUFFIXES or any(
                part in ("", ".", "..") or part.startswith(".") for part in name.parts) or name.is_absolute():
            continue
        total += member.file_size
        if total > limit:
            raise InvalidInput(f"the zip unpacks to more than {limit // 2**20} MB (max_job_upload_bytes): split it",
                               code="payload_too_large")
        out = target.joinpath(*name.parts)
        out.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(member) as source, open(out, "wb") as sink:
            shutil.copyfileobj(source, sink, 1 << 20)
        count += 1
    return count


def _save_uploads(service: Service, files: list[UploadFile]) -> tuple[Path, str]:
    """The uploaded photos (or the photos of one zip) in a new folder under STORE/cache/jobs; returns it
    and the job's name."""
    root = uploads_dir(service)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        if len(files) == 1 and (files[0].filename or "").lower().endswith(".zip"):
            name = files[0].filename
            try:
                with zipfile.ZipFile(files[0].file) as archive:
                    count = _unpack_zip(archive, staging, service.settings.max_job_upload_bytes)
            except zipfile.BadZipFile:
                raise InvalidInput(f"'{name}' is not a readable zip file", code="invalid_zip") from None
            if not count:
                raise InvalidInput(f"'{name}' holds no JPEG or PNG photos", code="no_images")
        else:
            for index, upload in enumerate(files):
                stem = PurePosixPath((upload.filename or f"photo-{index}").replace("\\", "/")).name
                if PurePosixPath(stem).suffix.lower() not in IMAGE_SUFFIXES:
                    raise InvalidInput(f"'{stem}' is not a JPEG or PNG photo (or give one .zip of photos)",
                                       code="unsupported_media_type")
                with open(staging / f"{index:05d}-{stem}", "wb") as sink:
                    shutil.copyfileobj(upload.file, sink, 1 << 20)
            name = f"{len(files)} uploaded photos" if len(files) > 1 else stem
        folder = root / secrets.token_hex(8)
        staging.rename(folder)
        return folder, name
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def server_folder(service: Service, text: str) -> Path:
    """A folder of this server that jobs may read: under one of `batch_roots`."""
    roots = service.settings.batch_roots
    if not roots:
        raise InvalidInput("this server reads no folders of its own: upload the photos, or start `reid serve` with "
                           "--batch-root DIR", code="folders_not_allowed")
    folder = Path(text.strip()).expanduser()
    if not folder.is_absolute():
        raise InvalidInput(f"'{text}' is not an absolute path of a folder on the server", code="invalid_folder")
    folder = folder.resolve()
    if not any(folder.is_relative_to(root) for root in roots):
        raise InvalidInput(f"'{folder}' is not under a folder this server reads ({', '.join(map(str, roots))})",
                           code="folder_not_allowed")
    if not folder.is_dir():
        raise InvalidInput(f"'{folder}' is not a folder on the server", code="invalid_folder")
    return folder


def create_job(service: Service, files: list[UploadFile], folder: str, results: UploadFile | None,
               species: str | None, review_all: bool, key_name: str | None) -> int:
    """A queued job over uploaded photos, a server folder, or the doubtful photos of a results file."""
    files = [f for f in files if f.filename]
    has_results = results is not None and bool(results.filename)
    if has_results:
        if not folder.strip():
            raise InvalidInput("a results file names photos relative to the folder identify-batch read: give that "
                               "folder", code="folder_required")
        root = server_folder(service, folder)
        return queue_of(service).create(f"review of {results.filename}", str(root),
                                        _doubtful_files(results, root, review_all), species, review_all, key_name)
    if folder.strip():
        if files:
            raise InvalidInput("give photos or a folder, not both", code="photos_and_folder")
        root = server_folder(service, folder)
        name, photo_files = str(root), [photo.file for photo in list_photos(root)]
    elif files:
        root, name = _save_uploads(service, files)
        photo_files = [photo.file for photo in list_photos(root)]
    else:
        raise InvalidInput("choose photos (several, or one zip) or a folder of the server", code="no_images")
    return queue_of(service).create(name, str(root), photo_files, species, review_all, key_name)


def _doubtful_files(results: UploadFile, root: Path, review_all: bool) -> list[str]:
    """The photos of an identify-batch results file with an animal to review (uncertain or new; every
    identified one with `review_all`), each checked to be a photo under `root`."""
    data = results.file.read(MAX_RESULTS_FILE_BYTES + 1)
    if len(data) > MAX_RESULTS_FILE_BYTES:
        raise InvalidInput(f"'{results.filename}' is larger than {MAX_RESULTS_FILE_BYTES // 2**20} MB",
                           code="payload_too_large")
    try:
        table = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise InvalidInput(f"'{results.filename}' is not a CSV file ({exc})", code="invalid_results") from None
    missing = {"file", "decision"} - set(table.columns)
    if missing:
        raise InvalidInput(f"'{results.filename}' lacks the column(s) {', '.join(sorted(missing))}: give the "
                           "results.csv of `reid identify-batch`", code="invalid_results")
    wanted = ("match", *QUEUED_DECISIONS) if review_all else QUEUED_DECISIONS
    files = list(dict.fromkeys(table.loc[table["decision"].isin(wanted), "file"]))
    for file in files:
        path = (root / file).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise InvalidInput(f"'{file}' of {results.filename} is not a photo under {root}: give the folder "
                               "identify-batch read", code="photo_not_found")
    if not files:
        raise InvalidInput(f"'{results.filename}' has no {' or '.join(wanted)} results to review",
                           code="nothing_to_review")
    return files


# ---------------------------------------------------------------------- running jobs
class JobRunner:
    """Takes this instance's share of the queued jobs, one at a time, and identifies their photos."""

    def __init__(self, service: Service):
        self.service, self.queue = service, queue_of(service)
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="wildreid-jobs")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _loop(self) -> None:
        while True:
            try:
                job = await run_in_threadpool(self.queue.claim)
                if job is not None:
                    await self.run(job)
                    continue
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the database away: the job stays claimable, looked for again
                log.exception("batch jobs: looking for or running a job failed")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.service.settings.job_poll_s)
            except asyncio.TimeoutError:
                pass

    async def run(self, job: Claimed) -> None:
        """Identify the job's pending photos in order; a photo that cannot be read fails alone."""
        log.info("batch job %d (%s): %d photos", job.id, job.name, job.total)
        beating = asyncio.get_running_loop().create_task(self._beat(job.id))
        try:
            while not beating.done():
                items = await run_in_threadpool(self.queue.pending, job.id)
                if not items:
                    break
                for item in items:
                    if beating.done():  # cancelled by a person
                        break
                    await self._identify(job, item)
            if not beating.done():
                await run_in_threadpool(self.queue.finish, job.id)
                log.info("batch job %d done", job.id)
        except asyncio.CancelledError:
            raise  # the server stops: the job stays running, and is taken again once its heartbeat is stale
        except Exception as exc:  # noqa: BLE001 - recorded on the job, shown on its page
            log.exception("batch job %d failed", job.id)
            await run_in_threadpool(self.queue.finish, job.id, f"{type(exc).__name__}: {exc}")
        finally:
            beating.cancel()

    async def _beat(self, job_id: int) -> None:
        """Renew the claim every BEAT_S; return (ending the job's run) once it was cancelled."""
        while True:
            await asyncio.sleep(BEAT_S)
            if await run_in_threadpool(self.queue.beat, job_id) != "running":
                return

    async def _identify(self, job: Claimed, item: dict) -> None:
        path = Path(job.folder) / item["file"]
        lease = self.service.decode_budget.lease()
        try:
            data = await run_in_threadpool(path.read_bytes)
            upload = UploadFile(io.BytesIO(data), size=len(data), filename=path.name)
            encounter = await encounters.identify_encounter(
                self.service, [upload], job.species, lease, job.key_name,
                origin={"job": job.id, "item": item["id"], "position": item["position"],
                        "review_all": job.review_all})
        except (OSError, RequestError, ReidError) as exc:
            message = exc.message if isinstance(exc, RequestError) else str(exc)
            await run_in_threadpool(self.queue.item_done, item["id"], None, [], 0, message)
            return
        finally:
            lease.close()
        decisions = [animal["decision"] for animal in encounter["animals"]]
        await run_in_threadpool(self.queue.item_done, item["id"], encounter["token"], decisions,
                                review_count(decisions, job.review_all))


# ---------------------------------------------------------------------- results
def results_table(service: Service, job_id: int) -> tuple[pd.DataFrame, Path, str | None]:
    """The job's results, one row per animal (or per photo without one), in identify-batch's columns
    plus the reviewers' verdicts; the folder its photos are in; and the UTC offset their EXIF agrees on
    (None when it names none, or several)."""
    queue = queue_of(service)
    job = queue.get(job_id)
    folder = Path(job["folder"])
    rows, offsets, after = [], set(), -1
    while batch := queue.items(job_id, after):
        after = batch[-1]["position"]
        for item in batch:
            item_rows, offset = _item_rows(service, folder, item)
            rows += item_rows
            offsets.add(offset)
    offsets.discard(None)
    return pd.DataFrame(rows, columns=JOB_COLUMNS), folder, offsets.pop() if len(offsets) == 1 else None


def _item_rows(service: Service, folder: Path, item: dict) -> tuple[list[dict], str | None]:
    """One photo's rows, and the UTC offset its EXIF names."""
    file = item["file"]
    stamp, source, offset = photo_time(folder / file) if (folder / file).is_file() else ("", "", None)
    base = {c: "" for c in JOB_COLUMNS} | {"file": file, "detection": -1, "camera": PurePosixPath(file).parent.as_posix()
                                           if "/" in file else folder.name, "datetime": stamp,
                                           "datetime_source": source, "encounter": file}
    if item["state"] != "done":
        return [{**base, "decision": "failed" if item["state"] == "failed" else "pending",
                 "note": item["error"] or ""}], offset
    encounter = encounters.load(service, item["encounter"])
    photo = encounter["photos"][0]
    if not encounter["animals"]:
        return [{**base, "decision": photo["outcome"]}], offset
    rows = []
    for animal in encounter["animals"]:
        view = animal["views"][0]
        box = view["box"] or (0.0, 0.0, 1.0, 1.0)
        top = animal["candidates"][0] if animal["candidates"] else None
        verdict = animal["verdict"] or {}
        decision, individual, note = animal["decision"], top, animal["note"] or ""
        if verdict.get("verdict") in ("confirmed", "new"):
            decision = "match"  # a person named the individual
            individual = {"individual_id": verdict["individual_id"], "name": verdict["name"], "score": "",
                          "viewpoint": ""}
            if verdict["verdict"] == "confirmed" and top and top["individual_id"] == verdict["individual_id"]:
                individual = top
        rows.append({**base, "detection": animal["index"], "category": "animal",
                     "conf": view["conf"] if view["conf"] is not None else "",
                     "x": box[0], "y": box[1], "w": box[2], "h": box[3], "species": animal["species"] or "",
                     "species_score": animal["species_score"] if animal["species_score"] is not None else "",
                     "individual_id": individual["individual_id"] if individual and decision != "new" else "",
                     "individual_name": individual["name"] if individual and decision != "new" else "",
                     "score": individual.get("score", "") if individual and decision != "new" else "",
                     "matched_viewpoint": individual.get("viewpoint") or "" if individual else "",
                     "decision": decision, "model": animal["model"] or "", "note": note,
                     "verdict": verdict.get("verdict", ""), "reviewed_by": verdict.get("key_name") or ""})
    return rows, offset


def camtrap_zip(service: Service, job_id: int, utc_offset: str, deployments: UploadFile | None) -> Path:
    """The job's results as a Camtrap DP package, zipped (a temporary file the caller removes). Camtrap DP
    timestamps need the cameras' `utc_offset` (else the photos' EXIF one), and deployments their
    coordinates: `deployments` is the user's CSV (deploymentID = camera folder, latitude, longitude)."""
    utc_offset = utc_offset.strip() or None
    if utc_offset is not None and not valid_utc_offset(utc_offset):
        raise InvalidInput(f"UTC offset '{utc_offset}': write it as +HH:MM or -HH:MM, e.g. +02:00",
                           code="invalid_utc_offset")
    results, folder, exif_offset = results_table(service, job_id)
    results = results[results["decision"] != "pending"]
    utc_offset = utc_offset or exif_offset
    scratch = Path(tempfile.mkdtemp(prefix="wildreid-camtrap-"))
    try:
        supplied = None
        if deployments is not None and deployments.filename:
            supplied = scratch / "deployments.csv"
            with open(supplied, "wb") as sink:
                shutil.copyfileobj(deployments.file, sink, 1 << 20)
            try:
                require_every_camera(read_deployments(supplied), set(results["camera"]), deployments.filename)
            except ReidError as exc:  # its words name the command line's flag and the temporary copy
                raise InvalidInput(str(exc).replace(f"--deployments '{supplied}'", f"'{deployments.filename}'"),
                                   code="invalid_deployments") from None
        package = write_camtrap_dp(scratch / "package", results, folder, utc_offset, deployments=supplied,
                                   identity=f"wildreid job {job_id}")
        target = Path(tempfile.mkstemp(prefix=f"job-{job_id}-", suffix=".zip")[1])
        with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in package.paths:
                archive.write(path, path.name)
        return target
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
