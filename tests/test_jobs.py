"""Batch jobs: the store's queue (one instance per job, resumed after a crash), and the review app's job pages
over a real service: identify many photos in the background, work through the review queue, download
the results as CSV and Camtrap DP."""
from __future__ import annotations

import io
import json
import re
import shutil
import threading
import time
import zipfile
from pathlib import Path

import httpx
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import inspect

from reid.species.camtrap import validate_package
from reid.store import Store
from reid.store.database import SCHEMA_VERSION
from reid.store.jobs import JobQueue, review_count
from service.app import create_app
from service.settings import Settings
from service.testing import ServerProcess
from service.web import encounters
from tests.test_camtrap_dp import SCHEMAS
from tests.test_service_store import postgres_base, postgres_url, schema_version, set_schema_version  # noqa: F401
from tests.test_web_forms import csrf_of, signed_in

FILES = [f"cam{c}/img{i}.jpg" for c in (1, 2) for i in range(3)]


@pytest.fixture
def sqlite_store(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'wildreid.db'}")
    yield store
    store.close()


def test_a_job_is_claimed_once_its_photos_are_recorded_and_its_queue_followed(sqlite_store):
    queue = JobQueue(sqlite_store)
    job_id = queue.create("six photos", "/photos", FILES, "zebra", False, "ranger")
    job = queue.get(job_id)
    assert (job["state"], job["total"], job["processed"], job["to_review"]) == ("queued", 6, 0, 0)
    claimed = queue.claim()
    assert claimed.id == job_id and claimed.species == "zebra" and queue.claim() is None  # running, beating
    items = queue.pending(job_id)
    assert [i["file"] for i in items] == FILES
    queue.item_done(items[0]["id"], "enc0", ["match"], review_count(["match"], False))
    queue.item_done(items[1]["id"], "enc1", ["uncertain", "new", "match"], review_count(["uncertain", "new", "match"],
                                                                                        False))
    queue.item_done(items[2]["id"], None, [], 0, "not a JPEG or PNG")
    queue.item_done(items[4]["id"], "enc4", ["new"], 1)
    job = queue.get(job_id)
    assert (job["state"], job["done"], job["failed"], job["to_review"]) == ("running", 3, 1, 3)
    assert [i["position"] for i in queue.pending(job_id)] == [3, 5]
    assert queue.next_to_review(job_id)["encounter"] == "enc1"
    assert queue.next_to_review(job_id, after_position=1)["encounter"] == "enc4"
    assert queue.next_to_review(job_id, after_position=4)["encounter"] == "enc1"  # from the start again
    queue.set_to_review(items[1]["id"], 0)
    queue.set_to_review(items[4]["id"], 0)
    assert queue.next_to_review(job_id) is None
    queue.finish(job_id)
    assert queue.get(job_id)["state"] == "done" and queue.claim() is None


def test_review_count_takes_doubts_or_every_identified_animal():
    decisions = ["match", "uncertain", "new", "species-only"]
    assert review_count(decisions, review_all=False) == 2
    assert review_count(decisions, review_all=True) == 3


def test_a_job_whose_instance_stopped_is_taken_again_and_goes_on_where_it_stopped(sqlite_store):
    first = JobQueue(sqlite_store, stale_s=0.2)
    job_id = first.create("six photos", "/photos", FILES, None, False, None)
    assert first.claim().id == job_id
    for item in first.pending(job_id, limit=2):
        first.item_done(item["id"], f"enc{item['position']}", ["match"], 0)
    second = JobQueue(sqlite_store, stale_s=0.2)  # another instance: the first still beats
    assert second.claim() is None
    time.sleep(0.3)  # the first stopped beating (killed)
    assert second.claim().id == job_id
    assert [i["position"] for i in second.pending(job_id)] == [2, 3, 4, 5]


def test_a_cancelled_job_is_not_taken_and_its_runner_sees_it(sqlite_store):
    queue = JobQueue(sqlite_store)
    job_id = queue.create("six photos", "/photos", FILES, None, False, None)
    queue.claim()
    queue.cancel(job_id, "ranger")
    assert queue.beat(job_id) == "cancelled" and queue.claim() is None
    queue.finish(job_id)
    assert queue.get(job_id)["state"] == "cancelled"
    with pytest.raises(Exception, match="cancelled already"):
        queue.cancel(job_id, "ranger")


def test_a_job_without_photos_is_refused(sqlite_store):
    with pytest.raises(Exception, match="no JPEG or PNG photos"):
        JobQueue(sqlite_store).create("an empty folder", "/empty", [], None, False, None)


