"""The review web app at `/`: sign in with an API key, identify an encounter's photos and decide on each
animal, browse and curate individuals. Served by the API's own process, store and identification flow
(`install(app)` in service/app.py); pages are Jinja2 templates, scripts and styles are served from
static/ (no CDN, no build step)."""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from service.core import Service
from service.web import job_pages
from service.web.jobs import JobRunner
from service.web.pages import router

STATIC = Path(__file__).resolve().parent / "static"
# the API's own paths (first segment): their errors stay JSON, whoever asks
API_SEGMENTS = frozenset({"v1", "docs", "docs-assets", "redoc", "openapi.json", "health", "ready", "metrics"})


def wants_page(scope) -> bool:
    """Whether an error is answered as a page of the review app: a browser's request (its Accept names
    text/html) for a path outside the API's (an ASGI scope, or a Request's `.scope`)."""
    accept = next((value for name, value in scope.get("headers", ()) if name == b"accept"), b"")
    return b"text/html" in accept.lower() and scope.get("path", "/").split("/")[1] not in API_SEGMENTS


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.include_router(job_pages.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")


def start(app: FastAPI, service: Service) -> None:
    """Start this instance's batch job runner (in the app's event loop, beside the requests)."""
    app.state.jobs = JobRunner(service)
    app.state.jobs.start()


async def stop(app: FastAPI) -> None:
    await app.state.jobs.stop()
