"""The review app's batch job pages: start a job, follow its progress, work through its review queue,
download its results. Thin routes over service/web/jobs.py."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse, Response
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from reid.store.jobs import MAX_JOB_PHOTOS
from service.deps import ServiceDep
from service.web import jobs, views
from service.web.pages import WebRoute, page, redirect
from service.web.session import PostedDep, ReaderDep, WriterDep

router = APIRouter(route_class=WebRoute, include_in_schema=False)
JobId = Annotated[int, PathParam(ge=1, le=2**31 - 1, description="a batch job")]


@router.get("/jobs", response_class=HTMLResponse)
async def jobs_page(request: Request, service: ServiceDep, who: ReaderDep) -> HTMLResponse:
    listed = await run_in_threadpool(jobs.queue_of(service).list)
    return page(request, "jobs.html", who, jobs=listed, max_photos=MAX_JOB_PHOTOS,
                species=await run_in_threadpool(views.species_choices, service))


@router.post("/jobs")
async def create_job_form(request: Request, service: ServiceDep, who: WriterDep,
                          images: Annotated[list[UploadFile], File()] = [],  # noqa: B006 - FastAPI copies defaults
                          results: Annotated[UploadFile | None, File()] = None,
                          folder: Annotated[str, Form(max_length=4000)] = "",
                          species: Annotated[str, Form(max_length=100)] = "",
                          review_all: Annotated[bool, Form()] = False) -> Response:
    wanted = species.strip() or None
    if wanted is not None:
        await service.require_known_species(wanted)
    job_id = await run_in_threadpool(jobs.create_job, service, images, folder, results, wanted, review_all,
                                     who.key_name)
    request.app.state.jobs.wake()
    return redirect(request, f"/jobs/{job_id}", who, f"Job {job_id} queued")


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
async def job_page(request: Request, job_id: JobId, service: ServiceDep, who: ReaderDep) -> HTMLResponse:
    job = await run_in_threadpool(jobs.queue_of(service).get, job_id)
    failed = [item for item in await run_in_threadpool(jobs.queue_of(service).items, job_id)
              if item["state"] == "failed"][:50] if job["failed"] else []
    return page(request, "job.html", who, job=job, failed=failed)


@router.get("/jobs/{job_id}/next")
async def next_to_review(request: Request, job_id: JobId, service: ServiceDep, who: ReaderDep,
                         after: Annotated[int, Query(ge=-1, le=2**31 - 1)] = -1) -> Response:
    """The next photo of the job's review queue (after the one just reviewed), or the job's page when none is left."""
    queue = jobs.queue_of(service)
    job = await run_in_threadpool(queue.get, job_id)
    item = await run_in_threadpool(queue.next_to_review, job_id, after)
    if item is None:
        still = "; photos are still being identified" if job["state"] in ("queued", "running") else ""
        return redirect(request, f"/jobs/{job_id}", who, f"Nothing left to review in job {job_id}{still}")
    return redirect(request, f"/encounters/{item['encounter']}", who)


@router.post("/jobs/{job_id}/cancel")
async def cancel_job_form(request: Request, job_id: JobId, service: ServiceDep, who: WriterDep) -> Response:
    await run_in_threadpool(jobs.queue_of(service).cancel, job_id, who.key_name)
    return redirect(request, f"/jobs/{job_id}", who, f"Job {job_id} cancelled: the photos identified so far stay")


@router.get("/jobs/{job_id}/results.csv")
async def job_results_csv(job_id: JobId, service: ServiceDep, who: ReaderDep) -> Response:
    table, _, _ = await run_in_threadpool(jobs.results_table, service, job_id)
    return Response(table.to_csv(index=False), media_type="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="job-{job_id}-results.csv"'})


@router.post("/jobs/{job_id}/camtrap-dp.zip")
async def job_camtrap_dp(job_id: JobId, service: ServiceDep, who: PostedDep,
                         utc_offset: Annotated[str, Form(max_length=10)] = "",
                         deployments: Annotated[UploadFile | None, File()] = None) -> FileResponse:
    path = await run_in_threadpool(jobs.camtrap_zip, service, job_id, utc_offset, deployments)
    return FileResponse(path, media_type="application/zip", filename=f"job-{job_id}-camtrap-dp.zip",
                        background=BackgroundTask(path.unlink, missing_ok=True))
