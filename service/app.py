"""The FastAPI app: `create_app(settings)`; its lifespan opens the store and the model.

    uvicorn --factory service.app:create_app_from_env     # settings from WILDREID_SERVICE_SETTINGS
    reid serve --store DIR --checkpoint CKPT              # the usual way (service/commands.py)
"""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import anyio

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from sqlalchemy.exc import DBAPIError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from reid.errors import ReidError
from service.core import Service
from service.errors import ApiError
from service.metrics import Metrics
from service.middleware import BodyLimitMiddleware, MetricsMiddleware
from service.routers import health, identify, images, individuals
from service.routers.health import VERSION
from service.settings import Settings

log = logging.getLogger("wildreid.service")

HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 406: "not_acceptable",
              413: "payload_too_large", 415: "unsupported_media_type"}

DESCRIPTION = """Re-identification of individual animals: enroll photos of known individuals, identify new photos.

Writes need `Authorization: Bearer KEY` (create a key with `reid keys create --store DIR --name NAME`);
reads need it too when the server runs with `require_key_for_reads`. Errors are
`{"error": {"code": ..., "message": ...}}` with a 4xx status.
"""


def error_response(status: int, code: str, message: str, details=None, headers=None) -> JSONResponse:
    body = {"error": {"code": code, "message": message}}
    if details is not None:
        body["error"]["details"] = details
    return JSONResponse(body, status_code=status, headers=headers)


def _location(loc) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(exc.status, exc.code, exc.message, exc.details, headers)

    @app.exception_handler(ReidError)
    async def reid_error(request: Request, exc: ReidError):
        return error_response(422, "invalid_input", str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        details = []
        for error in exc.errors():
            message = error.get("msg", "invalid")
            if error.get("type") == "extra_forbidden":
                message = "unknown field (not part of this request)"
            details.append({"field": _location(error.get("loc", ())), "message": message,
                            "type": error.get("type")})
        summary = "; ".join(f"{d['field']}: {d['message']}" for d in details)
        return error_response(422, "validation_error", f"invalid request: {summary}", details)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = HTTP_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in message:
            message = "the request body is not valid multipart/form-data (or not what this endpoint takes)"
        return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(DBAPIError)
    async def database_error(request: Request, exc: DBAPIError):
        # nothing was committed: every write is one transaction
        log.error("database error on %s %s: %s", request.method, request.url.path, exc.orig)
        return error_response(503, "database_unavailable", "the database did not complete the request (busy or "
                                                            "unreachable); nothing was written, try again",
                              headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal error; see the server log")


def create_app(settings: Settings) -> FastAPI:
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.threadpool_size:
            anyio.to_thread.current_default_thread_limiter().total_tokens = settings.threadpool_size
        service = await run_in_threadpool(Service.open, settings, metrics)
        app.state.service = service
        try:
            yield
        finally:
            app.state.service = None
            await run_in_threadpool(service.close)

    # Swagger UI and ReDoc from the fastapi-offline package's own copies, not a CDN: the docs pages work on an
    # offline field laptop or an air-gapped server
    app = FastAPIOffline(title="wildreid", version=VERSION, description=DESCRIPTION, lifespan=lifespan,
                         docs_url="/docs", redoc_url="/redoc", openapi_url="/openapi.json", static_url="/docs-assets")
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.service = None
    install_error_handlers(app)
    for router in (identify.router, individuals.router, images.router, health.router):
        app.include_router(router)
    # added last = outermost: metrics see every answer, the 413s of the body limit included
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def create_app_from_env() -> FastAPI:
    """The app of the settings in WILDREID_SERVICE_SETTINGS (for uvicorn workers: `--factory`)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return create_app(Settings.from_env())
