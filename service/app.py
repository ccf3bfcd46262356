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
from starlette.routing import Match

from reid.errors import ReidError, RequestError
from service.core import Service
from service.errors import status_of
from service.metrics import Metrics
from service.middleware import BodyLimitMiddleware, MetricsMiddleware
from service.routers import health, identify, images, individuals
from service.routers.health import VERSION
from service.settings import Settings
from service import web
from service.web.pages import error_page
from reid.store import disk_full

log = logging.getLogger("wildreid.service")

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 406: "not_acceptable",
              408: "request_timeout", 413: "payload_too_large", 415: "unsupported_media_type"}

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


def unparseable_body_message(content_type: str | None) -> str:
    if content_type and "json" in content_type.lower():
        return ("the request body is not usable JSON (malformed, not UTF-8, nested too deeply or holding a number "
                "too long)")
    return f"the request body could not be parsed as {content_type or 'a body without a Content-Type'}"


def allowed_methods(app: FastAPI, scope) -> list[str]:
    """Every method some route of this path takes (Starlette's 405 names only those of the first route
    whose path matches): each method is tried against the app's routes."""
    return [method for method in METHODS
            if any(route.matches({**scope, "method": method})[0] is Match.FULL for route in app.router.routes)]


def install_error_handlers(app: FastAPI) -> None:
    def handler(kind: type[Exception]):
        """Register the JSON answer to errors of `kind`; a browser's request for a page of the review app
        (not an API path: web.wants_page) gets the app's error page instead, the message in words."""
        def register(json_answer):
            async def answer(request: Request, exc: Exception):
                if web.wants_page(request.scope):
                    response = await error_page(request, exc)
                    if response.status_code == 405:
                        response.headers["Allow"] = ", ".join(allowed_methods(request.app, request.scope))
                    return response
                return await json_answer(request, exc)

            app.add_exception_handler(kind, answer)
            return json_answer

        return register

    @handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        status = status_of(exc)
        headers = {401: {"WWW-Authenticate": "Bearer"}, 503: {"Retry-After": "1"}}.get(status)
        return error_response(status, exc.code, exc.message, exc.details, headers)

    @handler(ReidError)
    async def reid_error(request: Request, exc: ReidError):
        return error_response(422, "invalid_input", str(exc))

    @handler(RequestValidationError)
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

    @handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = HTTP_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 400 and "parsing the body" in message:
            message = unparseable_body_message(request.headers.get("content-type"))
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(request.app, request.scope))
        return error_response(exc.status_code, code, message, headers=headers or None)

    @handler(DBAPIError)
    async def database_error(request: Request, exc: DBAPIError):
        # nothing was committed: every write is one transaction
        log.error("database error on %s %s: %s", request.method, request.url.path, exc.orig)
        if disk_full(exc):
            return error_response(507, "disk_full", "the disk of the database is full: nothing was written; free "
                                                    "disk space and send the request again")
        return error_response(503, "database_unavailable", "the database did not complete the request (busy or "
                                                            "unreachable); nothing was written, try again",
                              headers={"Retry-After": "1"})

    @handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        # uvicorn closes the connection after an exception: the client is told, not left to find a reset socket
        return error_response(500, "internal_error", "internal error; see the server log",
                              headers={"Connection": "close"})


def optional_keys_in_schema(app: FastAPI, keys_for_reads: bool) -> None:
    """State in the OpenAPI schema where a key is optional: /ready's always, the reads' unless the server
    requires keys for reads (FastAPI marks every operation with a security scheme as needing it)."""
    optional = {"OptionalKey"} | (set() if keys_for_reads else {"ReadKey"})
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            for operations in schema["paths"].values():
                for operation in operations.values():
                    security = operation.get("security", [])
                    if any(set(requirement) & optional for requirement in security):
                        operation["security"] = [{}, *security]
        return app.openapi_schema

    app.openapi = openapi


def create_app(settings: Settings) -> FastAPI:
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.threadpool_size:
            anyio.to_thread.current_default_thread_limiter().total_tokens = settings.threadpool_size
        service = await run_in_threadpool(Service.open, settings, metrics)
        app.state.service = service
        web.start(app, service)
        try:
            yield
        finally:
            await web.stop(app)
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
    optional_keys_in_schema(app, settings.require_key_for_reads)
    for router in (identify.router, individuals.router, images.router, health.router):
        app.include_router(router)
    web.install(app)  # the review web app at / (service/web)
    # added last = outermost: metrics see every answer, the 413s of the body limit included
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes,
                       idle_timeout_s=settings.body_idle_timeout_s, deadline_s=settings.body_deadline_s,
                       page_for=web.wants_page)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def create_app_from_env() -> FastAPI:
    """The app of the settings in WILDREID_SERVICE_SETTINGS (for uvicorn workers: `--factory`)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return create_app(Settings.from_env())
