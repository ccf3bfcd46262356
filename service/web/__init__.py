"""The review web app at `/`: sign in with an API key, identify an encounter's photos and decide on each
animal, browse and curate individuals. Served by the API's own process, store and identification flow
(`install(app)` in service/app.py); pages are Jinja2 templates, scripts and styles are served from
static/ (no CDN, no build step)."""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from service.web.pages import router

STATIC = Path(__file__).resolve().parent / "static"


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
