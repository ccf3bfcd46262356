"""The review web app without a browser (FastAPI's TestClient): sessions and their cookies, the
cross-site checks on every POST, read-only access, and the reviews each decision writes."""
from __future__ import annotations

import re

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from service.web import encounters
from service.web.session import SEED_COOKIE, SESSION_COOKIE

ORIGIN = "http://testserver"


@pytest.fixture(scope="module")
def photos(synth_csv) -> dict[str, list[bytes]]:
    table = pd.read_csv(synth_csv)
    return {identity: [(synth_csv.parent / p).read_bytes() for p in group["path"]]
            for identity, group in table.groupby("identity", sort=True)}


@pytest.fixture(scope="module")
def app_client(tmp_path_factory, tiny_checkpoint):
    app = create_app(Settings(store_dir=tmp_path_factory.mktemp("web-store"), checkpoint=tiny_checkpoint))
    with TestClient(app, follow_redirects=False) as client:
        yield client


@pytest.fixture(scope="module")
def service(app_client):
    return app_client.app.state.service


@pytest.fixture(scope="module")
def key(service) -> str:
    return service.store.create_key("ranger")[1]


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([0-9a-f]*)"', html).group(1)


def browser(app_client) -> TestClient:
    """A client of its own cookie jar on the module's app (one browser)."""
    client = TestClient(app_client.app, follow_redirects=False)
    client.headers["origin"] = ORIGIN
    return client


def signed_in(app_client, key) -> tuple[TestClient, str]:
    client = browser(app_client)
    token = csrf_of(client.get("/sign-in").text)
    r = client.post("/sign-in", data={"key": key, "csrf": token, "next": "/individuals"})
    assert r.status_code == 303 and r.headers["location"] == "/individuals", r.text
    return client, csrf_of(client.get("/individuals").text)


def jpeg(blob: bytes, name: str = "p.jpg") -> tuple:
    return ("images", (name, blob, "image/jpeg"))


def test_session_cookie_is_httponly_strict_and_holds_the_key(app_client, key):
    client = browser(app_client)
    first = client.get("/sign-in")
    assert first.status_code == 200 and "API key" in first.text
    seed_cookie = first.headers["set-cookie"]
    assert SEED_COOKIE in seed_cookie and "httponly" in seed_cookie.lower() and "samesite=strict" in seed_cookie.lower()
    r = client.post("/sign-in", data={"key": key, "csrf": csrf_of(first.text)})
    cookies = [c for c in r.headers.get_list("set-cookie") if c.startswith(SESSION_COOKIE + "=")]
    assert len(cookies) == 1
    flags = cookies[0].lower()
    assert "httponly" in flags and "samesite=strict" in flags and "path=/" in flags
    assert "secure" not in flags  # plain http here: a Secure cookie would never come back
    page = client.get("/")
    assert "ranger" in page.text and "Sign out" in page.text


def test_a_wrong_key_is_told_in_words(app_client):
    client = browser(app_client)
    token = csrf_of(client.get("/sign-in").text)
    r = client.post("/sign-in", data={"key": "wr_not-a-key", "csrf": token})
    assert r.status_code == 401 and "unknown API key" in r.text and "text/html" in r.headers["content-type"]
    assert SESSION_COOKIE not in r.headers.get("set-cookie", "")


def test_every_post_needs_this_servers_origin_and_the_sessions_token(app_client, key, service):
    client, token = signed_in(app_client, key)
    before = service.store.counts()
    other = {"origin": "https://evil.example"}
    cases = {
        "another site's origin": dict(data={"csrf": token, "name": "X", "species": "zebra"}, headers=other),
        "no token": dict(data={"name": "X", "species": "zebra"}),
        "a wrong token": dict(data={"csrf": "0" * 64, "name": "X", "species": "zebra"}),
    }
    for case, request in cases.items():
        r = client.post("/individuals/new", **request)
        assert r.status_code == 403, (case, r.status_code)
        assert "text/html" in r.headers["content-type"] and "<p class=\"message error\"" in r.text, case
    no_origin = TestClient(app_client.app, follow_redirects=False, cookies=client.cookies)
    r = no_origin.post("/sign-out", data={"csrf": token})
    assert r.status_code == 403 and "not sent from a page of this server" in r.text
    # a token of another session (another browser) is refused too
    stranger = browser(app_client)
    stranger_token = csrf_of(stranger.get("/sign-in").text)
    assert stranger_token != token
    assert client.post("/sign-out", data={"csrf": stranger_token}).status_code == 403
    assert service.store.counts() == before
    # signing out with the right token works, and the old token is dead afterwards
    assert client.post("/sign-out", data={"csrf": token}).status_code == 303
    assert client.post("/sign-out", data={"csrf": token}).status_code == 403