def test_a_schema_3_store_gets_the_jobs_tables(tmp_path):
    url = f"sqlite:///{tmp_path / 'wildreid.db'}"
    store = Store(url)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE job_items")
        conn.exec_driver_sql("DROP TABLE jobs")
    store.close()
    set_schema_version(url, 3)
    store = Store(url)
    assert schema_version(store) == SCHEMA_VERSION and {"jobs", "job_items"} <= set(inspect(store.engine).get_table_names())
    JobQueue(store).create("one", "/p", ["a.jpg"], None, False, None)
    store.close()


def test_two_instances_on_postgresql_never_take_the_same_job(postgres_url):
    stores = [Store(postgres_url) for _ in range(4)]
    queue = JobQueue(stores[0])
    made = [queue.create(f"job {i}", "/p", ["a.jpg"], None, False, None) for i in range(3)]
    taken, start = [], threading.Barrier(len(stores))

    def claim(store):
        start.wait()
        while (job := JobQueue(store).claim()) is not None:
            taken.append(job.id)

    threads = [threading.Thread(target=claim, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(taken) == made  # each job once, none twice
    for store in stores:
        store.close()


# ---------------------------------------------------------------------- the review app's job pages
@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory, synth_csv) -> Path:
    """Two cameras' folders of synthetic photos: two of each of three individuals."""
    table = pd.read_csv(synth_csv)
    folder = tmp_path_factory.mktemp("batch-root") / "survey"
    for n, (identity, group) in enumerate(table.groupby("identity", sort=True)):
        if n == 3:
            break
        for k, path in enumerate(group["path"][:2]):
            target = folder / f"cam{k + 1}" / f"{identity}-{k}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(synth_csv.parent / path, target)
    return folder


@pytest.fixture(scope="module")
def job_client(tmp_path_factory, tiny_checkpoint, photo_folder):
    settings = Settings(store_dir=tmp_path_factory.mktemp("job-store"), checkpoint=tiny_checkpoint,
                        batch_roots=[photo_folder.parent], job_poll_s=0.1)
    with TestClient(create_app(settings), follow_redirects=False) as client:
        yield client


@pytest.fixture(scope="module")
def writer(job_client):
    key = job_client.app.state.service.store.create_key("ranger")[1]
    return signed_in(job_client, key)


def wait_done(client, job_id: int, timeout: float = 60) -> dict:
    queue = JobQueue(client.app.state.service.store)
    deadline = time.monotonic() + timeout
    while (job := queue.get(job_id))["state"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    return job


def start_job(client, csrf, files=None, **fields) -> int:
    r = client.post("/jobs", data={"csrf": csrf, **fields}, files=files)
    assert r.status_code == 303 and re.fullmatch(r"/jobs/\d+", r.headers["location"]), r.text
    return int(r.headers["location"].rsplit("/", 1)[1])


def test_an_uploaded_zip_is_identified_in_the_background_and_reviewed_one_photo_at_a_time(writer, photo_folder,
                                                                                         tmp_path):
    client, csrf = writer
    service = client.app.state.service
    enrolled = sorted(photo_folder.glob("cam1/*.jpg"))[0]
    r = client.post("/individuals/new", data={"csrf": csrf, "name": "Marcela", "species": "zebra"},
                    files=[("images", (enrolled.name, enrolled.read_bytes(), "image/jpeg"))])
    assert r.status_code == 303, r.text
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(photo_folder.rglob("*.jpg")):
            z.write(path, path.relative_to(photo_folder).as_posix())
        z.writestr("../escape.jpg", b"outside")  # skipped: never written outside the job's folder
        z.writestr("notes.txt", b"not a photo")
    job_id = start_job(client, csrf, files=[("images", ("survey.zip", archive.getvalue(), "application/zip"))],
                       review_all="true")
    job = wait_done(client, job_id)
    assert (job["state"], job["total"], job["done"], job["failed"]) == ("done", 6, 6, 0)
    assert job["to_review"] == 6  # review_all: every identified animal
    page = client.get(f"/jobs/{job_id}")
    assert page.status_code == 200 and "6 of 6 photos identified" in page.text and "Review queue (6 animals)" in page.text

    seen = []
    location = client.get(f"/jobs/{job_id}/next").headers["location"]
    while location.startswith("/encounters/"):
        token = location.split("/")[2]
        encounter = encounters.load(service, token)
        seen.append(encounter["origin"]["position"])
        html = client.get(location).text
        assert "Next in the review queue" in html
        (animal,) = encounter["animals"]
        decision = f"confirm:{animal['candidates'][0]['individual_id']}" if animal["candidates"] else "skip"
        if len(seen) == 2:
            decision = "new"
        r = client.post(f"/encounters/{token}/animals/0", data={"csrf": csrf_of(html), "decision": decision,
                                                                 "name": f"Survey animal {len(seen)}"})
        assert r.status_code == 303, r.text
        location = r.headers["location"]
        if location.startswith("/jobs/"):  # the next photo of the queue, or the job when none is left
            location = client.get(location).headers["location"]
    assert seen == [0, 1, 2, 3, 4, 5] and location == f"/jobs/{job_id}"
    assert JobQueue(service.store).get(job_id)["to_review"] == 0

    results = pd.read_csv(io.BytesIO(client.get(f"/jobs/{job_id}/results.csv").content), keep_default_na=False)
    assert len(results) == 6 and set(results["file"]) == {p.relative_to(photo_folder).as_posix()
                                                          for p in photo_folder.rglob("*.jpg")}
    assert set(results["verdict"]) <= {"confirmed", "new", "skipped"} and (results["verdict"] == "new").sum() == 1
    assert (results.loc[results["verdict"] != "skipped", "decision"] == "match").all()
    assert set(results["camera"]) == {"cam1", "cam2"}
    deployments = pd.DataFrame({"deploymentID": ["cam1", "cam2"], "latitude": [-24.1, -24.2],
                                "longitude": [31.5, 31.6]}).to_csv(index=False).encode()
    job_html = client.get(f"/jobs/{job_id}").text
    r = client.post(f"/jobs/{job_id}/camtrap-dp.zip", data={"csrf": csrf_of(job_html), "utc_offset": "+02:00"},
                    files=[("deployments", ("deployments.csv", deployments, "text/csv"))])
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip", r.text
    package = zipfile.ZipFile(io.BytesIO(r.content))
    assert {"datapackage.json", "observations.csv", "media.csv", "deployments.csv"} <= set(package.namelist())
    package.extractall(tmp_path / "package")
    assert validate_package(tmp_path / "package", SCHEMAS) == []  # the Camtrap DP 1.0 profile and table schemas
    wrong = client.post(f"/jobs/{job_id}/camtrap-dp.zip", data={"csrf": csrf_of(job_html), "utc_offset": "2h"},
                        headers={"referer": f"http://testserver/jobs/{job_id}"})
    assert wrong.status_code == 303 and "write it as +HH:MM" in client.get(f"/jobs/{job_id}").text
    one_camera = deployments.decode().splitlines()[:2]
    wrong = client.post(f"/jobs/{job_id}/camtrap-dp.zip", data={"csrf": csrf_of(job_html)},
                        headers={"referer": f"http://testserver/jobs/{job_id}"},
                        files=[("deployments", ("mine.csv", "\n".join(one_camera).encode(), "text/csv"))])
    assert wrong.status_code == 303 and "cam2" in (shown := client.get(f"/jobs/{job_id}").text) and "mine.csv" in shown
    observations = pd.read_csv(package.open("observations.csv"), keep_default_na=False)
    assert (observations["individualID"] != "").sum() == (results["decision"] == "match").sum()
    assert not (Path(service.settings.store_dir) / "cache" / "escape.jpg").exists()


def test_a_server_folder_job_and_an_identify_batch_results_file_review_only_the_doubts(writer, photo_folder):
    client, csrf = writer
    service = client.app.state.service
    job_id = start_job(client, csrf, folder=str(photo_folder))
    job = wait_done(client, job_id)
    assert (job["state"], job["total"], job["folder"]) == ("done", 6, str(photo_folder))
    items = JobQueue(service.store).items(job_id)
    assert sum(review_count(i["decisions"], False) for i in items) == job["to_review"]

    doubtful = ["cam1/" + p.name for p in sorted(photo_folder.glob("cam1/*.jpg"))][:2]
    results = pd.DataFrame({"file": doubtful + ["cam2/" + sorted(photo_folder.glob("cam2/*.jpg"))[0].name],
                            "detection": 0, "decision": ["uncertain", "new", "match"]})
    job_id = start_job(client, csrf, folder=str(photo_folder),
                       files=[("results", ("results.csv", results.to_csv(index=False).encode(), "text/csv"))])
    assert [i["file"] for i in JobQueue(service.store).items(job_id)] == doubtful
    assert wait_done(client, job_id)["done"] == 2


@pytest.mark.parametrize("fields,files,message", [
    ({"folder": "/etc"}, None, "is not under a folder this server reads"),
    ({"folder": "relative/path"}, None, "is not an absolute path"),
    ({}, None, "choose photos (several, or one zip) or a folder of the server"),
    ({}, [("images", ("notes.txt", b"hello", "text/plain"))], "is not a JPEG or PNG photo"),
    ({}, [("images", ("broken.zip", b"PK not a zip", "application/zip"))], "is not a readable zip file"),
    ({"species": "okapi"}, None, "okapi"),
])
def test_a_job_that_cannot_start_says_why_on_the_page(writer, fields, files, message):
    client, csrf = writer
    r = client.post("/jobs", data={"csrf": csrf, **fields}, headers={"referer": "http://testserver/jobs"},
                    files=files)
    assert r.status_code == 303 and r.headers["location"] == "/jobs"
    assert message in client.get("/jobs").text


def test_a_photo_that_cannot_be_read_fails_alone(writer, photo_folder, tmp_path):
    client, csrf = writer
    good = sorted(photo_folder.rglob("*.jpg"))[0]
    job_id = start_job(client, csrf, files=[("images", ("good.jpg", good.read_bytes(), "image/jpeg")),
                                            ("images", ("bad.jpg", b"not really a jpeg", "image/jpeg"))])
    job = wait_done(client, job_id)
    assert (job["state"], job["done"], job["failed"]) == ("done", 1, 1)
    page = client.get(f"/jobs/{job_id}").text
    assert "could not be read" in page and "bad.jpg" in page
    results = pd.read_csv(io.BytesIO(client.get(f"/jobs/{job_id}/results.csv").content), keep_default_na=False)
    assert results["decision"].iloc[0] in ("match", "uncertain", "new") and results["decision"].iloc[1] == "failed"
    assert results["file"].iloc[1].endswith("bad.jpg") and results["note"].iloc[1] != ""


def test_a_job_goes_on_after_the_server_is_killed(tmp_path, tiny_checkpoint, synth_csv):
    table = pd.read_csv(synth_csv)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(120):  # enough photos to stop the server midway
        shutil.copy(synth_csv.parent / table["path"][i % len(table)], folder / f"img{i:03d}.jpg")
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"job_stale_s": 1.0, "job_poll_s": 0.2}))
    store_dir = tmp_path / "store"
    args = ("--settings", str(settings), "--batch-root", str(tmp_path))
    store = Store(f"sqlite:///{store_dir / 'wildreid.db'}")
    key = store.create_key("ranger")[1]
    with ServerProcess(store_dir, tiny_checkpoint, *args, log=tmp_path / "server.log") as server:
        enrolled = httpx.post(f"{server.url}/v1/individuals", headers={"Authorization": f"Bearer {key}"},
                              data={"name": "Marcela", "species": "zebra"},
                              files=[("images", ("a.jpg", (folder / "img000.jpg").read_bytes(), "image/jpeg"))])
        assert enrolled.status_code == 201, enrolled.text
        queue = JobQueue(store)
        job_id = queue.create("120 photos", str(folder), sorted(p.name for p in folder.iterdir()), None, False, None)
        deadline = time.monotonic() + 60
        while queue.get(job_id)["processed"] < 10:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        server.kill()
    stopped = queue.get(job_id)
    assert stopped["state"] == "running" and 10 <= stopped["processed"] < 120, stopped
    with ServerProcess(store_dir, tiny_checkpoint, *args, log=tmp_path / "server.log") as server:
        deadline = time.monotonic() + 90
        while (job := queue.get(job_id))["state"] != "done":
            assert time.monotonic() < deadline, job
            time.sleep(0.2)
        assert httpx.get(f"{server.url}/jobs/{job_id}").status_code == 200
    items = queue.items(job_id)
    assert job["done"] == 120 and all(i["state"] == "done" and i["encounter"] for i in items)
    store.close()


def test_a_jobs_encounters_outlive_the_week_other_encounters_are_kept(writer, photo_folder):
    client, csrf = writer
    service = client.app.state.service
    job_id = start_job(client, csrf, files=[("images", ("one.jpg", sorted(photo_folder.rglob("*.jpg"))[0].read_bytes(),
                                                        "image/jpeg"))])
    wait_done(client, job_id)
    (item,) = JobQueue(service.store).items(job_id)
    root = encounters.encounters_dir(service)
    later = time.time() + (encounters.KEEP_DAYS + 1) * 86400
    plain = root / "an-old-encounter-of-the-identify-page"
    plain.mkdir()
    encounters.drop_old(root, later)
    assert (root / item["encounter"] / "encounter.json").is_file() and not plain.exists()
