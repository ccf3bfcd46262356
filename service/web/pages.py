"""The review app's pages: thin routes over the same service, store and identification flow as the API.

Every answer is a page: errors are shown as a message in words. A form that fails goes back to the
page it was sent from with the message on it; a page that fails shows the message instead.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from reid.errors import ReidError, RequestError
from reid.store import disk_full
from service.deps import LeaseDep, ServiceDep
from service.errors import status_of
from service.forms import parse_strict_form
from service.routers.common import ImageId, IndividualId
from service.schemas import IndividualPatch
from service.web import encounters, views
from service.web.encounters import TOKEN_PATTERN
from service.web.session import (CheckedDep, PostedDep, ReaderDep, Visitor, WriterDep, flash, keep_session,
                                 read_flash, same_origin, sign_in, sign_out, visitor)
from service.web.thumbs import SIZES

log = logging.getLogger("wildreid.web")

HERE = Path(__file__).resolve().parent
templates = Jinja2Templates(directory=HERE / "templates")
PER_PAGE = 50
SUGGESTIONS = 50  # merge suggestions shown per species
Token = Annotated[str, PathParam(pattern=TOKEN_PATTERN, description="an encounter")]
Index = Annotated[int, PathParam(ge=0, le=1000)]


def page(request: Request, name: str, who: Visitor | None, status: int = 200, **context) -> HTMLResponse:
    service = getattr(request.app.state, "service", None)
    settings = request.app.state.settings
    response = templates.TemplateResponse(request, name, {
        "who": who, "flash": read_flash(request), "settings": settings, "ready": service is not None, **context},
        status_code=status)
    keep_session(request, response, who)
    return response


def redirect(request: Request, to: str, who: Visitor | None, message: str | None = None,
             kind: str = "ok") -> RedirectResponse:
    response = RedirectResponse(to, status_code=303)
    waiting = None if message else read_flash(request)  # a redirect shows nothing: its message goes on
    keep_session(request, response, who)
    if message:
        flash(request, response, message, kind)
    elif waiting:  # (a decision in a job's review queue, redirected on through /jobs/N/next)
        flash(request, response, waiting["message"], waiting["kind"])
    return response


def local(target: str | None, default: str = "/") -> str:
    """A path of this server to go to after a form (never another site's address)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    return target


# the router's own answers (no route of this path, or none of this method), in words
HTTP_WORDS = {"Not Found": "there is no page at this address: check it, or go on from Identify or Individuals",
              "Method Not Allowed": "this address does not take that kind of request (method not allowed): go back "
                                    "and use the page's own links and forms"}


def message_of(exc: Exception) -> tuple[int, str]:
    """The status and the words of an error, as the API would answer them."""
    if isinstance(exc, RequestError):
        return status_of(exc), exc.message
    if isinstance(exc, ReidError):
        return 422, str(exc)
    if isinstance(exc, (RequestValidationError, ValidationError)):
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()) if p not in ('body', 'query', 'path'))}: {e['msg']}"
                 for e in exc.errors()]
        return 422, "invalid input: " + "; ".join(parts)
    if isinstance(exc, StarletteHTTPException):
        return exc.status_code, HTTP_WORDS.get(str(exc.detail), str(exc.detail))
    if isinstance(exc, DBAPIError):
        if disk_full(exc):
            return 507, "the disk of the database is full: nothing was written; free disk space and try again"
        return 503, "the database did not complete the request (busy or unreachable); nothing was written, try again"
    return 500, "internal error; nothing more is known here: see the server log"


