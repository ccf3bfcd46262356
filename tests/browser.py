"""What the review app's browser tests share: Debian's chromium driven by Playwright (a module importing
this is skipped without either), a real server with a key, a tab on it, and the steps every page test
takes (sign in, enroll, submit a form, read the messages, save a screenshot with WILDREID_SCREENSHOTS=1)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pandas as pd
import pytest

from reid.store import Store
from service.settings import Settings
from service.testing import ServerProcess

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
if not CHROMIUM.exists():
    pytest.skip("no browser: Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)


def photos_by_identity(synth_csv: Path) -> dict[str, list[Path]]:
    table = pd.read_csv(synth_csv)
    return {identity: [synth_csv.parent / p for p in group["path"]]
            for identity, group in table.groupby("identity", sort=True)}


@contextmanager
def keyed_server(store: Path, checkpoint: Path) -> Iterator[ServerProcess]:
    """`reid serve` on a new store, with the key of 'field-team' as `.key`."""
    key_store = Store(Settings(store_dir=store, checkpoint=checkpoint).url)
    key = key_store.create_key("field-team")[1]
    key_store.close()
    with ServerProcess(store, checkpoint, log=store / "server.log") as running:
        running.key = key
        yield running


@contextmanager
def chromium():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                             args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


@contextmanager
def tab(browser, url: str, **options):
    """A page of a browser context of its own on `url`, laptop-sized."""
    context = browser.new_context(base_url=url, viewport={"width": 1200, "height": 900}, **options)
    context.set_default_timeout(20_000)
    yield context.new_page()
    context.close()


def shot(page, name: str) -> None:
    if os.environ.get("WILDREID_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def submit(page, selector: str) -> None:
    """Click a form's button and wait for the page it leads to."""
    with page.expect_navigation():
        page.click(selector)


def message(page) -> str:
    return " ".join(page.locator(".message").all_inner_texts())


def sign_in(page, key: str) -> None:
    page.goto("/sign-in")
    page.fill("#key", key)
    submit(page, "button:has-text('Sign in')")
    assert "Signed in as field-team" in message(page)


def enroll(page, name: str, species: str, *files: Path) -> int:
    page.goto("/individuals/new")
    page.fill("#name", name)
    page.fill("#species", species)
    page.set_input_files("#images", [str(f) for f in files])
    submit(page, "button:has-text('Enroll')")
    assert f"Enrolled {name}" in message(page)
    return int(page.url.rsplit("/", 1)[1])
