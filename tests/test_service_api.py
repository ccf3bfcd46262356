"""The web service through FastAPI's TestClient: enroll / identify, curation, bad input, auth, operations.

One app (a random-init tiny model, SQLite store) serves the whole module; each test works in its
own species so that tests do not see each other's individuals.
"""
from __future__ import annotations

import hashlib
import threading

import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from service.testing import assert_error, encode, noise_image, png_with_dimensions, truncated

MB = 1024 * 1024


@pytest.fixture(scope="module")
def photos(synth_csv) -> dict[str, list[bytes]]:
    """identity -> its 4 synthetic JPEGs (two encounters of two photos)."""
    table = pd.read_csv(synth_csv)
    return {identity: [(synth_csv.parent / p).read_bytes() for p in group["path"]]
            for identity, group in table.groupby("identity", sort=True)}


@pytest.fixture(scope="module")
def app_client(tmp_path_factory, tiny_checkpoint):
    store = tmp_path_factory.mktemp("service-store")
    app = create_app(Settings(store_dir=store, checkpoint=tiny_checkpoint))
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def service(app_client):
    return app_client.app.state.service


@pytest.fixture(scope="module")
def key(service) -> str:
    return service.store.create_key("tester")[1]


@pytest.fixture(scope="module")
def auth(key) -> dict:
    return {"Authorization": f"Bearer {key}"}


def files(*blobs: bytes, field: str = "images", names=None) -> list:
    return [(field, ((names or [])[i] if names else f"photo{i}.jpg", blob, "image/jpeg")) for i, blob in enumerate(blobs)]


def enroll(client, auth, name, species, *blobs, expect=201, **data):
    r = client.post("/v1/individuals", data={"name": name, "species": species, **data}, files=files(*blobs),
                    headers=auth)
    assert r.status_code == expect, r.text
    return r.json()


def identify(client, species, *blobs, **data):
    r = client.post("/v1/identify", data={"species": species, **data}, files=files(*blobs))
    assert r.status_code == 200, r.text
    return r.json()


def top(result, animal=0):
    return result["animals"][animal]["candidates"][0]


def gallery_matches_database(service) -> None:
    """The searchable images are exactly the database's visible ones (live individuals)."""
    service.galleries.sync()
    _, rows = service.store.gallery_rows(None)
    assert service.galleries.image_ids() == {r.image_id for r in rows}


def snapshot(service) -> tuple:
    files_on_disk = sorted(p.name for p in (service.settings.store_dir / "images").rglob("*") if p.is_file())
    return service.store.change_seq(), service.store.counts(), files_on_disk


# ---------------------------------------------------------------------- enroll and identify
def test_enroll_then_identify_finds_each_individual_at_rank_1(app_client, auth, photos):
    ids = {}
    for identity, blobs in photos.items():
        body = enroll(app_client, auth, identity, "zebra", blobs[0])
        assert body["name"] == identity and body["species"] == "zebra" and body["image_count"] == 1
        ids[identity] = body["id"]
    for identity, blobs in photos.items():
        result = identify(app_client, "zebra", blobs[0], top_k=3)
        animal = result["animals"][0]
        assert animal["detector"] == "whole-image" and animal["species"] == "zebra"
        assert top(result)["individual_id"] == ids[identity] and top(result)["name"] == identity
        assert top(result)["score"] == pytest.approx(1.0, abs=1e-5)
        assert animal["decision"] == "match"
        assert top(result)["images"][0]["image_id"] in [i["id"] for i in
                                                         app_client.get(f"/v1/individuals/{ids[identity]}").json()["images"]]
        assert len(animal["candidates"]) == 3 and [c["rank"] for c in animal["candidates"]] == [1, 2, 3]
        scores = [c["score"] for c in animal["candidates"]]
        assert scores == sorted(scores, reverse=True)
    # another photo of an enrolled individual (a random model need not rank it first): a full answer
    identity, blobs = next(iter(photos.items()))
    result = identify(app_client, "zebra", blobs[2], top_k=len(photos))
    assert {c["individual_id"] for c in result["animals"][0]["candidates"]} == set(ids.values())
    assert result["animals"][0]["decision"] in ("match", "new", "uncertain")
    animal = result["animals"][0]
    assert animal["thresholds"] == {"match_threshold": 0.7, "new_threshold": 0.5, "source": "settings"}
    assert animal["gallery_size"] == len(photos) and animal["species_source"] == "request"
    assert animal["images"] == [0] and result["photos"] == [{"index": 0, "filename": "photo0.jpg", "outcome": "animal",
                                                             "animals": 1, "humans": 0, "vehicles": 0}]


