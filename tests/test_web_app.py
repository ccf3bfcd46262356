"""The review web app in a real browser (Debian's chromium driven by Playwright) against a real server
(`python -m service serve`): sign in, enroll, identify and decide, curate; and the messages a wrong
key and a non-image upload get. WILDREID_SCREENSHOTS=1 saves a PNG of each page in docs/screenshots/."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.browser import chromium, enroll, keyed_server, message, photos_by_identity, shot, sign_in, submit, tab


@pytest.fixture(scope="module")
def photos(synth_csv) -> dict[str, list[Path]]:
    return photos_by_identity(synth_csv)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint):
    with keyed_server(tmp_path_factory.mktemp("web-app-store"), tiny_checkpoint) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    with chromium() as running:
        yield running


@pytest.fixture
def page(browser, server):
    with tab(browser, server.url) as opened:
        yield opened


def identify(page, species: str, *files: Path) -> None:
    page.goto("/")
    page.fill("#species", species)
    page.set_input_files("#images", [str(f) for f in files])
    submit(page, "button:has-text('Identify')")
    page.wait_for_url(re.compile(r"/encounters/"))


def test_a_wrong_key_is_told_in_words(page, server):
    page.goto("/sign-in")
    shot(page, "sign-in")
    page.fill("#key", "wr_this-is-not-a-key")
    submit(page, "button:has-text('Sign in')")
    assert "unknown API key" in message(page)
    assert page.locator("text=Sign out").count() == 0


def test_enroll_identify_confirm_new_and_merge(page, server, photos):
    (a, a_photos), (b, b_photos), (c, c_photos), *_ = photos.items()
    sign_in(page, server.key)
    kito = enroll(page, "Kito", "zebra", a_photos[0], a_photos[1])
    zuri = enroll(page, "Zuri", "zebra", b_photos[0], b_photos[1])

    # identify another photo of Kito: both are candidates, with their photos beside the query
    identify(page, "zebra", a_photos[2])
    animal = page.locator("#animal-0")
    assert animal.locator(".candidate").count() == 2
    assert "match ≥" in animal.inner_text() and "thresholds from settings" in animal.inner_text()
    assert animal.locator(".candidate .thumb").first.evaluate("img => img.complete && img.naturalWidth > 0")
    shot(page, "encounter")
    animal.locator(".candidate .side-by-side img[data-zoom-with]").nth(1).click()
    assert page.locator("#zoom[open] .pair img").count() == 2  # the query beside the candidate's photo
    page.keyboard.press("Escape")
    submit(page, f"button[value='confirm:{kito}']")
    assert re.search(r"Confirmed: the photos are now sighting \d+ of Kito", message(page))
    assert "Confirmed: Kito by field-team" in page.locator("#animal-0").inner_text()

    page.goto(f"/individuals/{kito}")
    assert page.locator(".sighting").count() == 2 and page.locator(".sighting .thumb").count() == 3
    shot(page, "individual")

    # a photo of a third animal: a new individual, from the keyboard (n, type the name, Enter)
    identify(page, "zebra", c_photos[0])
    page.keyboard.press("n")
    page.keyboard.type("Cleo")
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert "Enrolled Cleo" in message(page)
    page.goto("/individuals?q=cle")
    assert page.locator(".individual .name").all_inner_texts() == ["Cleo"]
    page.goto("/individuals")
    assert page.locator(".individual").count() == 3 and page.locator(".individual .thumb").count() == 3
    shot(page, "individuals")

    # merge Zuri into Kito, side by side first
    page.goto(f"/individuals/{kito}")
    page.click("summary:has-text('Merge another individual')")
    page.select_option("#source", str(zuri))
    submit(page, "button:has-text('Compare side by side')")
    assert page.locator(".compare .card").count() == 2
    shot(page, "merge")
    submit(page, "button:has-text('Yes, merge Zuri into Kito')")
    assert f"Merged individual {zuri} into {kito}: 2 photos moved" in message(page)
    assert "Zuri (was #" in page.inner_text("dl.facts")
    assert "individual.merge" in page.inner_text("table.history")
    page.goto(f"/individuals/{zuri}")
    assert f"Merged into individual {kito}" in message(page)


def test_a_non_image_upload_is_told_in_words(page, server, tmp_path, photos):
    sign_in(page, server.key)
    notes = tmp_path / "notes.csv"
    notes.write_text("id,name\n1,Kito\n")
    page.goto("/")
    shot(page, "identify")
    page.set_input_files("#images", str(notes))
    submit(page, "button:has-text('Identify')")
    page.wait_for_url(server.url + "/")
    assert "images[0] 'notes.csv' is not an image Pillow can read" in message(page)