def test_pages_are_read_only_without_a_key(app_client, service, key, photos):
    writer, token = signed_in(app_client, key)
    (identity, blobs), *_ = photos.items()
    r = writer.post("/individuals/new", data={"csrf": token, "name": "Reader's", "species": "okapi"},
                    files=[jpeg(blobs[0])])
    assert r.status_code == 303, r.text
    individual = int(r.headers["location"].rsplit("/", 1)[1])
    anonymous = browser(app_client)
    for path in ("/", "/individuals", f"/individuals/{individual}", "/individuals?species=okapi"):
        r = anonymous.get(path)
        assert r.status_code == 200 and "browsing read-only" in r.text, path
    image_id = service.store.get_individual(individual)["images"][0]["id"]
    thumb = anonymous.get(f"/photos/{image_id}/thumb")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    cached = list((service.settings.store_dir / "cache" / "thumbs").rglob("*.jpg"))
    assert cached and thumb.content == cached[0].read_bytes()
    token = csrf_of(anonymous.get(f"/individuals/{individual}").text)
    r = anonymous.post(f"/individuals/{individual}/rename", data={"csrf": token, "name": "Hijacked"})
    assert r.status_code == 401 and "sign in with your API key to make changes" in r.text
    assert service.store.get_individual(individual)["name"] == "Reader's"


def test_reads_need_a_key_when_the_server_says_so(tmp_path, tiny_checkpoint):
    app = create_app(Settings(store_dir=tmp_path, checkpoint=tiny_checkpoint, require_key_for_reads=True))
    with TestClient(app, follow_redirects=False) as client:
        key = app.state.service.store.create_key("ranger")[1]
        for path in ("/", "/individuals", "/individuals/1", "/photos/1/thumb"):
            r = client.get(path)
            assert r.status_code == 401 and "needs a key to show its pages" in r.text, path
        client.headers["origin"] = ORIGIN
        token = csrf_of(client.get("/sign-in").text)
        assert client.post("/sign-in", data={"key": key, "csrf": token}).status_code == 303
        assert client.get("/individuals").status_code == 200


def test_errors_are_pages_in_words(app_client, key, photos):
    client, token = signed_in(app_client, key)
    for path, words in {"/individuals/0": "individual", "/individuals/99999": "individual 99999 does not exist",
                        "/encounters/" + "a" * 24: "there is no encounter"}.items():
        r = client.get(path)
        assert r.status_code in (404, 422) and words in r.text and "text/html" in r.headers["content-type"], path
    # a form that fails goes back to its page, which shows why
    r = client.post("/identify", data={"csrf": token, "species": "okapi"},
                    files=[("images", ("notes.csv", b"a,b\n1,2\n", "text/csv"))], headers={"referer": ORIGIN + "/"})
    assert r.status_code == 303 and r.headers["location"] == "/"
    shown = client.get("/")
    assert "images[0] &#39;notes.csv&#39; is not an image Pillow can read" in shown.text, shown.text
    assert "is not an image" not in client.get("/").text  # shown once


def decision(client, token, encounter, index, value, **data):
    r = client.post(f"/encounters/{encounter}/animals/{index}", data={"csrf": token, "decision": value, **data},
                    headers={"referer": f"{ORIGIN}/encounters/{encounter}"})
    assert r.status_code == 303, r.text
    return client.get(r.headers["location"].split("#")[0])


def identify(client, token, species, blob) -> str:
    r = client.post("/identify", data={"csrf": token, "species": species}, files=[jpeg(blob)])
    assert r.status_code == 303 and r.headers["location"].startswith("/encounters/"), r.text
    return r.headers["location"].rsplit("/", 1)[1]