def test_photos_of_one_encounter_are_fused_into_one_query(app_client, auth, service, photos):
    identity, blobs = list(photos.items())[1]
    a = enroll(app_client, auth, "fused", "fusion-test", blobs[0], blobs[1])
    for other, other_blobs in list(photos.items())[2:5]:
        enroll(app_client, auth, other, "fusion-test", other_blobs[0])
    result = identify(app_client, "fusion-test", blobs[0], blobs[1])
    animal = result["animals"][0]
    assert len(result["animals"]) == 1 and animal["query_images"] == 2
    assert top(result)["individual_id"] == a["id"]
    # the fused query is the normalised mean of the two photos' embeddings
    image_ids = [i["id"] for i in app_client.get(f"/v1/individuals/{a['id']}").json()["images"]]
    _, rows = service.store.gallery_rows(None)
    vectors = [np.frombuffer(r.embedding, "<f4") for r in rows if r.image_id in image_ids]
    fused = np.mean(vectors, axis=0)
    fused /= np.linalg.norm(fused)
    assert top(result)["score"] == pytest.approx(float(max(v @ fused for v in vectors)), abs=1e-4)


def test_enrolled_record_image_and_file(app_client, auth, service, photos):
    blob = photos["synth_003"][1]
    body = enroll(app_client, auth, "  Spotty  ", " Giraffe ", blob, notes="left flank", location="waterhole 3",
                  observed_at="2024-05-01T06:30:00Z")
    assert body["name"] == "Spotty" and body["species"] == "giraffe" and body["notes"] == "left flank"
    assert body["deleted"] is False and body["merged_into"] is None
    (image,) = body["images"]
    (sighting,) = body["sightings"]
    assert sighting["image_ids"] == [image["id"]] and sighting["key_name"] == "tester"
    assert sighting["location"] == "waterhole 3" and sighting["observed_at"] == "2024-05-01T06:30:00Z"
    digest = hashlib.sha256(blob).hexdigest()
    assert image["sha256"] == digest
    record = app_client.get(f"/v1/images/{image['id']}").json()
    assert record["individual_id"] == body["id"] and record["species"] == "giraffe"
    assert (record["width"], record["height"]) == (64, 64) and record["media_type"] == "image/jpeg"
    got = app_client.get(record["file_url"])
    assert got.status_code == 200 and got.content == blob and got.headers["content-type"] == "image/jpeg"
    # content-addressed on disk
    assert (service.settings.store_dir / "images" / digest[:2] / f"{digest}.jpg").read_bytes() == blob
    assert_error(app_client.get("/v1/images/999999"), 404, "image_not_found")


