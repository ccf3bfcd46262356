"""Merge suggestions in the review web app, in a real browser against a real server (as tests/test_web_app.py):
an animal enrolled twice under two names is suggested, reviewed side by side and merged; a pair marked
"Not the same" is no longer suggested. WILDREID_SCREENSHOTS=1 saves docs/screenshots/suggestions.png."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.browser import chromium, enroll, keyed_server, message, photos_by_identity, shot, sign_in, submit, tab


@pytest.fixture(scope="module")
def photos(synth_csv) -> list[list[Path]]:
    return list(photos_by_identity(synth_csv).values())


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint):
    with keyed_server(tmp_path_factory.mktemp("web-suggestions-store"), tiny_checkpoint) as running:
        yield running


@pytest.fixture(scope="module")
def page(server):
    with chromium() as browser, tab(browser, server.url) as opened:
        sign_in(opened, server.key)
        yield opened


def test_an_animal_enrolled_twice_is_suggested_and_merged(page, photos):
    kito_photos = photos[0]
    # the same animal twice: its first photo was uploaded again with the second enrollment
    kito = enroll(page, "Kito", "zebra", kito_photos[0], kito_photos[1])
    again = enroll(page, "Kito again", "zebra", kito_photos[2], kito_photos[0])

    page.goto("/")
    with page.expect_navigation():
        page.click("nav >> text=Merge suggestions")
    assert page.url.endswith("/suggestions")
    section = page.locator("#species-zebra")
    assert "match threshold 0.700 (settings)" in section.locator("h2").inner_text()
    pair = section.locator(".suggestion")
    assert pair.count() == 1
    assert pair.locator("a.name").all_inner_texts() == ["Kito", "Kito again"]
    assert [a.get_attribute("href") for a in pair.locator("a.name").all()] == [f"/individuals/{kito}",
                                                                              f"/individuals/{again}"]
    text = pair.inner_text()
    assert re.search(r"cosine (1\.000|0\.99\d) ≥ 0\.700", text), text
    thumbs = pair.locator("img.thumb")
    assert thumbs.count() == 2
    for index in range(2):
        assert thumbs.nth(index).evaluate("img => img.decode().then(() => img.naturalWidth > 0)")
    shot(page, "suggestions")

    with page.expect_navigation():
        pair.locator("text=Review merge").click()
    assert page.url.endswith(f"/individuals/{kito}/merge?source={again}")
    assert page.locator(".compare .card").count() == 2
    submit(page, "button:has-text('Yes, merge Kito again into Kito')")
    assert f"Merged individual {again} into {kito}: 2 photos moved" in message(page)
    assert page.locator(".sighting .thumb").count() == 4  # both enrollments' photos, now Kito's

    page.goto("/individuals?species=zebra")
    assert page.locator(".individual .name").all_inner_texts() == ["Kito"]
    page.goto("/suggestions?species=zebra")
    assert page.locator("#species-zebra .suggestion").count() == 0
    assert "No two individuals of zebra" in page.locator("#species-zebra").inner_text()


def test_a_pair_marked_not_the_same_is_no_longer_suggested(page, photos):
    twin = photos[1][0]
    enroll(page, "Zuri", "giraffe", twin)
    enroll(page, "Zuri twin", "giraffe", twin, photos[1][1])
    page.goto("/suggestions?species=giraffe")
    pair = page.locator("#species-giraffe .suggestion", has_text="Zuri twin")
    assert pair.count() == 1
    submit(page, "#species-giraffe .suggestion button:has-text('Not the same')")
    assert "Not the same: Zuri and Zuri twin are no longer suggested for a merge" in message(page)
    assert page.url.endswith("/suggestions?species=giraffe")
    assert page.locator("#species-giraffe .suggestion").count() == 0
    assert "1 dismissed as not the same" in page.locator("#species-giraffe h2").inner_text()
    # an unknown species is told in words
    page.goto("/suggestions?species=okapi")
    assert "unknown species 'okapi'" in message(page)
