"""Liveness, readiness, Prometheus metrics and the audit log."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from service.deps import ServiceDep, WriterDep, authenticate, get_service, optional_scheme, read_scheme
from service.forms import StrictRoute
from service.routers.common import errors
from service.schemas import MAX_ID, AuditEntry, Health, Ready, ReadyBrief

router = APIRouter(tags=["operations"], route_class=StrictRoute)

try:
    VERSION = version("wildreid")
except PackageNotFoundError:  # running from a source tree
    VERSION = "0+unknown"


@router.get("/health", response_model=Health, summary="Liveness: the process answers")
async def health() -> Health:
    return Health(status="ok", version=VERSION)


@router.get("/ready", response_model=Ready | ReadyBrief,
            responses={503: {"model": Ready | ReadyBrief}, **errors(401, 403)},
            summary="Readiness: model loaded, database reachable, galleries in step with it")
async def ready(request: Request, service: ServiceDep, _doc=Depends(optional_scheme)) -> Response:
    """With `require_key_for_reads`, only the status is answered without a key: the models, paths, species
    and gallery sizes need one."""
    details = (await authenticate(request, service, required=False)).key_id is not None \
        or not service.settings.require_key_for_reads

    def check() -> tuple[bool, int, list[str]]:
        problems = []
        ok = service.store.ping()
        seq = -1
        if ok:
            try:
                service.galleries.sync()
                seq = service.galleries.seq
            except Exception as exc:  # noqa: BLE001 - reported, not raised
                ok = False
                problems.append(f"gallery sync failed: {exc}")
        else:
            problems.append("the database does not answer")
        if not service.models.alive():
            ok = False
            problems.append("a model worker is not running")
        return ok, seq, problems

    ok, seq, problems = await run_in_threadpool(check)
    status, code = ("ready", 200) if ok else ("not ready", 503)
    if not details:
        return JSONResponse(ReadyBrief(status=status).model_dump(), status_code=code)
    corrupt = service.integrity.corrupt()
    if corrupt:
        shown = "; ".join(f"{path}: {problem}" for path, problem in sorted(corrupt.items())[:5])
        problems.append(f"{len(corrupt)} stored image files are corrupt or missing ({shown}"
                        f"{'; ...' if len(corrupt) > 5 else ''}): upload those photos again to replace them")
    body = Ready(status=status, **service.models.describe(),
                 database=service.store.engine.url.render_as_string(hide_password=True), change_seq=seq,
                 galleries=service.galleries.sizes(), foreign_images=service.galleries.foreign,
                 corrupt_files=len(corrupt), warnings=service.warnings + problems)
    return JSONResponse(body.model_dump(), status_code=code)


@router.get("/metrics", response_class=Response, responses=errors(401, 403, 503),
            summary="Prometheus metrics (they need a key with require_key_for_reads)")
async def metrics(request: Request, _doc=Depends(read_scheme)) -> Response:
    service = getattr(request.app.state, "service", None)
    if request.app.state.settings.require_key_for_reads:
        await authenticate(request, await get_service(request), required=True)
    sizes = service.galleries.sizes() if service else {}
    seq = service.galleries.seq if service else -1
    return Response(request.app.state.metrics.render(sizes, seq), media_type="text/plain; version=0.0.4")


@router.get("/v1/audit", response_model=list[AuditEntry], responses=errors(401, 403, 422),
            summary="The audit log, newest first (needs a key)")
async def audit(service: ServiceDep, caller: WriterDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0) -> list[AuditEntry]:
    return [AuditEntry(**row) for row in await run_in_threadpool(service.store.audit_entries, limit, offset)]