def test_added_sighting_is_searchable_by_the_next_request(app_client, auth, photos):
    blobs = photos["synth_004"]
    a = enroll(app_client, auth, "A", "sighting-test", blobs[0])
    enroll(app_client, auth, "B", "sighting-test", photos["synth_005"][0])
    r = app_client.post(f"/v1/individuals/{a['id']}/images", files=files(blobs[3]), headers=auth,
                        data={"notes": "second visit"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert len(body["image_ids"]) == 1 and body["individual"]["image_count"] == 2
    assert len(body["individual"]["sightings"]) == 2
    result = identify(app_client, "sighting-test", blobs[3])
    assert top(result)["individual_id"] == a["id"]
    assert top(result)["images"][0]["image_id"] == body["image_ids"][0]


def test_bbox_crops_and_one_animal_per_bbox(app_client, auth, photos):
    blob = photos["synth_006"][0]
    a = enroll(app_client, auth, "boxed", "bbox-test", blob, bbox="0.25,0.25,0.5,0.5")
    enroll(app_client, auth, "whole", "bbox-test", photos["synth_007"][0])
    result = identify(app_client, "bbox-test", blob, bbox="0.25,0.25,0.5,0.5")
    assert result["animals"][0]["detector"] == "bbox" and top(result)["individual_id"] == a["id"]
    assert result["animals"][0]["bboxes"] == [[0.25, 0.25, 0.5, 0.5]]
    r = app_client.post("/v1/identify", data={"species": "bbox-test", "bbox": ["0,0,0.5,0.5", "[0.5, 0.5, 0.5, 0.5]"]},
                        files=files(blob))
    assert r.status_code == 200 and len(r.json()["animals"]) == 2, r.text
    assert app_client.get(f"/v1/individuals/{a['id']}").json()["images"][0]["bbox"] == "0.25,0.25,0.5,0.5"


def test_photos_keep_their_viewpoint_and_a_candidate_says_which_flank_matched(app_client, auth, photos):
    left, right = photos["synth_002"][0], photos["synth_002"][2]  # two encounters: two different photos
    body = enroll(app_client, auth, "Flanks", "viewpoint-test", left, right, viewpoint=["left", "Right "])
    assert [i["viewpoint"] for i in body["images"]] == ["left", "right"]
    assert app_client.get(f"/v1/images/{body['images'][1]['id']}").json()["viewpoint"] == "right"
    other = enroll(app_client, auth, "Unrecorded", "viewpoint-test", photos["synth_003"][0])
    assert other["images"][0]["viewpoint"] is None
    animal = identify(app_client, "viewpoint-test", right, top_k=2)["animals"][0]
    best, second = animal["candidates"]
    assert best["individual_id"] == body["id"] and best["viewpoint"] == "right"
    assert best["images"][0] == {**best["images"][0], "image_id": body["images"][1]["id"], "viewpoint": "right"}
    assert [i["viewpoint"] for i in best["images"]] == ["right", "left"]
    assert second["individual_id"] == other["id"] and second["viewpoint"] is None
    # one viewpoint for every photo of a sighting
    r = app_client.post(f"/v1/individuals/{body['id']}/images", files=files(photos["synth_002"][1],
                                                                           photos["synth_002"][3]),
                        data={"viewpoint": " LEFT"}, headers=auth)
    assert r.status_code == 201, r.text
    added = [i for i in r.json()["individual"]["images"] if i["id"] in r.json()["image_ids"]]
    assert [i["viewpoint"] for i in added] == ["left", "left"]


def test_viewpoints_are_one_for_every_photo_or_one_per_photo_and_well_formed(app_client, auth, service, photos):
    blob = photos["synth_004"][1]
    target = enroll(app_client, auth, "Target", "viewpoint-test-2", blob)
    before = snapshot(service)
    form = {"name": "X", "species": "viewpoint-test-2"}
    error = assert_error(app_client.post("/v1/individuals", data={**form, "viewpoint": ["left", "right", "left"]},
                                         files=files(blob, blob), headers=auth), 422, "invalid_viewpoint")
    assert "3 viewpoints for 2 images" in error["message"]
    error = assert_error(app_client.post(f"/v1/individuals/{target['id']}/images", data={"viewpoint": ["left"] * 2},
                                         files=files(blob, blob, blob), headers=auth), 422, "invalid_viewpoint")
    assert "2 viewpoints for 3 images" in error["message"]
    for bad in ("left!", "x" * 51, "-left", "left\nright"):
        error = assert_error(app_client.post("/v1/individuals", data={**form, "viewpoint": bad}, files=files(blob),
                                             headers=auth), 422, "validation_error")
        assert error["message"].startswith("invalid request: viewpoint.0:"), error
    assert snapshot(service) == before  # refused before any photo was stored


def test_species_is_required_only_when_the_store_holds_several(app_client, photos):
    r = app_client.post("/v1/identify", files=files(photos["synth_000"][0]))
    assert_error(r, 422, "species_required")
    assert_error(app_client.post("/v1/identify", data={"species": "unicorn"}, files=files(photos["synth_000"][0])),
                 404, "unknown_species")


def test_identify_an_empty_store(tmp_path, tiny_checkpoint, photos):
    with TestClient(create_app(Settings(store_dir=tmp_path, checkpoint=tiny_checkpoint))) as client:
        assert_error(client.post("/v1/identify", files=files(photos["synth_000"][0])), 409, "empty_gallery")


# ---------------------------------------------------------------------- curation
def test_list_individuals_paged_and_filtered(app_client, auth, photos):
    made = [enroll(app_client, auth, name, "list-test", photos[f"synth_00{i}"][0])["id"]
            for i, name in enumerate(["Kito", "Kibo", "Zuri", "Amani", "kiara"])]
    page1 = app_client.get("/v1/individuals", params={"species": "list-test", "per_page": 2}).json()
    page3 = app_client.get("/v1/individuals", params={"species": "list-test", "per_page": 2, "page": 3}).json()
    assert page1["total"] == 5 and [i["id"] for i in page1["items"]] == made[:2]
    assert [i["id"] for i in page3["items"]] == made[4:] and page3["page"] == 3
    named = app_client.get("/v1/individuals", params={"species": "list-test", "name": "KI"}).json()
    assert {i["name"] for i in named["items"]} == {"Kito", "Kibo", "kiara"}
    assert app_client.get("/v1/individuals", params={"name": "%"}).json()["total"] == 0  # LIKE wildcards are literal
    assert_error(app_client.get("/v1/individuals", params={"per_page": 100000}), 422, "page_too_large")
    assert_error(app_client.get("/v1/individuals", params={"page": 0}), 422, "validation_error")


def test_rename_and_notes(app_client, auth, service, photos):
    blob = photos["synth_008"][0]
    a = enroll(app_client, auth, "Old name", "rename-test", blob)
    r = app_client.patch(f"/v1/individuals/{a['id']}", json={"name": "New name", "notes": "torn ear"}, headers=auth)
    assert r.status_code == 200 and r.json()["name"] == "New name" and r.json()["notes"] == "torn ear"
    assert top(identify(app_client, "rename-test", blob))["name"] == "New name"
    entry = next(e for e in app_client.get("/v1/audit", headers=auth).json() if e["action"] == "individual.update")
    assert entry["key_name"] == "tester" and entry["target_id"] == a["id"]
    assert entry["detail"] == {"before": {"name": "Old name", "notes": ""}, "after": {"name": "New name",
                                                                                      "notes": "torn ear"}}
    assert_error(app_client.patch(f"/v1/individuals/{a['id']}", json={}, headers=auth), 422, "validation_error")
    assert_error(app_client.patch(f"/v1/individuals/{a['id']}", json={"name": "  "}, headers=auth), 422)
    assert_error(app_client.patch(f"/v1/individuals/{a['id']}", json={"nmae": "x"}, headers=auth), 422)
    assert_error(app_client.patch("/v1/individuals/999999", json={"name": "x"}, headers=auth), 404,
                 "individual_not_found")
    gallery_matches_database(service)


def test_merge_moves_images_keeps_alias_and_the_gallery_consistent(app_client, auth, service, photos):
    a = enroll(app_client, auth, "Alpha", "merge-test", photos["synth_009"][0])
    b = enroll(app_client, auth, "Bravo", "merge-test", photos["synth_010"][0], photos["synth_010"][1])
    c = enroll(app_client, auth, "Charlie", "merge-test", photos["synth_011"][0])
    before = snapshot(service)
    assert_error(app_client.post(f"/v1/individuals/{a['id']}/merge", json={"source_id": a["id"]}, headers=auth),
                 422, "merge_into_self")
    assert_error(app_client.post(f"/v1/individuals/{a['id']}/merge", json={"source_id": 999999}, headers=auth),
                 404, "individual_not_found")
    assert_error(app_client.post("/v1/individuals/999999/merge", json={"source_id": a["id"]}, headers=auth), 404)
    assert_error(app_client.post(f"/v1/individuals/{a['id']}/merge", json={"other": b["id"]}, headers=auth), 422)
    other_species = enroll(app_client, auth, "Delta", "merge-test-2", photos["synth_000"][3])
    before = snapshot(service)
    assert_error(app_client.post(f"/v1/individuals/{a['id']}/merge", json={"source_id": other_species["id"]},
                                 headers=auth), 409, "species_mismatch")
    assert snapshot(service)[1:] == before[1:]

    r = app_client.post(f"/v1/individuals/{a['id']}/merge", json={"source_id": b["id"]}, headers=auth)
    assert r.status_code == 200, r.text
    merged = r.json()
    assert merged["images_moved"] == 2 and merged["individual"]["image_count"] == 3
    assert merged["individual"]["aliases"][0]["name"] == "Bravo"
    assert merged["individual"]["aliases"][0]["former_id"] == b["id"]
    assert {i["enrolled_as"] for i in merged["individual"]["images"]} == {a["id"], b["id"]}
    # Bravo's photos now find Alpha; Bravo no longer appears as a candidate
    result = identify(app_client, "merge-test", photos["synth_010"][1], top_k=5)
    assert top(result)["individual_id"] == a["id"]
    assert {cand["individual_id"] for cand in result["animals"][0]["candidates"]} == {a["id"], c["id"]}
    old = app_client.get(f"/v1/individuals/{b['id']}").json()
    assert old["merged_into"] == a["id"] and old["images"] == []
    listed = app_client.get("/v1/individuals", params={"species": "merge-test", "name": "bravo"}).json()
    assert [i["id"] for i in listed["items"]] == [a["id"]]  # found by its alias
    # again: already merged; and nothing can be added to the merged one
    assert_error(app_client.post(f"/v1/individuals/{a['id']}/merge", json={"source_id": b["id"]}, headers=auth),
                 409, "already_merged")
    assert_error(app_client.post(f"/v1/individuals/{b['id']}/images", files=files(photos["synth_010"][2]),
                                 headers=auth), 409, "individual_merged")
    gallery_matches_database(service)


def test_two_merges_of_the_same_pair_at_once(app_client, auth, service, photos):
    a = enroll(app_client, auth, "Echo", "race-test", photos["synth_001"][3])
    b = enroll(app_client, auth, "Foxtrot", "race-test", photos["synth_002"][3])
    barrier, answers = threading.Barrier(4), []

    def merge():
        barrier.wait()
        answers.append(app_client.post(f"/v1/individuals/{a['id']}/merge", json={"source_id": b["id"]},
                                       headers=auth))

    threads = [threading.Thread(target=merge) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [200, 409, 409, 409], [r.text for r in answers]
    assert all(r.json()["error"]["code"] == "already_merged" for r in answers if r.status_code == 409)
    got = app_client.get(f"/v1/individuals/{a['id']}").json()
    assert got["image_count"] == 2 and len(got["aliases"]) == 1
    merges = [e for e in app_client.get("/v1/audit", headers=auth).json()
              if e["action"] == "individual.merge" and e["target_id"] == a["id"]]
    assert len(merges) == 1
    gallery_matches_database(service)


def test_delete_and_restore(app_client, auth, service, photos):
    a = enroll(app_client, auth, "Golf", "delete-test", photos["synth_003"][3])
    b = enroll(app_client, auth, "Hotel", "delete-test", photos["synth_004"][2])
    r = app_client.delete(f"/v1/individuals/{a['id']}", headers=auth)
    assert r.status_code == 200 and r.json()["deleted"] is True
    result = identify(app_client, "delete-test", photos["synth_003"][3])
    assert [c["individual_id"] for c in result["animals"][0]["candidates"]] == [b["id"]]
    assert app_client.get(f"/v1/individuals/{a['id']}").json()["deleted"] is True
    listed = app_client.get("/v1/individuals", params={"species": "delete-test"}).json()
    assert [i["id"] for i in listed["items"]] == [b["id"]]
    assert app_client.get("/v1/individuals", params={"species": "delete-test", "include_deleted": True}).json()["total"] == 2
    assert_error(app_client.delete(f"/v1/individuals/{a['id']}", headers=auth), 409, "already_deleted")
    before = snapshot(service)
    assert_error(app_client.post(f"/v1/individuals/{a['id']}/images", files=files(photos["synth_003"][0]),
                                 headers=auth), 409, "individual_deleted")
    assert snapshot(service) == before  # refused before its photo was stored
    assert_error(app_client.post(f"/v1/individuals/{b['id']}/merge", json={"source_id": a["id"]}, headers=auth),
                 409, "individual_deleted")
    gallery_matches_database(service)
    r = app_client.post(f"/v1/individuals/{a['id']}/restore", headers=auth)
    assert r.status_code == 200 and r.json()["deleted"] is False
    assert top(identify(app_client, "delete-test", photos["synth_003"][3]))["individual_id"] == a["id"]
    assert_error(app_client.post(f"/v1/individuals/{a['id']}/restore", headers=auth), 409, "not_deleted")
    # a species whose every individual is deleted is still known: its gallery is simply empty
    app_client.delete(f"/v1/individuals/{a['id']}", headers=auth)
    app_client.delete(f"/v1/individuals/{b['id']}", headers=auth)
    result = identify(app_client, "delete-test", photos["synth_003"][3])
    assert result["animals"][0]["candidates"] == [] and result["animals"][0]["decision"] == "new"
    gallery_matches_database(service)


# ---------------------------------------------------------------------- bad input
def _bad_upload_cases(photos) -> dict:
    good = photos["synth_000"][0]
    big = encode(noise_image(0, 512), "JPEG", quality=95)
    return {
        "not an image": ([("images", ("notes.txt", b"hello, I am text", "text/plain"))], 415, "not_an_image"),
        "zero bytes": ([("images", ("empty.jpg", b"", "image/jpeg"))], 422, "empty_file"),
        "truncated jpeg": ([("images", ("cut.jpg", truncated(big), "image/jpeg"))], 422, "corrupt_image"),
        "huge dimensions": ([("images", ("bomb.png", png_with_dimensions(100_000, 100_000), "image/png"))], 413,
                            "too_many_pixels"),
        "over 50M pixels": ([("images", ("big.png", png_with_dimensions(8000, 7000), "image/png"))], 413,
                            "too_many_pixels"),
        "gif not accepted": ([("images", ("a.gif", encode(noise_image(1), "GIF"), "image/gif"))], 415,
                             "unsupported_format"),
        "one bad among good": (files(good) + [("images", ("cut.jpg", truncated(big), "image/jpeg"))], 422,
                               "corrupt_image"),
        "too many images": (files(*[good] * 11), 422, "too_many_images"),
        "wrong field name": (files(good, field="image"), 422, "validation_error"),
        "a field, not a file": ([("images", (None, b"just text"))], 422, "validation_error"),
        "no images": ([], 422, "validation_error"),
    }


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("case", ["not an image", "zero bytes", "truncated jpeg", "huge dimensions", "over 50M pixels",
                                  "gif not accepted", "one bad among good", "too many images", "wrong field name",
                                  "a field, not a file", "no images"])
def test_bad_uploads_get_a_clear_4xx_and_write_nothing(app_client, auth, service, photos, case):
    uploads, status, code = _bad_upload_cases(photos)[case]
    victim = enroll(app_client, auth, "Victim", "bad-" + case.replace(" ", "-").replace(",", ""), photos["synth_005"][1])
    before = snapshot(service)
    data = {"name": "X", "species": "bad-input"}
    assert_error(app_client.post("/v1/individuals", data=data, files=uploads or None, headers=auth), status, code)
    assert_error(app_client.post(f"/v1/individuals/{victim['id']}/images", files=uploads or None, headers=auth),
                 status, code)
    assert_error(app_client.post("/v1/identify", data={"species": victim["species"]}, files=uploads or None),
                 status, code)
    assert snapshot(service) == before  # no row, no file, no change


def test_oversized_uploads(app_client, auth, service, photos):
    before = snapshot(service)
    # 100 MB: refused by its Content-Length before the body is read
    blob = b"\xff\xd8" + bytes(100 * MB)
    error = assert_error(app_client.post("/v1/individuals", data={"name": "Huge", "species": "zebra"},
                                         files=files(blob), headers=auth), 413, "request_too_large")
    assert "67108864" in error["message"]
    # one file over the per-file limit (20 MB) inside an acceptable request
    blob = encode(noise_image(3, 64)) + bytes(21 * MB)
    assert_error(app_client.post("/v1/identify", data={"species": "zebra"}, files=files(blob)), 413, "file_too_large")
    assert snapshot(service) == before


def test_other_bad_requests(app_client, auth, service, photos):
    good = photos["synth_000"][0]
    before = snapshot(service)
    cases = [
        (app_client.post("/v1/individuals", data={"name": "X"}, files=files(good), headers=auth), 422,
         "validation_error"),  # no species
        (app_client.post("/v1/individuals", data={"name": "X", "species": "!!"}, files=files(good), headers=auth),
         422, "validation_error"),
        (app_client.post("/v1/individuals", data={"name": "X", "species": "zebra", "colour": "red"},
                         files=files(good), headers=auth), 422, "validation_error"),  # unknown field
        (app_client.post("/v1/individuals", json={"name": "X", "species": "zebra"}, headers=auth), 422,
         "validation_error"),  # JSON instead of a form
        (app_client.post("/v1/individuals", content=b"--xyz\r\ngarbage", headers={
            **auth, "content-type": "multipart/form-data; boundary=xyz"}), 422, "validation_error"),
        (app_client.post("/v1/individuals/999999/images", files=files(good), headers=auth), 404,
         "individual_not_found"),
        (app_client.post("/v1/individuals/abc/images", files=files(good), headers=auth), 422, "validation_error"),
        (app_client.post("/v1/individuals/99999999999999999999/merge", json={"source_id": 1}, headers=auth), 422,
         "validation_error"),
        (app_client.get("/v1/individuals/999999"), 404, "individual_not_found"),
        (app_client.delete("/v1/individuals/999999", headers=auth), 404, "individual_not_found"),
        (app_client.post("/v1/identify", data={"species": "zebra", "top_k": 0}, files=files(good)), 422,
         "validation_error"),
        (app_client.post("/v1/identify", data={"species": "zebra", "top_k": 1000}, files=files(good)), 422,
         "top_k_too_large"),
        (app_client.post("/v1/identify", data={"species": "zebra", "bbox": "0.5,0.5,0.9,0.9"}, files=files(good)),
         422, "invalid_bbox"),
        (app_client.post("/v1/identify", data={"species": "zebra", "bbox": "left half"}, files=files(good)), 422,
         "invalid_bbox"),
        (app_client.post("/v1/identify", data={"species": "zebra", "bbox": ["0,0,1,1"] * 3},
                         files=files(good, good)), 422, "invalid_bbox"),
        (app_client.post("/v1/identify", data={"species": "zebra", "bbox": ["0,0,0.1,0.1"] * 11}, files=files(good)),
         422, "invalid_bbox"),  # more animals than images allowed
        (app_client.get("/v1/nothing-here"), 404, "not_found"),
        (app_client.put("/v1/identify"), 405, "method_not_allowed"),
    ]
    for r, status, code in cases:
        assert_error(r, status, code)
    assert snapshot(service) == before


# ---------------------------------------------------------------------- security
def test_auth_on_writes(app_client, service, key, photos):
    good = photos["synth_000"][0]
    before = snapshot(service)
    r = app_client.post("/v1/individuals", data={"name": "X", "species": "zebra"}, files=files(good))
    assert_error(r, 401, "missing_key")
    assert r.headers["www-authenticate"] == "Bearer"
    assert_error(app_client.post("/v1/individuals", data={"name": "X", "species": "zebra"}, files=files(good),
                                 headers={"Authorization": "Bearer wr_not-a-key"}), 401, "invalid_key")
    assert_error(app_client.post("/v1/individuals", data={"name": "X", "species": "zebra"}, files=files(good),
                                 headers={"Authorization": key}), 401, "malformed_authorization")
    assert_error(app_client.patch("/v1/individuals/1", json={"name": "X"}), 401)
    assert_error(app_client.delete("/v1/individuals/1"), 401)
    assert_error(app_client.get("/v1/audit"), 401)
    # a revoked key: 403
    _, secret = service.store.create_key("short-lived")
    headers = {"Authorization": f"Bearer {secret}"}
    made = enroll(app_client, headers, "Made", "auth-test", good)
    service.store.revoke_key("short-lived")
    assert_error(app_client.post("/v1/individuals", data={"name": "X", "species": "zebra"}, files=files(good),
                                 headers=headers), 403, "revoked_key")
    assert_error(app_client.delete(f"/v1/individuals/{made['id']}", headers=headers), 403, "revoked_key")
    # reads need no key by default
    assert app_client.get(f"/v1/individuals/{made['id']}").status_code == 200
    entry = next(e for e in app_client.get("/v1/audit", headers={"Authorization": f"Bearer {key}"}).json()
                 if e["action"] == "individual.create" and e["target_id"] == made["id"])
    assert entry["key_name"] == "short-lived"
    assert service.store.change_seq() == before[0] + 3  # key created, enrollment, key revoked: nothing else


def test_keys_are_stored_hashed(service):
    _, secret = service.store.create_key("hash-check")
    with service.store.engine.connect() as conn:
        dump = "\n".join(str(tuple(row)) for row in conn.exec_driver_sql("SELECT * FROM api_keys"))
    assert secret not in dump and hashlib.sha256(secret.encode()).hexdigest() in dump


def test_every_write_is_audited_with_the_key_name(app_client, auth, photos):
    a = enroll(app_client, auth, "Audited", "audit-test", photos["synth_006"][2])
    app_client.post(f"/v1/individuals/{a['id']}/images", files=files(photos["synth_006"][3]), headers=auth)
    app_client.patch(f"/v1/individuals/{a['id']}", json={"notes": "n"}, headers=auth)
    app_client.delete(f"/v1/individuals/{a['id']}", headers=auth)
    app_client.post(f"/v1/individuals/{a['id']}/restore", headers=auth)
    entries = [e for e in app_client.get("/v1/audit", headers=auth, params={"limit": 1000}).json()
               if e["target_id"] == a["id"] and e["target_type"] == "individual"]
    assert [e["action"] for e in reversed(entries)] == ["individual.create", "sighting.create", "individual.update",
                                                        "individual.delete", "individual.restore"]
    assert {e["key_name"] for e in entries} == {"tester"}


def test_reads_need_a_key_when_configured(tmp_path, tiny_checkpoint, photos):
    settings = Settings(store_dir=tmp_path, checkpoint=tiny_checkpoint, require_key_for_reads=True)
    with TestClient(create_app(settings)) as client:
        secret = client.app.state.service.store.create_key("reader")[1]
        headers = {"Authorization": f"Bearer {secret}"}
        made = enroll(client, headers, "Read me", "zebra", photos["synth_000"][0])
        assert_error(client.get("/v1/individuals"), 401, "missing_key")
        assert_error(client.get(f"/v1/individuals/{made['id']}"), 401)
        assert_error(client.get(f"/v1/images/{made['images'][0]['id']}"), 401)
        assert_error(client.post("/v1/identify", files=files(photos["synth_000"][0])), 401)
        assert client.get("/v1/individuals", headers=headers).json()["total"] == 1
        r = client.post("/v1/identify", files=files(photos["synth_000"][0]), headers=headers)
        assert r.status_code == 200 and top(r.json())["individual_id"] == made["id"]
        assert client.get("/health").status_code == 200


# ---------------------------------------------------------------------- operations
def test_health_ready_metrics_docs(app_client):
    assert app_client.get("/health").json()["status"] == "ok"
    ready = app_client.get("/ready").json()
    assert ready["status"] == "ready" and ready["detector"] is None and ready["species_classifier"] is None
    (model,) = ready["models"]
    assert model["species"] == "*" and model["embedding_dim"] == 32 and model["tta"] == "none"
    assert model["thresholds"]["source"] == "settings"
    assert any("no calibration" in w for w in ready["warnings"])
    assert ready["galleries"]["zebra"] == 12
    metrics = app_client.get("/metrics").text
    assert 'wildreid_http_requests_total{method="POST",route="/v1/identify",status="200"}' in metrics
    assert "wildreid_embed_batch_images_count" in metrics and 'wildreid_gallery_images{species="zebra"} 12.0' in metrics
    assert app_client.get("/docs").status_code == 200
    schema = app_client.get("/openapi.json").json()
    assert {"/v1/identify", "/v1/individuals", "/v1/individuals/{individual_id}", "/v1/individuals/{individual_id}/merge",
            "/v1/images/{image_id}", "/health", "/ready", "/metrics"} <= set(schema["paths"])
    assert "IdentifyResponse" in schema["components"]["schemas"]


def test_calibrated_thresholds_from_the_checkpoint(tmp_path, tiny_checkpoint, photos):
    state = torch.load(tiny_checkpoint, weights_only=False)
    state["calibration"] = {"match_threshold": 0.999, "new_threshold": 0.99, "precision": 0.95}
    checkpoint = tmp_path / "calibrated.pt"
    torch.save(state, checkpoint)
    with TestClient(create_app(Settings(store_dir=tmp_path / "store", checkpoint=checkpoint))) as client:
        secret = client.app.state.service.store.create_key("k")[1]
        enroll(client, {"Authorization": f"Bearer {secret}"}, "Only", "zebra", photos["synth_000"][0])
        ready = client.get("/ready").json()
        assert ready["models"][0]["thresholds"] == {"match_threshold": 0.999, "new_threshold": 0.99,
                                                    "source": "checkpoint"}
        assert not any("calibration" in w for w in ready["warnings"])
        assert identify(client, "zebra", photos["synth_000"][0])["animals"][0]["decision"] == "match"
        other = identify(client, "zebra", photos["synth_001"][0])["animals"][0]
        expected = "match" if other["best_score"] >= 0.999 else "new" if other["best_score"] < 0.99 else "uncertain"
        assert other["decision"] == expected


def test_the_reranking_the_calibration_chose_is_used_and_said(tmp_path, tiny_checkpoint, photos):
    """A checkpoint whose calibration chose k-reciprocal re-ranking is served re-ranked; `rerank: off` serves
    plain cosine; each answer says which, and gives each candidate's cosine beside its ranking score."""
    state = torch.load(tiny_checkpoint, weights_only=False)
    state["postprocessing"] = {"tta": "none", "rerank": {"dba": 0, "qe": 0, "qe_alpha": 3.0, "k_reciprocal": True,
                                                          "k1": 3, "k2": 2, "lambda_value": 0.3}}
    checkpoint = tmp_path / "calibrated.pt"
    torch.save(state, checkpoint)
    answers = {}
    for mode in ("checkpoint", "off"):
        settings = Settings(store_dir=tmp_path / "store", checkpoint=checkpoint, rerank=mode)
        with TestClient(create_app(settings)) as client:
            if mode == "checkpoint":
                headers = {"Authorization": f"Bearer {client.app.state.service.store.create_key('k')[1]}"}
                for n in range(6):
                    enroll(client, headers, f"ind{n}", "zebra", photos[f"synth_00{n}"][0])
            ready = client.get("/ready").json()["models"][0]["rerank"]
            answers[mode] = identify(client, "zebra", photos["synth_000"][1], top_k=3)["animals"][0]
            assert ready["describe"] == answers[mode]["rerank"]["describe"]
    reranked, plain = answers["checkpoint"], answers["off"]
    assert reranked["rerank"]["source"] == "checkpoint"
    assert reranked["rerank"]["describe"] == "k-reciprocal k1=3 k2=2 lambda=0.3"
    assert plain["rerank"] == {**plain["rerank"], "describe": "none", "source": "off"}
    assert all(c["score"] == c["cosine"] for c in plain["candidates"])
    assert any(c["score"] != c["cosine"] for c in reranked["candidates"])
    # the cosines are the same either way: re-ranking changes the order and the ranking score only
    # (up to float32 sums in another order, each then rounded to 6 decimals: 2e-6 apart at most)
    cosines = {c["individual_id"]: c["cosine"] for c in plain["candidates"]}
    for candidate in reranked["candidates"]:
        if candidate["individual_id"] in cosines:
            assert candidate["cosine"] == pytest.approx(cosines[candidate["individual_id"]], abs=2e-6)


def test_restart_rebuilds_the_gallery_from_the_database(tmp_path, tiny_checkpoint, photos):
    settings = Settings(store_dir=tmp_path, checkpoint=tiny_checkpoint)
    with TestClient(create_app(settings)) as client:
        headers = {"Authorization": f"Bearer {client.app.state.service.store.create_key('k')[1]}"}
        a = enroll(client, headers, "Persist", "zebra", photos["synth_007"][0])
        b = enroll(client, headers, "Gone", "zebra", photos["synth_008"][0])
        client.delete(f"/v1/individuals/{b['id']}", headers=headers)
    with TestClient(create_app(settings)) as client:
        assert client.app.state.service.galleries.sizes() == {"zebra": 1}
        assert top(identify(client, "zebra", photos["synth_007"][0]))["individual_id"] == a["id"]


def test_a_new_checkpoint_embeds_the_stored_images_again(tmp_path, tiny_checkpoint, photos):
    from tests.conftest import write_checkpoint

    with TestClient(create_app(Settings(store_dir=tmp_path, checkpoint=tiny_checkpoint))) as client:
        headers = {"Authorization": f"Bearer {client.app.state.service.store.create_key('k')[1]}"}
        a = enroll(client, headers, "Kept", "zebra", photos["synth_009"][0])
        old = client.get("/ready").json()["models"][0]["model"]
    other = write_checkpoint(tmp_path / "other.pt", seed=7)
    with TestClient(create_app(Settings(store_dir=tmp_path, checkpoint=other))) as client:
        ready = client.get("/ready").json()
        assert ready["models"][0]["model"] != old and ready["galleries"] == {"zebra": 1}
        assert ready["foreign_images"] == 0
        result = identify(client, "zebra", photos["synth_009"][0])
        assert top(result)["individual_id"] == a["id"] and top(result)["score"] == pytest.approx(1.0, abs=1e-5)
