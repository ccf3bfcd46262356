"""Batch jobs in the review web app, in a real browser against a real server (as tests/test_web_app.py):
a zip of photos is uploaded from the Jobs page, its progress followed on the self-refreshing job page,
its review queue worked through from the keyboard and buttons, and its results downloaded as CSV; a job
form sent with nothing chosen says so in words. WILDREID_SCREENSHOTS=1 saves docs/screenshots/jobs.png,
job.png and review-queue.png."""
from __future__ import annotations

import re
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from tests.browser import chromium, enroll, keyed_server, message, photos_by_identity, shot, sign_in, submit, tab


@pytest.fixture(scope="module")
def photos(synth_csv) -> list[list[Path]]:
    return list(photos_by_identity(synth_csv).values())


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint):
    with keyed_server(tmp_path_factory.mktemp("web-jobs-store"), tiny_checkpoint) as running:
        yield running


@pytest.fixture(scope="module")
def page(server):
    with chromium() as browser, tab(browser, server.url, accept_downloads=True) as opened:
        sign_in(opened, server.key)
        yield opened


def queue_position(page) -> int:
    """The photo of the job shown on an encounter page of its review queue (1-based)."""
    text = page.locator(".queue-nav").inner_text()
    return int(re.search(r"Batch job \d+, photo (\d+)", text).group(1))


def test_a_zip_is_identified_in_the_background_reviewed_and_downloaded(page, photos, tmp_path):
    kito, zuri, stranger = photos[0], photos[1], photos[2]
    enroll(page, "Kito", "zebra", kito[0], kito[1])
    enroll(page, "Zuri", "zebra", zuri[0], zuri[1])
    survey = tmp_path / "survey.zip"
    files = ["cam1/01-kito.jpg", "cam1/02-stranger.jpg", "cam2/03-zuri.jpg"]
    with zipfile.ZipFile(survey, "w") as archive:
        for name, photo in zip(files, (kito[2], stranger[0], zuri[2])):
            archive.write(photo, name)

    page.goto("/")
    with page.expect_navigation():
        page.click("nav >> text=Jobs")
    assert page.url.endswith("/jobs") and "No job yet." in page.inner_text("main")
    page.set_input_files("#job-images", str(survey))
    page.fill("#job-species", "zebra")
    page.check("input[name=review_all]")  # every animal in the queue: the tiny model's decisions are not known
    submit(page, "button:has-text('Start the job')")
    job_id = int(re.fullmatch(r".*/jobs/(\d+)", page.url).group(1))
    assert f"Job {job_id} queued" in message(page)

    # the page refreshes itself every 3 s while the job runs: wait for the last refresh
    summary = page.locator(".job p").first
    summary.filter(has_text="3 of 3 photos identified").wait_for(timeout=30_000)
    assert page.locator(".job").get_attribute("data-state") == "done"
    progress = page.locator("progress.job-progress")
    assert progress.get_attribute("value") == progress.get_attribute("max") == "3"
    assert page.locator("meta[http-equiv=refresh]").count() == 0  # done: no more refreshing
    assert page.locator("#review-queue").inner_text() == "Review queue (3 animals)"
    shot(page, "job")

    page.goto("/jobs")
    row = page.locator("table.jobs tbody tr")
    assert row.count() == 1 and f"#{job_id} survey.zip" in row.inner_text() and "done" in row.inner_text()
    shot(page, "jobs")
    page.goto(f"/jobs/{job_id}")

    # the review queue, photo by photo: confirm the first candidate (c), a new individual (n, name, Enter), skip
    with page.expect_navigation():
        page.click("#review-queue")
    assert re.search(r"/encounters/[\w-]+$", page.url) and queue_position(page) == 1
    assert page.locator("#queue-next").inner_text() == "Next in the review queue →"
    first = page.locator("#animal-0 .candidate").first
    confirmed = first.locator(".name").inner_text()
    assert confirmed in ("Kito", "Zuri")
    shot(page, "review-queue")
    with page.expect_navigation():
        page.keyboard.press("c")
    assert queue_position(page) == 2
    assert "Confirmed: the photos are now sighting" in message(page)

    page.keyboard.press("n")
    page.keyboard.type("Stranger")
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert queue_position(page) == 3
    assert "Enrolled Stranger" in message(page)

    submit(page, "#animal-0 button:has-text('Skip')")
    assert page.url.endswith(f"/jobs/{job_id}")
    assert f"Nothing left to review in job {job_id}" in message(page)
    assert "Nothing to review." in page.locator(".job .actions").inner_text()

    # the results: one row per animal, with the verdicts and who gave them
    with page.expect_download() as download:
        page.click("text=Results (CSV)")
    assert download.value.suggested_filename == f"job-{job_id}-results.csv"
    results = pd.read_csv(download.value.path(), keep_default_na=False)
    assert list(results["file"]) == files
    assert list(results["verdict"]) == ["confirmed", "new", "skipped"]
    assert list(results["individual_name"][:2]) == [confirmed, "Stranger"]
    assert list(results["decision"][:2]) == ["match", "match"]
    assert list(results["camera"]) == ["cam1", "cam1", "cam2"]
    assert set(results["reviewed_by"]) == {"field-team"}


def test_a_job_form_with_nothing_chosen_says_so_in_words(page):
    page.goto("/jobs")
    submit(page, "button:has-text('Start the job')")
    assert page.url.endswith("/jobs")
    assert "choose photos (several, or one zip) or a folder of the server" in message(page)
    assert page.locator(".message.error:visible").count() == 1
