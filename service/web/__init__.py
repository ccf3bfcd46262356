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