def test_each_decision_is_a_review_row_and_audited(app_client, service, key, photos):
    client, token = signed_in(app_client, key)
    (a, a_photos), (b, b_photos), *_ = photos.items()
    ids = {}
    for identity, blobs in ((a, a_photos), (b, b_photos)):
        r = client.post("/individuals/new", data={"csrf": token, "name": identity, "species": "gnu"},
                        files=[jpeg(blobs[0]), jpeg(blobs[1], "q.jpg")])
        assert r.status_code == 303, r.text
        ids[identity] = int(r.headers["location"].rsplit("/", 1)[1])

    encounter = identify(client, token, "gnu", a_photos[2])
    page = client.get(f"/encounters/{encounter}").text
    assert f"confirm:{ids[a]}" in page and "match ≥" in page
    top = service.store.get_individual(ids[a])["image_count"]
    # reject the wrong one first (the animal stays open), then confirm the right one
    shown = decision(client, token, encounter, 0, f"reject:{ids[b]}")
    assert f"Rejected: {b} is not animal 0" in shown.text
    shown = decision(client, token, encounter, 0, f"confirm:{ids[a]}", viewpoint="left")
    assert re.search(f"Confirmed: the photos are now sighting [0-9]+ of {a}", shown.text)
    after = service.store.get_individual(ids[a])
    assert after["image_count"] == top + 1 and after["images"][-1]["viewpoint"] == "left"
    assert len(after["sightings"]) == 2 and after["sightings"][-1]["key_name"] == "ranger"
    # the same animal twice: refused, nothing stored twice
    again = decision(client, token, encounter, 0, f"confirm:{ids[a]}")
    assert "was reviewed already" in again.text
    assert service.store.get_individual(ids[a])["image_count"] == top + 1

    new_encounter = identify(client, token, "gnu", photos[list(photos)[2]][0])
    assert "type the name" in decision(client, token, new_encounter, 0, "new", name="  ").text
    shown = decision(client, token, new_encounter, 0, "new", name="Newcomer")
    assert "Enrolled Newcomer" in shown.text
    skipped = identify(client, token, "gnu", photos[list(photos)[3]][0])
    decision(client, token, skipped, 0, "skip")

    rows = service.store.reviews_of("gnu")
    assert [r["verdict"] for r in rows] == ["rejected", "confirmed", "new", "skipped"]
    rejected, confirmed, new, skip = rows
    sha = after["images"][-1]["sha256"]
    assert confirmed["query_sha256"] == [sha] and confirmed["image_ids"] == [after["images"][-1]["id"]]
    assert confirmed["candidate_id"] == confirmed["individual_id"] == ids[a] and confirmed["key_name"] == "ranger"
    assert rejected["candidate_id"] == ids[b] and rejected["individual_id"] is None and rejected["image_ids"] == []
    shown_candidates = {c["individual_id"]: c for c in encounters.load(service, encounter)["animals"][0]["candidates"]}
    for row in (confirmed, rejected):  # the scores the reviewer saw, beside the verdict
        seen = shown_candidates[row["candidate_id"]]
        assert (row["candidate_rank"], row["score"], row["cosine"]) == (seen["rank"], seen["score"], seen["cosine"])
        assert row["best_score"] == max(c["cosine"] for c in shown_candidates.values())
    assert confirmed["match_threshold"] is not None and confirmed["thresholds_source"] == "settings"
    newcomer = service.store.get_individual(new["individual_id"])
    assert newcomer["name"] == "Newcomer" and new["image_ids"] == [newcomer["images"][0]["id"]]
    assert skip["individual_id"] is None and skip["encounter"] == skipped
    audited = [e for e in service.store.audit_entries(50) if e["target_type"] == "review"]
    assert {e["action"] for e in audited} == {"review.rejected", "review.confirmed", "review.new", "review.skipped"}
    assert {e["target_id"] for e in audited} == {r["id"] for r in rows}

    # more candidates: the next page comes from the stored query, no upload again
    more = identify(client, token, "gnu", a_photos[3])
    r = client.post(f"/encounters/{more}/animals/0/more", data={"csrf": token})
    assert r.status_code == 303
    assert "3 candidates" in client.get(f"/encounters/{more}").text  # all three of the gallery


def test_delete_and_restore_through_the_store_functions(app_client, service, key, photos):
    client, token = signed_in(app_client, key)
    blobs = photos[list(photos)[4]]
    r = client.post("/individuals/new", data={"csrf": token, "name": "Gone", "species": "eland"}, files=[jpeg(blobs[0])])
    individual = int(r.headers["location"].rsplit("/", 1)[1])
    back = {"referer": f"{ORIGIN}/individuals/{individual}"}
    assert client.post(f"/individuals/{individual}/delete", data={"csrf": token}, headers=back).status_code == 303
    assert service.store.get_individual(individual)["deleted_at"] is not None
    assert service.galleries.sizes().get("eland", 0) == 0  # its photos left the gallery
    assert "Gone" not in client.get("/individuals?species=eland").text
    assert "Gone" in client.get("/individuals?species=eland&deleted=true").text
    # deleting it again: the store's refusal, in words, on the page the form came from
    client.post(f"/individuals/{individual}/delete", data={"csrf": token}, headers=back)
    assert f"individual {individual} is already deleted" in client.get(f"/individuals/{individual}").text
    assert client.post(f"/individuals/{individual}/restore", data={"csrf": token}, headers=back).status_code == 303
    assert service.store.get_individual(individual)["deleted_at"] is None
    assert service.galleries.sizes()["eland"] == 1
    history = client.get(f"/individuals/{individual}").text
    assert "individual.delete" in history and "individual.restore" in history