async def error_page(request: Request, exc: Exception) -> Response:
    status, message = message_of(exc)
    if status == 500:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    try:
        who = await visitor(request, request.app.state.service) if request.app.state.service else None
    except Exception:  # noqa: BLE001 - the page of an error shows even when the store does not answer
        who = None
    code = getattr(exc, "code", None)
    if code in ("sign_in_to_read", "sign_in_to_write"):
        return page(request, "sign_in.html", who, status=401, error=message, next=local(request.url.path))
    referer = request.headers.get("referer")
    if request.method == "POST" and referer and same_origin(request) and status != 500:
        parts = urlsplit(referer)
        back = parts.path + (f"?{parts.query}" if parts.query else "")
        return redirect(request, local(back), who, message, "error")
    return page(request, "error.html", who, status=status, error=message)


class WebRoute(APIRoute):
    """A route whose errors are pages (or messages on the page a form came from), never JSON; its
    multipart text fields are checked against their charset as the API's are."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def web_handler(request: Request) -> Response:
            try:
                await parse_strict_form(request)
                return await handler(request)
            except Exception as exc:  # noqa: BLE001 - every error becomes a page; a refused body is answered
                return await error_page(request, exc)  # by the body-limit middleware instead

        return web_handler


router = APIRouter(route_class=WebRoute, include_in_schema=False)


# ---------------------------------------------------------------------- sign in
@router.get("/sign-in", response_class=HTMLResponse)
async def sign_in_page(request: Request, who: Annotated[Visitor, Depends(visitor)],
                       next: Annotated[str, Query(max_length=2000)] = "/") -> HTMLResponse:
    return page(request, "sign_in.html", who, next=local(next), error=who.problem)


@router.post("/sign-in")
async def sign_in_form(request: Request, service: ServiceDep, who: CheckedDep,
                       key: Annotated[str, Form(max_length=500)] = "",
                       next: Annotated[str, Form(max_length=2000)] = "/") -> Response:
    row = await run_in_threadpool(service.store.authenticate, key.strip()) if key.strip() else None
    if row is None or row["revoked_at"] is not None:
        error = ("type your API key" if not key.strip() else
                 "unknown API key: check it, or ask for one (`reid keys create --store DIR --name NAME`)"
                 if row is None else f"the key '{row['name']}' was revoked at {row['revoked_at']}")
        return page(request, "sign_in.html", who, status=401, error=error, next=local(next))
    response = redirect(request, local(next), None, f"Signed in as {row['name']}")
    sign_in(request, response, key.strip())
    return response


@router.post("/sign-out")
async def sign_out_form(request: Request, who: CheckedDep) -> Response:
    response = redirect(request, "/", None, "Signed out")
    sign_out(request, response)
    return response


# ---------------------------------------------------------------------- identify
@router.get("/", response_class=HTMLResponse)
async def identify_page(request: Request, service: ServiceDep, who: ReaderDep) -> HTMLResponse:
    return page(request, "identify.html", who, species=await run_in_threadpool(views.species_choices, service))


@router.post("/identify")
async def identify_form(request: Request, service: ServiceDep, who: PostedDep, lease: LeaseDep,
                        images: Annotated[list[UploadFile], File()] = [],  # noqa: B006 - FastAPI copies defaults
                        species: Annotated[str, Form(max_length=100)] = "") -> Response:
    encounter = await encounters.identify_encounter(service, images, species, lease, who.key_name)
    return redirect(request, f"/encounters/{encounter['token']}", who)


@router.get("/encounters/{token}", response_class=HTMLResponse)
async def encounter_page(request: Request, token: Token, service: ServiceDep, who: ReaderDep) -> HTMLResponse:
    encounter = await run_in_threadpool(encounters.load, service, token)
    return page(request, "encounter.html", who, encounter=encounter, viewpoints=views.VIEWPOINTS)


@router.get("/encounters/{token}/photos/{index}")
async def encounter_photo(token: Token, index: Index, service: ServiceDep, who: ReaderDep) -> FileResponse:
    path, media_type = await run_in_threadpool(encounters.photo_file, service, token, index)
    return FileResponse(path, media_type=media_type, headers={"Cache-Control": "private, max-age=86400"})


@router.get("/encounters/{token}/crops/{animal}/{view}")
async def encounter_crop(token: Token, animal: Index, view: Index, service: ServiceDep,
                         who: ReaderDep) -> FileResponse:
    path = await run_in_threadpool(encounters.crop_file, service, token, animal, view)
    return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})


@router.post("/encounters/{token}/animals/{index}")
async def decide_form(request: Request, token: Token, index: Index, service: ServiceDep, who: WriterDep,
                      lease: LeaseDep, decision: Annotated[str, Form(max_length=40)],
                      name: Annotated[str, Form(max_length=1000)] = "",
                      viewpoint: Annotated[str, Form(max_length=50)] = "") -> Response:
    action, candidate = encounters.parse_decision(decision)
    message, encounter = await encounters.decide(service, token, index, action, candidate, name, viewpoint,
                                                 who.key_name, lease)
    origin = encounter.get("origin")
    if origin and not encounters.still_to_review(encounter):  # a batch job's photo, done: on to the next one
        return redirect(request, f"/jobs/{origin['job']}/next?after={origin['position']}", who, message)
    return redirect(request, f"/encounters/{token}#animal-{index}", who, message)


@router.post("/encounters/{token}/animals/{index}/more")
async def more_form(request: Request, token: Token, index: Index, service: ServiceDep, who: PostedDep) -> Response:
    shown = await encounters.more_candidates(service, token, index)
    return redirect(request, f"/encounters/{token}#animal-{index}", who, f"Animal {index}: {shown} candidates")


# ---------------------------------------------------------------------- individuals
@router.get("/individuals", response_class=HTMLResponse)
async def individuals_page(request: Request, service: ServiceDep, who: ReaderDep,
                           q: Annotated[str, Query(max_length=200)] = "",
                           species: Annotated[str, Query(max_length=100)] = "",
                           page_number: Annotated[int, Query(alias="page", ge=1, le=1_000_000)] = 1,
                           deleted: bool = False) -> HTMLResponse:
    listing = await run_in_threadpool(views.individual_list, service, q, species, page_number, PER_PAGE, deleted)
    return page(request, "individuals.html", who, **listing)


@router.get("/individuals/new", response_class=HTMLResponse)
async def enroll_page(request: Request, service: ServiceDep, who: ReaderDep) -> HTMLResponse:
    return page(request, "enroll.html", who, species=await run_in_threadpool(views.species_choices, service),
                viewpoints=views.VIEWPOINTS)


@router.post("/individuals/new")
async def enroll_form(request: Request, service: ServiceDep, who: WriterDep, lease: LeaseDep,
                      name: Annotated[str, Form(max_length=1000)] = "",
                      species: Annotated[str, Form(max_length=1000)] = "",
                      images: Annotated[list[UploadFile], File()] = [],  # noqa: B006 - FastAPI copies defaults
                      viewpoint: Annotated[str, Form(max_length=50)] = "",
                      notes: Annotated[str, Form(max_length=20_000)] = "",
                      observed_at: Annotated[str, Form(max_length=1000)] = "",
                      location: Annotated[str, Form(max_length=1000)] = "") -> Response:
    made = await views.enroll(service, name, species, images, viewpoint, notes, observed_at, location, lease,
                              who.key_name)
    return redirect(request, f"/individuals/{made['id']}", who, f"Enrolled {made['name']} (individual {made['id']})")


@router.get("/individuals/{individual_id}", response_class=HTMLResponse)
async def individual_page(request: Request, individual_id: IndividualId, service: ServiceDep,
                          who: ReaderDep) -> HTMLResponse:
    details = await run_in_threadpool(views.individual_details, service, individual_id)
    return page(request, "individual.html", who, **details)


@router.post("/individuals/{individual_id}/rename")
async def rename_form(request: Request, individual_id: IndividualId, service: ServiceDep, who: WriterDep,
                      name: Annotated[str, Form(max_length=1000)] = "",
                      notes: Annotated[str, Form(max_length=20_000)] = "") -> Response:
    patch = IndividualPatch(name=name, notes=notes.replace("\r\n", "\n"))
    await run_in_threadpool(service.store.update_individual, individual_id, who.key_name, patch.name, patch.notes)
    return redirect(request, f"/individuals/{individual_id}", who, f"Saved: {patch.name}")


@router.get("/individuals/{individual_id}/merge", response_class=HTMLResponse)
async def merge_page(request: Request, individual_id: IndividualId, service: ServiceDep, who: ReaderDep,
                     source: Annotated[int, Query(ge=1, le=2**31 - 1)]) -> HTMLResponse:
    target, merged = await run_in_threadpool(views.merge_pair, service, individual_id, source)
    return page(request, "merge.html", who, target=target, source=merged)


@router.post("/individuals/{individual_id}/merge")
async def merge_form(request: Request, individual_id: IndividualId, service: ServiceDep, who: WriterDep,
                     source_id: Annotated[int, Form(ge=1, le=2**31 - 1)]) -> Response:
    result = await run_in_threadpool(service.store.merge, individual_id, source_id, who.key_name)
    await run_in_threadpool(service.after_write)
    return redirect(request, f"/individuals/{individual_id}", who,
                    f"Merged individual {source_id} into {individual_id}: {result['images_moved']} photos moved")


@router.post("/individuals/{individual_id}/delete")
async def delete_form(request: Request, individual_id: IndividualId, service: ServiceDep, who: WriterDep) -> Response:
    await run_in_threadpool(views.set_deleted, service, individual_id, True, who.key_name)
    return redirect(request, f"/individuals/{individual_id}", who,
                    f"Deleted individual {individual_id}: its photos are out of the gallery until it is restored")


@router.post("/individuals/{individual_id}/restore")
async def restore_form(request: Request, individual_id: IndividualId, service: ServiceDep,
                       who: WriterDep) -> Response:
    await run_in_threadpool(views.set_deleted, service, individual_id, False, who.key_name)
    return redirect(request, f"/individuals/{individual_id}", who, f"Restored individual {individual_id}")


# ---------------------------------------------------------------------- merge suggestions
@router.get("/suggestions", response_class=HTMLResponse)
async def suggestions_page(request: Request, service: ServiceDep, who: ReaderDep,
                           species: Annotated[str, Query(max_length=100)] = "") -> HTMLResponse:
    listing = await run_in_threadpool(views.merge_suggestions, service, species, SUGGESTIONS)
    return page(request, "suggestions.html", who, **listing)


@router.post("/suggestions/dismiss")
async def dismiss_form(request: Request, service: ServiceDep, who: WriterDep,
                       species: Annotated[str, Form(max_length=100)],
                       individual_a: Annotated[int, Form(ge=1, le=2**31 - 1)],
                       individual_b: Annotated[int, Form(ge=1, le=2**31 - 1)],
                       back: Annotated[str, Form(max_length=2000)] = "/suggestions") -> Response:
    message = await run_in_threadpool(views.dismiss_suggestion, service, species, individual_a, individual_b,
                                      who.key_name)
    return redirect(request, local(back, "/suggestions"), who, message)


# ---------------------------------------------------------------------- stored photos
@router.get("/photos/{image_id}/thumb")
async def thumbnail(image_id: ImageId, service: ServiceDep, who: ReaderDep,
                    size: Annotated[str, Query(pattern="^(small|large)$")] = "small") -> FileResponse:
    path = await run_in_threadpool(views.thumbnail, service, image_id, SIZES[size])
    return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=604800"})


@router.get("/photos/{image_id}/file")
async def photo(image_id: ImageId, service: ServiceDep, who: ReaderDep) -> FileResponse:
    row = await run_in_threadpool(service.store.get_image, image_id)
    path = await run_in_threadpool(service.image_path, row)
    return FileResponse(path, media_type=row["media_type"], headers={"Cache-Control": "private, max-age=604800"})
